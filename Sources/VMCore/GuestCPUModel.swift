/// A CPUID register that carries feature bits, named by its leaf, subleaf and register.
public enum CPUIDFeatureRegister: CaseIterable, Sendable, Hashable {
  /// Leaf 1 EDX.
  case leaf1EDX
  /// Leaf 1 ECX.
  case leaf1ECX
  /// Leaf 7 subleaf 0 EBX.
  case leaf7EBX
  /// Leaf 7 subleaf 0 ECX.
  case leaf7ECX
  /// Leaf 7 subleaf 0 EDX.
  case leaf7EDX
  /// Leaf 0DH subleaf 0 EAX: the XSAVE state components XCR0 may enable.
  case xsaveComponents
  /// Leaf 0DH subleaf 1 EAX: XSAVEOPT, XSAVEC, XGETBV with ECX = 1, XSAVES.
  case xsaveInstructions
  /// Leaf 8000_0001H EDX.
  case extendedEDX
  /// Leaf 8000_0001H ECX.
  case extendedECX

  /// The CPUID leaf (EAX input).
  public var leaf: UInt32 {
    switch self {
    case .leaf1EDX, .leaf1ECX: 1
    case .leaf7EBX, .leaf7ECX, .leaf7EDX: 7
    case .xsaveComponents, .xsaveInstructions: 0xD
    case .extendedEDX, .extendedECX: 0x8000_0001
    }
  }

  /// The subleaf (ECX input).
  public var subleaf: UInt32 { self == .xsaveInstructions ? 1 : 0 }

  /// The names of the bits Hostvisor's models use, for messages (Intel SDM Vol. 2A, CPUID;
  /// AMD APM Vol. 3, appendix E).
  var bitNames: [Int: String] {
    switch self {
    case .leaf1EDX:
      [
        0: "FPU", 3: "PSE", 4: "TSC", 5: "MSR", 6: "PAE", 8: "CX8", 9: "APIC", 11: "SEP", 12: "MTRR", 13: "PGE",
        15: "CMOV", 16: "PAT", 17: "PSE-36", 19: "CLFSH", 23: "MMX", 24: "FXSR", 25: "SSE", 26: "SSE2",
      ]
    case .leaf1ECX:
      [
        0: "SSE3", 1: "PCLMULQDQ", 9: "SSSE3", 12: "FMA", 13: "CX16", 19: "SSE4.1", 20: "SSE4.2", 21: "x2APIC",
        22: "MOVBE", 23: "POPCNT", 24: "TSC-deadline", 25: "AES", 26: "XSAVE", 28: "AVX", 29: "F16C",
        30: "RDRAND", 31: "hypervisor",
      ]
    case .leaf7EBX:
      [3: "BMI1", 5: "AVX2", 8: "BMI2", 9: "ERMS", 23: "CLFLUSHOPT", 24: "CLWB"]
    case .leaf7ECX: [22: "RDPID"]
    case .leaf7EDX: [4: "FSRM"]
    case .xsaveComponents: [0: "x87 state", 1: "SSE state", 2: "AVX state"]
    case .xsaveInstructions: [0: "XSAVEOPT", 1: "XSAVEC", 2: "XGETBV ECX=1", 3: "XSAVES"]
    case .extendedEDX: [11: "SYSCALL", 20: "NX", 26: "1 GiB pages", 27: "RDTSCP", 29: "LM"]
    case .extendedECX: [0: "LAHF/SAHF", 5: "ABM (LZCNT)"]
    }
  }

  /// The name of feature bit `bit` of this register.
  public func name(ofBit bit: Int) -> String {
    if let name = bitNames[bit] { return name }
    let register: String
    switch self {
    case .leaf1EDX, .leaf7EDX, .extendedEDX: register = "EDX"
    case .leaf1ECX, .leaf7ECX, .extendedECX: register = "ECX"
    case .leaf7EBX: register = "EBX"
    case .xsaveComponents, .xsaveInstructions: register = "EAX"
    }
    let leafText = leaf >= 0x8000_0000 ? "8000_\(String(leaf & 0xFFFF, radix: 16, uppercase: true))" : "\(leaf)"
    return "CPUID.\(leafText)\(subleaf != 0 ? ".\(subleaf)" : ""):\(register)[\(bit)]"
  }
}

