import Synchronization
import VMCore

/// A 16550A UART (the PC's COM1 by default: ports 0x3F8-0x3FF, IRQ 4).
///
/// Registers (offset from the base port; DLAB is LCR bit 7):
/// - 0: RBR (read) / THR (write); DLL when DLAB is set
/// - 1: IER (4 bits); DLM when DLAB is set
/// - 2: IIR (read; bits 6-7 set while the FIFOs are enabled) / FCR (write)
/// - 3: LCR, 4: MCR (5 bits, bit 4 loopback), 5: LSR, 6: MSR, 7: SCR
///
/// Transmission is instantaneous: a THR write goes straight to the `SerialBackend` (or, in
/// loopback mode, into the receive FIFO), and THR and the transmitter are empty (LSR THRE and
/// TEMT set) whenever the backend is ready for more (`SerialBackend.isReadyToTransmit`: a
/// buffered backend whose consumer stopped reading is not). The THR-empty interrupt of a write
/// that found the backend not ready comes when the backend calls back. The receive FIFO holds
/// 16 bytes as on the real part; host input beyond that waits in a host-side queue (up to
/// `hostQueueLimit` bytes) that refills the FIFO as the guest reads, which plays the role of
/// flow control so pasted text is not lost.
///
/// Interrupts follow the 16550 priorities (line status, received data or character timeout,
/// THR empty, modem status) and drive the interrupt line as a level, recomputed after every
/// register access and every host input. A THR write briefly lowers the line before raising it
/// again for the next THR-empty interrupt, so edge-triggered interrupt controllers see a new edge.
/// As in QEMU, the line is not gated by MCR OUT2. Line speed, parity and break are stored but
/// have no effect; the character timeout interrupt is reported as soon as fewer bytes than the
/// trigger level are waiting.
public final class SerialPort: PortIODevice {
  /// COM1's first port.
  public static let com1Base: UInt16 = 0x3F8
  /// COM1's ISA interrupt line.
  public static let com1Interrupt: UInt32 = 4
  /// Number of consecutive ports a UART decodes.
  public static let portCount = 8
  /// Depth of the guest-visible receive FIFO.
  public static let fifoDepth = 16
  /// Host input bytes kept waiting for the guest beyond the FIFO; more is dropped.
  public static let hostQueueLimit = 1 << 16

  /// The first port the UART decodes.
  public let basePort: UInt16
  private let backend: any SerialBackend
  private let state: Mutex<UARTState>

  /// Creates a UART at `basePort` raising `interrupt`, transmitting to `backend`.
  public init(basePort: UInt16 = SerialPort.com1Base, interrupt: InterruptLine, backend: any SerialBackend) {
    self.basePort = basePort
    self.backend = backend
    self.state = Mutex(UARTState(interrupt: TrackedInterruptLine(interrupt)))
    backend.whenReadyToTransmit { [weak self] in self?.transmitterBecameReady() }
  }

  public func portRead(port: UInt16, size: Int) -> UInt32 {
    let base = basePort
    let backend = self.backend
    return state.withLock { uart in
      PortAccess.readBytes(port: port, size: size) { port in
        let offset = port &- base
        guard offset < SerialPort.portCount else { return nil }
        let value = uart.readRegister(offset, backend: backend)
        uart.updateInterrupt()
        return value
      }
    }
  }

  public func portWrite(port: UInt16, size: Int, value: UInt32) {
    let base = basePort
    let backend = self.backend
    state.withLock { uart in
      PortAccess.writeBytes(port: port, size: size, value: value) { port, byte in
        let offset = port &- base
        guard offset < SerialPort.portCount else { return }
        uart.writeRegister(offset, byte, backend: backend)
        uart.updateInterrupt()
      }
    }
  }

  /// Delivers bytes from the host (keyboard, pipe) to the guest; callable from any thread.
  /// Returns how many were accepted: bytes beyond `hostQueueLimit` waiting bytes are dropped.
  @discardableResult
  public func receive(_ bytes: some Sequence<UInt8>) -> Int {
    state.withLock { uart in
      let accepted = uart.enqueueHostInput(bytes)
      uart.updateInterrupt()
      return accepted
    }
  }

  /// The backend is ready again: the THR-empty interrupt a write was waiting for.
  private func transmitterBecameReady() {
    state.withLock { uart in
      guard uart.transmitterWaiting else { return }
      uart.transmitterWaiting = false
      uart.transmitterEmptyPending = true
      uart.updateInterrupt()
    }
  }

