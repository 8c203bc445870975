import Glibc
import Synchronization

/// A host descriptor written through a bounded buffer by a writer thread of its own, so that a
/// consumer that stops reading (a full pipe, a stopped terminal, a slow disk) blocks only that
/// thread: never the thread that writes here (a vCPU, a device worker, an API event loop, a
/// logging thread), which a guest could otherwise stall by making the VMM write.
///
/// What happens when the buffer (`capacity` bytes) has no room is the writer's `WhenFull`:
/// whole messages are dropped and counted, and a note says how many (`DiagnosticOutput`, the
/// API logger); or the caller is told to wait (`hasRoom(for:)`, `whenRoomReturns(_:)`), and bytes
/// written anyway are dropped and counted (the serial console's `BufferedSerialBackend`).
///
/// Before `start()` (while the process is starting and still single-threaded: the sandbox
/// forks, and a thread started before would not exist in its child) writes go directly to the
/// descriptor, one `write(2)` each, by the caller; with `dropMessages` a message waits at most
/// `directWriteWait` for the descriptor to take output and is otherwise dropped and counted,
/// so a standard error nobody reads cannot stop the process before its writer runs either.
/// `finish()` makes the thread write what is buffered and end; later writes go directly again.
/// At process exit (`atexit`) what every started writer still buffers is written, waiting at
/// most `exitDrainTimeout` in all for consumers that do not read.
public final class BoundedWriter: @unchecked Sendable {
  /// What a write that does not fit in the buffer does.
  public enum WhenFull: Sendable {
    /// Every write is one message (one line or several; a newline is added if it lacks one),
    /// kept whole or dropped whole and counted (`droppedMessages`). Once the writer has made
    /// room, the line `note(count)` (a newline is added if it lacks one) says how many messages
    /// were dropped, in the place where they would have been. Each `write(2)` carries whole
    /// lines, at most `PIPE_BUF` bytes when they fit, so on a pipe the kernel never interleaves
    /// them with other writers' lines. `note` runs with the writer's lock held: it must not
    /// write to this writer, nor take a lock that is held around a write to it.
    case dropMessages(note: @Sendable (_ dropped: Int) -> String)
    /// Writes are runs of bytes, written in the order they came, with no regard to lines. A
    /// caller that must not lose bytes asks `hasRoom(for:)` first and, when there is none,
    /// waits for the handler set with `whenRoomReturns(_:)`, which runs once the writer has
    /// emptied half the buffer. Bytes written without room are dropped and counted
    /// (`droppedBytes`).
    case backPressure
  }

  /// How long process exit waits, in all, for buffered output to be written.
  public static let exitDrainTimeout: Duration = .seconds(2)

  /// PIPE_BUF on Linux: a write of at most this many bytes to a pipe is never split; also the
  /// largest batch the writer takes at once (a longer line alone).
  static let atomicPipeWrite = 4096

  private struct State {
    /// Where the oldest buffered byte is in `ring`.
    var head = 0
    /// Bytes buffered, those the writer is writing included.
    var count = 0
    /// Messages dropped since the last note about dropped messages was buffered.
    var unreportedDrops = 0
    var droppedMessages: UInt64 = 0
    var droppedBytes: UInt64 = 0
    /// Whether a caller found no room since the room handler last ran.
    var waitingForRoom = false
    var roomHandler: (@Sendable () -> Void)?
    var started = false
    var finishing = false
    var writerEnded = false
  }

  private let fileDescriptor: Int32
  private let ownsDescriptor: Bool
  private let capacity: Int
  private let whenFull: WhenFull
  /// The buffer: `state.count` bytes from `state.head` on, wrapping around its end.
  private let ring: UnsafeMutableRawBufferPointer
  /// Guards `state` and `ring`; the writer sleeps on it while there is nothing to write,
  /// drainers while something is.
  private let condition = HostCondition()
  private var state = State()

