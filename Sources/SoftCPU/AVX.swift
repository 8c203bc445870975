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
//
// XINUSE: a VEX.128 form (which zeroes bits 255:128) marks only SSE in use, a VEX.256 form
// AVX too, as the host CPU shows.
//
// Not implemented yet (#UD): AVX2, FMA, F16C and the AVX forms not in `vexLaneShape`.

/// How a VEX form maps onto the SSE unit's operation of the same opcode.
enum VEXLaneShape {
  /// dest = op(vvvv, r/m), lane by lane.
  case twoSources
  /// dest = op(r/m); VEX.vvvv must be 1111b.
  case oneSource
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
    default:
      guard let shape = vexLaneShape(ins) else { throw .invalidOpcode }
      try executeLaneWise(ins, shape: shape)
    }
  }

  /// The lane shape of a VEX form that runs through the SSE unit, nil when it is not one.
  private func vexLaneShape(_ ins: Instruction) -> VEXLaneShape? {
    let byte = UInt8(truncatingIfNeeded: ins.opcode)
    let prefix = ins.mandatoryPrefix
    guard ins.opcode >> 8 == 1 else { return nil }
    switch byte {
    case 0x54...0x57, 0x14, 0x15, 0xC6:  // logic, UNPCKL/H, SHUFPS/PD
      return prefix <= 1 ? .twoSources : nil
    case 0x58, 0x59, 0x5C...0x5F, 0xC2:  // arithmetic, min/max, compares
      return .twoSources
    case 0x51:  // VSQRTPS/PD one source; VSQRTSS/SD merge into vvvv
      return prefix >= 2 ? .twoSources : .oneSource
    case 0x52, 0x53:  // VRSQRT/VRCP PS one source, SS two
      return prefix == 2 ? .twoSources : prefix == 0 ? .oneSource : nil
    case 0xD0, 0x7C, 0x7D:  // ADDSUB, HADD, HSUB
      return prefix == 1 || prefix == 3 ? .twoSources : nil
    case 0x60...0x6B, 0x6C, 0x6D, 0x74...0x76, 0xD4, 0xD5, 0xD8...0xDF, 0xE0, 0xE3...0xE5, 0xE8...0xEF, 0xF4...0xF6,
      0xF8...0xFE:
      // Integer: unpacks, packs, compares, add/sub/mul/avg/min/max/logic, PSADBW, PMADDWD.
      return prefix == 1 ? .twoSources : nil
    case 0x70:  // VPSHUFD/HW/LW
      return prefix >= 1 ? .oneSource : nil
    default:
      return nil
    }
  }

  /// Runs a lane-wise VEX form through the SSE operation of the same opcode, one 128-bit half at a time.
  private func executeLaneWise(_ ins: Instruction, shape: VEXLaneShape) throws(Fault) {
    if shape == .oneSource && ins.vexRegister != 0 { throw .invalidOpcode }
    // Scalar forms ignore VEX.L (LIG) and always zero bits 255:128.
    let byte = UInt8(truncatingIfNeeded: ins.opcode)
    let scalar = ins.mandatoryPrefix >= 2 && (0x51...0x5F).contains(byte)
    let wide = ins.vexL && !scalar
    var operation = ins
    operation.op = .sse
    operation.reg = 17
    if !ins.hasMemoryOperand { operation.rm = 16 }
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
    var halves = (low: XMMValue.zero, high: XMMValue.zero)
    for half in 0..<(wide ? 2 : 1) {
      let upper = half == 1
      xmm[17] = shape == .twoSources ? (upper ? ymmHigh[source1] : xmm[source1]) : .zero
      if ins.hasMemoryOperand {
        if upper { operation.displacement &+= 16 }
      } else {
        xmm[16] = upper ? ymmHigh[source2] : xmm[source2]
      }
      // VSHUFPD takes the high lane's selectors from immediate bits 3:2.
      if upper && ins.opcode == 0x1C6 && ins.mandatoryPrefix == 1 { operation.immediate = ins.immediate >> 2 }
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
      if upper { halves.high = xmm[17] } else { halves.low = xmm[17] }
    }
    if raised & ~(original >> 7) & MXCSR.precomputationFlags != 0 { raised &= MXCSR.precomputationFlags }
    mxcsr = original | raised
    if unmaskedException { throw cr4 & X86.cr4OSXMMEXCPT != 0 ? .simdError : .invalidOpcode }
    let low = halves.low
    let high = halves.high
    xmm[Int(ins.reg)] = low
    ymmHigh[Int(ins.reg)] = high
    xsaveInUse |= wide ? XSaveModel.sse | XSaveModel.avx : XSaveModel.sse
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
