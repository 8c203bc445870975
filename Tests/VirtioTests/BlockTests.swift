import Glibc
import PCI
import Synchronization
import Testing
import VMCore

@testable import Virtio

/// Wraps a raw file backend and records, at each flush, the used index the driver can see.
final class FlushOrderBackend: BlockBackend {
  let inner: RawFileBlockBackend
  let memory: GuestMemory
  let usedIndexAddress = Atomic<UInt64>(0)
  let observed = Mutex<[UInt16]>([])
  init(_ inner: RawFileBlockBackend, memory: GuestMemory) {
    self.inner = inner
    self.memory = memory
  }
  var capacity: UInt64 { inner.capacity }
  var isReadOnly: Bool { inner.isReadOnly }
  var identifier: [UInt8] { inner.identifier }
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlockBackendError) {
    try inner.read(into: buffer, at: offset)
  }
  func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlockBackendError) {
    try inner.write(buffer, at: offset)
  }
  func flush() throws(BlockBackendError) {
    try inner.flush()
    let index = try! memory.read(UInt16.self, at: usedIndexAddress.load(ordering: .acquiring))
    observed.withLock { $0.append(index) }
  }
  func discard(offset: UInt64, length: UInt64) throws(BlockBackendError) {
    try inner.discard(offset: offset, length: length)
  }
  func writeZeroes(offset: UInt64, length: UInt64, unmap: Bool) throws(BlockBackendError) {
    try inner.writeZeroes(offset: offset, length: length, unmap: unmap)
  }
}

/// Guest-side block request helper.
struct BlockRequests {
  let queue: DriverQueue
  var memory: GuestMemory { queue.memory }
  static let header: UInt64 = 0x40_0000
  static let data: UInt64 = 0x41_0000
  static let status: UInt64 = 0x4F_0000

  func writeHeader(type: UInt32, sector: UInt64) {
    try! memory.write(type, at: Self.header)
    try! memory.write(UInt32(0), at: Self.header + 4)
    try! memory.write(sector, at: Self.header + 8)
    try! memory.write(UInt8(0xEE), at: Self.status)
  }

  /// Sends one request, waits for it; returns the status byte and the used length.
  func run(type: UInt32, sector: UInt64, dataLength: UInt32 = 0, deviceWrites: Bool = false) -> (UInt8, UInt32) {
    run(type: type, sector: sector, parts: dataLength > 0 ? [(Self.data, dataLength)] : [], deviceWrites: deviceWrites)
  }

  /// Sends one request whose data is the buffers `parts`, in that order, and waits for it;
  /// returns the status byte and the used length.
  func run(type: UInt32, sector: UInt64, parts: [(address: UInt64, length: UInt32)], deviceWrites: Bool)
    -> (UInt8, UInt32)
  {
    writeHeader(type: type, sector: sector)
    let buffers =
      [(Self.header, 16, false)] + parts.map { ($0.address, $0.length, deviceWrites) } + [(Self.status, 1, true)]
    let before = queue.usedIndex
    queue.submit(buffers)
    #expect(queue.waitForUsed(before &+ 1))
    let element = queue.usedElement(before)
    return (try! memory.read(UInt8.self, at: Self.status), element.length)
  }
}

@Suite struct BlockTests {
  func makeBlock(_ file: TemporaryFile, readOnly: Bool = false) throws -> (TestMachine, VirtioDriver, BlockRequests) {
    let machine = try TestMachine()
    let backend = try RawFileBlockBackend(path: file.path, readOnly: readOnly, serial: "hv-serial-0001")
    let driver = try VirtioDriver(machine: machine, model: VirtioBlock(backend: backend))
    driver.start(features: VirtioBlock.Feature.flush, queueCount: 1)
    return (machine, driver, BlockRequests(queue: driver.queues[0]))
  }

  @Test func configurationAndFeatures() throws {
    let file = TemporaryFile(size: 1 << 20)
    let (_, driver, _) = try makeBlock(file)
    #expect(driver.deviceConfig(0, size: 8) == 2048)  // capacity in sectors
    #expect(driver.deviceConfig(20, size: 4) == 512)  // blk_size
    #expect(driver.deviceConfig(12, size: 4) == 254)  // seg_max = maximum queue size - 2
    let features = driver.deviceFeatures
    #expect(features & VirtioFeature.version1 != 0)
    #expect(features & VirtioBlock.Feature.flush != 0)
    #expect(features & VirtioBlock.Feature.discard != 0)
    #expect(features & VirtioBlock.Feature.readOnly == 0)
  }

