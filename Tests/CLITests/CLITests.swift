import Foundation
import TestSupport
import Testing

/// Runs the real `hostvisor` executable built next to this test bundle.
struct HostvisorProcess {
  static var executable: URL {
    let testBinary = URL(
      fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
        ?? CommandLine.arguments[0])
    return testBinary.deletingLastPathComponent().appendingPathComponent("hostvisor")
  }

  struct Result {
    var status: Int32
    var stdout: String
    var stderr: String
  }

  /// Runs hostvisor to completion (killed after `timeout` seconds, which fails the test).
  static func run(_ arguments: [String], timeout: Double = 300) throws -> Result {
    let result = try HostCommand.run(executable.path, arguments, timeout: timeout)
    #expect(!result.timedOut, "hostvisor \(arguments.joined(separator: " ")) ran longer than \(Int(timeout)) s")
    return Result(status: result.status, stdout: result.text, stderr: result.errorText)
  }
}

/// A scratch directory removed when the test ends.
final class ScratchDirectory {
  let url: URL
  init() throws {
    url = FileManager.default.temporaryDirectory.appendingPathComponent("hostvisor-cli-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
  }
  deinit { try? FileManager.default.removeItem(at: url) }
  func path(_ name: String) -> String { url.appendingPathComponent(name).path }
}

/// Assembles and links a guest program from Tests/GuestPrograms with GNU as/ld.
func buildGuest(_ source: String, in scratch: ScratchDirectory, linkAt address: String = "0x100000") throws -> String {
  let sourcePath = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("GuestPrograms/\(source)").path
  return try assembleAndLink(sourcePath, bits: 32, linkAt: address, into: scratch.path("guest"))
}

@Suite("hostvisor command line")
struct CLITests {
  /// Every failure is exactly one line on stderr that starts with "hostvisor: error:".
  func expectOneLineError(_ result: HostvisorProcess.Result, containing text: String) {
    #expect(result.status == 1)
    let lines = result.stderr.split(separator: "\n", omittingEmptySubsequences: true)
    #expect(lines.count == 1, "stderr was: \(result.stderr)")
    #expect(result.stderr.hasPrefix("hostvisor: error: "), "stderr was: \(result.stderr)")
    #expect(result.stderr.contains(text), "stderr was: \(result.stderr)")
  }

  @Test func missingKernelFile() throws {
    let result = try HostvisorProcess.run(["run", "--kernel", "/nonexistent/vmlinuz", "--serial", "none"])
    expectOneLineError(result, containing: "/nonexistent/vmlinuz")
  }

  @Test func fileThatIsNotAKernel() throws {
    let scratch = try ScratchDirectory()
    let path = scratch.path("notes.txt")
    try Data(repeating: 0x41, count: 4096).write(to: URL(fileURLWithPath: path))
    let result = try HostvisorProcess.run(["run", "--kernel", path, "--serial", "none"])
    expectOneLineError(result, containing: "not a kernel")
  }

  @Test func zeroMemory() throws {
    let result = try HostvisorProcess.run(["run", "--kernel", "/bin/true", "--memory", "0", "--serial", "none"])
    expectOneLineError(result, containing: "memory size must be greater than zero")
  }

  @Test func memoryLargerThanTheHost() throws {
    let result = try HostvisorProcess.run(["run", "--kernel", "/bin/true", "--memory", "900T", "--serial", "none"])
    expectOneLineError(result, containing: "larger than this host can map")
  }

  @Test func malformedMemorySize() throws {
    let result = try HostvisorProcess.run(["run", "--kernel", "/bin/true", "--memory", "lots", "--serial", "none"])
    expectOneLineError(result, containing: "invalid memory size 'lots'")
  }

  /// The API's network interfaces are virtio-net on a TAP: `--api-sock` with user networking
  /// (which the API could not describe) is refused instead of becoming a TAP without a name.
  @Test func apiSocketRefusesUserNetworking() throws {
    let socket = "/tmp/hostvisor-cli-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
    defer { unlink(socket) }
    let result = try HostvisorProcess.run([
      "run", "--kernel", "/bin/true", "--accel", "soft", "--net", "user", "--api-sock", socket, "--serial", "none",
    ])
    expectOneLineError(result, containing: "--api-sock supports --net tap=NAME (virtio) only: user networking")
  }

