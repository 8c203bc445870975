import CVirtioShim
import Glibc
import Synchronization
import VMCore

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
  private let wantsOutput: @Sendable () -> Bool

  /// - Parameters:
  ///   - backendFD: a descriptor to poll for input, or -1.
  ///   - wantsBackend: whether to poll `backendFD` right now (e.g. only while receive buffers exist).
  ///   - wantsOutput: whether to poll `backendFD` for writability right now (queued output).
  init(
    name: String, backendFD: Int32 = -1, wantsBackend: @escaping @Sendable () -> Bool = { false },
    wantsOutput: @escaping @Sendable () -> Bool = { false },
    work: @escaping @Sendable (_ backendReady: Bool) -> Void
  ) {
    self.name = name
    self.backendFD = backendFD
    self.wantsBackend = wantsBackend
    self.wantsOutput = wantsOutput
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
          HostThreadSandbox.threadStarted(.deviceWorker)
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
      let input = backendFD >= 0 && wantsBackend()
      let output = backendFD >= 0 && wantsOutput()
      descriptors[1].fd = input || output ? backendFD : -1
      descriptors[1].events = Int16(input ? POLLIN : 0) | Int16(output ? POLLOUT : 0)
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

/// Writes one line about a device problem to standard error, within `VirtioLogLimit`'s rate:
/// the problems are the guest's doing (a driver that breaks the protocol, in a loop if it
/// likes), so what they cost the host's log must be bounded. The line goes through
/// `DiagnosticOutput.standardError`, so the thread that found the problem (often a vCPU) never
/// waits for a standard error that nobody reads.
func logVirtio(_ message: String) {
  var now = timespec()
  clock_gettime(CLOCK_MONOTONIC, &now)
  let seconds = Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
  guard let suppressed = virtioLogLimit.withLock({ $0.admit(at: seconds) }) else { return }
  let note = suppressed > 0 ? " (\(suppressed) more virtio messages were not printed)" : ""
  DiagnosticOutput.standardError.write("hostvisor: virtio: \(message)\(note)")
}

/// The process's budget of virtio messages.
let virtioLogLimit = Mutex(VirtioLogLimit())

/// A token bucket for device messages: `burst` lines at once, then one every `interval`
/// seconds; the lines refused in between are counted and the next printed line says how many.
/// A guest that resets and breaks its devices in a loop thus writes about a line a minute
/// to the host's log, where each round used to write one (tens of megabytes a minute).
struct VirtioLogLimit {
  /// Lines printed without waiting.
  static let burst = 20.0
  /// Seconds per line once the burst is spent.
  static let interval = 60.0
  private var tokens = Self.burst
  private var last: Double?
  private var suppressed = 0

  /// Whether a line may be printed at time `now` (seconds): nil if not (it is counted),
  /// else how many were refused since the last printed one.
  mutating func admit(at now: Double) -> Int? {
    if let last { tokens = min(Self.burst, tokens + max(0, now - last) / Self.interval) }
    last = now
    guard tokens >= 1 else {
      suppressed += 1
      return nil
    }
    tokens -= 1
    defer { suppressed = 0 }
    return suppressed
  }
}

/// A device model served by one `QueueWorker` (virtio-blk, virtio-rng, virtio-console): the
/// worker provides `activate`, `notify`, `reset` (nothing to drop) and `shutdown`.
public protocol QueueWorkerDevice: VirtioDeviceModel {
  /// The device's worker thread and queue plumbing.
  var queueWorker: QueueWorker { get }
}

extension QueueWorkerDevice {
  public func activate(_ queues: VirtioQueueSet) { queueWorker.activate(queues) }
  public func notify(queue: Int) { queueWorker.wake() }
  public func reset() {}
  public func shutdown() { queueWorker.stop() }
}

/// The plumbing of a device served by one worker thread and no backend descriptor (virtio-blk,
/// virtio-rng, virtio-console): keeps the queue set handed over at DRIVER_OK, wakes the thread
/// on notifications, and serves queues chain by chain. Public only so `QueueWorkerDevice` can
/// name it; its members are the module's own.
///
/// The device gives `work` (run on each wake-up, typically calling `serve` for each queue);
/// `work` should reach the device through a `WeakLink` so the thread does not keep it alive.
public final class QueueWorker: Sendable {
  private let queueSet = Mutex<VirtioQueueSet?>(nil)
  private let chainBox = Mutex(DescriptorChain())
  private let thread: DeviceWorker

  init(name: String, work: @escaping @Sendable () -> Void) {
    thread = DeviceWorker(name: name) { _ in work() }
  }

  /// DRIVER_OK: keeps `queues`, starts the thread and looks at the queues once.
  func activate(_ queues: VirtioQueueSet) {
    queueSet.withLock { $0 = queues }
    thread.start()
    thread.wake()
  }

  /// Wakes the thread (a notification, or new host-side input).
  func wake() { thread.wake() }

  /// Stops and joins the thread.
  func stop() { thread.stop() }

  /// Pops the available chains of queue `index` while `more()` holds, lets `handle` serve each
  /// one (returning how many bytes it wrote into the chain's writable buffers) and returns it to
  /// the driver. A `VirtqueueError` puts the device in DEVICE_NEEDS_RESET (`VirtioQueueSet.withQueue`).
  /// Nothing happens before DRIVER_OK.
  func serve(
    queue index: Int, while more: () -> Bool = { true },
    _ handle: (DescriptorChain, GuestMemory) throws(VirtqueueError) -> UInt32
  ) {
    guard let queues = queueSet.withLock({ $0 }) else { return }
    let memory = queues.memory
    chainBox.withLock { chain in
      _ = queues.withQueue(index) { queue throws(VirtqueueError) in
        while more(), try queue.popAvailable(into: &chain) {
          let written = try handle(chain, memory)
          try queue.pushUsed(head: chain.head, length: written)
        }
      }
    }
  }
}

/// Lets a worker closure reach its device without keeping it alive.
final class WeakLink<Target: AnyObject & Sendable>: Sendable {
  private struct Box: @unchecked Sendable { weak var target: Target? }
  private let box = Mutex(Box())
  init() {}
  /// The device, while it lives.
  var target: Target? {
    get { box.withLock { $0.target } }
    set { box.withLock { $0.target = newValue } }
  }
}