/// The feature bits a CPU model presents through CPUID, register by register. Bits that follow
/// machine state rather than the model (leaf 1 ECX OSXSAVE, which mirrors CR4.OSXSAVE; leaf 1
/// EDX HTT, which follows the vCPU count; leaf 1 EDX APIC while IA32_APIC_BASE disables the
/// local APIC) are not part of it.
public struct CPUIDFeatures: Sendable, Hashable {
  public var leaf1EDX: UInt32
  public var leaf1ECX: UInt32
  public var leaf7EBX: UInt32
  public var leaf7ECX: UInt32
  public var leaf7EDX: UInt32
  /// XCR0 bits (state components) leaf 0DH offers; 0 without XSAVE.
  public var xsaveComponents: UInt32
  /// Leaf 0DH subleaf 1 EAX.
  public var xsaveInstructions: UInt32
  public var extendedEDX: UInt32
  public var extendedECX: UInt32

  public init(
    leaf1EDX: UInt32, leaf1ECX: UInt32, leaf7EBX: UInt32 = 0, leaf7ECX: UInt32 = 0, leaf7EDX: UInt32 = 0,
    xsaveComponents: UInt32 = 0, xsaveInstructions: UInt32 = 0, extendedEDX: UInt32, extendedECX: UInt32
  ) {
    self.leaf1EDX = leaf1EDX
    self.leaf1ECX = leaf1ECX
    self.leaf7EBX = leaf7EBX
    self.leaf7ECX = leaf7ECX
    self.leaf7EDX = leaf7EDX
    self.xsaveComponents = xsaveComponents
    self.xsaveInstructions = xsaveInstructions
    self.extendedEDX = extendedEDX
    self.extendedECX = extendedECX
  }

  /// No features at all.
  public static let none = CPUIDFeatures(leaf1EDX: 0, leaf1ECX: 0, extendedEDX: 0, extendedECX: 0)

  /// The bits of one register.
  public subscript(register: CPUIDFeatureRegister) -> UInt32 {
    get {
      switch register {
      case .leaf1EDX: leaf1EDX
      case .leaf1ECX: leaf1ECX
      case .leaf7EBX: leaf7EBX
      case .leaf7ECX: leaf7ECX
      case .leaf7EDX: leaf7EDX
      case .xsaveComponents: xsaveComponents
      case .xsaveInstructions: xsaveInstructions
      case .extendedEDX: extendedEDX
      case .extendedECX: extendedECX
      }
    }
    set {
      switch register {
      case .leaf1EDX: leaf1EDX = newValue
      case .leaf1ECX: leaf1ECX = newValue
      case .leaf7EBX: leaf7EBX = newValue
      case .leaf7ECX: leaf7ECX = newValue
      case .leaf7EDX: leaf7EDX = newValue
      case .xsaveComponents: xsaveComponents = newValue
      case .xsaveInstructions: xsaveInstructions = newValue
      case .extendedEDX: extendedEDX = newValue
      case .extendedECX: extendedECX = newValue
      }
    }
  }

  /// The features present in both.
  public func intersection(_ other: CPUIDFeatures) -> CPUIDFeatures {
    var result = self
    for register in CPUIDFeatureRegister.allCases { result[register] &= other[register] }
    return result
  }

  /// The names of this set's features that `available` lacks, in register and bit order.
  public func missing(from available: CPUIDFeatures) -> [String] {
    var names: [String] = []
    for register in CPUIDFeatureRegister.allCases {
      let absent = self[register] & ~available[register]
      for bit in 0..<32 where absent & (1 << UInt32(bit)) != 0 { names.append(register.name(ofBit: bit)) }
    }
    return names
  }

  /// The names of every feature in this set.
  public var names: [String] { missing(from: .none) }
}

