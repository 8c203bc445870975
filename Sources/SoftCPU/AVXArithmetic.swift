import CSoftFloat
import VMCore

// FMA3 and F16C (Intel SDM vol. 2: VFMADD*, VFMSUB*, VFNMADD*, VFNMSUB*, VFMADDSUB*, VFMSUBADD*
// 132/213/231; VCVTPH2PS, VCVTPS2PH). Like the SSE unit, the arithmetic runs as the same host
// instruction under the guest's MXCSR (CSoftFloat), so the single rounding, NaN selection,
// DAZ/FTZ and the exception flags are the host's. An unmasked exception raises #XM (or #UD
// without CR4.OSXMMEXCPT) with the destination unchanged.

extension CPU {
  /// FMA3: VEX.66.0F38 96-9F, A6-AF, B6-BF; VEX.W selects double precision. Scalar forms (odd
  /// opcodes from 9 up in the low nibble) ignore VEX.L and keep bits 127:32 (or 127:64) of the
  /// destination.
  func fusedMultiplyAdd(_ ins: Instruction) throws(Fault) {
    guard ins.mandatoryPrefix == 1 else { throw .invalidOpcode }
    let byte = UInt8(truncatingIfNeeded: ins.opcode)
    let scalar = byte & 0xF >= 9 && byte & 1 == 1
    let wide = ins.vexL && !scalar
    let reg = Int(ins.reg)
    var destination = ymm(reg)
    var middle = ymm(Int(ins.vexRegister))
    var source: YMMValue
    if ins.hasMemoryOperand && scalar {
      let address = linearAddress(ins)
      source = YMMValue(ins.rexW ? try read64(address) : UInt64(try read32(address)), 0, 0, 0)
    } else {
      source = try vectorOperand(ins, wide: wide)
    }
    let operation = UInt32(byte) | (ins.rexW ? 0x100 : 0) | (wide ? 0x200 : 0)
    let inputs = (destination, middle, source)
    var raised = csf_fma(operation, mxcsr, &destination, &middle, &source)
    guard raised != CSF_UNSUPPORTED else { throw .invalidOpcode }
    let unmasked = ~(mxcsr >> 7) & MXCSR.flags
    if _slowPath(unmasked & 0x18 != 0 && raised & unmasked & MXCSR.precomputationFlags == 0) {
      let elements = scalar ? 1 : (wide ? 32 : 16) / (ins.rexW ? 8 : 4)
      raised = fusedElementFlags(operation, inputs, elements: elements, double: ins.rexW)
    }
    try commitSIMDExceptions(raised)
    setYMM(reg, destination, wide: wide)
  }

  /// The exception flags of an FMA with overflow or underflow unmasked, element by element as
  /// the host reports them: an element that overflows or underflows reports OE or UE with its
  /// pre-computation flags, and PE when its result with an unbounded exponent is inexact
  /// (whether PE is masked or not). With underflow unmasked every tiny result underflows, exact
  /// or not (found by running the element again with FTZ, which flags every tiny result).
  private func fusedElementFlags(
    _ operation: UInt32, _ inputs: (YMMValue, YMMValue, YMMValue), elements: Int, double: Bool
  ) -> UInt32 {
    let unmasked = ~(mxcsr >> 7) & MXCSR.flags
    var total: UInt32 = 0
    for element in 0..<elements {
      var keep = YMMValue()
      if double {
        keep[element] = ~0
      } else {
        keep[element / 2] = 0xFFFF_FFFF << UInt64(32 * (element & 1))
      }
      var destination = inputs.0 & keep
      var middle = inputs.1 & keep
      var source = inputs.2 & keep
      let (d, m, s) = (destination, middle, source)
      var flags = csf_fma(operation, mxcsr, &destination, &middle, &source)
      (destination, middle, source) = (d, m, s)
      let flushed = csf_fma(operation, mxcsr | 0x8000, &destination, &middle, &source)
      let overflow: UInt32 = 0x8
      let underflow: UInt32 = 0x10
      let fired: UInt32
      if unmasked & overflow != 0 && flags & overflow != 0 {
        fired = overflow
      } else if unmasked & underflow != 0 && flushed & underflow != 0 {
        fired = underflow
      } else {
        total |= flags
        continue
      }
      func bits(_ value: YMMValue) -> UInt64 {
        double ? value[element] : value[element / 2] >> UInt64(32 * (element & 1)) & 0xFFFF_FFFF
      }
      let inexact = csf_fma_unbounded_inexact(operation, UInt32(element), bits(d), bits(m), bits(s), mxcsr)
      flags = flags & MXCSR.precomputationFlags | fired | (inexact != 0 ? MXCSR.inexact : 0)
      total |= flags
    }
    return total
  }

