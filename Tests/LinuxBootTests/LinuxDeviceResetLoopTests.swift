import Foundation
import Testing

/// A hostile guest's device reset loop, with Debian's own drivers on the software CPU: the guest
/// unbinds and binds its virtio-blk and virtio-rng drivers hundreds of times (each unbind resets
/// the device, each bind negotiates features and sets up its queues again). The VMM's resident
/// memory must not grow with the number of resets, and the devices must still work afterwards.
@Suite("Linux resets its virtio devices in a loop", .serialized)
struct LinuxDeviceResetLoopTests {
  /// The VMM's resident memory in KiB (guest RAM the guest touched included).
  static func residentKiB(_ pid: pid_t) -> Int {
    let text = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
    let line = text.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
    return line.split { $0 == " " || $0 == "\t" }.dropFirst().first.flatMap { Int($0) } ?? 0
  }

  @Test func rebindingDriversKeepsTheVMMBounded() async throws {
    let scratch = try LinuxVirtioTests.ScratchFolder()
    let disk = scratch.path("disk.img")
    let pattern = try randomBytes(4096)
    try (pattern + Data(count: (8 << 20) - pattern.count)).write(to: URL(fileURLWithPath: disk))
    let session = try await LinuxVirtioTests.boot(
      ["--disk", disk],
      cmdline: "console=ttyS0 panic=-1 loglevel=4 hostvisor.modules=virtio_pci,virtio_blk,virtio_rng")
    defer { session.saveTranscript(name: "device-reset-loop") }
    let pid = session.process.processIdentifier
    // One shell function: N unbind/bind cycles of each driver's device.
    _ = try await session.run(
      "cycle() { for drv in virtio_blk virtio_rng; do dev=$(basename /sys/bus/virtio/drivers/$drv/virtio*); "
        + "i=0; while [ $i -lt $1 ]; do echo $dev > /sys/bus/virtio/drivers/$drv/unbind; "
        + "echo $dev > /sys/bus/virtio/drivers/$drv/bind; i=$((i+1)); done; done; echo cycled; }")
    #expect(try await session.run("cycle 20") == "cycled")
    let before = Self.residentKiB(pid)
    #expect(try await session.run("cycle 200", timeout: .seconds(600)) == "cycled")
    let after = Self.residentKiB(pid)
    #expect(
      before > 0 && after - before < 8 * 1024, "resident memory grew from \(before) to \(after) KiB over 400 resets")
    // Both devices work after the last bind: the disk reads back what the host wrote.
    let firstBlock = try await session.run("dd if=/dev/vda bs=4096 count=1 2>/dev/null | sha256sum")
    try pattern.write(to: URL(fileURLWithPath: scratch.path("first-block")))
    #expect(firstBlock.hasPrefix(try LinuxVirtioTests.sha256(ofFile: scratch.path("first-block"))), "\(firstBlock)")
    let bound = try await session.run("ls /sys/bus/virtio/drivers/virtio_rng /sys/bus/virtio/drivers/virtio_blk")
    #expect(bound.components(separatedBy: "virtio").count > 4, "\(bound)")
    session.type("poweroff -f\n")
    #expect(try await session.waitForExit(timeout: .seconds(120)) == 0)
  }
}
