import Synchronization
import VMCore

// Page walks (Intel SDM vol. 3 ch. 4, AMD APM vol. 2 ch. 5): 32-bit paging (with PSE and
// PSE-36), PAE paging and 4-level paging, with NX, global pages, CR0.WP, and accessed/dirty
// bits set atomically in guest RAM. SMEP, SMAP, protection keys and 5-level paging are not
// offered (their CR4 bits are reserved).

/// The result of a page walk: what a TLB entry needs.
///
/// A TLB may cache it for reads when `permits(.read, ...)`, for instruction fetches when
/// `permits(.execute, ...)`, and for writes only when `permits(.write, ...)`, which also
/// requires the dirty bit to be set already (so the walker is called once to set it).
public struct PageTranslation: Sendable, Equatable {
  /// Physical address of the 4 KiB frame that holds the linear address (for large pages, the
  /// 4 KiB piece of the large page).
  public var physicalPage: UInt64
  /// Size of the mapping (4 KiB, 2 MiB, 4 MiB or 1 GiB): INVLPG of any address in it drops it.
  public var pageSize: UInt64
  /// R/W was set at every level.
  public var writable: Bool
  /// U/S was set at every level.
  public var user: Bool
  /// No level had XD set (or EFER.NXE is off).
  public var executable: Bool
  /// The leaf is global (G set and CR4.PGE on): survives CR3 writes.
  public var global: Bool
  /// The leaf's dirty bit is set.
  public var dirty: Bool
  /// CR0.WP at walk time (a CR0.WP change flushes the TLB).
  public var writeProtect: Bool

  /// The translation with paging disabled: everything allowed.
  static func identity(_ linear: UInt64) -> PageTranslation {
    PageTranslation(
      physicalPage: linear & ~0xFFF, pageSize: 4096, writable: true, user: true, executable: true,
      global: false, dirty: true, writeProtect: false)
  }

  /// Whether an access of `kind` at user (`user == true`, CPL 3) or supervisor privilege may
  /// use this translation without another walk.
  @inline(__always)
  public func permits(_ kind: MemoryAccessKind, user userAccess: Bool) -> Bool {
    if userAccess && !user { return false }
    switch kind {
    case .read: return true
    case .execute: return executable
    case .write: return dirty && (writable || (!userAccess && !writeProtect))
    }
  }
}

/// Page-fault error code bits.
public enum PageFaultCode {
  public static let present: UInt32 = 1 << 0
  public static let write: UInt32 = 1 << 1
  public static let user: UInt32 = 1 << 2
  public static let reserved: UInt32 = 1 << 3
  public static let instructionFetch: UInt32 = 1 << 4
}

extension CPU {
  /// Walks the guest page tables for `linear`. Called by the TLB on a miss and by system
  /// accesses. `cpl` 3 makes it a user access; implicit supervisor accesses pass 0.
  ///
  /// Sets accessed bits on every entry used and the dirty bit of the leaf on writes. Throws
  /// #PF (with CR2 left to the delivery code: `Fault.address` holds the linear address) or
  /// #GP(0) for a non-canonical address in IA-32e mode. Never returns a not-present
  /// translation.
  public func translateSlow(_ linear: UInt64, access: MemoryAccessKind, cpl: UInt8) throws(Fault) -> PageTranslation {
    if cr0 & X86.cr0PG == 0 {
      return .identity(isLongModeActive ? linear : linear & 0xFFFF_FFFF)
    }
    statistics.pageWalks += 1
    if efer & X86.eferLMA != 0 {
      if !isCanonical(linear) { throw .nonCanonical(linear) }
      return try walkHierarchical(linear, access: access, cpl: cpl, levels: 4)
    }
    if cr4 & X86.cr4PAE != 0 {
      return try walkHierarchical(linear & 0xFFFF_FFFF, access: access, cpl: cpl, levels: 3)
    }
    return try walk32Bit(linear & 0xFFFF_FFFF, access: access, cpl: cpl)
  }

  /// Mask of physical-address bits 51:12 that are valid with our physical-address width.
  @inline(__always)
  var pagingAddressMask: UInt64 {
    ((1 << system.physicalAddressBits) - 1) & ~0xFFF
  }

  private func pageFault(
    _ linear: UInt64, access: MemoryAccessKind, cpl: UInt8, present: Bool, reserved: Bool, pae: Bool
  ) -> Fault {
    var code: UInt32 = 0
    if present { code |= PageFaultCode.present }
    if access == .write { code |= PageFaultCode.write }
    if cpl == 3 { code |= PageFaultCode.user }
    if reserved { code |= PageFaultCode.reserved }
    if access == .execute && pae && efer & X86.eferNXE != 0 { code |= PageFaultCode.instructionFetch }
    return .pageFault(code, address: linear)
  }

