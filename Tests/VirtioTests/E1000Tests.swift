import Glibc
import PCI
import Testing
import VMCore

@testable import Virtio

/// A backend on one end of a datagram socket pair: each datagram is a 12-byte vnet header and
/// a frame. The test holds the other end (`peer`).
final class SocketPairBackend: NetworkBackend {
  let device: Int32
  let peer: Int32
  var pollDescriptor: Int32 { device }

  init() {
    var descriptors: [Int32] = [-1, -1]
    let result = socketpair(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &descriptors)
    precondition(result == 0, "socketpair failed")
    device = descriptors[0]
    peer = descriptors[1]
    _ = fcntl(device, F_SETFL, fcntl(device, F_GETFL) | O_NONBLOCK)
    _ = fcntl(peer, F_SETFL, fcntl(peer, F_GETFL) | O_NONBLOCK)
    var size: Int32 = 4 << 20
    for descriptor in [device, peer] {
      _ = setsockopt(descriptor, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
      _ = setsockopt(descriptor, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    }
  }

  deinit {
    close(device)
    close(peer)
  }

  func transmit(_ vectors: UnsafeBufferPointer<iovec>) -> Bool {
    writev(device, vectors.baseAddress, Int32(vectors.count)) >= 0
  }

  func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int {
    max(0, read(device, buffer.baseAddress, buffer.count))
  }

  /// Sends `frame` to the device (behind a zero vnet header).
  func inject(_ frame: [UInt8]) {
    let datagram = [UInt8](repeating: 0, count: 12) + frame
    _ = datagram.withUnsafeBytes { write(peer, $0.baseAddress, $0.count) }
  }

  /// The frames the device sent (vnet header removed), waiting up to `seconds` for `count`.
  func sentFrames(count: Int, seconds: Double = 5) -> [[UInt8]] {
    var frames: [[UInt8]] = []
    var buffer = [UInt8](repeating: 0, count: 70_000)
    _ = waitUntil(seconds) {
      while true {
        let length = buffer.withUnsafeMutableBytes { read(peer, $0.baseAddress, $0.count) }
        guard length > 0 else { break }
        frames.append(Array(buffer[12..<length]))
      }
      return frames.count >= count
    }
    return frames
  }
}

/// The test as an e1000 driver: BAR addresses, register access, rings in guest RAM.
final class E1000Driver {
  let machine: TestMachine
  let device: E1000
  let backend = SocketPairBackend()
  let slot: Int
  let registers: UInt64
  let ioPorts: UInt16
  static let mac = MACAddress(0x52, 0x54, 0x00, 0xE1, 0x00, 0x01)
  var memory: GuestMemory { machine.memory }

  init(memorySize: UInt64 = 16 << 20) throws {
    machine = try TestMachine(memorySize: memorySize)
    device = E1000(backend: backend, mac: Self.mac, memory: machine.memory)
    slot = try machine.pci.attach(device)
    registers = UInt64(machine.configRead(slot: slot, offset: 0x10, size: 4) & ~0xF)
    ioPorts = UInt16(machine.configRead(slot: slot, offset: 0x14, size: 4) & ~0x3)
    machine.configWrite(slot: slot, offset: 4, size: 2, value: 0x7)  // I/O, memory, bus master
  }

  deinit { device.shutdown() }

  func read(_ register: Int) -> UInt32 { UInt32(machine.bus.mmioRead(registers + UInt64(register), size: 4)) }
  func write(_ register: Int, _ value: UInt32) {
    machine.bus.mmioWrite(registers + UInt64(register), size: 4, value: UInt64(value))
  }

  var interruptLine: Bool { machine.sink.level(machine.pci.gsi(forSlot: slot, pin: 1)) }

  /// Reads EEPROM word `address` by bit-banging the Microwire interface as Linux does:
  /// request, select, shift out READ (110b) and 6 address bits, shift in 16 data bits.
  func microwireRead(_ address: Int) -> UInt16 {
    let request: UInt32 = 1 << 6
    var eecd = read(E1000.Register.eecd) | request
    write(E1000.Register.eecd, eecd)
    #expect(read(E1000.Register.eecd) & (1 << 7) != 0, "EECD grant")
    eecd &= ~0x5  // DI and SK low
    write(E1000.Register.eecd, eecd)
    eecd |= 0x2  // CS
    write(E1000.Register.eecd, eecd)
    func shiftOut(_ data: UInt32, bits: Int) {
      for bit in stride(from: bits - 1, through: 0, by: -1) {
        eecd = (eecd & ~0x4) | ((data >> UInt32(bit)) & 1 != 0 ? 0x4 : 0)
        write(E1000.Register.eecd, eecd)
        write(E1000.Register.eecd, eecd | 0x1)
        write(E1000.Register.eecd, eecd)
      }
    }
    shiftOut(0b110, bits: 3)
    shiftOut(UInt32(address), bits: 6)
    var word: UInt16 = 0
    for _ in 0..<16 {
      write(E1000.Register.eecd, eecd | 0x1)
      word = word << 1 | (read(E1000.Register.eecd) & 0x8 != 0 ? 1 : 0)
      write(E1000.Register.eecd, eecd)
    }
    write(E1000.Register.eecd, eecd & ~0x3 & ~request)
    return word
  }

  /// Reads PHY register `register` through MDIC.
  func phyRead(_ register: Int, phy: UInt32 = 1) -> (value: UInt16, error: Bool) {
    write(E1000.Register.mdic, 2 << 26 | phy << 21 | UInt32(register) << 16)
    let mdic = read(E1000.Register.mdic)
    #expect(mdic & (1 << 28) != 0, "MDIC ready")
    return (UInt16(truncatingIfNeeded: mdic), mdic & (1 << 31) != 0)
  }

  /// Programs the transmit ring at `base` with `count` descriptors and enables transmission.
  func setUpTransmit(base: UInt64, count: Int) {
    write(E1000.Register.tdbal, UInt32(truncatingIfNeeded: base))
    write(E1000.Register.tdbah, UInt32(truncatingIfNeeded: base >> 32))
    write(E1000.Register.tdlen, UInt32(count * 16))
    write(E1000.Register.tdh, 0)
    write(E1000.Register.tdt, 0)
    write(E1000.Register.tctl, 0x2 | 0x8)
  }

  /// Programs the receive ring at `base` with `count` descriptors whose buffers start at
  /// `buffers` (2 KiB each), hands all but one to the device and enables reception.
  func setUpReceive(base: UInt64, count: Int, buffers: UInt64, control: UInt32 = 0x2 | 1 << 15) throws {
    for index in 0..<count {
      try memory.write(buffers + UInt64(index) * 2048, at: base + UInt64(index) * 16)
      try memory.write(UInt64(0), at: base + UInt64(index) * 16 + 8)
    }
    write(E1000.Register.rdbal, UInt32(truncatingIfNeeded: base))
    write(E1000.Register.rdbah, UInt32(truncatingIfNeeded: base >> 32))
    write(E1000.Register.rdlen, UInt32(count * 16))
    write(E1000.Register.rdh, 0)
    write(E1000.Register.rdt, UInt32(count - 1))
    write(E1000.Register.rctl, control)
  }

  /// Writes a descriptor (two quadwords) at index `index` of the ring at `base`.
  func putDescriptor(base: UInt64, index: Int, _ lower: UInt64, _ upper: UInt64) throws {
    try memory.write(lower, at: base + UInt64(index) * 16)
    try memory.write(upper, at: base + UInt64(index) * 16 + 8)
  }
}

/// The Ethernet CRC-32 computed bit by bit (independently of the device's table).
func referenceCRC32(_ bytes: [UInt8]) -> UInt32 {
  var crc: UInt32 = 0xFFFF_FFFF
  for byte in bytes {
    crc ^= UInt32(byte)
    for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0xEDB8_8320 : crc >> 1 }
  }
  return ~crc
}

/// The 16-bit ones' complement sum of `bytes` (odd length padded with zero), folded.
func onesComplementSum(_ bytes: ArraySlice<UInt8>, initial: UInt32 = 0) -> UInt16 {
  var sum = initial
  var index = bytes.startIndex
  while index < bytes.endIndex {
    let high = UInt32(bytes[index])
    let low = index + 1 < bytes.endIndex ? UInt32(bytes[index + 1]) : 0
    sum += high << 8 | low
    index += 2
  }
  while sum >> 16 != 0 { sum = (sum & 0xFFFF) + (sum >> 16) }
  return UInt16(sum)
}

@Suite(.serialized) struct E1000Tests {
  @Test func identityAndBARs() throws {
    let driver = try E1000Driver()
    #expect(driver.machine.configRead(slot: driver.slot, offset: 0, size: 4) == 0x100E_8086)
    #expect(driver.machine.configRead(slot: driver.slot, offset: 0x0B, size: 1) == 0x02)  // network
    // BAR 0: 128 KiB memory; BAR 1: I/O.
    driver.machine.configWrite(slot: driver.slot, offset: 0x10, size: 4, value: ~0)
    #expect(driver.machine.configRead(slot: driver.slot, offset: 0x10, size: 4) == ~UInt32(128 << 10 - 1) & ~0xF)
    driver.machine.configWrite(slot: driver.slot, offset: 0x10, size: 4, value: UInt32(driver.registers))
    #expect(driver.machine.configRead(slot: driver.slot, offset: 0x14, size: 4) & 1 == 1)
    // STATUS: link up, full duplex, 1000 Mb/s.
    let status = driver.read(E1000.Register.status)
    #expect(status & 0x3 == 0x3 && status & 0xC0 == 0x80)
  }

