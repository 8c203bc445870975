import Testing

/// Every MMX form (the no-prefix 0F, 0F 38 and 0F 3A integer SIMD instructions on MM0-MM7)
/// run on the host and on the software CPU from the same random state: the MMX registers (the
/// x87 significands, with exponents set to all ones), the x87 tag word and TOP (the
/// x87-to-MMX transition), general registers, memory and faults (a pending x87 exception's
/// #MF, #UD for the register-only and memory-only forms) must agree.
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
  }

  struct Form: CustomStringConvertible {
    var name: String
    var opcode: [UInt8]
    var operands: Operands = .mmx
    var immediate = false
    var extensionField: UInt8?
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
    return forms
  }()

  /// One random encoding of `form` and the state it starts from.
  static func makeCase(_ form: Form, _ rng: inout DiffRNG) -> (code: [UInt8], state: MachineState) {
    var state = DiffStates.random(&rng, x87: true, unmaskedSIMD: false)
    // MMX values: random significands; the exponents vary (MMX ignores them, a write sets them).
    for index in 0..<8 where rng.chance(70) {
      state.st[index] = X87Register(significand: rng.next(), signExponent: UInt16(truncatingIfNeeded: rng.next()))
    }
    // Shift counts in range half the time.
    if rng.chance(50) { state.st[(8 - state.top + 1) & 7].significand = UInt64(rng.below(70)) }
    state.gpr[3] = DiffLayout.dataBase
    state.gpr[7] = DiffLayout.dataBase + UInt64(rng.below(DiffLayout.dataSize - 64))
    var code: [UInt8] = []
    var rex: UInt8 = 0
    if rng.chance(40) { rex = 0x40 | UInt8(rng.below(16)) }
    let memory: Bool
    switch form.operands {
    case .registerOnly, .generalReg: memory = false
    case .memoryOnly: memory = true
    default: memory = rng.chance(40)
    }
    if memory { rex &= ~0x3 }  // keep RBX as the only base (no REX.B or REX.X)
    if rex != 0 { code.append(rex) }
    code += form.opcode
    var reg = form.extensionField ?? UInt8(rng.below(8))
    if form.operands == .generalReg { reg = rng.pick([0, 1, 2, 5, 6]) }
    if memory {
      let displacement = UInt32(rng.below(DiffLayout.dataSize - 64))
      code.append(0x80 | reg << 3 | 3)  // [rbx + disp32]
      withUnsafeBytes(of: displacement.littleEndian) { code += $0 }
    } else {
      var rm = UInt8(rng.below(8))
      // A GPR destination is never RSP, RBX or RDI.
      if form.operands == .generalRM && form.opcode[1] == 0x7E { rm = rng.pick([0, 1, 2, 5, 6]) }
      code.append(0xC0 | reg << 3 | rm)
    }
    if form.immediate { code.append(UInt8(truncatingIfNeeded: rng.next())) }
    return (code, state)
  }

  @Test(arguments: forms)
  func matchesTheHost(form: Form) {
    var rng = DiffRNG(seed: DiffRNG.mix(0x4D4D58, UInt64(form.name.utf8.reduce(0) { $0 &* 31 &+ UInt64($1) })))
    let runner = EmulatedRunner()
    var compared = 0
    for _ in 0..<150 {
      let (code, state) = Self.makeCase(form, &rng)
      let data = DiffStates.randomData(&rng)
      let native = NativeRunner.run(code: code, initial: state, data: data)
      let emulated = runner.run(code: code, initial: state, data: data)
      let differences = DiffCompare.compare(native: native, emulated: emulated, mask: ComparisonMask())
      #expect(differences.isEmpty, "\(form): \(DiffCompare.disassemble(code)): \(differences)")
      if !differences.isEmpty { return }
      if native.end == .completed { compared += 1 }
    }
    // Most cases run to completion (the rest end in #MF from a pending x87 exception).
    #expect(compared >= 100, "\(form): only \(compared) cases completed")
  }
}
