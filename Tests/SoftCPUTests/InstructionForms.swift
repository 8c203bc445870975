import SoftCPU

// Random instruction-sequence generator for the differential tests: a table of instruction
// forms (encoding shape, operand sizes, immediates, flag effects) and a builder that turns a
// chosen list of forms into machine code with random registers, memory operands that stay
// inside the data buffer, and forward-only branches.

/// Deterministic generator (SplitMix64), so a case is reproducible from its seed.
struct DiffRNG: RandomNumberGenerator {
  var state: UInt64
  init(seed: UInt64) { state = seed }
  mutating func next() -> UInt64 {
    state &+= 0x9E37_79B9_7F4A_7C15
    var z = state
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }
  mutating func chance(_ percent: Int) -> Bool { Int.random(in: 0..<100, using: &self) < percent }
  mutating func pick<T>(_ items: [T]) -> T { items[Int.random(in: 0..<items.count, using: &self)] }
  mutating func below(_ bound: Int) -> Int { Int.random(in: 0..<bound, using: &self) }

  /// Mixes seed parts into one case seed.
  static func mix(_ parts: UInt64...) -> UInt64 {
    var rng = DiffRNG(seed: 0x243F_6A88_85A3_08D3)
    for part in parts { rng.state ^= part &* 0x9E37_79B9_7F4A_7C15; _ = rng.next() }
    return rng.next()
  }
}

/// RFLAGS bits by name, for the flag-effect table.
enum F {
  static let c = RFlags.cf
  static let p = RFlags.pf
  static let a = RFlags.af
  static let z = RFlags.zf
  static let s = RFlags.sf
  static let o = RFlags.of
  static let all = RFlags.status
}

/// x87 condition-code bits in FSW.
enum CC {
  static let c0: UInt16 = 1 << 8
  static let c1: UInt16 = 1 << 9
  static let c2: UInt16 = 1 << 10
  static let c3: UInt16 = 1 << 14
  static let all: UInt16 = c0 | c1 | c2 | c3
  static let c023: UInt16 = c0 | c2 | c3
}

/// What an instruction does to the status flags and x87 condition codes, for the
/// undefined-flag tracking through a sequence.
struct FlagEffect {
  /// Flags read (a sequence never lets an instruction read an undefined flag).
  var reads: UInt64 = 0
  /// Flags left defined.
  var writes: UInt64 = 0
  /// Flags left undefined (SDM).
  var undefined: UInt64 = 0
  /// The writes may not happen (shift count 0): defined flags stay, undefined ones stay.
  var conditional = false
  /// x87 condition codes read / left defined / left undefined.
  var ccReads: UInt16 = 0
  var ccWrites: UInt16 = 0
  var ccUndefined: UInt16 = 0
}

/// Register file an operand names.
enum OperandSpace { case gpr, xmm }

/// Shape of an encoding.
enum Encoding {
  /// ModRM with `reg` an opcode extension (`ext`) or a register, `rm` register and/or memory.
  case modrm(ext: UInt8?, rm: RMKind)
  /// Register in the low three bits of the last opcode byte (REX.B extends it).
  case opcodeRegister
  /// No operands encoded (opcode bytes only).
  case plain
  /// x87 register form: ModRM = C0 | ext << 3 | i.
  case x87Register(ext: UInt8)
}

enum RMKind { case any, memory, register }

/// Immediate operand shape.
enum ImmediateKind: Equatable {
  case none
  /// Fixed number of bytes.
  case bytes(Int)
  /// 2 bytes for 16-bit operand size, else 4 (sign-extended to 64 for REX.W).
  case z
  /// Operand-size bytes, 8 for REX.W (MOV r64, imm64).
  case v
}

/// Extra constraints some forms need, applied through preludes the builder emits.
enum Special {
  case none
  /// DIV/IDIV: sometimes clear or sign-fill the high half of the dividend.
  case divide
  /// Bit offset in the `reg` operand must stay small (BT m, r).
  case smallBitOffset
  /// String instruction: RSI/RDI point into the buffer, RCX small.
  case string
  /// XLAT: RBX points into the buffer.
  case xlat
  /// MASKMOVDQU: RDI points into the buffer.
  case maskmov
  /// LEAVE/ENTER: RBP points into the stack area.
  case framePointer
  /// POPF: preceded by a push of a harmless random flags value.
  case popf
  /// LDMXCSR: the memory operand holds a valid MXCSR value (mostly).
  case ldmxcsr
  /// FLDCW: the memory operand holds a sensible control word.
  case fldcw
  /// Relative branch (Jcc/JMP/CALL/LOOP/JRCXZ): target is a later group.
  case branch(displacementBytes: Int)
  /// RET / RET imm16: preceded by a push of a later group's address.
  case ret
  /// SHLD/SHRD 16-bit: counts above 16 give undefined results.
  case shiftDouble16
  /// XSAVE family: EDX:EAX holds a requested-feature mask within x87/SSE/AVX (the host's XCR0
  /// has more components than the model's); for XRSTOR (`restore`) the area holds a mostly valid
  /// header in the standard or (`compacted`) compacted form and a mostly valid MXCSR.
  case xsaveArea(restore: Bool, compacted: Bool)
  /// XGETBV: ECX names no XCR of either CPU (2 and up), so both raise #GP(0).
  case invalidXCRIndex
}

