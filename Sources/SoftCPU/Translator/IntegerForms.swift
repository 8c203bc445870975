// Integer instructions the translator recognizes by their op rather than by an interpreter
// fast form: the ALU group, TEST, INC/DEC/NEG/NOT in every operand size (8-bit registers
// including AH..BH), with register or memory operands, LOCK on read-modify-write memory
// forms, unsigned DIV of 32- and 64-bit operands, BT/BTS/BTR/BTC with an immediate bit,
// CMPXCHG and XADD on memory, MOVZX/MOVSX and 8/16-bit moves (immediates included),
// CBW/CWDE/CDQE and CWD/CDQ/CQO, BSWAP, SETcc to memory, PUSH imm, PUSH r/m64, LEAVE, the
// fences and SHL/SHR/SAR of 8- and 16-bit registers by an immediate. Each becomes the same
// host instruction on the guest register slot, on the host address of guest RAM the inline
// TLB probe found, or on the loaded operand, so the host computes the result and the flags.

/// A translated integer instruction without a translated fast form.
struct IntegerForm {
  enum Kind: Equatable {
    case alu(HostALU)
    case test
    case inc, dec, neg, not
    /// Unsigned DIV (RDX:RAX / r/m).
    case divide
    /// MUL and one-operand IMUL (RDX:RAX = RAX * r/m) of 32- and 64-bit operands.
    case multiply(signed: Bool)
    /// BT (4), BTS (5), BTR (6), BTC (7) with an immediate bit number (the 0F BA /digit).
    case bitTest(UInt8)
    /// CMPXCHG and XADD with a memory destination.
    case compareExchange, exchangeAdd
    /// MOVZX / MOVSX from a `from`-byte source, and MOVSXD with a 32-bit destination (`from` 4).
    case extend(signed: Bool, from: Int)
    /// MOV of 8- or 16-bit operands, from a register or an immediate (the wider ones have fast
    /// forms).
    case move
    /// CBW/CWDE/CDQE and CWD/CDQ/CQO.
    case convertAccumulator, convertToDouble
    case byteSwap
    /// SETcc with a memory destination.
    case setByte
    /// CMOVcc from memory (32- and 64-bit; the register forms are fast forms).
    case conditionalMove
    /// PUSH imm and PUSH r/m; LEAVE (the stack's operand size: 64-bit, or 32-bit in 32-bit
    /// code).
    case push, leave
    /// LFENCE, MFENCE, SFENCE: the same host fence.
    case fence
    /// SHL, SHR and SAR of an 8- or 16-bit register by an immediate count (C0/C1/D0/D1) that
    /// stays below the operand's width once masked (the wider ones have fast forms).
    case shift(HostShift)
  }

  /// Where the operands are: `op r/m, reg`, `op reg, r/m`, `op r/m, imm` or `op r/m`.
  enum Operands {
    case rmReg, regRm, rmImm, rm
  }

  var kind: Kind
  var operands: Operands
  /// Operand size in bytes (1, 2, 4 or 8).
  var size: Int
  var memory: Bool
  /// LOCK prefix (a read-modify-write memory form).
  var locked: Bool

