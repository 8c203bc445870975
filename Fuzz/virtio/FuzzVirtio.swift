import Devices
import FuzzSupport
import Glibc
import Synchronization
import VMCore

@testable import Virtio

/// Virtqueue processing of every virtio device on descriptor tables and rings the fuzzer
/// chooses, driven through the real virtio-pci transport.
///
/// Input: the device (block, network, entropy, console, balloon, tablet), the feature bits the
/// driver accepts (a mask over what the device offers), the queue size (1-16), and for each
/// queue its descriptor table (address selector, length, flags, next per descriptor: addresses
/// mostly inside guest RAM, sometimes anywhere), its available ring (flags, index, entries);
/// then 4 KiB of guest data the descriptors can point at (request headers, indirect tables),
/// then frames the network backend delivers and bytes the console receives. Each input resets
/// the device, negotiates, enables the queues, sets DRIVER_OK, writes the rings and serves the
/// queues on the fuzzer's thread. The device's own worker thread keeps running, as in a
/// machine: DRIVER_OK wakes it once, so it may serve part of an input concurrently (through
/// the same locks), as it would when a guest writes its rings while the device works.
@main
enum FuzzVirtio {
  static let ramSize: UInt64 = 1 << 20
  static let dataAddress: UInt64 = 0x8_0000
  static let maxQueueSize: UInt16 = 16

