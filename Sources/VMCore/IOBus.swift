/// A device reached through x86 port I/O. Devices lock their own state: vCPU threads call in concurrently.
public protocol PortIODevice: AnyObject, Sendable {
  /// Reads `size` (1, 2 or 4) bytes from `port`.
  func portRead(port: UInt16, size: Int) -> UInt32
  /// Writes the low `size` bytes of `value` to `port`.
  func portWrite(port: UInt16, size: Int, value: UInt32)
}

/// A device reached through memory-mapped I/O. `offset` is relative to the start of its registered range.
public protocol MMIODevice: AnyObject, Sendable {
  /// Reads `size` (1, 2, 4 or 8) bytes at `offset`.
  func mmioRead(offset: UInt64, size: Int) -> UInt64
  /// Writes the low `size` bytes of `value` at `offset`.
  func mmioWrite(offset: UInt64, size: Int, value: UInt64)
}

/// Why a device registration was refused.
public enum IOBusError: Error, Equatable, Sendable, CustomStringConvertible {
  case portOverlap(first: UInt16, count: Int)
  case mmioOverlap(base: UInt64, length: UInt64)
  case emptyRange

  public var description: String {
    switch self {
    case .portOverlap(let first, let count):
      return "port range 0x\(String(first, radix: 16))+\(count) overlaps a registered device"
    case .mmioOverlap(let base, let length):
      return "MMIO range 0x\(String(base, radix: 16))+0x\(String(length, radix: 16)) overlaps a registered device"
    case .emptyRange: return "empty I/O range"
    }
  }
}

/// Port-I/O and MMIO ranges dispatched to devices. Register everything before the vCPUs
/// start; after that the bus is read-only and safe to use from any thread.
/// A device never knows which accelerator runs the CPU.
public final class IOBus: @unchecked Sendable {
  private struct MMIORange {
    let base: UInt64
    let length: UInt64
    let device: any MMIODevice
  }

  private var portDevices: [any PortIODevice] = []
  /// For each of the 65536 ports, 1 + the index into `portDevices`, or 0 when unclaimed.
  private var portTable = [UInt16](repeating: 0, count: 65536)
  private var mmioRanges: [MMIORange] = []

  public init() {}

  /// Claims `count` ports starting at `first` for `device`.
  public func registerPorts(_ first: UInt16, count: Int, device: any PortIODevice) throws(IOBusError) {
    guard count > 0, Int(first) + count <= 65536 else { throw .emptyRange }
    for port in Int(first)..<(Int(first) + count) where portTable[port] != 0 {
      throw .portOverlap(first: first, count: count)
    }
    portDevices.append(device)
    let tag = UInt16(portDevices.count)
    for port in Int(first)..<(Int(first) + count) { portTable[port] = tag }
  }

  /// Claims `[base, base + length)` of guest-physical address space for `device`.
  public func registerMMIO(_ base: UInt64, length: UInt64, device: any MMIODevice) throws(IOBusError) {
    guard length > 0, base &+ length > base else { throw .emptyRange }
    for range in mmioRanges where base < range.base + range.length && range.base < base + length {
      throw .mmioOverlap(base: base, length: length)
    }
    mmioRanges.append(MMIORange(base: base, length: length, device: device))
    mmioRanges.sort { $0.base < $1.base }
  }

  /// Whether a device claims `port`.
  public func hasPortDevice(_ port: UInt16) -> Bool { portTable[Int(port)] != 0 }

  /// Reads from a port; unclaimed ports read as all ones, as on a PC.
  @inline(__always)
  public func portRead(_ port: UInt16, size: Int) -> UInt32 {
    let tag = portTable[Int(port)]
    guard tag != 0 else { return size >= 4 ? 0xFFFF_FFFF : (UInt32(1) << (size * 8)) - 1 }
    return portDevices[Int(tag) - 1].portRead(port: port, size: size)
  }

  /// Writes to a port; writes to unclaimed ports are dropped.
  @inline(__always)
  public func portWrite(_ port: UInt16, size: Int, value: UInt32) {
    let tag = portTable[Int(port)]
    guard tag != 0 else { return }
    portDevices[Int(tag) - 1].portWrite(port: port, size: size, value: value)
  }

  private func mmioRange(for address: UInt64) -> MMIORange? {
    var low = 0
    var high = mmioRanges.count
    while low < high {
      let mid = (low + high) / 2
      let range = mmioRanges[mid]
      if address < range.base {
        high = mid
      } else if address - range.base >= range.length {
        low = mid + 1
      } else {
        return range
      }
    }
    return nil
  }

  /// Whether a device claims `address`.
  public func hasMMIODevice(_ address: UInt64) -> Bool { mmioRange(for: address) != nil }

  /// Reads from MMIO; unclaimed addresses read as all ones.
  public func mmioRead(_ address: UInt64, size: Int) -> UInt64 {
    guard let range = mmioRange(for: address) else {
      return size >= 8 ? ~0 : (UInt64(1) << (size * 8)) - 1
    }
    return range.device.mmioRead(offset: address - range.base, size: size)
  }

  /// Writes to MMIO; writes to unclaimed addresses are dropped.
  public func mmioWrite(_ address: UInt64, size: Int, value: UInt64) {
    guard let range = mmioRange(for: address) else { return }
    range.device.mmioWrite(offset: address - range.base, size: size, value: value)
  }
}
