import Foundation
import SoftCPU
import Testing
import VMCore

@Suite("Core instructions")
struct CoreInstructionTests {
  @Test("ADD 0x7F + 1 on 8 bits sets OF, SF and AF (SDM flag definitions)")
  func addOverflow8() throws {
    let machine = try CoreMachine()
    try machine.load(assembly: "mov al, 0x7f\nadd al, 1\nhlt")
    #expect(machine.run() == .halted)
    #expect(machine[R.rax] & 0xFF == 0x80)
    let flags = machine.cpu.rflags
    #expect(flags & RFlags.of != 0)
    #expect(flags & RFlags.sf != 0)
    #expect(flags & RFlags.af != 0)
    #expect(flags & RFlags.zf == 0)
    #expect(flags & RFlags.cf == 0)
    #expect(flags & RFlags.pf == 0)  // 0x80 has one bit set: odd parity
  }

  @Test("SUB/CMP borrow, SBB/ADC carry chains, INC keeps CF")
  func carries() throws {
    let machine = try CoreMachine()
    try machine.load(
      assembly: """
        mov rax, 1
        sub rax, 2          # rax = -1, CF = 1
        mov rbx, 0
        adc rbx, 0          # rbx = 1
        mov rcx, 5
        stc
        sbb rcx, 2          # rcx = 2
        stc
        inc rdx             # CF stays set
        setc r8b
        mov r9d, 0xffffffff
        add r9d, 1          # ZF=1, CF=1, r9 = 0
        setz r10b
        setc r11b
        hlt
        """)
    #expect(machine.run() == .halted)
    #expect(machine[R.rax] == UInt64.max)
    #expect(machine[R.rbx] == 1)
    #expect(machine[R.rcx] == 2)
    #expect(machine[R.r8] == 1)
    #expect(machine[R.r9] == 0)
    #expect(machine[R.r10] == 1)
    #expect(machine[R.r11] == 1)
  }

  @Test("Signed and unsigned conditions after CMP")
  func conditions() throws {
    let machine = try CoreMachine()
    try machine.load(
      assembly: """
        mov eax, -5
        cmp eax, 3
        setl bl        # -5 < 3 signed
        setb cl        # 0xFFFFFFFB < 3 unsigned? no
        setg dl
        seta sil
        setle dil
        cmp al, 0x80
        seto r8b       # 0xFB - 0x80 = 0x7B: no signed overflow
        setns r9b
        hlt
        """)
    #expect(machine.run() == .halted)
    #expect(machine[R.rbx] & 0xFF == 1)
    #expect(machine[R.rcx] & 0xFF == 0)
    #expect(machine[R.rdx] & 0xFF == 0)
    #expect(machine[R.rsi] & 0xFF == 1)
    #expect(machine[R.rdi] & 0xFF == 1)
    #expect(machine[R.r8] & 0xFF == 0)
    #expect(machine[R.r9] & 0xFF == 1)
  }

  @Test("32-bit writes zero-extend; 8/16-bit writes merge; AH..BH")
  func registerWidths() throws {
    let machine = try CoreMachine()
    try machine.load(
      assembly: """
        mov rax, -1
        mov eax, 1
        mov rbx, -1
        mov bx, 2
        mov rcx, -1
        mov ch, 0x12
        mov rdx, -1
        mov rsi, -1
        cmp rsi, rsi
        cmovne edx, esi     # condition false: still zero-extends
        hlt
        """)
    #expect(machine.run() == .halted)
    #expect(machine[R.rax] == 1)
    #expect(machine[R.rbx] == 0xFFFF_FFFF_FFFF_0002)
    #expect(machine[R.rcx] == 0xFFFF_FFFF_FFFF_12FF)
    #expect(machine[R.rdx] == 0xFFFF_FFFF)
  }