  /// Writes to `fileDescriptor` through a buffer of `capacity` bytes; the descriptor is closed
  /// when the writer is released (and its thread has ended) if `ownsDescriptor`, else it stays
  /// open (the caller owns it).
  public init(fileDescriptor: Int32, ownsDescriptor: Bool = false, capacity: Int, whenFull: WhenFull) {
    precondition(capacity > 0)
    self.fileDescriptor = fileDescriptor
    self.ownsDescriptor = ownsDescriptor
    self.capacity = capacity
    self.whenFull = whenFull
    ring = .allocate(byteCount: capacity, alignment: 1)
  }

  deinit {
    ring.deallocate()
    if ownsDescriptor { close(fileDescriptor) }
  }

  /// Starts the writer thread, from which point writes never block. Does nothing if it runs
  /// already. Call it once the process may have threads (after the sandbox's fork) and before
  /// the threads that must not block can write (before a sandbox forbids starting threads on
  /// device workers).
  public func start() throws(HostThreadError) {
    let starting = condition.locked { () -> Bool in
      guard !state.started else { return false }
      state.started = true
      return true
    }
    guard starting else { return }
    liveBoundedWriters.withLock { $0[ObjectIdentifier(self)] = self }
    // The thread holds the writer until it ends (after `finish`).
    if case .failure(let error) = HostThread.start(detached: true, { [self] in run() }) {
      liveBoundedWriters.withLock { _ = $0.removeValue(forKey: ObjectIdentifier(self)) }
      condition.locked { state.started = false }
      throw error
    }
    _ = boundedWritersDrainAtExit
  }

  /// Writes `text`: one message (`dropMessages`: a newline is added if it lacks one) or a run of
  /// bytes (`backPressure`), as `write(_:)` of its UTF-8 bytes.
  public func write(_ text: String) {
    var text = text
    text.withUTF8 { write(UnsafeRawBufferPointer($0)) }
  }

  /// Writes `bytes`: queued for the writer thread once it runs (with `dropMessages` one whole
  /// message or none of it, with `backPressure` the bytes that fit, the rest dropped and
  /// counted), written directly before that.
  public func write(_ bytes: UnsafeRawBufferPointer) {
    let needsNewline: Bool
    if case .dropMessages = whenFull {
      needsNewline = bytes.last != UInt8(ascii: "\n")
    } else {
      needsNewline = false
    }
    let queued = condition.locked { () -> Bool in
      guard state.started, !state.writerEnded else { return false }
      switch whenFull {
      case .dropMessages(let note):
        let length = bytes.count + (needsNewline ? 1 : 0)
        // The note is made only when the message itself fits (a flood costs no note per line).
        let fits = state.count + length <= capacity
        let pendingNote = fits && state.unreportedDrops > 0 ? Self.line(note(state.unreportedDrops)) : nil
        guard fits && state.count + length + (pendingNote?.count ?? 0) <= capacity else {
          state.unreportedDrops += 1
          state.droppedMessages += 1
          // The writer may be idle: it queues the note once it fits.
          condition.broadcast()
          return true
        }
        if let pendingNote {
          pendingNote.withUnsafeBytes { append($0) }
          state.unreportedDrops = 0
        }
        append(bytes)
        if needsNewline { withUnsafeBytes(of: UInt8(ascii: "\n")) { append($0) } }
      case .backPressure:
        let taken = min(capacity - state.count, bytes.count)
        append(UnsafeRawBufferPointer(rebasing: bytes[0..<taken]))
        if taken < bytes.count {
          state.droppedBytes += UInt64(bytes.count - taken)
          state.waitingForRoom = true
        }
      }
      condition.broadcast()
      return true
    }
    guard !queued else { return }
    if case .dropMessages = whenFull, !Self.takesOutput(fileDescriptor, within: Self.directWriteWait) {
      // Nobody reads the descriptor and no thread may wait for it yet: the message is dropped
      // and counted as one the buffer had no room for (the note follows once the writer runs).
      condition.locked {
        state.unreportedDrops += 1
        state.droppedMessages += 1
      }
      return
    }
    if needsNewline {
      let line = Array(bytes) + [UInt8(ascii: "\n")]
      line.withUnsafeBytes { writeFully(fd: fileDescriptor, $0) }
    } else {
      writeFully(fd: fileDescriptor, bytes)
    }
  }

