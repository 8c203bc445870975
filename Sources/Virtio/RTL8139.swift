import Glibc
import PCI
import Synchronization
import VMCore

/// An emulated Realtek RTL8139C Fast Ethernet controller (PCI 10EC:8139, revision 0x10, the
/// chip Linux drives with `8139too`), modelled on Realtek's RTL8139C(L) datasheet, on the same
/// `NetworkBackend`s as virtio-net (a TAP, user networking).
///
/// - BAR 0: the 256-byte register file in I/O space; BAR 1: the same registers in memory space.
/// - A 93C46 serial EEPROM (64 words) behind the 9346CR register: the ID word 0x8129, the PCI
///   IDs and the MAC address (words 7-9), which also loads into IDR0-5 at power-on and on an
///   auto-load command.
/// - Transmit: the four descriptors TSD0-3/TSAD0-3, used in turn; writing a descriptor's byte
///   count with OWN clear sends the frame at once (TOK, ISR.TOK); a frame outside RAM, empty or
///   longer than 1792 bytes is aborted (TABT, ISR.TER).
/// - Receive: the ring at RBSTART (8, 16, 32 or 64 KiB as RCR.RBLEN says), each frame behind a
///   4-byte header (status, length with the CRC) at a dword boundary, wrapping at the end of
///   the ring or, with RCR.WRAP, running past it; CAPR (the driver's read pointer, 16 behind)
///   and CBR (the device's write pointer); CR.BUFE. A frame that does not fit waits in the
///   backend until the driver frees room. Filters: RCR.AAP, APM (IDR0-5), AM (the 64-bit
///   multicast hash in MAR0-7), AB.
/// - IMR/ISR (write 1 to clear) on INTx#; an internal PHY always linked at 100 Mb/s full
///   duplex after auto-negotiation (BMCR, BMSR, ANAR, ANLPAR, ANER, MSR); CONFIG0-5 (writable
///   while 9346CR unlocks them); the TCTR timer; the missed-packet counter MPC.
///
/// The guest is untrusted: every DMA address is checked against guest RAM. A receive ring
/// outside RAM takes no frame and raises ISR.SERR; the ring offsets are taken modulo its size,
/// so nothing the driver writes makes the device write outside its ring (plus one frame past
/// its end with RCR.WRAP).
public final class RTL8139: PCIDevice, EmulatedNetworkDevice {
  /// The PCI identity of the RTL8139C (revision below 0x20: not the C+).
  public static let identity = PCIIdentity(
    vendorID: 0x10EC, deviceID: 0x8139, revisionID: 0x10, classCode: (0x02, 0x00, 0x00),
    subsystemVendorID: 0x10EC, subsystemID: 0x8139)
  /// Size of each BAR (the register file).
  public static let registerSize: UInt64 = 256
  /// The longest frame (without CRC) sent or received.
  public static let maximumFrame = 1792
  /// The hardware version bits of TCR for the RTL8139C (HWVERID_A 11101b, HWVERID_B 00b).
  public static let hardwareVersion: UInt32 = 0x7400_0000
  /// The receive buffer for backend frames: a 64 KiB frame behind its vnet header, so that
  /// oversized frames are read whole and dropped.
  static let backendFrameLimit = 65536
  private static let vnetHeaderSize = 12
  private static let zeroHeader = [UInt8](repeating: 0, count: 12)

  /// Register offsets (the same in both BARs).
  public enum Register {
    public static let idr0 = 0x00
    public static let mar0 = 0x08
    public static let tsd0 = 0x10
    public static let tsad0 = 0x20
    public static let rbstart = 0x30
    public static let command = 0x37
    public static let capr = 0x38
    public static let cbr = 0x3A
    public static let imr = 0x3C
    public static let isr = 0x3E
    public static let tcr = 0x40
    public static let rcr = 0x44
    public static let tctr = 0x48
    public static let mpc = 0x4C
    public static let cfg9346 = 0x50
    public static let config0 = 0x51
    public static let config1 = 0x52
    public static let timerInterrupt = 0x54
    public static let mediaStatus = 0x58
    public static let config3 = 0x59
    public static let config4 = 0x5A
    public static let multipleInterrupt = 0x5C
    public static let revision = 0x5E
    /// TSAD (offset 60h): the status of all four transmit descriptors.
    public static let transmitSummary = 0x60
    public static let bmcr = 0x62
    public static let bmsr = 0x64
    public static let anar = 0x66
    public static let anlpar = 0x68
    public static let aner = 0x6A
    public static let cscr = 0x74
    public static let config5 = 0xD8
  }

