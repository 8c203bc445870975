import Glibc
import PCI
import Testing
import VMCore

@testable import Virtio

/// The test as an 8139too-like driver: BAR addresses, register access by I/O ports or memory,
/// the receive ring and transmit buffers in guest RAM.
final class RTL8139Driver {
  let machine: TestMachine
  let device: RTL8139
  let backend = SocketPairBackend()
  let slot: Int
  let ioPorts: UInt16
  let registers: UInt64
  static let mac = MACAddress(0x52, 0x54, 0x00, 0x81, 0x39, 0x01)
  var memory: GuestMemory { machine.memory }
  typealias Register = RTL8139.Register

  init(memorySize: UInt64 = 16 << 20) throws {
    machine = try TestMachine(memorySize: memorySize)
    device = RTL8139(backend: backend, mac: Self.mac, memory: machine.memory)
    slot = try machine.pci.attach(device)
    ioPorts = UInt16(machine.configRead(slot: slot, offset: 0x10, size: 4) & ~0x3)
    registers = UInt64(machine.configRead(slot: slot, offset: 0x14, size: 4) & ~0xF)
    machine.configWrite(slot: slot, offset: 4, size: 2, value: 0x7)  // I/O, memory, bus master
  }

  deinit { device.shutdown() }

  func read8(_ register: Int) -> UInt8 { UInt8(machine.bus.mmioRead(registers + UInt64(register), size: 1)) }
  func read16(_ register: Int) -> UInt16 { UInt16(machine.bus.mmioRead(registers + UInt64(register), size: 2)) }
  func read32(_ register: Int) -> UInt32 { UInt32(machine.bus.mmioRead(registers + UInt64(register), size: 4)) }
  func write8(_ register: Int, _ value: UInt8) {
    machine.bus.mmioWrite(registers + UInt64(register), size: 1, value: UInt64(value))
  }
  func write16(_ register: Int, _ value: UInt16) {
    machine.bus.mmioWrite(registers + UInt64(register), size: 2, value: UInt64(value))
  }
  func write32(_ register: Int, _ value: UInt32) {
    machine.bus.mmioWrite(registers + UInt64(register), size: 4, value: UInt64(value))
  }

  var interruptLine: Bool { machine.sink.level(machine.pci.gsi(forSlot: slot, pin: 1)) }

  /// Reads EEPROM word `location` through 9346CR as 8139too does: programming mode, chip
  /// select, the READ command (start bit, opcode 10b) and `addressBits` address bits shifted
  /// out on rising clock edges, then 16 data bits read after each rising edge.
  func eepromRead(_ location: Int, addressBits: Int) -> UInt16 {
    let enable: UInt8 = 0x80 | 0x08
    write8(Register.cfg9346, 0x80)
    write8(Register.cfg9346, enable)
    let command = location | 0b110 << addressBits
    // Two leading zeros, the start bit, the opcode, the address.
    for bit in stride(from: 4 + addressBits, through: 0, by: -1) {
      let data: UInt8 = (command >> bit) & 1 != 0 ? 0x02 : 0
      write8(Register.cfg9346, enable | data)
      write8(Register.cfg9346, enable | data | 0x04)
    }
    write8(Register.cfg9346, enable)
    var word: UInt16 = 0
    for _ in 0..<16 {
      write8(Register.cfg9346, enable | 0x04)
      word = word << 1 | UInt16(read8(Register.cfg9346) & 0x01)
      write8(Register.cfg9346, enable)
    }
    write8(Register.cfg9346, 0)
    return word
  }

  /// Programs the receive ring at `base` (RCR as given), enables the receiver and transmitter
  /// and unmasks every interrupt.
  func startReceiving(base: UInt32, configuration: UInt32) {
    write8(Register.command, RTL8139.Command.reset)
    write32(Register.rbstart, base)
    write32(Register.rcr, configuration)
    write8(Register.command, RTL8139.Command.receiverEnable | RTL8139.Command.transmitterEnable)
    write16(Register.imr, 0xE07F)
  }

  /// The frame header at `offset` in the ring at `base`: status and length.
  func header(base: UInt64, offset: Int) throws -> (status: UInt16, length: Int) {
    let value = try memory.read(UInt32.self, at: base + UInt64(offset))
    return (UInt16(truncatingIfNeeded: value), Int(value >> 16))
  }

