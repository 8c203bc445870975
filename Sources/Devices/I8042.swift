import Synchronization
import VMCore

/// The i8042 keyboard controller (data port 0x60, command/status port 0x64), with an AT
/// keyboard attached and no mouse, and its reset line.
///
/// Enough of the controller for an OS to probe it and for the classic reset path:
/// - commands 0x20/0x60 (read/write the command byte), 0xAA self-test (0x55), 0xAB keyboard
///   interface test (0x00), 0xA9 auxiliary interface test (0x00), 0xA7/0xA8 and 0xAD/0xAE
///   disable/enable the auxiliary and keyboard ports, 0xC0 read input port, 0xD0/0xD1 read/write
///   the output port, 0xD2/0xD3 write the keyboard/auxiliary output buffer, 0xD4 send to the
///   auxiliary device (no mouse answers: 0xFE with the timeout status bit, so probes end at once);
/// - 0xF0-0xFF pulse output port bits low; bit 0 is the CPU reset line, so 0xFE (and writing an
///   output port value with bit 0 clear) asks the machine to reset;
/// - the keyboard answers the usual commands (reset 0xFF: FA AA; identify 0xF2: FA AB 83;
///   echo 0xEE; LEDs, typematic rate, scan code set, enable/disable: FA; anything else: FE).
///
/// Output bytes queue up; IRQ 1 (keyboard) and IRQ 12 (auxiliary) follow the byte at the head
/// of the queue and the command byte's interrupt enables. Reading the data port lowers the line
/// before raising it for the next byte, so edge-triggered controllers see every byte.
/// The host types keys as scan code set 2 (`typeScanCodes`, fed by `PS2KeyboardInput`): the
/// keyboard hands them to the controller one byte at a time, when its output buffer is empty,
/// and the controller translates them to set 1 when command byte bit 6 asks for it (Linux's
/// setting), as an 8042 does. The A20 output is stored but not applied: guest RAM is always
/// addressed with A20 enabled.
public final class I8042Controller: PortIODevice {
  /// The data port.
  public static let dataPort: UInt16 = 0x60
  /// The command (write) and status (read) port.
  public static let commandPort: UInt16 = 0x64
  /// ISA interrupt line of the keyboard port.
  public static let keyboardInterrupt: UInt32 = 1
  /// ISA interrupt line of the auxiliary (mouse) port.
  public static let auxiliaryInterrupt: UInt32 = 12

  private let control: MachineControl
  private let state: Mutex<I8042State>

  /// Creates the controller; `control` receives the reset request.
  public init(control: MachineControl, keyboardInterrupt: InterruptLine, auxiliaryInterrupt: InterruptLine) {
    self.control = control
    self.state = Mutex(
      I8042State(
        keyboardLine: TrackedInterruptLine(keyboardInterrupt),
        auxiliaryLine: TrackedInterruptLine(auxiliaryInterrupt)))
  }

  public func portRead(port: UInt16, size: Int) -> UInt32 {
    state.withLock { controller in
      PortAccess.readBytes(port: port, size: size) { port in
        switch port {
        case Self.dataPort: return controller.readData()
        case Self.commandPort: return controller.status
        default: return nil
        }
      }
    }
  }

  public func portWrite(port: UInt16, size: Int, value: UInt32) {
    let resetRequested = state.withLock { controller in
      var reset = false
      PortAccess.writeBytes(port: port, size: size, value: value) { port, byte in
        switch port {
        case Self.dataPort: reset = controller.writeData(byte) || reset
        case Self.commandPort: reset = controller.writeCommand(byte) || reset
        default: break
        }
      }
      return reset
    }
    if resetRequested { control.requestStop(.reset(reason: "i8042 reset")) }
  }

  /// Types Ctrl-Alt-Del: the make and break codes of Left Ctrl, Left Alt and Delete, in scan
  /// code set 1 when the controller translates (command byte bit 6, Linux's setting) and in
  /// set 2 otherwise. Bytes are dropped while the keyboard interface is disabled.
  public func typeControlAltDelete() {
    state.withLock { controller in
      let translated = controller.commandByte & 0x40 != 0
      let bytes: [UInt8] =
        translated
        ? [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]
        : [0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14]
      for byte in bytes { controller.enqueueKeystroke(byte) }
    }
  }

