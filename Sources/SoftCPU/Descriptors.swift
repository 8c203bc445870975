import VMCore

// Segment descriptors and segment-register loads (Intel SDM vol. 3 ch. 3 and 5; vol. 2 MOV,
// POP, LSS, JMP, CALL, RET, LLDT, LTR).

/// Bits of `SegmentCache.access` (VMX access-rights layout).
public enum SegmentAccess {
  public static let typeMask: UInt32 = 0xF
  /// Type bit 0: accessed.
  public static let accessed: UInt32 = 1 << 0
  /// Type bit 1: readable (code) / writable (data).
  public static let readWrite: UInt32 = 1 << 1
  /// Type bit 2: conforming (code) / expand-down (data).
  public static let conformingOrExpandDown: UInt32 = 1 << 2
  /// Type bit 3: code segment.
  public static let code: UInt32 = 1 << 3
  /// S: code or data (not system).
  public static let codeOrData: UInt32 = 1 << 4
  public static let dplShift: UInt32 = 5
  public static let present: UInt32 = 1 << 7
  public static let available: UInt32 = 1 << 12
  public static let long: UInt32 = 1 << 13
  public static let defaultBig: UInt32 = 1 << 14
  public static let granularity: UInt32 = 1 << 15
  public static let unusable: UInt32 = 1 << 16
}

/// An 8-byte segment descriptor as stored in the GDT or LDT.
public struct SegmentDescriptor: Sendable, Equatable {
  /// The raw low 8 bytes.
  public var raw: UInt64
  /// The upper 8 bytes of a 16-byte system descriptor in IA-32e mode (base 63:32).
  public var rawHigh: UInt64 = 0

  public init(raw: UInt64, rawHigh: UInt64 = 0) {
    self.raw = raw
    self.rawHigh = rawHigh
  }

  /// Access rights in the `SegmentCache.access` layout.
  public var access: UInt32 { UInt32(truncatingIfNeeded: (raw >> 40) & 0xF0FF) }
  /// Base address (bits 31:0; plus 63:32 from `rawHigh` for system descriptors in long mode).
  public var base: UInt64 {
    ((raw >> 16) & 0xFF_FFFF) | (((raw >> 56) & 0xFF) << 24) | ((rawHigh & 0xFFFF_FFFF) << 32)
  }
  /// Limit in bytes (scaled by the granularity bit).
  public var limit: UInt32 {
    let raw20 = UInt32(truncatingIfNeeded: (raw & 0xFFFF) | (((raw >> 48) & 0xF) << 16))
    return raw & (1 << 55) != 0 ? (raw20 << 12) | 0xFFF : raw20
  }
  public var type: UInt32 { access & SegmentAccess.typeMask }
  public var isCodeOrData: Bool { access & SegmentAccess.codeOrData != 0 }
  public var isCode: Bool { isCodeOrData && access & SegmentAccess.code != 0 }
  public var isData: Bool { isCodeOrData && access & SegmentAccess.code == 0 }
  public var dpl: UInt8 { UInt8(truncatingIfNeeded: (access >> 5) & 3) }
  public var present: Bool { access & SegmentAccess.present != 0 }
  public var isLong: Bool { access & SegmentAccess.long != 0 }
  public var isConforming: Bool { isCode && access & SegmentAccess.conformingOrExpandDown != 0 }
  /// Readable code or any data segment.
  public var isReadable: Bool { isData || access & SegmentAccess.readWrite != 0 }
  /// Writable data segment.
  public var isWritableData: Bool { isData && access & SegmentAccess.readWrite != 0 }

  /// The descriptor cache contents for `selector`.
  public func cache(selector: UInt16) -> SegmentCache {
    var cache = SegmentCache()
    cache.selector = selector
    cache.base = base
    cache.limit = limit
    cache.access = access
    return cache
  }
}

extension SegmentCache {
  /// A null (unusable) segment with `selector`; `dpl` is kept for SS so CPL stays readable.
  static func null(selector: UInt16, dpl: UInt8 = 0) -> SegmentCache {
    var cache = SegmentCache()
    cache.selector = selector
    cache.base = 0
    cache.limit = 0
    cache.access = SegmentAccess.unusable | (UInt32(dpl) << SegmentAccess.dplShift)
    return cache
  }

