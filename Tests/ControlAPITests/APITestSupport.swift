import Foundation
import Synchronization
import TestSupport
import Testing

/// A scratch directory removed when the value goes away. Socket paths must stay under 108
/// bytes, so it lives directly in /tmp.
final class Scratch {
  let path: String
  init() throws {
    // Lower case: HTTP-over-Unix-socket clients (requests-unixsocket) put the socket path in
    // the URL's host, which they lower-case.
    path = "/tmp/hv-api-\(UUID().uuidString.prefix(8).lowercased())"
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
  }
  deinit { try? FileManager.default.removeItem(atPath: path) }
  func file(_ name: String) -> String { path + "/" + name }
}

/// The default Debian guest's kernel and initramfs (`make guest`).
func defaultGuest() throws -> (kernel: String, initrd: String) {
  let guest = packageRoot.appendingPathComponent(".cache/guest")
  let kernel = guest.appendingPathComponent("vmlinuz").path
  try #require(FileManager.default.fileExists(atPath: kernel), "no default guest: run `make guest` first")
  return (kernel, guest.appendingPathComponent("initramfs.cpio.gz").path)
}

/// The `hostvisor` binary next to the test bundle.
let hostvisorBinary: String = {
  let testBinary = URL(
    fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
      ?? CommandLine.arguments[0])
  return testBinary.deletingLastPathComponent().appendingPathComponent("hostvisor").path
}()

/// The package root (for `.cache/guest` and `../shared/specs`).
let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
  .deletingLastPathComponent()

/// Runs a program to completion; returns its status and output. A program still running after
/// `timeout` seconds is killed (SIGKILL) and recorded as a test issue.
@discardableResult
func runProgram(_ path: String, _ arguments: [String], input: String? = nil, timeout: Double = 300) throws -> (
  status: Int32, stdout: String, stderr: String
) {
  let result = try HostCommand.run(path, arguments, input: input.map { Data($0.utf8) }, timeout: timeout)
  if result.timedOut {
    Issue.record("\(path) \(arguments.joined(separator: " ")) ran longer than \(Int(timeout)) s: killed")
  }
  return (result.status, result.text, result.errorText)
}

/// One HTTP exchange made with curl over the Unix socket.
struct CurlResult {
  let status: Int
  let body: String

  /// The body parsed as a JSON object.
  var json: [String: Any] {
    (try? JSONSerialization.jsonObject(with: Data(body.utf8))) as? [String: Any] ?? [:]
  }
}

/// Sends one request with `curl --unix-socket`.
func curl(_ socket: String, _ method: String, _ path: String, _ body: String? = nil, bodyFile: String? = nil) throws
  -> CurlResult
{
  var arguments = [
    "-s", "--max-time", "60", "--unix-socket", socket, "-X", method, "-o", "-", "-w", "\n%{http_code}",
    "http://localhost\(path)",
  ]
  if let body { arguments += ["-H", "Content-Type: application/json", "--data-binary", body] }
  if let bodyFile { arguments += ["-H", "Content-Type: application/json", "--data-binary", "@" + bodyFile] }
  let result = try runProgram("/usr/bin/curl", arguments)
  let lines = result.stdout.split(separator: "\n", omittingEmptySubsequences: false)
  let status = Int(lines.last ?? "") ?? 0
  return CurlResult(status: status, body: lines.dropLast().joined(separator: "\n"))
}

/// A `hostvisor` process (any personality) whose output is collected.
final class HostvisorProcess: Sendable {
  let process: HostProcess
  private let transcript = CollectedOutput()
  private let errorTranscript = CollectedOutput()

  /// Starts `executable` (default: the hostvisor binary) with `arguments`.
  init(_ arguments: [String], executable: String = hostvisorBinary, environment: [String: String]? = nil) throws {
    let transcript = self.transcript
    let errorTranscript = self.errorTranscript
    process = try HostProcess(
      executable, arguments, environment: environment.map { ProcessInfo.processInfo.environment.merging($0) { $1 } },
      errors: { errorTranscript.append($0) }, output: { transcript.append($0) })
  }

  deinit {
    if process.isRunning {
      process.terminate()
      if waitForExit(timeout: 5) == nil {
        process.signal(SIGKILL)
        process.waitUntilExit()
      }
    }
  }

  /// Everything the guest (and the process) printed on standard output so far.
  var text: String { transcript.text }

  /// Everything the process printed on standard error so far.
  var errorText: String { errorTranscript.text }

  /// Types `text` on the guest's console.
  func type(_ text: String) { process.write(Data(text.utf8)) }

  /// Waits until `path` exists (the API socket is up).
  func waitForSocket(_ path: String, timeout: TimeInterval = 20) throws {
    let deadline = Date().addingTimeInterval(timeout)
    while !FileManager.default.fileExists(atPath: path) {
      guard Date() < deadline, process.isRunning else {
        throw TestFailure("the API socket \(path) did not appear; output: \(text) \(errorText)")
      }
      usleep(10_000)
    }
  }

