import CShim
import Glibc
import Synchronization

/// Why a guest-physical access was refused. Never a host fault: a guest-chosen
/// address or length that falls outside RAM becomes one of these values.
public enum GuestMemoryError: Error, Equatable, Sendable, CustomStringConvertible {
  /// The range `[address, address + length)` is not entirely inside one RAM region.
  case outOfRange(address: UInt64, length: UInt64)
  /// The host refused to map the requested amount of guest RAM.
  case cannotMap(size: UInt64, errno: Int32)
  /// The requested RAM size is zero or beyond what Hostvisor supports.
  case invalidSize(UInt64)
  /// The host kernel refused an madvise advice on guest RAM (`what` names it, e.g. KSM merging).
  case cannotAdvise(what: String, errno: Int32)

  public var description: String {
    switch self {
    case .outOfRange(let address, let length):
      return "guest range 0x\(String(address, radix: 16))+0x\(String(length, radix: 16)) is outside guest RAM"
    case .cannotMap(let size, let err):
      return "cannot map \(size >> 20) MiB of guest RAM: \(String(cString: strerror(err)))"
    case .invalidSize(let size):
      return size == 0 ? "memory size must be greater than zero" : "memory size \(size) is not supported"
    case .cannotAdvise(let what, let err):
      return "the host kernel refused \(what) on guest RAM: \(String(cString: strerror(err)))"
    }
  }
}

/// Hears about guest RAM written from the host side while the machine may be running (device
/// DMA: virtio buffers and rings), so an accelerator that keeps anything derived from guest RAM
/// can drop it. The software CPU installs one (it caches decoded code per guest-physical page);
/// KVM installs none, since the hardware sees host writes like any other store.
///
/// Called on the writing thread, after the bytes are in place; must be quick and thread-safe.
public protocol GuestMemoryWriteObserver: AnyObject, Sendable {
  /// Guest-physical `[address, address + length)` was just written by the host side.
  func guestMemoryWritten(at address: UInt64, length: UInt64)
}

/// What the host kernel is told about guest RAM (madvise), for overcommit: both off by default.
public struct GuestMemoryAdvice: Sendable, Equatable {
  /// `MADV_MERGEABLE`: KSM may merge identical guest pages across the host.
  public var mergeable: Bool
  /// `MADV_HUGEPAGE`: back guest RAM with transparent huge pages where the host can.
  public var hugePages: Bool

  public init(mergeable: Bool = false, hugePages: Bool = false) {
    self.mergeable = mergeable
    self.hugePages = hugePages
  }
}

/// Guest RAM: anonymous host mappings (MAP_NORESERVE, so untouched RAM costs nothing),
/// laid out as a PC does: RAM below the 32-bit PCI hole, the rest above 4 GiB.
///
/// This is the one place that translates guest-physical addresses to host addresses.
/// Every accessor is bounds-checked; a bad address is an error value, never a host fault.
public final class GuestMemory: @unchecked Sendable {
  /// One contiguous piece of guest RAM backed by one host mapping.
  public struct Region: Sendable {
    /// First guest-physical address of the region.
    public let guestBase: UInt64
    /// Size in bytes.
    public let size: UInt64
    /// Host address where the region is mapped.
    public nonisolated(unsafe) let host: UnsafeMutableRawPointer
    /// One past the last guest-physical address of the region.
    public var guestEnd: UInt64 { guestBase + size }
  }

  /// Start of the 32-bit PCI hole: RAM beyond this is placed at `highMemoryBase`.
  public static let pciHoleStart: UInt64 = 0xC000_0000
  /// Where RAM resumes above the PCI hole.
  public static let highMemoryBase: UInt64 = 0x1_0000_0000
  /// The largest guest RAM Hostvisor accepts (1 TiB).
  public static let maximumSize: UInt64 = 1 << 40

  /// RAM regions in ascending guest-physical order.
  public let regions: [Region]
  /// Total RAM in bytes.
  public let totalSize: UInt64
  /// Pages written while dirty logging is on: host-side writes (`noteWrite`) always mark it;
  /// the software CPU marks its own stores. Off until an accelerator turns it on.
  public let dirtyPages: GuestDirtyBitmap

