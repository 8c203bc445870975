import VMCore

// Software TLB: the future shadow page table. One two-way table per access kind (read,
// write, execute), indexed by the linear page number's low bits (`tlbIndex`): the primary
// way, where every lookup starts, and a victim way holding the entry the last fill displaced
// (`tlbSlots`). A hit costs one compare and one add: the entry holds the page tag and the
// delta to add to the linear address.
//
// - read/write entries: delta = host address - linear address (RAM pages only; MMIO and
//   not-present translations are never cached).
// - fetch entries: delta = physical address - linear address (the block cache is keyed by
//   physical address).
// - A write entry is never filled for a code page (a page with decoded blocks), so every
//   store to code takes the slow path, which invalidates the page's blocks. When a page
//   becomes a code page, write entries pointing at it are dropped (`dropWriteEntries`).
// - Tags carry `tlbTagExtra` in their low 12 bits (bit 0 = user mode), so a lookup only hits
//   an entry filled at the same privilege.
// - Accesses that cross a page take the slow path.
//
// Part 2: `translate` walks the 4-level page tables here (setting A/D bits, checking U/S,
// R/W, NX against `access` and CPL, raising #PF with CR2). Fill write entries only when the
// walk allowed writes and set D; fill entries per privilege via `tlbTagExtra`. Flush with
// `flushTLB()` on CR0.PG/CR0.WP/CR4 paging-bit and EFER.NXE changes, `flushNonGlobalTLB()` on
// CR3 writes (entries filled from a global translation stay, as on hardware: `tlbGlobalMarks`
// says which), `flushTLBPage` on INVLPG; when CPL changes between 3 and 0-2 nothing needs
// flushing (the tag differs).

/// Number of indices per TLB table (power of two).
let tlbEntries = 1024
/// Entries per TLB table: each index has a primary way (at the index, where the fast paths and
/// the translator's probe look first) and a victim way (at index + `tlbEntries`) that keeps
/// the entry the last fill displaced, so two pages that share an index do not evict each
/// other on every access. The slow paths promote a victim hit back to the primary way
/// (`promoteVictim`); the translator's probe checks the victim way out of line.
let tlbSlots = 2 * tlbEntries
let tlbIndexMask: UInt64 = UInt64(tlbEntries - 1)
/// Tag of an empty entry: low bits all ones never match `page | tlbTagExtra`.
let tlbInvalidTag: UInt64 = ~0
/// `tlbTagExtra` at CPL 3: bit 0 of the tag keeps user and supervisor entries apart.
let tlbUserTagBits: UInt64 = 1

/// The TLB index of linear `linear`: the page number modulo the table size, whatever the
/// privilege. Pages 4 MiB apart share an index (the kernel reaches the same data through its
/// image mapping and through the direct map, whose addresses agree in their low bits), and so
/// do a page's user and supervisor entries (the kernel copying to or from a user buffer); the
/// victim way keeps two of them. The index is as short as it can be for every translated
/// access's probe: two host instructions from the address (docs/softcpu-performance.md,
/// "Sixteenth step": adding the privilege's tag bits to the index, which kept a page's user and
/// supervisor entries apart, cost the 686 boot a tenth more CPU time; a `page + page / 1024`
/// index, which kept pages 4 MiB apart, cost it 7 %: "Fourteenth step"). Two consecutive pages
/// never share an index: an access that crosses a page, looked up at its first page's index
/// with its last page's tag, therefore always misses. The translator's probe computes the same
/// (`BlockTranslator.emitProbe`).
@_transparent
func tlbIndex(_ linear: UInt64) -> Int {
  Int(truncatingIfNeeded: (linear >> 12) & tlbIndexMask)
}

/// TLB fills `CPU.tlbFilledIndices` records between two flushes; after more, a flush clears
/// every slot.
let tlbFillRecordCapacity = 64

/// Entries of `CPU.systemTranslations` (power of two): the GDT, IDT and TSS pages and the
/// kernel stack an interrupt pushes its frame on.
let systemTranslationEntries = 16

/// Bits of `CPU.tlbGlobalMarks`: the entry of that index in the read, write or fetch table was
/// filled from a global translation. Only valid entries' marks matter: a fill sets or clears
/// its bit, so an entry dropped without clearing it is still dropped.
enum TLBGlobalMark {
  static let read: UInt8 = 1
  static let write: UInt8 = 2
  static let fetch: UInt8 = 4
}

/// One software-TLB entry.
struct TLBEntry {
  /// Linear page address | `tlbTagExtra` at fill time, or `tlbInvalidTag`.
  var tag: UInt64 = tlbInvalidTag
  /// Added to the linear address: host address (read/write) or physical address (fetch).
  var delta: UInt64 = 0
}

/// A guest RAM region as the hot path sees it.
struct RAMRegion {
  var guestBase: UInt64
  var size: UInt64
  var host: UnsafeMutableRawPointer
}

/// The kind of memory access, for translation and page-fault error codes.
enum MemoryAccess {
  case read, write, execute
}

extension CPU {
  /// Host address of guest-physical `physical` when it is RAM.
  @_transparent
  func ramPointer(_ physical: UInt64) -> UnsafeMutableRawPointer? {
    for index in 0..<ramRegionCount {
      let region = ramRegions[index]
      let offset = physical &- region.guestBase
      if offset < region.size { return region.host + Int(offset) }
    }
    return nil
  }