  /// The translated form of `instruction`, nil when it has none.
  init?(_ instruction: Instruction) {
    switch instruction.op {
    case .addRmReg, .orRmReg, .adcRmReg, .sbbRmReg, .andRmReg, .subRmReg, .xorRmReg, .cmpRmReg:
      operands = .rmReg
    case .addRegRm, .orRegRm, .adcRegRm, .sbbRegRm, .andRegRm, .subRegRm, .xorRegRm, .cmpRegRm:
      operands = .regRm
    case .addRmImm, .orRmImm, .adcRmImm, .sbbRmImm, .andRmImm, .subRmImm, .xorRmImm, .cmpRmImm, .testRmImm:
      operands = .rmImm
    case .testRmReg:
      operands = .rmReg
    case .incRm, .decRm, .negRm, .notRm:
      operands = .rm
    case .divRm, .mulRm, .imulRm:
      guard instruction.operandSize >= 4 else { return nil }
      operands = .rm
    case .btRmImm, .btsRmImm, .btrRmImm, .btcRmImm:
      operands = .rmImm
    case .cmpxchg, .xadd:
      // The register operand is loaded whole: AH..BH have no form here.
      guard instruction.hasMemoryOperand, instruction.reg < 16 else { return nil }
      operands = .rmReg
    case .movzxByte, .movzxWord, .movsxByte, .movsxWord:
      operands = .regRm
    case .movsxd:
      guard instruction.operandSize == 4 else { return nil }
      operands = .regRm
    case .movRmReg, .movRegRm:
      guard instruction.operandSize <= 2 else { return nil }
      operands = instruction.op == .movRmReg ? .rmReg : .regRm
    case .movRmImm:
      guard instruction.operandSize <= 2 else { return nil }
      operands = .rmImm
    case .cbw, .cwd:
      operands = .rm
    case .bswap:
      guard instruction.operandSize >= 4 else { return nil }  // BSWAP r16 is undefined
      operands = .rm
    case .setcc:
      guard instruction.hasMemoryOperand else { return nil }
      operands = .rm
    case .cmovcc:
      guard instruction.hasMemoryOperand, instruction.operandSize >= 4 else { return nil }
      operands = .regRm
    case .pushImm:
      // 64-bit, or 32-bit in 32-bit code (`canTranslate` matches it with the code size).
      guard instruction.operandSize >= 4 else { return nil }
      operands = .rmImm
    case .pushRm, .leave:
      guard instruction.operandSize >= 4 else { return nil }
      operands = .rm
    case .fence:
      operands = .rm
    case .shlRm, .shrRm, .sarRm:
      // Counts of 0 (no change at all) and of the width or more (flags the architecture
      // leaves undefined, and CF from beyond the operand) stay with the interpreter.
      let count = instruction.immediate & 0x1F
      guard instruction.operandSize <= 2, !instruction.hasMemoryOperand,
        [0xC0, 0xC1, 0xD0, 0xD1].contains(instruction.opcode),
        count != 0, count < UInt64(instruction.operandSize) * 8
      else { return nil }
      operands = .rmImm
    default:
      return nil
    }
    switch instruction.op {
    case .addRmReg, .addRegRm, .addRmImm: kind = .alu(.add)
    case .orRmReg, .orRegRm, .orRmImm: kind = .alu(.or)
    case .adcRmReg, .adcRegRm, .adcRmImm: kind = .alu(.adc)
    case .sbbRmReg, .sbbRegRm, .sbbRmImm: kind = .alu(.sbb)
    case .andRmReg, .andRegRm, .andRmImm: kind = .alu(.and)
    case .subRmReg, .subRegRm, .subRmImm: kind = .alu(.sub)
    case .xorRmReg, .xorRegRm, .xorRmImm: kind = .alu(.xor)
    case .cmpRmReg, .cmpRegRm, .cmpRmImm: kind = .alu(.cmp)
    case .testRmReg, .testRmImm: kind = .test
    case .incRm: kind = .inc
    case .decRm: kind = .dec
    case .negRm: kind = .neg
    case .notRm: kind = .not
    case .divRm: kind = .divide
    case .mulRm: kind = .multiply(signed: false)
    case .imulRm: kind = .multiply(signed: true)
    case .btRmImm: kind = .bitTest(4)
    case .btsRmImm: kind = .bitTest(5)
    case .btrRmImm: kind = .bitTest(6)
    case .btcRmImm: kind = .bitTest(7)
    case .cmpxchg: kind = .compareExchange
    case .xadd: kind = .exchangeAdd
    case .movzxByte: kind = .extend(signed: false, from: 1)
    case .movzxWord: kind = .extend(signed: false, from: 2)
    case .movsxByte: kind = .extend(signed: true, from: 1)
    case .movsxWord: kind = .extend(signed: true, from: 2)
    case .movsxd: kind = .extend(signed: true, from: 4)
    case .movRmReg, .movRegRm, .movRmImm: kind = .move
    case .cbw: kind = .convertAccumulator
    case .cwd: kind = .convertToDouble
    case .bswap: kind = .byteSwap
    case .pushImm, .pushRm: kind = .push
    case .leave: kind = .leave
    case .fence: kind = .fence
    case .cmovcc: kind = .conditionalMove
    case .shlRm: kind = .shift(.shl)
    case .shrRm: kind = .shift(.shr)
    case .sarRm: kind = .shift(.sar)
    default: kind = .setByte
    }
    size = Int(instruction.operandSize)
    memory = instruction.hasMemoryOperand
    locked = instruction.prefixes & Instruction.Prefix.lock != 0
    // LOCK is valid only on a read-modify-write memory destination (#UD otherwise, which the
    // interpreter raises).
    if locked && !(memory && instruction.op.allowsLock && writesMemory) { return nil }
  }

