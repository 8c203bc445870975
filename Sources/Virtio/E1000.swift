import Glibc
import PCI
import Synchronization
import VMCore

/// An emulated Intel 82540EM Gigabit Ethernet controller ("e1000", PCI 8086:100E), modelled on
/// Intel's "PCI/PCI-X Family of Gigabit Ethernet Controllers Software Developer's Manual"
/// (8254x), on the same `NetworkBackend`s as virtio-net (a TAP, user networking).
///
/// - BAR 0: the 128 KiB register file; BAR 1: 64 I/O ports with IOADDR (0x0) and IODATA (0x4)
///   reaching the same registers (Linux resets the 82540 through them).
/// - A 64-word Microwire EEPROM, read by bit-banging EECD or through EERD: the MAC address,
///   the IDs and a checksum making words 0x00-0x3F sum to 0xBABA.
/// - A Marvell 88E1011-like PHY behind MDIC at PHY address 1, always linked at 1000 Mb/s full
///   duplex after auto-negotiation.
/// - Interrupts on INTx#: ICR (read-to-clear, or write-1-to-clear), ICS, IMS, IMC. The delay
///   timers (RDTR, RADV, TIDV, TADV) and the throttling register (ITR) are kept but not
///   honoured: every cause is signalled at once.
/// - Receive: legacy descriptors, buffer sizes from RCTL.BSIZE/BSEX, frames spanning several
///   buffers, the exact (RAL/RAH) and multicast-table (MTA, RCTL.MO) filters, promiscuous
///   modes, broadcast (RCTL.BAM), VLAN tag stripping (CTRL.VME), the Ethernet CRC appended
///   unless RCTL.SECRC strips it, long frames only with RCTL.LPE.
/// - Transmit: legacy descriptors (with their checksum insertion) and the extended context and
///   data descriptors: IP and TCP/UDP checksum insertion and TCP segmentation (TSO), both done
///   in software so that any backend takes the resulting frames; VLAN tag insertion.
/// - Statistics registers (0x4000-0x40FF) read-to-clear; the good packet and octet counters
///   count.
///
/// The guest is untrusted: every descriptor ring and buffer address is checked against guest
/// RAM before use. A ring outside RAM (or head/tail registers outside the ring) stops that
/// direction until the driver programs it again; a buffer outside RAM drops the packet, and
/// its descriptor still completes. Packets longer than 256 KiB are dropped without copying.
public final class E1000: PCIDevice, CountingDevice {
  /// The PCI identity of the 82540EM (desktop adapter, subsystem 8086:001E).
  public static let identity = PCIIdentity(
    vendorID: 0x8086, deviceID: 0x100E, revisionID: 0x03, classCode: (0x02, 0x00, 0x00),
    subsystemVendorID: 0x8086, subsystemID: 0x001E)
  /// Size of the register BAR.
  public static let registerBARSize: UInt64 = 128 << 10
  /// Size of the I/O BAR (IOADDR, IODATA and reserved ports).
  public static let ioBARSize: UInt64 = 64
  /// The largest packet (all descriptors up to EOP) the device assembles for transmission.
  public static let maximumTransmitPacket = 256 << 10
  /// The largest frame taken from the backend (a 64 KiB frame, VLAN tag and CRC included).
  static let maximumReceiveFrame = 65536 + 22

  /// Register offsets in BAR 0.
  public enum Register {
    public static let ctrl = 0x0000
    public static let status = 0x0008
    public static let eecd = 0x0010
    public static let eerd = 0x0014
    public static let ctrlExt = 0x0018
    public static let mdic = 0x0020
    public static let vet = 0x0038
    public static let icr = 0x00C0
    public static let itr = 0x00C4
    public static let ics = 0x00C8
    public static let ims = 0x00D0
    public static let imc = 0x00D8
    public static let rctl = 0x0100
    public static let tctl = 0x0400
    public static let rdbal = 0x2800
    public static let rdbah = 0x2804
    public static let rdlen = 0x2808
    public static let rdh = 0x2810
    public static let rdt = 0x2818
    public static let tdbal = 0x3800
    public static let tdbah = 0x3804
    public static let tdlen = 0x3808
    public static let tdh = 0x3810
    public static let tdt = 0x3818
    public static let statisticsStart = 0x4000
    public static let statisticsEnd = 0x4100
    public static let mta = 0x5200
    public static let ral0 = 0x5400
    public static let rah0 = 0x5404
    /// Good packets received / transmitted, good octets received / transmitted (low dwords).
    public static let gprc = 0x4074
    public static let gptc = 0x4080
    public static let gorcl = 0x4088
    public static let gotcl = 0x4090
    public static let tpr = 0x40D0
    public static let tpt = 0x40D4
  }

  /// Interrupt cause bits (ICR, ICS, IMS, IMC).
  public enum Interrupt {
    public static let transmitDescriptorWritten: UInt32 = 1 << 0
    public static let transmitQueueEmpty: UInt32 = 1 << 1
    public static let linkStatusChange: UInt32 = 1 << 2
    public static let receiveDescriptorMinimum: UInt32 = 1 << 4
    public static let receiveOverrun: UInt32 = 1 << 6
    public static let receiveTimer: UInt32 = 1 << 7
    public static let mdioAccessComplete: UInt32 = 1 << 9
  }

  enum Control {
    static let fullDuplex: UInt32 = 1 << 0
    static let setLinkUp: UInt32 = 1 << 6
    static let speed1000: UInt32 = 2 << 8
    static let reset: UInt32 = 1 << 26
    static let vlanMode: UInt32 = 1 << 30
    static let phyReset: UInt32 = 1 << 31
  }

