// SSE/SSE2/SSE3 unit (owned by the SIMD/FPU engineer).
//
// Exactness: every floating-point operation (and most integer ones) is executed by the very
// same host instruction through the CSoftFloat C target, with the guest's MXCSR loaded (flags
// cleared, all exceptions masked). Rounding modes, DAZ/FTZ, NaN propagation, MIN/MAX operand
// rules, integer-indefinite conversions and the RCP/RSQRT approximations therefore match the
// host CPU bit for bit. The raised flags are then merged into the guest MXCSR here, and an
// unmasked exception raises #XM (CR4.OSXMMEXCPT) or #UD with the destination unchanged.
// Data movement, shuffles and the hottest integer operations are plain Swift.

import CSoftFloat
import VMCore

/// MXCSR fields.
enum MXCSR {
  /// Exception flags IE, DE, ZE, OE, UE, PE (bits 0-5).
  static let flags: UInt32 = 0x3F
  /// Precision (inexact) exception flag.
  static let inexact: UInt32 = 1 << 5
  /// Pre-computation exceptions: invalid, denormal operand, divide by zero.
  static let precomputationFlags: UInt32 = 0x7
  /// The MXCSR bits software may set; FXSAVE's MXCSR_MASK: bits 0-15 (with DAZ). No AMD
  /// misaligned-SSE mode (MM, bit 17): CPUID does not advertise MisAlignSse, so MM is reserved.
  static let writableMask: UInt32 = 0xFFFF
  /// Reset value.
  static let reset: UInt32 = 0x1F80
}

extension CPU {
  /// Executes an instruction the decoder classified as `.sse`.
  func executeSSE(_ instruction: Instruction) throws(Fault) {
    let opcode = instruction.opcode
    // One test for the common case; EMMS and 0F AE have their own availability rules.
    if _slowPath(
      cr0 & (X86.cr0EM | X86.cr0TS) != 0 || cr4 & X86.cr4OSFXSR == 0 || opcode == 0x177 || opcode == 0x1AE)
    {
      if opcode == 0x177 {
        try emms()
        return
      }
      if opcode == 0x1AE {
        try executeSIMDStateInstruction(instruction)
        return
      }
      guard cr0 & X86.cr0EM == 0, cr4 & X86.cr4OSFXSR != 0 else { throw .invalidOpcode }
      throw .deviceNotAvailable
    }
    try executeSSEOperation(instruction)
  }

