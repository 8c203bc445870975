import InterruptControllers
import VMCore

// Exception and interrupt delivery (Intel SDM vol. 3 ch. 6; AMD APM vol. 2 ch. 8): the real-mode
// IVT, protected-mode IDT gates with stack switches from the TSS, IA-32e 16-byte gates with IST,
// double and triple faults, NMI blocking, interrupt shadows and IRET.

/// What raised an event; decides the DPL check, the EXT bit and the pushed error code.
public enum EventKind: Sendable, Equatable {
  /// A processor-detected exception (fault or trap), pushed with its error code if any.
  case exception
  /// A maskable interrupt from the interrupt controller.
  case external
  /// A non-maskable interrupt.
  case nmi
  /// INT n: the gate's DPL must be >= CPL.
  case software
  /// INT3 and INTO: software exceptions, also checked against the gate's DPL.
  case softwareException
  /// INT1 (ICEBP): not checked against the gate's DPL.
  case privilegedSoftwareException
}

/// Exception classes for the double-fault rules (SDM vol. 3 table 6-5).
enum ExceptionClass {
  case benign
  case contributory
  case pageFault
  case doubleFault

  init(vector: UInt8) {
    switch vector {
    case 0, 10, 11, 12, 13: self = .contributory
    case 14: self = .pageFault
    case 8: self = .doubleFault
    default: self = .benign
    }
  }
}

extension CPU {
  // MARK: Run-loop entry points

  /// Delivers an exception raised by an instruction (the run loop calls this with `rip` at
  /// the faulting instruction, or after it for traps). Applies the double-fault rules; a
  /// fault while delivering a double fault shuts the CPU down (triple fault), which sets
  /// `system.shutdownReason` and requests a stop.
  public func deliverException(_ fault: Fault) {
    var current = fault
    for _ in 0..<4 {
      if current.vector == 14 { cr2 = current.address }
      do {
        try deliverEvent(vector: current.vector, kind: .exception, errorCode: current.errorCode)
        return
      } catch {
        let first = ExceptionClass(vector: current.vector)
        let second = ExceptionClass(vector: error.vector)
        if first == .doubleFault { break }
        if (first == .contributory && second == .contributory) || (first == .pageFault && second != .benign) {
          current = Fault(vector: 8, errorCode: 0)
        } else {
          current = error
        }
      }
    }
    if system.tripleFault == nil { system.tripleFault = (fault.vector, rip) }
    shutDown("triple fault")
  }

  /// Enters the shutdown state: the accelerator resets the machine.
  func shutDown(_ reason: String) {
    if system.shutdownReason == nil { system.shutdownReason = reason }
    system.halted = false
    stopFlag.store(true, ordering: .releasing)
  }

  /// Delivers an event that arrives between instructions (external interrupt, NMI); a fault
  /// while delivering it is delivered as an ordinary exception.
  func deliverAsynchronous(vector: UInt8, kind: EventKind) {
    do {
      try deliverEvent(vector: vector, kind: kind, errorCode: nil)
    } catch {
      deliverException(error)
    }
  }

  /// Whether maskable interrupts are inhibited by STI / MOV SS / POP SS on the current instruction.
  @inline(__always)
  var inInterruptShadow: Bool { rip == system.interruptShadowRIP }

  /// Starts an interrupt shadow for the instruction at `rip` (call after STI, MOV SS, POP SS,
  /// with `rip` already at the next instruction).
  public func beginInterruptShadow() {
    system.interruptShadowRIP = rip
  }

