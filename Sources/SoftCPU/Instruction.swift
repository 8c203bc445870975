/// One decoded instruction, as stored in a decoded block. Plain data, no references:
/// decoding happens once per block, execution reads these fields.
///
/// Register operands are numbered 0-15 (RAX..R15). For byte-sized operands without a REX
/// prefix, numbers 4-7 name AH, CH, DH, BH; the decoder encodes those as 16-19
/// (`Instruction.highByteBase + n`) so handlers need not look at prefixes.
public struct Instruction: Sendable {
  /// What to execute. The core's own handlers switch on this; `.sse` and `.x87` go to the
  /// SIMD/FPU units, which switch on `opcode`.
  public var op: Op = .invalid
  /// Instruction length in bytes (1-15).
  public var length: UInt8 = 0
  /// Operand size in bytes: 1, 2, 4 or 8 (after 66h / REX.W / default-size rules).
  public var operandSize: UInt8 = 4
  /// Address size in bytes: 2, 4 or 8.
  public var addressSize: UInt8 = 8
  /// Prefix bits, see `Prefix`.
  public var prefixes: UInt8 = 0
  /// SIMD mandatory prefix: 0 none, 1 = 66h, 2 = F3h, 3 = F2h.
  public var mandatoryPrefix: UInt8 = 0
  /// Segment of the memory operand (after overrides and the SS default for RSP/RBP bases), see `SegmentIndex`.
  public var segment: UInt8 = 3
  /// True when the ModRM r/m operand is memory.
  public var hasMemoryOperand: Bool = false
  /// The raw ModRM byte (for x87 and group opcodes).
  public var modrm: UInt8 = 0
  /// ModRM.reg extended by REX.R (register operand or opcode extension).
  public var reg: UInt8 = 0
  /// ModRM.rm extended by REX.B when the r/m operand is a register.
  public var rm: UInt8 = 0
  /// Memory operand base register, `Instruction.noRegister`, or `Instruction.ripRelative`.
  public var base: UInt8 = Instruction.noRegister
  /// Memory operand index register or `Instruction.noRegister`.
  public var index: UInt8 = Instruction.noRegister
  /// Scale as a shift count (0-3).
  public var scaleShift: UInt8 = 0
  /// REX.W was set (for VEX-encoded instructions: VEX.W, in every mode).
  public var rexW: Bool = false
  /// VEX-encoded instructions (`.vex`): the register VEX.vvvv names (0-15, already inverted;
  /// 0-7 outside 64-bit mode). 0 for other instructions.
  public var vexRegister: UInt8 = 0
  /// VEX-encoded instructions: VEX.L (false: 128-bit or scalar, true: 256-bit).
  public var vexL: Bool = false
  /// Opcode: for `.sse` and `.vex` `map << 8 | byte` with map 1 = 0F, 2 = 0F38, 3 = 0F3A;
  /// for `.x87` the escape byte D8-DF; otherwise the primary opcode byte (free for the core's use).
  public var opcode: UInt16 = 0
  /// Specialized form chosen when the block is built (FastPath.swift); `.none` runs `execute`.
  var fast: FastOp = .none
  /// Destination and source registers of the fast form.
  var fastDst: UInt8 = 0
  var fastSrc: UInt8 = 0
  /// Memory displacement (sign-extended). For RIP-relative operands it is relative to the next instruction.
  public var displacement: Int64 = 0
  /// First immediate, zero-extended from its encoded size (handlers sign-extend when the form says so).
  public var immediate: UInt64 = 0
  /// Second immediate (ENTER's nesting level, far pointer selector).
  public var immediate2: UInt16 = 0

  public init() {}

  /// No register in `base`/`index`.
  public static let noRegister: UInt8 = 0xFF
  /// `base` value for RIP-relative addressing.
  public static let ripRelative: UInt8 = 0xFE
  /// First register number used for AH/CH/DH/BH.
  public static let highByteBase: UInt8 = 16

  /// Prefix bits stored in `prefixes`.
  public enum Prefix {
    public static let lock: UInt8 = 1 << 0
    public static let rep: UInt8 = 1 << 1  // F3 (REP/REPE)
    public static let repne: UInt8 = 1 << 2  // F2
    public static let operandSize: UInt8 = 1 << 3  // 66
    public static let addressSize: UInt8 = 1 << 4  // 67
    public static let rex: UInt8 = 1 << 5  // any REX prefix present
    public static let segmentOverride: UInt8 = 1 << 6
  }
}

/// Segment register numbers in encoding order.
public enum SegmentIndex {
  public static let es: UInt8 = 0
  public static let cs: UInt8 = 1
  public static let ss: UInt8 = 2
  public static let ds: UInt8 = 3
  public static let fs: UInt8 = 4
  public static let gs: UInt8 = 5
}
