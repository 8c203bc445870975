import Glibc
import PCI
import Testing
import VMCore

@testable import Virtio

/// Each hostile driver behaviour puts the device in DEVICE_NEEDS_RESET (with a configuration
/// interrupt), leaves guest RAM outside the rings untouched, and the device recovers on reset.
@Suite struct HostileGuestTests {
  struct Fixture {
    let machine: TestMachine
    let driver: VirtioDriver
    let queue: DriverQueue
    let snapshot: MemorySnapshot
    let file: TemporaryFile

    /// The ranges that may change: the rings the test itself writes as the driver (descriptor
    /// table, available ring) and the used ring the device owns. The guest data area
    /// (0x40_0000..<0x50_0000, filled with 0xC3) and all other RAM must stay as they were.
    var allowed: [Range<UInt64>] { [queue.descriptors..<(queue.used + 0x4000)] }

    func expectNeedsResetAndNoStrayWrites(_ comment: Comment? = nil) {
      #expect(driver.waitForNeedsReset(), comment)
      #expect(driver.status & 0x40 != 0)
      let gsi = machine.pci.gsi(forSlot: driver.slot, pin: 1)
      #expect(waitUntil { self.machine.sink.level(gsi) })
      #expect(driver.readISR() & 2 != 0)
      #expect(snapshot.changes(in: machine.memory, allowing: allowed).isEmpty)
      #expect(queue.usedIndex == 0)
      // The device recovers after a reset.
      driver.start(queueCount: 1)
      #expect(driver.status == 0xF)
      let requests = BlockRequests(queue: driver.queues[0])
      #expect(requests.run(type: VirtioBlock.RequestType.flush, sector: 0).0 == 0)
    }
  }

  /// A started block device with a queue of `size`, rings written but nothing published.
  func makeFixture(features: UInt64 = 0, size: UInt16 = 16) throws -> Fixture {
    let file = TemporaryFile(size: 1 << 20)
    let machine = try TestMachine()
    let driver = try VirtioDriver(
      machine: machine, model: VirtioBlock(backend: try RawFileBlockBackend(path: file.path)))
    driver.start(features: features, queueCount: 1, size: size)
    let queue = driver.queues[0]
    try machine.memory.fill(0xC3, at: 0x40_0000, length: 0x10_0000)  // "guest data" that must not change
    return Fixture(machine: machine, driver: driver, queue: queue, snapshot: MemorySnapshot(machine.memory), file: file)
  }