  /// Called between runs of `run` (at a block boundary): takes the highest-priority event
  /// the CPU can accept from its local APIC (INIT, start-up IPI, NMI, maskable interrupt) and
  /// acts on it. Returns true when an event was taken (call again: more may be pending).
  @discardableResult
  public func serviceSystemEvents() -> Bool {
    guard system.shutdownReason == nil, let apic = system.localAPIC else { return false }
    if apic.pendingEvents.isEmpty { return false }
    let shadow = inInterruptShadow
    if !shadow { system.interruptShadowRIP = ~0 }
    let interruptsEnabled = rflags & RFlags.if != 0 && !shadow && !system.waitingForSIPI
    let nmiEnabled = !system.nmiBlocked && !shadow && !system.waitingForSIPI
    guard let event = apic.takeEvent(interruptsEnabled: interruptsEnabled, nmiEnabled: nmiEnabled) else {
      if shadow { system.recheckAfterShadow = true }
      return false
    }
    switch event {
    case .initialize:
      resetForINIT(bootstrap: apic.isBootstrapProcessor)
    case .startup(let vector):
      if system.waitingForSIPI { startAtVector(vector) }
    case .nmi:
      system.halted = false
      deliverAsynchronous(vector: 2, kind: .nmi)
    case .interrupt(let vector):
      system.halted = false
      deliverAsynchronous(vector: vector, kind: .external)
    }
    return true
  }

  /// Whether a halted (or SIPI-waiting) CPU has something to wake up for.
  public func hasWakeupEvent() -> Bool {
    guard let apic = system.localAPIC else { return false }
    let pending = apic.pendingEvents
    if pending.contains(.initialize) || pending.contains(.startup) { return true }
    if system.waitingForSIPI { return false }
    if pending.contains(.nmi) && !system.nmiBlocked { return true }
    return pending.contains(.interrupt) && rflags & RFlags.if != 0
  }

  /// INIT: the processor state after INIT (SDM vol. 3 table 10-1); application processors then
  /// wait for a start-up IPI. The BSP restarts at the reset vector.
  func resetForINIT(bootstrap: Bool) {
    for index in 0..<16 { gpr[index] = 0 }
    rflags = 0x2
    cr0 = 0x6000_0010
    cr2 = 0
    cr3 = 0
    cr4 = 0
    efer = 0
    xcr0 = 1
    for index in 0..<6 {
      var cache = SegmentCache()
      cache.access = index == Int(SegmentIndex.cs) ? 0x9B : 0x93
      segments[index] = cache
    }
    gdtr = DescriptorTableRegister(base: 0, limit: 0xFFFF)
    idtr = DescriptorTableRegister(base: 0, limit: 0xFFFF)
    ldtr = .null(selector: 0)
    tr = SegmentCache()
    tr.access = 0x8B
    system.nmiBlocked = false
    system.halted = false
    system.interruptShadowRIP = ~0
    if bootstrap {
      var cs = segments[Int(SegmentIndex.cs)]
      cs.selector = 0xF000
      cs.base = 0xFFFF_0000
      installCodeSegment(cs, rip: 0xFFF0)
      system.waitingForSIPI = false
    } else {
      installCodeSegment(segments[Int(SegmentIndex.cs)], rip: 0)
      system.waitingForSIPI = true
    }
    systemFlushTLB(includingGlobal: true)
    flushDecodedBlocks()
  }

  /// Start-up IPI: real mode at CS = vector << 8, IP = 0.
  func startAtVector(_ vector: UInt8) {
    var cs = segments[Int(SegmentIndex.cs)]
    cs.selector = UInt16(vector) << 8
    cs.base = UInt64(vector) << 12
    installCodeSegment(cs, rip: 0)
    system.waitingForSIPI = false
    system.halted = false
  }

  // MARK: Delivery

  /// Delivers one event through the IVT/IDT. Throws the fault that prevented delivery (the
  /// state is then unchanged, apart from memory written for a partial frame).
  public func deliverEvent(vector: UInt8, kind: EventKind, errorCode: UInt32?) throws(Fault) {
    let pushedErrorCode = kind == .exception ? errorCode : nil
    if !isProtectedMode {
      try deliverRealMode(vector: vector)
    } else if isLongModeActive {
      try deliverLongMode(vector: vector, kind: kind, errorCode: pushedErrorCode)
    } else {
      try deliverProtectedMode(vector: vector, kind: kind, errorCode: pushedErrorCode)
    }
    if kind == .nmi { system.nmiBlocked = true }
    system.interruptShadowRIP = ~0
    system.halted = false
  }