  /// Types scan code set 2 bytes (make and break codes, E0/F0 prefixes) on the keyboard. Bytes
  /// are dropped while the keyboard is not scanning; at most `I8042State.keyboardBufferLimit`
  /// wait for the guest to read them.
  public func typeScanCodes(_ setTwoBytes: [UInt8]) {
    state.withLock { controller in controller.typeScanCodes(setTwoBytes) }
  }

  /// The controller command byte (configuration) as the guest last set it.
  public var commandByte: UInt8 { state.withLock { $0.commandByte } }

  /// The output port: bit 0 is the reset line (1 = running), bit 1 the A20 gate.
  public var outputPort: UInt8 { state.withLock { $0.outputPort } }
}

/// Controller and keyboard state; always used with the controller's lock held.
struct I8042State {
  // Status register bits.
  static let outputBufferFull: UInt8 = 0x01
  static let systemFlag: UInt8 = 0x04
  static let lastWriteWasCommand: UInt8 = 0x08
  static let keyboardNotInhibited: UInt8 = 0x10
  static let auxiliaryData: UInt8 = 0x20
  static let timeoutError: UInt8 = 0x40

  // Command byte bits.
  static let keyboardInterruptEnable: UInt8 = 0x01
  static let auxiliaryInterruptEnable: UInt8 = 0x02
  static let keyboardDisabled: UInt8 = 0x10
  static let auxiliaryDisabled: UInt8 = 0x20

  /// Where the next data-port write goes.
  enum DataTarget {
    case keyboard
    case commandByte
    case outputPort
    case keyboardOutputBuffer
    case auxiliaryOutputBuffer
    case auxiliaryDevice
  }

  struct OutputByte {
    var value: UInt8
    var fromAuxiliary: Bool
    var timeout: Bool
  }

  static let outputQueueLimit = 16
  /// Host keystroke bytes waiting for the keyboard to send them.
  static let keyboardBufferLimit = 4096

  var keyboardLine: TrackedInterruptLine
  var auxiliaryLine: TrackedInterruptLine
  /// As a BIOS leaves it: keyboard interrupt on, system flag set, auxiliary port disabled,
  /// scan code translation on.
  var commandByte: UInt8 = 0x65
  var outputPort: UInt8 = 0x03
  var lastWriteWasCommand = false
  var outputQueue: [OutputByte] = []
  var lastOutput: UInt8 = 0
  var dataTarget = DataTarget.keyboard
  /// A keyboard command waiting for its parameter byte (0xED, 0xF0, 0xF3).
  var keyboardCommandAwaitingParameter: UInt8?
  var keyboardScanning = true
  /// The scan code set the guest selected (keyboard command 0xF0): 1, 2 or 3.
  var scanCodeSet: UInt8 = 2
  /// Keystroke bytes (already in the set the guest reads) not yet in the output buffer.
  var keyboardPending: [UInt8] = []
  /// Translation state: the set 2 break prefix 0xF0 was seen.
  var translationBreakPending = false

  init(keyboardLine: TrackedInterruptLine, auxiliaryLine: TrackedInterruptLine) {
    self.keyboardLine = keyboardLine
    self.auxiliaryLine = auxiliaryLine
  }

  var status: UInt8 {
    var value = Self.keyboardNotInhibited | (commandByte & Self.systemFlag)
    if lastWriteWasCommand { value |= Self.lastWriteWasCommand }
    if let head = outputQueue.first {
      value |= Self.outputBufferFull
      if head.fromAuxiliary { value |= Self.auxiliaryData }
      if head.timeout { value |= Self.timeoutError }
    }
    return value
  }

  mutating func updateInterrupts() {
    let head = outputQueue.first
    keyboardLine.set(
      head.map { !$0.fromAuxiliary } == true && commandByte & Self.keyboardInterruptEnable != 0)
    auxiliaryLine.set(
      head.map { $0.fromAuxiliary } == true && commandByte & Self.auxiliaryInterruptEnable != 0)
  }

  /// Queues a keystroke byte from the host, unless the keyboard interface is disabled or the
  /// keyboard is not scanning.
  mutating func enqueueKeystroke(_ value: UInt8) {
    guard commandByte & Self.keyboardDisabled == 0, keyboardScanning else { return }
    enqueue(value)
  }

