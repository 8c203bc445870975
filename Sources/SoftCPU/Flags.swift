// RFLAGS with lazy status flags.
//
// Flag-setting instructions record the operation (`flagOp`), operand size and operands;
// CF/PF/AF/ZF/SF/OF are computed only when read. Jcc/SETcc/CMOVcc evaluate their one
// condition straight from the record (after CMP, JB is `dst < src`). `storedFlags` holds the
// other RFLAGS bits, and the status bits too when `flagOp == .none`.
//
// Undefined flags follow what this core computes (documented per operation; the differential
// harness masks the ones that differ from AMD Zen hardware):
// - AND/OR/XOR/TEST: CF = OF = AF = 0.
// - Shifts (count != 0): SHL OF = MSB(result) ^ CF, SHR OF = MSB(original), SAR OF = 0, for any
//   count; AF = 0. Counts larger than the operand width (8/16-bit) shift in zeros (CF = 0).
// - MUL/IMUL: SF/ZF/PF from the low half of the result, AF = 0.
// - BSF/BSR/TZCNT/LZCNT/POPCNT, BT*, DIV, shifts by 0: see their handlers.

/// RFLAGS bit masks.
public enum RFlags {
  public static let cf: UInt64 = 1 << 0
  public static let pf: UInt64 = 1 << 2
  public static let af: UInt64 = 1 << 4
  public static let zf: UInt64 = 1 << 6
  public static let sf: UInt64 = 1 << 7
  public static let tf: UInt64 = 1 << 8
  public static let `if`: UInt64 = 1 << 9
  public static let df: UInt64 = 1 << 10
  public static let of: UInt64 = 1 << 11
  public static let iopl: UInt64 = 3 << 12
  public static let nt: UInt64 = 1 << 14
  public static let rf: UInt64 = 1 << 16
  public static let vm: UInt64 = 1 << 17
  public static let ac: UInt64 = 1 << 18
  public static let vif: UInt64 = 1 << 19
  public static let vip: UInt64 = 1 << 20
  public static let id: UInt64 = 1 << 21
  /// The six arithmetic status flags.
  public static let status: UInt64 = cf | pf | af | zf | sf | of
}

/// The operation whose operands the lazy flags recorded.
enum FlagOp: UInt8 {
  /// Status flags are materialized in `storedFlags`.
  case none
  case add, adc, sub, sbb, logic, inc, dec, shl, shr, sar
}

/// Mask of an operand of `size` bytes.
@_transparent
func sizeMask(_ size: UInt8) -> UInt64 {
  size == 8 ? ~0 : (UInt64(1) << (UInt64(size) &* 8)) &- 1
}

/// Sign-extends the low `size` bytes of `value`.
@_transparent
func signExtend(_ value: UInt64, size: UInt8) -> Int64 {
  let shift = 64 &- UInt64(size) &* 8
  return Int64(bitPattern: value << shift) >> shift
}

/// Even parity of the low byte (PF).
@_transparent
func parityEven(_ value: UInt64) -> Bool {
  (UInt8(truncatingIfNeeded: value).nonzeroBitCount & 1) == 0
}

extension CPU {
  /// Full RFLAGS with lazily computed status flags materialized. Setting it replaces all flags.
  public var rflags: UInt64 {
    get { (storedFlags & ~RFlags.status) | statusFlags() | 0x2 }
    set {
      storedFlags = newValue | 0x2
      flagOp = .none
    }
  }

  /// Replaces CF, PF, AF, ZF, SF and OF with those in `bits` (RFLAGS layout); other flags unchanged.
  @inline(__always)
  public func setStatusFlags(_ bits: UInt64) {
    storedFlags = (storedFlags & ~RFlags.status) | (bits & RFlags.status)
    flagOp = .none
  }

  /// Records a flag-setting operation (operands and result already truncated to `size`).
  @_transparent
  func recordFlags(_ op: FlagOp, size: UInt8, dst: UInt64, src: UInt64, result: UInt64) {
    flagOp = op
    flagSize = size
    flagDst = dst
    flagSrc = src
    flagResult = result
  }

  /// Materializes the status flags into `storedFlags` (before partial flag updates).
  @_transparent
  func materializeFlags() {
    if flagOp != .none {
      storedFlags = (storedFlags & ~RFlags.status) | statusFlags()
      flagOp = .none
    }
  }

