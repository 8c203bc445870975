import SoftCPU
import Testing
import VMCore

/// Chains between blocks (the translator's jump cache, the run loop's block links) skip the
/// fetch's page check, so they must never lead from code running at one privilege into code
/// entered at the other.
@Suite("ChainPrivilegeTests")
struct ChainPrivilegeTests {
  /// Kernel code on a supervisor page runs a block (entered from the run loop after PAUSE,
  /// which leaves translated code, so it becomes a chaining target), then IRETQs to user code that jumps to that block's
  /// address: the fetch must raise #PF (vector 14, error code: user, instruction fetch,
  /// present) under every tier, and the kernel block must not run at CPL 3.
  @Test(arguments: [SoftCPUTier.interpreter, .translator])
  func userCodeJumpingIntoKernelCodeFaults(tier: SoftCPUTier) throws {
    let kernelCode = try PrivilegeMachine.kernelCode(
      """
        xor eax, eax
        pause
      target:
        inc r9
      """)
    // The target is the first instruction after XOR (31 C0) and PAUSE (F3 90).
    let target = PrivilegeMachine.kernel + 4
    let userCode = try CoreAssembler.assemble(
      """
        mov rax, \(target)
        jmp rax
      """, origin: DiffLayout.codeBase)
    let (cpu, memory) = try PrivilegeMachine.run(kernelCode, userCode: userCode, tier: tier)
    // Stopped at the HLT of the page-fault handler, the kernel block run once.
    #expect(cpu.rip == PagedEnvironment.handlers + 14 * 16 + 1)
    #expect(cpu.gpr[9] == 1)
    let errorCode = try memory.read(UInt64.self, at: cpu.gpr[4])
    #expect(errorCode == 0x15)
  }
}

/// A page's user and supervisor TLB entries share an index (`tlbIndex` has no privilege in
/// it): only the tag's privilege bit keeps user code from using the kernel's translation.
@Suite("TLBPrivilegeTests")
struct TLBPrivilegeTests {
  /// Kernel code reads a supervisor page (its TLB entry filled at CPL 0), then IRETQs to user
  /// code that reads the same address: the read must raise #PF (error code: present, user,
  /// read) under every tier instead of hitting the kernel's entry, and load nothing.
  @Test(arguments: [SoftCPUTier.interpreter, .translator])
  func userReadOfAPageTheKernelJustReadFaults(tier: SoftCPUTier) throws {
    let kernelCode = try PrivilegeMachine.kernelCode(
      """
        mov rax, qword ptr [\(PagedEnvironment.gdt + 8)]
      """)
    let userCode = try CoreAssembler.assemble(
      """
        mov rax, \(PagedEnvironment.gdt + 8)
        mov rdx, qword ptr [rax]
        mov r9, 1
        jmp rax
      """, origin: DiffLayout.codeBase)
    let (cpu, memory) = try PrivilegeMachine.run(kernelCode, userCode: userCode, tier: tier)
    // Stopped at the HLT of the page-fault handler, with nothing loaded at CPL 3.
    #expect(cpu.rip == PagedEnvironment.handlers + 14 * 16 + 1)
    #expect(cpu.gpr[0] == PagedEnvironment.gdt + 8)
    #expect(cpu.gpr[2] == 0 && cpu.gpr[9] == 0)
    let errorCode = try memory.read(UInt64.self, at: cpu.gpr[4])
    #expect(errorCode == 0x5)
  }
}

/// A paged machine (`PagedEnvironment`) that starts at CPL 0 in kernel code, which IRETQs to
/// user code at `DiffLayout.codeBase`.
enum PrivilegeMachine {
  /// Where the kernel code runs: a supervisor page of its own (past the GDT and the TSS), not
  /// the stack's, whose pushes would invalidate it.
  static let kernel = PagedEnvironment.gdt + 0x800
  /// The user code's stack.
  static let userStack = DiffLayout.dataBase + 0x800

  /// `body` at `kernel`, followed by an IRETQ to the user code at CPL 3 (RCX and RBX clobbered).
  static func kernelCode(_ body: String) throws -> [UInt8] {
    try CoreAssembler.assemble(
      body + """

          mov rcx, \(DiffLayout.codeBase)
          mov rbx, \(userStack)
          push 0x2b
          push rbx
          push 2
          push 0x33
          push rcx
          iretq
        """, origin: kernel)
  }

  /// Runs the two programs under `tier` (translating from the first run of a block) until the
  /// CPU halts (at most 1 000 instructions), and returns the CPU and its memory.
  static func run(_ kernelCode: [UInt8], userCode: [UInt8], tier: SoftCPUTier) throws -> (CPU, GuestMemory) {
    let memory = try GuestMemory(size: DiffLayout.guestRAMSize)
    try PagedEnvironment.install(memory)
    try memory.slice(at: kernel, length: UInt64(kernelCode.count)).copyBytes(from: kernelCode)
    try memory.slice(at: DiffLayout.codeBase, length: UInt64(userCode.count)).copyBytes(from: userCode)
    let cpu = CPU(memory: memory, bus: IOBus())
    var state = PagedEnvironment.state
    state.cs = SegmentRegister(
      selector: 0x10, base: 0, limit: 0xFFFF_FFFF, type: 0xB, s: true, dpl: 0, present: true, db: false, l: true,
      g: true)
    state.ss = SegmentRegister(
      selector: 0x18, base: 0, limit: 0xFFFF_FFFF, type: 0x3, s: true, dpl: 0, present: true, db: true, g: true)
    state.rip = kernel
    state.rflags = 2
    cpu.load(state)
    cpu.gpr[4] = PagedEnvironment.stackTop
    cpu.setExecutionTier(tier, threshold: 0)
    let stop = cpu.run(instructionLimit: 1_000)
    #expect("\(stop)" == "halted")
    return (cpu, memory)
  }
}