  @Test func writeThenReadBack() throws {
    let file = TemporaryFile(size: 1 << 20)
    let (machine, _, requests) = try makeBlock(file)
    let pattern = (0..<1024).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
    try machine.memory.writeBytes(pattern, at: BlockRequests.data)
    let (status, _) = requests.run(type: VirtioBlock.RequestType.write, sector: 10, dataLength: 1024)
    #expect(status == 0)
    #expect(file.read(at: 10 * 512, count: 1024) == pattern)
    try machine.memory.fill(0, at: BlockRequests.data, length: 1024)
    let (readStatus, length) = requests.run(
      type: VirtioBlock.RequestType.read, sector: 10, dataLength: 1024, deviceWrites: true)
    #expect(readStatus == 0)
    #expect(length == 1025)
    #expect(try machine.memory.readBytes(at: BlockRequests.data, count: 1024) == pattern)
  }

  /// A request's data in several buffers, out of address order (as a guest's scattered pages
  /// arrive): each buffer takes its own part of the disk, one vectored transfer per request.
  @Test func scatteredBuffersEachTakeTheirOwnPartOfTheDisk() throws {
    let file = TemporaryFile(size: 1 << 20)
    let (machine, _, requests) = try makeBlock(file)
    let parts: [(address: UInt64, length: UInt32)] = [
      (BlockRequests.data + 0x8000, 512), (BlockRequests.data, 1536), (BlockRequests.data + 0x4000, 2048),
    ]
    let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ $0 >> 9) }
    var offset = 0
    for part in parts {
      try machine.memory.writeBytes(Array(pattern[offset..<offset + Int(part.length)]), at: part.address)
      offset += Int(part.length)
    }
    #expect(requests.run(type: VirtioBlock.RequestType.write, sector: 20, parts: parts, deviceWrites: false).0 == 0)
    #expect(file.read(at: 20 * 512, count: 4096) == pattern)

    // Read it back into the same buffers in another order.
    let readParts = [parts[2], parts[0], parts[1]]
    for part in readParts { try machine.memory.fill(0xEE, at: part.address, length: UInt64(part.length)) }
    let (status, length) = requests.run(
      type: VirtioBlock.RequestType.read, sector: 20, parts: readParts, deviceWrites: true)
    #expect(status == 0)
    #expect(length == 4097)
    offset = 0
    for part in readParts {
      let bytes = try machine.memory.readBytes(at: part.address, count: Int(part.length))
      #expect(bytes == Array(pattern[offset..<offset + Int(part.length)]), "buffer at \(part.address)")
      offset += Int(part.length)
    }
  }

  /// An image that shrank under the disk (another host process truncated it) ends inside a
  /// request's second buffer: what the file still has lands in place and the rest of that
  /// buffer and the next reads as zeros, as a read past the end of the data does.
  @Test func aReadPastTheImagesEndFillsTheRemainingBuffersWithZeros() throws {
    let file = TemporaryFile(size: 1 << 20, fill: 0x5C)
    let (machine, _, requests) = try makeBlock(file)
    #expect(truncate(file.path, off_t(10 * 512 + 700)) == 0)
    let parts: [(address: UInt64, length: UInt32)] = [
      (BlockRequests.data, 512), (BlockRequests.data + 0x2000, 1024), (BlockRequests.data + 0x1000, 512),
    ]
    for part in parts { try machine.memory.fill(0xEE, at: part.address, length: UInt64(part.length)) }
    #expect(requests.run(type: VirtioBlock.RequestType.read, sector: 10, parts: parts, deviceWrites: true).0 == 0)
    #expect(try machine.memory.readBytes(at: parts[0].address, count: 512) == [UInt8](repeating: 0x5C, count: 512))
    let second = try machine.memory.readBytes(at: parts[1].address, count: 1024)
    #expect(second == [UInt8](repeating: 0x5C, count: 188) + [UInt8](repeating: 0, count: 836))
    #expect(try machine.memory.readBytes(at: parts[2].address, count: 512) == [UInt8](repeating: 0, count: 512))
  }

  @Test func flushSyncsBeforeTheCompletionIsPublished() throws {
    let file = TemporaryFile(size: 1 << 20)
    let machine = try TestMachine()
    let backend = FlushOrderBackend(try RawFileBlockBackend(path: file.path), memory: machine.memory)
    let driver = try VirtioDriver(machine: machine, model: VirtioBlock(backend: backend))
    driver.start(features: VirtioBlock.Feature.flush, queueCount: 1)
    let queue = driver.queues[0]
    backend.usedIndexAddress.store(queue.used + 2, ordering: .releasing)
    let requests = BlockRequests(queue: queue)
    try machine.memory.writeBytes([UInt8](repeating: 0x5A, count: 512), at: BlockRequests.data)
    #expect(requests.run(type: VirtioBlock.RequestType.write, sector: 0, dataLength: 512).0 == 0)
    #expect(requests.run(type: VirtioBlock.RequestType.flush, sector: 0).0 == 0)
    // At the flush the driver could still see only the write's completion.
    #expect(backend.observed.withLock { $0 } == [1])
    #expect(queue.usedIndex == 2)
    #expect(file.read(at: 0, count: 512) == [UInt8](repeating: 0x5A, count: 512))
  }

  @Test func discardPunchesAHole() throws {
    let file = TemporaryFile(size: 1 << 20, fill: 0xAB)
    let (machine, _, requests) = try makeBlock(file)
    let before = file.allocatedBlocks
    // One segment: sectors 256..<1280 (512 KiB), flags 0.
    try machine.memory.write(UInt64(256), at: BlockRequests.data)
    try machine.memory.write(UInt32(1024), at: BlockRequests.data + 8)
    try machine.memory.write(UInt32(0), at: BlockRequests.data + 12)
    requests.writeHeader(type: VirtioBlock.RequestType.discard, sector: 0)
    requests.queue.submit([
      (BlockRequests.header, 16, false), (BlockRequests.data, 16, false), (BlockRequests.status, 1, true),
    ])
    #expect(requests.queue.waitForUsed(1))
    #expect(try machine.memory.read(UInt8.self, at: BlockRequests.status) == 0)
    #expect(file.allocatedBlocks < before)
    #expect(file.read(at: 256 * 512, count: 16) == [UInt8](repeating: 0, count: 16))
    #expect(file.read(at: 0, count: 16) == [UInt8](repeating: 0xAB, count: 16))
  }

  @Test func writeZeroesZeroesTheRange() throws {
    let file = TemporaryFile(size: 1 << 20, fill: 0xAB)
    let (machine, _, requests) = try makeBlock(file)
    try machine.memory.write(UInt64(8), at: BlockRequests.data)
    try machine.memory.write(UInt32(8), at: BlockRequests.data + 8)
    try machine.memory.write(UInt32(0), at: BlockRequests.data + 12)
    requests.writeHeader(type: VirtioBlock.RequestType.writeZeroes, sector: 0)
    requests.queue.submit([
      (BlockRequests.header, 16, false), (BlockRequests.data, 16, false), (BlockRequests.status, 1, true),
    ])
    #expect(requests.queue.waitForUsed(1))
    #expect(try machine.memory.read(UInt8.self, at: BlockRequests.status) == 0)
    #expect(file.read(at: 8 * 512, count: 4096) == [UInt8](repeating: 0, count: 4096))
    #expect(file.read(at: 16 * 512, count: 1) == [0xAB])
  }

  @Test func readOnlyDiskRefusesWrites() throws {
    let file = TemporaryFile(size: 1 << 20, fill: 0x11)
    let (machine, driver, requests) = try makeBlock(file, readOnly: true)
    #expect(driver.deviceFeatures & VirtioBlock.Feature.readOnly != 0)
    try machine.memory.fill(0x99, at: BlockRequests.data, length: 512)
    #expect(requests.run(type: VirtioBlock.RequestType.write, sector: 0, dataLength: 512).0 == 1)
    #expect(file.read(at: 0, count: 4) == [0x11, 0x11, 0x11, 0x11])
    #expect(requests.run(type: VirtioBlock.RequestType.read, sector: 0, dataLength: 512, deviceWrites: true).0 == 0)
    #expect(try machine.memory.read(UInt8.self, at: BlockRequests.data) == 0x11)
  }

  @Test func outOfRangeSectorsAreIOErrors() throws {
    let file = TemporaryFile(size: 1 << 20)
    let (_, driver, requests) = try makeBlock(file)
    #expect(requests.run(type: VirtioBlock.RequestType.read, sector: 2048, dataLength: 512, deviceWrites: true).0 == 1)
    #expect(requests.run(type: VirtioBlock.RequestType.read, sector: 2047, dataLength: 1024, deviceWrites: true).0 == 1)
    #expect(requests.run(type: VirtioBlock.RequestType.write, sector: UInt64.max / 256, dataLength: 512).0 == 1)
    #expect(requests.run(type: VirtioBlock.RequestType.read, sector: 2047, dataLength: 512, deviceWrites: true).0 == 0)
    #expect(requests.run(type: 0x77, sector: 0).0 == 2)  // unsupported
    #expect(driver.status == 0xF)
  }

  @Test func getIDReturnsTheSerial() throws {
    let file = TemporaryFile(size: 1 << 20)
    let (machine, _, requests) = try makeBlock(file)
    let (status, length) = requests.run(
      type: VirtioBlock.RequestType.getID, sector: 0, dataLength: 20, deviceWrites: true)
    #expect(status == 0)
    #expect(length == 21)
    #expect(try machine.memory.readBytes(at: BlockRequests.data, count: 14) == Array("hv-serial-0001".utf8))
  }

  @Test func usedBuffersInterruptThroughMSIXOrINTx() throws {
    let file = TemporaryFile(size: 1 << 20)
    let machine = try TestMachine()
    let driver = try VirtioDriver(
      machine: machine, model: VirtioBlock(backend: try RawFileBlockBackend(path: file.path)))
    // INTx first.
    driver.start(queueCount: 1)
    let gsi = machine.pci.gsi(forSlot: driver.slot, pin: 1)
    let requests = BlockRequests(queue: driver.queues[0])
    #expect(requests.run(type: VirtioBlock.RequestType.flush, sector: 0).0 == 0)
    #expect(waitUntil { machine.sink.level(gsi) })
    #expect(driver.readISR() == 1)
    #expect(!machine.sink.level(gsi))
    // Then MSI-X: vector 1 for the queue.
    let msix = machine.capabilities(slot: driver.slot).first { $0.id == 0x11 }!.offset
    machine.configWrite(slot: driver.slot, offset: msix + 2, size: 2, value: 0x8000)
    let table = driver.bar0 + 0x4000
    machine.bus.mmioWrite(table + 16, size: 4, value: 0xFEE0_0000)
    machine.bus.mmioWrite(table + 24, size: 4, value: 0x31)
    machine.bus.mmioWrite(table + 28, size: 4, value: 0)
    driver.start(queueCount: 1, vectors: true)
    #expect(driver.common(0x1A, size: 2) == 1)
    let again = BlockRequests(queue: driver.queues[0])
    #expect(again.run(type: VirtioBlock.RequestType.flush, sector: 0).0 == 0)
    #expect(waitUntil { machine.msi.count(data: 0x31) == 1 })
    #expect(driver.readISR() == 0)
  }

  @Test func eventIndexSuppressesInterruptsUntilUsedEvent() throws {
    let file = TemporaryFile(size: 1 << 20)
    let machine = try TestMachine()
    let driver = try VirtioDriver(
      machine: machine, model: VirtioBlock(backend: try RawFileBlockBackend(path: file.path)))
    driver.start(features: VirtioFeature.ringEventIndex, queueCount: 1)
    let gsi = machine.pci.gsi(forSlot: driver.slot, pin: 1)
    let queue = driver.queues[0]
    let requests = BlockRequests(queue: queue)
    // used_event = 1: no interrupt for the first completion (used idx 0 -> 1), one for the second.
    try machine.memory.write(UInt16(1), at: queue.available + 4 + 2 * UInt64(queue.size))
    _ = requests.run(type: VirtioBlock.RequestType.flush, sector: 0)
    usleep(20000)
    #expect(machine.sink.raiseCount(gsi) == 0)
    _ = requests.run(type: VirtioBlock.RequestType.flush, sector: 0)
    #expect(waitUntil { machine.sink.raiseCount(gsi) == 1 })
    // avail_event tracks the device's position.
    #expect(try machine.memory.read(UInt16.self, at: queue.used + 4 + 8 * UInt64(queue.size)) == 2)
  }

  @Test func indirectDescriptorsAreFollowed() throws {
    let file = TemporaryFile(size: 1 << 20)
    let machine = try TestMachine()
    let driver = try VirtioDriver(
      machine: machine, model: VirtioBlock(backend: try RawFileBlockBackend(path: file.path, serial: "indirect")))
    driver.start(features: VirtioFeature.ringIndirectDescriptors, queueCount: 1)
    let queue = driver.queues[0]
    let requests = BlockRequests(queue: queue)
    requests.writeHeader(type: VirtioBlock.RequestType.getID, sector: 0)
    let table: UInt64 = 0x50_0000
    let entries: [(UInt64, UInt32, UInt16)] = [
      (BlockRequests.header, 16, 1), (BlockRequests.data, 20, 3), (BlockRequests.status, 1, 2),
    ]
    for (index, entry) in entries.enumerated() {
      let at = table + 16 * UInt64(index)
      try machine.memory.write(entry.0, at: at)
      try machine.memory.write(entry.1, at: at + 8)
      try machine.memory.write(entry.2, at: at + 12)
      try machine.memory.write(UInt16(index + 1), at: at + 14)
    }
    queue.writeDescriptor(0, address: table, length: 48, flags: VirtqDescriptorFlag.indirect, next: 0)
    queue.publish(head: 0)
    #expect(queue.waitForUsed(1))
    #expect(try machine.memory.read(UInt8.self, at: BlockRequests.status) == 0)
    #expect(try machine.memory.readBytes(at: BlockRequests.data, count: 8) == Array("indirect".utf8))
  }

  @Test func missingImageIsAClearError() {
    #expect(throws: BlockBackendError.self) { try RawFileBlockBackend(path: "/nonexistent/disk.img") }
    do {
      _ = try RawFileBlockBackend(path: "/nonexistent/disk.img")
    } catch {
      #expect(error.description == "cannot open disk image '/nonexistent/disk.img': No such file or directory")
    }
  }
}
