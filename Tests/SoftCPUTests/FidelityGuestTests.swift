import Devices
import Foundation
import KVMBackend
import Loaders
import SoftCPU
import TestSupport
import Testing
import VMCore

/// Builds the guest programs of Tests/GuestPrograms/fidelity (each includes harness.S) with
/// GNU as and ld: ELF64 Multiboot kernels linked at 1 MiB.
enum FidelityGuestBuilder {
  static let sourceDirectory = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("GuestPrograms/fidelity")

  static func kernel(_ name: String) throws -> [UInt8] {
    let work = FileManager.default.temporaryDirectory.appendingPathComponent("hostvisor-fidelity-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: work) }
    let object = work.appendingPathComponent("\(name).o").path
    let image = work.appendingPathComponent("\(name).elf").path
    try run(
      "/usr/bin/as",
      ["--64", "-I", sourceDirectory.path, "-o", object, sourceDirectory.appendingPathComponent("\(name).S").path])
    try run(
      "/usr/bin/ld",
      [
        "-m", "elf_x86_64", "-nostdlib", "-N", "--no-warn-rwx-segments", "-e", "_start", "-Ttext=0x100000", "-o",
        image, object,
      ])
    return [UInt8](try Data(contentsOf: URL(fileURLWithPath: image)))
  }

  private static func run(_ tool: String, _ arguments: [String]) throws {
    try HostCommand.check(tool, arguments)
  }
}

/// Boots a fidelity guest on the software CPU (or KVM) with port 0xE9 output and
/// isa-debug-exit, presenting `cpuModel` (nil: the accelerator's default), and returns how it
/// stopped and what it printed.
func bootFidelityGuest(
  _ name: String, kvm: Bool = false, cpuCount: Int = 1, cpuModel: GuestCPUModel? = nil, timeout: Double = 60,
  memoryMegabytes: UInt64 = 64, install: (MachineParts) throws -> Void = { _ in }
) throws -> (MachineStopReason, String) {
  let memory = try GuestMemory(size: memoryMegabytes << 20)
  let bus = IOBus()
  let control = MachineControl()
  let console = DebugConsole()
  try bus.registerPorts(0xE9, count: 1, device: console)
  try bus.registerPorts(DebugExitDevice.defaultPort, count: 1, device: DebugExitDevice(control: control))
  let image = try KernelLoader.load(
    kernel: try FidelityGuestBuilder.kernel(name), kernelName: name, initrd: nil, commandLine: "", memory: memory)
  let parts = MachineParts(memory: memory, bus: bus, control: control, interrupts: InterruptRouter())
  try install(parts)
  let accelerator: any Accelerator =
    kvm
    ? try KVMAccelerator(parts: parts, cpuCount: cpuCount, cpuModel: cpuModel ?? .host)
    : try SoftAccelerator(parts: parts, cpuCount: cpuCount, cpuModel: cpuModel ?? .hostvisor)
  DispatchQueue.global().asyncAfter(deadline: .now() + timeout) {
    control.requestStop(.failure("watchdog: the guest did not finish in \(timeout) s"))
  }
  let reason = try accelerator.run(bootState: image.state)
  return (reason, console.text)
}

@Suite("Fidelity: architectural behaviour checked by guest programs")
struct FidelityGuestTests {
  /// Defect 5: SYSCALL/SYSRET from ring 3 with single-step traps (64-bit and compatibility mode).
  @Test func syscallSysretAndSingleStepFromRing3() throws {
    let (reason, output) = try bootFidelityGuest("syscall")
    #expect(reason == .debugExit(value: 0), "guest output: \(output)")
    #expect(output.contains("fidelity checks passed"))
  }

  /// Defect 4: RF in the RFLAGS image of fault frames, not of trap frames; RF lasts one
  /// instruction after IRET.
  @Test func resumeFlagInFaultFrames() throws {
    let (reason, output) = try bootFidelityGuest("fault_rf")
    #expect(reason == .debugExit(value: 0), "guest output: \(output)")
  }

  /// Defect 1: AMD's legacy performance counters count retired instructions and cycles.
  @Test func amdLegacyPerformanceCounters() throws {
    let (reason, output) = try bootFidelityGuest("perf_counters")
    #expect(reason == .debugExit(value: 0), "guest output: \(output)")
  }