  /// #PF error code for a not-present page: W/R, U/S and I/D bits from the access.
  func pageFaultErrorCode(access: MemoryAccess, present: Bool = false) -> UInt32 {
    var code: UInt32 = present ? 1 : 0
    if access == .write { code |= 2 }
    if cpl == 3 { code |= 4 }
    if access == .execute { code |= 16 }
    return code
  }

  /// Translates a linear address to a physical address (page granular; the offset is kept).
  /// Paging off: identity. Part 2 adds the 4-level walk (and 32-bit/PAE walks) here.
  @inline(never)
  func translate(_ linear: UInt64, access: MemoryAccess) throws(Fault) -> UInt64 {
    if codeSize == 8 || efer & X86.eferLMA != 0 {
      // Non-canonical addresses raise #GP(0); the execution loop makes stack references #SS(0).
      if UInt64(bitPattern: Int64(bitPattern: linear << 16) >> 16) != linear {
        throw .nonCanonical(linear)
      }
    }
    if cr0 & X86.cr0PG == 0 {
      lastTranslationGlobal = false
      return linear
    }
    // Part 2 hook: the page walk (Paging.swift, System.swift `translatePaged`).
    return try translatePaged(linear, access: access)
  }

  /// Raises the fault a flat-test-mode access to an address with neither RAM nor a device gets.
  @_transparent
  func checkBacked(_ physical: UInt64, linear: UInt64, access: MemoryAccess) throws(Fault) {
    if flatTestMode && !bus.hasMMIODevice(physical) {
      throw .pageFault(pageFaultErrorCode(access: access), address: linear)
    }
  }

  /// Empties every TLB table (CR3 write, paging mode change).
  public func flushTLB() {
    if tlbFills <= tlbFillRecordCapacity {
      // Only the indices filled since the last flush can hold entries, in either way (a fill
      // moves the displaced entry to its own index's victim way).
      for fill in 0..<tlbFills {
        for way in 0..<2 {
          let index = Int(tlbFilledIndices[fill]) + way * tlbEntries
          readTLB[index] = TLBEntry()
          writeTLB[index] = TLBEntry()
          fetchTLB[index] = TLBEntry()
          tlbGlobalMarks[index] = 0
        }
      }
    } else {
      readTLB.update(repeating: TLBEntry(), count: tlbSlots)
      writeTLB.update(repeating: TLBEntry(), count: tlbSlots)
      fetchTLB.update(repeating: TLBEntry(), count: tlbSlots)
      tlbGlobalMarks.update(repeating: 0, count: tlbSlots)
    }
    tlbFills = 0
    systemTranslations.update(repeating: TLBEntry(), count: systemTranslationEntries)
    chainGeneration &+= 1
  }

  /// Empties the TLB but for entries filled from global translations (a CR3 write with
  /// CR4.PGE on: the kernel's pages stay across address-space switches).
  public func flushNonGlobalTLB() {
    for index in 0..<tlbSlots {
      let marks = tlbGlobalMarks[index]
      if marks & TLBGlobalMark.read == 0 { readTLB[index] = TLBEntry() }
      if marks & TLBGlobalMark.write == 0 { writeTLB[index] = TLBEntry() }
      if marks & TLBGlobalMark.fetch == 0 { fetchTLB[index] = TLBEntry() }
    }
    systemTranslations.update(repeating: TLBEntry(), count: systemTranslationEntries)
    // Chains into global code stay; those into the old address space's code go.
    if addressSpaceGeneration == .max {
      // Wrapping around: links made under the generations about to come again must go.
      addressSpaceGeneration = 1
      chainGeneration &+= 1
    } else {
      addressSpaceGeneration += 1
    }
    translator?.dropAddressSpaceEntries(chainGeneration: chainGeneration)
  }

  /// Whether the code of decoded block `block`, fetched at linear `linear`, comes through
  /// global translations only (64-bit code with paging; its fetch-TLB entries present and
  /// marked global), so that a CR3 write leaves its linear-to-physical mapping as it is.
  func blockCodeIsGlobal(_ linear: UInt64, block: Int) -> Bool {
    guard codeSize == 8, cr0 & X86.cr0PG != 0, fetchIsGlobal(linear) else { return false }
    return blocks[block].secondPage == .max || fetchIsGlobal((linear & ~0xFFF) &+ 0x1000)
  }

  /// Whether the fetch TLB holds the page of `linear` at the current privilege, filled from a
  /// global translation.
  private func fetchIsGlobal(_ linear: UInt64) -> Bool {
    let index = tlbIndex(linear)
    return fetchTLB[index].tag == (linear & ~0xFFF) | tlbTagExtra && tlbGlobalMarks[index] & TLBGlobalMark.fetch != 0
  }

  /// Drops the entries for the page of `linear` (INVLPG).
  public func flushTLBPage(_ linear: UInt64) {
    // The page's supervisor and user entries share its index.
    let index = tlbIndex(linear)
    for slot in [index, index + tlbEntries] {
      readTLB[slot] = TLBEntry()
      writeTLB[slot] = TLBEntry()
      fetchTLB[slot] = TLBEntry()
    }
    systemTranslations.update(repeating: TLBEntry(), count: systemTranslationEntries)
    chainGeneration &+= 1
  }

  /// Drops write entries that map host page `hostPage` (the page just became a code page).
  func dropWriteEntries(hostPage: UnsafeMutableRawPointer) {
    let target = UInt64(UInt(bitPattern: hostPage))
    for index in 0..<tlbSlots where writeTLB[index].tag != tlbInvalidTag {
      let entry = writeTLB[index]
      if (entry.tag & ~0xFFF) &+ entry.delta == target { writeTLB[index] = TLBEntry() }
    }
  }
}
