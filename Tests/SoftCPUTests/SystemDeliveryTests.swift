import SoftCPU
import Testing
import VMCore

@Suite("System: exception and interrupt delivery")
struct SystemDeliveryTests {
  let machine: SystemTestMachine
  var cpu: CPU { machine.cpu }
  static let handler: UInt64 = 0x1234_5678
  static let doubleFaultHandler: UInt64 = 0x2000_0000
  static let kernelStack: UInt64 = 0x9_0008  // deliberately not 16-byte aligned
  static let istStack: UInt64 = 0xA_0000

  /// Long mode at CPL 3 with the first 2 MiB identity-mapped (user, writable), a TSS with
  /// RSP0 and IST1, and IDT gates for #GP (13), #PF (14) and #DF (8, on IST1).
  init() throws {
    machine = try SystemTestMachine()
    let tables = try SystemTestMachine.PageTables(machine: machine)
    try tables.map(0, to: 0, flags: 0x7, size: 2 << 20)
    try machine.write64(SystemTestMachine.tssBase + 4, Self.kernelStack)
    try machine.write64(SystemTestMachine.tssBase + 0x24, Self.istStack)
    try setGate(14, target: Self.handler)
    try setGate(13, target: Self.handler + 0x100)
    try setGate(8, target: Self.doubleFaultHandler, ist: 1)
    try setGate(0x80, target: Self.handler + 0x200, dpl: 3, trap: true)
    try setGate(0x81, target: Self.handler + 0x300, dpl: 0)
    try machine.enterLongMode(cpl: 3, cr3: tables.root, rsp: 0x7008)
  }

  func setGate(
    _ vector: UInt64, target: UInt64, selector: UInt64 = 0x08, ist: UInt64 = 0, dpl: UInt64 = 0, trap: Bool = false
  )
    throws
  {
    let type: UInt64 = trap ? 0xF : 0xE
    let low =
      (target & 0xFFFF) | (selector << 16) | (ist << 32) | ((0x80 | dpl << 5 | type) << 40)
      | (((target >> 16) & 0xFFFF) << 48)
    try machine.write64(SystemTestMachine.idtBase + vector * 16, low)
    try machine.write64(SystemTestMachine.idtBase + vector * 16 + 8, target >> 32)
  }

  @Test func pageFaultFromRingThreeSwitchesToRSP0() throws {
    cpu.deliverException(.pageFault(6, address: 0xDEAD_0000))
    #expect(cpu.cr2 == 0xDEAD_0000)
    #expect(cpu.rip == Self.handler)
    #expect(cpu.currentPrivilegeLevel == 0)
    #expect(cpu.segments[Int(SegmentIndex.cs)].selector == 0x08)
    #expect(cpu.segments[Int(SegmentIndex.ss)].selector == 0)
    let frame = Self.kernelStack & ~0xF
    #expect(cpu.gpr[4] == frame - 48)
    #expect(try machine.read64(frame - 48) == 6)  // error code
    #expect(try machine.read64(frame - 40) == 0x40_0000)  // RIP
    #expect(try machine.read64(frame - 32) == 0x2B)  // CS
    #expect(try machine.read64(frame - 24) == 0x202 | RFlags.rf)  // RFLAGS, with RF: #PF is a fault
    #expect(try machine.read64(frame - 16) == 0x7008)  // RSP
    #expect(try machine.read64(frame - 8) == 0x23)  // SS
    #expect(cpu.rflags & RFlags.if == 0)

    // Discard the error code and IRETQ back to ring 3.
    cpu.gpr[4] += 8
    try cpu.interruptReturn(operandSize: 8)
    #expect(cpu.currentPrivilegeLevel == 3)
    #expect(cpu.rip == 0x40_0000 && cpu.gpr[4] == 0x7008)
    #expect(cpu.segments[Int(SegmentIndex.ss)].selector == 0x23)
    #expect(cpu.segments[Int(SegmentIndex.cs)].selector == 0x2B)
    #expect(cpu.rflags & RFlags.if != 0)
  }