  /// Sends `frame` through descriptor `index` (its buffer at `buffer`).
  func transmit(_ frame: [UInt8], descriptor index: Int, buffer: UInt32) throws {
    try memory.writeBytes(frame, at: UInt64(buffer))
    write32(Register.tsad0 + 4 * index, buffer)
    write32(Register.tsd0 + 4 * index, UInt32(frame.count) | 8 << 16)
  }
}

/// The 8139's multicast filter bit, computed independently of the device: the CRC-32 of the
/// address with the bits taken in transmission order (each byte least significant bit first)
/// into a most-significant-bit-first register, whose top six bits are the index.
func referenceMulticastIndex(_ address: [UInt8]) -> Int {
  var crc: UInt32 = 0xFFFF_FFFF
  for byte in address {
    for bit in 0..<8 {
      let input = UInt32(byte >> UInt8(bit)) & 1
      let top = crc >> 31
      crc <<= 1
      if top ^ input != 0 { crc ^= 0x04C1_1DB7 }
    }
  }
  return Int(crc >> 26)
}

/// A small seeded generator (SplitMix64) for reproducible hostile input.
struct RTL8139TestRandom: RandomNumberGenerator {
  var state: UInt64
  mutating func next() -> UInt64 {
    state &+= 0x9E37_79B9_7F4A_7C15
    var value = state
    value = (value ^ (value >> 30)) &* 0xBF58_476D_1CE4_E5B9
    value = (value ^ (value >> 27)) &* 0x94D0_49BB_1331_11EB
    return value ^ (value >> 31)
  }
}

@Suite(.serialized) struct RTL8139Tests {
  typealias Register = RTL8139.Register

  @Test func identityBARsAndPHY() throws {
    let driver = try RTL8139Driver()
    let machine = driver.machine
    #expect(machine.configRead(slot: driver.slot, offset: 0, size: 4) == 0x8139_10EC)
    #expect(machine.configRead(slot: driver.slot, offset: 0x08, size: 1) < 0x20, "an 8139C, not a C+")
    #expect(machine.configRead(slot: driver.slot, offset: 0x0B, size: 1) == 0x02)  // network
    #expect(machine.configRead(slot: driver.slot, offset: 0x3D, size: 1) == 1)  // INTA#
    // BAR 0: 256 I/O ports; BAR 1: 256 bytes of memory.
    machine.configWrite(slot: driver.slot, offset: 0x10, size: 4, value: ~0)
    #expect(machine.configRead(slot: driver.slot, offset: 0x10, size: 4) & 0xFFFF == 0xFF01)
    machine.configWrite(slot: driver.slot, offset: 0x10, size: 4, value: UInt32(driver.ioPorts))
    machine.configWrite(slot: driver.slot, offset: 0x14, size: 4, value: ~0)
    #expect(machine.configRead(slot: driver.slot, offset: 0x14, size: 4) == 0xFFFF_FF00)
    machine.configWrite(slot: driver.slot, offset: 0x14, size: 4, value: UInt32(driver.registers))
    // Both BARs reach the same registers: IDR0-5 hold the MAC.
    let mac = RTL8139Driver.mac.array
    #expect((0..<6).map { driver.read8(Register.idr0 + $0) } == mac)
    #expect((0..<6).map { UInt8(machine.bus.portRead(driver.ioPorts + UInt16($0), size: 1)) } == mac)
    // TCR's hardware version: RTL8139C (HWVERID_A 11101b, HWVERID_B 00b).
    #expect(driver.read32(Register.tcr) & 0x7CC0_0000 == 0x7400_0000)
    #expect(driver.read32(Register.tcr) != 0xFFFF_FFFF)
    // The PHY: link up, auto-negotiation complete; 100 Mb/s full duplex both ways.
    #expect(driver.read16(Register.bmsr) & 0x0024 == 0x0024)
    #expect(driver.read16(Register.anar) & driver.read16(Register.anlpar) & 0x0100 != 0)
    #expect(driver.read8(Register.mediaStatus) & 0x0C == 0, "MSR: link OK, 100 Mb/s")
    // A BMCR reset self-clears and restores the advertisement.
    driver.write16(Register.anar, 0x0021)
    #expect(driver.read16(Register.anar) == 0x0021)
    driver.write16(Register.bmcr, 0x8000)
    #expect(driver.read16(Register.bmcr) & 0x8000 == 0)
    #expect(driver.read16(Register.anar) & 0x0100 != 0)
  }

