import InterruptControllers
import VMCore

// The CPU model: what CPUID reports. The one place where feature bits are listed; advertise
// exactly what the core, SIMD and FPU units implement.

/// Feature bits advertised by CPUID.
enum CPUModel {
  static let vendor = "AuthenticAMD"
  static let brand = "Hostvisor software x86-64 CPU"
  /// Family 0x19, model 0x01, stepping 0 (leaf 1 EAX), with leaf 0x8000_0021 saying which
  /// speculative-execution bugs of that family it does not have. The software CPU does not
  /// speculate, so a guest kernel should not pay for mitigations: as family 0x17 (Zen 1/2),
  /// Linux put a return thunk on every kernel RET (retbleed, SRSO "safe RET"), an untraining
  /// sequence on every entry and a divide on every return to user space (div0), and nothing
  /// in CPUID can declare those families immune.
  static let signature: UInt32 = 0x00A0_0F10
  /// 0x8000_0008 EBX: SSB_NO(26): not affected by Speculative Store Bypass.
  static let extendedFeature8EBX: UInt32 = 1 << 26
  /// 0x8000_0021 EAX: LFENCE always serializing(2), SRSO_NO(29): not affected by Speculative
  /// Return Stack Overflow.
  static let extendedFeature21EAX: UInt32 = 1 << 2 | 1 << 29
  /// 0x8000_0021 ECX: TSA_SQ_NO(1), TSA_L1_NO(2): not affected by Transient Scheduler Attacks.
  static let extendedFeature21ECX: UInt32 = 1 << 1 | 1 << 2

  /// Leaf 1 EDX: FPU(0) PSE(3) TSC(4) MSR(5) PAE(6) CX8(8) APIC(9) SEP(11) MTRR(12) PGE(13)
  /// CMOV(15) PAT(16) PSE-36(17) CLFSH(19) MMX(23) FXSR(24) SSE(25) SSE2(26). APIC reads 0 while
  /// IA32_APIC_BASE disables the local APIC.
  static let leaf1EDX: UInt32 =
    1 << 0 | 1 << 3 | 1 << 4 | 1 << 5 | 1 << 6 | 1 << 8 | 1 << 9 | 1 << 11 | 1 << 12 | 1 << 13 | 1 << 15
    | 1 << 16 | 1 << 17 | 1 << 19 | 1 << 23 | 1 << 24 | 1 << 25 | 1 << 26
  /// Leaf 1 EDX bit 9: the local APIC.
  static let leaf1EDXAPIC: UInt32 = 1 << 9
  /// Leaf 1 EDX bit 28: HTT, EBX[23:16] counts the package's logical processors (set with
  /// more than one vCPU, from `CPUTopology`).
  static let leaf1EDXHTT: UInt32 = 1 << 28
  /// Leaf 1 EBX[15:8]: CLFLUSH line size in 8-byte units (64 bytes).
  static let clflushLineSize: UInt32 = 8
  /// Leaf 1 ECX: SSE3(0) PCLMULQDQ(1) SSSE3(9) CX16(13) SSE4.1(19) SSE4.2(20) MOVBE(22) POPCNT(23)
  /// TSC-deadline(24) XSAVE(26) hypervisor(31) x2APIC(21); OSXSAVE(27) mirrors CR4.OSXSAVE. No PCID.
  static let leaf1ECX: UInt32 =
    1 << 0 | 1 << 1 | 1 << 9 | 1 << 13 | 1 << 19 | 1 << 20 | 1 << 21 | 1 << 22 | 1 << 23 | 1 << 24 | 1 << 26 | 1 << 31
  /// Leaf 1 ECX bit 27: OSXSAVE (CR4.OSXSAVE).
  static let leaf1ECXOSXSAVE: UInt32 = 1 << 27
  /// Leaf 1 ECX bit 26: XSAVE (CR4.OSXSAVE is reserved without it).
  static let leaf1ECXXSAVE: UInt32 = 1 << 26
  /// Leaf 7 ECX bit 22: RDPID; 8000_0001 EDX bit 27: RDTSCP; bit 26: 1 GiB pages (#UD or a
  /// reserved-bit page fault when the model hides them).
  static let leaf7ECXRDPID: UInt32 = 1 << 22
  static let extendedEDXRDTSCP: UInt32 = 1 << 27
  static let extendedEDXGigabytePages: UInt32 = 1 << 26
  /// Leaf 1 ECX, the x86-64-v3 vector extensions (AVX.swift, AVXPermute.swift,
  /// AVXArithmetic.swift), offered with `leaf1ECX`: FMA(12) AVX(28) F16C(29).
  static let leaf1ECXVector: UInt32 = 1 << 12 | 1 << 28 | 1 << 29
  /// Leaf 7 EBX: BMI1(3), AVX2(5), BMI2(8) (BMI.swift), ERMS(9), enhanced REP MOVSB/STOSB, a hint
  /// that steers Linux's memcpy/memset/copy_user to `rep movsb`/`rep stosb`, which the string
  /// unit runs as one host memmove/memset per page; CLFLUSHOPT(23) and CLWB(24) (no-ops: guest
  /// RAM is coherent host memory).
  static let leaf7EBX: UInt32 = 1 << 3 | 1 << 5 | 1 << 8 | 1 << 9 | 1 << 23 | 1 << 24
  /// Leaf 7 ECX: RDPID(22).
  static let leaf7ECX: UInt32 = 1 << 22
  /// Leaf 7 EDX: FSRM(4), fast short REP MOVSB (same reason: even short copies become one
  /// instruction instead of an interpreted loop).
  static let leaf7EDX: UInt32 = 1 << 4
  /// 0x8000_0001 EDX: SYSCALL(11) NX(20) 1 GiB pages(26) RDTSCP(27) LM(29).
  static let extendedEDX: UInt32 = 1 << 11 | 1 << 20 | 1 << 26 | 1 << 27 | 1 << 29
  /// 0x8000_0001 ECX: LAHF/SAHF in 64-bit mode(0) ABM/LZCNT(5).
  static let extendedECX: UInt32 = 1 << 0 | 1 << 5
  /// The ABM bit (LZCNT) of 0x8000_0001 ECX and the BMI1 bit (TZCNT, ANDN...) of leaf 7 EBX.
  static let extendedECXABM: UInt32 = 1 << 5
  static let leaf7EBXBMI1: UInt32 = 1 << 3
  /// 0x8000_0007 EDX: invariant TSC(8). Every vCPU reads the TSC from one virtual clock at a
  /// constant rate that no power state stops, so Linux may keep it as the clocksource with
  /// several vCPUs (it marks a TSC without this bit unstable on a non-Intel SMP machine). An
  /// accelerator's own leaf, like the cache leaves: the same in every CPU model.
  static let powerManagementEDX: UInt32 = 1 << 8
  /// Linear address width (bits 8-15 of 0x8000_0008 EAX; the physical width comes from
  /// `system.physicalAddressBits`).
  static let linearAddressBits: UInt32 = 48

