import Synchronization
import Testing
import VMCore

/// A device on both buses that records every access. Port reads answer `tag + port`; MMIO
/// reads answer `tag << 32 | offset`.
final class RecordingDevice: PortIODevice, MMIODevice {
  struct Access: Equatable {
    /// The port, or the offset into the MMIO range.
    var at: UInt64
    var size: Int
    /// The value written; nil for a read.
    var value: UInt64?
  }
  let tag: UInt64
  private let log = Mutex<[Access]>([])
  init(tag: UInt64) { self.tag = tag }
  var accesses: [Access] { log.withLock { $0 } }
  private func record(_ at: UInt64, _ size: Int, _ value: UInt64?) {
    log.withLock { $0.append(Access(at: at, size: size, value: value)) }
  }

  func portRead(port: UInt16, size: Int) -> UInt32 {
    record(UInt64(port), size, nil)
    return UInt32(truncatingIfNeeded: tag) &+ UInt32(port)
  }
  func portWrite(port: UInt16, size: Int, value: UInt32) { record(UInt64(port), size, UInt64(value)) }
  func mmioRead(offset: UInt64, size: Int) -> UInt64 {
    record(offset, size, nil)
    return tag << 32 | offset
  }
  func mmioWrite(offset: UInt64, size: Int, value: UInt64) { record(offset, size, value) }
}

@Suite struct IOBusPortTests {
  @Test func accessesReachTheOwningDeviceWithTheAbsolutePort() throws {
    let bus = IOBus()
    let uart = RecordingDevice(tag: 0x1000)
    let pic = RecordingDevice(tag: 0x2000)
    try bus.registerPorts(0x3F8, count: 8, device: uart)
    try bus.registerPorts(0x20, count: 2, device: pic)
    #expect(bus.portRead(0x3F8, size: 1) == 0x1000 + 0x3F8)
    #expect(bus.portRead(0x3FF, size: 4) == 0x1000 + 0x3FF)
    bus.portWrite(0x3F9, size: 2, value: 0xBEEF)
    #expect(bus.portRead(0x21, size: 1) == 0x2000 + 0x21)
    bus.portWrite(0x20, size: 1, value: 0x11)
    #expect(
      uart.accesses == [
        .init(at: 0x3F8, size: 1, value: nil), .init(at: 0x3FF, size: 4, value: nil),
        .init(at: 0x3F9, size: 2, value: 0xBEEF),
      ])
    #expect(pic.accesses == [.init(at: 0x21, size: 1, value: nil), .init(at: 0x20, size: 1, value: 0x11)])
    #expect(bus.hasPortDevice(0x3F8) && bus.hasPortDevice(0x3FF) && bus.hasPortDevice(0x21))
    #expect(!bus.hasPortDevice(0x3F7) && !bus.hasPortDevice(0x400) && !bus.hasPortDevice(0x22))
  }

  @Test func unclaimedPortsReadAllOnesAndDropWrites() {
    let bus = IOBus()
    #expect(bus.portRead(0x80, size: 1) == 0xFF)
    #expect(bus.portRead(0x80, size: 2) == 0xFFFF)
    #expect(bus.portRead(0x80, size: 4) == 0xFFFF_FFFF)
    #expect(bus.portRead(0xFFFF, size: 4) == 0xFFFF_FFFF)
    bus.portWrite(0x80, size: 1, value: 0x12)
    bus.portWrite(0xFFFF, size: 4, value: 0x1234_5678)
  }

  @Test func overlappingRegistrationsAreRefusedAndChangeNothing() throws {
    let bus = IOBus()
    let first = RecordingDevice(tag: 0x100)
    let second = RecordingDevice(tag: 0x200)
    try bus.registerPorts(0x60, count: 5, device: first)
    for (start, count) in [(0x60, 1), (0x64, 1), (0x5C, 5), (0x5F, 10), (0x62, 2), (0x00, 0x10000)] {
      #expect(throws: IOBusError.portOverlap(first: UInt16(start), count: count)) {
        try bus.registerPorts(UInt16(start), count: count, device: second)
      }
    }
    // A refused registration claimed nothing, not even its free ports.
    #expect(!bus.hasPortDevice(0x5F) && !bus.hasPortDevice(0x65))
    #expect(bus.portRead(0x64, size: 1) == 0x100 + 0x64)
    // Neighbours on both sides are fine.
    try bus.registerPorts(0x5F, count: 1, device: second)
    try bus.registerPorts(0x65, count: 1, device: second)
    #expect(bus.portRead(0x5F, size: 1) == 0x200 + 0x5F)
    #expect(bus.portRead(0x65, size: 1) == 0x200 + 0x65)
    #expect(second.accesses.count == 2 && first.accesses.count == 1)
  }

  @Test func emptyOrOverflowingPortRangesAreRefused() throws {
    let bus = IOBus()
    let device = RecordingDevice(tag: 0)
    #expect(throws: IOBusError.emptyRange) { try bus.registerPorts(0x10, count: 0, device: device) }
    #expect(throws: IOBusError.emptyRange) { try bus.registerPorts(0x10, count: -1, device: device) }
    #expect(throws: IOBusError.emptyRange) { try bus.registerPorts(0xFFFF, count: 2, device: device) }
    #expect(throws: IOBusError.emptyRange) { try bus.registerPorts(0, count: 0x10001, device: device) }
    try bus.registerPorts(0xFFFF, count: 1, device: device)
    #expect(bus.hasPortDevice(0xFFFF) && !bus.hasPortDevice(0xFFFE))
  }
}

