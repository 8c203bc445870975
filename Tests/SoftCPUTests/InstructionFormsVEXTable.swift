// VEX-encoded instruction forms of the differential tests: BMI1 and BMI2 (general-purpose
// registers). Flag effects follow the Intel SDM (undefined flags are masked).

extension FormTable {
  /// BMI1 and BMI2, 32- and 64-bit operand sizes, register and memory sources.
  static var bitManipulation: [InstructionForm] {
    let flagsFromResult = FlagEffect(writes: F.c | F.z | F.s | F.o, undefined: F.a | F.p)
    func form(
      _ name: String, map: UInt8 = 2, pp: UInt8, opcode: UInt8, ext: UInt8? = nil, vvvv: Bool = true,
      immediate: ImmediateKind = .none, flags: FlagEffect = FlagEffect()
    ) -> InstructionForm {
      InstructionForm(
        name: name, group: "bmi", opcode: [opcode], encoding: modrm(ext), sizes: [4, 8], immediate: immediate,
        flags: flags, vex: VEXEncoding(map: map, pp: pp, vvvv: vvvv ? .gpr : nil))
    }
    return [
      form("andn r, v, r/m", pp: 0, opcode: 0xF2, flags: flagsFromResult),
      form("blsr v, r/m", pp: 0, opcode: 0xF3, ext: 1, flags: flagsFromResult),
      form("blsmsk v, r/m", pp: 0, opcode: 0xF3, ext: 2, flags: flagsFromResult),
      form("blsi v, r/m", pp: 0, opcode: 0xF3, ext: 3, flags: flagsFromResult),
      form("bzhi r, r/m, v", pp: 0, opcode: 0xF5, flags: flagsFromResult),
      form("pdep r, v, r/m", pp: 3, opcode: 0xF5),
      form("pext r, v, r/m", pp: 2, opcode: 0xF5),
      form("mulx r, v, r/m", pp: 3, opcode: 0xF6),
      form(
        "bextr r, r/m, v", pp: 0, opcode: 0xF7,
        flags: FlagEffect(writes: F.c | F.z | F.o, undefined: F.a | F.s | F.p)),
      form("shlx r, r/m, v", pp: 1, opcode: 0xF7),
      form("sarx r, r/m, v", pp: 2, opcode: 0xF7),
      form("shrx r, r/m, v", pp: 3, opcode: 0xF7),
      form("rorx r, r/m, imm8", map: 3, pp: 3, opcode: 0xF0, vvvv: false, immediate: .bytes(1)),
    ]
  }
}

extension FormTable {
  /// XSAVE, XSAVEOPT, XSAVEC and XRSTOR (standard and compacted areas), with and without REX.W,
  /// and the XGETBV/XSETBV faults a CPL-3 sequence can compare (the XCR0 values themselves
  /// differ between the host and the model: known-answer tests).
  static var xsaveFamily: [InstructionForm] {
    func form(_ name: String, opcode: [UInt8], ext: UInt8, wide: Bool, special: Special) -> InstructionForm {
      InstructionForm(
        name: name, group: "xsave", opcode: opcode, encoding: modrm(ext, .memory), sizes: [wide ? 8 : 4],
        memoryBytes: 832, alignment: 64, special: special)
    }
    var forms: [InstructionForm] = []
    for wide in [false, true] {
      let suffix = wide ? "64" : ""
      forms += [
        form(
          "xsave\(suffix) m", opcode: [0x0F, 0xAE], ext: 4, wide: wide,
          special: .xsaveArea(restore: false, compacted: false)),
        form(
          "xsaveopt\(suffix) m", opcode: [0x0F, 0xAE], ext: 6, wide: wide,
          special: .xsaveArea(restore: false, compacted: false)),
        form(
          "xsavec\(suffix) m", opcode: [0x0F, 0xC7], ext: 4, wide: wide,
          special: .xsaveArea(restore: false, compacted: true)),
        form(
          "xrstor\(suffix) m (standard)", opcode: [0x0F, 0xAE], ext: 5, wide: wide,
          special: .xsaveArea(restore: true, compacted: false)),
        form(
          "xrstor\(suffix) m (compacted)", opcode: [0x0F, 0xAE], ext: 5, wide: wide,
          special: .xsaveArea(restore: true, compacted: true)),
      ]
    }
    forms += [
      InstructionForm(
        name: "xgetbv (ecx > 1)", group: "xsave", opcode: [0x0F, 0x01, 0xD0], encoding: .plain,
        special: .invalidXCRIndex),
      InstructionForm(name: "xsetbv (cpl 3)", group: "xsave", opcode: [0x0F, 0x01, 0xD1], encoding: .plain),
    ]
    return forms
  }
}
