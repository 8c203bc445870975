import Foundation
import Testing

/// Debian's kernel on the software CPU boots, reads and writes its virtio disk and powers off
/// with the VMM sandboxed (docs/isolation.md): jailed in an empty root, nobody, no
/// capabilities, seccomp filters per thread kind (a device worker's refuses `openat` with
/// EACCES: the `open-worker` probe).
@Suite(
  "Linux under the sandboxed VMM", .serialized,
  .enabled(if: getuid() == 0, "the sandbox needs root"))
struct LinuxSandboxTests {
  @Test
  func bootsAndDoesDiskIOSandboxed() async throws {
    let scratch = try LinuxVirtioTests.ScratchFolder()
    let image = scratch.path("disk.img")
    let hostPhrase = "written by the host \(UInt64.random(in: 0...UInt64.max))"
    let guestPhrase = "written by the guest \(UInt64.random(in: 0...UInt64.max))"
    var content = Data(hostPhrase.utf8)
    content.append(Data(repeating: 0, count: (16 << 20) - content.count))
    try content.write(to: URL(fileURLWithPath: image))

    let session = try await LinuxVirtioTests.boot(
      ["--serial", "stdio", "--disk", image, "--sandbox", "--sandbox-probe", "report,open-worker", "--verbose"],
      cmdline: "console=ttyS0 panic=-1 loglevel=4 hostvisor.modules=virtio_pci,virtio_blk")
    defer { session.saveTranscript(name: "sandbox-linux") }
    #expect(session.text.contains("hostvisor: sandbox: entered (root: empty;"))
    #expect(session.text.contains("sandbox-probe: cwd / /proc absent"))

    // The VMM seen from outside while the guest runs.
    let supervisor = session.process.processIdentifier
    let children = try String(contentsOfFile: "/proc/\(supervisor)/task/\(supervisor)/children", encoding: .utf8)
    let child = try #require(children.split(separator: " ").first.map(String.init))
    let status = try String(contentsOfFile: "/proc/\(child)/status", encoding: .utf8)
    #expect(status.contains("CapEff:\t0000000000000000"))
    #expect(status.contains("Seccomp:\t2"))
    #expect(status.contains("NoNewPrivs:\t1"))

    // The guest reads what the host wrote and writes a sector the host then reads.
    let read = try await session.run("head -c \(hostPhrase.utf8.count) /dev/vda; echo")
    #expect(read.contains(hostPhrase), "\(read)")
    let written = try await session.run(
      "printf '\(guestPhrase)' | dd of=/dev/vda bs=512 seek=1 conv=fsync 2>/dev/null && sync && echo WRITE-OK",
      timeout: .seconds(180))
    #expect(written.contains("WRITE-OK"), "\(written)")
    session.type("poweroff -f\n")
    #expect(try await session.waitForExit(timeout: .seconds(120)) == 0)
    // The disk's worker thread, started when the driver activated the device, could not open
    // a file (EACCES from its filter), and the VMM carried on.
    let workerReports = session.text.split(whereSeparator: \.isNewline).filter {
      $0.hasPrefix("sandbox-probe: open / on a device worker thread:")
    }
    #expect(!workerReports.isEmpty, "no worker thread reported")
    #expect(
      workerReports.allSatisfy { $0.hasSuffix(": \(String(cString: strerror(EACCES)))") },
      "\(workerReports)")
    let after = try Data(contentsOf: URL(fileURLWithPath: image))
    #expect(String(decoding: after[512..<(512 + guestPhrase.utf8.count)], as: UTF8.self) == guestPhrase)
  }

  /// `serve --sandbox --jail DIR` with a TAP the API attaches after the VMM entered its jail:
  /// the unprivileged VMM opens the /dev/net/tun the sandbox made in its jail. A missing TAP and
  /// one that belongs to root are refused with one line saying what the TAP needs; one made for the
  /// sandbox's user (`ip tuntap add ... user nobody`, in a network namespace made by the test)
  /// is attached, and Debian's guest pings the host's end of it through virtio-net.
  @Test(.enabled(if: FileManager.default.fileExists(atPath: "/dev/net/tun"), "needs /dev/net/tun"))
  func serveAttachesATapOwnedByItsUser() async throws {
    let scratch = try LinuxVirtioTests.ScratchFolder()
    let jail = scratch.path("jail")
    try FileManager.default.createDirectory(atPath: jail, withIntermediateDirectories: true)
    let images = try GuestImages.images()
    try FileManager.default.copyItem(atPath: images.kernel, toPath: jail + "/vmlinuz")
    try FileManager.default.copyItem(atPath: images.initrd, toPath: jail + "/initrd")
    let nobody = getpwnam("nobody")?.pointee.pw_uid ?? 65534

    let namespace = "hvjail-\(UInt32.random(in: 0...UInt32.max))"
    try #require(try hostCommand("ip", ["netns", "add", namespace]).status == 0)
    defer { _ = try? hostCommand("ip", ["netns", "del", namespace]) }
    for arguments in [
      ["link", "set", "lo", "up"],
      ["tuntap", "add", "dev", "hvjail0", "mode", "tap", "user", "\(nobody)"],
      ["addr", "add", "10.0.2.2/24", "dev", "hvjail0"],
      ["link", "set", "hvjail0", "up"],
      ["tuntap", "add", "dev", "hvroot0", "mode", "tap", "user", "0"],
    ] {
      try #require(
        try hostCommand("ip", ["-n", namespace] + arguments).status == 0, "ip \(arguments.joined(separator: " "))")
    }

    let socket = scratch.path("api.sock")
    let session = try GuestSession(
      arguments: ["serve", "--api-sock", socket, "--accel", "soft", "--sandbox", "--jail", jail, "--verbose"],
      launcher: ["/usr/bin/env", "ip", "netns", "exec", namespace])
    defer {
      session.saveTranscript(name: "sandbox-serve-tap")
      session.kill()
    }
    _ = try await session.waitFor("hostvisor: sandbox: entered (root: \(jail);", timeout: .seconds(60))
    func api(_ method: String, _ path: String, _ body: String) throws -> String {
      try hostCommand(
        "curl",
        [
          "-s", "--max-time", "60", "--unix-socket", socket, "-X", method, "http://localhost\(path)", "-H",
          "Content-Type: application/json", "-d", body,
        ], timeout: 90
      ).output
    }
    for (path, body) in [
      (
        "/boot-source",
        #"{"kernel_image_path":"/vmlinuz","initrd_path":"/initrd","boot_args":"console=ttyS0 panic=-1 loglevel=4 hostvisor.modules=virtio_pci,virtio_net"}"#
      ),
      ("/machine-config", #"{"vcpu_count":1,"mem_size_mib":512}"#),
    ] {
      let answer = try api("PUT", path, body)
      #expect(!answer.contains("fault_message"), "\(path): \(answer)")
    }
    // A TAP that does not exist (creating one needs CAP_NET_ADMIN) and one that belongs to
    // root: the VMM, nobody without capabilities, may open neither.
    for tap in ["hvmissing0", "hvroot0"] {
      let named = try api("PUT", "/network-interfaces/eth0", #"{"iface_id":"eth0","host_dev_name":"\#(tap)"}"#)
      #expect(!named.contains("fault_message"), "\(named)")
      let refused = try api("PUT", "/actions", #"{"action_type":"InstanceStart"}"#)
      #expect(refused.contains("cannot open TAP '\(tap)': Operation not permitted"), "\(refused)")
      #expect(refused.contains("ip tuntap add dev \(tap) mode tap user \(nobody)"), "\(refused)")
    }

    let owned = try api("PUT", "/network-interfaces/eth0", #"{"iface_id":"eth0","host_dev_name":"hvjail0"}"#)
    #expect(!owned.contains("fault_message"), "\(owned)")
    let started = try api("PUT", "/actions", #"{"action_type":"InstanceStart"}"#)
    #expect(!started.contains("fault_message"), "\(started)")
    try await session.waitForShell()
    #expect(
      try await session.run("ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && echo NET-UP")
        .contains("NET-UP"))
    let ping = try await session.run("ping -c 3 -W 5 10.0.2.2")
    #expect(ping.contains("3 packets received"), "\(ping)")
    let received = try hostCommand(
      "ip", ["netns", "exec", namespace, "cat", "/sys/class/net/hvjail0/statistics/rx_packets"]
    ).output.trimmingCharacters(in: .whitespacesAndNewlines)
    #expect((Int(received) ?? 0) >= 3, "the TAP received \(received) frames")
  }
}
