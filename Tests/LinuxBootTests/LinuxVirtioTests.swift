import Foundation
import Testing

/// Issue 5 end to end: Debian's kernel on the software CPU, with its own virtio drivers loaded
/// from the initramfs, uses Hostvisor's virtio-blk (a raw image file), virtio-net (a TAP in a
/// network namespace made by the test) and virtio-console (hvc0). The host checks every result
/// with its own tools (e2fsprogs, sha256sum, busybox nc).
@Suite("Linux uses the virtio devices on the software CPU", .serialized)
struct LinuxVirtioTests {
  /// A scratch folder removed when the test ends.
  final class ScratchFolder {
    let url: URL
    init() throws {
      url = FileManager.default.temporaryDirectory.appendingPathComponent("hostvisor-virtio-\(UUID().uuidString)")
      try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }
    func path(_ name: String) -> String { url.appendingPathComponent(name).path }
    deinit { try? FileManager.default.removeItem(at: url) }
  }

  /// Boots the default guest with `extra` arguments and waits for its shell.
  static func boot(
    _ extra: [String], cmdline: String? = "console=ttyS0 panic=-1 loglevel=4", launcher: [String] = []
  ) async throws -> GuestSession {
    let (kernel, initrd, _) = try GuestImages.images()
    var arguments = ["run", "--accel", "soft", "--memory", "512M", "--kernel", kernel, "--initrd", initrd]
    if let cmdline { arguments += ["--cmdline", cmdline] }
    let session = try GuestSession(arguments: arguments + extra, launcher: launcher)
    try await session.waitForShell()
    return session
  }

  /// The SHA-256 of a host file, as sha256sum prints it.
  static func sha256(ofFile path: String) throws -> String {
    String(try host("/usr/bin/sha256sum", [path]).prefix(64))
  }

  /// The first word of the line of `output` that mentions `name` (sha256sum's digest of it).
  static func digest(in output: String, for name: String) -> String? {
    output.split(separator: "\n").first { $0.contains(name) }?.split(separator: " ").first.map(String.init)
  }

  /// Copies a file out of an ext2 image with debugfs (no mount, no root needed).
  static func extract(_ file: String, from image: String, to destination: String) throws {
    _ = try hostCommand("debugfs", ["-R", "dump \(file) \(destination)", image])
    try #require(FileManager.default.fileExists(atPath: destination), "debugfs found no \(file) in \(image)")
  }

