/// One CPUID leaf/subleaf as KVM reports and accepts it (`kvm_cpuid_entry2`).
public struct CPUIDEntry: Sendable, Equatable, Hashable {
  /// The leaf (EAX input).
  public var function: UInt32
  /// The subleaf (ECX input); meaningful when `flags` has `significantIndex`.
  public var index: UInt32
  /// KVM_CPUID_FLAG_* bits.
  public var flags: UInt32
  public var eax: UInt32
  public var ebx: UInt32
  public var ecx: UInt32
  public var edx: UInt32

  /// KVM_CPUID_FLAG_SIGNIFCANT_INDEX: the subleaf selects this entry.
  public static let significantIndex: UInt32 = 1

  public init(
    function: UInt32, index: UInt32 = 0, flags: UInt32 = 0, eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0,
    edx: UInt32 = 0
  ) {
    self.function = function
    self.index = index
    self.flags = flags
    self.eax = eax
    self.ebx = ebx
    self.ecx = ecx
    self.edx = edx
  }
}

/// The one place that decides what CPUID a guest sees. Input: what the host's KVM supports
/// (KVM_GET_SUPPORTED_CPUID). Output: the table for one vCPU.
///
/// - Sets the hypervisor-present bit (leaf 1 ECX[31]) and the TSC-deadline timer (ECX[24]:
///   Hostvisor always uses KVM's in-kernel local APIC, which implements it).
/// - Hides features Hostvisor does not offer: MONITOR/MWAIT (leaf 1 ECX[3]) and nested
///   virtualization (VMX, leaf 1 ECX[5]; SVM, leaf 0x8000_0001 ECX[2]).
/// - Gives each vCPU its APIC ID (its index, as the in-kernel LAPIC uses) in leaf 1 EBX[31:24],
///   the x2APIC topology leaves 0xB/0x1F and AMD leaf 0x8000_001E, and describes one package of
///   `cpuCount` single-thread cores (leaf 1 EBX[23:16] + HTT, leaf 4 EAX[31:26], leaf 0x8000_0008 ECX).
public enum CPUIDPolicy {
  static let hypervisorBit: UInt32 = 1 << 31
  /// Leaf 1 ECX[24]: the TSC-deadline timer. KVM's in-kernel local APIC implements it
  /// (KVM_CAP_TSC_DEADLINE_TIMER) but KVM_GET_SUPPORTED_CPUID leaves the bit to userspace.
  static let tscDeadlineBit: UInt32 = 1 << 24
  static let monitorBit: UInt32 = 1 << 3
  static let vmxBit: UInt32 = 1 << 5
  static let svmBit: UInt32 = 1 << 2
  static let hyperThreadingBit: UInt32 = 1 << 28

  /// The CPUID table for the vCPU whose APIC ID is `apicID` in a machine of `cpuCount` vCPUs.
  public static func entries(apicID: Int, cpuCount: Int, supported: [CPUIDEntry]) -> [CPUIDEntry] {
    let apic = UInt32(truncatingIfNeeded: apicID) & 0xFF
    let count = UInt32(max(1, min(cpuCount, 255)))
    let coreShift = UInt32(bitsToNumber(Int(count)))
    var result: [CPUIDEntry] = []
    result.reserveCapacity(supported.count + 3)
    var hadTopologyLeaf: Set<UInt32> = []

    for var entry in supported {
      switch entry.function {
      case 0x1:
        entry.ecx |= hypervisorBit | tscDeadlineBit
        entry.ecx &= ~(monitorBit | vmxBit)
        entry.ebx = (entry.ebx & 0x0000_FFFF) | (apic << 24) | (count << 16)
        if count > 1 { entry.edx |= hyperThreadingBit } else { entry.edx &= ~hyperThreadingBit }
      case 0x4:
        // Cores per package minus one, for every cache level.
        entry.eax = (entry.eax & 0x03FF_FFFF) | ((min(count, 64) - 1) << 26)
      case 0xB, 0x1F:
        hadTopologyLeaf.insert(entry.function)
        continue  // rewritten below
      case 0x8000_0001:
        entry.ecx &= ~svmBit
      case 0x8000_0008:
        entry.ecx = (entry.ecx & ~0xF0FF) | (coreShift << 12) | (count - 1)
      case 0x8000_001E:
        entry.eax = apic
      default:
        break
      }
      result.append(entry)
    }

    for leaf in [UInt32(0xB), 0x1F] where hadTopologyLeaf.contains(leaf) {
      // Subleaf 0: SMT level, one thread per core. Subleaf 1: core level, `count` cores.
      // Subleaf 2: invalid level, ending the enumeration.
      result.append(
        CPUIDEntry(
          function: leaf, index: 0, flags: CPUIDEntry.significantIndex, eax: 0, ebx: 1, ecx: 0x100, edx: apic))
      result.append(
        CPUIDEntry(
          function: leaf, index: 1, flags: CPUIDEntry.significantIndex, eax: coreShift, ebx: count, ecx: 0x201,
          edx: apic))
      result.append(
        CPUIDEntry(function: leaf, index: 2, flags: CPUIDEntry.significantIndex, eax: 0, ebx: 0, ecx: 2, edx: apic))
    }
    return result
  }

  /// The number of APIC ID bits needed to number `count` items (0 for one item).
  static func bitsToNumber(_ count: Int) -> Int {
    var bits = 0
    while (1 << bits) < count { bits += 1 }
    return bits
  }
}
