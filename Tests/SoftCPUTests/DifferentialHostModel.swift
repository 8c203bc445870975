import CNativeExec
import SoftCPU
import Testing
import VMCore

/// Where this host's processor and the software CPU's model (its CPUID vendor) may differ in
/// architecturally allowed ways. The differential tests compare against the model: cases that
/// would exercise such a difference are not generated when the host's vendor or MXCSR_MASK is
/// not the model's, and the model's behaviour there is checked by known-answer tests
/// (`VendorModelTests`), so `make test` gives the same verdict on an Intel or an AMD host.
enum HostModel {
  /// The host's CPUID vendor string.
  static let hostVendor: String = {
    var bytes = [CChar](repeating: 0, count: 13)
    cnx_host_vendor(&bytes)
    return String(decoding: bytes.prefix(12).map { UInt8(bitPattern: $0) }, as: UTF8.self)
  }()

  /// The software CPU's CPUID vendor string, read by running CPUID on it.
  static let modelVendor: String = {
    let cpu = modelCPU()
    cpu.gpr[0] = 0
    cpu.gpr[1] = 0
    cpu.rip = 0x1000
    _ = cpu.run(instructionLimit: 2)
    var bytes: [UInt8] = []
    for register in [3, 2, 1] {
      for shift in stride(from: 0, to: 32, by: 8) {
        bytes.append(UInt8(truncatingIfNeeded: cpu.gpr[register] >> UInt64(shift)))
      }
    }
    return String(decoding: bytes, as: UTF8.self)
  }()

  /// The host's MXCSR_MASK.
  static let hostMXCSRMask: UInt32 = cnx_host_mxcsr_mask()

  /// The software CPU's MXCSR_MASK, read from an FXSAVE it executes.
  static let modelMXCSRMask: UInt32 = {
    let cpu = modelCPU(code: [0x0F, 0xAE, 0x04, 0x25, 0x00, 0x20, 0x00, 0x00, 0xF4])  // fxsave [0x2000]; hlt
    _ = cpu.run(instructionLimit: 2)
    return (try? cpu.memory.read(UInt32.self, at: 0x2000 + 28)) ?? 0
  }()

  /// MXCSR bits one side accepts and the other does not (LDMXCSR/FXRSTOR #GP on one side).
  static var mxcsrMaskDifference: UInt32 { hostMXCSRMask ^ modelMXCSRMask }

  /// True when the host's vendor is not the model's: vendor-specific (architecturally allowed)
  /// behaviour is left out of the generated cases.
  static var vendorsDiffer: Bool { hostVendor != modelVendor }

  /// Whether the host is an Intel processor. Two behaviours the model takes from an Intel host
  /// differ on an AMD one (docs/TODO.md): XSAVE's AVX-in-use bit after VEX.256 instructions
  /// that leave the upper halves zero, and VCVTPS2PH's PE with overflow or underflow unmasked.
  static var hostIsIntel: Bool { hostVendor == "GenuineIntel" }

  /// MXCSR bits the cases built around `form` do not compare on this host, and such forms are
  /// not used as fillers: VCVTPS2PH's PE when an unmasked overflow or underflow stops it (the
  /// model sets it from the unbounded-exponent result as an Intel host does; an AMD host
  /// leaves it clear). `DifferentialFixedCases.halfConversionUnboundedExponentInexactness`
  /// pins the model's PE on Intel hosts.
  static func mxcsrIgnored(form: String) -> UInt32 { !hostIsIntel && form.hasPrefix("vcvtps2ph") ? 1 << 5 : 0 }

  /// A number field of the host's first processor in /proc/cpuinfo (0 when missing).
  private static func cpuinfoNumber(_ field: String) -> Int {
    guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
      let line = text.split(separator: "\n").first(where: {
        $0.split(separator: ":").first?.trimmingCharacters(in: .whitespaces) == field
      }),
      let value = line.split(separator: ":").last
    else { return 0 }
    return Int(value.trimmingCharacters(in: .whitespaces)) ?? 0
  }

  /// The host's CPU family as /proc/cpuinfo reports it (the display family: 23 is AMD's 17h).
  static let hostFamily = cpuinfoNumber("cpu family")