  mutating func enqueue(_ value: UInt8, fromAuxiliary: Bool = false, timeout: Bool = false) {
    guard outputQueue.count < Self.outputQueueLimit else { return }
    outputQueue.append(OutputByte(value: value, fromAuxiliary: fromAuxiliary, timeout: timeout))
    updateInterrupts()
  }

  /// Queues host keystrokes given in scan code set 2, translated to set 1 when the controller
  /// translates (command byte bit 6) or the guest selected set 1.
  mutating func typeScanCodes(_ bytes: [UInt8]) {
    guard keyboardScanning else { return }
    let translate = commandByte & 0x40 != 0 || scanCodeSet == 1
    for byte in bytes where keyboardPending.count < Self.keyboardBufferLimit {
      guard translate else {
        keyboardPending.append(byte)
        continue
      }
      if byte == 0xF0 {
        translationBreakPending = true
        continue
      }
      let translated = PS2ScanCodes.translateToSetOne(byte)
      keyboardPending.append(translationBreakPending ? translated | 0x80 : translated)
      translationBreakPending = false
    }
    feedKeyboardByte()
  }

  /// Moves the next pending keystroke byte into the output buffer when it is empty and the
  /// keyboard interface is enabled (the keyboard sends one byte at a time).
  mutating func feedKeyboardByte() {
    guard outputQueue.isEmpty, !keyboardPending.isEmpty, commandByte & Self.keyboardDisabled == 0 else { return }
    enqueue(keyboardPending.removeFirst())
  }

  mutating func readData() -> UInt8 {
    guard !outputQueue.isEmpty else { return lastOutput }
    lastOutput = outputQueue.removeFirst().value
    defer { feedKeyboardByte() }
    // Drop the lines so the next byte, if any, raises a fresh edge.
    keyboardLine.set(false)
    auxiliaryLine.set(false)
    updateInterrupts()
    return lastOutput
  }

  /// Handles a command-port write; returns whether it asks for a CPU reset.
  mutating func writeCommand(_ command: UInt8) -> Bool {
    lastWriteWasCommand = true
    dataTarget = .keyboard
    switch command {
    case 0x20...0x3F:
      // Read controller RAM; byte 0 is the command byte, the rest reads as zero.
      enqueue(command == 0x20 ? commandByte : 0)
    case 0x60:
      dataTarget = .commandByte
    case 0x61...0x7F:
      break  // writes to the rest of controller RAM: accepted and ignored
    case 0xA7:
      commandByte |= Self.auxiliaryDisabled
    case 0xA8:
      commandByte &= ~Self.auxiliaryDisabled
    case 0xA9, 0xAB:
      enqueue(0x00)  // interface test passed
    case 0xAA:
      commandByte |= Self.systemFlag
      enqueue(0x55)  // self-test passed
    case 0xAD:
      commandByte |= Self.keyboardDisabled
    case 0xAE:
      commandByte &= ~Self.keyboardDisabled
      feedKeyboardByte()
    case 0xC0:
      enqueue(0x80)  // input port: keyboard not inhibited
    case 0xD0:
      var port = outputPort & 0x03
      if let head = outputQueue.first {
        port |= head.fromAuxiliary ? 0x20 : 0x10
      }
      enqueue(port)
    case 0xD1:
      dataTarget = .outputPort
    case 0xD2:
      dataTarget = .keyboardOutputBuffer
    case 0xD3:
      dataTarget = .auxiliaryOutputBuffer
    case 0xD4:
      dataTarget = .auxiliaryDevice
    case 0xF0...0xFF:
      // Pulse the output port bits whose mask bit is 0; bit 0 is the reset line.
      return command & 0x01 == 0
    default:
      break  // unknown commands are ignored
    }
    updateInterrupts()
    return false
  }

  /// Handles a data-port write; returns whether it asks for a CPU reset.
  mutating func writeData(_ value: UInt8) -> Bool {
    lastWriteWasCommand = false
    let target = dataTarget
    dataTarget = .keyboard
    switch target {
    case .commandByte:
      commandByte = value
      feedKeyboardByte()
    case .outputPort:
      outputPort = value
      if value & 0x01 == 0 { return true }
    case .keyboardOutputBuffer:
      enqueue(value)
    case .auxiliaryOutputBuffer:
      enqueue(value, fromAuxiliary: true)
    case .auxiliaryDevice:
      enqueue(0xFE, fromAuxiliary: true, timeout: true)  // no mouse: the transfer times out
    case .keyboard:
      keyboardReceive(value)
    }
    updateInterrupts()
    return false
  }

