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

  private struct Settings {
    var descriptor: Int32 = STDERR_FILENO
    var level: Logger.Level? = .warning
    var showLevel = false
    var showOrigin = false
    var module: String?
    var instanceID = "anonymous-instance"
  }

  private let settings = Mutex(Settings())
  private static let bootstrapped = Mutex(false)

  public init() {}

  /// Routes swift-log to `shared` (once per process; later calls do nothing).
  public static func bootstrap(instanceID: String) {
    shared.settings.withLock { $0.instanceID = instanceID }
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
  public func configure(
    path: String?, level: Level?, showLevel: Bool?, showOrigin: Bool?, module: String?
  ) throws(ControlFailure) {
    var descriptor: Int32?
    if let path {
      let opened = open(path, O_WRONLY | O_APPEND | O_CREAT | O_NONBLOCK | O_CLOEXEC, 0o600)
      guard opened >= 0 else {
        throw ControlFailure("Cannot open the log file \(path): \(String(cString: strerror(errno)))")
      }
      descriptor = opened
    }
    settings.withLock { settings in
      if let descriptor {
        if settings.descriptor > STDERR_FILENO { Glibc.close(settings.descriptor) }
        settings.descriptor = descriptor
      }
      if let level { settings.level = level.swiftLogLevel }
      if let showLevel { settings.showLevel = showLevel }
      if let showOrigin { settings.showOrigin = showOrigin }
      settings.module = module
    }
  }

  /// The level messages must reach to be written; nil when logging is off.
  var threshold: Logger.Level? { settings.withLock { $0.level } }

  func write(level: Logger.Level, label: String, message: String, file: String, line: UInt) {
    settings.withLock { settings in
      guard let threshold = settings.level, level >= threshold else { return }
      if let module = settings.module, !label.hasPrefix(module) { return }
      var text = Self.timestamp() + " [" + settings.instanceID + ":" + label
      if settings.showLevel { text += ":" + Self.name(level) }
      if settings.showOrigin { text += ":\(file):\(line)" }
      text += "] " + message.replacingOccurrences(of: "\n", with: " ") + "\n"
      if settings.descriptor == STDERR_FILENO {
        // Event loops and machine threads log here: a standard error nobody reads must not
        // stall them.
        DiagnosticOutput.standardError.write(text)
      } else {
        _ = text.withUTF8 { Glibc.write(settings.descriptor, $0.baseAddress, $0.count) }
      }
    }
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
