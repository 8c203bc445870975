import Foundation
import Testing
import VMM

/// `--accel auto`: the KVM probe's verdict and the accelerator the command line then uses.
@Suite("Accelerator probe")
struct AcceleratorProbeTests {
  /// Without a usable KVM device, `auto` says why and runs the guest on the software CPU.
  @Test func autoWithoutKVMRunsOnTheSoftwareCPU() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/hello-multiboot.S", in: scratch)
    for device in ["/nonexistent/kvm", "/dev/null"] {
      #expect(AcceleratorProbe.probeKVM(devicePath: device).kvmUsable == false)
      let result = try HostvisorProcess.run([
        "run", "--kernel", kernel, "--accel", "auto", "--kvm-device", device, "--verbose", "--serial", "stdio",
      ])
      #expect(
        result.stderr.contains("KVM is not usable") && result.stderr.contains("choosing soft"), "\(result.stderr)")
      #expect(result.stdout.contains("hello from the guest"), "stdout: \(result.stdout) stderr: \(result.stderr)")
      #expect(result.status == (0x21 << 1) | 1)
    }
  }

  /// With /dev/kvm, the probe's verdict follows its measured ring-0 rate (usable from 50 M
  /// instructions/s), and `auto` runs the guest on the accelerator the verdict names.
  @Test(.enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
  func autoFollowsTheProbeOnThisHost() throws {
    let finding = AcceleratorProbe.probeKVM(devicePath: "/dev/kvm")
    let words = finding.reason.split(separator: " ")
    let rate = words.firstIndex(of: "M").flatMap { Int(words[$0 - 1]) }
    #expect(rate != nil, "probe reason: \(finding.reason)")
    if let rate { #expect(finding.kvmUsable == (rate >= 50), "probe reason: \(finding.reason)") }
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/hello-multiboot.S", in: scratch)
    let result = try HostvisorProcess.run([
      "run", "--kernel", kernel, "--accel", "auto", "--verbose", "--serial", "stdio",
    ])
    let expected = finding.kvmUsable ? "choosing kvm" : "choosing soft"
    #expect(result.stderr.contains(expected), "probe: \(finding.reason); stderr: \(result.stderr)")
    #expect(result.stdout.contains("hello from the guest"), "stdout: \(result.stdout) stderr: \(result.stderr)")
    #expect(result.status == (0x21 << 1) | 1)
  }
}
