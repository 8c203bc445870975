import CShim
import Synchronization
import VMCore

/// Why `CPU.run` returned.
public enum StopCause: Equatable, Sendable {
  /// HLT executed.
  case halted
  /// An exception that was not delivered to the guest (no IDT delivery in flat test mode).
  case fault(Fault)
  /// The instruction budget ran out.
  case instructionLimit
  /// Another thread asked the CPU to stop.
  case stopRequested
}

// Fault reporting in flat test mode: for faults (#DE, #UD, #GP, #PF, #SS, #AC...) `rip` is the
// faulting instruction and no state of that instruction is committed. For traps (INT3 = #BP,
// INTO = #OF, INT1, INT n = vector n) `rip` is after the instruction, as the saved RIP of the
// trap frame (and the native harness's signal context after INT3) is.
//
// Outside flat test mode, faults are delivered to the guest (`deliverException`, part 2) and
// execution continues; a triple fault (`system.shutdownReason`) returns `.stopRequested`.
// Interrupts: the interrupt controllers raise `stopFlag` (`requestStop()`), checked once per
// block; the accelerator then calls `serviceSystemEvents()` and re-enters `run`. Part 2 keeps
// `codeSize`, `cpl`, `tlbTagExtra` and `stackMask` (SS.B / mode) in sync on mode, CS and SS
// changes (`systemModeChanged`).

extension CPU {
  /// Puts the CPU in flat 64-bit mode for tests and benchmarks: CS.L=1, all segment bases 0,
  /// CPL `cpl`, paging off (linear = physical: a test-only configuration), SSE enabled
  /// (CR4.OSFXSR/OSXMMEXCPT, CR0.MP, no EM/TS), x87 in its FNINIT state, exceptions not
  /// delivered but returned from `run` as `.fault`.
  public func enterFlatLongMode(cpl: UInt8 = 3) {
    enterFlatMode(cpl: cpl, longMode: true)
  }

  /// Puts the CPU in flat 32-bit protected mode for tests, as `enterFlatLongMode` does for
  /// 64-bit mode: EFER.LME/LMA clear, CS.D=1 and SS.B=1 (32-bit code and stack), all segment
  /// bases 0 with 4 GiB limits, paging off, SSE enabled, exceptions returned from `run`.
  public func enterFlatProtectedMode(cpl: UInt8 = 3) {
    enterFlatMode(cpl: cpl, longMode: false)
  }

  private func enterFlatMode(cpl: UInt8, longMode: Bool) {
    self.cpl = cpl & 3
    codeSize = longMode ? 8 : 4
    flatTestMode = true
    cr0 = X86.cr0PE | X86.cr0MP | X86.cr0ET | X86.cr0NE
    cr4 = (longMode ? X86.cr4PAE : 0) | X86.cr4OSFXSR | X86.cr4OSXMMEXCPT | X86.cr4OSXSAVE
    xcr0 = XSaveModel.supportedComponents
    efer = longMode ? X86.eferLME | X86.eferLMA | X86.eferSCE | X86.eferNXE : 0
    for index in 0..<6 {
      var segment = SegmentCache()
      let rpl = UInt16(self.cpl)
      if index == Int(SegmentIndex.cs) {
        segment.selector = (self.cpl == 3 ? 0x33 : 0x08)
        // Code, present, G; L=1 in 64-bit mode, D=1 in 32-bit mode.
        segment.access = (longMode ? 0xA09B : 0xC09B) | UInt32(self.cpl) << 5
      } else {
        segment.selector = index == Int(SegmentIndex.ss) ? (self.cpl == 3 ? 0x2B : 0x10) : 0
        segment.access = 0xC093 | UInt32(self.cpl) << 5
        if segment.selector == 0 && index != Int(SegmentIndex.ss) { segment.selector = 0 }
      }
      segment.selector |= segment.selector == 0 ? 0 : rpl
      segment.limit = 0xFFFF_FFFF
      segments[index] = segment
      segmentBase[index] = 0
    }
    tlbTagExtra = self.cpl == 3 ? tlbUserTagBits : 0
    // A run that left 64-bit code (a far return into a 32-bit segment) narrowed the stack.
    refreshStackMask()
    rflags = 0x2
    mxcsr = 0x1F80
    fpuControl = 0x037F
    fpuStatus = 0
    fpuTop = 0
    fpuTags = 0xFFFF
    fpuLastIP = 0
    fpuLastDP = 0
    fpuLastOpcode = 0
    flushTLB()
    flushDecodedBlocks()
  }