  /// The RFLAGS image an event pushes: with RF set for fault-class exceptions (SDM vol. 3
  /// 17.3.1.1: every fault except an instruction breakpoint, so that IRET back to the faulting
  /// instruction does not hit its breakpoint again). Not for traps (#DB here is always a trap:
  /// there are no instruction breakpoints; #BP, #OF), aborts (#DF, #MC), NMIs or interrupts.
  static func savedFlags(_ flags: UInt64, vector: UInt8, kind: EventKind) -> UInt64 {
    guard kind == .exception, vector < 32 else { return flags }
    switch vector {
    case 1, 2, 3, 4, 8, 18: return flags
    default: return flags | RFlags.rf
    }
  }

  /// EXT bit of error codes for faults raised while delivering `kind`.
  private func externalBit(_ kind: EventKind) -> UInt32 {
    switch kind {
    case .software, .softwareException: return 0
    default: return 1
    }
  }

  private func deliverRealMode(vector: UInt8) throws(Fault) {
    let offset = UInt64(vector) * 4
    guard offset + 3 <= UInt64(idtr.limit) else { throw .generalProtection(UInt32(vector) * 8 + 2) }
    let entry = try systemRead((idtr.base &+ offset) & 0xFFFF_FFFF, size: 4)
    var stack = StackCursor(cpu: self)
    try stack.push(rflags & 0xFFFF, size: 2, cpl: 0)
    try stack.push(UInt64(segments[Int(SegmentIndex.cs)].selector), size: 2, cpl: 0)
    try stack.push(rip & 0xFFFF, size: 2, cpl: 0)
    stack.commit()
    rflags &= ~(RFlags.if | RFlags.tf | RFlags.ac | RFlags.rf)
    var cache = segments[Int(SegmentIndex.cs)]
    cache.selector = UInt16(truncatingIfNeeded: entry >> 16)
    cache.base = UInt64(cache.selector) << 4
    installCodeSegment(cache, rip: entry & 0xFFFF)
  }

  /// Reads and checks the IDT gate for `vector`: limit, type, DPL for software events, present.
  private func readGate(vector: UInt8, kind: EventKind, size: UInt64) throws(Fault) -> (low: UInt64, high: UInt64) {
    let ext = externalBit(kind)
    let gateCode = UInt32(vector) * 8 + 2 + ext
    let offset = UInt64(vector) * size
    guard offset + size - 1 <= UInt64(idtr.limit) else { throw .generalProtection(gateCode) }
    let address = isLongModeActive ? idtr.base &+ offset : (idtr.base &+ offset) & 0xFFFF_FFFF
    let low = try systemRead(address, size: 8)
    let high = size == 16 ? try systemRead(address &+ 8, size: 8) : 0
    let type = (low >> 40) & 0x1F  // includes S (must be 0)
    let valid: Bool
    if isLongModeActive {
      valid = type == 0xE || type == 0xF
    } else {
      valid = type == 0x6 || type == 0x7 || type == 0xE || type == 0xF
    }
    guard valid else { throw .generalProtection(gateCode) }
    let dpl = UInt8((low >> 45) & 3)
    if (kind == .software || kind == .softwareException) && dpl < currentPrivilegeLevel {
      throw .generalProtection(UInt32(vector) * 8 + 2)
    }
    guard low & (1 << 47) != 0 else { throw .segmentNotPresent(gateCode) }
    return (low, high)
  }

  /// Reads the handler's code segment named by a gate.
  private func gateCodeSegment(_ selector: UInt16, kind: EventKind) throws(Fault) -> SegmentDescriptor {
    let ext = externalBit(kind)
    guard selector & 0xFFFC != 0 else { throw .generalProtection(ext) }
    let descriptor: SegmentDescriptor
    do {
      descriptor = try readDescriptor(selector)
    } catch {
      throw Fault(vector: error.vector, errorCode: error.errorCode.map { $0 | ext }, address: error.address)
    }
    let code = Self.selectorErrorCode(selector) | ext
    guard descriptor.isCode, descriptor.dpl <= currentPrivilegeLevel else { throw .generalProtection(code) }
    guard descriptor.present else { throw .segmentNotPresent(code) }
    return descriptor
  }

