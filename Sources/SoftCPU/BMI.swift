// VEX-encoded general-purpose instructions: BMI1 (ANDN, BEXTR, BLSI, BLSMSK, BLSR) and BMI2
// (BZHI, MULX, PDEP, PEXT, RORX, SARX, SHLX, SHRX), after the Intel SDM volume 2 and the AMD
// APM volume 3. They use no vector state, so they do not depend on CR4.OSXSAVE or XCR0; VEX.L = 1
// raises #UD. The operand size is 64 bits with VEX.W in 64-bit mode, else 32 bits (results
// zero-extended). Flags the SDM leaves undefined (AF and PF everywhere, SF for BEXTR) are
// cleared.

extension CPU {
  /// Executes a VEX-encoded instruction (`.vex`): the general-purpose forms here, the vector
  /// forms in the AVX unit.
  func executeVEX(_ ins: Instruction) throws(Fault) {
    switch ins.opcode {
    case 0x2F2, 0x2F3, 0x2F5, 0x2F6, 0x2F7, 0x3F0:
      try executeBitManipulation(ins)
    default:
      try executeAVX(ins)
    }
  }

  /// BMI1/BMI2 (VEX.LZ.0F38 F2, F3, F5, F6, F7 and VEX.LZ.F2.0F3A F0).
  private func executeBitManipulation(_ ins: Instruction) throws(Fault) {
    guard !ins.vexL else { throw .invalidOpcode }
    let size = ins.operandSize
    let bits = UInt64(size) &* 8
    let mask = sizeMask(size)
    let prefix = ins.mandatoryPrefix
    let second = readRegister(ins.vexRegister, size: size)
    switch (ins.opcode, prefix) {
    case (0x2F2, 0):  // ANDN reg, vvvv, r/m
      let result = ~second & (try readRm(ins, size: size)) & mask
      writeRegister(ins.reg, size: size, result)
      setBitManipulationFlags(result, size: size, carry: false)
    case (0x2F3, 0):  // group 17: BLSR /1, BLSMSK /2, BLSI /3 (vvvv = result, r/m = source)
      let kind = ins.reg & 7
      guard kind >= 1 && kind <= 3 else { throw .invalidOpcode }
      let source = try readRm(ins, size: size)
      let result: UInt64
      var flags: UInt64 = 0
      switch kind {
      case 1:
        result = (source &- 1) & source & mask
        if source == 0 { flags |= RFlags.cf }
        if result == 0 { flags |= RFlags.zf }
      case 2:
        result = ((source &- 1) ^ source) & mask
        if source == 0 { flags |= RFlags.cf }
      default:
        result = (0 &- source) & source & mask
        if source != 0 { flags |= RFlags.cf }
        if result == 0 { flags |= RFlags.zf }
      }
      if (result >> (bits &- 1)) & 1 != 0 { flags |= RFlags.sf }
      writeRegister(ins.vexRegister, size: size, result)
      setStatusFlags(flags)
    case (0x2F5, 0):  // BZHI reg, r/m, vvvv
      let source = try readRm(ins, size: size)
      let index = second & 0xFF
      let result = index < bits ? source & ((UInt64(1) << index) &- 1) : source
      writeRegister(ins.reg, size: size, result)
      setBitManipulationFlags(result, size: size, carry: index > bits &- 1)
    case (0x2F5, 3):  // PDEP reg, vvvv, r/m
      let selector = try readRm(ins, size: size)
      writeRegister(ins.reg, size: size, depositBits(second, mask: selector))
    case (0x2F5, 2):  // PEXT reg, vvvv, r/m
      let selector = try readRm(ins, size: size)
      writeRegister(ins.reg, size: size, extractBits(second, mask: selector))
    case (0x2F6, 3):  // MULX reg (high), vvvv (low), r/m * EDX/RDX
      let factor = try readRm(ins, size: size)
      let multiplicand = readRegister(2, size: size)
      let high: UInt64
      let low: UInt64
      if size == 8 {
        (high, low) = multiplicand.multipliedFullWidth(by: factor)
      } else {
        let product = multiplicand &* factor
        (high, low) = (product >> 32, product & 0xFFFF_FFFF)
      }
      writeRegister(ins.vexRegister, size: size, low)
      writeRegister(ins.reg, size: size, high)
    case (0x2F7, 0):  // BEXTR reg, r/m, vvvv
      let source = try readRm(ins, size: size)
      let start = second & 0xFF
      let length = (second >> 8) & 0xFF
      var result: UInt64 = start < bits ? source >> start : 0
      if length < 64 { result &= (UInt64(1) << length) &- 1 }
      writeRegister(ins.reg, size: size, result)
      setStatusFlags(result == 0 ? RFlags.zf : 0)
    case (0x2F7, _):  // SHLX (66), SARX (F3), SHRX (F2) reg, r/m, vvvv
      let source = try readRm(ins, size: size)
      let count = second & (bits &- 1)
      let result: UInt64
      switch prefix {
      case 1: result = (source << count) & mask
      case 2: result = UInt64(bitPattern: signExtend(source, size: size) >> Int64(count)) & mask
      default: result = source >> count
      }
      writeRegister(ins.reg, size: size, result)
    case (0x3F0, 3):  // RORX reg, r/m, imm8
      guard ins.vexRegister == 0 else { throw .invalidOpcode }
      let source = try readRm(ins, size: size)
      let count = ins.immediate & (bits &- 1)
      let result = count == 0 ? source : (source >> count | source << (bits &- count)) & mask
      writeRegister(ins.reg, size: size, result)
    default:
      throw .invalidOpcode
    }
  }

  /// ANDN/BZHI flags: SF and ZF from the result, CF as given, OF cleared.
  @inline(__always)
  private func setBitManipulationFlags(_ result: UInt64, size: UInt8, carry: Bool) {
    var flags: UInt64 = carry ? RFlags.cf : 0
    if result == 0 { flags |= RFlags.zf }
    if (result >> (UInt64(size) &* 8 &- 1)) & 1 != 0 { flags |= RFlags.sf }
    setStatusFlags(flags)
  }

  /// PDEP: the low bits of `value` placed, in order, at the set bits of `mask`.
  private func depositBits(_ value: UInt64, mask: UInt64) -> UInt64 {
    var result: UInt64 = 0
    var remaining = mask
    var source = value
    while remaining != 0 {
      let lowest = remaining & (0 &- remaining)
      if source & 1 != 0 { result |= lowest }
      source >>= 1
      remaining &= remaining &- 1
    }
    return result
  }

  /// PEXT: the bits of `value` at the set bits of `mask`, packed into the low bits.
  private func extractBits(_ value: UInt64, mask: UInt64) -> UInt64 {
    var result: UInt64 = 0
    var remaining = mask
    var position: UInt64 = 0
    while remaining != 0 {
      let lowest = remaining & (0 &- remaining)
      if value & lowest != 0 { result |= 1 << position }
      position &+= 1
      remaining &= remaining &- 1
    }
    return result
  }
}
