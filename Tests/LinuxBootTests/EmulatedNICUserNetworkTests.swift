import Foundation
import TestSupport
import Testing

/// The emulated NICs on user-mode networking (`--net user,model=...`, on passt): Debian's
/// generic kernel on the software CPU binds its driver to the e1000 or the RTL8139, gets
/// 10.0.2.15 by DHCP through passt, fetches a token from an HTTP server on the host's loopback
/// through the gateway, then moves 10 MiB each way through the gateway and 10 MiB each way
/// through port forwards into the guest, every copy checked with SHA-256 on both ends.
@Suite("Emulated NICs on user-mode networking", .serialized)
struct EmulatedNICUserNetworkTests {
  @Test(
    .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/passt"), "needs passt"),
    .timeLimit(.minutes(30)),
    arguments: [("e1000", "e1000"), ("rtl8139", "8139too")])
  func dhcpHTTPAndBulkTransfersThroughTheGatewayAndPortForwards(model: String, module: String) async throws {
    let folder = try UserNetworkTests.SharedFolder()
    let images = try GuestImages.images("guest-generic")
    let size = 10 << 20
    let token = "TOKEN-\(UUID().uuidString)"
    let web = folder.path("www")
    try FileManager.default.createDirectory(atPath: web, withIntermediateDirectories: true)
    try token.write(toFile: web + "/token", atomically: true, encoding: .utf8)
    let payload = web + "/payload.bin"
    _ = FileManager.default.createFile(atPath: payload, contents: try randomBytes(size))
    let httpPort = UserNetworkTests.freePort()
    let server = try HostProcess(
      "/bin/busybox", ["httpd", "-f", "-p", "127.0.0.1:\(httpPort)", "-h", web], errors: { _ in }, output: { _ in })
    defer {
      // SIGKILL: the test runner's children inherit a blocked SIGTERM.
      kill(server.processIdentifier, SIGKILL)
      server.waitUntilExit()
    }

    let inward = httpPort + 1
    let outward = httpPort + 2
    let session = try GuestSession(arguments: [
      "run", "--accel", "soft", "--memory", "512M", "--kernel", images.kernel, "--initrd", images.initrd,
      "--cmdline", "console=ttyS0 panic=-1 loglevel=4 hostvisor.modules=\(module)",
      "--net", "user,model=\(model),hostfwd=tcp:127.0.0.1:\(inward)-:8080,hostfwd=tcp:127.0.0.1:\(outward)-:8081",
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

    try await UserNetworkTransfers.downloadThroughTheGateway(session, payload: payload, httpPort: httpPort)
    try await UserNetworkTransfers.uploadThroughTheGateway(
      session, size: size, folder: folder, port: httpPort + 3)
    try await UserNetworkTransfers.sendThroughAForward(session, payload: payload, hostPort: inward, guestPort: 8080)
    // Known, intermittent (docs/user-networking.md): Debian 12's passt sometimes stops in a
    // loop of its own on this transfer (busy, no system calls, the VMM's frames unread in its
    // socket), and the host's connection through the forward gets nothing more.
    await withKnownIssue("passt (Debian 12) sometimes spins on a guest-to-host forward", isIntermittent: true) {
      try await UserNetworkTransfers.receiveThroughAForward(
        session, size: size, folder: folder, hostPort: outward, guestPort: 8081)
    }
    let counters = try await session.run("grep eth0 /proc/net/dev")
    print("\(model) after the transfers:\n\(counters)")

    session.type("poweroff -f\n")
    #expect(try await session.waitForExit(timeout: .seconds(120)) == 0)
  }
}