  /// Everything above as one feature set: the `hostvisor` CPU model, and the most any model
  /// may ask of the software CPU.
  static let implemented = CPUIDFeatures(
    leaf1EDX: leaf1EDX, leaf1ECX: leaf1ECX | leaf1ECXVector, leaf7EBX: leaf7EBX, leaf7ECX: leaf7ECX,
    leaf7EDX: leaf7EDX, xsaveComponents: UInt32(XSaveModel.supportedComponents),
    xsaveInstructions: XSaveModel.instructions, extendedEDX: extendedEDX, extendedECX: extendedECX)
}

extension GuestCPUModel {
  /// Every feature the software CPU implements (docs/cpu-model.md): the default on the
  /// software CPU.
  public static let hostvisor = GuestCPUModel(
    name: "hostvisor", summary: "everything the software CPU implements (x86-64-v3 and more)",
    features: CPUModel.implemented)

  /// Whether the software CPU can present `features`, and if not, what it lacks.
  public static func featuresTheSoftwareCPULacks(_ features: CPUIDFeatures) -> [String] {
    features.missing(from: CPUModel.implemented)
  }
}

extension CPU {
  /// Packs four ASCII bytes of `text` starting at `offset` into a register value.
  private func ascii(_ text: [UInt8], _ offset: Int) -> UInt64 {
    var value: UInt64 = 0
    for index in 0..<4 where offset + index < text.count {
      value |= UInt64(text[offset + index]) << (8 * UInt64(index))
    }
    return value
  }

