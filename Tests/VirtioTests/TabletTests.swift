import Glibc
import PCI
import Testing
import VMCore

@testable import Virtio

/// The virtio-input tablet: its configuration space as a driver reads it (virtio 1.2, 5.8.5),
/// pointer reports on the eventq, the bounded pending queue, and hostile drivers.
@Suite struct TabletTests {
  /// Selects `select`/`subsel`, then reads `size` and the union's bytes.
  func configuration(_ driver: VirtioDriver, select: UInt8, subselect: UInt8 = 0) -> [UInt8] {
    driver.machine.bus.mmioWrite(driver.bar0 + driver.deviceConfigOffset, size: 1, value: UInt64(select))
    driver.machine.bus.mmioWrite(driver.bar0 + driver.deviceConfigOffset + 1, size: 1, value: UInt64(subselect))
    let size = Int(driver.deviceConfig(2, size: 1))
    return (0..<size).map { UInt8(driver.deviceConfig(8 + UInt64($0), size: 1)) }
  }

  func littleEndian32(_ bytes: [UInt8], _ offset: Int) -> UInt32 {
    (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[offset + $1]) << ($1 * 8) }
  }

  /// Whether bit `code` is set in `bitmap`.
  func isSet(_ bitmap: [UInt8], _ code: Int) -> Bool {
    code / 8 < bitmap.count && bitmap[code / 8] & 1 << (code % 8) != 0
  }

  /// Reads the 8-byte event the device wrote at `address`.
  func event(at address: UInt64, in memory: GuestMemory) throws -> VirtioInputEvent {
    VirtioInputEvent(
      type: try memory.read(UInt16.self, at: address), code: try memory.read(UInt16.self, at: address + 2),
      value: try memory.read(UInt32.self, at: address + 4))
  }

  @Test func configurationSpaceDescribesATablet() throws {
    let machine = try TestMachine()
    let driver = try VirtioDriver(machine: machine, model: VirtioTablet())
    // virtio-pci: device ID 0x1040 + 18, class "input device controller, other".
    #expect(machine.configRead(slot: driver.slot, offset: 2, size: 2) == 0x1040 + 18)
    #expect(machine.configRead(slot: driver.slot, offset: 0x0B, size: 1) == 0x09)
    #expect(driver.common(0x12, size: 2) == 2)  // eventq and statusq

    #expect(String(decoding: configuration(driver, select: 0x01), as: UTF8.self) == "Hostvisor Tablet")
    #expect(!configuration(driver, select: 0x02).isEmpty)
    let ids = configuration(driver, select: 0x03)
    #expect(ids.count == 8)
    #expect(ids.count == 8 && UInt16(ids[0]) | UInt16(ids[1]) << 8 == 0x06)  // BUS_VIRTUAL
    #expect(configuration(driver, select: 0x10).allSatisfy { $0 == 0 })  // no input properties

    // linux/input-event-codes.h: EV_KEY 1 with BTN_LEFT 0x110, BTN_RIGHT 0x111, BTN_MIDDLE 0x112;
    // EV_ABS 3 with ABS_X 0, ABS_Y 1; EV_SYN 0 with SYN_REPORT 0; nothing for EV_REL 2.
    let keys = configuration(driver, select: 0x11, subselect: 1)
    #expect([0x110, 0x111, 0x112].allSatisfy { isSet(keys, $0) })
    #expect((0..<keys.count * 8).filter { isSet(keys, $0) }.count == 3)
    let axes = configuration(driver, select: 0x11, subselect: 3)
    #expect((0..<axes.count * 8).filter { isSet(axes, $0) } == [0, 1])
    #expect(isSet(configuration(driver, select: 0x11, subselect: 0), 0))
    #expect(configuration(driver, select: 0x11, subselect: 2).isEmpty)

    for axis: UInt8 in [0, 1] {
      let info = configuration(driver, select: 0x12, subselect: axis)
      #expect(info.count == 20)  // min, max, fuzz, flat, res
      #expect(littleEndian32(info, 0) == 0)
      #expect(littleEndian32(info, 4) == 0x7FFF)
    }
    #expect(configuration(driver, select: 0x12, subselect: 2).isEmpty)
    #expect(configuration(driver, select: 0x00).isEmpty)
    #expect(configuration(driver, select: 0x7F).isEmpty)
    // The size byte and the union are read-only.
    machine.bus.mmioWrite(driver.bar0 + driver.deviceConfigOffset, size: 1, value: 0x01)
    machine.bus.mmioWrite(driver.bar0 + driver.deviceConfigOffset + 2, size: 1, value: 0x40)
    machine.bus.mmioWrite(driver.bar0 + driver.deviceConfigOffset + 8, size: 4, value: 0)
    #expect(driver.deviceConfig(2, size: 1) == UInt64("Hostvisor Tablet".utf8.count))
    #expect(driver.deviceConfig(8, size: 1) == UInt64(UInt8(ascii: "H")))
  }

  @Test func pointerReportsReachTheEventQueue() throws {
    let machine = try TestMachine()
    let tablet = VirtioTablet()
    let driver = try VirtioDriver(machine: machine, model: tablet)
    // Before DRIVER_OK there is nobody to tell: nothing is queued.
    tablet.pointer(x: 10, y: 10, buttons: 0, width: 1024, height: 768)
    #expect(tablet.pendingEvents.isEmpty)
    driver.start(queueCount: 2)
    let queue = driver.queues[0]
    try machine.memory.fill(0xEE, at: 0x40_0000, length: 0x1000)

    // Events wait until buffers come.
    tablet.pointer(x: 300, y: 200, buttons: 1, width: 1024, height: 768)
    tablet.pointer(x: 300, y: 200, buttons: 0, width: 1024, height: 768)
    tablet.pointer(x: 5000, y: -3, buttons: 4, width: 1024, height: 768)
    usleep(20000)
    #expect(queue.usedIndex == 0)
    for index in 0..<12 { queue.submit([(0x40_0000 + UInt64(index) * 16, 8, true)]) }
    #expect(queue.waitForUsed(12))
    var events: [VirtioInputEvent] = []
    for index in 0..<12 {
      #expect(queue.usedElement(UInt16(index)).length == 8)
      events.append(try event(at: 0x40_0000 + UInt64(index) * 16, in: machine.memory))
      // Only the 8 bytes of the event were written.
      #expect(try machine.memory.readBytes(at: 0x40_0008 + UInt64(index) * 16, count: 8).allSatisfy { $0 == 0xEE })
    }
    let absolute: UInt16 = 3
    let key: UInt16 = 1
    let sync: UInt16 = 0
    // A coordinate c on a screen of n pixels is c * 0x7FFF / (n - 1), clamped to the screen.
    let scaledX: UInt32 = 300 * 32767 / 1023
    let scaledY: UInt32 = 200 * 32767 / 767
    let expected: [VirtioInputEvent] = [
      .init(type: absolute, code: 0, value: scaledX), .init(type: absolute, code: 1, value: scaledY),
      .init(type: key, code: 0x110, value: 1), .init(type: sync, code: 0, value: 0),
      .init(type: absolute, code: 0, value: scaledX), .init(type: absolute, code: 1, value: scaledY),
      .init(type: key, code: 0x110, value: 0), .init(type: sync, code: 0, value: 0),
      .init(type: absolute, code: 0, value: 32767), .init(type: absolute, code: 1, value: 0),
      .init(type: key, code: 0x111, value: 1), .init(type: sync, code: 0, value: 0),
    ]
    #expect(events == expected)
    #expect(tablet.pendingEvents.isEmpty)

    // statusq: an LED write is consumed without being written to.
    let status = driver.queues[1]
    try machine.memory.writeBytes([0x11, 0, 0, 0, 1, 0, 0, 0], at: 0x41_0000)
    status.submit([(0x41_0000, 8, false)])
    #expect(status.waitForUsed(1))
    #expect(status.usedElement(0).length == 0)

    // A reset drops what waits; events are queued again only after DRIVER_OK.
    tablet.pointer(x: 1, y: 1, buttons: 0, width: 1024, height: 768)
    driver.setCommon(0x14, size: 1, 0)
    #expect(tablet.pendingEvents.isEmpty)
  }

  @Test func pendingEventsAreBoundedAndKeepWholeReports() throws {
    let machine = try TestMachine()
    let tablet = VirtioTablet()
    let driver = try VirtioDriver(machine: machine, model: tablet)
    driver.start(queueCount: 2)
    for step in 0..<1000 { tablet.pointer(x: step % 1024, y: step % 768, buttons: 0, width: 1024, height: 768) }
    let pending = tablet.pendingEvents
    #expect(pending.count <= VirtioTablet.pendingLimit)
    #expect(pending.count > VirtioTablet.pendingLimit - 3)
    #expect(tablet.droppedEvents == 3000 - pending.count)
    // The oldest reports went: what waits starts a report and ends with the newest one's SYN.
    let oldestKept = UInt32(1000 - pending.count / 3)
    let newestX: UInt32 = 999 * 32767 / 1023
    let newestY: UInt32 = (999 % 768) * 32767 / 767
    #expect(pending.first == VirtioInputEvent(type: 3, code: 0, value: oldestKept * 32767 / 1023))
    let newest: [UInt32] = pending.suffix(3).map(\.value)
    #expect(newest == [newestX, newestY, 0])
  }

  /// A started tablet whose eventq holds one report, with "guest data" around it.
  func hostileFixture() throws -> (TestMachine, VirtioDriver, VirtioTablet, MemorySnapshot) {
    let machine = try TestMachine()
    let tablet = VirtioTablet()
    let driver = try VirtioDriver(machine: machine, model: tablet)
    driver.start(queueCount: 2)
    try machine.memory.fill(0xC3, at: 0x40_0000, length: 0x10_0000)
    tablet.pointer(x: 7, y: 7, buttons: 1, width: 1024, height: 768)
    return (machine, driver, tablet, MemorySnapshot(machine.memory))
  }

  @Test(arguments: ["readable", "short", "outsideRAM", "wrapsAround", "loop", "headOutsideTable"])
  func hostileEventBuffers(kind: String) throws {
    let (machine, driver, tablet, snapshot) = try hostileFixture()
    let queue = driver.queues[0]
    switch kind {
    case "readable": queue.submit([(0x40_0000, 8, false)])
    case "short": queue.submit([(0x40_0000, 4, true)])
    case "outsideRAM": queue.submit([(0xFF_FFFC, 8, true)])
    case "wrapsAround": queue.submit([(UInt64.max - 3, 8, true)])
    case "loop":
      queue.writeDescriptor(0, address: 0x40_0000, length: 4, flags: 3, next: 1)
      queue.writeDescriptor(1, address: 0x40_1000, length: 4, flags: 3, next: 0)
      queue.publish(head: 0)
    default:
      queue.publish(head: 200)
    }
    #expect(driver.waitForNeedsReset(), "\(kind)")
    #expect(queue.usedIndex == 0)
    #expect(snapshot.changes(in: machine.memory, allowing: [queue.descriptors..<(queue.used + 0x4000)]).isEmpty)
    // A reset and a well-behaved driver bring it back.
    driver.start(queueCount: 2)
    try machine.memory.fill(0, at: 0x42_0000, length: 16)
    driver.queues[0].submit([(0x42_0000, 8, true)])
    tablet.pointer(x: 0, y: 0, buttons: 0, width: 1024, height: 768)
    #expect(driver.queues[0].waitForUsed(1))
    #expect(try event(at: 0x42_0000, in: machine.memory) == VirtioInputEvent(type: 3, code: 0, value: 0))
  }
}
