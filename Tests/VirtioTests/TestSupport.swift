import Glibc
import PCI
import Synchronization
import Testing
import VMCore

@testable import Virtio

/// Records INTx line levels.
final class RecordingInterruptSink: InterruptSink {
  private let levels = Mutex<[UInt32: Bool]>([:])
  private let raises = Mutex<[UInt32: Int]>([:])
  func setInterruptLevel(line: UInt32, level: Bool) {
    levels.withLock { $0[line] = level }
    if level { raises.withLock { $0[line, default: 0] += 1 } }
  }
  func level(_ line: UInt32) -> Bool { levels.withLock { $0[line] ?? false } }
  func raiseCount(_ line: UInt32) -> Int { raises.withLock { $0[line] ?? 0 } }
}

/// Records MSI messages.
final class RecordingMSI: MSIDelivery {
  private let messages = Mutex<[(UInt64, UInt32)]>([])
  func deliverMSI(address: UInt64, data: UInt32) { messages.withLock { $0.append((address, data)) } }
  var all: [(address: UInt64, data: UInt32)] { messages.withLock { $0.map { ($0.0, $0.1) } } }
  func count(data: UInt32) -> Int { messages.withLock { $0.filter { $0.1 == data }.count } }
}

/// Waits (polling) until `condition` holds or `seconds` pass.
func waitUntil(_ seconds: Double = 5, _ condition: () -> Bool) -> Bool {
  var waited = 0.0
  while waited < seconds {
    if condition() { return true }
    usleep(1000)
    waited += 0.001
  }
  return condition()
}

/// A machine with a PCI bus; the test plays firmware and guest driver.
final class TestMachine {
  let memory: GuestMemory
  let bus = IOBus()
  let sink = RecordingInterruptSink()
  let msi = RecordingMSI()
  let pci: PCIBus

  init(memorySize: UInt64 = 16 << 20) throws {
    memory = try GuestMemory(size: memorySize)
    pci = PCIBus(interrupts: sink)
    pci.msi.attach(msi)
    try pci.register(on: bus)
  }

  func configAddress(slot: Int, offset: Int) -> UInt32 {
    0x8000_0000 | UInt32(slot) << 11 | UInt32(offset & 0xFC)
  }

  /// Configuration read through ports 0xCF8/0xCFC.
  func configRead(slot: Int, offset: Int, size: Int) -> UInt32 {
    bus.portWrite(0xCF8, size: 4, value: configAddress(slot: slot, offset: offset))
    return bus.portRead(0xCFC + UInt16(offset & 3), size: size)
  }

  /// Configuration write through ports 0xCF8/0xCFC.
  func configWrite(slot: Int, offset: Int, size: Int, value: UInt32) {
    bus.portWrite(0xCF8, size: 4, value: configAddress(slot: slot, offset: offset))
    bus.portWrite(0xCFC + UInt16(offset & 3), size: size, value: value)
  }

  /// Walks the capability list of `slot`: (id, offset) pairs.
  func capabilities(slot: Int) -> [(id: UInt8, offset: Int)] {
    var result: [(UInt8, Int)] = []
    var pointer = Int(configRead(slot: slot, offset: 0x34, size: 1))
    while pointer != 0 && result.count < 48 {
      result.append((UInt8(configRead(slot: slot, offset: pointer, size: 1)), pointer))
      pointer = Int(configRead(slot: slot, offset: pointer + 1, size: 1))
    }
    return result
  }
}

/// The test as a virtio-pci driver for one device.
final class VirtioDriver {
  let machine: TestMachine
  let device: VirtioPCIDevice
  let slot: Int
  var bar0: UInt64 = 0
  var notifyMultiplier: UInt64 = 0
  var commonOffset: UInt64 = 0
  var notifyOffset: UInt64 = 0
  var isrOffset: UInt64 = 0
  var deviceConfigOffset: UInt64 = 0
  var queues: [DriverQueue] = []
  var memory: GuestMemory { machine.memory }

