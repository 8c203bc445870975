import Foundation
import Synchronization

/// A child's output as `HostProcess` hands it over, kept for a test to read: whole, as lines
/// in order, or waited for.
public final class CollectedOutput: Sendable {
  private let bytes = Mutex<[UInt8]>([])
  /// Bytes of `bytes` that `nextLine` has already returned.
  private let linesTaken = Mutex<Int>(0)

  public init() {}

  /// Adds a chunk of output (the handler to give `HostProcess`).
  public func append(_ chunk: Data) { bytes.withLock { $0.append(contentsOf: chunk) } }

  /// Everything so far.
  public var data: Data { bytes.withLock { Data($0) } }

  /// Everything so far, as UTF-8 text.
  public var text: String { bytes.withLock { String(decoding: $0, as: UTF8.self) } }

  /// The next whole line not yet returned, without its newline, waiting up to `timeout`
  /// seconds for it; nil if none came.
  public func nextLine(timeout: Double = 60) -> String? {
    let deadline = Date().addingTimeInterval(timeout)
    while true {
      let line: [UInt8]? = linesTaken.withLock { taken in
        bytes.withLock { all in
          guard let newline = all[taken...].firstIndex(of: 0x0A) else { return nil }
          let line = Array(all[taken..<newline])
          taken = newline + 1
          return line
        }
      }
      if let line { return String(decoding: line, as: UTF8.self) }
      if Date() >= deadline { return nil }
      usleep(5_000)
    }
  }

  /// Waits up to `timeout` seconds for the output to contain `text`, or for `stop` (checked
  /// between looks) to say there is no point; returns whether it appeared.
  @discardableResult
  public func waitFor(_ text: String, timeout: Double = 60, stop: () -> Bool = { false }) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while !self.text.contains(text) {
      if Date() >= deadline || stop() { return self.text.contains(text) }
      usleep(5_000)
    }
    return true
  }
}
