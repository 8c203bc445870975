import Glibc

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
/// directly, as one `write(2)` each; a line that finds the descriptor full for a second is
/// dropped and counted, and the note about it follows once the writer runs. At process exit
/// what is buffered is written, waiting at most `exitDrainTimeout` for a consumer that does
/// not read.
///
/// The buffer and its thread are a `BoundedWriter` that drops whole messages.
public final class DiagnosticOutput: Sendable {
  /// The process's standard error: where every message of a running machine goes.
  public static let standardError = DiagnosticOutput(fileDescriptor: STDERR_FILENO)

  /// Bytes buffered by default.
  public static let defaultCapacity = 1 << 16
  /// How long process exit waits for buffered lines to be written.
  public static let exitDrainTimeout: Duration = BoundedWriter.exitDrainTimeout

  private let writer: BoundedWriter

  /// Writes to `fileDescriptor` (which stays open: the caller owns it) through a buffer of
  /// `capacity` bytes.
  public init(fileDescriptor: Int32, capacity: Int = DiagnosticOutput.defaultCapacity) {
    writer = BoundedWriter(
      fileDescriptor: fileDescriptor, capacity: capacity, whenFull: .dropMessages(note: { Self.note(dropped: $0) }))
  }

  /// Starts the writer thread, from which point `write` never blocks. Does nothing if it runs
  /// already. Call it once the process may have threads (after the sandbox's fork) and before
  /// the threads that must not block can report anything (before a sandbox forbids starting
  /// threads on device workers).
  public func start() throws(HostThreadError) { try writer.start() }

  /// Writes `text`, one line or several, as one message (a newline is added if it lacks one):
  /// queued for the writer thread once it runs (dropped whole and counted if the buffer has no
  /// room for it), written directly before that.
  public func write(_ text: String) { writer.write(text) }

  /// How many lines were dropped because the buffer was full.
  public var droppedLines: UInt64 { writer.droppedMessages }

  /// Waits until every accepted line (and the note about dropped ones, once it fits) is
  /// written, at most `timeout`; returns whether it was.
  @discardableResult
  public func drain(timeout: Duration) -> Bool { writer.drain(timeout: timeout) }

  /// Writes what is buffered and ends the writer thread; later lines are written directly.
  public func finish() { writer.finish() }

  /// `hostvisor: N messages were dropped ...`, the line that stands for dropped lines.
  static func note(dropped: Int) -> String {
    "hostvisor: \(dropped) message\(dropped == 1 ? " was" : "s were") dropped (standard error was not being read)"
  }
}
