// x87 FPU unit (owned by the SIMD/FPU engineer).
//
// Exactness: the register stack, tags, TOP, stack faults and the environment instructions are
// modelled here; every operation that computes (arithmetic, compares, conversions to and from
// memory, constants, transcendentals, FPREM, FXAM ...) is executed by the same host
// instruction through CSoftFloat, with the guest's control word (PC, RC and exception masks)
// loaded. Results, C0-C3 and the exception flags are therefore bit-exact with the host CPU,
// including unmasked-exception behaviour (no result on IE/ZE/DE, bias-adjusted results on
// OE/UE into registers). An unmasked exception sets ES/B and raises #MF (CR0.NE=1) on the
// next waiting x87 instruction, as hardware does.

import CSoftFloat
import VMCore

/// x87 status word bits.
enum X87Status {
  static let invalid: UInt16 = 1 << 0
  static let denormal: UInt16 = 1 << 1
  static let zeroDivide: UInt16 = 1 << 2
  static let overflow: UInt16 = 1 << 3
  static let underflow: UInt16 = 1 << 4
  static let precision: UInt16 = 1 << 5
  static let stackFault: UInt16 = 1 << 6
  static let errorSummary: UInt16 = 1 << 7
  static let c0: UInt16 = 1 << 8
  static let c1: UInt16 = 1 << 9
  static let c2: UInt16 = 1 << 10
  static let c3: UInt16 = 1 << 14
  static let busy: UInt16 = 1 << 15
  static let exceptions: UInt16 = 0x3F
  static let conditionCodes: UInt16 = c0 | c1 | c2 | c3
}

/// The x87 real indefinite (negative quiet NaN with only the top fraction bit set).
let x87Indefinite = Float80(x87Significand: 0xC000_0000_0000_0000, signAndExponent: 0xFFFF)

extension CPU {
  /// Executes an x87 escape instruction (D8-DF).
  func executeX87(_ instruction: Instruction) throws(Fault) {
    guard cr0 & (X86.cr0EM | X86.cr0TS) == 0 else { throw .deviceNotAvailable }
    if _slowPath(xsaveInUse & XSaveModel.x87 == 0) && !instruction.onlyReadsX87State {
      xsaveInUse |= XSaveModel.x87
    }
    let escape = UInt8(truncatingIfNeeded: instruction.opcode)
    let modrm = instruction.modrm
    let reg = (modrm >> 3) & 7
    if instruction.hasMemoryOperand {
      let address = linearAddress(instruction)
      switch (escape, reg) {
      case (0xD9, 6):
        try storeEnvironment(at: address, wide: instruction.operandSize != 2)
        fpuControl |= 0x3F
        refreshX87Summary()
        return
      case (0xD9, 7):
        try write16(address, fpuControl)
        return
      case (0xDD, 6):
        try saveState(at: address, wide: instruction.operandSize != 2)
        return
      case (0xDD, 7):
        try write16(address, fpuStatusWord)
        return
      default: break
      }
      try checkPendingX87Exception()
      switch (escape, reg) {
      case (0xD9, 4):
        try loadEnvironment(from: address, wide: instruction.operandSize != 2)
        return
      case (0xD9, 5):
        fpuControl = try read16(address) & 0x1F3F | 0x40
        refreshX87Summary()
        return
      case (0xDD, 4):
        try restoreState(from: address, wide: instruction.operandSize != 2)
        return
      case (0xD9, 1), (0xDB, 4), (0xDB, 6), (0xDD, 5):
        throw .invalidOpcode
      default: break
      }
      recordX87Instruction(instruction, escape: escape, dataPointer: address)
      try executeX87Memory(escape: escape, reg: reg, address: address)
    } else {
      switch modrm {
      case 0xE0 where escape == 0xDF:  // FNSTSW AX
        gpr[0] = (gpr[0] & ~0xFFFF) | UInt64(fpuStatusWord)
        return
      case 0xE2 where escape == 0xDB:  // FNCLEX
        fpuStatus &= ~(X87Status.exceptions | X87Status.stackFault | X87Status.errorSummary | X87Status.busy)
        return
      case 0xE3 where escape == 0xDB:  // FNINIT
        initializeX87()
        return
      // FENI/FDISI/FSETPM: no-ops.
      case 0xE0 where escape == 0xDB, 0xE1 where escape == 0xDB, 0xE4 where escape == 0xDB:
        return
      default: break
      }
      try checkPendingX87Exception()
      recordX87Instruction(instruction, escape: escape, dataPointer: nil)
      try executeX87Register(escape: escape, reg: reg, index: Int(modrm & 7), modrm: modrm)
    }
  }