  /// ISR and IMR bits.
  public enum Interrupt {
    public static let receiveOK: UInt16 = 1 << 0
    public static let receiveError: UInt16 = 1 << 1
    public static let transmitOK: UInt16 = 1 << 2
    public static let transmitError: UInt16 = 1 << 3
    public static let receiveBufferOverflow: UInt16 = 1 << 4
    public static let linkChange: UInt16 = 1 << 5
    public static let receiveFIFOOverflow: UInt16 = 1 << 6
    public static let timeout: UInt16 = 1 << 14
    public static let systemError: UInt16 = 1 << 15
    /// The bits IMR and ISR hold.
    static let implemented: UInt16 = 0xE07F
  }

  /// Command register (CR) bits.
  public enum Command {
    public static let reset: UInt8 = 0x10
    public static let receiverEnable: UInt8 = 0x08
    public static let transmitterEnable: UInt8 = 0x04
    public static let bufferEmpty: UInt8 = 0x01
  }

  /// Transmit status (TSD0-3) bits.
  public enum TransmitStatus {
    public static let sizeMask: UInt32 = 0x1FFF
    public static let own: UInt32 = 1 << 13
    public static let ok: UInt32 = 1 << 15
    public static let earlyThreshold: UInt32 = 0x3F << 16
    public static let aborted: UInt32 = 1 << 30
  }

  /// Receive configuration (RCR) bits.
  public enum ReceiveConfiguration {
    public static let acceptAllPhysical: UInt32 = 1 << 0
    public static let acceptPhysicalMatch: UInt32 = 1 << 1
    public static let acceptMulticast: UInt32 = 1 << 2
    public static let acceptBroadcast: UInt32 = 1 << 3
    /// WRAP: a frame reaching the end of the ring continues past it instead of wrapping.
    public static let continuePastEnd: UInt32 = 1 << 7
  }

  /// The status word of a received frame's header.
  public enum ReceiveStatus {
    public static let ok: UInt16 = 1 << 0
    public static let broadcast: UInt16 = 1 << 13
    public static let physicalMatch: UInt16 = 1 << 14
    public static let multicast: UInt16 = 1 << 15
  }

  struct State {
    var bytes = [UInt8](repeating: 0, count: Int(RTL8139.registerSize))
    var eeprom: MicrowireEEPROM
    var nextTransmit = 0
    var interruptAsserted = false
    var timerStart: UInt64 = 0
    var receiveBuffer: UnsafeMutableRawBufferPointer
    /// Bytes (vnet header included) of the frame waiting for room in the ring, 0 when none.
    var pendingReceive = 0
    var vectors: [iovec] = []

    func byte(_ offset: Int) -> UInt8 { bytes[offset] }
    func word(_ offset: Int) -> UInt16 { UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8 }
    func dword(_ offset: Int) -> UInt32 { UInt32(word(offset)) | UInt32(word(offset + 2)) << 16 }
    mutating func setWord(_ offset: Int, _ value: UInt16) {
      bytes[offset] = UInt8(truncatingIfNeeded: value)
      bytes[offset + 1] = UInt8(truncatingIfNeeded: value >> 8)
    }
    mutating func setDword(_ offset: Int, _ value: UInt32) {
      setWord(offset, UInt16(truncatingIfNeeded: value))
      setWord(offset + 2, UInt16(truncatingIfNeeded: value >> 16))
    }
    var configurationUnlocked: Bool { bytes[RTL8139.Register.cfg9346] >> 6 == 0b11 }
  }