  /// The instruction writes its r/m operand.
  var writesRM: Bool {
    switch kind {
    case .alu(let alu): operands != .regRm && alu != .cmp
    case .inc, .dec, .neg, .not, .compareExchange, .exchangeAdd, .setByte, .shift: true
    case .bitTest(let digit): digit != 4
    case .move: operands != .regRm
    case .test, .divide, .multiply, .extend, .convertAccumulator, .convertToDouble, .byteSwap, .push, .leave, .fence,
      .conditionalMove:
      false
    }
  }

  /// A read-modify-write of guest memory.
  var writesMemory: Bool { memory && writesRM }

  /// The instruction writes its destination at all (CMP and TEST only compare).
  var writesDestination: Bool {
    switch kind {
    case .alu(let alu): alu != .cmp
    case .test, .push, .fence: false
    default: true
    }
  }

  /// Status-flag use.
  var flagUse: FlagUse {
    switch kind {
    case .alu(.and), .alu(.or), .alu(.xor), .test:
      FlagUse(reads: false, writesAll: true, undefined: RFlags.af)
    case .alu(.adc), .alu(.sbb):
      FlagUse(reads: true, writesAll: true)
    case .alu, .neg, .compareExchange, .exchangeAdd:
      FlagUse(reads: false, writesAll: true)
    case .shift:
      // OF is undefined unless the count is 1 (`undefinedFlags(after:before:)` refines it);
      // set as the interpreter does on hosts whose differ (`fixesShiftFlags`).
      FlagUse(reads: false, writesAll: true, undefined: RFlags.af | RFlags.of)
    case .multiply:
      // CF and OF from the product; the rest undefined (set as the interpreter does on hosts
      // whose differ: `fixesMultiplyFlags`).
      FlagUse(reads: false, writesAll: true, undefined: RFlags.sf | RFlags.zf | RFlags.af | RFlags.pf)
    case .inc, .dec:
      // CF is kept.
      FlagUse(reads: true, writesAll: false)
    case .conditionalMove:
      FlagUse(reads: true, writesAll: false)
    case .bitTest, .setByte:
      // BT* set CF and keep the rest (the interpreter keeps OF, SF, AF and PF, which the
      // architecture leaves undefined); SETcc reads them.
      FlagUse(reads: true, writesAll: false)
    case .not, .divide, .extend, .move, .convertAccumulator, .convertToDouble, .byteSwap, .push, .leave, .fence:
      // The flags are unchanged (the interpreter's DIV keeps them; the translation saves and
      // restores them around the host's DIV, which leaves them undefined).
      FlagUse()
    }
  }
}

extension BlockTranslator {
  /// The guest register `register` as an operand of `size` bytes (AH..BH: 16-19 for size 1).
  func guestRegister(_ register: UInt8, size: Int) -> HostOperand {
    if size == 1 && register >= Instruction.highByteBase {
      return .at(HostRegister.rbx, Int(register - Instruction.highByteBase) * 8 + 1)
    }
    return .at(HostRegister.rbx, Int(register) * 8)
  }