  /// Converts the loaders' segment register to the cache layout.
  init(_ register: SegmentRegister) {
    self.init()
    selector = register.selector
    base = register.base
    limit = register.limit
    var rights = UInt32(register.type & 0xF)
    if register.s { rights |= SegmentAccess.codeOrData }
    rights |= UInt32(register.dpl & 3) << SegmentAccess.dplShift
    if register.present { rights |= SegmentAccess.present }
    if register.avl { rights |= SegmentAccess.available }
    if register.l { rights |= SegmentAccess.long }
    if register.db { rights |= SegmentAccess.defaultBig }
    if register.g { rights |= SegmentAccess.granularity }
    if register.unusable || !register.present { rights |= SegmentAccess.unusable }
    access = rights
  }

  /// Converts the cache back to the shared segment-register layout.
  var register: SegmentRegister {
    SegmentRegister(
      selector: selector, base: base, limit: limit, type: UInt8(access & 0xF),
      s: access & SegmentAccess.codeOrData != 0,
      dpl: UInt8((access >> 5) & 3), present: access & SegmentAccess.present != 0,
      db: access & SegmentAccess.defaultBig != 0, l: access & SegmentAccess.long != 0,
      g: access & SegmentAccess.granularity != 0, avl: access & SegmentAccess.available != 0,
      unusable: access & SegmentAccess.unusable != 0)
  }
}

extension CPU {
  /// The error code of a selector fault: the selector with RPL cleared (TI kept).
  @inline(__always)
  static func selectorErrorCode(_ selector: UInt16) -> UInt32 { UInt32(selector & 0xFFFC) }

  /// Linear address of the descriptor for `selector` in the GDT or LDT, after the table-limit
  /// check (`size` 8, or 16 for long-mode system descriptors). Throws #GP(selector).
  func descriptorAddress(_ selector: UInt16, size: UInt64 = 8) throws(Fault) -> UInt64 {
    let offset = UInt64(selector & 0xFFF8)
    let base: UInt64
    let limit: UInt64
    if selector & 4 != 0 {
      let ldt = ldtr
      if ldt.access & SegmentAccess.unusable != 0 || ldt.selector & 0xFFFC == 0 {
        throw .generalProtection(Self.selectorErrorCode(selector))
      }
      base = ldt.base
      limit = UInt64(ldt.limit)
    } else {
      base = gdtr.base
      limit = UInt64(gdtr.limit)
    }
    if offset + size - 1 > limit { throw .generalProtection(Self.selectorErrorCode(selector)) }
    return isLongModeActive ? base &+ offset : (base &+ offset) & 0xFFFF_FFFF
  }

  /// Reads the descriptor for a non-null `selector` (implicit supervisor access).
  func readDescriptor(_ selector: UInt16, systemInLongMode: Bool = false) throws(Fault) -> SegmentDescriptor {
    let wide = systemInLongMode && isLongModeActive
    let address = try descriptorAddress(selector, size: wide ? 16 : 8)
    let raw = try systemRead(address, size: 8)
    let high = wide ? try systemRead(address &+ 8, size: 8) : 0
    return SegmentDescriptor(raw: raw, rawHigh: high)
  }

  /// Sets the accessed bit (type bit 0) of a code/data descriptor in memory, as the CPU does on a load.
  func markDescriptorAccessed(_ selector: UInt16, _ descriptor: SegmentDescriptor) throws(Fault) {
    guard descriptor.raw & (1 << 40) == 0 else { return }
    let address = try descriptorAddress(selector)
    try systemWrite(address &+ 5, size: 1, (descriptor.raw >> 40) | 1)
  }

  /// Installs `cache` in segment register `index` and recomputes the address-generation base.
  func setSegment(_ index: UInt8, _ cache: SegmentCache) {
    segments[Int(index)] = cache
    refreshSegmentBase(index)
    if index == SegmentIndex.ss { refreshStackMask() }
  }

  /// Recomputes `segmentBase[index]` from the cache and the mode: 0 for ES/CS/SS/DS in
  /// 64-bit mode.
  func refreshSegmentBase(_ index: UInt8) {
    if is64BitMode && index < SegmentIndex.fs {
      segmentBase[Int(index)] = 0
    } else {
      segmentBase[Int(index)] = segments[Int(index)].base
    }
  }

  /// Recomputes every segment base (after CS or EFER.LMA changes).
  func refreshAllSegmentBases() {
    for index in 0..<UInt8(6) { refreshSegmentBase(index) }
  }