  /// FWAIT/WAIT (9B): #NM when CR0.MP and CR0.TS, then #MF if an unmasked x87 exception is pending.
  public func fwait() throws(Fault) {
    if cr0 & X86.cr0MP != 0 && cr0 & X86.cr0TS != 0 { throw .deviceNotAvailable }
    try checkPendingX87Exception()
  }

  /// Raises #MF when an unmasked x87 exception is pending (status ES).
  @inline(__always)
  func checkPendingX87Exception() throws(Fault) {
    if fpuStatus & X87Status.errorSummary != 0 { throw .x87Error }
  }

  /// FNINIT state.
  func initializeX87() {
    fpuControl = 0x037F
    fpuStatus = 0
    fpuTop = 0
    fpuTags = 0xFFFF
    fpuLastIP = 0
    fpuLastDP = 0
    fpuLastOpcode = 0
  }

  /// ES and B follow the exception flags that are unmasked in the control word.
  @inline(__always)
  func refreshX87Summary() {
    if fpuStatus & ~fpuControl & X87Status.exceptions != 0 {
      fpuStatus |= X87Status.errorSummary | X87Status.busy
    } else {
      fpuStatus &= ~(X87Status.errorSummary | X87Status.busy)
    }
  }

  /// Updates FIP/FOP (and FDP for memory forms) for a non-control instruction.
  @inline(__always)
  private func recordX87Instruction(_ instruction: Instruction, escape: UInt8, dataPointer: UInt64?) {
    fpuLastIP = rip &- UInt64(instruction.length) &- segmentBase[Int(SegmentIndex.cs)]
    fpuLastOpcode = UInt16(escape & 7) << 8 | UInt16(instruction.modrm)
    if let dataPointer {
      fpuLastDP = dataPointer &- segmentBase[Int(instruction.segment)]
    }
  }

  // MARK: - Register stack

  @inline(__always) func physicalIndex(_ stackIndex: Int) -> Int { (fpuTop &+ stackIndex) & 7 }

  @inline(__always) func isStackEmpty(_ stackIndex: Int) -> Bool {
    (fpuTags >> (2 * UInt16(physicalIndex(stackIndex)))) & 3 == 3
  }

  @inline(__always) func stackValue(_ stackIndex: Int) -> Float80 { fpuRegisters[physicalIndex(stackIndex)] }

  /// Stores `value` in ST(i) and tags the register from its contents.
  @inline(__always) func setStackValue(_ stackIndex: Int, _ value: Float80) {
    let physical = physicalIndex(stackIndex)
    fpuRegisters[physical] = value
    let shift = 2 * UInt16(physical)
    fpuTags = (fpuTags & ~(3 << shift)) | value.x87Tag << shift
  }

  @inline(__always) func setStackEmpty(_ stackIndex: Int) {
    fpuTags |= 3 << (2 * UInt16(physicalIndex(stackIndex)))
  }

  @inline(__always) func pushStack(_ value: Float80) {
    fpuTop = (fpuTop &- 1) & 7
    setStackValue(0, value)
  }

  @inline(__always) func popStack() {
    setStackEmpty(0)
    fpuTop = (fpuTop &+ 1) & 7
  }

  /// Records a stack overflow/underflow (IE, SF, C1 = overflow). Returns true when the
  /// invalid-operation exception is masked and the caller should produce the masked response.
  @inline(__always)
  private func stackFault(overflow: Bool) -> Bool {
    fpuStatus = (fpuStatus & ~X87Status.c1) | X87Status.invalid | X87Status.stackFault
    if overflow { fpuStatus |= X87Status.c1 }
    refreshX87Summary()
    return fpuControl & X87Status.invalid != 0
  }

  /// Merges a host status word: sticky exceptions, the condition codes in `conditionMask`
  /// (the ones the instruction defines; all of them when they were preloaded), ES/B.
  @inline(__always)
  private func mergeHostStatus(_ host: UInt16, conditionMask: UInt16) {
    fpuStatus = (fpuStatus & ~conditionMask) | (host & conditionMask) | (host & X87Status.exceptions)
    refreshX87Summary()
  }

  /// Runs one normalized x87 encoding on the host with `inputs` stack values.
  @inline(__always)
  private func runOnHost(_ code: UInt32, _ frame: inout csf_x87_frame) throws(Fault) {
    frame.control = fpuControl
    frame.guestStatus = fpuStatus
    guard csf_x87(code, &frame) == 0 else { throw .invalidOpcode }
  }

