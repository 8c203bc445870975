import Synchronization
import VMCore

/// System control port A (port 0x92, "fast A20 and reset").
///
/// Bit 0 written as 1 (from 0) resets the machine; bit 1 is the A20 gate, stored and read
/// back but not applied (guest RAM is always addressed with A20 enabled). Other bits are
/// stored. Reads return the stored value with bit 0 clear.
public final class SystemControlPortA: PortIODevice {
  /// The port.
  public static let port: UInt16 = 0x92

  private let control: MachineControl
  private let value = Mutex<UInt8>(0x02)

  /// Creates the port; `control` receives the reset request.
  public init(control: MachineControl) {
    self.control = control
  }

  public func portRead(port: UInt16, size: Int) -> UInt32 {
    let stored = value.withLock { $0 }
    return PortAccess.readBytes(port: port, size: size) { $0 == Self.port ? stored & ~0x01 : nil }
  }

  public func portWrite(port: UInt16, size: Int, value newValue: UInt32) {
    guard port == Self.port else { return }
    let byte = UInt8(truncatingIfNeeded: newValue)
    let reset = value.withLock { stored in
      let rising = byte & 0x01 != 0 && stored & 0x01 == 0
      stored = byte
      return rising
    }
    if reset { control.requestStop(.reset(reason: "port 0x92 fast reset")) }
  }

  /// Whether the guest asked for A20 to be enabled.
  public var a20Enabled: Bool { value.withLock { $0 & 0x02 != 0 } }
}

/// System control port B (port 0x61): PC speaker gate and data, NMI status.
///
/// Bits 0-3 are stored as written (bit 0 gates PIT channel 2, bit 1 drives the speaker,
/// bits 2-3 disable parity/channel-check NMIs). Reads add bit 4, the DRAM refresh indicator,
/// which toggles on every read (code uses it to busy-wait in 15 µs steps), and bit 5, the
/// output of PIT channel 2. The PIT belongs to the interrupt-controller side: it can supply
/// that output through `timer2Output`; without it bit 5 reads as 1 so loops that wait for the
/// output to rise always end. Bits 6-7 (NMI sources) read as 0.
public final class SystemControlPortB: PortIODevice {
  /// The port.
  public static let port: UInt16 = 0x61

  private let timer2Output: (@Sendable () -> Bool)?
  private let state = Mutex<(control: UInt8, refresh: Bool)>((0, false))

  /// Creates the port; `timer2Output` reports the PIT channel 2 output, if a PIT is modelled.
  public init(timer2Output: (@Sendable () -> Bool)? = nil) {
    self.timer2Output = timer2Output
  }

  public func portRead(port: UInt16, size: Int) -> UInt32 {
    guard port == Self.port else { return PortAccess.mask(size) }
    let (control, refresh) = state.withLock { state in
      state.refresh.toggle()
      return (state.control, state.refresh)
    }
    var byte = control & 0x0F
    if refresh { byte |= 0x10 }
    if timer2Output?() ?? true { byte |= 0x20 }
    return PortAccess.readBytes(port: port, size: size) { $0 == Self.port ? byte : nil }
  }

  public func portWrite(port: UInt16, size: Int, value: UInt32) {
    guard port == Self.port else { return }
    state.withLock { $0.control = UInt8(truncatingIfNeeded: value) & 0x0F }
  }

  /// Whether PIT channel 2 is gated on (bit 0), for the PIT model.
  public var timer2Gate: Bool { state.withLock { $0.control & 0x01 != 0 } }

  /// Whether the speaker data bit (bit 1) is set.
  public var speakerDataEnabled: Bool { state.withLock { $0.control & 0x02 != 0 } }
}

/// QEMU's `isa-debug-exit`: writing `value` (1, 2 or 4 bytes) asks the machine to stop with
/// `.debugExit(value:)`, which the process turns into exit status `(value << 1) | 1`.
/// Reads return all ones.
public final class DebugExitDevice: PortIODevice {
  /// The conventional port (`-device isa-debug-exit,iobase=0xf4`).
  public static let defaultPort: UInt16 = 0xF4

  private let control: MachineControl

  /// Creates the device; `control` receives the stop request.
  public init(control: MachineControl) {
    self.control = control
  }

  public func portRead(port: UInt16, size: Int) -> UInt32 { PortAccess.mask(size) }

  public func portWrite(port: UInt16, size: Int, value: UInt32) {
    control.requestStop(.debugExit(value: value & PortAccess.mask(size)))
  }
}

/// The POST code port 0x80: firmware and kernels write progress codes (and Linux uses it as
/// an I/O delay). Writes are remembered for diagnostics; reads return all ones.
public final class PostCodePort: PortIODevice {
  /// The port.
  public static let port: UInt16 = 0x80

  private let lastValue = Mutex<UInt8>(0)

  public init() {}

  public func portRead(port: UInt16, size: Int) -> UInt32 { PortAccess.mask(size) }

  public func portWrite(port: UInt16, size: Int, value: UInt32) {
    lastValue.withLock { $0 = UInt8(truncatingIfNeeded: value) }
  }

  /// The last POST code written.
  public var lastCode: UInt8 { lastValue.withLock { $0 } }
}

// MARK: Machine state

/// Port 0x92's stored value.
extension SystemControlPortA: StateSavable {
  public func saveState(into writer: inout StateWriter) { writer.write(value.withLock { $0 }) }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    let restored: UInt8 = try reader.read()
    value.withLock { $0 = restored }
  }
}

/// Port 0x61's stored control bits and refresh toggle.
extension SystemControlPortB: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    let saved = state.withLock { $0 }
    writer.write(saved.control)
    writer.write(saved.refresh)
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    let control: UInt8 = try reader.read()
    let refresh = try reader.readBool()
    state.withLock { $0 = (control, refresh) }
  }
}