  @Test("DIV by zero raises #DE with RIP at the instruction; quotient overflow too")
  func divideErrors() throws {
    let machine = try CoreMachine()
    let code = try CoreAssembler.assemble("xor ecx, ecx\nmov eax, 7\ndiv ecx\nhlt")
    try machine.load(code)
    #expect(machine.run() == .fault(.divideError))
    #expect(machine.cpu.rip == CoreMachine.codeBase + 7)
    #expect(machine[R.rax] == 7)

    let overflow = try CoreMachine()
    try overflow.load(assembly: "mov edx, 2\nmov eax, 0\nmov ecx, 2\ndiv ecx\nhlt")
    #expect(overflow.run() == .fault(.divideError))

    let signed = try CoreMachine()
    try signed.load(assembly: "mov rax, 0x8000000000000000\ncqo\nmov rcx, -1\nidiv rcx\nhlt")
    #expect(signed.run() == .fault(.divideError))
  }

  @Test("MUL, IMUL forms and DIV/IDIV results")
  func multiplyDivide() throws {
    let machine = try CoreMachine()
    try machine.load(
      assembly: """
        mov rax, 0x123456789abcdef
        mov rcx, 0x1000
        mul rcx
        mov r8, rax
        mov r9, rdx
        mov rax, -7
        cqo
        mov rcx, 2
        idiv rcx           # -3 rem -1
        mov r10, rax
        mov r11, rdx
        imul r12, rcx, -5  # -10
        mov ax, 300
        mov bl, 7
        div bl             # al = 42, ah = 6
        movzx r13d, ax
        hlt
        """)
    #expect(machine.run() == .halted)
    #expect(machine[R.r8] == 0x3456_789a_bcde_f000)
    #expect(machine[R.r9] == 0x12)
    #expect(machine[R.r10] == UInt64(bitPattern: -3))
    #expect(machine[R.r11] == UInt64(bitPattern: -1))
    #expect(machine[R.r12] == UInt64(bitPattern: -10))
    #expect(machine[R.r13] == 6 << 8 | 42)
  }

  @Test("Shifts, rotates and double shifts")
  func shifts() throws {
    let machine = try CoreMachine()
    try machine.load(
      assembly: """
        mov eax, 0x80000001
        shl eax, 1          # CF = 1, eax = 2
        setc bl
        mov ecx, 0x81
        sar cl, 1           # 0xC0
        movzx ecx, cl
        mov edx, 0x12345678
        rol edx, 8          # 0x34567812
        mov rsi, 1
        stc
        rcr rsi, 1          # 0x8000000000000000, CF = 1
        setc dil
        mov r8, 0x1234
        mov r9, 0xabcd000000000000
        shld r8, r9, 16     # 0x12340000 | 0xabcd
        mov r10b, 0x81
        clc
        rcl r10b, 9         # 9 mod 9 = 0 rotations: unchanged
        hlt
        """)
    #expect(machine.run() == .halted)
    #expect(machine[R.rax] == 2)
    #expect(machine[R.rbx] & 0xFF == 1)
    #expect(machine[R.rcx] == 0xC0)
    #expect(machine[R.rdx] == 0x3456_7812)
    #expect(machine[R.rsi] == 0x8000_0000_0000_0000)
    #expect(machine[R.rdi] & 0xFF == 1)
    #expect(machine[R.r8] == 0x1234_abcd)
    #expect(machine[R.r10] & 0xFF == 0x81)
  }

  @Test("Bit instructions: BT with a register offset beyond the operand, BSF/BSR/POPCNT/TZCNT/LZCNT")
  func bits() throws {
    let machine = try CoreMachine()
    try machine.load(
      assembly: """
        mov rdi, 0x100000
        mov qword ptr [rdi + 8], 0
        mov rax, 70
        bts qword ptr [rdi], rax   # sets bit 6 of [rdi + 8]
        mov rbx, [rdi + 8]
        bt qword ptr [rdi], rax
        setc cl
        mov rdx, 0x0f00
        bsf r8, rdx
        bsr r9, rdx
        popcnt r10, rdx
        tzcnt r11, rdx
        lzcnt r12, rdx
        hlt
        """)
    #expect(machine.run() == .halted)
    #expect(machine[R.rbx] == 0x40)
    #expect(machine[R.rcx] & 0xFF == 1)
    #expect(machine[R.r8] == 8)
    #expect(machine[R.r9] == 11)
    #expect(machine[R.r10] == 4)
    #expect(machine[R.r11] == 8)
    #expect(machine[R.r12] == 52)
  }

