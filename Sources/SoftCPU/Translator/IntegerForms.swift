// Integer instructions the translator recognizes by their op rather than by an interpreter
// fast form: the ALU group, TEST, INC/DEC/NEG/NOT in every operand size (8-bit registers
// including AH..BH), with register or memory operands, LOCK on read-modify-write memory
// forms, and unsigned DIV of 32- and 64-bit operands. Each becomes the same host instruction
// on the guest register slot, on the host address of guest RAM the inline TLB probe found, or
// on the loaded operand, so the host computes the result and the flags.

/// A translated integer instruction without a translated fast form.
struct IntegerForm {
  enum Kind: Equatable {
    case alu(HostALU)
    case test
    case inc, dec, neg, not
    /// Unsigned DIV (RDX:RAX / r/m).
    case divide
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
    case .divRm:
      guard instruction.operandSize >= 4 else { return nil }
      operands = .rm
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
    default: kind = .divide
    }
    size = Int(instruction.operandSize)
    memory = instruction.hasMemoryOperand
    locked = instruction.prefixes & Instruction.Prefix.lock != 0
    // LOCK is valid only on a read-modify-write memory destination (#UD otherwise, which the
    // interpreter raises).
    if locked && !(memory && writesMemory) { return nil }
  }

  /// The instruction writes its r/m operand.
  var writesRM: Bool {
    switch kind {
    case .alu(let alu): operands != .regRm && alu != .cmp
    case .test, .divide: false
    case .inc, .dec, .neg, .not: true
    }
  }

  /// A read-modify-write of guest memory.
  var writesMemory: Bool { memory && writesRM }

  /// The instruction writes its destination at all (CMP and TEST only compare).
  var writesDestination: Bool {
    switch kind {
    case .alu(let alu): alu != .cmp
    case .test: false
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
    case .alu, .neg:
      FlagUse(reads: false, writesAll: true)
    case .inc, .dec:
      // CF is kept.
      FlagUse(reads: true, writesAll: false)
    case .not, .divide:
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
    if form.kind == .divide {
      emitDivide(slot, index: index, form: form)
      return
    }
    let size = form.size
    let rax = HostRegister.rax
    let immediate = Int32(truncatingIfNeeded: instruction.immediate)
    if form.writesMemory {
      // Read-modify-write of guest RAM through the write TLB; a miss (unmapped, MMIO, a code
      // page, a page-crossing access) leaves before the instruction for the interpreter.
      emitLinearAddress(slot, index: index)
      let miss = emitter.newLabel()
      if inlineTLBProbes {
        emitProbe(size: size, write: true, flagsValid: flagsValidAt[index], miss: miss)
        if form.operands == .rmReg { emitter.mov(size: size, rax, guestRegister(instruction.reg, size: size)) }
        if form.locked { emitter.byte(0xF0) }
        emitOperation(form, destination: .at(HostRegister.rdx, 0), register: rax, immediate: immediate)
      } else {
        if flagsValidAt[index] { emitter.saveFlags() }
        emitter.jump(to: miss)
      }
      deferLeaveBefore(index, miss: miss)
      return
    }
    if form.memory {
      // The memory operand is only read: RAX = its value.
      emitLoad(slot, index: index, size: size)
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
      // 32-bit result: compute in ECX and store zero-extended.
      emitter.mov(size: 4, rcx, destination)
      if sourceIsRAX {
        emitter.alu(Self.hostALU(form), size: 4, .register(rcx), rax)
      } else {
        emitter.alu(Self.hostALU(form), size: 4, rcx, source)
      }
      emitter.mov(size: 8, destination, rcx)
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
  private mutating func emitOperation(_ form: IntegerForm, destination: HostOperand, register: UInt8, immediate: Int32) {
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
    case .divide: preconditionFailure("DIV has its own emitter")
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
    if valid { emitter.saveFlags() }
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

  /// The ALU operation of a form that writes a register (not TEST, which has no result).
  private static func hostALU(_ form: IntegerForm) -> HostALU {
    guard case .alu(let alu) = form.kind else { preconditionFailure("not an ALU form") }
    return alu
  }
}
