import VMCore

// AVX: the VEX-encoded vector instructions (Intel SDM vol. 1 ch. 14, vol. 2 ch. 2.3-2.4).
//
// Availability: #UD unless CR4.OSXSAVE = 1 and XCR0 enables SSE and AVX; #NM with CR0.TS
// (CR0.EM and CR4.OSFXSR play no part). A VEX.128 form writes the low 128 bits of its
// destination and zeroes bits 255:128; a VEX.256 form writes all 256. Memory operands need no
// alignment, except the explicitly aligned moves (16 bytes for VEX.128, 32 for VEX.256).
//
// Lane-wise forms reuse the SSE unit's operations (`executeSSEOperation`): the low half runs on
// VEX.vvvv's (or, for one-source forms, nothing's) low 128 bits and the r/m operand's low 128
// bits, the high half on the upper halves (memory + 16), both into the scratch register 17,
// with the register source copied to scratch register 16 first, so nothing is written before
// both halves have run. An exception in the high half leaves the destination unchanged.
// Forms with general-register or memory destinations run the SSE operation unchanged
// (`executeDirect`). Forms that move data across the 128-bit halves (broadcasts, permutes,
// inserts/extracts, masked moves, variable blends, the widening and narrowing conversions,
// gathers) and FMA/F16C are in AVXPermute.swift and AVXArithmetic.swift.
//
// XINUSE: a VEX.128 form (which zeroes bits 255:128) marks only SSE in use, a VEX.256 form that
// writes a vector register AVX too (also when the register written is an XMM register, as in
// the narrowing conversions, VCVTPS2PH and VEXTRACTF128), as the host CPU shows.
//
// Every other VEX vector form raises #UD.

/// How a VEX form maps onto the SSE unit's operation of the same opcode.
struct VEXLaneForm {
  /// Which VEX.L values the form accepts.
  enum Length {
    /// VEX.128 and VEX.256 (the operation runs on each 128-bit half).
    case both
    /// VEX.128 only; VEX.L = 1 raises #UD.
    case only128
    /// Scalar forms: VEX.L is ignored, bits 255:128 of the destination are zeroed.
    case ignored
  }
  var length: Length = .both
  /// dest = op(vvvv, r/m); false: dest = op(r/m) and VEX.vvvv must be 1111b.
  var usesVVVV = true
  /// The r/m operand names a general register (CVTSI2SS/SD, PINSRW/B/D/Q).
  var rmIsGeneral = false
  /// The 128-bit r/m operand serves both halves (the count of PSLL/PSRL/PSRA by xmm/m128).
  var sharedSource = false
  /// Shifts by immediate: VEX.vvvv is the destination, r/m the source, ModRM.reg the operation.
  var destinationIsVVVV = false
  /// The high half takes its immediate shifted right by this many bits (VSHUFPD 2, VBLENDPS 4,
  /// VBLENDPD 2, VMPSADBW 3).
  var highImmediateShift: UInt64 = 0

  static let two = VEXLaneForm()
  static let one = VEXLaneForm(usesVVVV: false)
  static let two128 = VEXLaneForm(length: .only128)
  static let one128 = VEXLaneForm(length: .only128, usesVVVV: false)
  static let scalar = VEXLaneForm(length: .ignored)
}

/// Inputs of the two halves prepared by the caller instead of vvvv and r/m (conversions and
/// sign/zero extensions whose 256-bit form widens or narrows).
struct VEXHalfSources {
  var low: XMMValue
  var high: XMMValue
  /// The result is the low 64 bits of each half's result, in the low 128 bits (narrowing).
  var narrowing = false
}

