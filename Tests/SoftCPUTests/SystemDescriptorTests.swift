import SoftCPU
import Testing
import VMCore

@Suite("System: descriptor loads")
struct SystemDescriptorTests {
  /// 32-bit protected mode without paging at `cpl` (0: CS 0x30/SS 0x10, 3: CS 0x1B/SS 0x23).
  func protectedMode(cpl: UInt8) throws -> SystemTestMachine {
    let machine = try SystemTestMachine()
    try machine.installGDT()
    var state = X86CPUState()
    state.cr0 = X86.cr0PE | X86.cr0ET
    state.gdt = DescriptorTableRegister(base: SystemTestMachine.gdtBase, limit: 0x57)
    if cpl == 3 {
      state.cs = SegmentRegister(
        selector: 0x1B, limit: 0xFFFF_FFFF, type: 0xB, s: true, dpl: 3, present: true, db: true, g: true)
      state.ss = SegmentRegister(
        selector: 0x23, limit: 0xFFFF_FFFF, type: 0x3, s: true, dpl: 3, present: true, db: true, g: true)
    } else {
      state.cs = SegmentRegister(
        selector: 0x30, limit: 0xFFFF_FFFF, type: 0xB, s: true, dpl: 0, present: true, db: true, g: true)
      state.ss = .flatData(selector: 0x10)
    }
    machine.cpu.load(state)
    return machine
  }

  @Test func loadsDataSegmentAndSetsAccessedBit() throws {
    let machine = try protectedMode(cpl: 0)
    try machine.write64(SystemTestMachine.gdtBase + 0x10, 0x00CF_9200_0000_FFFF)  // accessed bit clear
    try machine.cpu.loadDataSegment(SegmentIndex.ds, selector: 0x10)
    let ds = machine.cpu.segments[Int(SegmentIndex.ds)]
    #expect(ds.selector == 0x10 && ds.base == 0 && ds.limit == 0xFFFF_FFFF)
    #expect(ds.access & 0xFFFF == 0xC093)
    #expect(try machine.read64(SystemTestMachine.gdtBase + 0x10) >> 40 & 0xFF == 0x93)
  }

  /// PUSH FS/GS and POP FS/GS (0F A0, 0F A8, 0F A1, 0F A9) each name their own register: the
  /// program swaps FS (0x10) and GS (0x20) through the stack.
  @Test func pushAndPopOfFSAndGSUseTheirOwnRegisters() throws {
    let machine = try protectedMode(cpl: 0)
    let program: [UInt8] = [
      0x66, 0xB8, 0x10, 0x00,  // mov ax, 0x10
      0x8E, 0xE0,  // mov fs, ax
      0x66, 0xB8, 0x20, 0x00,  // mov ax, 0x20
      0x8E, 0xE8,  // mov gs, ax
      0x0F, 0xA0,  // push fs
      0x0F, 0xA8,  // push gs
      0x0F, 0xA1,  // pop fs
      0x0F, 0xA9,  // pop gs
      0xF4,  // hlt
    ]
    try machine.memory.writeBytes(program, at: 0x10000)
    machine.cpu.rip = 0x10000
    machine.cpu.gpr[4] = 0x9000
    _ = machine.cpu.run(instructionLimit: program.count)
    #expect(machine.cpu.segments[Int(SegmentIndex.fs)].selector == 0x20)
    #expect(machine.cpu.segments[Int(SegmentIndex.gs)].selector == 0x10)
    #expect(machine.cpu.gpr[4] == 0x9000)
  }

  @Test func selectorFaults() throws {
    let machine = try protectedMode(cpl: 0)
    let cpu = machine.cpu
    #expect(thrownFault { try cpu.loadDataSegment(SegmentIndex.ds, selector: 0x58) } == .generalProtection(0x58))
    #expect(thrownFault { try cpu.loadDataSegment(SegmentIndex.ds, selector: 0x38) } == .segmentNotPresent(0x38))
    #expect(thrownFault { try cpu.loadDataSegment(SegmentIndex.ds, selector: 0x40) } == .generalProtection(0x40))
    #expect(thrownFault { try cpu.loadDataSegment(SegmentIndex.ss, selector: 0x23) } == .generalProtection(0x20))
    #expect(thrownFault { try cpu.loadDataSegment(SegmentIndex.ss, selector: 0x08) } == .generalProtection(0x08))
    #expect(thrownFault { try cpu.loadDataSegment(SegmentIndex.ss, selector: 0) } == .generalProtection(0))
    #expect(thrownFault { try cpu.loadDataSegment(SegmentIndex.ss, selector: 0x38) } == .stackFault(0x38))
    // LDT selector without an LDT.
    #expect(thrownFault { try cpu.loadDataSegment(SegmentIndex.es, selector: 0x14) } == .generalProtection(0x14))
    // A null selector in DS is fine (and unusable).
    try cpu.loadDataSegment(SegmentIndex.ds, selector: 0)
    #expect(cpu.segments[Int(SegmentIndex.ds)].access & SegmentAccess.unusable != 0)
  }

