// MUL/IMUL (one-, two- and three-operand forms) and DIV/IDIV.
// MUL/IMUL: CF = OF = (the high half is not the extension of the low half); SF, ZF, PF from the
// low half of the result and AF = 0 (undefined architecturally).
// DIV/IDIV: #DE on a zero divisor or a quotient that does not fit; flags are left unchanged
// (undefined architecturally).

extension CPU {
  /// Sets flags after a multiply: `overflow` gives CF/OF, `low` the rest (size `size`).
  @inline(__always)
  func recordMultiplyFlags(low: UInt64, size: UInt8, overflow: Bool) {
    var flags: UInt64 = overflow ? (RFlags.cf | RFlags.of) : 0
    if parityEven(low) { flags |= RFlags.pf }
    if low & sizeMask(size) == 0 { flags |= RFlags.zf }
    if (low >> (UInt64(size) * 8 - 1)) & 1 != 0 { flags |= RFlags.sf }
    setStatusFlags(flags)
  }

  /// MUL/IMUL r/m: RDX:RAX (or AX for bytes) = RAX * r/m.
  func multiplyAccumulator(_ ins: Instruction) throws(Fault) {
    let size = ins.operandSize
    let src = try readRm(ins, size: size)
    let signed = ins.op == .imulRm
    let bits = UInt64(size) * 8
    if size == 8 {
      let low: UInt64
      let high: UInt64
      let overflow: Bool
      if signed {
        let product = Int64(bitPattern: gpr[0]).multipliedFullWidth(by: Int64(bitPattern: src))
        high = UInt64(bitPattern: product.high)
        low = product.low
        overflow = Int64(bitPattern: low) >> 63 != product.high
      } else {
        let product = gpr[0].multipliedFullWidth(by: src)
        high = product.high
        low = product.low
        overflow = high != 0
      }
      gpr[0] = low
      gpr[2] = high
      recordMultiplyFlags(low: low, size: 8, overflow: overflow)
      return
    }
    let a = readRegister(0, size: size)
    let product: UInt64
    let overflow: Bool
    if signed {
      let full = signExtend(a, size: size) &* signExtend(src, size: size)
      product = UInt64(bitPattern: full)
      overflow = signExtend(product & sizeMask(size), size: size) != full
    } else {
      product = a &* src
      overflow = product >> bits != 0
    }
    let low = product & sizeMask(size)
    let high = (product >> bits) & sizeMask(size)
    if size == 1 {
      writeRegister(0, size: 2, product & 0xFFFF)
    } else {
      writeRegister(0, size: size, low)
      writeRegister(2, size: size, high)
    }
    recordMultiplyFlags(low: low, size: size, overflow: overflow)
  }

  /// IMUL reg, r/m (two-operand: `other` = reg) or IMUL reg, r/m, imm (`other` = imm).
  func multiplySigned(_ ins: Instruction, _ other: UInt64) throws(Fault) {
    let size = ins.operandSize
    let src = try readRm(ins, size: size)
    let low: UInt64
    let overflow: Bool
    if size == 8 {
      let product = Int64(bitPattern: src).multipliedFullWidth(by: Int64(bitPattern: other))
      low = product.low
      overflow = Int64(bitPattern: low) >> 63 != product.high
    } else {
      let full = signExtend(src, size: size) &* signExtend(other, size: size)
      low = UInt64(bitPattern: full) & sizeMask(size)
      overflow = signExtend(low, size: size) != full
    }
    writeRegister(ins.reg, size: size, low)
    recordMultiplyFlags(low: low, size: size, overflow: overflow)
  }

  /// DIV/IDIV r/m.
  func divideAccumulator(_ ins: Instruction) throws(Fault) {
    let size = ins.operandSize
    let divisor = try readRm(ins, size: size)
    if divisor == 0 { throw .divideError }
    let signed = ins.op == .idivRm
    let bits = UInt64(size) * 8
    switch size {
    case 8:
      if signed {
        let d = Int64(bitPattern: divisor)
        let high = Int64(bitPattern: gpr[2])
        let low = gpr[0]
        // 128-bit signed dividend: divide magnitudes, then fix signs.
        let negative = high < 0
        var magnitudeHigh = UInt64(bitPattern: high)
        var magnitudeLow = low
        if negative {
          magnitudeLow = ~low &+ 1
          magnitudeHigh = ~magnitudeHigh &+ (magnitudeLow == 0 ? 1 : 0)
        }
        let divisorMagnitude = d < 0 ? UInt64(bitPattern: 0 &- d) : UInt64(d)
        if magnitudeHigh >= divisorMagnitude { throw .divideError }
        let (q, r) = divisorMagnitude.dividingFullWidth((magnitudeHigh, magnitudeLow))
        let quotientNegative = negative != (d < 0)
        if quotientNegative {
          if q > 0x8000_0000_0000_0000 { throw .divideError }
        } else if q > 0x7FFF_FFFF_FFFF_FFFF {
          throw .divideError
        }
        gpr[0] = quotientNegative ? 0 &- q : q
        gpr[2] = negative ? 0 &- r : r
      } else {
        if gpr[2] >= divisor { throw .divideError }
        let (q, r) = divisor.dividingFullWidth((gpr[2], gpr[0]))
        gpr[0] = q
        gpr[2] = r
      }
    default:
      let dividend: UInt64 =
        size == 1 ? gpr[0] & 0xFFFF : (readRegister(2, size: size) << bits) | readRegister(0, size: size)
      let quotient: UInt64
      let remainder: UInt64
      if signed {
        let n = size == 4 ? Int64(bitPattern: dividend) : signExtend(dividend, size: size * 2)
        let d = signExtend(divisor, size: size)
        if n == Int64.min && d == -1 { throw .divideError }
        let q = n / d
        if q != signExtend(UInt64(bitPattern: q) & sizeMask(size), size: size) { throw .divideError }
        quotient = UInt64(bitPattern: q) & sizeMask(size)
        remainder = UInt64(bitPattern: n % d) & sizeMask(size)
      } else {
        let q = dividend / divisor
        if q > sizeMask(size) { throw .divideError }
        quotient = q
        remainder = dividend % divisor
      }
      if size == 1 {
        gpr[0] = (gpr[0] & ~0xFFFF) | quotient | remainder << 8
      } else {
        writeRegister(0, size: size, quotient)
        writeRegister(2, size: size, remainder)
      }
    }
  }
}