  /// Defect 2: CLFLUSH (with its line size), CLFLUSHOPT, CLWB, RDTSCP + IA32_TSC_AUX, RDPID and
  /// the TSC-deadline timer are offered and work.
  @Test func cpuModelFeatures() throws {
    let (reason, output) = try bootFidelityGuest("cpu_model")
    #expect(reason == .debugExit(value: 0), "guest output: \(output)")
    #expect(output.hasPrefix("features: clflush clflushopt clwb rdtscp rdpid tsc-deadline\n"), "\(output)")
  }

  /// The same guest on KVM, whose CPUID comes from `CPUIDPolicy` (TSC-deadline is Hostvisor's
  /// to offer: KVM emulates it with its in-kernel local APIC but leaves the bit to userspace).
  @Test(.enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm")))
  func cpuModelFeaturesOnKVM() throws {
    let (reason, output) = try bootFidelityGuest("cpu_model", kvm: true, timeout: 300)
    if case .failure(let message) = reason, message.contains("instruction emulation failed"),
      FileManager.default.fileExists(atPath: "/sys/module/kvm_pvm")
    {
      // The development host's nested (PVM) KVM emulates ring-0 code and cannot emulate
      // every instruction (CLWB, for one); what it did run must still have been offered.
      withKnownIssue("nested KVM cannot emulate an offered instruction at ring 0") {
        Issue.record("\(message); guest output: \(output)")
      }
      #expect(output.hasPrefix("features: clflush"), "\(output)")
      return
    }
    #expect(reason == .debugExit(value: 0), "guest output: \(output)")
    // What else KVM offers depends on the host (this development host's nested KVM lacks
    // RDPID); CLFLUSH is universal and the TSC-deadline bit is the policy's own.
    #expect(output.hasPrefix("features: clflush"), "\(output)")
    #expect(output.contains(" tsc-deadline\n"), "\(output)")
  }

  /// Defect 3: IA32_APIC_BASE reserved bits, disable (CPUID bit, no MMIO decoding), relocation,
  /// and the one-shot timer's current count after expiry.
  @Test func localAPICBaseAndOneShotTimer() throws {
    let (reason, output) = try bootFidelityGuest("apic")
    #expect(reason == .debugExit(value: 0), "guest output: \(output)")
  }

  /// x2APIC mode: the IA32_APIC_BASE transitions, the MSR register interface and its #GP
  /// cases, the x2APIC and logical IDs, the timer through MSRs, SELF IPI and ICR IPIs.
  @Test func x2APICModeOnOneCPU() throws {
    let (reason, output) = try bootFidelityGuest("x2apic")
    #expect(reason == .debugExit(value: 0), "guest output: \(output)")
  }

  /// x2APIC IPIs from the BSP to an AP (which enters x2APIC mode in real mode) by physical ID,
  /// logical cluster and broadcast; INIT and SIPI through the 64-bit ICR.
  @Test func x2APICInterprocessorInterrupts() throws {
    let (reason, output) = try bootFidelityGuest("x2apic_smp", cpuCount: 2)
    #expect(reason == .debugExit(value: 0), "guest output: \(output)")
  }
}

/// A named CPU model looks the same to a guest on both accelerators: CPUID's feature registers
/// hold exactly the model's bits, and what the model leaves out is refused (CR4.OSXSAVE
/// without XSAVE, XSETBV of the AVX state without AVX).
@Suite("CPU models as guests see them")
struct CPUModelGuestTests {
  static let registerLines: [(name: String, register: CPUIDFeatureRegister)] = [
    ("leaf1ecx", .leaf1ECX), ("leaf1edx", .leaf1EDX), ("leaf7ebx", .leaf7EBX), ("leaf7ecx", .leaf7ECX),
    ("leaf7edx", .leaf7EDX), ("xsave0eax", .xsaveComponents), ("xsave1eax", .xsaveInstructions),
    ("ext1ecx", .extendedECX), ("ext1edx", .extendedEDX),
  ]

