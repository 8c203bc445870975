import Synchronization
import VMCore

/// One 8254 counter. Counting is computed from the clock: `elapsedTicks(now)` is how many
/// 1.193182 MHz input clocks have passed since the count was loaded (minus time the gate held it).
struct PITChannel {
  var mode: UInt8 = 0
  /// 1 = low byte, 2 = high byte, 3 = low then high.
  var access: UInt8 = 3
  var bcd = false
  /// The loaded count N (1...65536; writing 0 means 65536).
  var reload: UInt32 = 0x10000
  /// A control word was written and no count has been loaded since.
  var nullCount = true
  var writeHighNext = false
  var pendingLow: UInt8 = 0
  var readHighNext = false
  var latchedCount: UInt16?
  var latchedCountHighNext = false
  var latchedStatus: UInt8?
  var gate: Bool
  /// Counting has been started (a count was loaded and, for modes 1/5, the gate triggered).
  var armed = false
  /// Ticks accumulated before the current running segment.
  var baseTicks: UInt64 = 0
  /// Virtual time at which the current running segment started; nil while the gate holds the count.
  var runningSince: UInt64?
  /// Next tick count (in `elapsedTicks` terms) at which OUT rises (channel 0 raises IRQ 0 then).
  var nextEventTick: UInt64?
  /// OUT rising edges that are due and whose interrupt has not been raised yet (channel 0:
  /// the backlog `ProgrammableIntervalTimer` reinjects one at a time).
  var owedEvents: UInt64 = 0

  init(gate: Bool) { self.gate = gate }

  var isPeriodic: Bool { mode == 2 || mode == 3 }

  func elapsedTicks(now: UInt64) -> UInt64 {
    guard let start = runningSince, now >= start else { return baseTicks }
    return baseTicks &+ TimeBase.ticks(nanoseconds: now - start, frequency: ProgrammableIntervalTimer.frequency)
  }

  /// The counting element's value at `now`.
  func count(now: UInt64) -> UInt16 {
    guard armed else { return UInt16(truncatingIfNeeded: reload) }
    let elapsed = elapsedTicks(now: now)
    let initial = UInt64(reload)
    switch mode {
    case 2:
      return UInt16(truncatingIfNeeded: initial - elapsed % initial)
    case 3:
      // Counts down by two, twice per period (the first half is one count longer for odd N).
      let phase = elapsed % initial
      let highHalf = (initial + 1) / 2
      let intoHalf = phase < highHalf ? phase : phase - highHalf
      return UInt16(truncatingIfNeeded: (initial & ~1) &- 2 &* intoHalf)
    default:
      return UInt16(truncatingIfNeeded: (initial &- elapsed) & 0xFFFF)
    }
  }

  /// The OUT pin at `now`.
  func output(now: UInt64) -> Bool {
    let elapsed = elapsedTicks(now: now)
    let initial = UInt64(reload)
    switch mode {
    case 0: return armed && elapsed >= initial
    case 1: return !armed || elapsed >= initial
    case 2: return !armed || runningSince == nil || elapsed % initial != initial - 1
    case 3: return !armed || runningSince == nil || elapsed % initial < (initial + 1) / 2
    default: return !armed || elapsed != initial  // modes 4 and 5: one low clock at terminal count
    }
  }

  /// Starts counting from the loaded count at `now` (if the gate allows).
  mutating func start(now: UInt64) {
    armed = true
    baseTicks = 0
    runningSince = (gate || mode == 1 || mode == 5) ? now : nil
    nextEventTick = UInt64(reload)
    owedEvents = 0
  }

  mutating func setGate(_ level: Bool, now: UInt64) {
    let rising = level && !gate
    guard level != gate else { return }
    gate = level
    switch mode {
    case 1, 5:
      if rising && !nullCount { start(now: now) }
    case 2, 3:
      if rising {
        if armed { start(now: now) }
      } else {
        runningSince = nil
      }
    default:
      guard armed else { return }
      if level {
        runningSince = now
      } else {
        baseTicks = elapsedTicks(now: now)
        runningSince = nil
      }
    }
  }

  /// Virtual time of the next OUT rising edge, if one is scheduled.
  func nextEventTime() -> UInt64? {
    guard armed, let start = runningSince, let tick = nextEventTick else { return nil }
    guard tick > baseTicks else { return start }
    return start &+ TimeBase.nanoseconds(ticks: tick - baseTicks, frequency: ProgrammableIntervalTimer.frequency)
  }

