import CSoftFloat
import VMCore

// MMX (Intel SDM Vol. 1 ch. 9 and §9.5.1, Vol. 2 instruction pages): the no-prefix 0F forms of
// the integer SIMD instructions on the eight 64-bit MMX registers MM0-MM7, which are the
// significands of the x87 physical registers R0-R7 (REX.R/REX.B do not extend them). Every MMX
// instruction but EMMS moves the x87 unit into MMX state: TOP = 0 and every tag valid; a write
// of MMn sets bits 79:64 of Rn (sign and exponent) to all ones. EMMS (SSE.swift) empties the
// tags. CR0.EM raises #UD, CR0.TS #NM, a pending unmasked x87 exception #MF; CR4.OSFXSR is
// not needed. The arithmetic runs on the host's own MMX instructions (`csf_mmx`); moves,
// inserts, extracts, PSHUFW, PALIGNR and MASKMOVQ are done here.

/// Whether the no-prefix `.sse` opcode (0x1xx: 0F xx, 0x2xx: 0F 38 xx, 0x3xx: 0F 3A xx) is an
/// MMX form; the decoder then makes it `.mmx`. (Checked on every execution of an SSE
/// instruction, through a lazily initialized table, it cost the interpreter a fifth of its
/// speed on SSE floating-point code: `scripts/bench-interpreter.sh`.)
@inline(__always)
func isMMXForm(_ opcode: UInt16) -> Bool {
  switch opcode {
  case 0x160...0x16B, 0x16E...0x176, 0x17E...0x17F, 0x1C4...0x1C5, 0x1D1...0x1D5, 0x1D7...0x1DF, 0x1E0...0x1E5,
    0x1E7...0x1EF, 0x1F1...0x1F7, 0x1F8...0x1FE, 0x200...0x20B, 0x21C...0x21E, 0x30F:
    return true
  default:
    return false
  }
}

extension CPU {
  /// MMX register `index` (0-7): the significand of x87 physical register R`index`.
  @inline(__always)
  func mmxRegister(_ index: Int) -> UInt64 {
    UnsafeRawPointer(fpuRegisters + index).load(as: UInt64.self)
  }

  /// Writes MMX register `index`: the significand, with the sign and exponent all ones.
  @inline(__always)
  func setMMXRegister(_ index: Int, _ value: UInt64) {
    let raw = UnsafeMutableRawPointer(fpuRegisters + index)
    raw.storeBytes(of: value, as: UInt64.self)
    raw.storeBytes(of: 0xFFFF as UInt16, toByteOffset: 8, as: UInt16.self)
  }

  /// The x87-to-MMX transition every MMX instruction but EMMS makes.
  @inline(__always)
  private func enterMMXState() {
    fpuTop = 0
    fpuTags = 0
    xsaveInUse |= XSaveModel.x87
  }

  /// The mm/m64 source operand.
  private func mmxSource(_ instruction: Instruction) throws(Fault) -> UInt64 {
    if instruction.hasMemoryOperand { return try read64(linearAddress(instruction)) }
    return mmxRegister(Int(instruction.rm & 7))
  }

