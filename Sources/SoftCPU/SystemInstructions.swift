import VMCore

// Handlers of the system instructions the decoder classifies (Op.swift "System" group): far
// transfers, IRET, fast system calls, descriptor-table and task registers, control and debug
// registers, MSRs, cache and TLB control. The core's `execute` routes them here.

extension CPU {
  /// Executes a system instruction. `rip` already points past it.
  func executeSystem(_ ins: Instruction) throws(Fault) {
    switch ins.op {
    case .farJmp:
      let (selector, offset) = try farPointer(ins)
      try farJump(selector: selector, offset: offset, operandSize: ins.operandSize)
    case .farCall:
      let (selector, offset) = try farPointer(ins)
      try farCall(selector: selector, offset: offset, operandSize: ins.operandSize)
    case .retFar:
      try farReturn(popBytes: UInt16(truncatingIfNeeded: ins.immediate), operandSize: ins.operandSize)
    case .iret:
      try interruptReturn(operandSize: ins.operandSize)
    case .syscall: try fastSystemCall()
    case .sysret: try fastSystemReturn(operandSize: ins.operandSize)
    case .sysenter: try systemEnter()
    case .sysexit: try systemExit(operandSize: ins.operandSize)
    case .swapgs:
      guard cpl == 0 else { throw .generalProtection(0) }
      let gsBase = segments[Int(SegmentIndex.gs)].base
      segments[Int(SegmentIndex.gs)].base = kernelGSBase
      segmentBase[Int(SegmentIndex.gs)] = kernelGSBase
      kernelGSBase = gsBase

    case .sldt, .str:
      try requireProtectedMode()
      let selector = UInt64(ins.op == .sldt ? ldtr.selector : tr.selector)
      if ins.hasMemoryOperand {
        try writeRm(ins, size: 2, selector)
      } else {
        writeRegister(ins.rm, size: ins.operandSize, selector)
      }
    case .lldt:
      try requireProtectedMode()
      try loadLocalDescriptorTable(selector: UInt16(truncatingIfNeeded: try readRm(ins, size: 2)))
    case .ltr:
      try requireProtectedMode()
      try loadTaskRegister(selector: UInt16(truncatingIfNeeded: try readRm(ins, size: 2)))
    case .verr, .verw:
      try requireProtectedMode()
      let selector = UInt16(truncatingIfNeeded: try readRm(ins, size: 2))
      var ok = false
      if let descriptor = visibleDescriptor(selector, forLimit: false), descriptor.isCodeOrData {
        ok = ins.op == .verr ? descriptor.isReadable : descriptor.isWritableData
      }
      setZeroFlag(ok)
    case .lar, .lsl:
      try requireProtectedMode()
      let selector = UInt16(truncatingIfNeeded: try readRm(ins, size: 2))
      if let descriptor = visibleDescriptor(selector, forLimit: ins.op == .lsl) {
        let value: UInt64 =
          ins.op == .lar ? (descriptor.raw >> 32) & 0x00F0_FF00 : UInt64(descriptor.limit)
        writeRegister(ins.reg, size: ins.operandSize, value)
        setZeroFlag(true)
      } else {
        setZeroFlag(false)
      }

    case .sgdt, .sidt:
      let table = ins.op == .sgdt ? gdtr : idtr
      let address = linearAddress(ins)
      try probeWrite(address, codeSize == 8 ? 10 : 6)
      try write16(address, table.limit)
      if codeSize == 8 {
        try write64(address &+ 2, table.base)
      } else {
        try write32(address &+ 2, UInt32(truncatingIfNeeded: table.base))
      }
    case .lgdt, .lidt:
      guard cpl == 0 else { throw .generalProtection(0) }
      let address = linearAddress(ins)
      let limit = try read16(address)
      var base: UInt64
      if codeSize == 8 {
        base = try read64(address &+ 2)
        guard isCanonical(base) else { throw .generalProtection(0) }
      } else {
        base = UInt64(try read32(address &+ 2))
        if ins.operandSize == 2 { base &= 0xFF_FFFF }
      }
      let table = DescriptorTableRegister(base: base, limit: limit)
      if ins.op == .lgdt { gdtr = table } else { idtr = table }
    case .smsw:
      if ins.hasMemoryOperand {
        try writeRm(ins, size: 2, cr0 & 0xFFFF)
      } else {
        writeRegister(ins.rm, size: ins.operandSize, cr0)
      }
    case .lmsw:
      try loadMachineStatusWord(UInt16(truncatingIfNeeded: try readRm(ins, size: 2)))
    case .invlpg:
      try invalidatePage(linearAddress(ins))
    case .clts:
      try clearTaskSwitched()
    case .invd, .wbinvd:
      guard cpl == 0 else { throw .generalProtection(0) }

    case .movFromCR:
      writeRegister(ins.rm, size: ins.operandSize, try readControlRegister(ins.reg))
    case .movToCR:
      try writeControlRegister(ins.reg, readRegister(ins.rm, size: ins.operandSize))
    case .movFromDR:
      writeRegister(ins.rm, size: ins.operandSize, try readDebugRegister(ins.reg))
    case .movToDR:
      try writeDebugRegister(ins.reg, readRegister(ins.rm, size: ins.operandSize))
    case .rdmsr:
      let value = try readMSR(UInt32(truncatingIfNeeded: gpr[1]))
      gpr[0] = value & 0xFFFF_FFFF
      gpr[2] = value >> 32
    case .wrmsr:
      try writeMSR(UInt32(truncatingIfNeeded: gpr[1]), (gpr[2] << 32) | (gpr[0] & 0xFFFF_FFFF))
    case .rdpmc:
      try readPerformanceMonitoringCounter()
    default:
      throw .invalidOpcode
    }
  }

