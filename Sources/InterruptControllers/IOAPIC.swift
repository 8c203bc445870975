import Synchronization
import VMCore

/// The I/O APIC (Intel 82093AA datasheet): 24 input pins, each with a redirection entry that
/// turns the pin's signal into an interrupt message for the local APICs.
///
/// Registers are reached indirectly: IOREGSEL at offset 0x00 selects, IOWIN at 0x10 reads or
/// writes. Inputs are logical assertion levels (`setPinLevel`); the polarity bit is stored but
/// not applied, as the routing layer already delivers "asserted". Thread-safe.
public final class IOAPIC: MMIODevice, EndOfInterruptListener {
  /// Default guest-physical base.
  public static let defaultBase: UInt64 = 0xFEC0_0000
  /// Size of the MMIO window claimed on the bus.
  public static let mmioLength: UInt64 = 0x1000
  /// Number of input pins / redirection entries.
  public static let pinCount = 24
  /// Version register: version 0x11, maximum redirection entry 0x17.
  public static let versionRegister: UInt32 = 0x0017_0011

  /// Redirection-entry bits.
  enum Entry {
    static let deliveryStatus: UInt64 = 1 << 12
    static let remoteIRR: UInt64 = 1 << 14
    static let levelTriggered: UInt64 = 1 << 15
    static let masked: UInt64 = 1 << 16
    /// Bits the guest can write: vector, delivery mode, destination mode, polarity, trigger, mask, destination.
    static let writable: UInt64 = 0xFF00_0000_0001_AFFF
  }

  private struct State {
    var id: UInt32
    var selector: UInt32 = 0
    var entries = [UInt64](repeating: Entry.masked, count: IOAPIC.pinCount)
    var levels = [Bool](repeating: false, count: IOAPIC.pinCount)
  }

  private let bus: APICBus
  private let state: Mutex<State>

  /// Creates the IOAPIC with all entries masked and registers it for EOI broadcasts on `bus`.
  public init(bus: APICBus, id: UInt8 = 0) {
    self.bus = bus
    state = Mutex(State(id: UInt32(id & 0x0F)))
    bus.addEndOfInterruptListener(self)
  }

  /// Drives input `pin` to `asserted`. Edge entries deliver on a rising edge (edges on masked
  /// pins are lost, per the datasheet); level entries deliver while asserted and not awaiting EOI.
  public func setPinLevel(_ pin: Int, asserted: Bool) {
    guard pin >= 0 && pin < Self.pinCount else { return }
    state.withLock { state in
      let rising = asserted && !state.levels[pin]
      state.levels[pin] = asserted
      let entry = state.entries[pin]
      if entry & Entry.levelTriggered != 0 {
        if asserted { service(pin, &state) }
      } else if rising && entry & Entry.masked == 0 {
        send(entry)
      }
    }
  }

  /// The vector an edge on `pin` sends, or nil when the entry is masked.
  public func unmaskedVector(pin: Int) -> UInt8? {
    guard pin >= 0 && pin < Self.pinCount else { return nil }
    let entry = state.withLock { $0.entries[pin] }
    return entry & Entry.masked == 0 ? UInt8(truncatingIfNeeded: entry) : nil
  }

  /// The redirection entry of `pin` (for tests and debugging).
  public func redirectionEntry(_ pin: Int) -> UInt64 { state.withLock { $0.entries[pin] } }

  public func endOfInterrupt(vector: UInt8) {
    state.withLock { state in
      for pin in 0..<Self.pinCount {
        let entry = state.entries[pin]
        guard entry & Entry.remoteIRR != 0, UInt8(truncatingIfNeeded: entry) == vector else { continue }
        state.entries[pin] &= ~Entry.remoteIRR
        if state.levels[pin] { service(pin, &state) }
      }
    }
  }

  public func mmioRead(offset: UInt64, size: Int) -> UInt64 {
    let value: UInt32 = state.withLock { state in
      switch offset & ~3 {
      case 0x00: return state.selector
      case 0x10: return readRegister(state.selector, state)
      default: return 0
      }
    }
    let shifted = UInt64(value) >> UInt64((offset & 3) * 8)
    return size >= 8 ? shifted : shifted & ((1 << UInt64(size * 8)) - 1)
  }