  @Test func eepromHoldsTheMACAndAValidChecksum() throws {
    let driver = try E1000Driver()
    let words = (0..<64).map { driver.microwireRead($0) }
    #expect(words.reduce(UInt16(0), &+) == 0xBABA)
    let mac = E1000Driver.mac.array
    #expect(words[0] == UInt16(mac[0]) | UInt16(mac[1]) << 8)
    #expect(words[1] == UInt16(mac[2]) | UInt16(mac[3]) << 8)
    #expect(words[2] == UInt16(mac[4]) | UInt16(mac[5]) << 8)
    #expect(words[0x0D] == 0x100E && words[0x0E] == 0x8086)
    // EERD reads the same words.
    for address in [0, 1, 2, 0x0D, 0x3F] {
      driver.write(E1000.Register.eerd, UInt32(address) << 8 | 1)
      let eerd = driver.read(E1000.Register.eerd)
      #expect(eerd & 0x10 != 0)
      #expect(UInt16(eerd >> 16) == words[address])
    }
    // Receive address 0 holds the MAC after reset.
    #expect(
      driver.read(E1000.Register.ral0) == UInt32(mac[0]) | UInt32(mac[1]) << 8 | UInt32(mac[2]) << 16 | UInt32(mac[3])
        << 24)
    #expect(driver.read(E1000.Register.rah0) == UInt32(mac[4]) | UInt32(mac[5]) << 8 | 1 << 31)
  }