  /// A network backend that hands out the fuzzer's frames and reads every byte it is given.
  final class FuzzNetworkBackend: NetworkBackend {
    let frames = Mutex<[[UInt8]]>([])
    let sentBytes = Atomic<Int>(0)
    var pollDescriptor: Int32 { -1 }
    var supportsOffloads: Bool { true }
    func setReceiveOffloads(_ offloads: NetworkOffloads) -> Bool { true }
    func transmit(_ vectors: UnsafeBufferPointer<iovec>) -> Bool {
      var sum: UInt8 = 0
      for vector in vectors {
        let bytes = UnsafeRawBufferPointer(start: vector.iov_base, count: vector.iov_len)
        for byte in bytes { sum &+= byte }
      }
      sentBytes.wrappingAdd(Int(sum), ordering: .relaxed)
      return true
    }
    func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int {
      guard let frame = frames.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) else { return 0 }
      let count = min(frame.count, buffer.count)
      frame.withUnsafeBytes { buffer.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: count) }
      return count
    }
  }

  /// A console backend that reads every byte the guest sends.
  final class FuzzSerialBackend: SerialBackend {
    let written = Atomic<Int>(0)
    func write(_ bytes: UnsafeRawBufferPointer) {
      var sum = 0
      for byte in bytes { sum &+= Int(byte) }
      written.wrappingAdd(sum, ordering: .relaxed)
    }
  }

  /// Entropy that counts up, so runs repeat.
  final class CountingEntropy: EntropySource {
    let next = Mutex<UInt8>(0)
    func fill(_ buffer: UnsafeMutableRawBufferPointer) -> Bool {
      next.withLock { next in
        for index in buffer.indices {
          buffer[index] = next
          next &+= 1
        }
      }
      return true
    }
  }

  enum Kind: Int, CaseIterable { case block, network, entropy, console, balloon, tablet }

  /// A device on its transport over guest RAM, made once per kind.
  final class Rig {
    let kind: Kind
    let memory: GuestMemory
    let transport: VirtioPCIDevice
    let model: any VirtioDeviceModel
    let network = FuzzNetworkBackend()
    let serial = FuzzSerialBackend()

    init(kind: Kind) {
      self.kind = kind
      memory = try! GuestMemory(size: FuzzVirtio.ramSize)
      let size = FuzzVirtio.maxQueueSize
      switch kind {
      case .block:
        // A 64 KiB disk in a memfd: the real file backend, no disk writes.
        let path = FuzzDriver.memoryFile(name: "fuzz-disk", size: 64 << 10)
        model = try! VirtioBlock(backend: RawFileBlockBackend(path: path), queueSize: size)
      case .network: model = VirtioNet(backend: network, queueSize: size)
      case .entropy: model = VirtioEntropy(source: CountingEntropy(), queueSize: size)
      case .console: model = VirtioConsole(backend: serial, queueSize: size)
      case .balloon:
        model = VirtioBalloon(
          options: BalloonOptions(deflateOnOOM: true, statisticsInterval: 1, freePageReporting: true),
          targetPages: 16, queueSize: size)
      case .tablet: model = VirtioTablet(queueSize: size)
      }
      transport = VirtioPCIDevice(model: model, memory: memory)
    }

    func common(_ offset: UInt64, size: Int, _ value: UInt64) {
      transport.barWrite(bar: 0, offset: VirtioPCIDevice.Layout.commonOffset + offset, size: size, value: value)
    }

    /// Serves every queue once, as the worker thread would after a notification.
    func serve() {
      switch model {
      case let block as VirtioBlock: block.process()
      case let net as VirtioNet: net.process(backendReady: true)
      case let entropy as VirtioEntropy: entropy.process()
      case let console as VirtioConsole: console.process()
      case let balloon as VirtioBalloon: balloon.process(timerFired: false)
      case let tablet as VirtioTablet: tablet.process()
      default: break
      }
    }
  }

  nonisolated(unsafe) static var rigs: [Kind: Rig] = [:]

  static func main() {
    FuzzDriver.run(name: "virtio", seeds: seeds) { input in runOne(&input) }
  }

  static func queueBase(_ index: Int) -> UInt64 { 0x1_0000 + UInt64(index) * 0x1_0000 }

  static func runOne(_ input: inout FuzzInput) {
    let kind = Kind(rawValue: Int(input.byte()) % Kind.allCases.count)!
    let rig = rigs[kind] ?? Rig(kind: kind)
    rigs[kind] = rig
    let transport = rig.transport
    let featureMask = input.integer(UInt64.self)
    let size = UInt16(1) << (input.byte() % 5)
    let queueCount = rig.model.queueMaxSizes.count

    // Reset, negotiate, program and enable the queues, DRIVER_OK.
    rig.common(0x14, size: 1, 0)
    rig.common(0x14, size: 1, UInt64(VirtioStatus.acknowledge | VirtioStatus.driver))
    let features = (transport.offeredFeatures & featureMask) | VirtioFeature.version1
    rig.common(0x08, size: 4, 0)
    rig.common(0x0C, size: 4, features & 0xFFFF_FFFF)
    rig.common(0x08, size: 4, 1)
    rig.common(0x0C, size: 4, features >> 32)
    rig.common(0x14, size: 1, UInt64(VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK))
    for queue in 0..<queueCount {
      let base = queueBase(queue)
      rig.common(0x16, size: 2, UInt64(queue))
      rig.common(0x18, size: 2, UInt64(size))
      rig.common(0x20, size: 8, base)
      rig.common(0x28, size: 8, base + 0x1000)
      rig.common(0x30, size: 8, base + 0x2000)
      rig.common(0x1C, size: 2, 1)
    }
    rig.common(0x14, size: 1, 0xF)

    let memory = rig.memory
    if !memory.discard(at: 0, length: ramSize) { try! memory.fill(0, at: 0, length: ramSize) }
    for queue in 0..<queueCount {
      let base = queueBase(queue)
      for descriptor in 0..<UInt64(size) {
        let selector = input.byte()
        let address: UInt64
        switch selector & 3 {
        case 0: address = input.integer(UInt64.self)
        case 1: address = base + UInt64(input.integer(UInt16.self))
        default: address = dataAddress + UInt64(input.integer(UInt16.self) & 0xFFF)
        }
        let length = selector & 4 != 0 ? input.integer(UInt32.self) : UInt32(input.integer(UInt16.self) & 0x1FFF)
        let at = base + 16 * descriptor
        try! memory.write(address, at: at)
        try! memory.write(length, at: at + 8)
        try! memory.write(UInt16(input.byte() & 7), at: at + 12)
        try! memory.write(UInt16(input.byte()), at: at + 14)
      }
      let available = base + 0x1000
      try! memory.write(UInt16(input.byte() & 1), at: available)
      let published = UInt16(input.byte() % UInt8(2 * size + 1))
      try! memory.write(published, at: available + 2)
      for entry in 0..<UInt64(size) { try! memory.write(UInt16(input.byte()), at: available + 4 + 2 * entry) }
      // used_event, then avail_event in the used ring.
      try! memory.write(input.integer(UInt16.self), at: available + 4 + 2 * UInt64(size))
    }
    try! memory.writeBytes(input.bytes(4096), at: dataAddress)
    switch kind {
    case .network:
      let frames = (0..<Int(input.byte() % 4)).map { _ in input.bytes(Int(input.integer(UInt16.self) % 2048)) }
      rig.network.frames.withLock { $0 = frames }
    case .console:
      (rig.model as! VirtioConsole).receive(input.bytes(Int(input.byte())))
    case .tablet:
      let events = (0..<Int(input.byte() % 8)).map { _ in
        VirtioInputEvent(type: input.integer(UInt16.self), code: input.integer(UInt16.self), value: input.integer())
      }
      (rig.model as! VirtioTablet).send(events)
    default: break
    }
    // Device-specific configuration, as a driver pokes it.
    for _ in 0..<Int(input.byte() % 4) {
      let offset = VirtioPCIDevice.Layout.deviceOffset + UInt64(input.byte() % 64)
      let width = [1, 2, 4][Int(input.byte() % 3)]
      transport.barWrite(bar: 0, offset: offset, size: width, value: UInt64(input.integer(UInt32.self)))
      _ = transport.barRead(bar: 0, offset: offset, size: width)
    }
    rig.serve()
    rig.serve()
    _ = transport.barRead(bar: 0, offset: VirtioPCIDevice.Layout.isrOffset, size: 1)
    FuzzDriver.count("virtqueue states")
    if transport.deviceStatus & VirtioStatus.deviceNeedsReset != 0 { FuzzDriver.count("needs reset") }
  }

  /// One well-formed request per device: a chain of a readable header, a writable buffer and
  /// a writable status byte over the data area.
  static func seeds() -> [[UInt8]] {
    Kind.allCases.map { kind in
      var bytes: [UInt8] = [UInt8(kind.rawValue)]
      bytes += [UInt8](repeating: 0xFF, count: 8)  // every offered feature
      bytes.append(2)  // four entries
      let queueCount = kind == .balloon ? 5 : (kind == .network || kind == .console || kind == .tablet ? 2 : 1)
      for _ in 0..<queueCount {
        // header (16 readable) -> data (512 writable) -> status (1 writable)
        let chain: [(offset: UInt16, length: UInt16, flags: UInt8, next: UInt8)] = [
          (0, 16, 1, 1), (0x200, 512, 3, 2), (0x400, 1, 2, 0), (0x600, 64, 2, 0),
        ]
        for descriptor in chain {
          bytes += [2, UInt8(descriptor.offset & 0xFF), UInt8(descriptor.offset >> 8)]
          bytes += [UInt8(descriptor.length & 0xFF), UInt8(descriptor.length >> 8), descriptor.flags, descriptor.next]
        }
        bytes += [0, 2, 0, 3, 0, 0, 0, 0, 0]
      }
      var data = [UInt8](repeating: 0, count: 4096)
      data[0] = 1  // block: a write request of sector 1
      data[8] = 1
      bytes += data
      bytes += [1, 64, 0] + [UInt8](repeating: 0x11, count: 64)
      return bytes
    }
  }
}