  @Test func eepromReadsAsLinuxReadsIt() throws {
    let driver = try RTL8139Driver()
    // 8139too first reads word 0 with 8 address bits: a 93C46 (6 address bits) starts its
    // answer two clocks early, so the word comes back shifted left by two, with the top two
    // bits of word 1 (the vendor ID, 0x10EC) below it; the driver then takes 6 address bits.
    let eightBit = driver.eepromRead(0, addressBits: 8)
    #expect(eightBit == UInt16(truncatingIfNeeded: 0x8129 << 2 | 0x10EC >> 14))
    #expect(driver.eepromRead(0, addressBits: 6) == 0x8129)
    #expect(driver.eepromRead(1, addressBits: 6) == 0x10EC)
    #expect(driver.eepromRead(2, addressBits: 6) == 0x8139)
    let mac = RTL8139Driver.mac.array
    for index in 0..<3 {
      #expect(driver.eepromRead(7 + index, addressBits: 6) == UInt16(mac[2 * index]) | UInt16(mac[2 * index + 1]) << 8)
    }
    // Auto-load (EEM 01b) brings the EEPROM's address back into IDR0-5 and returns to normal.
    driver.write8(Register.cfg9346, 0xC0)
    driver.write32(Register.idr0, 0x0403_0201)
    #expect(driver.read8(Register.idr0) == 0x01)
    driver.write8(Register.cfg9346, 0x40)
    #expect(driver.read8(Register.cfg9346) >> 6 == 0)
    #expect((0..<6).map { driver.read8(Register.idr0 + $0) } == mac)
  }

  @Test func configurationRegistersNeedTheUnlock() throws {
    let driver = try RTL8139Driver()
    let before = driver.read8(Register.config1)
    driver.write8(Register.config1, before ^ 0x01)
    #expect(driver.read8(Register.config1) == before, "locked")
    driver.write8(Register.cfg9346, 0xC0)
    driver.write8(Register.config1, before ^ 0x01)
    driver.write8(Register.config3, 0x20)
    driver.write8(Register.cfg9346, 0x00)
    #expect(driver.read8(Register.config1) == before ^ 0x01)
    #expect(driver.read8(Register.config3) == 0x20)
  }

  @Test func transmitDescriptorsInTurnWithStatusAndInterrupts() throws {
    let driver = try RTL8139Driver()
    driver.write8(Register.command, RTL8139.Command.transmitterEnable)
    #expect(!driver.interruptLine)
    driver.write16(Register.imr, RTL8139.Interrupt.transmitOK | RTL8139.Interrupt.transmitError)
    var frames: [[UInt8]] = []
    // Six frames: descriptors 0, 1, 2, 3, 0, 1 in turn.
    for index in 0..<6 {
      let frame =
        [0x02, 0, 0, 0, 0, UInt8(index)] + RTL8139Driver.mac.array + [0x08, 0x00]
        + (0..<(46 + index * 100)).map { UInt8(truncatingIfNeeded: $0 &+ index) }
      frames.append(frame)
      try driver.transmit(frame, descriptor: index % 4, buffer: 0x10000 + UInt32(index) * 0x800)
      let status = driver.read32(Register.tsd0 + 4 * (index % 4))
      #expect(status & (RTL8139.TransmitStatus.own | RTL8139.TransmitStatus.ok) == 0xA000, "OWN and TOK")
      #expect(status & 0x1FFF == UInt32(frame.count))
    }
    #expect(driver.backend.sentFrames(count: 6) == frames)
    #expect(driver.read16(Register.transmitSummary) == 0xF00F, "TOK and OWN on all four")
    #expect(driver.interruptLine)
    #expect(driver.read16(Register.isr) == RTL8139.Interrupt.transmitOK)
    driver.write16(Register.isr, RTL8139.Interrupt.transmitOK)
    #expect(driver.read16(Register.isr) == 0, "write 1 to clear")
    #expect(!driver.interruptLine)

    // Writing the byte count clears the status; with the transmitter off the frame waits.
    driver.write8(Register.command, 0)
    try driver.transmit(frames[0], descriptor: 2, buffer: 0x20000)
    #expect(driver.read32(Register.tsd0 + 8) & 0xE000 == 0)
    #expect(driver.backend.sentFrames(count: 1, seconds: 0.1).isEmpty)
    driver.write8(Register.command, RTL8139.Command.transmitterEnable)
    #expect(driver.backend.sentFrames(count: 1) == [frames[0]])
    #expect(driver.read32(Register.tsd0 + 8) & 0xA000 == 0xA000)

    // A software reset: descriptors back to TSD0, owned by the driver; interrupts cleared.
    driver.write8(Register.command, RTL8139.Command.reset)
    #expect(driver.read8(Register.command) & RTL8139.Command.reset == 0, "RST self-clears")
    #expect(driver.read16(Register.imr) == 0 && driver.read16(Register.isr) == 0)
    #expect(driver.read16(Register.transmitSummary) == 0x000F)
    driver.write8(Register.command, RTL8139.Command.transmitterEnable)
    try driver.transmit(frames[1], descriptor: 0, buffer: 0x20000)
    #expect(driver.backend.sentFrames(count: 1) == [frames[1]])
  }

