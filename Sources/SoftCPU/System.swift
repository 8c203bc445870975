import InterruptControllers
import VMCore

// Part 2 of the software CPU: the system architecture (paging, segmentation, exception and
// interrupt delivery, control registers, MSRs). This file holds the per-CPU system state and
// the supervisor-mode memory accessors used by descriptor-table, TSS and stack-frame accesses.
//
// Integration with the core (see docs/softcpu-integration.md):
// - `CPU.system` (one stored property in CPU.swift) holds a `SystemState`.
// - The TLB calls `translateSlow` on a miss (Paging.swift).
// - Interrupt controllers raise the core's `stopFlag` (`requestStop()`), so `run` returns at
//   the next block boundary; the accelerator's loop then calls `serviceSystemEvents()`
//   (InterruptDelivery.swift), which delivers what is pending, and re-enters `run`.
// - Faults that escape an instruction go to `deliverException(_:)`.

/// Kind of memory access being translated.
public enum MemoryAccessKind: UInt8, Sendable {
  case read = 0
  case write = 1
  case execute = 2
}

/// Per-CPU system-architecture state that the architectural registers in `CPU` do not cover.
public final class SystemState: @unchecked Sendable {
  /// This CPU's local APIC (nil in unit tests: no external interrupts, CR8 and the TSC
  /// deadline are kept locally).
  public var localAPIC: LocalAPIC?

  /// Interrupts are inhibited while `rip` equals this value (the instruction after STI, MOV SS
  /// or POP SS).
  public var interruptShadowRIP: UInt64 = ~0
  /// An NMI is being handled: further NMIs are held until IRET.
  public var nmiBlocked = false
  /// The CPU executed HLT and waits for an interrupt.
  public var halted = false
  /// The CPU is in the wait-for-SIPI state (application processors before INIT/SIPI).
  public var waitingForSIPI = false
  /// Set when the CPU shut down (triple fault); the accelerator resets the machine.
  public var shutdownReason: String?
  /// For a triple fault: the exception first raised and the RIP it was raised at.
  public var tripleFault: (vector: UInt8, rip: UInt64)?
  /// An interrupt became deliverable inside an interrupt shadow: run one instruction, then
  /// service events again.
  public var recheckAfterShadow = false

  /// The CPUID features this CPU presents (its machine's CPU model; every feature the
  /// software CPU implements by default). CPUID reports them; XSETBV, CR4.OSXSAVE, RDTSCP,
  /// RDPID and 1 GiB pages refuse what they leave out.
  public var cpuidFeatures: CPUIDFeatures = CPUModel.implemented

  /// Physical-address width reported by CPUID 0x80000008 and enforced by the page walker.
  public let physicalAddressBits: UInt64 = 40

  /// MTRRs and other accept-and-keep MSRs, by MSR number.
  public var storedMSRs: [UInt32: UInt64] = [:]
  /// IA32_MISC_ENABLE (fast strings enabled).
  public var miscEnable: UInt64 = 1
  /// IA32_TSC_DEADLINE when no interrupt source is attached.
  public var tscDeadlineValue: UInt64 = 0
  /// Debug registers DR0-DR7 (kept, no breakpoints).
  public var debugRegisters: [UInt64] = [0, 0, 0, 0, 0xFFFF_0FF0, 0x400, 0xFFFF_0FF0, 0x400]
  /// Virtual-time source for the TSC; nil uses the host monotonic clock.
  public var clock: (any MachineClock)?
  /// TSC frequency in kHz (also reported through CPUID 0x40000010).
  public var tscKilohertz: UInt64 = 1_000_000
  /// APIC ID of this CPU.
  public var apicID: UInt32 = 0
  /// The machine's processor topology (CPUID leaves 1, 0BH and 8000_0008), as KVM presents it.
  public var topology = CPUTopology(cpuCount: 1)
  /// A large-page translation may be in the TLB (INVLPG must drop every piece of it).
  var largePagesCached = false
  /// AMD's legacy performance counters (PerformanceCounters.swift).
  var performanceCounters = PerformanceCounterState()
  /// The physical page of this CPU's local APIC when it is enabled at a base other than the
  /// default 0xFEE00000 (the bus decodes the default page); all ones otherwise.
  var relocatedAPICPage = UInt64.max

  public init() {}

}

extension CPU {
  /// Current privilege level (the core's `cpl`: CS.RPL in protected mode, 0 in real mode).
  @inline(__always)
  public var currentPrivilegeLevel: UInt8 { cpl }

  /// Protected mode (CR0.PE) is on.
  @inline(__always) var isProtectedMode: Bool { cr0 & X86.cr0PE != 0 }
  /// IA-32e mode is active (EFER.LMA).
  @inline(__always) var isLongModeActive: Bool { efer & X86.eferLMA != 0 }
  /// 64-bit mode: IA-32e mode with CS.L set.
  @inline(__always) var is64BitMode: Bool {
    efer & X86.eferLMA != 0 && segments[Int(SegmentIndex.cs)].access & SegmentAccess.long != 0
  }