  /// Emits an `IntegerForm` instruction.
  mutating func emitInteger(_ slot: UnsafePointer<Instruction>, index: Int, form: IntegerForm) {
    let instruction = slot.pointee
    switch form.kind {
    case .divide:
      emitDivide(slot, index: index, form: form)
      return
    case .multiply(let signed):
      emitMultiply(slot, index: index, form: form, signed: signed)
      return
    case .conditionalMove:
      // The operand is read whatever the condition (a fault is the instruction's); a 32-bit
      // destination is zero-extended either way, as CMOVcc does in 64-bit mode.
      let size = form.size
      let destination = guestRegister(instruction.reg, size: 8)
      emitLoad(slot, index: index, size: size)
      emitter.mov(size: size, HostRegister.rcx, destination)
      let condition = UInt8(truncatingIfNeeded: instruction.opcode)
      emitter.cmov(condition, size: size, HostRegister.rcx, .register(HostRegister.rax))
      emitter.mov(size: 8, destination, HostRegister.rcx)
      return
    case .bitTest(let digit):
      emitBitTest(slot, index: index, form: form, digit: digit)
      return
    case .shift(let kind):
      // The register's slot shifted in place; the operand before the shift goes to RDX
      // (zero-extended) for the interpreter's flags where the host's differ.
      let destination = guestRegister(instruction.rm, size: form.size)
      let fixFlags = fixesShiftFlags(after: index)
      if fixFlags { emitter.movzx(HostRegister.rdx, sourceSize: form.size, destination) }
      emitter.shift(kind, size: form.size, destination, count: UInt8(truncatingIfNeeded: instruction.immediate & 0x1F))
      if fixFlags { emitter.interpreterShiftFlags(kind, size: form.size) }
      return
    case .compareExchange, .exchangeAdd:
      emitExchange(slot, index: index, form: form)
      return
    case .extend, .move:
      emitMove(slot, index: index, form: form)
      return
    case .convertAccumulator, .convertToDouble, .byteSwap:
      emitAccumulatorForms(slot, form: form)
      return
    case .push, .leave:
      emitStackForms(slot, index: index, form: form)
      return
    case .fence:
      // 0F AE E8/F0/F8 (the /5, /6, /7 register forms).
      emitter.raw(0x0F, 0xAE, 0xC0 | (slot.pointee.reg & 7) << 3)
      return
    case .setByte:
      // The condition is taken into the context's `vector` first: on a TLB miss the flags
      // are stored (which clobbers them in the host) before the value is computed.
      let scratch = HostOperand.at(HostRegister.r12, ContextOffset.vector)
      emitter.set(UInt8(truncatingIfNeeded: instruction.opcode), scratch)
      emitStore(slot, index: index, size: 1) { emitter, register in
        emitter.movzx(register, sourceSize: 1, scratch)
      }
      return
    default:
      break
    }
    let size = form.size
    let rax = HostRegister.rax
    let immediate = Int32(truncatingIfNeeded: instruction.immediate)
    // The instruction writes every flag after its access without reading one: the probe need
    // not put the flags back (`flagsDeadAfterAccess`).
    let flagsDead = form.flagUse.writesAll && !form.flagUse.reads
    if form.writesMemory {
      // Read-modify-write of guest RAM through the write TLB; a miss (unmapped, MMIO, a code
      // page, a page-crossing access) leaves before the instruction for the interpreter.
      emitLinearAddress(slot, index: index)
      let miss = emitter.newLabel()
      if inlineTLBProbes {
        emitProbe(size: size, write: true, flagsValid: flagsValidAt[index], restoresFlags: !flagsDead, miss: miss)
        if form.operands == .rmReg { emitter.mov(size: size, rax, guestRegister(instruction.reg, size: size)) }
        if form.locked { emitter.byte(0xF0) }
        emitOperation(form, destination: .at(HostRegister.rdx, 0), register: rax, immediate: immediate)
      } else {
        if flagsValidAt[index] { saveFlagsInEBP() }
        emitter.jump(to: miss)
      }
      deferLeaveBefore(index, miss: miss)
      return
    }
    if form.memory {
      // The memory operand is only read: RAX = its value.
      emitLoad(slot, index: index, size: size, flagsDead: flagsDead)
      switch form.operands {
      case .regRm:
        emitToRegister(form, instruction.reg, source: .register(rax), sourceIsRAX: true)
      case .rmReg:
        // CMP/TEST r/m, reg: the loaded r/m is the first operand.
        if form.kind == .test {
          emitter.test(size: size, guestRegister(instruction.reg, size: size), rax)
        } else {
          emitter.alu(.cmp, size: size, rax, guestRegister(instruction.reg, size: size))
        }
      case .rmImm:
        emitOperation(form, destination: .register(rax), register: rax, immediate: immediate)
      case .rm:
        preconditionFailure("unary forms on memory write it")
      }
      return
    }
    // Register operands.
    switch form.operands {
    case .regRm:
      emitToRegister(form, instruction.reg, source: guestRegister(instruction.rm, size: size), sourceIsRAX: false)
    case .rmReg:
      emitToRegister(form, instruction.rm, source: guestRegister(instruction.reg, size: size), sourceIsRAX: false)
    case .rmImm, .rm:
      let destination = guestRegister(instruction.rm, size: size)
      if size == 4 && form.writesDestination {
        // A 32-bit result zero-extends into the whole register.
        emitter.mov(size: 4, rax, destination)
        emitOperation(form, destination: .register(rax), register: rax, immediate: immediate)
        emitter.mov(size: 8, destination, rax)
      } else {
        emitOperation(form, destination: destination, register: rax, immediate: immediate)
      }
    }
  }

