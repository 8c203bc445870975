import Foundation
import TestSupport
import Testing

/// User-mode networking (`--net user`, on passt) for an unprivileged user: the default Debian
/// guest on the software CPU, run under an unprivileged uid, gets its address by DHCP, fetches
/// from an HTTP server on the host's loopback through the gateway, and serves host clients
/// through port forwards: 10 MiB each way through the gateway and through the forwards.
/// Payloads are random and checked with sha256sum on both sides.
@Suite("User-mode networking without privileges", .serialized)
struct UserNetworkTests {
  /// The unprivileged user the VMM runs as when the test runs as root.
  static let nobody = "65534"

  /// A folder every user can read, removed when the test ends.
  final class SharedFolder {
    let url: URL
    init() throws {
      url = URL(fileURLWithPath: "/tmp").appendingPathComponent("hostvisor-usernet-\(UUID().uuidString)")
      try FileManager.default.createDirectory(
        at: url, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
    }
    func path(_ name: String) -> String { url.appendingPathComponent(name).path }
    deinit { try? FileManager.default.removeItem(at: url) }
  }

  static func freePort() -> UInt16 { UInt16.random(in: 20_000...40_000) }

  @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/passt"), "needs passt"))
  func dhcpHttpThroughTheGatewayAndAPortForwardAsAnUnprivilegedUser() async throws {
    let folder = try SharedFolder()
    let images = try GuestImages.images()
    // The images may sit where the unprivileged user cannot read them: copy them.
    let kernel = folder.path("vmlinuz")
    let initrd = folder.path("initramfs.cpio.gz")
    try FileManager.default.copyItem(atPath: images.kernel, toPath: kernel)
    try FileManager.default.copyItem(atPath: images.initrd, toPath: initrd)
    for file in [kernel, initrd] {
      try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: file)
    }

    // An HTTP server on the host's loopback only, serving a token and a 10 MiB payload.
    let size = 10 << 20
    let token = "TOKEN-\(UUID().uuidString)"
    let web = folder.path("www")
    try FileManager.default.createDirectory(atPath: web, withIntermediateDirectories: true)
    try token.write(toFile: web + "/token", atomically: true, encoding: .utf8)
    let payload = web + "/payload.bin"
    _ = FileManager.default.createFile(
      atPath: payload, contents: try randomBytes(size))
    let httpPort = Self.freePort()
    let server = try HostProcess(
      "/bin/busybox", ["httpd", "-f", "-p", "127.0.0.1:\(httpPort)", "-h", web], errors: { _ in }, output: { _ in })
    defer {
      // SIGKILL: the test runner's children inherit a blocked SIGTERM.
      kill(server.processIdentifier, SIGKILL)
      server.waitUntilExit()
    }

    let forwardPort = Self.freePort() + 1
    let launcher =
      getuid() == 0
      ? ["/usr/bin/setpriv", "--reuid=\(Self.nobody)", "--regid=\(Self.nobody)", "--clear-groups", "--"] : []
    let session = try GuestSession(
      arguments: [
        "run", "--accel", "soft", "--memory", "512M", "--kernel", kernel, "--initrd", initrd,
        "--cmdline", "console=ttyS0 panic=-1 loglevel=4 hostvisor.modules=virtio_pci,virtio_net",
        "--net", "user,hostfwd=tcp:127.0.0.1:\(forwardPort)-:8080,hostfwd=tcp:127.0.0.1:\(forwardPort + 1)-:8081",
      ], launcher: launcher)
    defer { session.saveTranscript(name: "user-network") }
    try await session.waitForShell()
    #expect(try await session.run("id -u") == "0", "the guest's own root, whatever the host user")
    if getuid() == 0 {
      let owner = try host("/bin/ps", ["-o", "user=", "-p", "\(session.process.processIdentifier)"])
      #expect(owner.trimmingCharacters(in: .whitespacesAndNewlines) == "nobody")
    }

    let lease = try await session.run("ip link set eth0 up; udhcpc -i eth0 -n -q -t 5 2>&1; ip -4 addr show eth0")
    #expect(lease.contains("inet 10.0.2.15/24"), "DHCP did not configure eth0: \(lease)")

    // Guest to the host's loopback through the gateway address.
    let fetched = try await session.run("wget -q -O - http://10.0.2.2:\(httpPort)/token")
    #expect(fetched == token)