  // MARK: Hooks into the core (TLB, decoded blocks, cached mode)

  /// Flushes the core's software TLB: everything, or (`includingGlobal` false, a CR3 write)
  /// all but the entries of global translations. Large pages may stay cached in the latter.
  func systemFlushTLB(includingGlobal: Bool) {
    statistics.fullTLBFlushes += 1
    if includingGlobal {
      flushTLB()
      system.largePagesCached = false
    } else {
      flushNonGlobalTLB()
    }
  }

  /// Flushes the TLB entries of the page holding `linear` (INVLPG), whatever their size: the
  /// core's TLB holds 4 KiB pieces of large pages, so when large pages were cached every piece
  /// of the surrounding 1 GiB region is dropped.
  func systemFlushTLBPage(_ linear: UInt64) {
    statistics.pageTLBFlushes += 1
    flushTLBPage(linear)
    guard system.largePagesCached else { return }
    let regionMask: UInt64 = ~((1 << 30) - 1)
    let region = linear & regionMask
    for table in [readTLB, writeTLB, fetchTLB] {
      for index in 0..<tlbSlots where table[index].tag != tlbInvalidTag {
        if table[index].tag & regionMask == region { table[index] = TLBEntry() }
      }
    }
  }

  /// Re-derives the core's cached mode after CS, CPL, CR0, CR4 or EFER changed: the default
  /// code size (part of the decoded-block key), the TLB privilege tag and the segment bases.
  func systemModeChanged() {
    let cs = segments[Int(SegmentIndex.cs)].access
    if efer & X86.eferLMA != 0 && cs & SegmentAccess.long != 0 {
      codeSize = 8
    } else {
      codeSize = cs & SegmentAccess.defaultBig != 0 ? 4 : 2
    }
    tlbTagExtra = (tlbTagExtra & ~tlbUserTagBits) | (cpl == 3 ? tlbUserTagBits : 0)
    refreshAllSegmentBases()
    refreshStackMask()
  }

  /// Re-derives the core's `stackMask` from the mode and SS.B (after SS loads and mode changes).
  @inline(__always)
  func refreshStackMask() {
    if codeSize == 8 {
      stackMask = ~0
    } else {
      stackMask = segments[Int(SegmentIndex.ss)].access & SegmentAccess.defaultBig != 0 ? 0xFFFF_FFFF : 0xFFFF
    }
  }

  /// Sets the CPL (after a CS load) and re-derives the cached mode.
  func setPrivilegeLevel(_ level: UInt8) {
    cpl = level
    systemModeChanged()
  }

  /// The TLB-miss hook: walks the page tables (the core's `translate` calls this with paging on).
  @inline(__always)
  func translatePaged(_ linear: UInt64, access: MemoryAccess) throws(Fault) -> UInt64 {
    let kind: MemoryAccessKind
    switch access {
    case .read: kind = .read
    case .write: kind = .write
    case .execute: kind = .execute
    }
    let translation = try translateSlow(linear, access: kind, cpl: cpl)
    if translation.pageSize > 4096 { system.largePagesCached = true }
    lastTranslationGlobal = translation.global
    return translation.physicalPage | (linear & 0xFFF)
  }

  // MARK: Supervisor-mode linear memory access (descriptor tables, TSS, IDT, stack frames)

  /// Translates `linear` for a system access, without going through (or filling) the TLB but
  /// through a small cache of its own (`systemTranslations`, keyed by page, access kind and
  /// privilege, emptied whenever the TLB is): every interrupt reads the IDT and TSS and pushes
  /// a frame, and each of those walked the page tables.
  @inline(__always)
  func systemPhysicalAddress(_ linear: UInt64, access: MemoryAccessKind, cpl: UInt8) throws(Fault) -> UInt64 {
    if cr0 & X86.cr0PG == 0 { return isLongModeActive ? linear : linear & 0xFFFF_FFFF }
    let linear = isLongModeActive ? linear : linear & 0xFFFF_FFFF
    let page = linear & ~0xFFF
    let tag = page | UInt64(access.rawValue) << 2 | UInt64(cpl & 3)
    let slot = tlbIndex(linear) & (systemTranslationEntries - 1)
    let entry = systemTranslations[slot]
    if entry.tag == tag { return linear &+ entry.delta }
    let translation = try translateSlow(linear, access: access, cpl: cpl)
    systemTranslations[slot] = TLBEntry(tag: tag, delta: translation.physicalPage &- page)
    return translation.physicalPage | (linear & 0xFFF)
  }

