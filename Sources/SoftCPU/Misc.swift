import Glibc
import Synchronization
import VMCore

// XCHG, CMPXCHG, CMPXCHG8B/16B, XADD, MOVBE, segment moves, CBW/CWD families, LAHF/SAHF,
// CLI/STI, RDTSC/RDTSCP, HLT, software interrupts and port I/O.

extension CPU {
  func exchange(_ ins: Instruction) throws(Fault) {
    let size = ins.operandSize
    let regValue = readRegister(ins.reg, size: size)
    if ins.hasMemoryOperand {
      // XCHG with memory is always locked.
      let address = operandAddress(ins)
      let old: UInt64
      if let host = try modifyHost(address, UInt64(size)) {
        old = atomicUpdate(host, size: size) { _ in regValue }
      } else {
        old = try readMemory(address, size: size)
        try writeMemory(address, size: size, regValue)
      }
      writeRegister(ins.reg, size: size, old)
    } else {
      let rmValue = readRegister(ins.rm, size: size)
      writeRegister(ins.rm, size: size, regValue)
      writeRegister(ins.reg, size: size, rmValue)
    }
  }

  func compareExchange(_ ins: Instruction) throws(Fault) {
    let size = ins.operandSize
    let accumulator = readRegister(0, size: size)
    let src = readRegister(ins.reg, size: size)
    let old: UInt64
    if ins.hasMemoryOperand {
      old = try modifyRm(ins, size: size) { $0 == accumulator ? src : $0 }
    } else {
      // A register destination is written only when the comparison succeeds.
      old = readRegister(ins.rm, size: size)
      if old == accumulator { writeRegister(ins.rm, size: size, src) }
    }
    recordFlags(.sub, size: size, dst: accumulator, src: old, result: (accumulator &- old) & sizeMask(size))
    if old != accumulator { writeRegister(0, size: size, old) }
  }

  func compareExchangeDouble(_ ins: Instruction) throws(Fault) {
    let address = operandAddress(ins)
    materializeFlags()
    if ins.operandSize == 8 {
      if address & 15 != 0 { throw .generalProtection(0) }
      let expected = UInt128(gpr[2]) << 64 | UInt128(gpr[0])
      let desired = UInt128(gpr[1]) << 64 | UInt128(gpr[3])
      var original: UInt128
      var exchanged: Bool
      if let host = try modifyHost(address, 16) {
        let atomic = host.assumingMemoryBound(to: Atomic<UInt128>.self)
        (exchanged, original) = atomic.pointee.compareExchange(
          expected: expected, desired: desired, ordering: .sequentiallyConsistent)
      } else {
        let low = try read64(address)
        let high = try read64(address &+ 8)
        original = UInt128(high) << 64 | UInt128(low)
        exchanged = original == expected
        let store = exchanged ? desired : original
        try write64(address, UInt64(truncatingIfNeeded: store))
        try write64(address &+ 8, UInt64(truncatingIfNeeded: store >> 64))
      }
      if exchanged {
        storedFlags |= RFlags.zf
      } else {
        storedFlags &= ~RFlags.zf
        gpr[0] = UInt64(truncatingIfNeeded: original)
        gpr[2] = UInt64(truncatingIfNeeded: original >> 64)
      }
    } else {
      let expected = (gpr[2] & 0xFFFF_FFFF) << 32 | (gpr[0] & 0xFFFF_FFFF)
      let desired = (gpr[1] & 0xFFFF_FFFF) << 32 | (gpr[3] & 0xFFFF_FFFF)
      let original: UInt64
      if let host = try modifyHost(address, 8) {
        original = atomicUpdate(host, size: 8) { $0 == expected ? desired : $0 }
      } else {
        original = try read64(address)
        try write64(address, original == expected ? desired : original)
      }
      if original == expected {
        storedFlags |= RFlags.zf
      } else {
        storedFlags &= ~RFlags.zf
        gpr[0] = original & 0xFFFF_FFFF
        gpr[2] = original >> 32
      }
    }
  }