  /// Reads `size` bytes at `offset` in the current TSS, checking the TSS limit (#TS).
  private func readTSS(_ offset: UInt64, size: Int) throws(Fault) -> UInt64 {
    guard tr.access & SegmentAccess.unusable == 0, offset + UInt64(size) - 1 <= UInt64(tr.limit) else {
      throw .invalidTSS(Self.selectorErrorCode(tr.selector))
    }
    let address = isLongModeActive ? tr.base &+ offset : (tr.base &+ offset) & 0xFFFF_FFFF
    return try systemRead(address, size: size)
  }

  private func deliverProtectedMode(vector: UInt8, kind: EventKind, errorCode: UInt32?) throws(Fault) {
    let gate = try readGate(vector: vector, kind: kind, size: 8)
    let gateType = (gate.low >> 40) & 0xF
    let is32BitGate = gateType & 8 != 0
    let isTrapGate = gateType & 1 != 0
    let selector = UInt16(truncatingIfNeeded: gate.low >> 16)
    var target = gate.low & 0xFFFF
    if is32BitGate { target |= ((gate.low >> 48) & 0xFFFF) << 16 }
    let descriptor = try gateCodeSegment(selector, kind: kind)
    let cpl = currentPrivilegeLevel
    let newCPL = descriptor.isConforming ? cpl : descriptor.dpl
    var codeCache = descriptor.cache(selector: (selector & 0xFFFC) | UInt16(newCPL))
    codeCache.access |= SegmentAccess.accessed
    guard target <= UInt64(codeCache.limit) else { throw .generalProtection(externalBit(kind)) }
    let size = is32BitGate ? 4 : 2
    let oldSS = UInt64(segments[Int(SegmentIndex.ss)].selector)
    let oldSP = gpr[4]
    let oldFlags = rflags
    let pushedFlags = Self.savedFlags(oldFlags, vector: vector, kind: kind)
    let oldCS = UInt64(segments[Int(SegmentIndex.cs)].selector)

    var stack: StackCursor
    var newSS: SegmentCache?
    if newCPL < cpl {
      // Inter-privilege: new SS:ESP from the TSS for the handler's ring.
      let tssIs32 = tr.access & 8 != 0
      let newSP: UInt64
      let newSSSelector: UInt16
      if tssIs32 {
        newSP = try readTSS(4 + UInt64(newCPL) * 8, size: 4)
        newSSSelector = UInt16(truncatingIfNeeded: try readTSS(8 + UInt64(newCPL) * 8, size: 2))
      } else {
        newSP = try readTSS(2 + UInt64(newCPL) * 4, size: 2)
        newSSSelector = UInt16(truncatingIfNeeded: try readTSS(4 + UInt64(newCPL) * 4, size: 2))
      }
      let ssCode = Self.selectorErrorCode(newSSSelector) | externalBit(kind)
      guard newSSSelector & 0xFFFC != 0 else { throw .invalidTSS(externalBit(kind)) }
      guard UInt8(newSSSelector & 3) == newCPL else { throw .invalidTSS(ssCode) }
      let ssDescriptor: SegmentDescriptor
      do {
        ssDescriptor = try readDescriptor(newSSSelector)
      } catch {
        throw .invalidTSS(ssCode)
      }
      guard ssDescriptor.isWritableData, ssDescriptor.dpl == newCPL else { throw .invalidTSS(ssCode) }
      guard ssDescriptor.present else { throw .stackFault(ssCode) }
      var ssCache = ssDescriptor.cache(selector: newSSSelector)
      ssCache.access |= SegmentAccess.accessed
      newSS = ssCache
      let width = ssCache.access & SegmentAccess.defaultBig != 0 ? 4 : 2
      stack = StackCursor(cpu: self, base: ssCache.base, offset: newSP, width: width)
      try stack.push(oldSS, size: size, cpl: newCPL)
      try stack.push(oldSP, size: size, cpl: newCPL)
    } else {
      stack = StackCursor(cpu: self)
    }
    try stack.push(pushedFlags, size: size, cpl: newCPL)
    try stack.push(oldCS, size: size, cpl: newCPL)
    try stack.push(rip, size: size, cpl: newCPL)
    if let errorCode { try stack.push(UInt64(errorCode), size: size, cpl: newCPL) }

    // Commit.
    if let newSS { setSegment(SegmentIndex.ss, newSS) }
    stack.commit()
    installCodeSegment(codeCache, rip: target)
    var flags = oldFlags & ~(RFlags.tf | RFlags.nt | RFlags.rf | RFlags.vm)
    if !isTrapGate { flags &= ~RFlags.if }
    rflags = flags
  }