  /// CPUID: leaf EAX, subleaf ECX.
  func executeCPUID() {
    let leaf = UInt32(truncatingIfNeeded: gpr[0])
    var a: UInt64 = 0
    var b: UInt64 = 0
    var c: UInt64 = 0
    var d: UInt64 = 0
    let vendor = Array(CPUModel.vendor.utf8)
    let features = system.cpuidFeatures
    switch leaf {
    case 0:
      a = 0xD
      b = ascii(vendor, 0)
      d = ascii(vendor, 4)
      c = ascii(vendor, 8)
    case 1:
      a = UInt64(CPUModel.signature)
      // The package's logical processors, the APIC ID, the CLFLUSH line size.
      let topology = system.topology
      b =
        UInt64(topology.logicalProcessorsPerPackage) << 16 | UInt64(system.apicID & 0xFF) << 24
        | UInt64(CPUModel.clflushLineSize) << 8
      c = UInt64(features.leaf1ECX)
      d = UInt64(features.leaf1EDX)
      if topology.hyperThreadingFlag { d |= UInt64(CPUModel.leaf1EDXHTT) }
      let apicEnabled = system.localAPIC?.isGloballyEnabled ?? (apicBase & LocalAPIC.baseEnableBit != 0)
      if !apicEnabled { d &= ~UInt64(CPUModel.leaf1EDXAPIC) }
      if cr4 & X86.cr4OSXSAVE != 0 { c |= UInt64(CPUModel.leaf1ECXOSXSAVE) }
    case 7:
      if gpr[1] & 0xFFFF_FFFF == 0 {
        b = UInt64(features.leaf7EBX)
        c = UInt64(features.leaf7ECX)
        d = UInt64(features.leaf7EDX)
      }
    case 0xB:
      // Extended topology (within the highest basic leaf, 0xD; the model has no leaf 0x1F).
      let level = system.topology.extendedTopology(
        subleaf: UInt32(truncatingIfNeeded: gpr[1]), x2APICID: system.apicID)
      (a, b, c, d) = (UInt64(level.eax), UInt64(level.ebx), UInt64(level.ecx), UInt64(level.edx))
    case 0xD:
      // XSAVE components: x87, SSE, AVX; XSAVEOPT and XSAVEC (no XSAVES, no XGETBV ECX = 1),
      // as far as the model offers them; nothing without XSAVE.
      let components = UInt64(features.xsaveComponents)
      switch gpr[1] & 0xFFFF_FFFF {
      case 0 where components != 0:
        a = components
        b = XSaveModel.areaSize(xcr0)
        c = XSaveModel.areaSize(components)
      case 1 where components != 0:
        a = UInt64(features.xsaveInstructions)
        b = XSaveModel.areaSize(xcr0)
      case 2 where components & XSaveModel.avx != 0:
        a = XSaveModel.avxSize
        b = XSaveModel.avxOffset
      default: break
      }
    case 0x4000_0000:
      // Hypervisor leaf: "Hostvisor   ", timing leaf 0x4000_0010.
      let name = Array("Hostvisor   ".utf8)
      a = 0x4000_0010
      b = ascii(name, 0)
      c = ascii(name, 4)
      d = ascii(name, 8)
    case 0x4000_0010:
      a = system.tscKilohertz
      b = LocalAPIC.timerFrequency / 1000  // LAPIC timer input clock in kHz
    case 0x8000_0000:
      a = 0x8000_0021
      b = ascii(vendor, 0)
      d = ascii(vendor, 4)
      c = ascii(vendor, 8)
    case 0x8000_0001:
      a = UInt64(CPUModel.signature)
      c = UInt64(features.extendedECX)
      d = UInt64(features.extendedEDX)
    case 0x8000_0002...0x8000_0004:
      var brand = Array(CPUModel.brand.utf8)
      brand += [UInt8](repeating: 0, count: 48 - brand.count)
      let base = Int(leaf - 0x8000_0002) * 16
      a = ascii(brand, base)
      b = ascii(brand, base + 4)
      c = ascii(brand, base + 8)
      d = ascii(brand, base + 12)
    case 0x8000_0007:
      d = UInt64(CPUModel.powerManagementEDX)
    case 0x8000_0008:
      a = UInt64(CPUModel.linearAddressBits) << 8 | system.physicalAddressBits
      b = UInt64(CPUModel.extendedFeature8EBX)
      c = UInt64(system.topology.extendedSizeECX)
    case 0x8000_0021:
      a = UInt64(CPUModel.extendedFeature21EAX)
      c = UInt64(CPUModel.extendedFeature21ECX)
    default:
      break
    }
    gpr[0] = a
    gpr[3] = b
    gpr[1] = c
    gpr[2] = d
  }
}
