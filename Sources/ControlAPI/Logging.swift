import Foundation
import Glibc
import Logging
import Synchronization
import VMCore

/// Where the process's swift-log messages go, as Firecracker's logger formats them:
/// `TIMESTAMP [INSTANCE_ID:THREAD(:LEVEL)(:FILE:LINE)] MESSAGE`, one line each. Configured by
/// `PUT /logger` or `--log-path`/`--level`; until then warnings and errors go to standard error.
public final class LogSink: Sendable {
  /// The sink every `Logger` of this process writes to once `bootstrap` has run.
  public static let shared = LogSink()

  /// Firecracker's level names, mapped to swift-log levels (`Off` disables logging).
  public enum Level: String, Sendable, CaseIterable {
    case error = "Error", warning = "Warning", info = "Info", debug = "Debug", trace = "Trace", off = "Off"

    /// Parses a level name case-insensitively.
    public init?(name: String) {
      guard let level = Level.allCases.first(where: { $0.rawValue.lowercased() == name.lowercased() }) else {
        return nil
      }
      self = level
    }

    var swiftLogLevel: Logger.Level? {
      switch self {
      case .error: return .error
      case .warning: return .warning
      case .info: return .info
      case .debug: return .debug
      case .trace: return .trace
      case .off: return nil
      }
    }
  }

  /// Which messages are written, and where.
  private struct Settings {
    /// The configured file or named pipe; nil: standard error, through `DiagnosticOutput`.
    var writer: BoundedWriter?
    var level: Logger.Level? = .warning
    var module: String?
  }

  /// How each line looks: `TIMESTAMP [INSTANCE_ID:LABEL(:LEVEL)(:FILE:LINE)] MESSAGE`.
  private struct LineFormat {
    var instanceID = "anonymous-instance"
    var showLevel = false
    var showOrigin = false

    /// One line, ending with a newline (newlines inside `message` become spaces).
    func line(level: Logger.Level, label: String, message: String, file: String, line: UInt) -> String {
      var text = LogSink.timestamp() + " [" + instanceID + ":" + label
      if showLevel { text += ":" + LogSink.name(level) }
      if showOrigin { text += ":\(file):\(line)" }
      return text + "] " + message.replacingOccurrences(of: "\n", with: " ") + "\n"
    }
  }

  /// Bytes a configured file or named pipe buffers while it is not being read.
  static let bufferCapacity = 1 << 16

  private let settings = Mutex(Settings())
  /// Apart from `settings`: a writer's note about dropped lines reads it with the writer's lock
  /// held, and `write` holds `settings` around its writes.
  private let format = Mutex(LineFormat())
  private static let bootstrapped = Mutex(false)

  public init() {}

  deinit { settings.withLock { $0.writer }?.finish() }

  /// Routes swift-log to `shared` (once per process; later calls do nothing).
  public static func bootstrap(instanceID: String) {
    shared.format.withLock { $0.instanceID = instanceID }
    let first = bootstrapped.withLock { done in
      defer { done = true }
      return !done
    }
    if first {
      LoggingSystem.bootstrap { label in SinkLogHandler(label: label, sink: .shared) }
    }
  }

  /// Sends the log to `path` (a file, appended, or a named pipe), with `level` and the
  /// optional parts of each line.
  ///
  /// The file or pipe is written by a thread of its own through a bounded buffer
  /// (`BoundedWriter`), so a named pipe nobody reads never blocks the thread that logs: while
  /// the buffer is full, lines are dropped whole and counted, and once room returns one line
  /// (`N messages were dropped (the log was not being read)`) says how many, where they would
  /// have been.
  public func configure(
    path: String?, level: Level?, showLevel: Bool?, showOrigin: Bool?, module: String?
  ) throws(ControlFailure) {
    var writer: BoundedWriter?
    if let path {
      writer = try startedDestinationWriter(
        path: path, describedAs: "log file", capacity: Self.bufferCapacity,
        whenFull: .dropMessages(note: { [weak self] dropped in
          self?.droppedLinesNote(dropped) ?? "\(dropped) messages were dropped (the log was not being read)"
        }))
    }
    format.withLock { format in
      if let showLevel { format.showLevel = showLevel }
      if let showOrigin { format.showOrigin = showOrigin }
    }
    let replaced = settings.withLock { settings -> BoundedWriter? in
      var replaced: BoundedWriter?
      if let writer {
        replaced = settings.writer
        settings.writer = writer
      }
      if let level { settings.level = level.swiftLogLevel }
      settings.module = module
      return replaced
    }
    // The previous file's thread writes what it holds, then ends and closes it.
    replaced?.finish()
  }

  /// The level messages must reach to be written; nil when logging is off.
  var threshold: Logger.Level? { settings.withLock { $0.level } }

  func write(level: Logger.Level, label: String, message: String, file: String, line: UInt) {
    settings.withLock { settings in
      guard let threshold = settings.level, level >= threshold else { return }
      if let module = settings.module, !label.hasPrefix(module) { return }
      let text = format.withLock { $0.line(level: level, label: label, message: message, file: file, line: line) }
      // Event loops and machine threads log here: a standard error or a named pipe nobody
      // reads must not stall them.
      if let writer = settings.writer {
        writer.write(text)
      } else {
        DiagnosticOutput.standardError.write(text)
      }
    }
  }

  /// The line that stands for `dropped` lines the configured file or pipe had no room for.
  private func droppedLinesNote(_ dropped: Int) -> String {
    let message = "\(dropped) message\(dropped == 1 ? " was" : "s were") dropped (the log was not being read)"
    return format.withLock { $0.line(level: .warning, label: "logger", message: message, file: #fileID, line: #line) }
  }

  private static func name(_ level: Logger.Level) -> String {
    switch level {
    case .trace: return "TRACE"
    case .debug: return "DEBUG"
    case .info, .notice: return "INFO"
    case .warning: return "WARN"
    case .error, .critical: return "ERROR"
    }
  }

  /// `2024-05-03T10:55:22.123456789`, UTC.
  private static func timestamp() -> String {
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    var seconds = now.tv_sec
    var parts = tm()
    gmtime_r(&seconds, &parts)
    func pad(_ value: Int32, _ width: Int) -> String {
      let digits = String(value)
      return String(repeating: "0", count: max(0, width - digits.count)) + digits
    }
    let nanos = String(now.tv_nsec)
    return "\(pad(parts.tm_year + 1900, 4))-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))T"
      + "\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2))."
      + String(repeating: "0", count: max(0, 9 - nanos.count)) + nanos
  }
}

/// A swift-log handler that writes to a `LogSink`.
struct SinkLogHandler: LogHandler {
  let label: String
  let sink: LogSink
  var metadata: Logger.Metadata = [:]
  var logLevel: Logger.Level {
    get { sink.threshold ?? .critical }
    set {}
  }

  init(label: String, sink: LogSink) {
    self.label = label
    self.sink = sink
  }

  subscript(metadataKey key: String) -> Logger.Metadata.Value? {
    get { metadata[key] }
    set { metadata[key] = newValue }
  }

  func log(event: LogEvent) {
    sink.write(level: event.level, label: label, message: "\(event.message)", file: event.file, line: event.line)
  }
}
