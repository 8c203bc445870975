import Testing

/// Every MMX form (the no-prefix 0F, 0F 38 and 0F 3A integer SIMD instructions on MM0-MM7, and
/// the SSE conversions and moves between MMX and XMM registers) run on the host and on the
/// software CPU from the same random state: the MMX registers (the x87 significands, with
/// exponents set to all ones), the x87 tag word and TOP (the x87-to-MMX transition), XMM
/// registers, MXCSR, general registers, memory and faults (a pending x87 exception's #MF, #XM
/// for an unmasked SIMD exception, #GP for a misaligned m128, #UD for the register-only and
/// memory-only forms) must agree.
@Suite("MMX against the host CPU")
struct MMXDifferentialTests {
  /// The operand kinds of one form.
  enum Operands {
    /// mm, mm/m64.
    case mmx
    /// mm, r/m32/64 (MOVD/MOVQ to MMX) or r/m32/64, mm (from MMX): the r/m is a GPR or memory.
    case generalRM
    /// r32, mm (PEXTRW, PMOVMSKB): a GPR in reg, an MMX register in r/m (no memory form).
    case generalReg
    /// mm, r32/m16 (PINSRW).
    case insertWord
    /// An MMX register in r/m only (shift groups, MASKMOVQ), with reg a fixed extension or mm.
    case registerOnly
    /// Memory in r/m only (MOVNTQ).
    case memoryOnly
    /// xmm, mm/m64 (CVTPI2PS, CVTPI2PD; MOVQ2DQ without a memory form).
    case xmmFromMMX
    /// mm, xmm/m64 or xmm/m128 (CVT(T)PS2PI, CVT(T)PD2PI; MOVDQ2Q without a memory form).
    case mmxFromXMM
  }

  struct Form: CustomStringConvertible {
    var name: String
    var opcode: [UInt8]
    var operands: Operands = .mmx
    var immediate = false
    var extensionField: UInt8?
    /// The mandatory prefix (66, F3 or F2), before any REX prefix.
    var mandatoryPrefix: UInt8?
    /// The memory operand's size in bytes for the conversions (0: register form only).
    var memoryBytes = 8
    /// What the memory operand holds: integers, singles or doubles (the conversions).
    var memoryValues: MemoryFill = .random
    var description: String { name }
  }

