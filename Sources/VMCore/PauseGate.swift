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
public final class PauseGate: Sendable {
  private struct State {
    var requested = false
    var released = false
    var participants = 0
    var parked = 0
  }

  private let monitor = HostCondition()
  /// Guarded by `monitor`'s mutex.
  nonisolated(unsafe) private var state = State()
  /// Fast, lock-free check for the vCPU hot path.
  private let requestedFlag = Atomic<Bool>(false)

  public init() {}

  private func locked<T>(_ body: (inout State) -> T) -> T {
    monitor.locked { body(&state) }
  }

  /// Whether a pause is requested (cheap; vCPU threads test it at every safe point).
  @inline(__always)
  public var isPauseRequested: Bool { requestedFlag.load(ordering: .relaxed) }

  /// Whether the machine is paused: a pause was requested and every entered vCPU is parked.
  public var isPaused: Bool { locked { $0.requested && $0.parked == $0.participants } }

  /// A vCPU thread's run loop begins.
  public func enter() {
    locked {
      $0.participants += 1
      monitor.broadcast()
    }
  }

  /// A vCPU thread's run loop ends (for any reason); a pending pause no longer waits for it.
  public func leave() {
    locked {
      $0.participants -= 1
      monitor.broadcast()
    }
  }

  /// Called by a vCPU thread at a safe point: blocks while a pause is requested. Returns
  /// whether it parked. `beforeParking` runs on the vCPU thread before it blocks (e.g. to
  /// publish its state for a snapshot).
  @discardableResult
  public func parkIfRequested(beforeParking: () -> Void = {}) -> Bool {
    guard isPauseRequested else { return false }
    beforeParking()
    return monitor.locked {
      guard state.requested && !state.released else { return false }
      state.parked += 1
      monitor.broadcast()
      while state.requested && !state.released { monitor.wait() }
      state.parked -= 1
      monitor.broadcast()
      return true
    }
  }

  /// Requests a pause, calls `kick` so that running vCPUs reach a safe point, and waits until
  /// every entered vCPU is parked or `timeoutNanoseconds` pass. Returns true when the machine
  /// is paused; on false the request is withdrawn and the machine keeps running.
  public func pause(timeoutNanoseconds: UInt64 = 5_000_000_000, kick: () -> Void) -> Bool {
    let alreadyRequested = locked { state -> Bool in
      if state.requested { return true }
      state.requested = true
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
    let deadline = HostCondition.now() &+ timeoutNanoseconds
    return monitor.locked {
      while state.requested && !state.released && state.parked < state.participants {
        if !monitor.wait(untilHost: deadline) { break }
      }
      return state.requested && (state.released || state.parked >= state.participants)
    }
  }

  /// Releases a paused machine: parked vCPUs continue where they stopped.
  public func resume() {
    locked {
      $0.requested = false
      requestedFlag.store(false, ordering: .sequentiallyConsistent)
      monitor.broadcast()
    }
  }

  /// Releases every parked thread for good (the machine is stopping); later pauses park
  /// nothing.
  public func release() {
    locked {
      $0.released = true
      monitor.broadcast()
    }
  }
}
