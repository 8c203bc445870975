import Glibc
import VMCore

/// Where a halted vCPU thread sleeps until an interrupt, a kick or a timer deadline.
///
/// `wake()` leaves a token, so a wake that races with going to sleep is never lost:
///
///     apic.setInterruptPendingHandler { sleeper.wake() }
///     control.addKick { sleeper.wake() }
///     // HLT:
///     while apic.pendingEvents.isDisjoint(with: acceptable) && !control.isStopping {
///       sleeper.sleep(untilVirtual: platform.nextDeadline(cpu: index), clock: clock)
///       platform.poll(cpu: index, now: clock.nanoseconds)
///     }
public final class VCPUSleeper: Sendable {
  private let monitor = HostCondition()
  /// Guarded by `monitor`'s mutex.
  nonisolated(unsafe) private var woken = false

  public init() {}

  /// Wakes the sleeping thread, or makes its next `sleep` return at once. Any thread.
  public func wake() {
    monitor.locked {
      woken = true
      monitor.broadcast()
    }
  }

  /// Sleeps until woken or until the clock reaches `deadline` (virtual ns; nil = no deadline).
  /// Returns true when woken, false on timeout. Spurious returns are possible: re-check state.
  @discardableResult
  public func sleep(untilVirtual deadline: UInt64?, clock: any MachineClock) -> Bool {
    var hostDeadline: UInt64?
    if let deadline {
      let now = clock.nanoseconds
      if deadline <= now { return consumeToken() }
      let remaining = deadline - now
      let host = VirtualClock.hostMonotonic()
      hostDeadline = host > UInt64.max - remaining ? UInt64.max : host + remaining
    }
    return sleep(untilHost: hostDeadline)
  }

  /// Sleeps until woken or host CLOCK_MONOTONIC reaches `hostDeadline` nanoseconds.
  @discardableResult
  public func sleep(untilHost hostDeadline: UInt64?) -> Bool {
    monitor.locked {
      while !woken {
        if !monitor.wait(untilHost: hostDeadline) { break }
      }
      defer { woken = false }
      return woken
    }
  }

  private func consumeToken() -> Bool {
    monitor.locked {
      defer { woken = false }
      return woken
    }
  }
}