  @Test func ext2OnVirtioBlockSurvivesPowerOffReadOnlyRebootAndKill() async throws {
    let scratch = try ScratchFolder()
    let image = scratch.path("disk.img")
    #expect(FileManager.default.createFile(atPath: image, contents: nil))
    try FileHandle(forWritingAtPath: image).map { try $0.truncate(atOffset: 64 << 20) }
    let modules = "console=ttyS0 panic=-1 loglevel=4 hostvisor.modules=virtio_pci,virtio_blk"

    // 1. A blank disk: make a filesystem, write files, sync, power off.
    let phrase = "flushed by the guest \(UInt64.random(in: 0...UInt64.max))"
    let first = try await Self.boot(["--serial", "stdio", "--disk", image], cmdline: modules)
    defer { first.saveTranscript(name: "virtio-blk-1") }
    #expect(try await first.run("cat /sys/block/vda/ro") == "0")
    #expect(try await first.run("mke2fs -q /dev/vda && echo MKFS-OK").contains("MKFS-OK"))
    let written = try await first.run(
      "mount -t ext2 /dev/vda /mnt && echo -n '\(phrase)' > /mnt/note.txt"
        + " && dd if=/dev/urandom of=/mnt/random.bin bs=1024 count=1536 2>/dev/null"
        + " && sha256sum /mnt/random.bin && sync && umount /mnt && echo WRITE-OK",
      timeout: .seconds(180))
    #expect(written.contains("WRITE-OK"))
    let randomDigest = try #require(Self.digest(in: written, for: "/mnt/random.bin"))
    try await Task.sleep(for: .seconds(1))
    first.type("poweroff -f\n")
    #expect(try await first.waitForExit(timeout: .seconds(120)) == 0)

    // The host reads the filesystem the guest made.
    #expect(try hostCommand("e2fsck", ["-fn", image]).status == 0)
    try Self.extract("/note.txt", from: image, to: scratch.path("note.txt"))
    #expect(try String(contentsOfFile: scratch.path("note.txt"), encoding: .utf8) == phrase)
    try Self.extract("/random.bin", from: image, to: scratch.path("random.bin"))
    #expect(try Self.sha256(ofFile: scratch.path("random.bin")) == randomDigest)
    let imageDigest = try Self.sha256(ofFile: image)

    // 2. Read-only: the guest reads the files back; writes fail and the image stays unchanged.
    let second = try await Self.boot(["--serial", "stdio", "--disk", "\(image),readonly"], cmdline: modules)
    defer { second.saveTranscript(name: "virtio-blk-2") }
    #expect(try await second.run("cat /sys/block/vda/ro") == "1")
    let readBack = try await second.run(
      "mount -t ext2 -o ro /dev/vda /mnt && cat /mnt/note.txt && echo && sha256sum /mnt/random.bin")
    #expect(readBack.contains(phrase))
    #expect(Self.digest(in: readBack, for: "/mnt/random.bin") == randomDigest)
    let refused = try await second.run(
      "dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null; echo status=$?")
    #expect(refused.contains("status=") && !refused.contains("status=0"))
    try await Task.sleep(for: .seconds(1))
    second.type("umount /mnt; poweroff -f\n")
    #expect(try await second.waitForExit(timeout: .seconds(120)) == 0)
    #expect(try Self.sha256(ofFile: image) == imageDigest)

    // 3. kill -9 right after the guest's sync: what it flushed is in the image.
    let third = try await Self.boot(["--serial", "stdio", "--disk", image], cmdline: modules)
    defer { third.saveTranscript(name: "virtio-blk-3") }
    let synced = try await third.run(
      "mount -t ext2 /dev/vda /mnt && dd if=/dev/urandom of=/mnt/after-sync.bin bs=1024 count=1024 2>/dev/null"
        + " && sha256sum /mnt/after-sync.bin && sync",
      timeout: .seconds(180))
    third.kill()
    let syncedDigest = try #require(Self.digest(in: synced, for: "/mnt/after-sync.bin"))
    try Self.extract("/after-sync.bin", from: image, to: scratch.path("after-sync.bin"))
    #expect(try Self.sha256(ofFile: scratch.path("after-sync.bin")) == syncedDigest)
  }

  @Test(.enabled(if: getuid() == 0, "needs root to make a network namespace"))
  func tcpOverVirtioNetThroughATapInANetworkNamespace() async throws {
    let scratch = try ScratchFolder()
    let namespace = "hvtest-\(UInt32.random(in: 0...UInt32.max))"
    try #require(try hostCommand("ip", ["netns", "add", namespace]).status == 0)
    defer { _ = try? hostCommand("ip", ["netns", "del", namespace]) }
    _ = try hostCommand("ip", ["-n", namespace, "link", "set", "lo", "up"])
    let inNamespace = ["/usr/bin/env", "ip", "netns", "exec", namespace]

    let session = try GuestSession(
      arguments: [
        "run", "--accel", "soft", "--memory", "512M", "--serial", "stdio",
        "--kernel", try GuestImages.images().kernel, "--initrd", try GuestImages.images().initrd,
        "--cmdline", "console=ttyS0 panic=-1 loglevel=4 hostvisor.modules=virtio_pci,virtio_net",
        "--net", "tap=hvtap0",
      ], launcher: inNamespace)
    defer { session.saveTranscript(name: "virtio-net") }
    // Hostvisor creates the TAP (down); the host side gets its address once it exists.
    var tapExists = false
    for _ in 0..<100 where !tapExists {
      tapExists = try hostCommand("ip", ["-n", namespace, "link", "show", "hvtap0"]).status == 0
      if !tapExists { try await Task.sleep(for: .milliseconds(200)) }
    }
    try #require(tapExists, "hostvisor did not create the TAP hvtap0")
    #expect(try hostCommand("ip", ["-n", namespace, "addr", "add", "10.0.2.2/24", "dev", "hvtap0"]).status == 0)
    #expect(try hostCommand("ip", ["-n", namespace, "link", "set", "hvtap0", "up"]).status == 0)
    try await session.waitForShell()

    #expect(
      try await session.run("ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && echo NET-UP")
        .contains("NET-UP"))
    let ping = try await session.run("ping -c 3 -W 5 10.0.2.2")
    #expect(ping.contains("3 packets received"))