  /// Loads segment register `index` for MOV Sreg / POP Sreg (the core's entry point).
  func loadSegment(_ index: UInt8, selector: UInt16) throws(Fault) {
    try loadDataSegment(index, selector: selector)
    // MOV SS / POP SS inhibit interrupts for one instruction.
    if index == SegmentIndex.ss { beginInterruptShadow() }
  }

  /// Loads a data segment register (ES, SS, DS, FS, GS) as MOV Sreg, POP Sreg and LDS/LES/LFS/LGS/LSS do.
  public func loadDataSegment(_ index: UInt8, selector: UInt16) throws(Fault) {
    if index == SegmentIndex.cs { throw .invalidOpcode }
    guard isProtectedMode && rflags & RFlags.vm == 0 else {
      // Real mode: only selector and base change.
      var cache = segments[Int(index)]
      cache.selector = selector
      cache.base = UInt64(selector) << 4
      if index == SegmentIndex.ss { cache.access &= ~(3 << SegmentAccess.dplShift) }
      setSegment(index, cache)
      return
    }
    let cpl = currentPrivilegeLevel
    let rpl = UInt8(selector & 3)
    if selector & 0xFFFC == 0 {
      if index == SegmentIndex.ss {
        // A null SS is allowed only in 64-bit mode below ring 3, with RPL = CPL.
        guard is64BitMode && cpl != 3 && rpl == cpl else { throw .generalProtection(0) }
        setSegment(index, .null(selector: selector, dpl: cpl))
      } else {
        setSegment(index, .null(selector: selector))
      }
      return
    }
    let descriptor = try readDescriptor(selector)
    let code = Self.selectorErrorCode(selector)
    if index == SegmentIndex.ss {
      guard rpl == cpl, descriptor.isWritableData, descriptor.dpl == cpl else { throw .generalProtection(code) }
      guard descriptor.present else { throw .stackFault(code) }
    } else {
      guard descriptor.isReadable else { throw .generalProtection(code) }
      if !descriptor.isConforming {
        guard rpl <= descriptor.dpl && cpl <= descriptor.dpl else { throw .generalProtection(code) }
      }
      guard descriptor.present else { throw .segmentNotPresent(code) }
    }
    try markDescriptorAccessed(selector, descriptor)
    var cache = descriptor.cache(selector: selector)
    cache.access |= SegmentAccess.accessed
    setSegment(index, cache)
  }

  /// Validates a code-segment descriptor for a far JMP/CALL (same privilege; call gates and
  /// task switches are not supported: #GP). Returns the cache to install with RPL = CPL.
  func codeSegmentForFarTransfer(_ selector: UInt16) throws(Fault) -> SegmentCache {
    if !isProtectedMode || rflags & RFlags.vm != 0 {
      var cache = segments[Int(SegmentIndex.cs)]
      cache.selector = selector
      cache.base = UInt64(selector) << 4
      return cache
    }
    if selector & 0xFFFC == 0 { throw .generalProtection(0) }
    let descriptor = try readDescriptor(selector)
    let code = Self.selectorErrorCode(selector)
    let cpl = currentPrivilegeLevel
    guard descriptor.isCode else { throw .generalProtection(code) }
    if descriptor.isConforming {
      guard descriptor.dpl <= cpl else { throw .generalProtection(code) }
    } else {
      guard UInt8(selector & 3) <= cpl && descriptor.dpl == cpl else { throw .generalProtection(code) }
    }
    guard descriptor.present else { throw .segmentNotPresent(code) }
    if isLongModeActive && descriptor.isLong && descriptor.access & SegmentAccess.defaultBig != 0 {
      throw .generalProtection(code)
    }
    try markDescriptorAccessed(selector, descriptor)
    var cache = descriptor.cache(selector: (selector & 0xFFFC) | UInt16(cpl))
    cache.access |= SegmentAccess.accessed
    return cache
  }

  /// Installs a new CS (and the instruction pointer) after a far transfer.
  func installCodeSegment(_ cache: SegmentCache, rip newRIP: UInt64) {
    segments[Int(SegmentIndex.cs)] = cache
    rip = newRIP
    let inProtectedMode = isProtectedMode && rflags & RFlags.vm == 0
    setPrivilegeLevel(inProtectedMode ? UInt8(cache.selector & 3) : 0)
  }

  /// Whether `cache` is a 64-bit code segment in IA-32e mode.
  func isLongCode(_ cache: SegmentCache) -> Bool {
    isLongModeActive && cache.access & SegmentAccess.long != 0
  }