  private func deliverLongMode(vector: UInt8, kind: EventKind, errorCode: UInt32?) throws(Fault) {
    let gate = try readGate(vector: vector, kind: kind, size: 16)
    let isTrapGate = (gate.low >> 40) & 1 != 0
    let selector = UInt16(truncatingIfNeeded: gate.low >> 16)
    let target = (gate.low & 0xFFFF) | (((gate.low >> 48) & 0xFFFF) << 16) | ((gate.high & 0xFFFF_FFFF) << 32)
    let ist = Int((gate.low >> 32) & 7)
    let descriptor = try gateCodeSegment(selector, kind: kind)
    guard descriptor.isLong, descriptor.access & SegmentAccess.defaultBig == 0 else {
      throw .generalProtection(Self.selectorErrorCode(selector) | externalBit(kind))
    }
    guard isCanonical(target) else { throw .generalProtection(externalBit(kind)) }
    let cpl = currentPrivilegeLevel
    let newCPL = descriptor.isConforming ? cpl : descriptor.dpl
    var codeCache = descriptor.cache(selector: (selector & 0xFFFC) | UInt16(newCPL))
    codeCache.access |= SegmentAccess.accessed

    var newSP: UInt64
    if ist != 0 {
      newSP = try readTSS(0x24 + UInt64(ist - 1) * 8, size: 8)
    } else if newCPL < cpl {
      newSP = try readTSS(4 + UInt64(newCPL) * 8, size: 8)
    } else {
      newSP = gpr[4]
    }
    guard isCanonical(newSP) else { throw .stackFault(externalBit(kind)) }
    newSP &= ~0xF
    let oldSS = UInt64(segments[Int(SegmentIndex.ss)].selector)
    let oldFlags = rflags
    let oldCS = UInt64(segments[Int(SegmentIndex.cs)].selector)
    let count: UInt64 = errorCode == nil ? 5 : 6
    let frameBase = newSP &- count * 8
    guard isCanonical(frameBase) else { throw .stackFault(externalBit(kind)) }
    try systemProbeWrite(frameBase, size: Int(count) * 8, cpl: newCPL)
    try systemWrite(newSP &- 8, size: 8, oldSS, cpl: newCPL)
    try systemWrite(newSP &- 16, size: 8, gpr[4], cpl: newCPL)
    try systemWrite(newSP &- 24, size: 8, Self.savedFlags(oldFlags, vector: vector, kind: kind), cpl: newCPL)
    try systemWrite(newSP &- 32, size: 8, oldCS, cpl: newCPL)
    try systemWrite(newSP &- 40, size: 8, rip, cpl: newCPL)
    if let errorCode { try systemWrite(newSP &- 48, size: 8, UInt64(errorCode), cpl: newCPL) }

    // Commit.
    if newCPL < cpl {
      setSegment(SegmentIndex.ss, .null(selector: UInt16(newCPL), dpl: newCPL))
    }
    installCodeSegment(codeCache, rip: target)
    gpr[4] = frameBase
    var flags = oldFlags & ~(RFlags.tf | RFlags.nt | RFlags.rf | RFlags.vm)
    if !isTrapGate { flags &= ~RFlags.if }
    rflags = flags
  }

  // MARK: IRET