  /// The operation of an `.sse` instruction once its availability is checked (also the
  /// lane-wise engine of the VEX forms, see AVX.swift).
  func executeSSEOperation(_ instruction: Instruction) throws(Fault) {
    let opcode = instruction.opcode
    let prefix = instruction.mandatoryPrefix
    if _slowPath(xsaveInUse & XSaveModel.sse == 0) && instruction.writesVectorRegister {
      xsaveInUse |= XSaveModel.sse
    }
    switch opcode >> 8 {
    case 1: break
    case 2:
      try executeSSEMap38(instruction, prefix: prefix)
      return
    default:
      try executeSSEMap3A(instruction, prefix: prefix)
      return
    }
    let reg = Int(instruction.reg)
    switch UInt8(truncatingIfNeeded: opcode) {
    // MARK: Hot integer operations (glibc string functions), inline
    case 0xEF, 0xEB, 0xDB, 0x74, 0xDA, 0xF8, 0xFC, 0x60:
      guard prefix == 1 else { throw .invalidOpcode }
      let source = try source128(instruction, aligned: sseArithmeticNeedsAlignment)
      let destination = xmm[reg]
      let left = unsafeBitCast(destination, to: SIMD16<UInt8>.self)
      let right = unsafeBitCast(source, to: SIMD16<UInt8>.self)
      switch UInt8(truncatingIfNeeded: opcode) {
      case 0xEF: xmm[reg] = destination ^ source
      case 0xEB: xmm[reg] = destination | source
      case 0xDB: xmm[reg] = destination & source
      case 0x74:
        xmm[reg] = unsafeBitCast(
          SIMD16<UInt8>(repeating: 0).replacing(with: 0xFF, where: left .== right), to: XMMValue.self)
      case 0xDA: xmm[reg] = unsafeBitCast(pointwiseMin(left, right), to: XMMValue.self)
      case 0xF8: xmm[reg] = unsafeBitCast(left &- right, to: XMMValue.self)
      case 0xFC: xmm[reg] = unsafeBitCast(left &+ right, to: XMMValue.self)
      default:  // PUNPCKLBW
        let interleaved = SIMD16<UInt8>(
          left[0], right[0], left[1], right[1], left[2], right[2], left[3], right[3],
          left[4], right[4], left[5], right[5], left[6], right[6], left[7], right[7])
        xmm[reg] = unsafeBitCast(interleaved, to: XMMValue.self)
      }
    case 0x6F:  // MOVDQA (66) / MOVDQU (F3) load
      guard prefix == 1 || prefix == 2 else { throw .invalidOpcode }
      xmm[reg] = try source128(instruction, aligned: prefix == 1)
    case 0x7F:  // MOVDQA / MOVDQU store
      guard prefix == 1 || prefix == 2 else { throw .invalidOpcode }
      try storeOrMove128(instruction, xmm[reg], aligned: prefix == 1)
    case 0xD7:  // PMOVMSKB r32, xmm
      guard prefix == 1, !instruction.hasMemoryOperand else { throw .invalidOpcode }
      gpr[reg] = UInt64(byteSignMask(xmm[Int(instruction.rm)]))
    case 0x70, 0x7E, 0x6E, 0xD6:
      try executeHotSSE2(instruction, prefix: prefix)
    // MARK: Moves
    case 0x10, 0x11: try moveUnalignedOrScalar(instruction, prefix: prefix)
    case 0x12, 0x13, 0x16, 0x17: try moveHalves(instruction, prefix: prefix)
    case 0x28:
      guard prefix <= 1 else { throw .invalidOpcode }
      xmm[Int(instruction.reg)] = try source128(instruction, aligned: true)
    case 0x29:
      guard prefix <= 1 else { throw .invalidOpcode }
      try storeOrMove128(instruction, xmm[Int(instruction.reg)], aligned: true)
    case 0x2B, 0xE7:
      // MOVNTPS/MOVNTPD (0F 2B), MOVNTDQ (66 0F E7): memory destination only.
      guard instruction.hasMemoryOperand, opcode == 0x12B ? prefix <= 1 : prefix == 1 else {
        throw .invalidOpcode
      }
      try write128(linearAddress(instruction), xmm[Int(instruction.reg)], aligned: true)
    case 0xF0:
      // LDDQU (SSE3): unaligned load.
      guard prefix == 3, instruction.hasMemoryOperand else { throw .invalidOpcode }
      xmm[Int(instruction.reg)] = try read128(linearAddress(instruction), aligned: false)
    case 0x50:
      guard prefix <= 1, !instruction.hasMemoryOperand else { throw .invalidOpcode }
      let value = xmm[Int(instruction.rm)]
      let mask: UInt64
      if prefix == 0 {
        let words = unsafeBitCast(value, to: SIMD4<UInt32>.self)
        mask = UInt64(words[0] >> 31 | (words[1] >> 31) << 1 | (words[2] >> 31) << 2 | (words[3] >> 31) << 3)
      } else {
        mask = value[0] >> 63 | (value[1] >> 63) << 1
      }
      gpr[Int(instruction.reg)] = mask
    case 0xF7: try maskedMove(instruction, prefix: prefix)

    // MARK: Shuffles and inserts
    case 0xC6: try shuffleFloats(instruction, prefix: prefix)
    case 0xC4:
      guard prefix == 1 else { throw .invalidOpcode }
      let word: UInt16
      if instruction.hasMemoryOperand {
        word = try read16(linearAddress(instruction))
      } else {
        word = UInt16(truncatingIfNeeded: gpr[Int(instruction.rm)])
      }
      var words = unsafeBitCast(xmm[Int(instruction.reg)], to: SIMD8<UInt16>.self)
      words[Int(instruction.immediate & 7)] = word
      xmm[Int(instruction.reg)] = unsafeBitCast(words, to: XMMValue.self)
    case 0xC5:
      guard prefix == 1, !instruction.hasMemoryOperand else { throw .invalidOpcode }
      let words = unsafeBitCast(xmm[Int(instruction.rm)], to: SIMD8<UInt16>.self)
      gpr[Int(instruction.reg)] = UInt64(words[Int(instruction.immediate & 7)])
    case 0x71, 0x72, 0x73: try shiftByImmediate(instruction, prefix: prefix)

    // MARK: Integer SIMD executed by the host
    case 0x61...0x6D, 0x75, 0x76, 0xD1...0xD5, 0xD8, 0xD9, 0xDC...0xDF, 0xE0...0xE5, 0xE8...0xEA,
      0xEC...0xEE, 0xF1...0xF6, 0xF9...0xFB, 0xFD, 0xFE:
      guard prefix == 1 else { throw .invalidOpcode }
      try hostInteger(instruction, prefix: prefix)
    case 0x14, 0x15, 0x54...0x57:
      guard prefix <= 1 else { throw .invalidOpcode }
      try hostInteger(instruction, prefix: prefix)

    // MARK: Floating point executed by the host
    case 0x51, 0x58, 0x59, 0x5C...0x5F, 0xC2:
      try hostFloat(instruction, prefix: prefix, sourceSize: scalarSize(prefix))
    case 0x52, 0x53:
      guard prefix == 0 || prefix == 2 else { throw .invalidOpcode }
      try hostFloat(instruction, prefix: prefix, sourceSize: scalarSize(prefix))
    case 0x5A:
      try hostFloat(instruction, prefix: prefix, sourceSize: prefix == 1 ? 16 : prefix == 2 ? 4 : 8)
    case 0x5B:
      guard prefix <= 2 else { throw .invalidOpcode }
      try hostFloat(instruction, prefix: prefix, sourceSize: 16)
    case 0xE6:
      guard prefix != 0 else { throw .invalidOpcode }
      try hostFloat(instruction, prefix: prefix, sourceSize: prefix == 2 ? 8 : 16)
    case 0xD0, 0x7C, 0x7D:
      guard prefix == 1 || prefix == 3 else { throw .invalidOpcode }
      try hostFloat(instruction, prefix: prefix, sourceSize: 16)
    case 0x2E, 0x2F: try compareIntoFlags(instruction, prefix: prefix)
    case 0x2A, 0x2C, 0x2D:
      if prefix <= 1 {
        try executeMMXConversion(instruction, prefix: prefix)
      } else if opcode == 0x12A {
        try convertIntegerToFloat(instruction, prefix: prefix)
      } else {
        try convertFloatToInteger(instruction, prefix: prefix)
      }

    default:
      throw .invalidOpcode
    }
  }

  // MARK: - Operand access

  /// Whether arithmetic forms (implicitly aligned 128-bit memory operands) must be aligned:
  /// always for legacy SSE (there is no misaligned-SSE mode), never while the AVX unit runs a
  /// VEX form through the SSE operations.
  @inline(__always) var sseArithmeticNeedsAlignment: Bool { !vexOperationActive }

  /// The xmm/m128 operand.
  @inline(__always)
  func source128(_ instruction: Instruction, aligned: Bool) throws(Fault) -> XMMValue {
    if instruction.hasMemoryOperand {
      return try read128(linearAddress(instruction), aligned: aligned)
    }
    return xmm[Int(instruction.rm)]
  }