  /// Consumes the OUT edges due by `now` and adds them to `owedEvents`, at most `limit` in
  /// all; returns whether any happened.
  mutating func takeEvents(now: UInt64, limit: UInt64) -> Bool {
    guard armed, runningSince != nil, let tick = nextEventTick else { return false }
    let elapsed = elapsedTicks(now: now)
    guard elapsed >= tick else { return false }
    var edges: UInt64 = 1
    if isPeriodic {
      let initial = UInt64(reload)
      edges = (elapsed - tick) / initial + 1
      nextEventTick = (elapsed / initial + 1) * initial
    } else {
      nextEventTick = nil
    }
    owedEvents = min(owedEvents &+ edges, max(limit, 1))
    return true
  }

  /// How many periods of one second: the bound of the reinjection backlog.
  var periodsPerSecond: UInt64 { max(ProgrammableIntervalTimer.frequency / UInt64(reload), 1) }

  func statusByte(now: UInt64) -> UInt8 {
    (output(now: now) ? 0x80 : 0) | (nullCount ? 0x40 : 0) | (access << 4) | (mode << 1) | (bcd ? 1 : 0)
  }

  mutating func writeControl(access: UInt8, mode: UInt8, bcd: Bool) {
    self.access = access
    self.mode = mode > 5 ? mode & 3 : mode
    self.bcd = bcd
    nullCount = true
    armed = false
    runningSince = nil
    nextEventTick = nil
    owedEvents = 0
    writeHighNext = false
    readHighNext = false
    latchedCount = nil
  }

  mutating func latchCount(now: UInt64) {
    guard latchedCount == nil else { return }
    latchedCount = count(now: now)
    latchedCountHighNext = false
  }

  /// A byte written to the counter's port; returns whether a full count was loaded.
  mutating func writeCount(_ byte: UInt8, now: UInt64) {
    var value: UInt32
    switch access {
    case 1: value = UInt32(byte)
    case 2: value = UInt32(byte) << 8
    default:
      if !writeHighNext {
        pendingLow = byte
        writeHighNext = true
        return
      }
      writeHighNext = false
      value = UInt32(pendingLow) | UInt32(byte) << 8
    }
    if value == 0 { value = 0x10000 }
    if value == 1 && (mode == 2 || mode == 3) { value = 2 }
    reload = value
    nullCount = false
    if mode == 1 || mode == 5 {
      return  // waits for a gate trigger
    }
    start(now: now)
  }

  mutating func readByte(now: UInt64) -> UInt8 {
    if let status = latchedStatus {
      latchedStatus = nil
      return status
    }
    if let latched = latchedCount {
      switch access {
      case 1:
        latchedCount = nil
        return UInt8(truncatingIfNeeded: latched)
      case 2:
        latchedCount = nil
        return UInt8(truncatingIfNeeded: latched >> 8)
      default:
        if latchedCountHighNext {
          latchedCount = nil
          return UInt8(truncatingIfNeeded: latched >> 8)
        }
        latchedCountHighNext = true
        return UInt8(truncatingIfNeeded: latched)
      }
    }
    let value = count(now: now)
    switch access {
    case 1: return UInt8(truncatingIfNeeded: value)
    case 2: return UInt8(truncatingIfNeeded: value >> 8)
    default:
      defer { readHighNext.toggle() }
      return UInt8(truncatingIfNeeded: readHighNext ? value >> 8 : value)
    }
  }
}

/// The 8254 programmable interval timer (ports 0x40-0x43), input clock 1.193182 MHz.
///
/// Counts are derived from the machine clock, never ticked. Channel 0's OUT rising edge raises
/// IRQ 0 as a pulse on `irq0` (periodic in modes 2 and 3): the run loop calls `poll(now:)` and
/// sleeps at most until `nextDeadline`. When the run loop comes late (the host descheduled the
/// vCPU thread for several periods), the missed edges are not merged into one interrupt: they
/// are owed and raised one at a time, each once the previous one was taken (`isTickPending`
/// says it no longer waits in a controller), like QEMU's `lost_tick_policy=delay`; the backlog
/// holds at most one second of periods. Channel 2's gate and OUT are reached through port 0x61
/// (`SystemControlPort`). BCD counting is recorded in the status byte but counts are binary.
/// Thread-safe.
public final class ProgrammableIntervalTimer: PortIODevice {
  /// Input clock of every counter, in Hz.
  public static let frequency: UInt64 = 1_193_182
  /// First port (counters 0-2 data at 0x40-0x42, mode/command at 0x43).
  public static let basePort: UInt16 = 0x40