  @Test("CALL/RET, PUSH/POP, ENTER/LEAVE, LOOP")
  func controlFlow() throws {
    let machine = try CoreMachine()
    try machine.load(
      assembly: """
        mov ecx, 10
        xor eax, eax
        1:
        add eax, ecx
        loop 1b
        call function
        push 0x1234
        pop rbx
        jmp done
        function:
        enter 16, 0
        mov qword ptr [rbp - 8], 99
        mov rdx, [rbp - 8]
        leave
        ret
        done:
        hlt
        """)
    #expect(machine.run() == .halted)
    #expect(machine[R.rax] == 55)
    #expect(machine[R.rdx] == 99)
    #expect(machine[R.rbx] == 0x1234)
    #expect(machine[R.rsp] == CoreMachine.stackTop)
  }

  @Test("String instructions with REP, REPE and DF")
  func strings() throws {
    let machine = try CoreMachine()
    try machine.load(
      assembly: """
        mov rdi, 0x100000
        mov rcx, 4096 + 3
        mov al, 0x5a
        rep stosb
        mov rsi, 0x100000
        mov rdi, 0x200000
        mov rcx, 1000
        rep movsq
        mov rsi, 0x100000
        mov rdi, 0x200000
        mov rcx, 100
        repe cmpsb
        mov r8, rcx           # 100 - 100 = 0: all equal
        std
        mov rdi, 0x300010
        mov eax, 0x11223344
        mov ecx, 2
        rep stosd
        cld
        lea rsi, [rip + text]
        lodsb
        mov r9b, al
        hlt
        text: .byte 0x77
        """)
    #expect(machine.run() == .halted)
    #expect(try machine.memory.read(UInt8.self, at: 0x100000 + 4098) == 0x5a)
    #expect(try machine.memory.read(UInt8.self, at: 0x100000 + 4099) == 0)
    #expect(try machine.memory.read(UInt64.self, at: 0x200000 + 8 * 511) == 0x5a5a_5a5a_5a5a_5a5a)
    #expect(machine[R.r8] == 0)
    #expect(try machine.memory.read(UInt32.self, at: 0x300010) == 0x1122_3344)
    #expect(try machine.memory.read(UInt32.self, at: 0x30000C) == 0x1122_3344)
    #expect(machine[R.rdi] == 0x300008)
    #expect(machine[R.r9] & 0xFF == 0x77)
  }

  @Test("Overlapping REP MOVSB replicates forward like hardware")
  func overlappingMove() throws {
    let machine = try CoreMachine()
    try machine.memory.writeBytes([1, 2, 3], at: 0x100000)
    try machine.load(assembly: "mov rsi, 0x100000\nmov rdi, 0x100003\nmov rcx, 9\nrep movsb\nhlt")
    #expect(machine.run() == .halted)
    #expect(try machine.memory.readBytes(at: 0x100000, count: 12) == [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3])
  }