  enum EECD {
    static let clock: UInt32 = 1 << 0
    static let chipSelect: UInt32 = 1 << 1
    static let dataIn: UInt32 = 1 << 2
    static let dataOut: UInt32 = 1 << 3
    static let request: UInt32 = 1 << 6
    static let grant: UInt32 = 1 << 7
    static let present: UInt32 = 1 << 8
    /// What the driver may set (clock, chip select, data in, flash write enable, request).
    static let writable: UInt32 = 0x77
  }

  enum ReceiveControl {
    static let enable: UInt32 = 1 << 1
    static let unicastPromiscuous: UInt32 = 1 << 3
    static let multicastPromiscuous: UInt32 = 1 << 4
    static let longPackets: UInt32 = 1 << 5
    static let broadcastAccept: UInt32 = 1 << 15
    static let bufferSizeExtension: UInt32 = 1 << 25
    static let stripCRC: UInt32 = 1 << 26
  }

  enum TransmitCommand {
    static let endOfPacket: UInt8 = 0x01
    static let insertChecksum: UInt8 = 0x04
    static let segmentation: UInt8 = 0x04
    static let reportStatus: UInt8 = 0x08
    static let extended: UInt8 = 0x20
    static let vlan: UInt8 = 0x40
  }

  enum ReceiveStatus {
    static let done: UInt8 = 0x01
    static let endOfPacket: UInt8 = 0x02
    static let ignoreChecksum: UInt8 = 0x04
    static let vlanPacket: UInt8 = 0x08
  }

  /// The offload fields of the last context descriptor.
  struct TransmitContext {
    var ipStart = 0
    var ipOffset = 0
    var ipEnd = 0
    var l4Start = 0
    var l4Offset = 0
    var l4End = 0
    var isTCP = false
    var isIPv4 = false
    var headerLength = 0
    var segmentSize = 0
  }

  /// The transmit packet being assembled from data descriptors up to EOP.
  struct TransmitPacket {
    var length = 0
    var descriptors = 0
    var dropped = false
    var options: UInt8 = 0
    var segmentation = false
    var legacy = false
  }

  struct State {
    var registers = [UInt32](repeating: 0, count: Int(E1000.registerBARSize) / 4)
    var eeprom = MicrowireEEPROM(words: [UInt16](repeating: 0, count: 64))
    var phy = [UInt16](repeating: 0, count: 32)
    var ioAddress: UInt32 = 0
    var context = TransmitContext()
    var packet = TransmitPacket()
    var interruptAsserted = false
    var transmitBuffer: UnsafeMutableRawBufferPointer
    var segmentBuffer: UnsafeMutableRawBufferPointer
    var receiveBuffer: UnsafeMutableRawBufferPointer
    /// Bytes (header included) of the received frame waiting for descriptors, 0 when none.
    var pendingReceive = 0
    var vectors: [iovec] = []

    subscript(_ offset: Int) -> UInt32 {
      get { registers[offset >> 2] }
      set { registers[offset >> 2] = newValue }
    }
  }

  public let config: PCIConfigSpace
  /// The device's MAC address (in the EEPROM and receive address 0 after reset).
  public let mac: MACAddress
  /// The host side.
  public let backend: any NetworkBackend
  /// Frames and bytes moved: `rx_frames`, `rx_bytes`, `tx_frames`, `tx_bytes`, `tx_dropped`
  /// (packets the backend refused or that were malformed, too long or outside RAM),
  /// `rx_dropped` (frames too long for the receive settings).
  public let counters = DeviceCounters(["rx_frames", "rx_bytes", "tx_frames", "tx_bytes", "tx_dropped", "rx_dropped"])
  private let memory: GuestMemory
  private let state: Mutex<State>
  private let interruptPin = Mutex<PCIInterruptPin?>(nil)
  private let wantsInput = Atomic<Bool>(false)
  private let worker: DeviceWorker
  private static let vnetHeaderSize = 12
  private static let zeroHeader = [UInt8](repeating: 0, count: 12)

  /// An 82540EM on `backend` with address `mac` (random 52:54:00:xx:xx:xx by default) doing
  /// DMA in `memory`. Attach the result to a `PCIBus`.
  public init(backend: any NetworkBackend, mac: MACAddress? = nil, memory: GuestMemory) {
    self.backend = backend
    self.mac = mac ?? .random()
    self.memory = memory
    config = PCIConfigSpace(identity: Self.identity, interruptPin: 1)
    config.addBAR(PCIBARDefinition(index: 0, size: Self.registerBARSize, kind: .memory32(prefetchable: false)))
    config.addBAR(PCIBARDefinition(index: 1, size: Self.ioBARSize, kind: .io))
    var initial = State(
      transmitBuffer: .allocate(byteCount: Self.maximumTransmitPacket, alignment: 16),
      segmentBuffer: .allocate(byteCount: 65536 + 4, alignment: 16),
      receiveBuffer: .allocate(byteCount: Self.vnetHeaderSize + Self.maximumReceiveFrame + 4, alignment: 16))
    initial.vectors.reserveCapacity(4)
    initial.eeprom = MicrowireEEPROM(words: Self.eepromContents(mac: self.mac))
    state = Mutex(initial)
    let link = WeakLink<E1000>()
    worker = DeviceWorker(
      name: "e1000", backendFD: backend.pollDescriptor, wantsBackend: { link.target?.shouldPoll ?? false },
      wantsOutput: { [backend] in backend.hasPendingOutput }
    ) { _ in link.target?.process() }
    link.target = self
    state.withLock { Self.reset(&$0, mac: self.mac) }
  }

