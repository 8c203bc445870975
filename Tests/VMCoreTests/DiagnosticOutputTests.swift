import Foundation
import Synchronization
import TestSupport
import Testing

@testable import VMCore

/// `DiagnosticOutput`: the VMM's messages never block the thread that reports them, even
/// behind a standard error nobody reads, and what it keeps arrives whole and in order.
@Suite("diagnostic output")
struct DiagnosticOutputTests {
  /// Reads `descriptor` on a thread of its own until end of file.
  final class Reader: Sendable {
    let data = Mutex<[UInt8]>([])
    let ended = DispatchSemaphore(value: 0)

    init(_ descriptor: Int32) {
      Thread.detachNewThread { [self] in
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
          let count = read(descriptor, &buffer, buffer.count)
          if count < 0 && errno == EINTR { continue }
          guard count > 0 else { break }
          data.withLock { $0 += buffer[0..<count] }
        }
        ended.signal()
      }
    }
  }

  /// Before the writer thread runs (a process still starting), a line written behind a full
  /// pipe returns after about a second instead of waiting for a reader, and is counted; once
  /// the writer runs and the pipe is read, the note about it comes before the next line.
  @Test func aLineWrittenBeforeTheWriterStartsDoesNotWaitForAFullPipe() throws {
    let pipe = try FullPipe()
    defer { close(pipe.read) }
    let output = DiagnosticOutput(fileDescriptor: pipe.write, capacity: 8192)
    // On a thread of its own, so that a write that blocks fails the test instead of hanging it.
    let written = DispatchSemaphore(value: 0)
    Thread.detachNewThread {
      output.write("hostvisor: a line before the writer runs")
      written.signal()
    }
    let returned = written.wait(timeout: .now() + 10) == .success
    #expect(returned, "a line written before start() behind a full pipe did not return within 10 s")
    #expect(output.droppedLines == 1)

    let reader = Reader(pipe.read)
    if !returned { _ = written.wait(timeout: .now() + 60) }
    try output.start()
    output.write("hostvisor: a line after")
    #expect(output.drain(timeout: .seconds(20)))
    output.finish()
    close(pipe.write)
    try #require(reader.ended.wait(timeout: .now() + 20) == .success, "the reader did not see the end of the pipe")
    let bytes = reader.data.withLock { $0 }
    try #require(bytes.count >= pipe.filled)
    let text = String(decoding: bytes[pipe.filled...], as: UTF8.self)
    #expect(
      text == "hostvisor: 1 message was dropped (standard error was not being read)\nhostvisor: a line after\n",
      "\(text)")
  }

  /// Thousands of lines written behind a full pipe that nobody reads all return at once; the
  /// buffer keeps the first that fit and counts the rest. Once the pipe is read again, the
  /// kept lines arrive whole and in order, then one line saying how many were dropped, then
  /// the lines written after that.
  @Test func writesBehindAFullPipeReturnAtOnceAndDropsAreReported() throws {
    let pipe = try FullPipe()
    defer { close(pipe.read) }
    let output = DiagnosticOutput(fileDescriptor: pipe.write, capacity: 8192)
    try output.start()
    let count = 5000
    // The writes run on a thread of their own, so that writes that block fail the test (the
    // reader below then unblocks them) instead of hanging it.
    let elapsed = Mutex<Duration?>(nil)
    let written = DispatchSemaphore(value: 0)
    Thread.detachNewThread {
      let start = ContinuousClock.now
      for index in 0..<count { output.write("hostvisor: test line \(index) of a guest that keeps breaking a device") }
      elapsed.withLock { $0 = ContinuousClock.now - start }
      written.signal()
    }
    let returned = written.wait(timeout: .now() + 10) == .success
    #expect(returned, "\(count) writes behind a full pipe did not return within 10 s")
    let took = elapsed.withLock { $0 }
    #expect(
      took.map { $0 < .seconds(2) } == true, "\(count) writes behind a full pipe took \(String(describing: took))")
    let dropped = Int(output.droppedLines)
    // At most 8192 bytes of lines of over 60 bytes each are kept.
    #expect(dropped >= count - 8192 / 60 && dropped < count, "\(dropped) lines dropped")

    let reader = Reader(pipe.read)
    if !returned { _ = written.wait(timeout: .now() + 60) }
    #expect(output.drain(timeout: .seconds(20)), "the buffer was not written once the pipe was read")
    for index in 0..<10 { output.write("after \(index)") }
    #expect(output.drain(timeout: .seconds(20)))
    output.finish()
    close(pipe.write)
    try #require(reader.ended.wait(timeout: .now() + 20) == .success, "the reader did not see the end of the pipe")

    let bytes = reader.data.withLock { $0 }
    try #require(bytes.count > 4096)
    #expect(bytes[0..<4096].allSatisfy { $0 == UInt8(ascii: "p") })
    let text = String(decoding: bytes[4096...], as: UTF8.self)
    #expect(text.hasSuffix("\n"))
    let lines = text.split(separator: "\n", omittingEmptySubsequences: false).dropLast().map(String.init)
    let kept = count - dropped
    let expected =
      (0..<kept).map { "hostvisor: test line \($0) of a guest that keeps breaking a device" }
      + ["hostvisor: \(dropped) messages were dropped (standard error was not being read)"]
      + (0..<10).map { "after \($0)" }
    #expect(lines.count == expected.count)
    let firstDifference = zip(lines, expected).enumerated().first { $0.element.0 != $0.element.1 }
    #expect(
      firstDifference == nil, "line \(firstDifference?.offset ?? 0): \(firstDifference.map { "\($0.element)" } ?? "")")
    #expect(output.droppedLines == UInt64(dropped), "the drop count changed after the buffer was written")
  }

  /// Before `start()` (while the process is still single-threaded) a line is written at once,
  /// by the caller; from `start()` on, by the writer thread, after the earlier ones.
  @Test func beforeStartLinesAreWrittenDirectly() throws {
    var ends: [Int32] = [-1, -1]
    try #require(pipe(&ends) == 0)
    for end in ends { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
    defer {
      close(ends[0])
      close(ends[1])
    }
    var queued: Int32 = 0
    let output = DiagnosticOutput(fileDescriptor: ends[1])
    output.write("before start")
    #expect(ioctl(ends[0], UInt(FIONREAD), &queued) == 0 && queued == 13)
    try output.start()
    defer { output.finish() }
    output.write("queued\n")
    #expect(output.drain(timeout: .seconds(10)))
    var buffer = [UInt8](repeating: 0, count: 256)
    let count = read(ends[0], &buffer, buffer.count)
    #expect(String(decoding: buffer[0..<max(count, 0)], as: UTF8.self) == "before start\nqueued\n")
  }
}
