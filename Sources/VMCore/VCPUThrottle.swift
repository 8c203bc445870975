import Glibc
import Synchronization

/// Slows a running machine's vCPUs down without stopping its clocks: while a throttle of P
/// percent is set, every vCPU thread sleeps after each `timesliceNanoseconds` of host time it
/// ran, for the share that makes it run at most (100 - P) % of the time (P / (100 - P)
/// timeslices), as QEMU's CPU throttle does. Timeslices are wall-clock time, not the thread's
/// CPU time: on a loaded host a runnable vCPU thread waits for a core part of the time, and a
/// CPU-time timeslice then stretches over that wait, so the throttle would slow the guest far
/// less than P % against its unthrottled speed on the same host. Live
/// migration's auto-converge sets it when the guest dirties pages faster than the link sends
/// them (docs/machine-state.md, "Auto-converge").
///
/// vCPU threads call `throttleIfDue(_:)` at their safe points (between interpreter slices on the
/// software CPU, outside KVM_RUN on KVM). While a throttle is set, a ticker thread kicks every
/// vCPU once per timeslice so that a vCPU inside KVM_RUN (or halted) comes back to that check.
/// The guest's clocks keep running while a vCPU sleeps: it gets less CPU, not less time. A
/// pause, a stop request or lifting the throttle wakes sleeping vCPUs at once; after a pause
/// a vCPU sleeps what is left of its sleep (its deadline stays), so pausing a throttled guest
/// often (live migration's dirty-page rounds on the software CPU) gives it no extra time.
public final class VCPUThrottle: Sendable {
  /// How long a vCPU runs between two throttle sleeps (10 ms, as QEMU's CPU throttle).
  public static let timesliceNanoseconds: UInt64 = 10_000_000
  /// The highest throttle: vCPUs run at least 1 % of the time.
  public static let maximumPercent = 99

  private let percentValue = Atomic<Int>(0)
  private let monitor = HostCondition()
  /// How often `wakeSleepers` ran (changed under `monitor`; a sleeper returns when it changes).
  private let wakeGeneration = Atomic<UInt64>(0)
  /// Guarded by `monitor`: whether a ticker thread runs.
  nonisolated(unsafe) private var tickerRunning = false

  public init() {}

  /// The share of time the vCPUs do not run, in percent (0: not throttled).
  public var percent: Int { percentValue.load(ordering: .relaxed) }

  /// Whether a throttle is set (cheap; vCPU threads test it at every safe point).
  @inline(__always)
  public var isActive: Bool { percentValue.load(ordering: .relaxed) != 0 }

  /// Sets the throttle to `percent` (clamped to 0...99; 0 lifts it). With a throttle set,
  /// `kick` is called once per timeslice (from a thread of the throttle's own) to bring vCPUs
  /// inside the guest back to their safe points; it returns false when the machine is gone or
  /// stopping, which ends the ticks. Lifting the throttle wakes sleeping vCPUs.
  public func set(percent: Int, kick: @escaping @Sendable () -> Bool) {
    let clamped = min(max(percent, 0), Self.maximumPercent)
    percentValue.store(clamped, ordering: .releasing)
    let startTicker = monitor.locked { () -> Bool in
      wakeGeneration.add(1, ordering: .relaxed)
      monitor.broadcast()
      guard clamped > 0, !tickerRunning else { return false }
      tickerRunning = true
      return true
    }
    guard startTicker else { return }
    if case .failure = HostThread.start(detached: true, { [self] in tick(kick) }) {
      // Without the ticker, vCPUs are throttled at the safe points they reach by themselves.
      monitor.locked { tickerRunning = false }
    }
  }

  /// Wakes vCPUs sleeping in `throttleIfDue` (a pause or a stop was requested).
  public func wakeSleepers() {
    monitor.locked {
      wakeGeneration.add(1, ordering: .relaxed)
      monitor.broadcast()
    }
  }

  private func tick(_ kick: @Sendable () -> Bool) {
    var machineGone = false
    while true {
      let stop = monitor.locked { () -> Bool in
        if machineGone || percentValue.load(ordering: .acquiring) == 0 {
          tickerRunning = false
          return true
        }
        _ = monitor.wait(untilHost: HostCondition.now() &+ Self.timesliceNanoseconds)
        return false
      }
      if stop { return }
      if isActive { machineGone = !kick() }
    }
  }

  /// One vCPU thread's place in the throttle's timeslices; each vCPU thread keeps its own and
  /// passes it to `throttleIfDue(_:)`.
  public struct Timeslice: Sendable {
    /// The host time (CLOCK_MONOTONIC nanoseconds) when the current timeslice began; nil when
    /// the vCPU has not started counting.
    var startedAt: UInt64?
    /// The host time (CLOCK_MONOTONIC nanoseconds) until which the vCPU owes a sleep.
    var sleepUntil: UInt64?

    public init() {}

    /// Forgets the timeslice (the throttle was lifted).
    public mutating func reset() { self = Timeslice() }
  }

  /// Called by a vCPU thread at a safe point while `isActive`: once the thread has run a
  /// timeslice (of host time) since its timeslice began, sleeps for the throttle's share and then
  /// starts the next timeslice. Returns early, with the rest of the sleep still owed, when
  /// `wakeSleepers` is called or the throttle changes; the next call sleeps what is left (a
  /// deadline that passed meanwhile, e.g. during a pause, is not slept again).
  /// Returns whether it slept (or was woken from a sleep): the caller rechecks its requests.
  @discardableResult
  public func throttleIfDue(_ slice: inout Timeslice) -> Bool {
    let percent = percentValue.load(ordering: .acquiring)
    guard percent > 0 else {
      slice.reset()
      return false
    }
    let deadline: UInt64
    if let owed = slice.sleepUntil {
      deadline = owed
    } else {
      let now = HostCondition.now()
      guard let start = slice.startedAt else {
        slice.startedAt = now
        return false
      }
      guard now &- start >= Self.timesliceNanoseconds else { return false }
      deadline = now &+ Self.timesliceNanoseconds * UInt64(percent) / UInt64(100 - percent)
      slice.sleepUntil = deadline
    }
    let woken = monitor.locked { () -> Bool in
      let generation = wakeGeneration.load(ordering: .relaxed)
      while HostCondition.now() < deadline {
        if wakeGeneration.load(ordering: .relaxed) != generation { return true }
        _ = monitor.wait(untilHost: deadline)
      }
      return false
    }
    if !woken {
      slice.sleepUntil = nil
      slice.startedAt = HostCondition.now()
    }
    return true
  }
}
