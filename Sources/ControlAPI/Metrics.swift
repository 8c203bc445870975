import Foundation
import Glibc
import Synchronization
import VMCore

/// Firecracker-style metrics: counters grouped by area (`put_api_requests`, `vcpu`, ...),
/// written as one JSON object per line to the file or named pipe that `PUT /metrics` names,
/// on `FlushMetrics` and once a minute. Each line holds what changed since the previous line,
/// as Firecracker's incremental counters do.
///
/// The lines go through a bounded buffer that a writer thread of its own empties
/// (`BoundedWriter`), so a named pipe nobody reads never blocks the API thread that flushes. A
/// line that does not fit is not written at all, and the changes it held stay for the next
/// line: the destination sees whole JSON lines whose changes add up to the counters, however
/// long it stopped reading.
public final class APIMetrics: Sendable {
  private struct State {
    var counters: [String: [String: UInt64]] = [:]
    var flushed: [String: [String: UInt64]] = [:]
    var writer: BoundedWriter?
    var path: String?
  }

  /// Bytes of metrics lines buffered for a destination that does not read.
  static let bufferCapacity = 1 << 16

  private let state = Mutex(State())

  public init() {}

  deinit {
    state.withLock { $0.writer?.finish() }
  }

  /// Adds one to `group.name`.
  public func increment(_ group: String, _ name: String, by amount: UInt64 = 1) {
    state.withLock { $0.counters[group, default: [:]][name, default: 0] &+= amount }
  }

  /// Sets `group.name` to an absolute value that only grows (the line reports its change).
  public func set(_ group: String, _ name: String, to value: UInt64) {
    state.withLock { $0.counters[group, default: [:]][name] = value }
  }

  /// Counts one API request of `method` on `resource`, and a failure when it failed.
  public func countRequest(method: String, resource: String, failed: Bool) {
    let group: String
    switch method {
    case "GET": group = "get_api_requests"
    case "PATCH": group = "patch_api_requests"
    default: group = "put_api_requests"
    }
    increment(group, "\(resource)_count")
    if failed { increment(group, "\(resource)_fails") }
  }

  /// Whether `PUT /metrics` has configured a destination.
  public var isConfigured: Bool { state.withLock { $0.path != nil } }

  /// The configured destination.
  public var path: String? { state.withLock { $0.path } }

  /// Opens the destination (a file is created and appended to; a named pipe must have a
  /// reader). Only once per process, as Firecracker.
  public func configure(path: String) throws(ControlFailure) {
    try state.withLock { (state) throws(ControlFailure) in
      guard state.path == nil else { throw ControlFailure("Reinitialization of metrics not allowed.") }
      state.writer = try startedDestinationWriter(
        path: path, describedAs: "metrics file", capacity: Self.bufferCapacity, whenFull: .backPressure)
      state.path = path
    }
  }

  /// Cumulative values of every counter, for `vm.counters`.
  func totals() -> [String: Int64] {
    state.withLock { state in
      var flat: [String: Int64] = [:]
      for (group, counters) in state.counters where group.hasSuffix("_api_requests") {
        for (name, value) in counters { flat["\(group).\(name)"] = Int64(clamping: value) }
      }
      return flat
    }
  }

  /// Writes one JSON line with the changes since the last line, waiting at most
  /// `writtenWithin` for it to reach the destination (a line still buffered then is written
  /// later). When the destination has not read enough of the earlier lines for this one to fit
  /// in the buffer, nothing is written, the changes stay for the next line and the flush fails.
  public func flush(writtenWithin wait: Duration = .zero) throws(ControlFailure) {
    let writer = try state.withLock { (state) throws(ControlFailure) -> BoundedWriter in
      guard let writer = state.writer else { throw ControlFailure("The metrics system is not initialized.") }
      var line: [String: Any] = [
        "utc_timestamp_ms": Int64(Date().timeIntervalSince1970 * 1000)
      ]
      for (group, counters) in state.counters {
        var changes: [String: UInt64] = [:]
        for (name, value) in counters {
          changes[name] = value &- (state.flushed[group]?[name] ?? 0)
        }
        line[group] = changes
      }
      guard
        var text = (try? JSONSerialization.data(withJSONObject: line, options: [.sortedKeys]))
          .map({ String(decoding: $0, as: UTF8.self) })
      else {
        throw ControlFailure("Cannot encode the metrics.")
      }
      text += "\n"
      // Only this method writes, under the lock, and the writer thread only makes room: a line
      // that fits now is queued whole.
      guard writer.hasRoom(for: text.utf8.count) else {
        throw ControlFailure(
          "Cannot write the metrics: \(state.path ?? "the destination") is not being read (the changes stay for the next line)"
        )
      }
      writer.write(text)
      state.flushed = state.counters
      return writer
    }
    if wait > .zero { writer.drain(timeout: wait) }
  }
}

/// A request that failed, with its one-line message.
public struct ControlFailure: Error, CustomStringConvertible, Sendable {
  public let description: String
  public init(_ description: String) { self.description = description }
}

/// A `BoundedWriter` with its thread started, on `path` opened for the API's log or metrics (a
/// file created with mode 0600 and appended to, or a named pipe, which must have a reader:
/// opened non-blocking, so a pipe nobody reads never blocks the writer's callers). Fails with
/// one line naming the `describedAs` destination.
func startedDestinationWriter(
  path: String, describedAs destination: String, capacity: Int, whenFull: BoundedWriter.WhenFull
) throws(ControlFailure) -> BoundedWriter {
  let descriptor = open(path, O_WRONLY | O_APPEND | O_CREAT | O_NONBLOCK | O_CLOEXEC, 0o600)
  guard descriptor >= 0 else {
    throw ControlFailure("Cannot open the \(destination) \(path): \(String(cString: strerror(errno)))")
  }
  // The writer owns the descriptor from here: released unstarted, it closes it.
  let writer = BoundedWriter(fileDescriptor: descriptor, ownsDescriptor: true, capacity: capacity, whenFull: whenFull)
  do {
    try writer.start()
  } catch {
    throw ControlFailure("Cannot write the \(destination) \(path): \(error.description)")
  }
  return writer
}