  /// The attached AT keyboard's answer to a byte from the host.
  private mutating func keyboardReceive(_ byte: UInt8) {
    if let pending = keyboardCommandAwaitingParameter {
      keyboardCommandAwaitingParameter = nil
      if pending == 0xF0 && byte == 0 {
        enqueue(0xFA)
        enqueue(scanCodeSet)  // current scan code set
      } else if pending == 0xF0 {
        if (1...3).contains(byte) { scanCodeSet = byte }
        enqueue(0xFA)
      } else {
        enqueue(0xFA)
      }
      return
    }
    switch byte {
    case 0xED, 0xF0, 0xF3:
      keyboardCommandAwaitingParameter = byte
      enqueue(0xFA)
    case 0xEE:
      enqueue(0xEE)
    case 0xF2:
      enqueue(0xFA)
      enqueue(0xAB)
      enqueue(0x83)
    case 0xF4:
      keyboardScanning = true
      enqueue(0xFA)
    case 0xF5:
      keyboardScanning = false
      enqueue(0xFA)
    case 0xF6, 0xF7, 0xF8, 0xF9, 0xFA, 0xFB, 0xFC, 0xFD:
      enqueue(0xFA)
    case 0xFE:
      enqueue(lastOutput)  // resend
    case 0xFF:
      keyboardScanning = true
      scanCodeSet = 2
      keyboardPending.removeAll()
      enqueue(0xFA)
      enqueue(0xAA)  // basic assurance test passed
    default:
      enqueue(0xFE)  // unknown command: ask for a resend
    }
  }
}

// MARK: Machine state

extension I8042State.DataTarget {
  fileprivate static let all: [I8042State.DataTarget] = [
    .keyboard, .commandByte, .outputPort, .keyboardOutputBuffer, .auxiliaryOutputBuffer, .auxiliaryDevice,
  ]
}

/// Command byte, output port, the output queue, the pending data-port target and keyboard
/// command, and both interrupt lines' levels.
extension I8042Controller: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    let saved = state.withLock { $0 }
    writer.write(saved.commandByte)
    writer.write(saved.outputPort)
    writer.write(saved.lastWriteWasCommand)
    writer.write(UInt32(saved.outputQueue.count))
    for byte in saved.outputQueue {
      writer.write(byte.value)
      writer.write(byte.fromAuxiliary)
      writer.write(byte.timeout)
    }
    writer.write(saved.lastOutput)
    writer.write(UInt8(I8042State.DataTarget.all.firstIndex(of: saved.dataTarget) ?? 0))
    writer.write(optional: saved.keyboardCommandAwaitingParameter)
    writer.write(saved.keyboardScanning)
    writer.write(saved.keyboardLine.level)
    writer.write(saved.auxiliaryLine.level)
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    let commandByte: UInt8 = try reader.read()
    let outputPort: UInt8 = try reader.read()
    let lastWriteWasCommand = try reader.readBool()
    let count = Int(try reader.read(UInt32.self))
    guard count <= I8042State.outputQueueLimit else { throw .invalid("i8042 output queue") }
    var queue: [I8042State.OutputByte] = []
    for _ in 0..<count {
      queue.append(
        .init(value: try reader.read(), fromAuxiliary: try reader.readBool(), timeout: try reader.readBool()))
    }
    let lastOutput: UInt8 = try reader.read()
    let target = Int(try reader.read(UInt8.self))
    guard target < I8042State.DataTarget.all.count else { throw .invalid("i8042 data target") }
    let awaiting = try reader.readOptional(UInt8.self)
    let scanning = try reader.readBool()
    let keyboardLevel = try reader.readBool()
    let auxiliaryLevel = try reader.readBool()
    state.withLock { i8042 in
      i8042.commandByte = commandByte
      i8042.outputPort = outputPort
      i8042.lastWriteWasCommand = lastWriteWasCommand
      i8042.outputQueue = queue
      i8042.lastOutput = lastOutput
      i8042.dataTarget = I8042State.DataTarget.all[target]
      i8042.keyboardCommandAwaitingParameter = awaiting
      i8042.keyboardScanning = scanning
      i8042.keyboardLine.restoreLevel(keyboardLevel)
      i8042.auxiliaryLine.restoreLevel(auxiliaryLevel)
    }
  }
}
