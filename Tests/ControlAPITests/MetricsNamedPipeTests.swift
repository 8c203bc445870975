import Foundation
import Glibc
import Synchronization
import TestSupport
import Testing

@testable import ControlAPI

/// Firecracker-style metrics (`PUT /metrics`) on a named pipe whose reader stops reading: the
/// flushes never block, and no change is lost, since a line that does not fit waits for the
/// next one.
@Suite("metrics on a named pipe")
struct MetricsNamedPipeTests {
  /// Thousands of flushes into a full one-page named pipe that its reader holds open and does
  /// not read all return at once, some of them failing (the buffer is full). Once the pipe is
  /// read, what arrives is whole JSON lines whose changes add up to every event counted.
  @Test func flushesBehindANamedPipeNobodyReadsKeepEveryChange() throws {
    let scratch = try Scratch()
    let fifo = scratch.file("metrics.fifo")
    // Full from the start, so the lines wait in the writer's buffer alone (an empty pipe would
    // take a first batch meanwhile).
    let pipe = try FullNamedPipe(path: fifo)
    let reader = pipe.reader
    defer { close(reader) }
    let filled = pipe.filled

    let metrics = APIMetrics()
    try metrics.configure(path: fifo)
    let events = 3000
    let failures = Mutex(0)
    let elapsed = Mutex<Duration?>(nil)
    let flushed = DispatchSemaphore(value: 0)
    // On a thread of its own, so that a flush that blocks fails the test instead of hanging it.
    Thread.detachNewThread {
      let start = ContinuousClock.now
      for _ in 0..<events {
        metrics.increment("guest_flood", "events")
        do { try metrics.flush() } catch { failures.withLock { $0 += 1 } }
      }
      elapsed.withLock { $0 = ContinuousClock.now - start }
      flushed.signal()
    }
    let returned = flushed.wait(timeout: .now() + 10) == .success
    #expect(returned, "\(events) flushes behind a full named pipe did not return within 10 s")
    let took = elapsed.withLock { $0 }
    #expect(took.map { $0 < .seconds(2) } == true, "\(events) flushes took \(String(describing: took))")
    let failed = failures.withLock { $0 }
    #expect(failed > 0, "every flush fitted: the buffer was never full")

    // The pipe is read again; a last flush (retried until it fits) carries what is left.
    var received: [UInt8] = []
    var counted = 0
    var unparsed: [String] = []
    let deadline = ContinuousClock.now + .seconds(20)
    var chunk = [UInt8](repeating: 0, count: 65536)
    var lastFlushDone = false
    while counted < events && ContinuousClock.now < deadline {
      let got = read(reader, &chunk, chunk.count)
      if got > 0 {
        received += chunk[0..<got]
      } else {
        if !lastFlushDone { lastFlushDone = (try? metrics.flush()) != nil }
        usleep(5000)
      }
      guard received.count > filled else { continue }
      let text = String(decoding: received[filled...], as: UTF8.self)
      counted = 0
      unparsed = []
      for line in text.split(separator: "\n").dropLast(text.hasSuffix("\n") ? 0 : 1) {
        guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
          unparsed.append(String(line))
          continue
        }
        counted += ((object["guest_flood"] as? [String: Any])?["events"] as? Int) ?? 0
      }
    }
    #expect(received[0..<min(filled, received.count)].allSatisfy { $0 == UInt8(ascii: "p") })
    #expect(unparsed.isEmpty, "lines that are not JSON: \(unparsed.prefix(3))")
    #expect(counted == events, "the lines' changes add up to \(counted) of \(events) events")
  }
}