  /// Loads a 64-bit paging entry from guest RAM (0 = not present outside RAM).
  @inline(__always)
  private func loadEntry64(_ physical: UInt64) -> UInt64 {
    guard let pointer = memory.hostPointer(physical, length: 8) else { return 0 }
    return pointer.assumingMemoryBound(to: Atomic<UInt64>.self).pointee.load(ordering: .relaxed)
  }

  /// Sets `bits` in the 64-bit entry at `physical` if it still holds `expected`. Returns
  /// false when the guest changed the entry meanwhile (the caller walks again).
  @inline(__always)
  private func setEntryBits64(_ physical: UInt64, expected: UInt64, bits: UInt64) -> Bool {
    if expected & bits == bits { return true }
    guard let pointer = memory.hostPointer(physical, length: 8) else { return true }
    let result = pointer.assumingMemoryBound(to: Atomic<UInt64>.self).pointee.compareExchange(
      expected: expected, desired: expected | bits, ordering: .relaxed)
    if result.exchanged { systemNoteWrite(physical, size: 8) }
    return result.exchanged
  }

  @inline(__always)
  private func loadEntry32(_ physical: UInt64) -> UInt32 {
    guard let pointer = memory.hostPointer(physical, length: 4) else { return 0 }
    return pointer.assumingMemoryBound(to: Atomic<UInt32>.self).pointee.load(ordering: .relaxed)
  }

  @inline(__always)
  private func setEntryBits32(_ physical: UInt64, expected: UInt32, bits: UInt32) -> Bool {
    if expected & bits == bits { return true }
    guard let pointer = memory.hostPointer(physical, length: 4) else { return true }
    let result = pointer.assumingMemoryBound(to: Atomic<UInt32>.self).pointee.compareExchange(
      expected: expected, desired: expected | bits, ordering: .relaxed)
    if result.exchanged { systemNoteWrite(physical, size: 4) }
    return result.exchanged
  }

  /// Checks the combined rights of a walk against the access.
  @inline(__always)
  private func rightsAllow(
    access: MemoryAccessKind, cpl: UInt8, writable: Bool, user: Bool, executable: Bool
  ) -> Bool {
    if cpl == 3 && !user { return false }
    switch access {
    case .read: return true
    case .execute: return executable
    case .write: return writable || (cpl != 3 && cr0 & X86.cr0WP == 0)
    }
  }

  /// PAE (3 levels, 32-bit linear) and 4-level paging.
  private func walkHierarchical(
    _ linear: UInt64, access: MemoryAccessKind, cpl: UInt8, levels: Int
  ) throws(Fault) -> PageTranslation {
    let nxEnabled = efer & X86.eferNXE != 0
    let addressMask = pagingAddressMask
    // Bits 51:MAXPHYADDR are reserved, and XD when NXE is off.
    var reservedHigh: UInt64 = ((1 << 52) - 1) & ~((1 << system.physicalAddressBits) - 1)
    if !nxEnabled { reservedHigh |= 1 << 63 }

    for _ in 0..<8 {  // retries when the guest changes an entry under us
      var writable = true
      var user = true
      var executable = true
      var table: UInt64
      var level = levels
      if levels == 3 {
        // PAE: the 4 PDPTEs, indexed by bits 31:30, hold no rights and no accessed bit.
        let pdpteAddress = (cr3 & 0xFFFF_FFE0) &+ ((linear >> 30) & 3) * 8
        let pdpte = loadEntry64(pdpteAddress)
        if pdpte & 1 == 0 {
          throw pageFault(linear, access: access, cpl: cpl, present: false, reserved: false, pae: true)
        }
        if pdpte & (reservedHigh | (1 << 63) | 0x1E6) != 0 {
          throw pageFault(linear, access: access, cpl: cpl, present: true, reserved: true, pae: true)
        }
        table = pdpte & addressMask
        level = 2
      } else {
        table = cr3 & addressMask
      }
      var restart = false
      while true {
        let shift = UInt64(12 + 9 * (level - 1))
        let entryAddress = table &+ ((linear >> shift) & 0x1FF) * 8
        let entry = loadEntry64(entryAddress)
        if entry & 1 == 0 {
          throw pageFault(linear, access: access, cpl: cpl, present: false, reserved: false, pae: true)
        }
        let largePage = entry & 0x80 != 0 && (level == 2 || level == 3)
        var reserved = entry & reservedHigh
        if level == 4 && entry & 0x80 != 0 { reserved |= 0x80 }
        // PDPTE.PS is reserved when the CPU model hides 1 GiB pages.
        if level == 3 && entry & 0x80 != 0
          && system.cpuidFeatures.extendedEDX & CPUModel.extendedEDXGigabytePages == 0
        {
          reserved |= 0x80
        }
        if largePage {
          // Bits 29:13 (1 GiB) or 20:13 (2 MiB) of a large-page frame address are reserved.
          reserved |= entry & (level == 3 ? 0x3FFF_E000 : 0x1F_E000)
        }
        if reserved != 0 {
          throw pageFault(linear, access: access, cpl: cpl, present: true, reserved: true, pae: true)
        }
        writable = writable && entry & 2 != 0
        user = user && entry & 4 != 0
        if nxEnabled && entry & (1 << 63) != 0 { executable = false }
        if level == 1 || largePage {
          if !rightsAllow(access: access, cpl: cpl, writable: writable, user: user, executable: executable) {
            throw pageFault(linear, access: access, cpl: cpl, present: true, reserved: false, pae: true)
          }
          let bits: UInt64 = access == .write ? 0x60 : 0x20
          if !setEntryBits64(entryAddress, expected: entry, bits: bits) {
            restart = true
            break
          }
          let pageSize: UInt64 = 1 << shift
          let frame = entry & addressMask & ~(pageSize - 1)
          return PageTranslation(
            physicalPage: frame | (linear & (pageSize - 1) & ~0xFFF), pageSize: pageSize,
            writable: writable, user: user, executable: executable,
            global: entry & 0x100 != 0 && cr4 & X86.cr4PGE != 0,
            dirty: access == .write || entry & 0x40 != 0, writeProtect: cr0 & X86.cr0WP != 0)
        }
        if !setEntryBits64(entryAddress, expected: entry, bits: 0x20) {
          restart = true
          break
        }
        table = entry & addressMask
        level -= 1
      }
      if !restart { break }
    }
    // The guest kept rewriting the entries: report a not-present fault and let it retry.
    throw pageFault(linear, access: access, cpl: cpl, present: false, reserved: false, pae: true)
  }

