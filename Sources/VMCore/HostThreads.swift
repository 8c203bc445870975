import Glibc

/// A POSIX mutex and a condition variable on CLOCK_MONOTONIC, for the host threads of a
/// machine (vCPUs, device workers, the run thread) that must sleep until another thread says
/// so. Never used from the Swift concurrency pool.
public final class HostCondition: @unchecked Sendable {
  // pthread objects must not move: they live in manually allocated memory.
  private let mutex: UnsafeMutablePointer<pthread_mutex_t>
  private let condition: UnsafeMutablePointer<pthread_cond_t>

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

  /// Runs `body` with the mutex held.
  public func locked<T>(_ body: () throws -> T) rethrows -> T {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    return try body()
  }

  /// Waits for a broadcast (or a spurious wake-up) with the mutex held (call inside `locked`);
  /// with a deadline in host CLOCK_MONOTONIC nanoseconds, returns false once it has passed.
  @discardableResult
  public func wait(untilHost deadline: UInt64? = nil) -> Bool {
    guard let deadline else {
      pthread_cond_wait(condition, mutex)
      return true
    }
    var spec = timespec(
      tv_sec: Int(min(deadline / 1_000_000_000, UInt64(Int.max))), tv_nsec: Int(deadline % 1_000_000_000))
    return pthread_cond_timedwait(condition, mutex, &spec) != ETIMEDOUT
  }

  /// Wakes every waiter (call inside `locked`).
  public func broadcast() { pthread_cond_broadcast(condition) }

  /// Host CLOCK_MONOTONIC in nanoseconds.
  public static func now() -> UInt64 {
    var spec = timespec()
    clock_gettime(CLOCK_MONOTONIC, &spec)
    return UInt64(spec.tv_sec) &* 1_000_000_000 &+ UInt64(spec.tv_nsec)
  }
}

/// Host threads for a machine's long-running work: vCPUs and the run thread are POSIX threads,
/// never tasks on the Swift concurrency pool.
public enum HostThread {
  /// Starts a thread running `body`; joinable unless `detached`. Returns the thread, or the
  /// pthread_create error number.
  public static func start(
    stackSize: Int? = nil, detached: Bool = false, _ body: @escaping @Sendable () -> Void
  ) -> Result<pthread_t, HostThreadError> {
    final class Start {
      let body: @Sendable () -> Void
      init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    let context = Unmanaged.passRetained(Start(body)).toOpaque()
    var attributes = pthread_attr_t()
    pthread_attr_init(&attributes)
    defer { pthread_attr_destroy(&attributes) }
    if let stackSize { pthread_attr_setstacksize(&attributes, stackSize) }
    if detached { pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED)) }
    var thread = pthread_t()
    let result = pthread_create(
      &thread, &attributes,
      { context in
        Unmanaged<Start>.fromOpaque(context!).takeRetainedValue().body()
        return nil
      }, context)
    guard result == 0 else {
      Unmanaged<Start>.fromOpaque(context).release()
      return .failure(HostThreadError(errno: result))
    }
    return .success(thread)
  }
}

/// pthread_create failed.
public struct HostThreadError: Error, Sendable, CustomStringConvertible {
  /// The error number pthread_create returned.
  public let errno: Int32
  public var description: String { "cannot start a host thread: \(String(cString: strerror(errno)))" }
}