  // MARK: - Register forms

  private func executeX87Register(escape: UInt8, reg: UInt8, index: Int, modrm: UInt8) throws(Fault) {
    let hostCode = UInt32(escape) << 8 | UInt32(0xC1 | reg << 3)
    switch escape {
    case 0xD8, 0xDC:
      if reg == 2 || reg == 3 {
        try compareRegisters(hostCode: UInt32(0xD8) << 8 | UInt32(0xC1 | reg << 3), index: index, intoFlags: false)
      } else {
        try registerArithmetic(hostCode: hostCode, index: index, destinationIsTop: escape == 0xD8, pops: false)
      }
    case 0xDE:
      if reg == 3 {
        guard modrm == 0xD9 else { throw .invalidOpcode }
        try compareRegisters(hostCode: 0xDED9, index: 1, intoFlags: false)
      } else if reg == 2 {
        try compareRegisters(hostCode: 0xD8D9, index: index, intoFlags: false)
      } else {
        try registerArithmetic(hostCode: hostCode, index: index, destinationIsTop: false, pops: true)
      }
    case 0xD9:
      try executeD9Register(reg: reg, index: index, modrm: modrm)
    case 0xDA:
      if reg <= 3 {
        try conditionalMove(condition: reg, negate: false, index: index)
      } else if modrm == 0xE9 {
        try compareRegisters(hostCode: 0xDAE9, index: 1, intoFlags: false)
      } else {
        throw .invalidOpcode
      }
    case 0xDB:
      switch reg {
      case 0...3: try conditionalMove(condition: reg, negate: true, index: index)
      case 5, 6: try compareRegisters(hostCode: hostCode, index: index, intoFlags: true)
      default: throw .invalidOpcode
      }
    case 0xDD:
      switch reg {
      case 0:  // FFREE
        setStackEmpty(index)
        fpuStatus &= ~X87Status.c1
      case 1: try exchangeStack(index)  // FXCH alias
      case 2, 3:  // FST / FSTP ST(i)
        if isStackEmpty(0) {
          guard stackFault(overflow: false) else { return }
          setStackValue(index, x87Indefinite)
        } else {
          setStackValue(index, stackValue(0))
        }
        fpuStatus &= ~X87Status.c1
        if reg == 3 { popStack() }
      case 4, 5: try compareRegisters(hostCode: hostCode, index: index, intoFlags: false)
      default: throw .invalidOpcode
      }
    default:  // 0xDF
      switch reg {
      case 0:  // FFREEP (undocumented)
        setStackEmpty(index)
        popStack()
        fpuStatus &= ~X87Status.c1
      case 1: try exchangeStack(index)
      case 2, 3:
        if isStackEmpty(0) {
          guard stackFault(overflow: false) else { return }
          setStackValue(index, x87Indefinite)
        } else {
          setStackValue(index, stackValue(0))
        }
        popStack()
      case 5, 6: try compareRegisters(hostCode: hostCode, index: index, intoFlags: true)
      default: throw .invalidOpcode
      }
    }
  }

  /// FADD/FMUL/FSUB/FSUBR/FDIV/FDIVR with ST(0) and ST(i), optionally popping (DE forms).
  private func registerArithmetic(hostCode: UInt32, index: Int, destinationIsTop: Bool, pops: Bool) throws(Fault) {
    let destination = destinationIsTop ? 0 : index
    if isStackEmpty(0) || isStackEmpty(index) {
      guard stackFault(overflow: false) else { return }
      setStackValue(destination, x87Indefinite)
      if pops { popStack() }
      return
    }
    var frame = csf_x87_frame()
    frame.inputs = 2
    frame.stack.0 = stackValue(0)
    frame.stack.1 = stackValue(index)
    try runOnHost(hostCode, &frame)
    mergeHostStatus(frame.status, conditionMask: X87Status.c1)
    if frame.outputs == 1 {
      setStackValue(index, frame.stack.0)
      popStack()
    } else if destinationIsTop {
      setStackValue(0, frame.stack.0)
    } else {
      setStackValue(index, frame.stack.1)
    }
  }