  /// Executes an MMX instruction (`.mmx`, see `isMMXForm`).
  func executeMMX(_ instruction: Instruction) throws(Fault) {
    guard cr0 & X86.cr0EM == 0 else { throw .invalidOpcode }
    guard cr0 & X86.cr0TS == 0 else { throw .deviceNotAvailable }
    try checkPendingX87Exception()
    let reg = Int(instruction.reg & 7)
    let rm = Int(instruction.rm & 7)
    let immediate = instruction.immediate & 0xFF
    switch instruction.opcode {
    case 0x16E:  // MOVD/MOVQ mm, r/m32/64
      let size: UInt8 = instruction.rexW ? 8 : 4
      let value =
        instruction.hasMemoryOperand
        ? try readMemory(linearAddress(instruction), size: size) : readRegister(instruction.rm, size: size)
      enterMMXState()
      setMMXRegister(reg, value)
    case 0x17E:  // MOVD/MOVQ r/m32/64, mm
      let size: UInt8 = instruction.rexW ? 8 : 4
      let value = mmxRegister(reg) & (size == 8 ? ~0 : 0xFFFF_FFFF)
      if instruction.hasMemoryOperand {
        try writeMemory(linearAddress(instruction), size: size, value)
      } else {
        writeRegister(instruction.rm, size: size, value)
      }
      enterMMXState()
    case 0x16F:  // MOVQ mm, mm/m64
      let value = try mmxSource(instruction)
      enterMMXState()
      setMMXRegister(reg, value)
    case 0x17F, 0x1E7:  // MOVQ mm/m64, mm; MOVNTQ m64, mm
      let value = mmxRegister(reg)
      if instruction.hasMemoryOperand {
        try write64(linearAddress(instruction), value)
        enterMMXState()
      } else {
        guard instruction.opcode == 0x17F else { throw .invalidOpcode }
        enterMMXState()
        setMMXRegister(rm, value)
      }
    case 0x170:  // PSHUFW mm, mm/m64, imm8
      let source = try mmxSource(instruction)
      var result: UInt64 = 0
      for word in 0..<4 {
        let selected = (immediate >> (2 * UInt64(word))) & 3
        result |= ((source >> (16 * selected)) & 0xFFFF) << (16 * UInt64(word))
      }
      enterMMXState()
      setMMXRegister(reg, result)
    case 0x171, 0x172, 0x173:  // shift groups by imm8: /2 logical right, /4 arithmetic right, /6 left
      guard !instruction.hasMemoryOperand else { throw .invalidOpcode }
      let width = instruction.opcode & 0xFF  // 0x71 words, 0x72 doublewords, 0x73 quadword
      let operation: UInt32
      switch (instruction.reg & 7, width) {
      case (2, 0x71): operation = 0xD1
      case (4, 0x71): operation = 0xE1
      case (6, 0x71): operation = 0xF1
      case (2, 0x72): operation = 0xD2
      case (4, 0x72): operation = 0xE2
      case (6, 0x72): operation = 0xF2
      case (2, 0x73): operation = 0xD3
      case (6, 0x73): operation = 0xF3
      default: throw .invalidOpcode
      }
      var value = mmxRegister(rm)
      var count = immediate
      guard csf_mmx(operation, &value, &count) == 0 else { throw .invalidOpcode }
      enterMMXState()
      setMMXRegister(rm, value)
    case 0x1C4:  // PINSRW mm, r32/m16, imm8
      let word =
        instruction.hasMemoryOperand
        ? UInt64(try read16(linearAddress(instruction))) : readRegister(instruction.rm, size: 2)
      let shift = 16 * (immediate & 3)
      let value = mmxRegister(reg) & ~(0xFFFF << shift) | word << shift
      enterMMXState()
      setMMXRegister(reg, value)
    case 0x1C5:  // PEXTRW r32, mm, imm8
      guard !instruction.hasMemoryOperand else { throw .invalidOpcode }
      let word = (mmxRegister(rm) >> (16 * (immediate & 3))) & 0xFFFF
      enterMMXState()
      writeRegister(instruction.reg, size: 4, word)
    case 0x1D7:  // PMOVMSKB r32, mm
      guard !instruction.hasMemoryOperand else { throw .invalidOpcode }
      let value = mmxRegister(rm)
      var mask: UInt64 = 0
      for byte in 0..<8 where value & (0x80 << (8 * UInt64(byte))) != 0 { mask |= 1 << UInt64(byte) }
      enterMMXState()
      writeRegister(instruction.reg, size: 4, mask)
    case 0x1F7:  // MASKMOVQ mm1, mm2: bytes of mm1 whose mm2 byte has bit 7 set, to DS:rDI
      guard !instruction.hasMemoryOperand else { throw .invalidOpcode }
      let data = mmxRegister(reg)
      let mask = mmxRegister(rm)
      var offset = gpr[7]
      switch instruction.addressSize {
      case 4: offset &= 0xFFFF_FFFF
      case 2: offset &= 0xFFFF
      default: break
      }
      let base = segmentBase[Int(instruction.segment)] &+ offset
      for byte in 0..<8 where mask & (0x80 << (8 * UInt64(byte))) != 0 {
        try write8(base &+ UInt64(byte), UInt8(truncatingIfNeeded: data >> (8 * UInt64(byte))))
      }
      enterMMXState()
    case 0x30F:  // PALIGNR mm, mm/m64, imm8: (mm:source) >> (imm8 * 8), low 64 bits
      let source = try mmxSource(instruction)
      let destination = mmxRegister(reg)
      let shift = immediate * 8
      let result: UInt64
      switch shift {
      case 0: result = source
      case 1..<64: result = source >> shift | destination << (64 - shift)
      case 64: result = destination
      case 65..<128: result = destination >> (shift - 64)
      default: result = 0
      }
      enterMMXState()
      setMMXRegister(reg, result)
    default:  // arithmetic, logic, compares, packs, unpacks on the host
      var source = try mmxSource(instruction)
      var destination = mmxRegister(reg)
      let map: UInt32 = instruction.opcode >> 8 == 2 ? UInt32(CSF_SSE_MAP38) : 0
      guard csf_mmx(map | UInt32(instruction.opcode & 0xFF), &destination, &source) == 0 else {
        throw .invalidOpcode
      }
      enterMMXState()
      setMMXRegister(reg, destination)
    }
  }
}

