import Foundation
import Synchronization
import TestSupport
import Testing

/// A running `hostvisor` whose serial console the test reads and types into, as a person at
/// the terminal would.
final class GuestSession: Sendable {
  let process: HostProcess
  private let transcript = Transcript()

  /// Starts `hostvisor` with `arguments`; with a `launcher` (e.g. `ip netns exec NS`), runs
  /// `launcher... hostvisor arguments...` instead. The console is read on a thread of its own,
  /// so the transcript grows even while CPU-bound tests occupy every thread of the shared pools.
  init(arguments: [String], launcher: [String] = []) throws {
    let testBinary = URL(
      fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
        ?? CommandLine.arguments[0])
    let hostvisor = testBinary.deletingLastPathComponent().appendingPathComponent("hostvisor").path
    let command = launcher + [hostvisor] + arguments
    let transcript = self.transcript
    process = try HostProcess(command[0], Array(command.dropFirst())) { data in
      transcript.text.withLock { $0 += String(decoding: data, as: UTF8.self) }
    }
  }

  /// Everything the guest printed so far.
  var text: String { transcript.text.withLock { $0 } }

  /// Waits until `marker` appears after `offset` in the transcript; returns the text before it.
  /// A wait resumed late (every pool thread busy) still looks once more before it gives up.
  func waitFor(_ marker: String, after offset: String.Index? = nil, timeout: Duration) async throws -> String {
    let deadline = ContinuousClock.now + timeout
    var exitSeen = false
    while true {
      let current = text
      let start = offset.map { min($0, current.endIndex) } ?? current.startIndex
      if let range = current[start...].range(of: marker) {
        return String(current[start..<range.lowerBound])
      }
      if ContinuousClock.now >= deadline { break }
      // After the process exits, its last output may still be on its way through the pipe:
      // one more look before giving up.
      if !process.isRunning {
        if exitSeen { break }
        exitSeen = true
      }
      try await Task.sleep(for: .milliseconds(exitSeen ? 300 : 100))
    }
    throw SessionError.timedOut(marker: marker, transcriptTail: String(text.suffix(3000)))
  }

  /// Types `command`, then returns its output: the text between a begin and an end marker
  /// that the command prints, which the typed (and echoed, possibly wrapped) line does not
  /// contain verbatim because of the quotes inside them.
  func run(_ command: String, timeout: Duration = .seconds(120)) async throws -> String {
    let id = UUID().uuidString.prefix(8)
    // busybox ash asks the terminal for the cursor position (ESC [6n) as it prints the prompt
    // and reads the answer from the input: let that read time out before typing.
    try await Task.sleep(for: .seconds(1))
    let before = text.endIndex
    type("echo BEGIN''\(id); \(command); echo DONE''\(id)\n")
    let raw = try await waitFor("DONE\(id)", after: before, timeout: timeout)
    guard let begin = raw.range(of: "BEGIN\(id)") else { return "" }
    // Serial lines end in CR LF, which Swift treats as one Character.
    return raw[begin.upperBound...].split(whereSeparator: \.isNewline)
      .map { $0.trimmingCharacters(in: .whitespacesAndNewlines) }
      .filter { !$0.isEmpty }
      .joined(separator: "\n")
  }

  func type(_ text: String) {
    process.write(Data(text.utf8))
  }

  /// Waits for the process to exit; returns its status.
  func waitForExit(timeout: Duration) async throws -> Int32 {
    let deadline = ContinuousClock.now + timeout
    while process.isRunning {
      guard ContinuousClock.now < deadline else {
        throw SessionError.timedOut(marker: "process exit", transcriptTail: String(text.suffix(3000)))
      }
      try await Task.sleep(for: .milliseconds(100))
    }
    return process.terminationStatus
  }

