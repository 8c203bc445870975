import InterruptControllers
import VMCore

// Control registers (Intel SDM vol. 3 §2.5, vol. 2 MOV CR, CLTS, LMSW, SMSW): reserved-bit
// checks, paging and long-mode switches (CR0.PG with EFER.LME sets EFER.LMA), TLB flushes.

extension CPU {
  /// CR4 bits this CPU implements: VME, PVI, TSD, DE, PSE, PAE, MCE, PGE, PCE, OSFXSR,
  /// OSXMMEXCPT, and OSXSAVE (bit 18). Others are reserved (#GP).
  public static let supportedCR4Bits: UInt64 = 0x7FF | (1 << 18)
  /// EFER bits this CPU implements: SCE, LME, LMA, NXE.
  public static let supportedEFERBits: UInt64 = X86.eferSCE | X86.eferLME | X86.eferLMA | X86.eferNXE

  /// MOV from CRn (0, 2, 3, 4, 8). Requires CPL 0.
  public func readControlRegister(_ number: UInt8) throws(Fault) -> UInt64 {
    guard currentPrivilegeLevel == 0 else { throw .generalProtection(0) }
    switch number {
    case 0: return cr0
    case 2: return cr2
    case 3: return cr3
    case 4: return cr4
    case 8:
      if let apic = system.localAPIC { return UInt64(apic.taskPriority >> 4) }
      return cr8
    default: throw .invalidOpcode
    }
  }

  /// MOV to CRn (0, 2, 3, 4, 8). Requires CPL 0; reserved bits raise #GP(0).
  public func writeControlRegister(_ number: UInt8, _ value: UInt64) throws(Fault) {
    guard currentPrivilegeLevel == 0 else { throw .generalProtection(0) }
    switch number {
    case 0: try writeCR0(value)
    case 2: cr2 = value
    case 3: try writeCR3(value)
    case 4: try writeCR4(value)
    case 8:
      guard value & ~0xF == 0 else { throw .generalProtection(0) }
      cr8 = value
      system.localAPIC?.setTaskPriority(UInt8(value << 4))
      wakeRunLoopIfInterruptPending()
    default: throw .invalidOpcode
    }
  }

  func writeCR0(_ requested: UInt64) throws(Fault) {
    if isLongModeActive && requested >> 32 != 0 { throw .generalProtection(0) }
    // Reserved bits of CR0[31:0] are ignored; ET is hardwired to 1.
    let implemented: UInt64 =
      X86.cr0PE | X86.cr0MP | X86.cr0EM | X86.cr0TS | X86.cr0NE | X86.cr0WP | X86.cr0AM | X86.cr0NW
      | X86.cr0CD | X86.cr0PG
    let value = (requested & implemented) | X86.cr0ET
    if value & X86.cr0PG != 0 && value & X86.cr0PE == 0 { throw .generalProtection(0) }
    if value & X86.cr0NW != 0 && value & X86.cr0CD == 0 { throw .generalProtection(0) }
    let old = cr0
    let enablingPaging = old & X86.cr0PG == 0 && value & X86.cr0PG != 0
    let disablingPaging = old & X86.cr0PG != 0 && value & X86.cr0PG == 0
    var newEFER = efer
    if enablingPaging && efer & X86.eferLME != 0 {
      // Activating IA-32e mode: needs PAE, and not from a 64-bit code segment.
      if cr4 & X86.cr4PAE == 0 { throw .generalProtection(0) }
      if segments[Int(SegmentIndex.cs)].access & SegmentAccess.long != 0 { throw .generalProtection(0) }
      newEFER |= X86.eferLMA
    }
    if disablingPaging && isLongModeActive {
      if is64BitMode { throw .generalProtection(0) }
      newEFER &= ~X86.eferLMA
    }
    cr0 = value
    if newEFER != efer {
      efer = newEFER
      refreshAllSegmentBases()
    }
    let pagingBits = X86.cr0PG | X86.cr0WP | X86.cr0PE
    if (old ^ value) & pagingBits != 0 {
      systemFlushTLB(includingGlobal: true)
      systemModeChanged()
    } else if (old ^ value) & (X86.cr0TS | X86.cr0EM | X86.cr0MP | X86.cr0AM) != 0 {
      systemModeChanged()
    }
  }

