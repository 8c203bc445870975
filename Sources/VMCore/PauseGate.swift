import Glibc
import Synchronization

/// Where a running machine's vCPU threads stop when the host pauses it.
///
/// Each vCPU thread `enter`s the gate when its run loop starts and `leave`s it when the loop
/// ends. At every safe point (an instruction boundary on the software CPU, outside KVM_RUN on
/// KVM) it calls `parkIfRequested()`, which returns at once unless a pause is pending. The host
/// calls `pause(kick:)`, which raises the request, kicks every vCPU out of guest code and waits
/// until every entered thread is parked; `resume()` releases them.
///
/// A stop request (`release()`, called by `MachineControl.requestStop`) also releases parked
/// threads, so a paused machine can always be shut down.
public final class PauseGate: @unchecked Sendable {
  // pthread objects must not move: they live in manually allocated memory.
  private let mutex: UnsafeMutablePointer<pthread_mutex_t>
  private let condition: UnsafeMutablePointer<pthread_cond_t>
  /// Fast, lock-free check for the vCPU hot path.
  private let requestedFlag = Atomic<Bool>(false)
  // Guarded by `mutex`:
  private var requested = false
  private var released = false
  private var participants = 0
  private var parked = 0

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

  private func locked<T>(_ body: () -> T) -> T {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    return body()
  }

  /// Whether a pause is requested (cheap; vCPU threads test it at every safe point).
  @inline(__always)
  public var isPauseRequested: Bool { requestedFlag.load(ordering: .relaxed) }

  /// Whether the machine is paused: a pause was requested and every entered vCPU is parked.
  public var isPaused: Bool { locked { requested && parked == participants } }

  /// A vCPU thread's run loop begins.
  public func enter() {
    locked {
      participants += 1
      pthread_cond_broadcast(condition)
    }
  }

  /// A vCPU thread's run loop ends (for any reason); a pending pause no longer waits for it.
  public func leave() {
    locked {
      participants -= 1
      pthread_cond_broadcast(condition)
    }
  }

  /// Called by a vCPU thread at a safe point: blocks while a pause is requested. Returns
  /// whether it parked. `beforeParking` runs on the vCPU thread before it blocks (e.g. to
  /// publish its state for a snapshot).
  @discardableResult
  public func parkIfRequested(beforeParking: () -> Void = {}) -> Bool {
    guard isPauseRequested else { return false }
    beforeParking()
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    guard requested && !released else { return false }
    parked += 1
    pthread_cond_broadcast(condition)
    while requested && !released { pthread_cond_wait(condition, mutex) }
    parked -= 1
    pthread_cond_broadcast(condition)
    return true
  }

  /// Requests a pause, calls `kick` so that running vCPUs reach a safe point, and waits until
  /// every entered vCPU is parked or `timeoutNanoseconds` pass. Returns true when the machine
  /// is paused; on false the request is withdrawn and the machine keeps running.
  public func pause(timeoutNanoseconds: UInt64 = 5_000_000_000, kick: () -> Void) -> Bool {
    let alreadyRequested = locked { () -> Bool in
      if requested { return true }
      requested = true
      requestedFlag.store(true, ordering: .sequentiallyConsistent)
      return false
    }
    if alreadyRequested { return waitForParking(timeoutNanoseconds: timeoutNanoseconds) }
    kick()
    if waitForParking(timeoutNanoseconds: timeoutNanoseconds) { return true }
    resume()
    return false
  }

  private func waitForParking(timeoutNanoseconds: UInt64) -> Bool {
    let deadline = monotonicNow() &+ timeoutNanoseconds
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    while requested && !released && parked < participants {
      var spec = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
      if pthread_cond_timedwait(condition, mutex, &spec) == ETIMEDOUT { break }
    }
    return requested && (released || parked >= participants)
  }

  /// Releases a paused machine: parked vCPUs continue where they stopped.
  public func resume() {
    locked {
      requested = false
      requestedFlag.store(false, ordering: .sequentiallyConsistent)
      pthread_cond_broadcast(condition)
    }
  }

  /// Releases every parked thread for good (the machine is stopping); later pauses park
  /// nothing.
  public func release() {
    locked {
      released = true
      pthread_cond_broadcast(condition)
    }
  }

  private func monotonicNow() -> UInt64 {
    var spec = timespec()
    clock_gettime(CLOCK_MONOTONIC, &spec)
    return UInt64(spec.tv_sec) &* 1_000_000_000 &+ UInt64(spec.tv_nsec)
  }
}