  /// FCOM/FCOMP/FCOMPP/FUCOM/FUCOMP/FUCOMPP (condition codes) and FCOMI/FUCOMI/FCOMIP/FUCOMIP (RFLAGS).
  private func compareRegisters(hostCode: UInt32, index: Int, intoFlags: Bool) throws(Fault) {
    let popsRequested: Int
    switch hostCode {
    case 0xDED9, 0xDAE9: popsRequested = 2
    case 0xD8D9, 0xDDE9, 0xDFE9, 0xDFF1: popsRequested = 1
    default: popsRequested = 0
    }
    if isStackEmpty(0) || isStackEmpty(index) {
      // Unordered is reported even when the invalid-operation exception is unmasked.
      let masked = stackFault(overflow: false)
      if intoFlags {
        setStatusFlags(RFlags.zf | RFlags.pf | RFlags.cf)
      } else {
        fpuStatus |= X87Status.c0 | X87Status.c2 | X87Status.c3
      }
      if masked {
        for _ in 0..<popsRequested { popStack() }
      }
      return
    }
    var frame = csf_x87_frame()
    frame.inputs = 2
    frame.stack.0 = stackValue(0)
    frame.stack.1 = stackValue(index)
    try runOnHost(hostCode, &frame)
    // FCOMI and friends leave C0-C3 unchanged (C1 too, on AMD).
    mergeHostStatus(frame.status, conditionMask: intoFlags ? 0 : X87Status.conditionCodes)
    if intoFlags {
      // ZF, PF, CF from the compare (also with an unmasked exception); OF, SF, AF cleared.
      setStatusFlags(UInt64(frame.flags) & (RFlags.zf | RFlags.pf | RFlags.cf))
    }
    for _ in 0..<(2 - Int(frame.outputs)) { popStack() }
  }

  /// FXCH ST(i).
  private func exchangeStack(_ index: Int) throws(Fault) {
    if isStackEmpty(0) || isStackEmpty(index) {
      guard stackFault(overflow: false) else { return }
      // Masked: empty registers read as the indefinite.
      let top = isStackEmpty(0) ? x87Indefinite : stackValue(0)
      let other = isStackEmpty(index) ? x87Indefinite : stackValue(index)
      setStackValue(0, other)
      setStackValue(index, top)
      return
    }
    let top = stackValue(0)
    let topTag = (fpuTags >> (2 * UInt16(physicalIndex(0)))) & 3
    let otherTag = (fpuTags >> (2 * UInt16(physicalIndex(index)))) & 3
    fpuRegisters[physicalIndex(0)] = stackValue(index)
    fpuRegisters[physicalIndex(index)] = top
    let topShift = 2 * UInt16(physicalIndex(0))
    let otherShift = 2 * UInt16(physicalIndex(index))
    fpuTags = (fpuTags & ~(3 << topShift)) | otherTag << topShift
    fpuTags = (fpuTags & ~(3 << otherShift)) | topTag << otherShift
    fpuStatus &= ~X87Status.c1
  }

  /// FCMOVcc: condition 0 B (CF), 1 E (ZF), 2 BE (CF|ZF), 3 U (PF); `negate` for the DB forms.
  private func conditionalMove(condition: UInt8, negate: Bool, index: Int) throws(Fault) {
    if isStackEmpty(0) || isStackEmpty(index) {
      guard stackFault(overflow: false) else { return }
      setStackValue(0, x87Indefinite)
      return
    }
    let flags = rflags
    var taken: Bool
    switch condition {
    case 0: taken = flags & RFlags.cf != 0
    case 1: taken = flags & RFlags.zf != 0
    case 2: taken = flags & (RFlags.cf | RFlags.zf) != 0
    default: taken = flags & RFlags.pf != 0
    }
    if negate { taken.toggle() }
    if taken { setStackValue(0, stackValue(index)) }
  }