  deinit {
    worker.stop()
    state.withLock { state in
      state.transmitBuffer.deallocate()
      state.segmentBuffer.deallocate()
      state.receiveBuffer.deallocate()
    }
  }

  fileprivate var shouldPoll: Bool { wantsInput.load(ordering: .acquiring) }

  /// Stops the device's worker thread.
  public func shutdown() { worker.stop() }

  /// The EEPROM image: MAC address (words 0-2), LED defaults (word 4), initialization control
  /// words (0x0A, 0x0F), subsystem and device IDs (0x0B-0x0E), and the checksum word 0x3F
  /// that makes words 0x00-0x3F sum to 0xBABA.
  static func eepromContents(mac: MACAddress) -> [UInt16] {
    var words = [UInt16](repeating: 0, count: 64)
    let bytes = mac.array
    for index in 0..<3 { words[index] = UInt16(bytes[2 * index]) | UInt16(bytes[2 * index + 1]) << 8 }
    words[0x04] = 0xFFFF  // ID LED settings: use the defaults
    words[0x0A] = 0x4000  // Initialization Control 1: valid signature (bits 15:14 = 01b)
    words[0x0B] = identity.subsystemID
    words[0x0C] = identity.subsystemVendorID
    words[0x0D] = identity.deviceID
    words[0x0E] = identity.vendorID
    words[0x0F] = 0x0000  // Initialization Control 2: no PAUSE advertised
    let sum = words[0..<0x3F].reduce(UInt16(0)) { $0 &+ $1 }
    words[0x3F] = 0xBABA &- sum
    return words
  }

  /// The power-on (and CTRL.RST) state of the registers and the PHY.
  private static func reset(_ state: inout State, mac: MACAddress) {
    for index in state.registers.indices { state.registers[index] = 0 }
    state[Register.ctrl] = Control.fullDuplex | Control.setLinkUp | Control.speed1000
    // STATUS: full duplex, link up, 1000 Mb/s (SPEED and ASDV).
    state[Register.status] = 0x1 | 0x2 | 0x80 | 0x200
    state[Register.mdic] = 1 << 28
    state[Register.vet] = 0x8100
    state[0x1000] = 0x30  // PBA: 48 KiB for receive
    let bytes = mac.array.map(UInt32.init)
    state[Register.ral0] = bytes[0] | bytes[1] << 8 | bytes[2] << 16 | bytes[3] << 24
    state[Register.rah0] = bytes[4] | bytes[5] << 8 | 1 << 31
    state.eeprom = MicrowireEEPROM(words: state.eeprom.words)  // the interface idle, clock low
    state.context = TransmitContext()
    state.packet = TransmitPacket()
    state.pendingReceive = 0
    resetPHY(&state)
  }

  private static func resetPHY(_ state: inout State) {
    for index in state.phy.indices { state.phy[index] = 0 }
    state.phy[0] = 0x1140  // auto-negotiation on, full duplex, 1000 Mb/s
    state.phy[1] = 0x796D  // link up, auto-negotiation complete, 10/100 abilities, extended status
    state.phy[2] = 0x0141  // Marvell OUI
    state.phy[3] = 0x0C20  // 88E1011, revision 0
    state.phy[4] = 0x01E1  // advertises 10/100 half and full
    state.phy[5] = 0x41E1  // link partner: the same, acknowledged
    state.phy[6] = 0x0001  // link partner can auto-negotiate
    state.phy[9] = 0x0300  // advertises 1000 half and full
    state.phy[10] = 0x3C00  // receivers OK, link partner 1000 half and full
    state.phy[15] = 0x3000  // 1000BASE-T half and full
    state.phy[17] = 0xAC00  // 1000 Mb/s, full duplex, resolved, link up
  }

  /// PHY registers the driver can only read.
  private static let readOnlyPHYRegisters: Set<Int> = [1, 2, 3, 5, 6, 10, 15, 17]

  // MARK: PCIDevice

  public func attached(_ attachment: PCIAttachment) {
    interruptPin.withLock { $0 = attachment.interruptPin }
    worker.start()
  }

  public func barRead(bar: Int, offset: UInt64, size: Int) -> UInt64 {
    if bar == 1 {
      guard offset < 8 else { return 0 }
      let value = state.withLock { state -> UInt32 in
        offset < 4 ? state.ioAddress : self.readRegister(&state, Int(state.ioAddress & 0x1FFFC))
      }
      return Self.extract(UInt64(value), byteOffset: Int(offset & 3), size: size)
    }
    guard bar == 0, offset < Self.registerBARSize else { return 0 }
    if size == 8 {
      return barRead(bar: 0, offset: offset, size: 4) | barRead(bar: 0, offset: offset + 4, size: 4) << 32
    }
    let aligned = Int(offset & ~3)
    let value = state.withLock { readRegister(&$0, aligned) }
    return Self.extract(UInt64(value), byteOffset: Int(offset & 3), size: size)
  }