  @Test func phyReportsLinkAndRefusesOtherAddresses() throws {
    let driver = try E1000Driver()
    #expect(driver.phyRead(2).value == 0x0141)
    #expect(driver.phyRead(3).value & 0xFFF0 == 0x0C20)
    #expect(driver.phyRead(1).value & 0x24 == 0x24)  // link up, auto-negotiation complete
    #expect(driver.phyRead(2, phy: 2).error)
    // A write to the advertisement register reads back; the status register is read-only.
    driver.write(E1000.Register.mdic, 1 << 26 | 1 << 21 | 4 << 16 | 0x0DE1)
    #expect(driver.phyRead(4).value == 0x0DE1)
    driver.write(E1000.Register.mdic, 1 << 26 | 1 << 21 | 1 << 16 | 0)
    #expect(driver.phyRead(1).value & 0x4 != 0)
    // PHY reset through the control register restores the defaults and self-clears.
    driver.write(E1000.Register.mdic, 1 << 26 | 1 << 21 | 0 << 16 | 0x8000)
    #expect(driver.phyRead(0).value & 0x8000 == 0)
    #expect(driver.phyRead(4).value != 0x0DE1)
  }

  @Test func interruptRegistersDriveINTx() throws {
    let driver = try E1000Driver()
    #expect(!driver.interruptLine)
    driver.write(E1000.Register.ics, E1000.Interrupt.linkStatusChange)
    #expect(!driver.interruptLine, "masked")
    driver.write(E1000.Register.ims, E1000.Interrupt.linkStatusChange | E1000.Interrupt.receiveTimer)
    #expect(driver.interruptLine)
    #expect(driver.read(E1000.Register.ims) == E1000.Interrupt.linkStatusChange | E1000.Interrupt.receiveTimer)
    #expect(driver.read(E1000.Register.icr) == E1000.Interrupt.linkStatusChange)
    #expect(!driver.interruptLine, "ICR read clears")
    #expect(driver.read(E1000.Register.icr) == 0)
    driver.write(E1000.Register.ics, E1000.Interrupt.receiveTimer)
    #expect(driver.interruptLine)
    driver.write(E1000.Register.imc, E1000.Interrupt.receiveTimer)
    #expect(!driver.interruptLine, "IMC masks")
    // The I/O window reaches the same registers; a reset through it clears the mask.
    driver.machine.bus.portWrite(driver.ioPorts, size: 4, value: UInt32(E1000.Register.ims))
    #expect(driver.machine.bus.portRead(driver.ioPorts + 4, size: 4) == E1000.Interrupt.linkStatusChange)
    driver.machine.bus.portWrite(driver.ioPorts, size: 4, value: UInt32(E1000.Register.ctrl))
    driver.machine.bus.portWrite(driver.ioPorts + 4, size: 4, value: 1 << 26)
    #expect(driver.read(E1000.Register.ims) == 0)
    #expect(driver.read(E1000.Register.ctrl) & (1 << 26) == 0)
  }