  static let forms: [Form] = {
    var forms: [Form] = []
    let arithmetic: [(UInt8, String)] = [
      (0x60, "punpcklbw"), (0x61, "punpcklwd"), (0x62, "punpckldq"), (0x63, "packsswb"), (0x64, "pcmpgtb"),
      (0x65, "pcmpgtw"), (0x66, "pcmpgtd"), (0x67, "packuswb"), (0x68, "punpckhbw"), (0x69, "punpckhwd"),
      (0x6A, "punpckhdq"), (0x6B, "packssdw"), (0x74, "pcmpeqb"), (0x75, "pcmpeqw"), (0x76, "pcmpeqd"),
      (0xD1, "psrlw"), (0xD2, "psrld"), (0xD3, "psrlq"), (0xD4, "paddq"), (0xD5, "pmullw"), (0xD8, "psubusb"),
      (0xD9, "psubusw"), (0xDA, "pminub"), (0xDB, "pand"), (0xDC, "paddusb"), (0xDD, "paddusw"), (0xDE, "pmaxub"),
      (0xDF, "pandn"), (0xE0, "pavgb"), (0xE1, "psraw"), (0xE2, "psrad"), (0xE3, "pavgw"), (0xE4, "pmulhuw"),
      (0xE5, "pmulhw"), (0xE8, "psubsb"), (0xE9, "psubsw"), (0xEA, "pminsw"), (0xEB, "por"), (0xEC, "paddsb"),
      (0xED, "paddsw"), (0xEE, "pmaxsw"), (0xEF, "pxor"), (0xF1, "psllw"), (0xF2, "pslld"), (0xF3, "psllq"),
      (0xF4, "pmuludq"), (0xF5, "pmaddwd"), (0xF6, "psadbw"), (0xF8, "psubb"), (0xF9, "psubw"), (0xFA, "psubd"),
      (0xFB, "psubq"), (0xFC, "paddb"), (0xFD, "paddw"), (0xFE, "paddd"), (0x6F, "movq mm, mm/m64"),
      (0x7F, "movq mm/m64, mm"),
    ]
    for (opcode, name) in arithmetic { forms.append(Form(name: name, opcode: [0x0F, opcode])) }
    let ssse3: [(UInt8, String)] = [
      (0x00, "pshufb"), (0x01, "phaddw"), (0x02, "phaddd"), (0x03, "phaddsw"), (0x04, "pmaddubsw"), (0x05, "phsubw"),
      (0x06, "phsubd"), (0x07, "phsubsw"), (0x08, "psignb"), (0x09, "psignw"), (0x0A, "psignd"), (0x0B, "pmulhrsw"),
      (0x1C, "pabsb"), (0x1D, "pabsw"), (0x1E, "pabsd"),
    ]
    for (opcode, name) in ssse3 { forms.append(Form(name: "\(name) mm", opcode: [0x0F, 0x38, opcode])) }
    forms += [
      Form(name: "palignr mm", opcode: [0x0F, 0x3A, 0x0F], immediate: true),
      Form(name: "pshufw", opcode: [0x0F, 0x70], immediate: true),
      Form(name: "movd/q mm, r/m", opcode: [0x0F, 0x6E], operands: .generalRM),
      Form(name: "movd/q r/m, mm", opcode: [0x0F, 0x7E], operands: .generalRM),
      Form(name: "pinsrw mm", opcode: [0x0F, 0xC4], operands: .insertWord, immediate: true),
      Form(name: "pextrw mm", opcode: [0x0F, 0xC5], operands: .generalReg, immediate: true),
      Form(name: "pmovmskb mm", opcode: [0x0F, 0xD7], operands: .generalReg),
      Form(name: "movntq", opcode: [0x0F, 0xE7], operands: .memoryOnly),
      Form(name: "maskmovq", opcode: [0x0F, 0xF7], operands: .registerOnly),
    ]
    for (opcode, field, name) in [
      (UInt8(0x71), UInt8(2), "psrlw imm"), (0x71, 4, "psraw imm"), (0x71, 6, "psllw imm"), (0x72, 2, "psrld imm"),
      (0x72, 4, "psrad imm"), (0x72, 6, "pslld imm"), (0x73, 2, "psrlq imm"), (0x73, 6, "psllq imm"),
    ] {
      forms.append(
        Form(name: name, opcode: [0x0F, opcode], operands: .registerOnly, immediate: true, extensionField: field))
    }
    forms += [
      Form(name: "cvtpi2ps", opcode: [0x0F, 0x2A], operands: .xmmFromMMX, memoryValues: .int32),
      Form(name: "cvtpi2pd", opcode: [0x0F, 0x2A], operands: .xmmFromMMX, mandatoryPrefix: 0x66, memoryValues: .int32),
      Form(name: "cvtps2pi", opcode: [0x0F, 0x2D], operands: .mmxFromXMM, memoryValues: .float32),
      Form(name: "cvttps2pi", opcode: [0x0F, 0x2C], operands: .mmxFromXMM, memoryValues: .float32),
      Form(
        name: "cvtpd2pi", opcode: [0x0F, 0x2D], operands: .mmxFromXMM, mandatoryPrefix: 0x66, memoryBytes: 16,
        memoryValues: .float64),
      Form(
        name: "cvttpd2pi", opcode: [0x0F, 0x2C], operands: .mmxFromXMM, mandatoryPrefix: 0x66, memoryBytes: 16,
        memoryValues: .float64),
      Form(name: "movq2dq", opcode: [0x0F, 0xD6], operands: .xmmFromMMX, mandatoryPrefix: 0xF3, memoryBytes: 0),
      Form(name: "movdq2q", opcode: [0x0F, 0xD6], operands: .mmxFromXMM, mandatoryPrefix: 0xF2, memoryBytes: 0),
    ]
    return forms
  }()

  /// Doublewords that convert inexactly to single precision or sit at the integer range's ends.
  static let specialInt32: [UInt32] = [
    0, 1, 0xFFFF_FFFF, 0x7FFF_FFFF, 0x8000_0000, 0x8000_0001, 0x0100_0001, 0xFEFF_FFFF, 0x0123_4567, 0x7FFF_FFC0,
  ]

  /// Two elements of the kind `fill` as 64 bits (singles, doublewords) or one double.
  static func value(_ fill: MemoryFill, _ rng: inout DiffRNG) -> UInt64 {
    switch fill {
    case .float32: return UInt64(DiffValues.float32(&rng)) | UInt64(DiffValues.float32(&rng)) << 32
    case .float64: return DiffValues.float64(&rng)
    case .int32:
      let low = rng.chance(50) ? UInt64(rng.pick(specialInt32)) : rng.next() & 0xFFFF_FFFF
      let high = rng.chance(50) ? UInt64(rng.pick(specialInt32)) : rng.next() & 0xFFFF_FFFF
      return low | high << 32
    default: return rng.next()
    }
  }

