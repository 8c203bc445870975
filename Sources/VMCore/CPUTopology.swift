/// The processor topology a machine presents to its guest, the same on both accelerators and
/// consistent with the ACPI MADT (APIC IDs and processor UIDs 0..<cpuCount): one package of
/// `cpuCount` cores with one thread each; vCPU n has (x2)APIC ID n. CPUID describes it in
/// leaf 1 (EBX[23:16] and EDX.HTT), the extended topology leaves 0BH/1FH and AMD's leaf
/// 8000_0008 ECX; `CPUIDPolicy` (KVM) and the software CPU's CPUID both read it from here.
public struct CPUTopology: Sendable, Equatable {
  /// The number of vCPUs (1...255: the xAPIC IDs the MADT can list).
  public let cpuCount: Int

  /// Leaf 0BH/1FH level types (ECX[15:8]).
  public enum LevelType: UInt32, Sendable {
    case invalid = 0
    case smt = 1
    case core = 2
  }

  /// One package of `cpuCount` single-thread cores (clamped to 1...255).
  public init(cpuCount: Int) {
    self.cpuCount = max(1, min(cpuCount, 255))
  }

  /// The APIC ID bits that number the cores within the package: the smallest n with
  /// 2^n >= cpuCount (0 for one vCPU).
  public var coreIDBits: UInt32 {
    var bits: UInt32 = 0
    while (1 << bits) < cpuCount { bits += 1 }
    return bits
  }

  /// Leaf 1 EBX[23:16]: addressable logical processors in the package.
  public var logicalProcessorsPerPackage: UInt32 { UInt32(cpuCount) }

  /// Leaf 1 EDX[28] (HTT): set when the package has more than one logical processor, which
  /// makes EBX[23:16] valid.
  public var hyperThreadingFlag: Bool { cpuCount > 1 }

  /// AMD leaf 8000_0008 ECX: ApicIdSize (bits 15:12, the core-ID bits of the APIC ID) and NC
  /// (bits 7:0, the number of cores minus one).
  public var extendedSizeECX: UInt32 { coreIDBits << 12 | UInt32(cpuCount - 1) }

  /// Leaf 0BH (and 1FH) subleaf `subleaf` for the vCPU whose x2APIC ID is `x2APICID`:
  /// subleaf 0 is the SMT level (one thread per core: shift 0, one processor), subleaf 1 the
  /// core level (shift `coreIDBits`, `cpuCount` processors), every later subleaf the invalid
  /// level that ends the enumeration (EAX = EBX = 0, ECX = the subleaf number). EDX is the
  /// x2APIC ID at every subleaf.
  public func extendedTopology(subleaf: UInt32, x2APICID: UInt32) -> (
    eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32
  ) {
    let level = subleaf & 0xFF
    switch subleaf {
    case 0: return (0, 1, LevelType.smt.rawValue << 8 | level, x2APICID)
    case 1: return (coreIDBits, UInt32(cpuCount), LevelType.core.rawValue << 8 | level, x2APICID)
    default: return (0, 0, level, x2APICID)
    }
  }
}