  /// #UD outside protected mode (real and virtual-8086 mode) for the descriptor instructions.
  @inline(__always)
  private func requireProtectedMode() throws(Fault) {
    guard isProtectedMode && rflags & RFlags.vm == 0 else { throw .invalidOpcode }
  }

  /// Sets or clears ZF, keeping the other flags.
  private func setZeroFlag(_ value: Bool) {
    let flags = rflags
    rflags = value ? flags | RFlags.zf : flags & ~RFlags.zf
  }

  /// The selector and offset of a far JMP/CALL: immediate ptr16:16/32, or m16:16/32/64.
  private func farPointer(_ ins: Instruction) throws(Fault) -> (UInt16, UInt64) {
    if !ins.hasMemoryOperand {
      return (ins.immediate2, ins.immediate)
    }
    let address = linearAddress(ins)
    let size = ins.operandSize
    let offset = try readMemory(address, size: size)
    let selector = try read16(address &+ UInt64(size))
    return (selector, offset)
  }

  // MARK: SYSCALL / SYSRET / SYSENTER / SYSEXIT

  /// SYSCALL: to CPL 0 at LSTAR (64-bit mode), CSTAR (compatibility mode) or STAR[31:0]
  /// (legacy mode); RCX = return RIP, R11 = RFLAGS, RFLAGS &= ~SFMASK.
  public func fastSystemCall() throws(Fault) {
    guard efer & X86.eferSCE != 0 else { throw .invalidOpcode }
    let selector = UInt16(truncatingIfNeeded: star >> 32) & 0xFFFC
    var code = SegmentCache()
    code.selector = selector
    code.base = 0
    code.limit = 0xFFFF_FFFF
    var stack = SegmentCache()
    stack.selector = selector &+ 8
    stack.base = 0
    stack.limit = 0xFFFF_FFFF
    stack.access = 0xC093  // present, DPL 0, writable data, accessed, B, G
    let flags = rflags
    if isLongModeActive {
      let returnRIP = rip
      code.access = 0xA09B  // present, DPL 0, execute/read code, accessed, L, G
      gpr[1] = returnRIP
      gpr[11] = flags & ~RFlags.rf
      let target = is64BitMode ? lstar : cstar
      rflags = flags & ~(sfmask | RFlags.rf)
      setSegment(SegmentIndex.ss, stack)
      installCodeSegment(code, rip: target)
    } else {
      code.access = 0xC09B  // 32-bit code
      gpr[1] = rip & 0xFFFF_FFFF
      rflags = flags & ~(RFlags.vm | RFlags.if | RFlags.rf)
      setSegment(SegmentIndex.ss, stack)
      installCodeSegment(code, rip: star & 0xFFFF_FFFF)
    }
    singleStepOverride = storedFlags & RFlags.tf != 0 ? .trap : .noTrap
  }