extension CPU {
  /// Executes a VEX-encoded vector instruction.
  func executeAVX(_ ins: Instruction) throws(Fault) {
    guard cr4 & X86.cr4OSXSAVE != 0, xcr0 & (XSaveModel.sse | XSaveModel.avx) == XSaveModel.sse | XSaveModel.avx
    else { throw .invalidOpcode }
    guard cr0 & X86.cr0TS == 0 else { throw .deviceNotAvailable }
    switch ins.opcode {
    case 0x177:  // VZEROUPPER (L = 0), VZEROALL (L = 1)
      guard ins.vexRegister == 0, ins.mandatoryPrefix == 0 else { throw .invalidOpcode }
      for index in 0..<16 { ymmHigh[index] = .zero }
      if ins.vexL {
        for index in 0..<16 { xmm[index] = .zero }
      }
      // Both leave their components in the initial configuration, as the host reports it.
      xsaveInUse &= ins.vexL ? ~(XSaveModel.sse | XSaveModel.avx) : ~XSaveModel.avx
    case 0x110, 0x111, 0x128, 0x129, 0x16F, 0x17F, 0x12B, 0x1E7:
      try vectorMove(ins)
    case 0x296...0x29F, 0x2A6...0x2AF, 0x2B6...0x2BF:
      try fusedMultiplyAdd(ins)
    case 0x213, 0x31D:
      try halfPrecisionConversion(ins)
    case 0x340 where ins.mandatoryPrefix == 1, 0x341 where ins.mandatoryPrefix == 1:  // VDPPS, VDPPD
      try vexDotProduct(ins)
    default:
      if try executeAVXPermute(ins) { return }
      if let shape = vexDirectForm(ins) {
        try executeDirect(ins, allowsWide: shape)
        return
      }
      guard let form = vexLaneForm(ins) else { throw .invalidOpcode }
      try executeLaneWise(ins, form: form)
    }
  }

  /// VEX forms that run the SSE operation unchanged (VEX.vvvv = 1111b, general-register or
  /// memory destinations, or VEX.128 loads that zero bits 255:128): nil when the form is not
  /// one, else whether VEX.L is ignored (true) or must be 0 (false).
  private func vexDirectForm(_ ins: Instruction) -> Bool? {
    let byte = UInt8(truncatingIfNeeded: ins.opcode)
    let prefix = ins.mandatoryPrefix
    switch ins.opcode >> 8 {
    case 1:
      switch byte {
      case 0x2C, 0x2D: return prefix >= 2 ? true : nil  // VCVT(T)SS2SI / VCVT(T)SD2SI
      case 0x2E, 0x2F: return prefix <= 1 ? true : nil  // V(U)COMISS/SD
      case 0x13, 0x17: return prefix <= 1 ? false : nil  // VMOVLPS/PD, VMOVHPS/PD stores
      case 0x6E, 0xC5, 0xD6, 0xF7: return prefix == 1 ? false : nil  // VMOVD/Q, VPEXTRW, VMOVQ, VMASKMOVDQU
      case 0x7E: return prefix == 1 || prefix == 2 ? false : nil  // VMOVD/Q r/m, xmm; VMOVQ xmm, xmm/m64
      case 0xD7: return prefix == 1 && !ins.vexL ? false : nil  // VPMOVMSKB (VEX.256 in AVXPermute)
      default: return nil
      }
    case 2:
      return byte == 0x17 && prefix == 1 && !ins.vexL ? false : nil  // VPTEST xmm
    default:
      switch byte {
      case 0x14...0x17, 0x60...0x63: return prefix == 1 ? false : nil  // VPEXTR*, VEXTRACTPS, VPCMP?STR?
      default: return nil
      }
    }
  }

  /// Runs an SSE operation as its VEX form: VEX.vvvv must be 1111b; a vector register the
  /// operation writes has bits 255:128 zeroed.
  private func executeDirect(_ ins: Instruction, allowsWide: Bool) throws(Fault) {
    guard ins.vexRegister == 0, allowsWide || !ins.vexL else { throw .invalidOpcode }
    var operation = ins
    operation.op = .sse
    operation.rexW = ins.operandSize == 8
    vexOperationActive = true
    defer { vexOperationActive = false }
    try executeSSEOperation(operation)
    guard ins.writesVectorRegister else { return }
    let byte = UInt8(truncatingIfNeeded: ins.opcode)
    if ins.opcode >> 8 == 3 {
      ymmHigh[0] = .zero  // VPCMPESTRM/VPCMPISTRM write XMM0
    } else if byte == 0xD6 {
      ymmHigh[Int(ins.rm)] = .zero
    } else {
      ymmHigh[Int(ins.reg)] = .zero
    }
  }