  /// Sets the FS or GS base (flat test mode; MSR writes in part 2).
  public func setSegmentBase(_ segment: UInt8, _ base: UInt64) {
    segments[Int(segment)].base = base
    segmentBase[Int(segment)] = base
  }

  /// The exception for a memory reference of `instruction` that the page walk found
  /// non-canonical (`Fault.nonCanonical`): #SS(0) when the reference goes through SS (the
  /// implicit stack accesses of PUSH, POP, CALL, RET, ENTER, LEAVE, IRET and far transfers,
  /// and explicit operands whose segment is SS, by default with an RSP or RBP base), else
  /// #GP(0) (SDM vol. 3 6.15, interrupts 12 and 13). Other faults pass unchanged. Called with
  /// RIP still past the instruction (RIP-relative operands).
  func faultForNonCanonicalAccess(_ fault: Fault, _ instruction: Instruction) -> Fault {
    guard fault.isNonCanonicalAccess else { return fault }
    // The faulting byte lies within the explicit operand (accesses are at most 64 bytes).
    let explicitOperandFaulted =
      instruction.hasMemoryOperand && fault.address &- operandAddress(instruction) < 64
    let throughStack: Bool
    switch instruction.op {
    case .pushRm, .pushImm, .popRm, .pushSeg, .popSeg, .pushf, .popf, .enter, .leave, .callRel, .callRm, .ret,
      .retImm, .farCall, .retFar, .iret:
      throughStack = !explicitOperandFaulted || instruction.segment == SegmentIndex.ss
    default:
      throughStack = instruction.hasMemoryOperand && instruction.segment == SegmentIndex.ss
    }
    return throughStack ? .stackFault(0) : .generalProtection(0)
  }

