import Foundation
import Testing

/// The Debian guest's network over a TAP across a live migration on one host (the source hands
/// its TAP to the destination) and across a snapshot restored onto another TAP (Firecracker's
/// `network_overrides`), on the software CPU, in a network namespace of its own.
@Suite("Linux TAP networking across migration and restore", .serialized)
struct LinuxNetworkStateTests {
  /// Runs `curl` against the API socket; returns the HTTP status.
  static func api(_ socket: String, _ method: String, _ path: String, _ body: String? = nil) throws -> Int {
    var arguments = ["-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", socket, "-X", method]
    if let body { arguments += ["-H", "Content-Type: application/json", "-d", body] }
    let result = try hostCommand("curl", arguments + ["http://localhost" + path])
    return Int(result.output.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
  }

  /// The number in the guest's answer to `cat /sys/class/net/eth0/carrier_changes` (-1 if none).
  static func carrierChanges(_ output: String) -> Int {
    Int(output.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
  }

  static func waitForFile(_ path: String) async throws {
    let deadline = ContinuousClock.now + .seconds(30)
    while !FileManager.default.fileExists(atPath: path) && ContinuousClock.now < deadline {
      try await Task.sleep(for: .milliseconds(50))
    }
  }

  @Test(.enabled(if: getuid() == 0, "needs root to make a network namespace"))
  func guestKeepsItsNetworkAcrossAMigrationAndARestoreOntoAnotherTap() async throws {
    let scratch = try LinuxVirtioTests.ScratchFolder()
    let namespace = "hvstate-\(UInt32.random(in: 0...UInt32.max))"
    try #require(try hostCommand("ip", ["netns", "add", namespace]).status == 0)
    defer { _ = try? hostCommand("ip", ["netns", "del", namespace]) }
    let inNamespace = ["/usr/bin/env", "ip", "netns", "exec", namespace]
    func inside(_ arguments: [String]) throws -> Int32 {
      try hostCommand("ip", ["-n", namespace] + arguments).status
    }
    // Persistent TAPs (as a host's network setup makes them): the address stays on the
    // interface while no process holds it, through the hand-over.
    for tap in ["hvtap0", "hvtap1"] {
      #expect(try inside(["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]) == 0)
      #expect(try inside(["link", "set", tap, "up"]) == 0)
    }
    #expect(try inside(["addr", "add", "10.0.2.2/24", "dev", "hvtap0"]) == 0)

    let (kernel, initrd, _) = try GuestImages.images()
    let configuration = scratch.path("source.json")
    try """
    {"boot-source": {"kernel_image_path": "\(kernel)", "initrd_path": "\(initrd)",
                     "boot_args": "console=ttyS0 panic=-1 loglevel=4 hostvisor.modules=virtio_pci,virtio_net"},
     "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
     "network-interfaces": [{"iface_id": "net0", "host_dev_name": "hvtap0", "guest_mac": "52:54:00:12:34:56"}]}
    """.write(toFile: configuration, atomically: true, encoding: .utf8)
    let sourceSocket = scratch.path("source.sock")
    let source = try GuestSession(
      arguments: ["serve", "--api-sock", sourceSocket, "--accel", "soft", "--config-file", configuration],
      launcher: inNamespace)
    defer {
      source.saveTranscript(name: "net-migration-source")
      if source.process.isRunning { source.kill() }
    }
    try await source.waitForShell()
    #expect(
      try await source.run("ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && echo NET-UP")
        .contains("NET-UP"))
    #expect(try await source.run("ping -c 2 -W 5 10.0.2.2").contains("2 packets received"))

    // 1. Live migration to another process on this host, through the same TAP.
    let incoming = scratch.path("incoming.sock")
    let destinationSocket = scratch.path("destination.sock")
    let destination = try GuestSession(
      arguments: ["serve", "--api-sock", destinationSocket, "--incoming", "unix:" + incoming], launcher: inNamespace)
    defer {
      destination.saveTranscript(name: "net-migration-destination")
      if destination.process.isRunning { destination.kill() }
    }
    try await Self.waitForFile(incoming)
    let sent = try hostCommand(
      LinuxMigrationTests.hostvisor, ["ctl", "--api-sock", sourceSocket, "migrate", "send", "unix:" + incoming])
    #expect(sent.status == 0, "migrate send: \(sent.output)")
    #expect(try await source.waitForExit(timeout: .seconds(30)) == 0)
    try await Self.waitForFile(destinationSocket)
    let afterMigration = try await destination.run("ping -c 3 -W 5 10.0.2.2")
    #expect(afterMigration.contains("3 packets received"), "\(afterMigration)")
    #expect(try await destination.run("cat /sys/class/net/eth0/address").contains("52:54:00:12:34:56"))

    // 2. Snapshot, kill, restore in a third process onto hvtap1 (network_overrides). hvtap1 is
    // another interface with another MAC address: the guest's ARP entry for 10.0.2.2 still names
    // hvtap0's, so the device flaps the link and the guest resolves the address again.
    let carrierChangesBefore = Self.carrierChanges(
      try await destination.run("cat /sys/class/net/eth0/carrier_changes"))
    #expect(try Self.api(destinationSocket, "PATCH", "/vm", #"{"state": "Paused"}"#) == 204)
    let state = scratch.path("vm.state")
    let memory = scratch.path("vm.mem")
    #expect(
      try Self.api(
        destinationSocket, "PUT", "/snapshot/create", #"{"snapshot_path": "\#(state)", "mem_file_path": "\#(memory)"}"#)
        == 204)
    destination.kill()
    #expect(try inside(["addr", "del", "10.0.2.2/24", "dev", "hvtap0"]) == 0)
    #expect(try inside(["addr", "add", "10.0.2.2/24", "dev", "hvtap1"]) == 0)
    let restoredSocket = scratch.path("restored.sock")
    let restored = try GuestSession(arguments: ["serve", "--api-sock", restoredSocket], launcher: inNamespace)
    defer {
      restored.saveTranscript(name: "net-restore")
      if restored.process.isRunning { restored.kill() }
    }
    try await Self.waitForFile(restoredSocket)
    let load = """
      {"snapshot_path": "\(state)", "mem_backend": {"backend_type": "File", "backend_path": "\(memory)"},
       "resume_vm": true, "network_overrides": [{"iface_id": "net0", "host_dev_name": "hvtap1"}]}
      """
    #expect(try Self.api(restoredSocket, "PUT", "/snapshot/load", load) == 204)
    func framesFromTheGuest(on tap: String) throws -> Int {
      let output = try hostCommand(
        "ip", ["netns", "exec", namespace, "cat", "/sys/class/net/\(tap)/statistics/rx_packets"]
      )
      .output
      return Int(output.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
    }
    // The guest saw its link go down and come back up.
    var carrierChanges = -1
    for _ in 0..<20 {
      carrierChanges = Self.carrierChanges(try await restored.run("cat /sys/class/net/eth0/carrier_changes"))
      if carrierChanges >= carrierChangesBefore + 2 { break }
      try await Task.sleep(for: .milliseconds(500))
    }
    #expect(carrierChanges >= carrierChangesBefore + 2, "carrier changes \(carrierChangesBefore) -> \(carrierChanges)")
    #expect(try await restored.run("cat /sys/class/net/eth0/operstate") == "up")
    let before = try framesFromTheGuest(on: "hvtap1")
    let afterRestore = try await restored.run("ping -c 3 -W 5 10.0.2.2")
    #expect(afterRestore.contains("3 packets received"), "\(afterRestore)")
    // The guest's frames went through hvtap1, and it now knows hvtap1's address.
    #expect(try framesFromTheGuest(on: "hvtap1") >= before + 3)
    let hvtap1Address =
      try hostCommand("ip", ["-n", namespace, "-br", "link", "show", "hvtap1"]).output
      .split(separator: " ", omittingEmptySubsequences: true).dropFirst(2).first.map(String.init) ?? "?"
    #expect(try await restored.run("ip neigh show 10.0.2.2").contains(hvtap1Address))

    // Data both ways over hvtap1, checked with SHA-256.
    let size = 1 << 20
    let payload = scratch.path("to-guest.bin")
    _ = FileManager.default.createFile(
      atPath: payload, contents: try randomBytes(size))
    let sender = try LinuxE1000Tests.netcat(in: namespace, ["-l", "-p", "5001"], input: payload)
    defer { LinuxE1000Tests.stop(sender) }
    let received = try await restored.run(
      "for i in 1 2 3 4 5; do nc 10.0.2.2 5001 > /tmp/in && [ -s /tmp/in ] && break; sleep 1; done;"
        + " sha256sum /tmp/in", timeout: .seconds(240))
    #expect(LinuxVirtioTests.digest(in: received, for: "/tmp/in") == (try LinuxVirtioTests.sha256(ofFile: payload)))

    let copy = scratch.path("from-guest.bin")
    #expect(FileManager.default.createFile(atPath: copy, contents: nil))
    let receiver = try LinuxE1000Tests.netcat(in: namespace, ["-l", "-p", "5002"], output: copy)
    defer { LinuxE1000Tests.stop(receiver) }
    let guestSent = try await restored.run(
      "head -c \(size) /dev/urandom > /tmp/out && sha256sum /tmp/out"
        + " && for i in 1 2 3 4 5; do nc 10.0.2.2 5002 < /tmp/out && break; sleep 1; done",
      timeout: .seconds(240))
    guard let sentDigest = LinuxVirtioTests.digest(in: guestSent, for: "/tmp/out") else {
      Issue.record("the guest printed no digest: \(guestSent)")
      return
    }
    for _ in 0..<150 {
      let length = (try? FileManager.default.attributesOfItem(atPath: copy)[.size] as? Int) ?? 0
      if length >= size { break }
      try await Task.sleep(for: .milliseconds(200))
    }
    #expect(try LinuxVirtioTests.sha256(ofFile: copy) == sentDigest)
    restored.kill()
  }
}