  /// The xmm/mN operand, zero-extended to 128 bits for 4- and 8-byte memory operands.
  @inline(__always)
  func sourceSized(_ instruction: Instruction, size: Int) throws(Fault) -> XMMValue {
    guard instruction.hasMemoryOperand else { return xmm[Int(instruction.rm)] }
    let address = linearAddress(instruction)
    switch size {
    case 4: return XMMValue(UInt64(try read32(address)), 0)
    case 8: return XMMValue(try read64(address), 0)
    default: return try read128(address, aligned: sseArithmeticNeedsAlignment)
    }
  }

  /// Writes the xmm/m128 destination.
  @inline(__always)
  func storeOrMove128(_ instruction: Instruction, _ value: XMMValue, aligned: Bool) throws(Fault) {
    if instruction.hasMemoryOperand {
      try write128(linearAddress(instruction), value, aligned: aligned)
    } else {
      xmm[Int(instruction.rm)] = value
    }
  }

  @inline(__always)
  private func scalarSize(_ prefix: UInt8) -> Int { prefix == 2 ? 4 : prefix == 3 ? 8 : 16 }

  // MARK: - Exceptions

  /// Merges the exception flags `raised` by one instruction into MXCSR; throws #XM (or #UD
  /// without CR4.OSXMMEXCPT) when one of them is unmasked, in which case the caller must
  /// leave the destination unchanged.
  @inline(__always)
  func commitSIMDExceptions(_ raised: UInt32) throws(Fault) {
    if raised == 0 { return }
    let unmasked = raised & ~(mxcsr >> 7) & MXCSR.flags
    if unmasked == 0 {
      mxcsr |= raised
      return
    }
    // An unmasked pre-computation exception suppresses the post-computation ones.
    if unmasked & MXCSR.precomputationFlags != 0 {
      mxcsr |= raised & MXCSR.precomputationFlags
    } else {
      mxcsr |= raised
    }
    throw cr4 & X86.cr4OSXMMEXCPT != 0 ? .simdError : .invalidOpcode
  }

  // MARK: - Host-executed forms

  /// Runs a floating-point operation on the host under the guest MXCSR (all exceptions
  /// masked) and returns the exception flags the instruction reports.
  @inline(__always)
  func runHostFloat(
    _ operation: UInt32, _ immediate: UInt32, _ destination: inout XMMValue, _ source: inout XMMValue
  ) -> UInt32 {
    let original = destination
    let raised = csf_sse_float(operation, immediate, mxcsr, &destination, &source)
    let unmasked = ~(mxcsr >> 7) & MXCSR.flags
    let overflowOrUnderflow: UInt32 = 0x18
    if raised == CSF_UNSUPPORTED || unmasked & overflowOrUnderflow == 0
      || raised & unmasked & MXCSR.precomputationFlags != 0
    {
      return raised
    }
    return postComputationFlags(operation, immediate, original, source, fallback: raised)
  }

