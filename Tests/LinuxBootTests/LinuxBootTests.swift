import Foundation
import Synchronization
import Testing

/// A running `hostvisor` whose serial console the test reads and types into, as a person at
/// the terminal would.
final class GuestSession: Sendable {
  let process = Process()
  private let input = Pipe()
  private let output = Pipe()
  private let transcript = Transcript()

  init(arguments: [String]) throws {
    let testBinary = URL(
      fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
        ?? CommandLine.arguments[0])
    process.executableURL = testBinary.deletingLastPathComponent().appendingPathComponent("hostvisor")
    process.arguments = arguments
    process.standardInput = input
    process.standardOutput = output
    process.standardError = output
    let transcript = self.transcript
    output.fileHandleForReading.readabilityHandler = { handle in
      let data = handle.availableData
      guard !data.isEmpty else { return }
      transcript.text.withLock { $0 += String(decoding: data, as: UTF8.self) }
    }
    try process.run()
  }

  /// Everything the guest printed so far.
  var text: String { transcript.text.withLock { $0 } }

  /// Waits until `marker` appears after `offset` in the transcript; returns the text before it.
  func waitFor(_ marker: String, after offset: String.Index? = nil, timeout: Duration) async throws -> String {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
      let current = text
      let start = offset.map { min($0, current.endIndex) } ?? current.startIndex
      if let range = current[start...].range(of: marker) {
        return String(current[start..<range.lowerBound])
      }
      if !process.isRunning { break }
      try await Task.sleep(for: .milliseconds(100))
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
    input.fileHandleForWriting.write(Data(text.utf8))
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

  deinit {
    if process.isRunning { process.terminate() }
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

/// Runs a host command and returns its standard output.
func host(_ executable: String, _ arguments: [String], input: String? = nil) throws -> String {
  let process = Process()
  process.executableURL = URL(fileURLWithPath: executable)
  process.arguments = arguments
  let out = Pipe()
  let inPipe = Pipe()
  process.standardOutput = out
  process.standardInput = inPipe
  try process.run()
  if let input { inPipe.fileHandleForWriting.write(Data(input.utf8)) }
  try inPipe.fileHandleForWriting.close()
  let data = out.fileHandleForReading.readDataToEndOfFile()
  process.waitUntilExit()
  return String(decoding: data, as: UTF8.self)
}

/// The guest images `make test` builds with scripts/make-default-guest.sh.
enum GuestImages {
  static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent()

  static func folder(_ name: String) -> URL { packageRoot.appendingPathComponent(".cache/\(name)") }
}

/// Issue 4: Debian's kernels boot to a busybox shell on the software CPU, a scripted session
/// runs, and `poweroff -f` ends the VMM with status 0.
@Suite("Linux boots on the software CPU", .serialized)
struct LinuxBootTests {
  @Test(arguments: ["guest", "guest-generic"])
  func debianKernelBootsToAShellAndPowersOff(folder: String) async throws {
    let guest = GuestImages.folder(folder)
    let kernel = guest.appendingPathComponent("vmlinuz").path
    let initrd = guest.appendingPathComponent("initramfs.cpio.gz").path
    try #require(
      FileManager.default.fileExists(atPath: kernel),
      "missing \(kernel): run scripts/make-default-guest.sh (make test does)")
    let version = try String(contentsOf: guest.appendingPathComponent("kernel-version"), encoding: .utf8)
      .trimmingCharacters(in: .whitespacesAndNewlines)

    let session = try GuestSession(arguments: [
      "run", "--accel", "soft", "--memory", "512M", "--serial", "stdio", "--kernel", kernel, "--initrd", initrd,
      "--cmdline", "console=ttyS0 panic=-1",
    ])
    defer {
      // The whole console, for a person reading a failure.
      try? session.text.write(
        toFile: NSTemporaryDirectory() + "hostvisor-linux-boot-\(folder).log", atomically: true, encoding: .utf8)
    }
    let marker = "HOSTVISOR-GUEST-READY"
    _ = try await session.waitFor(marker, timeout: .seconds(300))
    let afterMarker = session.text.range(of: marker)?.upperBound
    _ = try await session.waitFor("# ", after: afterMarker, timeout: .seconds(60))

    #expect(try await session.run("uname -r") == version)

    let cpuinfo = try await session.run("cat /proc/cpuinfo")
    #expect(cpuinfo.contains("processor\t: 0"))
    #expect(cpuinfo.contains(" sse2"))

    let phrase = "hostvisor runs guests \(UInt32.random(in: 0...UInt32.max))"
    let expectedDigest = try host("/usr/bin/sha256sum", [], input: phrase).split(separator: " ").first.map(String.init)
    let guestDigest = try await session.run("echo -n '\(phrase)' | sha256sum").split(separator: " ").first.map(
      String.init)
    #expect(guestDigest != nil && guestDigest == expectedDigest)

    let n = Int.random(in: 500...2000)
    let expectedSum = (1...n).reduce(0) { $0 + $1 * $1 }
    let awkSum = try await session.run("awk 'BEGIN { s = 0; for (i = 1; i <= \(n); i++) s += i * i; print s }'")
    #expect(awkSum == "\(expectedSum)")

    let mounts = try await session.run(
      "mkdir -p /mnt/p /mnt/s && mount -t proc proc /mnt/p && mount -t sysfs sys /mnt/s && cat /mnt/p/sys/kernel/osrelease && ls /mnt/s"
    )
    #expect(mounts.contains(version))
    #expect(mounts.contains("kernel") && mounts.contains("devices"))

    try await Task.sleep(for: .seconds(1))
    session.type("poweroff -f\n")
    #expect(try await session.waitForExit(timeout: .seconds(120)) == 0)
  }
}
