import Foundation
import Testing

/// The emulated NICs on user-mode networking (`--net user,model=...`, on passt): Debian's
/// generic kernel on the software CPU binds its driver to the e1000 or the RTL8139, gets
/// 10.0.2.15 by DHCP through passt, fetches a token from an HTTP server on the host's loopback
/// through the gateway, and downloads 4 MiB whose SHA-256 the guest checks. That download ends
/// in "Connection reset by peer" on both emulated NICs (virtio-net on passt carries 10 MiB):
/// recorded as a known issue (docs/TODO.md) so that a fix shows up.
@Suite("Emulated NICs on user-mode networking", .serialized)
struct EmulatedNICUserNetworkTests {
  @Test(
    .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/passt"), "needs passt"),
    .timeLimit(.minutes(20)),
    arguments: [("e1000", "e1000"), ("rtl8139", "8139too")])
  func dhcpAndHTTPThroughTheGateway(model: String, module: String) async throws {
    let folder = try UserNetworkTests.SharedFolder()
    let images = try GuestImages.images("guest-generic")
    let size = 4 << 20
    let token = "TOKEN-\(UUID().uuidString)"
    let web = folder.path("www")
    try FileManager.default.createDirectory(atPath: web, withIntermediateDirectories: true)
    try token.write(toFile: web + "/token", atomically: true, encoding: .utf8)
    let payload = web + "/payload.bin"
    var random = SystemRandomNumberGenerator()
    _ = FileManager.default.createFile(
      atPath: payload, contents: Data((0..<size / 8).flatMap { _ in withUnsafeBytes(of: random.next()) { Array($0) } }))
    let httpPort = UserNetworkTests.freePort()
    let server = Process()
    server.executableURL = URL(fileURLWithPath: "/bin/busybox")
    server.arguments = ["httpd", "-f", "-p", "127.0.0.1:\(httpPort)", "-h", web]
    server.standardOutput = FileHandle.nullDevice
    server.standardError = FileHandle.nullDevice
    try server.run()
    defer {
      // SIGKILL: the test runner's children inherit a blocked SIGTERM.
      kill(server.processIdentifier, SIGKILL)
      server.waitUntilExit()
    }

    let session = try GuestSession(arguments: [
      "run", "--accel", "soft", "--memory", "512M", "--kernel", images.kernel, "--initrd", images.initrd,
      "--cmdline", "console=ttyS0 panic=-1 loglevel=4 hostvisor.modules=\(module)",
      "--net", "user,model=\(model)",
    ])
    defer { session.saveTranscript(name: "user-network-\(model)") }
    try await session.waitForShell(timeout: .seconds(600))
    let driver = try await session.run("basename $(readlink /sys/class/net/eth0/device/driver)")
    #expect(driver == module)
    let lease = try await session.run(
      "ip link set eth0 up; sleep 3; udhcpc -i eth0 -n -q -t 10 2>&1; ip -4 addr show eth0", timeout: .seconds(180))
    #expect(lease.contains("inet 10.0.2.15/24"), "DHCP did not configure eth0: \(lease)")
    let fetched = try await session.run("wget -q -O - http://10.0.2.2:\(httpPort)/token", timeout: .seconds(120))
    #expect(fetched == token)
    let download = try await session.run(
      "wget -q -O /tmp/in http://10.0.2.2:\(httpPort)/payload.bin && sha256sum /tmp/in", timeout: .seconds(600))
    let expected = try LinuxVirtioTests.sha256(ofFile: payload)
    withKnownIssue("bulk TCP from passt to an emulated NIC is reset", isIntermittent: true) {
      #expect(LinuxVirtioTests.digest(in: download, for: "/tmp/in") == expected)
    }

    session.type("poweroff -f\n")
    #expect(try await session.waitForExit(timeout: .seconds(120)) == 0)
  }
}