  /// How long a message written directly (`dropMessages`, before `start()` or after
  /// `finish()`) waits for its descriptor to take output before it is dropped.
  static let directWriteWait: Duration = .seconds(1)

  /// Whether `fileDescriptor` takes output (POLLOUT: a pipe then has room for a message of up
  /// to PIPE_BUF bytes) within `wait`; true for a descriptor poll cannot watch.
  static func takesOutput(_ fileDescriptor: Int32, within wait: Duration) -> Bool {
    let deadline = ContinuousClock.now + wait
    while true {
      var waiter = pollfd(fd: fileDescriptor, events: Int16(POLLOUT), revents: 0)
      let left = deadline - ContinuousClock.now
      let milliseconds = max(
        0, Int32(left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000))
      let ready = poll(&waiter, 1, milliseconds)
      // Ready: room, or an error or hang-up on which the write fails at once.
      if ready > 0 { return true }
      if ready == 0 { return false }
      if errno != EINTR { return true }
    }
  }

  /// Whether `count` more bytes fit now; when they do not, the room handler runs once the
  /// writer has emptied half the buffer.
  public func hasRoom(for count: Int) -> Bool {
    condition.locked {
      if state.count + count <= capacity { return true }
      state.waitingForRoom = true
      return false
    }
  }

  /// Sets what runs (on the writer thread, with none of the writer's locks held) once the
  /// writer has emptied half the buffer after a caller found no room.
  public func whenRoomReturns(_ handler: @escaping @Sendable () -> Void) {
    condition.locked { state.roomHandler = handler }
  }

  /// How many messages were dropped because the buffer was full (`dropMessages`).
  public var droppedMessages: UInt64 { condition.locked { state.droppedMessages } }

  /// How many bytes were dropped because the buffer was full (`backPressure`).
  public var droppedBytes: UInt64 { condition.locked { state.droppedBytes } }

