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

  /// Runs `curl` on the API socket: the HTTP status and the body.
  private static func api(_ socket: String, _ method: String, _ path: String, _ body: String) throws -> (
    status: Int, body: String
  ) {
    let output = try hostCommand(
      "curl",
      [
        "-s", "--max-time", "60", "--unix-socket", socket, "-X", method, "http://localhost\(path)", "-H",
        "Content-Type: application/json", "-d", body, "-w", "\n%{http_code}",
      ], timeout: 90
    ).output
    let lines = output.split(separator: "\n", omittingEmptySubsequences: false)
    return (Int(lines.last ?? "") ?? 0, lines.dropLast().joined(separator: "\n"))
  }

  /// Whether interface `name` exists in network namespace `namespace`.
  private static func linkExists(_ name: String, in namespace: String) throws -> Bool {
    try hostCommand("ip", ["-n", namespace, "link", "show", "dev", name]).status == 0
  }

  /// Waits up to 5 s for interface `name` to disappear from `namespace`; whether it did.
  private static func linkDisappears(_ name: String, from namespace: String) async throws -> Bool {
    for _ in 0..<50 {
      if !(try linkExists(name, in: namespace)) { return true }
      try await Task.sleep(for: .milliseconds(100))
    }
    return false
  }

  /// A fresh network namespace with its loopback up, for a test's TAPs; removed by `deleteNamespace`.
  private static func makeNamespace() throws -> String {
    let namespace = "hvjail-\(UInt32.random(in: 0...UInt32.max))"
    try #require(try hostCommand("ip", ["netns", "add", namespace]).status == 0)
    _ = try hostCommand("ip", ["-n", namespace, "link", "set", "lo", "up"])
    return namespace
  }

  private static func deleteNamespace(_ namespace: String) {
    _ = try? hostCommand("ip", ["netns", "del", namespace])
  }

  /// A jail holding Debian's guest kernel and initramfs as `/vmlinuz` and `/initrd`.
  private static func makeJail(in scratch: LinuxVirtioTests.ScratchFolder) throws -> String {
    let jail = scratch.path("jail")
    try FileManager.default.createDirectory(atPath: jail, withIntermediateDirectories: true)
    let images = try GuestImages.images()
    try FileManager.default.copyItem(atPath: images.kernel, toPath: jail + "/vmlinuz")
    try FileManager.default.copyItem(atPath: images.initrd, toPath: jail + "/initrd")
    return jail
  }

  /// `serve --sandbox --jail DIR --tap NAME` where no TAP NAME exists: serve creates and opens
  /// it at start, as root and before it enters the sandbox, and keeps the descriptor; the API
  /// names it later (`host_dev_name`) and the unprivileged VMM, which could neither create it
  /// nor open it by name, attaches the kept descriptor. Debian's guest pings the host's end of
  /// it, 3 of 3; once the guest powers off and serve exits, the TAP is gone (serve created it,
  /// not persistent). Without `--tap` the boot fails as in `serveAttachesATapOwnedByItsUser`
  /// ("cannot open TAP ...: Operation not permitted").
  @Test(.enabled(if: FileManager.default.fileExists(atPath: "/dev/net/tun"), "needs /dev/net/tun"))
  func serveOpensATapNamedAtStartAndRemovesItAtExit() async throws {
    let scratch = try LinuxVirtioTests.ScratchFolder()
    let jail = try Self.makeJail(in: scratch)
    let namespace = try Self.makeNamespace()
    defer { Self.deleteNamespace(namespace) }
    let tap = "hvpre0"
    try #require(!(try Self.linkExists(tap, in: namespace)), "\(tap) exists before serve starts")

    let socket = scratch.path("api.sock")
    let session = try GuestSession(
      arguments: [
        "serve", "--api-sock", socket, "--accel", "soft", "--sandbox", "--jail", jail, "--tap", tap, "--verbose",
      ],
      launcher: ["/usr/bin/env", "ip", "netns", "exec", namespace])
    defer {
      session.saveTranscript(name: "sandbox-serve-preopened-tap")
      if session.process.isRunning { session.kill() }
    }
    _ = try await session.waitFor("hostvisor: sandbox: entered (root: \(jail);", timeout: .seconds(60))
    #expect(session.text.contains("hostvisor: tap: \(tap) opened at start (created: removed when serve exits)"))
    #expect(try Self.linkExists(tap, in: namespace), "serve did not create \(tap)")

    for (path, body) in [
      (
        "/boot-source",
        #"{"kernel_image_path":"/vmlinuz","initrd_path":"/initrd","boot_args":"console=ttyS0 panic=-1 loglevel=4 hostvisor.modules=virtio_pci,virtio_net"}"#
      ),
      ("/machine-config", #"{"vcpu_count":1,"mem_size_mib":512}"#),
      ("/network-interfaces/eth0", #"{"iface_id":"eth0","host_dev_name":"\#(tap)"}"#),
    ] {
      let answer = try Self.api(socket, "PUT", path, body)
      #expect(answer.status == 204, "\(path): \(answer)")
    }
    let started = try Self.api(socket, "PUT", "/actions", #"{"action_type":"InstanceStart"}"#)
    try #require(started.status == 204, "\(started)")

    // The host's end of the TAP serve made.
    for arguments in [["addr", "add", "10.0.2.2/24", "dev", tap], ["link", "set", tap, "up"]] {
      try #require(
        try hostCommand("ip", ["-n", namespace] + arguments).status == 0, "ip \(arguments.joined(separator: " "))")
    }
    try await session.waitForShell()
    #expect(
      try await session.run("ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && echo NET-UP")
        .contains("NET-UP"))
    let ping = try await session.run("ping -c 3 -W 5 10.0.2.2")
    #expect(ping.contains("3 packets transmitted, 3 packets received"), "\(ping)")
    let received = try hostCommand(
      "ip", ["netns", "exec", namespace, "cat", "/sys/class/net/\(tap)/statistics/rx_packets"]
    ).output.trimmingCharacters(in: .whitespacesAndNewlines)
    #expect((Int(received) ?? 0) >= 3, "the TAP received \(received) frames")

    session.type("poweroff -f\n")
    #expect(try await session.waitForExit(timeout: .seconds(120)) == 0)
    #expect(try await Self.linkDisappears(tap, from: namespace), "\(tap) is still there after serve exited")
  }

  /// A TAP named at start is attached to one network interface at a time: a second interface
  /// naming it is refused with a 400 and one line naming the interface that has it
  /// (Firecracker's `PUT /network-interfaces`, and Cloud Hypervisor's `vm.create` with two `net`
  /// entries on it), while the interface that has it may be put again. A persistent TAP that
  /// existed before (`ip tuntap add`, owned by root) is opened at start too and stays after
  /// serve; the one serve created goes even when serve is killed with SIGKILL.
  @Test(.enabled(if: FileManager.default.fileExists(atPath: "/dev/net/tun"), "needs /dev/net/tun"))
  func aTapNamedAtStartIsAttachedToOneInterfaceAtATime() async throws {
    let scratch = try LinuxVirtioTests.ScratchFolder()
    let jail = try Self.makeJail(in: scratch)
    let namespace = try Self.makeNamespace()
    defer { Self.deleteNamespace(namespace) }
    let created = "hvpre1"
    let persistent = "hvkept1"
    try #require(
      try hostCommand("ip", ["-n", namespace, "tuntap", "add", "dev", persistent, "mode", "tap", "user", "0"]).status
        == 0)

    let socket = scratch.path("api.sock")
    let session = try GuestSession(
      arguments: [
        "serve", "--api-sock", socket, "--accel", "soft", "--sandbox", "--jail", jail, "--tap", created, "--tap",
        persistent, "--verbose",
      ],
      launcher: ["/usr/bin/env", "ip", "netns", "exec", namespace])
    defer {
      session.saveTranscript(name: "sandbox-serve-tap-once")
      if session.process.isRunning { session.kill() }
    }
    _ = try await session.waitFor("hostvisor: sandbox: entered (root: \(jail);", timeout: .seconds(60))
    #expect(
      session.text.contains("hostvisor: tap: \(persistent) opened at start (persistent: it stays when serve exits)"))

    let chCreate = try Self.api(
      socket, "PUT", "/api/v1/vm.create",
      #"{"payload":{"kernel":"/vmlinuz"},"net":[{"id":"a","tap":"\#(created)"},{"id":"b","tap":"\#(created)"}]}"#)
    #expect(chCreate.status == 400, "\(chCreate)")
    #expect(
      chCreate.body.contains("Network interface b cannot use TAP \(created): network interface a has it already"),
      "\(chCreate)")

    let first = try Self.api(
      socket, "PUT", "/network-interfaces/eth0", #"{"iface_id":"eth0","host_dev_name":"\#(created)"}"#)
    #expect(first.status == 204, "\(first)")
    let second = try Self.api(
      socket, "PUT", "/network-interfaces/eth1", #"{"iface_id":"eth1","host_dev_name":"\#(created)"}"#)
    #expect(second.status == 400, "\(second)")
    #expect(
      second.body.contains(
        #""fault_message":"Network interface eth1 cannot use TAP \#(created): network interface eth0 has it already"#),
      "\(second)")
    let again = try Self.api(
      socket, "PUT", "/network-interfaces/eth0",
      #"{"iface_id":"eth0","host_dev_name":"\#(created)","guest_mac":"52:54:00:12:34:56"}"#)
    #expect(again.status == 204, "\(again)")
    let other = try Self.api(
      socket, "PUT", "/network-interfaces/eth1", #"{"iface_id":"eth1","host_dev_name":"\#(persistent)"}"#)
    #expect(other.status == 204, "\(other)")

    session.kill()
    #expect(try await Self.linkDisappears(created, from: namespace), "\(created) is still there after serve was killed")
    #expect(try Self.linkExists(persistent, in: namespace), "the persistent \(persistent) went with serve")
  }

  /// Bad `--tap` input ends `serve` at start with one line and status 1, never a crash or a
  /// hang: a name longer than IFNAMSIZ allows, a name given twice, and (as `nobody`, without
  /// CAP_NET_ADMIN) a TAP that cannot be created.
  @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv"), "needs setpriv"))
  func badTapNamesEndServeWithOneLine() async throws {
    let scratch = try LinuxVirtioTests.ScratchFolder()
    let jail = try Self.makeJail(in: scratch)
    let namespace = try Self.makeNamespace()
    defer { Self.deleteNamespace(namespace) }
    let nobody = getpwnam("nobody")?.pointee.pw_uid ?? 65534
    let inNamespace = ["/usr/bin/env", "ip", "netns", "exec", namespace]
    let asNobody = ["/usr/bin/setpriv", "--reuid=\(nobody)", "--regid=\(nobody)", "--clear-groups", "--"]
    let socket = scratch.path("api.sock")
    let sandboxed = ["serve", "--api-sock", socket, "--accel", "soft", "--sandbox", "--jail", jail]
    // Each case: the arguments, how to start them, and the one line expected, as its start and
    // end (the middle of the last is the system's reason: EACCES from a /dev/net/tun that only
    // root may open, else EPERM from the kernel's TUNSETIFF).
    let cases: [(arguments: [String], launcher: [String], start: String, end: String)] = [
      (
        sandboxed + ["--tap", "hvthisnameistoolong"], inNamespace,
        "hostvisor: error: invalid --tap 'hvthisnameistoolong': a TAP name has 1 to 15 characters (IFNAMSIZ),"
          + " 'hvthisnameistoolong' has 19", ""
      ),
      (
        sandboxed + ["--tap", "hvtwice0", "--tap", "hvtwice0"], inNamespace,
        "hostvisor: error: --tap hvtwice0 is given twice", ""
      ),
      (
        ["serve", "--api-sock", socket, "--accel", "soft", "--tap", "hvnobody0"], inNamespace + asNobody,
        "hostvisor: error: --tap: cannot open TAP 'hvnobody0': ",
        " (creating a TAP, or opening one that belongs to another user or group, needs CAP_NET_ADMIN: start serve"
          + " as root)"
      ),
    ]
    for (arguments, launcher, start, end) in cases {
      let session = try GuestSession(arguments: arguments, launcher: launcher)
      defer { if session.process.isRunning { session.kill() } }
      let status = try await session.waitForExit(timeout: .seconds(30))
      _ = try? await session.waitFor(end + "\n", timeout: .seconds(5))
      let text = session.text
      #expect(status == 1, "\(arguments): \(text)")
      #expect(text.hasPrefix(start) && text.hasSuffix(end + "\n"), "\(arguments): \(text)")
      #expect(text.split(whereSeparator: \.isNewline).count == 1, "\(arguments): \(text)")
      #expect(!FileManager.default.fileExists(atPath: socket), "\(arguments) left its socket")
    }
    #expect(!(try Self.linkExists("hvtwice0", in: namespace)))
    #expect(!(try Self.linkExists("hvnobody0", in: namespace)))
  }
}