  /// A guest that breaks its devices in a loop gets one log line per break only up to the
  /// bucket's burst, then one a minute, each saying how many were left out.
  @Test func deviceMessagesAreRateLimited() {
    var limit = VirtioLogLimit()
    for _ in 0..<20 { #expect(limit.admit(at: 100) == 0) }
    #expect(limit.admit(at: 100) == nil)
    #expect(limit.admit(at: 130) == nil)
    #expect(limit.admit(at: 160) == 2)
    #expect(limit.admit(at: 161) == nil)
    #expect(limit.admit(at: 10_000) == 1)
  }

  @Test func descriptorLoop() throws {
    let fixture = try makeFixture()
    fixture.queue.writeDescriptor(0, address: 0x40_0000, length: 16, flags: 1, next: 1)
    fixture.queue.writeDescriptor(1, address: 0x40_1000, length: 16, flags: 1, next: 0)
    fixture.queue.publish(head: 0)
    fixture.expectNeedsResetAndNoStrayWrites()
  }

  @Test func chainLongerThanTheQueue() throws {
    let fixture = try makeFixture(size: 4)
    // Indirect table of 8 entries in a 4-entry queue, no loop.
    let table: UInt64 = 0x48_0000
    for index in 0..<8 {
      let at = table + 16 * UInt64(index)
      try fixture.machine.memory.write(UInt64(0x40_0000), at: at)
      try fixture.machine.memory.write(UInt32(16), at: at + 8)
      try fixture.machine.memory.write(UInt16(index < 7 ? 1 : 2), at: at + 12)
      try fixture.machine.memory.write(UInt16(index + 1), at: at + 14)
    }
    fixture.queue.writeDescriptor(0, address: table, length: 128, flags: 4, next: 0)
    fixture.queue.publish(head: 0)
    // Indirect was not negotiated, which is itself refused; negotiate it for the real check.
    #expect(fixture.driver.waitForNeedsReset())
    let second = try makeFixture(features: VirtioFeature.ringIndirectDescriptors, size: 4)
    for index in 0..<8 {
      let at = table + 16 * UInt64(index)
      try second.machine.memory.write(UInt64(0x40_0000), at: at)
      try second.machine.memory.write(UInt32(16), at: at + 8)
      try second.machine.memory.write(UInt16(index < 7 ? 1 : 2), at: at + 12)
      try second.machine.memory.write(UInt16(index + 1), at: at + 14)
    }
    let snapshot = MemorySnapshot(second.machine.memory)
    second.queue.writeDescriptor(0, address: table, length: 128, flags: 4, next: 0)
    second.queue.publish(head: 0)
    let fixture2 = Fixture(
      machine: second.machine, driver: second.driver, queue: second.queue, snapshot: snapshot, file: second.file)
    _ = fixture2.snapshot
    fixture2.expectNeedsResetAndNoStrayWrites()
  }

  @Test func nestedIndirectTable() throws {
    let fixture = try makeFixture(features: VirtioFeature.ringIndirectDescriptors)
    let outer: UInt64 = 0x48_0000
    let inner: UInt64 = 0x49_0000
    let memory = fixture.machine.memory
    try memory.write(inner, at: outer)
    try memory.write(UInt32(16), at: outer + 8)
    try memory.write(UInt16(4), at: outer + 12)
    try memory.write(UInt64(0x40_0000), at: inner)
    try memory.write(UInt32(16), at: inner + 8)
    let snapshot = MemorySnapshot(memory)
    fixture.queue.writeDescriptor(0, address: outer, length: 16, flags: 4, next: 0)
    fixture.queue.publish(head: 0)
    Fixture(
      machine: fixture.machine, driver: fixture.driver, queue: fixture.queue, snapshot: snapshot, file: fixture.file
    )
    .expectNeedsResetAndNoStrayWrites()
  }

  @Test func bufferOutsideRAM() throws {
    let fixture = try makeFixture()
    // Header fine, data buffer beyond the end of the 16 MiB of RAM.
    fixture.queue.submit([(0x40_0000, 16, false), (0xFF_F000, 0x2000, true), (0x4F_0000, 1, true)])
    fixture.expectNeedsResetAndNoStrayWrites()
  }

  @Test func lengthWrapsAroundTheAddressSpace() throws {
    let fixture = try makeFixture()
    fixture.queue.submit([(0x40_0000, 16, false), (UInt64.max - 0x100, 0x1000, true), (0x4F_0000, 1, true)])
    fixture.expectNeedsResetAndNoStrayWrites()
  }

  @Test func wrongDirectionBuffers() throws {
    // The header in a device-writable buffer: no readable header.
    let fixture = try makeFixture()
    fixture.queue.submit([(0x40_0000, 16, true), (0x4F_0000, 1, true)])
    fixture.expectNeedsResetAndNoStrayWrites()
  }

  @Test func readableAfterWritable() throws {
    let fixture = try makeFixture()
    fixture.queue.submit([(0x40_0000, 16, false), (0x41_0000, 512, true), (0x4F_0000, 1, false)])
    fixture.expectNeedsResetAndNoStrayWrites()
  }

  @Test func statusByteNotWritable() throws {
    let fixture = try makeFixture()
    fixture.queue.submit([(0x40_0000, 16, false), (0x4F_0000, 1, false)])
    fixture.expectNeedsResetAndNoStrayWrites()
  }

  @Test func queueSizeNotAPowerOfTwo() throws {
    let file = TemporaryFile(size: 1 << 20)
    let machine = try TestMachine()
    let driver = try VirtioDriver(
      machine: machine, model: VirtioBlock(backend: try RawFileBlockBackend(path: file.path)))
    #expect(driver.negotiate(features: VirtioFeature.version1))
    let snapshot = MemorySnapshot(machine.memory)
    driver.setUpQueue(0, size: 12)
    #expect(driver.waitForNeedsReset())
    #expect(driver.common(0x1C, size: 2) == 0)  // not enabled
    #expect(snapshot.changes(in: machine.memory, allowing: []).isEmpty)
    // Larger than the maximum is refused too.
    driver.negotiate(features: VirtioFeature.version1)
    #expect(driver.status & 0x40 == 0)
    driver.setUpQueue(0, size: 512)
    #expect(driver.waitForNeedsReset())
  }

  @Test func ringsOutsideRAM() throws {
    let file = TemporaryFile(size: 1 << 20)
    let machine = try TestMachine()
    let driver = try VirtioDriver(
      machine: machine, model: VirtioBlock(backend: try RawFileBlockBackend(path: file.path)))
    #expect(driver.negotiate(features: VirtioFeature.version1))
    driver.setCommon(0x16, size: 2, 0)
    driver.setCommon(0x18, size: 2, 16)
    driver.setCommon(0x20, size: 8, 0xFF_FF80)  // descriptor table crosses the end of RAM
    driver.setCommon(0x28, size: 8, 0x10_8000)
    driver.setCommon(0x30, size: 8, 0x10_C000)
    driver.setCommon(0x1C, size: 2, 1)
    #expect(driver.waitForNeedsReset())
  }

  @Test func availableIndexJumpsPastTheQueueSize() throws {
    let fixture = try makeFixture()
    try fixture.machine.memory.write(UInt16(17), at: fixture.queue.available + 2)
    fixture.driver.notify(0)
    fixture.expectNeedsResetAndNoStrayWrites()
  }

  @Test func headIndexOutsideTheTable() throws {
    let fixture = try makeFixture()
    fixture.queue.publish(head: 16)
    fixture.expectNeedsResetAndNoStrayWrites()
  }

  @Test func featuresNotOfferedAreRefused() throws {
    let machine = try TestMachine()
    let driver = try VirtioDriver(machine: machine, model: VirtioEntropy())
    #expect(!driver.negotiate(features: VirtioFeature.version1 | 1 << 40))
    #expect(!driver.negotiate(features: 0))  // VERSION_1 is required
    #expect(driver.negotiate(features: VirtioFeature.version1))
    // DRIVER_OK without FEATURES_OK does not start the device.
    driver.setCommon(0x14, size: 1, 0)
    driver.setCommon(0x14, size: 1, 3)
    driver.setCommon(0x14, size: 1, 7)
    #expect(driver.status & 4 == 0)
  }

  @Test func resetClearsQueuesAndStatus() throws {
    let machine = try TestMachine()
    let driver = try VirtioDriver(machine: machine, model: VirtioEntropy())
    driver.start(queueCount: 1)
    #expect(driver.common(0x1C, size: 2) == 1)
    driver.setCommon(0x14, size: 1, 0)
    #expect(driver.status == 0)
    driver.setCommon(0x16, size: 2, 0)
    #expect(driver.common(0x1C, size: 2) == 0)
    #expect(driver.common(0x20, size: 8) == 0)
    #expect(driver.common(0x18, size: 2) == 64)
  }
}
