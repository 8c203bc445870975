import SoftCPU
import Testing
import VMCore

@Suite("System: page walks")
struct SystemPagingTests {
  let machine: SystemTestMachine
  let tables: SystemTestMachine.PageTables

  init() throws {
    machine = try SystemTestMachine()
    tables = try SystemTestMachine.PageTables(machine: machine)
    try machine.enterLongMode(cpl: 0, cr3: tables.root)
  }

  var cpu: CPU { machine.cpu }

  /// The guest code of each kind of TLB flush the tests ask for (INVLPG of page 0x600000).
  static let flushes = [
    "cr3": "mov rcx, cr3\n mov cr3, rcx",
    "invlpg": "invlpg [0x600000]",
    "pge": "mov rcx, cr4\n and rcx, ~0x80\n mov cr4, rcx\n or rcx, 0x80\n mov cr4, rcx",
  ]

  /// Assembles `source` into physical 0x20_0000 (where the tests map linear 0x40_0000) and
  /// runs it from 0x40_0000 until it halts.
  func loadAndRun(_ source: String, instructionLimit: Int = 100) throws {
    let code = try CoreAssembler.assemble(source)
    try machine.memory.writeBytes(code, at: 0x20_0000)
    cpu.noteExternalWrite(physical: 0x20_0000, length: UInt64(code.count))
    #expect(cpu.run(instructionLimit: instructionLimit) == .halted)
  }

  @Test func fourLevelWalkSetsAccessedThenDirty() throws {
    try tables.map(0x7F12_3456_7000, to: 0x23_4000, flags: 0x3)
    let translation = try cpu.translateSlow(0x7F12_3456_7ABC, access: .read, cpl: 0)
    #expect(translation.physicalPage == 0x23_4000)
    #expect(translation.pageSize == 4096)
    #expect(translation.writable && !translation.user && translation.executable && !translation.dirty)
    let leaf = try tables.leafAddress(0x7F12_3456_7000)
    #expect(try machine.read64(leaf) & 0x60 == 0x20)  // A set, D clear after a read
    #expect(try machine.read64(tables.root + ((0x7F12_3456_7000 >> 39) & 0x1FF) * 8) & 0x20 != 0)
    #expect(!translation.permits(.write, user: false))  // D not yet set: writes must walk again
    let written = try cpu.translateSlow(0x7F12_3456_7ABC, access: .write, cpl: 0)
    #expect(written.dirty && written.permits(.write, user: false))
    #expect(try machine.read64(leaf) & 0x60 == 0x60)
  }

  @Test func largePages() throws {
    try tables.map(0x4000_0000, to: 0x80_0000, flags: 0x3, size: 2 << 20)
    let two = try cpu.translateSlow(0x4012_3456, access: .read, cpl: 0)
    #expect(two.physicalPage == 0x80_0000 + 0x12_3000)
    #expect(two.pageSize == 2 << 20)
    try tables.map(0x80_0000_0000, to: 0x4000_0000, flags: 0x3, size: 1 << 30)
    let one = try cpu.translateSlow(0x80_1234_5678, access: .write, cpl: 0)
    #expect(one.physicalPage == 0x4000_0000 + 0x1234_5000)
    #expect(one.pageSize == 1 << 30)
  }

