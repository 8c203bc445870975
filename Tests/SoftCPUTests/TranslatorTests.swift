import Foundation
import SoftCPU
import TestSupport
import Testing
import VMCore

/// The translating tier against the interpreter: the benchmark programs
/// (Tests/GuestPrograms/bench/bench.S, assembled at test time) run to the end under each tier
/// must leave the same registers, flags, instruction count and memory; lockstep mode checks
/// every translated block of them and of random instruction sequences. The differential tests
/// (DifferentialTests) compare the translator with the host CPU form by form.
@Suite("TranslatorTests")
struct TranslatorTests {
  static let benchSource = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("GuestPrograms/bench/bench.S")
  static let loadAddress: UInt64 = 0x10_0000

  /// The flat image of bench.S program `program` (one repetition).
  static func benchImage(_ program: Int) throws -> [UInt8] {
    try CoreAssembler.linkedImage(
      sourcePath: benchSource.path, bits: 64, at: loadAddress,
      assemblerArguments: ["--defsym", "PROGRAM=\(program)", "--defsym", "REPEAT=1"])
  }

  struct Outcome: Equatable {
    var gpr: [UInt64]
    var rip: UInt64
    var rflags: UInt64
    var instructions: UInt64
    var memoryDigest: UInt64
    var stop: String
  }

  /// Runs `image` in flat long mode at CPL 0 (as hostvisor-softbench does) under `tier`.
  static func execute(_ image: [UInt8], tier: SoftCPUTier, threshold: UInt32 = 0) throws -> (Outcome, CPU) {
    let memory = try GuestMemory(size: 64 << 20)
    let target = try memory.slice(at: loadAddress, length: UInt64(image.count))
    image.withUnsafeBytes { target.copyMemory(from: $0) }
    let cpu = CPU(memory: memory, bus: IOBus())
    cpu.enterFlatLongMode(cpl: 0)
    cpu.setExecutionTier(tier, threshold: threshold)
    cpu.rip = loadAddress
    cpu.gpr[4] = 0x9_0000
    var stop = "limit"
    loop: for _ in 0..<400 {
      switch cpu.run(instructionLimit: 1_000_000) {
      case .halted:
        stop = "halted"
        break loop
      case .fault(let fault):
        stop = "fault \(fault.vector)"
        break loop
      case .stopRequested:
        stop = "stop"
        break loop
      case .instructionLimit:
        continue
      }
    }
    // FNV-1a over guest RAM below 16 MiB (code, data and stack of the programs).
    let ram = try memory.slice(at: 0, length: 16 << 20)
    var digest: UInt64 = 0xCBF2_9CE4_8422_2325
    for index in stride(from: 0, to: ram.count, by: 8) {
      digest = (digest ^ ram.loadUnaligned(fromByteOffset: index, as: UInt64.self)) &* 0x100_0000_01B3
    }
    let outcome = Outcome(
      gpr: (0..<16).map { cpu.gpr[$0] }, rip: cpu.rip, rflags: cpu.rflags, instructions: cpu.retiredInstructions,
      memoryDigest: digest, stop: stop)
    return (outcome, cpu)
  }

  /// checksum, memcpy-rep, memcpy-sse2, sieve, sse2-float.
  @Test(arguments: [1, 2, 3, 4, 5])
  func benchProgramSameUnderEveryTier(program: Int) throws {
    let image = try Self.benchImage(program)
    let (reference, _) = try Self.execute(image, tier: .interpreter)
    #expect(reference.stop == "halted")
    for (tier, threshold) in [(SoftCPUTier.translator, UInt32(0)), (.translator, SoftCPUTier.defaultThreshold)] {
      let (outcome, cpu) = try Self.execute(image, tier: tier, threshold: threshold)
      #expect(outcome == reference, "tier \(tier.rawValue) threshold \(threshold)")
      #expect(cpu.translatedBlockCount > 0)
    }
    let (checked, cpu) = try Self.execute(image, tier: .lockstep)
    #expect(cpu.lockstepFailure == nil, "\(cpu.lockstepFailure ?? "")")
    #expect(checked == reference)
    #expect(cpu.lockstepCheckCount > 0)
  }

