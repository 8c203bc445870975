import Glibc
import Synchronization
import VMCore

/// A source of virtual machine time. Every timer of the machine (LAPIC timers, PIT, TSC,
/// ACPI PM timer) derives its counts from one clock, so all of them agree with each other.
public protocol MachineClock: AnyObject, Sendable {
  /// Nanoseconds of virtual time since the machine started; never decreases.
  var nanoseconds: UInt64 { get }
}

extension MachineClock {
  /// The time-stamp counter as the clock defines it (`TimeBase.tscFrequency` ticks per second).
  /// The software CPU's RDTSC returns this plus its TSC offset.
  public var tsc: UInt64 { TimeBase.ticks(nanoseconds: nanoseconds, frequency: TimeBase.tscFrequency) }
}

/// Conversions between virtual nanoseconds and the tick counts of fixed-frequency counters.
public enum TimeBase {
  /// The fixed frequency of the virtual TSC: 1 GHz, so one TSC tick is one nanosecond.
  /// CPUID leaf 0x15/0x16 (or the kernel's calibration) should report this value.
  public static let tscFrequency: UInt64 = 1_000_000_000
  /// Nanoseconds per second.
  public static let nanosecondsPerSecond: UInt64 = 1_000_000_000

  /// Whole ticks of a `frequency` Hz counter elapsed after `nanoseconds` (rounded down).
  @inline(__always)
  public static func ticks(nanoseconds: UInt64, frequency: UInt64) -> UInt64 {
    if frequency == nanosecondsPerSecond { return nanoseconds }
    let product = nanoseconds.multipliedFullWidth(by: frequency)
    guard product.high < nanosecondsPerSecond else { return UInt64.max }
    return nanosecondsPerSecond.dividingFullWidth(product).quotient
  }

  /// The first nanosecond at which `ticks` ticks of a `frequency` Hz counter have elapsed
  /// (rounded up, so `ticks(nanoseconds(ticks)) >= ticks`). Saturates at `UInt64.max`.
  @inline(__always)
  public static func nanoseconds(ticks: UInt64, frequency: UInt64) -> UInt64 {
    if frequency == nanosecondsPerSecond { return ticks }
    let product = ticks.multipliedFullWidth(by: nanosecondsPerSecond)
    guard product.high < frequency else { return UInt64.max }
    let (quotient, remainder) = frequency.dividingFullWidth(product)
    if remainder == 0 { return quotient }
    return quotient == UInt64.max ? quotient : quotient + 1
  }

  /// TSC value at virtual time `nanoseconds`.
  public static func tsc(atNanoseconds nanoseconds: UInt64) -> UInt64 {
    ticks(nanoseconds: nanoseconds, frequency: tscFrequency)
  }

  /// First virtual time at which the TSC reaches `tsc`.
  public static func nanoseconds(atTSC tsc: UInt64) -> UInt64 {
    nanoseconds(ticks: tsc, frequency: tscFrequency)
  }
}

/// The machine clock in production: CLOCK_MONOTONIC minus the moment the machine was created,
/// stopped while paused. Reading it takes no lock.
public final class VirtualClock: MachineClock {
  /// Host monotonic nanoseconds that correspond to virtual time zero.
  private let origin: Atomic<UInt64>
  /// The frozen virtual time while paused, `UInt64.max` while running.
  private let frozenAt = Atomic<UInt64>(UInt64.max)
  private let pauseLock = Mutex<Void>(())

  /// Starts the clock at virtual time zero.
  public init() {
    origin = Atomic(Self.hostMonotonic())
  }

  /// Host CLOCK_MONOTONIC in nanoseconds.
  public static func hostMonotonic() -> UInt64 {
    var spec = timespec()
    clock_gettime(CLOCK_MONOTONIC, &spec)
    return UInt64(spec.tv_sec) &* 1_000_000_000 &+ UInt64(spec.tv_nsec)
  }

  public var nanoseconds: UInt64 {
    let frozen = frozenAt.load(ordering: .acquiring)
    if frozen != UInt64.max { return frozen }
    let now = Self.hostMonotonic()
    let start = origin.load(ordering: .acquiring)
    return now >= start ? now - start : 0
  }

  /// Whether the clock is paused.
  public var isPaused: Bool { frozenAt.load(ordering: .acquiring) != UInt64.max }

  /// Stops virtual time (e.g. while the machine is paused or snapshotted).
  public func pause() {
    pauseLock.withLock { _ in
      guard frozenAt.load(ordering: .acquiring) == UInt64.max else { return }
      frozenAt.store(nanoseconds, ordering: .releasing)
    }
  }

  /// Lets virtual time run again from where it was paused.
  public func resume() {
    pauseLock.withLock { _ in
      let frozen = frozenAt.load(ordering: .acquiring)
      guard frozen != UInt64.max else { return }
      origin.store(Self.hostMonotonic() &- frozen, ordering: .releasing)
      frozenAt.store(UInt64.max, ordering: .releasing)
    }
  }
}

/// A clock that only moves when told to: deterministic tests and replay.
public final class ManualClock: MachineClock {
  private let now: Atomic<UInt64>

  /// Creates the clock at `nanoseconds`.
  public init(nanoseconds: UInt64 = 0) { now = Atomic(nanoseconds) }

  public var nanoseconds: UInt64 { now.load(ordering: .acquiring) }

  /// Moves time forward by `delta` nanoseconds.
  public func advance(by delta: UInt64) { _ = now.add(delta, ordering: .acquiringAndReleasing) }

  /// Sets the time; it must not go backwards.
  public func set(nanoseconds: UInt64) {
    precondition(nanoseconds >= now.load(ordering: .acquiring), "a machine clock never goes backwards")
    now.store(nanoseconds, ordering: .releasing)
  }
}

// MARK: Machine state

/// The virtual time. Restoring it makes the clock read the saved time (frozen when this clock
/// is paused, else continuing from it), so every timer, the TSC and the guest's clocks continue
/// monotonically from the snapshot.
extension VirtualClock: StateSavable {
  public func saveState(into writer: inout StateWriter) { writer.write(nanoseconds) }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    let saved: UInt64 = try reader.read()
    pauseLock.withLock { _ in
      if frozenAt.load(ordering: .acquiring) != UInt64.max {
        frozenAt.store(saved, ordering: .releasing)
      } else {
        origin.store(Self.hostMonotonic() &- saved, ordering: .releasing)
      }
    }
  }
}
