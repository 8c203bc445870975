import Foundation
import Testing

/// A real Firecracker client: firecracker-python's `Api` (PyPI `firecracker-python`, installed
/// by scripts/install-deps.sh) boots the default Debian guest on the software CPU through
/// boot-source, drives, machine-config and InstanceStart, then pauses and resumes it.
@Suite("firecracker-python drives the Debian guest")
struct FirecrackerPythonTests {
  @Test
  func firecrackerPythonBootsPausesAndResumesTheDebianGuest() throws {
    let (kernel, initrd) = try defaultGuest()
    let python = "/usr/bin/env"
    let check = try runProgram(python, ["python3", "-c", "import firecracker.api"])
    try #require(check.status == 0, "firecracker-python is not installed (scripts/install-deps.sh): \(check.stderr)")

    let scratch = try Scratch()
    let socket = scratch.file("fc.sock")
    let disk = scratch.file("data.img")
    _ = FileManager.default.createFile(atPath: disk, contents: Data(count: 4 << 20))
    let server = try HostvisorProcess(["serve", "--api-sock", socket, "--accel", "soft", "--id", "python-vm"])
    defer { server.process.terminate() }
    try server.waitForSocket(socket)

    let script = packageRoot.appendingPathComponent("scripts/api/firecracker_python_boot.py").path
    let client = try HostvisorProcess(
      [
        "python3", script, socket, kernel, initrd, "console=ttyS0 panic=-1 hostvisor.modules=virtio_pci,virtio_blk",
        disk,
      ],
      executable: python)
    defer { client.process.terminate() }
    try client.waitForOutput(timeout: 300, "Running from the client") { $0.contains("state Running") }
    try server.waitForGuestShell()
    // The guest sees the read-only data drive the client configured.
    server.type("echo BEGIN''; cat /sys/block/vda/ro; echo END''\n")
    try server.waitForOutput(timeout: 60, "the drive check") {
      $0.contains("BEGIN\r\n1\r\nEND") || $0.contains("BEGIN\n1\nEND")
    }

    _ = FileManager.default.createFile(atPath: socket + ".ready", contents: nil)
    try client.waitForOutput(timeout: 60, "Paused from the client") { $0.contains("state Paused") }
    // Typed while paused: nothing is echoed until the guest runs again.
    let pausedAt = server.text
    server.type("echo RESUMED''OK\n")
    usleep(500_000)
    #expect(server.text == pausedAt, "the guest ran while paused")
    try client.waitForOutput(timeout: 60, "the client's end") { $0.contains("\"done\": true") }
    #expect(client.text.contains("refused API fault"))
    #expect(client.waitForExit() == 0, "client output: \(client.text) \(client.errorText)")
    try server.waitForOutput(timeout: 60, "the guest after resume") { $0.contains("RESUMEDOK") }

    server.type("poweroff -f\n")
    #expect(server.waitForExit(timeout: 120) == 0)
  }
}