  /// The lane form of a VEX form that runs through the SSE unit, nil when it is not one.
  private func vexLaneForm(_ ins: Instruction) -> VEXLaneForm? {
    let byte = UInt8(truncatingIfNeeded: ins.opcode)
    let prefix = ins.mandatoryPrefix
    switch ins.opcode >> 8 {
    case 1:
      switch byte {
      case 0x54...0x57, 0x14, 0x15:  // logic, UNPCKL/H
        return prefix <= 1 ? .two : nil
      case 0xC6:  // VSHUFPS/PD
        return prefix == 0 ? .two : prefix == 1 ? VEXLaneForm(highImmediateShift: 2) : nil
      case 0x58, 0x59, 0x5C...0x5F, 0xC2:  // arithmetic, min/max, compares
        return prefix >= 2 ? .scalar : .two
      case 0x51:  // VSQRTPS/PD one source; VSQRTSS/SD merge into vvvv
        return prefix >= 2 ? .scalar : .one
      case 0x52, 0x53:  // VRSQRT/VRCP PS one source, SS two
        return prefix == 2 ? .scalar : prefix == 0 ? .one : nil
      case 0x5A:  // VCVTPS2PD/VCVTPD2PS (VEX.256 in AVXPermute), VCVTSS2SD/VCVTSD2SS
        return prefix >= 2 ? .scalar : .one
      case 0x5B:  // VCVTDQ2PS, VCVTPS2DQ, VCVTTPS2DQ
        return prefix <= 2 ? .one : nil
      case 0xE6:  // VCVTTPD2DQ, VCVTDQ2PD, VCVTPD2DQ (VEX.256 in AVXPermute)
        return prefix != 0 ? .one : nil
      case 0x2A:  // VCVTSI2SS/SD
        return prefix >= 2 ? VEXLaneForm(length: .ignored, rmIsGeneral: true) : nil
      case 0x12, 0x16:
        switch prefix {
        case 0, 1: return .two128  // VMOVLPS/PD, VMOVHLPS, VMOVHPS/PD, VMOVLHPS
        case 2: return .one  // VMOVSLDUP, VMOVSHDUP
        default: return byte == 0x12 ? .one : nil  // VMOVDDUP
        }
      case 0xD0, 0x7C, 0x7D:  // ADDSUB, HADD, HSUB
        return prefix == 1 || prefix == 3 ? .two : nil
      case 0x60...0x6B, 0x6C, 0x6D, 0x74...0x76, 0xD4, 0xD5, 0xD8...0xDF, 0xE0, 0xE3...0xE5, 0xE8...0xEF, 0xF4...0xF6,
        0xF8...0xFE:
        // Integer: unpacks, packs, compares, add/sub/mul/avg/min/max/logic, PSADBW, PMADDWD.
        return prefix == 1 ? .two : nil
      case 0xD1...0xD3, 0xE1, 0xE2, 0xF1...0xF3:  // shifts by the count in xmm/m128
        return prefix == 1 ? VEXLaneForm(sharedSource: true) : nil
      case 0x71...0x73:  // shifts by immediate
        return prefix == 1 && !ins.hasMemoryOperand ? VEXLaneForm(usesVVVV: false, destinationIsVVVV: true) : nil
      case 0x70:  // VPSHUFD/HW/LW
        return prefix >= 1 ? .one : nil
      case 0xC4:  // VPINSRW
        return prefix == 1 ? VEXLaneForm(length: .only128, rmIsGeneral: true) : nil
      case 0xF0:  // VLDDQU
        return prefix == 3 && ins.hasMemoryOperand ? .one : nil
      default:
        return nil
      }
    case 2:
      guard prefix == 1 else { return nil }
      switch byte {
      case 0x00...0x0B, 0x28, 0x29, 0x2B, 0x37...0x40:
        return .two
      case 0x1C...0x1E, 0x2A:  // VPABSB/W/D, VMOVNTDQA
        return .one
      case 0x20...0x25, 0x30...0x35:  // VPMOVSX/ZX (VEX.256 in AVXPermute)
        return .one
      case 0x41:  // VPHMINPOSUW
        return .one128
      default:
        return nil
      }
    default:
      guard prefix == 1 else { return nil }
      switch byte {
      case 0x08, 0x09: return .one  // VROUNDPS/PD
      case 0x0A, 0x0B: return .scalar  // VROUNDSS/SD
      case 0x0C: return VEXLaneForm(highImmediateShift: 4)  // VBLENDPS
      case 0x0D: return VEXLaneForm(highImmediateShift: 2)  // VBLENDPD
      case 0x0E, 0x0F: return .two  // VPBLENDW, VPALIGNR
      case 0x44, 0x21: return .two128  // VPCLMULQDQ, VINSERTPS
      case 0x42: return VEXLaneForm(highImmediateShift: 3)  // VMPSADBW
      case 0x20, 0x22: return VEXLaneForm(length: .only128, rmIsGeneral: true)  // VPINSRB/D/Q
      default: return nil
      }
    }
  }