  @Test("XCHG, CMPXCHG, XADD, LOCK forms, CMPXCHG16B alignment")
  func atomics() throws {
    let machine = try CoreMachine()
    try machine.load(
      assembly: """
        mov rdi, 0x100000
        mov qword ptr [rdi], 5
        mov rax, 5
        mov rbx, 9
        lock cmpxchg [rdi], rbx    # equal: [rdi] = 9, ZF = 1
        setz cl
        mov rax, 1
        lock xadd [rdi], rax       # rax = 9, [rdi] = 10
        lock add qword ptr [rdi], 5
        mov rdx, 77
        xchg [rdi], rdx            # rdx = 15
        lock inc dword ptr [rdi]
        mov r8, [rdi]
        hlt
        """)
    #expect(machine.run() == .halted)
    #expect(machine[R.rcx] & 0xFF == 1)
    #expect(machine[R.rax] == 9)
    #expect(machine[R.rdx] == 15)
    #expect(machine[R.r8] == 78)

    let misaligned = try CoreMachine()
    try misaligned.load(assembly: "mov rdi, 0x100008\ncmpxchg16b [rdi]\nhlt")
    #expect(misaligned.run() == .fault(.generalProtection(0)))

    let lockRegister = try CoreMachine()
    try lockRegister.load([0xF0, 0x01, 0xC0])  // lock add eax, eax
    #expect(lockRegister.run() == .fault(.invalidOpcode))
  }

  @Test("Faults: #UD, INT3 trap RIP, IN at CPL 3, unmapped memory #PF")
  func faults() throws {
    let machine = try CoreMachine()
    try machine.load([0x0F, 0x0B])
    #expect(machine.run() == .fault(.invalidOpcode))
    #expect(machine.cpu.rip == CoreMachine.codeBase)

    let trap = try CoreMachine()
    try trap.load([0x90, 0xCC, 0x90])
    #expect(trap.run() == .fault(.breakpoint))
    #expect(trap.cpu.rip == CoreMachine.codeBase + 2)

    let io = try CoreMachine()
    try io.load([0xE4, 0x60])  // in al, 0x60
    #expect(io.run() == .fault(.generalProtection(0)))

    let unmapped = try CoreMachine()
    try unmapped.load(assembly: "mov rax, 0x40000000\nmov rbx, [rax]\nhlt")
    if case .fault(let fault) = unmapped.run() {
      #expect(fault.vector == 14)
      #expect(fault.address == 0x4000_0000)
    } else {
      Issue.record("expected #PF")
    }

    // Non-canonical references: #SS(0) through SS (implicit stack, RBP base), else #GP(0).
    for (source, vector) in [
      ("mov rsp, 0x8000000000000008\npush rax", UInt8(12)), ("mov rbp, 0x8000000000000000\nmov rax, [rbp+8]", 12),
      ("mov rbx, 0x8000000000000000\nmov rax, [rbx]", 13), ("mov rbx, 0x8000000000000000\npush qword ptr [rbx]", 13),
    ] {
      let nonCanonical = try CoreMachine()
      try nonCanonical.load(assembly: source + "\nhlt")
      #expect(nonCanonical.run() == .fault(Fault(vector: vector, errorCode: 0)), "\(source)")
    }

    let invalid64 = try CoreMachine()
    for opcode: UInt8 in [
      0x06, 0x07, 0x0E, 0x16, 0x17, 0x1E, 0x1F, 0x27, 0x2F, 0x37, 0x3F, 0x60, 0x61, 0x62, 0x82, 0x9A, 0xC4, 0xC5, 0xCE,
      0xD4, 0xD5, 0xD6, 0xEA,
    ] {
      try invalid64.load([opcode, 0xC0, 0, 0, 0, 0, 0, 0])
      #expect(invalid64.run() == .fault(.invalidOpcode), "opcode \(opcode)")
    }
  }

