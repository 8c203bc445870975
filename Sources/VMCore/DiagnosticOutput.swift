import Glibc
import Synchronization

/// The VMM's own messages (device errors, warnings, reports), written to a host descriptor
/// without ever blocking the thread that reports them.
///
/// Once `start()` has run, `write` only copies the line into a bounded buffer (`capacity`
/// bytes) that a writer thread of its own drains, so a standard error that nobody reads (a
/// full pipe, a stopped terminal) blocks only that writer thread: never a vCPU, a device
/// worker or an API event loop, which a guest could otherwise stall by making a device
/// complain. While the buffer is full, lines are dropped whole and counted; when room returns,
/// one line says how many were dropped, in the place where they would have been. Lines are
/// written whole: each `write(2)` carries whole lines (at most `PIPE_BUF` bytes when they fit,
/// so on a pipe the kernel never interleaves them with other writers' lines).
///
/// Before `start()` (while the process is starting and still single-threaded: the sandbox
/// forks, and a thread started before would not exist in its child) lines are written
/// directly, as one `write(2)` each. At process exit what is buffered is written, waiting at
/// most `exitDrainTimeout` for a consumer that does not read.
public final class DiagnosticOutput: @unchecked Sendable {
  /// The process's standard error: where every message of a running machine goes.
  public static let standardError = DiagnosticOutput(fileDescriptor: STDERR_FILENO)

  /// Bytes buffered by default.
  public static let defaultCapacity = 1 << 16
  /// How long process exit waits for buffered lines to be written.
  public static let exitDrainTimeout: Duration = .seconds(2)

  private struct State {
    /// Lines accepted and not yet taken by the writer, oldest first.
    var queue: [[UInt8]] = []
    /// Bytes of the queued lines plus those the writer is writing.
    var bufferedBytes = 0
    /// Lines dropped since the last note about dropped lines was queued.
    var unreportedDrops = 0
    /// Every line dropped so far.
    var droppedLines: UInt64 = 0
    var started = false
    var finishing = false
    var writerEnded = false
  }

  private let fileDescriptor: Int32
  private let capacity: Int
  /// Guards `state`; the writer sleeps on it while there is nothing to write, drainers while
  /// something is.
  private let condition = HostCondition()
  private var state = State()

  /// Writes to `fileDescriptor` (which stays open: the caller owns it) through a buffer of
  /// `capacity` bytes.
  public init(fileDescriptor: Int32, capacity: Int = DiagnosticOutput.defaultCapacity) {
    precondition(capacity > 0)
    self.fileDescriptor = fileDescriptor
    self.capacity = capacity
  }

  /// Starts the writer thread, from which point `write` never blocks. Does nothing if it runs
  /// already. Call it once the process may have threads (after the sandbox's fork) and before
  /// the threads that must not block can report anything (before a sandbox forbids starting
  /// threads on device workers).
  public func start() throws(HostThreadError) {
    let starting = condition.locked { () -> Bool in
      guard !state.started else { return false }
      state.started = true
      return true
    }
    guard starting else { return }
    // The thread holds the output until it ends (after `finish`).
    if case .failure(let error) = HostThread.start(detached: true, { [self] in run() }) {
      condition.locked { state.started = false }
      throw error
    }
    liveDiagnosticOutputs.withLock { $0[ObjectIdentifier(self)] = self }
    _ = diagnosticDrainAtExitRegistered
  }

  /// Writes `text`, one line or several, as one message (a newline is added if it lacks one):
  /// queued for the writer thread once it runs (dropped whole and counted if the buffer has no
  /// room for it), written directly before that.
  public func write(_ text: String) {
    var line = Array(text.utf8)
    if line.last != UInt8(ascii: "\n") { line.append(UInt8(ascii: "\n")) }
    let queued = condition.locked { () -> Bool in
      guard state.started, !state.writerEnded else { return false }
      var needed = line.count
      let note = state.unreportedDrops > 0 ? Self.note(dropped: state.unreportedDrops) : nil
      needed += note?.count ?? 0
      guard state.bufferedBytes + needed <= capacity else {
        state.unreportedDrops += 1
        state.droppedLines += 1
        return true
      }
      if let note {
        state.queue.append(note)
        state.unreportedDrops = 0
      }
      state.queue.append(line)
      state.bufferedBytes += needed
      condition.broadcast()
      return true
    }
    if !queued { line.withUnsafeBytes { writeFully(fd: fileDescriptor, $0) } }
  }