  /// D9 register forms: FLD ST(i), FXCH, FNOP, FCHS, FABS, FTST, FXAM, constants, and the
  /// transcendental / miscellaneous row.
  private func executeD9Register(reg: UInt8, index: Int, modrm: UInt8) throws(Fault) {
    switch reg {
    case 0:  // FLD ST(i): an empty source is reported before a full stack
      if isStackEmpty(index) || !isStackEmpty(7) {
        guard stackFault(overflow: !isStackEmpty(index)) else { return }
        pushStack(x87Indefinite)
        return
      }
      let value = stackValue(index)
      pushStack(value)
      fpuStatus &= ~X87Status.c1
    case 1: try exchangeStack(index)
    case 2:
      guard modrm == 0xD0 else { throw .invalidOpcode }  // FNOP
    case 3:  // FSTP1 (undocumented alias of FSTP ST(i))
      if isStackEmpty(0) {
        guard stackFault(overflow: false) else { return }
        setStackValue(index, x87Indefinite)
      } else {
        setStackValue(index, stackValue(0))
      }
      popStack()
    case 4:
      switch modrm {
      case 0xE0, 0xE1:  // FCHS, FABS
        if isStackEmpty(0) {
          guard stackFault(overflow: false) else { return }
          setStackValue(0, x87Indefinite)
          return
        }
        var bits = stackValue(0).x87Bits
        bits.signAndExponent = modrm == 0xE0 ? bits.signAndExponent ^ 0x8000 : bits.signAndExponent & 0x7FFF
        setStackValue(0, Float80(x87Significand: bits.significand, signAndExponent: bits.signAndExponent))
        fpuStatus &= ~X87Status.c1
      case 0xE4:  // FTST
        if isStackEmpty(0) {
          _ = stackFault(overflow: false)
          fpuStatus |= X87Status.c0 | X87Status.c2 | X87Status.c3
          return
        }
        try hostWindow(code: 0xD9E4, inputs: 1, conditionMask: X87Status.conditionCodes)
      case 0xE5:  // FXAM
        if isStackEmpty(0) {
          let sign = stackValue(0).x87Bits.signAndExponent >> 15
          fpuStatus = (fpuStatus & ~X87Status.conditionCodes) | X87Status.c3 | X87Status.c0 | (sign << 9)
          return
        }
        try hostWindow(code: 0xD9E5, inputs: 1, conditionMask: X87Status.conditionCodes)
      default: throw .invalidOpcode
      }
    case 5:  // FLD1, FLDL2T, FLDL2E, FLDPI, FLDLG2, FLDLN2, FLDZ
      guard modrm != 0xEF else { throw .invalidOpcode }
      if !isStackEmpty(7) {
        guard stackFault(overflow: true) else { return }
        pushStack(x87Indefinite)
        return
      }
      try hostWindow(code: 0xD900 | UInt32(modrm), inputs: 0, conditionMask: X87Status.c1)
    default:
      switch modrm {
      case 0xF6:  // FDECSTP
        fpuTop = (fpuTop &- 1) & 7
        fpuStatus &= ~X87Status.c1
      case 0xF7:  // FINCSTP
        fpuTop = (fpuTop &+ 1) & 7
        fpuStatus &= ~X87Status.c1
      case 0xF0, 0xFA, 0xFC, 0xFE, 0xFF:  // F2XM1, FSQRT, FRNDINT, FSIN, FCOS
        if isStackEmpty(0) {
          if modrm >= 0xFE { fpuStatus &= ~X87Status.c2 }
          guard stackFault(overflow: false) else { return }
          setStackValue(0, x87Indefinite)
          return
        }
        let mask = modrm >= 0xFE ? X87Status.c1 | X87Status.c2 : X87Status.c1
        try hostWindow(code: 0xD900 | UInt32(modrm), inputs: 1, conditionMask: mask)
      case 0xF2, 0xF4, 0xFB:  // FPTAN, FXTRACT, FSINCOS: replace ST(0) and push
        if isStackEmpty(0) || !isStackEmpty(7) {
          if modrm != 0xF4 { fpuStatus &= ~X87Status.c2 }
          guard stackFault(overflow: !isStackEmpty(0)) else { return }
          setStackValue(0, x87Indefinite)
          pushStack(x87Indefinite)
          return
        }
        let mask = modrm == 0xF4 ? X87Status.c1 : X87Status.c1 | X87Status.c2
        try hostWindow(code: 0xD900 | UInt32(modrm), inputs: 1, conditionMask: mask)
      case 0xF1, 0xF3, 0xF9:  // FYL2X, FPATAN, FYL2XP1: ST(1) <- f(ST(1), ST(0)), pop
        if isStackEmpty(0) || isStackEmpty(1) {
          guard stackFault(overflow: false) else { return }
          setStackValue(1, x87Indefinite)
          popStack()
          return
        }
        try hostWindow(code: 0xD900 | UInt32(modrm), inputs: 2, conditionMask: X87Status.c1)
      case 0xF5, 0xF8, 0xFD:  // FPREM1, FPREM, FSCALE: ST(0) <- f(ST(0), ST(1))
        if isStackEmpty(0) || isStackEmpty(1) {
          if modrm != 0xFD { fpuStatus &= ~X87Status.c2 }
          guard stackFault(overflow: false) else { return }
          setStackValue(0, x87Indefinite)
          return
        }
        // FPREM/FPREM1 may leave codes unchanged (invalid operands): preload the guest's.
        if modrm == 0xFD {
          try hostWindow(code: 0xD9FD, inputs: 2, conditionMask: X87Status.c1)
        } else {
          try hostWindow(
            code: 0xD900 | UInt32(modrm), inputs: 2, conditionMask: X87Status.conditionCodes, preload: true)
        }
      default: throw .invalidOpcode
      }
    }
  }