  /// Runs a lane-wise VEX form through the SSE operation of the same opcode, one 128-bit half
  /// at a time (`sources`: the halves' inputs prepared by the caller instead of r/m).
  func executeLaneWise(_ ins: Instruction, form: VEXLaneForm, sources: VEXHalfSources? = nil) throws(Fault) {
    if !form.usesVVVV && !form.destinationIsVVVV && ins.vexRegister != 0 { throw .invalidOpcode }
    if form.length == .only128 && ins.vexL { throw .invalidOpcode }
    let halves = ins.vexL && form.length == .both ? 2 : 1
    // VMOVNTDQA: 32-byte alignment for VEX.256 (each half checks 16).
    if ins.opcode == 0x22A && ins.vexL && ins.hasMemoryOperand && linearAddress(ins) & 31 != 0 {
      throw .generalProtection(0)
    }
    var operation = ins
    operation.op = .sse
    operation.rexW = ins.operandSize == 8
    if form.destinationIsVVVV {
      operation.rm = 17
    } else {
      operation.reg = 17
      if sources != nil {
        operation.hasMemoryOperand = false
        operation.rm = 16
      } else if !ins.hasMemoryOperand && !form.rmIsGeneral {
        operation.rm = 16
      }
    }
    vexOperationActive = true
    defer { vexOperationActive = false }
    let source1 = Int(ins.vexRegister)
    let source2 = Int(ins.rm)
    // Each half runs with the MXCSR flags cleared; their flags then combine as one
    // instruction's: an unmasked pre-computation exception in either half suppresses the
    // post-computation flags of both, and either half's unmasked exception stops the whole
    // instruction. A memory fault wins over both and leaves MXCSR as it was.
    let original = mxcsr
    var raised: UInt32 = 0
    var unmaskedException = false
    var results = (low: XMMValue.zero, high: XMMValue.zero)
    for half in 0..<halves {
      let upper = half == 1
      if form.destinationIsVVVV {
        xmm[17] = upper ? ymmHigh[source2] : xmm[source2]
      } else {
        xmm[17] = form.usesVVVV ? (upper ? ymmHigh[source1] : xmm[source1]) : .zero
        if let sources {
          xmm[16] = upper ? sources.high : sources.low
        } else if ins.hasMemoryOperand {
          if upper && !form.sharedSource { operation.displacement &+= 16 }
        } else if !form.rmIsGeneral {
          xmm[16] = upper && !form.sharedSource ? ymmHigh[source2] : xmm[source2]
        }
      }
      if upper { operation.immediate = ins.immediate >> form.highImmediateShift }
      mxcsr = original & ~MXCSR.flags
      do {
        try executeSSEOperation(operation)
      } catch {
        let flags = mxcsr & MXCSR.flags
        let simdException =
          (error == .simdError || error == .invalidOpcode) && flags & ~(original >> 7) & MXCSR.flags != 0
        guard simdException else {
          mxcsr = original
          throw error
        }
        unmaskedException = true
      }
      raised |= mxcsr & MXCSR.flags
      if upper { results.high = xmm[17] } else { results.low = xmm[17] }
    }
    if raised & ~(original >> 7) & MXCSR.precomputationFlags != 0 { raised &= MXCSR.precomputationFlags }
    mxcsr = original | raised
    if unmaskedException { throw cr4 & X86.cr4OSXMMEXCPT != 0 ? .simdError : .invalidOpcode }
    let destination = form.destinationIsVVVV ? source1 : Int(ins.reg)
    if sources?.narrowing ?? false {
      xmm[destination] = XMMValue(results.low[0], results.high[0])
      ymmHigh[destination] = .zero
    } else {
      xmm[destination] = results.low
      ymmHigh[destination] = results.high
    }
    // A VEX.256 form marks AVX in use even when it writes only an XMM register (the narrowing
    // conversions), as the host CPU shows.
    xsaveInUse |= ins.vexL && form.length == .both ? XSaveModel.sse | XSaveModel.avx : XSaveModel.sse
  }