  public func barWrite(bar: Int, offset: UInt64, size: Int, value: UInt64) {
    if bar == 1 {
      guard offset < 8 else { return }
      state.withLock { state in
        if offset < 4 {
          state.ioAddress = Self.merge(state.ioAddress, value, byteOffset: Int(offset), size: size)
        } else {
          let register = Int(state.ioAddress & 0x1FFFC)
          let merged = Self.merge(state[register], value, byteOffset: Int(offset & 3), size: size)
          writeRegister(&state, register, size < 4 ? merged : UInt32(truncatingIfNeeded: value))
        }
      }
      return
    }
    guard bar == 0, offset < Self.registerBARSize else { return }
    if size == 8 {
      barWrite(bar: 0, offset: offset, size: 4, value: value & 0xFFFF_FFFF)
      barWrite(bar: 0, offset: offset + 4, size: 4, value: value >> 32)
      return
    }
    let aligned = Int(offset & ~3)
    state.withLock { state in
      let full =
        size >= 4
        ? UInt32(truncatingIfNeeded: value)
        : Self.merge(state[aligned], value, byteOffset: Int(offset & 3), size: size)
      writeRegister(&state, aligned, full)
    }
  }

  private static func extract(_ value: UInt64, byteOffset: Int, size: Int) -> UInt64 {
    let shifted = value >> (8 * UInt64(byteOffset))
    return size >= 8 ? shifted : shifted & ((1 << (8 * UInt64(size))) - 1)
  }

  private static func merge(_ current: UInt32, _ value: UInt64, byteOffset: Int, size: Int) -> UInt32 {
    let width = min(size, 4 - byteOffset)
    guard width > 0 else { return current }
    let mask = UInt32(truncatingIfNeeded: ((UInt64(1) << (8 * UInt64(width))) - 1) << (8 * UInt64(byteOffset)))
    return (current & ~mask) | (UInt32(truncatingIfNeeded: value << (8 * UInt64(byteOffset))) & mask)
  }

  // MARK: Registers

  private func readRegister(_ state: inout State, _ offset: Int) -> UInt32 {
    switch offset {
    case Register.icr:
      let value = state[Register.icr]
      state[Register.icr] = 0
      updateInterrupt(&state)
      return value
    case Register.ics, Register.imc:
      return 0
    case Register.eecd:
      let stored = state[Register.eecd] & EECD.writable
      let grant = stored & EECD.request != 0 ? EECD.grant : 0
      return stored | grant | EECD.present | (state.eeprom.dataOut ? EECD.dataOut : 0)
    case Register.statisticsStart..<Register.statisticsEnd:
      let value = state[offset]
      state[offset] = 0
      return value
    default:
      return state[offset]
    }
  }

  private func writeRegister(_ state: inout State, _ offset: Int, _ value: UInt32) {
    switch offset {
    case Register.ctrl:
      if value & Control.reset != 0 {
        Self.reset(&state, mac: mac)
        wantsInput.store(false, ordering: .releasing)
        updateInterrupt(&state)
        return
      }
      if value & Control.phyReset != 0 && state[Register.ctrl] & Control.phyReset == 0 { Self.resetPHY(&state) }
      state[Register.ctrl] = value
    case Register.status:
      break
    case Register.eecd:
      state[Register.eecd] = value & EECD.writable
      state.eeprom.drive(
        chipSelect: value & EECD.chipSelect != 0, clock: value & EECD.clock != 0, dataIn: value & EECD.dataIn != 0)
    case Register.eerd:
      if value & 1 != 0 {
        let address = Int((value >> 8) & 0xFF)
        let word = address < state.eeprom.words.count ? UInt32(state.eeprom.words[address]) : 0
        state[Register.eerd] = word << 16 | UInt32(address) << 8 | 1 << 4
      }
    case Register.mdic:
      accessPHY(&state, value)
    case Register.icr:
      state[Register.icr] &= ~value
      updateInterrupt(&state)
    case Register.ics:
      state[Register.icr] |= value
      updateInterrupt(&state)
    case Register.ims:
      state[Register.ims] |= value
      updateInterrupt(&state)
    case Register.imc:
      state[Register.ims] &= ~value
      updateInterrupt(&state)
    case Register.rctl:
      state[Register.rctl] = value
      if value & ReceiveControl.enable != 0 {
        wantsInput.store(true, ordering: .releasing)
        worker.wake()
      } else {
        wantsInput.store(false, ordering: .releasing)
      }
    case Register.tctl:
      state[Register.tctl] = value
      worker.wake()
    case Register.rdbal, Register.tdbal:
      state[offset] = value & ~0xF
    case Register.rdlen, Register.tdlen:
      state[offset] = value & 0xF_FF80
    case Register.rdh, Register.tdh:
      state[offset] = value & 0xFFFF
    case Register.rdt:
      state[offset] = value & 0xFFFF
      if state[Register.rctl] & ReceiveControl.enable != 0 {
        wantsInput.store(true, ordering: .releasing)
        worker.wake()
      }
    case Register.tdt:
      state[offset] = value & 0xFFFF
      worker.wake()
    case Register.statisticsStart..<Register.statisticsEnd:
      break
    default:
      state[offset] = value
    }
  }

  /// An MDIC write: reads or writes a PHY register, then sets READY (and ERROR for a PHY
  /// address other than 1), and raises MDAC when the driver asked for an interrupt.
  private func accessPHY(_ state: inout State, _ value: UInt32) {
    let register = Int((value >> 16) & 0x1F)
    let phyAddress = (value >> 21) & 0x1F
    let operation = (value >> 26) & 0x3
    var result = value & 0x3FFF_FFFF
    if phyAddress != 1 {
      result |= 1 << 31
    } else if operation == 2 {
      result = (result & ~0xFFFF) | UInt32(state.phy[register])
    } else if operation == 1 {
      var data = UInt16(truncatingIfNeeded: value)
      if register == 0 {
        if data & 0x8000 != 0 {
          Self.resetPHY(&state)
          data &= ~0x8000
        }
        data &= ~0x0200  // restart auto-negotiation completes at once
        state.phy[0] = data
      } else if !Self.readOnlyPHYRegisters.contains(register) {
        state.phy[register] = data
      }
    }
    state[Register.mdic] = result | 1 << 28
    if value & (1 << 29) != 0 {
      state[Register.icr] |= Interrupt.mdioAccessComplete
      updateInterrupt(&state)
    }
  }

