import FuzzSupport
import Glibc
import Synchronization
import VMCore

@testable import Virtio

/// The emulated NICs (the e1000 and the RTL8139) as a hostile driver programs them: register
/// accesses, descriptor rings and buffers in guest RAM, and frames arriving from the backend.
///
/// Input: the model (even: e1000, odd: RTL8139), then operations until the input ends (at most
/// 256): a register write or read through the device's first BAR (a register from the model's
/// list, or any offset), an access through its other BAR (the e1000's IOADDR/IODATA window,
/// the RTL8139's memory-space copy of its registers), a 16-byte descriptor in one of two ring
/// areas (buffer address mostly in guest RAM or at its very end, sometimes anywhere), bytes
/// anywhere in guest RAM, a frame for the backend to deliver (up to 64 KiB, the rest of its
/// bytes zeros), and a pass of the device's worker (transmit and receive). Each input runs on
/// a fresh device over 1 MiB of zeroed guest RAM fenced by `PROT_NONE` guards, so a ring,
/// buffer or length the guest picks that reaches outside its RAM kills the target. The
/// device's worker thread is never started (the device is not attached to a bus): the fuzzer's
/// thread serves it, so every input replays alike.
@main
enum FuzzNICs {
  static let ramSize: UInt64 = 1 << 20
  /// Where the two descriptor areas start (64 descriptors each).
  static let ringAreas: [UInt64] = [0x1000, 0x2000]
  /// Where buffer addresses point by default.
  static let dataAddress: UInt64 = 0x1_0000
  static let maximumOperations = 256