  /// Exception flags when overflow or underflow is unmasked (the rare slow path), element by
  /// element as the hardware reports them: an element that overflows (underflows) reports only
  /// OE (UE) besides its pre-computation flags, without PE; an unmasked underflow also fires
  /// for exact tiny results, found by repeating the element with FTZ (which flags every tiny
  /// result). Lane-independent packed forms are split by broadcasting each element.
  private func postComputationFlags(
    _ operation: UInt32, _ immediate: UInt32, _ destination: XMMValue, _ source: XMMValue, fallback: UInt32
  ) -> UInt32 {
    let prefix = (operation >> 8) & 0xFF
    let byte = operation & 0xFF
    var elementSize = 0  // 0: the whole instruction is one element
    var elements = 1
    if operation & CSF_SSE_MAP38 == 0 {
      let isMap3A = operation & CSF_SSE_MAP3A != 0
      switch (isMap3A, byte) {
      case (false, 0x51), (false, 0x52), (false, 0x53), (false, 0x58), (false, 0x59), (false, 0x5C), (false, 0x5D),
        (false, 0x5E), (false, 0x5F), (false, 0xC2):
        if prefix <= 1 { (elementSize, elements) = prefix == 0 ? (4, 4) : (8, 2) }
      case (false, 0x5A):
        if prefix <= 1 { (elementSize, elements) = prefix == 0 ? (4, 2) : (8, 2) }
      case (false, 0x5B): (elementSize, elements) = (4, 4)
      case (false, 0xE6): (elementSize, elements) = prefix == 2 ? (4, 2) : (8, 2)
      case (true, 0x08): (elementSize, elements) = (4, 4)
      case (true, 0x09): (elementSize, elements) = (8, 2)
      default: break
      }
    }
    // Horizontal and alternating forms become per-element ADD/SUB PS/PD on rearranged operands.
    var destination = destination
    var source = source
    var horizontal = false
    if operation & (CSF_SSE_MAP38 | CSF_SSE_MAP3A) == 0 && (byte == 0x7C || byte == 0x7D || byte == 0xD0)
      && (prefix == 1 || prefix == 3)
    {
      horizontal = true
      if byte != 0xD0 {
        if prefix == 3 {
          let left = unsafeBitCast(destination, to: SIMD4<UInt32>.self)
          let right = unsafeBitCast(source, to: SIMD4<UInt32>.self)
          destination = unsafeBitCast(SIMD4<UInt32>(left[0], left[2], right[0], right[2]), to: XMMValue.self)
          source = unsafeBitCast(SIMD4<UInt32>(left[1], left[3], right[1], right[3]), to: XMMValue.self)
        } else {
          (destination, source) = (XMMValue(destination[0], source[0]), XMMValue(destination[1], source[1]))
        }
      }
      (elementSize, elements) = prefix == 3 ? (4, 4) : (8, 2)
    }
    let unmasked = ~(mxcsr >> 7) & MXCSR.flags
    let overflow: UInt32 = 1 << 3
    let underflow: UInt32 = 1 << 4
    var flags: UInt32 = 0
    for element in 0..<elements {
      var elementOperation = operation
      if horizontal {
        let packedDouble: UInt32 = prefix == 1 ? 0x100 : 0
        let subtract = byte == 0x7D || (byte == 0xD0 && element & 1 == 0)
        elementOperation = packedDouble | (subtract ? 0x5C : 0x58)
      }
      let elementPrefix = (elementOperation >> 8) & 0xFF
      var elementDestination = destination
      var elementSource = source
      if elementSize == 4 {
        let index = element
        let destinationLanes = unsafeBitCast(destination, to: SIMD4<UInt32>.self)
        let sourceLanes = unsafeBitCast(source, to: SIMD4<UInt32>.self)
        elementDestination = unsafeBitCast(SIMD4<UInt32>(repeating: destinationLanes[index]), to: XMMValue.self)
        elementSource = unsafeBitCast(SIMD4<UInt32>(repeating: sourceLanes[index]), to: XMMValue.self)
      } else if elementSize == 8 {
        elementDestination = XMMValue(repeating: destination[element])
        elementSource = XMMValue(repeating: source[element])
      }
      var scratch = elementDestination
      var elementFlags = csf_sse_float(elementOperation, immediate, mxcsr, &scratch, &elementSource)
      if elementFlags == CSF_UNSUPPORTED { return fallback }
      if unmasked & underflow != 0 && elementFlags & underflow == 0 {
        scratch = elementDestination
        if csf_sse_float(elementOperation, immediate, mxcsr | 1 << 15, &scratch, &elementSource) & underflow != 0 {
          elementFlags |= underflow
        }
      }
      let precomputation = elementFlags & MXCSR.precomputationFlags
      let fired = elementFlags & unmasked & (overflow | underflow)
      if fired != 0 {
        // The hardware reports PE only when the result is inexact with an unbounded exponent.
        var inexact = elementFlags & MXCSR.inexact
        if let kind = unboundedKind(elementOperation) {
          let isDouble = elementPrefix == 1 || elementPrefix == 3
          let left =
            elementSize == 4
            ? UInt64(unsafeBitCast(elementDestination, to: SIMD4<UInt32>.self)[0]) : elementDestination[0]
          let right =
            elementSize == 4 ? UInt64(unsafeBitCast(elementSource, to: SIMD4<UInt32>.self)[0]) : elementSource[0]
          let scalarLeft = isDouble || elementSize == 4 ? left : left & 0xFFFF_FFFF
          let scalarRight = isDouble || elementSize == 4 ? right : right & 0xFFFF_FFFF
          inexact =
            csf_unbounded_inexact(kind, isDouble ? 1 : 0, scalarLeft, scalarRight, mxcsr) != 0 ? MXCSR.inexact : 0
        }
        elementFlags = precomputation | (overflow & fired != 0 ? overflow : underflow) | inexact
      }
      flags |= elementFlags
    }
    return flags
  }

  // MARK: - Dot products

  /// DPPS/DPPD (66 0F 3A 40/41) xmm, xmm/m128, imm8.
  func dotProduct(_ instruction: Instruction) throws(Fault) {
    let reg = Int(instruction.reg)
    let source = try source128(instruction, aligned: sseArithmeticNeedsAlignment)
    let operation = hostOperation(instruction, prefix: 1)
    let immediate = UInt32(truncatingIfNeeded: instruction.immediate & 0xFF)
    var result = xmm[reg]
    let raised = try hostDotProduct(operation, immediate, &result, source)
    try commitDotProduct(operation, immediate, low: (xmm[reg], source), high: nil, raised: raised)
    xmm[reg] = result
  }

  /// VDPPS xmm/ymm and VDPPD xmm (VEX.66.0F3A 40/41): dest = dot products of VEX.vvvv and r/m,
  /// each 128-bit half on its own (VDPPD: VEX.L = 1 raises #UD). Memory needs no alignment.
  func vexDotProduct(_ ins: Instruction) throws(Fault) {
    if ins.opcode & 1 != 0 && ins.vexL { throw .invalidOpcode }
    let left = Int(ins.vexRegister)
    var rightLow = xmm[Int(ins.rm)]
    var rightHigh = ymmHigh[Int(ins.rm)]
    if ins.hasMemoryOperand {
      rightLow = try read128(linearAddress(ins), aligned: false)
      if ins.vexL {
        var upper = ins
        upper.displacement &+= 16
        rightHigh = try read128(linearAddress(upper), aligned: false)
      }
    }
    let operation = hostOperation(ins, prefix: 1)
    let immediate = UInt32(truncatingIfNeeded: ins.immediate & 0xFF)
    var low = xmm[left]
    var raised = try hostDotProduct(operation, immediate, &low, rightLow)
    var high = XMMValue.zero
    if ins.vexL {
      high = ymmHigh[left]
      raised |= try hostDotProduct(operation, immediate, &high, rightHigh)
    }
    try commitDotProduct(
      operation, immediate, low: (xmm[left], rightLow), high: ins.vexL ? (ymmHigh[left], rightHigh) : nil,
      raised: raised)
    let destination = Int(ins.reg)
    xmm[destination] = low
    ymmHigh[destination] = high
    xsaveInUse |= ins.vexL ? XSaveModel.sse | XSaveModel.avx : XSaveModel.sse
  }

