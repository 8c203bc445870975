import VMCore

// AVX and AVX2 forms that move data across the 128-bit halves or have no SSE counterpart
// (Intel SDM vol. 2): VMOVMSKPS/PD and VPMOVMSKB of 256 bits, VPTEST/VTESTPS/VTESTPD, the
// broadcasts, VINSERTF128/VEXTRACTF128 (and the I128 forms), VPERM2F128/I128, VPERMILPS/PD,
// VPERMD/PS/Q/PD, VPBLENDD, VBLENDVPS/PD and VPBLENDVB, VMASKMOVPS/PD and VPMASKMOVD/Q, the
// per-element shifts (VPSLLVD/Q, VPSRLVD/Q, VPSRAVD), the gathers, and the 256-bit forms of the
// widening and narrowing conversions and of VPMOVSX/ZX (which run the SSE operation on prepared
// halves through `executeLaneWise`).
//
// Encoding rules checked here: VEX.vvvv must be 1111b where the form has no VEX.vvvv operand;
// VEX.W0 where the SDM lists W0 (W1 raises #UD); VEX.L = 1 where only the 256-bit form exists.
// Masked loads and stores touch only the elements whose mask bit is set (others never fault);
// a masked store checks every selected element before it writes any.

/// A 256-bit register value: qwords 0-1 are the low 128 bits (XMM), 2-3 the upper half.
typealias YMMValue = SIMD4<UInt64>

extension CPU {
  /// The full YMM register `index`.
  @inline(__always)
  func ymm(_ index: Int) -> YMMValue {
    YMMValue(xmm[index][0], xmm[index][1], ymmHigh[index][0], ymmHigh[index][1])
  }

  /// Writes YMM register `index`: all 256 bits when `wide`, else the low 128 with bits 255:128 zeroed.
  @inline(__always)
  func setYMM(_ index: Int, _ value: YMMValue, wide: Bool) {
    xmm[index] = XMMValue(value[0], value[1])
    ymmHigh[index] = wide ? XMMValue(value[2], value[3]) : .zero
    xsaveInUse |= wide ? XSaveModel.sse | XSaveModel.avx : XSaveModel.sse
  }

  /// The xmm/m128 (or, when `wide`, ymm/m256) r/m operand; the upper half is zero when not wide.
  func vectorOperand(_ ins: Instruction, wide: Bool) throws(Fault) -> YMMValue {
    if ins.hasMemoryOperand {
      let address = linearAddress(ins)
      let low = try read128(address, aligned: false)
      let high = wide ? try read128(address &+ 16, aligned: false) : .zero
      return YMMValue(low[0], low[1], high[0], high[1])
    }
    let value = ymm(Int(ins.rm))
    return wide ? value : YMMValue(value[0], value[1], 0, 0)
  }