  /// Whether the interrupt line is currently raised.
  public var interruptLevel: Bool { state.withLock { $0.interrupt.level } }

  /// The baud rate divisor the guest programmed (115200 / divisor baud).
  public var divisor: UInt16 { state.withLock { $0.divisor } }

  /// Host input bytes not yet read by the guest (FIFO plus host queue).
  public var pendingInputCount: Int {
    state.withLock { $0.receiveFIFO.count + $0.hostQueue.count - $0.hostQueueHead }
  }
}

/// Register file and FIFOs of one UART; always used with the UART's lock held.
struct UARTState {
  // Register offsets.
  static let dataRegister: UInt16 = 0
  static let interruptEnableRegister: UInt16 = 1
  static let interruptIdentificationRegister: UInt16 = 2
  static let lineControlRegister: UInt16 = 3
  static let modemControlRegister: UInt16 = 4
  static let lineStatusRegister: UInt16 = 5
  static let modemStatusRegister: UInt16 = 6
  static let scratchRegister: UInt16 = 7

  // IER bits.
  static let enableReceivedData: UInt8 = 0x01
  static let enableTransmitterEmpty: UInt8 = 0x02
  static let enableLineStatus: UInt8 = 0x04
  static let enableModemStatus: UInt8 = 0x08

  // IIR interrupt identifiers (bits 0-3).
  static let noInterruptPending: UInt8 = 0x01
  static let lineStatusInterrupt: UInt8 = 0x06
  static let receivedDataInterrupt: UInt8 = 0x04
  static let characterTimeoutInterrupt: UInt8 = 0x0C
  static let transmitterEmptyInterrupt: UInt8 = 0x02
  static let modemStatusInterrupt: UInt8 = 0x00
  static let fifosEnabledBits: UInt8 = 0xC0

  // LSR bits.
  static let dataReady: UInt8 = 0x01
  static let overrunError: UInt8 = 0x02
  static let errorBits: UInt8 = 0x1E
  static let transmitterHoldingEmpty: UInt8 = 0x20
  static let transmitterEmpty: UInt8 = 0x40

  // LCR and MCR bits.
  static let divisorLatchAccess: UInt8 = 0x80
  static let loopback: UInt8 = 0x10

  var interrupt: TrackedInterruptLine
  var receiveFIFO: [UInt8] = []
  var hostQueue: [UInt8] = []
  var hostQueueHead = 0
  var lastReceived: UInt8 = 0
  var interruptEnable: UInt8 = 0
  var lineControl: UInt8 = 0x03
  var modemControl: UInt8 = 0
  var lineStatusErrors: UInt8 = 0
  var modemStatusDeltas: UInt8 = 0
  var scratch: UInt8 = 0
  var divisor: UInt16 = 12
  var fifosEnabled = false
  var triggerLevel = 1
  var transmitterEmptyPending = false
  /// THR was written (or its interrupt enabled) while the backend was not ready: the THR-empty
  /// interrupt waits for the backend's call.
  var transmitterWaiting = false

  init(interrupt: TrackedInterruptLine) {
    self.interrupt = interrupt
    receiveFIFO.reserveCapacity(SerialPort.fifoDepth)
  }

  var divisorLatchSelected: Bool { lineControl & Self.divisorLatchAccess != 0 }
  var inLoopback: Bool { modemControl & Self.loopback != 0 }
  var fifoCapacity: Int { fifosEnabled ? SerialPort.fifoDepth : 1 }

  /// The modem status inputs (MSR bits 4-7). In loopback they are wired to the MCR outputs
  /// (RTS to CTS, DTR to DSR, OUT1 to RI, OUT2 to DCD); otherwise a present, ready modem
  /// (DCD, DSR and CTS asserted), as QEMU reports.
  var modemInputs: UInt8 {
    guard inLoopback else { return 0xB0 }
    var lines: UInt8 = 0
    if modemControl & 0x02 != 0 { lines |= 0x10 }
    if modemControl & 0x01 != 0 { lines |= 0x20 }
    if modemControl & 0x04 != 0 { lines |= 0x40 }
    if modemControl & 0x08 != 0 { lines |= 0x80 }
    return lines
  }

