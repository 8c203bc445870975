import Foundation
import TestSupport
import Testing
import VMCore

@testable import VMM

/// A Multiboot guest that writes memory while it counts: iteration i stores i into the page
/// `i % 256` of a 1 MiB buffer at 2 MiB and checks that the page written 255 iterations ago
/// still holds its value (a page lost or stale after a migration shows here: the guest prints
/// "BAD" and exits through isa-debug-exit with 0x13). Every `2^shift` iterations it prints the
/// next line number on COM1, in decimal. It never stops by itself.
func migrationGuest(printShift: Int) -> String {
  multibootPrologue + """
        .set BUFFER, 0x200000
    _start:
            movl $stack_top, %esp
            xorl %esi, %esi
            xorl %edi, %edi
    again:  incl %esi
            movl %esi, %eax
            andl $255, %eax
            shll $12, %eax
            movl %esi, BUFFER(%eax)
            cmpl $256, %esi
            jb checked
            movl %esi, %eax
            subl $255, %eax
            movl %eax, %ebx
            andl $255, %ebx
            shll $12, %ebx
            cmpl %eax, BUFFER(%ebx)
            jne bad
    checked:
            testl $((1 << \(printShift)) - 1), %esi
            jnz again
            incl %edi
            movl %edi, %eax
            call print
            jmp again
    bad:    movw $0x3F8, %dx
            movb $'B', %al
            outb %al, %dx
            movb $'A', %al
            outb %al, %dx
            movb $'D', %al
            outb %al, %dx
            movb $10, %al
            outb %al, %dx
            movw $0xF4, %dx
            movl $0x13, %eax
            outl %eax, %dx
            cli
            hlt
    print:  movl $10, %ecx
            xorl %ebx, %ebx
    digit:  xorl %edx, %edx
            divl %ecx
            addl $48, %edx
            pushl %edx
            incl %ebx
            testl %eax, %eax
            jnz digit
            movw $0x3F8, %dx
    emit:   popl %eax
            outb %al, %dx
            decl %ebx
            jnz emit
            movb $10, %al
            outb %al, %dx
            ret
            .data
            .fill 4096, 1, 0
    stack_top:

    """
}

/// A `hostvisor` child process with its standard output in a file.
final class ChildProcess {
  let process: HostProcess
  let outputPath: String

  init(_ arguments: [String], outputPath: String) throws {
    self.outputPath = outputPath
    _ = FileManager.default.createFile(atPath: outputPath, contents: nil)
    _ = FileManager.default.createFile(atPath: outputPath + ".err", contents: nil)
    process = try HostProcess(
      HostvisorProcess.executable.path, arguments, outputPath: outputPath, errorPath: outputPath + ".err")
  }

  deinit { kill() }

  var output: String { (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? "" }
  var errors: String { (try? String(contentsOfFile: outputPath + ".err", encoding: .utf8)) ?? "" }

  /// Complete lines printed so far.
  var lines: [String] {
    let text = output
    var lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
    lines.removeLast()  // the part after the last newline
    return lines
  }

  /// SIGKILL (what a test leaves behind ends at once, whatever it handles).
  func kill() {
    if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
    process.waitUntilExit()
  }

  /// Waits until `condition` holds; false after `seconds`.
  func wait(seconds: Double, until condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while !condition() {
      guard Date() < deadline else { return false }
      usleep(20_000)
    }
    return true
  }

  /// The exit status once the process has exited within `seconds`, else nil.
  func exitStatus(within seconds: Double) -> Int32? {
    guard wait(seconds: seconds, until: { !process.isRunning }) else { return nil }
    return process.terminationStatus
  }
}

@Test func migrationChecksumIsCRC32C() {
  // "123456789" has the CRC-32C check value 0xE3069283 (the catalogue's check for CRC-32C).
  let check = Array("123456789".utf8)
  #expect(check.withUnsafeBytes { FastCRC32C.checksum($0) } == 0xE306_9283)
  // Every length and alignment against the byte-at-a-time implementation.
  var state: UInt32 = 12345
  let bytes = (0..<1000).map { _ -> UInt8 in
    state = state &* 1_103_515_245 &+ 12345
    return UInt8(truncatingIfNeeded: state >> 16)
  }
  for start in 0..<9 {
    for end in stride(from: start, through: bytes.count, by: 37) {
      let slice = Array(bytes[start..<end])
      #expect(slice.withUnsafeBytes { FastCRC32C.checksum($0) } == CRC32C.checksum(slice))
    }
  }
}

@Suite("Live migration between two hostvisor processes", .serialized)
struct LiveMigrationTests {
  let scratch: ScratchDirectory