  /// Executes at most `instructionLimit` instructions from `rip`.
  /// In flat test mode a fault stops execution with `rip` at the faulting instruction and
  /// architectural state as the hardware leaves it at the fault.
  public func run(instructionLimit: Int) -> StopCause {
    var remaining = instructionLimit
    var previous = -1
    while remaining > 0 {
      if stopFlag.load(ordering: .relaxed) {
        hv_atomic_store8(translationStopSignal, 0)
        stopFlag.store(false, ordering: .relaxed)
        applyPostedExternalWrites()
        return .stopRequested
      }
      var blockIndex: Int
      var first: Int32
      var count: Int32
      // Instructions are fetched at CS.base + RIP (the base is 0 in 64-bit mode; outside it the
      // linear address is 32 bits).
      var fetchAddress = rip &+ segmentBase[Int(SegmentIndex.cs)]
      if codeSize != 8 { fetchAddress &= 0xFFFF_FFFF }
      // A debugger's breakpoint page: back to the accelerator, which steps through it one
      // instruction at a time (blocks never start on one page and run on the next).
      if debugStopPagesActive && remaining < instructionLimit && debugStopPages.contains(fetchAddress >> 12) {
        return .instructionLimit
      }
      let link = blocks + (previous > 0 ? previous : 0)
      let linksValid = previous >= 0 && link.pointee.linkGeneration == chainGenerationAndPrivilege
      if linksValid && link.pointee.links.0.leads(to: fetchAddress, in: addressSpaceGeneration) {
        blockIndex = Int(link.pointee.links.0.block)
        first = link.pointee.links.0.first
        count = link.pointee.links.0.count
      } else if linksValid && link.pointee.links.1.leads(to: fetchAddress, in: addressSpaceGeneration) {
        blockIndex = Int(link.pointee.links.1.block)
        first = link.pointee.links.1.first
        count = link.pointee.links.1.count
      } else {
        do {
          blockIndex = try findBlock(fetchAddress)
        } catch {
          let error = error.isNonCanonicalAccess ? Fault.generalProtection(0) : error
          if flatTestMode { return .fault(error) }
          deliverException(error)
          if system.shutdownReason != nil { return .stopRequested }
          previous = -1
          continue
        }
        first = blocks[blockIndex].first
        count = blocks[blockIndex].count
        if previous >= 0 {
          // The newest link goes first; the other one is kept if still valid.
          let newest = BlockLink(
            rip: fetchAddress, block: Int32(blockIndex), first: first, count: count,
            addressSpace: blockCodeIsGlobal(fetchAddress, block: blockIndex) ? 0 : addressSpaceGeneration)
          link.pointee.links = (newest, linksValid ? link.pointee.links.0 : BlockLink())
          link.pointee.linkGeneration = chainGenerationAndPrivilege
        }
      }
      var start = blockArena + Int(first)
      var end = start + (Int(count) < remaining ? Int(count) : remaining)
      // TF (single-step) or RF (set by IRET from a fault frame) take the slow path below.
      let debugFlags = storedFlags & (RFlags.tf | RFlags.rf)
      if debugFlags & RFlags.tf != 0 { end = start + 1 }
      var instruction = start
      var instructionStart = rip
      blockInvalidated = false
      // The translating tier runs the block's translated prefix; the interpreter the rest.
      if translationEnabled && debugFlags == 0 && Int(count) <= remaining && !debugStopPagesActive {
        let result = runTranslated(block: blockIndex, remaining: remaining)
        let chained = Int(truncatingIfNeeded: translationContext.unsafelyUnwrapped.pointee.chained)
        if chained != 0 {
          // Translated blocks chained into others: account for the completed ones and go on
          // with the last one.
          remaining -= chained
          retiredInstructions &+= UInt64(chained)
          blockIndex = Int(truncatingIfNeeded: translationContext.unsafelyUnwrapped.pointee.last_block)
          start = blockArena + Int(blocks[blockIndex].first)
          end = start + Int(blocks[blockIndex].count)
          instruction = start
        }
        instruction += Int(truncatingIfNeeded: result & 0xFFFF_FFFF)
        if result & translationEndedBit != 0 { blockInvalidated = true }
        // A translated block that stopped early (an instruction without a translation, or one
        // that left for the interpreter: a TLB miss, a fault to raise) has that one instruction
        // interpreted, and execution goes on at the next block lookup: the rest of the block
        // becomes a block of its own, translated once hot, rather than interpreted each time.
        // A hot block that starts with instructions without a translation has those
        // interpreted (`heat` counts them, see `translatePending`), and the same happens.
        let state = blocks[blockIndex].translation
        if state > 0 && instruction < end {
          end = instruction + 1
        } else if state == -1 && blocks[blockIndex].heat != 0 && instruction + Int(blocks[blockIndex].heat) < end {
          end = instruction + Int(blocks[blockIndex].heat)
        }
      }
      let interpretedFrom = instruction
      statistics.blockDispatches += 1
      defer { statistics.interpretedInstructions &+= UInt64(instruction - interpretedFrom) }
      do {
        while instruction < end && !blockInvalidated {
          instructionStart = rip
          rip = instructionStart &+ UInt64(instruction.pointee.length)
          try executeFast(instruction)
          instruction += 1
        }
      } catch {
        let error = faultForNonCanonicalAccess(error, instruction.pointee)
        rip = instructionStart
        let executed = instruction - start
        retiredInstructions &+= UInt64(executed)
        singleStepOverride = .none
        if flatTestMode { return .fault(error) }
        // Outside flat test mode the exception goes to the guest (part 2) and execution goes on.
        remaining -= executed + 1
        deliverException(error)
        if system.shutdownReason != nil { return .stopRequested }
        previous = -1
        continue
      }
      let executed = instruction - start
      remaining -= executed
      retiredInstructions &+= UInt64(executed)
      previous = blockIndex
      if debugFlags != 0 || singleStepOverride != .none {
        if let trap = finishDebugFlags(debugFlags, lastOp: (instruction - 1).pointee.op) {
          if flatTestMode { return .fault(trap) }
          deliverException(trap)
          if system.shutdownReason != nil { return .stopRequested }
          previous = -1
          continue
        }
      }
      if exitRequested {
        exitRequested = false
        if haltRequested {
          haltRequested = false
          return .halted
        }
        return .fault(pendingTrap)
      }
    }
    return .instructionLimit
  }

  /// After a block that started with TF or RF set, or whose last instruction decided its own
  /// single-step trap (SYSCALL, SYSRET): clears RF (it lasts one instruction, unless that
  /// instruction was an IRET that loaded it again) and returns the single-step #DB trap to
  /// deliver, if any, with DR6.BS set. A trap follows an instruction that began with TF set
  /// (so not the POPF or IRET that sets it); SYSCALL and SYSRET trap when TF is set at their
  /// end (SYSCALL's mask may clear it; SYSRET may load it from R11).
  func finishDebugFlags(_ flagsAtStart: UInt64, lastOp: Op) -> Fault? {
    if flagsAtStart & RFlags.rf != 0 && lastOp != .iret { storedFlags &= ~RFlags.rf }
    let trap: Bool
    switch singleStepOverride {
    case .none: trap = flagsAtStart & RFlags.tf != 0
    case .trap: trap = true
    case .noTrap: trap = false
    }
    singleStepOverride = .none
    guard trap, !exitRequested else { return nil }
    system.debugRegisters[6] |= 1 << 14  // BS: single step
    return .debug
  }