  @Test func zeroCPUs() throws {
    let result = try HostvisorProcess.run(["run", "--kernel", "/bin/true", "--cpus", "0", "--serial", "none"])
    expectOneLineError(result, containing: "invalid CPU count 0")
  }

  @Test func unknownAccelerator() throws {
    let result = try HostvisorProcess.run(["run", "--kernel", "/bin/true", "--accel", "warp", "--serial", "none"])
    expectOneLineError(result, containing: "invalid accelerator 'warp'")
  }

  @Test func unknownCPUModel() throws {
    let result = try HostvisorProcess.run([
      "run", "--kernel", "/bin/true", "--accel", "soft", "--cpu-model", "pentium", "--serial", "none",
    ])
    expectOneLineError(
      result, containing: "unknown CPU model 'pentium': use hostvisor, x86-64-v3, x86-64-v2, x86-64, host")
    let served = try HostvisorProcess.run(["serve", "--api-sock", "/nonexistent/hv.sock", "--cpu-model", "pentium"])
    expectOneLineError(served, containing: "unknown CPU model 'pentium'")
  }

  /// `host` is KVM's own CPUID: the software CPU refuses it with one line; the migratable
  /// models run there.
  @Test func hostModelIsRefusedOnTheSoftwareCPU() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/hello-multiboot.S", in: scratch)
    let refused = try HostvisorProcess.run([
      "run", "--kernel", kernel, "--accel", "soft", "--cpu-model", "host", "--serial", "none",
    ])
    expectOneLineError(
      refused,
      containing: "the software CPU cannot present the CPU model 'host' (KVM's own CPUID); "
        + "use hostvisor, x86-64-v3, x86-64-v2 or x86-64")
    let accepted = try HostvisorProcess.run([
      "run", "--kernel", kernel, "--accel", "soft", "--cpu-model", "x86-64-v2", "--serial", "stdio", "--verbose",
    ])
    #expect(accepted.status == (0x21 << 1) | 1, "stderr: \(accepted.stderr)")
    #expect(accepted.stderr.contains("CPU model: x86-64-v2"), "stderr: \(accepted.stderr)")
  }

  @Test func missingKVMDevice() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/hello-multiboot.S", in: scratch)
    let result = try HostvisorProcess.run([
      "run", "--kernel", kernel, "--accel", "kvm", "--kvm-device", "/nonexistent/kvm", "--serial", "none",
    ])
    expectOneLineError(result, containing: "/nonexistent/kvm")
  }

  @Test func kvmDeviceThatIsNotKVM() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/hello-multiboot.S", in: scratch)
    let result = try HostvisorProcess.run([
      "run", "--kernel", kernel, "--accel", "kvm", "--kvm-device", "/dev/null", "--serial", "none",
    ])
    expectOneLineError(result, containing: "/dev/null")
  }

  @Test func multibootGuestPrintsAndExitsThroughDebugExit() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/hello-multiboot.S", in: scratch)
    let result = try HostvisorProcess.run(["run", "--kernel", kernel, "--accel", "kvm", "--serial", "stdio"])
    #expect(result.stdout.contains("hello from the guest"), "stdout: \(result.stdout) stderr: \(result.stderr)")
    #expect(result.status == (0x21 << 1) | 1)
  }

  @Test func serialToFile() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/hello-multiboot.S", in: scratch)
    let log = scratch.path("serial.log")
    let result = try HostvisorProcess.run(["run", "--kernel", kernel, "--accel", "kvm", "--serial", "file:\(log)"])
    #expect(result.status == (0x21 << 1) | 1)
    let written = try String(contentsOfFile: log, encoding: .utf8)
    #expect(written.contains("hello from the guest"))
  }

  @Test func helpExplainsEveryOption() throws {
    let result = try HostvisorProcess.run(["run", "--help"])
    #expect(result.status == 0)
    for option in [
      "--kernel", "--initrd", "--cmdline", "--memory", "--cpus", "--accel", "--cpu-model", "--serial", "--verbose",
    ] {
      #expect(result.stdout.contains(option), "help lacks \(option)")
    }
  }
}
