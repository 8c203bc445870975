import Foundation
import TestSupport
import Testing

/// The Debian kernel of the default guest (`make guest`), booted with `nokaslr` on the software
/// CPU: a hardware breakpoint at `start_kernel` stops there.
@Suite("gdb stub with a Debian kernel", .serialized)
struct GDBLinuxTests {
  static var guestFolder: URL {
    URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
      .deletingLastPathComponent().appendingPathComponent(".cache/guest")
  }

  static var imagesPresent: Bool {
    FileManager.default.fileExists(atPath: guestFolder.appendingPathComponent("vmlinuz").path)
      && FileManager.default.fileExists(atPath: guestFolder.appendingPathComponent("initramfs.cpio.gz").path)
  }

  /// Boots the guest to its shell and reads `start_kernel`'s address from /proc/kallsyms (the
  /// package's System.map is a placeholder; with nokaslr the running kernel's addresses are the
  /// link-time ones).
  static func startKernelAddress(kernel: String, initrd: String) throws -> UInt64? {
    let output = CollectedOutput()
    let machine = try HostProcess(
      GDBTestSupport.hostvisor,
      [
        "run", "--accel", "soft", "--memory", "256M", "--serial", "stdio", "--kernel", kernel, "--initrd", initrd,
        "--cmdline", "console=ttyS0 nokaslr panic=-1",
      ], errors: { _ in }, output: { output.append($0) })
    defer {
      if machine.isRunning { machine.terminate() }
      machine.waitUntilExit(timeout: 10)
    }
    guard output.waitFor("HOSTVISOR-GUEST-READY", timeout: 300, stop: { !machine.isRunning }) else { return nil }
    usleep(500_000)
    machine.write(Data("grep -w start_kernel /proc/kallsyms; exit\n".utf8))
    let deadline = Date().addingTimeInterval(60)
    while true {
      let running = machine.isRunning
      if !running { machine.waitForOutputEnd(timeout: 5) }
      for line in output.text.split(whereSeparator: \.isNewline) {
        let fields = line.split(separator: " ")
        if fields.count == 3, fields[2] == "start_kernel", fields[1] == "T" || fields[1] == "t",
          let address = UInt64(fields[0], radix: 16), address != 0
        {
          return address
        }
      }
      if !running || Date() >= deadline { return nil }
      usleep(20_000)
    }
  }

  @Test(.enabled(if: imagesPresent, "needs the default guest (make guest)"))
  func hardwareBreakpointAtStartKernel() throws {
    let kernel = Self.guestFolder.appendingPathComponent("vmlinuz").path
    let initrd = Self.guestFolder.appendingPathComponent("initramfs.cpio.gz").path
    let address = try #require(try Self.startKernelAddress(kernel: kernel, initrd: initrd))
    #expect(address >= 0xFFFF_FFFF_8000_0000)

    let hex = String(address, radix: 16)
    let port = GDBTestSupport.freePort()
    let machine = try HostProcess(
      GDBTestSupport.hostvisor,
      [
        "run", "--accel", "soft", "--memory", "256M", "--serial", "none", "--kernel", kernel, "--initrd", initrd,
        "--cmdline", "console=ttyS0 nokaslr panic=-1", "--gdb", "127.0.0.1:\(port)", "--gdb-wait",
      ], errors: { _ in }, output: { _ in })
    defer { if machine.isRunning { machine.terminate() } }
    // gdb retries its connection while hostvisor starts listening.
    usleep(500_000)
    let gdb = try HostCommand.run(
      "/usr/bin/gdb",
      [
        "-batch", "-nx", "-ex", "set pagination off", "-ex", "set architecture i386:x86-64",
        "-ex", "target remote 127.0.0.1:\(port)", "-ex", "hbreak *0x\(hex)", "-ex", "continue",
        "-ex", "printf \"PC=%lx\\n\", $pc", "-ex", "printf \"CR3=%lx\\n\", $cr3", "-ex", "x/4xb $pc", "-ex", "kill",
      ], errors: .merged, timeout: 300)
    let text = gdb.text
    #expect(!gdb.timedOut, "gdb did not finish in 300 s")
    #expect(machine.waitUntilExit(timeout: gdb.timedOut ? 0 : 60))
    #expect(text.contains("PC=\(hex)"), "gdb output:\n\(text)")
    // The kernel runs on its own page tables there; the bytes at RIP were read through them.
    #expect(text.contains("0x\(hex)") && text.contains(":\t0x"), "gdb output:\n\(text)")
    #expect(machine.terminationStatus == 0)
  }
}