  /// Executes one decoded instruction with its generic handler; `rip` already points past it.
  /// (The run loop calls `executeFast`, which comes here for instructions without a fast form.)
  @inline(never)
  func execute(_ pointer: UnsafeMutablePointer<Instruction>) throws(Fault) {
    let op = pointer.pointee.op
    let ins = pointer.pointee
    switch op {
    // ALU
    case .addRmReg: try aluRm(ins, .add, src: readRegister(ins.reg, size: ins.operandSize))
    case .addRegRm: try aluReg(ins, .add)
    case .addRmImm: try aluRm(ins, .add, src: ins.immediate)
    case .orRmReg: try aluRm(ins, .or, src: readRegister(ins.reg, size: ins.operandSize))
    case .orRegRm: try aluReg(ins, .or)
    case .orRmImm: try aluRm(ins, .or, src: ins.immediate)
    case .adcRmReg: try aluRm(ins, .adc, src: readRegister(ins.reg, size: ins.operandSize))
    case .adcRegRm: try aluReg(ins, .adc)
    case .adcRmImm: try aluRm(ins, .adc, src: ins.immediate)
    case .sbbRmReg: try aluRm(ins, .sbb, src: readRegister(ins.reg, size: ins.operandSize))
    case .sbbRegRm: try aluReg(ins, .sbb)
    case .sbbRmImm: try aluRm(ins, .sbb, src: ins.immediate)
    case .andRmReg: try aluRm(ins, .and, src: readRegister(ins.reg, size: ins.operandSize))
    case .andRegRm: try aluReg(ins, .and)
    case .andRmImm: try aluRm(ins, .and, src: ins.immediate)
    case .subRmReg: try aluRm(ins, .sub, src: readRegister(ins.reg, size: ins.operandSize))
    case .subRegRm: try aluReg(ins, .sub)
    case .subRmImm: try aluRm(ins, .sub, src: ins.immediate)
    case .xorRmReg: try aluRm(ins, .xor, src: readRegister(ins.reg, size: ins.operandSize))
    case .xorRegRm: try aluReg(ins, .xor)
    case .xorRmImm: try aluRm(ins, .xor, src: ins.immediate)
    case .cmpRmReg: try aluRm(ins, .cmp, src: readRegister(ins.reg, size: ins.operandSize))
    case .cmpRegRm: try aluReg(ins, .cmp)
    case .cmpRmImm: try aluRm(ins, .cmp, src: ins.immediate)
    case .testRmReg: try testRm(ins, src: readRegister(ins.reg, size: ins.operandSize))
    case .testRmImm: try testRm(ins, src: ins.immediate)
    case .incRm: try incDec(ins, increment: true)
    case .decRm: try incDec(ins, increment: false)
    case .negRm: try negate(ins)
    case .notRm: try complement(ins)

    // Data movement
    case .movRmReg:
      let value = readRegister(ins.reg, size: ins.operandSize)
      try writeRm(ins, size: ins.operandSize, value)
    case .movRegRm:
      writeRegister(ins.reg, size: ins.operandSize, try readRm(ins, size: ins.operandSize))
    case .movRmImm: try writeRm(ins, size: ins.operandSize, ins.immediate)
    case .lea:
      writeRegister(ins.reg, size: ins.operandSize, effectiveAddress(ins))
    case .movzxByte: writeRegister(ins.reg, size: ins.operandSize, try readRm(ins, size: 1))
    case .movzxWord: writeRegister(ins.reg, size: ins.operandSize, try readRm(ins, size: 2))
    case .movsxByte:
      let value = UInt64(bitPattern: Int64(Int8(truncatingIfNeeded: try readRm(ins, size: 1))))
      writeRegister(ins.reg, size: ins.operandSize, value)
    case .movsxWord:
      let value = UInt64(bitPattern: Int64(Int16(truncatingIfNeeded: try readRm(ins, size: 2))))
      writeRegister(ins.reg, size: ins.operandSize, value)
    case .movsxd:
      let value = UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: try readRm(ins, size: 4))))
      writeRegister(ins.reg, size: ins.operandSize, value)
    case .cmovcc:
      let value = try readRm(ins, size: ins.operandSize)
      if condition(UInt8(ins.opcode & 0xF)) {
        writeRegister(ins.reg, size: ins.operandSize, value)
      } else if ins.operandSize == 4 {
        gpr[Int(ins.reg)] &= 0xFFFF_FFFF
      }
    case .setcc:
      try writeRm(ins, size: 1, condition(UInt8(ins.opcode & 0xF)) ? 1 : 0)
    case .xchgRmReg: try exchange(ins)
    case .cmpxchg: try compareExchange(ins)
    case .cmpxchg8b16b: try compareExchangeDouble(ins)
    case .xadd: try exchangeAdd(ins)
    case .movbeLoad: try moveBigEndian(ins, load: true)
    case .movbeStore: try moveBigEndian(ins, load: false)
    case .movRmSeg: try moveFromSegment(ins)
    case .movSegRm: try moveToSegment(ins)
    case .cbw: convertAccumulator(ins)
    case .cwd: convertToDouble(ins)
    case .xlat:
      var address = (gpr[3] &+ (gpr[0] & 0xFF))
      if ins.addressSize != 8 { address &= ins.addressSize == 4 ? 0xFFFF_FFFF : 0xFFFF }
      let value = try read8(segmentBase[Int(ins.segment)] &+ address)
      gpr[0] = (gpr[0] & ~0xFF) | UInt64(value)
    case .lahf: loadFlagsIntoAH()
    case .sahf: storeAHIntoFlags()

    // Control transfer
    case .jcc:
      // Jcc does not end its block: a taken branch stops the block here.
      if condition(UInt8(ins.opcode & 0xF)) {
        try jumpRelative(ins)
        blockInvalidated = true
      }
    case .jmpRel: try jumpRelative(ins)
    case .jmpRm: try jumpTo(try readRm(ins, size: ins.operandSize))
    case .callRel: try callRelative(ins)
    case .callRm: try callIndirect(ins)
    case .ret: try returnNear(ins, release: 0)
    case .retImm: try returnNear(ins, release: ins.immediate)
    case .loop, .loope, .loopne, .jrcxz: try loopInstruction(ins)

    // Stack
    case .pushRm: try push(try readRm(ins, size: ins.operandSize), size: ins.operandSize)
    case .pushImm: try push(ins.immediate, size: ins.operandSize)
    case .popRm: try popToRm(ins)
    case .pushSeg: try push(UInt64(segments[Int(ins.reg)].selector), size: ins.operandSize)
    case .popSeg: try popSegment(ins)
    case .pushf: try pushFlags(ins)
    case .popf: try popFlags(ins)
    case .enter: try enterFrame(ins)
    case .leave: try leaveFrame(ins)

    // Shifts
    case .rolRm, .rorRm, .rclRm, .rcrRm: try rotate(ins)
    case .shlRm, .shrRm, .sarRm: try shift(ins)
    case .shldImm, .shldCL, .shrdImm, .shrdCL: try doubleShift(ins)

    // Multiply / divide
    case .mulRm, .imulRm: try multiplyAccumulator(ins)
    case .divRm, .idivRm: try divideAccumulator(ins)
    case .imulRegRm: try multiplySigned(ins, readRegister(ins.reg, size: ins.operandSize))
    case .imulRegRmImm: try multiplySigned(ins, ins.immediate)

    // Bits
    case .btRmReg, .btsRmReg, .btrRmReg, .btcRmReg, .btRmImm, .btsRmImm, .btrRmImm, .btcRmImm:
      try bitTest(ins)
    case .bsf, .bsr, .tzcnt, .lzcnt, .popcnt: try bitScan(ins)
    case .bswap: byteSwap(ins)

    // Strings
    case .movs, .cmps, .stos, .lods, .scas, .ins, .outs: try stringInstruction(ins)

    // Flags and misc
    case .clc: materializeFlags(); storedFlags &= ~RFlags.cf
    case .stc: materializeFlags(); storedFlags |= RFlags.cf
    case .cmc: materializeFlags(); storedFlags ^= RFlags.cf
    case .cld: storedFlags &= ~RFlags.df
    case .std: storedFlags |= RFlags.df
    case .cli, .sti: try setInterruptFlag(ins)
    case .nop, .pause, .fence, .clflush: break
    case .fwait: try fwait()
    case .cpuid: executeCPUID()
    case .rdtsc, .rdtscp: try readTimeStampCounter(ins)
    case .rdpid: try readProcessorID(ins)
    case .hlt: try halt()
    case .int3, .intN, .into, .int1: try softwareInterrupt(ins)
    case .inImm, .inDX, .outImm, .outDX: try portIO(ins)

    case .sse: try executeSSE(ins)
    case .mmx: try executeMMX(ins)
    case .x87: try executeX87(ins)
    case .vex: try executeVEX(ins)
    case .xsave, .xrstor, .xsaveopt, .xsavec: try executeXSAVE(ins)
    case .xgetbv: try executeXGETBV()
    case .xsetbv: try executeXSETBV()
    case .tooLong: throw .generalProtection(0)
    case .invalid: throw .invalidOpcode
    case .legacyOnly: try executeLegacy(ins)  // Part 2 hook: SystemLegacy.swift
    default: try executeSystem(ins)
    }
  }
}