  public let config: PCIConfigSpace
  /// The MAC address in the EEPROM (IDR0-5 after power-on).
  public let mac: MACAddress
  /// The host side.
  public let backend: any NetworkBackend
  /// Frames and bytes moved: `rx_frames`, `rx_bytes`, `tx_frames`, `tx_bytes`, `tx_dropped`
  /// (frames the backend refused, and aborted descriptors), `rx_dropped` (frames too long, or
  /// lost to a receive ring outside RAM).
  public let counters = DeviceCounters(["rx_frames", "rx_bytes", "tx_frames", "tx_bytes", "tx_dropped", "rx_dropped"])
  public var modelDescription: String { "rtl8139 (RTL8139C)" }
  private let memory: GuestMemory
  private let state: Mutex<State>
  private let interruptPin = Mutex<PCIInterruptPin?>(nil)
  private let wantsInput = Atomic<Bool>(false)
  private let worker: DeviceWorker

  /// An RTL8139C on `backend` with address `mac` (random 52:54:00:xx:xx:xx by default) doing
  /// DMA in `memory`. Attach the result to a `PCIBus`.
  public init(backend: any NetworkBackend, mac: MACAddress? = nil, memory: GuestMemory) {
    self.backend = backend
    self.mac = mac ?? .random()
    self.memory = memory
    config = PCIConfigSpace(identity: Self.identity, interruptPin: 1)
    config.addBAR(PCIBARDefinition(index: 0, size: Self.registerSize, kind: .io))
    config.addBAR(PCIBARDefinition(index: 1, size: Self.registerSize, kind: .memory32(prefetchable: false)))
    var initial = State(
      eeprom: MicrowireEEPROM(words: Self.eepromContents(mac: self.mac)),
      receiveBuffer: .allocate(byteCount: Self.vnetHeaderSize + Self.backendFrameLimit + 64, alignment: 16))
    initial.vectors.reserveCapacity(2)
    state = Mutex(initial)
    let link = WeakLink<RTL8139>()
    worker = DeviceWorker(
      name: "rtl8139", backendFD: backend.pollDescriptor, wantsBackend: { link.target?.shouldPoll ?? false },
      wantsOutput: { [backend] in backend.hasPendingOutput }
    ) { _ in link.target?.process() }
    link.target = self
    state.withLock { Self.powerOn(&$0) }
  }

  deinit {
    worker.stop()
    state.withLock { $0.receiveBuffer.deallocate() }
  }

  fileprivate var shouldPoll: Bool { wantsInput.load(ordering: .acquiring) }

  /// Stops the device's worker thread.
  public func shutdown() { worker.stop() }

  /// The EEPROM image (93C46 layout of the RTL8139C): the ID word 0x8129, vendor, device,
  /// subsystem vendor and subsystem IDs (words 1-4), minimum grant and maximum latency
  /// (word 5), the revision (word 6), the MAC address (words 7-9, first byte low).
  static func eepromContents(mac: MACAddress) -> [UInt16] {
    var words = [UInt16](repeating: 0, count: 64)
    words[0] = 0x8129
    words[1] = identity.vendorID
    words[2] = identity.deviceID
    words[3] = identity.subsystemVendorID
    words[4] = identity.subsystemID
    words[5] = 0x4020
    words[6] = UInt16(identity.revisionID)
    let bytes = mac.array
    for index in 0..<3 { words[7 + index] = UInt16(bytes[2 * index]) | UInt16(bytes[2 * index + 1]) << 8 }
    return words
  }

  /// The power-on state: every register at its default, the MAC loaded from the EEPROM.
  private static func powerOn(_ state: inout State) {
    for index in state.bytes.indices { state.bytes[index] = 0 }
    loadAddressFromEEPROM(&state)
    state.setDword(Register.tcr, hardwareVersion)
    state.bytes[Register.config1] = 0x0C  // registers mapped in I/O and memory space
    state.bytes[Register.revision] = identity.revisionID
    resetPHY(&state)
    softwareReset(&state)
  }

  private static func loadAddressFromEEPROM(_ state: inout State) {
    for index in 0..<3 { state.setWord(Register.idr0 + 2 * index, state.eeprom.words[7 + index]) }
  }

