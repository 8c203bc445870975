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

extension FormTable {
  /// AVX forms the software CPU implements so far: VEX.128 and VEX.256 (as separate forms) of the
  /// lane-wise SSE operations, the vector moves, VZEROUPPER and VZEROALL.
  static var avx: [InstructionForm] {
    var forms: [InstructionForm] = []
    func add(
      _ name: String, pp: UInt8, opcode: UInt8, twoSources: Bool = true, lengths: [UInt8] = [0, 1],
      elementBytes: Int? = nil, fill: MemoryFill = .random, immediate: ImmediateKind = .none, rm: RMKind = .any,
      alignment: Bool = false
    ) {
      for length in lengths {
        let width = length == 0 ? 16 : 32
        forms.append(
          InstructionForm(
            name: "\(name) \(length == 0 ? "xmm" : "ymm")", group: "avx", opcode: [opcode], encoding: modrm(nil, rm),
            immediate: immediate, regSpace: .xmm, rmSpace: .xmm, memoryBytes: elementBytes ?? width,
            alignment: alignment ? width : 1, memoryFill: fill,
            vex: VEXEncoding(map: 1, pp: pp, lengths: [length], w: false, vvvv: twoSources ? .xmm : nil)))
      }
    }
    for (suffix, pp, fill) in [("ps", UInt8(0), MemoryFill.float32), ("pd", 1, .float64)] {
      for (name, opcode) in [
        ("vand", UInt8(0x54)), ("vandn", 0x55), ("vor", 0x56), ("vxor", 0x57), ("vunpckl", 0x14), ("vunpckh", 0x15),
        ("vadd", 0x58), ("vmul", 0x59), ("vsub", 0x5C), ("vmin", 0x5D), ("vdiv", 0x5E), ("vmax", 0x5F),
      ] {
        add("\(name)\(suffix)", pp: pp, opcode: opcode, fill: fill)
      }
      add("vshuf\(suffix)", pp: pp, opcode: 0xC6, fill: fill, immediate: .bytes(1))
      add("vsqrt\(suffix)", pp: pp, opcode: 0x51, twoSources: false, fill: fill)
      add("vaddsub\(suffix)", pp: pp == 0 ? 3 : 1, opcode: 0xD0, fill: fill)
      add("vhadd\(suffix)", pp: pp == 0 ? 3 : 1, opcode: 0x7C, fill: fill)
      add("vhsub\(suffix)", pp: pp == 0 ? 3 : 1, opcode: 0x7D, fill: fill)
    }
    for (suffix, pp, bytes, fill) in [("ss", UInt8(2), 4, MemoryFill.float32), ("sd", 3, 8, .float64)] {
      for (name, opcode) in [
        ("vadd", UInt8(0x58)), ("vmul", 0x59), ("vsub", 0x5C), ("vmin", 0x5D), ("vdiv", 0x5E), ("vmax", 0x5F),
        ("vsqrt", 0x51),
      ] {
        add("\(name)\(suffix)", pp: pp, opcode: opcode, lengths: [0, 1], elementBytes: bytes, fill: fill)
      }
    }
    add("vrsqrtps", pp: 0, opcode: 0x52, twoSources: false, fill: .float32)
    add("vrcpps", pp: 0, opcode: 0x53, twoSources: false, fill: .float32)
    add("vrsqrtss", pp: 2, opcode: 0x52, lengths: [0], elementBytes: 4, fill: .float32)
    add("vrcpss", pp: 2, opcode: 0x53, lengths: [0], elementBytes: 4, fill: .float32)
    let integer: [(String, UInt8)] = [
      ("vpunpcklbw", 0x60), ("vpunpcklwd", 0x61), ("vpunpckldq", 0x62), ("vpacksswb", 0x63), ("vpcmpgtb", 0x64),
      ("vpcmpgtw", 0x65), ("vpcmpgtd", 0x66), ("vpackuswb", 0x67), ("vpunpckhbw", 0x68), ("vpunpckhwd", 0x69),
      ("vpunpckhdq", 0x6A), ("vpackssdw", 0x6B), ("vpunpcklqdq", 0x6C), ("vpunpckhqdq", 0x6D), ("vpcmpeqb", 0x74),
      ("vpcmpeqw", 0x75), ("vpcmpeqd", 0x76), ("vpaddq", 0xD4), ("vpmullw", 0xD5), ("vpsubusb", 0xD8),
      ("vpsubusw", 0xD9), ("vpminub", 0xDA), ("vpand", 0xDB), ("vpaddusb", 0xDC), ("vpaddusw", 0xDD),
      ("vpmaxub", 0xDE), ("vpandn", 0xDF), ("vpavgb", 0xE0), ("vpavgw", 0xE3), ("vpmulhuw", 0xE4), ("vpmulhw", 0xE5),
      ("vpsubsb", 0xE8), ("vpsubsw", 0xE9), ("vpminsw", 0xEA), ("vpor", 0xEB), ("vpaddsb", 0xEC), ("vpaddsw", 0xED),
      ("vpmaxsw", 0xEE), ("vpxor", 0xEF), ("vpmuludq", 0xF4), ("vpmaddwd", 0xF5), ("vpsadbw", 0xF6), ("vpsubb", 0xF8),
      ("vpsubw", 0xF9), ("vpsubd", 0xFA), ("vpsubq", 0xFB), ("vpaddb", 0xFC), ("vpaddw", 0xFD), ("vpaddd", 0xFE),
    ]
    for (name, opcode) in integer { add(name, pp: 1, opcode: opcode) }
    add("vpshufd", pp: 1, opcode: 0x70, twoSources: false, immediate: .bytes(1))
    add("vpshufhw", pp: 2, opcode: 0x70, twoSources: false, immediate: .bytes(1))
    add("vpshuflw", pp: 3, opcode: 0x70, twoSources: false, immediate: .bytes(1))
    // Moves.
    add("vmovups load", pp: 0, opcode: 0x10, twoSources: false)
    add("vmovupd store", pp: 1, opcode: 0x11, twoSources: false)
    add("vmovaps load", pp: 0, opcode: 0x28, twoSources: false, alignment: true)
    add("vmovapd store", pp: 1, opcode: 0x29, twoSources: false, alignment: true)
    add("vmovdqa load", pp: 1, opcode: 0x6F, twoSources: false, alignment: true)
    add("vmovdqu load", pp: 2, opcode: 0x6F, twoSources: false)
    add("vmovdqa store", pp: 1, opcode: 0x7F, twoSources: false, alignment: true)
    add("vmovdqu store", pp: 2, opcode: 0x7F, twoSources: false)
    add("vmovntps", pp: 0, opcode: 0x2B, twoSources: false, rm: .memory, alignment: true)
    add("vmovntdq", pp: 1, opcode: 0xE7, twoSources: false, rm: .memory, alignment: true)
    for (suffix, pp, bytes) in [("ss", UInt8(2), 4), ("sd", 3, 8)] {
      add(
        "vmov\(suffix) load", pp: pp, opcode: 0x10, twoSources: false, lengths: [0, 1], elementBytes: bytes, rm: .memory
      )
      add(
        "vmov\(suffix) store", pp: pp, opcode: 0x11, twoSources: false, lengths: [0], elementBytes: bytes, rm: .memory)
      add("vmov\(suffix) merge", pp: pp, opcode: 0x10, lengths: [0], rm: .register)
      add("vmov\(suffix) merge store", pp: pp, opcode: 0x11, lengths: [0], rm: .register)
    }
    for length in [UInt8(0), 1] {
      forms.append(
        InstructionForm(
          name: length == 0 ? "vzeroupper" : "vzeroall", group: "avx", opcode: [0x77], encoding: .plain,
          vex: VEXEncoding(map: 1, pp: 0, lengths: [length], w: false)))
    }
    return forms
  }
}