  /// VCVTPH2PS (VEX.66.0F38.W0 13) and VCVTPS2PH (VEX.66.0F3A.W0 1D, r/m destination).
  func halfPrecisionConversion(_ ins: Instruction) throws(Fault) {
    guard ins.mandatoryPrefix == 1, ins.vexRegister == 0, !ins.rexW else { throw .invalidOpcode }
    let wide = ins.vexL
    var result = YMMValue()
    if ins.opcode == 0x213 {
      var source: YMMValue
      if ins.hasMemoryOperand {
        let address = linearAddress(ins)
        let low = wide ? try read128(address, aligned: false) : XMMValue(try read64(address), 0)
        source = YMMValue(low[0], low[1], 0, 0)
      } else {
        source = ymm(Int(ins.rm))
      }
      let raised = csf_f16c(wide ? 1 : 0, 0, mxcsr, &result, &source)
      try commitSIMDExceptions(raised)
      setYMM(Int(ins.reg), result, wide: wide)
      return
    }
    var source = ymm(Int(ins.reg))
    let immediate = UInt32(truncatingIfNeeded: ins.immediate)
    var raised = csf_f16c(wide ? 3 : 2, immediate, mxcsr, &result, &source)
    let unmasked = ~(mxcsr >> 7) & MXCSR.flags
    if _slowPath(unmasked & 0x18 != 0 && raised & unmasked & MXCSR.precomputationFlags == 0) {
      raised = halfConversionElementFlags(immediate, source, elements: wide ? 8 : 4)
    }
    // An unmasked exception leaves the destination (register or memory) unchanged.
    try commitSIMDExceptions(raised)
    if ins.hasMemoryOperand {
      let address = linearAddress(ins)
      if wide {
        try write128(address, XMMValue(result[0], result[1]), aligned: false)
      } else {
        try write64(address, result[0])
      }
    } else {
      setYMM(Int(ins.rm), result, wide: false)
      // VEX.256 marks AVX in use although only an XMM register is written (as the host shows).
      if wide { xsaveInUse |= XSaveModel.avx }
    }
  }

  /// The exception flags of VCVTPS2PH with overflow or underflow unmasked, element by element:
  /// an element whose half-precision result overflows or is tiny (after rounding; exact or not,
  /// FTZ does not apply) reports OE or UE with its pre-computation flags, and PE when the
  /// conversion with an unbounded exponent is inexact (whether PE is masked or not).
  private func halfConversionElementFlags(_ immediate: UInt32, _ source: YMMValue, elements: Int) -> UInt32 {
    let unmasked = ~(mxcsr >> 7) & MXCSR.flags
    let overflow: UInt32 = 0x8
    let underflow: UInt32 = 0x10
    var total: UInt32 = 0
    for element in 0..<elements {
      let shift = UInt64(32 * (element & 1))
      let single = UInt32(truncatingIfNeeded: source[element / 2] >> shift)
      var alone = YMMValue()
      alone[element / 2] = UInt64(single) << shift
      var result = YMMValue()
      let flags = csf_f16c(elements == 8 ? 3 : 2, immediate, mxcsr, &result, &alone)
      let half = UInt16(truncatingIfNeeded: result[element / 4] >> UInt64(16 * (element & 3)))
      // Masked, UE reports a tiny inexact result; an exact tiny one is a denormal half.
      let tiny = flags & underflow != 0 || (half & 0x7C00 == 0 && half & 0x3FF != 0)
      let fired: UInt32
      if unmasked & overflow != 0 && flags & overflow != 0 {
        fired = overflow
      } else if unmasked & underflow != 0 && tiny {
        fired = underflow
      } else {
        total |= flags
        continue
      }
      let inexact = csf_single_to_half_unbounded_inexact(single, mxcsr) != 0 ? MXCSR.inexact : 0
      total |= flags & MXCSR.precomputationFlags | fired | inexact
    }
    return total
  }
}
