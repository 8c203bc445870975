import Glibc
import Synchronization
import VMCore

/// Sends guest output to a host descriptor through a bounded buffer that a writer thread of its
/// own drains, so a consumer that stops reading (a full pipe, a stopped terminal, a slow disk)
/// never stalls the vCPU that transmits, nor with it the VMM's pause, snapshot and shutdown,
/// which wait for the vCPUs.
///
/// While the buffer is full the backend is not ready (`isReadyToTransmit`): a UART then reports
/// its transmitter busy (LSR THRE and TEMT clear), so a driver that waits for THRE waits, and a
/// guest that transmits anyway loses those bytes (`droppedBytes`), as on a line whose far end
/// stopped listening. Once the writer has emptied half the buffer it calls the ready handler
/// (the UART's THR-empty interrupt).
///
/// What is buffered is still written when the backend is released (by its writer thread, which
/// then ends) and at process exit (an `atexit` hook that waits at most `exitDrainTimeout` for a
/// consumer that does not read).
public final class BufferedSerialBackend: SerialBackend {
  /// Bytes buffered by default.
  public static let defaultCapacity = 1 << 16
  /// How long process exit waits for buffered output to be written.
  public static let exitDrainTimeout: Duration = .seconds(2)

  private let channel: SerialOutputChannel

  /// Writes to `fileDescriptor`, closing it when done if `ownsDescriptor`.
  public init(
    fileDescriptor: Int32, ownsDescriptor: Bool = false, capacity: Int = BufferedSerialBackend.defaultCapacity
  ) throws(SerialBackendError) {
    channel = try SerialOutputChannel(
      fileDescriptor: fileDescriptor, ownsDescriptor: ownsDescriptor, capacity: capacity)
  }

  /// Appends guest output to `path`, created (mode 0644) if missing (`--serial file:PATH`).
  public convenience init(appendingTo path: String) throws(SerialBackendError) {
    let descriptor = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
    guard descriptor >= 0 else { throw .cannotOpen(path: path, errno: errno) }
    do {
      try self.init(fileDescriptor: descriptor, ownsDescriptor: true)
    } catch {
      close(descriptor)
      throw error
    }
  }

  deinit { channel.finish() }

  public func write(_ bytes: UnsafeRawBufferPointer) { channel.append(bytes) }

  public var isReadyToTransmit: Bool { channel.hasRoom(for: 1) }

  public func hasRoom(for count: Int) -> Bool { channel.hasRoom(for: count) }

  public func whenReadyToTransmit(_ handler: @escaping @Sendable () -> Void) { channel.setReadyHandler(handler) }

  /// Bytes the guest transmitted while the buffer was full, which were lost.
  public var droppedBytes: UInt64 { channel.droppedBytes }

  /// Waits until everything buffered is written, at most `timeout`; returns whether it was.
  @discardableResult
  public func drain(timeout: Duration) -> Bool { channel.drain(timeout: timeout) }
}

/// The buffer, the descriptor and the writer thread of one `BufferedSerialBackend`. The thread
/// holds it until it ends, after its backend is released and the buffer is written.
final class SerialOutputChannel: Sendable {
  private struct State {
    var ring: [UInt8]
    var head = 0
    var count = 0
    var writerSleeping = false
    var finishing = false
    var waitingForRoom = false
    var dropped: UInt64 = 0
    var readyHandler: (@Sendable () -> Void)?
  }

  private let state: Mutex<State>
  private let fileDescriptor: Int32
  private let ownsDescriptor: Bool
  /// A pipe the writer sleeps on (its read end) while the buffer is empty.
  private let wakeRead: Int32
  private let wakeWrite: Int32
  private let capacity: Int