  @Test func notPresentErrorCodes() throws {
    let address: UInt64 = 0x5555_0000_1234
    #expect(
      thrownFault { _ = try cpu.translateSlow(address, access: .read, cpl: 0) } == .pageFault(0, address: address))
    #expect(
      thrownFault { _ = try cpu.translateSlow(address, access: .write, cpl: 0) } == .pageFault(2, address: address))
    #expect(
      thrownFault { _ = try cpu.translateSlow(address, access: .write, cpl: 3) } == .pageFault(6, address: address))
    #expect(
      thrownFault { _ = try cpu.translateSlow(address, access: .execute, cpl: 3) } == .pageFault(0x14, address: address)
    )
  }

  @Test func userSupervisorAndWriteProtection() throws {
    try tables.map(0x60_0000, to: 0x60_0000, flags: 0x1)  // present, read-only, supervisor
    try tables.map(0x60_1000, to: 0x60_1000, flags: 0x5)  // present, read-only, user
    #expect(
      thrownFault { _ = try cpu.translateSlow(0x60_0010, access: .read, cpl: 3) } == .pageFault(5, address: 0x60_0010))
    #expect(
      thrownFault { _ = try cpu.translateSlow(0x60_1010, access: .write, cpl: 3) } == .pageFault(7, address: 0x60_1010))
    #expect(
      thrownFault { _ = try cpu.translateSlow(0x60_0010, access: .write, cpl: 0) } == .pageFault(3, address: 0x60_0010))
    #expect((try cpu.translateSlow(0x60_1010, access: .read, cpl: 3)).user)
    // CR0.WP = 0: supervisor writes ignore R/W.
    try cpu.writeControlRegister(0, cpu.cr0 & ~X86.cr0WP)
    let translation = try cpu.translateSlow(0x60_0010, access: .write, cpl: 0)
    #expect(!translation.writable && translation.permits(.write, user: false))
    #expect(!translation.permits(.write, user: true))
  }

  @Test func userBitMustBeSetAtEveryLevel() throws {
    try tables.map(0x70_0000, to: 0x70_0000, flags: 0x7, tableFlags: 0x3)  // tables supervisor-only
    #expect(
      thrownFault { _ = try cpu.translateSlow(0x70_0000, access: .read, cpl: 3) } == .pageFault(5, address: 0x70_0000))
    #expect((try cpu.translateSlow(0x70_0000, access: .read, cpl: 0)).user == false)
  }

  @Test func noExecute() throws {
    try tables.map(0x90_0000, to: 0x90_0000, flags: 0x3 | (1 << 63))
    #expect(
      thrownFault { _ = try cpu.translateSlow(0x90_0000, access: .execute, cpl: 0) }
        == .pageFault(0x11, address: 0x90_0000))
    #expect(!(try cpu.translateSlow(0x90_0000, access: .read, cpl: 0)).executable)
    // Without EFER.NXE, bit 63 is reserved.
    try cpu.writeMSR(0xC000_0080, cpu.efer & ~X86.eferNXE & ~X86.eferLMA)
    #expect(
      thrownFault { _ = try cpu.translateSlow(0x90_0000, access: .read, cpl: 0) } == .pageFault(9, address: 0x90_0000))
  }

  @Test func reservedBits() throws {
    // Physical-address bit 45 is above the 40-bit physical width.
    try tables.map(0xA0_0000, to: 1 << 45, flags: 0x3)
    #expect(
      thrownFault { _ = try cpu.translateSlow(0xA0_0000, access: .write, cpl: 3) }
        == .pageFault(0xF, address: 0xA0_0000))
    // Bits 20:13 of a 2 MiB page are reserved.
    try tables.map(0x20_0000_0000, to: 0x20_0000 | 0x2000, flags: 0x3, size: 2 << 20)
    #expect(
      thrownFault { _ = try cpu.translateSlow(0x20_0000_0000, access: .read, cpl: 0) }
        == .pageFault(9, address: 0x20_0000_0000))
  }

  @Test func nonCanonicalAddressIsGeneralProtection() {
    let fault = thrownFault { _ = try cpu.translateSlow(0x0000_8000_0000_0000, access: .read, cpl: 0) }
    #expect(fault == .nonCanonical(0x0000_8000_0000_0000))
    #expect(fault?.vector == 13 && fault?.errorCode == 0)
  }

  @Test func globalPages() throws {
    try tables.map(0xB0_0000, to: 0xB0_0000, flags: 0x103)
    #expect((try cpu.translateSlow(0xB0_0000, access: .read, cpl: 0)).global)
  }

  /// The software TLB keeps translations of global pages across a CR3 write (CR4.PGE on), as
  /// hardware may, and drops every other one; INVLPG drops its page's, global or not; turning
  /// CR4.PGE off drops them all. Seen by a guest that remaps two pages (one global) behind the
  /// TLB's back and reads them again after each kind of flush, under both execution tiers.
  @Test(arguments: ["cr3", "invlpg", "pge"], [SoftCPUTier.interpreter, .translator])
  func globalTranslationsSurviveOnlyCR3Writes(flush: String, tier: SoftCPUTier) throws {
    cpu.setExecutionTier(tier, threshold: 0)
    try tables.map(0x40_0000, to: 0x20_0000, flags: 0x103)
    try tables.map(0x60_0000, to: 0x30_0000, flags: 0x103)
    try tables.map(0x70_0000, to: 0x31_0000, flags: 0x3)
    for (index, value) in [UInt64(0x1111), 0x2222, 0x3333, 0x4444].enumerated() {
      try machine.write64(0x30_0000 + UInt64(index) * 0x1_0000, value)
    }
    try loadAndRun(
      """
        mov rax, qword ptr [0x600000]
        mov rbx, qword ptr [0x700000]
        hlt
      .org 0x100
        \(Self.flushes[flush]!)
        mov rax, qword ptr [0x600000]
        mov rbx, qword ptr [0x700000]
        hlt
      """)
    #expect(cpu.gpr[0] == 0x1111 && cpu.gpr[3] == 0x2222)
    // Both pages now map the next frames; nothing told the TLB.
    try tables.map(0x60_0000, to: 0x32_0000, flags: 0x103)
    try tables.map(0x70_0000, to: 0x33_0000, flags: 0x3)
    cpu.rip = 0x40_0100
    #expect(cpu.run(instructionLimit: 100) == .halted)
    let expected: (UInt64, UInt64) =
      switch flush {
      case "cr3": (0x1111, 0x4444)
      case "invlpg": (0x3333, 0x2222)
      default: (0x3333, 0x4444)
      }
    #expect(cpu.gpr[0] == expected.0, "the global page after \(flush)")
    #expect(cpu.gpr[3] == expected.1, "the other page after \(flush)")
  }

  /// Two pages whose TLB entries share an index (their page numbers agree modulo 1024) both
  /// stay cached: the victim way keeps the one the other displaced, so a loop reading both
  /// walks each once instead of on every access, under both tiers.
  @Test(arguments: [SoftCPUTier.interpreter, .translator])
  func pagesSharingATLBIndexBothStayCached(tier: SoftCPUTier) throws {
    cpu.setExecutionTier(tier, threshold: 0)
    try tables.map(0x40_0000, to: 0x20_0000, flags: 0x3)
    // Pages 0x600 and 0xA00: both 0x200 modulo 1024.
    try tables.map(0x60_0000, to: 0x30_0000, flags: 0x3)
    try tables.map(0xA0_0000, to: 0x31_0000, flags: 0x3)
    try machine.write64(0x30_0000, 3)
    try machine.write64(0x31_0000, 4)
    let walksBefore = cpu.statistics.pageWalks
    try loadAndRun(
      """
        mov ecx, 500
        xor eax, eax
      1:
        add rax, qword ptr [0x600000]
        add rax, qword ptr [0xa00000]
        dec ecx
        jnz 1b
        hlt
      """, instructionLimit: 10_000)
    #expect(cpu.gpr[0] == 500 * 7)
    // The code page and the two data pages, each once (a page walk per access without the
    // victim way: 1000).
    #expect(cpu.statistics.pageWalks - walksBefore <= 6, "\(cpu.statistics.pageWalks - walksBefore) walks")
  }

  /// An entry in the victim way is flushed like one in the primary way: after INVLPG of its
  /// page, a CR3 write (not global) or a CR4.PGE toggle (a full flush after a few fills, which
  /// clears only the filled indices), a remapped page reads its new frame.
  @Test(arguments: ["invlpg", "cr3", "pge"], [SoftCPUTier.interpreter, .translator])
  func victimEntriesAreFlushed(flush: String, tier: SoftCPUTier) throws {
    cpu.setExecutionTier(tier, threshold: 0)
    try tables.map(0x40_0000, to: 0x20_0000, flags: 0x103)
    try tables.map(0x60_0000, to: 0x30_0000, flags: 0x3)
    try tables.map(0xA0_0000, to: 0x31_0000, flags: 0x3)
    try machine.write64(0x30_0000, 0x1111)
    try machine.write64(0x31_0000, 0x2222)
    try machine.write64(0x32_0000, 0x3333)
    try loadAndRun(
      """
        mov rax, qword ptr [0x600000]
        mov rbx, qword ptr [0xa00000]
        hlt
      .org 0x100
        \(Self.flushes[flush]!)
        mov rax, qword ptr [0x600000]
        hlt
      """)
    #expect(cpu.gpr[0] == 0x1111 && cpu.gpr[3] == 0x2222)
    // 0x600000's entry now sits in the victim way; remap it behind the TLB's back.
    try tables.map(0x60_0000, to: 0x32_0000, flags: 0x3)
    cpu.rip = 0x40_0100
    #expect(cpu.run(instructionLimit: 100) == .halted)
    #expect(cpu.gpr[0] == 0x3333, "after \(flush)")
  }

  /// Chains into code fetched through a non-global translation last only as long as its
  /// address space: a loop in global code calls (indirectly, through the jump cache) a
  /// function whose page it remaps and then reloads CR3 each time, alternating two frames that
  /// return 1 and 2. Every call must run the frame mapped at that moment, under both tiers.
  @Test(arguments: [SoftCPUTier.interpreter, .translator])
  func chainsIntoNonGlobalCodeEndWithTheAddressSpace(tier: SoftCPUTier) throws {
    cpu.setExecutionTier(tier, threshold: 0)
    try tables.map(0x40_0000, to: 0x20_0000, flags: 0x103)
    try tables.map(0x50_0000, to: 0x34_0000, flags: 0x3)
    try tables.map(0x41_0000, to: 0x36_0000, flags: 0x103)  // the stack
    let leaf = try tables.leafAddress(0x50_0000)
    // The leaf's page table, reachable by the guest at 0x80_0000.
    try tables.map(0x80_0000, to: leaf & ~0xFFF, flags: 0x103)
    try machine.memory.writeBytes(try CoreAssembler.assemble("mov eax, 1\n ret"), at: 0x34_0000)
    try machine.memory.writeBytes(try CoreAssembler.assemble("mov eax, 2\n ret"), at: 0x35_0000)
    try loadAndRun(
      """
        mov r8, 0x350003
        mov r9, 0x340003
        mov ecx, 200
        xor ebx, ebx
        mov rsp, 0x411000
      1:
        mov rax, 0x500000
        call rax
        add rbx, rax
        mov qword ptr [\(0x80_0000 + (leaf & 0xFFF))], r8
        xchg r8, r9
        mov rdx, cr3
        mov cr3, rdx
        dec ecx
        jnz 1b
        hlt
      """, instructionLimit: 10_000)
    #expect(cpu.gpr[3] == 100 * 1 + 100 * 2)
  }

  @Test func pagingDisabledIsIdentity() throws {
    let plain = try SystemTestMachine()
    let translation = try plain.cpu.translateSlow(0x12_3456, access: .write, cpl: 0)
    #expect(translation.physicalPage == 0x12_3000)
  }

  @Test func thirtyTwoBitPagingWithFourMegabytePages() throws {
    let plain = try SystemTestMachine()
    let directory: UInt64 = 0x20_0000
    try plain.memory.fill(0, at: directory, length: 0x2000)
    // 4 MiB page at linear 0xC000_0000 -> physical 0x40_0000; 4 KiB page at 0x1000 -> 0x5000.
    try plain.write32(directory + (0xC000_0000 >> 22) * 4, 0x40_0000 | 0x83)
    try plain.write32(directory + 0, UInt32(directory + 0x1000) | 0x7)
    try plain.write32(directory + 0x1000 + 1 * 4, 0x5000 | 0x5)
    var state = X86CPUState()
    state.cr0 = X86.cr0PE | X86.cr0PG | X86.cr0WP
    state.cr4 = X86.cr4PSE
    state.cr3 = directory
    state.cs = .flatCode(selector: 0x08, long: false)
    state.ss = .flatData(selector: 0x10)
    plain.cpu.load(state)
    let large = try plain.cpu.translateSlow(0xC012_3456, access: .read, cpl: 0)
    #expect(large.physicalPage == 0x40_0000 + 0x12_3000 && large.pageSize == 4 << 20)
    let small = try plain.cpu.translateSlow(0x1234, access: .read, cpl: 3)
    #expect(small.physicalPage == 0x5000 && small.user)
    #expect(
      thrownFault { _ = try plain.cpu.translateSlow(0x1234, access: .write, cpl: 3) } == .pageFault(7, address: 0x1234))
    #expect(try plain.read32(directory + 0x1000 + 4) & 0x20 != 0)
  }

  @Test func paeWalk() throws {
    let plain = try SystemTestMachine()
    let pdpt: UInt64 = 0x30_0000
    try plain.memory.fill(0, at: pdpt, length: 0x3000)
    try plain.write64(pdpt + 8 * 3, (pdpt + 0x1000) | 1)  // PDPTE 3 -> directory
    try plain.write64(pdpt + 0x1000 + 8 * 1, 0x60_0000 | 0x83)  // 2 MiB page at 0xC020_0000
    var state = X86CPUState()
    state.cr0 = X86.cr0PE | X86.cr0PG
    state.cr4 = X86.cr4PAE
    state.cr3 = pdpt
    state.cs = .flatCode(selector: 0x08, long: false)
    state.ss = .flatData(selector: 0x10)
    plain.cpu.load(state)
    let translation = try plain.cpu.translateSlow(0xC021_0000, access: .write, cpl: 0)
    #expect(translation.physicalPage == 0x61_0000 && translation.dirty)
    #expect(
      thrownFault { _ = try plain.cpu.translateSlow(0x4000_0000, access: .read, cpl: 0) }
        == .pageFault(0, address: 0x4000_0000))
  }
}