  /// Far JMP to `selector:offset`.
  public func farJump(selector: UInt16, offset: UInt64, operandSize: UInt8) throws(Fault) {
    let cache = try codeSegmentForFarTransfer(selector)
    let target = isLongCode(cache) ? offset : (operandSize == 2 ? offset & 0xFFFF : offset & 0xFFFF_FFFF)
    try checkCodeTarget(target, cache)
    installCodeSegment(cache, rip: target)
  }

  /// Far CALL to `selector:offset`: pushes CS and the return address with `operandSize`.
  public func farCall(selector: UInt16, offset: UInt64, operandSize: UInt8) throws(Fault) {
    let cache = try codeSegmentForFarTransfer(selector)
    let target = isLongCode(cache) ? offset : (operandSize == 2 ? offset & 0xFFFF : offset & 0xFFFF_FFFF)
    try checkCodeTarget(target, cache)
    let size = Int(operandSize)
    var stack = StackCursor(cpu: self)
    try stack.push(UInt64(segments[Int(SegmentIndex.cs)].selector), size: size, cpl: currentPrivilegeLevel)
    try stack.push(rip, size: size, cpl: currentPrivilegeLevel)
    stack.commit()
    installCodeSegment(cache, rip: target)
  }

  /// Far RET (RETF imm16): pops the return address and CS, and SS:RSP on a return to an outer
  /// privilege level.
  public func farReturn(popBytes: UInt16, operandSize: UInt8) throws(Fault) {
    let size = Int(operandSize)
    var stack = StackCursor(cpu: self)
    let cpl = currentPrivilegeLevel
    let newIP = try stack.pop(size: size, cpl: cpl)
    let newCS = UInt16(truncatingIfNeeded: try stack.pop(size: size, cpl: cpl))
    if !isProtectedMode || rflags & RFlags.vm != 0 {
      stack.offset &+= UInt64(popBytes)
      stack.commit()
      var cache = segments[Int(SegmentIndex.cs)]
      cache.selector = newCS
      cache.base = UInt64(newCS) << 4
      installCodeSegment(cache, rip: size == 2 ? newIP & 0xFFFF : newIP & 0xFFFF_FFFF)
      return
    }
    let rpl = UInt8(newCS & 3)
    if rpl < cpl { throw .generalProtection(Self.selectorErrorCode(newCS)) }
    let cache = try codeSegmentForReturn(newCS)
    let target = isLongCode(cache) ? newIP : newIP & (size == 2 ? 0xFFFF : 0xFFFF_FFFF)
    try checkCodeTarget(target, cache)
    if rpl == cpl {
      stack.offset &+= UInt64(popBytes)
      stack.commit()
      installCodeSegment(cache, rip: target)
      return
    }
    // Return to an outer level: skip the parameters, then pop RSP and SS.
    stack.offset &+= UInt64(popBytes)
    let newSP = try stack.pop(size: size, cpl: cpl)
    let newSS = UInt16(truncatingIfNeeded: try stack.pop(size: size, cpl: cpl))
    let ssCache = try stackSegmentForReturn(newSS, rpl: rpl, targetIsLong: isLongCode(cache))
    installCodeSegment(cache, rip: target)
    setSegment(SegmentIndex.ss, ssCache)
    setStackPointer(newSP &+ UInt64(popBytes), size: size)
    nullifyInaccessibleDataSegments()
  }

  /// Validates the CS of a far return or IRET to privilege `selector & 3`.
  func codeSegmentForReturn(_ selector: UInt16) throws(Fault) -> SegmentCache {
    if selector & 0xFFFC == 0 { throw .generalProtection(0) }
    let descriptor = try readDescriptor(selector)
    let code = Self.selectorErrorCode(selector)
    let rpl = UInt8(selector & 3)
    guard descriptor.isCode else { throw .generalProtection(code) }
    if descriptor.isConforming {
      guard descriptor.dpl <= rpl else { throw .generalProtection(code) }
    } else {
      guard descriptor.dpl == rpl else { throw .generalProtection(code) }
    }
    guard descriptor.present else { throw .segmentNotPresent(code) }
    if isLongModeActive && descriptor.isLong && descriptor.access & SegmentAccess.defaultBig != 0 {
      throw .generalProtection(code)
    }
    try markDescriptorAccessed(selector, descriptor)
    var cache = descriptor.cache(selector: selector)
    cache.access |= SegmentAccess.accessed
    return cache
  }

