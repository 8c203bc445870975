// The AVX, AVX2, FMA3 and F16C forms beyond the first lane-wise set (InstructionFormsVEXTable):
// compares with the 32 predicates, conversions, broadcasts, permutes, inserts/extracts, masked
// moves, blends, tests, moves to and from general registers, the 0F 38/0F 3A integer forms,
// shifts, per-element shifts, FMA3 and F16C. Every form is generated as VEX.128 and VEX.256
// (separate forms named "xmm" and "ymm"), including the lengths a form does not allow (#UD on
// both CPUs), and forms without a VEX.vvvv operand also with VEX.vvvv ≠ 1111b (#UD).

extension FormTable {
  /// One VEX form description of `avxExtended`.
  struct VEXForm {
    var name: String
    var map: UInt8
    var pp: UInt8 = 1
    var opcode: UInt8
    /// VEX.W (nil: set for 8-byte operand sizes).
    var w: Bool? = false
    var vvvv = true
    var ext: UInt8? = nil
    var rm: RMKind = .any
    var reg: OperandSpace = .xmm
    var rmSpace: OperandSpace = .xmm
    var sizes: [UInt8] = [4]
    /// Memory operand bytes for VEX.128 and VEX.256 (nil: 16 and 32).
    var memory: (Int, Int)? = nil
    var alignment = false
    var immediate = false
    var fill: MemoryFill = .random
    var flags = FlagEffect()
    var special: Special = .none
  }

  static func vexForms(_ description: VEXForm) -> [InstructionForm] {
    var forms: [InstructionForm] = []
    for length in [UInt8(0), 1] {
      let width = length == 0 ? 16 : 32
      let memory = description.memory.map { length == 0 ? $0.0 : $0.1 } ?? width
      for undefinedVVVV in description.vvvv ? [false] : [false, true] {
        forms.append(
          InstructionForm(
            name: "\(description.name) \(length == 0 ? "xmm" : "ymm")\(undefinedVVVV ? " (vvvv≠1111b)" : "")",
            group: "avx", opcode: [description.opcode], encoding: .modrm(ext: description.ext, rm: description.rm),
            sizes: description.sizes, immediate: description.immediate ? .bytes(1) : .none,
            regSpace: description.reg, rmSpace: description.rmSpace, memoryBytes: memory,
            alignment: description.alignment ? width : 1, flags: description.flags, special: description.special,
            memoryFill: description.fill,
            vex: VEXEncoding(
              map: description.map, pp: description.pp, lengths: [length], w: description.w,
              vvvv: description.vvvv ? .xmm : nil, vvvvNotUnused: undefinedVVVV)))
      }
    }
    return forms
  }