  /// Waits until everything buffered (and the note about dropped messages, once it fits) is
  /// written, at most `timeout`; returns whether it was.
  @discardableResult
  public func drain(timeout: Duration) -> Bool {
    let (seconds, attoseconds) = timeout.components
    let nanoseconds = max(0, seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
    let deadline = HostCondition.now() &+ UInt64(nanoseconds)
    return condition.locked { () -> Bool in
      while state.started && !state.writerEnded && (state.count > 0 || state.unreportedDrops > 0) {
        if !condition.wait(untilHost: deadline) { return state.count == 0 && state.unreportedDrops == 0 }
      }
      return true
    }
  }

  /// Writes what is buffered and ends the writer thread (the room handler is forgotten); later
  /// writes go directly.
  public func finish() {
    condition.locked {
      state.finishing = true
      state.roomHandler = nil
      condition.broadcast()
    }
  }

  /// `text`'s bytes, ending with a newline.
  private static func line(_ text: String) -> [UInt8] {
    var bytes = Array(text.utf8)
    if bytes.last != UInt8(ascii: "\n") { bytes.append(UInt8(ascii: "\n")) }
    return bytes
  }

  /// Appends `bytes` after the buffered ones (under the lock; the caller checked the room).
  private func append(_ bytes: UnsafeRawBufferPointer) {
    guard let source = bytes.baseAddress, !bytes.isEmpty else { return }
    let tail = (state.head + state.count) % capacity
    let first = min(bytes.count, capacity - tail)
    ring.baseAddress!.advanced(by: tail).copyMemory(from: source, byteCount: first)
    if first < bytes.count {
      ring.baseAddress!.copyMemory(from: source + first, byteCount: bytes.count - first)
    }
    state.count += bytes.count
  }

  /// The byte `offset` bytes after the oldest buffered one (under the lock).
  private func bufferedByte(at offset: Int) -> UInt8 { ring[(state.head + offset) % capacity] }

  /// How many of the oldest buffered bytes the writer takes next (under the lock; some are
  /// buffered): up to `atomicPipeWrite`, and with `dropMessages` whole lines (a longer line
  /// alone).
  private func nextBatchLength() -> Int {
    let window = min(state.count, Self.atomicPipeWrite)
    guard case .dropMessages = whenFull else { return window }
    var offset = window - 1
    while offset >= 0 {
      if bufferedByte(at: offset) == UInt8(ascii: "\n") { return offset + 1 }
      offset -= 1
    }
    offset = window
    while offset < state.count {
      if bufferedByte(at: offset) == UInt8(ascii: "\n") { return offset + 1 }
      offset += 1
    }
    return state.count
  }

  /// Copies the oldest `length` buffered bytes to `batch` (under the lock).
  private func copyOldest(_ length: Int, to batch: UnsafeMutableRawPointer) {
    let first = min(length, capacity - state.head)
    batch.copyMemory(from: ring.baseAddress!.advanced(by: state.head), byteCount: first)
    if first < length {
      (batch + first).copyMemory(from: ring.baseAddress!, byteCount: length - first)
    }
  }

  /// The writer thread: takes the oldest buffered bytes, writes them (the descriptor may block
  /// it here, and only here), then frees their room, buffers the note about dropped messages
  /// once it fits and runs the room handler when a caller waits for room; sleeps while there
  /// is nothing to write; ends once finishing and empty.
  private func run() {
    var batch = [UInt8](repeating: 0, count: Self.atomicPipeWrite)
    while true {
      let length = condition.locked { () -> Int? in
        while true {
          bufferNoteIfItFits()
          if state.count > 0 {
            let length = nextBatchLength()
            if batch.count < length { batch += repeatElement(0, count: length - batch.count) }
            batch.withUnsafeMutableBytes { copyOldest(length, to: $0.baseAddress!) }
            return length
          }
          if state.finishing {
            state.writerEnded = true
            condition.broadcast()
            return nil
          }
          condition.wait()
        }
      }
      guard let length else { break }
      batch.withUnsafeBytes { writeFully(fd: fileDescriptor, UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
      let roomHandler = condition.locked { () -> (@Sendable () -> Void)? in
        state.head = (state.head + length) % capacity
        state.count -= length
        bufferNoteIfItFits()
        condition.broadcast()
        guard state.waitingForRoom && state.count <= capacity / 2 else { return nil }
        state.waitingForRoom = false
        return state.roomHandler
      }
      roomHandler?()
    }
    liveBoundedWriters.withLock { _ = $0.removeValue(forKey: ObjectIdentifier(self)) }
  }

  /// Buffers the note about dropped messages when there are some and it fits (under the lock).
  private func bufferNoteIfItFits() {
    guard state.unreportedDrops > 0, case .dropMessages(let note) = whenFull else { return }
    let line = Self.line(note(state.unreportedDrops))
    guard state.count + line.count <= capacity else { return }
    line.withUnsafeBytes { append($0) }
    state.unreportedDrops = 0
  }
}

/// Writers whose thread runs, for the exit hook.
private let liveBoundedWriters = Mutex<[ObjectIdentifier: BoundedWriter]>([:])

/// At process exit, writes what every writer still buffers (within one shared timeout).
private let boundedWritersDrainAtExit: Bool = {
  atexit {
    let writers = liveBoundedWriters.withLock { Array($0.values) }
    let deadline = ContinuousClock.now + BoundedWriter.exitDrainTimeout
    for writer in writers {
      _ = writer.drain(timeout: max(.zero, deadline - ContinuousClock.now))
    }
  }
  return true
}()

/// Writes all of `bytes` to `fd`, retrying on EINTR and short writes and waiting for room when
/// the descriptor is non-blocking and full (someone else may have made a shared description
/// non-blocking). Gives up silently on any other error: a closed terminal or pipe must not stop
/// the guest, and nobody would read the bytes anyway.
public func writeFully(fd: Int32, _ bytes: UnsafeRawBufferPointer) {
  guard var pointer = bytes.baseAddress else { return }
  var remaining = bytes.count
  while remaining > 0 {
    let written = Glibc.write(fd, pointer, remaining)
    if written > 0 {
      pointer += written
      remaining -= written
    } else if written < 0 && errno == EINTR {
      continue
    } else if written < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
      var waiter = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
      _ = poll(&waiter, 1, 100)
    } else {
      return
    }
  }
}
