import Devices
import Synchronization
import VMCore

/// Records every interrupt line change, as an interrupt controller would see them.
final class RecordingInterruptSink: InterruptSink {
  private let state = Mutex<(levels: [UInt32: Bool], history: [(line: UInt32, level: Bool)])>(([:], []))

  func setInterruptLevel(line: UInt32, level: Bool) {
    state.withLock { state in
      state.levels[line] = level
      state.history.append((line, level))
    }
  }

  /// The current level of `line` (low if never driven).
  func level(_ line: UInt32) -> Bool { state.withLock { $0.levels[line] ?? false } }

  /// Every level driven on `line`, oldest first.
  func history(_ line: UInt32) -> [Bool] { state.withLock { $0.history.filter { $0.line == line }.map(\.level) } }

  /// Number of low-to-high transitions seen on `line`.
  func risingEdges(_ line: UInt32) -> Int {
    var previous = false
    var edges = 0
    for level in history(line) {
      if level && !previous { edges += 1 }
      previous = level
    }
    return edges
  }

  func clearHistory() { state.withLock { $0.history.removeAll() } }
}

/// A bus with the legacy devices installed, driven as a guest would.
struct LegacyMachine {
  let bus = IOBus()
  let control = MachineControl()
  let interrupts = InterruptRouter()
  let sink = RecordingInterruptSink()
  let serialOutput = CapturingSerialBackend()
  let devices: InstalledLegacyDevices

  init(memorySize: UInt64 = 512 << 20, includeSystemControlPortB: Bool = true) throws {
    interrupts.attach(sink)
    devices = try LegacyDevices.install(
      on: bus, control: control, interrupts: interrupts, serialBackend: serialOutput, memorySize: memorySize,
      includeSystemControlPortB: includeSystemControlPortB)
  }

  func outb(_ port: UInt16, _ value: UInt8) { bus.portWrite(port, size: 1, value: UInt32(value)) }
  func inb(_ port: UInt16) -> UInt8 { UInt8(truncatingIfNeeded: bus.portRead(port, size: 1)) }
}

/// A small deterministic random number generator (SplitMix64) so failures reproduce.
struct SeededGenerator: RandomNumberGenerator {
  var state: UInt64
  init(seed: UInt64) { state = seed }
  mutating func next() -> UInt64 {
    state &+= 0x9E37_79B9_7F4A_7C15
    var mixed = state
    mixed = (mixed ^ (mixed >> 30)) &* 0xBF58_476D_1CE4_E5B9
    mixed = (mixed ^ (mixed >> 27)) &* 0x94D0_49BB_1331_11EB
    return mixed ^ (mixed >> 31)
  }
}
