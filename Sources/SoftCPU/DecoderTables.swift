// Opcode tables of the decoder: one entry per opcode byte of the one-byte map and the 0F map.
// Group opcodes (whose operation depends on ModRM.reg) name a group resolved in Decoder.swift.

/// How an opcode's immediate (or relative displacement) is encoded.
enum ImmediateKind: UInt8 {
  case none
  /// imm8, zero-extended.
  case byte
  /// imm8, sign-extended to the operand size.
  case byteSigned
  /// imm16.
  case word
  /// imm16 for 16-bit operands, else imm32 sign-extended to the operand size.
  case wordOrDword
  /// imm16/imm32/imm64 by operand size (B8+r only).
  case full
  /// rel8 branch displacement.
  case relative8
  /// rel16/rel32 branch displacement.
  case relative
  /// moffs: an absolute address of address size (A0-A3).
  case memoryOffset
  /// imm16 then imm8 (ENTER).
  case enter
  /// ptr16:16/ptr16:32 far pointer (9A, EA; invalid in 64-bit mode).
  case farPointer
}

/// Decoder attributes of one opcode.
struct OpcodeEntry {
  var op: Op
  var immediate: ImmediateKind = .none
  var hasModRM = false
  /// Operand size is 1 byte (reg and r/m are byte registers).
  var byteOperation = false
  /// Only the r/m operand is a byte (MOVZX/MOVSX r, r/m8).
  var byteRm = false
  /// Operand size defaults to 64 bits in 64-bit mode (66h selects 16 bits).
  var defaultTo64 = false
  /// #UD in 64-bit mode.
  var invalidIn64 = false
  /// Nonzero: the op depends on ModRM.reg, see `DecoderGroup`.
  var group: UInt8 = 0
  /// The register operand is encoded in the low 3 opcode bits (extended by REX.B).
  var registerInOpcode = false
  /// SIMD/x87 class instruction.
  var simd = false
}

/// Group numbers for `OpcodeEntry.group`.
enum DecoderGroup {
  static let arithmetic: UInt8 = 1  // 80-83
  static let shift: UInt8 = 2  // C0, C1, D0-D3
  static let unary: UInt8 = 3  // F6, F7
  static let incDecByte: UInt8 = 4  // FE
  static let incDecCallJmpPush: UInt8 = 5  // FF
  static let pop: UInt8 = 6  // 8F
  static let movImm: UInt8 = 7  // C6, C7
  static let bitTestImm: UInt8 = 8  // 0F BA
  static let cmpxchgN: UInt8 = 9  // 0F C7
  static let fence: UInt8 = 10  // 0F AE
  static let system00: UInt8 = 11  // 0F 00
  static let system01: UInt8 = 12  // 0F 01
}

