// BT/BTS/BTR/BTC, BSF/BSR, TZCNT/LZCNT/POPCNT, BSWAP.
// Flags: BT* set CF and leave the others unchanged (OF/SF/AF/PF are undefined). BSF/BSR set ZF
// and leave the destination unchanged for a zero source; other flags unchanged.
// TZCNT/LZCNT set CF (source zero) and ZF (result zero); POPCNT sets ZF and clears the rest.

extension CPU {
  /// Read-modify-write of memory at `address` (atomic under LOCK); returns the old value.
  @_transparent
  func modifyMemory(
    _ address: UInt64, size: UInt8, locked: Bool, _ compute: (UInt64) -> UInt64
  ) throws(Fault) -> UInt64 {
    if let host = try modifyHost(address, UInt64(size)) {
      if locked { return atomicUpdate(host, size: size, compute) }
      let old = loadHost(host, size: size)
      storeHost(host, size: size, compute(old))
      return old
    }
    let old = try readMemory(address, size: size)
    try writeMemory(address, size: size, compute(old))
    return old
  }

  func bitTest(_ ins: Instruction) throws(Fault) {
    let size = ins.operandSize
    let bits = UInt64(size) * 8
    let op = ins.op
    let immediateForm = op == .btRmImm || op == .btsRmImm || op == .btrRmImm || op == .btcRmImm
    let offset = immediateForm ? ins.immediate : readRegister(ins.reg, size: size)
    let bit = offset & (bits - 1)
    let selector = UInt64(1) << bit
    func compute(_ value: UInt64) -> UInt64 {
      switch op {
      case .btsRmReg, .btsRmImm: return value | selector
      case .btrRmReg, .btrRmImm: return value & ~selector
      case .btcRmReg, .btcRmImm: return value ^ selector
      default: return value
      }
    }
    let old: UInt64
    if ins.hasMemoryOperand {
      var address = operandAddress(ins)
      if !immediateForm {
        // The register offset is signed and may address beyond the operand.
        let displacement = (signExtend(offset, size: size) >> Int64(bits.trailingZeroBitCount)) &* Int64(size)
        address = address &+ UInt64(bitPattern: displacement)
        if ins.addressSize != 8 {
          let base = segmentBase[Int(ins.segment)]
          address = base &+ ((address &- base) & sizeMask(ins.addressSize))
        }
      }
      if op == .btRmReg || op == .btRmImm {
        old = try readMemory(address, size: size)
      } else {
        old = try modifyMemory(address, size: size, locked: ins.prefixes & Instruction.Prefix.lock != 0, compute)
      }
    } else {
      old = readRegister(ins.rm, size: size)
      if op != .btRmReg && op != .btRmImm { writeRegister(ins.rm, size: size, compute(old)) }
    }
    materializeFlags()
    storedFlags = (storedFlags & ~RFlags.cf) | ((old >> bit) & 1)
  }

  func bitScan(_ ins: Instruction) throws(Fault) {
    let size = ins.operandSize
    let bits = UInt64(size) * 8
    let src = try readRm(ins, size: size)
    materializeFlags()
    var flags = storedFlags
    // A CPU model without ABM (LZCNT) or BMI1 (TZCNT) runs F3 0F BD and F3 0F BC as BSR and
    // BSF, as processors without them do (they ignore the F3 prefix).
    var op = ins.op
    if op == .lzcnt && system.cpuidFeatures.extendedECX & CPUModel.extendedECXABM == 0 { op = .bsr }
    if op == .tzcnt && system.cpuidFeatures.leaf7EBX & CPUModel.leaf7EBXBMI1 == 0 { op = .bsf }
    switch op {
    case .bsf, .bsr:
      if src == 0 {
        flags |= RFlags.zf
      } else {
        flags &= ~RFlags.zf
        let index = op == .bsf ? UInt64(src.trailingZeroBitCount) : 63 - UInt64(src.leadingZeroBitCount)
        writeRegister(ins.reg, size: size, index)
      }
    case .tzcnt, .lzcnt:
      let count =
        src == 0
        ? bits
        : op == .tzcnt ? UInt64(src.trailingZeroBitCount) : UInt64(src.leadingZeroBitCount) - (64 - bits)
      writeRegister(ins.reg, size: size, count)
      flags &= ~(RFlags.cf | RFlags.zf)
      if src == 0 { flags |= RFlags.cf }
      if count == 0 { flags |= RFlags.zf }
    default:
      let count = UInt64(src.nonzeroBitCount)
      writeRegister(ins.reg, size: size, count)
      flags &= ~RFlags.status
      if src == 0 { flags |= RFlags.zf }
    }
    storedFlags = flags
  }

  func byteSwap(_ ins: Instruction) {
    switch ins.operandSize {
    case 8: gpr[Int(ins.rm)] = gpr[Int(ins.rm)].byteSwapped
    case 4: gpr[Int(ins.rm)] = UInt64(UInt32(truncatingIfNeeded: gpr[Int(ins.rm)]).byteSwapped)
    default: writeRegister(ins.rm, size: 2, 0)  // BSWAP r16 is undefined; zero as observed on hardware
    }
  }
}
