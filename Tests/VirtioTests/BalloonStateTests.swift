import Testing
import VMCore

@testable import Virtio

/// The balloon's state across a save and a restore into a new device: the target, the size the
/// driver reported, the statistics and the statistics buffer the device holds for its next
/// request (the guest posts it once; a restored device that forgot it would never get fresh
/// statistics again).
@Suite struct BalloonStateTests {
  @Test func restoredBalloonKeepsItsTargetSizeStatisticsAndHeldBuffer() throws {
    let machine = try TestMachine()
    let options = BalloonOptions(deflateOnOOM: true, statisticsInterval: 3600)
    let original = VirtioBalloon(options: options, targetPages: 64)
    let driver = try VirtioDriver(machine: machine, model: original)
    driver.start(
      features: VirtioBalloon.Feature.statisticsQueue | VirtioBalloon.Feature.deflateOnOOM, queueCount: 3)
    original.setTarget(pages: 1000)
    original.writeConfig(offset: 4, size: 4, value: 321)  // the driver reports `actual`
    let entries: [(UInt16, UInt64)] = [(4, 123 << 20), (5, 512 << 20), (11, 7)]
    let buffer = entries.flatMap { tag, value in
      (0..<2).map { UInt8(truncatingIfNeeded: tag >> (8 * $0)) }
        + (0..<8).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
    }
    try machine.memory.writeBytes(buffer, at: 0x40_0000)
    driver.queues[2].submit([(0x40_0000, UInt32(buffer.count), false)])
    #expect(waitUntil { original.statistics.updates == 1 })
    #expect(driver.queues[2].usedIndex == 0)

    driver.device.quiesce()
    var writer = StateWriter()
    writer.section("virtio", driver.device)
    driver.device.shutdown()

    let restored = VirtioBalloon(options: options)
    let device = VirtioPCIDevice(model: restored, memory: machine.memory)
    defer { device.shutdown() }
    var reader = StateReader(bytes: writer.bytes)
    try reader.section("virtio", device)
    #expect(restored.targetPages == 1000)
    #expect(restored.actualPages == 321)
    #expect(restored.readConfig(offset: 0, size: 4) == 1000)
    #expect(restored.statistics == original.statistics)
    #expect(restored.statistics.values[11] == 7)
    #expect(restored.statisticsInterval == 3600)
    // The restored device answers the next request with the buffer the guest gave the original.
    #expect(driver.queues[2].usedIndex == 0)
    #expect(restored.setStatisticsInterval(seconds: 1))
    #expect(driver.queues[2].waitForUsed(1))
  }

  @Test func damagedBalloonStateIsRefused() throws {
    let machine = try TestMachine()
    let withoutStatistics = VirtioBalloon()
    var writer = StateWriter()
    writer.write(UInt32(1))  // target
    writer.write(UInt32(0))  // actual
    writer.write(UInt32(5))  // a statistics interval the device was not made with
    writer.write(false)
    writer.write(UInt16(0))
    writer.write(UInt64(0))
    writer.write(UInt32(0))
    writer.write(UInt64(0))
    writer.write(UInt64(0))
    var reader = StateReader(bytes: writer.bytes)
    #expect(throws: MachineStateError.self) { try withoutStatistics.restoreState(from: &reader) }
    #expect(withoutStatistics.targetPages == 0)
    _ = machine
  }
}