/// The one-byte opcode map.
let oneByteOpcodes: [OpcodeEntry] = {
  var t = [OpcodeEntry](repeating: OpcodeEntry(op: .invalid), count: 256)
  let aluOps: [(Op, Op, Op)] = [
    (.addRmReg, .addRegRm, .addRmImm), (.orRmReg, .orRegRm, .orRmImm), (.adcRmReg, .adcRegRm, .adcRmImm),
    (.sbbRmReg, .sbbRegRm, .sbbRmImm), (.andRmReg, .andRegRm, .andRmImm), (.subRmReg, .subRegRm, .subRmImm),
    (.xorRmReg, .xorRegRm, .xorRmImm), (.cmpRmReg, .cmpRegRm, .cmpRmImm),
  ]
  for (index, ops) in aluOps.enumerated() {
    let base = index * 8
    t[base + 0] = OpcodeEntry(op: ops.0, hasModRM: true, byteOperation: true)
    t[base + 1] = OpcodeEntry(op: ops.0, hasModRM: true)
    t[base + 2] = OpcodeEntry(op: ops.1, hasModRM: true, byteOperation: true)
    t[base + 3] = OpcodeEntry(op: ops.1, hasModRM: true)
    t[base + 4] = OpcodeEntry(op: ops.2, immediate: .byte, byteOperation: true)
    t[base + 5] = OpcodeEntry(op: ops.2, immediate: .wordOrDword)
  }
  // 06/07/0E/16/17/1E/1F (push/pop segment), 27/2F/37/3F (decimal adjust): legacy only.
  for opcode in [0x06, 0x07, 0x0E, 0x16, 0x17, 0x1E, 0x1F, 0x27, 0x2F, 0x37, 0x3F] {
    t[opcode] = OpcodeEntry(op: .legacyOnly, invalidIn64: true)
  }
  // 26/2E/36/3E/64/65/66/67/F0/F2/F3 are prefixes; 0F escapes; 40-4F REX in 64-bit mode
  // (INC/DEC reg outside it).
  for opcode in 0x40...0x47 { t[opcode] = OpcodeEntry(op: .incRm, registerInOpcode: true) }
  for opcode in 0x48...0x4F { t[opcode] = OpcodeEntry(op: .decRm, registerInOpcode: true) }
  for opcode in 0x50...0x57 { t[opcode] = OpcodeEntry(op: .pushRm, defaultTo64: true, registerInOpcode: true) }
  for opcode in 0x58...0x5F { t[opcode] = OpcodeEntry(op: .popRm, defaultTo64: true, registerInOpcode: true) }
  for opcode in [0x60, 0x61] { t[opcode] = OpcodeEntry(op: .legacyOnly, invalidIn64: true) }
  t[0x62] = OpcodeEntry(op: .legacyOnly, hasModRM: true, invalidIn64: true)  // BOUND / EVEX
  t[0x63] = OpcodeEntry(op: .movsxd, hasModRM: true)  // ARPL outside 64-bit mode
  t[0x68] = OpcodeEntry(op: .pushImm, immediate: .wordOrDword, defaultTo64: true)
  t[0x69] = OpcodeEntry(op: .imulRegRmImm, immediate: .wordOrDword, hasModRM: true)
  t[0x6A] = OpcodeEntry(op: .pushImm, immediate: .byteSigned, defaultTo64: true)
  t[0x6B] = OpcodeEntry(op: .imulRegRmImm, immediate: .byteSigned, hasModRM: true)
  t[0x6C] = OpcodeEntry(op: .ins, byteOperation: true)
  t[0x6D] = OpcodeEntry(op: .ins)
  t[0x6E] = OpcodeEntry(op: .outs, byteOperation: true)
  t[0x6F] = OpcodeEntry(op: .outs)
  for opcode in 0x70...0x7F { t[opcode] = OpcodeEntry(op: .jcc, immediate: .relative8, defaultTo64: true) }
  t[0x80] = OpcodeEntry(op: .invalid, immediate: .byte, hasModRM: true, byteOperation: true, group: 1)
  t[0x81] = OpcodeEntry(op: .invalid, immediate: .wordOrDword, hasModRM: true, group: 1)
  t[0x82] = OpcodeEntry(
    op: .invalid, immediate: .byte, hasModRM: true, byteOperation: true, invalidIn64: true, group: 1)
  t[0x83] = OpcodeEntry(op: .invalid, immediate: .byteSigned, hasModRM: true, group: 1)
  t[0x84] = OpcodeEntry(op: .testRmReg, hasModRM: true, byteOperation: true)
  t[0x85] = OpcodeEntry(op: .testRmReg, hasModRM: true)
  t[0x86] = OpcodeEntry(op: .xchgRmReg, hasModRM: true, byteOperation: true)
  t[0x87] = OpcodeEntry(op: .xchgRmReg, hasModRM: true)
  t[0x88] = OpcodeEntry(op: .movRmReg, hasModRM: true, byteOperation: true)
  t[0x89] = OpcodeEntry(op: .movRmReg, hasModRM: true)
  t[0x8A] = OpcodeEntry(op: .movRegRm, hasModRM: true, byteOperation: true)
  t[0x8B] = OpcodeEntry(op: .movRegRm, hasModRM: true)
  t[0x8C] = OpcodeEntry(op: .movRmSeg, hasModRM: true)
  t[0x8D] = OpcodeEntry(op: .lea, hasModRM: true)
  t[0x8E] = OpcodeEntry(op: .movSegRm, hasModRM: true)
  t[0x8F] = OpcodeEntry(op: .invalid, hasModRM: true, defaultTo64: true, group: 6)
  t[0x90] = OpcodeEntry(op: .xchgRmReg, registerInOpcode: true)  // NOP/PAUSE resolved in the decoder
  for opcode in 0x91...0x97 { t[opcode] = OpcodeEntry(op: .xchgRmReg, registerInOpcode: true) }
  t[0x98] = OpcodeEntry(op: .cbw)
  t[0x99] = OpcodeEntry(op: .cwd)
  t[0x9A] = OpcodeEntry(op: .farCall, immediate: .farPointer, invalidIn64: true)
  t[0x9B] = OpcodeEntry(op: .fwait)
  t[0x9C] = OpcodeEntry(op: .pushf, defaultTo64: true)
  t[0x9D] = OpcodeEntry(op: .popf, defaultTo64: true)
  t[0x9E] = OpcodeEntry(op: .sahf)
  t[0x9F] = OpcodeEntry(op: .lahf)
  t[0xA0] = OpcodeEntry(op: .movRegRm, immediate: .memoryOffset, byteOperation: true)
  t[0xA1] = OpcodeEntry(op: .movRegRm, immediate: .memoryOffset)
  t[0xA2] = OpcodeEntry(op: .movRmReg, immediate: .memoryOffset, byteOperation: true)
  t[0xA3] = OpcodeEntry(op: .movRmReg, immediate: .memoryOffset)
  t[0xA4] = OpcodeEntry(op: .movs, byteOperation: true)
  t[0xA5] = OpcodeEntry(op: .movs)
  t[0xA6] = OpcodeEntry(op: .cmps, byteOperation: true)
  t[0xA7] = OpcodeEntry(op: .cmps)
  t[0xA8] = OpcodeEntry(op: .testRmImm, immediate: .byte, byteOperation: true)
  t[0xA9] = OpcodeEntry(op: .testRmImm, immediate: .wordOrDword)
  t[0xAA] = OpcodeEntry(op: .stos, byteOperation: true)
  t[0xAB] = OpcodeEntry(op: .stos)
  t[0xAC] = OpcodeEntry(op: .lods, byteOperation: true)
  t[0xAD] = OpcodeEntry(op: .lods)
  t[0xAE] = OpcodeEntry(op: .scas, byteOperation: true)
  t[0xAF] = OpcodeEntry(op: .scas)
  for opcode in 0xB0...0xB7 {
    t[opcode] = OpcodeEntry(op: .movRmImm, immediate: .byte, byteOperation: true, registerInOpcode: true)
  }
  for opcode in 0xB8...0xBF { t[opcode] = OpcodeEntry(op: .movRmImm, immediate: .full, registerInOpcode: true) }
  t[0xC0] = OpcodeEntry(op: .invalid, immediate: .byte, hasModRM: true, byteOperation: true, group: 2)
  t[0xC1] = OpcodeEntry(op: .invalid, immediate: .byte, hasModRM: true, group: 2)
  t[0xC2] = OpcodeEntry(op: .retImm, immediate: .word, defaultTo64: true)
  t[0xC3] = OpcodeEntry(op: .ret, defaultTo64: true)
  t[0xC4] = OpcodeEntry(op: .legacyOnly, hasModRM: true, invalidIn64: true)  // LES / VEX3
  t[0xC5] = OpcodeEntry(op: .legacyOnly, hasModRM: true, invalidIn64: true)  // LDS / VEX2
  t[0xC6] = OpcodeEntry(op: .invalid, immediate: .byte, hasModRM: true, byteOperation: true, group: 7)
  t[0xC7] = OpcodeEntry(op: .invalid, immediate: .wordOrDword, hasModRM: true, group: 7)
  t[0xC8] = OpcodeEntry(op: .enter, immediate: .enter, defaultTo64: true)
  t[0xC9] = OpcodeEntry(op: .leave, defaultTo64: true)
  t[0xCA] = OpcodeEntry(op: .retFar, immediate: .word)
  t[0xCB] = OpcodeEntry(op: .retFar)
  t[0xCC] = OpcodeEntry(op: .int3)
  t[0xCD] = OpcodeEntry(op: .intN, immediate: .byte)
  t[0xCE] = OpcodeEntry(op: .into, invalidIn64: true)
  t[0xCF] = OpcodeEntry(op: .iret)
  t[0xD0] = OpcodeEntry(op: .invalid, hasModRM: true, byteOperation: true, group: 2)
  t[0xD1] = OpcodeEntry(op: .invalid, hasModRM: true, group: 2)
  t[0xD2] = OpcodeEntry(op: .invalid, hasModRM: true, byteOperation: true, group: 2)
  t[0xD3] = OpcodeEntry(op: .invalid, hasModRM: true, group: 2)
  t[0xD4] = OpcodeEntry(op: .legacyOnly, immediate: .byte, invalidIn64: true)  // AAM
  t[0xD5] = OpcodeEntry(op: .legacyOnly, immediate: .byte, invalidIn64: true)  // AAD
  t[0xD6] = OpcodeEntry(op: .legacyOnly, invalidIn64: true)  // SALC
  t[0xD7] = OpcodeEntry(op: .xlat)
  for opcode in 0xD8...0xDF { t[opcode] = OpcodeEntry(op: .x87, hasModRM: true, simd: true) }
  t[0xE0] = OpcodeEntry(op: .loopne, immediate: .relative8, defaultTo64: true)
  t[0xE1] = OpcodeEntry(op: .loope, immediate: .relative8, defaultTo64: true)
  t[0xE2] = OpcodeEntry(op: .loop, immediate: .relative8, defaultTo64: true)
  t[0xE3] = OpcodeEntry(op: .jrcxz, immediate: .relative8, defaultTo64: true)
  t[0xE4] = OpcodeEntry(op: .inImm, immediate: .byte, byteOperation: true)
  t[0xE5] = OpcodeEntry(op: .inImm, immediate: .byte)
  t[0xE6] = OpcodeEntry(op: .outImm, immediate: .byte, byteOperation: true)
  t[0xE7] = OpcodeEntry(op: .outImm, immediate: .byte)
  t[0xE8] = OpcodeEntry(op: .callRel, immediate: .relative, defaultTo64: true)
  t[0xE9] = OpcodeEntry(op: .jmpRel, immediate: .relative, defaultTo64: true)
  t[0xEA] = OpcodeEntry(op: .farJmp, immediate: .farPointer, invalidIn64: true)
  t[0xEB] = OpcodeEntry(op: .jmpRel, immediate: .relative8, defaultTo64: true)
  t[0xEC] = OpcodeEntry(op: .inDX, byteOperation: true)
  t[0xED] = OpcodeEntry(op: .inDX)
  t[0xEE] = OpcodeEntry(op: .outDX, byteOperation: true)
  t[0xEF] = OpcodeEntry(op: .outDX)
  t[0xF1] = OpcodeEntry(op: .int1)
  t[0xF4] = OpcodeEntry(op: .hlt)
  t[0xF5] = OpcodeEntry(op: .cmc)
  t[0xF6] = OpcodeEntry(op: .invalid, hasModRM: true, byteOperation: true, group: 3)
  t[0xF7] = OpcodeEntry(op: .invalid, hasModRM: true, group: 3)
  t[0xF8] = OpcodeEntry(op: .clc)
  t[0xF9] = OpcodeEntry(op: .stc)
  t[0xFA] = OpcodeEntry(op: .cli)
  t[0xFB] = OpcodeEntry(op: .sti)
  t[0xFC] = OpcodeEntry(op: .cld)
  t[0xFD] = OpcodeEntry(op: .std)
  t[0xFE] = OpcodeEntry(op: .invalid, hasModRM: true, byteOperation: true, group: 4)
  t[0xFF] = OpcodeEntry(op: .invalid, hasModRM: true, group: 5)
  return t
}()