  /// Runs an instruction on ST(0)..ST(inputs-1) and maps the host stack back: the host's
  /// depth change is the guest's push/pop count, then ST(k) <- host ST(k).
  private func hostWindow(
    code: UInt32, inputs: Int, conditionMask: UInt16, preload: Bool = false
  ) throws(Fault) {
    var frame = csf_x87_frame()
    frame.inputs = UInt8(inputs)
    frame.preloadConditionCodes = preload ? 1 : 0
    if inputs >= 1 { frame.stack.0 = stackValue(0) }
    if inputs >= 2 { frame.stack.1 = stackValue(1) }
    try runOnHost(code, &frame)
    mergeHostStatus(frame.status, conditionMask: conditionMask)
    let outputs = Int(frame.outputs)
    if outputs < inputs {
      for _ in 0..<(inputs - outputs) { popStack() }
    } else if outputs > inputs {
      fpuTop = (fpuTop &- (outputs - inputs)) & 7
    }
    if outputs >= 3 { setStackValue(2, frame.stack.2) }
    if outputs >= 2 { setStackValue(1, frame.stack.1) }
    if outputs >= 1 { setStackValue(0, frame.stack.0) }
  }

  // MARK: - Memory forms

  private func executeX87Memory(escape: UInt8, reg: UInt8, address: UInt64) throws(Fault) {
    let hostCode = UInt32(escape) << 8 | UInt32(reg << 3 | 7)
    switch (escape, reg) {
    case (0xDB, 5):  // FLD m80
      let significand = try read64(address)
      let signAndExponent = try read16(address &+ 8)
      if !isStackEmpty(7) {
        guard stackFault(overflow: true) else { return }
        pushStack(x87Indefinite)
        return
      }
      pushStack(Float80(x87Significand: significand, signAndExponent: signAndExponent))
      fpuStatus &= ~X87Status.c1
    case (0xDB, 7):  // FSTP m80
      if isStackEmpty(0) {
        guard stackFault(overflow: false) else { return }
        try write64(address, 0xC000_0000_0000_0000)
        try write16(address &+ 8, 0xFFFF)
        popStack()
        return
      }
      let bits = stackValue(0).x87Bits
      try write64(address, bits.significand)
      try write16(address &+ 8, bits.signAndExponent)
      fpuStatus &= ~X87Status.c1
      popStack()
    case (0xD8, _), (0xDA, _), (0xDC, _), (0xDE, _):
      let size = escape == 0xDC ? 8 : escape == 0xDE ? 2 : 4
      var frame = csf_x87_frame()
      try readX87Operand(address, size: size, into: &frame)
      let isCompare = reg == 2 || reg == 3
      if isStackEmpty(0) {
        let masked = stackFault(overflow: false)
        if isCompare {
          fpuStatus |= X87Status.c0 | X87Status.c2 | X87Status.c3
          if masked && reg == 3 { popStack() }
        } else if masked {
          setStackValue(0, x87Indefinite)
        }
        return
      }
      frame.inputs = 1
      frame.stack.0 = stackValue(0)
      try runOnHost(hostCode, &frame)
      mergeHostStatus(frame.status, conditionMask: isCompare ? X87Status.conditionCodes : X87Status.c1)
      if frame.outputs == 0 {
        popStack()
      } else if !isCompare {
        setStackValue(0, frame.stack.0)
      }
    case (0xD9, 0), (0xDD, 0), (0xDB, 0), (0xDF, 0), (0xDF, 5), (0xDF, 4):
      // FLD m32/m64, FILD m32/m16/m64, FBLD m80
      let size: Int
      switch (escape, reg) {
      case (0xD9, _), (0xDB, _): size = 4
      case (0xDF, 0): size = 2
      case (0xDF, 4): size = 10
      default: size = 8
      }
      var frame = csf_x87_frame()
      try readX87Operand(address, size: size, into: &frame)
      if !isStackEmpty(7) {
        guard stackFault(overflow: true) else { return }
        pushStack(x87Indefinite)
        return
      }
      frame.inputs = 0
      try runOnHost(hostCode, &frame)
      mergeHostStatus(frame.status, conditionMask: X87Status.c1)
      if frame.outputs == 1 { pushStack(frame.stack.0) }
    default:
      // Stores: FST(P) m32/m64, FIST(P) m16/m32/m64, FISTTP m16/m32/m64, FBSTP m80.
      let size: Int
      switch (escape, reg) {
      case (0xD9, _), (0xDB, _): size = 4
      case (0xDF, 6): size = 10
      case (0xDF, 7), (0xDD, _): size = 8
      default: size = 2
      }
      let pops = !(reg == 2)
      if isStackEmpty(0) {
        guard stackFault(overflow: false) else { return }
        try writeIndefinite(address, size: size, isInteger: escape == 0xDB || (escape == 0xDF && reg != 6) || reg == 1)
        if pops { popStack() }
        return
      }
      var frame = csf_x87_frame()
      frame.inputs = 1
      frame.stack.0 = stackValue(0)
      try runOnHost(hostCode, &frame)
      let unmasked =
        frame.status & ~fpuControl & (X87Status.invalid | X87Status.denormal | X87Status.overflow | X87Status.underflow)
      if unmasked == 0 {
        try writeX87Operand(address, size: size, from: frame)
      }
      mergeHostStatus(frame.status, conditionMask: X87Status.c1)
      if frame.outputs == 0 { popStack() }
    }
  }