  private func updateInterrupt(_ state: inout State) {
    let asserted = state[Register.icr] & state[Register.ims] != 0
    guard asserted != state.interruptAsserted else { return }
    state.interruptAsserted = asserted
    interruptPin.withLock { $0 }?.set(asserted)
  }

  private static func addStatistic(_ state: inout State, _ offset: Int, _ amount: UInt64) {
    let low = UInt64(state[offset])
    let sum = low &+ amount
    state[offset] = UInt32(truncatingIfNeeded: sum)
    if offset == Register.gorcl || offset == Register.gotcl {
      state[offset + 4] = state[offset + 4] &+ UInt32(truncatingIfNeeded: sum >> 32)
    }
  }

  // MARK: Worker

  /// One pass of the worker: the backend's queued output, the transmit ring, then the receive
  /// ring. Internal so that a fuzz target can serve the device on its own thread.
  func process() {
    backend.flushPendingOutput()
    state.withLock { state in
      transmitAll(&state)
      receiveAll(&state)
    }
  }

  /// The base address and descriptor count of a ring, or nil when the ring is empty, its
  /// head or tail lies outside it, or it is not entirely in guest RAM.
  private func ring(_ state: State, base: Int, length: Int, head: Int, tail: Int) -> (UInt64, Int)? {
    let address = UInt64(state[base + 4]) << 32 | UInt64(state[base])
    let count = Int(state[length]) / 16
    guard count > 0, Int(state[head]) < count, Int(state[tail]) < count,
      memory.hostPointer(address, length: UInt64(count) * 16) != nil
    else { return nil }
    return (address, count)
  }

  // MARK: Transmit

  private func transmitAll(_ state: inout State) {
    guard state[Register.tctl] & 0x2 != 0,
      let (base, count) = ring(
        state, base: Register.tdbal, length: Register.tdlen, head: Register.tdh, tail: Register.tdt)
    else { return }
    var head = Int(state[Register.tdh])
    let tail = Int(state[Register.tdt])
    var wroteBack = false
    // Descriptors the backend cannot take yet stay in the ring (TDH stops short of TDT): the
    // worker polls the backend for writability while its queue is full and comes back here.
    while head != tail, backend.canTransmit {
      let address = base + UInt64(head) * 16
      guard let lower = try? memory.read(UInt64.self, at: address),
        let upper = try? memory.read(UInt64.self, at: address + 8)
      else { break }
      let command = UInt8(truncatingIfNeeded: upper >> 24)
      if command & TransmitCommand.extended != 0 {
        switch (upper >> 20) & 0xF {
        case 0: takeContext(&state, lower: lower, upper: upper)
        case 1: takeData(&state, lower: lower, upper: upper, command: command)
        default: break
        }
      } else {
        takeLegacy(&state, lower: lower, upper: upper, command: command)
      }
      if command & TransmitCommand.reportStatus != 0 {
        let status = UInt8(truncatingIfNeeded: upper >> 32) | 1
        try? memory.write(status, at: address + 12)
        wroteBack = true
      }
      head = (head + 1) % count
    }
    guard head != Int(state[Register.tdh]) else { return }
    state[Register.tdh] = UInt32(head)
    var causes: UInt32 = head == tail ? Interrupt.transmitQueueEmpty : 0
    if wroteBack { causes |= Interrupt.transmitDescriptorWritten }
    state[Register.icr] |= causes
    updateInterrupt(&state)
  }

  private func takeContext(_ state: inout State, lower: UInt64, upper: UInt64) {
    let command = UInt8(truncatingIfNeeded: upper >> 24)
    state.context = TransmitContext(
      ipStart: Int(lower & 0xFF), ipOffset: Int((lower >> 8) & 0xFF), ipEnd: Int((lower >> 16) & 0xFFFF),
      l4Start: Int((lower >> 32) & 0xFF), l4Offset: Int((lower >> 40) & 0xFF), l4End: Int((lower >> 48) & 0xFFFF),
      isTCP: command & 0x01 != 0, isIPv4: command & 0x02 != 0, headerLength: Int((upper >> 40) & 0xFF),
      segmentSize: Int((upper >> 48) & 0xFFFF))
  }

  private func takeData(_ state: inout State, lower: UInt64, upper: UInt64, command: UInt8) {
    if state.packet.descriptors == 0 {
      state.packet.options = UInt8(truncatingIfNeeded: upper >> 40)
      state.packet.segmentation = command & TransmitCommand.segmentation != 0
      state.packet.legacy = false
    }
    append(&state, address: lower, length: Int(upper & 0xF_FFFF))
    if command & TransmitCommand.endOfPacket != 0 {
      finishPacket(&state, vlan: command & TransmitCommand.vlan != 0 ? UInt16(truncatingIfNeeded: upper >> 48) : nil)
    }
  }

