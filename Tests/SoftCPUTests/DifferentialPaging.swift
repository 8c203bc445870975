import SoftCPU
import VMCore

/// The paging-on variant of the emulated side: the same bytes at the same addresses, but in
/// long mode with paging on at CPL 3 under page tables that give exactly what the native side
/// has (the code page user read/write/execute, the 64 KiB data buffer user read/write and
/// no-execute, nothing else present), a Linux-like GDT (user CS 0x33, SS 0x2B), a TSS and an
/// IDT whose handlers run at CPL 0 and stop with HLT. Exceptions are delivered through the IDT
/// as on hardware; the runner reads the vector, error code and the interrupted RIP, RFLAGS and
/// RSP back from the handler's frame.
enum PagedEnvironment {
  /// System area (page tables, GDT, TSS, IDT, handlers, ring-0 stack), supervisor-only.
  static let base: UInt64 = 0x0FF0_0000
  static let pml4 = base, pdpt = base + 0x1000, pd = base + 0x2000
  static let codeTable = base + 0x3000, dataTable = base + 0x4000, systemTable = base + 0x5000
  static let gdt = base + 0x6000, tss = base + 0x6100, idt = base + 0x7000
  static let handlers = base + 0x8000
  static let stackTop = base + 0xA000
  /// Vectors whose frame carries an error code.
  static let errorCodeVectors: Set<Int> = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30]

  /// Writes the tables into `memory` (every run: a stray write to them shows as a RAM
  /// difference in that run and does not spoil the next).
  static func install(_ memory: GuestMemory) throws {
    try memory.fill(0, at: base, length: 0xA000)
    let present: UInt64 = 1, writable: UInt64 = 2, user: UInt64 = 4, noExecute: UInt64 = 1 << 63
    func entry(_ table: UInt64, _ index: UInt64, _ value: UInt64) throws {
      try memory.write(value, at: table + index * 8)
    }
    try entry(pml4, 0, pdpt | present | writable | user)
    try entry(pdpt, 0, pd | present | writable | user)
    try entry(pd, DiffLayout.codeBase >> 21, codeTable | present | writable | user)
    try entry(pd, DiffLayout.dataBase >> 21, dataTable | present | writable | user)
    try entry(pd, base >> 21, systemTable | present | writable)
    // The code page as the native side maps it (PROT_READ|PROT_WRITE|PROT_EXEC).
    try entry(codeTable, (DiffLayout.codeBase >> 12) & 0x1FF, DiffLayout.codeBase | present | writable | user)
    for page in 0..<UInt64(DiffLayout.dataSize >> 12) {
      let address = DiffLayout.dataBase + page << 12
      try entry(dataTable, (address >> 12) & 0x1FF, address | present | writable | user | noExecute)
    }
    // GDT, TSS, IDT, handlers and stack: supervisor pages (handlers executable).
    for address in stride(from: gdt & ~0xFFF, to: stackTop, by: 0x1000) {
      try entry(systemTable, (address >> 12) & 0x1FF, address | present | writable)
    }
    let descriptors: [UInt64] = [
      0, 0,
      0x00AF_9B00_0000_FFFF,  // 0x10 kernel code, 64-bit
      0x00CF_9300_0000_FFFF,  // 0x18 kernel data
      0x00CF_FB00_0000_FFFF,  // 0x23 user code, 32-bit
      0x00CF_F300_0000_FFFF,  // 0x2B user data
      0x00AF_FB00_0000_FFFF,  // 0x33 user code, 64-bit
      0,
    ]
    for (index, descriptor) in descriptors.enumerated() { try memory.write(descriptor, at: gdt + UInt64(index * 8)) }
    // 64-bit available TSS at 0x40, RSP0 = stackTop.
    let tssLow: UInt64 = 0x67 | (tss & 0xFF_FFFF) << 16 | UInt64(0x89) << 40 | ((tss >> 24) & 0xFF) << 56
    try memory.write(tssLow, at: gdt + 0x40)
    try memory.write(tss >> 32, at: gdt + 0x48)
    try memory.write(stackTop, at: tss + 4)
    // The I/O permission bitmap starts past the TSS limit: every port is denied at CPL 3, as in
    // the Linux process the native side runs in.
    try memory.write(UInt16(0x68), at: tss + 0x66)
    // Interrupt gates to handler v = `hlt` at handlers + 16 v; DPL 3 for #BP and #OF (INT3 and
    // INTO from user mode, as Linux sets them), 0 for the rest.
    for vector in 0..<256 {
      let handler = handlers + UInt64(vector * 16)
      try memory.write(UInt8(0xF4), at: handler)
      let dpl: UInt64 = vector == 3 || vector == 4 ? 3 : 0
      let low = (handler & 0xFFFF) | UInt64(0x10) << 16 | (0x8E | dpl << 5) << 40 | ((handler >> 16) & 0xFFFF) << 48
      try memory.write(low, at: idt + UInt64(vector * 16))
      try memory.write(handler >> 32, at: idt + UInt64(vector * 16) + 8)
    }
  }

  /// Long mode, paging on, CPL 3 (RIP, RSP and the rest come from the case's initial state).
  static var state: X86CPUState {
    var state = X86CPUState()
    state.cr0 = X86.cr0PE | X86.cr0MP | X86.cr0ET | X86.cr0NE | X86.cr0WP | X86.cr0PG
    state.cr4 = X86.cr4PAE | X86.cr4OSFXSR | X86.cr4OSXMMEXCPT | X86.cr4OSXSAVE
    state.cr3 = pml4
    state.efer = X86.eferLME | X86.eferLMA | X86.eferSCE | X86.eferNXE
    state.gdt = DescriptorTableRegister(base: gdt, limit: 0x4F)
    state.idt = DescriptorTableRegister(base: idt, limit: 0xFFF)
    state.cs = SegmentRegister(
      selector: 0x33, base: 0, limit: 0xFFFF_FFFF, type: 0xB, s: true, dpl: 3, present: true, db: false, l: true,
      g: true)
    state.ss = SegmentRegister(
      selector: 0x2B, base: 0, limit: 0xFFFF_FFFF, type: 0x3, s: true, dpl: 3, present: true, db: true, g: true)
    let null = SegmentRegister(
      selector: 0, base: 0, limit: 0xFFFF_FFFF, type: 0x3, s: true, dpl: 3, present: true, db: true, g: true)
    state.ds = null
    state.es = null
    state.fs = null
    state.gs = null
    state.tr = SegmentRegister(selector: 0x40, base: tss, limit: 0x67, type: 0xB, s: false, dpl: 0, present: true)
    state.rip = DiffLayout.codeBase
    state.rflags = 0x202
    return state
  }

  /// After a run that stopped in a handler (HLT at handlers + 16 v + 1): the vector, the error
  /// code, and the interrupted RIP/RFLAGS/RSP written back into `cpu`; nil when the CPU did not
  /// stop in a handler.
  static func unwind(_ cpu: CPU) -> (vector: Int, errorCode: UInt64?)? {
    let handler = cpu.rip &- 1
    guard handler >= handlers, handler < handlers + 256 * 16, (handler - handlers) % 16 == 0 else { return nil }
    let vector = Int((handler - handlers) / 16)
    var frame = cpu.gpr[4]
    var errorCode: UInt64? = nil
    let memory = cpu.memory
    do {
      if errorCodeVectors.contains(vector) {
        errorCode = try memory.read(UInt64.self, at: frame)
        frame += 8
      }
      cpu.rip = try memory.read(UInt64.self, at: frame)
      cpu.rflags = try memory.read(UInt64.self, at: frame + 16)
      cpu.gpr[4] = try memory.read(UInt64.self, at: frame + 24)
    } catch {
      return nil
    }
    return (vector, errorCode)
  }
}