  @Test func privilegeChecksAtRingThree() throws {
    let machine = try protectedMode(cpl: 3)
    let cpu = machine.cpu
    #expect(cpu.currentPrivilegeLevel == 3)
    #expect(thrownFault { try cpu.loadDataSegment(SegmentIndex.ds, selector: 0x13) } == .generalProtection(0x10))
    try cpu.loadDataSegment(SegmentIndex.ds, selector: 0x23)
    try cpu.loadDataSegment(SegmentIndex.ss, selector: 0x23)
    #expect(thrownFault { try cpu.loadLocalDescriptorTable(selector: 0) } == .generalProtection(0))
    #expect(thrownFault { try cpu.writeControlRegister(3, 0) } == .generalProtection(0))
    #expect(thrownFault { _ = try cpu.readMSR(0xC000_0080) } == .generalProtection(0))
  }

  @Test func nullStackSegmentInSixtyFourBitMode() throws {
    let machine = try SystemTestMachine()
    let tables = try SystemTestMachine.PageTables(machine: machine)
    try tables.map(0, to: 0, flags: 0x7, size: 2 << 20)
    try machine.enterLongMode(cpl: 0, cr3: tables.root)
    try machine.cpu.loadDataSegment(SegmentIndex.ss, selector: 0)
    #expect(thrownFault { try machine.cpu.loadDataSegment(SegmentIndex.ss, selector: 3) } == .generalProtection(0))
  }

  @Test func loadTaskRegisterMarksBusy() throws {
    let machine = try SystemTestMachine()
    let tables = try SystemTestMachine.PageTables(machine: machine)
    try tables.map(0, to: 0, flags: 0x7, size: 2 << 20)
    try machine.enterLongMode(cpl: 0, cr3: tables.root)
    try machine.cpu.loadTaskRegister(selector: 0x48)
    #expect(machine.cpu.tr.base == SystemTestMachine.tssBase && machine.cpu.tr.limit == 0x67)
    #expect(try machine.read64(SystemTestMachine.gdtBase + 0x48) >> 40 & 0xF == 0xB)
    #expect(thrownFault { try machine.cpu.loadTaskRegister(selector: 0x48) } == .generalProtection(0x48))
    #expect(thrownFault { try machine.cpu.loadTaskRegister(selector: 0x10) } == .generalProtection(0x10))
  }

  @Test func controlRegisterChecks() throws {
    let machine = try protectedMode(cpl: 0)
    let cpu = machine.cpu
    // PG without PE, NW without CD, reserved CR4 bits, CR8 reserved bits.
    #expect(thrownFault { try cpu.writeControlRegister(0, X86.cr0PG) } == .generalProtection(0))
    #expect(thrownFault { try cpu.writeControlRegister(0, X86.cr0PE | X86.cr0NW) } == .generalProtection(0))
    #expect(thrownFault { try cpu.writeControlRegister(4, 1 << 20) } == .generalProtection(0))
    #expect(thrownFault { try cpu.writeControlRegister(8, 0x10) } == .generalProtection(0))
    // Enabling paging with LME but without PAE.
    try cpu.writeMSR(0xC000_0080, X86.eferLME)
    #expect(thrownFault { try cpu.writeControlRegister(0, cpu.cr0 | X86.cr0PG) } == .generalProtection(0))
    // With PAE: IA-32e mode becomes active.
    try cpu.writeControlRegister(4, X86.cr4PAE)
    try cpu.writeControlRegister(0, cpu.cr0 | X86.cr0PG)
    #expect(cpu.efer & X86.eferLMA != 0)
    // Unknown MSRs fault; MTRRs are kept.
    #expect(thrownFault { _ = try cpu.readMSR(0x1234_5678) } == .generalProtection(0))
    try cpu.writeMSR(0x200, 0x1234_5006)
    #expect(try cpu.readMSR(0x200) == 0x1234_5006)
    #expect(thrownFault { try cpu.writeMSR(0x277, 0x0202_0202_0202_0202) } == .generalProtection(0))
  }
}