  /// One 128-bit DPPS/DPPD on the host under the guest's MXCSR, all exceptions masked: the
  /// result and the flags the instruction raised.
  private func hostDotProduct(
    _ operation: UInt32, _ immediate: UInt32, _ destination: inout XMMValue, _ source: XMMValue
  ) throws(Fault) -> UInt32 {
    var scratch = source
    let raised = csf_sse_float(operation, immediate, mxcsr, &destination, &scratch)
    guard raised != CSF_UNSUPPORTED else { throw .invalidOpcode }
    return raised
  }

  /// The flags of the steps of one 128-bit DPPS/DPPD: the multiplications of the selected
  /// elements, the first additions ((p0 + p1) and (p2 + p3); DPPD's only addition) and DPPS's
  /// final addition. Each step reports its flags as the packed or scalar instruction of that
  /// step does (with an unmasked overflow or underflow per element, PE only when the result
  /// with an unbounded exponent is inexact).
  private func dotProductSteps(
    _ operation: UInt32, _ immediate: UInt32, _ destination: XMMValue, _ source: XMMValue
  ) -> SIMD3<UInt32> {
    let unmasked = ~(mxcsr >> 7) & MXCSR.flags
    let single = operation & 1 == 0
    // The elements the immediate does not select are +0.0 and raise nothing.
    var left = destination
    var right = source
    if single {
      var leftLanes = unsafeBitCast(destination, to: SIMD4<UInt32>.self)
      var rightLanes = unsafeBitCast(source, to: SIMD4<UInt32>.self)
      for lane in 0..<4 where immediate & (0x10 << UInt32(lane)) == 0 {
        leftLanes[lane] = 0
        rightLanes[lane] = 0
      }
      left = unsafeBitCast(leftLanes, to: XMMValue.self)
      right = unsafeBitCast(rightLanes, to: XMMValue.self)
    } else {
      for lane in 0..<2 where immediate & (0x10 << UInt32(lane)) == 0 {
        left[lane] = 0
        right[lane] = 0
      }
    }
    func step(_ operation: UInt32, _ destination: inout XMMValue, _ source: inout XMMValue) -> UInt32 {
      let original = destination
      let raised = csf_sse_float(operation, 0, mxcsr, &destination, &source)
      if raised == CSF_UNSUPPORTED { return 0 }
      if unmasked & 0x18 == 0 || raised & unmasked & MXCSR.precomputationFlags != 0 { return raised }
      return postComputationFlags(operation, 0, original, source, fallback: raised)
    }
    var steps = SIMD3<UInt32>.zero
    var products = left
    steps[0] = step(single ? 0x59 : 0x159, &products, &right)  // MULPS/MULPD
    if single {
      var sums = products
      var same = products
      steps[1] = step(0x37C, &sums, &same)  // HADDPS: (p0 + p1), (p2 + p3)
      var low = XMMValue(sums[0] & 0xFFFF_FFFF, 0)
      var high = XMMValue(sums[0] >> 32, 0)
      steps[2] = step(0x258, &low, &high)  // ADDSS
    } else {
      var low = XMMValue(products[0], 0)
      var high = XMMValue(products[1], 0)
      steps[1] = step(0x358, &low, &high)  // ADDSD
    }
    return steps
  }

  /// Merges a dot product's flags into MXCSR and raises its unmasked exception (the caller then
  /// leaves the destination unchanged), for one 128-bit half or two (VDPPS ymm), as the host
  /// does. With no exception unmasked that a step could stop at, the flags are those the whole
  /// instruction `raised`. Otherwise the steps run in order over both halves, and the first step
  /// with an unmasked exception ends the instruction: the flags of the completed steps stay, and
  /// an unmasked pre-computation exception suppresses only its own step's post-computation
  /// flags (so a denormal product that makes the addition fault with DE keeps the
  /// multiplications' UE and PE). When one half's first additions raise an unmasked exception,
  /// the other half's flags of that step are not reported (VDPPS ymm on the host).
  private func commitDotProduct(
    _ operation: UInt32, _ immediate: UInt32, low: (XMMValue, XMMValue), high: (XMMValue, XMMValue)?,
    raised: UInt32
  ) throws(Fault) {
    let unmasked = ~(mxcsr >> 7) & MXCSR.flags
    if raised & unmasked == 0 && unmasked & 0x18 == 0 {
      mxcsr |= raised
      return
    }
    let lowSteps = dotProductSteps(operation, immediate, low.0, low.1)
    let highSteps = high.map { dotProductSteps(operation, immediate, $0.0, $0.1) } ?? .zero
    var flags: UInt32 = 0
    for index in 0..<3 {
      var step = lowSteps[index] | highSteps[index]
      if index == 1 && step & unmasked != 0 {
        step =
          (lowSteps[index] & unmasked != 0 ? lowSteps[index] : 0)
          | (highSteps[index] & unmasked != 0 ? highSteps[index] : 0)
      }
      if step & unmasked != 0 {
        let reported = step & unmasked & MXCSR.precomputationFlags != 0 ? step & MXCSR.precomputationFlags : step
        mxcsr |= flags | reported
        throw cr4 & X86.cr4OSXMMEXCPT != 0 ? .simdError : .invalidOpcode
      }
      flags |= step
    }
    mxcsr |= flags
  }

  /// The `csf_unbounded_inexact` kind of an operation, when it has one.
  private func unboundedKind(_ operation: UInt32) -> UInt32? {
    guard operation & (CSF_SSE_MAP38 | CSF_SSE_MAP3A) == 0 else { return nil }
    let prefix = (operation >> 8) & 0xFF
    switch operation & 0xFF {
    case 0x58: return 0
    case 0x5C: return 1
    case 0x59: return 2
    case 0x5E: return 3
    case 0x51: return 4
    case 0x5A where prefix == 1 || prefix == 3: return 5
    default: return nil
    }
  }