  @Test func softwareInterruptChecksGateDPL() throws {
    #expect(
      thrownFault { try cpu.deliverEvent(vector: 0x81, kind: .software, errorCode: nil) }
        == .generalProtection(0x81 * 8 + 2))
    try cpu.deliverEvent(vector: 0x80, kind: .software, errorCode: nil)
    #expect(cpu.rip == Self.handler + 0x200)
    #expect(cpu.rflags & RFlags.if != 0)  // trap gate keeps IF
    // External interrupts ignore the gate DPL.
    try cpu.deliverEvent(vector: 0x81, kind: .external, errorCode: nil)
    #expect(cpu.rip == Self.handler + 0x300)
  }

  @Test func contributoryDuringContributoryIsDoubleFault() throws {
    // Vector 11 (#NP) has no gate: delivering it raises #GP(11*8+2+EXT) -> #DF on IST1.
    cpu.deliverException(.segmentNotPresent(0x10))
    #expect(cpu.rip == Self.doubleFaultHandler)
    #expect(cpu.gpr[4] == Self.istStack - 48)
    #expect(try machine.read64(Self.istStack - 48) == 0)  // #DF error code
    #expect(cpu.system.shutdownReason == nil)
  }

  @Test func pageFaultOnKernelStackIsDoubleFault() throws {
    // RSP0 points at unmapped memory: pushing the #PF frame page-faults -> #DF on IST1.
    try machine.write64(SystemTestMachine.tssBase + 4, 0x4000_0000)
    cpu.deliverException(.pageFault(4, address: 0x1000))
    #expect(cpu.rip == Self.doubleFaultHandler)
  }

  @Test func faultDuringDoubleFaultIsTripleFault() throws {
    try machine.write64(SystemTestMachine.idtBase + 8 * 16, 0)  // no #DF gate
    cpu.deliverException(.segmentNotPresent(0x10))
    #expect(cpu.system.shutdownReason == "triple fault")
  }

  @Test func syscallAndSysret() throws {
    try cpu.writeMSRAtRingZero(0xC000_0081, (0x18 << 48) | (0x08 << 32))
    try cpu.writeMSRAtRingZero(0xC000_0082, 0xFFFF_FFFF_8100_0000)
    try cpu.writeMSRAtRingZero(0xC000_0084, RFlags.if | RFlags.df)
    cpu.rip = 0x40_1000
    try cpu.fastSystemCall()
    #expect(cpu.rip == 0xFFFF_FFFF_8100_0000)
    #expect(cpu.gpr[1] == 0x40_1000 && cpu.gpr[11] == 0x202)
    #expect(cpu.currentPrivilegeLevel == 0 && cpu.rflags & RFlags.if == 0)
    #expect(cpu.segments[Int(SegmentIndex.cs)].selector == 0x08 && cpu.segments[Int(SegmentIndex.ss)].selector == 0x10)
    // SYSRET to a non-canonical RCX faults at CPL 0.
    cpu.gpr[1] = 0x0000_8000_0000_0000
    #expect(thrownFault { try cpu.fastSystemReturn(operandSize: 8) } == .generalProtection(0))
    cpu.gpr[1] = 0x40_1000
    try cpu.fastSystemReturn(operandSize: 8)
    #expect(cpu.rip == 0x40_1000 && cpu.currentPrivilegeLevel == 3)
    #expect(cpu.segments[Int(SegmentIndex.cs)].selector == 0x2B && cpu.segments[Int(SegmentIndex.ss)].selector == 0x23)
    #expect(cpu.rflags & RFlags.if != 0)
  }

  @Test func realModeInterruptVectorTable() throws {
    let real = try SystemTestMachine()
    try real.write32(0x10 * 4, 0x1234_5678)  // vector 0x10 -> 1234:5678
    var state = X86CPUState()
    state.cs = .realMode(selector: 0x1000, code: true)
    state.ss = .realMode(selector: 0x2000)
    state.rip = 0x100
    state.rsp = 0xFFFE
    state.rflags = 0x202
    state.idt = DescriptorTableRegister(base: 0, limit: 0x3FF)
    real.cpu.load(state)
    try real.cpu.deliverEvent(vector: 0x10, kind: .software, errorCode: nil)
    #expect(real.cpu.rip == 0x5678 && real.cpu.segments[Int(SegmentIndex.cs)].base == 0x12340)
    #expect(real.cpu.gpr[4] == 0xFFF8)
    #expect(try real.memory.read(UInt16.self, at: 0x2FFF8) == 0x100)
    #expect(try real.memory.read(UInt16.self, at: 0x2FFFA) == 0x1000)
    #expect(try real.memory.read(UInt16.self, at: 0x2FFFC) == 0x202)
    try real.cpu.interruptReturn(operandSize: 2)
    #expect(real.cpu.rip == 0x100 && real.cpu.gpr[4] == 0xFFFE && real.cpu.rflags & RFlags.if != 0)
  }

  @Test func protectedModeInterruptWithStackSwitch() throws {
    let legacy = try SystemTestMachine()
    try legacy.installGDT()
    // 32-bit available TSS at GDT 0x48 (8 bytes): ESP0 = 0x9000, SS0 = 0x10.
    let tss: UInt64 = 0x800
    try legacy.write64(SystemTestMachine.gdtBase + 0x48, 0x67 | (tss << 16) | (0x89 << 40))
    try legacy.write32(tss + 4, 0x9000)
    try legacy.write32(tss + 8, 0x10)
    // 32-bit interrupt gate for vector 0x20 -> 0x30:0x12345.
    let gate: UInt64 = 0x2345 | (0x30 << 16) | (0x8E << 40) | (0x1 << 48)
    try legacy.write64(SystemTestMachine.idtBase + 0x20 * 8, gate)
    var state = X86CPUState()
    state.cr0 = X86.cr0PE
    state.gdt = DescriptorTableRegister(base: SystemTestMachine.gdtBase, limit: 0x57)
    state.idt = DescriptorTableRegister(base: SystemTestMachine.idtBase, limit: 0x7FF)
    state.cs = SegmentRegister(
      selector: 0x1B, limit: 0xFFFF_FFFF, type: 0xB, s: true, dpl: 3, present: true, db: true, g: true)
    state.ss = SegmentRegister(
      selector: 0x23, limit: 0xFFFF_FFFF, type: 0x3, s: true, dpl: 3, present: true, db: true, g: true)
    state.tr = SegmentRegister(selector: 0x48, base: tss, limit: 0x67, type: 0xB, s: false, present: true)
    state.rip = 0x5000
    state.rsp = 0x7000
    state.rflags = 0x202
    legacy.cpu.load(state)
    try legacy.cpu.deliverEvent(vector: 0x20, kind: .external, errorCode: nil)
    #expect(legacy.cpu.rip == 0x12345 && legacy.cpu.currentPrivilegeLevel == 0)
    #expect(legacy.cpu.gpr[4] == 0x9000 - 20)
    #expect(try legacy.read32(0x9000 - 4) == 0x23)
    #expect(try legacy.read32(0x9000 - 8) == 0x7000)
    #expect(try legacy.read32(0x9000 - 12) == 0x202)
    #expect(try legacy.read32(0x9000 - 16) == 0x1B)
    #expect(try legacy.read32(0x9000 - 20) == 0x5000)
    try legacy.cpu.interruptReturn(operandSize: 4)
    #expect(legacy.cpu.rip == 0x5000 && legacy.cpu.gpr[4] == 0x7000 && legacy.cpu.currentPrivilegeLevel == 3)
  }
}

extension CPU {
  /// WRMSR as ring 0 would do it, from a test running the CPU at ring 3.
  func writeMSRAtRingZero(_ index: UInt32, _ value: UInt64) throws(Fault) {
    let saved = state
    var kernel = saved
    kernel.cs = .flatCode(selector: 0x08, long: true)
    kernel.ss = .flatData(selector: 0x10)
    load(kernel)
    defer {
      var restored = saved
      restored.efer = efer
      load(restored)
    }
    try writeMSR(index, value)
  }
}
