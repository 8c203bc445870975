import Glibc
import Synchronization

/// "Which guest pages were written since the last reset", as both accelerators answer it.
/// Diff snapshots and live migration use only this protocol. KVM answers from the kernel's
/// dirty log (plus the host side's writes); the software CPU from a bitmap its write path and
/// device DMA feed (`GuestDirtyBitmap`).
public protocol DirtyPageTracking: AnyObject, Sendable {
  /// Whether dirty logging is on.
  var isDirtyLogging: Bool { get }
  /// Turns dirty logging on and resets the log: from now on every write to guest RAM (by the
  /// guest or by devices) is recorded. Calling it while logging is on only resets the log.
  func startDirtyLogging() throws
  /// The guest-physical page numbers (address >> 12) written since logging started or since
  /// the previous call, in ascending order; resets the log. A write that happens while this
  /// runs is reported by this call or by the next one, never by neither.
  func takeDirtyPages() throws -> [UInt64]
  /// Turns dirty logging off (the guest then runs at full speed again).
  func stopDirtyLogging()
}

/// A per-page dirty bitmap over guest RAM, indexed by guest-physical page number. Marking is
/// lock-free and costs one relaxed load when logging is off. Thread-safe.
public final class GuestDirtyBitmap: @unchecked Sendable {
  /// Number of pages the bitmap covers (guest-physical pages from 0 to the end of RAM).
  public let pageCount: UInt64
  private let words: UnsafeMutablePointer<Atomic<UInt64>>
  private let wordCount: Int
  private let enabled = Atomic<Bool>(false)

  /// A bitmap for guest-physical pages `0..<pageCount`, all clean, logging off.
  public init(pageCount: UInt64) {
    self.pageCount = pageCount
    wordCount = Int((pageCount + 63) / 64)
    // calloc: zero pages the kernel hands out lazily, so a large guest's bitmap costs nothing
    // until it is used. Atomic<UInt64> has the layout of UInt64.
    let raw = calloc(max(wordCount, 1), MemoryLayout<UInt64>.stride)!
    words = raw.bindMemory(to: Atomic<UInt64>.self, capacity: max(wordCount, 1))
  }

  deinit { free(UnsafeMutableRawPointer(words)) }

  /// Whether writes are being recorded.
  @inline(__always)
  public var isEnabled: Bool { enabled.load(ordering: .relaxed) }

  /// Starts or stops recording. Starting does not clear pages already marked.
  public func setEnabled(_ on: Bool) { enabled.store(on, ordering: .sequentiallyConsistent) }

  /// Records a write to guest-physical page `page` (ignored when logging is off or the page is
  /// beyond RAM).
  @inline(__always)
  public func mark(page: UInt64) {
    guard isEnabled, page < pageCount else { return }
    let word = words + Int(page >> 6)
    let bit: UInt64 = 1 << (page & 63)
    if word.pointee.load(ordering: .relaxed) & bit == 0 {
      word.pointee.bitwiseOr(bit, ordering: .relaxed)
    }
  }

  /// Records a write to `[address, address + length)`.
  @inline(__always)
  public func mark(address: UInt64, length: UInt64) {
    guard isEnabled, length > 0 else { return }
    let last = (address &+ length &- 1) >> 12
    var page = address >> 12
    while page <= last {
      mark(page: page)
      page += 1
    }
  }

  /// Adds the marked page numbers to `pages` and clears them (each word atomically).
  public func take(into pages: inout [UInt64]) {
    for index in 0..<wordCount {
      let word = words + index
      guard word.pointee.load(ordering: .relaxed) != 0 else { continue }
      var bits = word.pointee.exchange(0, ordering: .acquiringAndReleasing)
      while bits != 0 {
        pages.append(UInt64(index) * 64 + UInt64(bits.trailingZeroBitCount))
        bits &= bits - 1
      }
    }
  }

  /// The marked page numbers in ascending order; clears them.
  public func take() -> [UInt64] {
    var pages: [UInt64] = []
    take(into: &pages)
    return pages
  }
}