  /// The CSoftFloat operation code of an instruction: map flag | prefix << 8 | opcode byte.
  @inline(__always)
  func hostOperation(_ instruction: Instruction, prefix: UInt8) -> UInt32 {
    let map = instruction.opcode >> 8
    let mapFlag = map == 2 ? CSF_SSE_MAP38 : map == 3 ? CSF_SSE_MAP3A : 0
    return mapFlag | UInt32(prefix) << 8 | UInt32(instruction.opcode & 0xFF)
  }

  func hostFloat(_ instruction: Instruction, prefix: UInt8, sourceSize: Int) throws(Fault) {
    var destination = xmm[Int(instruction.reg)]
    var source = try sourceSized(instruction, size: sourceSize)
    let operation = hostOperation(instruction, prefix: prefix)
    let immediate = UInt32(truncatingIfNeeded: instruction.immediate)
    let raised: UInt32
    if _slowPath(vexOperationActive && instruction.opcode == 0x1C2) {
      // VCMPPS/PD/SS/SD: the VEX forms' 32 predicates.
      raised = csf_avx_compare(operation, immediate, mxcsr, &destination, &source)
    } else {
      raised = runHostFloat(operation, immediate, &destination, &source)
    }
    guard raised != CSF_UNSUPPORTED else { throw .invalidOpcode }
    try commitSIMDExceptions(raised)
    xmm[Int(instruction.reg)] = destination
  }

  func hostInteger(_ instruction: Instruction, prefix: UInt8) throws(Fault) {
    var destination = xmm[Int(instruction.reg)]
    var source = try source128(instruction, aligned: sseArithmeticNeedsAlignment)
    let operation = hostOperation(instruction, prefix: prefix)
    let immediate = UInt32(truncatingIfNeeded: instruction.immediate)
    guard csf_sse_integer(operation, immediate, &destination, &source) == 0 else { throw .invalidOpcode }
    xmm[Int(instruction.reg)] = destination
  }

  /// UCOMISS/COMISS/UCOMISD/COMISD: ZF, PF, CF from the comparison; OF, SF, AF cleared.
  private func compareIntoFlags(_ instruction: Instruction, prefix: UInt8) throws(Fault) {
    guard prefix <= 1 else { throw .invalidOpcode }
    var result = xmm[Int(instruction.reg)]
    var source = try sourceSized(instruction, size: prefix == 0 ? 4 : 8)
    let operation = UInt32(prefix) << 8 | UInt32(instruction.opcode & 0xFF)
    let raised = runHostFloat(operation, 0, &result, &source)
    try commitSIMDExceptions(raised)
    setStatusFlags(result[0] & (RFlags.zf | RFlags.pf | RFlags.cf))
  }

  /// CVTSI2SS/CVTSI2SD (F3/F2 0F 2A) from r/m32 or r/m64 (REX.W).
  private func convertIntegerToFloat(_ instruction: Instruction, prefix: UInt8) throws(Fault) {
    let integer: UInt64
    if instruction.hasMemoryOperand {
      let address = linearAddress(instruction)
      integer = instruction.rexW ? try read64(address) : UInt64(try read32(address))
    } else {
      integer = gpr[Int(instruction.rm)]
    }
    var destination = xmm[Int(instruction.reg)]
    var operation = UInt32(prefix) << 8 | 0x2A
    if instruction.rexW { operation |= CSF_SSE_REXW }
    var source = XMMValue(integer, 0)
    let raised = runHostFloat(operation, 0, &destination, &source)
    try commitSIMDExceptions(raised)
    xmm[Int(instruction.reg)] = destination
  }

  /// CVTTSS2SI/CVTTSD2SI/CVTSS2SI/CVTSD2SI (F3/F2 0F 2C/2D) into r32 (zero-extended) or r64.
  private func convertFloatToInteger(_ instruction: Instruction, prefix: UInt8) throws(Fault) {
    var source = try sourceSized(instruction, size: prefix == 2 ? 4 : 8)
    var result = XMMValue(0, 0)
    var operation = UInt32(prefix) << 8 | UInt32(instruction.opcode & 0xFF)
    if instruction.rexW { operation |= CSF_SSE_REXW }
    let raised = runHostFloat(operation, 0, &result, &source)
    try commitSIMDExceptions(raised)
    gpr[Int(instruction.reg)] = result[0]
  }

  // MARK: - Swift forms

