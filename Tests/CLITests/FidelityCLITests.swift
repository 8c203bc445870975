import Foundation
import TestSupport
import Testing

/// Fidelity defects seen from the command line: triple faults and low Multiboot images.
@Suite("hostvisor run: triple faults and low Multiboot images")
struct FidelityCLITests {
  /// The address of `symbol` in the ELF file at `path`, from `nm`.
  func symbolAddress(_ symbol: String, in path: String) throws -> UInt64 {
    let text = try HostCommand.check("/usr/bin/nm", [path]).text
    for line in text.split(separator: "\n") {
      let fields = line.split(separator: " ")
      if fields.count == 3, fields[2] == symbol, let value = UInt64(fields[0], radix: 16) { return value }
    }
    throw CocoaError(.fileReadCorruptFile)
  }

  /// Defect 5: a triple fault is one line on standard error naming the exception and RIP, and
  /// exit status 2, on the software CPU.
  @Test func tripleFaultIsReportedWithItsVectorAndRIP() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/triple-fault.S", in: scratch)
    let faultAddress = try symbolAddress("fault_here", in: kernel)
    let result = try HostvisorProcess.run(["run", "--kernel", kernel, "--accel", "soft", "--serial", "none"])
    #expect(result.status == 2, "stderr: \(result.stderr)")
    let lines = result.stderr.split(separator: "\n")
    #expect(lines.count == 1, "stderr: \(result.stderr)")
    #expect(
      result.stderr == "hostvisor: triple fault: #UD (vector 6) at RIP 0x\(String(faultAddress, radix: 16))\n",
      "stderr: \(result.stderr)")
  }

  /// `--triple-fault reset` treats it as the guest resetting the machine: status 0, quiet.
  @Test func tripleFaultAsResetWhenAsked() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/triple-fault.S", in: scratch)
    let result = try HostvisorProcess.run([
      "run", "--kernel", kernel, "--accel", "soft", "--serial", "none", "--triple-fault", "reset",
    ])
    #expect(result.status == 0, "stderr: \(result.stderr)")
    #expect(result.stderr.isEmpty, "stderr: \(result.stderr)")
    let invalid = try HostvisorProcess.run([
      "run", "--kernel", kernel, "--accel", "soft", "--serial", "none", "--triple-fault", "reboot",
    ])
    #expect(invalid.status == 1)
    #expect(invalid.stderr.hasPrefix("hostvisor: error: invalid --triple-fault 'reboot'"), "\(invalid.stderr)")
  }

  /// Defect 6: a Multiboot image linked at 0x8000 (over the default boot stack, with a bss
  /// over the default command-line area) loads and runs, and finds the loader's data outside it.
  @Test func multibootImageLinkedAt0x8000Runs() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/multiboot-low.S", in: scratch, linkAt: "0x8000")
    let result = try HostvisorProcess.run([
      "run", "--kernel", kernel, "--accel", "soft", "--serial", "stdio", "--cmdline", "hello",
    ])
    #expect(result.status == (0x21 << 1) | 1, "stdout: \(result.stdout) stderr: \(result.stderr)")
    #expect(result.stdout.contains("low multiboot kernel ran"))
  }

  /// Defect 8: a guest reads fw_cfg's standard items (ports and DMA) and finds them consistent
  /// with the ACPI MADT and its memory map; the values it reports are the machine's.
  @Test func firmwareConfigurationItemsReadByAGuest() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/fw-cfg.S", in: scratch)
    let result = try HostvisorProcess.run([
      "run", "--kernel", kernel, "--accel", "soft", "--serial", "stdio", "--cpus", "3", "--memory", "96M",
      "--cmdline", "fwcfg-test x=1",
    ])
    #expect(result.status == (0x21 << 1) | 1, "stdout: \(result.stdout) stderr: \(result.stderr)")
    #expect(
      result.stdout.contains("fw_cfg cpus=3 ram=0x0000000006000000 cmdline=fwcfg-test x=1\n"),
      "stdout: \(result.stdout)")
  }
}
