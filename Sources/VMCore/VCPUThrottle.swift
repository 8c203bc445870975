import Glibc
import Synchronization

/// Slows a running machine's vCPUs down without stopping its clocks: while a throttle of P
/// percent is set, every vCPU thread sleeps after each `timesliceNanoseconds` it ran, for
/// the share that makes it run (100 - P) % of the time (P / (100 - P) timeslices). Live
/// migration's auto-converge sets it when the guest dirties pages faster than the link sends
/// them (docs/machine-state.md, "Auto-converge").
///
/// vCPU threads call `throttleIfDue(runningSince:)` at their safe points (between interpreter
/// slices on the software CPU, outside KVM_RUN on KVM). While a throttle is set, a ticker thread
/// kicks every vCPU once per timeslice so that a vCPU inside KVM_RUN (or halted) comes back to
/// that check. The guest's clocks keep running while a vCPU sleeps: it gets less CPU, not less
/// time. A pause, a stop request or lifting the throttle wakes sleeping vCPUs at once.
public final class VCPUThrottle: Sendable {
  /// How long a vCPU runs between two throttle sleeps (10 ms, as QEMU's CPU throttle).
  public static let timesliceNanoseconds: UInt64 = 10_000_000
  /// The highest throttle: vCPUs run at least 1 % of the time.
  public static let maximumPercent = 99

  private let percentValue = Atomic<Int>(0)
  private let monitor = HostCondition()
  /// Guarded by `monitor`: how often `wakeSleepers` ran (a sleeper returns when it changes),
  /// and whether a ticker thread runs.
  nonisolated(unsafe) private var wakeGeneration: UInt64 = 0
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
      wakeGeneration &+= 1
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
      wakeGeneration &+= 1
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

  /// Called by a vCPU thread at a safe point while `isActive`: once the vCPU has run a
  /// timeslice since `runningSince` (host CLOCK_MONOTONIC nanoseconds, 0 when it has not started
  /// counting), sleeps for the throttle's share and starts the next timeslice. Returns early
  /// when `wakeSleepers` is called or the throttle changes.
  /// Returns whether it slept.
  @discardableResult
  public func throttleIfDue(runningSince: inout UInt64) -> Bool {
    let percent = percentValue.load(ordering: .acquiring)
    let now = HostCondition.now()
    guard percent > 0, runningSince != 0 else {
      runningSince = now
      return false
    }
    guard now &- runningSince >= Self.timesliceNanoseconds else { return false }
    let sleep = Self.timesliceNanoseconds * UInt64(percent) / UInt64(100 - percent)
    let deadline = now &+ sleep
    monitor.locked {
      let generation = wakeGeneration
      while wakeGeneration == generation && HostCondition.now() < deadline {
        _ = monitor.wait(untilHost: deadline)
      }
    }
    runningSince = HostCondition.now()
    return true
  }
}