  /// The highest-priority pending, enabled interrupt as an IIR identifier.
  var pendingInterrupt: UInt8 {
    if interruptEnable & Self.enableLineStatus != 0 && lineStatusErrors & Self.errorBits != 0 {
      return Self.lineStatusInterrupt
    }
    if interruptEnable & Self.enableReceivedData != 0 && !receiveFIFO.isEmpty {
      let level = fifosEnabled ? triggerLevel : 1
      return receiveFIFO.count >= level ? Self.receivedDataInterrupt : Self.characterTimeoutInterrupt
    }
    if interruptEnable & Self.enableTransmitterEmpty != 0 && transmitterEmptyPending {
      return Self.transmitterEmptyInterrupt
    }
    if interruptEnable & Self.enableModemStatus != 0 && modemStatusDeltas != 0 {
      return Self.modemStatusInterrupt
    }
    return Self.noInterruptPending
  }

  mutating func updateInterrupt() {
    interrupt.set(pendingInterrupt != Self.noInterruptPending)
  }

  mutating func readRegister(_ offset: UInt16, backend: any SerialBackend) -> UInt8 {
    switch offset {
    case Self.dataRegister:
      if divisorLatchSelected { return UInt8(truncatingIfNeeded: divisor) }
      guard !receiveFIFO.isEmpty else { return lastReceived }
      lastReceived = receiveFIFO.removeFirst()
      refillFromHost()
      return lastReceived
    case Self.interruptEnableRegister:
      return divisorLatchSelected ? UInt8(truncatingIfNeeded: divisor >> 8) : interruptEnable
    case Self.interruptIdentificationRegister:
      let identifier = pendingInterrupt
      if identifier == Self.transmitterEmptyInterrupt { transmitterEmptyPending = false }
      return identifier | (fifosEnabled ? Self.fifosEnabledBits : 0)
    case Self.lineControlRegister:
      return lineControl
    case Self.modemControlRegister:
      return modemControl
    case Self.lineStatusRegister:
      var status = lineStatusErrors
      if inLoopback || backend.isReadyToTransmit { status |= Self.transmitterHoldingEmpty | Self.transmitterEmpty }
      if !receiveFIFO.isEmpty { status |= Self.dataReady }
      lineStatusErrors = 0
      return status
    case Self.modemStatusRegister:
      let status = modemInputs | modemStatusDeltas
      modemStatusDeltas = 0
      return status
    default:
      return scratch
    }
  }

  mutating func writeRegister(_ offset: UInt16, _ value: UInt8, backend: any SerialBackend) {
    switch offset {
    case Self.dataRegister:
      if divisorLatchSelected {
        divisor = (divisor & 0xFF00) | UInt16(value)
      } else {
        transmit(value, backend: backend)
      }
    case Self.interruptEnableRegister:
      if divisorLatchSelected {
        divisor = (divisor & 0x00FF) | (UInt16(value) << 8)
      } else {
        let newValue = value & 0x0F
        let transmitterEmptyChanged = (newValue ^ interruptEnable) & Self.enableTransmitterEmpty != 0
        interruptEnable = newValue
        // Enabling the THR-empty interrupt while THR is empty raises it.
        if transmitterEmptyChanged {
          let enabled = newValue & Self.enableTransmitterEmpty != 0
          let ready = inLoopback || backend.isReadyToTransmit
          transmitterEmptyPending = enabled && ready
          transmitterWaiting = enabled && !ready
        }
      }
    case Self.interruptIdentificationRegister:
      writeFIFOControl(value)
    case Self.lineControlRegister:
      lineControl = value
    case Self.modemControlRegister:
      writeModemControl(value & 0x1F)
    case Self.lineStatusRegister, Self.modemStatusRegister:
      break  // factory test registers: writes are ignored
    default:
      scratch = value
    }
  }

  private mutating func transmit(_ byte: UInt8, backend: any SerialBackend) {
    transmitterEmptyPending = false
    updateInterrupt()
    if inLoopback {
      storeReceived(byte)
    } else {
      withUnsafeBytes(of: byte) { backend.write($0) }
    }
    let ready = inLoopback || backend.isReadyToTransmit
    transmitterEmptyPending = ready
    transmitterWaiting = !ready
  }

  private mutating func writeFIFOControl(_ value: UInt8) {
    let enable = value & 0x01 != 0
    if enable != fifosEnabled {
      fifosEnabled = enable
      receiveFIFO.removeAll(keepingCapacity: true)
    }
    if value & 0x02 != 0 { receiveFIFO.removeAll(keepingCapacity: true) }
    // Bit 2 clears the transmit FIFO, which is always empty here.
    triggerLevel = [1, 4, 8, 14][Int(value >> 6)]
    refillFromHost()
  }