  func writeCR3(_ value: UInt64) throws(Fault) {
    if isLongModeActive {
      // No PCID: bits 63:MAXPHYADDR must be clear.
      if value >> system.physicalAddressBits != 0 { throw .generalProtection(0) }
      cr3 = value
    } else {
      cr3 = value & 0xFFFF_FFFF
    }
    systemFlushTLB(includingGlobal: false)
  }

  func writeCR4(_ value: UInt64) throws(Fault) {
    if value & ~Self.supportedCR4Bits != 0 { throw .generalProtection(0) }
    // OSXSAVE is reserved when the CPU model does not offer XSAVE.
    if value & X86.cr4OSXSAVE != 0 && system.cpuidFeatures.leaf1ECX & CPUModel.leaf1ECXXSAVE == 0 {
      throw .generalProtection(0)
    }
    if isLongModeActive && value & X86.cr4PAE == 0 { throw .generalProtection(0) }
    let old = cr4
    cr4 = value
    if (old ^ value) & (X86.cr4PAE | X86.cr4PGE | X86.cr4PSE) != 0 {
      systemFlushTLB(includingGlobal: true)
    }
    if old != value { systemModeChanged() }
  }

  /// Writes IA32_EFER (WRMSR 0xC0000080): LMA is read-only, LME cannot change while paging is
  /// on, NXE changes flush the TLB.
  func writeEFER(_ value: UInt64) throws(Fault) {
    if value & ~Self.supportedEFERBits != 0 { throw .generalProtection(0) }
    if cr0 & X86.cr0PG != 0 && (value ^ efer) & X86.eferLME != 0 { throw .generalProtection(0) }
    let newValue = (value & ~X86.eferLMA) | (efer & X86.eferLMA)
    let old = efer
    efer = newValue
    if (old ^ newValue) & X86.eferNXE != 0 { systemFlushTLB(includingGlobal: true) }
    if old != newValue { systemModeChanged() }
  }

  /// CLTS: clears CR0.TS (CPL 0).
  public func clearTaskSwitched() throws(Fault) {
    guard currentPrivilegeLevel == 0 else { throw .generalProtection(0) }
    cr0 &= ~X86.cr0TS
    systemModeChanged()
  }

  /// LMSW: loads CR0 bits 3:0 (PE cannot be cleared). CPL 0.
  public func loadMachineStatusWord(_ value: UInt16) throws(Fault) {
    guard currentPrivilegeLevel == 0 else { throw .generalProtection(0) }
    var newValue = (cr0 & ~0xE) | UInt64(value & 0xE)
    newValue |= UInt64(value & 1)  // sets PE, never clears it
    try writeCR0(newValue)
  }

  /// MOV from DRn. CPL 0; DR4/DR5 alias DR6/DR7 unless CR4.DE is set (#UD).
  public func readDebugRegister(_ number: UInt8) throws(Fault) -> UInt64 {
    guard currentPrivilegeLevel == 0 else { throw .generalProtection(0) }
    var index = Int(number)
    if index == 4 || index == 5 {
      if cr4 & (1 << 3) != 0 { throw .invalidOpcode }
      index += 2
    }
    guard index < 8 else { throw .invalidOpcode }
    return system.debugRegisters[index]
  }

  /// MOV to DRn: the value is kept; breakpoints are not implemented.
  public func writeDebugRegister(_ number: UInt8, _ value: UInt64) throws(Fault) {
    guard currentPrivilegeLevel == 0 else { throw .generalProtection(0) }
    var index = Int(number)
    if index == 4 || index == 5 {
      if cr4 & (1 << 3) != 0 { throw .invalidOpcode }
      index += 2
    }
    guard index < 8 else { throw .invalidOpcode }
    if index >= 6 && is64BitMode && value >> 32 != 0 { throw .generalProtection(0) }
    switch index {
    case 6: system.debugRegisters[6] = (value & 0xE00F) | 0xFFFF_0FF0
    case 7: system.debugRegisters[7] = (value & 0xFFFF_2BFF) | 0x400
    default: system.debugRegisters[index] = value
    }
  }

  /// INVLPG: drops the translation of the page holding `linear`.
  public func invalidatePage(_ linear: UInt64) throws(Fault) {
    guard currentPrivilegeLevel == 0 else { throw .generalProtection(0) }
    systemFlushTLBPage(linear)
  }
}