  /// Executes the VEX forms of this file; false when `ins` is not one of them.
  func executeAVXPermute(_ ins: Instruction) throws(Fault) -> Bool {
    let prefix = ins.mandatoryPrefix
    let wide = ins.vexL
    switch ins.opcode {
    case 0x150 where prefix <= 1:
      try moveMask(ins, double: prefix == 1)
    case 0x1D7 where prefix == 1 && wide:
      guard ins.vexRegister == 0, !ins.hasMemoryOperand else { throw .invalidOpcode }
      let rm = Int(ins.rm)
      gpr[Int(ins.reg)] = UInt64(byteSignMask(xmm[rm])) | UInt64(byteSignMask(ymmHigh[rm])) << 16
    case 0x15A where prefix <= 1 && wide, 0x1E6 where prefix != 0 && wide:
      // Widening (VCVTPS2PD, VCVTDQ2PD) or narrowing (VCVTPD2PS, VCVT(T)PD2DQ) 256-bit conversions.
      guard ins.vexRegister == 0 else { throw .invalidOpcode }
      let widening = ins.opcode == 0x15A ? prefix == 0 : prefix == 2
      if widening {
        let source = try vectorOperand(ins, wide: false)
        try executeLaneWise(
          ins, form: .one, sources: VEXHalfSources(low: XMMValue(source[0], 0), high: XMMValue(source[1], 0)))
      } else {
        let source = try vectorOperand(ins, wide: true)
        try executeLaneWise(
          ins, form: .one,
          sources: VEXHalfSources(
            low: XMMValue(source[0], source[1]), high: XMMValue(source[2], source[3]), narrowing: true))
      }
    case 0x220...0x225 where prefix == 1 && wide, 0x230...0x235 where prefix == 1 && wide:
      try extendWide(ins)
    case 0x217 where prefix == 1 && wide, 0x20E where prefix == 1, 0x20F where prefix == 1:
      try vectorTest(ins)
    case 0x218, 0x219, 0x21A, 0x258, 0x259, 0x25A, 0x278, 0x279:
      guard prefix == 1 else { return false }
      try broadcast(ins)
    case 0x318, 0x338, 0x319, 0x339:
      guard prefix == 1 else { return false }
      try insertOrExtract128(ins)
    case 0x306, 0x346:
      guard prefix == 1 else { return false }
      guard wide, !ins.rexW else { throw .invalidOpcode }
      let first = ymm(Int(ins.vexRegister))
      let second = try vectorOperand(ins, wide: true)
      let halves = [
        XMMValue(first[0], first[1]), XMMValue(first[2], first[3]),
        XMMValue(second[0], second[1]), XMMValue(second[2], second[3]),
      ]
      var result = YMMValue()
      for half in 0..<2 {
        let control = Int(ins.immediate >> (4 * UInt64(half)))
        let value = control & 8 != 0 ? XMMValue.zero : halves[control & 3]
        result[2 * half] = value[0]
        result[2 * half + 1] = value[1]
      }
      setYMM(Int(ins.reg), result, wide: true)
    case 0x20C, 0x20D, 0x304, 0x305:
      guard prefix == 1 else { return false }
      try permuteInLane(ins)
    case 0x236, 0x216, 0x300, 0x301:
      guard prefix == 1 else { return false }
      try permuteAcrossLanes(ins)
    case 0x22C...0x22F, 0x28C, 0x28E:
      guard prefix == 1 else { return false }
      try maskedVectorMove(ins)
    case 0x34A, 0x34B, 0x34C:
      guard prefix == 1 else { return false }
      try variableBlend(ins)
    case 0x302:
      guard prefix == 1 else { return false }
      guard !ins.rexW else { throw .invalidOpcode }
      let first = unsafeBitCast(ymm(Int(ins.vexRegister)), to: SIMD8<UInt32>.self)
      var second = unsafeBitCast(try vectorOperand(ins, wide: wide), to: SIMD8<UInt32>.self)
      for index in 0..<(wide ? 8 : 4) where ins.immediate & (1 << UInt64(index)) == 0 { second[index] = first[index] }
      setYMM(Int(ins.reg), unsafeBitCast(second, to: YMMValue.self), wide: wide)
    case 0x245, 0x246, 0x247:
      guard prefix == 1 else { return false }
      try variableShift(ins)
    case 0x290...0x293:
      guard prefix == 1 else { return false }
      try gather(ins)
    default:
      return false
    }
    return true
  }

  /// VMOVMSKPS/VMOVMSKPD: the sign bits of every element into a general register.
  private func moveMask(_ ins: Instruction, double: Bool) throws(Fault) {
    guard ins.vexRegister == 0, !ins.hasMemoryOperand else { throw .invalidOpcode }
    let value = ymm(Int(ins.rm))
    var mask: UInt64 = 0
    if double {
      for index in 0..<(ins.vexL ? 4 : 2) { mask |= (value[index] >> 63) << UInt64(index) }
    } else {
      let dwords = unsafeBitCast(value, to: SIMD8<UInt32>.self)
      for index in 0..<(ins.vexL ? 8 : 4) { mask |= UInt64(dwords[index] >> 31) << UInt64(index) }
    }
    gpr[Int(ins.reg)] = mask
  }