  private let clock: any MachineClock
  private let irq0: InterruptLine?
  private let isTickPending: (@Sendable () -> Bool)?
  private let channels: Mutex<[PITChannel]>
  private let deadlineCache = Atomic<UInt64>(UInt64.max)
  private let owedCache = Atomic<UInt64>(0)

  /// Creates the PIT; channel 0's interrupt goes to `irq0` (GSI 0). `isTickPending` says
  /// whether the last IRQ 0 still waits to be taken (in the 8259's or a local APIC's request
  /// register): an owed tick is raised only when it returns false. Without it, each poll
  /// raises one owed tick.
  public init(clock: any MachineClock, irq0: InterruptLine?, isTickPending: (@Sendable () -> Bool)? = nil) {
    self.clock = clock
    self.irq0 = irq0
    self.isTickPending = isTickPending
    channels = Mutex([PITChannel(gate: true), PITChannel(gate: true), PITChannel(gate: false)])
  }

  /// Registers ports 0x40-0x43 on `bus`.
  public func register(on bus: IOBus) throws(IOBusError) {
    try bus.registerPorts(Self.basePort, count: 4, device: self)
  }

  /// Virtual time (ns) of channel 0's next interrupt, if one is scheduled.
  public var nextDeadline: UInt64? {
    let deadline = deadlineCache.load(ordering: .acquiring)
    return deadline == UInt64.max ? nil : deadline
  }

  /// Counts channel 0's OUT edges due by `now` and raises IRQ 0 for the oldest owed one unless
  /// the previous one is still pending. Lock-free when nothing is due or owed.
  public func poll(now: UInt64) {
    if now >= deadlineCache.load(ordering: .acquiring) {
      mutate { _ = $0[0].takeEvents(now: now, limit: $0[0].periodsPerSecond) }
    }
    guard owedCache.load(ordering: .acquiring) != 0 else { return }
    if let isTickPending, isTickPending() { return }
    let raise = mutate { channels -> Bool in
      guard channels[0].owedEvents > 0 else { return false }
      channels[0].owedEvents -= 1
      return true
    }
    if raise { irq0?.pulse() }
  }

  /// Channel 0 interrupts that are due and not raised yet.
  public var owedTicks: UInt64 { owedCache.load(ordering: .acquiring) }

  /// Polls at the clock's current time.
  public func poll() { poll(now: clock.nanoseconds) }

  /// Channel 2's gate input (port 0x61 bit 0).
  public var channel2Gate: Bool { channels.withLock { $0[2].gate } }

  /// Drives channel 2's gate (port 0x61 bit 0).
  public func setChannel2Gate(_ level: Bool) {
    let now = clock.nanoseconds
    mutate { $0[2].setGate(level, now: now) }
  }

  /// Channel 2's OUT pin (port 0x61 bit 5).
  public var channel2Output: Bool {
    let now = clock.nanoseconds
    return channels.withLock { $0[2].output(now: now) }
  }

  public func portRead(port: UInt16, size: Int) -> UInt32 {
    let index = Int(port &- Self.basePort)
    guard index < 3 else { return 0xFF }
    let now = clock.nanoseconds
    return UInt32(mutate { $0[index].readByte(now: now) })
  }

  public func portWrite(port: UInt16, size: Int, value: UInt32) {
    let byte = UInt8(truncatingIfNeeded: value)
    let index = Int(port &- Self.basePort)
    let now = clock.nanoseconds
    mutate { channels in
      if index < 3 {
        channels[index].writeCount(byte, now: now)
        return
      }
      let select = Int(byte >> 6)
      if select == 3 {
        // Read-back: bit 5 clear latches counts, bit 4 clear latches status, bits 1-3 select.
        for channel in 0..<3 where byte & (2 << channel) != 0 {
          if byte & 0x20 == 0 { channels[channel].latchCount(now: now) }
          if byte & 0x10 == 0 && channels[channel].latchedStatus == nil {
            channels[channel].latchedStatus = channels[channel].statusByte(now: now)
          }
        }
        return
      }
      let access = (byte >> 4) & 3
      if access == 0 {
        channels[select].latchCount(now: now)
      } else {
        channels[select].writeControl(access: access, mode: (byte >> 1) & 7, bcd: byte & 1 != 0)
      }
    }
  }

  private func mutate<Result>(_ body: (inout [PITChannel]) -> Result) -> Result {
    channels.withLock { channels in
      let result = body(&channels)
      deadlineCache.store(channels[0].nextEventTime() ?? UInt64.max, ordering: .releasing)
      owedCache.store(channels[0].owedEvents, ordering: .releasing)
      return result
    }
  }
}