  /// The lines the guest prints when it sees exactly `model`.
  static func expectedOutput(_ model: GuestCPUModel) -> String {
    let features = model.features!
    var lines = registerLines.map { line in
      let hex = String(features[line.register], radix: 16)
      return "\(line.name)=\(String(repeating: "0", count: 8 - hex.count))\(hex)"
    }
    if features.leaf1ECX & (1 << 26) == 0 {
      lines.append("osxsave=gp")
    } else {
      lines.append("osxsave=ok")
      lines.append(features.xsaveComponents & 4 != 0 ? "xsetbv-avx=ok" : "xsetbv-avx=gp")
    }
    return lines.joined(separator: "\n") + "\nfidelity checks passed\n"
  }

  /// The models differ where the psABI levels say they do (an independent check of the table
  /// the expected output is built from).
  @Test func modelsFollowTheISALevels() throws {
    let v2 = try #require(GuestCPUModel.x86_64_v2.features)
    let v3 = try #require(GuestCPUModel.x86_64_v3.features)
    // x86-64-v2: SSE3(0) SSSE3(9) CX16(13) SSE4.1(19) SSE4.2(20) POPCNT(23), LAHF/SAHF.
    for bit in [0, 9, 13, 19, 20, 23] { #expect(v2.leaf1ECX & (1 << bit) != 0 && v3.leaf1ECX & (1 << bit) != 0) }
    #expect(v2.extendedECX & 1 != 0)
    // x86-64-v3 adds FMA(12) MOVBE(22) XSAVE(26) AVX(28) F16C(29), BMI1(3) AVX2(5) BMI2(8), LZCNT.
    for bit in [12, 22, 26, 28, 29] { #expect(v2.leaf1ECX & (1 << bit) == 0 && v3.leaf1ECX & (1 << bit) != 0) }
    for bit in [3, 5, 8] { #expect(v2.leaf7EBX & (1 << bit) == 0 && v3.leaf7EBX & (1 << bit) != 0) }
    #expect(v2.extendedECX & (1 << 5) == 0 && v3.extendedECX & (1 << 5) != 0)
    #expect(v3.xsaveComponents == 7 && v2.xsaveComponents == 0)
    // Both are subsets of what the software CPU implements.
    #expect(GuestCPUModel.featuresTheSoftwareCPULacks(v3).isEmpty)
    #expect(GuestCPUModel.x86_64_v3.features!.missing(from: GuestCPUModel.hostvisor.features!).isEmpty)
  }

  @Test(arguments: [GuestCPUModel.x86_64_v2, .x86_64_v3, .hostvisor])
  func softwareCPUPresentsExactlyTheModel(model: GuestCPUModel) throws {
    let (reason, output) = try bootFidelityGuest("cpuid_model", cpuModel: model)
    #expect(reason == .debugExit(value: 0), "guest output: \(output)")
    #expect(output == Self.expectedOutput(model))
  }

  @Test(
    .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm")),
    arguments: [GuestCPUModel.x86_64_v2, .x86_64_v3, .hostvisor])
  func kvmPresentsExactlyTheModel(model: GuestCPUModel) throws {
    let output: String
    let reason: MachineStopReason
    do {
      (reason, output) = try bootFidelityGuest("cpuid_model", kvm: true, cpuModel: model, timeout: 300)
    } catch let error as KVMError {
      // This host's KVM lacks one of the model's features: refused with one line naming them.
      guard case .cpuModelUnavailable(let name, let missing) = error else { throw error }
      #expect(name == model.name && !missing.isEmpty)
      #expect(!error.description.contains("\n") && error.description.contains(missing[0]))
      return
    }
    let expected = Self.expectedOutput(model)
    if case .failure(let message) = reason, message.contains("instruction emulation failed"),
      FileManager.default.fileExists(atPath: "/sys/module/kvm_pvm")
    {
      // Nested (PVM) KVM emulates ring-0 code and may not emulate XSETBV: the CPUID lines
      // before it must still be the model's.
      withKnownIssue("nested KVM cannot emulate every ring-0 instruction") {
        Issue.record("\(message); guest output: \(output)")
      }
      let cpuidLines = expected.split(separator: "\n").prefix(Self.registerLines.count).joined(separator: "\n")
      #expect(output.hasPrefix(cpuidLines), "\(output)")
      return
    }
    #expect(reason == .debugExit(value: 0), "guest output: \(output)")
    #expect(output == expected)
  }
}