  /// MOVD/MOVQ forms and PSHUFD/PSHUFHW/PSHUFLW.
  private func executeHotSSE2(_ instruction: Instruction, prefix: UInt8) throws(Fault) {
    let reg = Int(instruction.reg)
    switch instruction.opcode {
    case 0x16E:  // MOVD/MOVQ xmm, r/m32/64
      guard prefix == 1 else { throw .invalidOpcode }
      let value: UInt64
      if instruction.hasMemoryOperand {
        let address = linearAddress(instruction)
        value = instruction.rexW ? try read64(address) : UInt64(try read32(address))
      } else {
        let full = gpr[Int(instruction.rm)]
        value = instruction.rexW ? full : full & 0xFFFF_FFFF
      }
      xmm[reg] = XMMValue(value, 0)
    case 0x17E:
      if prefix == 1 {  // MOVD/MOVQ r/m32/64, xmm
        let low = xmm[reg][0]
        if instruction.hasMemoryOperand {
          let address = linearAddress(instruction)
          if instruction.rexW {
            try write64(address, low)
          } else {
            try write32(address, UInt32(truncatingIfNeeded: low))
          }
        } else {
          gpr[Int(instruction.rm)] = instruction.rexW ? low : low & 0xFFFF_FFFF
        }
      } else if prefix == 2 {  // MOVQ xmm, xmm/m64
        xmm[reg] = XMMValue(try sourceSized(instruction, size: 8)[0], 0)
      } else {
        throw .invalidOpcode
      }
    case 0x1D6:  // MOVQ xmm/m64, xmm; MOVQ2DQ, MOVDQ2Q (MMX.swift)
      if prefix >= 2 {
        try executeMMXConversion(instruction, prefix: prefix)
        return
      }
      guard prefix == 1 else { throw .invalidOpcode }
      let low = xmm[reg][0]
      if instruction.hasMemoryOperand {
        try write64(linearAddress(instruction), low)
      } else {
        xmm[Int(instruction.rm)] = XMMValue(low, 0)
      }
    case 0x170:  // PSHUFD / PSHUFHW / PSHUFLW
      let source = try source128(instruction, aligned: sseArithmeticNeedsAlignment)
      let order = Int(instruction.immediate & 0xFF)
      switch prefix {
      case 1:
        let lanes = unsafeBitCast(source, to: SIMD4<UInt32>.self)
        let result = SIMD4<UInt32>(
          lanes[order & 3], lanes[(order >> 2) & 3], lanes[(order >> 4) & 3], lanes[order >> 6])
        xmm[reg] = unsafeBitCast(result, to: XMMValue.self)
      case 2, 3:
        // F3: high four words shuffled; F2: low four.
        let half = prefix == 2 ? 1 : 0
        let words = unsafeBitCast(source[half], to: SIMD4<UInt16>.self)
        let shuffled = SIMD4<UInt16>(
          words[order & 3], words[(order >> 2) & 3], words[(order >> 4) & 3], words[order >> 6])
        var result = source
        result[half] = unsafeBitCast(shuffled, to: UInt64.self)
        xmm[reg] = result
      default:
        throw .invalidOpcode
      }
    default:
      throw .invalidOpcode
    }
  }

  /// Bit i = sign bit of byte i.
  @inline(__always)
  func byteSignMask(_ value: XMMValue) -> UInt32 {
    var mask: UInt32 = 0
    for half in 0..<2 {
      // Gather the top bit of each byte: multiply trick on the isolated sign bits.
      let signs = (value[half] >> 7) & 0x0101_0101_0101_0101
      let gathered = (signs &* 0x0102_0408_1020_4080) >> 56
      mask |= UInt32(gathered) << (8 * UInt32(half))
    }
    return mask
  }

  /// MOVUPS/MOVUPD/MOVSS/MOVSD loads (0F 10) and stores (0F 11).
  private func moveUnalignedOrScalar(_ instruction: Instruction, prefix: UInt8) throws(Fault) {
    let reg = Int(instruction.reg)
    let isStore = instruction.opcode == 0x111
    switch prefix {
    case 0, 1:
      if isStore {
        try storeOrMove128(instruction, xmm[reg], aligned: false)
      } else {
        xmm[reg] = try source128(instruction, aligned: false)
      }
    default:
      let isSingle = prefix == 2
      let lowMask: UInt64 = isSingle ? 0xFFFF_FFFF : ~0
      if isStore {
        let low = xmm[reg][0]
        if instruction.hasMemoryOperand {
          let address = linearAddress(instruction)
          if isSingle {
            try write32(address, UInt32(truncatingIfNeeded: low))
          } else {
            try write64(address, low)
          }
        } else {
          let rm = Int(instruction.rm)
          xmm[rm][0] = (xmm[rm][0] & ~lowMask) | (low & lowMask)
        }
      } else if instruction.hasMemoryOperand {
        // Loads from memory zero the rest of the register.
        let address = linearAddress(instruction)
        let value = isSingle ? UInt64(try read32(address)) : try read64(address)
        xmm[reg] = XMMValue(value, 0)
      } else {
        let low = xmm[Int(instruction.rm)][0]
        xmm[reg][0] = (xmm[reg][0] & ~lowMask) | (low & lowMask)
      }
    }
  }

  /// MOVLPS/MOVLPD/MOVHLPS (0F 12), MOVHPS/MOVHPD/MOVLHPS (0F 16), their stores (0F 13/17),
  /// and SSE3 MOVSLDUP/MOVSHDUP/MOVDDUP.
  private func moveHalves(_ instruction: Instruction, prefix: UInt8) throws(Fault) {
    let reg = Int(instruction.reg)
    let opcode = instruction.opcode
    let high = opcode == 0x116 || opcode == 0x117
    switch opcode {
    case 0x112, 0x116:
      switch prefix {
      case 0, 1:
        if instruction.hasMemoryOperand {
          xmm[reg][high ? 1 : 0] = try read64(linearAddress(instruction))
        } else if prefix == 0 {
          // MOVHLPS: low <- source high; MOVLHPS: high <- source low.
          let source = xmm[Int(instruction.rm)]
          if high {
            xmm[reg][1] = source[0]
          } else {
            xmm[reg][0] = source[1]
          }
        } else {
          throw .invalidOpcode
        }
      case 2:  // MOVSLDUP / MOVSHDUP
        let source = unsafeBitCast(
          try source128(instruction, aligned: sseArithmeticNeedsAlignment), to: SIMD4<UInt32>.self)
        let first = high ? 1 : 0
        let result = SIMD4<UInt32>(source[first], source[first], source[first + 2], source[first + 2])
        xmm[reg] = unsafeBitCast(result, to: XMMValue.self)
      default:  // MOVDDUP (F2 0F 12); F2 0F 16 is undefined
        guard !high else { throw .invalidOpcode }
        let low = try sourceSized(instruction, size: 8)[0]
        xmm[reg] = XMMValue(low, low)
      }
    default:  // 0x113, 0x117 stores
      guard prefix <= 1, instruction.hasMemoryOperand else { throw .invalidOpcode }
      try write64(linearAddress(instruction), xmm[reg][high ? 1 : 0])
    }
  }