    // Host to guest over HTTP: 10 MiB, checked in the guest.
    let download = try await session.run(
      "wget -q -O /tmp/in http://10.0.2.2:\(httpPort)/payload.bin && sha256sum /tmp/in", timeout: .seconds(300))
    #expect(LinuxVirtioTests.digest(in: download, for: "/tmp/in") == (try LinuxVirtioTests.sha256(ofFile: payload)))

    // Guest to host: 10 MiB sent by the guest to a listener on the host's loopback through the
    // gateway address, checked on the host.
    try await UserNetworkTransfers.uploadThroughTheGateway(session, size: size, folder: folder, port: httpPort + 3)

    // Through the port forwards: the host sends 10 MiB to a guest server, and a guest server
    // that speaks first sends 10 MiB to a host client that sends nothing.
    try await UserNetworkTransfers.sendThroughAForward(
      session, payload: payload, hostPort: forwardPort, guestPort: 8080)
    // Known, intermittent (docs/user-networking.md): Debian 12's passt sometimes stops in a
    // loop of its own on this transfer.
    await withKnownIssue("passt (Debian 12) sometimes spins on a guest-to-host forward", isIntermittent: true) {
      try await UserNetworkTransfers.receiveThroughAForward(
        session, size: size, folder: folder, hostPort: forwardPort + 1, guestPort: 8081)
    }

    session.type("poweroff -f\n")
    #expect(try await session.waitForExit(timeout: .seconds(120)) == 0)
    // passt ends with the VM.
    try await Task.sleep(for: .milliseconds(500))
    let leftover = try hostCommand("/usr/bin/pgrep", ["-f", "passt.*--tcp-ports 127.0.0.1/\(forwardPort)"])
    #expect(leftover.status != 0, "passt outlived the VM: \(leftover.output)")
  }

  /// A passt that stops reading for seconds (a loaded host) loses none of the guest's traffic:
  /// the guest sends 20 MiB to the host's loopback through the gateway while passt is stopped
  /// twice for 3 s. The backend queues what the socket cannot take, stops taking frames from
  /// the device while its queue is full, and never cuts a frame short (a cut frame turns the
  /// rest of passt's stream into garbage lengths, and the guest's traffic stops for good).
  @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/passt"), "needs passt"))
  func aPasstThatStopsReadingLosesNothing() async throws {
    let folder = try SharedFolder()
    let images = try GuestImages.images()
    let session = try GuestSession(arguments: [
      "run", "--accel", "soft", "--memory", "512M", "--kernel", images.kernel, "--initrd", images.initrd,
      "--cmdline", "console=ttyS0 panic=-1 loglevel=4 hostvisor.modules=virtio_pci,virtio_net", "--net", "user",
    ])
    defer { session.saveTranscript(name: "user-network-stalled-passt") }
    try await session.waitForShell()
    let lease = try await session.run("ip link set eth0 up; udhcpc -i eth0 -n -q -t 5 2>&1; ip -4 addr show eth0")
    #expect(lease.contains("inet 10.0.2.15/24"), "DHCP did not configure eth0: \(lease)")
    // passt is the VMM's child, or as root the child of its PID namespace's init, the VMM's
    // child; with the sandbox (on by default as root) the VMM is the started supervisor's child.
    let started = "\(session.process.processIdentifier)"
    var family = [started]
    for _ in 0..<2 {
      family += try hostCommand("/usr/bin/pgrep", ["-P", family.joined(separator: ",")]).output
        .split(separator: "\n").map(String.init)
    }
    let passt = try #require(
      Int32(
        try host("/usr/bin/pgrep", ["-P", Set(family).joined(separator: ","), "passt"])
          .trimmingCharacters(in: .whitespacesAndNewlines)),
      "no passt child")

    // 20 MiB from the guest to a listener on the host's loopback; passt is stopped for 3 s at
    // 1 s and again at 5 s after the guest's nc starts.
    defer { kill(passt, SIGCONT) }
    try await UserNetworkTransfers.uploadThroughTheGateway(
      session, size: 20 << 20, folder: folder, port: Self.freePort() + 2
    ) {
      for _ in 0..<2 {
        try await Task.sleep(for: .seconds(1))
        kill(passt, SIGSTOP)
        try await Task.sleep(for: .seconds(3))
        kill(passt, SIGCONT)
      }
    }
    session.type("poweroff -f\n")
    #expect(try await session.waitForExit(timeout: .seconds(120)) == 0)
  }
}