  /// Waits until `condition` holds for the transcript.
  func waitForOutput(timeout: TimeInterval = 60, _ what: String, _ condition: (String) -> Bool) throws {
    let deadline = Date().addingTimeInterval(timeout)
    while !condition(text) {
      guard Date() < deadline else {
        throw TestFailure("timed out waiting for \(what); output: \(text.suffix(2000)) \(errorText.suffix(2000))")
      }
      if !process.isRunning {
        usleep(100_000)  // the last output may still be in the pipe
        if condition(text) { return }
        throw TestFailure(
          "the process exited (\(process.terminationStatus)) before \(what); output: \(text.suffix(2000)) \(errorText.suffix(2000))"
        )
      }
      usleep(20_000)
    }
  }

  /// Waits until the default Debian guest's shell prompt follows its ready marker.
  func waitForGuestShell(timeout: TimeInterval = 600) throws {
    try waitForOutput(timeout: timeout, "the guest's shell") { text in
      guard let marker = text.range(of: "HOSTVISOR-GUEST-READY") else { return false }
      return text[marker.upperBound...].contains("# ")
    }
    sleep(1)
  }

  /// Types `command` on the guest's shell between two markers made from `tag` and returns what
  /// it printed between them.
  func guestOutput(_ tag: String, _ command: String, timeout: TimeInterval = 120) throws -> String {
    type("echo \(tag)''BEGIN; \(command); echo \(tag)''END\n")
    var captured = ""
    try waitForOutput(timeout: timeout, tag) { text in
      guard let begin = text.range(of: "\(tag)BEGIN", options: .backwards),
        let end = text.range(of: "\(tag)END", range: begin.upperBound..<text.endIndex)
      else { return false }
      captured = String(text[begin.upperBound..<end.lowerBound])
      return true
    }
    return captured
  }

  /// Waits for the process to exit; nil on timeout.
  func waitForExit(timeout: TimeInterval = 30) -> Int32? {
    let deadline = Date().addingTimeInterval(timeout)
    while process.isRunning {
      guard Date() < deadline else { return nil }
      usleep(10_000)
    }
    return process.terminationStatus
  }
}

struct TestFailure: Error, CustomStringConvertible {
  let description: String
  init(_ description: String) { self.description = description }
}

/// A Multiboot guest that prints `C1`, `C2`, ... on COM1, one line every few milliseconds,
/// forever.
let counterGuestSource = """
          .include "multiboot.inc"
  _start:
          movl $0x80000, %esp
          xorl %ebx, %ebx
  next:   incl %ebx
          movl %ebx, %eax
          movl $buf_end, %edi
          movl $10, %esi
  digit:  xorl %edx, %edx
          divl %esi
          addb $0x30, %dl
          decl %edi
          movb %dl, (%edi)
          testl %eax, %eax
          jnz digit
          movw $0x3F8, %dx
          movb $0x43, %al
          outb %al, %dx
  emit:   cmpl $buf_end, %edi
          je eol
          movb (%edi), %al
          outb %al, %dx
          incl %edi
          jmp emit
  eol:    movb $0x0A, %al
          outb %al, %dx
          movl $3000000, %ecx
  delay:  decl %ecx
          jnz delay
          jmp next
  buf:    .space 16
  buf_end:

  """

/// The folder of the guest sources' `.include` files (Tests/GuestPrograms/include: the
/// Multiboot header, multiboot.inc).
let guestIncludeFolder = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
  .appendingPathComponent("GuestPrograms/include").path

/// Assembles and links `source` as a 32-bit ELF at 1 MiB (`.include` files from
/// `guestIncludeFolder`); returns the image's path.
func assembleGuest(_ source: String, in scratch: Scratch, name: String = "guest") throws -> String {
  let sourcePath = scratch.file("\(name).S")
  try source.write(toFile: sourcePath, atomically: true, encoding: .utf8)
  let object = scratch.file("\(name).o")
  let image = scratch.file("\(name).elf")
  for (tool, arguments) in [
    ("/usr/bin/as", ["--32", "-I", guestIncludeFolder, "-o", object, sourcePath]),
    ("/usr/bin/ld", ["-m", "elf_i386", "-Ttext", "0x100000", "-o", image, object]),
  ] {
    let result = try runProgram(tool, arguments)
    guard result.status == 0 else { throw TestFailure("\(tool) failed: \(result.stderr)") }
  }
  return image
}

/// The counter values the guest printed, in order (a last line still being printed is left
/// out).
func counterValues(_ text: String) -> [Int] {
  var lines = text.split(separator: "\n", omittingEmptySubsequences: false)
  lines.removeLast()
  return lines.compactMap { line in
    // A machine stopped in the middle of a line (a reboot) leaves it for the next one to
    // complete: "C41C1" is the new machine's 1.
    let trimmed = line.trimmingCharacters(in: .whitespacesAndNewlines)
    guard trimmed.hasPrefix("C"), let last = trimmed.lastIndex(of: "C") else { return nil }
    return Int(trimmed[trimmed.index(after: last)...])
  }
}