  private struct ObserverReference {
    weak var observer: (any GuestMemoryWriteObserver)?
  }
  /// Weak, so an accelerator holding this memory does not keep itself alive through it.
  private let writeObserver = Mutex(ObserverReference())
  /// Device memory the guest maps like RAM (see `mapDeviceMemory`).
  let deviceRegionList = Mutex<[Region]>([])

  /// Maps `size` bytes of guest RAM, split around the PCI hole.
  public convenience init(size: UInt64) throws(GuestMemoryError) {
    try self.init(size: size, mappingFile: nil)
  }

  /// Maps `size` bytes of guest RAM, split around the PCI hole: anonymous memory, or when
  /// `mappingFile` is an open descriptor, that file mapped copy-on-write (MAP_PRIVATE), the
  /// regions back to back from offset 0 (the layout of a snapshot's memory file). The file must
  /// hold at least `size` bytes; writes by the guest never reach it.
  public init(size: UInt64, mappingFile: Int32?) throws(GuestMemoryError) {
    guard size > 0, size <= Self.maximumSize, size % 4096 == 0 else { throw .invalidSize(size) }
    var layout: [(UInt64, UInt64)] = [(0, min(size, Self.pciHoleStart))]
    if size > Self.pciHoleStart { layout.append((Self.highMemoryBase, size - Self.pciHoleStart)) }
    var mapped: [Region] = []
    var fileOffset: UInt64 = 0
    for (base, length) in layout {
      let pointer =
        if let mappingFile {
          mmap(nil, Int(length), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, mappingFile, off_t(fileOffset))
        } else {
          mmap(nil, Int(length), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        }
      fileOffset += length
      if pointer == MAP_FAILED || pointer == nil {
        let err = errno
        for region in mapped { munmap(region.host, Int(region.size)) }
        throw .cannotMap(size: size, errno: err)
      }
      mapped.append(Region(guestBase: base, size: length, host: pointer!))
    }
    regions = mapped
    totalSize = size
    dirtyPages = GuestDirtyBitmap(pageCount: mapped.last!.guestEnd >> 12)
  }

  deinit {
    for region in regions { munmap(region.host, Int(region.size)) }
    for region in deviceRegionList.withLock({ $0 }) { munmap(region.host, Int(region.size)) }
  }

  /// The region holding `address`, if any.
  @inline(__always)
  public func region(containing address: UInt64) -> Region? {
    for region in regions where address >= region.guestBase && address < region.guestEnd {
      return region
    }
    return nil
  }

  /// The host address of `[address, address + length)` when the whole range lies in one region.
  @inline(__always)
  public func hostPointer(_ address: UInt64, length: UInt64 = 1) -> UnsafeMutableRawPointer? {
    for region in regions where address >= region.guestBase && address < region.guestEnd {
      let offset = address - region.guestBase
      guard length <= region.size - offset else { return nil }
      return region.host + Int(offset)
    }
    return nil
  }

  /// Installs the accelerator's observer of host-side writes (nil removes it). Held weakly.
  public func setWriteObserver(_ observer: (any GuestMemoryWriteObserver)?) {
    writeObserver.withLock { $0.observer = observer }
  }

  /// Reports that the host side wrote `[address, address + length)` of guest RAM (for the
  /// accelerator's observer and the dirty bitmap). The typed
  /// writers below (`write`, `writeBytes`, `fill`) call it themselves; code that writes through
  /// `slice` or `hostPointer` (device DMA) must call it after writing.
  public func noteWrite(at address: UInt64, length: UInt64) {
    dirtyPages.mark(address: address, length: length)
    guard length > 0, let observer = writeObserver.withLock({ $0.observer }) else { return }
    observer.guestMemoryWritten(at: address, length: length)
  }

  /// A bounds-checked view of guest RAM for a device; valid while this object lives. Writes
  /// through it must be reported with `noteWrite(at:length:)`.
  public func slice(at address: UInt64, length: UInt64) throws(GuestMemoryError) -> UnsafeMutableRawBufferPointer {
    guard let pointer = hostPointer(address, length: length) else {
      throw .outOfRange(address: address, length: length)
    }
    return UnsafeMutableRawBufferPointer(start: pointer, count: Int(length))
  }

  /// Reads a little-endian integer at `address`.
  @inline(__always)
  public func read<T: FixedWidthInteger>(_: T.Type = T.self, at address: UInt64) throws(GuestMemoryError) -> T {
    guard let pointer = hostPointer(address, length: UInt64(MemoryLayout<T>.size)) else {
      throw .outOfRange(address: address, length: UInt64(MemoryLayout<T>.size))
    }
    return T(littleEndian: pointer.loadUnaligned(as: T.self))
  }

  /// Writes a little-endian integer at `address`.
  @inline(__always)
  public func write<T: FixedWidthInteger>(_ value: T, at address: UInt64) throws(GuestMemoryError) {
    guard let pointer = hostPointer(address, length: UInt64(MemoryLayout<T>.size)) else {
      throw .outOfRange(address: address, length: UInt64(MemoryLayout<T>.size))
    }
    pointer.storeBytes(of: value.littleEndian, as: T.self)
    noteWrite(at: address, length: UInt64(MemoryLayout<T>.size))
  }

  /// Copies `count` bytes out of guest RAM.
  public func readBytes(at address: UInt64, count: Int) throws(GuestMemoryError) -> [UInt8] {
    let source = try slice(at: address, length: UInt64(count))
    return Array(source)
  }

  /// Copies `bytes` into guest RAM at `address`.
  public func writeBytes<C: Collection>(_ bytes: C, at address: UInt64) throws(GuestMemoryError)
  where C.Element == UInt8 {
    let destination = try slice(at: address, length: UInt64(bytes.count))
    var index = 0
    for byte in bytes {
      destination[index] = byte
      index += 1
    }
    noteWrite(at: address, length: UInt64(bytes.count))
  }

  /// Fills `[address, address + length)` with `byte`.
  public func fill(_ byte: UInt8, at address: UInt64, length: UInt64) throws(GuestMemoryError) {
    let destination = try slice(at: address, length: length)
    if length > 0 { memset(destination.baseAddress!, Int32(byte), Int(length)) }
    noteWrite(at: address, length: length)
  }

  /// Gives the host pages of `[address, address + length)` back (madvise MADV_DONTNEED): the
  /// next guest or host access finds them zero-filled (anonymous RAM) or back at the mapped
  /// file's contents (RAM restored from a snapshot file). Only whole 4 KiB pages entirely inside
  /// one RAM region are discarded; returns false, touching nothing, for any other range.
  @discardableResult
  public func discard(at address: UInt64, length: UInt64) -> Bool {
    guard length > 0, address % 4096 == 0, length % 4096 == 0,
      let pointer = hostPointer(address, length: length)
    else { return false }
    guard madvise(pointer, Int(length), MADV_DONTNEED) == 0 else { return false }
    noteWrite(at: address, length: length)
    return true
  }

  /// Applies `advice` to every RAM region: `MADV_MERGEABLE` lets the host's KSM merge identical
  /// pages (copy-on-write), `MADV_HUGEPAGE` asks for transparent huge pages even when the host's
  /// THP policy is `madvise`. Advice already given stays; nothing is undone on failure.
  public func apply(_ advice: GuestMemoryAdvice) throws(GuestMemoryError) {
    for (wanted, flag, what) in [
      (advice.mergeable, MADV_MERGEABLE, "KSM merging (MADV_MERGEABLE; a kernel with CONFIG_KSM)"),
      (advice.hugePages, MADV_HUGEPAGE, "transparent huge pages (MADV_HUGEPAGE; a kernel with THP)"),
    ] where wanted {
      for region in regions where madvise(region.host, Int(region.size), flag) != 0 {
        throw .cannotAdvise(what: what, errno: errno)
      }
    }
  }

  /// The e820-style map of usable RAM: (base, length) pairs.
  public var ramRanges: [(base: UInt64, length: UInt64)] {
    regions.map { ($0.guestBase, $0.size) }
  }
}
