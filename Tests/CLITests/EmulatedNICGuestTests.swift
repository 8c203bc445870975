import Foundation
import TestSupport
import Testing

/// The emulated NICs (e1000, RTL8139) on both accelerators, driven by a minimal driver of our
/// own: a 32-bit Multiboot guest (Tests/GuestPrograms/nic: common.S and the model's file) finds
/// the NIC on PCI, reads its MAC, sets up its rings, sends an ARP request for 10.0.2.1 and an
/// ICMP echo request through a TAP in a network namespace made by the test, takes the receive
/// notifications as IOAPIC interrupts, then points rings and buffers outside RAM and checks
/// that the device, once reset, still works. Linux cannot run on this project's nested KVM, so
/// this guest is what covers the devices' MMIO, port I/O, DMA and INTx paths on KVM; the same
/// guest on the software CPU shows that the guest itself is right.
@Suite("Emulated NICs driven by an asm guest on each accelerator", .serialized)
struct EmulatedNICGuestTests {
  /// Which guest drives each model: the driver file appended to common.S.
  static let models = ["e1000", "rtl8139"]

  /// Assembles common.S followed by `model`.S into a Multiboot image linked at 1 MiB, with
  /// `definitions` (assembler lines such as `.set RESET_LOOP, 1`) in front.
  static func guest(model: String, in scratch: ScratchDirectory, definitions: String = "") throws -> String {
    let folder = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
      .appendingPathComponent("GuestPrograms/nic")
    let source =
      try definitions + String(contentsOf: folder.appendingPathComponent("common.S"), encoding: .utf8)
      + String(contentsOf: folder.appendingPathComponent("\(model).S"), encoding: .utf8)
    let path = scratch.path("\(model).S")
    try source.write(toFile: path, atomically: true, encoding: .utf8)
    return try assembleAndLink(path, bits: 32, linkAt: "0x100000", into: scratch.path(model))
  }

  /// Runs `ip` with `arguments` and requires it to succeed.
  static func ip(_ arguments: [String]) throws {
    let result = try HostCommand.run("/usr/bin/env", ["ip"] + arguments, errors: .merged, timeout: 30)
    try #require(result.status == 0, "ip \(arguments.joined(separator: " ")): \(result.text)")
  }

  /// Runs the `model` guest on `accelerator` with `--net tap=...,model=MODEL,mac=...` in a new
  /// network namespace whose TAP (made before the VMM opens it) has 10.0.2.1/24, and checks
  /// every line the guest prints against what the test knows: the MAC it gave the device, the
  /// TAP's own MAC (the ARP reply's sender), and that no step failed.
  static func run(model: String, accelerator: String) throws {
    let scratch = try ScratchDirectory()
    let kernel = try guest(model: model, in: scratch)
    let namespace = "hvnic-\(UInt32.random(in: 0...UInt32.max))"
    let tap = "hvnic0"
    try ip(["netns", "add", namespace])
    defer { _ = try? HostCommand.run("/usr/bin/env", ["ip", "netns", "del", namespace], errors: .discarded) }
    try ip(["-n", namespace, "link", "set", "lo", "up"])
    try ip(["-n", namespace, "tuntap", "add", "dev", tap, "mode", "tap"])
    try ip(["-n", namespace, "addr", "add", "10.0.2.1/24", "dev", tap])
    try ip(["-n", namespace, "link", "set", tap, "up"])
    let tapAddress = try HostCommand.run(
      "/usr/bin/env", ["ip", "netns", "exec", namespace, "cat", "/sys/class/net/\(tap)/address"], timeout: 30
    ).text.trimmingCharacters(in: .whitespacesAndNewlines)
    try #require(tapAddress.split(separator: ":").count == 6, "the TAP's MAC: '\(tapAddress)'")
    let mac =
      "52:54:00:" + (0..<3).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined(separator: ":")

    let result = try HostCommand.run(
      "/usr/bin/env",
      [
        "ip", "netns", "exec", namespace, HostvisorProcess.executable.path, "run", "--accel", accelerator,
        "--memory", "32M", "--kernel", kernel, "--serial", "stdio", "--net", "tap=\(tap),model=\(model),mac=\(mac)",
      ], timeout: 180)
    let output = result.text
    let context = "serial:\n\(output)\nstderr:\n\(result.errorText)"
    #expect(!result.timedOut, "the guest ran longer than 180 s\n\(context)")
    #expect(result.status == (0x31 << 1) | 1, "exit status \(result.status)\n\(context)")
    #expect(!output.contains("FAIL"), "\(context)")
    let lines = output.split(separator: "\n").map { String($0) }

    #expect(lines.contains { $0.hasPrefix("pci ") && $0.contains(" slot ") }, "\(context)")
    #expect(lines.contains("mac \(mac)"), "the MAC read from the device is not \(mac)\n\(context)")
    #expect(
      lines.contains("arp reply 10.0.2.1 is-at \(tapAddress)"),
      "no ARP reply from the TAP's MAC \(tapAddress)\n\(context)")
    #expect(
      lines.contains { $0.hasPrefix("echo reply from 10.0.2.1 ttl ") && $0.hasSuffix(" checksums ok") },
      "\(context)")
    let interrupts = lines.filter { $0.hasPrefix("receive interrupts ") }
      .compactMap { Int($0.dropFirst("receive interrupts ".count)) }
    #expect(interrupts.count == 2, "\(context)")
    #expect((interrupts.first ?? 0) > 0, "no receive interrupt before the hostile part\n\(context)")
    #expect(lines.contains { $0.hasPrefix("hostile: ") }, "\(context)")
    #expect(lines.contains("hostile done"), "\(context)")
    #expect(
      lines.contains("alive: arp reply 10.0.2.1 is-at \(tapAddress)"),
      "the device did not work again after the hostile part\n\(context)")
    #expect(lines.last == "nic guest done", "\(context)")
  }

  @Test(
    .enabled(if: getuid() == 0, "needs root to make a network namespace and a TAP"),
    .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"),
    arguments: models)
  func onKVM(model: String) throws {
    try Self.run(model: model, accelerator: "kvm")
  }

  @Test(.enabled(if: getuid() == 0, "needs root to make a network namespace and a TAP"), arguments: models)
  func onTheSoftwareCPU(model: String) throws {
    try Self.run(model: model, accelerator: "soft")
  }
}