  /// SHUFPS / SHUFPD.
  private func shuffleFloats(_ instruction: Instruction, prefix: UInt8) throws(Fault) {
    guard prefix <= 1 else { throw .invalidOpcode }
    let reg = Int(instruction.reg)
    let source = try source128(instruction, aligned: sseArithmeticNeedsAlignment)
    let destination = xmm[reg]
    let order = Int(instruction.immediate & 0xFF)
    if prefix == 0 {
      let left = unsafeBitCast(destination, to: SIMD4<UInt32>.self)
      let right = unsafeBitCast(source, to: SIMD4<UInt32>.self)
      let result = SIMD4<UInt32>(left[order & 3], left[(order >> 2) & 3], right[(order >> 4) & 3], right[order >> 6])
      xmm[reg] = unsafeBitCast(result, to: XMMValue.self)
    } else {
      xmm[reg] = XMMValue(destination[order & 1], source[(order >> 1) & 1])
    }
  }

  /// MASKMOVDQU: byte-masked store of xmm(reg) to DS:rDI (segment override allowed).
  private func maskedMove(_ instruction: Instruction, prefix: UInt8) throws(Fault) {
    guard prefix == 1, !instruction.hasMemoryOperand else { throw .invalidOpcode }
    let data = unsafeBitCast(xmm[Int(instruction.reg)], to: SIMD16<UInt8>.self)
    let mask = byteSignMask(xmm[Int(instruction.rm)])
    if mask == 0 { return }
    var offset = gpr[7]
    switch instruction.addressSize {
    case 4: offset &= 0xFFFF_FFFF
    case 2: offset &= 0xFFFF
    default: break
    }
    let base = segmentBase[Int(instruction.segment)] &+ offset
    for index in 0..<16 where mask & (1 << UInt32(index)) != 0 {
      try write8(base &+ UInt64(index), data[index])
    }
  }

  /// 66 0F 71/72/73 groups: PSRLW/PSRAW/PSLLW, PSRLD/PSRAD/PSLLD, PSRLQ/PSRLDQ/PSLLQ/PSLLDQ by imm8.
  private func shiftByImmediate(_ instruction: Instruction, prefix: UInt8) throws(Fault) {
    guard prefix == 1, !instruction.hasMemoryOperand else { throw .invalidOpcode }
    let rm = Int(instruction.rm)
    let count = instruction.immediate & 0xFF
    let value = xmm[rm]
    let kind = (instruction.reg & 7)
    switch (instruction.opcode, kind) {
    case (0x171, 2), (0x171, 4), (0x171, 6):
      let lanes = unsafeBitCast(value, to: SIMD8<UInt16>.self)
      let result: SIMD8<UInt16>
      if kind == 4 {
        let shift = Int16(min(count, 15))
        result = unsafeBitCast(
          unsafeBitCast(lanes, to: SIMD8<Int16>.self) &>> SIMD8<Int16>(repeating: shift), to: SIMD8<UInt16>.self)
      } else if count > 15 {
        result = .zero
      } else if kind == 2 {
        result = lanes &>> SIMD8<UInt16>(repeating: UInt16(count))
      } else {
        result = lanes &<< SIMD8<UInt16>(repeating: UInt16(count))
      }
      xmm[rm] = unsafeBitCast(result, to: XMMValue.self)
    case (0x172, 2), (0x172, 4), (0x172, 6):
      let lanes = unsafeBitCast(value, to: SIMD4<UInt32>.self)
      let result: SIMD4<UInt32>
      if kind == 4 {
        let shift = Int32(min(count, 31))
        result = unsafeBitCast(
          unsafeBitCast(lanes, to: SIMD4<Int32>.self) &>> SIMD4<Int32>(repeating: shift), to: SIMD4<UInt32>.self)
      } else if count > 31 {
        result = .zero
      } else if kind == 2 {
        result = lanes &>> SIMD4<UInt32>(repeating: UInt32(count))
      } else {
        result = lanes &<< SIMD4<UInt32>(repeating: UInt32(count))
      }
      xmm[rm] = unsafeBitCast(result, to: XMMValue.self)
    case (0x173, 2):
      xmm[rm] = count > 63 ? .zero : value &>> XMMValue(repeating: count)
    case (0x173, 6):
      xmm[rm] = count > 63 ? .zero : value &<< XMMValue(repeating: count)
    case (0x173, 3):
      xmm[rm] = shiftBytesRight(value, by: Int(count))
    case (0x173, 7):
      xmm[rm] = shiftBytesLeft(value, by: Int(count))
    default:
      throw .invalidOpcode
    }
  }

  @inline(__always)
  private func shiftBytesRight(_ value: XMMValue, by count: Int) -> XMMValue {
    if count >= 16 { return .zero }
    if count == 0 { return value }
    let bits = UInt64(count * 8)
    if count >= 8 { return XMMValue(value[1] >> (bits - 64), 0) }
    return XMMValue(value[0] >> bits | value[1] << (64 - bits), value[1] >> bits)
  }

  @inline(__always)
  private func shiftBytesLeft(_ value: XMMValue, by count: Int) -> XMMValue {
    if count >= 16 { return .zero }
    if count == 0 { return value }
    let bits = UInt64(count * 8)
    if count >= 8 { return XMMValue(0, value[0] << (bits - 64)) }
    return XMMValue(value[0] << bits, value[1] << bits | value[0] >> (64 - bits))
  }

  /// EMMS: marks every x87 register empty.
  private func emms() throws(Fault) {
    guard cr0 & X86.cr0EM == 0 else { throw .invalidOpcode }
    guard cr0 & X86.cr0TS == 0 else { throw .deviceNotAvailable }
    try checkPendingX87Exception()
    fpuTags = 0xFFFF
  }
}