  func exchangeAdd(_ ins: Instruction) throws(Fault) {
    let size = ins.operandSize
    let mask = sizeMask(size)
    let src = readRegister(ins.reg, size: size)
    let old: UInt64
    if ins.hasMemoryOperand {
      old = try modifyRm(ins, size: size) { ($0 &+ src) & mask }
      writeRegister(ins.reg, size: size, old)
    } else {
      old = readRegister(ins.rm, size: size)
      writeRegister(ins.reg, size: size, old)
      writeRegister(ins.rm, size: size, (old &+ src) & mask)
    }
    recordFlags(.add, size: size, dst: old, src: src, result: (old &+ src) & mask)
  }

  @_transparent
  func swapBytes(_ value: UInt64, size: UInt8) -> UInt64 {
    switch size {
    case 8: return value.byteSwapped
    case 4: return UInt64(UInt32(truncatingIfNeeded: value).byteSwapped)
    default: return UInt64(UInt16(truncatingIfNeeded: value).byteSwapped)
    }
  }

  func moveBigEndian(_ ins: Instruction, load: Bool) throws(Fault) {
    let size = ins.operandSize
    let address = operandAddress(ins)
    if load {
      writeRegister(ins.reg, size: size, swapBytes(try readMemory(address, size: size), size: size))
    } else {
      try writeMemory(address, size: size, swapBytes(readRegister(ins.reg, size: size), size: size))
    }
  }

  func moveFromSegment(_ ins: Instruction) throws(Fault) {
    let selector = UInt64(segments[Int(ins.reg)].selector)
    try writeRm(ins, size: ins.hasMemoryOperand ? 2 : ins.operandSize, selector)
  }

  func moveToSegment(_ ins: Instruction) throws(Fault) {
    let selector = UInt16(truncatingIfNeeded: try readRm(ins, size: 2))
    try loadSegment(ins.reg, selector: selector)
  }

