import Glibc
import PCI
import Testing
import VMCore

@testable import Virtio

/// How many of `pages` 4 KiB pages at guest `address` are resident in the host (mincore).
private func residentPages(_ memory: GuestMemory, at address: UInt64, pages: Int) -> Int {
  let pointer = memory.hostPointer(address, length: UInt64(pages) * 4096)!
  var vector = [UInt8](repeating: 0, count: pages)
  #expect(mincore(pointer, pages * 4096, &vector) == 0)
  return vector.filter { $0 & 1 != 0 }.count
}

/// Little-endian 32-bit page frame numbers as an inflate/deflate buffer.
private func pageNumberBytes(_ numbers: [UInt32]) -> [UInt8] {
  numbers.flatMap { number in (0..<4).map { UInt8(truncatingIfNeeded: number >> (8 * $0)) } }
}

@Suite struct BalloonTests {
  static let dataBase: UInt64 = 0x80_0000
  static let listAddress: UInt64 = 0x40_0000

  @Test func inflatedPagesGoBackToTheHostAndHostilePageNumbersAreIgnored() throws {
    let machine = try TestMachine(memorySize: 16 << 20)
    let balloon = VirtioBalloon()
    let driver = try VirtioDriver(machine: machine, model: balloon)
    #expect(driver.common(0x12, size: 2) == 2)
    driver.start(queueCount: 2)
    let pages = 64
    try machine.memory.fill(0xAB, at: Self.dataBase, length: UInt64(pages) * 4096)
    #expect(residentPages(machine.memory, at: Self.dataBase, pages: pages) == pages)
    let before = MemorySnapshot(machine.memory)
    // Every other page in the first half, all of the second half, and numbers outside RAM:
    // the end of RAM, the PCI hole and the largest number.
    let first = UInt32(Self.dataBase / 4096)
    var numbers = stride(from: 0, to: pages / 2, by: 2).map { first + UInt32($0) }
    numbers += (pages / 2..<pages).map { first + UInt32($0) }
    let ramEnd = UInt32(machine.memory.totalSize / 4096)
    let hostile: [UInt32] = [ramEnd, ramEnd + 1, 0xC_0000, 0xFFFF_FFFF]
    let list = pageNumberBytes(Array(numbers.prefix(8)) + hostile + Array(numbers.dropFirst(8)))
    try machine.memory.writeBytes(list, at: Self.listAddress)
    driver.queues[0].submit([(Self.listAddress, UInt32(list.count), false)])
    #expect(driver.queues[0].waitForUsed(1))
    #expect(balloon.discardedPages == UInt64(numbers.count))
    #expect(balloon.ignoredPages == UInt64(hostile.count))
    let inflated = Set(numbers.map { UInt64($0) * 4096 })
    // The pages left the host: not resident, and they read back as zero.
    #expect(residentPages(machine.memory, at: Self.dataBase, pages: pages) == pages - numbers.count)
    for page in 0..<pages {
      let address = Self.dataBase + UInt64(page) * 4096
      let bytes = try machine.memory.readBytes(at: address, count: 4096)
      let expected: UInt8 = inflated.contains(address) ? 0 : 0xAB
      #expect(bytes.allSatisfy { $0 == expected }, "page at 0x\(String(address, radix: 16))")
    }
    // Nothing else changed but the rings and the page number list.
    let driverAreas: [Range<UInt64>] = [0x10_0000..<0x20_0000, Self.listAddress..<(Self.listAddress + 4096)]
    let allowed = inflated.map { $0..<($0 + 4096) } + driverAreas
    #expect(before.changes(in: machine.memory, allowing: allowed).isEmpty)
    // Deflating needs nothing from the host; the driver writes `actual`.
    try machine.memory.writeBytes(pageNumberBytes(numbers), at: Self.listAddress)
    driver.queues[1].submit([(Self.listAddress, UInt32(numbers.count * 4), false)])
    #expect(driver.queues[1].waitForUsed(1))
    machine.bus.mmioWrite(driver.bar0 + driver.deviceConfigOffset + 4, size: 4, value: 0x0003_8001)
    #expect(balloon.actualPages == 0x0003_8001)
    #expect(driver.deviceConfig(4, size: 4) == 0x0003_8001)
    machine.bus.mmioWrite(driver.bar0 + driver.deviceConfigOffset + 5, size: 1, value: 0x42)
    #expect(balloon.actualPages == 0x0003_4201)
  }