  /// The internal PHY's registers: 100 Mb/s full duplex after auto-negotiation, link up.
  private static func resetPHY(_ state: inout State) {
    state.setWord(Register.bmcr, 0x3100)  // 100 Mb/s, auto-negotiation on, full duplex
    // 100BASE-TX full/half, 10BASE-T full/half, auto-negotiation complete, able, link up,
    // extended capabilities.
    state.setWord(Register.bmsr, 0x782D)
    state.setWord(Register.anar, 0x01E1)
    state.setWord(Register.anlpar, 0x41E1)  // the partner: the same abilities, acknowledged
    state.setWord(Register.aner, 0x0001)  // the partner can auto-negotiate
    state.bytes[Register.mediaStatus] = 0  // 100 Mb/s, link OK
  }

  /// CR.RST: transmitter and receiver off, the interrupt registers cleared, the transmit
  /// descriptors back to TSD0 and owned by the driver, the receive ring empty. IDR, MAR and the
  /// configuration registers keep their values.
  private static func softwareReset(_ state: inout State) {
    state.bytes[Register.command] = 0
    state.setWord(Register.imr, 0)
    state.setWord(Register.isr, 0)
    for index in 0..<4 { state.setDword(Register.tsd0 + 4 * index, TransmitStatus.own) }
    state.nextTransmit = 0
    state.setWord(Register.capr, 0xFFF0)
    state.setWord(Register.cbr, 0)
    state.pendingReceive = 0
    state.timerStart = monotonicNanoseconds()
  }