  /// VMOVUPS/VMOVUPD (0F 10/11 without or with 66), VMOVSS/VMOVSD (F3/F2 0F 10/11), VMOVAPS/
  /// VMOVAPD (0F 28/29), VMOVDQA/VMOVDQU (66/F3 0F 6F/7F), VMOVNTPS/PD (0F 2B), VMOVNTDQ (66 0F E7).
  private func vectorMove(_ ins: Instruction) throws(Fault) {
    let prefix = ins.mandatoryPrefix
    let reg = Int(ins.reg)
    let isStore: Bool
    let aligned: Bool
    switch ins.opcode {
    case 0x110, 0x111:
      if prefix >= 2 {
        try scalarMove(ins)
        return
      }
      isStore = ins.opcode == 0x111
      aligned = false
    case 0x128, 0x129:
      guard prefix <= 1 else { throw .invalidOpcode }
      isStore = ins.opcode == 0x129
      aligned = true
    case 0x12B, 0x1E7:
      guard ins.hasMemoryOperand, ins.opcode == 0x12B ? prefix <= 1 : prefix == 1 else { throw .invalidOpcode }
      isStore = true
      aligned = true
    default:  // 0x16F, 0x17F
      guard prefix == 1 || prefix == 2 else { throw .invalidOpcode }
      isStore = ins.opcode == 0x17F
      aligned = prefix == 1
    }
    guard ins.vexRegister == 0 else { throw .invalidOpcode }
    let width: UInt64 = ins.vexL ? 32 : 16
    if ins.hasMemoryOperand {
      let address = linearAddress(ins)
      if aligned && address & (width - 1) != 0 { throw .generalProtection(0) }
      if isStore {
        if ins.vexL {
          // Both halves checked before either is written.
          try probeWrite(address, 32)
          try write128(address, xmm[reg], aligned: false)
          try write128(address &+ 16, ymmHigh[reg], aligned: false)
        } else {
          try write128(address, xmm[reg], aligned: false)
        }
      } else {
        let low = try read128(address, aligned: false)
        let high = ins.vexL ? try read128(address &+ 16, aligned: false) : .zero
        xmm[reg] = low
        ymmHigh[reg] = high
        xsaveInUse |= ins.vexL ? XSaveModel.sse | XSaveModel.avx : XSaveModel.sse
      }
    } else {
      let (destination, source) = isStore ? (Int(ins.rm), reg) : (reg, Int(ins.rm))
      xmm[destination] = xmm[source]
      ymmHigh[destination] = ins.vexL ? ymmHigh[source] : .zero
      xsaveInUse |= ins.vexL ? XSaveModel.sse | XSaveModel.avx : XSaveModel.sse
    }
  }

  /// VMOVSS/VMOVSD: loads zero the rest of the register, stores write the element, the register
  /// form merges r/m's low element into vvvv. VEX.L is ignored.
  private func scalarMove(_ ins: Instruction) throws(Fault) {
    let isSingle = ins.mandatoryPrefix == 2
    let lowMask: UInt64 = isSingle ? 0xFFFF_FFFF : ~0
    let reg = Int(ins.reg)
    if ins.hasMemoryOperand {
      guard ins.vexRegister == 0 else { throw .invalidOpcode }
      let address = linearAddress(ins)
      if ins.opcode == 0x111 {
        if isSingle {
          try write32(address, UInt32(truncatingIfNeeded: xmm[reg][0]))
        } else {
          try write64(address, xmm[reg][0])
        }
        return
      }
      let value = isSingle ? UInt64(try read32(address)) : try read64(address)
      xmm[reg] = XMMValue(value, 0)
      ymmHigh[reg] = .zero
    } else {
      // 10: dest = reg, element from rm; 11: dest = rm, element from reg.
      let (destination, element) = ins.opcode == 0x110 ? (reg, Int(ins.rm)) : (Int(ins.rm), reg)
      var result = xmm[Int(ins.vexRegister)]
      result[0] = (result[0] & ~lowMask) | (xmm[element][0] & lowMask)
      xmm[destination] = result
      ymmHigh[destination] = .zero
    }
    xsaveInUse |= XSaveModel.sse
  }
}