  /// How many lines were dropped because the buffer was full.
  public var droppedLines: UInt64 { condition.locked { state.droppedLines } }

  /// Waits until every accepted line (and the note about dropped ones, once it fits) is
  /// written, at most `timeout`; returns whether it was.
  @discardableResult
  public func drain(timeout: Duration) -> Bool {
    let (seconds, attoseconds) = timeout.components
    let nanoseconds = max(0, seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
    let deadline = HostCondition.now() &+ UInt64(nanoseconds)
    return condition.locked { () -> Bool in
      while state.started && !state.writerEnded && (state.bufferedBytes > 0 || state.unreportedDrops > 0) {
        if !condition.wait(untilHost: deadline) { return state.bufferedBytes == 0 && state.unreportedDrops == 0 }
      }
      return true
    }
  }

  /// Writes what is buffered and ends the writer thread; later lines are written directly.
  public func finish() {
    condition.locked {
      state.finishing = true
      condition.broadcast()
    }
  }

  /// PIPE_BUF on Linux: a write of at most this many bytes to a pipe is never split.
  private static let atomicPipeWrite = 4096

  /// `hostvisor: N messages were dropped ...`, the line that stands for dropped lines.
  static func note(dropped: Int) -> [UInt8] {
    Array(
      "hostvisor: \(dropped) message\(dropped == 1 ? " was" : "s were") dropped (standard error was not being read)\n"
        .utf8)
  }

  /// The writer thread: takes the queued lines, writes them in batches of whole lines (the
  /// descriptor may block it here, and only here), then frees their room; queues the note
  /// about dropped lines once it fits; sleeps while there is nothing to write; ends once
  /// finishing and empty.
  private func run() {
    var batch: [UInt8] = []
    batch.reserveCapacity(Self.atomicPipeWrite)
    while true {
      let lines = condition.locked { () -> [[UInt8]]? in
        while true {
          queueNoteIfItFits()
          if !state.queue.isEmpty {
            let taken = state.queue
            state.queue = []
            return taken
          }
          if state.finishing {
            state.writerEnded = true
            condition.broadcast()
            return nil
          }
          condition.wait()
        }
      }
      guard let lines else { break }
      var index = 0
      while index < lines.count {
        // Whole lines, up to PIPE_BUF bytes (a longer line alone).
        batch.removeAll(keepingCapacity: true)
        while index < lines.count && (batch.isEmpty || batch.count + lines[index].count <= Self.atomicPipeWrite) {
          batch += lines[index]
          index += 1
        }
        batch.withUnsafeBytes { writeFully(fd: fileDescriptor, $0) }
        condition.locked {
          state.bufferedBytes -= batch.count
          queueNoteIfItFits()
          condition.broadcast()
        }
      }
    }
    liveDiagnosticOutputs.withLock { _ = $0.removeValue(forKey: ObjectIdentifier(self)) }
  }

  /// Queues the note about dropped lines when there are some and it fits (under the lock).
  private func queueNoteIfItFits() {
    guard state.unreportedDrops > 0 else { return }
    let note = Self.note(dropped: state.unreportedDrops)
    guard state.bufferedBytes + note.count <= capacity else { return }
    state.queue.append(note)
    state.bufferedBytes += note.count
    state.unreportedDrops = 0
  }
}

/// Outputs whose writer runs, for the exit hook.
private let liveDiagnosticOutputs = Mutex<[ObjectIdentifier: DiagnosticOutput]>([:])

/// At process exit, writes what every output still buffers (within one shared timeout).
private let diagnosticDrainAtExitRegistered: Bool = {
  atexit {
    let outputs = liveDiagnosticOutputs.withLock { Array($0.values) }
    let deadline = ContinuousClock.now + DiagnosticOutput.exitDrainTimeout
    for output in outputs {
      _ = output.drain(timeout: max(.zero, deadline - ContinuousClock.now))
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