  private func takeLegacy(_ state: inout State, lower: UInt64, upper: UInt64, command: UInt8) {
    if state.packet.descriptors == 0 {
      state.packet.options = 0
      state.packet.segmentation = false
      state.packet.legacy = true
    }
    append(&state, address: lower, length: Int(upper & 0xFFFF))
    guard command & TransmitCommand.endOfPacket != 0 else { return }
    if command & TransmitCommand.insertChecksum != 0 && !state.packet.dropped {
      // CSO and CSS of the last descriptor: sum from CSS to the end, stored at CSO.
      let start = Int((upper >> 40) & 0xFF)
      let offset = Int((upper >> 16) & 0xFF)
      Self.insertChecksum(state.transmitBuffer, length: state.packet.length, start: start, end: 0, at: offset)
    }
    finishPacket(&state, vlan: command & TransmitCommand.vlan != 0 ? UInt16(truncatingIfNeeded: upper >> 48) : nil)
  }

  /// Copies one descriptor's buffer into the packet, or marks the packet dropped when the
  /// buffer is outside guest RAM or the packet grows too long.
  private func append(_ state: inout State, address: UInt64, length: Int) {
    state.packet.descriptors += 1
    guard length > 0, !state.packet.dropped else { return }
    guard state.packet.length + length <= Self.maximumTransmitPacket,
      let source = memory.hostPointer(address, length: UInt64(length))
    else {
      state.packet.dropped = true
      return
    }
    (state.transmitBuffer.baseAddress! + state.packet.length).copyMemory(from: source, byteCount: length)
    state.packet.length += length
  }

  private func finishPacket(_ state: inout State, vlan: UInt16?) {
    let packet = state.packet
    state.packet = TransmitPacket()
    guard !packet.dropped, packet.length >= 14 else {
      counters.add(["tx_dropped": 1])
      return
    }
    let tag = state[Register.ctrl] & Control.vlanMode != 0 ? vlan : nil
    if packet.segmentation && !packet.legacy {
      segment(&state, length: packet.length, options: packet.options, vlan: tag)
    } else {
      let frame = state.transmitBuffer
      if !packet.legacy {
        applyOffloads(frame, length: packet.length, options: packet.options, context: state.context)
      }
      send(&state, frame.baseAddress!, length: packet.length, vlan: tag)
    }
  }

  /// Inserts the checksums POPTS asks for (IXSM: the IP header's, TXSM: the TCP/UDP one) as
  /// the context describes them.
  private func applyOffloads(
    _ frame: UnsafeMutableRawBufferPointer, length: Int, options: UInt8, context: TransmitContext
  ) {
    if options & 0x01 != 0 {
      Self.insertChecksum(
        frame, length: length, start: context.ipStart, end: context.ipEnd, at: context.ipOffset, zeroFirst: true)
    }
    if options & 0x02 != 0 {
      Self.insertChecksum(frame, length: length, start: context.l4Start, end: context.l4End, at: context.l4Offset)
    }
  }

  /// TCP segmentation: the first HDRLEN bytes are the headers of every segment, the rest is
  /// cut into MSS-sized payloads; each segment gets its IP total (or IPv6 payload) length, IP
  /// identification, TCP sequence number and flags (FIN and PSH only on the last) or UDP
  /// length, then the checksums POPTS asks for (the TCP/UDP one adding the segment's length to
  /// the pseudo-header sum the driver left in the field).
  private func segment(_ state: inout State, length: Int, options: UInt8, vlan: UInt16?) {
    let context = state.context
    let header = context.headerLength
    let l4Minimum = context.isTCP ? 20 : 8
    // An IPv4 segment's total length (from IPCSS to its end) must fit the 16-bit field.
    guard header > 0, header < length, context.segmentSize > 0, context.segmentSize <= 65536 - header,
      context.ipStart + (context.isIPv4 ? 20 : 40) <= header, context.l4Start + l4Minimum <= header,
      context.l4Start > context.ipStart, !context.isIPv4 || header + context.segmentSize - context.ipStart <= 0xFFFF
    else {
      counters.add(["tx_dropped": 1])
      return
    }
    let source = state.transmitBuffer.baseAddress!
    let output = state.segmentBuffer
    let out = output.baseAddress!
    let payloadTotal = length - header
    let identification = Self.load16(source + context.ipStart + 4)
    let sequence = Self.load32(source + context.l4Start + 4)
    var offset = 0
    var index: UInt16 = 0
    while offset < payloadTotal {
      let payload = min(context.segmentSize, payloadTotal - offset)
      let segmentLength = header + payload
      out.copyMemory(from: source, byteCount: header)
      (out + header).copyMemory(from: source + header + offset, byteCount: payload)
      let last = offset + payload == payloadTotal
      if context.isIPv4 {
        Self.store16(out + context.ipStart + 2, UInt16(segmentLength - context.ipStart))
        Self.store16(out + context.ipStart + 4, identification &+ index)
      } else {
        Self.store16(out + context.ipStart + 4, UInt16(segmentLength - context.ipStart - 40))
      }
      let l4Length = segmentLength - context.l4Start
      if context.isTCP {
        Self.store32(out + context.l4Start + 4, sequence &+ UInt32(offset))
        if !last {
          out.storeBytes(
            of: out.load(fromByteOffset: context.l4Start + 13, as: UInt8.self) & ~0x09,
            toByteOffset: context.l4Start + 13, as: UInt8.self)
        }
      } else {
        Self.store16(out + context.l4Start + 4, UInt16(l4Length))
      }
      let segmentBytes = UnsafeMutableRawBufferPointer(start: out, count: segmentLength)
      if options & 0x01 != 0 {
        Self.insertChecksum(
          segmentBytes, length: segmentLength, start: context.ipStart, end: context.ipEnd, at: context.ipOffset,
          zeroFirst: true)
      }
      if options & 0x02 != 0 {
        Self.insertChecksum(
          segmentBytes, length: segmentLength, start: context.l4Start, end: 0, at: context.l4Offset,
          adding: UInt32(l4Length))
      }
      send(&state, out, length: segmentLength, vlan: vlan)
      offset += payload
      index &+= 1
    }
  }