    // Host to guest: a host listener sends a random payload; the guest checksums what it got.
    let size = 3 << 20
    let payload = scratch.path("to-guest.bin")
    _ = FileManager.default.createFile(
      atPath: payload, contents: try randomBytes(size))
    let sender = try LinuxE1000Tests.netcat(in: namespace, ["-l", "-p", "5001"], input: payload)
    defer { LinuxE1000Tests.stop(sender) }
    let received = try await session.run(
      "for i in 1 2 3 4 5; do nc 10.0.2.2 5001 > /tmp/in && [ -s /tmp/in ] && break; sleep 1; done;"
        + " sha256sum /tmp/in", timeout: .seconds(240))
    #expect(Self.digest(in: received, for: "/tmp/in") == (try Self.sha256(ofFile: payload)))

    // Guest to host: the guest sends random bytes; the host listener's copy must match.
    let copy = scratch.path("from-guest.bin")
    #expect(FileManager.default.createFile(atPath: copy, contents: nil))
    let receiver = try LinuxE1000Tests.netcat(in: namespace, ["-l", "-p", "5002"], output: copy)
    defer { LinuxE1000Tests.stop(receiver) }
    let sent = try await session.run(
      "head -c \(size) /dev/urandom > /tmp/out && sha256sum /tmp/out"
        + " && for i in 1 2 3 4 5; do nc 10.0.2.2 5002 < /tmp/out && break; sleep 1; done",
      timeout: .seconds(240))
    let sentDigest = try #require(Self.digest(in: sent, for: "/tmp/out"))
    for _ in 0..<150 {
      let length = (try? FileManager.default.attributesOfItem(atPath: copy)[.size] as? Int) ?? 0
      if length >= size { break }
      try await Task.sleep(for: .milliseconds(200))
    }
    #expect(try Self.sha256(ofFile: copy) == sentDigest)

    try await Task.sleep(for: .seconds(1))
    session.type("poweroff -f\n")
    #expect(try await session.waitForExit(timeout: .seconds(120)) == 0)
  }

  @Test func shellOnTheVirtioConsole() async throws {
    // No --cmdline: `--console virtio` makes the default command line console=hvc0.
    let session = try await Self.boot(["--console", "virtio"], cmdline: nil)
    defer { session.saveTranscript(name: "virtio-console") }
    #expect(try await session.run("tty") == "/dev/hvc0")
    #expect(try await session.run("cat /proc/consoles").contains("hvc0"))
    let n = Int.random(in: 100...999)
    #expect(try await session.run("echo $((\(n) * \(n)))") == "\(n * n)")
    // The virtio devices interrupt through MSI-X: virtio-pci names per-queue vectors
    // "virtioN-<queue>" (an INTx device has one "virtioN" line), on an MSI irq chip, and the
    // console's queues have taken interrupts (the commands above went through them).
    let interrupts = try await session.run("grep virtio /proc/interrupts")
    let lines = interrupts.split(separator: "\n").map(String.init)
    #expect(lines.contains { $0.contains("MSI") && $0.contains("-config") }, "\(interrupts)")
    let queueInterrupts = lines.filter { $0.contains("MSI") && $0.contains("virtio") && !$0.contains("-config") }
      .compactMap { line in line.split(separator: " ").dropFirst().first.flatMap { Int($0) } }
    #expect(queueInterrupts.contains { $0 > 0 }, "\(interrupts)")
    try await Task.sleep(for: .seconds(1))
    session.type("poweroff -f\n")
    #expect(try await session.waitForExit(timeout: .seconds(120)) == 0)
  }
}