  private func readX87Operand(_ address: UInt64, size: Int, into frame: inout csf_x87_frame) throws(Fault) {
    var low: UInt64 = 0
    var high: UInt16 = 0
    switch size {
    case 2: low = UInt64(try read16(address))
    case 4: low = UInt64(try read32(address))
    case 8: low = try read64(address)
    default:
      low = try read64(address)
      high = try read16(address &+ 8)
    }
    withUnsafeMutableBytes(of: &frame.memory) { bytes in
      bytes.storeBytes(of: low, as: UInt64.self)
      bytes.storeBytes(of: high, toByteOffset: 8, as: UInt16.self)
    }
  }

  private func writeX87Operand(_ address: UInt64, size: Int, from frame: csf_x87_frame) throws(Fault) {
    var memory = frame.memory
    let (low, high) = withUnsafeBytes(of: &memory) { bytes in
      (bytes.load(as: UInt64.self), bytes.load(fromByteOffset: 8, as: UInt16.self))
    }
    switch size {
    case 2: try write16(address, UInt16(truncatingIfNeeded: low))
    case 4: try write32(address, UInt32(truncatingIfNeeded: low))
    case 8: try write64(address, low)
    default:
      try write64(address, low)
      try write16(address &+ 8, high)
    }
  }

  /// Masked stack-underflow response of a store: the indefinite of the destination format.
  private func writeIndefinite(_ address: UInt64, size: Int, isInteger: Bool) throws(Fault) {
    switch (size, isInteger) {
    case (2, _): try write16(address, 0x8000)
    case (4, true): try write32(address, 0x8000_0000)
    case (4, false): try write32(address, 0xFFC0_0000)
    case (8, true): try write64(address, 0x8000_0000_0000_0000)
    case (8, false): try write64(address, 0xFFF8_0000_0000_0000)
    default:  // packed BCD indefinite
      try write64(address, 0xC000_0000_0000_0000)
      try write16(address &+ 8, 0xFFFF)
    }
  }

  // MARK: - Environment

  /// The full tag word (recomputed from register contents for non-empty registers).
  var fpuFullTags: UInt16 {
    var tags: UInt16 = 0
    for register in 0..<8 {
      let shift = 2 * UInt16(register)
      let tag = (fpuTags >> shift) & 3 == 3 ? 3 : fpuRegisters[register].x87Tag
      tags |= tag << shift
    }
    return tags
  }