  @Test func framesGoOutAndComeIn() throws {
    let driver = try E1000Driver()
    let memory = driver.memory
    driver.setUpTransmit(base: 0x10000, count: 8)
    try driver.setUpReceive(base: 0x20000, count: 8, buffers: 0x100000)
    driver.write(E1000.Register.ims, E1000.Interrupt.receiveTimer | E1000.Interrupt.transmitDescriptorWritten)

    // Transmit: a frame in two legacy descriptors, status reported on the last.
    let frame: [UInt8] = [0x02, 0, 0, 0, 0, 1] + E1000Driver.mac.array + [0x08, 0x00] + (0..<100).map { UInt8($0) }
    try memory.writeBytes(frame[0..<40], at: 0x30000)
    try memory.writeBytes(frame[40...], at: 0x31000)
    try driver.putDescriptor(base: 0x10000, index: 0, 0x30000, 40)
    try driver.putDescriptor(base: 0x10000, index: 1, 0x31000, UInt64(frame.count - 40) | 0x09 << 24)  // EOP|RS
    driver.write(E1000.Register.tdt, 2)
    #expect(driver.backend.sentFrames(count: 1) == [frame])
    #expect(waitUntil { driver.read(E1000.Register.tdh) == 2 })
    #expect(try memory.read(UInt8.self, at: 0x10000 + 16 + 12) & 1 == 1, "DD written back")
    #expect(waitUntil { driver.interruptLine })
    #expect(driver.read(E1000.Register.icr) & E1000.Interrupt.transmitDescriptorWritten != 0)

    // Receive: a frame to our address; one to another address is filtered out.
    let incoming: [UInt8] =
      E1000Driver.mac.array + [0x02, 0, 0, 0, 0, 9, 0x08, 0x00] + (0..<200).map { UInt8($0 ^ 0x5A) }
    driver.backend.inject([0x02, 0, 0, 0, 0, 7] + incoming[6...])
    driver.backend.inject(incoming)
    #expect(waitUntil { driver.read(E1000.Register.rdh) == 1 })
    let upper = try memory.read(UInt64.self, at: 0x20000 + 8)
    let length = Int(upper & 0xFFFF)
    #expect(length == incoming.count + 4, "the CRC is appended")
    #expect(UInt8(truncatingIfNeeded: upper >> 32) & 0x3 == 0x3, "DD and EOP")
    let received = try memory.readBytes(at: 0x100000, count: length)
    #expect(Array(received.prefix(incoming.count)) == incoming)
    let crc = referenceCRC32(incoming)
    #expect(Array(received.suffix(4)) == [0, 8, 16, 24].map { UInt8(truncatingIfNeeded: crc >> $0) })
    #expect(driver.read(E1000.Register.icr) & E1000.Interrupt.receiveTimer != 0)
    #expect(driver.read(E1000.Register.gprc) == 1)
    #expect(driver.read(E1000.Register.gprc) == 0, "statistics clear on read")

    // With SECRC the CRC is stripped; broadcast needs BAM; multicast passes the table.
    driver.write(E1000.Register.rctl, 0x2 | 1 << 26)
    driver.backend.inject([UInt8](repeating: 0xFF, count: 6) + incoming[6...])
    let multicast: [UInt8] = [0x01, 0x00, 0x5E, 0x00, 0x00, 0xFB]
    let hash = (UInt32(multicast[4]) >> 4 | UInt32(multicast[5]) << 4) & 0xFFF
    driver.write(E1000.Register.mta + Int(hash >> 5) * 4, 1 << (hash & 0x1F))
    driver.backend.inject(multicast + incoming[6...])
    #expect(waitUntil { driver.read(E1000.Register.rdh) == 2 })
    #expect(try memory.read(UInt16.self, at: 0x20000 + 16 + 8) == UInt16(incoming.count))
    #expect(try memory.readBytes(at: 0x100000 + 2048, count: 6) == multicast)
  }