extension CPU {
  /// The SSE instructions with an MMX operand (SDM Vol. 2): CVTPI2PS and CVTPI2PD (NP/66 0F 2A),
  /// CVTTPS2PI and CVTTPD2PI (NP/66 0F 2C), CVTPS2PI and CVTPD2PI (NP/66 0F 2D), MOVQ2DQ
  /// (F3 0F D6) and MOVDQ2Q (F2 0F D6). The caller checked the SSE availability rules (CR0.EM,
  /// CR0.TS, CR4.OSFXSR). A form that touches an MMX register first takes a pending x87
  /// exception (#MF) and makes the x87-to-MMX transition (TOP = 0, every tag valid); CVTPI2PS
  /// and CVTPI2PD with a memory operand touch no MMX register and do neither (as the host shows). The conversions run on the
  /// host as the SSE conversion of the same elements (CVTDQ2PS, CVTDQ2PD, CVT(T)PS2DQ,
  /// CVT(T)PD2DQ) under the guest's MXCSR: rounding, the integer indefinite 0x80000000 for NaN
  /// and out-of-range values, and the IE/PE flags are the host's.
  func executeMMXConversion(_ instruction: Instruction, prefix: UInt8) throws(Fault) {
    let opcode = instruction.opcode
    let reg = Int(instruction.reg)
    let rm = Int(instruction.rm)
    let touchesMMX = !(opcode == 0x12A && instruction.hasMemoryOperand)
    if opcode == 0x1D6 && instruction.hasMemoryOperand { throw .invalidOpcode }
    if touchesMMX { try checkPendingX87Exception() }
    switch (opcode, prefix) {
    case (0x12A, 0), (0x12A, 1):  // CVTPI2PS xmm, mm/m64; CVTPI2PD xmm, mm/m64
      let integers =
        instruction.hasMemoryOperand ? try read64(linearAddress(instruction)) : mmxRegister(rm & 7)
      var result = xmm[reg]
      var source = XMMValue(integers, 0)
      // CVTDQ2PS (0F 5B) or CVTDQ2PD (F3 0F E6) of the two doublewords.
      let raised = runHostFloat(prefix == 0 ? 0x5B : 0x2E6, 0, &result, &source)
      guard raised != CSF_UNSUPPORTED else { throw .invalidOpcode }
      if touchesMMX { enterMMXState() }
      try commitSIMDExceptions(raised)
      // CVTPI2PS keeps the destination's upper two singles.
      xmm[reg] = prefix == 0 ? XMMValue(result[0], xmm[reg][1]) : result
    case (0x12C, 0), (0x12D, 0), (0x12C, 1), (0x12D, 1):
      // CVT(T)PS2PI mm, xmm/m64; CVT(T)PD2PI mm, xmm/m128.
      var source: XMMValue
      if prefix == 0 {
        source = instruction.hasMemoryOperand ? XMMValue(try read64(linearAddress(instruction)), 0) : xmm[rm]
        source[1] = 0  // +0.0 in the unused elements: converts to 0 and raises nothing
      } else {
        source = try source128(instruction, aligned: true)
      }
      let truncate = opcode == 0x12C
      // CVTTPS2DQ (F3 0F 5B), CVTPS2DQ (66 0F 5B), CVTTPD2DQ (66 0F E6), CVTPD2DQ (F2 0F E6).
      let operation: UInt32 = prefix == 0 ? (truncate ? 0x25B : 0x15B) : (truncate ? 0x1E6 : 0x3E6)
      var result = XMMValue.zero
      let raised = runHostFloat(operation, 0, &result, &source)
      guard raised != CSF_UNSUPPORTED else { throw .invalidOpcode }
      enterMMXState()
      try commitSIMDExceptions(raised)
      setMMXRegister(reg & 7, result[0])
    case (0x1D6, 2):  // MOVQ2DQ xmm, mm
      let value = mmxRegister(rm & 7)
      enterMMXState()
      xmm[reg] = XMMValue(value, 0)
    case (0x1D6, 3):  // MOVDQ2Q mm, xmm
      let value = xmm[rm][0]
      enterMMXState()
      setMMXRegister(reg & 7, value)
    default:
      throw .invalidOpcode
    }
  }
}