@Suite struct IOBusMMIOTests {
  @Test func accessesReachTheOwningDeviceWithTheOffset() throws {
    let bus = IOBus()
    // Registered out of order: lookups must still find each one.
    let devices = (0..<6).map { RecordingDevice(tag: UInt64($0)) }
    let bases: [UInt64] = [0xFEE0_0000, 0x1000, 0xC000_0000, 0x10_0000_0000, 0xFEC0_0000, 0xE000_0000]
    for (device, base) in zip(devices, bases) { try bus.registerMMIO(base, length: 0x1000, device: device) }
    for (tag, base) in bases.enumerated() {
      #expect(bus.mmioRead(base, size: 4) == UInt64(tag) << 32)
      #expect(bus.mmioRead(base + 0xFFF, size: 1) == UInt64(tag) << 32 | 0xFFF)
      #expect(bus.hasMMIODevice(base) && bus.hasMMIODevice(base + 0xFFF))
      #expect(!bus.hasMMIODevice(base - 1) && !bus.hasMMIODevice(base + 0x1000))
      bus.mmioWrite(base + 8, size: 8, value: 0x1122_3344_5566_7788)
    }
    for device in devices {
      #expect(
        device.accesses == [
          .init(at: 0, size: 4, value: nil), .init(at: 0xFFF, size: 1, value: nil),
          .init(at: 8, size: 8, value: 0x1122_3344_5566_7788),
        ])
    }
  }

  @Test func unclaimedAddressesReadAllOnesAndDropWrites() throws {
    let bus = IOBus()
    let device = RecordingDevice(tag: 1)
    try bus.registerMMIO(0x2000, length: 0x100, device: device)
    for (size, expected) in [(1, UInt64(0xFF)), (2, 0xFFFF), (4, 0xFFFF_FFFF), (8, UInt64.max)] {
      #expect(bus.mmioRead(0x1FFF, size: size) == expected)
      #expect(bus.mmioRead(0x2100, size: size) == expected)
      #expect(bus.mmioRead(UInt64.max, size: size) == expected)
    }
    bus.mmioWrite(0x2100, size: 4, value: 1)
    bus.mmioWrite(0, size: 8, value: 1)
    #expect(device.accesses.isEmpty)
  }

  @Test func overlappingRangesAreRefused() throws {
    let bus = IOBus()
    let first = RecordingDevice(tag: 1)
    let second = RecordingDevice(tag: 2)
    try bus.registerMMIO(0x10_000, length: 0x1000, device: first)
    let overlapping: [(UInt64, UInt64)] = [
      (0x10_000, 0x1000), (0x10_800, 1), (0xF_000, 0x1001), (0x10_FFF, 0x10), (0x8000, 0x10_000), (0, 1 << 40),
    ]
    for (base, length) in overlapping {
      #expect(throws: IOBusError.mmioOverlap(base: base, length: length)) {
        try bus.registerMMIO(base, length: length, device: second)
      }
    }
    #expect(!bus.hasMMIODevice(0xF_FFF) && !bus.hasMMIODevice(0x11_000))
    try bus.registerMMIO(0xF_000, length: 0x1000, device: second)
    try bus.registerMMIO(0x11_000, length: 0x1000, device: second)
    #expect(bus.mmioRead(0x10_FFF, size: 1) == 1 << 32 | 0xFFF)
    #expect(bus.mmioRead(0x11_000, size: 1) == 2 << 32)
    #expect(bus.mmioRead(0xF_FFF, size: 1) == 2 << 32 | 0xFFF)
  }

  @Test func emptyOrWrappingRangesAreRefused() throws {
    let bus = IOBus()
    let device = RecordingDevice(tag: 0)
    #expect(throws: IOBusError.emptyRange) { try bus.registerMMIO(0x1000, length: 0, device: device) }
    #expect(throws: IOBusError.emptyRange) { try bus.registerMMIO(UInt64.max - 1, length: 4, device: device) }
    #expect(throws: IOBusError.emptyRange) { try bus.registerMMIO(1, length: UInt64.max, device: device) }
    try bus.registerMMIO(UInt64.max - 0x1000, length: 0x1000, device: device)
    #expect(bus.mmioRead(UInt64.max - 1, size: 1) == 0xFFF)
    #expect(bus.mmioRead(UInt64.max, size: 1) == 0xFF)  // one past the range: unclaimed
  }

  @Test func errorsDescribeThemselves() {
    #expect(
      IOBusError.portOverlap(first: 0x3F8, count: 8).description == "port range 0x3f8+8 overlaps a registered device")
    #expect(
      IOBusError.mmioOverlap(base: 0xFEE0_0000, length: 0x1000).description
        == "MMIO range 0xfee00000+0x1000 overlaps a registered device")
    #expect(IOBusError.emptyRange.description == "empty I/O range")
  }

  @Test func concurrentAccessesAfterSetUpAreSafe() async throws {
    let bus = IOBus()
    let port = RecordingDevice(tag: 0)
    let mmio = RecordingDevice(tag: 7)
    try bus.registerPorts(0x100, count: 4, device: port)
    try bus.registerMMIO(0x8000, length: 0x100, device: mmio)
    await withTaskGroup(of: Bool.self) { group in
      for task in 0..<4 {
        group.addTask {
          var ok = true
          for index in 0..<1000 {
            ok = ok && bus.portRead(0x100 + UInt16(task), size: 1) == 0x100 + UInt32(task)
            ok = ok && bus.mmioRead(0x8000 + UInt64(index % 0x100), size: 4) == 7 << 32 | UInt64(index % 0x100)
          }
          return ok
        }
      }
      for await ok in group { #expect(ok) }
    }
    #expect(port.accesses.count == 4000 && mmio.accesses.count == 4000)
  }
}
