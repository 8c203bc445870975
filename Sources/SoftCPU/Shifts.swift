// Shifts and rotates: SHL/SHR/SAR (lazy flags), ROL/ROR/RCL/RCR and SHLD/SHRD (eager flags).
// Counts are masked to 5 bits (6 with a 64-bit operand); a masked count of 0 changes nothing.
// RCL/RCR on 8/16-bit operands rotate modulo 9/17. OF is computed with the count-1 formula for
// every count (undefined for other counts). SHLD/SHRD with a 16-bit operand and a count above
// 16 give an undefined result; this core shifts in bits of `src` then `dst` again.

extension CPU {
  @_transparent
  func shiftCount(_ ins: Instruction) -> UInt64 {
    let raw =
      ins.opcode == 0xD2 || ins.opcode == 0xD3 || ins.op == .shldCL || ins.op == .shrdCL
      ? gpr[1] : ins.immediate
    return raw & (ins.operandSize == 8 ? 0x3F : 0x1F)
  }

  /// A masked count of 0: flags and value unchanged, but a 32-bit register destination is
  /// still written (its upper half cleared), as hardware does.
  func zeroCountShift(_ ins: Instruction) throws(Fault) {
    let value = try readRm(ins, size: ins.operandSize)
    if !ins.hasMemoryOperand && ins.operandSize == 4 { writeRegister(ins.rm, size: 4, value) }
  }

  @_transparent
  func shift(_ ins: Instruction) throws(Fault) {
    let size = ins.operandSize
    let count = shiftCount(ins)
    if count == 0 {
      try zeroCountShift(ins)
      return
    }
    let mask = sizeMask(size)
    let op = ins.op
    let old = try modifyRm(ins, size: size) { dst in
      switch op {
      case .shlRm: return (dst << count) & mask
      case .shrRm: return dst >> count
      default: return UInt64(bitPattern: signExtend(dst, size: size) >> Int64(count)) & mask
      }
    }
    let result: UInt64
    switch op {
    case .shlRm:
      result = (old << count) & mask
      recordFlags(.shl, size: size, dst: old, src: count, result: result)
    case .shrRm:
      result = old >> count
      recordFlags(.shr, size: size, dst: old, src: count, result: result)
    default:
      result = UInt64(bitPattern: signExtend(old, size: size) >> Int64(count)) & mask
      recordFlags(.sar, size: size, dst: old, src: count, result: result)
    }
  }

  @_transparent
  func rotate(_ ins: Instruction) throws(Fault) {
    let size = ins.operandSize
    let maskedCount = shiftCount(ins)
    if maskedCount == 0 {
      try zeroCountShift(ins)
      return
    }
    let bits = UInt64(size) * 8
    let mask = sizeMask(size)
    let op = ins.op
    let carryIn: UInt64 = carryFlag ? 1 : 0
    let count: UInt64
    switch op {
    case .rolRm, .rorRm: count = maskedCount & (bits - 1)
    default: count = size < 4 ? maskedCount % (bits + 1) : maskedCount
    }
    func compute(_ dst: UInt64) -> UInt64 {
      switch op {
      case .rolRm:
        return count == 0 ? dst : ((dst << count) | (dst >> (bits - count))) & mask
      case .rorRm:
        return count == 0 ? dst : ((dst >> count) | (dst << (bits - count))) & mask
      case .rclRm:
        if count == 0 { return dst }
        let wrapped = count > 1 ? dst >> (bits + 1 - count) : 0
        return ((dst << count) | (carryIn << (count - 1)) | wrapped) & mask
      default:
        if count == 0 { return dst }
        let wrapped = count > 1 ? dst << (bits + 1 - count) : 0
        return ((dst >> count) | (carryIn << (bits - count)) | wrapped) & mask
      }
    }
    let old = try modifyRm(ins, size: size, compute)
    let result = compute(old)
    let msb = (result >> (bits - 1)) & 1
    var carry: UInt64
    var overflow: UInt64
    switch op {
    case .rolRm:
      carry = result & 1
      overflow = msb ^ carry
    case .rorRm:
      carry = msb
      overflow = msb ^ ((result >> (bits - 2)) & 1)
    case .rclRm:
      carry = count == 0 ? carryIn : (old >> (bits - count)) & 1
      overflow = msb ^ carry
    default:
      carry = count == 0 ? carryIn : (old >> (count - 1)) & 1
      overflow = msb ^ ((result >> (bits - 2)) & 1)
    }
    materializeFlags()
    storedFlags = (storedFlags & ~(RFlags.cf | RFlags.of)) | carry | overflow << 11
  }

  func doubleShift(_ ins: Instruction) throws(Fault) {
    let size = ins.operandSize
    let count = shiftCount(ins)
    if count == 0 {
      try zeroCountShift(ins)
      return
    }
    let bits = UInt64(size) * 8
    let mask = sizeMask(size)
    let src = readRegister(ins.reg, size: size)
    let left = ins.op == .shldImm || ins.op == .shldCL
    func compute(_ dst: UInt64) -> UInt64 {
      if left {
        if count <= bits { return ((dst << count) | (src >> (bits - count))) & mask }
        // 16-bit operand, count 17-31: dst:src:dst pattern.
        let rest = count - bits
        return ((src << rest) | (dst >> (bits - rest))) & mask
      }
      if count <= bits { return ((dst >> count) | (src << (bits - count))) & mask }
      let rest = count - bits
      return ((src >> rest) | (dst << (bits - rest))) & mask
    }
    let old = try modifyRm(ins, size: size, compute)
    let result = compute(old)
    let carry: UInt64
    if left {
      carry = count <= bits ? (old >> (bits - count)) & 1 : (src >> (2 * bits - count)) & 1
    } else {
      carry = count <= bits ? (old >> (count - 1)) & 1 : (src >> (count - bits - 1)) & 1
    }
    var flags: UInt64 = carry
    if parityEven(result) { flags |= RFlags.pf }
    if result == 0 { flags |= RFlags.zf }
    if (result >> (bits - 1)) & 1 != 0 { flags |= RFlags.sf }
    if ((result ^ old) >> (bits - 1)) & 1 != 0 { flags |= RFlags.of }
    setStatusFlags(flags)
  }
}