  /// IRET/IRETD/IRETQ with `operandSize` 2, 4 or 8.
  public func interruptReturn(operandSize: UInt8) throws(Fault) {
    let size = Int(operandSize)
    let cpl = currentPrivilegeLevel
    var stack = StackCursor(cpu: self)
    if !isProtectedMode {
      let newIP = try stack.pop(size: size, cpl: 0)
      let newCS = UInt16(truncatingIfNeeded: try stack.pop(size: size, cpl: 0))
      let newFlags = try stack.pop(size: size, cpl: 0)
      if size == 4 && newIP > 0xFFFF { throw .generalProtection(0) }
      stack.commit()
      var cache = segments[Int(SegmentIndex.cs)]
      cache.selector = newCS
      cache.base = UInt64(newCS) << 4
      installCodeSegment(cache, rip: newIP)
      let writable: UInt64 = size == 2 ? 0xFFFF : 0x3F_7FD5 & ~(RFlags.vm | RFlags.vip | RFlags.vif)
      rflags = (rflags & ~writable) | (newFlags & writable)
      finishInterruptReturn()
      return
    }
    if rflags & RFlags.nt != 0 && !isLongModeActive {
      // Task return through the back link: task switches are not supported.
      throw .generalProtection(0)
    }
    let newIP = try stack.pop(size: size, cpl: cpl)
    let newCS = UInt16(truncatingIfNeeded: try stack.pop(size: size, cpl: cpl))
    let newFlags = try stack.pop(size: size, cpl: cpl)
    if newFlags & RFlags.vm != 0 && size != 2 && cpl == 0 && !isLongModeActive {
      throw .generalProtection(0)  // return to virtual-8086 mode: not supported
    }
    let rpl = UInt8(newCS & 3)
    guard rpl >= cpl else { throw .generalProtection(Self.selectorErrorCode(newCS)) }
    let codeCache = try codeSegmentForReturn(newCS)
    let targetIsLong = isLongCode(codeCache)
    let target = targetIsLong ? newIP : newIP & (size == 2 ? 0xFFFF : 0xFFFF_FFFF)
    try checkCodeTarget(target, codeCache)
    let popsStack = is64BitMode || rpl > cpl
    var newSSCache: SegmentCache?
    var newSP: UInt64 = 0
    if popsStack {
      newSP = try stack.pop(size: size, cpl: cpl)
      let newSS = UInt16(truncatingIfNeeded: try stack.pop(size: size, cpl: cpl))
      newSSCache = try stackSegmentForReturn(newSS, rpl: rpl, targetIsLong: targetIsLong)
    }

    // Commit.
    stack.commit()
    installCodeSegment(codeCache, rip: target)
    if let newSSCache {
      setSegment(SegmentIndex.ss, newSSCache)
      if is64BitMode {
        gpr[4] = newSP
      } else {
        setStackPointer(newSP, size: size)
      }
    }
    applyReturnedFlags(newFlags, size: size, oldCPL: cpl)
    if rpl > cpl { nullifyInaccessibleDataSegments() }
    finishInterruptReturn()
  }

  /// Loads RFLAGS from an IRET frame with the privilege rules: IOPL only at CPL 0, IF only at
  /// CPL <= IOPL, VM/VIF/VIP kept.
  func applyReturnedFlags(_ value: UInt64, size: Int, oldCPL: UInt8) {
    var writable: UInt64 =
      RFlags.status | RFlags.tf | RFlags.df | RFlags.nt | RFlags.rf | RFlags.ac | RFlags.id
    if oldCPL == 0 { writable |= RFlags.iopl }
    let iopl = UInt8((rflags >> 12) & 3)
    if oldCPL <= iopl { writable |= RFlags.if }
    if size == 2 { writable &= 0xFFFF }
    rflags = (rflags & ~writable) | (value & writable)
  }

  private func finishInterruptReturn() {
    system.nmiBlocked = false
    wakeRunLoopIfInterruptPending()
  }
}

extension CPU {
  /// INT n, INT3, INTO, INT1 outside flat test mode (`rip` after the instruction).
  func deliverSoftwareInterrupt(_ op: Op, vector: UInt8) throws(Fault) {
    let kind: EventKind
    switch op {
    case .intN: kind = .software
    case .int1: kind = .privilegedSoftwareException
    default: kind = .softwareException
    }
    try deliverEvent(vector: vector, kind: kind, errorCode: nil)
  }
}