  init(machine: TestMachine, model: any VirtioDeviceModel) throws {
    self.machine = machine
    device = VirtioPCIDevice(model: model, memory: machine.memory)
    slot = try machine.pci.attach(device)
    bar0 = UInt64(machine.configRead(slot: slot, offset: 0x10, size: 4) & ~0xF)
    machine.configWrite(slot: slot, offset: 4, size: 2, value: 0x6)  // memory + bus master
    for (id, offset) in machine.capabilities(slot: slot) where id == 0x09 {
      let type = machine.configRead(slot: slot, offset: offset + 3, size: 1)
      let capOffset = UInt64(machine.configRead(slot: slot, offset: offset + 8, size: 4))
      switch type {
      case 1: commonOffset = capOffset
      case 2:
        notifyOffset = capOffset
        notifyMultiplier = UInt64(machine.configRead(slot: slot, offset: offset + 16, size: 4))
      case 3: isrOffset = capOffset
      case 4: deviceConfigOffset = capOffset
      default: break
      }
    }
  }

  func common(_ offset: UInt64, size: Int) -> UInt64 { machine.bus.mmioRead(bar0 + commonOffset + offset, size: size) }
  func setCommon(_ offset: UInt64, size: Int, _ value: UInt64) {
    machine.bus.mmioWrite(bar0 + commonOffset + offset, size: size, value: value)
  }
  var status: UInt8 { UInt8(common(0x14, size: 1)) }
  func readISR() -> UInt8 { UInt8(machine.bus.mmioRead(bar0 + isrOffset, size: 1)) }
  func deviceConfig(_ offset: UInt64, size: Int) -> UInt64 {
    machine.bus.mmioRead(bar0 + deviceConfigOffset + offset, size: size)
  }

  var deviceFeatures: UInt64 {
    setCommon(0x00, size: 4, 0)
    let low = common(0x04, size: 4)
    setCommon(0x00, size: 4, 1)
    return low | common(0x04, size: 4) << 32
  }

  /// Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns whether FEATURES_OK stuck.
  @discardableResult
  func negotiate(features: UInt64) -> Bool {
    setCommon(0x14, size: 1, 0)
    setCommon(0x14, size: 1, 1)
    setCommon(0x14, size: 1, 3)
    setCommon(0x08, size: 4, 0)
    setCommon(0x0C, size: 4, features & 0xFFFF_FFFF)
    setCommon(0x08, size: 4, 1)
    setCommon(0x0C, size: 4, features >> 32)
    setCommon(0x14, size: 1, 0xB)
    return status & 8 != 0
  }

  /// Programs queue `index` with `size` entries at a fixed per-queue area; `enable` sets queue_enable.
  @discardableResult
  func setUpQueue(_ index: Int, size: UInt16, vector: UInt16 = 0xFFFF, enable: Bool = true) -> DriverQueue {
    let base = 0x10_0000 + UInt64(index) * 0x2_0000
    let queue = DriverQueue(
      driver: self, index: index, size: size, descriptors: base, available: base + 0x8000, used: base + 0xC000)
    try! memory.fill(0, at: base, length: 0x2_0000)
    setCommon(0x16, size: 2, UInt64(index))
    setCommon(0x18, size: 2, UInt64(size))
    setCommon(0x1A, size: 2, UInt64(vector))
    setCommon(0x20, size: 4, queue.descriptors & 0xFFFF_FFFF)
    setCommon(0x24, size: 4, queue.descriptors >> 32)
    setCommon(0x28, size: 8, queue.available)
    setCommon(0x30, size: 8, queue.used)
    if enable { setCommon(0x1C, size: 2, 1) }
    while queues.count <= index { queues.append(queue) }
    queues[index] = queue
    return queue
  }

  func driverOK() { setCommon(0x14, size: 1, 0xF) }

  /// A ready device: VERSION_1 plus `features`, `queueCount` queues of `size`.
  func start(features: UInt64 = 0, queueCount: Int, size: UInt16 = 16, vectors: Bool = false) {
    #expect(negotiate(features: VirtioFeature.version1 | features))
    for index in 0..<queueCount { setUpQueue(index, size: size, vector: vectors ? UInt16(index + 1) : 0xFFFF) }
    driverOK()
    #expect(status == 0xF)
  }

  func notify(_ queue: Int) {
    machine.bus.mmioWrite(bar0 + notifyOffset + UInt64(queue) * notifyMultiplier, size: 2, value: UInt64(queue))
  }

  /// Waits until DEVICE_NEEDS_RESET shows in the status.
  func waitForNeedsReset() -> Bool { waitUntil { self.status & 0x40 != 0 } }
}