  public func mmioWrite(offset: UInt64, size: Int, value: UInt64) {
    let word = UInt32(truncatingIfNeeded: value)
    state.withLock { state in
      switch offset {
      case 0x00: state.selector = word & 0xFF
      case 0x10: writeRegister(state.selector, word, &state)
      default: break
      }
    }
  }

  private func readRegister(_ index: UInt32, _ state: State) -> UInt32 {
    switch index {
    case 0x00: return state.id << 24
    case 0x01: return Self.versionRegister
    case 0x02: return state.id << 24
    case 0x10..<(0x10 + 2 * UInt32(Self.pinCount)):
      let entry = state.entries[Int(index - 0x10) / 2]
      return UInt32(truncatingIfNeeded: index & 1 == 0 ? entry : entry >> 32)
    default: return 0
    }
  }

  private func writeRegister(_ index: UInt32, _ value: UInt32, _ state: inout State) {
    switch index {
    case 0x00:
      state.id = (value >> 24) & 0x0F
    case 0x10..<(0x10 + 2 * UInt32(Self.pinCount)):
      let pin = Int(index - 0x10) / 2
      var entry = state.entries[pin]
      if index & 1 == 0 {
        entry = (entry & ~(Entry.writable & 0xFFFF_FFFF)) | (UInt64(value) & Entry.writable)
      } else {
        entry = (entry & 0xFFFF_FFFF) | ((UInt64(value) << 32) & Entry.writable)
      }
      // Switching to edge mode clears remote IRR (Linux relies on this with version 0x11 IOAPICs).
      if entry & Entry.levelTriggered == 0 { entry &= ~Entry.remoteIRR }
      state.entries[pin] = entry
      if entry & Entry.levelTriggered != 0 && state.levels[pin] { service(pin, &state) }
    default:
      break
    }
  }

  /// Delivers a level-triggered, asserted pin unless masked or awaiting EOI.
  private func service(_ pin: Int, _ state: inout State) {
    let entry = state.entries[pin]
    guard entry & (Entry.masked | Entry.remoteIRR) == 0 else { return }
    let mode = APICDeliveryMode(rawValue: UInt8((entry >> 8) & 7))
    if mode == .fixed || mode == .lowestPriority { state.entries[pin] |= Entry.remoteIRR }
    send(entry)
  }

  /// Sends the message an entry describes. Runs under the IOAPIC lock so remote-IRR and EOI stay
  /// ordered (the lock order is IOAPIC, then local APIC).
  private func send(_ entry: UInt64) {
    guard let mode = APICDeliveryMode(rawValue: UInt8((entry >> 8) & 7)), mode != .startup else { return }
    let message = InterruptMessage(
      vector: UInt8(truncatingIfNeeded: entry), deliveryMode: mode,
      levelTriggered: entry & Entry.levelTriggered != 0)
    bus.send(message, destination: UInt8(truncatingIfNeeded: entry >> 56), logical: entry & (1 << 11) != 0)
  }
}

// MARK: Machine state

/// ID, register selector, the 24 redirection entries and the input pin levels.
extension IOAPIC: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    let saved = state.withLock { $0 }
    writer.write(saved.id)
    writer.write(saved.selector)
    writer.write(array: saved.entries)
    writer.write(UInt32(saved.levels.count))
    for level in saved.levels { writer.write(level) }
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    var restored = State(id: try reader.read())
    restored.selector = try reader.read()
    restored.entries = try reader.readArray(UInt64.self, count: Self.pinCount, "IOAPIC redirection table")
    guard Int(try reader.read(UInt32.self)) == Self.pinCount else { throw .invalid("IOAPIC pin count") }
    for pin in 0..<Self.pinCount { restored.levels[pin] = try reader.readBool() }
    state.withLock { $0 = restored }
  }
}