  /// `op destination, source` with the guest register `register` as destination; `source` is
  /// a guest register slot or RAX.
  private mutating func emitToRegister(_ form: IntegerForm, _ register: UInt8, source: HostOperand, sourceIsRAX: Bool) {
    let size = form.size
    let destination = guestRegister(register, size: size)
    let rax = HostRegister.rax
    let rcx = HostRegister.rcx
    if size == 4 && form.writesDestination {
      // 32-bit result: computed in the destination's host register (or ECX) and stored
      // zero-extended.
      let alu = Self.hostALU(form)
      emitWrite32(destination, scratch: rcx) { emitter, register in
        if sourceIsRAX {
          emitter.alu(alu, size: 4, .register(register), rax)
        } else {
          emitter.alu(alu, size: 4, register, source)
        }
      }
      return
    }
    if !sourceIsRAX { emitter.mov(size: size, rax, source) }
    if form.kind == .test {
      emitter.test(size: size, destination, rax)
    } else {
      emitter.alu(Self.hostALU(form), size: size, destination, rax)
    }
  }

  /// The operation itself on `destination` (a register slot, RAX or host memory), with the
  /// source in `register` (`rmReg`) or `immediate` (`rmImm`).
  private mutating func emitOperation(_ form: IntegerForm, destination: HostOperand, register: UInt8, immediate: Int32)
  {
    let size = form.size
    switch form.kind {
    case .alu(let alu):
      if form.operands == .rmImm {
        emitter.alu(alu, size: size, destination, immediate: immediate)
      } else {
        emitter.alu(alu, size: size, destination, register)
      }
    case .test:
      if form.operands == .rmImm {
        emitter.test(size: size, destination, immediate: immediate)
      } else {
        emitter.test(size: size, destination, register)
      }
    case .inc: emitter.inc(size: size, destination)
    case .dec: emitter.dec(size: size, destination)
    case .neg: emitter.neg(size: size, destination)
    case .not: emitter.not(size: size, destination)
    default: preconditionFailure("\(form.kind) has its own emitter")
    }
  }