  func convertAccumulator(_ ins: Instruction) {
    switch ins.operandSize {
    case 8: gpr[0] = UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: gpr[0])))
    case 4: gpr[0] = UInt64(UInt32(bitPattern: Int32(Int16(truncatingIfNeeded: gpr[0]))))
    default: writeRegister(0, size: 2, UInt64(UInt16(bitPattern: Int16(Int8(truncatingIfNeeded: gpr[0])))))
    }
  }

  func convertToDouble(_ ins: Instruction) {
    let size = ins.operandSize
    let negative = (readRegister(0, size: size) >> (UInt64(size) * 8 - 1)) & 1 != 0
    writeRegister(2, size: size, negative ? ~0 : 0)
  }

  func loadFlagsIntoAH() {
    let flags = rflags & 0xD5 | 0x02
    gpr[0] = (gpr[0] & ~0xFF00) | (flags << 8)
  }

  func storeAHIntoFlags() {
    let ah = (gpr[0] >> 8) & 0xD5
    materializeFlags()
    storedFlags = (storedFlags & ~0xD5) | ah
  }

  func setInterruptFlag(_ ins: Instruction) throws(Fault) {
    let iopl = (storedFlags >> 12) & 3
    if cr0 & X86.cr0PE != 0 && UInt64(cpl) > iopl { throw .generalProtection(0) }
    if ins.op == .sti {
      // Part 2 hook: STI's interrupt shadow, then let a waiting interrupt in.
      if storedFlags & RFlags.if == 0 { beginInterruptShadow() }
      storedFlags |= RFlags.if
      wakeRunLoopIfInterruptPending()
    } else {
      storedFlags &= ~RFlags.if
    }
  }

  func readTimeStampCounter(_ ins: Instruction) throws(Fault) {
    if ins.op == .rdtscp && system.cpuidFeatures.extendedEDX & CPUModel.extendedEDXRDTSCP == 0 {
      throw .invalidOpcode
    }
    if cr4 & (1 << 2) != 0 && cpl != 0 { throw .generalProtection(0) }  // CR4.TSD
    let value = timeStampCounter()
    gpr[0] = value & 0xFFFF_FFFF
    gpr[2] = value >> 32
    if ins.op == .rdtscp { gpr[1] = tscAux & 0xFFFF_FFFF }
  }

  /// RDPID: IA32_TSC_AUX into a register; #UD when the CPU model does not offer it.
  func readProcessorID(_ ins: Instruction) throws(Fault) {
    guard system.cpuidFeatures.leaf7ECX & CPUModel.leaf7ECXRDPID != 0 else { throw .invalidOpcode }
    writeRegister(ins.rm, size: codeSize == 8 ? 8 : 4, tscAux & 0xFFFF_FFFF)
  }

  /// HLT: privileged, except that flat test mode lets any CPL stop the run with `.halted`.
  func halt() throws(Fault) {
    if cpl != 0 && !flatTestMode { throw .generalProtection(0) }
    exitRequested = true
    haltRequested = true
  }

  /// INT3, INT n, INTO, INT1: traps (rip after the instruction). Part 2 delivers them through
  /// the IDT; flat test mode reports them from `run`.
  func softwareInterrupt(_ ins: Instruction) throws(Fault) {
    let vector: UInt8
    switch ins.op {
    case .int3: vector = 3
    case .int1: vector = 1
    case .into:
      if !overflowFlag { return }
      vector = 4
    default: vector = UInt8(truncatingIfNeeded: ins.immediate)
    }
    // Part 2 hook: outside flat test mode, deliver through the IDT (InterruptDelivery.swift).
    if !flatTestMode { return try deliverSoftwareInterrupt(ins.op, vector: vector) }
    pendingTrap = Fault(vector: vector)
    exitRequested = true
  }

  /// Checks I/O permission for `size` bytes at `port` (SDM Vol. 1 §19.5): allowed in real mode
  /// and when CPL <= IOPL; otherwise (and always in virtual-8086 mode) every port's bit in the
  /// TSS's I/O permission bitmap must be clear, the bitmap's bytes inside the TSS limit.
  @_transparent
  func checkIOPermission(port: UInt16, size: Int) throws(Fault) {
    guard cr0 & X86.cr0PE != 0 else { return }
    if storedFlags & RFlags.vm == 0 && UInt64(cpl) <= (storedFlags >> 12) & 3 { return }
    // Flat test mode models a Linux user process, whose TSS bitmap denies every port.
    if flatTestMode { throw .generalProtection(0) }
    try checkIOPermissionBitmap(port: port, size: size)
  }

  func checkIOPermissionBitmap(port: UInt16, size: Int) throws(Fault) {
    let type = tr.access & 0xF
    guard tr.access & 0x1_0000 == 0, type == 9 || type == 11, tr.limit >= 0x67 else { throw .generalProtection(0) }
    let bitmapBase = UInt64(try systemRead(tr.base &+ 0x66, size: 2))
    let offset = bitmapBase + UInt64(port >> 3)
    guard offset + 1 <= UInt64(tr.limit) else { throw .generalProtection(0) }
    let bits = try systemRead(tr.base &+ offset, size: 2)
    let mask = ((UInt64(1) << UInt64(size)) - 1) << UInt64(port & 7)
    if bits & mask != 0 { throw .generalProtection(0) }
  }

  func portIO(_ ins: Instruction) throws(Fault) {
    let size = Int(min(ins.operandSize, 4))
    let port =
      ins.op == .inImm || ins.op == .outImm
      ? UInt16(truncatingIfNeeded: ins.immediate) : UInt16(truncatingIfNeeded: gpr[2])
    try checkIOPermission(port: port, size: size)
    if ins.op == .inImm || ins.op == .inDX {
      writeRegister(0, size: UInt8(size), UInt64(bus.portRead(port, size: size)))
    } else {
      bus.portWrite(port, size: size, value: UInt32(truncatingIfNeeded: gpr[0] & sizeMask(UInt8(size))))
    }
  }
}