  /// 32-bit paging with optional 4 MiB pages (CR4.PSE) and PSE-36 high address bits.
  private func walk32Bit(_ linear: UInt64, access: MemoryAccessKind, cpl: UInt8) throws(Fault) -> PageTranslation {
    for _ in 0..<8 {
      let directoryEntryAddress = (cr3 & 0xFFFF_F000) &+ (linear >> 22) * 4
      let directoryEntry = loadEntry32(directoryEntryAddress)
      if directoryEntry & 1 == 0 {
        throw pageFault(linear, access: access, cpl: cpl, present: false, reserved: false, pae: false)
      }
      var writable = directoryEntry & 2 != 0
      var user = directoryEntry & 4 != 0
      if directoryEntry & 0x80 != 0 && cr4 & X86.cr4PSE != 0 {
        // Bit 21 is reserved; bits 20:13 are physical-address bits 39:32 (PSE-36).
        if directoryEntry & (1 << 21) != 0 {
          throw pageFault(linear, access: access, cpl: cpl, present: true, reserved: true, pae: false)
        }
        if !rightsAllow(access: access, cpl: cpl, writable: writable, user: user, executable: true) {
          throw pageFault(linear, access: access, cpl: cpl, present: true, reserved: false, pae: false)
        }
        let bits: UInt32 = access == .write ? 0x60 : 0x20
        if !setEntryBits32(directoryEntryAddress, expected: directoryEntry, bits: bits) { continue }
        let frame = UInt64(directoryEntry & 0xFFC0_0000) | (UInt64((directoryEntry >> 13) & 0xFF) << 32)
        return PageTranslation(
          physicalPage: frame | (linear & 0x3F_F000), pageSize: 4 << 20, writable: writable, user: user,
          executable: true, global: directoryEntry & 0x100 != 0 && cr4 & X86.cr4PGE != 0,
          dirty: access == .write || directoryEntry & 0x40 != 0, writeProtect: cr0 & X86.cr0WP != 0)
      }
      if !setEntryBits32(directoryEntryAddress, expected: directoryEntry, bits: 0x20) { continue }
      let tableEntryAddress = UInt64(directoryEntry & 0xFFFF_F000) &+ ((linear >> 12) & 0x3FF) * 4
      let tableEntry = loadEntry32(tableEntryAddress)
      if tableEntry & 1 == 0 {
        throw pageFault(linear, access: access, cpl: cpl, present: false, reserved: false, pae: false)
      }
      writable = writable && tableEntry & 2 != 0
      user = user && tableEntry & 4 != 0
      if !rightsAllow(access: access, cpl: cpl, writable: writable, user: user, executable: true) {
        throw pageFault(linear, access: access, cpl: cpl, present: true, reserved: false, pae: false)
      }
      let bits: UInt32 = access == .write ? 0x60 : 0x20
      if !setEntryBits32(tableEntryAddress, expected: tableEntry, bits: bits) { continue }
      return PageTranslation(
        physicalPage: UInt64(tableEntry & 0xFFFF_F000), pageSize: 4096, writable: writable, user: user,
        executable: true, global: tableEntry & 0x100 != 0 && cr4 & X86.cr4PGE != 0,
        dirty: access == .write || tableEntry & 0x40 != 0, writeProtect: cr0 & X86.cr0WP != 0)
    }
    throw pageFault(linear, access: access, cpl: cpl, present: false, reserved: false, pae: false)
  }
}
