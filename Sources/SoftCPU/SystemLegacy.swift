import VMCore

// Instructions that exist only outside 64-bit mode (the decoder's `.legacyOnly` op, `opcode` =
// the primary byte): PUSH/POP ES/CS/SS/DS, PUSHA/POPA, LES/LDS, BOUND and the BCD adjustments.
// They use the SS.B-sized stack (StackCursor), as 16- and 32-bit code expects.

extension CPU {
  /// Executes a legacy-only instruction (never decoded in 64-bit mode).
  func executeLegacy(_ ins: Instruction) throws(Fault) {
    let size = Int(ins.operandSize)
    switch ins.opcode {
    case 0x06, 0x0E, 0x16, 0x1E:  // PUSH ES/CS/SS/DS
      var stack = StackCursor(cpu: self)
      try stack.push(UInt64(segments[Int(ins.opcode >> 3)].selector), size: size, cpl: cpl)
      stack.commit()
    case 0x07, 0x17, 0x1F:  // POP ES/SS/DS
      var stack = StackCursor(cpu: self)
      let selector = UInt16(truncatingIfNeeded: try stack.pop(size: size, cpl: cpl))
      try loadSegment(UInt8(ins.opcode >> 3), selector: selector)
      stack.commit()
    case 0x60:  // PUSHA/PUSHAD
      var stack = StackCursor(cpu: self)
      let originalSP = gpr[4]
      for register in 0..<8 {
        try stack.push(register == 4 ? originalSP : gpr[register], size: size, cpl: cpl)
      }
      stack.commit()
    case 0x61:  // POPA/POPAD
      var stack = StackCursor(cpu: self)
      var values = (UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0))
      values.7 = try stack.pop(size: size, cpl: cpl)
      values.6 = try stack.pop(size: size, cpl: cpl)
      values.5 = try stack.pop(size: size, cpl: cpl)
      _ = try stack.pop(size: size, cpl: cpl)
      values.3 = try stack.pop(size: size, cpl: cpl)
      values.2 = try stack.pop(size: size, cpl: cpl)
      values.1 = try stack.pop(size: size, cpl: cpl)
      values.0 = try stack.pop(size: size, cpl: cpl)
      stack.commit()
      let operand = ins.operandSize
      writeRegister(0, size: operand, values.0)
      writeRegister(1, size: operand, values.1)
      writeRegister(2, size: operand, values.2)
      writeRegister(3, size: operand, values.3)
      writeRegister(5, size: operand, values.5)
      writeRegister(6, size: operand, values.6)
      writeRegister(7, size: operand, values.7)
    case 0xC4, 0xC5:  // LES, LDS
      guard ins.hasMemoryOperand else { throw .invalidOpcode }
      let address = linearAddress(ins)
      let offset = try readMemory(address, size: ins.operandSize)
      let selector = try read16(address &+ UInt64(size))
      try loadDataSegment(ins.opcode == 0xC4 ? SegmentIndex.es : SegmentIndex.ds, selector: selector)
      writeRegister(ins.reg, size: ins.operandSize, offset)
    case 0x62:  // BOUND
      guard ins.hasMemoryOperand else { throw .invalidOpcode }
      let address = linearAddress(ins)
      let index = signExtend(readRegister(ins.reg, size: ins.operandSize), size: ins.operandSize)
      let lower = signExtend(try readMemory(address, size: ins.operandSize), size: ins.operandSize)
      let upper = signExtend(try readMemory(address &+ UInt64(size), size: ins.operandSize), size: ins.operandSize)
      if index < lower || index > upper { throw .boundRange }
    case 0x27, 0x2F: try decimalAdjust(subtract: ins.opcode == 0x2F)
    case 0x37, 0x3F: asciiAdjust(subtract: ins.opcode == 0x3F)
    case 0xD4:  // AAM
      let base = UInt8(truncatingIfNeeded: ins.immediate)
      guard base != 0 else { throw .divideError }
      let al = UInt8(truncatingIfNeeded: gpr[0])
      let result = UInt64(al / base) << 8 | UInt64(al % base)
      writeRegister(0, size: 2, result)
      setResultFlags(UInt8(truncatingIfNeeded: result))
    case 0xD5:  // AAD
      let base = UInt8(truncatingIfNeeded: ins.immediate)
      let al = UInt8(truncatingIfNeeded: gpr[0])
      let ah = UInt8(truncatingIfNeeded: gpr[0] >> 8)
      let result = al &+ ah &* base
      writeRegister(0, size: 2, UInt64(result))
      setResultFlags(result)
    case 0xD6:  // SALC
      let carry = rflags & RFlags.cf != 0
      gpr[0] = (gpr[0] & ~0xFF) | (carry ? 0xFF : 0)
    default:
      throw .invalidOpcode
    }
  }

  /// SF, ZF, PF from a byte result (AAM/AAD), CF/AF/OF cleared.
  private func setResultFlags(_ value: UInt8) {
    var flags: UInt64 = 0
    if value == 0 { flags |= RFlags.zf }
    if value & 0x80 != 0 { flags |= RFlags.sf }
    if value.nonzeroBitCount & 1 == 0 { flags |= RFlags.pf }
    setStatusFlags(flags)
  }

  /// DAA / DAS.
  private func decimalAdjust(subtract: Bool) throws(Fault) {
    let flags = rflags
    var al = UInt8(truncatingIfNeeded: gpr[0])
    let originalAL = al
    let originalCarry = flags & RFlags.cf != 0
    var carry = false
    var auxiliary = false
    if al & 0x0F > 9 || flags & RFlags.af != 0 {
      al = subtract ? al &- 6 : al &+ 6
      carry = originalCarry || (subtract ? originalAL < 6 : originalAL > 0xF9)
      auxiliary = true
    }
    if originalAL > 0x99 || originalCarry {
      al = subtract ? al &- 0x60 : al &+ 0x60
      carry = true
    }
    gpr[0] = (gpr[0] & ~0xFF) | UInt64(al)
    var newFlags: UInt64 = 0
    if carry { newFlags |= RFlags.cf }
    if auxiliary { newFlags |= RFlags.af }
    if al == 0 { newFlags |= RFlags.zf }
    if al & 0x80 != 0 { newFlags |= RFlags.sf }
    if al.nonzeroBitCount & 1 == 0 { newFlags |= RFlags.pf }
    setStatusFlags(newFlags)
  }

  /// AAA / AAS.
  private func asciiAdjust(subtract: Bool) {
    let flags = rflags
    var ax = UInt16(truncatingIfNeeded: gpr[0])
    let adjust = ax & 0x0F > 9 || flags & RFlags.af != 0
    if adjust {
      if subtract {
        ax = (ax &- 6) & 0xFF | ((ax &- 0x100) & 0xFF00)
      } else {
        ax = ax &+ 0x106
      }
    }
    ax &= 0xFF0F
    gpr[0] = (gpr[0] & ~0xFFFF) | UInt64(ax)
    setStatusFlags(adjust ? RFlags.cf | RFlags.af : 0)
  }
}