  /// SYSRET: back to CPL 3 in 64-bit mode (REX.W) or compatibility mode. RCX must be canonical.
  public func fastSystemReturn(operandSize: UInt8) throws(Fault) {
    guard efer & X86.eferSCE != 0 else { throw .invalidOpcode }
    guard isProtectedMode, cpl == 0 else { throw .generalProtection(0) }
    let base = UInt16(truncatingIfNeeded: star >> 48)
    var code = SegmentCache()
    code.base = 0
    code.limit = 0xFFFF_FFFF
    let target: UInt64
    if operandSize == 8 {
      guard isCanonical(gpr[1]) else { throw .generalProtection(0) }
      code.selector = (base &+ 16) | 3
      code.access = 0xA0FB  // DPL 3, 64-bit code
      target = gpr[1]
    } else {
      code.selector = base | 3
      code.access = 0xC0FB  // DPL 3, 32-bit code
      target = gpr[1] & 0xFFFF_FFFF
    }
    var stack = SegmentCache()
    stack.selector = (base &+ 8) | 3
    stack.base = 0
    stack.limit = 0xFFFF_FFFF
    stack.access = 0xC0F3
    if isLongModeActive {
      rflags = (gpr[11] & 0x3C_7FD7) | 2
    } else {
      rflags = rflags | RFlags.if
    }
    setSegment(SegmentIndex.ss, stack)
    installCodeSegment(code, rip: target)
    singleStepOverride = storedFlags & RFlags.tf != 0 ? .trap : .noTrap
    wakeRunLoopIfInterruptPending()
  }

  /// SYSENTER: to CPL 0 at SYSENTER_EIP with SYSENTER_ESP; CS from SYSENTER_CS.
  func systemEnter() throws(Fault) {
    guard isProtectedMode else { throw .generalProtection(0) }
    let selector = UInt16(truncatingIfNeeded: sysenterCS) & 0xFFFC
    guard selector != 0 else { throw .generalProtection(0) }
    var code = SegmentCache()
    code.selector = selector
    code.limit = 0xFFFF_FFFF
    code.access = isLongModeActive ? 0xA09B : 0xC09B
    var stack = SegmentCache()
    stack.selector = selector &+ 8
    stack.limit = 0xFFFF_FFFF
    stack.access = 0xC093
    rflags = rflags & ~(RFlags.vm | RFlags.if | RFlags.rf)
    setSegment(SegmentIndex.ss, stack)
    installCodeSegment(code, rip: isLongModeActive ? sysenterEIP : sysenterEIP & 0xFFFF_FFFF)
    gpr[4] = isLongModeActive ? sysenterESP : sysenterESP & 0xFFFF_FFFF
  }

  /// SYSEXIT: to CPL 3 at RDX with stack RCX (64-bit with REX.W).
  func systemExit(operandSize: UInt8) throws(Fault) {
    let selector = UInt16(truncatingIfNeeded: sysenterCS) & 0xFFFC
    guard isProtectedMode, cpl == 0, selector != 0 else { throw .generalProtection(0) }
    var code = SegmentCache()
    code.limit = 0xFFFF_FFFF
    var stack = SegmentCache()
    stack.limit = 0xFFFF_FFFF
    stack.access = 0xC0F3
    let target: UInt64
    if operandSize == 8 {
      guard isCanonical(gpr[2]), isCanonical(gpr[1]) else { throw .generalProtection(0) }
      code.selector = (selector &+ 32) | 3
      code.access = 0xA0FB
      stack.selector = (selector &+ 40) | 3
      target = gpr[2]
      gpr[4] = gpr[1]
    } else {
      code.selector = (selector &+ 16) | 3
      code.access = 0xC0FB
      stack.selector = (selector &+ 24) | 3
      target = gpr[2] & 0xFFFF_FFFF
      gpr[4] = gpr[1] & 0xFFFF_FFFF
    }
    setSegment(SegmentIndex.ss, stack)
    installCodeSegment(code, rip: target)
  }

  /// After an instruction that may have set IF (STI, POPF, IRET, SYSRET): make the run loop
  /// return at the block boundary when an interrupt is waiting, so it gets delivered.
  func wakeRunLoopIfInterruptPending() {
    guard let apic = system.localAPIC else { return }
    let pending = apic.pendingEvents
    if (pending.contains(.interrupt) && rflags & RFlags.if != 0) || (pending.contains(.nmi) && !system.nmiBlocked) {
      stopFlag.store(true, ordering: .releasing)
    }
  }
}