/// The two-byte (0F xx) opcode map. 0F 38 and 0F 3A are handled in the decoder.
let twoByteOpcodes: [OpcodeEntry] = {
  var t = [OpcodeEntry](repeating: OpcodeEntry(op: .invalid), count: 256)
  let simd = OpcodeEntry(op: .sse, hasModRM: true, simd: true)
  let simdImm = OpcodeEntry(op: .sse, immediate: .byte, hasModRM: true, simd: true)
  for opcode in 0x10...0x17 { t[opcode] = simd }
  for opcode in 0x28...0x2F { t[opcode] = simd }
  for opcode in 0x50...0x7F { t[opcode] = simd }
  for opcode in 0x70...0x73 { t[opcode] = simdImm }
  t[0x77] = OpcodeEntry(op: .sse, simd: true)  // EMMS: no ModRM
  t[0xC2] = simdImm
  for opcode in 0xC4...0xC6 { t[opcode] = simdImm }
  for opcode in 0xD0...0xFF { t[opcode] = simd }

  t[0x00] = OpcodeEntry(op: .invalid, hasModRM: true, group: 11)
  t[0x01] = OpcodeEntry(op: .invalid, hasModRM: true, group: 12)
  t[0x02] = OpcodeEntry(op: .lar, hasModRM: true)
  t[0x03] = OpcodeEntry(op: .lsl, hasModRM: true)
  t[0x05] = OpcodeEntry(op: .syscall)
  t[0x06] = OpcodeEntry(op: .clts)
  t[0x07] = OpcodeEntry(op: .sysret)
  t[0x08] = OpcodeEntry(op: .invd)
  t[0x09] = OpcodeEntry(op: .wbinvd)
  t[0x0B] = OpcodeEntry(op: .invalid)  // UD2
  t[0x0D] = OpcodeEntry(op: .nop, hasModRM: true)  // PREFETCH/PREFETCHW
  for opcode in 0x18...0x1F { t[opcode] = OpcodeEntry(op: .nop, hasModRM: true) }  // hint NOPs
  t[0x20] = OpcodeEntry(op: .movFromCR, hasModRM: true)
  t[0x21] = OpcodeEntry(op: .movFromDR, hasModRM: true)
  t[0x22] = OpcodeEntry(op: .movToCR, hasModRM: true)
  t[0x23] = OpcodeEntry(op: .movToDR, hasModRM: true)
  t[0x30] = OpcodeEntry(op: .wrmsr)
  t[0x31] = OpcodeEntry(op: .rdtsc)
  t[0x32] = OpcodeEntry(op: .rdmsr)
  t[0x33] = OpcodeEntry(op: .rdpmc)
  t[0x34] = OpcodeEntry(op: .sysenter)
  t[0x35] = OpcodeEntry(op: .sysexit)
  for opcode in 0x40...0x4F { t[opcode] = OpcodeEntry(op: .cmovcc, hasModRM: true) }
  for opcode in 0x80...0x8F { t[opcode] = OpcodeEntry(op: .jcc, immediate: .relative, defaultTo64: true) }
  for opcode in 0x90...0x9F { t[opcode] = OpcodeEntry(op: .setcc, hasModRM: true, byteOperation: true) }
  t[0xA0] = OpcodeEntry(op: .pushSeg, defaultTo64: true)
  t[0xA1] = OpcodeEntry(op: .popSeg, defaultTo64: true)
  t[0xA2] = OpcodeEntry(op: .cpuid)
  t[0xA3] = OpcodeEntry(op: .btRmReg, hasModRM: true)
  t[0xA4] = OpcodeEntry(op: .shldImm, immediate: .byte, hasModRM: true)
  t[0xA5] = OpcodeEntry(op: .shldCL, hasModRM: true)
  t[0xA8] = OpcodeEntry(op: .pushSeg, defaultTo64: true)
  t[0xA9] = OpcodeEntry(op: .popSeg, defaultTo64: true)
  t[0xAB] = OpcodeEntry(op: .btsRmReg, hasModRM: true)
  t[0xAC] = OpcodeEntry(op: .shrdImm, immediate: .byte, hasModRM: true)
  t[0xAD] = OpcodeEntry(op: .shrdCL, hasModRM: true)
  t[0xAE] = OpcodeEntry(op: .invalid, hasModRM: true, group: 10)
  t[0xAF] = OpcodeEntry(op: .imulRegRm, hasModRM: true)
  t[0xB0] = OpcodeEntry(op: .cmpxchg, hasModRM: true, byteOperation: true)
  t[0xB1] = OpcodeEntry(op: .cmpxchg, hasModRM: true)
  t[0xB3] = OpcodeEntry(op: .btrRmReg, hasModRM: true)
  t[0xB6] = OpcodeEntry(op: .movzxByte, hasModRM: true, byteRm: true)
  t[0xB7] = OpcodeEntry(op: .movzxWord, hasModRM: true)
  t[0xB8] = OpcodeEntry(op: .popcnt, hasModRM: true)  // requires F3 (checked in the decoder)
  t[0xBA] = OpcodeEntry(op: .invalid, immediate: .byte, hasModRM: true, group: 8)
  t[0xBB] = OpcodeEntry(op: .btcRmReg, hasModRM: true)
  t[0xBC] = OpcodeEntry(op: .bsf, hasModRM: true)  // TZCNT with F3
  t[0xBD] = OpcodeEntry(op: .bsr, hasModRM: true)  // LZCNT with F3
  t[0xBE] = OpcodeEntry(op: .movsxByte, hasModRM: true, byteRm: true)
  t[0xBF] = OpcodeEntry(op: .movsxWord, hasModRM: true)
  t[0xC0] = OpcodeEntry(op: .xadd, hasModRM: true, byteOperation: true)
  t[0xC1] = OpcodeEntry(op: .xadd, hasModRM: true)
  t[0xC3] = OpcodeEntry(op: .movRmReg, hasModRM: true)  // MOVNTI (memory only, checked in the decoder)
  t[0xC7] = OpcodeEntry(op: .invalid, hasModRM: true, group: 9)
  for opcode in 0xC8...0xCF { t[opcode] = OpcodeEntry(op: .bswap, registerInOpcode: true) }
  return t
}()