  func systemReadPhysicalByte(_ physical: UInt64) -> UInt8 {
    if let pointer = memory.hostPointer(physical) { return pointer.load(as: UInt8.self) }
    return UInt8(truncatingIfNeeded: bus.mmioRead(physical, size: 1))
  }

  func systemWritePhysicalByte(_ physical: UInt64, _ value: UInt8) {
    if let pointer = memory.hostPointer(physical) {
      pointer.storeBytes(of: value, as: UInt8.self)
      systemNoteWrite(physical, size: 1)
    } else {
      bus.mmioWrite(physical, size: 1, value: UInt64(value))
    }
  }

  /// Reads `size` (1-8) bytes at `linear` with the privilege of `cpl` (0 for implicit
  /// supervisor accesses).
  func systemRead(_ linear: UInt64, size: Int, cpl: UInt8 = 0) throws(Fault) -> UInt64 {
    let first = try systemPhysicalAddress(linear, access: .read, cpl: cpl)
    if Int(linear & 0xFFF) + size <= 4096 {
      if let pointer = memory.hostPointer(first, length: UInt64(size)) {
        switch size {
        case 1: return UInt64(pointer.load(as: UInt8.self))
        case 2: return UInt64(UInt16(littleEndian: pointer.loadUnaligned(as: UInt16.self)))
        case 4: return UInt64(UInt32(littleEndian: pointer.loadUnaligned(as: UInt32.self)))
        case 8: return UInt64(littleEndian: pointer.loadUnaligned(as: UInt64.self))
        default: break
        }
      }
      var value: UInt64 = 0
      for index in 0..<size {
        value |= UInt64(systemReadPhysicalByte(first &+ UInt64(index))) << (8 * UInt64(index))
      }
      return value
    }
    let second = try systemPhysicalAddress((linear | 0xFFF) &+ 1, access: .read, cpl: cpl)
    let firstCount = 4096 - Int(linear & 0xFFF)
    var value: UInt64 = 0
    for index in 0..<size {
      let physical = index < firstCount ? first &+ UInt64(index) : second &+ UInt64(index - firstCount)
      value |= UInt64(systemReadPhysicalByte(physical)) << (8 * UInt64(index))
    }
    return value
  }

  /// Translates both pages of a `size`-byte write at `linear` so that a multi-part frame can
  /// be checked before any byte is written.
  func systemProbeWrite(_ linear: UInt64, size: Int, cpl: UInt8) throws(Fault) {
    _ = try systemPhysicalAddress(linear, access: .write, cpl: cpl)
    if Int(linear & 0xFFF) + size > 4096 {
      _ = try systemPhysicalAddress((linear | 0xFFF) &+ 1, access: .write, cpl: cpl)
    }
  }

  /// Writes the low `size` (1-8) bytes of `value` at `linear` with the privilege of `cpl`.
  func systemWrite(_ linear: UInt64, size: Int, _ value: UInt64, cpl: UInt8 = 0) throws(Fault) {
    let first = try systemPhysicalAddress(linear, access: .write, cpl: cpl)
    if Int(linear & 0xFFF) + size <= 4096 {
      if let pointer = memory.hostPointer(first, length: UInt64(size)) {
        switch size {
        case 1: pointer.storeBytes(of: UInt8(truncatingIfNeeded: value), as: UInt8.self)
        case 2: pointer.storeBytes(of: UInt16(truncatingIfNeeded: value).littleEndian, as: UInt16.self)
        case 4: pointer.storeBytes(of: UInt32(truncatingIfNeeded: value).littleEndian, as: UInt32.self)
        default: pointer.storeBytes(of: value.littleEndian, as: UInt64.self)
        }
        systemNoteWrite(first, size: size)
        return
      }
      for index in 0..<size {
        systemWritePhysicalByte(first &+ UInt64(index), UInt8(truncatingIfNeeded: value >> (8 * UInt64(index))))
      }
      return
    }
    let second = try systemPhysicalAddress((linear | 0xFFF) &+ 1, access: .write, cpl: cpl)
    let firstCount = 4096 - Int(linear & 0xFFF)
    for index in 0..<size {
      let physical = index < firstCount ? first &+ UInt64(index) : second &+ UInt64(index - firstCount)
      systemWritePhysicalByte(physical, UInt8(truncatingIfNeeded: value >> (8 * UInt64(index))))
    }
    systemNoteWrite(first, size: firstCount)
    systemNoteWrite(second, size: size - firstCount)
  }

  /// Records that guest RAM at `physical` was written by the system part (stack frames,
  /// descriptor accessed/busy bits, paging A/D bits) in the dirty bitmap.
  @inline(__always)
  func systemNoteWrite(_ physical: UInt64, size: Int) {
    memory.dirtyPages.mark(address: physical, length: UInt64(size))
  }
}