  static var avxExtended: [InstructionForm] {
    typealias V = VEXForm
    var list: [VEXForm] = []
    let allFlags = FlagEffect(writes: F.all)
    // 0F map: compares, conversions, moves.
    list += [
      V(name: "vcmpps", map: 1, pp: 0, opcode: 0xC2, immediate: true, fill: .float32),
      V(name: "vcmppd", map: 1, pp: 1, opcode: 0xC2, immediate: true, fill: .float64),
      V(name: "vcmpss", map: 1, pp: 2, opcode: 0xC2, memory: (4, 4), immediate: true, fill: .float32),
      V(name: "vcmpsd", map: 1, pp: 3, opcode: 0xC2, memory: (8, 8), immediate: true, fill: .float64),
      V(name: "vcvtps2pd", map: 1, pp: 0, opcode: 0x5A, vvvv: false, memory: (8, 16), fill: .float32),
      V(name: "vcvtpd2ps", map: 1, pp: 1, opcode: 0x5A, vvvv: false, fill: .float64),
      V(name: "vcvtss2sd", map: 1, pp: 2, opcode: 0x5A, memory: (4, 4), fill: .float32),
      V(name: "vcvtsd2ss", map: 1, pp: 3, opcode: 0x5A, memory: (8, 8), fill: .float64),
      V(name: "vcvtdq2ps", map: 1, pp: 0, opcode: 0x5B, vvvv: false, fill: .int32),
      V(name: "vcvtps2dq", map: 1, pp: 1, opcode: 0x5B, vvvv: false, fill: .float32),
      V(name: "vcvttps2dq", map: 1, pp: 2, opcode: 0x5B, vvvv: false, fill: .float32),
      V(name: "vcvttpd2dq", map: 1, pp: 1, opcode: 0xE6, vvvv: false, fill: .float64),
      V(name: "vcvtdq2pd", map: 1, pp: 2, opcode: 0xE6, vvvv: false, memory: (8, 16), fill: .int32),
      V(name: "vcvtpd2dq", map: 1, pp: 3, opcode: 0xE6, vvvv: false, fill: .float64),
      V(name: "vcvtsi2ss", map: 1, pp: 2, opcode: 0x2A, w: nil, rmSpace: .gpr, sizes: [4, 8], memory: (0, 0)),
      V(name: "vcvtsi2sd", map: 1, pp: 3, opcode: 0x2A, w: nil, rmSpace: .gpr, sizes: [4, 8], memory: (0, 0)),
      V(
        name: "vcvtss2si", map: 1, pp: 2, opcode: 0x2D, w: nil, vvvv: false, reg: .gpr, sizes: [4, 8], memory: (4, 4),
        fill: .float32),
      V(
        name: "vcvttss2si", map: 1, pp: 2, opcode: 0x2C, w: nil, vvvv: false, reg: .gpr, sizes: [4, 8],
        memory: (4, 4), fill: .float32),
      V(
        name: "vcvtsd2si", map: 1, pp: 3, opcode: 0x2D, w: nil, vvvv: false, reg: .gpr, sizes: [4, 8], memory: (8, 8),
        fill: .float64),
      V(
        name: "vcvttsd2si", map: 1, pp: 3, opcode: 0x2C, w: nil, vvvv: false, reg: .gpr, sizes: [4, 8],
        memory: (8, 8), fill: .float64),
      V(name: "vucomiss", map: 1, pp: 0, opcode: 0x2E, vvvv: false, memory: (4, 4), fill: .float32, flags: allFlags),
      V(name: "vcomiss", map: 1, pp: 0, opcode: 0x2F, vvvv: false, memory: (4, 4), fill: .float32, flags: allFlags),
      V(name: "vucomisd", map: 1, pp: 1, opcode: 0x2E, vvvv: false, memory: (8, 8), fill: .float64, flags: allFlags),
      V(name: "vcomisd", map: 1, pp: 1, opcode: 0x2F, vvvv: false, memory: (8, 8), fill: .float64, flags: allFlags),
      V(name: "vmovlps load", map: 1, pp: 0, opcode: 0x12, rm: .memory, memory: (8, 8)),
      V(name: "vmovhlps", map: 1, pp: 0, opcode: 0x12, rm: .register),
      V(name: "vmovhps load", map: 1, pp: 0, opcode: 0x16, rm: .memory, memory: (8, 8)),
      V(name: "vmovlhps", map: 1, pp: 0, opcode: 0x16, rm: .register),
      V(name: "vmovlpd load", map: 1, pp: 1, opcode: 0x12, memory: (8, 8)),
      V(name: "vmovhpd load", map: 1, pp: 1, opcode: 0x16, memory: (8, 8)),
      V(name: "vmovlps store", map: 1, pp: 0, opcode: 0x13, vvvv: false, rm: .memory, memory: (8, 8)),
      V(name: "vmovhpd store", map: 1, pp: 1, opcode: 0x17, vvvv: false, memory: (8, 8)),
      V(name: "vmovsldup", map: 1, pp: 2, opcode: 0x12, vvvv: false),
      V(name: "vmovshdup", map: 1, pp: 2, opcode: 0x16, vvvv: false),
      V(name: "vmovddup", map: 1, pp: 3, opcode: 0x12, vvvv: false, memory: (8, 32)),
      V(name: "vmovmskps", map: 1, pp: 0, opcode: 0x50, vvvv: false, rm: .register, reg: .gpr),
      V(name: "vmovmskpd", map: 1, pp: 1, opcode: 0x50, vvvv: false, rm: .register, reg: .gpr),
      V(name: "vpmovmskb", map: 1, pp: 1, opcode: 0xD7, vvvv: false, rm: .register, reg: .gpr),
      V(
        name: "vmovd/q xmm, r/m", map: 1, pp: 1, opcode: 0x6E, w: nil, vvvv: false, rmSpace: .gpr, sizes: [4, 8],
        memory: (0, 0)),
      V(
        name: "vmovd/q r/m, xmm", map: 1, pp: 1, opcode: 0x7E, w: nil, vvvv: false, rmSpace: .gpr, sizes: [4, 8],
        memory: (0, 0)),
      V(name: "vmovq xmm, xmm/m64", map: 1, pp: 2, opcode: 0x7E, vvvv: false, memory: (8, 8)),
      V(name: "vmovq xmm/m64, xmm", map: 1, pp: 1, opcode: 0xD6, vvvv: false, memory: (8, 8)),
      V(name: "vpinsrw", map: 1, pp: 1, opcode: 0xC4, rmSpace: .gpr, memory: (2, 2), immediate: true),
      V(name: "vpextrw r, xmm", map: 1, pp: 1, opcode: 0xC5, vvvv: false, rm: .register, reg: .gpr, immediate: true),
      V(name: "vlddqu", map: 1, pp: 3, opcode: 0xF0, vvvv: false, rm: .memory),
      V(name: "vmaskmovdqu", map: 1, pp: 1, opcode: 0xF7, vvvv: false, rm: .register, special: .maskmov),
    ]
    for (name, opcode) in [
      ("vpsrlw", UInt8(0xD1)), ("vpsrld", 0xD2), ("vpsrlq", 0xD3), ("vpsraw", 0xE1), ("vpsrad", 0xE2),
      ("vpsllw", 0xF1), ("vpslld", 0xF2), ("vpsllq", 0xF3),
    ] {
      list.append(V(name: "\(name) by xmm/m128", map: 1, opcode: opcode, memory: (16, 16)))
    }
    for (name, opcode, ext) in [
      ("vpsrlw", UInt8(0x71), UInt8(2)), ("vpsraw", 0x71, 4), ("vpsllw", 0x71, 6), ("vpsrld", 0x72, 2),
      ("vpsrad", 0x72, 4), ("vpslld", 0x72, 6), ("vpsrlq", 0x73, 2), ("vpsrldq", 0x73, 3), ("vpsllq", 0x73, 6),
      ("vpslldq", 0x73, 7),
    ] {
      list.append(V(name: "\(name) by imm8", map: 1, opcode: opcode, ext: ext, rm: .register, immediate: true))
    }
    // 0F 38 map.
    let twoSource38: [(String, UInt8)] = [
      ("vpshufb", 0x00), ("vphaddw", 0x01), ("vphaddd", 0x02), ("vphaddsw", 0x03), ("vpmaddubsw", 0x04),
      ("vphsubw", 0x05), ("vphsubd", 0x06), ("vphsubsw", 0x07), ("vpsignb", 0x08), ("vpsignw", 0x09),
      ("vpsignd", 0x0A), ("vpmulhrsw", 0x0B), ("vpermilps (vector)", 0x0C), ("vpermilpd (vector)", 0x0D),
      ("vpermps", 0x16), ("vpmuldq", 0x28), ("vpcmpeqq", 0x29), ("vpackusdw", 0x2B), ("vpermd", 0x36),
      ("vpcmpgtq", 0x37), ("vpminsb", 0x38), ("vpminsd", 0x39), ("vpminuw", 0x3A), ("vpminud", 0x3B),
      ("vpmaxsb", 0x3C), ("vpmaxsd", 0x3D), ("vpmaxuw", 0x3E), ("vpmaxud", 0x3F), ("vpmulld", 0x40),
      ("vpsrlvd", 0x45), ("vpsravd", 0x46), ("vpsllvd", 0x47),
    ]
    for (name, opcode) in twoSource38 { list.append(V(name: name, map: 2, opcode: opcode)) }
    list += [
      V(name: "vpsrlvq", map: 2, opcode: 0x45, w: true),
      V(name: "vpsllvq", map: 2, opcode: 0x47, w: true),
      V(name: "vpsravq (W1)", map: 2, opcode: 0x46, w: true),
      V(name: "vtestps", map: 2, opcode: 0x0E, vvvv: false, flags: allFlags),
      V(name: "vtestpd", map: 2, opcode: 0x0F, vvvv: false, flags: allFlags),
      V(name: "vptest", map: 2, opcode: 0x17, vvvv: false, flags: allFlags),
      V(name: "vcvtph2ps", map: 2, opcode: 0x13, vvvv: false, memory: (8, 16)),
      V(name: "vbroadcastss", map: 2, opcode: 0x18, vvvv: false, memory: (4, 4)),
      V(name: "vbroadcastsd", map: 2, opcode: 0x19, vvvv: false, memory: (8, 8)),
      V(name: "vbroadcastf128", map: 2, opcode: 0x1A, vvvv: false, memory: (16, 16)),
      V(name: "vpbroadcastd", map: 2, opcode: 0x58, vvvv: false, memory: (4, 4)),
      V(name: "vpbroadcastq", map: 2, opcode: 0x59, vvvv: false, memory: (8, 8)),
      V(name: "vbroadcasti128", map: 2, opcode: 0x5A, vvvv: false, memory: (16, 16)),
      V(name: "vpbroadcastb", map: 2, opcode: 0x78, vvvv: false, memory: (1, 1)),
      V(name: "vpbroadcastw", map: 2, opcode: 0x79, vvvv: false, memory: (2, 2)),
      V(name: "vpabsb", map: 2, opcode: 0x1C, vvvv: false),
      V(name: "vpabsw", map: 2, opcode: 0x1D, vvvv: false),
      V(name: "vpabsd", map: 2, opcode: 0x1E, vvvv: false),
      V(name: "vmovntdqa", map: 2, opcode: 0x2A, vvvv: false, rm: .memory, alignment: true),
      V(name: "vphminposuw", map: 2, opcode: 0x41, vvvv: false),
      V(name: "vmaskmovps load", map: 2, opcode: 0x2C, rm: .memory),
      V(name: "vmaskmovpd load", map: 2, opcode: 0x2D, rm: .memory),
      V(name: "vmaskmovps store", map: 2, opcode: 0x2E, rm: .memory),
      V(name: "vmaskmovpd store", map: 2, opcode: 0x2F, rm: .memory),
      V(name: "vpmaskmovd load", map: 2, opcode: 0x8C, rm: .memory),
      V(name: "vpmaskmovq load", map: 2, opcode: 0x8C, w: true, rm: .memory),
      V(name: "vpmaskmovd store", map: 2, opcode: 0x8E, rm: .memory),
      V(name: "vpmaskmovq store", map: 2, opcode: 0x8E, w: true, rm: .memory),
      V(name: "vpermilps (W1)", map: 2, opcode: 0x0C, w: true),
    ]
    for (kind, base) in [("sx", UInt8(0x20)), ("zx", 0x30)] {
      for (suffix, offset, bytes) in [
        ("bw", UInt8(0), 8), ("bd", 1, 4), ("bq", 2, 2), ("wd", 3, 8), ("wq", 4, 4), ("dq", 5, 8),
      ] {
        list.append(
          V(name: "vpmov\(kind)\(suffix)", map: 2, opcode: base + offset, vvvv: false, memory: (bytes, bytes * 2)))
      }
    }
    // FMA3.
    let fmaKinds: [(String, UInt8, Bool)] = [
      ("vfmaddsub", 6, false), ("vfmsubadd", 7, false), ("vfmadd", 8, false), ("vfmadd", 9, true),
      ("vfmsub", 0xA, false), ("vfmsub", 0xB, true), ("vfnmadd", 0xC, false), ("vfnmadd", 0xD, true),
      ("vfnmsub", 0xE, false), ("vfnmsub", 0xF, true),
    ]
    for (order, high) in [("132", UInt8(0x90)), ("213", 0xA0), ("231", 0xB0)] {
      for (name, low, scalar) in fmaKinds {
        for double in [false, true] {
          let suffix = (scalar ? "s" : "p") + (double ? "d" : "s")
          let bytes = double ? 8 : 4
          list.append(
            V(
              name: "\(name)\(order)\(suffix)", map: 2, opcode: high | low, w: double,
              memory: scalar ? (bytes, bytes) : nil, fill: double ? .float64 : .float32))
        }
      }
    }
    // 0F 3A map.
    list += [
      V(name: "vpermq", map: 3, opcode: 0x00, w: true, vvvv: false, immediate: true),
      V(name: "vpermpd", map: 3, opcode: 0x01, w: true, vvvv: false, immediate: true, fill: .float64),
      V(name: "vpblendd", map: 3, opcode: 0x02, immediate: true),
      V(name: "vpermilps (imm8)", map: 3, opcode: 0x04, vvvv: false, immediate: true),
      V(name: "vpermilpd (imm8)", map: 3, opcode: 0x05, vvvv: false, immediate: true),
      V(name: "vperm2f128", map: 3, opcode: 0x06, immediate: true),
      V(name: "vroundps", map: 3, opcode: 0x08, vvvv: false, immediate: true, fill: .float32),
      V(name: "vroundpd", map: 3, opcode: 0x09, vvvv: false, immediate: true, fill: .float64),
      V(name: "vroundss", map: 3, opcode: 0x0A, memory: (4, 4), immediate: true, fill: .float32),
      V(name: "vroundsd", map: 3, opcode: 0x0B, memory: (8, 8), immediate: true, fill: .float64),
      V(name: "vblendps", map: 3, opcode: 0x0C, immediate: true),
      V(name: "vblendpd", map: 3, opcode: 0x0D, immediate: true),
      V(name: "vpblendw", map: 3, opcode: 0x0E, immediate: true),
      V(name: "vpalignr", map: 3, opcode: 0x0F, immediate: true),
      V(name: "vpextrb", map: 3, opcode: 0x14, vvvv: false, rmSpace: .gpr, memory: (1, 1), immediate: true),
      V(name: "vpextrw r/m16", map: 3, opcode: 0x15, vvvv: false, rmSpace: .gpr, memory: (2, 2), immediate: true),
      V(
        name: "vpextrd/q", map: 3, opcode: 0x16, w: nil, vvvv: false, rmSpace: .gpr, sizes: [4, 8], memory: (0, 0),
        immediate: true),
      V(name: "vextractps", map: 3, opcode: 0x17, vvvv: false, rmSpace: .gpr, memory: (4, 4), immediate: true),
      V(name: "vinsertf128", map: 3, opcode: 0x18, memory: (16, 16), immediate: true),
      V(name: "vextractf128", map: 3, opcode: 0x19, vvvv: false, memory: (16, 16), immediate: true),
      V(name: "vcvtps2ph", map: 3, opcode: 0x1D, vvvv: false, memory: (8, 16), immediate: true, fill: .float32),
      V(name: "vpinsrb", map: 3, opcode: 0x20, rmSpace: .gpr, memory: (1, 1), immediate: true),
      V(name: "vinsertps", map: 3, opcode: 0x21, memory: (4, 4), immediate: true),
      V(
        name: "vpinsrd/q", map: 3, opcode: 0x22, w: nil, rmSpace: .gpr, sizes: [4, 8], memory: (0, 0), immediate: true),
      V(name: "vinserti128", map: 3, opcode: 0x38, memory: (16, 16), immediate: true),
      V(name: "vextracti128", map: 3, opcode: 0x39, vvvv: false, memory: (16, 16), immediate: true),
      V(name: "vdpps", map: 3, opcode: 0x40, immediate: true, fill: .float32),
      V(name: "vdppd", map: 3, opcode: 0x41, immediate: true, fill: .float64),
      V(name: "vmpsadbw", map: 3, opcode: 0x42, immediate: true),
      V(name: "vpclmulqdq", map: 3, opcode: 0x44, immediate: true),
      V(name: "vperm2i128", map: 3, opcode: 0x46, immediate: true),
      V(name: "vblendvps", map: 3, opcode: 0x4A, immediate: true, fill: .float32),
      V(name: "vblendvpd", map: 3, opcode: 0x4B, immediate: true, fill: .float64),
      V(name: "vpblendvb", map: 3, opcode: 0x4C, immediate: true),
      V(name: "vpcmpestrm", map: 3, opcode: 0x60, vvvv: false, immediate: true, flags: allFlags),
      V(name: "vpcmpestri", map: 3, opcode: 0x61, vvvv: false, immediate: true, flags: allFlags),
      V(name: "vpcmpistrm", map: 3, opcode: 0x62, vvvv: false, immediate: true, flags: allFlags),
      V(name: "vpcmpistri", map: 3, opcode: 0x63, vvvv: false, immediate: true, flags: allFlags),
    ]
    // VPCLMULQDQ with VEX.256 belongs to the VPCLMULQDQ extension, which the model does not
    // offer (#UD there, the host may have it).
    return list.flatMap(vexForms).filter { $0.name != "vpclmulqdq ymm" }
  }
}