  /// The host's CPU model as /proc/cpuinfo reports it (the display model).
  static let hostModelNumber = cpuinfoNumber("model")

  /// MXCSR bits `DifferentialTests.vdppsYmmReportsOnlyTheFaultingHalfOfTheFirstAdditions` does
  /// not compare on this host: when VDPPS ymm faults with PE in one half while IE is masked, an
  /// AMD family 17h (Zen 1) host and an Intel family 6 model 207 (Xeon, Emerald Rapids) host
  /// also set the other half's IE from the same step; the model, as the later AMD and the
  /// earlier Intel hosts its rule was taken from, reports PE alone.
  static var vdppsOtherHalfIEIgnored: UInt32 {
    let setsIE =
      (hostVendor == "AuthenticAMD" && hostFamily == 23) || (hostIsIntel && hostFamily == 6 && hostModelNumber == 207)
    return setsIE ? 1 : 0
  }

  /// Whether the host sets XINUSE[2] (AVX) as the model does (`hostIsIntel`).
  static var hostTracksAVXInUseAsTheModel: Bool { hostIsIntel }

  /// CMPXCHG r32 with a register destination on a failed compare: AMD leaves the destination
  /// untouched, Intel writes it back (clearing bits 63:32). Generated only on a host of the
  /// model's vendor.
  static func allowsRegisterDestination(form: String, size: UInt8) -> Bool {
    !(vendorsDiffer && form == "cmpxchg r/m, r" && size == 4)
  }

  private static func modelCPU(code: [UInt8] = [0x0F, 0xA2, 0xF4]) -> CPU {
    let memory = try! GuestMemory(size: 1 << 20)
    try! memory.writeBytes(code, at: 0x1000)
    let cpu = CPU(memory: memory, bus: IOBus())
    cpu.enterFlatLongMode(cpl: 0)
    cpu.rip = 0x1000
    cpu.gpr[4] = 0x8000
    return cpu
  }
}

/// Known answers for the behaviours where Intel and AMD differ, as the model (AMD, per the APM)
/// defines them. The differential tests leave these out on a host of the other vendor.
@Suite("Vendor model")
struct VendorModelTests {
  @Test("CMPXCHG r32 with a failed compare leaves a register destination untouched (AMD)")
  func cmpxchgFailureLeavesDestination() throws {
    let machine = try CoreMachine(cpl: 0)
    // eax = 1, [ecx] = 2: not equal, so EAX receives the destination (zero-extended) and
    // the destination register keeps all 64 bits.
    try machine.load(
      assembly: """
        mov rax, 0xAAAAAAAA00000001
        mov rcx, 0x5555555500000002
        mov rdx, 0x1234
        cmpxchg ecx, edx
        hlt
        """)
    #expect(machine.run() == .halted)
    #expect(machine[R.rcx] == 0x5555_5555_0000_0002)
    #expect(machine[R.rax] == 2)
    #expect(machine.cpu.rflags & RFlags.zf == 0)
  }

  @Test(
    "MXCSR_MASK is 0xFFFF (no misaligned-SSE mode, which CPUID does not advertise): LDMXCSR accepts DAZ, rejects MM")
  func mxcsrMask() throws {
    #expect(HostModel.modelMXCSRMask == 0xFFFF)
    let machine = try CoreMachine(cpl: 0)
    try machine.memory.write(UInt32(0x1FC0), at: CoreMachine.dataBase)
    try machine.memory.write(UInt32(0x2_1F80), at: CoreMachine.dataBase + 4)
    try machine.load(assembly: "mov rbx, 0x100000\nldmxcsr [rbx]\nstmxcsr [rbx + 8]\nldmxcsr [rbx + 4]\nhlt")
    let stop = machine.run()
    #expect(try machine.memory.read(UInt32.self, at: CoreMachine.dataBase + 8) == 0x1FC0)
    guard case .fault(let fault) = stop else {
      Issue.record("LDMXCSR with bit 17 (MM) set did not fault: \(stop)")
      return
    }
    #expect(fault.vector == 13)
  }
}