  /// VPMOVSX*/VPMOVZX* with VEX.256: the SSE operation on the low and the high part of the source.
  private func extendWide(_ ins: Instruction) throws(Fault) {
    guard ins.vexRegister == 0 else { throw .invalidOpcode }
    let byte = UInt8(truncatingIfNeeded: ins.opcode)
    let sourceBytes: Int
    switch byte & 0xF {
    case 2: sourceBytes = 4
    case 1, 4: sourceBytes = 8
    default: sourceBytes = 16
    }
    var source: XMMValue
    if ins.hasMemoryOperand {
      let address = linearAddress(ins)
      switch sourceBytes {
      case 4: source = XMMValue(UInt64(try read32(address)), 0)
      case 8: source = XMMValue(try read64(address), 0)
      default: source = try read128(address, aligned: false)
      }
    } else {
      source = xmm[Int(ins.rm)]
    }
    let high: XMMValue
    switch sourceBytes {
    case 4: high = XMMValue((source[0] >> 16) & 0xFFFF, 0)
    case 8: high = XMMValue((source[0] >> 32) & 0xFFFF_FFFF, 0)
    default: high = XMMValue(source[1], 0)
    }
    try executeLaneWise(ins, form: .one, sources: VEXHalfSources(low: source, high: high))
  }

  /// VPTEST (all bits), VTESTPS and VTESTPD (sign bits): ZF and CF; AF, OF, PF, SF cleared.
  private func vectorTest(_ ins: Instruction) throws(Fault) {
    guard ins.vexRegister == 0, ins.opcode == 0x217 || !ins.rexW else { throw .invalidOpcode }
    let wide = ins.vexL
    let mask: YMMValue
    switch ins.opcode {
    case 0x20E: mask = YMMValue(repeating: 0x8000_0000_8000_0000)
    case 0x20F: mask = YMMValue(repeating: 0x8000_0000_0000_0000)
    default: mask = YMMValue(repeating: ~0)
    }
    let source = try vectorOperand(ins, wide: wide)
    var destination = ymm(Int(ins.reg))
    if !wide { destination = YMMValue(destination[0], destination[1], 0, 0) }
    let and = destination & source & mask
    let andNot = source & ~destination & mask
    var flags: UInt64 = 0
    if and == .zero { flags |= RFlags.zf }
    if andNot == .zero { flags |= RFlags.cf }
    setStatusFlags(flags)
  }

  /// VBROADCASTSS/SD/F128, VPBROADCASTB/W/D/Q, VBROADCASTI128.
  private func broadcast(_ ins: Instruction) throws(Fault) {
    guard ins.vexRegister == 0, !ins.rexW else { throw .invalidOpcode }
    let wide = ins.vexL
    let size: Int
    switch UInt8(truncatingIfNeeded: ins.opcode) {
    case 0x18, 0x58: size = 4
    case 0x19, 0x59: size = 8
    case 0x78: size = 1
    case 0x79: size = 2
    default: size = 16
    }
    // VBROADCASTSD and the 128-bit broadcasts exist only as VEX.256; the 128-bit ones from memory only.
    if (ins.opcode == 0x219 || size == 16) && !wide { throw .invalidOpcode }
    if size == 16 && !ins.hasMemoryOperand { throw .invalidOpcode }
    var value: XMMValue
    if ins.hasMemoryOperand {
      let address = linearAddress(ins)
      switch size {
      case 1: value = XMMValue(UInt64(try read8(address)), 0)
      case 2: value = XMMValue(UInt64(try read16(address)), 0)
      case 4: value = XMMValue(UInt64(try read32(address)), 0)
      case 8: value = XMMValue(try read64(address), 0)
      default: value = try read128(address, aligned: false)
      }
    } else {
      value = xmm[Int(ins.rm)]
    }
    var element = value[0]
    switch size {
    case 1: element = (element & 0xFF) &* 0x0101_0101_0101_0101
    case 2: element = (element & 0xFFFF) &* 0x0001_0001_0001_0001
    case 4: element = (element & 0xFFFF_FFFF) &* 0x0000_0001_0000_0001
    default: break
    }
    let low = size == 16 ? value : XMMValue(element, element)
    setYMM(Int(ins.reg), YMMValue(low[0], low[1], low[0], low[1]), wide: wide)
  }

