import Glibc

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
public final class VCPUSleeper: @unchecked Sendable {
  // pthread objects must not move: they live in manually allocated memory.
  private let mutex: UnsafeMutablePointer<pthread_mutex_t>
  private let condition: UnsafeMutablePointer<pthread_cond_t>
  private var woken = false  // guarded by `mutex`

  public init() {
    mutex = .allocate(capacity: 1)
    mutex.initialize(to: pthread_mutex_t())
    pthread_mutex_init(mutex, nil)
    condition = .allocate(capacity: 1)
    condition.initialize(to: pthread_cond_t())
    var attributes = pthread_condattr_t()
    pthread_condattr_init(&attributes)
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
    pthread_cond_init(condition, &attributes)
    pthread_condattr_destroy(&attributes)
  }

  deinit {
    pthread_cond_destroy(condition)
    pthread_mutex_destroy(mutex)
    condition.deallocate()
    mutex.deallocate()
  }

  /// Wakes the sleeping thread, or makes its next `sleep` return at once. Any thread.
  public func wake() {
    pthread_mutex_lock(mutex)
    woken = true
    pthread_cond_signal(condition)
    pthread_mutex_unlock(mutex)
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
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    while !woken {
      if let hostDeadline {
        var spec = timespec(
          tv_sec: Int(min(hostDeadline / 1_000_000_000, UInt64(Int.max))), tv_nsec: Int(hostDeadline % 1_000_000_000))
        if pthread_cond_timedwait(condition, mutex, &spec) == ETIMEDOUT { break }
      } else {
        pthread_cond_wait(condition, mutex)
      }
    }
    defer { woken = false }
    return woken
  }

  private func consumeToken() -> Bool {
    pthread_mutex_lock(mutex)
    defer {
      woken = false
      pthread_mutex_unlock(mutex)
    }
    return woken
  }
}