/// A named CPU model: what CPUID tells a guest about the CPU's features, the same on both
/// accelerators (docs/cpu-model.md). A machine's model is chosen when it starts
/// (`--cpu-model`), recorded in its state file, and must be presentable by the accelerator a
/// snapshot or migration moves it to.
public struct GuestCPUModel: Sendable, Hashable {
  /// The name `--cpu-model` takes and the state file records.
  public let name: String
  /// One line for `--help` and the docs.
  public let summary: String
  /// The features presented; nil for `host`, KVM's own CPUID passed through (only KVM can
  /// present it).
  public let features: CPUIDFeatures?

  public init(name: String, summary: String, features: CPUIDFeatures?) {
    self.name = name
    self.summary = summary
    self.features = features
  }

  /// KVM's supported CPUID passed through (minus what Hostvisor never offers): the default
  /// on KVM. The software CPU cannot present it.
  public static let host = GuestCPUModel(
    name: "host", summary: "KVM's CPUID passed through (KVM only; not movable to the software CPU)",
    features: nil)

  /// Leaf 1 EDX of the migratable models: FPU PSE TSC MSR PAE CX8 APIC SEP MTRR PGE CMOV PAT
  /// PSE-36 CLFSH MMX FXSR SSE SSE2 (the x86-64 baseline and the system features every x86-64
  /// has).
  static let baselineLeaf1EDX: UInt32 =
    1 << 0 | 1 << 3 | 1 << 4 | 1 << 5 | 1 << 6 | 1 << 8 | 1 << 9 | 1 << 11 | 1 << 12 | 1 << 13 | 1 << 15
    | 1 << 16 | 1 << 17 | 1 << 19 | 1 << 23 | 1 << 24 | 1 << 25 | 1 << 26
  /// Leaf 1 ECX of x86-64-v2: SSE3(0) SSSE3(9) CX16(13) SSE4.1(19) SSE4.2(20) POPCNT(23), with
  /// the TSC-deadline timer(24) and the hypervisor bit(31) every Hostvisor machine has.
  static let v2Leaf1ECX: UInt32 = 1 << 0 | 1 << 9 | 1 << 13 | 1 << 19 | 1 << 20 | 1 << 23 | 1 << 24 | 1 << 31
  /// Leaf 8000_0001H EDX of the migratable models: SYSCALL(11) NX(20) LM(29).
  static let baselineExtendedEDX: UInt32 = 1 << 11 | 1 << 20 | 1 << 29

  /// The x86-64-v2 ISA level (System V psABI): CMPXCHG16B, LAHF/SAHF, POPCNT, SSE3, SSSE3,
  /// SSE4.1, SSE4.2 on top of the x86-64 baseline; no XSAVE, no leaf 7 features.
  public static let x86_64_v2 = GuestCPUModel(
    name: "x86-64-v2", summary: "the x86-64-v2 ISA level (SSE4.2, POPCNT, CX16): movable between accelerators",
    features: CPUIDFeatures(
      leaf1EDX: baselineLeaf1EDX, leaf1ECX: v2Leaf1ECX, extendedEDX: baselineExtendedEDX, extendedECX: 1 << 0))

  /// The x86-64-v3 ISA level (System V psABI): x86-64-v2 with AVX, AVX2, BMI1, BMI2, F16C, FMA,
  /// LZCNT, MOVBE and XSAVE (XSAVEOPT; x87, SSE and AVX state).
  public static let x86_64_v3 = GuestCPUModel(
    name: "x86-64-v3", summary: "the x86-64-v3 ISA level (AVX2, FMA, BMI2): movable between accelerators",
    features: CPUIDFeatures(
      leaf1EDX: baselineLeaf1EDX,
      leaf1ECX: v2Leaf1ECX | 1 << 12 | 1 << 22 | 1 << 26 | 1 << 28 | 1 << 29,
      leaf7EBX: 1 << 3 | 1 << 5 | 1 << 8,
      xsaveComponents: 0x7, xsaveInstructions: 1 << 0,
      extendedEDX: baselineExtendedEDX, extendedECX: 1 << 0 | 1 << 5))
}