  /// VINSERTF128/VINSERTI128 (0F 3A 18/38) and VEXTRACTF128/VEXTRACTI128 (0F 3A 19/39).
  private func insertOrExtract128(_ ins: Instruction) throws(Fault) {
    guard ins.vexL, !ins.rexW else { throw .invalidOpcode }
    let upper = ins.immediate & 1 != 0
    if ins.opcode & 1 == 0 {
      var result = ymm(Int(ins.vexRegister))
      let value = try vectorOperand(ins, wide: false)
      result[upper ? 2 : 0] = value[0]
      result[upper ? 3 : 1] = value[1]
      setYMM(Int(ins.reg), result, wide: true)
      return
    }
    guard ins.vexRegister == 0 else { throw .invalidOpcode }
    let reg = Int(ins.reg)
    let value = upper ? ymmHigh[reg] : xmm[reg]
    if ins.hasMemoryOperand {
      try write128(linearAddress(ins), value, aligned: false)
    } else {
      setYMM(Int(ins.rm), YMMValue(value[0], value[1], 0, 0), wide: false)
      // VEX.256 marks AVX in use although only an XMM register is written (as the host shows).
      xsaveInUse |= XSaveModel.avx
    }
  }

  /// VPERMILPS/VPERMILPD with a vector (0F 38 0C/0D) or immediate (0F 3A 04/05) control:
  /// elements chosen within each 128-bit half.
  private func permuteInLane(_ ins: Instruction) throws(Fault) {
    guard !ins.rexW else { throw .invalidOpcode }
    let wide = ins.vexL
    let byImmediate = ins.opcode >> 8 == 3
    if byImmediate && ins.vexRegister != 0 { throw .invalidOpcode }
    let table: YMMValue
    let control: YMMValue
    if byImmediate {
      table = try vectorOperand(ins, wide: wide)
      control = .zero
    } else {
      table = ymm(Int(ins.vexRegister))
      control = try vectorOperand(ins, wide: wide)
    }
    var result = YMMValue()
    if ins.opcode & 1 == 0 {
      let dwords = unsafeBitCast(table, to: SIMD8<UInt32>.self)
      let controls = unsafeBitCast(control, to: SIMD8<UInt32>.self)
      var out = SIMD8<UInt32>()
      for index in 0..<(wide ? 8 : 4) {
        let selector = byImmediate ? Int(ins.immediate >> UInt64(2 * (index & 3))) : Int(controls[index])
        out[index] = dwords[(index & ~3) | (selector & 3)]
      }
      result = unsafeBitCast(out, to: YMMValue.self)
    } else {
      for index in 0..<(wide ? 4 : 2) {
        let selector = byImmediate ? Int(ins.immediate >> UInt64(index)) & 1 : Int(control[index] >> 1) & 1
        result[index] = table[(index & ~1) | selector]
      }
    }
    setYMM(Int(ins.reg), result, wide: wide)
  }

  /// VPERMD/VPERMPS (0F 38 36/16: indices in VEX.vvvv) and VPERMQ/VPERMPD (0F 3A 00/01: imm8), VEX.256 only.
  private func permuteAcrossLanes(_ ins: Instruction) throws(Fault) {
    guard ins.vexL else { throw .invalidOpcode }
    if ins.opcode >> 8 == 3 {
      guard ins.rexW, ins.vexRegister == 0 else { throw .invalidOpcode }
      let source = try vectorOperand(ins, wide: true)
      var result = YMMValue()
      for index in 0..<4 { result[index] = source[Int(ins.immediate >> UInt64(2 * index)) & 3] }
      setYMM(Int(ins.reg), result, wide: true)
      return
    }
    guard !ins.rexW else { throw .invalidOpcode }
    let indices = unsafeBitCast(ymm(Int(ins.vexRegister)), to: SIMD8<UInt32>.self)
    let table = unsafeBitCast(try vectorOperand(ins, wide: true), to: SIMD8<UInt32>.self)
    var result = SIMD8<UInt32>()
    for index in 0..<8 { result[index] = table[Int(indices[index] & 7)] }
    setYMM(Int(ins.reg), unsafeBitCast(result, to: YMMValue.self), wide: true)
  }

