import Foundation
import TestSupport
import Testing
import VMCore

@testable import SoftCPU

/// The translator's guest-register cache (`X86Emitter.cachedRegisters`): inside a translated
/// block the most used guest registers live in host registers R8-R11, every write also goes
/// to the register array, and the host registers are reloaded after each helper call and after
/// writes the cache cannot follow (4-byte writes, AH..BH, MOVD). The emitter's rewriting is
/// compared with what the GNU assembler makes of the intended instructions, and programs whose
/// blocks cross each of those paths must end as under the interpreter.
@Suite("RegisterCacheTests")
struct RegisterCacheTests {
  /// An emitter whose cache holds guest RAX in R9 and guest RSP in R10.
  static func cachingEmitter() -> X86Emitter {
    var emitter = X86Emitter()
    var cache = [UInt8](repeating: 0, count: 16)
    cache[0] = HostRegister.r9
    cache[4] = HostRegister.r10
    emitter.cachedRegisters = cache
    return emitter
  }

  /// Each case: what the translator asks for (on guest register slots at [RBX + 8n]) and the
  /// host code it must become, as Intel-syntax assembly.
  static let rewrites: [(String, @Sendable (inout X86Emitter) -> Void, String)] = [
    ("a read of a cached slot", { $0.mov(size: 8, HostRegister.rcx, .at(HostRegister.rbx, 0)) }, "{load} mov rcx, r9"),
    (
      "a 4-byte read", { $0.alu(.cmp, size: 4, .at(HostRegister.rbx, 32), immediate: 7) }, "cmp r10d, 7"
    ),
    (
      "a read-modify-write", { $0.alu(.add, size: 8, .at(HostRegister.rbx, 0), HostRegister.rcx) },
      "add r9, rcx\n mov qword ptr [rbx], r9"
    ),
    (
      "a byte write", { $0.set(HostCondition.equal, .at(HostRegister.rbx, 0)) },
      "sete r9b\n mov qword ptr [rbx], r9"
    ),
    (
      "a 4-byte write, which keeps the slot's upper half",
      { $0.mov(size: 4, .at(HostRegister.rbx, 32), HostRegister.rcx) },
      "mov dword ptr [rbx + 32], ecx\n mov r10, qword ptr [rbx + 32]"
    ),
    (
      "a write of AH", { $0.mov(size: 1, .at(HostRegister.rbx, 1), HostRegister.rcx) },
      "mov byte ptr [rbx + 1], cl\n mov r9, qword ptr [rbx]"
    ),
    ("a read of AH", { $0.mov(size: 1, HostRegister.rcx, .at(HostRegister.rbx, 1)) }, "mov cl, byte ptr [rbx + 1]"),
    (
      "a shift with its count byte", { $0.shift(.shl, size: 8, .at(HostRegister.rbx, 32), count: 3) },
      "shl r10, 3\n mov qword ptr [rbx + 32], r10"
    ),
    (
      "an uncached slot", { $0.alu(.sub, size: 8, .at(HostRegister.rbx, 8), immediate: 1000) },
      "sub qword ptr [rbx + 8], 1000"
    ),
    ("an address, not an access", { $0.lea(HostRegister.rsi, .at(HostRegister.rbx, 0)) }, "lea rsi, [rbx]"),
    (
      "MOVD to a general register",
      { $0.sse(prefix: 0x66, opcode: 0x7E, reg: 0, rm: .at(HostRegister.rbx, 0), writesRM: true) },
      "movd dword ptr [rbx], xmm0\n mov r9, qword ptr [rbx]"
    ),
    (
      "a helper call", { $0.call(.at(HostRegister.r12, 16)) },
      "call qword ptr [r12 + 16]\n mov r9, qword ptr [rbx]\n mov r10, qword ptr [rbx + 32]"
    ),
  ]

  @Test(arguments: 0..<rewrites.count)
  func emitterRewritesGuestRegisterOperands(number: Int) throws {
    let (name, emit, expected) = Self.rewrites[number]
    var emitter = Self.cachingEmitter()
    emit(&emitter)
    emitter.completeAccess()
    let assembled = try CoreAssembler.assemble(expected)
    #expect(emitter.bytes == assembled, "\(name)")
  }