  /// Validates the SS popped by a return to privilege `rpl`. A null SS is accepted when
  /// returning to a 64-bit code segment below ring 3.
  func stackSegmentForReturn(_ selector: UInt16, rpl: UInt8, targetIsLong: Bool) throws(Fault) -> SegmentCache {
    if selector & 0xFFFC == 0 {
      guard targetIsLong && rpl != 3 && UInt8(selector & 3) == rpl else { throw .generalProtection(0) }
      return .null(selector: selector, dpl: rpl)
    }
    let code = Self.selectorErrorCode(selector)
    guard UInt8(selector & 3) == rpl else { throw .generalProtection(code) }
    let descriptor = try readDescriptor(selector)
    guard descriptor.isWritableData, descriptor.dpl == rpl else { throw .generalProtection(code) }
    guard descriptor.present else { throw .stackFault(code) }
    try markDescriptorAccessed(selector, descriptor)
    var cache = descriptor.cache(selector: selector)
    cache.access |= SegmentAccess.accessed
    return cache
  }

  /// After a return to an outer privilege level, data segment registers that the new CPL may
  /// not use become null (SDM RET/IRET: DS, ES, FS, GS with DPL < CPL and not conforming code).
  func nullifyInaccessibleDataSegments() {
    let cpl = currentPrivilegeLevel
    for index in [SegmentIndex.es, SegmentIndex.ds, SegmentIndex.fs, SegmentIndex.gs] {
      let cache = segments[Int(index)]
      if cache.access & SegmentAccess.unusable != 0 { continue }
      let dpl = UInt8((cache.access >> 5) & 3)
      let isConformingCode = cache.access & 0x1C == 0x1C
      if dpl < cpl && !isConformingCode {
        // In 64-bit mode the FS/GS bases stay (they come from MSRs); the selector is cleared.
        var null = SegmentCache.null(selector: 0)
        if is64BitMode { null.base = cache.base }
        setSegment(index, null)
      }
    }
  }

  /// #GP(0) when `target` is outside the new code segment (limit in legacy modes, canonical in 64-bit mode).
  func checkCodeTarget(_ target: UInt64, _ cache: SegmentCache) throws(Fault) {
    if isLongCode(cache) {
      if !isCanonical(target) { throw .generalProtection(0) }
    } else if isProtectedMode && target > UInt64(cache.limit) {
      throw .generalProtection(0)
    }
  }

  /// Stack-pointer width of the current stack: 8 in 64-bit mode, else SS.B.
  var stackAddressSize: Int {
    if is64BitMode { return 8 }
    return segments[Int(SegmentIndex.ss)].access & SegmentAccess.defaultBig != 0 ? 4 : 2
  }

  /// Writes RSP with the current stack width (SP, ESP zero-extended, or RSP).
  func setStackPointer(_ value: UInt64, size: Int) {
    switch stackAddressSize {
    case 2: gpr[4] = (gpr[4] & ~0xFFFF) | (value & 0xFFFF)
    case 4: gpr[4] = value & 0xFFFF_FFFF
    default: gpr[4] = value
    }
  }

  // MARK: LLDT, LTR, LAR, LSL, VERR, VERW

  /// LLDT: loads LDTR from a GDT descriptor of type 2 (16-byte in IA-32e mode).
  public func loadLocalDescriptorTable(selector: UInt16) throws(Fault) {
    guard isProtectedMode && rflags & RFlags.vm == 0 else { throw .invalidOpcode }
    guard currentPrivilegeLevel == 0 else { throw .generalProtection(0) }
    if selector & 0xFFFC == 0 {
      ldtr = .null(selector: selector)
      return
    }
    let code = Self.selectorErrorCode(selector)
    guard selector & 4 == 0 else { throw .generalProtection(code) }
    let descriptor = try readDescriptor(selector, systemInLongMode: true)
    guard !descriptor.isCodeOrData, descriptor.type == 2 else { throw .generalProtection(code) }
    guard descriptor.present else { throw .segmentNotPresent(code) }
    if isLongModeActive && !isCanonical(descriptor.base) { throw .generalProtection(code) }
    ldtr = descriptor.cache(selector: selector)
  }