  init() throws {
    scratch = try ScratchDirectory()
  }

  /// A `serve` process booting the migration guest from a Firecracker configuration file.
  func startSource(kernel: String, accelerator: String) throws -> (ChildProcess, socket: String) {
    let configuration = scratch.path("source-\(accelerator).json")
    let json = """
      {"boot-source": {"kernel_image_path": "\(kernel)", "boot_args": "migration"},
       "machine-config": {"vcpu_count": 1, "mem_size_mib": 32}}
      """
    try json.write(toFile: configuration, atomically: true, encoding: .utf8)
    let socket = scratch.path("source-\(accelerator).sock")
    let source = try ChildProcess(
      ["serve", "--api-sock", socket, "--accel", accelerator, "--config-file", configuration],
      outputPath: scratch.path("source-\(accelerator).out"))
    return (source, socket)
  }

  func ctl(_ socket: String, _ arguments: String...) throws -> HostvisorProcess.Result {
    try HostvisorProcess.run(["ctl", "--api-sock", socket] + arguments)
  }

  /// The printed line numbers form one run 1, 2, 3, ... across `outputs`, with nothing else.
  func expectConsecutiveCount(_ lines: [String]) {
    for (index, line) in lines.enumerated() where line != String(index + 1) {
      Issue.record("line \(index + 1) of the guest's output is '\(line)'")
      return
    }
  }

  func migrate(accelerator: String, printShift: Int) throws {
    let kernel = try assembleGuest(migrationGuest(printShift: printShift), in: scratch)
    let (source, sourceSocket) = try startSource(kernel: kernel, accelerator: accelerator)
    defer { source.kill() }
    #expect(source.wait(seconds: 60) { source.lines.count >= 10 }, "the source guest printed: \(source.output)")

    // A destination that dies after the first pages: the migration fails, the source runs on.
    let deadPath = scratch.path("dead-\(accelerator).sock")
    let deadAddress = try MigrationAddress("unix:" + deadPath)
    let dead = Thread {
      guard let channel = try? deadAddress.acceptOne() else { return }
      _ = try? channel.receive(.hello)
      try? channel.send(.accept)
      _ = try? channel.receive(.pages)
      // Returning closes the connection mid-transfer, as a dying process would.
    }
    dead.start()
    #expect(
      FileManager.default.fileExists(atPath: deadPath)
        || source.wait(seconds: 5) { FileManager.default.fileExists(atPath: deadPath) })
    // (Without auto-converge: the option reaches the API, which accepts it.)
    let failed = try ctl(sourceSocket, "migrate", "send", "unix:" + deadPath, "--no-auto-converge")
    #expect(failed.status == 1, "a migration to a dying destination reported success")
    #expect(failed.stderr.contains("keeps running"), "stderr: \(failed.stderr)")
    let linesAfterFailure = source.lines.count
    #expect(source.wait(seconds: 60) { source.lines.count >= linesAfterFailure + 10 }, "the source stopped")
    #expect(source.process.isRunning)

    // A real destination.
    let incoming = scratch.path("incoming-\(accelerator).sock")
    let destination = try ChildProcess(
      ["serve", "--api-sock", scratch.path("destination-\(accelerator).sock"), "--incoming", "unix:" + incoming],
      outputPath: scratch.path("destination-\(accelerator).out"))
    defer { destination.kill() }
    #expect(destination.wait(seconds: 10) { FileManager.default.fileExists(atPath: incoming) })
    let sent = try ctl(sourceSocket, "migrate", "send", "unix:" + incoming)
    #expect(sent.status == 0, "migrate send: \(sent.stderr)")
    // The source exits once the destination runs the guest; the count continues there.
    #expect(source.exitStatus(within: 20) == 0, "source: \(source.errors)")
    let sourceLines = source.lines
    #expect(
      destination.wait(seconds: 60) { destination.lines.count >= 10 },
      "destination: \(destination.output) \(destination.errors)")
    #expect(destination.process.isRunning, "destination: \(destination.errors)")
    // The switch-over may fall inside a line: join the raw outputs.
    let joined = (source.output + destination.output).split(separator: "\n").map(String.init)
    #expect(!joined.contains("BAD"))
    expectConsecutiveCount(Array(joined.dropLast()))
    #expect(joined.count > sourceLines.count + 5)
  }

  @Test func softwareCPUGuestMovesWithoutLosingACount() throws {
    try migrate(accelerator: "soft", printShift: 16)
  }

  @Test(.enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
  func kvmGuestMovesWithoutLosingACount() throws {
    try migrate(accelerator: "kvm", printShift: 8)
  }
}