  /// VMASKMOVPS/PD (0F 38 2C-2F) and VPMASKMOVD/Q (0F 38 8C/8E): elements whose mask (VEX.vvvv)
  /// sign bit is set are loaded (others zeroed) or stored (others left in memory).
  private func maskedVectorMove(_ ins: Instruction) throws(Fault) {
    let byte = UInt8(truncatingIfNeeded: ins.opcode)
    let integer = byte >= 0x8C
    guard ins.hasMemoryOperand, integer || !ins.rexW else { throw .invalidOpcode }
    let elementBytes = integer ? (ins.rexW ? 8 : 4) : (byte & 1 == 0 ? 4 : 8)
    let isStore = integer ? byte == 0x8E : byte >= 0x2E
    let wide = ins.vexL
    let count = (wide ? 32 : 16) / elementBytes
    let mask = ymm(Int(ins.vexRegister))
    let address = linearAddress(ins)
    func selected(_ index: Int) -> Bool {
      elementBytes == 8
        ? mask[index] >> 63 != 0 : (mask[index / 2] >> UInt64(32 * (index & 1) + 31)) & 1 != 0
    }
    if isStore {
      let data = ymm(Int(ins.reg))
      for index in 0..<count where selected(index) {
        try probeWrite(address &+ UInt64(index * elementBytes), UInt64(elementBytes))
      }
      for index in 0..<count where selected(index) {
        let target = address &+ UInt64(index * elementBytes)
        if elementBytes == 8 {
          try write64(target, data[index])
        } else {
          try write32(target, UInt32(truncatingIfNeeded: data[index / 2] >> UInt64(32 * (index & 1))))
        }
      }
      return
    }
    var result = YMMValue()
    for index in 0..<count where selected(index) {
      let source = address &+ UInt64(index * elementBytes)
      if elementBytes == 8 {
        result[index] = try read64(source)
      } else {
        result[index / 2] |= UInt64(try read32(source)) << UInt64(32 * (index & 1))
      }
    }
    setYMM(Int(ins.reg), result, wide: wide)
  }

  /// VBLENDVPS/VBLENDVPD/VPBLENDVB: the second source's element where the mask register's
  /// (imm8[7:4]) element sign bit is set, else the first source's (VEX.vvvv).
  private func variableBlend(_ ins: Instruction) throws(Fault) {
    guard !ins.rexW else { throw .invalidOpcode }
    let wide = ins.vexL
    let maskIndex = Int(ins.immediate >> 4) & (codeSize == 8 ? 15 : 7)
    let first = ymm(Int(ins.vexRegister))
    let second = try vectorOperand(ins, wide: wide)
    let mask = ymm(maskIndex)
    // Spread each element's sign bit over the element, then select bitwise.
    var select = YMMValue()
    for index in 0..<4 {
      let word = mask[index]
      switch ins.opcode {
      case 0x34B: select[index] = word >> 63 != 0 ? ~0 : 0
      case 0x34A:
        select[index] = (word >> 63 != 0 ? 0xFFFF_FFFF_0000_0000 : 0) | (word & (1 << 31) != 0 ? 0xFFFF_FFFF : 0)
      default:
        let signs = (word >> 7) & 0x0101_0101_0101_0101
        select[index] = signs &* 0xFF
      }
    }
    var result = (second & select) | (first & ~select)
    if !wide { result = YMMValue(result[0], result[1], 0, 0) }
    setYMM(Int(ins.reg), result, wide: wide)
  }

  /// VPSRLVD/Q (0F 38 45), VPSRAVD (46), VPSLLVD/Q (47): each element of VEX.vvvv shifted by the
  /// count in the same element of r/m (counts beyond the width give 0, or the sign for VPSRAVD).
  private func variableShift(_ ins: Instruction) throws(Fault) {
    let byte = UInt8(truncatingIfNeeded: ins.opcode)
    if byte == 0x46 && ins.rexW { throw .invalidOpcode }
    let wide = ins.vexL
    let value = ymm(Int(ins.vexRegister))
    let counts = try vectorOperand(ins, wide: wide)
    var result = YMMValue()
    if ins.rexW {
      for index in 0..<4 {
        let count = counts[index]
        if count > 63 { continue }
        result[index] = byte == 0x45 ? value[index] >> count : value[index] << count
      }
    } else {
      let elements = unsafeBitCast(value, to: SIMD8<UInt32>.self)
      let amounts = unsafeBitCast(counts, to: SIMD8<UInt32>.self)
      var out = SIMD8<UInt32>()
      for index in 0..<8 {
        let count = amounts[index]
        switch byte {
        case 0x45: out[index] = count > 31 ? 0 : elements[index] >> count
        case 0x46: out[index] = UInt32(bitPattern: Int32(bitPattern: elements[index]) >> min(count, 31))
        default: out[index] = count > 31 ? 0 : elements[index] << count
        }
      }
      result = unsafeBitCast(out, to: YMMValue.self)
    }
    if !wide { result = YMMValue(result[0], result[1], 0, 0) }
    setYMM(Int(ins.reg), result, wide: wide)
  }