/// The VEX prefix of a VEX-encoded form (C4 or C5, chosen at random where both can encode it).
struct VEXEncoding {
  /// Opcode map: 1 = 0F, 2 = 0F 38, 3 = 0F 3A.
  var map: UInt8
  /// Implied prefix: 0 none, 1 = 66, 2 = F3, 3 = F2.
  var pp: UInt8 = 0
  /// VEX.L values to choose from.
  var lengths: [UInt8] = [0]
  /// VEX.W; nil: set for 8-byte operand sizes.
  var w: Bool? = nil
  /// Register file VEX.vvvv names; nil: unused (1111b).
  var vvvv: OperandSpace? = nil
  /// VEX.vvvv is never 1111b although the form has no VEX.vvvv operand (the #UD cases).
  var vvvvNotUnused = false
}

/// One instruction form of the table.
struct InstructionForm {
  var name: String
  var group: String
  /// Mandatory / fixed legacy prefixes (66, F2, F3) emitted right before REX.
  var prefixes: [UInt8] = []
  var opcode: [UInt8]
  var encoding: Encoding
  /// Operand sizes to choose from: 1 (byte opcode), 2 (66h), 4, 8 (REX.W).
  var sizes: [UInt8] = [4]
  var immediate: ImmediateKind = .none
  var regSpace: OperandSpace = .gpr
  var rmSpace: OperandSpace = .gpr
  /// Memory operand size in bytes (0: the operand size).
  var memoryBytes: Int = 0
  /// Required alignment of the memory operand (misaligned in a few cases to test the #GP).
  var alignment: Int = 1
  var flags = FlagEffect()
  var allowLock = false
  var allowRep = false
  var special: Special = .none
  /// Forms whose register operand may be RSP (size 4/8 writes to RSP are avoided otherwise).
  var registerOperandsExcludeRSP = true
  /// Compare x87 registers with a relative tolerance.
  var x87Tolerance: Double? = nil
  /// Fill the memory operand with interesting values of this kind.
  var memoryFill: MemoryFill = .random
  /// The low nibble of the last opcode byte is a random condition code (Jcc, SETcc, CMOVcc).
  var conditionInOpcode = false
  /// VEX-encoded form: `opcode` is the byte after the VEX prefix, `prefixes` is empty.
  var vex: VEXEncoding? = nil
}

enum MemoryFill { case random, float32, float64, float80, int16, int32, int64 }

// MARK: - Values

enum DiffValues {
  static let specialIntegers: [UInt64] = [
    0, 1, 2, 3, 7, 8, 15, 16, 31, 32, 33, 63, 64, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x1_0000,
    0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000, 0x7FFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000,
    0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFE, 0xFFFF_FFFF_8000_0000, 0x8000_0000_0000_0001,
  ]

  static func integer(_ rng: inout DiffRNG) -> UInt64 {
    switch rng.below(10) {
    case 0...2: return rng.pick(specialIntegers)
    case 3: return UInt64(rng.below(70))
    case 4: return UInt64(bitPattern: -Int64(rng.below(70)))
    case 5: return rng.next() & 0xFFFF_FFFF
    case 6: return rng.next() & 0xFF
    default: return rng.next()
    }
  }

  static let specialFloat32: [UInt32] = [
    0x0000_0000, 0x8000_0000, 0x7F80_0000, 0xFF80_0000, 0x7FC0_0000, 0xFFC0_0000, 0x7F80_0001, 0x7FA0_0000,
    0xFFBF_FFFF, 0x0000_0001, 0x807F_FFFF, 0x0080_0000, 0x8080_0000, 0x7F7F_FFFF, 0xFF7F_FFFF, 0x3F80_0000,
    0xBF80_0000, 0x3F00_0000, 0x4040_0000, 0x7F00_0000, 0x4F00_0000, 0xCF00_0000, 0x5F00_0000, 0xDF00_0000,
    0x4EFF_FFFF, 0x3FC0_0000, 0x3400_0000, 0x0040_0000,
  ]
  static let specialFloat64: [UInt64] = [
    0, 0x8000_0000_0000_0000, 0x7FF0_0000_0000_0000, 0xFFF0_0000_0000_0000, 0x7FF8_0000_0000_0000,
    0xFFF8_0000_0000_0000, 0x7FF0_0000_0000_0001, 0x7FF4_0000_0000_0000, 0x0000_0000_0000_0001,
    0x800F_FFFF_FFFF_FFFF, 0x0010_0000_0000_0000, 0x7FEF_FFFF_FFFF_FFFF, 0x3FF0_0000_0000_0000,
    0xBFF0_0000_0000_0000, 0x3FE0_0000_0000_0000, 0x4008_0000_0000_0000, 0x7FE0_0000_0000_0000,
    0x41E0_0000_0000_0000, 0xC1E0_0000_0000_0000, 0x43E0_0000_0000_0000, 0xC3E0_0000_0000_0000,
    0x41DF_FFFF_FFC0_0000, 0x3FF8_0000_0000_0000, 0x3CB0_0000_0000_0000, 0x0008_0000_0000_0000,
    0x47EF_FFFF_E000_0000, 0x3690_0000_0000_0000,
  ]