  /// Unsigned DIV of RDX:RAX (EDX:EAX) by a 64-bit (32-bit) r/m. A zero divisor or a quotient
  /// that does not fit (both: RDX >= divisor) leaves before the instruction, and the
  /// interpreter raises #DE. The status flags are kept, as the interpreter keeps them.
  private mutating func emitDivide(_ slot: UnsafePointer<Instruction>, index: Int, form: IntegerForm) {
    let instruction = slot.pointee
    let size = form.size
    let rax = HostRegister.rax
    let rcx = HostRegister.rcx
    let rdx = HostRegister.rdx
    if form.memory {
      emitLoad(slot, index: index, size: size)
      emitter.mov(size: 8, rcx, .register(rax))
    } else {
      emitter.mov(size: size, rcx, guestRegister(instruction.rm, size: size))
    }
    let valid = flagsValidAt[index]
    if valid { saveFlagsInEBP() }
    emitter.mov(size: size, rax, guestRegister(0, size: size))
    emitter.mov(size: size, rdx, guestRegister(2, size: size))
    emitter.alu(.cmp, size: size, .register(rdx), rcx)
    let fault = emitter.newLabel()
    emitter.jump(HostCondition.aboveOrEqual, to: fault)
    emitter.div(size: size, .register(rcx))
    emitter.mov(size: 8, guestRegister(0, size: 8), rax)
    emitter.mov(size: 8, guestRegister(2, size: 8), rdx)
    if valid { emitter.restoreFlags() }
    deferLeaveBefore(index, miss: fault)
  }

  /// MUL / IMUL r/m (one operand): RDX:RAX = RAX * r/m as the same host instruction, whose CF
  /// and OF are the architecture's; the 32-bit form's EAX and EDX zero-extend. A memory
  /// operand is loaded first (a miss or fault leaves before the instruction, as for any load).
  private mutating func emitMultiply(
    _ slot: UnsafePointer<Instruction>, index: Int, form: IntegerForm, signed: Bool
  ) {
    let instruction = slot.pointee
    let size = form.size
    let rax = HostRegister.rax
    let rcx = HostRegister.rcx
    if form.memory {
      emitLoad(slot, index: index, size: size, flagsDead: true)
      emitter.mov(size: 8, rcx, .register(rax))
    } else {
      emitter.mov(size: size, rcx, guestRegister(instruction.rm, size: size))
    }
    emitter.mov(size: size, rax, guestRegister(0, size: size))
    if signed {
      emitter.imul(size: size, .register(rcx))
    } else {
      emitter.mul(size: size, .register(rcx))
    }
    emitter.mov(size: 8, guestRegister(0, size: 8), rax)
    emitter.mov(size: 8, guestRegister(2, size: 8), HostRegister.rdx)
    if fixesMultiplyFlags(after: index) {
      emitter.interpreterMultiplyFlags(size: size)
    }
  }

  /// BT/BTS/BTR/BTC r/m, imm8: CF = the bit, the other status flags kept (saved in EBP
  /// around the host instruction and put back with the new CF).
  private mutating func emitBitTest(_ slot: UnsafePointer<Instruction>, index: Int, form: IntegerForm, digit: UInt8) {
    let instruction = slot.pointee
    let size = form.size
    let bit = UInt8(truncatingIfNeeded: instruction.immediate) & UInt8(size * 8 - 1)
    let miss = emitter.newLabel()
    let operand: HostOperand
    if form.memory {
      emitLinearAddress(slot, index: index)
      guard inlineTLBProbes else {
        saveFlagsInEBP()
        emitter.jump(to: miss)
        deferLeaveBefore(index, miss: miss)
        return
      }
      // BT only reads; the others write (a read probe would miss code-page protection).
      emitProbe(size: size, write: digit != 4, flagsValid: true, miss: miss)
      operand = .at(HostRegister.rdx, 0)
    } else {
      operand = guestRegister(instruction.rm, size: size)
    }
    emitter.saveFlags()
    if form.locked { emitter.byte(0xF0) }
    emitter.bitTest(digit, size: size, operand, bit: bit)
    emitter.set(HostCondition.below, .register(HostRegister.rcx))
    if !form.memory && size == 4 && digit != 4 {
      // A 32-bit register result zero-extends.
      emitter.mov(size: 4, .at(HostRegister.rbx, Int(instruction.rm) * 8 + 4), immediate: 0)
    }
    emitter.restoreFlags(carryFromCL: true)
    if form.memory { deferLeaveBefore(index, miss: miss) }
  }