  @Test func badTransmitDescriptorsAbort() throws {
    let driver = try RTL8139Driver(memorySize: 4 << 20)
    driver.write8(Register.command, RTL8139.Command.transmitterEnable)
    driver.write16(Register.imr, RTL8139.Interrupt.transmitError)
    // Outside RAM, straddling its end, empty, and longer than 1792 bytes.
    let cases: [(address: UInt32, size: UInt32)] = [
      (0xFFFF_F000, 100), ((4 << 20) - 50, 100), (0x10000, 0), (0x10000, 1793), (0x10000, 0x1FFF),
    ]
    for (index, bad) in cases.enumerated() {
      let descriptor = index % 4
      driver.write32(Register.tsad0 + 4 * descriptor, bad.address)
      driver.write32(Register.tsd0 + 4 * descriptor, bad.size)
      let status = driver.read32(Register.tsd0 + 4 * descriptor)
      #expect(status & RTL8139.TransmitStatus.aborted != 0, "case \(index) aborts")
      #expect(status & (RTL8139.TransmitStatus.own | RTL8139.TransmitStatus.ok) == RTL8139.TransmitStatus.own)
    }
    #expect(driver.interruptLine)
    #expect(driver.read16(Register.isr) == RTL8139.Interrupt.transmitError)
    #expect(driver.backend.sentFrames(count: 1, seconds: 0.2).isEmpty)
    // Clearing the abort (TCR.CLRABT) and a good descriptor: the device goes on.
    driver.write32(Register.tcr, 1)
    #expect(driver.read32(Register.tcr) & 1 == 0)
    let frame =
      [UInt8](repeating: 0xFF, count: 6) + RTL8139Driver.mac.array + [0x08, 0x06] + [UInt8](repeating: 1, count: 46)
    try driver.transmit(frame, descriptor: 1, buffer: 0x10000)
    #expect(driver.backend.sentFrames(count: 1) == [frame])
  }

  @Test func receiveRingHeadersCRCAndFilters() throws {
    let driver = try RTL8139Driver()
    let memory = driver.memory
    let base: UInt64 = 0x40000
    // 8 KiB ring, physical match and broadcast.
    driver.startReceiving(base: UInt32(base), configuration: 0x2 | 0x8)
    #expect(driver.read8(Register.command) & RTL8139.Command.bufferEmpty != 0)
    let payload = (0..<200).map { UInt8(truncatingIfNeeded: $0 &* 3) }
    let ours = RTL8139Driver.mac.array + [0x02, 0, 0, 0, 0, 9, 0x08, 0x00] + payload
    // Another station's unicast is filtered out; ours arrives.
    driver.backend.inject([0x02, 0, 0, 0, 0, 7] + ours[6...])
    driver.backend.inject(ours)
    #expect(waitUntil { driver.read8(Register.command) & RTL8139.Command.bufferEmpty == 0 })
    #expect(waitUntil { driver.interruptLine })
    #expect(driver.read16(Register.isr) & RTL8139.Interrupt.receiveOK != 0)
    var header = try driver.header(base: base, offset: 0)
    #expect(header.status & RTL8139.ReceiveStatus.ok != 0)
    #expect(header.status & RTL8139.ReceiveStatus.physicalMatch != 0)
    #expect(header.length == ours.count + 4, "the length counts the CRC")
    let received = try memory.readBytes(at: base + 4, count: header.length)
    #expect(Array(received.prefix(ours.count)) == ours)
    let crc = referenceCRC32(ours)
    #expect(Array(received.suffix(4)) == [0, 8, 16, 24].map { UInt8(truncatingIfNeeded: crc >> $0) })
    var next = (4 + header.length + 3) & ~3
    #expect(Int(driver.read16(Register.cbr)) == next, "the next frame starts at a dword boundary")
    // The driver consumes it: CAPR trails the read offset by 16.
    driver.write16(Register.capr, UInt16(next - 16))
    driver.write16(Register.isr, RTL8139.Interrupt.receiveOK)
    #expect(driver.read8(Register.command) & RTL8139.Command.bufferEmpty != 0)
    #expect(!driver.interruptLine)

    // A short broadcast (an ARP request) is padded to 60 bytes before its CRC.
    let arp =
      [UInt8](repeating: 0xFF, count: 6) + [0x02, 0, 0, 0, 0, 9, 0x08, 0x06] + [UInt8](repeating: 0x11, count: 28)
    driver.backend.inject(arp)
    #expect(waitUntil { Int(driver.read16(Register.cbr)) != next })
    header = try driver.header(base: base, offset: next)
    #expect(header.status & RTL8139.ReceiveStatus.broadcast != 0)
    #expect(header.length == 64)
    let padded = arp + [UInt8](repeating: 0, count: 60 - arp.count)
    #expect(try memory.readBytes(at: base + UInt64(next) + 4, count: 60) == padded)
    let paddedCRC = referenceCRC32(padded)
    #expect(
      try memory.readBytes(at: base + UInt64(next) + 64, count: 4)
        == [0, 8, 16, 24].map { UInt8(truncatingIfNeeded: paddedCRC >> $0) })
    next += 68
    driver.write16(Register.capr, UInt16(next - 16))