  /// Hands one frame to the backend behind an all-zero vnet header, with an 802.1Q tag
  /// inserted after the addresses when `vlan` is set.
  private func send(_ state: inout State, _ frame: UnsafeMutableRawPointer, length: Int, vlan: UInt16?) {
    var tag: (UInt8, UInt8, UInt8, UInt8) = (0, 0, 0, 0)
    let etherType = UInt16(truncatingIfNeeded: state[Register.vet])
    if let vlan { tag = (UInt8(etherType >> 8), UInt8(etherType & 0xFF), UInt8(vlan >> 8), UInt8(vlan & 0xFF)) }
    let sent = Self.zeroHeader.withUnsafeBytes { header in
      withUnsafeMutableBytes(of: &tag) { tagBytes in
        state.vectors.removeAll(keepingCapacity: true)
        state.vectors.append(
          iovec(iov_base: UnsafeMutableRawPointer(mutating: header.baseAddress), iov_len: header.count))
        if vlan != nil {
          state.vectors.append(iovec(iov_base: frame, iov_len: 12))
          state.vectors.append(iovec(iov_base: tagBytes.baseAddress, iov_len: 4))
          state.vectors.append(iovec(iov_base: frame + 12, iov_len: length - 12))
        } else {
          state.vectors.append(iovec(iov_base: frame, iov_len: length))
        }
        return state.vectors.withUnsafeBufferPointer { backend.transmit($0) }
      }
    }
    if sent {
      counters.add(["tx_frames": 1, "tx_bytes": UInt64(length)])
      Self.addStatistic(&state, Register.gptc, 1)
      Self.addStatistic(&state, Register.tpt, 1)
      Self.addStatistic(&state, Register.gotcl, UInt64(length + 4))
    } else {
      counters.add(["tx_dropped": 1])
    }
  }

  // MARK: Receive

  private func receiveAll(_ state: inout State) {
    guard state[Register.rctl] & ReceiveControl.enable != 0 else {
      wantsInput.store(false, ordering: .releasing)
      return
    }
    let pass = receivePendingFrames(
      &state, pending: \.pendingReceive,
      buffer: UnsafeMutableRawBufferPointer(
        rebasing: state.receiveBuffer[0..<(Self.vnetHeaderSize + Self.maximumReceiveFrame)]),
      headerSize: Self.vnetHeaderSize, from: backend, wantsInput: wantsInput, deliver: deliver)
    // A kept frame waits for the driver to return descriptors (an RDT write).
    if pass.stalled { state[Register.icr] |= Interrupt.receiveOverrun }
    if pass.delivered { state[Register.icr] |= Interrupt.receiveTimer }
    if pass.stalled || pass.delivered { updateInterrupt(&state) }
  }

  /// Filters the pending frame, strips a VLAN tag (CTRL.VME), appends the CRC (unless
  /// RCTL.SECRC) and writes it into as many receive descriptors as it needs.
  private func deliver(_ state: inout State) -> FrameDelivery {
    let base = state.receiveBuffer.baseAddress!
    var frame = base + Self.vnetHeaderSize
    var length = state.pendingReceive - Self.vnetHeaderSize
    guard length >= 14, accepts(state, frame) else {
      state.pendingReceive = 0
      return .dropped
    }
    let control = state[Register.rctl]
    guard
      let (ringBase, count) = ring(
        state, base: Register.rdbal, length: Register.rdlen, head: Register.rdh, tail: Register.rdt)
    else {
      // A ring that is not programmed (or not in RAM) takes nothing.
      state.pendingReceive = 0
      counters.add(["rx_dropped": 1])
      return .dropped
    }
    let bufferSize = Self.receiveBufferSize(control)
    var special: UInt16 = 0
    var status = ReceiveStatus.ignoreChecksum
    let etherType = Self.load16(frame + 12)
    var stripped = false
    if state[Register.ctrl] & Control.vlanMode != 0 && etherType == UInt16(truncatingIfNeeded: state[Register.vet])
      && length >= 18
    {
      special = Self.load16(frame + 14)
      status |= ReceiveStatus.vlanPacket
      memmove(frame + 4, frame, 12)
      frame += 4
      length -= 4
      stripped = true
    }
    let withCRC = control & ReceiveControl.stripCRC == 0
    let total = length + (withCRC ? 4 : 0)
    let limit = control & ReceiveControl.longPackets != 0 ? 16384 : 1522
    guard total <= limit else {
      state.pendingReceive = 0
      counters.add(["rx_dropped": 1])
      return .dropped
    }
    let head = Int(state[Register.rdh])
    let tail = Int(state[Register.rdt])
    let available = (tail - head + count) % count
    let needed = (total + bufferSize - 1) / bufferSize
    guard needed <= available else {
      if stripped {
        // Put the tag back so the frame is delivered unchanged later.
        memmove(frame - 4, frame, 12)
        frame -= 4
      }
      return .noRoom
    }
    if withCRC {
      var crc = EthernetFrame.crc32(UnsafeRawBufferPointer(start: frame, count: length)).littleEndian
      withUnsafeBytes(of: &crc) { (frame + length).copyMemory(from: $0.baseAddress!, byteCount: 4) }
    }
    var index = head
    var written = 0
    while written < total {
      let chunk = min(bufferSize, total - written)
      let descriptor = ringBase + UInt64(index) * 16
      let bufferAddress = (try? memory.read(UInt64.self, at: descriptor)) ?? 0
      var errors: UInt8 = 0
      if let destination = memory.hostPointer(bufferAddress, length: UInt64(chunk)) {
        destination.copyMemory(from: frame + written, byteCount: chunk)
        memory.noteWrite(at: bufferAddress, length: UInt64(chunk))
      } else {
        errors = 0x80  // RXE: the data could not be placed
      }
      written += chunk
      let last = written == total
      let descriptorStatus = status | ReceiveStatus.done | (last ? ReceiveStatus.endOfPacket : 0)
      let upper =
        UInt64(chunk) | UInt64(descriptorStatus) << 32 | UInt64(errors) << 40 | UInt64(last ? special : 0) << 48
      try? memory.write(upper, at: descriptor + 8)
      index = (index + 1) % count
    }
    state[Register.rdh] = UInt32(index)
    state.pendingReceive = 0
    counters.add(["rx_frames": 1, "rx_bytes": UInt64(length)])
    Self.addStatistic(&state, Register.gprc, 1)
    Self.addStatistic(&state, Register.tpr, 1)
    Self.addStatistic(&state, Register.gorcl, UInt64(length + 4))
    // RXDMT0 when the free descriptors fall to the threshold RCTL.RDMTS sets (1/2, 1/4, 1/8).
    let free = (tail - index + count) % count
    let shift = 1 + Int((control >> 8) & 0x3)
    if free <= count >> min(shift, 3) { state[Register.icr] |= Interrupt.receiveDescriptorMinimum }
    return .delivered
  }

