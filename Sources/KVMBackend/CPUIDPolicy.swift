import VMCore

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
///   `cpuCount` single-thread cores (leaf 1 EBX[23:16] + HTT, leaf 4 EAX[31:26], leaf 0x8000_0008
///   ECX) as `CPUTopology` gives it (the software CPU's CPUID reads the same).
/// - With a named CPU model (`GuestCPUModel`), masks the feature registers to the model's bits
///   (`model(_:supported:)` first refuses a model whose features KVM lacks), hides leaf 7's
///   other subleaves and the XSAVE state components beyond the model's.
public enum CPUIDPolicy {
  static let hypervisorBit: UInt32 = 1 << 31
  /// Leaf 1 ECX[24]: the TSC-deadline timer. KVM's in-kernel local APIC implements it
  /// (KVM_CAP_TSC_DEADLINE_TIMER) but KVM_GET_SUPPORTED_CPUID leaves the bit to userspace.
  static let tscDeadlineBit: UInt32 = 1 << 24
  static let monitorBit: UInt32 = 1 << 3
  static let vmxBit: UInt32 = 1 << 5
  static let svmBit: UInt32 = 1 << 2
  static let hyperThreadingBit: UInt32 = 1 << 28

  /// Leaf 1 ECX[27] OSXSAVE (KVM mirrors CR4.OSXSAVE) and EDX[28] HTT (the vCPU count): bits
  /// that follow the machine, not the model.
  static let dynamicLeaf1ECX: UInt32 = 1 << 27
  static let dynamicLeaf1EDX: UInt32 = 1 << 28

  /// The features of `supported` (KVM_GET_SUPPORTED_CPUID) as this policy presents them: with
  /// the hypervisor and TSC-deadline bits, without MONITOR, VMX and SVM.
  public static func availableFeatures(supported: [CPUIDEntry]) -> CPUIDFeatures {
    var features = CPUIDFeatures.none
    for register in CPUIDFeatureRegister.allCases {
      guard
        let entry = supported.first(where: {
          $0.function == register.leaf && ($0.index == register.subleaf || $0.flags & CPUIDEntry.significantIndex == 0)
        })
      else { continue }
      switch register {
      case .leaf1EDX, .leaf7EDX, .extendedEDX: features[register] = entry.edx
      case .leaf1ECX, .leaf7ECX, .extendedECX: features[register] = entry.ecx
      case .leaf7EBX: features[register] = entry.ebx
      case .xsaveComponents, .xsaveInstructions: features[register] = entry.eax
      }
    }
    features.leaf1ECX = (features.leaf1ECX | hypervisorBit | tscDeadlineBit) & ~(monitorBit | vmxBit)
    features.extendedECX &= ~svmBit
    return features
  }

  /// Checks that KVM can present `model`; throws naming the features it lacks.
  public static func check(_ model: GuestCPUModel, supported: [CPUIDEntry]) throws(KVMError) {
    guard let features = model.features else { return }
    let missing = features.missing(from: availableFeatures(supported: supported))
    guard missing.isEmpty else { throw .cpuModelUnavailable(model: model.name, missing: missing) }
  }

  /// The CPUID table for the vCPU whose APIC ID is `apicID` in a machine of `cpuCount` vCPUs,
  /// presenting `model`'s features (all of KVM's for `host`). Check the model with
  /// `check(_:supported:)` first.
  public static func entries(
    apicID: Int, cpuCount: Int, supported: [CPUIDEntry], model: GuestCPUModel = .host
  ) -> [CPUIDEntry] {
    let features = model.features
    let xsaveComponents = features.map { $0.xsaveComponents } ?? ~0
    let apic = UInt32(truncatingIfNeeded: apicID) & 0xFF
    let topology = CPUTopology(cpuCount: cpuCount)
    let count = topology.logicalProcessorsPerPackage
    var result: [CPUIDEntry] = []
    result.reserveCapacity(supported.count + 3)
    var hadTopologyLeaf: Set<UInt32> = []

    for var entry in supported {
      if let features {
        // The model's feature bits only; leaf 7's other subleaves and XSAVE components beyond
        // the model's are dropped.
        switch entry.function {
        case 0x1:
          entry.ecx &= features.leaf1ECX | dynamicLeaf1ECX
          entry.edx &= features.leaf1EDX | dynamicLeaf1EDX
        case 0x7:
          guard entry.index == 0 else { continue }
          entry.eax = 0
          entry.ebx &= features.leaf7EBX
          entry.ecx &= features.leaf7ECX
          entry.edx &= features.leaf7EDX
        case 0xD:
          switch entry.index {
          case 0:
            guard xsaveComponents != 0 else { continue }
            entry.eax &= xsaveComponents
            entry.edx = 0
            entry.ecx = xsaveAreaSize(components: xsaveComponents, table: supported)
          case 1:
            guard xsaveComponents != 0 else { continue }
            entry.eax &= features.xsaveInstructions
            entry.ecx = 0
            entry.edx = 0
          default:
            guard entry.index < 32, xsaveComponents & (1 << entry.index) != 0 else { continue }
          }
        case 0x8000_0001:
          entry.ecx &= features.extendedECX
          entry.edx &= features.extendedEDX
        default:
          break
        }
      }
      switch entry.function {
      case 0x1:
        entry.ecx |= hypervisorBit | tscDeadlineBit
        entry.ecx &= ~(monitorBit | vmxBit)
        entry.ebx = (entry.ebx & 0x0000_FFFF) | (apic << 24) | (count << 16)
        if topology.hyperThreadingFlag { entry.edx |= hyperThreadingBit } else { entry.edx &= ~hyperThreadingBit }
      case 0x4:
        // Cores per package minus one, for every cache level.
        entry.eax = (entry.eax & 0x03FF_FFFF) | ((min(count, 64) - 1) << 26)
      case 0xB, 0x1F:
        hadTopologyLeaf.insert(entry.function)
        continue  // rewritten below
      case 0x8000_0001:
        entry.ecx &= ~svmBit
      case 0x8000_0008:
        entry.ecx = (entry.ecx & ~0xF0FF) | topology.extendedSizeECX
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
      for subleaf: UInt32 in 0...2 {
        let level = topology.extendedTopology(subleaf: subleaf, x2APICID: apic)
        result.append(
          CPUIDEntry(
            function: leaf, index: subleaf, flags: CPUIDEntry.significantIndex, eax: level.eax, ebx: level.ebx,
            ecx: level.ecx, edx: level.edx))
      }
    }
    return result
  }

  /// The size of a standard-format XSAVE area holding `components` (legacy region and header,
  /// then each user component at the offset leaf 0DH gives it).
  static func xsaveAreaSize(components: UInt32, table: [CPUIDEntry]) -> UInt32 {
    var size: UInt32 = 576
    for entry in table where entry.function == 0xD && entry.index >= 2 && entry.index < 32 {
      guard components & (1 << entry.index) != 0 else { continue }
      size = max(size, entry.ebx + entry.eax)
    }
    return size
  }
}