  private mutating func writeModemControl(_ value: UInt8) {
    let before = modemInputs
    modemControl = value
    let after = modemInputs
    let changed = before ^ after
    if changed & 0x10 != 0 { modemStatusDeltas |= 0x01 }  // delta CTS
    if changed & 0x20 != 0 { modemStatusDeltas |= 0x02 }  // delta DSR
    if before & 0x40 != 0 && after & 0x40 == 0 { modemStatusDeltas |= 0x04 }  // RI trailing edge
    if changed & 0x80 != 0 { modemStatusDeltas |= 0x08 }  // delta DCD
    refillFromHost()
  }

  /// Puts a byte coming off the (loopback) line into the receiver, flagging an overrun when full.
  private mutating func storeReceived(_ byte: UInt8) {
    if receiveFIFO.count < fifoCapacity {
      receiveFIFO.append(byte)
    } else {
      lineStatusErrors |= Self.overrunError
      // Without FIFOs the new character replaces the unread one; with FIFOs it is lost.
      if !fifosEnabled { receiveFIFO[receiveFIFO.count - 1] = byte }
    }
  }

  mutating func enqueueHostInput(_ bytes: some Sequence<UInt8>) -> Int {
    var accepted = 0
    for byte in bytes {
      guard hostQueue.count - hostQueueHead < SerialPort.hostQueueLimit else { break }
      hostQueue.append(byte)
      accepted += 1
    }
    refillFromHost()
    return accepted
  }

  /// Moves waiting host input into the receive FIFO while it has room. In loopback mode the
  /// receiver is disconnected from the line, so host input keeps waiting.
  private mutating func refillFromHost() {
    guard !inLoopback else { return }
    while receiveFIFO.count < fifoCapacity && hostQueueHead < hostQueue.count {
      receiveFIFO.append(hostQueue[hostQueueHead])
      hostQueueHead += 1
    }
    if hostQueueHead == hostQueue.count {
      hostQueue.removeAll(keepingCapacity: hostQueue.count <= 4096)
      hostQueueHead = 0
    } else if hostQueueHead >= 4096 {
      hostQueue.removeFirst(hostQueueHead)
      hostQueueHead = 0
    }
  }
}

// MARK: Machine state

/// Every register, the receive FIFO, input from the host not yet in the FIFO, and the
/// interrupt line's level.
extension SerialPort: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    let saved = state.withLock { $0 }
    writer.write(bytes: saved.receiveFIFO)
    writer.write(bytes: saved.hostQueue[min(saved.hostQueueHead, saved.hostQueue.count)...])
    for value in [
      saved.lastReceived, saved.interruptEnable, saved.lineControl, saved.modemControl, saved.lineStatusErrors,
      saved.modemStatusDeltas, saved.scratch, UInt8(clamping: saved.triggerLevel),
    ] {
      writer.write(value)
    }
    writer.write(saved.divisor)
    writer.write(saved.fifosEnabled)
    // A restored machine's backend starts empty and ready: an interrupt still waiting for the
    // old one is pending in the new one.
    writer.write(saved.transmitterEmptyPending || saved.transmitterWaiting)
    writer.write(saved.interrupt.level)
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    let fifo = try reader.readBytes(maximumCount: Self.fifoDepth)
    let hostQueue = try reader.readBytes(maximumCount: 1 << 20)
    let registers = try (0..<8).map { _ throws(MachineStateError) in try reader.read(UInt8.self) }
    let divisor: UInt16 = try reader.read()
    let fifosEnabled = try reader.readBool()
    let transmitterEmptyPending = try reader.readBool()
    let level = try reader.readBool()
    guard [1, 4, 8, 14].contains(registers[7]) else { throw .invalid("UART FIFO trigger level") }
    state.withLock { uart in
      uart.receiveFIFO = fifo
      uart.hostQueue = hostQueue
      uart.hostQueueHead = 0
      uart.lastReceived = registers[0]
      uart.interruptEnable = registers[1]
      uart.lineControl = registers[2]
      uart.modemControl = registers[3]
      uart.lineStatusErrors = registers[4]
      uart.modemStatusDeltas = registers[5]
      uart.scratch = registers[6]
      uart.triggerLevel = Int(registers[7])
      uart.divisor = divisor
      uart.fifosEnabled = fifosEnabled
      uart.transmitterEmptyPending = transmitterEmptyPending
      uart.interrupt.restoreLevel(level)
    }
  }
}