  init(fileDescriptor: Int32, ownsDescriptor: Bool, capacity: Int) throws(SerialBackendError) {
    precondition(capacity > 0)
    self.fileDescriptor = fileDescriptor
    self.ownsDescriptor = ownsDescriptor
    self.capacity = capacity
    state = Mutex(State(ring: [UInt8](repeating: 0, count: capacity)))
    var ends: [Int32] = [-1, -1]
    guard pipe(&ends) == 0 else { throw .cannotStartWriter(errno: errno) }
    for end in ends { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
    (wakeRead, wakeWrite) = (ends[0], ends[1])
    // The thread holds the channel until it ends.
    if case .failure(let error) = HostThread.start(detached: true, { [self] in run() }) {
      throw .cannotStartWriter(errno: error.errno)
    }
    liveSerialChannels.withLock { $0[ObjectIdentifier(self)] = self }
    _ = serialDrainAtExitRegistered
  }

  deinit {
    close(wakeRead)
    close(wakeWrite)
    if ownsDescriptor { close(fileDescriptor) }
  }

  /// Buffers `bytes`; those that do not fit are dropped.
  func append(_ bytes: UnsafeRawBufferPointer) {
    let wake = state.withLock { state -> Bool in
      let room = capacity - state.count
      let taken = min(room, bytes.count)
      for index in 0..<taken {
        state.ring[(state.head + state.count + index) % capacity] = bytes[index]
      }
      state.count += taken
      if taken < bytes.count {
        state.dropped += UInt64(bytes.count - taken)
        state.waitingForRoom = true
      }
      let wake = taken > 0 && state.writerSleeping
      if wake { state.writerSleeping = false }
      return wake
    }
    if wake { signalWriter() }
  }

  /// Whether `count` more bytes fit; when not, the ready handler runs once room is made.
  func hasRoom(for count: Int) -> Bool {
    state.withLock { state in
      if state.count + count <= capacity { return true }
      state.waitingForRoom = true
      return false
    }
  }

  func setReadyHandler(_ handler: @escaping @Sendable () -> Void) {
    state.withLock { $0.readyHandler = handler }
  }

  var droppedBytes: UInt64 { state.withLock { $0.dropped } }

  /// The backend was released: the writer writes what is left and ends.
  func finish() {
    let wake = state.withLock { state -> Bool in
      state.finishing = true
      state.readyHandler = nil
      return state.writerSleeping
    }
    if wake { signalWriter() }
  }

  func drain(timeout: Duration) -> Bool {
    let deadline = ContinuousClock.now + timeout
    while state.withLock({ $0.count }) > 0 {
      if ContinuousClock.now >= deadline { return false }
      usleep(1000)
    }
    return true
  }

  private func signalWriter() {
    var one: UInt8 = 1
    _ = Glibc.write(wakeWrite, &one, 1)
  }

  /// The writer thread: writes the buffer's oldest bytes (the descriptor may block it), then
  /// frees their room; sleeps while the buffer is empty; ends once finished and empty.
  private func run() {
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
      let (taken, finished) = state.withLock { state -> (Int, Bool) in
        guard state.count > 0 else {
          state.writerSleeping = !state.finishing
          return (0, state.finishing)
        }
        let taken = min(state.count, chunk.count, capacity - state.head)
        for index in 0..<taken { chunk[index] = state.ring[state.head + index] }
        return (taken, false)
      }
      if finished { break }
      if taken == 0 {
        var wakes = (UInt64(0), UInt64(0))
        while Glibc.read(wakeRead, &wakes, 16) < 0 && errno == EINTR {}
        continue
      }
      chunk.withUnsafeBytes { writeFully(fd: fileDescriptor, UnsafeRawBufferPointer(rebasing: $0[0..<taken])) }
      let ready = state.withLock { state -> (@Sendable () -> Void)? in
        state.head = (state.head + taken) % capacity
        state.count -= taken
        guard state.waitingForRoom && state.count <= capacity / 2 else { return nil }
        state.waitingForRoom = false
        return state.readyHandler
      }
      ready?()
    }
    liveSerialChannels.withLock { _ = $0.removeValue(forKey: ObjectIdentifier(self)) }
  }
}

/// Channels whose writer still runs, for the exit hook.
private let liveSerialChannels = Mutex<[ObjectIdentifier: SerialOutputChannel]>([:])

/// At process exit, writes what every channel still buffers (within one shared timeout).
private let serialDrainAtExitRegistered: Bool = {
  atexit {
    let channels = liveSerialChannels.withLock { Array($0.values) }
    let deadline = ContinuousClock.now + BufferedSerialBackend.exitDrainTimeout
    for channel in channels {
      _ = channel.drain(timeout: max(.zero, deadline - ContinuousClock.now))
    }
  }
  return true
}()