    // Multicast passes only with AM and its hash bit in MAR0-7; broadcast only with AB.
    let group: [UInt8] = [0x01, 0x00, 0x5E, 0x00, 0x00, 0xFB]
    let index = referenceMulticastIndex(group)
    driver.write32(Register.rcr, 0x2 | 0x4)
    driver.backend.inject(group + ours[6...])  // no hash bit yet: dropped
    driver.backend.inject(arp)  // broadcast without AB: dropped
    usleep(50_000)
    #expect(Int(driver.read16(Register.cbr)) == next)
    driver.write8(Register.mar0 + index / 8, 1 << (index % 8))
    driver.backend.inject(group + ours[6...])
    #expect(waitUntil { Int(driver.read16(Register.cbr)) != next })
    header = try driver.header(base: base, offset: next)
    #expect(header.status & RTL8139.ReceiveStatus.multicast != 0)
    #expect(try memory.readBytes(at: base + UInt64(next) + 4, count: 6) == group)
    next += (4 + header.length + 3) & ~3
    driver.write16(Register.capr, UInt16(next - 16))
    // Accept all physical: another station's unicast now arrives, without PAM.
    driver.write32(Register.rcr, 0x1)
    driver.backend.inject([0x02, 0, 0, 0, 0, 7] + ours[6...])
    #expect(waitUntil { Int(driver.read16(Register.cbr)) != next })
    header = try driver.header(base: base, offset: next)
    #expect(header.status & (RTL8139.ReceiveStatus.ok | RTL8139.ReceiveStatus.physicalMatch) == 1)
  }

  /// Frames fill an 8 KiB ring; the next one waits for the driver to free room, then wraps
  /// to the start of the ring (WRAP 0) or runs past its end (WRAP 1).
  @Test(arguments: [false, true]) func theRingFillsAndWraps(continuePastEnd: Bool) throws {
    let driver = try RTL8139Driver()
    let memory = driver.memory
    let base: UInt64 = 0x40000
    let ringSize = 8192
    driver.startReceiving(base: UInt32(base), configuration: 0x2 | (continuePastEnd ? 0x80 : 0))
    let payload = (0..<1486).map { UInt8(truncatingIfNeeded: $0 &* 5 &+ 1) }
    let frame = RTL8139Driver.mac.array + [0x02, 0, 0, 0, 0, 9, 0x08, 0x00] + payload  // 1500 bytes
    let entry = (4 + frame.count + 4 + 3) & ~3  // 1508
    // Five frames fit in 8 KiB (7540 bytes); the sixth does not.
    for _ in 0..<6 { driver.backend.inject(frame) }
    #expect(waitUntil { Int(driver.read16(Register.cbr)) == 5 * entry })
    usleep(50_000)
    #expect(Int(driver.read16(Register.cbr)) == 5 * entry, "no room for the sixth")
    // The driver reads two frames: the sixth goes in at 5 * entry, across the ring's end.
    driver.write16(Register.capr, UInt16(2 * entry - 16))
    #expect(waitUntil { Int(driver.read16(Register.cbr)) == (6 * entry) % ringSize })
    let start = 5 * entry
    let header = try driver.header(base: base, offset: start)
    #expect(header.length == frame.count + 4)
    let firstPart = ringSize - (start + 4)
    let expected = frame + [0, 8, 16, 24].map { UInt8(truncatingIfNeeded: referenceCRC32(frame) >> $0) }
    if continuePastEnd {
      #expect(try memory.readBytes(at: base + UInt64(start) + 4, count: expected.count) == expected)
    } else {
      #expect(try memory.readBytes(at: base + UInt64(start) + 4, count: firstPart) == Array(expected[..<firstPart]))
      #expect(try memory.readBytes(at: base, count: expected.count - firstPart) == Array(expected[firstPart...]))
    }
  }

  /// A hostile driver: a ring outside RAM or straddling its end, random values written to
  /// every register with every width, CAPR anywhere. Nothing outside the ring (and one
  /// frame past it) changes in RAM; the device stays alive and works once reset.
  @Test func hostileDriverNeverHurtsTheHost() throws {
    let size: UInt64 = 4 << 20
    let driver = try RTL8139Driver(memorySize: size)
    let memory = driver.memory
    var random = RTL8139TestRandom(state: 0x8139)
    let frame = RTL8139Driver.mac.array + [0x02, 0, 0, 0, 0, 9, 0x08, 0x00] + [UInt8](repeating: 0x5A, count: 100)
    // A ring far outside RAM and one straddling its end: SERR, no frame, nothing written.
    for base in [UInt32(0xFFFF_0000), UInt32(size) - 64] {
      driver.startReceiving(base: base, configuration: 0x2 | 3 << 11)
      let snapshot = MemorySnapshot(memory)
      driver.backend.inject(frame)
      #expect(waitUntil { driver.read16(Register.isr) & RTL8139.Interrupt.systemError != 0 })
      #expect(driver.read16(Register.cbr) == 0)
      #expect(snapshot.changes(in: memory, allowing: []).isEmpty)
    }
    // Random register writes of every width, interleaved with frames both ways.
    let ring: UInt64 = 0x100000
    let snapshot = MemorySnapshot(memory)
    for round in 0..<3000 {
      let offset = Int.random(in: 0..<256, using: &random)
      let width = [1, 2, 4, 8].randomElement(using: &random)!
      let value = UInt64.random(in: 0...UInt64.max, using: &random)
      // Everything but RBSTART, which keeps the ring where the test watches it.
      if !(offset..<(offset + width)).overlaps(Register.rbstart..<(Register.rbstart + 4)) {
        driver.machine.bus.mmioWrite(driver.registers + UInt64(offset), size: width, value: value)
      }
      if round % 50 == 0 {
        driver.write32(Register.rbstart, UInt32(ring))
        driver.write8(Register.command, RTL8139.Command.receiverEnable | RTL8139.Command.transmitterEnable)
        driver.write32(Register.rcr, UInt32.random(in: 0...UInt32.max, using: &random) | 0xF)
        let length = [14, 60, 1514, 1792, 1793, 9000].randomElement(using: &random)!
        driver.backend.inject((0..<length).map { _ in UInt8.random(in: 0...255, using: &random) })
      }
      _ = driver.machine.bus.mmioRead(driver.registers + UInt64.random(in: 0..<256, using: &random), size: width)
    }
    usleep(100_000)
    // The transmit buffers' contents are only read; the ring (64 KiB and one frame past it)
    // is the only place written.
    #expect(snapshot.changes(in: memory, allowing: [ring..<(ring + 65536 + 2048)]).isEmpty)
    _ = driver.backend.sentFrames(count: Int.max, seconds: 0.2)

    // Reset and programmed properly, the device works both ways: the address back from the
    // EEPROM (auto-load), the random frames still queued dropped by a filter that takes none.
    driver.write8(Register.cfg9346, 0x40)
    driver.write32(Register.rcr, 0)
    driver.write8(Register.command, RTL8139.Command.receiverEnable)
    usleep(100_000)
    driver.startReceiving(base: UInt32(ring), configuration: 0x2)
    driver.backend.inject(frame)
    #expect(waitUntil { driver.read16(Register.cbr) != 0 })
    #expect(try driver.header(base: ring, offset: 0).length == frame.count + 4)
    try driver.transmit(frame, descriptor: 0, buffer: 0x20000)
    #expect(driver.backend.sentFrames(count: 1) == [frame])
  }
}