  private static func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) &* 1_000_000_000 &+ UInt64(now.tv_nsec)
  }

  // MARK: PCIDevice

  public func attached(_ attachment: PCIAttachment) {
    interruptPin.withLock { $0 = attachment.interruptPin }
    worker.start()
  }

  public func barRead(bar: Int, offset: UInt64, size: Int) -> UInt64 {
    guard bar == 0 || bar == 1, offset < Self.registerSize else { return 0 }
    let start = Int(offset)
    let end = min(start + min(size, 8), Int(Self.registerSize))
    return state.withLock { state in
      var value: UInt64 = 0
      for index in start..<end { value |= UInt64(readByte(state, index)) << (8 * UInt64(index - start)) }
      return value
    }
  }

  public func barWrite(bar: Int, offset: UInt64, size: Int, value: UInt64) {
    guard bar == 0 || bar == 1, offset < Self.registerSize else { return }
    let start = Int(offset)
    let end = min(start + min(size, 8), Int(Self.registerSize))
    state.withLock { state in
      for index in start..<end {
        writeByte(&state, index, UInt8(truncatingIfNeeded: value >> (8 * UInt64(index - start))))
      }
      afterWrite(&state, start..<end)
    }
  }

  // MARK: Registers

  private func readByte(_ state: State, _ offset: Int) -> UInt8 {
    switch offset {
    case Register.command:
      return state.bytes[offset] & (Command.receiverEnable | Command.transmitterEnable)
        | (Self.ringIsEmpty(state) ? Command.bufferEmpty : 0)
    case Register.tctr..<(Register.tctr + 4):
      // A 32-bit counter at the 33 MHz PCI clock since the last write (or reset).
      let ticks = (Self.monotonicNanoseconds() &- state.timerStart) / 30
      return UInt8(truncatingIfNeeded: ticks >> (8 * UInt64(offset - Register.tctr)))
    case Register.cfg9346:
      let programming = state.bytes[offset] >> 6 == 0b10
      return state.bytes[offset] | (programming && state.eeprom.dataOut ? 0x01 : 0)
    case Register.transmitSummary, Register.transmitSummary + 1:
      let summary = Self.transmitSummary(state)
      return UInt8(truncatingIfNeeded: offset == Register.transmitSummary ? summary : summary >> 8)
    default:
      return state.bytes[offset]
    }
  }

  /// TSAD: TOK3-0 (bits 15-12), TUN3-0 (11-8), TABT3-0 (7-4), OWN3-0 (3-0).
  private static func transmitSummary(_ state: State) -> UInt16 {
    var summary: UInt16 = 0
    for index in 0..<4 {
      let status = state.dword(Register.tsd0 + 4 * index)
      if status & TransmitStatus.ok != 0 { summary |= 1 << (12 + index) }
      if status & (1 << 14) != 0 { summary |= 1 << (8 + index) }
      if status & TransmitStatus.aborted != 0 { summary |= 1 << (4 + index) }
      if status & TransmitStatus.own != 0 { summary |= 1 << index }
    }
    return summary
  }

  /// The writable bits of TCR, byte by byte (the hardware version bits are read-only; CLRABT
  /// reads back as zero).
  private static let transmitConfigurationMask: [UInt8] = [0xF1, 0x07, 0x07, 0x03]

  /// Stores one byte of a register write, honouring read-only and write-1-to-clear bits; the
  /// effects of whole registers follow in `afterWrite`.
  private func writeByte(_ state: inout State, _ offset: Int, _ value: UInt8) {
    switch offset {
    case 0x34...0x36, Register.cbr, Register.cbr + 1, Register.config0, Register.mediaStatus,
      Register.revision, Register.revision + 1, Register.transmitSummary, Register.transmitSummary + 1,
      Register.bmsr, Register.bmsr + 1, Register.anlpar..<(Register.aner + 2), 0x6C...0x6F, 0x72, 0x73:
      break  // read-only
    case Register.command:
      state.bytes[offset] = value & (Command.reset | Command.receiverEnable | Command.transmitterEnable)
    case Register.isr, Register.isr + 1:
      state.bytes[offset] &= ~value
    case Register.imr:
      state.bytes[offset] = value & UInt8(Interrupt.implemented & 0xFF)
    case Register.imr + 1:
      state.bytes[offset] = value & UInt8(Interrupt.implemented >> 8)
    case Register.tcr..<(Register.tcr + 4):
      let mask = Self.transmitConfigurationMask[offset - Register.tcr]
      state.bytes[offset] = (state.bytes[offset] & ~mask) | (value & mask)
    case Register.tctr..<(Register.tctr + 4), Register.mpc..<(Register.mpc + 4):
      break  // any write restarts the timer or clears the counter (afterWrite)
    case Register.cfg9346:
      state.bytes[offset] = value & 0xCE  // EEM1-0, EECS, EESK, EEDI; EEDO is the EEPROM's
    case Register.config1, Register.config3, Register.config4, Register.config5:
      if state.configurationUnlocked { state.bytes[offset] = value }
    default:
      state.bytes[offset] = value
    }
  }

  private func afterWrite(_ state: inout State, _ range: Range<Int>) {
    func touches(_ register: Int, _ width: Int) -> Bool { range.overlaps(register..<(register + width)) }
    if touches(Register.command, 1) {
      if state.bytes[Register.command] & Command.reset != 0 {
        Self.softwareReset(&state)
        wantsInput.store(false, ordering: .releasing)
        updateInterrupt(&state)
        return
      }
      if state.bytes[Register.command] & Command.receiverEnable != 0 {
        wantsInput.store(true, ordering: .releasing)
        worker.wake()
      } else {
        wantsInput.store(false, ordering: .releasing)
      }
    }
    var startTransmit = touches(Register.command, 1)
    for index in 0..<4 where touches(Register.tsd0 + 4 * index, 4) {
      // Writing the byte count clears the status bits; OWN clear hands the frame to the device.
      let written = state.dword(Register.tsd0 + 4 * index)
      let status = written & (TransmitStatus.sizeMask | TransmitStatus.own | TransmitStatus.earlyThreshold)
      state.setDword(Register.tsd0 + 4 * index, status)
      if status & TransmitStatus.own == 0 { startTransmit = true }
    }
    if startTransmit { transmitPending(&state) }
    if touches(Register.capr, 2) && state.pendingReceive != 0 {
      wantsInput.store(true, ordering: .releasing)
      worker.wake()
    }
    if touches(Register.rcr, 4) && state.bytes[Register.command] & Command.receiverEnable != 0 {
      wantsInput.store(true, ordering: .releasing)
      worker.wake()
    }
    if touches(Register.tcr, 1) { state.bytes[Register.tcr] &= ~0x01 }  // CLRABT: nothing to retry
    if touches(Register.tctr, 4) { state.timerStart = Self.monotonicNanoseconds() }
    if touches(Register.mpc, 4) { state.setDword(Register.mpc, 0) }
    if touches(Register.cfg9346, 1) {
      let control = state.bytes[Register.cfg9346]
      switch control >> 6 {
      case 0b01:
        // Auto-load: the EEPROM's address into IDR0-5, then back to normal mode.
        Self.loadAddressFromEEPROM(&state)
        state.bytes[Register.cfg9346] = control & 0x3F
        state.eeprom.drive(chipSelect: false, clock: false, dataIn: false)
      case 0b10:
        state.eeprom.drive(chipSelect: control & 0x08 != 0, clock: control & 0x04 != 0, dataIn: control & 0x02 != 0)
      default:
        state.eeprom.drive(chipSelect: false, clock: false, dataIn: false)
      }
    }
    if touches(Register.bmcr, 2) {
      var control = state.word(Register.bmcr)
      if control & 0x8000 != 0 {
        Self.resetPHY(&state)
        control = state.word(Register.bmcr)
      }
      state.setWord(Register.bmcr, control & ~0x0200)  // restart auto-negotiation completes at once
    }
    if touches(Register.isr, 2) && state.bytes[Register.command] & Command.receiverEnable != 0
      && !Self.ringIsEmpty(state)
    {
      // Frames the driver has not taken are still in the ring: ROK stays set. 8139too clears
      // ROK after each frame and, when its NAPI budget runs out, looks at the ring again only
      // if ROK is set; a device that filled the ring meanwhile (frames from the backend wait
      // for room, and the peer waits for the guest's ACKs) would otherwise never interrupt
      // again. A chip on a wire is rescued by the next packet or RXOVW.
      state.setWord(Register.isr, state.word(Register.isr) | Interrupt.receiveOK)
    }
    if touches(Register.imr, 2) || touches(Register.isr, 2) { updateInterrupt(&state) }
  }

  private func raise(_ state: inout State, _ causes: UInt16) {
    state.setWord(Register.isr, state.word(Register.isr) | causes)
    updateInterrupt(&state)
  }

  private func updateInterrupt(_ state: inout State) {
    let asserted = state.word(Register.isr) & state.word(Register.imr) != 0
    guard asserted != state.interruptAsserted else { return }
    state.interruptAsserted = asserted
    interruptPin.withLock { $0 }?.set(asserted)
  }

  // MARK: Transmit

  /// Sends the descriptors the driver handed over, in turn from the current one, while the
  /// transmitter is enabled: TOK and OWN on each sent frame, TABT and OWN on one that is empty,
  /// longer than 1792 bytes or not in RAM. A descriptor the backend cannot take yet
  /// (`NetworkBackend.canTransmit`) keeps its OWN bit clear until the worker, polling the
  /// backend for writability, comes back here (`inWorker`); called on the vCPU's TSD write, it
  /// wakes the worker for what the backend queued.
  private func transmitPending(_ state: inout State, inWorker: Bool = false) {
    guard state.bytes[Register.command] & Command.transmitterEnable != 0 else { return }
    var causes: UInt16 = 0
    for _ in 0..<4 where backend.canTransmit {
      let index = state.nextTransmit
      let register = Register.tsd0 + 4 * index
      let status = state.dword(register)
      guard status & TransmitStatus.own == 0 else { break }
      let size = Int(status & TransmitStatus.sizeMask)
      let address = UInt64(state.dword(Register.tsad0 + 4 * index))
      if size > 0, size <= Self.maximumFrame, let frame = memory.hostPointer(address, length: UInt64(size)) {
        send(&state, frame, length: size)
        state.setDword(register, status | TransmitStatus.own | TransmitStatus.ok)
        causes |= Interrupt.transmitOK
      } else {
        counters.add(["tx_dropped": 1])
        state.setDword(register, status | TransmitStatus.own | TransmitStatus.aborted)
        causes |= Interrupt.transmitError
      }
      state.nextTransmit = (index + 1) % 4
    }
    if causes != 0 { raise(&state, causes) }
    if !inWorker, backend.hasPendingOutput || backend.hasPendingInput { worker.wake() }
  }

  /// Hands one frame to the backend behind an all-zero vnet header.
  private func send(_ state: inout State, _ frame: UnsafeMutableRawPointer, length: Int) {
    let sent = Self.zeroHeader.withUnsafeBytes { header in
      state.vectors.removeAll(keepingCapacity: true)
      state.vectors.append(
        iovec(iov_base: UnsafeMutableRawPointer(mutating: header.baseAddress), iov_len: header.count))
      state.vectors.append(iovec(iov_base: frame, iov_len: length))
      return state.vectors.withUnsafeBufferPointer { backend.transmit($0) }
    }
    if sent {
      counters.add(["tx_frames": 1, "tx_bytes": UInt64(length)])
    } else {
      counters.add(["tx_dropped": 1])
    }
  }

  // MARK: Receive

  /// The ring size RCR.RBLEN selects: 8, 16, 32 or 64 KiB.
  static func ringSize(_ state: State) -> Int { 8192 << Int((state.dword(Register.rcr) >> 11) & 0x3) }

  /// The driver's read offset (CAPR + 16) and the device's write offset (CBR) in the ring.
  private static func ringOffsets(_ state: State) -> (read: Int, write: Int) {
    let size = ringSize(state)
    return ((Int(state.word(Register.capr)) + 16) % size, Int(state.word(Register.cbr)) % size)
  }

  private static func ringIsEmpty(_ state: State) -> Bool {
    let offsets = ringOffsets(state)
    return offsets.read == offsets.write
  }

  /// One pass of the worker: the backend's queued output, the pending transmit descriptors,
  /// then the receive ring. Internal so that a fuzz target can serve the device on its own
  /// thread.
  func process() {
    backend.flushPendingOutput()
    state.withLock { state in
      transmitPending(&state, inWorker: true)
      receiveAll(&state)
    }
  }

  private func receiveAll(_ state: inout State) {
    guard state.bytes[Register.command] & Command.receiverEnable != 0 else {
      wantsInput.store(false, ordering: .releasing)
      return
    }
    // A kept frame waits for the driver to move CAPR.
    let pass = receivePendingFrames(
      &state, pending: \.pendingReceive,
      buffer: UnsafeMutableRawBufferPointer(
        rebasing: state.receiveBuffer[0..<(Self.vnetHeaderSize + Self.backendFrameLimit)]),
      headerSize: Self.vnetHeaderSize, from: backend, wantsInput: wantsInput, deliver: deliver)
    if pass.delivered { raise(&state, Interrupt.receiveOK) }
  }

  /// Filters the pending frame, pads it to 60 bytes, appends its CRC and writes it with its
  /// header at CBR, if the ring has room for it.
  private func deliver(_ state: inout State) -> FrameDelivery {
    let frame = state.receiveBuffer.baseAddress! + Self.vnetHeaderSize
    var length = state.pendingReceive - Self.vnetHeaderSize
    guard length >= 14, let match = accepts(state, frame) else {
      state.pendingReceive = 0
      return .dropped
    }
    guard length <= Self.maximumFrame else {
      state.pendingReceive = 0
      counters.add(["rx_dropped": 1])
      return .dropped
    }
    let received = length
    if length < 60 {
      (frame + length).initializeMemory(as: UInt8.self, repeating: 0, count: 60 - length)
      length = 60
    }
    let total = length + 4
    let entry = (4 + total + 3) & ~3
    let size = Self.ringSize(state)
    let (readOffset, writeOffset) = Self.ringOffsets(state)
    let used = (writeOffset - readOffset + size) % size
    guard size - used > entry else { return .noRoom }
    var crc = EthernetFrame.crc32(UnsafeRawBufferPointer(start: frame, count: length)).littleEndian
    withUnsafeBytes(of: &crc) { (frame + length).copyMemory(from: $0.baseAddress!, byteCount: 4) }

    let base = UInt64(state.dword(Register.rbstart))
    let dataOffset = writeOffset + 4
    let placed: Bool
    if state.dword(Register.rcr) & ReceiveConfiguration.continuePastEnd != 0 && size < 65536 {
      placed = copyToRing(base: base, offset: dataOffset, from: frame, count: total)
    } else {
      let start = dataOffset % size
      let first = min(total, size - start)
      placed =
        copyToRing(base: base, offset: start, from: frame, count: first)
        && (first == total || copyToRing(base: base, offset: 0, from: frame + first, count: total - first))
    }
    var header = (UInt32(match | ReceiveStatus.ok) | UInt32(total) << 16).littleEndian
    guard placed,
      withUnsafeBytes(of: &header, { copyToRing(base: base, offset: writeOffset, from: $0.baseAddress!, count: 4) })
    else {
      // The ring is not in RAM: the bus master aborts, the frame is lost.
      state.pendingReceive = 0
      counters.add(["rx_dropped": 1])
      config.setStatusBits(1 << 13, true)  // received master abort
      raise(&state, Interrupt.systemError)
      return .dropped
    }
    state.setWord(Register.cbr, UInt16((writeOffset + entry) % size))
    state.pendingReceive = 0
    counters.add(["rx_frames": 1, "rx_bytes": UInt64(received)])
    return .delivered
  }

  /// Copies `count` bytes to `offset` in the ring at `base`; false when they are not in RAM.
  private func copyToRing(base: UInt64, offset: Int, from source: UnsafeRawPointer, count: Int) -> Bool {
    let address = base + UInt64(offset)
    guard let destination = memory.hostPointer(address, length: UInt64(count)) else { return false }
    destination.copyMemory(from: source, byteCount: count)
    memory.noteWrite(at: address, length: UInt64(count))
    return true
  }

  /// The header status bits of a frame the filters accept, or nil: broadcast with RCR.AB;
  /// multicast with RCR.AM when its hash bit is set in MAR0-7; unicast to IDR0-5 with
  /// RCR.APM, or to any address with RCR.AAP.
  private func accepts(_ state: State, _ frame: UnsafeMutableRawPointer) -> UInt16? {
    let control = state.dword(Register.rcr)
    let destination = UnsafeRawBufferPointer(start: frame, count: 6)
    if destination.allSatisfy({ $0 == 0xFF }) {
      return control & ReceiveConfiguration.acceptBroadcast != 0 ? ReceiveStatus.broadcast : nil
    }
    if destination[0] & 1 != 0 {
      guard control & ReceiveConfiguration.acceptMulticast != 0 else { return nil }
      let hash = Self.multicastHash(destination)
      let set = state.bytes[Register.mar0 + hash >> 3] & (1 << (hash & 7)) != 0
      return set ? ReceiveStatus.multicast : nil
    }
    let matches = (0..<6).allSatisfy { destination[$0] == state.bytes[Register.idr0 + $0] }
    if matches && control & ReceiveConfiguration.acceptPhysicalMatch != 0 { return ReceiveStatus.physicalMatch }
    if control & ReceiveConfiguration.acceptAllPhysical != 0 { return matches ? ReceiveStatus.physicalMatch : 0 }
    return nil
  }

  /// The multicast filter bit of a destination address: the 6 most significant bits of the
  /// address's CRC-32 computed most significant bit first (the bits in the order they are
  /// sent, without the final inversion).
  static func multicastHash(_ address: UnsafeRawBufferPointer) -> Int {
    // The reflected CRC register (before the final inversion) holds the CRC's bits in reverse
    // order: its lowest six bits, reversed, are the six most significant.
    let reflected = ~EthernetFrame.crc32(address)
    var hash = 0
    for bit in 0..<6 { hash = hash << 1 | Int((reflected >> UInt32(bit)) & 1) }
    return hash
  }
}