  /// VPGATHERDD/DQ/QD/QQ and VGATHERDPS/DPD/QPS/QPD (0F 38 90-93): VSIB addressing (a vector of
  /// dword or qword indices), mask register VEX.vvvv. Elements are loaded in order; each loaded
  /// element clears its mask element, so a fault leaves the elements before it loaded and their
  /// mask cleared (the SDM's restartable behaviour). The mask ends all zero.
  private func gather(_ ins: Instruction) throws(Fault) {
    // ModRM must name a SIB byte (VSIB); destination, index and mask must all differ.
    guard ins.hasMemoryOperand, ins.modrm & 7 == 4, ins.addressSize != 2 else { throw .invalidOpcode }
    let indexRegister = ins.index == Instruction.noRegister ? 4 : Int(ins.index)
    let destination = Int(ins.reg)
    let maskRegister = Int(ins.vexRegister)
    guard destination != indexRegister, destination != maskRegister, indexRegister != maskRegister else {
      throw .invalidOpcode
    }
    let byte = UInt8(truncatingIfNeeded: ins.opcode)
    let qwordIndices = byte & 1 != 0
    let qwordElements = ins.rexW
    let wide = ins.vexL
    // Element count: by the wider of index and element at the vector length.
    let indexCount = (wide ? 32 : 16) / (qwordIndices ? 8 : 4)
    let elementCount = (wide ? 32 : 16) / (qwordElements ? 8 : 4)
    let count = min(indexCount, elementCount)
    // Result and mask occupy a register of the width of `count` elements.
    let resultWide = count * (qwordElements ? 8 : 4) > 16
    let indices = ymm(indexRegister)
    var mask = ymm(maskRegister)
    var result = ymm(destination)
    let baseAddress: UInt64 = {
      var probe = ins
      probe.index = Instruction.noRegister
      return linearAddress(probe)
    }()
    func element(_ value: YMMValue, _ index: Int, qword: Bool) -> UInt64 {
      qword ? value[index] : (value[index / 2] >> UInt64(32 * (index & 1))) & 0xFFFF_FFFF
    }
    func setElement(_ value: inout YMMValue, _ index: Int, qword: Bool, _ element: UInt64) {
      if qword {
        value[index] = element
      } else {
        let shift = UInt64(32 * (index & 1))
        value[index / 2] = (value[index / 2] & ~(0xFFFF_FFFF << shift)) | (element & 0xFFFF_FFFF) << shift
      }
    }
    func finish() {
      // Destination and mask parts that belong to no element (VPGATHERQD/VGATHERQPS) are zeroed.
      if count * (qwordElements ? 8 : 4) == 8 {
        result[1] = 0
        mask[1] = 0
      }
      setYMM(destination, result, wide: resultWide)
      setYMM(maskRegister, mask, wide: resultWide)
    }
    for index in 0..<count {
      let maskElement = element(mask, index, qword: qwordElements)
      guard maskElement >> (qwordElements ? 63 : 31) != 0 else { continue }
      let rawIndex = element(indices, index, qword: qwordIndices)
      let signedIndex = qwordIndices ? rawIndex : UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: rawIndex)))
      var address = baseAddress &+ (signedIndex << UInt64(ins.scaleShift))
      if ins.addressSize == 4 {
        let segment = segmentBase[Int(ins.segment)]
        address = segment &+ ((address &- segment) & 0xFFFF_FFFF)
      }
      let value: UInt64
      do {
        value = qwordElements ? try read64(address) : UInt64(try read32(address))
      } catch {
        finish()
        throw error
      }
      setElement(&result, index, qword: qwordElements, value)
      setElement(&mask, index, qword: qwordElements, 0)
    }
    // Mask elements beyond `count` (and the mask's upper half for 128-bit results) are zeroed.
    mask = .zero
    finish()
  }
}