  /// FNSTENV layout (protected mode): 28 bytes (`wide`) or 14 bytes (16-bit operand size).
  private func storeEnvironment(at address: UInt64, wide: Bool) throws(Fault) {
    let codeSelector = segments[Int(SegmentIndex.cs)].selector
    let dataSelector = segments[Int(SegmentIndex.ds)].selector
    if wide {
      try write32(address, 0xFFFF_0000 | UInt32(fpuControl))
      try write32(address &+ 4, 0xFFFF_0000 | UInt32(fpuStatusWord))
      try write32(address &+ 8, 0xFFFF_0000 | UInt32(fpuFullTags))
      try write32(address &+ 12, UInt32(truncatingIfNeeded: fpuLastIP))
      try write32(address &+ 16, UInt32(codeSelector) | UInt32(fpuLastOpcode & 0x7FF) << 16)
      try write32(address &+ 20, UInt32(truncatingIfNeeded: fpuLastDP))
      try write32(address &+ 24, 0xFFFF_0000 | UInt32(dataSelector))
    } else {
      try write16(address, fpuControl)
      try write16(address &+ 2, fpuStatusWord)
      try write16(address &+ 4, fpuFullTags)
      try write16(address &+ 6, UInt16(truncatingIfNeeded: fpuLastIP))
      try write16(address &+ 8, codeSelector)
      try write16(address &+ 10, UInt16(truncatingIfNeeded: fpuLastDP))
      try write16(address &+ 12, dataSelector)
    }
  }

  private func loadEnvironment(from address: UInt64, wide: Bool) throws(Fault) {
    let control: UInt16
    let status: UInt16
    let tags: UInt16
    if wide {
      control = try read16(address)
      status = try read16(address &+ 4)
      tags = try read16(address &+ 8)
      fpuLastIP = UInt64(try read32(address &+ 12))
      fpuLastOpcode = UInt16(truncatingIfNeeded: try read32(address &+ 16) >> 16) & 0x7FF
      fpuLastDP = UInt64(try read32(address &+ 20))
    } else {
      control = try read16(address)
      status = try read16(address &+ 2)
      tags = try read16(address &+ 4)
      fpuLastIP = UInt64(try read16(address &+ 6))
      fpuLastDP = UInt64(try read16(address &+ 10))
    }
    fpuControl = control & 0x1F3F | 0x40
    fpuStatus = status & ~0x3800
    fpuTop = Int(status >> 11) & 7
    var newTags: UInt16 = 0
    for register in 0..<8 {
      let shift = 2 * UInt16(register)
      let tag = (tags >> shift) & 3 == 3 ? 3 : fpuRegisters[register].x87Tag
      newTags |= tag << shift
    }
    fpuTags = newTags
    refreshX87Summary()
  }

  /// FNSAVE: environment, then ST(0)-ST(7) as 80-bit values; then FNINIT.
  private func saveState(at address: UInt64, wide: Bool) throws(Fault) {
    try storeEnvironment(at: address, wide: wide)
    let registers = address &+ (wide ? 28 : 14)
    for index in 0..<8 {
      let bits = stackValue(index).x87Bits
      try write64(registers &+ UInt64(10 * index), bits.significand)
      try write16(registers &+ UInt64(10 * index + 8), bits.signAndExponent)
    }
    initializeX87()
  }

  /// FRSTOR: registers first (so the tag recomputation sees them), then the environment.
  private func restoreState(from address: UInt64, wide: Bool) throws(Fault) {
    let registers = address &+ (wide ? 28 : 14)
    let status = try read16(address &+ (wide ? 4 : 2))
    let top = Int(status >> 11) & 7
    var values: (Float80, Float80, Float80, Float80, Float80, Float80, Float80, Float80) = (0, 0, 0, 0, 0, 0, 0, 0)
    try withUnsafeMutableBytes(of: &values) { (raw: UnsafeMutableRawBufferPointer) throws(Fault) in
      let stride = MemoryLayout<Float80>.stride
      for index in 0..<8 {
        let significand = try read64(registers &+ UInt64(10 * index))
        let signAndExponent = try read16(registers &+ UInt64(10 * index + 8))
        raw.storeBytes(of: significand, toByteOffset: stride * index, as: UInt64.self)
        raw.storeBytes(of: signAndExponent, toByteOffset: stride * index + 8, as: UInt16.self)
      }
    }
    try loadEnvironment(from: address, wide: wide)
    withUnsafeBytes(of: &values) { raw in
      for index in 0..<8 {
        fpuRegisters[(top + index) & 7] = raw.load(
          fromByteOffset: MemoryLayout<Float80>.stride * index, as: Float80.self)
      }
    }
    // Recompute the tags of non-empty registers now that the values are in place.
    var tags: UInt16 = 0
    for register in 0..<8 {
      let shift = 2 * UInt16(register)
      let tag = (fpuTags >> shift) & 3 == 3 ? 3 : fpuRegisters[register].x87Tag
      tags |= tag << shift
    }
    fpuTags = tags
  }
}
