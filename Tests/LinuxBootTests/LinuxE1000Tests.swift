import Foundation
import TestSupport
import Testing

/// The emulated 82540EM end to end: Debian's generic kernel (the `guest-generic` images, whose
/// initramfs carries e1000.ko) on the software CPU binds its own `e1000` driver to
/// `--net tap=...,model=e1000`, brings the link up, and moves traffic through a TAP in a
/// network namespace made by the test: ping, and 10 MiB each way with busybox nc, checked with
/// sha256sum on both sides.
@Suite("Linux drives the emulated e1000 on the software CPU", .serialized)
struct LinuxE1000Tests {
  /// Starts a busybox nc in `namespace` with `arguments`, its standard input read from the file
  /// `input` (or a pipe the test keeps open, when nil) and its standard output written to the
  /// file `output` (or discarded). The files are opened by the shell that becomes nc, so the
  /// child holds only its own descriptors 0-2 (`HostProcess`).
  static func netcat(in namespace: String, _ arguments: [String], input: String? = nil, output: String? = nil)
    throws -> HostProcess
  {
    let script =
      #"in=$0; out=$1; shift; if [ "$in" = - ]; then exec /bin/busybox nc "$@" >"$out"; "#
      + #"else exec /bin/busybox nc "$@" <"$in" >"$out"; fi"#
    return try HostProcess(
      "/usr/bin/env",
      ["ip", "netns", "exec", namespace, "/bin/sh", "-c", script, input ?? "-", output ?? "/dev/null"] + arguments,
      errors: { _ in }, output: { _ in })
  }

  /// Ends a helper process (SIGKILL, as for every helper the tests start).
  static func stop(_ process: HostProcess) {
    if process.isRunning { process.signal(SIGKILL) }
    process.waitUntilExit()
  }

  @Test(.enabled(if: getuid() == 0, "needs root to make a network namespace"), .timeLimit(.minutes(30)))
  func tcpOverE1000ThroughATapInANetworkNamespace() async throws {
    try await Self.tcpThroughATap(
      model: "e1000", module: "e1000", tap: "hve1000", linkMessage: "NIC Link is Up 1000 Mbps Full Duplex")
  }

  /// Boots the generic kernel with `--net tap=TAP,model=MODEL,mac=...` in a new network
  /// namespace, loads `module`, and checks that its driver binds eth0 with the MAC the device
  /// was given, that dmesg shows `linkMessage`, that the guest pings the host side of the TAP,
  /// and that 10 MiB go each way with busybox nc, their SHA-256 checked on both sides.
  static func tcpThroughATap(model: String, module: String, tap: String, linkMessage: String) async throws {
    let scratch = try LinuxVirtioTests.ScratchFolder()
    let namespace = "\(tap)-\(UInt32.random(in: 0...UInt32.max))"
    let mac = "52:54:00:12:34:56"
    try #require(try hostCommand("ip", ["netns", "add", namespace]).status == 0)
    defer { _ = try? hostCommand("ip", ["netns", "del", namespace]) }
    _ = try hostCommand("ip", ["-n", namespace, "link", "set", "lo", "up"])
    let images = try GuestImages.images("guest-generic")

    let session = try GuestSession(
      arguments: [
        "run", "--accel", "soft", "--memory", "512M", "--serial", "stdio",
        "--kernel", images.kernel, "--initrd", images.initrd,
        "--cmdline", "console=ttyS0 panic=-1 loglevel=4 hostvisor.modules=\(module)",
        "--net", "tap=\(tap),model=\(model),mac=\(mac)",
      ], launcher: ["/usr/bin/env", "ip", "netns", "exec", namespace])
    defer { session.saveTranscript(name: model) }
    var tapExists = false
    for _ in 0..<100 where !tapExists {
      tapExists = try hostCommand("ip", ["-n", namespace, "link", "show", tap]).status == 0
      if !tapExists { try await Task.sleep(for: .milliseconds(200)) }
    }
    try #require(tapExists, "hostvisor did not create the TAP \(tap)")
    #expect(try hostCommand("ip", ["-n", namespace, "addr", "add", "10.0.3.2/24", "dev", tap]).status == 0)
    #expect(try hostCommand("ip", ["-n", namespace, "link", "set", tap, "up"]).status == 0)
    try await session.waitForShell(timeout: .seconds(600))

    // The driver bound eth0 with the device's MAC (read from its EEPROM), and reports the
    // link up once the interface is up.
    let driver = try await session.run(
      "basename $(readlink /sys/class/net/eth0/device/driver); cat /sys/class/net/eth0/address")
    #expect(driver.contains(module))
    #expect(driver.contains(mac))
    let link = try await session.run(
      "ip link set eth0 up && ip addr add 10.0.3.15/24 dev eth0;"
        + " for i in $(seq 1 100); do dmesg | grep -qiE 'link (is )?up' && break; sleep 0.2; done; dmesg | grep -i eth0",
      timeout: .seconds(180))
    #expect(link.contains(linkMessage))
    let ping = try await session.run("ping -c 3 -W 5 10.0.3.2", timeout: .seconds(60))
    #expect(ping.contains("3 packets received"))

    // Host to guest: a host listener sends 10 MiB of random bytes; the guest checksums them.
    let size = 10 << 20
    let payload = scratch.path("to-guest.bin")
    var random = SystemRandomNumberGenerator()
    _ = FileManager.default.createFile(
      atPath: payload, contents: Data((0..<size / 8).flatMap { _ in withUnsafeBytes(of: random.next()) { Array($0) } }))
    let sender = try Self.netcat(in: namespace, ["-l", "-p", "5001"], input: payload)
    defer { Self.stop(sender) }
    let received = try await session.run(
      "for i in 1 2 3 4 5; do nc 10.0.3.2 5001 > /tmp/in && [ -s /tmp/in ] && break; sleep 1; done;"
        + " sha256sum /tmp/in; wc -c < /tmp/in", timeout: .seconds(900))
    #expect(LinuxVirtioTests.digest(in: received, for: "/tmp/in") == (try LinuxVirtioTests.sha256(ofFile: payload)))

    // Guest to host: the guest sends 10 MiB of random bytes; the host listener's copy must match.
    let copy = scratch.path("from-guest.bin")
    #expect(FileManager.default.createFile(atPath: copy, contents: nil))
    let receiver = try Self.netcat(in: namespace, ["-l", "-p", "5002"], output: copy)
    defer { Self.stop(receiver) }
    let sent = try await session.run(
      "rm /tmp/in; head -c \(size) /dev/urandom > /tmp/out && sha256sum /tmp/out"
        + " && for i in 1 2 3 4 5; do nc 10.0.3.2 5002 < /tmp/out && break; sleep 1; done",
      timeout: .seconds(900))
    let sentDigest = try #require(LinuxVirtioTests.digest(in: sent, for: "/tmp/out"))
    for _ in 0..<300 {
      let length = (try? FileManager.default.attributesOfItem(atPath: copy)[.size] as? Int) ?? 0
      if length >= size { break }
      try await Task.sleep(for: .milliseconds(200))
    }
    #expect(try LinuxVirtioTests.sha256(ofFile: copy) == sentDigest)

    session.type("poweroff -f\n")
    #expect(try await session.waitForExit(timeout: .seconds(120)) == 0)
  }
}
