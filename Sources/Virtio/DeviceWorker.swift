import CVirtioShim
import Glibc
import Synchronization

/// A device's own host thread (a POSIX thread, never a vCPU or the Swift concurrency pool).
/// Sleeps in poll(2) on an eventfd and, optionally, a backend descriptor; `wake()` (called from
/// a vCPU's notify write) only writes the eventfd. Each wake-up runs `work` once.
final class DeviceWorker: Sendable {
  private let eventFD: Int32
  private let name: String
  private let thread = Mutex<pthread_t?>(nil)
  private let stopping = Atomic<Bool>(false)
  private let work: @Sendable (_ backendReady: Bool) -> Void
  private let backendFD: Int32
  private let wantsBackend: @Sendable () -> Bool

  /// - Parameters:
  ///   - backendFD: a descriptor to poll for input, or -1.
  ///   - wantsBackend: whether to poll `backendFD` right now (e.g. only while receive buffers exist).
  init(
    name: String, backendFD: Int32 = -1, wantsBackend: @escaping @Sendable () -> Bool = { false },
    work: @escaping @Sendable (_ backendReady: Bool) -> Void
  ) {
    self.name = name
    self.backendFD = backendFD
    self.wantsBackend = wantsBackend
    self.work = work
    eventFD = hv_eventfd()
  }

  deinit { if eventFD >= 0 { close(eventFD) } }

  /// Starts the thread if it is not running.
  func start() {
    thread.withLock { thread in
      guard thread == nil, eventFD >= 0 else { return }
      stopping.store(false, ordering: .releasing)
      let context = Unmanaged.passRetained(self).toOpaque()
      var handle = pthread_t()
      let result = pthread_create(
        &handle, nil,
        { argument in
          let worker = Unmanaged<DeviceWorker>.fromOpaque(argument!).takeRetainedValue()
          worker.name.withCString { hv_virtio_set_thread_name($0) }
          worker.run()
          return nil
        }, context)
      if result == 0 {
        thread = handle
      } else {
        Unmanaged<DeviceWorker>.fromOpaque(context).release()
        logVirtio("\(name): cannot start worker thread: \(String(cString: strerror(result)))")
      }
    }
  }

  /// Wakes the thread to run `work`.
  func wake() {
    var one: UInt64 = 1
    _ = write(eventFD, &one, 8)
  }

  /// Stops and joins the thread.
  func stop() {
    guard
      let handle = thread.withLock({ thread -> pthread_t? in
        defer { thread = nil }; return thread
      })
    else { return }
    stopping.store(true, ordering: .releasing)
    wake()
    if pthread_equal(pthread_self(), handle) == 0 { pthread_join(handle, nil) } else { pthread_detach(handle) }
  }

  private func run() {
    var descriptors = [pollfd(fd: eventFD, events: Int16(POLLIN), revents: 0), pollfd(fd: -1, events: 0, revents: 0)]
    while !stopping.load(ordering: .acquiring) {
      descriptors[1].fd = backendFD >= 0 && wantsBackend() ? backendFD : -1
      descriptors[1].events = Int16(POLLIN)
      descriptors[0].revents = 0
      descriptors[1].revents = 0
      let result = poll(&descriptors, 2, -1)
      if result < 0 && errno != EINTR { break }
      if stopping.load(ordering: .acquiring) { break }
      if descriptors[0].revents != 0 {
        var count: UInt64 = 0
        _ = read(eventFD, &count, 8)
      }
      work(descriptors[1].revents != 0)
    }
  }
}

/// Writes one line about a device problem to standard error.
func logVirtio(_ message: String) {
  let line = "hostvisor: virtio: \(message)\n"
  line.withCString { _ = write(STDERR_FILENO, $0, strlen($0)) }
}