  @Test func longFramesSpanBuffersAndWaitForDescriptors() throws {
    let driver = try E1000Driver()
    let memory = driver.memory
    // Eight descriptors (RDLEN counts in 128-byte units), seven handed over; 256-byte buffers
    // (BSIZE 11b), long packets allowed, CRC stripped.
    try driver.setUpReceive(base: 0x20000, count: 8, buffers: 0x100000, control: 0x2 | 1 << 5 | 3 << 16 | 1 << 26)
    let frame: [UInt8] = E1000Driver.mac.array + [0x02, 0, 0, 0, 0, 9, 0x08, 0x00] + (0..<586).map { UInt8($0 & 0xFF) }
    driver.backend.inject(frame)  // 600 bytes: three buffers
    #expect(waitUntil { driver.read(E1000.Register.rdh) == 3 })
    var gathered: [UInt8] = []
    for index in 0..<3 {
      let upper = try memory.read(UInt64.self, at: 0x20000 + UInt64(index) * 16 + 8)
      let status = UInt8(truncatingIfNeeded: upper >> 32)
      #expect(status & 1 == 1)
      #expect((status & 2 != 0) == (index == 2), "EOP only on the last")
      gathered += try memory.readBytes(at: 0x100000 + UInt64(index) * 2048, count: Int(upper & 0xFFFF))
    }
    #expect(gathered == frame)
    // The second frame takes three more; the third needs three but one is left: it waits
    // until RDT moves (past the end of the ring, wrapping).
    driver.backend.inject(frame)
    #expect(waitUntil { driver.read(E1000.Register.rdh) == 6 })
    driver.backend.inject(frame)
    usleep(50_000)
    #expect(driver.read(E1000.Register.rdh) == 6)
    driver.write(E1000.Register.rdt, 1)
    #expect(waitUntil { driver.read(E1000.Register.rdh) == 1 })
    let last = try memory.read(UInt64.self, at: 0x20000 + 0 * 16 + 8)
    #expect(UInt8(truncatingIfNeeded: last >> 32) & 0x3 == 0x3, "the frame ends in descriptor 0")
    // A 64-byte ring length is not a multiple of 128: the ring has no descriptors.
    try driver.setUpReceive(base: 0x20000, count: 4, buffers: 0x100000, control: 0x2 | 1 << 26)
    #expect(driver.read(E1000.Register.rdlen) == 0)
  }

