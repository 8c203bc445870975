import Synchronization
import VMCore

/// The ACPI fixed-hardware registers of a classic (not hardware-reduced) PC, at the ports the
/// FADT names: PM1a event block (status/enable) at 0x600, PM1a control at 0x604 and the 32-bit
/// PM timer at 0x608 (ACPI 6.x §4.8).
///
/// Writing SLP_EN with the `\_S5_` SLP_TYP powers the machine off through `MachineControl`.
/// The power-button status drives the SCI line when enabled. Accesses of any width are split
/// into bytes, so 8-, 16- and 32-bit guests accesses all work. Thread-safe.
public final class ACPIPowerManagement: PortIODevice {
  /// PM1a_EVT_BLK: PM1_STS (16 bits) then PM1_EN (16 bits).
  public static let eventBlockPort: UInt16 = 0x600
  /// PM1a_CNT_BLK (16 bits).
  public static let controlBlockPort: UInt16 = 0x604
  /// PM_TMR_BLK (32 bits).
  public static let timerPort: UInt16 = 0x608
  /// Ports claimed from `eventBlockPort`.
  public static let portCount = 12
  /// The SCI's ISA IRQ / GSI.
  public static let sciInterrupt: UInt8 = 9
  /// SLP_TYP for S5 (soft-off), as the DSDT's `\_S5_` says.
  public static let s5SleepType: UInt8 = 5
  /// The PM timer's frequency in Hz.
  public static let timerFrequency: UInt64 = 3_579_545

  /// PM1_STS / PM1_EN bits.
  public enum Event {
    public static let timer: UInt16 = 1 << 0
    public static let globalLock: UInt16 = 1 << 5
    public static let powerButton: UInt16 = 1 << 8
    public static let rtc: UInt16 = 1 << 10
    public static let wake: UInt16 = 1 << 15
  }

  /// PM1_CNT bits.
  public enum Control {
    public static let sciEnable: UInt16 = 1 << 0
    public static let sleepEnable: UInt16 = 1 << 13
  }

  private struct Registers {
    var status: UInt16 = 0
    var enable: UInt16 = 0
    var control: UInt16 = Control.sciEnable
    var sciLevel = false
  }

  private let control: MachineControl
  private let sci: InterruptLine?
  private let nanoseconds: @Sendable () -> UInt64
  private let registers = Mutex(Registers())

  /// Creates the PM registers. `nanoseconds` is the machine clock (for the PM timer);
  /// `sci` is the SCI line (GSI 9).
  public init(control: MachineControl, sci: InterruptLine?, nanoseconds: @escaping @Sendable () -> UInt64) {
    self.control = control
    self.sci = sci
    self.nanoseconds = nanoseconds
  }

  /// Registers ports 0x600-0x60B on `bus`.
  public func register(on bus: IOBus) throws(IOBusError) {
    try bus.registerPorts(Self.eventBlockPort, count: Self.portCount, device: self)
  }

  /// Presses the (fixed-feature) power button: sets PWRBTN_STS and raises the SCI if enabled,
  /// so the guest can shut down cleanly.
  public func pressPowerButton() {
    update { $0.status |= Event.powerButton }
  }

  /// The PM timer value (32 bits, TMR_VAL_EXT) at the current time.
  public var timerValue: UInt32 {
    UInt32(truncatingIfNeeded: timerTicks(nanoseconds()))
  }

  public func portRead(port: UInt16, size: Int) -> UInt32 {
    let first = Int(port &- Self.eventBlockPort)
    let snapshot = registers.withLock { $0 }
    let timer = timerValue
    var value: UInt32 = 0
    for lane in 0..<min(size, 4) {
      let offset = first + lane
      let word: UInt32
      switch offset {
      case 0, 1: word = UInt32(snapshot.status)
      case 2, 3: word = UInt32(snapshot.enable)
      case 4, 5: word = UInt32(snapshot.control & ~Control.sleepEnable)
      case 8...11: word = timer
      default: word = 0
      }
      let shift = offset >= 8 ? (offset - 8) * 8 : (offset & 1) * 8
      value |= ((word >> UInt32(shift)) & 0xFF) << UInt32(lane * 8)
    }
    return value
  }

