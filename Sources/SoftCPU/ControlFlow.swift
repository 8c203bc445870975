// Near control transfers and the stack: JMP/Jcc/CALL/RET/LOOP/JrCXZ, PUSH/POP in every form,
// PUSHF/POPF, ENTER/LEAVE.
//
// Branch targets are truncated to the operand size (16-bit with 66h, as AMD does). A target
// that is not canonical raises #GP(0) at the branch (Intel behavior; AMD faults at the target).
// The stack pointer width follows `stackMask` (64-bit in long mode, SS.B-dependent otherwise).

extension CPU {
  @_transparent
  func isCanonical(_ address: UInt64) -> Bool {
    UInt64(bitPattern: Int64(bitPattern: address << 16) >> 16) == address
  }

  /// Checks a branch target and truncates it to the operand size.
  @_transparent
  func branchTarget(_ target: UInt64, size: UInt8) throws(Fault) -> UInt64 {
    if size == 8 {
      if !isCanonical(target) { throw .generalProtection(0) }
      return target
    }
    return target & sizeMask(size)
  }

  @_transparent
  func jumpRelative(_ ins: Instruction) throws(Fault) {
    rip = try branchTarget(rip &+ ins.immediate, size: ins.operandSize)
  }

  @_transparent
  func jumpTo(_ target: UInt64, size: UInt8 = 8) throws(Fault) {
    rip = try branchTarget(target, size: size)
  }

  @_transparent
  func callRelative(_ ins: Instruction) throws(Fault) {
    let target = try branchTarget(rip &+ ins.immediate, size: ins.operandSize)
    try push(rip, size: ins.operandSize)
    rip = target
  }

  @_transparent
  func callIndirect(_ ins: Instruction) throws(Fault) {
    let target = try branchTarget(try readRm(ins, size: ins.operandSize), size: ins.operandSize)
    try push(rip, size: ins.operandSize)
    rip = target
  }

  @_transparent
  func returnNear(_ ins: Instruction, release: UInt64) throws(Fault) {
    let size = ins.operandSize
    let target = try branchTarget(try readMemory(segmentBase[2] &+ stackPointer, size: size), size: size)
    adjustStack(UInt64(size) &+ release)
    rip = target
  }

  func loopInstruction(_ ins: Instruction) throws(Fault) {
    let mask = sizeMask(ins.addressSize)
    var count = gpr[1] & mask
    let taken: Bool
    switch ins.op {
    case .jrcxz:
      taken = count == 0
    default:
      count = (count &- 1) & mask
      writeRegister(1, size: ins.addressSize, count)
      switch ins.op {
      case .loope: taken = count != 0 && zeroFlag
      case .loopne: taken = count != 0 && !zeroFlag
      default: taken = count != 0
      }
    }
    if taken {
      let target = rip &+ ins.immediate
      if ins.operandSize == 8 && !isCanonical(target) {
        throw .generalProtection(0)
      }
      rip = target & sizeMask(ins.operandSize)
    }
  }

  // MARK: Stack

  /// Pushes the low `size` bytes of `value`.
  @_transparent
  func push(_ value: UInt64, size: UInt8) throws(Fault) {
    let mask = stackMask
    let stack = (gpr[4] &- UInt64(size)) & mask
    try writeMemory(segmentBase[2] &+ stack, size: size, value)
    gpr[4] = (gpr[4] & ~mask) | stack
  }

  /// Adds `delta` to the stack pointer at the stack width.
  @_transparent
  func adjustStack(_ delta: UInt64) {
    let mask = stackMask
    gpr[4] = (gpr[4] & ~mask) | ((gpr[4] &+ delta) & mask)
  }

  /// The stack pointer at the stack width.
  @_transparent
  var stackPointer: UInt64 { gpr[4] & stackMask }

  /// Pops `size` bytes.
  @_transparent
  func pop(size: UInt8) throws(Fault) -> UInt64 {
    let value = try readMemory(segmentBase[2] &+ stackPointer, size: size)
    adjustStack(UInt64(size))
    return value
  }

  /// POP r/m: a memory destination is addressed with RSP already incremented.
  @_transparent
  func popToRm(_ ins: Instruction) throws(Fault) {
    let size = ins.operandSize
    let stack = gpr[4]
    let value = try readMemory(segmentBase[2] &+ stackPointer, size: size)
    adjustStack(UInt64(size))
    if ins.hasMemoryOperand {
      do {
        try writeMemory(operandAddress(ins), size: size, value)
      } catch {
        gpr[4] = stack
        throw error
      }
    } else {
      writeRegister(ins.rm, size: size, value)
    }
  }

  func popSegment(_ ins: Instruction) throws(Fault) {
    let value = try readMemory(segmentBase[2] &+ stackPointer, size: ins.operandSize)
    try loadSegment(ins.reg, selector: UInt16(truncatingIfNeeded: value))
    adjustStack(UInt64(ins.operandSize))
  }

  func pushFlags(_ ins: Instruction) throws(Fault) {
    // VM and RF are pushed as 0.
    try push(rflags & ~(RFlags.vm | RFlags.rf), size: ins.operandSize)
  }

  func popFlags(_ ins: Instruction) throws(Fault) {
    let value = try pop(size: ins.operandSize)
    var writable =
      RFlags.status | RFlags.tf | RFlags.df | RFlags.nt | RFlags.ac | RFlags.id
    let iopl = (storedFlags >> 12) & 3
    if cpl == 0 {
      writable |= RFlags.iopl | RFlags.if
    } else if UInt64(cpl) <= iopl {
      writable |= RFlags.if
    }
    if ins.operandSize == 2 { writable &= 0xFFFF }
    let current = rflags
    rflags = (current & ~writable) | (value & writable)
    wakeRunLoopIfInterruptPending()  // Part 2 hook: IF may have been set.
  }

  func enterFrame(_ ins: Instruction) throws(Fault) {
    let size = ins.operandSize
    let step = UInt64(size)
    let level = Int(ins.immediate2 & 31)
    let mask = stackMask
    var stack = gpr[4] & mask
    var framePointer = gpr[5] & mask
    stack = (stack &- step) & mask
    try writeMemory(segmentBase[2] &+ stack, size: size, gpr[5])
    let frameTemp = stack
    if level > 0 {
      for _ in 1..<max(level, 1) {
        framePointer = (framePointer &- step) & mask
        let value = try readMemory(segmentBase[2] &+ framePointer, size: size)
        stack = (stack &- step) & mask
        try writeMemory(segmentBase[2] &+ stack, size: size, value)
      }
      stack = (stack &- step) & mask
      try writeMemory(segmentBase[2] &+ stack, size: size, frameTemp)
    }
    stack = (stack &- (ins.immediate & 0xFFFF)) & mask
    writeRegister(5, size: size, frameTemp)
    gpr[4] = (gpr[4] & ~mask) | stack
  }

  func leaveFrame(_ ins: Instruction) throws(Fault) {
    let size = ins.operandSize
    let mask = stackMask
    let framePointer = gpr[5] & mask
    let value = try readMemory(segmentBase[2] &+ framePointer, size: size)
    gpr[4] = (gpr[4] & ~mask) | ((framePointer &+ UInt64(size)) & mask)
    writeRegister(5, size: size, value)
  }
}