  @Test func targetChangeInterruptsTheDriver() throws {
    let machine = try TestMachine()
    let balloon = VirtioBalloon(targetPages: 3)
    let driver = try VirtioDriver(machine: machine, model: balloon)
    driver.start(queueCount: 2)
    #expect(driver.deviceConfig(0, size: 4) == 3)
    let gsi = machine.pci.gsi(forSlot: driver.slot, pin: 1)
    #expect(!machine.sink.level(gsi))
    balloon.setTarget(pages: 25600)
    #expect(driver.deviceConfig(0, size: 4) == 25600)
    #expect(machine.sink.level(gsi))
    #expect(driver.readISR() == 2)
    // The same target again is no change.
    balloon.setTarget(pages: 25600)
    #expect(!machine.sink.level(gsi))
  }

  @Test func statisticsAreReadAndRequestedAgain() throws {
    let machine = try TestMachine()
    let balloon = VirtioBalloon(options: BalloonOptions(statisticsInterval: 3600))
    let driver = try VirtioDriver(machine: machine, model: balloon)
    #expect(driver.deviceFeatures & VirtioBalloon.Feature.statisticsQueue != 0)
    driver.start(features: VirtioBalloon.Feature.statisticsQueue, queueCount: 3)
    func statisticsBuffer(_ entries: [(UInt16, UInt64)]) -> [UInt8] {
      entries.flatMap { tag, value in
        (0..<2).map { UInt8(truncatingIfNeeded: tag >> (8 * $0)) }
          + (0..<8).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
      }
    }
    let first = statisticsBuffer([(4, 123 << 20), (5, 512 << 20), (6, 300 << 20)])
    try machine.memory.writeBytes(first, at: Self.listAddress)
    driver.queues[2].submit([(Self.listAddress, UInt32(first.count), false)])
    #expect(waitUntil { balloon.statistics.updates == 1 })
    #expect(balloon.statistics.values[4] == 123 << 20)
    #expect(balloon.statistics.values[5] == 512 << 20)
    // The buffer is held until the host asks again.
    usleep(20000)
    #expect(driver.queues[2].usedIndex == 0)
    #expect(balloon.setStatisticsInterval(seconds: 1))
    #expect(driver.queues[2].waitForUsed(1))
    let second = statisticsBuffer([(4, 77 << 20)])
    try machine.memory.writeBytes(second, at: Self.listAddress)
    driver.queues[2].submit([(Self.listAddress, UInt32(second.count), false)])
    #expect(waitUntil { balloon.statistics.updates == 2 })
    #expect(balloon.statistics.values[4] == 77 << 20)
    // The one-second timer asks again by itself.
    #expect(driver.queues[2].waitForUsed(2, seconds: 3))
  }

  @Test(arguments: [true, false])
  func reportedFreePagesAreDiscarded(withStatistics: Bool) throws {
    let machine = try TestMachine()
    let options = BalloonOptions(statisticsInterval: withStatistics ? 60 : 0, freePageReporting: true)
    let balloon = VirtioBalloon(options: options)
    let driver = try VirtioDriver(machine: machine, model: balloon)
    #expect(driver.common(0x12, size: 2) == 5)
    var features = VirtioBalloon.Feature.freePageReporting
    if withStatistics { features |= VirtioBalloon.Feature.statisticsQueue }
    // Linux numbers only the queues it uses: reporting follows the last one.
    let reportingIndex = withStatistics ? 3 : 2
    #expect(driver.negotiate(features: VirtioFeature.version1 | features))
    for index in 0...reportingIndex { driver.setUpQueue(index, size: 16) }
    driver.driverOK()
    let pages = 32
    try machine.memory.fill(0x5A, at: Self.dataBase, length: UInt64(pages) * 4096)
    // Two reported ranges (device-writable, as Linux queues them).
    driver.queues[reportingIndex].submit([
      (Self.dataBase, 8 * 4096, true), (Self.dataBase + 16 * 4096, 16 * 4096, true),
    ])
    #expect(driver.queues[reportingIndex].waitForUsed(1))
    #expect(balloon.discardedPages == 24)
    #expect(residentPages(machine.memory, at: Self.dataBase, pages: pages) == 8)
    #expect(try machine.memory.readBytes(at: Self.dataBase, count: 4096).allSatisfy { $0 == 0 })
    #expect(try machine.memory.readBytes(at: Self.dataBase + 8 * 4096, count: 4096).allSatisfy { $0 == 0x5A })
    // A range beyond RAM is a broken driver: DEVICE_NEEDS_RESET, nothing discarded.
    let resident = residentPages(machine.memory, at: Self.dataBase, pages: pages)
    driver.queues[reportingIndex].submit([(machine.memory.totalSize, 4 * 4096, true)])
    #expect(driver.waitForNeedsReset())
    #expect(balloon.discardedPages == 24)
    #expect(residentPages(machine.memory, at: Self.dataBase, pages: pages) == resident)
  }
}