  /// The most used registers are cached, at most four, only those used twice or more, and
  /// RSP counts for the stack forms.
  @Test func theBlockCachesItsMostUsedRegisters() throws {
    let source = """
        add rax, rcx
        add rax, rdx
        imul rax, rcx
        push rdx
        pop rdi
        mov rbx, qword ptr [rsi + 8]
        hlt
      """
    let machine = try CoreMachine(cpl: 0)
    try machine.load(assembly: source)
    var instructions: [Instruction] = []
    var address = CoreMachine.codeBase
    for _ in 0..<6 {
      var instruction = try machine.cpu.decode(at: address).get()
      instruction.selectFastForm()
      instructions.append(instruction)
      address += UInt64(instruction.length)
    }
    let cache = instructions.withUnsafeBufferPointer { BlockTranslator.registerCache($0.baseAddress!, count: $0.count) }
    // RAX: 3 instructions; RCX, RDX: 2 each; RSP: 2 stack forms (counted twice each); RDI,
    // RBX and RSI once each.
    #expect(cache.count == 16)
    let cached = (0..<16).filter { cache[$0] != 0 }
    #expect(cached == [R.rax, R.rcx, R.rdx, R.rsp])
    #expect(Set(cached.map { cache[$0] }) == Set(BlockTranslator.cacheHostRegisters))
  }

  /// Blocks whose cached registers cross every path that must bring host register and
  /// register array back together: helper calls that change them (XCHG, BSF and CMPXCHG16B
  /// run in the interpreter), TLB misses (page-crossing loads and stores), writes of AH and
  /// BH, 4-byte writes through BT and MOVD, a fault in the middle of a block (the last pass
  /// reads unmapped memory), and loops back to the block's entry.
  @Test(arguments: [false, true])
  func programsEndAsUnderTheInterpreter(faults: Bool) throws {
    let source = """
        mov r8d, 200
        mov rax, 0x0123456789ABCDEF
        mov rbx, 0x1111
        mov rcx, 0x2222
      again:
        add rax, rbx
        xchg rax, rcx
        add rax, rcx
        bsf rbx, rax
        add rbx, rax
        mov rdx, qword ptr [rsi + 4093]
        add rax, rdx
        add qword ptr [rsi + 4090], rax
        mov ah, cl
        add rax, rbx
        mov bh, al
        bts eax, 5
        add rbx, rax
        movq xmm0, rbx
        movd ecx, xmm0
        add rcx, rax
        mov rdx, r9
        add rdx, 1
        mov r9, rdx
        cmp r9, r10
        jne 1f
        mov rdx, qword ptr [rdi]
      1:
        dec r8d
        jnz again
        add rax, rcx
        hlt
      """
    var outcomes: [(String, [UInt64], UInt64, [UInt8])] = []
    for tier in [SoftCPUTier.interpreter, .translator, .lockstep] {
      let machine = try CoreMachine(cpl: 0)
      machine.cpu.setExecutionTier(tier, threshold: 1)
      machine.cpu.cr4 |= X86.cr4OSFXSR | X86.cr4OSXMMEXCPT
      try machine.load(assembly: source)
      machine.cpu.gpr[R.rsi] = CoreMachine.dataBase
      // The unmapped address is read in pass 50 when the program is to fault.
      machine.cpu.gpr[R.rdi] = 0x7FFF_0000_0000
      machine.cpu.gpr[R.r10] = faults ? 50 : 1000
      let stop = machine.run(limit: 100_000)
      #expect(machine.cpu.lockstepFailure == nil, "\(machine.cpu.lockstepFailure ?? "")")
      if tier != .interpreter { #expect(machine.cpu.translatedBlockCount > 0) }
      let data = try machine.memory.slice(at: CoreMachine.dataBase + 4088, length: 16)
      outcomes.append(
        ("\(stop)", (0..<16).map { machine.cpu.gpr[$0] }, machine.cpu.rip, (0..<16).map { data[$0] }))
    }
    #expect(outcomes[0].0.contains(faults ? "fault" : "halted"), "\(outcomes[0].0)")
    for outcome in outcomes.dropFirst() {
      #expect(outcome.0 == outcomes[0].0)
      #expect(outcome.1 == outcomes[0].1)
      #expect(outcome.2 == outcomes[0].2)
      #expect(outcome.3 == outcomes[0].3)
    }
  }
}