  public func portWrite(port: UInt16, size: Int, value: UInt32) {
    let first = Int(port &- Self.eventBlockPort)
    var powerOff = false
    update { registers in
      for lane in 0..<min(size, 4) {
        let byte = UInt16((value >> UInt32(lane * 8)) & 0xFF)
        switch first + lane {
        case 0: registers.status &= ~byte
        case 1: registers.status &= ~(byte << 8)
        case 2: registers.enable = (registers.enable & 0xFF00) | byte
        case 3: registers.enable = (registers.enable & 0x00FF) | (byte << 8)
        case 4:
          // SCI_EN stays set (ACPI-only platform); BM_RLD is stored; GBL_RLS is write-only.
          registers.control = (registers.control & 0xFF00) | (byte & 0x02) | Control.sciEnable
        case 5:
          let high = byte << 8
          registers.control = (registers.control & 0x00FF) | (high & 0x1C00)
          if high & Control.sleepEnable != 0 && (high >> 10) & 7 == UInt16(Self.s5SleepType) { powerOff = true }
        default: break
        }
      }
    }
    if powerOff { control.requestStop(.powerOff) }
  }

  private func timerTicks(_ nanoseconds: UInt64) -> UInt64 {
    let product = nanoseconds.multipliedFullWidth(by: Self.timerFrequency)
    return UInt64(1_000_000_000).dividingFullWidth(product).quotient
  }

  /// Applies `body` and drives the SCI to (status & enable) in order.
  private func update(_ body: (inout Registers) -> Void) {
    registers.withLock { registers in
      body(&registers)
      let level = registers.status & registers.enable & (Event.powerButton | Event.globalLock | Event.rtc) != 0
      if level != registers.sciLevel {
        registers.sciLevel = level
        sci?.set(level)
      }
    }
  }
}

/// The reset control register the FADT's RESET_REG names (port 0xCF9, value 6): writing a value
/// with RST_CPU (bit 2) set resets the machine through `MachineControl`. Thread-safe.
public final class ACPIResetRegister: PortIODevice {
  /// The port (Intel's reset control register).
  public static let port: UInt16 = 0xCF9
  /// RESET_VALUE in the FADT: SYS_RST | RST_CPU.
  public static let resetValue: UInt8 = 0x06

  private let control: MachineControl
  private let stored = Mutex<UInt8>(0)

  /// Creates the register.
  public init(control: MachineControl) { self.control = control }

  /// Registers port 0xCF9 on `bus`.
  public func register(on bus: IOBus) throws(IOBusError) {
    try bus.registerPorts(Self.port, count: 1, device: self)
  }

  public func portRead(port: UInt16, size: Int) -> UInt32 { UInt32(stored.withLock { $0 }) }

  public func portWrite(port: UInt16, size: Int, value: UInt32) {
    let byte = UInt8(truncatingIfNeeded: value)
    stored.withLock { $0 = byte & 0x0A }
    if byte & 0x04 != 0 { control.requestStop(.reset(reason: "ACPI reset register")) }
  }
}

// MARK: Machine state

/// PM1 status, enable and control, and the SCI level (the PM timer reads the machine clock).
extension ACPIPowerManagement: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    let saved = registers.withLock { $0 }
    writer.write(saved.status)
    writer.write(saved.enable)
    writer.write(saved.control)
    writer.write(saved.sciLevel)
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    var restored = Registers()
    restored.status = try reader.read()
    restored.enable = try reader.read()
    restored.control = try reader.read()
    restored.sciLevel = try reader.readBool()
    registers.withLock { $0 = restored }
  }
}
