import CShim
import Synchronization

// Register and operand access, and the integer ALU: ADD/OR/ADC/SBB/AND/SUB/XOR/CMP/TEST,
// INC/DEC/NEG/NOT, including LOCK-prefixed forms (atomic on host memory).

/// The eight classic ALU operations in opcode order.
enum ALUOperation: UInt8 {
  case add, or, adc, sbb, and, sub, xor, cmp
}

extension CPU {
  // MARK: Registers

  /// Reads register `register` (0-15, or 16-19 for AH..BH) at `size` bytes, zero-extended.
  @_transparent
  func readRegister(_ register: UInt8, size: UInt8) -> UInt64 {
    switch size {
    case 8: return gpr[Int(register)]
    case 4: return gpr[Int(register)] & 0xFFFF_FFFF
    case 2: return gpr[Int(register)] & 0xFFFF
    default:
      if register >= Instruction.highByteBase {
        return (gpr[Int(register &- 16)] >> 8) & 0xFF
      }
      return gpr[Int(register)] & 0xFF
    }
  }

  /// Writes register `register` at `size` bytes: 32-bit writes zero-extend, 8/16-bit writes merge.
  @_transparent
  func writeRegister(_ register: UInt8, size: UInt8, _ value: UInt64) {
    switch size {
    case 8: gpr[Int(register)] = value
    case 4: gpr[Int(register)] = value & 0xFFFF_FFFF
    case 2: gpr[Int(register)] = (gpr[Int(register)] & ~0xFFFF) | (value & 0xFFFF)
    default:
      if register >= Instruction.highByteBase {
        let index = Int(register &- 16)
        gpr[index] = (gpr[index] & ~0xFF00) | ((value & 0xFF) << 8)
      } else {
        gpr[Int(register)] = (gpr[Int(register)] & ~0xFF) | (value & 0xFF)
      }
    }
  }

  /// Reads the r/m operand.
  @_transparent
  func readRm(_ ins: Instruction, size: UInt8) throws(Fault) -> UInt64 {
    if ins.hasMemoryOperand {
      return try readMemory(operandAddress(ins), size: size)
    }
    return readRegister(ins.rm, size: size)
  }

  /// Writes the r/m operand.
  @_transparent
  func writeRm(_ ins: Instruction, size: UInt8, _ value: UInt64) throws(Fault) {
    if ins.hasMemoryOperand {
      try writeMemory(operandAddress(ins), size: size, value)
    } else {
      writeRegister(ins.rm, size: size, value)
    }
  }

  // MARK: Host memory helpers for read-modify-write

  @_transparent
  func loadHost(_ host: UnsafeMutableRawPointer, size: UInt8) -> UInt64 {
    switch size {
    case 8: return hv_load64(host)
    case 4: return UInt64(hv_load32(host))
    case 2: return UInt64(hv_load16(host))
    default: return UInt64(hv_load8(host))
    }
  }

  @_transparent
  func storeHost(_ host: UnsafeMutableRawPointer, size: UInt8, _ value: UInt64) {
    switch size {
    case 8: hv_store64(host, value)
    case 4: hv_store32(host, UInt32(truncatingIfNeeded: value))
    case 2: hv_store16(host, UInt16(truncatingIfNeeded: value))
    default: hv_store8(host, UInt8(truncatingIfNeeded: value))
    }
  }

  /// Atomically replaces the value at `host` with `compute(old)`; returns the old value.
  @_transparent
  func atomicUpdate(
    _ host: UnsafeMutableRawPointer, size: UInt8, _ compute: (UInt64) -> UInt64
  ) -> UInt64 {
    if (UInt(bitPattern: host) & 63) &+ UInt(size) > 64 {
      // A locked access split across cache lines would be a host split lock (slow, and fatal
      // under split_lock_detect=fatal): do it non-atomically (exact for one vCPU).
      let old = loadHost(host, size: size)
      storeHost(host, size: size, compute(old))
      return old
    }
    switch size {
    case 8:
      let atomic = host.assumingMemoryBound(to: Atomic<UInt64>.self)
      var old = atomic.pointee.load(ordering: .relaxed)
      while true {
        let result = atomic.pointee.compareExchange(
          expected: old, desired: compute(old), ordering: .sequentiallyConsistent)
        if result.exchanged { return old }
        old = result.original
      }
    case 4:
      let atomic = host.assumingMemoryBound(to: Atomic<UInt32>.self)
      var old = atomic.pointee.load(ordering: .relaxed)
      while true {
        let result = atomic.pointee.compareExchange(
          expected: old, desired: UInt32(truncatingIfNeeded: compute(UInt64(old))), ordering: .sequentiallyConsistent)
        if result.exchanged { return UInt64(old) }
        old = result.original
      }
    case 2:
      let atomic = host.assumingMemoryBound(to: Atomic<UInt16>.self)
      var old = atomic.pointee.load(ordering: .relaxed)
      while true {
        let result = atomic.pointee.compareExchange(
          expected: old, desired: UInt16(truncatingIfNeeded: compute(UInt64(old))), ordering: .sequentiallyConsistent)
        if result.exchanged { return UInt64(old) }
        old = result.original
      }
    default:
      let atomic = host.assumingMemoryBound(to: Atomic<UInt8>.self)
      var old = atomic.pointee.load(ordering: .relaxed)
      while true {
        let result = atomic.pointee.compareExchange(
          expected: old, desired: UInt8(truncatingIfNeeded: compute(UInt64(old))), ordering: .sequentiallyConsistent)
        if result.exchanged { return UInt64(old) }
        old = result.original
      }
    }
  }