  /// The receive buffer size RCTL.BSIZE and RCTL.BSEX select.
  static func receiveBufferSize(_ control: UInt32) -> Int {
    let size = Int((control >> 16) & 0x3)
    if control & ReceiveControl.bufferSizeExtension != 0 {
      return [2048, 16384, 8192, 4096][size]  // 00b is reserved with BSEX: take 2048
    }
    return [2048, 1024, 512, 256][size]
  }

  /// Whether the destination address passes the filters: unicast promiscuous or an exact
  /// match in a valid receive address register; broadcast with BAM; multicast promiscuous
  /// or a set bit in the multicast table at the hash RCTL.MO selects.
  private func accepts(_ state: State, _ frame: UnsafeMutableRawPointer) -> Bool {
    let control = state[Register.rctl]
    let destination = UnsafeRawBufferPointer(start: frame, count: 6)
    if destination.allSatisfy({ $0 == 0xFF }) { return control & ReceiveControl.broadcastAccept != 0 }
    if destination[0] & 1 == 0 {
      if control & ReceiveControl.unicastPromiscuous != 0 { return true }
      let low =
        UInt32(destination[0]) | UInt32(destination[1]) << 8 | UInt32(destination[2]) << 16
        | UInt32(destination[3]) << 24
      let high = UInt32(destination[4]) | UInt32(destination[5]) << 8
      for entry in 0..<16 {
        let rah = state[Register.rah0 + 8 * entry]
        if rah & (1 << 31) != 0 && rah & 0xFFFF == high && state[Register.ral0 + 8 * entry] == low { return true }
      }
      return false
    }
    if control & ReceiveControl.multicastPromiscuous != 0 { return true }
    // MO selects destination bits 47:36, 46:35, 45:34 or 43:32 as the 12-bit hash.
    let shift = [4, 3, 2, 0][Int((control >> 12) & 0x3)]
    let hash = ((UInt32(destination[4]) >> shift) | (UInt32(destination[5]) << (8 - shift))) & 0xFFF
    return state[Register.mta + Int(hash >> 5) * 4] & (1 << (hash & 0x1F)) != 0
  }

  // MARK: Checksums and byte order

  /// Stores the ones' complement of the 16-bit ones' complement sum of bytes `start` through
  /// `end` (inclusive; 0 means the end of the frame) plus `adding` at `offset`. Nothing
  /// happens when the range or the field lies outside the frame.
  static func insertChecksum(
    _ frame: UnsafeMutableRawBufferPointer, length: Int, start: Int, end: Int, at offset: Int,
    zeroFirst: Bool = false, adding: UInt32 = 0
  ) {
    let stop = end == 0 ? length : min(end + 1, length)
    guard start < stop, offset + 2 <= length else { return }
    let base = frame.baseAddress!
    if zeroFirst { store16(base + offset, 0) }
    var sum = UInt64(adding)
    var index = start
    while index + 1 < stop {
      sum += UInt64(load16(base + index))
      index += 2
    }
    if index < stop { sum += UInt64(base.load(fromByteOffset: index, as: UInt8.self)) << 8 }
    while sum >> 16 != 0 { sum = (sum & 0xFFFF) + (sum >> 16) }
    store16(base + offset, ~UInt16(sum))
  }

  static func load16(_ pointer: UnsafeMutableRawPointer) -> UInt16 {
    UInt16(bigEndian: pointer.loadUnaligned(as: UInt16.self))
  }
  static func load32(_ pointer: UnsafeMutableRawPointer) -> UInt32 {
    UInt32(bigEndian: pointer.loadUnaligned(as: UInt32.self))
  }
  static func store16(_ pointer: UnsafeMutableRawPointer, _ value: UInt16) {
    pointer.storeBytes(of: value.bigEndian, as: UInt16.self)
  }
  static func store32(_ pointer: UnsafeMutableRawPointer, _ value: UInt32) {
    pointer.storeBytes(of: value.bigEndian, as: UInt32.self)
  }
}
