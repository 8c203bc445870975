import VMCore

/// The legacy devices of one machine, as `LegacyDevices.install` registered them.
public struct InstalledLegacyDevices: Sendable {
  /// COM1 (ports 0x3F8-0x3FF, IRQ 4).
  public let serialPort: SerialPort
  /// The i8042 keyboard controller (ports 0x60 and 0x64, IRQs 1 and 12) and its reset line.
  public let keyboardController: I8042Controller
  /// The CMOS clock and NVRAM (ports 0x70-0x71).
  public let cmos: CMOSClock
  /// isa-debug-exit (port 0xF4).
  public let debugExit: DebugExitDevice
  /// Fast A20 and reset (port 0x92).
  public let systemControlA: SystemControlPortA
  /// Speaker gate and NMI status (port 0x61); `nil` unless requested, or when another device
  /// had already claimed the port.
  public let systemControlB: SystemControlPortB?
  /// POST codes (port 0x80).
  public let postCode: PostCodePort
}

/// Wires the PC's legacy devices onto an I/O bus.
public enum LegacyDevices {
  /// Creates and registers every legacy device at its standard ports:
  /// COM1 0x3F8-0x3FF (IRQ 4), i8042 0x60 and 0x64 (IRQs 1 and 12), CMOS 0x70-0x71, POST 0x80,
  /// port A 0x92, debug-exit 0xF4.
  ///
  /// Port 0x61 belongs with the PIT: KVM's in-kernel PIT answers it, and the software CPU's
  /// interrupt controllers register their own. Only pass `includeSystemControlPortB` for a
  /// machine with neither; it is then registered unless something already claimed it.
  ///
  /// - Parameters:
  ///   - memorySize: guest RAM in bytes, reported in the CMOS memory size registers.
  ///   - includeSystemControlPortB: also register a `SystemControlPortB` at 0x61.
  ///   - timer2Output: PIT channel 2's output for that port's bit 5.
  /// - Throws: `IOBusError` when one of these ports is already taken.
  public static func install(
    on bus: IOBus, control: MachineControl, interrupts: InterruptRouter, serialBackend: any SerialBackend,
    memorySize: UInt64, includeSystemControlPortB: Bool = false, timer2Output: (@Sendable () -> Bool)? = nil
  ) throws(IOBusError) -> InstalledLegacyDevices {
    let serialPort = SerialPort(
      interrupt: InterruptLine(router: interrupts, line: SerialPort.com1Interrupt), backend: serialBackend)
    try bus.registerPorts(SerialPort.com1Base, count: SerialPort.portCount, device: serialPort)

    let keyboardController = I8042Controller(
      control: control,
      keyboardInterrupt: InterruptLine(router: interrupts, line: I8042Controller.keyboardInterrupt),
      auxiliaryInterrupt: InterruptLine(router: interrupts, line: I8042Controller.auxiliaryInterrupt))
    try bus.registerPorts(I8042Controller.dataPort, count: 1, device: keyboardController)
    try bus.registerPorts(I8042Controller.commandPort, count: 1, device: keyboardController)

    var systemControlB: SystemControlPortB?
    if includeSystemControlPortB && !bus.hasPortDevice(SystemControlPortB.port) {
      let port = SystemControlPortB(timer2Output: timer2Output)
      try bus.registerPorts(SystemControlPortB.port, count: 1, device: port)
      systemControlB = port
    }

    let cmos = CMOSClock(memorySize: memorySize)
    try bus.registerPorts(CMOSClock.indexPort, count: 2, device: cmos)

    let postCode = PostCodePort()
    try bus.registerPorts(PostCodePort.port, count: 1, device: postCode)

    let systemControlA = SystemControlPortA(control: control)
    try bus.registerPorts(SystemControlPortA.port, count: 1, device: systemControlA)

    let debugExit = DebugExitDevice(control: control)
    try bus.registerPorts(DebugExitDevice.defaultPort, count: 1, device: debugExit)

    return InstalledLegacyDevices(
      serialPort: serialPort, keyboardController: keyboardController, cmos: cmos, debugExit: debugExit,
      systemControlA: systemControlA, systemControlB: systemControlB, postCode: postCode)
  }
}

// MARK: Machine state

/// The legacy devices in a fixed order: UART, i8042, CMOS, port 0x92, port 0x61 (when this
/// device provides it).
extension InstalledLegacyDevices: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    writer.section("uart", serialPort)
    writer.section("i8042", keyboardController)
    writer.section("cmos", cmos)
    writer.section("port92", systemControlA)
    writer.write(systemControlB != nil)
    if let systemControlB { writer.section("port61", systemControlB) }
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    try reader.section("uart", serialPort)
    try reader.section("i8042", keyboardController)
    try reader.section("cmos", cmos)
    try reader.section("port92", systemControlA)
    let hasPortB = try reader.readBool()
    guard hasPortB == (systemControlB != nil) else {
      throw MachineStateError("the state file does not match this machine: port 0x61 differs")
    }
    if let systemControlB { try reader.section("port61", systemControlB) }
  }
}