  /// Waits for the boot marker of the project's initramfs, then for the shell prompt after it.
  func waitForShell(timeout: Duration = .seconds(300)) async throws {
    let marker = "HOSTVISOR-GUEST-READY"
    _ = try await waitFor(marker, timeout: timeout)
    let afterMarker = text.range(of: marker)?.upperBound
    _ = try await waitFor("# ", after: afterMarker, timeout: .seconds(60))
  }

  /// Sends SIGKILL to the VMM (no chance to flush or clean up), then reaps it.
  func kill() {
    process.signal(SIGKILL)
    process.waitUntilExit()
  }

  /// Saves the whole console for a person reading a failure; returns the file's path.
  @discardableResult
  func saveTranscript(name: String) -> String {
    let path = NSTemporaryDirectory() + "hostvisor-\(name).log"
    try? text.write(toFile: path, atomically: true, encoding: .utf8)
    return path
  }

}

/// The console output collected so far, shared with the pipe's reader.
final class Transcript: Sendable {
  let text = Mutex<String>("")
}

enum SessionError: Error, CustomStringConvertible {
  case timedOut(marker: String, transcriptTail: String)
  var description: String {
    switch self {
    case .timedOut(let marker, let tail): return "timed out waiting for '\(marker)'; console tail:\n\(tail)"
    }
  }
}

/// `count` random bytes from the kernel's generator in one read (`UInt8.random` makes one
/// getrandom call per byte, which for megabytes holds a test thread for seconds).
func randomBytes(_ count: Int) throws -> Data {
  let source = try FileHandle(forReadingFrom: URL(fileURLWithPath: "/dev/urandom"))
  defer { try? source.close() }
  let bytes = try source.read(upToCount: count) ?? Data()
  try #require(bytes.count == count, "short read from /dev/urandom")
  return bytes
}

/// Runs a host command and returns its standard output.
func host(_ executable: String, _ arguments: [String], input: String? = nil) throws -> String {
  try hostCommand(executable, arguments, input: input).output
}

/// Runs a host command (found on PATH when `executable` has no slash) and returns its
/// standard output and exit status; standard error is discarded. A command still running after
/// `timeout` seconds is killed (SIGKILL) and recorded as a test issue, so a stuck client fails
/// its test instead of hanging the run.
func hostCommand(_ executable: String, _ arguments: [String], input: String? = nil, timeout: Double = 300) throws
  -> (output: String, status: Int32)
{
  let result = try hostCommandData(executable, arguments, input: input, timeout: timeout)
  return (String(decoding: result.output, as: UTF8.self), result.status)
}

/// `hostCommand` with the standard output as bytes (binary output such as a cpio archive).
func hostCommandData(_ executable: String, _ arguments: [String], input: String? = nil, timeout: Double = 300)
  throws -> (output: Data, status: Int32)
{
  let result = try HostCommand.run(
    executable, arguments, input: input.map { Data($0.utf8) }, errors: .discarded, timeout: timeout)
  if result.timedOut {
    Issue.record("\(executable) \(arguments.joined(separator: " ")) ran longer than \(Int(timeout)) s: killed")
  }
  return (result.output, result.status)
}

/// The guest images `make test` builds with scripts/make-default-guest.sh.
enum GuestImages {
  static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent()

  static func folder(_ name: String) -> URL { packageRoot.appendingPathComponent(".cache/\(name)") }

  /// The kernel, initramfs and kernel version of the guest in `.cache/NAME`; fails the test
  /// with a hint when the images were not built.
  static func images(_ name: String = "guest") throws -> (kernel: String, initrd: String, version: String) {
    let guest = folder(name)
    let kernel = guest.appendingPathComponent("vmlinuz").path
    try #require(
      FileManager.default.fileExists(atPath: kernel),
      "missing \(kernel): run scripts/make-default-guest.sh (make test does)")
    let version = try String(contentsOf: guest.appendingPathComponent("kernel-version"), encoding: .utf8)
      .trimmingCharacters(in: .whitespacesAndNewlines)
    return (kernel, guest.appendingPathComponent("initramfs.cpio.gz").path, version)
  }
}