  /// The six status flags in RFLAGS layout.
  func statusFlags() -> UInt64 {
    if flagOp == .none { return storedFlags & RFlags.status }
    var flags: UInt64 = 0
    if carryFlag { flags |= RFlags.cf }
    if parityEven(flagResult) { flags |= RFlags.pf }
    if auxiliaryFlag { flags |= RFlags.af }
    if flagResult == 0 { flags |= RFlags.zf }
    if signFlag { flags |= RFlags.sf }
    if overflowFlag { flags |= RFlags.of }
    return flags
  }

  @_transparent
  var signShift: UInt64 { UInt64(flagSize) &* 8 &- 1 }

  /// CF.
  var carryFlag: Bool {
    @_transparent get {
      switch flagOp {
      case .none: return storedFlags & RFlags.cf != 0
      case .add: return flagResult < flagDst
      case .sub: return flagDst < flagSrc
      case .logic: return false
      case .inc, .dec: return flagCarry != 0
      case .adc: return flagCarry != 0 ? flagResult <= flagDst : flagResult < flagDst
      case .sbb: return flagDst < flagSrc || (flagCarry != 0 && flagDst == flagSrc)
      case .shl:
        let bits = UInt64(flagSize) &* 8
        return flagSrc <= bits && (flagDst >> (bits &- flagSrc)) & 1 != 0
      case .shr:
        return flagSrc <= 64 && (flagDst >> (flagSrc &- 1)) & 1 != 0
      case .sar:
        let shift = min(flagSrc &- 1, 63)
        return (signExtend(flagDst, size: flagSize) >> Int64(shift)) & 1 != 0
      }
    }
  }

  /// ZF.
  var zeroFlag: Bool {
    @_transparent get { flagOp == .none ? storedFlags & RFlags.zf != 0 : flagResult == 0 }
  }

  /// SF.
  var signFlag: Bool {
    @_transparent get {
      flagOp == .none ? storedFlags & RFlags.sf != 0 : (flagResult >> signShift) & 1 != 0
    }
  }

  /// PF.
  var parityFlag: Bool {
    @_transparent get { flagOp == .none ? storedFlags & RFlags.pf != 0 : parityEven(flagResult) }
  }

  /// AF.
  var auxiliaryFlag: Bool {
    switch flagOp {
    case .none: return storedFlags & RFlags.af != 0
    case .add, .adc, .sub, .sbb, .inc, .dec: return (flagDst ^ flagSrc ^ flagResult) & 0x10 != 0
    case .logic, .shl, .shr, .sar: return false
    }
  }

  /// OF.
  var overflowFlag: Bool {
    switch flagOp {
    case .none: return storedFlags & RFlags.of != 0
    case .add, .adc, .inc: return ((flagDst ^ flagResult) & (flagSrc ^ flagResult)) >> signShift & 1 != 0
    case .sub, .sbb, .dec: return ((flagDst ^ flagSrc) & (flagDst ^ flagResult)) >> signShift & 1 != 0
    case .logic, .sar: return false
    // Defined for a count of 1 (MSB of the result XOR CF, which is the same); for larger counts
    // undefined, and computed as Intel processors do: from the first one-bit step (the two
    // top bits of the original operand).
    case .shl: return ((flagDst >> signShift) ^ (flagDst >> (signShift &- 1))) & 1 != 0
    case .shr: return (flagDst >> signShift) & 1 != 0
    }
  }

  /// Evaluates condition code `cc` (0-15: O, NO, B, AE, E, NE, BE, A, S, NS, P, NP, L, GE, LE, G).
  @_transparent
  func condition(_ cc: UInt8) -> Bool {
    let holds: Bool
    switch cc >> 1 {
    case 0: holds = overflowFlag
    case 1: holds = carryFlag
    case 2: holds = zeroFlag
    case 3:
      if flagOp == .sub {
        holds = flagDst <= flagSrc
      } else {
        holds = carryFlag || zeroFlag
      }
    case 4: holds = signFlag
    case 5: holds = parityFlag
    case 6:
      if flagOp == .sub {
        holds = signExtend(flagDst, size: flagSize) < signExtend(flagSrc, size: flagSize)
      } else if flagOp == .logic {
        holds = signFlag
      } else {
        holds = signFlag != overflowFlag
      }
    default:
      if flagOp == .sub {
        holds = signExtend(flagDst, size: flagSize) <= signExtend(flagSrc, size: flagSize)
      } else if flagOp == .logic {
        holds = zeroFlag || signFlag
      } else {
        holds = zeroFlag || signFlag != overflowFlag
      }
    }
    return holds != (cc & 1 != 0)
  }
}