/// A driver-side split virtqueue in guest memory.
final class DriverQueue {
  let driver: VirtioDriver
  let index: Int
  let size: UInt16
  let descriptors: UInt64
  let available: UInt64
  let used: UInt64
  var nextDescriptor: UInt16 = 0
  var availableIndex: UInt16 = 0
  var memory: GuestMemory { driver.memory }

  init(driver: VirtioDriver, index: Int, size: UInt16, descriptors: UInt64, available: UInt64, used: UInt64) {
    self.driver = driver
    self.index = index
    self.size = size
    self.descriptors = descriptors
    self.available = available
    self.used = used
  }

  func writeDescriptor(_ index: UInt16, address: UInt64, length: UInt32, flags: UInt16, next: UInt16) {
    let at = descriptors + 16 * UInt64(index)
    try! memory.write(address, at: at)
    try! memory.write(length, at: at + 8)
    try! memory.write(flags, at: at + 12)
    try! memory.write(next, at: at + 14)
  }

  /// Builds a chain of `buffers` (address, length, device-writable), publishes it; returns the head.
  @discardableResult
  func submit(_ buffers: [(UInt64, UInt32, Bool)], notify: Bool = true) -> UInt16 {
    let head = nextDescriptor
    for (position, buffer) in buffers.enumerated() {
      let index = (head &+ UInt16(position)) % size
      let last = position == buffers.count - 1
      writeDescriptor(
        index, address: buffer.0, length: buffer.1, flags: (last ? 0 : 1) | (buffer.2 ? 2 : 0),
        next: (index + 1) % size)
    }
    nextDescriptor = (head &+ UInt16(buffers.count)) % size
    publish(head: head, notify: notify)
    return head
  }

  /// Puts `head` in the available ring and bumps the index.
  func publish(head: UInt16, notify: Bool = true) {
    try! memory.write(head, at: available + 4 + 2 * UInt64(availableIndex % size))
    availableIndex &+= 1
    try! memory.write(availableIndex, at: available + 2)
    if notify { driver.notify(index) }
  }

  var usedIndex: UInt16 { try! memory.read(UInt16.self, at: used + 2) }

  func usedElement(_ position: UInt16) -> (id: UInt32, length: UInt32) {
    let at = used + 4 + 8 * UInt64(position % size)
    return (try! memory.read(UInt32.self, at: at), try! memory.read(UInt32.self, at: at + 4))
  }

  /// Waits until the used index reaches `count`.
  func waitForUsed(_ count: UInt16, seconds: Double = 5) -> Bool { waitUntil(seconds) { self.usedIndex == count } }
}

/// A temporary file removed on deinit.
final class TemporaryFile {
  let path: String
  init(size: Int, fill: UInt8 = 0) {
    var template = Array("/tmp/hostvisor-virtio-XXXXXX".utf8CString)
    let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
    path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    if fill == 0 {
      _ = ftruncate(fd, off_t(size))
    } else {
      let bytes = [UInt8](repeating: fill, count: size)
      _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, size) }
    }
    close(fd)
  }
  deinit { unlink(path) }

  func read(at offset: Int, count: Int) -> [UInt8] {
    let fd = open(path, O_RDONLY)
    defer { close(fd) }
    var bytes = [UInt8](repeating: 0, count: count)
    _ = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
    return bytes
  }

  var allocatedBlocks: Int {
    var info = stat()
    _ = stat(path, &info)
    return Int(info.st_blocks)
  }
}

/// Guest RAM snapshot to prove nothing outside allowed ranges changed.
struct MemorySnapshot {
  let bytes: [UInt8]
  init(_ memory: GuestMemory) { bytes = try! memory.readBytes(at: 0, count: Int(memory.totalSize)) }

  /// Offsets that differ now, outside `allowed` ranges.
  func changes(in memory: GuestMemory, allowing allowed: [Range<UInt64>]) -> [UInt64] {
    let now = try! memory.slice(at: 0, length: UInt64(bytes.count))
    var result: [UInt64] = []
    bytes.withUnsafeBytes { before in
      var offset = 0
      while offset < bytes.count {
        if memcmp(before.baseAddress! + offset, now.baseAddress! + offset, 4096) != 0 {
          for byte in offset..<(offset + 4096) where before[byte] != now[byte] {
            let address = UInt64(byte)
            if !allowed.contains(where: { $0.contains(address) }) { result.append(address) }
          }
        }
        offset += 4096
      }
    }
    return result
  }
}
