import Devices
import Foundation
import KVMBackend
import Loaders
import SoftCPU
import Synchronization
import TestSupport
import Testing
import VMCore

/// Collects what the guest writes to port 0xE9.
final class DebugConsole: PortIODevice {
  private let bytes = Mutex<[UInt8]>([])
  func portRead(port: UInt16, size: Int) -> UInt32 { 0xE9 }
  func portWrite(port: UInt16, size: Int, value: UInt32) {
    bytes.withLock { $0.append(UInt8(truncatingIfNeeded: value)) }
  }
  var text: String { bytes.withLock { String(decoding: $0, as: UTF8.self) } }
}

/// Builds the Multiboot test kernels in Tests/GuestPrograms/system with GNU as and ld.
enum SystemGuestBuilder {
  struct Failure: Error, CustomStringConvertible { let description: String }

  static let sourceDirectory = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("GuestPrograms/system")

  /// The Multiboot kernel built from `name`.S, linked at 1 MiB (ELF64, or ELF32 when `bits32`);
  /// each of `symbols` (`NAME` or `NAME=VALUE`) is defined for the assembler (`as --defsym`),
  /// as 1 when no value is given.
  static func kernel(_ name: String, bits32: Bool = false, symbols: [String] = []) throws -> [UInt8] {
    let source = sourceDirectory.appendingPathComponent("\(name).S").path
    let work = FileManager.default.temporaryDirectory.appendingPathComponent("hostvisor-system-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: work) }
    let object = work.appendingPathComponent("\(name).o").path
    let image = work.appendingPathComponent("\(name).elf").path
    try run(
      "/usr/bin/as",
      [bits32 ? "--32" : "--64"] + symbols.flatMap { ["--defsym", $0.contains("=") ? $0 : "\($0)=1"] } + [
        "-o", object, source,
      ])
    try run(
      "/usr/bin/ld",
      [
        "-m", bits32 ? "elf_i386" : "elf_x86_64", "-nostdlib", "-N", "--no-warn-rwx-segments", "-e", "_start",
        "-Ttext=0x100000", "-o", image,
        object,
      ])
    return [UInt8](try Data(contentsOf: URL(fileURLWithPath: image)))
  }

  private static func run(_ tool: String, _ arguments: [String]) throws {
    try HostCommand.check(tool, arguments)
  }
}

@Suite("System: Multiboot guest kernels on the software CPU")
struct SystemGuestTests {
  /// Boots `kernel` with `SoftAccelerator`, or KVM when `kvm` (a watchdog stops it after
  /// `timeout` seconds).
  func boot(_ kernel: [UInt8], kvm: Bool = false, cpus: Int = 1, timeout: Double = 60) throws -> (
    MachineStopReason, String
  ) {
    let memory = try GuestMemory(size: 64 << 20)
    let bus = IOBus()
    let control = MachineControl()
    let interrupts = InterruptRouter()
    let console = DebugConsole()
    try bus.registerPorts(0xE9, count: 1, device: console)
    try bus.registerPorts(DebugExitDevice.defaultPort, count: 1, device: DebugExitDevice(control: control))
    let image = try KernelLoader.load(
      kernel: kernel, kernelName: "system-test", initrd: nil, commandLine: "", memory: memory)
    let parts = MachineParts(memory: memory, bus: bus, control: control, interrupts: interrupts)
    let accelerator: any Accelerator =
      kvm ? try KVMAccelerator(parts: parts, cpuCount: cpus) : try SoftAccelerator(parts: parts, cpuCount: cpus)
    DispatchQueue.global().asyncAfter(deadline: .now() + timeout) {
      control.requestStop(.failure("watchdog: the guest did not finish in \(timeout) s"))
    }
    let reason = try accelerator.run(bootState: image.state)
    return (reason, console.text)
  }

  @Test func longModeExceptionsPrivilegeChangesSyscallAndAPICTimer() throws {
    let (reason, output) = try boot(try SystemGuestBuilder.kernel("longmode"))
    #expect(reason == .debugExit(value: 0), "guest output: \(output)")
    #expect(output.contains("system checks passed"))
  }

  @Test func protectedModePagingPrivilegeChangesAndFarCalls() throws {
    let (reason, output) = try boot(try SystemGuestBuilder.kernel("protected", bits32: true))
    #expect(reason == .debugExit(value: 0), "guest output: \(output)")
    #expect(output.contains("protected-mode checks passed"))
  }

  /// Every application processor comes up (INIT, SIPI) and runs guest code, up to the
  /// largest `--cpus` the command line accepts; 2 vCPUs are covered by the Linux SMP test.
  @Test(arguments: [4, 64])
  func everyApplicationProcessorStarts(cpus: Int) throws {
    let kernel = try SystemGuestBuilder.kernel("smp", bits32: true, symbols: ["CPUS=\(cpus)"])
    let (reason, output) = try boot(kernel, cpus: cpus)
    #expect(reason == .debugExit(value: 0), "guest output: \(output)")
  }

  /// Checks 1-14 of the same kernel (#UD, #PF error codes and CR2, CR0.WP, #GP selector error
  /// codes, NX, a ring-3 #PF taken from CS 0x2B) on KVM, so the guest's expectations are
  /// checked against hardware. The kernel exits after check 14: this project's nested KVM
  /// resumes user mode after SYSCALL with RCX/R11 that are not the SYSCALL values, so the
  /// later checks (SYSCALL/SYSRET, INT 0x80, APIC timer) are checked on the software CPU only.
  /// Runs wherever /dev/kvm opens.
  @Test(.enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
  func longModeChecks1To14OnKVM() throws {
    let kernel = try SystemGuestBuilder.kernel("longmode", symbols: ["STOP_AFTER_RING3_CHECKS"])
    let (reason, output) = try boot(kernel, kvm: true, timeout: 150)
    #expect(reason == .debugExit(value: 0), "guest output: \(output)")
    #expect(output == "ABCDEFGHIJKLMN", "guest output: \(output)")
    // The same subset on the software CPU gives the same output.
    let (softReason, softOutput) = try boot(kernel)
    #expect(softReason == .debugExit(value: 0) && softOutput == output, "software CPU output: \(softOutput)")
  }
}