  /// LOCK CMPXCHG / XADD r/m, reg with a memory destination in guest RAM (a write-TLB miss
  /// leaves before the instruction). The guest's RAX and source register are loaded whole and
  /// stored back whole, so the sizes below 8 keep or zero-extend their upper bits as the host
  /// instruction does.
  private mutating func emitExchange(_ slot: UnsafePointer<Instruction>, index: Int, form: IntegerForm) {
    let instruction = slot.pointee
    let size = form.size
    emitLinearAddress(slot, index: index)
    let miss = emitter.newLabel()
    if inlineTLBProbes {
      emitProbe(size: size, write: true, flagsValid: flagsValidAt[index], miss: miss)
      if form.kind == .compareExchange {
        emitter.mov(size: 8, HostRegister.rax, guestRegister(0, size: 8))
        emitter.mov(size: 8, HostRegister.rcx, guestRegister(instruction.reg, size: 8))
        if form.locked { emitter.byte(0xF0) }
        emitter.compareExchange(size: size, .at(HostRegister.rdx, 0), HostRegister.rcx)
        emitter.mov(size: 8, guestRegister(0, size: 8), HostRegister.rax)
      } else {
        emitter.mov(size: 8, HostRegister.rax, guestRegister(instruction.reg, size: 8))
        if form.locked { emitter.byte(0xF0) }
        emitter.exchangeAdd(size: size, .at(HostRegister.rdx, 0), HostRegister.rax)
        emitter.mov(size: 8, guestRegister(instruction.reg, size: 8), HostRegister.rax)
      }
    } else {
      if flagsValidAt[index] { saveFlagsInEBP() }
      emitter.jump(to: miss)
    }
    deferLeaveBefore(index, miss: miss)
  }

  /// MOVZX/MOVSX/MOVSXD (32-bit destination) and 8/16-bit MOVs between registers and memory.
  private mutating func emitMove(_ slot: UnsafePointer<Instruction>, index: Int, form: IntegerForm) {
    let instruction = slot.pointee
    let size = form.size
    let rax = HostRegister.rax
    // The flags need not survive the access when nothing reads them after it.
    let flagsDead = form.memory && flagsDeadAfterAccess(index, writesAllFlags: false)
    if case .extend(let signed, let from) = form.kind {
      // RAX = the source, extended to the destination size (4 or 8; a 16-bit destination
      // takes the low word).
      let wide = size == 8 ? 8 : 4
      let source: HostOperand
      if form.memory {
        emitLoad(slot, index: index, size: from, flagsDead: flagsDead)
        source = .register(rax)
      } else {
        source = guestRegister(instruction.rm, size: from)
      }
      if from == 4 {
        emitter.mov(size: 4, rax, source)
      } else if signed {
        emitter.movsx(size: wide, rax, sourceSize: from, source)
      } else {
        emitter.movzx(rax, sourceSize: from, source)
      }
      emitter.mov(size: size == 2 ? 2 : 8, guestRegister(instruction.reg, size: size), rax)
      return
    }
    if form.operands == .rmImm {
      // MOV r/m8, imm8 (B0-B7 and C6) and MOV r/m16, imm16.
      let immediate = Int32(truncatingIfNeeded: instruction.immediate)
      if form.memory {
        emitStore(slot, index: index, size: size, flagsDead: flagsDead) {
          emitter, register in
          emitter.mov(size: 4, .register(register), immediate: immediate)
        }
      } else {
        emitter.mov(size: size, guestRegister(instruction.rm, size: size), immediate: immediate)
      }
      return
    }
    if form.operands == .rmReg && form.memory {
      let source = guestRegister(instruction.reg, size: size)
      emitStore(slot, index: index, size: size, flagsDead: flagsDead) {
        emitter, register in
        emitter.movzx(register, sourceSize: size, source)
      }
      return
    }
    if form.memory {
      emitLoad(slot, index: index, size: size, flagsDead: flagsDead)
    } else {
      let source = form.operands == .rmReg ? instruction.reg : instruction.rm
      emitter.mov(size: size, rax, guestRegister(source, size: size))
    }
    let destination = form.operands == .rmReg ? instruction.rm : instruction.reg
    emitter.mov(size: size, guestRegister(destination, size: size), rax)
  }