  /// A network backend that hands out the fuzzer's frames and reads every byte it is given.
  final class FuzzNetworkBackend: NetworkBackend {
    let frames = Mutex<[[UInt8]]>([])
    let sentBytes = Atomic<Int>(0)
    var pollDescriptor: Int32 { -1 }
    func transmit(_ vectors: UnsafeBufferPointer<iovec>) -> Bool {
      var sum: UInt8 = 0
      for vector in vectors {
        for byte in UnsafeRawBufferPointer(start: vector.iov_base, count: vector.iov_len) { sum &+= byte }
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

  enum Model: Int { case e1000, rtl8139 }

  /// The registers a driver programs, by model: a register selector below 0xF0 picks one of
  /// these, a higher one any offset in the BAR.
  static let e1000Registers: [Int] = [
    E1000.Register.ctrl, E1000.Register.status, E1000.Register.eecd, E1000.Register.eerd, E1000.Register.ctrlExt,
    E1000.Register.mdic, E1000.Register.vet, E1000.Register.icr, E1000.Register.itr, E1000.Register.ics,
    E1000.Register.ims, E1000.Register.imc, E1000.Register.rctl, E1000.Register.tctl, E1000.Register.rdbal,
    E1000.Register.rdbah, E1000.Register.rdlen, E1000.Register.rdh, E1000.Register.rdt, E1000.Register.tdbal,
    E1000.Register.tdbah, E1000.Register.tdlen, E1000.Register.tdh, E1000.Register.tdt, E1000.Register.mta,
    E1000.Register.ral0, E1000.Register.rah0, E1000.Register.gprc, E1000.Register.gptc,
    E1000.Register.statisticsStart,
  ]
  static let rtl8139Registers: [Int] = [
    RTL8139.Register.idr0, RTL8139.Register.mar0, RTL8139.Register.tsd0, RTL8139.Register.tsd0 + 4,
    RTL8139.Register.tsd0 + 8, RTL8139.Register.tsd0 + 12, RTL8139.Register.tsad0, RTL8139.Register.tsad0 + 4,
    RTL8139.Register.tsad0 + 8, RTL8139.Register.tsad0 + 12, RTL8139.Register.rbstart, RTL8139.Register.command,
    RTL8139.Register.capr, RTL8139.Register.cbr, RTL8139.Register.imr, RTL8139.Register.isr, RTL8139.Register.tcr,
    RTL8139.Register.rcr, RTL8139.Register.tctr, RTL8139.Register.mpc, RTL8139.Register.cfg9346,
    RTL8139.Register.config0, RTL8139.Register.config1, RTL8139.Register.timerInterrupt,
    RTL8139.Register.mediaStatus, RTL8139.Register.config3, RTL8139.Register.config4,
    RTL8139.Register.multipleInterrupt, RTL8139.Register.transmitSummary, RTL8139.Register.bmcr,
    RTL8139.Register.bmsr, RTL8139.Register.anar, RTL8139.Register.anlpar, RTL8139.Register.aner,
    RTL8139.Register.cscr, RTL8139.Register.config5,
  ]

  /// The operations an input is made of (the low three bits of the operation byte).
  enum Operation: UInt8 {
    case writeRegister, readRegister, otherBAR, descriptor, guestBytes, frame, serve, serveAgain
  }

  nonisolated(unsafe) static var memory: GuestMemory!
  nonisolated(unsafe) static var guards: GuestMemoryGuards?

  static func main() {
    memory = try! GuestMemory(size: ramSize)
    guards = GuestMemoryGuards(around: memory)
    FuzzDriver.run(name: "nics", seeds: seeds) { input in runOne(&input) }
  }

  static func runOne(_ input: inout FuzzInput) {
    if !memory.discard(at: 0, length: ramSize) { try! memory.fill(0, at: 0, length: ramSize) }
    let model = Model(rawValue: Int(input.byte() & 1))!
    let backend = FuzzNetworkBackend()
    let device: any EmulatedNetworkDevice
    let registers: [Int]
    let barSize: UInt64
    switch model {
    case .e1000:
      device = E1000(backend: backend, mac: MACAddress(0x52, 0x54, 0x00, 0x12, 0x34, 0x56), memory: memory)
      registers = e1000Registers
      barSize = E1000.registerBARSize
    case .rtl8139:
      device = RTL8139(backend: backend, mac: MACAddress(0x52, 0x54, 0x00, 0x12, 0x34, 0x56), memory: memory)
      registers = rtl8139Registers
      barSize = RTL8139.registerSize
    }
    func registerOffset() -> UInt64 {
      let selector = input.byte()
      return selector < 0xF0
        ? UInt64(registers[Int(selector) % registers.count]) : UInt64(input.integer(UInt32.self)) % barSize
    }
    func width() -> Int { [4, 1, 2, 8][Int(input.byte() & 3)] }
    func value(_ width: Int) -> UInt64 { width == 8 ? input.integer(UInt64.self) : UInt64(input.integer(UInt32.self)) }
    func serve() {
      switch device {
      case let e1000 as E1000: e1000.process()
      case let rtl8139 as RTL8139: rtl8139.process()
      default: break
      }
    }

    var operations = 0
    while !input.isEmpty && operations < maximumOperations {
      operations += 1
      guard let operation = Operation(rawValue: input.byte() & 7) else { continue }
      switch operation {
      case .writeRegister:
        let offset = registerOffset()
        let size = width()
        device.barWrite(bar: 0, offset: offset, size: size, value: value(size))
        FuzzDriver.count("register writes")
      case .readRegister:
        let offset = registerOffset()
        _ = device.barRead(bar: 0, offset: offset, size: width())
      case .otherBAR:
        let write = input.flag()
        let offset = registerOffset()
        let size = width()
        if model == .e1000 {
          // IOADDR selects the register, IODATA reaches it.
          device.barWrite(bar: 1, offset: 0, size: 4, value: offset)
          if write {
            device.barWrite(bar: 1, offset: 4, size: size, value: value(size))
          } else {
            _ = device.barRead(bar: 1, offset: 4, size: size)
          }
        } else if write {
          device.barWrite(bar: 1, offset: offset, size: size, value: value(size))
        } else {
          _ = device.barRead(bar: 1, offset: offset, size: size)
        }
      case .descriptor:
        let area = ringAreas[Int(input.byte() & 1)]
        let at = area + UInt64(input.byte() & 63) * 16
        let selector = input.byte()
        let address: UInt64
        switch selector & 3 {
        case 0: address = input.integer(UInt64.self)
        case 2: address = ramSize - UInt64(input.integer(UInt16.self))
        default: address = dataAddress + UInt64(input.integer(UInt16.self))
        }
        try! memory.write(address, at: at)
        try! memory.write(input.integer(UInt64.self), at: at + 8)
      case .guestBytes:
        let address = UInt64(input.integer(UInt32.self)) % ramSize
        let bytes = input.bytes(Int(input.byte()))
        let count = min(UInt64(bytes.count), ramSize - address)
        try! memory.writeBytes(Array(bytes[0..<Int(count)]), at: address)
      case .frame:
        let lengthWord = input.integer(UInt16.self)
        let length = lengthWord & 0x8000 != 0 ? Int(lengthWord & 0x7FFF) * 2 : Int(lengthWord % 2048)
        var frame = [UInt8](repeating: 0, count: 12)  // the vnet header
        frame += input.bytes(length)
        frame += [UInt8](repeating: 0, count: 12 + length - frame.count)
        backend.frames.withLock { $0.append(frame) }
      case .serve, .serveAgain:
        serve()
      }
    }
    serve()
    serve()
    let counters = device.counters.values
    FuzzDriver.count("inputs")
    FuzzDriver.count("frames sent", counters["tx_frames"] ?? 0)
    FuzzDriver.count("frames received", counters["rx_frames"] ?? 0)
    FuzzDriver.count("dropped", (counters["tx_dropped"] ?? 0) + (counters["rx_dropped"] ?? 0))
    device.shutdown()
  }

  /// Builds inputs in the format `runOne` reads.
  struct SeedWriter {
    var bytes: [UInt8]

    init(model: Model) { bytes = [UInt8(model.rawValue)] }

    mutating func little<T: FixedWidthInteger>(_ value: T) {
      withUnsafeBytes(of: value.littleEndian) { bytes += $0 }
    }
    /// A 32-bit register write of the register at `index` in the model's list.
    mutating func write(_ index: Int, _ value: UInt32, width: UInt8 = 0) {
      bytes += [Operation.writeRegister.rawValue, UInt8(index), width]
      little(value)
    }
    /// A descriptor in ring area `area`: the buffer at `dataOffset` in the data area.
    mutating func descriptor(area: UInt8, index: UInt8, dataOffset: UInt16, upper: UInt64) {
      bytes += [Operation.descriptor.rawValue, area, index, 1]
      little(dataOffset)
      little(upper)
    }
    /// A descriptor in ring area `area` whose first quadword is `lower` (an address, or a
    /// context descriptor's fields).
    mutating func rawDescriptor(area: UInt8, index: UInt8, lower: UInt64, upper: UInt64) {
      bytes += [Operation.descriptor.rawValue, area, index, 0]
      little(lower)
      little(upper)
    }
    mutating func guestBytes(at address: UInt32, _ data: [UInt8]) {
      bytes.append(Operation.guestBytes.rawValue)
      little(address)
      bytes.append(UInt8(data.count))
      bytes += data
    }
    mutating func frame(_ data: [UInt8]) {
      bytes.append(Operation.frame.rawValue)
      little(UInt16(data.count))
      bytes += data
    }
    mutating func serve() { bytes.append(Operation.serve.rawValue) }
  }

  static func e1000Index(_ register: Int) -> Int { e1000Registers.firstIndex(of: register)! }
  static func rtl8139Index(_ register: Int) -> Int { rtl8139Registers.firstIndex(of: register)! }

  /// A broadcast ARP-sized frame from 52:54:00:00:00:01.
  static let broadcastFrame: [UInt8] =
    [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x52, 0x54, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06]
    + [UInt8](repeating: 0x5A, count: 46)

  /// The e1000 sending a legacy frame and receiving one; sending TCP segmentation packets
  /// (a small one, and a large one at the limit of the IPv4 length field); the RTL8139 sending
  /// a frame and receiving one into its ring.
  static func seeds() -> [[UInt8]] {
    typealias R = E1000.Register
    var legacy = SeedWriter(model: .e1000)
    legacy.write(e1000Index(R.tdbal), UInt32(ringAreas[0]))
    legacy.write(e1000Index(R.tdlen), 64 * 16)
    legacy.write(e1000Index(R.tctl), 0x2)
    legacy.guestBytes(at: UInt32(dataAddress), broadcastFrame)
    // EOP | IFCS | RS, 60 bytes.
    legacy.descriptor(area: 0, index: 0, dataOffset: 0, upper: 0x0B00_0000 | 60)
    legacy.write(e1000Index(R.tdt), 1)
    legacy.write(e1000Index(R.rdbal), UInt32(ringAreas[1]))
    legacy.write(e1000Index(R.rdlen), 64 * 16)
    for index in 0..<4 {
      legacy.descriptor(area: 1, index: UInt8(index), dataOffset: 0x1000 + UInt16(index) * 0x800, upper: 0)
    }
    legacy.write(e1000Index(R.rdt), 4)
    legacy.write(e1000Index(R.rctl), 0x0000_8002 | 0x18)  // EN, UPE, MPE, BAM
    legacy.write(e1000Index(R.ims), 0xFF)
    legacy.frame(broadcastFrame)
    legacy.serve()

    /// TCP segmentation of `length` bytes (headers included) in segments of `mss` bytes.
    func segmentation(mss: UInt64, length: UInt64) -> [UInt8] {
      var seed = SeedWriter(model: .e1000)
      seed.write(e1000Index(R.tdbal), UInt32(ringAreas[0]))
      seed.write(e1000Index(R.tdlen), 64 * 16)
      seed.write(e1000Index(R.tctl), 0x2)
      // An IPv4/TCP header (Ethernet 14, IP 20, TCP 20); the payload is whatever RAM holds.
      var headers = [UInt8](repeating: 0, count: 54)
      headers[12] = 0x08
      headers[14] = 0x45
      headers[23] = 6
      headers[46] = 0x50
      seed.guestBytes(at: UInt32(dataAddress), headers)
      // Context: IPCSS 14, IPCSO 24, TUCSS 34, TUCSO 50; TCP, IPv4, DEXT, TSE; HDRLEN 54.
      let context: UInt64 = 14 | 24 << 8 | 34 << 32 | 50 << 40
      seed.rawDescriptor(area: 0, index: 0, lower: context, upper: 0x27 << 24 | 54 << 40 | mss << 48)
      // Data: DEXT, TSE, EOP, RS, type 1, POPTS IXSM|TXSM.
      seed.descriptor(area: 0, index: 1, dataOffset: 0, upper: length | 1 << 20 | 0x2D << 24 | 0x03 << 40)
      seed.write(e1000Index(R.tdt), 2)
      seed.serve()
      return seed.bytes
    }

    typealias T = RTL8139.Register
    var rtl = SeedWriter(model: .rtl8139)
    rtl.write(rtl8139Index(T.command), 0x0C, width: 1)  // RE, TE
    rtl.write(rtl8139Index(T.rcr), 0x0F)  // AAP, APM, AM, AB; 8 KiB ring
    rtl.write(rtl8139Index(T.rbstart), UInt32(dataAddress + 0x8000))
    rtl.write(rtl8139Index(T.imr), 0xFFFF, width: 2)
    rtl.guestBytes(at: UInt32(dataAddress), broadcastFrame)
    rtl.write(rtl8139Index(T.tsad0), UInt32(dataAddress))
    rtl.write(rtl8139Index(T.tsd0), 60)
    rtl.frame(broadcastFrame)
    rtl.frame(broadcastFrame)
    rtl.serve()
    rtl.write(rtl8139Index(T.capr), 0x40, width: 2)
    rtl.serve()
    // 3000 bytes of payload in segments of 1460; 200,000 bytes in segments of the largest size
    // whose IPv4 total length fits 16 bits.
    return [
      legacy.bytes, segmentation(mss: 1460, length: 3054), segmentation(mss: 65536 - 54 - 14, length: 200_000),
      rtl.bytes,
    ]
  }
}
