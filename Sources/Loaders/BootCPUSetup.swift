import VMCore

/// The one place that puts a CPU into the mode a kernel is entered in: it writes the GDT (and
/// for long mode the identity-mapping page tables) into guest memory and returns a matching
/// `X86CPUState`, whose hidden segment state equals the descriptors in the GDT.
/// Interrupts are off (RFLAGS = 0x2) and the IDT is empty in every mode.
public enum BootCPUSetup {
  /// Page-table entry bits (Intel SDM Vol. 3 §4.5).
  static let present: UInt64 = 1 << 0
  static let writable: UInt64 = 1 << 1
  static let writeThrough: UInt64 = 1 << 3
  static let cacheDisable: UInt64 = 1 << 4
  static let largePage: UInt64 = 1 << 7

  /// 64-bit long mode with paging: CR0 = PE|ET|PG, CR4 = PAE, EFER = LME|LMA, CR3 = the PML4 of
  /// an identity map of the first 4 GiB in 2 MiB pages (the PCI hole uncached), a flat 64-bit
  /// code segment at `codeSelector` and flat data at `dataSelector` (DS, ES, FS, GS, SS).
  /// The defaults are Linux's __BOOT_CS (0x10) and __BOOT_DS (0x18).
  public static func longMode64(
    memory: GuestMemory, entry: UInt64, stackPointer: UInt64, codeSelector: UInt16 = 0x10,
    dataSelector: UInt16 = 0x18
  ) throws(LoaderError) -> X86CPUState {
    let code = SegmentRegister.flatCode(selector: codeSelector, long: true)
    let data = SegmentRegister.flatData(selector: dataSelector)
    var state = X86CPUState()
    state.gdt = try writeGDT(memory: memory, segments: [code, data])
    state.cr3 = try writeIdentityMap(memory: memory)
    state.cr0 = X86.cr0PE | X86.cr0ET | X86.cr0PG
    state.cr4 = X86.cr4PAE
    state.efer = X86.eferLME | X86.eferLMA
    setSegments(&state, code: code, data: data)
    state.rip = entry
    state.rsp = stackPointer
    return state
  }

  /// 32-bit protected mode, paging off: CR0 = PE|ET, a flat 32-bit code segment at
  /// `codeSelector` and flat data at `dataSelector` (defaults 0x08 and 0x10, as Multiboot
  /// loaders commonly use). A20 is always enabled in Hostvisor's memory model.
  /// The GDT goes to `gdtAddress` (default `BootLayout.gdtAddress`).
  public static func protectedMode32(
    memory: GuestMemory, entry: UInt64, stackPointer: UInt64, codeSelector: UInt16 = 0x08,
    dataSelector: UInt16 = 0x10, gdtAddress: UInt64 = BootLayout.gdtAddress
  ) throws(LoaderError) -> X86CPUState {
    let code = SegmentRegister.flatCode(selector: codeSelector, long: false)
    let data = SegmentRegister.flatData(selector: dataSelector)
    var state = X86CPUState()
    state.gdt = try writeGDT(memory: memory, segments: [code, data], at: gdtAddress)
    state.cr0 = X86.cr0PE | X86.cr0ET
    setSegments(&state, code: code, data: data)
    state.rip = entry & 0xFFFF_FFFF
    state.rsp = stackPointer & 0xFFFF_FFFF
    return state
  }

  private static func setSegments(_ state: inout X86CPUState, code: SegmentRegister, data: SegmentRegister) {
    state.cs = code
    state.ds = data
    state.es = data
    state.fs = data
    state.gs = data
    state.ss = data
    state.idt = DescriptorTableRegister(base: 0, limit: 0)
    state.rflags = 0x2
  }

  /// The 8-byte GDT descriptor whose fields equal `segment`'s hidden state (Intel SDM Vol. 3 §3.4.5).
  public static func descriptor(for segment: SegmentRegister) -> UInt64 {
    let limit = UInt64(segment.g ? segment.limit >> 12 : segment.limit) & 0xF_FFFF
    var value = limit & 0xFFFF
    value |= (segment.base & 0xFF_FFFF) << 16
    value |= UInt64(segment.type & 0xF) << 40
    value |= (segment.s ? 1 : 0) << 44
    value |= UInt64(segment.dpl & 3) << 45
    value |= (segment.present ? 1 : 0) << 47
    value |= (limit >> 16) << 48
    value |= (segment.avl ? 1 : 0) << 52
    value |= (segment.l ? 1 : 0) << 53
    value |= (segment.db ? 1 : 0) << 54
    value |= (segment.g ? 1 : 0) << 55
    value |= ((segment.base >> 24) & 0xFF) << 56
    return value
  }

  /// Writes a GDT at `address` holding `segments` at their selectors' indices (other entries
  /// null) and returns the GDTR value.
  static func writeGDT(
    memory: GuestMemory, segments: [SegmentRegister], at address: UInt64 = BootLayout.gdtAddress
  ) throws(LoaderError) -> DescriptorTableRegister {
    let size = UInt64(BootLayout.gdtEntries * 8)
    try memory.zero(at: address, length: size)
    for segment in segments {
      let index = UInt64(segment.selector >> 3)
      precondition(index > 0 && index < UInt64(BootLayout.gdtEntries), "boot selector outside the boot GDT")
      try memory.put(descriptor(for: segment), at: address + index * 8)
    }
    return DescriptorTableRegister(base: address, limit: UInt16(size - 1))
  }

  /// Builds the identity map of the first 4 GiB (PML4 → one PDPT → four page directories of
  /// 2 MiB pages, writable, supervisor; pages in the PCI hole are uncached) and returns CR3.
  static func writeIdentityMap(memory: GuestMemory) throws(LoaderError) -> UInt64 {
    let region = BootLayout.pageTables
    try memory.zero(at: region.start, length: region.size)
    try memory.put(BootLayout.pdptAddress | present | writable, at: BootLayout.pml4Address)
    for directory in 0..<BootLayout.pageDirectoryCount {
      let directoryAddress = BootLayout.pageDirectoryAddress + directory * 0x1000
      try memory.put(directoryAddress | present | writable, at: BootLayout.pdptAddress + directory * 8)
      for slot in UInt64(0)..<512 {
        let physical = (directory << 30) | (slot << 21)
        var entry = physical | present | writable | largePage
        if physical >= GuestMemory.pciHoleStart { entry |= cacheDisable | writeThrough }
        try memory.put(entry, at: directoryAddress + slot * 8)
      }
    }
    return BootLayout.pml4Address
  }
}