  /// One random encoding of `form` and the state it starts from.
  static func makeCase(_ form: Form, _ rng: inout DiffRNG) -> (code: [UInt8], state: MachineState, data: [UInt8]) {
    let conversion = form.operands == .xmmFromMMX || form.operands == .mmxFromXMM
    // The conversions also run with unmasked SIMD exceptions (#XM) in a quarter of the cases.
    var state = DiffStates.random(&rng, x87: true, unmaskedSIMD: conversion && rng.chance(25))
    var data = DiffStates.randomData(&rng)
    // MMX values: random significands; the exponents vary (MMX ignores them, a write sets them).
    for index in 0..<8 where rng.chance(70) {
      let significand = form.memoryValues == .int32 && rng.chance(50) ? value(.int32, &rng) : rng.next()
      state.st[index] = X87Register(significand: significand, signExponent: UInt16(truncatingIfNeeded: rng.next()))
    }
    // XMM sources of the float-to-integer conversions: special values, in and out of range.
    if form.operands == .mmxFromXMM && form.memoryValues != .random {
      for index in 0..<16 where rng.chance(60) {
        state.xmm[index] = SIMD2(value(form.memoryValues, &rng), value(form.memoryValues, &rng))
      }
    }
    // Shift counts in range half the time.
    if rng.chance(50) { state.st[(8 - state.top + 1) & 7].significand = UInt64(rng.below(70)) }
    state.gpr[3] = DiffLayout.dataBase
    state.gpr[7] = DiffLayout.dataBase + UInt64(rng.below(DiffLayout.dataSize - 64))
    var code: [UInt8] = []
    if let prefix = form.mandatoryPrefix { code.append(prefix) }
    var rex: UInt8 = 0
    if rng.chance(40) { rex = 0x40 | UInt8(rng.below(16)) }
    let memory: Bool
    switch form.operands {
    case .registerOnly, .generalReg: memory = false
    case .memoryOnly: memory = true
    case .xmmFromMMX, .mmxFromXMM: memory = form.memoryBytes != 0 && rng.chance(40)
    default: memory = rng.chance(40)
    }
    if memory { rex &= ~0x3 }  // keep RBX as the only base (no REX.B or REX.X)
    if rex != 0 { code.append(rex) }
    code += form.opcode
    var reg = form.extensionField ?? UInt8(rng.below(8))
    if form.operands == .generalReg { reg = rng.pick([0, 1, 2, 5, 6]) }
    if memory {
      var displacement = UInt32(rng.below(DiffLayout.dataSize - 64))
      // An m128 operand is aligned but in a few cases (#GP).
      if form.memoryBytes == 16 && rng.chance(85) { displacement &= ~15 }
      if form.memoryValues != .random {
        for offset in stride(from: 0, to: form.memoryBytes, by: 8) {
          let bytes = value(form.memoryValues, &rng)
          for byte in 0..<8 {
            data[Int(displacement) + offset + byte] = UInt8(truncatingIfNeeded: bytes >> (8 * UInt64(byte)))
          }
        }
      }
      code.append(0x80 | reg << 3 | 3)  // [rbx + disp32]
      withUnsafeBytes(of: displacement.littleEndian) { code += $0 }
    } else {
      var rm = UInt8(rng.below(8))
      // A GPR destination is never RSP, RBX or RDI.
      if form.operands == .generalRM && form.opcode[1] == 0x7E { rm = rng.pick([0, 1, 2, 5, 6]) }
      code.append(0xC0 | reg << 3 | rm)
    }
    if form.immediate { code.append(UInt8(truncatingIfNeeded: rng.next())) }
    return (code, state, data)
  }

  @Test(arguments: forms)
  func matchesTheHost(form: Form) {
    var rng = DiffRNG(seed: DiffRNG.mix(0x4D4D58, UInt64(form.name.utf8.reduce(0) { $0 &* 31 &+ UInt64($1) })))
    let runner = EmulatedRunner()
    var compared = 0
    for _ in 0..<150 {
      let (code, state, data) = Self.makeCase(form, &rng)
      let native = NativeRunner.run(code: code, initial: state, data: data)
      let emulated = runner.run(code: code, initial: state, data: data)
      let differences = DiffCompare.compare(native: native, emulated: emulated, mask: ComparisonMask())
      #expect(differences.isEmpty, "\(form): \(DiffCompare.disassemble(code)): \(differences)")
      if !differences.isEmpty { return }
      if native.end == .completed { compared += 1 }
    }
    // Most cases run to completion (the rest end in #MF from a pending x87 exception, or for the
    // conversions in #XM or a misaligned m128's #GP).
    #expect(compared >= 100, "\(form): only \(compared) cases completed")
  }
}
