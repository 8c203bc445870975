import Foundation
import Testing

/// Issue 10 on the default Debian guest and the software CPU: a snapshot taken from a running
/// `hostvisor` (SIGUSR2 with `--snapshot-on-signal`), the process killed, and the snapshot
/// restored in new processes with `hostvisor run --restore`.
@Suite("Linux snapshot and restore on the software CPU", .serialized)
struct LinuxSnapshotTests {
  /// The values of `COUNT=n` lines in `text`, in order.
  static func counts(in text: String) -> [Int] {
    text.split(whereSeparator: \.isNewline).compactMap { line in
      guard let range = line.range(of: "COUNT=") else { return nil }
      return Int(line[range.upperBound...].prefix { $0.isNumber })
    }
  }

  /// Waits until the session printed a `COUNT=` line with a value above `value`.
  static func waitForCount(_ session: GuestSession, above value: Int, timeout: Duration = .seconds(120)) async throws
    -> Int
  {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
      if let last = counts(in: session.text).last, last > value { return last }
      try await Task.sleep(for: .milliseconds(200))
    }
    throw SessionError.timedOut(marker: "COUNT above \(value)", transcriptTail: String(session.text.suffix(3000)))
  }

  @Test func shellCounterFilesAndDiskSurviveKillAndRestoreInNewProcesses() async throws {
    let scratch = try LinuxVirtioTests.ScratchFolder()
    let image = scratch.path("disk.img")
    #expect(FileManager.default.createFile(atPath: image, contents: nil))
    try FileHandle(forWritingAtPath: image).map { try $0.truncate(atOffset: 32 << 20) }
    #expect(try hostCommand("mke2fs", ["-q", "-F", "-t", "ext2", image]).status == 0)
    let state = scratch.path("guest.state")
    let modules = "console=ttyS0 panic=-1 loglevel=4 hostvisor.modules=virtio_pci,virtio_blk"

    // 1. Boot, write a file on ext2 and one in tmpfs, start a counter loop, snapshot, kill.
    let source = try await LinuxVirtioTests.boot(
      ["--serial", "stdio", "--disk", image, "--snapshot-on-signal", state], cmdline: modules)
    defer { source.saveTranscript(name: "snapshot-source") }
    let phrase = "written before the snapshot \(UInt64.random(in: 0...UInt64.max))"
    #expect(
      try await source.run(
        "mount -t ext2 /dev/vda /mnt && echo '\(phrase)' > /mnt/before.txt && sync && echo '\(phrase)' > /tmp/t.txt"
          + " && echo FILES-OK"
      ).contains("FILES-OK"))
    source.type("i=0; while true; do i=$((i+1)); echo COUNT=$i; sleep 1; done &\n")
    _ = try await Self.waitForCount(source, above: 3)
    let beforeSignal = source.text.endIndex
    kill(source.process.processIdentifier, SIGUSR2)
    _ = try await source.waitFor("snapshot written to", after: beforeSignal, timeout: .seconds(120))
    let atSnapshot = try #require(Self.counts(in: String(source.text[..<beforeSignal])).last)
    _ = try await Self.waitForCount(source, above: atSnapshot + 1)
    source.kill()
    let seenBySource = Self.counts(in: source.text).last ?? 0

    // 2. Restore the same snapshot twice, side by side: both counters continue from the
    // snapshot's value, not from 1.
    let first = try GuestSession(arguments: ["run", "--restore", state, "--serial", "stdio"])
    let second = try GuestSession(arguments: ["run", "--restore", state, "--serial", "stdio"])
    defer {
      first.saveTranscript(name: "snapshot-restore-1")
      second.saveTranscript(name: "snapshot-restore-2")
    }
    for session in [first, second] {
      _ = try await Self.waitForCount(session, above: atSnapshot + 2)
      let restoredCounts = Self.counts(in: session.text)
      let firstCount = try #require(restoredCounts.first)
      #expect(firstCount >= atSnapshot && firstCount <= seenBySource + 1, "restored counter began at \(firstCount)")
      #expect(zip(restoredCounts, restoredCounts.dropFirst()).allSatisfy { $1 == $0 + 1 }, "\(restoredCounts)")
    }
    second.kill()

    // 3. The files are there, and new disk writes land in the image.
    let afterPhrase = "written after the restore \(UInt64.random(in: 0...UInt64.max))"
    let files = try await first.run(
      "cat /mnt/before.txt /tmp/t.txt && echo '\(afterPhrase)' > /mnt/after.txt && sync && echo SYNC-OK")
    #expect(files.components(separatedBy: phrase).count == 3, "\(files)")
    #expect(files.contains("SYNC-OK"))
    first.kill()
    try LinuxVirtioTests.extract("/after.txt", from: image, to: scratch.path("after.txt"))
    #expect(try String(contentsOfFile: scratch.path("after.txt"), encoding: .utf8).contains(afterPhrase))

    // 4. Damaged state files: one clear line and exit status 1 each.
    let good = try Data(contentsOf: URL(fileURLWithPath: state))
    var flipped = good
    flipped[good.count / 2] ^= 0x04
    var version = good
    version[8] = 7
    for (name, bytes, message) in [
      ("truncated", good.prefix(good.count / 3), "truncated"), ("flipped", flipped, "checksum"),
      ("version", version, "format version 7"),
    ] {
      let path = scratch.path("\(name).state")
      try Data(bytes).write(to: URL(fileURLWithPath: path))
      let session = try GuestSession(arguments: ["run", "--restore", path])
      #expect(try await session.waitForExit(timeout: .seconds(30)) == 1)
      let lines = session.text.split(whereSeparator: \.isNewline)
      #expect(lines.count == 1 && lines[0].hasPrefix("hostvisor: error: ") && lines[0].contains(message), "\(lines)")
    }
  }
}