  /// CBW/CWDE/CDQE, CWD/CDQ/CQO and BSWAP on the guest registers, as the host instructions.
  private mutating func emitAccumulatorForms(_ slot: UnsafePointer<Instruction>, form: IntegerForm) {
    let rax = HostRegister.rax
    let rdx = HostRegister.rdx
    switch form.kind {
    case .convertAccumulator:
      emitter.mov(size: 8, rax, guestRegister(0, size: 8))
      emitter.convertAccumulator(size: form.size)
      emitter.mov(size: 8, guestRegister(0, size: 8), rax)
    case .convertToDouble:
      emitter.mov(size: 8, rax, guestRegister(0, size: 8))
      emitter.mov(size: 8, rdx, guestRegister(2, size: 8))
      emitter.convertToDouble(size: form.size)
      emitter.mov(size: 8, guestRegister(2, size: 8), rdx)
    default:
      let register = guestRegister(slot.pointee.rm, size: 8)
      emitter.mov(size: 8, rax, register)
      emitter.byteSwap(size: form.size, rax)
      emitter.mov(size: 8, register, rax)
    }
  }

  /// PUSH imm / PUSH r/m and LEAVE, at the stack's width (`codeSize`). The stack store (or
  /// LEAVE's load from RBP) goes through the TLB probe; a miss leaves before the instruction
  /// with RSP and RBP untouched, so a fault is raised by the interpreter with the state the
  /// instruction started with.
  private mutating func emitStackForms(_ slot: UnsafePointer<Instruction>, index: Int, form: IntegerForm) {
    let instruction = slot.pointee
    let rax = HostRegister.rax
    let width = codeSize
    if form.kind == .leave {
      // RAX = [RBP]; RSP = RBP + width (the low half alone for a 32-bit stack); RBP = RAX
      // (zero-extended from a 32-bit load).
      emitLoad(slot, index: index, size: width, stackOffset: 0, stackRegister: 5)
      emitter.mov(size: width, HostRegister.rcx, guestRegister(5, size: 8))
      emitter.lea(size: width, HostRegister.rcx, .at(HostRegister.rcx, width))
      emitter.mov(size: width, guestRegister(4, size: 8), HostRegister.rcx)
      emitter.mov(size: 8, guestRegister(5, size: 8), rax)
      return
    }
    let store: (inout X86Emitter, UInt8) -> Void
    if form.operands == .rmImm {
      let value = Int32(truncatingIfNeeded: instruction.immediate)
      store = { emitter, register in emitter.mov(size: width, .register(register), immediate: value) }
    } else if form.memory {
      // The operand's address uses RSP before the push; the value waits in the context's
      // `vector` (the store's probe and its miss path leave it alone until the value is taken).
      let scratch = HostOperand.at(HostRegister.r12, ContextOffset.vector)
      emitLoad(slot, index: index, size: width)
      emitter.mov(size: 8, scratch, rax)
      store = { emitter, register in emitter.mov(size: 8, register, scratch) }
    } else {
      let source = guestRegister(instruction.rm, size: 8)
      store = { emitter, register in emitter.mov(size: width, register, source) }
    }
    emitStore(slot, index: index, size: width, stackOffset: -width, after: adjustStack(-width), value: store)
  }

  /// The ALU operation of a form that writes a register (not TEST, which has no result).
  private static func hostALU(_ form: IntegerForm) -> HostALU {
    guard case .alu(let alu) = form.kind else { preconditionFailure("not an ALU form") }
    return alu
  }
}