  /// The guest's status flags survive every outcome of the translated TLB probe between the
  /// instruction that sets them and the ones that read them: a hit in the primary way, a hit in
  /// the victim way (two pages that share an index, read in turn), a miss that fills, and the
  /// page-crossing loads and stores that always miss and go through the helpers. Among them are
  /// accesses after which the probe does not put the flags back (a load or store followed by an
  /// instruction that writes them all, a CMP or ADD with a memory operand), next to ones after
  /// which they are read (ADC, SETcc, Jcc), and runs of loads, stores (16-bit and MOVSX among
  /// them), PUSH and POP that keep the flags parked in EBP from one probe to the next. Each
  /// pass sums CF, OF, SF and ZF as they were after an instruction that came before the
  /// accesses, so a flag lost on any path changes R8.
  @Test func flagsSurviveEveryOutcomeOfTheProbe() throws {
    // Pages 0x100 and 0x4FF share a TLB index (page + page / 1024, modulo 1024).
    let source = """
        mov rsi, 0x100000
        mov rbp, 0x4FF000
        mov rdi, 0x101000
        mov r12, 0x102FFC
        mov rax, 0x0123456789ABCDEF
        mov rbx, 0x7000000000000001
        xor r8, r8
        mov r9d, 200
      again:
        add rax, rbx
        mov rcx, [rsi]
        mov rdx, [rbp]
        mov rcx, [rsi]
        adc r8, rcx
        cmp rax, rbx
        mov [rdi], r8
        mov rdx, [r12]
        seto cl
        movzx ecx, cl
        lea r8, [r8 + rcx * 2]
        cmp rbx, rax
        mov [r12], rax
        mov rcx, [rbp]
        mov [rsi], rdx
        sets cl
        movzx ecx, cl
        lea r8, [r8 + rcx * 4]
        test rax, 0x700
        mov rdx, [rsi]
        mov rcx, [rbp]
        setz cl
        movzx ecx, cl
        lea r8, [r8 + rcx * 8]
        cmp rbx, rax
        push rdx
        mov rdx, [r12]
        mov [rdi + 16], rdx
        mov word ptr [rdi + 24], dx
        movsx r11d, byte ptr [rdi + 17]
        pop rdx
        mov rcx, [rbp]
        setb cl
        movzx ecx, cl
        lea r8, [r8 + rcx * 8]
        cmp rax, [rbp]
        mov rdx, [r12]
        sub r10, rdx
        adc r8, 0
        cmp [rsi], rbx
        mov [rdi + 8], rax
        xor r11, rax
        setl cl
        movzx ecx, cl
        add r8, rcx
        add rbx, [r12]
        mov rcx, [rsi]
        jc 1f
        add r8, 16
      1:
        rol r8, 5
        ror rbx, 7
        dec r9d
        jnz again
        hlt
      """
    var results: [(stop: String, registers: [UInt64], flags: UInt64, memory: [UInt64])] = []
    for tier in [SoftCPUTier.interpreter, .translator] {
      let machine = try CoreMachine(cpl: 0)
      machine.cpu.setExecutionTier(tier, threshold: 0)
      try machine.load(assembly: source)
      let stop = machine.run()
      if tier == .translator { #expect(machine.cpu.translatedBlockCount > 0) }
      let memory = try [UInt64(0x100000), 0x101000, 0x101008, 0x101010, 0x101018, 0x102FF8, 0x103000, 0x4FF000].map {
        try machine.memory.read(UInt64.self, at: $0)
      }
      results.append(("\(stop)", (0..<16).map { machine.cpu.gpr[$0] }, machine.cpu.rflags, memory))
    }
    #expect(results[0].stop.contains("halted"))
    #expect(results[0].registers[R.r9] == 0)
    #expect(results[1].stop == results[0].stop)
    #expect(results[1].registers == results[0].registers)
    #expect(results[1].flags == results[0].flags)
    #expect(results[1].memory == results[0].memory)
  }

  /// Random sequences of the differential tests' integer forms, each checked in lockstep.
  @Test func randomSequencesInLockstep() throws {
    let forms = (FormTable.integer + FormTable.control).filter { !DifferentialTests.terminalForms.contains($0.name) }
    var checks = 0
    for runner in [EmulatedRunner(tier: .lockstep), EmulatedRunner(paging: true, tier: .lockstep)] {
      for caseIndex in 0..<600 {
        let focus = forms[caseIndex % forms.count]
        let testCase = CaseGenerator.makeCase(focus: focus, fillers: forms, seed: DiffRNG.mix(7, UInt64(caseIndex)))
        let result = runner.run(code: testCase.code, initial: testCase.initial, data: testCase.data)
        #expect(result.lockstepFailure == nil, "\(focus.name): \(result.lockstepFailure ?? "")")
        checks += result.lockstepChecks
      }
    }
    #expect(checks > 500)
  }

  /// A loop that stores its counter into the immediate of a later instruction of its own block
  /// (3 iterations: RBX ends as 3 + 2 + 1).
  static let selfModifyingLoop = """
      mov ecx, 3
    again:
      lea rdx, [rip + patch + 1]
      mov byte ptr [rdx], cl
    patch:
      mov eax, 0
      add rbx, rax
      dec ecx
      jnz again
      hlt
    """

  /// A store into the block being run: the translated block ends after the store and the
  /// modified code runs (self-modifying code stays exact under the translator).
  @Test func selfModifyingCodeUnderTheTranslator() throws {
    let source = Self.selfModifyingLoop
    for tier in [SoftCPUTier.interpreter, .translator, .lockstep] {
      let machine = try CoreMachine(cpl: 0)
      machine.cpu.setExecutionTier(tier, threshold: 0)
      try machine.load(assembly: source)
      _ = machine.run()
      #expect(machine.cpu.gpr[3] == 3 + 2 + 1, "tier \(tier.rawValue)")
      #expect(machine.cpu.lockstepFailure == nil)
    }
  }

  /// The block cache's counters: the interpreter counts every instruction as interpreted, the
  /// translator few of a hot loop's; each store into decoded code counts an invalidation, and a
  /// flush counts as one.
  @Test func statisticsCountInterpretedDecodedAndInvalidatedCode() throws {
    let source = Self.selfModifyingLoop
    let machine = try CoreMachine(cpl: 0)
    machine.cpu.setExecutionTier(.interpreter)
    try machine.load(assembly: source)
    let before = machine.cpu.statistics
    _ = machine.run()
    let counts = machine.cpu.statistics
    #expect(counts.interpretedInstructions == machine.cpu.retiredInstructions)
    #expect(counts.interpretedInstructions == 1 + 3 * 6 + 1)
    #expect(counts.codePageInvalidations == 3, "one per store into the decoded loop")
    #expect(counts.blocksDecoded >= 4, "the first block and one per store")
    #expect(counts.decodedBlockFlushes == before.decodedBlockFlushes && counts.codeBufferFlushes == 0)
    machine.cpu.flushDecodedBlocks()
    #expect(machine.cpu.statistics.decodedBlockFlushes == before.decodedBlockFlushes + 1)
    #expect(machine.cpu.statistics.arenaFullFlushes == 0 && machine.cpu.statistics.postedWriteOverflows == 0)

    let (_, cpu) = try Self.execute(try Self.benchImage(1), tier: .translator, threshold: 0)
    #expect(cpu.statistics.interpretedInstructions > 0)
    #expect(cpu.statistics.interpretedInstructions < cpu.retiredInstructions / 100)
    #expect(cpu.statisticsReport(index: 0).contains("interpreted \(cpu.statistics.interpretedInstructions),"))
  }

  /// JMP and CALL through a register and through memory chain like direct transfers; a
  /// non-canonical target raises #GP(0) at the branch, with the state before it.
  @Test func indirectJumpsAndCalls() throws {
    let source = """
        lea rbx, [rip + function]
        mov qword ptr [rsi], rbx
        mov ecx, 200
      again:
        call rbx
        call qword ptr [rsi]
        lea rdx, [rip + next]
        jmp rdx
      next:
        dec ecx
        jnz again
        mov rdi, 0x800000000000
        cmp ecx, 1
        jmp rdi
      function:
        add rax, 3
        ret
      """
    var outcomes: [(String, UInt64, [UInt64], UInt64)] = []
    for tier in [SoftCPUTier.interpreter, .translator, .lockstep] {
      let machine = try CoreMachine(cpl: 0)
      machine.cpu.setExecutionTier(tier, threshold: 0)
      try machine.load(assembly: source)
      machine.cpu.gpr[6] = CoreMachine.dataBase
      let stop = machine.run()
      #expect(machine.cpu.lockstepFailure == nil, "\(machine.cpu.lockstepFailure ?? "")")
      if tier != .interpreter { #expect(machine.cpu.translatedBlockCount > 0) }
      outcomes.append(("\(stop)", machine.cpu.rip, (0..<16).map { machine.cpu.gpr[$0] }, machine.cpu.rflags))
    }
    #expect(outcomes[0].2[0] == 200 * 6)
    #expect(outcomes[0].0.contains("vector: 13"))
    for outcome in outcomes.dropFirst() {
      #expect(outcome.0 == outcomes[0].0)
      #expect(outcome.1 == outcomes[0].1)
      #expect(outcome.2 == outcomes[0].2)
      #expect(outcome.3 == outcomes[0].3)
    }
  }

  /// Multiplies, shifts (by an immediate and by CL) and rotates by an immediate leave every status flag as the interpreter sets it,
  /// the undefined ones too, on any host: translated as host instructions, followed on hosts
  /// whose undefined flags differ (an AMD EPYC host) by code that sets the interpreter's. Each
  /// operation's flags are pushed and summed into R8 after it, so a difference in any flag of
  /// any step shows up.
  @Test func multiplyAndShiftFlagsMatchTheInterpreter() throws {
    let operations = [
      "imul rax, rbx", "imul eax, ebx", "imul rax, rbx, 0x1234567", "imul eax, ebx, -3", "mul rbx",
      "shl rax, 1", "shl rax, 7", "shl eax, 31", "shr rax, 1", "shr rax, 13", "shr eax, 5", "sar rax, 1",
      "sar rax, 63", "sar eax, 9", "shl rbx, 2", "shr ebx, 30", "rol rax, 1", "rol rax, 5", "rol eax, 17",
      "ror rax, 1", "ror rax, 9", "ror eax, 3", "ror ebx, 31",
      // By CL, the count taken from RBX: 0 (the flags stay), masked counts, 1.
      "mov rcx, rbx\n  shl rax, cl", "mov rcx, rbx\n  shr rax, cl", "mov rcx, rbx\n  sar rax, cl",
      "mov rcx, rbx\n  shl eax, cl", "mov rcx, rbx\n  shr eax, cl", "mov rcx, rbx\n  sar eax, cl",
      "cmp rax, rbx\n  mov ecx, 64\n  shl rax, cl", "cmp rbx, rax\n  mov ecx, 32\n  shr eax, cl",
      // Instructions that leave the flags alone between the operation and the next reader
      // (PUSHFQ below) or writer: the fix-up stays before a reader and goes before a writer.
      "imul rax, rbx\n  mov rcx, rdx\n  lea rdx, [rcx + 8]\n  movzx ecx, dl",
      "imul eax, ebx\n  mov rcx, rax\n  not rcx\n  mov edx, 5\n  nop", "shl rax, 7\n  mov rdx, rax\n  movsxd rcx, edx",
      "rol rax, 9\n  lea rcx, [rax + rbx]\n  mov rdx, rcx", "imul rax, rbx\n  mov rcx, rax\n  add rcx, rbx",
      "imul rax, rbx, 7\n  mov rcx, rax\n  imul rcx, rbx\n  mov rdx, rcx",
      // A reader (SETcc) between the operation and a writer: the fix-up stays.
      "imul rax, rbx\n  lea rcx, [rax + 1]\n  setp cl\n  add r8, rcx",
      "imul eax, ebx\n  mov rcx, rdx\n  sets cl\n  add r8, rcx",
      "shl rax, 5\n  mov rcx, rbx\n  seto cl\n  add r8, rcx", "rol rax, 3\n  mov rcx, rbx\n  seto cl\n  sub r8, rcx",
    ]
    let values: [(UInt64, UInt64)] = [
      (3, 5), (UInt64.max, 1), (0, 7), (0x8000_0000_0000_0001, 3), (0x4000_0000_0000_0000, 2),
      (0xC000_0000_0000_0005, 0),
      (0x1234_5678_9ABC_DEF1, 0x0F0F_0F0F_0F0F_0F0F), (0xFFFF_FFFF, 0xFFFF_FFFF), (0x7FFF_FFFF, 0x8000_0000),
    ]
    var body = "  xor r8, r8\n"
    for (a, b) in values {
      for operation in operations {
        body += "  mov rax, 0x\(String(a, radix: 16))\n  mov rbx, 0x\(String(b, radix: 16))\n"
        // PUSHFQ is interpreted, and so is the rest of its block: the JMP starts a new block, so
        // every operation begins a translated prefix.
        body += "  \(operation)\n  pushfq\n  pop rcx\n  and ecx, 0x8D5\n  add r8, rcx\n  rol r8, 3\n  xor r8, rax\n"
        body += "  jmp 1f\n1:\n"
      }
    }
    let source = "  mov r9d, 40\nagain:\n" + body + "  dec r9d\n  jnz again\n  hlt\n"
    var results: [(String, [UInt64])] = []
    for tier in [SoftCPUTier.interpreter, .translator, .lockstep] {
      let machine = try CoreMachine(cpl: 0)
      machine.cpu.setExecutionTier(tier, threshold: 2)
      try machine.load(assembly: source)
      let stop = machine.run()
      #expect(machine.cpu.lockstepFailure == nil, "\(machine.cpu.lockstepFailure ?? "")")
      if tier != .interpreter { #expect(machine.cpu.translatedBlockCount > 0) }
      results.append(("\(stop)", [machine.cpu.gpr[8], machine.cpu.gpr[0], machine.cpu.gpr[3]]))
    }
    #expect(results[0].0.contains("halted"))
    for result in results.dropFirst() {
      #expect(result.0 == results[0].0)
      #expect(result.1 == results[0].1)
    }
  }

  /// The integer forms translated by their op (ALU, TEST, INC/DEC/NEG/NOT in every operand
  /// size with AH..BH, on registers and memory, LOCK forms, unsigned DIV, BT*, CMPXCHG,
  /// XADD, MOVZX/MOVSX, 8/16-bit MOV, CBW/CWD families, BSWAP, SETcc to memory) give the
  /// interpreter's registers, flags and memory, and a DIV that faults (#DE) stops at the DIV
  /// with the state before it. As 64-bit code and, the forms that exist there narrowed to 32
  /// bits (`narrowedTo32Bit`), as 32-bit protected-mode code.
  @Test(arguments: [false, true], HostileCodeSize.allCases)
  func integerFormsMatchTheInterpreter(divideFaults: Bool, size: HostileCodeSize) throws {
    let allSteps = [
      "add bl, cl", "adc bh, al", "sub ah, 0x7f", "cmp ch, dl", "xor dh, bh", "or al, 0x81", "and cl, ah",
      "sbb dl, 3", "test bh, 0x80", "test ah, cl", "inc ah", "dec bl", "neg ch", "not dh",
      "add bx, cx", "sub ax, 0x1234", "cmp dx, 7", "inc cx", "neg bx", "test ax, 0x8001",
      "adc ebx, ecx", "sbb eax, -5", "cmp ecx, ebx", "test edx, eax", "inc ebx", "dec eax", "not ecx",
      "add byte ptr [rsi], 0x90", "sub word ptr [rsi + 2], ax", "adc dword ptr [rsi + 4], ebx",
      "sbb qword ptr [rsi + 8], 17", "and dword ptr [rsi + 16], 0xF0F0F0F0", "or byte ptr [rsi + 1], ah",
      "xor qword ptr [rsi + 24], rcx", "inc dword ptr [rsi + 4]", "dec qword ptr [rsi + 8]",
      "neg word ptr [rsi + 2]", "not byte ptr [rsi + 3]", "lock add qword ptr [rsi + 8], rax",
      "lock inc dword ptr [rsi + 16]", "lock xor byte ptr [rsi + 5], cl", "lock dec qword ptr [rsi + 24]",
      "cmp byte ptr [rsi], bl", "cmp dword ptr [rsi + 4], 99", "test qword ptr [rsi + 8], rdx",
      "test byte ptr [rsi + 1], 0x41", "add cl, byte ptr [rsi + 1]", "sub bx, word ptr [rsi + 2]",
      "xor edx, dword ptr [rsi + 4]", "cmp rax, qword ptr [rsi + 8]", "and ah, byte ptr [rsi + 3]",
      "bt ebx, 3", "bts rcx, 63", "btr dx, 9", "btc eax, 31", "bt qword ptr [rsi + 8], 40",
      "lock bts dword ptr [rsi + 4], 7", "btr word ptr [rsi + 2], 15", "lock btc qword ptr [rsi + 24], 0",
      "lock cmpxchg qword ptr [rsi + 8], rcx", "cmpxchg dword ptr [rsi + 4], ebx",
      "mov eax, dword ptr [rsi + 4]\n  lock cmpxchg dword ptr [rsi + 4], edx", "cmpxchg byte ptr [rsi + 1], cl",
      "lock xadd qword ptr [rsi + 16], rbx", "xadd word ptr [rsi + 2], cx", "lock xadd byte ptr [rsi + 3], dl",
      "movzx ebx, ah", "movsx rcx, byte ptr [rsi + 3]", "movsx dx, bl", "movzx bx, byte ptr [rsi + 1]",
      "movsx eax, word ptr [rsi + 2]", "movsxd ecx, dword ptr [rsi + 4]", "movsxd edx, ebx", "movzx ecx, ch",
      "mov bh, cl", "mov ah, byte ptr [rsi + 5]", "mov byte ptr [rsi + 6], dh", "mov cx, word ptr [rsi + 2]",
      "mov word ptr [rsi + 10], bx", "mov dx, ax", "mov ch, 0x9C", "mov bl, 0x7F", "mov r14b, 0x81",
      "mov ax, 0xBEEF", "mov byte ptr [rsi + 9], 0xA5", "mov word ptr [rsi + 12], 0x8421",
      "push 0x7F\n  pop r10\n  add rbx, r10", "push -100000\n  pop r10\n  xor rcx, r10",
      "push qword ptr [rsi + 8]\n  pop r10\n  add rdx, r10", "push rbp\n  mov rbp, rsp\n  push rbx\n  push 5\n  leave",
      "lfence", "mfence", "sfence", "cbw", "cwde", "cdqe", "cwd", "cdq", "cqo",
      "bswap ebx", "bswap rcx", "mul ebx", "imul ecx", "mul dword ptr [rsi + 4]", "imul qword ptr [rsi + 8]",
      "mul qword ptr [rsi + 16]", "imul rbx", "mov eax, 3\n  mul ebx", "cmp eax, ebx\n  setl byte ptr [rsi + 7]",
      "cmp eax, ebx\n  cmovl ecx, dword ptr [rsi + 4]", "test ecx, edx\n  cmovs rbx, qword ptr [rsi + 8]",
      "cmp ecx, edx\n  cmovae edx, dword ptr [rsi + 16]",
      "test ecx, edx\n  sets byte ptr [rsi + 11]",
      "shr bx, 3", "sar cx, 15", "shl ax, 1", "sal dx, 9", "shr bx, 1", "sar ax, 1", "shl dh, 7", "sar ah, 3",
      "shr cl, 1", "shl r14b, 2", "sar r14w, 6", "shr dx, 15\n  shl bx, 4\n  add ecx, ebx",
      "mov r10, rax\n  mov r11, rdx\n  mov rdx, rbx\n  and edx, 0xFFFF\n  mov rax, rcx\n  mov r12d, 0x10007\n  div r12\n  add rbx, rax\n  add rcx, rdx\n  mov rax, r10\n  mov rdx, r11",
      "mov r10, rax\n  mov r11, rdx\n  xor edx, edx\n  mov eax, ebx\n  mov dword ptr [rsi + 32], 0x3001\n  div dword ptr [rsi + 32]\n  add ecx, eax\n  add ebx, edx\n  mov rax, r10\n  mov rdx, r11",
    ]
    let steps = size == .bits64 ? allSteps : allSteps.compactMap(Self.narrowedTo32Bit)
    var body = ""
    for (number, step) in steps.enumerated() {
      let salt = number * 0x9E37_79B9 & 0xFFF_FFFF
      if size == .bits64 {
        body += "  mov rax, r13\n  add rax, \(salt)\n  mov rcx, rax\n  rol rcx, 17\n"
        body += "  mov rdx, rax\n  ror rdx, 29\n  \(step)\n  pushfq\n  pop rdi\n  and edi, 0x8D5\n  add r8, rdi\n"
        body +=
          "  rol r8, 5\n  xor r8, rax\n  add r8, rcx\n  xor r8, rdx\n  add r8, rbx\n  mov r13, rax\n  xor r13, rdx\n"
      } else {
        // EBP accumulates as R8 does; R13's value and R9D's count live at [esi + 40] and [esi + 44].
        body += "  mov eax, dword ptr [esi + 40]\n  add eax, \(salt)\n  mov ecx, eax\n  rol ecx, 17\n"
        body += "  mov edx, eax\n  ror edx, 29\n  \(step)\n  pushfd\n  pop edi\n  and edi, 0x8D5\n  add ebp, edi\n"
        body += "  rol ebp, 5\n  xor ebp, eax\n  add ebp, ecx\n  xor ebp, edx\n  add ebp, ebx\n"
        body += "  mov dword ptr [esi + 40], eax\n  xor dword ptr [esi + 40], edx\n"
      }
      // A new block per step (PUSHFQ ends the translated prefix of its block).
      body += "  jmp 1f\n1:\n"
    }
    // The faulting variant divides by zero once, late in the loop.
    let source: String
    if size == .bits64 {
      let fault = divideFaults ? "  cmp r9d, 3\n  jne 2f\n  xor edi, edi\n  div rdi\n2:\n" : ""
      source =
        "  mov r9d, 30\n  mov r13, 0x0123456789ABCDEF\n  mov rbx, 0x5555\nagain:\n" + body + fault
        + "  dec r9d\n  jnz again\n  hlt\n"
    } else {
      let fault = divideFaults ? "  cmp dword ptr [esi + 44], 3\n  jne 2f\n  xor edi, edi\n  div edi\n2:\n" : ""
      source =
        "  mov dword ptr [esi + 44], 30\n  mov dword ptr [esi + 40], 0x89ABCDEF\n  mov ebx, 0x5555\nagain:\n"
        + body + fault + "  dec dword ptr [esi + 44]\n  jnz again\n  hlt\n"
    }
    var results: [(String, [UInt64], UInt64, [UInt8])] = []
    for tier in [SoftCPUTier.interpreter, .translator, .lockstep] {
      let machine = try CoreMachine(cpl: 0)
      machine.cpu.setExecutionTier(tier, threshold: 2)
      if size == .bits64 {
        try machine.load(assembly: source)
      } else {
        machine.cpu.enterFlatProtectedMode(cpl: 0)
        try machine.load(Translator32BitTests.assemble(source))
      }
      machine.cpu.gpr[6] = CoreMachine.dataBase
      let stop = machine.run(limit: 10_000_000)
      #expect(machine.cpu.lockstepFailure == nil, "\(machine.cpu.lockstepFailure ?? "")")
      if tier != .interpreter { #expect(machine.cpu.translatedBlockCount > 0) }
      let data = try machine.memory.slice(at: CoreMachine.dataBase, length: 40)
      results.append(
        ("\(stop)", (0..<16).map { machine.cpu.gpr[$0] }, machine.cpu.rip, (0..<40).map { data[$0] }))
    }
    #expect(results[0].0.contains(divideFaults ? "vector: 0" : "halted"), "\(results[0].0)")
    for result in results.dropFirst() {
      #expect(result.0 == results[0].0)
      #expect(result.1 == results[0].1)
      #expect(result.2 == results[0].2)
      #expect(result.3 == results[0].3)
    }
  }

  /// A loop of one block whose first instruction reads the flags its previous run left (ADC
  /// after DEC, which keeps CF; ADC after JMP) keeps them in the host RFLAGS from one run to
  /// the next (`loopToBlockEntryKeepingFlags`). Run in slices of `slice` instructions, the
  /// loops also leave at every point of the block (the budget check), where the flags must be
  /// stored: the registers, flags and instruction counts stay the interpreter's.
  @Test(arguments: [5, 7, 9, 1_000_000])
  func selfLoopsCarryTheirFlagsFromOneRunToTheNext(slice: Int) throws {
    let counted = """
        mov ecx, 300
        mov rax, 0x8000000000000001
        mov rbx, 0xC000000000000003
        xor r8, r8
        stc
      again:
        adc rax, rbx
        adc r8, 0
        dec ecx
        jnz again
        hlt
      """
    let endless = """
        mov rax, 0x9000000000000005
        stc
      top:
        adc r9, rax
        lea r10, [r10 + 1]
        jmp top
      """
    for (name, source, total) in [("jnz", counted, 2_000), ("jmp", endless, 1_501)] {
      var outcomes: [(registers: [UInt64], flags: UInt64, instructions: UInt64, stop: String)] = []
      for tier in [SoftCPUTier.interpreter, .translator] {
        let machine = try CoreMachine(cpl: 0)
        machine.cpu.setExecutionTier(tier, threshold: 0)
        try machine.load(assembly: source)
        var stop = StopCause.instructionLimit
        var left = total
        while left > 0 && stop == .instructionLimit {
          stop = machine.run(limit: min(slice, left))
          left -= slice
        }
        if tier == .translator { #expect(machine.cpu.translatedBlockCount > 0, "\(name)") }
        outcomes.append(
          ((0..<16).map { machine.cpu.gpr[$0] }, machine.cpu.rflags, machine.cpu.retiredInstructions, "\(stop)"))
      }
      #expect(outcomes[0].stop == (name == "jnz" ? "halted" : "instructionLimit"), "\(name)")
      #expect(outcomes[1].stop == outcomes[0].stop, "\(name)")
      #expect(outcomes[1].registers == outcomes[0].registers, "\(name)")
      #expect(outcomes[1].flags == outcomes[0].flags, "\(name)")
      #expect(outcomes[1].instructions == outcomes[0].instructions, "\(name)")
    }
  }

  /// ADC and SBB of a 64-bit register and memory read CF after their access: the TLB probe
  /// must put the flags back even where the next instruction overwrites all of them (it did
  /// not, and `adc rdx, [rsi]; and eax, imm` added the probe's carry instead of the guest's:
  /// found by `hostileBytesSameUnderBothTiers` with seed 3).
  @Test(arguments: ["adc", "sbb"])
  func carryReadingLoadKeepsTheCarryAcrossItsProbe(operation: String) throws {
    let source = """
        mov ecx, 3
      again:
        mov rdx, 0x86
        stc
        \(operation) rdx, qword ptr [rsi + 8]
        and eax, 0x1234
        add rbx, rdx
        dec ecx
        jnz again
        hlt
      """
    var sums: [UInt64] = []
    for tier in [SoftCPUTier.interpreter, .translator] {
      let machine = try CoreMachine(cpl: 0)
      machine.cpu.setExecutionTier(tier, threshold: 0)
      try machine.load(assembly: source)
      machine.cpu.gpr[6] = CoreMachine.dataBase
      #expect(machine.run() == .halted)
      if tier == .translator { #expect(machine.cpu.translatedBlockCount > 0) }
      sums.append(machine.cpu.gpr[3])
    }
    // The qword at [rsi + 8] is 0: 0x86 plus or minus the carry, three times.
    #expect(sums[0] == 3 * (operation == "adc" ? 0x87 : 0x85))
    #expect(sums[1] == sums[0], "translator: 0x\(String(sums[1], radix: 16))")
  }

  /// An integer form of `integerFormsMatchTheInterpreter` as 32-bit code: RAX-RSP, RSI and R10
  /// (a scratch register there) become EAX-ESP, ESI and EDI, QWORD operands DWORD ones; nil
  /// when it needs another of R8-R15 or a form 32-bit code lacks (CDQE, CQO, MOVSXD).
  static func narrowedTo32Bit(_ step: String) -> String? {
    if step.contains(/\b(r(8|9|1[1-5])[bwd]?|cdqe|cqo|movsxd)\b/) { return nil }
    return step.replacing(/\br10\b/, with: "edi").replacing(/\bqword\b/, with: "dword")
      .replacing(/\br(ax|bx|cx|dx|sp|bp|si|di)\b/) { "e" + $0.1 }
  }

  /// Instructions without a translation of their own that translated code runs through the
  /// interpreter helper (`BlockTranslator.interpretedOps`: REP MOVS/STOS/LODS in both
  /// directions, REPNE SCAS and REPE CMPS that stop early or run out, SCAS and CMPS alone,
  /// PUSHF, CLI, shifts of memory, by CL, by 0 and by the operand's width or more, BSF/BSR,
  /// 16-bit CMOVcc from memory, XCHG, IMUL, CMPXCHG16B, SWAPGS) give the interpreter's
  /// registers, flags and memory; a REP STOSB into the next instruction of its own block
  /// changes what runs, and a REP MOVSB that runs off the end of RAM faults with the
  /// interpreter's partial progress (RCX, RSI, RDI).
  @Test(arguments: [false, true])
  func interpretedFormsMatchTheInterpreter(moveFaults: Bool) throws {
    let steps = [
      "lea rsi, [r15 + 3]\n  lea rdi, [r15 + 80]\n  mov ecx, 21\n  rep movsb",
      "lea rdi, [r15 + 128]\n  mov ecx, 5\n  rep stosq",
      "std\n  lea rsi, [r15 + 40]\n  lea rdi, [r15 + 200]\n  mov ecx, 9\n  rep movsb\n  cld",
      "lea rsi, [r15 + 8]\n  lodsq", "lea rdi, [r15 + 300]\n  stosw",
      "lea rdi, [r15 + 1]\n  mov ecx, 40\n  repne scasb", "lea rdi, [r15 + 200]\n  mov ecx, 7\n  repne scasw",
      "lea rsi, [r15 + 3]\n  lea rdi, [r15 + 80]\n  mov ecx, 30\n  repe cmpsb",
      "std\n  lea rsi, [r15 + 40]\n  lea rdi, [r15 + 200]\n  mov ecx, 3\n  repe cmpsd\n  cld",
      "lea rdi, [r15 + 16]\n  scasq", "lea rsi, [r15 + 24]\n  lea rdi, [r15 + 32]\n  cmpsw",
      "pushfq\n  pop r10\n  add rbx, r10", "cli\n  sti",
      "shr byte ptr [r15 + 5], 3", "sar bl, cl", "shl word ptr [r15 + 2], 1", "shr dh, 1",
      "sar qword ptr [r15 + 24], cl", "shl bx, 17", "shr al, 8", "sar cx, 0",
      "bsf rbx, rcx", "bsr edx, eax", "bsf ax, word ptr [r15 + 2]",
      "cmp eax, ebx\n  cmovl cx, word ptr [r15 + 8]", "test ecx, ecx\n  cmovz edx, eax",
      "xchg qword ptr [r15 + 16], rbx", "xchg cl, dh", "imul ebx, dword ptr [r15 + 4]", "imul cx, dx",
      "mov r10, rax\n  mov r11, rdx\n  lock cmpxchg16b xmmword ptr [r15 + 32]\n  mov rax, r10\n  mov rdx, r11",
      "swapgs\n  swapgs",
      "lea rdi, [rip + 3f + 2]\n  mov ecx, 1\n  mov r10, rax\n  mov al, cl\n  add al, bl\n  rep stosb\n3:\n"
        + "  mov r11d, 0x11\n  add rbx, r11\n  mov rax, r10",
    ]
    var body = ""
    for (number, step) in steps.enumerated() {
      // The last step stores into its own code: it gets a page of its own, so the rest of the
      // loop stays decoded (and translated) across the invalidations.
      if number == steps.count - 1 { body += ".p2align 12\n" }
      body += "  mov rax, r13\n  add rax, \(number * 0x9E37_79B9 & 0xFFFF_FFF)\n  mov rcx, rax\n  rol rcx, 17\n"
      body += "  and ecx, 0x3F\n  mov rdx, rax\n  ror rdx, 29\n  \(step)\n  pushfq\n  pop rdi\n  and edi, 0xCD5\n"
      body += "  add r8, rdi\n  rol r8, 5\n  xor r8, rax\n  add r8, rcx\n  xor r8, rdx\n  add r8, rbx\n  mov r13, rax\n"
      body += "  xor r13, rdx\n  jmp 1f\n1:\n"
    }
    // The faulting variant copies from 8 bytes below the end of RAM, late in the loop.
    let fault =
      moveFaults
      ? "  cmp r9d, 3\n  jne 2f\n  mov rsi, 0xFFFFF8\n  lea rdi, [r15 + 400]\n  mov ecx, 32\n  rep movsb\n2:\n" : ""
    let source =
      "  mov r9d, 30\n  mov r13, 0x0123456789ABCDEF\n  mov rbx, 0x5555\n  mov r15, 0x100000\nagain:\n" + body + fault
      + "  dec r9d\n  jnz again\n  hlt\n"
    var results: [(String, [UInt64], UInt64, [UInt8])] = []
    var dispatches: [Int] = []
    for tier in [SoftCPUTier.interpreter, .translator, .lockstep] {
      let machine = try CoreMachine(cpl: 0)
      machine.cpu.setExecutionTier(tier, threshold: 2)
      try machine.load(assembly: source)
      let stop = machine.run(limit: 10_000_000)
      dispatches.append(machine.cpu.statistics.blockDispatches)
      #expect(machine.cpu.lockstepFailure == nil, "\(machine.cpu.lockstepFailure ?? "")")
      if tier != .interpreter { #expect(machine.cpu.translatedBlockCount > 0) }
      let data = try machine.memory.slice(at: CoreMachine.dataBase, length: 512)
      results.append(
        ("\(stop)", (0..<16).map { machine.cpu.gpr[$0] }, machine.cpu.rip, (0..<512).map { data[$0] }))
    }
    #expect(
      results[0].0.contains(moveFaults ? "vector: 14" : "halted"),
      "\(results[0].0) at \(String(results[0].2 - CoreMachine.codeBase, radix: 16))")
    if moveFaults { #expect(results[0].1[1] == 24, "the copy stopped after 8 of 32 bytes") }
    // The translator runs them inside its blocks: fewer returns to the run loop than in
    // lockstep mode, where each of them ends its block's translated prefix.
    #expect(dispatches[1] < dispatches[2] * 3 / 4, "dispatches: \(dispatches)")
    for (tier, result) in zip(["translator", "lockstep"], results.dropFirst()) {
      #expect(result.0 == results[0].0, "\(tier)")
      #expect(result.1 == results[0].1, "\(tier)")
      #expect(result.2 == results[0].2, "\(tier)")
      #expect(result.3 == results[0].3, "\(tier)")
    }
  }

  /// A load from an unmapped address inside a translated block: the fault reports the RIP of
  /// the faulting instruction with the registers and flags as before it.
  @Test func faultInsideATranslatedBlockIsPrecise() throws {
    let source = """
        mov rax, 5
        add rax, 7
        cmp rax, 12
        mov rbx, qword ptr [rcx]
        mov rax, 99
        hlt
      """
    var outcomes: [(UInt64, UInt64, UInt64, String)] = []
    for tier in [SoftCPUTier.interpreter, .translator] {
      let machine = try CoreMachine(cpl: 3)
      machine.cpu.setExecutionTier(tier, threshold: 0)
      try machine.load(assembly: source)
      machine.cpu.gpr[1] = 0x7FFF_0000_0000  // no RAM there
      let stop = machine.run()
      outcomes.append((machine.cpu.rip, machine.cpu.gpr[0], machine.cpu.rflags, "\(stop)"))
    }
    #expect(outcomes[0].0 == outcomes[1].0)
    #expect(outcomes[0].1 == 12 && outcomes[1].1 == 12)
    #expect(outcomes[0].2 == outcomes[1].2)
    #expect(outcomes[0].3 == outcomes[1].3)
    #expect(outcomes[0].0 == CoreMachine.codeBase + 7 + 4 + 4)
  }
}

/// SSE moves and arithmetic run as host instructions in translated blocks; the checks the
/// interpreter makes per instruction (CR0.TS/EM, CR4.OSFXSR, unmasked MXCSR exceptions) are
/// made at the block's entry, so every fault stays exact.
struct TranslatorSSETests {
  /// Runs the loop translated once, then again after `change`: the stop, RIP, XMM1 and MXCSR
  /// must be the interpreter's.
  static func outcome(tier: SoftCPUTier, change: (CPU) -> Void) throws -> (String, UInt64, XMMValue, UInt32, Int) {
    let source = """
      again:
        movaps xmm1, xmm0
        addps xmm1, xmm2
        movdqu xmmword ptr [rsi], xmm1
        dec ecx
        jnz again
        hlt
      """
    let machine = try CoreMachine(cpl: 0)
    machine.cpu.cr4 |= X86.cr4OSFXSR | X86.cr4OSXMMEXCPT
    machine.cpu.setExecutionTier(tier, threshold: 0)
    try machine.load(assembly: source)
    machine.cpu.gpr[1] = 4
    machine.cpu.gpr[6] = CoreMachine.dataBase
    machine.cpu.xmm[0] = XMMValue(0x3F80_0000_4000_0000, 0x7F80_0000_0000_0000)  // 2, 1, 0, +inf
    machine.cpu.xmm[2] = XMMValue(0x3F80_0000_3F80_0000, 0xFF80_0000_0000_0000)  // 1, 1, 0, -inf
    let first = machine.run()
    guard case .halted = first else { return ("first run: \(first)", 0, .zero, 0, 0) }
    let translated = machine.cpu.translatedBlockCount
    change(machine.cpu)
    machine.cpu.rip = CoreMachine.codeBase
    machine.cpu.gpr[1] = 4
    machine.cpu.xmm[1] = .zero
    let stop = machine.run()
    return ("\(stop)", machine.cpu.rip, machine.cpu.xmm[1], machine.cpu.mxcsr, translated)
  }

  @Test(arguments: ["ts", "em", "osfxsr", "unmasked", "masked", "rounding"])
  func availabilityAndExceptionsAreExact(change: String) throws {
    let apply: (CPU) -> Void = { cpu in
      switch change {
      case "ts": cpu.cr0 |= X86.cr0TS
      case "em": cpu.cr0 |= X86.cr0EM
      case "osfxsr": cpu.cr4 &= ~X86.cr4OSFXSR
      case "unmasked": cpu.mxcsr = 0x1F80 & ~0x80  // invalid operation unmasked: inf + -inf faults
      case "masked": cpu.mxcsr = 0x1F80
      default: cpu.mxcsr = 0x1F80 | 0x6000  // round toward zero
      }
    }
    let reference = try Self.outcome(tier: .interpreter, change: apply)
    let translated = try Self.outcome(tier: .translator, change: apply)
    #expect(translated.4 > 0)
    #expect(translated.0 == reference.0)
    #expect(translated.1 == reference.1)
    #expect(translated.2 == reference.2)
    #expect(translated.3 == reference.3)
    // The architecture's answers (Intel SDM vol. 2, MOVAPS/ADDPS exceptions): #NM with TS, #UD
    // with EM or without OSFXSR at the first SSE instruction; #XM at ADDPS when IM is clear.
    switch change {
    case "ts": #expect(translated.0.contains("vector: 7") && translated.1 == CoreMachine.codeBase)
    case "em", "osfxsr": #expect(translated.0.contains("vector: 6") && translated.1 == CoreMachine.codeBase)
    case "unmasked": #expect(translated.0.contains("vector: 19") && translated.1 == CoreMachine.codeBase + 3)
    default:
      #expect(translated.0 == "halted")
      // inf + -inf = the default NaN with IE raised.
      #expect(translated.2[1] >> 32 == 0xFFC0_0000 && translated.3 & 1 == 1)
    }
  }

  /// Random sequences of the differential tests' SSE forms among integer ones, each
  /// translated block checked against the interpreter (registers, XMM, MXCSR, memory).
  @Test func randomSSESequencesInLockstep() throws {
    let sse = FormTable.sse.filter { !DifferentialTests.terminalForms.contains($0.name) }
    let fillers = sse + FormTable.integer.filter { !DifferentialTests.terminalForms.contains($0.name) }
    var checks = 0
    for runner in [EmulatedRunner(tier: .lockstep), EmulatedRunner(paging: true, tier: .lockstep)] {
      for caseIndex in 0..<600 {
        let focus = sse[caseIndex % sse.count]
        let testCase = CaseGenerator.makeCase(focus: focus, fillers: fillers, seed: DiffRNG.mix(11, UInt64(caseIndex)))
        let result = runner.run(code: testCase.code, initial: testCase.initial, data: testCase.data)
        #expect(result.lockstepFailure == nil, "\(focus.name): \(result.lockstepFailure ?? "")")
        checks += result.lockstepChecks
      }
    }
    #expect(checks > 500)
  }
}