  static func float32(_ rng: inout DiffRNG) -> UInt32 {
    switch rng.below(10) {
    case 0...3: return rng.pick(specialFloat32)
    case 4...7:
      // A "reasonable" number: exponent near 1.0, random mantissa and sign.
      let exponent = UInt32(127 - 20 + rng.below(41))
      return UInt32(rng.below(2)) << 31 | exponent << 23 | UInt32(truncatingIfNeeded: rng.next()) & 0x7F_FFFF
    case 8:
      return Float(rng.below(2001) - 1000).bitPattern
    default: return UInt32(truncatingIfNeeded: rng.next())
    }
  }

  static func float64(_ rng: inout DiffRNG) -> UInt64 {
    switch rng.below(10) {
    case 0...3: return rng.pick(specialFloat64)
    case 4...7:
      let exponent = UInt64(1023 - 30 + rng.below(61))
      return UInt64(rng.below(2)) << 63 | exponent << 52 | rng.next() & 0xF_FFFF_FFFF_FFFF
    case 8: return Double(rng.below(2001) - 1000).bitPattern
    default: return rng.next()
    }
  }

  static func xmm(_ rng: inout DiffRNG) -> SIMD2<UInt64> {
    switch rng.below(5) {
    case 0, 1:
      let lanes = (0..<4).map { _ in UInt64(float32(&rng)) }
      return SIMD2(lanes[0] | lanes[1] << 32, lanes[2] | lanes[3] << 32)
    case 2: return SIMD2(float64(&rng), float64(&rng))
    case 3:
      var value = SIMD2<UInt64>(0, 0)
      for lane in 0..<2 {
        for byte in 0..<8 {
          let b = UInt64(rng.pick([0x00, 0x01, 0x7F, 0x80, 0xFF, UInt8.random(in: 0...255, using: &rng)]))
          value[lane] |= b << UInt64(8 * byte)
        }
      }
      return value
    default: return SIMD2(rng.next(), rng.next())
    }
  }

  static func x87(_ rng: inout DiffRNG) -> X87Register {
    switch rng.below(20) {
    case 0...7: return X87Register(Float80(Double(bitPattern: float64(&rng))))
    case 8...9: return X87Register(Float80(Float(bitPattern: float32(&rng))))
    case 10...13:
      // Full-precision value near 1.
      let exponent = UInt16(0x3FFF - 40 + rng.below(81))
      return X87Register(significand: rng.next() | 1 << 63, signExponent: UInt16(rng.below(2)) << 15 | exponent)
    case 14:
      let specials: [(UInt64, UInt16)] = [
        (0, 0), (0, 0x8000), (1 << 63, 0x7FFF), (1 << 63, 0xFFFF), (0xC000_0000_0000_0000, 0x7FFF),
        (0xA000_0000_0000_0000, 0x7FFF), (0xC000_0000_0000_0000, 0xFFFF), (1, 0), (0x8000_0000_0000_0000, 0x0001),
        (0xFFFF_FFFF_FFFF_FFFF, 0x7FFE), (0x8000_0000_0000_0000, 0x3FFF), (0xC90F_DAA2_2168_C235, 0x4000),
      ]
      let pick = rng.pick(specials)
      return X87Register(significand: pick.0, signExponent: pick.1)
    case 15:
      // Unsupported encodings and pseudo-denormals (rare in practice, defined behavior).
      let specials: [(UInt64, UInt16)] = [
        (0x4000_0000_0000_0000, 0x3FFF), (0x8000_0000_0000_0001, 0x0000), (0, 0x7FFF), (0x4000_0000_0000_0000, 0x7FFF),
      ]
      let pick = rng.pick(specials)
      return X87Register(significand: pick.0, signExponent: pick.1)
    case 16: return X87Register(Float80(Int64(rng.below(20001) - 10000)))
    default:
      let exponent = UInt16(0x3FFF - 16000 + rng.below(32000))
      return X87Register(significand: rng.next() | 1 << 63, signExponent: UInt16(rng.below(2)) << 15 | exponent)
    }
  }
}