/// Port 0x61, system control port B / NMI status: bit 0 = PIT channel 2 gate, bit 1 = speaker
/// data enable, bits 2-3 = parity/channel-check disable (stored), bit 4 = refresh toggle (flips
/// every 15.085 µs of virtual time), bit 5 = PIT channel 2 OUT. Thread-safe.
public final class SystemControlPort: PortIODevice {
  /// The port.
  public static let port: UInt16 = 0x61
  /// Period of the DRAM refresh request toggle in bit 4, in nanoseconds.
  public static let refreshTogglePeriod: UInt64 = 15_085

  private let pit: ProgrammableIntervalTimer
  private let clock: any MachineClock
  private let stored = Mutex<UInt8>(0)

  /// Creates the port for `pit`'s channel 2.
  public init(pit: ProgrammableIntervalTimer, clock: any MachineClock) {
    self.pit = pit
    self.clock = clock
  }

  /// Registers port 0x61 on `bus`.
  public func register(on bus: IOBus) throws(IOBusError) {
    try bus.registerPorts(Self.port, count: 1, device: self)
  }

  public func portRead(port: UInt16, size: Int) -> UInt32 {
    let bits = stored.withLock { $0 } & 0x0E
    let refresh: UInt8 = (clock.nanoseconds / Self.refreshTogglePeriod) & 1 == 1 ? 0x10 : 0
    let out: UInt8 = pit.channel2Output ? 0x20 : 0
    let gate: UInt8 = pit.channel2Gate ? 0x01 : 0
    return UInt32(bits | refresh | out | gate)
  }

  public func portWrite(port: UInt16, size: Int, value: UInt32) {
    let byte = UInt8(truncatingIfNeeded: value)
    stored.withLock { $0 = byte & 0x0F }
    pit.setChannel2Gate(byte & 1 != 0)
  }
}

// MARK: Machine state

extension PITChannel {
  fileprivate func save(into writer: inout StateWriter) {
    writer.write(mode)
    writer.write(access)
    writer.write(bcd)
    writer.write(reload)
    writer.write(nullCount)
    writer.write(writeHighNext)
    writer.write(pendingLow)
    writer.write(readHighNext)
    writer.write(optional: latchedCount)
    writer.write(latchedCountHighNext)
    writer.write(optional: latchedStatus)
    writer.write(gate)
    writer.write(armed)
    writer.write(baseTicks)
    writer.write(optional: runningSince)
    writer.write(optional: nextEventTick)
  }

  fileprivate static func restore(from reader: inout StateReader) throws(MachineStateError) -> PITChannel {
    let mode: UInt8 = try reader.read()
    let access: UInt8 = try reader.read()
    guard mode <= 5, (1...3).contains(access) else { throw .invalid("8254 counter mode") }
    var channel = PITChannel(gate: false)
    channel.mode = mode
    channel.access = access
    channel.bcd = try reader.readBool()
    channel.reload = try reader.read()
    guard (1...0x10000).contains(channel.reload) else { throw .invalid("8254 counter reload value") }
    channel.nullCount = try reader.readBool()
    channel.writeHighNext = try reader.readBool()
    channel.pendingLow = try reader.read()
    channel.readHighNext = try reader.readBool()
    channel.latchedCount = try reader.readOptional(UInt16.self)
    channel.latchedCountHighNext = try reader.readBool()
    channel.latchedStatus = try reader.readOptional(UInt8.self)
    channel.gate = try reader.readBool()
    channel.armed = try reader.readBool()
    channel.baseTicks = try reader.read()
    channel.runningSince = try reader.readOptional(UInt64.self)
    channel.nextEventTick = try reader.readOptional(UInt64.self)
    return channel
  }
}

/// The three counters; their running segments are virtual-clock times.
extension ProgrammableIntervalTimer: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    let saved = channels.withLock { $0 }
    for channel in saved { channel.save(into: &writer) }
    writer.write(saved[0].owedEvents)
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    var restored: [PITChannel] = []
    for _ in 0..<3 { restored.append(try PITChannel.restore(from: &reader)) }
    // Sections written before the backlog was saved end here: nothing owed.
    let owed: UInt64 = reader.isAtEnd ? 0 : try reader.read()
    restored[0].owedEvents = min(owed, restored[0].periodsPerSecond)
    mutate { $0 = restored }
  }
}

/// Port 0x61's stored bits (the gate lives in the PIT).
extension SystemControlPort: StateSavable {
  public func saveState(into writer: inout StateWriter) { writer.write(stored.withLock { $0 }) }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    let value: UInt8 = try reader.read()
    stored.withLock { $0 = value & 0x0F }
  }
}