  @Test("Self-modifying code: a store ahead of RIP changes what executes")
  func selfModifyingCode() throws {
    let machine = try CoreMachine(cpl: 0)
    try machine.load(
      assembly: """
        mov ecx, 3
        again:
        lea rdi, [rip + patch]
        mov byte ptr [rdi + 1], 42   # rewrites the immediate of the next instruction
        patch:
        mov eax, 1
        add ebx, eax
        dec ecx
        jnz again
        hlt
        """)
    #expect(machine.run() == .halted)
    #expect(machine[R.rax] == 42)
    #expect(machine[R.rbx] == 126)

    // The same page executed once before being rewritten: the cached block must be dropped.
    let second = try CoreMachine()
    try second.load(assembly: "mov eax, 1\nhlt")
    #expect(second.run() == .halted)
    #expect(second[R.rax] == 1)
    try second.memory.write(UInt32(7), at: CoreMachine.codeBase + 1)  // device-style write: no CPU store
    second.cpu.flushDecodedBlocks()
    second.cpu.rip = CoreMachine.codeBase
    #expect(second.run() == .halted)
    #expect(second[R.rax] == 7)
    second.cpu.rip = CoreMachine.codeBase
    try second.load(assembly: "lea rdi, [rip + 0]\nmov dword ptr [rdi + 100], 0x90909090\nmov eax, 5\nhlt")
    second.cpu.flushDecodedBlocks()
    #expect(second.run() == .halted)
    #expect(second[R.rax] == 5)
  }

  @Test("Block cache: code executed many times gives the same result as once")
  func repeatedBlocks() throws {
    let machine = try CoreMachine()
    try machine.load(
      assembly: """
        xor eax, eax
        mov ecx, 100000
        1:
        lea rax, [rax + rcx*2]
        dec ecx
        jnz 1b
        hlt
        """)
    #expect(machine.run(limit: 10_000_000) == .halted)
    #expect(machine[R.rax] == 100000 * 100001)
  }

  @Test("Instruction limit stops exactly and resumes")
  func instructionLimit() throws {
    let machine = try CoreMachine()
    try machine.load(assembly: "inc eax\ninc eax\ninc eax\ninc eax\nhlt")
    #expect(machine.run(limit: 3) == .instructionLimit)
    #expect(machine[R.rax] == 3)
    #expect(machine.run(limit: 10) == .halted)
    #expect(machine[R.rax] == 4)
  }

  @Test("CPUID reports the vendor and long mode")
  func cpuid() throws {
    let machine = try CoreMachine()
    try machine.load(assembly: "xor eax, eax\ncpuid\nmov r8, rbx\nmov eax, 0x80000001\ncpuid\nhlt")
    #expect(machine.run() == .halted)
    #expect(machine[R.r8] == 0x6874_7541)  // "Auth"
    #expect(machine[R.rdx] & (1 << 29) != 0)
  }

  @Test("CPUID describes the machine's topology as KVM's CPUIDPolicy does: leaves 1, 0BH and 8000_0008")
  func cpuidTopology() throws {
    let machine = try CoreMachine()
    machine.cpu.system.topology = CPUTopology(cpuCount: 3)
    machine.cpu.system.apicID = 2
    try machine.load(
      assembly: """
        mov eax, 1
        cpuid
        mov r8, rbx
        mov r9, rdx
        mov eax, 0xB
        mov ecx, 1
        cpuid
        mov r10, rax
        mov r11, rbx
        mov r12, rcx
        mov r13, rdx
        mov eax, 0xB
        mov ecx, 2
        cpuid
        mov r14, rbx
        mov r15, rcx
        mov eax, 0x80000008
        cpuid
        hlt
        """)
    #expect(machine.run() == .halted)
    #expect((machine[R.r8] >> 16) & 0xFF == 3)  // logical processors in the package
    #expect(machine[R.r8] >> 24 == 2)  // APIC ID
    #expect(machine[R.r9] & (1 << 28) != 0)  // HTT
    // Core level: shift 2, 3 processors, level 1 of type core, x2APIC ID 2.
    #expect([machine[R.r10], machine[R.r11], machine[R.r12], machine[R.r13]] == [2, 3, 0x201, 2])
    #expect([machine[R.r14], machine[R.r15]] == [0, 2])  // the invalid level ends the list
    #expect(machine[R.rcx] == 0x2002)  // ApicIdSize 2, NC = 2
  }

  @Test("Stop request returns .stopRequested at a block boundary")
  func stopRequest() throws {
    let machine = try CoreMachine()
    try machine.load(assembly: "1: jmp 1b")
    machine.cpu.requestStop()
    #expect(machine.run(limit: Int.max) == .stopRequested)
  }
}