  /// Read-modify-write of the r/m operand: `compute(old)` gives the new value; returns the old
  /// value. Memory operands go through one TLB lookup; LOCK makes the update atomic.
  @_transparent
  func modifyRm(
    _ ins: Instruction, size: UInt8, _ compute: (UInt64) -> UInt64
  ) throws(Fault) -> UInt64 {
    if !ins.hasMemoryOperand {
      let old = readRegister(ins.rm, size: size)
      writeRegister(ins.rm, size: size, compute(old))
      return old
    }
    let address = operandAddress(ins)
    if let host = try modifyHost(address, UInt64(size)) {
      if ins.prefixes & Instruction.Prefix.lock != 0 {
        return atomicUpdate(host, size: size, compute)
      }
      let old = loadHost(host, size: size)
      storeHost(host, size: size, compute(old))
      return old
    }
    let old = try readMemory(address, size: size)
    try writeMemory(address, size: size, compute(old))
    return old
  }

  // MARK: ALU

  /// Computes `dst op src` truncated to `size` (carry-in `carry` for ADC/SBB).
  @_transparent
  func aluResult(_ operation: ALUOperation, _ dst: UInt64, _ src: UInt64, _ carry: UInt64, size: UInt8) -> UInt64 {
    let mask = sizeMask(size)
    switch operation {
    case .add: return (dst &+ src) & mask
    case .adc: return (dst &+ src &+ carry) & mask
    case .sub, .cmp: return (dst &- src) & mask
    case .sbb: return (dst &- src &- carry) & mask
    case .and: return dst & src
    case .or: return dst | src
    case .xor: return dst ^ src
    }
  }

  @_transparent
  func recordALU(_ operation: ALUOperation, size: UInt8, dst: UInt64, src: UInt64, result: UInt64, carry: UInt64) {
    switch operation {
    case .add: recordFlags(.add, size: size, dst: dst, src: src, result: result)
    case .sub, .cmp: recordFlags(.sub, size: size, dst: dst, src: src, result: result)
    case .adc:
      recordFlags(.adc, size: size, dst: dst, src: src, result: result)
      flagCarry = carry
    case .sbb:
      recordFlags(.sbb, size: size, dst: dst, src: src, result: result)
      flagCarry = carry
    case .and, .or, .xor: recordFlags(.logic, size: size, dst: dst, src: src, result: result)
    }
  }

  /// `r/m op= src` (or compare), with flags.
  @_transparent
  func aluRm(_ ins: Instruction, _ operation: ALUOperation, src: UInt64) throws(Fault) {
    let size = ins.operandSize
    let carry: UInt64 = (operation == .adc || operation == .sbb) ? (carryFlag ? 1 : 0) : 0
    if operation == .cmp {
      let dst = try readRm(ins, size: size)
      recordFlags(.sub, size: size, dst: dst, src: src, result: (dst &- src) & sizeMask(size))
      return
    }
    if !ins.hasMemoryOperand {
      let dst = readRegister(ins.rm, size: size)
      let result = aluResult(operation, dst, src, carry, size: size)
      writeRegister(ins.rm, size: size, result)
      recordALU(operation, size: size, dst: dst, src: src, result: result, carry: carry)
      return
    }
    let dst = try modifyRm(ins, size: size) { aluResult(operation, $0, src, carry, size: size) }
    recordALU(
      operation, size: size, dst: dst, src: src, result: aluResult(operation, dst, src, carry, size: size), carry: carry
    )
  }

  /// `reg op= r/m` (or compare), with flags.
  @_transparent
  func aluReg(_ ins: Instruction, _ operation: ALUOperation) throws(Fault) {
    let size = ins.operandSize
    let src = try readRm(ins, size: size)
    let dst = readRegister(ins.reg, size: size)
    let carry: UInt64 = (operation == .adc || operation == .sbb) ? (carryFlag ? 1 : 0) : 0
    let result = aluResult(operation, dst, src, carry, size: size)
    if operation != .cmp { writeRegister(ins.reg, size: size, result) }
    recordALU(operation, size: size, dst: dst, src: src, result: result, carry: carry)
  }

  @_transparent
  func testRm(_ ins: Instruction, src: UInt64) throws(Fault) {
    let size = ins.operandSize
    let dst = try readRm(ins, size: size)
    recordFlags(.logic, size: size, dst: dst, src: src, result: dst & src)
  }

  @_transparent
  func incDec(_ ins: Instruction, increment: Bool) throws(Fault) {
    let size = ins.operandSize
    let mask = sizeMask(size)
    let carry: UInt64 = flagOp == .inc || flagOp == .dec ? flagCarry : (carryFlag ? 1 : 0)
    let old = try modifyRm(ins, size: size) { increment ? ($0 &+ 1) & mask : ($0 &- 1) & mask }
    recordFlags(
      increment ? .inc : .dec, size: size, dst: old, src: 1, result: increment ? (old &+ 1) & mask : (old &- 1) & mask)
    flagCarry = carry
  }

  @_transparent
  func negate(_ ins: Instruction) throws(Fault) {
    let size = ins.operandSize
    let mask = sizeMask(size)
    let old = try modifyRm(ins, size: size) { (0 &- $0) & mask }
    recordFlags(.sub, size: size, dst: 0, src: old, result: (0 &- old) & mask)
  }

  @_transparent
  func complement(_ ins: Instruction) throws(Fault) {
    let size = ins.operandSize
    let mask = sizeMask(size)
    _ = try modifyRm(ins, size: size) { ~$0 & mask }
  }
}
