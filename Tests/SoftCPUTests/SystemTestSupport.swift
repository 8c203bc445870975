import SoftCPU
import VMCore

/// Helpers for the system-architecture tests: a CPU over fresh guest RAM, page tables and
/// descriptor tables written directly into memory.
struct SystemTestMachine {
  let memory: GuestMemory
  let bus: IOBus
  let cpu: CPU

  init(megabytes: UInt64 = 16) throws {
    memory = try GuestMemory(size: megabytes << 20)
    bus = IOBus()
    cpu = CPU(memory: memory, bus: bus)
  }

  func write64(_ address: UInt64, _ value: UInt64) throws { try memory.write(value, at: address) }
  func read64(_ address: UInt64) throws -> UInt64 { try memory.read(UInt64.self, at: address) }
  func write32(_ address: UInt64, _ value: UInt32) throws { try memory.write(value, at: address) }
  func read32(_ address: UInt64) throws -> UInt32 { try memory.read(UInt32.self, at: address) }

  /// Flat GDT at 0x500: 0x08 kernel code64, 0x10 kernel data, 0x18 user code32, 0x20 user data,
  /// 0x28 user code64, 0x30 kernel code32, 0x38 not-present data, 0x40 DPL0 data readable-only code
  /// (execute-only code), 0x48 16-byte TSS descriptor (base `tssBase`, limit 0x67).
  static let gdtBase: UInt64 = 0x500
  static let tssBase: UInt64 = 0x800
  static let idtBase: UInt64 = 0x3000

  func installGDT() throws {
    let entries: [UInt64] = [
      0,
      0x00AF_9B00_0000_FFFF,  // 0x08 kernel code, L
      0x00CF_9300_0000_FFFF,  // 0x10 kernel data
      0x00CF_FB00_0000_FFFF,  // 0x18 user code 32
      0x00CF_F300_0000_FFFF,  // 0x20 user data
      0x00AF_FB00_0000_FFFF,  // 0x28 user code 64
      0x00CF_9B00_0000_FFFF,  // 0x30 kernel code 32
      0x00CF_1300_0000_FFFF,  // 0x38 not present data
      0x00CF_9800_0000_FFFF,  // 0x40 execute-only code
    ]
    for (index, entry) in entries.enumerated() {
      try write64(Self.gdtBase + UInt64(index) * 8, entry)
    }
    // 64-bit available TSS at 0x48.
    let base = Self.tssBase
    let low: UInt64 =
      0x67 | ((base & 0xFF_FFFF) << 16) | (UInt64(0x89) << 40) | (((base >> 24) & 0xFF) << 56)
    try write64(Self.gdtBase + 0x48, low)
    try write64(Self.gdtBase + 0x50, base >> 32)
  }

  /// Long-mode state at `cpl` (0 or 3) with paging on (CR3 = `cr3`).
  func enterLongMode(cpl: UInt8, cr3: UInt64, rsp: UInt64 = 0x8000) throws {
    try installGDT()
    var state = X86CPUState()
    state.cr0 = X86.cr0PE | X86.cr0PG | X86.cr0WP | X86.cr0ET | X86.cr0NE
    state.cr4 = X86.cr4PAE | X86.cr4PGE
    state.cr3 = cr3
    state.efer = X86.eferLME | X86.eferLMA | X86.eferNXE | X86.eferSCE
    state.gdt = DescriptorTableRegister(base: Self.gdtBase, limit: 0x57)
    state.idt = DescriptorTableRegister(base: Self.idtBase, limit: 0xFFF)
    if cpl == 3 {
      state.cs = SegmentRegister(
        selector: 0x2B, base: 0, limit: 0xFFFF_FFFF, type: 0xB, s: true, dpl: 3, present: true, db: false, l: true,
        g: true)
      state.ss = SegmentRegister(
        selector: 0x23, base: 0, limit: 0xFFFF_FFFF, type: 0x3, s: true, dpl: 3, present: true, db: true, g: true)
    } else {
      state.cs = .flatCode(selector: 0x08, long: true)
      state.ss = .flatData(selector: 0x10)
    }
    state.ds = state.ss
    state.es = state.ss
    state.tr = SegmentRegister(
      selector: 0x48, base: Self.tssBase, limit: 0x67, type: 0xB, s: false, dpl: 0, present: true)
    state.rsp = rsp
    state.rip = 0x40_0000
    state.rflags = 0x202
    cpu.load(state)
  }

  /// Builds identity-ish 4-level tables rooted at `root`: `map(linear, physical, flags)`
  /// allocates intermediate tables from `nextTable`.
  final class PageTables {
    let machine: SystemTestMachine
    let root: UInt64
    var nextTable: UInt64

    init(machine: SystemTestMachine, root: UInt64 = 0x10_0000) throws {
      self.machine = machine
      self.root = root
      nextTable = root + 0x1000
      try machine.memory.fill(0, at: root, length: 0x10_0000)
    }

    /// Maps one page of `size` (4 KiB, 2 MiB or 1 GiB); `flags` go on the leaf, intermediate
    /// entries get `tableFlags` (default P|RW|US).
    func map(_ linear: UInt64, to physical: UInt64, flags: UInt64, size: UInt64 = 4096, tableFlags: UInt64 = 7)
      throws
    {
      let leafLevel = size == 1 << 30 ? 3 : size == 2 << 20 ? 2 : 1
      var table = root
      var level = 4
      while level > leafLevel {
        let index = (linear >> UInt64(12 + 9 * (level - 1))) & 0x1FF
        let address = table + index * 8
        var entry = try machine.read64(address)
        if entry & 1 == 0 {
          entry = nextTable | tableFlags
          nextTable += 0x1000
          try machine.write64(address, entry)
        }
        table = entry & 0x000F_FFFF_FFFF_F000
        level -= 1
      }
      let index = (linear >> UInt64(12 + 9 * (leafLevel - 1))) & 0x1FF
      let largeBit: UInt64 = leafLevel > 1 ? 0x80 : 0
      try machine.write64(table + index * 8, physical | flags | largeBit)
    }

    /// Address of the leaf entry for `linear` (4 KiB pages only).
    func leafAddress(_ linear: UInt64) throws -> UInt64 {
      var table = root
      for level in stride(from: 4, to: 1, by: -1) {
        let entry = try machine.read64(table + ((linear >> UInt64(12 + 9 * (level - 1))) & 0x1FF) * 8)
        table = entry & 0x000F_FFFF_FFFF_F000
      }
      return table + ((linear >> 12) & 0x1FF) * 8
    }
  }
}

/// The fault thrown by `body`, if any.
func thrownFault(_ body: () throws -> Void) -> Fault? {
  do {
    try body()
    return nil
  } catch let fault as Fault {
    return fault
  } catch {
    return nil
  }
}