  /// A TCP/IPv4 packet with 4000 payload bytes sent with TSO (MSS 1000) and checksum
  /// insertion comes out as four valid segments.
  @Test func segmentationOffloadCutsValidSegments() throws {
    let driver = try E1000Driver()
    let memory = driver.memory
    driver.setUpTransmit(base: 0x10000, count: 16)
    let payload = (0..<4000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
    let source: [UInt8] = [10, 0, 0, 1]
    let destination: [UInt8] = [10, 0, 0, 2]
    // As Linux does for TSO: IP total length and checksum zero; FIN|PSH|ACK in the original.
    let ip: [UInt8] = [0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0] + source + destination
    var tcp: [UInt8] = [0x13, 0x88, 0x00, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x19, 0xFF, 0xFF, 0, 0, 0, 0]
    // As Linux does: the TCP checksum field holds the pseudo-header sum without the length.
    let pseudo = onesComplementSum(ArraySlice(source + destination + [0, 6]))
    tcp[16] = UInt8(pseudo >> 8)
    tcp[17] = UInt8(pseudo & 0xFF)
    let ethernet: [UInt8] = [0x02, 0, 0, 0, 0, 2] + E1000Driver.mac.array + [0x08, 0x00]
    let packet = ethernet + ip + tcp + payload
    try memory.writeBytes(packet, at: 0x40000)
    // Context: IPCSS 14, IPCSO 24, IPCSE 33, TUCSS 34, TUCSO 50, TUCSE 0; TSE|IP|TCP|DEXT,
    // PAYLEN, HDRLEN 54, MSS 1000.
    let contextLower: UInt64 = 14 | 24 << 8 | 33 << 16 | 34 << 32 | 50 << 40
    let contextUpper: UInt64 = UInt64(payload.count) | 0x27 << 24 | 54 << 40 | 1000 << 48
    try driver.putDescriptor(base: 0x10000, index: 0, contextLower, contextUpper)
    // Data: headers and part of the payload, then the rest; DTYP 1, DEXT|TSE, POPTS IXSM|TXSM.
    let split = 54 + 1500
    try driver.putDescriptor(base: 0x10000, index: 1, 0x40000, UInt64(split) | 1 << 20 | 0x24 << 24 | 0x3 << 40)
    try driver.putDescriptor(
      base: 0x10000, index: 2, 0x40000 + UInt64(split), UInt64(packet.count - split) | 1 << 20 | 0x2D << 24)
    driver.write(E1000.Register.tdt, 3)
    let frames = driver.backend.sentFrames(count: 4)
    try #require(frames.count == 4)
    var reassembled: [UInt8] = []
    for (index, frame) in frames.enumerated() {
      let segmentPayload = Array(frame[54...])
      #expect(segmentPayload.count == 1000)
      reassembled += segmentPayload
      let ipHeader = frame[14..<34]
      #expect(onesComplementSum(ipHeader) == 0xFFFF, "IP header checksum of segment \(index)")
      #expect(Int(frame[16]) << 8 | Int(frame[17]) == frame.count - 14, "IP total length")
      #expect(UInt16(frame[18]) << 8 | UInt16(frame[19]) == 0x1234 &+ UInt16(index), "IP identification")
      let sequence = UInt32(frame[38]) << 24 | UInt32(frame[39]) << 16 | UInt32(frame[40]) << 8 | UInt32(frame[41])
      #expect(sequence == UInt32(index * 1000))
      let flags = frame[47]
      #expect(flags & 0x09 == (index == 3 ? 0x09 : 0), "FIN and PSH only on the last segment")
      let tcpLength = frame.count - 34
      let pseudoHeader = source + destination + [0, 6, UInt8(tcpLength >> 8), UInt8(tcpLength & 0xFF)]
      #expect(onesComplementSum(ArraySlice(pseudoHeader + frame[34...])) == 0xFFFF, "TCP checksum of segment \(index)")
    }
    #expect(reassembled == payload)
    #expect(waitUntil { driver.read(E1000.Register.tdh) == 3 })
    #expect(try memory.read(UInt8.self, at: 0x10000 + 2 * 16 + 12) & 1 == 1)
  }

  /// Checksum offload without TSO (as Linux sends a CHECKSUM_PARTIAL frame): the TCP/UDP
  /// checksum from TUCSS to the end, seeded by the field, lands at TUCSO.
  @Test func checksumOffloadInsertsTheTransportChecksum() throws {
    let driver = try E1000Driver()
    let memory = driver.memory
    driver.setUpTransmit(base: 0x10000, count: 8)
    let source: [UInt8] = [192, 168, 1, 1]
    let destination: [UInt8] = [192, 168, 1, 2]
    let data = (0..<33).map { UInt8($0 * 3) }
    let udpLength = 8 + data.count
    let ipHeader: [UInt8] =
      [0x45, 0, 0, UInt8(20 + udpLength), 0, 1, 0, 0, 64, 17, 0, 0] + source + destination
    let pseudo = onesComplementSum(ArraySlice(source + destination + [0, 17, 0, UInt8(udpLength)]))
    let udp: [UInt8] = [0x10, 0x00, 0x20, 0x00, 0, UInt8(udpLength), UInt8(pseudo >> 8), UInt8(pseudo & 0xFF)]
    let frame = [0x02, 0, 0, 0, 0, 2] + E1000Driver.mac.array + [0x08, 0x00] + ipHeader + udp + data
    try memory.writeBytes(frame, at: 0x40000)
    try driver.putDescriptor(base: 0x10000, index: 0, 34 << 32 | 40 << 40, 0x20 << 24)
    try driver.putDescriptor(base: 0x10000, index: 1, 0x40000, UInt64(frame.count) | 1 << 20 | 0x29 << 24 | 0x2 << 40)
    driver.write(E1000.Register.tdt, 2)
    let sent = try #require(driver.backend.sentFrames(count: 1).first)
    let pseudoHeader = source + destination + [0, 17, 0, UInt8(udpLength)]
    #expect(onesComplementSum(ArraySlice(pseudoHeader + sent[34...])) == 0xFFFF)
    #expect(sent[..<40] == frame[..<40] && sent[42...] == frame[42...])
  }

  /// TCP segmentation whose IPv4 segments would not fit the 16-bit total length (IPCSS 0, MSS
  /// 65536 - HDRLEN, a 70,000-byte packet) drops the packet instead of trapping on the
  /// device's worker thread; the device then sends the next frame (found with the `nics` fuzz
  /// target).
  @Test func segmentationBeyondTheIPv4LengthFieldIsDropped() throws {
    let driver = try E1000Driver()
    let memory = driver.memory
    driver.setUpTransmit(base: 0x10000, count: 16)
    // Context: IPCSS 0, IPCSO 10, TUCSS 20, TUCSO 36; TSE|IP|TCP|DEXT, HDRLEN 54, MSS 65482.
    let contextLower: UInt64 = 0 | 10 << 8 | 20 << 32 | 36 << 40
    let contextUpper: UInt64 = 0x27 << 24 | 54 << 40 | UInt64(65536 - 54) << 48
    try driver.putDescriptor(base: 0x10000, index: 0, contextLower, contextUpper)
    // Data: 70,000 bytes, DTYP 1, DEXT|TSE|RS|EOP, POPTS IXSM|TXSM.
    try driver.putDescriptor(base: 0x10000, index: 1, 0x40000, 70_000 | 1 << 20 | 0x2D << 24 | 0x3 << 40)
    let frame: [UInt8] =
      [0x02, 0, 0, 0, 0, 1] + E1000Driver.mac.array + [0x08, 0x00] + [UInt8](repeating: 9, count: 50)
    try memory.writeBytes(frame, at: 0x30000)
    try driver.putDescriptor(base: 0x10000, index: 2, 0x30000, UInt64(frame.count) | 0x09 << 24)
    driver.write(E1000.Register.tdt, 3)
    #expect(driver.backend.sentFrames(count: 1) == [frame])
    #expect(driver.device.counters.values["tx_dropped"] == 1)
    #expect(driver.read(E1000.Register.tdh) == 3)
  }

  /// A hostile driver: rings outside RAM, head and tail outside the ring, descriptors with
  /// random addresses, lengths, commands and types, zero and huge lengths. The device must
  /// stay alive, write only inside guest RAM, and work again once programmed properly.
  @Test func hostileDriverNeverHurtsTheHost() throws {
    let driver = try E1000Driver(memorySize: 4 << 20)
    let memory = driver.memory
    var generator = SystemRandomNumberGenerator()
    // A ring beyond the end of RAM, and one straddling it.
    for base: UInt64 in [0xFFFF_FFFF_0000, 4 << 20, (4 << 20) - 64] {
      driver.setUpTransmit(base: base, count: 8)
      driver.write(E1000.Register.tdt, 5)
      try driver.setUpReceive(base: 0x20000, count: 4, buffers: 0x100000)
      driver.write(E1000.Register.rdbal, UInt32(truncatingIfNeeded: base))
      driver.write(E1000.Register.rdbah, UInt32(truncatingIfNeeded: base >> 32))
      driver.backend.inject(E1000Driver.mac.array + [UInt8](repeating: 1, count: 60))
      usleep(20_000)
      #expect(driver.read(E1000.Register.tdh) == 0)
      #expect(driver.read(E1000.Register.rdh) == 0)
    }
    // Head and tail beyond the ring length; a zero-length ring.
    driver.setUpTransmit(base: 0x10000, count: 4)
    driver.write(E1000.Register.tdt, 9)
    driver.write(E1000.Register.tdlen, 0)
    driver.write(E1000.Register.tdt, 1)
    usleep(20_000)
    #expect(driver.read(E1000.Register.tdh) == 0)

    // Random descriptors, rounds of them, with random tails, on both rings.
    let ringCount = 64
    for round in 0..<40 {
      driver.setUpTransmit(base: 0x10000, count: ringCount)
      for index in 0..<ringCount {
        let address: UInt64 =
          switch index % 4 {
          case 0: UInt64.random(in: 0..<(5 << 20), using: &generator)
          case 1: UInt64.random(in: 0...UInt64.max, using: &generator)
          case 2: (4 << 20) - UInt64.random(in: 0..<4096, using: &generator)
          default: 0x50000
          }
        let length: UInt64 = [0, 1, 14, 60, 0xFFFF, 0xF_FFFF, UInt64.random(in: 0..<4096, using: &generator)][
          index % 7]
        var upper = UInt64.random(in: 0...UInt64.max, using: &generator) & ~0xF_FFFF | length
        if index % 5 == 0 { upper = upper & ~(0xF << 20) | 1 << 20 | 0x2C << 24 }  // TSO data
        let lower = index % 9 == 0 ? UInt64.random(in: 0...UInt64.max, using: &generator) : address
        try driver.putDescriptor(base: 0x10000, index: index, lower, upper)
      }
      driver.write(E1000.Register.tdt, UInt32.random(in: 0..<UInt32(ringCount), using: &generator))
      // Receive: random buffer addresses and random buffer sizes.
      let bufferSize: UInt32 = UInt32.random(in: 0...3, using: &generator) << 16
      let extended: UInt32 = round % 2 == 0 ? 1 << 25 : 0
      // Enabled, broadcast, unicast promiscuous, long packets, random buffer size.
      let control: UInt32 = 0x2 | 1 << 15 | 1 << 3 | 1 << 5 | bufferSize | extended
      try driver.setUpReceive(base: 0x20000, count: 16, buffers: 0x100000, control: control)
      for index in 0..<16 where index % 2 == 1 {
        try memory.write(UInt64.random(in: 0...UInt64.max, using: &generator), at: 0x20000 + UInt64(index) * 16)
      }
      try memory.write(UInt64((4 << 20) - 100), at: 0x20000 + 2 * 16)
      for _ in 0..<4 {
        let size = [14, 60, 1514, 9000, 40_000].randomElement(using: &generator)!
        driver.backend.inject((0..<size).map { _ in UInt8.random(in: 0...255, using: &generator) })
      }
      driver.write(E1000.Register.rdt, UInt32.random(in: 0..<16, using: &generator))
      usleep(5_000)
    }
    _ = driver.backend.sentFrames(count: Int.max, seconds: 0.5)

    // Programmed properly again, the device works.
    driver.write(E1000.Register.ctrl, 1 << 26)
    driver.setUpTransmit(base: 0x10000, count: 8)
    let frame: [UInt8] =
      [0x02, 0, 0, 0, 0, 1] + E1000Driver.mac.array + [0x08, 0x00] + [UInt8](repeating: 7, count: 50)
    try memory.writeBytes(frame, at: 0x30000)
    try driver.putDescriptor(base: 0x10000, index: 0, 0x30000, UInt64(frame.count) | 0x09 << 24)
    driver.write(E1000.Register.tdt, 1)
    #expect(driver.backend.sentFrames(count: 1) == [frame])
  }
}
