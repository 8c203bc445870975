import Foundation
import Testing

/// Live migration of the default Debian guest on the software CPU between two `hostvisor
/// serve` processes over a Unix socket: a shell loop counting on the serial console and a file
/// in tmpfs; the count continues on the destination without a reset and the file is there.
@Suite("Linux live migration on the software CPU", .serialized)
struct LinuxMigrationTests {
  static var hostvisor: String {
    let testBinary = URL(
      fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
        ?? CommandLine.arguments[0])
    return testBinary.deletingLastPathComponent().appendingPathComponent("hostvisor").path
  }

  @Test func shellCounterAndTmpfsFileContinueOnTheDestination() async throws {
    let scratch = try LinuxVirtioTests.ScratchFolder()
    let (kernel, initrd, _) = try GuestImages.images()
    let configuration = scratch.path("source.json")
    let json = """
      {"boot-source": {"kernel_image_path": "\(kernel)", "initrd_path": "\(initrd)",
                       "boot_args": "console=ttyS0 panic=-1 loglevel=4"},
       "machine-config": {"vcpu_count": 1, "mem_size_mib": 256}}
      """
    try json.write(toFile: configuration, atomically: true, encoding: .utf8)
    let sourceSocket = scratch.path("source.sock")
    let source = try GuestSession(arguments: [
      "serve", "--api-sock", sourceSocket, "--accel", "soft", "--config-file", configuration,
    ])
    defer {
      source.saveTranscript(name: "migration-source")
      if source.process.isRunning { source.kill() }
    }
    try await source.waitForShell()
    let phrase = "written before the migration \(UInt64.random(in: 0...UInt64.max))"
    #expect(try await source.run("echo '\(phrase)' > /tmp/t.txt && echo FILE-OK").contains("FILE-OK"))
    source.type("i=0; while true; do i=$((i+1)); echo COUNT=$i; sleep 0.2; done &\n")
    _ = try await LinuxSnapshotTests.waitForCount(source, above: 5)

    let incoming = scratch.path("incoming.sock")
    let destination = try GuestSession(arguments: [
      "serve", "--api-sock", scratch.path("destination.sock"), "--incoming", "unix:" + incoming,
    ])
    defer {
      destination.saveTranscript(name: "migration-destination")
      if destination.process.isRunning { destination.kill() }
    }
    let deadline = ContinuousClock.now + .seconds(20)
    while !FileManager.default.fileExists(atPath: incoming) && ContinuousClock.now < deadline {
      try await Task.sleep(for: .milliseconds(50))
    }
    let sent = try hostCommand(
      Self.hostvisor, ["ctl", "--api-sock", sourceSocket, "migrate", "send", "unix:" + incoming])
    #expect(sent.status == 0, "migrate send: \(sent.output)")
    #expect(try await source.waitForExit(timeout: .seconds(30)) == 0)
    let lastOnSource = try #require(LinuxSnapshotTests.counts(in: source.text).last)

    // The loop goes on where it was: the first count the destination prints follows the last
    // one the source printed (the line cut by the switch-over may be lost to the parser).
    _ = try await LinuxSnapshotTests.waitForCount(destination, above: lastOnSource + 3)
    let onDestination = LinuxSnapshotTests.counts(in: destination.text)
    let first = try #require(onDestination.first)
    #expect(first == lastOnSource + 1 || first == lastOnSource + 2, "source ended at \(lastOnSource), then \(first)")
    #expect(onDestination == Array(first..<(first + onDestination.count)))
    #expect(try await destination.run("cat /tmp/t.txt").contains(phrase))
  }
}