  /// LTR: loads TR from an available TSS descriptor and marks it busy.
  public func loadTaskRegister(selector: UInt16) throws(Fault) {
    guard isProtectedMode && rflags & RFlags.vm == 0 else { throw .invalidOpcode }
    guard currentPrivilegeLevel == 0 else { throw .generalProtection(0) }
    let code = Self.selectorErrorCode(selector)
    guard selector & 0xFFFC != 0 else { throw .generalProtection(0) }
    guard selector & 4 == 0 else { throw .generalProtection(code) }
    let descriptor = try readDescriptor(selector, systemInLongMode: true)
    let available = isLongModeActive ? descriptor.type == 9 : (descriptor.type == 9 || descriptor.type == 1)
    guard !descriptor.isCodeOrData, available else { throw .generalProtection(code) }
    guard descriptor.present else { throw .segmentNotPresent(code) }
    if isLongModeActive && !isCanonical(descriptor.base) { throw .generalProtection(code) }
    let address = try descriptorAddress(selector)
    try systemWrite(address &+ 5, size: 1, (descriptor.raw >> 40) | 2)
    var cache = descriptor.cache(selector: selector)
    cache.access |= 2
    tr = cache
  }

  /// LAR/LSL/VERR/VERW helper: the descriptor for `selector` if it is visible at the current
  /// privilege (returns nil instead of faulting, as those instructions clear ZF).
  func visibleDescriptor(_ selector: UInt16, forLimit: Bool) -> SegmentDescriptor? {
    guard selector & 0xFFFC != 0 else { return nil }
    guard let descriptor = try? readDescriptor(selector) else { return nil }
    if descriptor.isCodeOrData {
      if !descriptor.isConforming {
        let cpl = currentPrivilegeLevel
        if descriptor.dpl < cpl || descriptor.dpl < UInt8(selector & 3) { return nil }
      }
      return descriptor
    }
    let type = descriptor.type
    let valid: Bool
    if isLongModeActive {
      valid = type == 2 || type == 9 || type == 0xB || (!forLimit && type == 0xC)
    } else {
      valid = [1, 2, 3, 9, 0xB].contains(type) || (!forLimit && [4, 5, 0xC].contains(type))
    }
    guard valid else { return nil }
    let cpl = currentPrivilegeLevel
    if descriptor.dpl < cpl || descriptor.dpl < UInt8(selector & 3) { return nil }
    return descriptor
  }
}

/// Pushes and pops on SS:RSP without committing RSP until `commit()`, so a fault in the
/// middle of a multi-part frame leaves RSP unchanged.
struct StackCursor {
  unowned(unsafe) let cpu: CPU
  /// The stack offset (RSP/ESP/SP) being built.
  var offset: UInt64
  /// SS base used for the linear address.
  var base: UInt64
  /// Stack-address width in bytes (2, 4 or 8).
  var width: Int

  init(cpu: CPU) {
    self.cpu = cpu
    offset = cpu.gpr[4]
    base = cpu.segmentBase[Int(SegmentIndex.ss)]
    width = cpu.stackAddressSize
  }

  init(cpu: CPU, base: UInt64, offset: UInt64, width: Int) {
    self.cpu = cpu
    self.base = base
    self.offset = offset
    self.width = width
  }

  @inline(__always)
  private func wrap(_ value: UInt64) -> UInt64 {
    switch width {
    case 2: return value & 0xFFFF
    case 4: return value & 0xFFFF_FFFF
    default: return value
    }
  }

  private func linear(_ value: UInt64) -> UInt64 {
    let address = base &+ wrap(value)
    return width == 8 ? address : address & 0xFFFF_FFFF
  }

  mutating func push(_ value: UInt64, size: Int, cpl: UInt8) throws(Fault) {
    let newOffset = wrap(offset &- UInt64(size))
    let address = linear(newOffset)
    if width == 8 && !cpu.isCanonical(address) { throw .stackFault(0) }
    try cpu.systemWrite(address, size: size, value, cpl: cpl)
    offset = newOffset
  }

  mutating func pop(size: Int, cpl: UInt8) throws(Fault) -> UInt64 {
    let address = linear(offset)
    if width == 8 && !cpu.isCanonical(address) { throw .stackFault(0) }
    let value = try cpu.systemRead(address, size: size, cpl: cpl)
    offset = wrap(offset &+ UInt64(size))
    return value
  }

  /// Writes the new stack pointer back to RSP with the stack width.
  func commit() {
    switch width {
    case 2: cpu.gpr[4] = (cpu.gpr[4] & ~0xFFFF) | (offset & 0xFFFF)
    case 4: cpu.gpr[4] = offset & 0xFFFF_FFFF
    default: cpu.gpr[4] = offset
    }
  }
}
