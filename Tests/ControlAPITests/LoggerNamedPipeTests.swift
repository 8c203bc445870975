import Foundation
import Glibc
import Synchronization
import TestSupport
import Testing
import VMM

@testable import ControlAPI

/// The Firecracker logger (`PUT /logger` with `log_path`) on a named pipe whose reader stops
/// reading: the thread that logs never blocks and no line is lost silently.
@Suite("logger on a named pipe")
struct LoggerNamedPipeTests {
  /// A log configured through `PUT /logger` on a named pipe (made small: one page, and full)
  /// that its reader holds open and does not read. Thousands of lines logged meanwhile all
  /// return at once. Once the pipe is read, what arrives is whole lines: the first ones logged,
  /// in order, then one line saying how many were dropped, then the lines logged after that.
  @Test func linesBehindANamedPipeNobodyReadsAreDroppedWholeAndCounted() throws {
    let scratch = try Scratch()
    let fifo = scratch.file("log.fifo")
    // Full from the start, so the lines wait in the writer's buffer alone (an empty pipe would
    // take a first batch meanwhile).
    let pipe = try FullNamedPipe(path: fifo)
    let reader = pipe.reader
    defer { close(reader) }
    let filled = pipe.filled

    let sink = LogSink()
    let api = FirecrackerAPI(plane: ControlPlane(instanceID: "fifo-vm", baseSpec: VMSpec(), logSink: sink))
    let configured = api.handle(
      APIRequest(method: "PUT", path: "/logger", body: Array(#"{"log_path": "\#(fifo)", "level": "Info"}"#.utf8)))
    try #require(configured.status == 204, "PUT /logger: \(configured.status)")

    // The lines are logged on a thread of their own, so that a logger that blocks fails the
    // test (the reads below then unblock it) instead of hanging it.
    let count = 5000
    let message: @Sendable (Int) -> String = { index in "flood line \(index) of a guest that keeps making the VMM log" }
    let elapsed = Mutex<Duration?>(nil)
    let logged = DispatchSemaphore(value: 0)
    Thread.detachNewThread {
      let start = ContinuousClock.now
      for index in 0..<count {
        sink.write(level: .info, label: "flood", message: message(index), file: #fileID, line: #line)
      }
      elapsed.withLock { $0 = ContinuousClock.now - start }
      logged.signal()
    }
    let returned = logged.wait(timeout: .now() + 10) == .success
    #expect(returned, "\(count) lines logged behind a full named pipe did not return within 10 s")
    let took = elapsed.withLock { $0 }
    #expect(took.map { $0 < .seconds(2) } == true, "\(count) lines took \(String(describing: took))")

    // The pipe is read again; then more lines, the last one marking the end.
    var received: [UInt8] = []
    func readUntil(_ marker: String) -> Bool {
      let deadline = ContinuousClock.now + .seconds(20)
      var chunk = [UInt8](repeating: 0, count: 65536)
      while ContinuousClock.now < deadline {
        let got = read(reader, &chunk, chunk.count)
        if got > 0 {
          received += chunk[0..<got]
          if String(decoding: received, as: UTF8.self).hasSuffix(marker + "\n") { return true }
        } else {
          usleep(5000)
        }
      }
      return false
    }
    if !returned { _ = logged.wait(timeout: .now() + 60) }
    // Everything kept arrives, ending with the note (nothing follows it until more is logged).
    #expect(readUntil("(the log was not being read)"), "no note about dropped lines arrived")
    for index in 0..<10 {
      sink.write(level: .info, label: "flood", message: "after \(index)", file: #fileID, line: #line)
    }
    try #require(readUntil("after 9"), "the lines logged after the pipe was read did not arrive")

    try #require(received.count > filled)
    #expect(received[0..<filled].allSatisfy { $0 == UInt8(ascii: "p") })
    let text = String(decoding: received[filled...], as: UTF8.self)
    // `TIMESTAMP [INSTANCE_ID:LABEL] MESSAGE`: the label and the message.
    let lines = text.split(separator: "\n", omittingEmptySubsequences: false).dropLast().map { line -> String in
      guard let bracket = line.firstIndex(of: "["), let close = line.range(of: "] ") else { return "unparsed: \(line)" }
      let label = line[line.index(after: bracket)..<close.lowerBound].split(separator: ":").dropFirst().joined(
        separator: ":")
      return label + " " + line[close.upperBound...]
    }
    let kept = lines.firstIndex { $0.hasPrefix("logger ") } ?? 0
    let dropped = count - kept
    #expect(kept > 0 && dropped > 0, "\(kept) lines kept before the note, of \(count)")
    let expected =
      (0..<kept).map { "flood " + message($0) }
      + ["logger \(dropped) messages were dropped (the log was not being read)"]
      + (0..<10).map { "flood after \($0)" }
    #expect(lines.count == expected.count, "\(lines.count) lines arrived, \(expected.count) expected")
    let firstDifference = zip(lines, expected).enumerated().first { $0.element.0 != $0.element.1 }
    #expect(
      firstDifference == nil, "line \(firstDifference?.offset ?? 0): \(firstDifference.map { "\($0.element)" } ?? "")")
  }
}
