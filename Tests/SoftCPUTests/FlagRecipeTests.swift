import Foundation
import TestSupport
import Testing
import VMCore

@testable import SoftCPU

/// The translator's flag recipes (`FlagRecipe`): where the guest's flags come from an ALU
/// instruction on registers, a TLB probe does not save them but its miss path, and the code
/// that needs them later, compute them again from the registers. Each program below runs an
/// ALU instruction on operand values that change every round, then memory accesses that miss
/// the TLB (page-crossing ones always do), hit it, and keep the flags parked, then PUSHF, which
/// takes all six status flags (AF and PF included) into a checksum; a last access faults, so
/// the flags at the fault are compared too. The translator must end exactly as the
/// interpreter.
@Suite("FlagRecipeTests")
struct FlagRecipeTests {
  /// Runs `source` under the interpreter, whose stop must be one of `stops`, and under the
  /// translator, which must translate some of it and end exactly alike.
  static func expectTheTranslatorMatchesTheInterpreter(
    _ source: String, stops: [String], _ comment: Comment? = nil,
    sourceLocation: SourceLocation = #_sourceLocation
  ) throws {
    let (reference, _) = try CoreMachine.run(source, tier: .interpreter)
    #expect(
      stops.contains { reference.stop.contains($0) }, "the interpreter stopped with \(reference.stop)",
      sourceLocation: sourceLocation)
    let (outcome, cpu) = try CoreMachine.run(source, tier: .translator)
    #expect(cpu.translatedBlockCount > 0, sourceLocation: sourceLocation)
    #expect(outcome == reference, comment, sourceLocation: sourceLocation)
  }

  /// The ALU forms with a recipe, as `(operation, operands)` in Intel syntax on RAX/EAX (the
  /// destination) and RBX/EBX or an immediate.
  static let operations: [String] = {
    var forms: [String] = []
    for name in ["add", "sub", "cmp", "and", "or", "xor", "test"] {
      forms += ["\(name) rax, rbx", "\(name) eax, ebx", "\(name) rax, -0x65", "\(name) eax, 0x7FFFFFF7"]
    }
    return forms
  }()

  /// The start of a loop of 64 rounds (R9D counts them, R8 takes a checksum) whose operands
  /// R13 and R14 change every round; the round's code follows, up to `dec r9d; jnz again`.
  static let changingOperands = """
      mov r13, 0x0123456789ABCDEF
      mov r14, 0x7FFFFFFF80000001
      xor r8, r8
      mov r9d, 64
    again:
      rol r13, 13
      add r14, r13
    """

  /// 64 rounds of `operation` on changing values (every fourth round with equal operands),
  /// followed by a page-crossing load (its miss path needs the flags), a load and a store that
  /// keep them parked, and PUSHF; then `operation` once more before a load from a
  /// non-canonical address (#GP), whose flags must be the operation's.
  static func program(_ operation: String) -> String {
    """
      mov rsi, 0x100000
      mov r12, 0x101FFC
    \(changingOperands)
      mov rax, r13
      mov rbx, r14
      test r9b, 3
      cmovz rbx, rax
      \(operation)
      mov rcx, [r12]
      mov rdx, [rsi]
      mov [rsi + 8], rcx
      pushfq
      pop r11
      add r8, r11
      rol r8, 7
      dec r9d
      jnz again
      mov rax, r13
      mov rbx, r14
      \(operation)
      mov rcx, 0x8000000000000000
      mov rdx, [rcx]
      hlt
    """
  }

  @Test(arguments: operations)
  func flagsRecomputedAfterAnALUOperationMatchTheInterpreter(operation: String) throws {
    let source = Self.program(operation)
    // The non-canonical load faults, with the operation's flags.
    try Self.expectTheTranslatorMatchesTheInterpreter(source, stops: ["vector: 13"], "after \(operation)")
  }

  /// A recipe whose source register a load overwrites between the operation and a later
  /// access must not be used past the load: here the flags of `add rax, rbx` stay live across
  /// `mov rbx, [rsi]` (which rewrites the source) and a page-crossing load, and SETcc and
  /// PUSHF read them after.
  @Test func aRecipeDoesNotOutliveAWriteOfItsRegisters() throws {
    let source = """
        mov rsi, 0x100000
        mov r12, 0x101FFC
        mov qword ptr [rsi], 0x55
        mov r13, 0xFEDCBA9876543210
        xor r8, r8
        mov r9d, 64
      again:
        ror r13, 11
        mov rax, r13
        mov rbx, 0x8000000000000007
        add rax, rbx
        mov rbx, [rsi]
        mov rcx, [r12]
        mov eax, [rsi + 16]
        setc dl
        movzx edx, dl
        add r8, rdx
        sub rax, r13
        mov rbx, [rsi]
        mov rdx, [r12]
        pushfq
        pop r11
        add r8, r11
        rol r8, 5
        dec r9d
        jnz again
        hlt
      """
    try Self.expectTheTranslatorMatchesTheInterpreter(source, stops: ["halted"])
  }

  /// The access that overwrites a recipe's register (a load or POP into its source) comes
  /// before the write: when the flags are dead after it (a MOV, then a 16-bit shift that
  /// writes all six), its miss path still computes them from the recipe, and nothing saves
  /// them. The loop's loads and POPs cross a page (misses that go on) and feed a checksum;
  /// last, `final` faults while it would overwrite the source of `sub rax, rbx`, and the fault
  /// must carry the SUB's flags.
  @Test(arguments: [
    ("mov rbx, [rdi]", "vector: 13"), ("pop rbx", "vector: 12"), ("mov bx, [rdi]", "vector: 13"),
  ])
  func aRecipeServesTheMissPathOfTheAccessThatOverwritesItsRegister(final: String, vector: String) throws {
    let source = """
        mov r12, 0x101FFC
        mov r15, 0x102FFC
      \(Self.changingOperands)
        mov [r12], r13
        mov [r15], r14
        mov rax, r13
        mov rbx, r14
        sub rax, rbx
        mov rcx, [r12]
        mov rbx, [r12]
        mov edx, ebx
        shr dx, 3
        add r8, rdx
        mov rbx, r13
        cmp rbx, rax
        mov rsp, r15
        pop rbx
        mov edx, ebx
        shl dx, 5
        add r8, rdx
        mov rbx, r14
        xor rax, rbx
        mov cx, [r12]
        mov bx, [r15]
        mov edx, ebx
        sar dx, 2
        add r8, rdx
        rol r8, 7
        dec r9d
        jnz again
        mov rdi, 0x8000000000000000
        mov rsp, rdi
        mov rax, r13
        mov rbx, r14
        sub rax, rbx
        mov rcx, [r12]
        \(final)
        mov edx, ebx
        shr dx, 3
        hlt
      """
    try Self.expectTheTranslatorMatchesTheInterpreter(source, stops: [vector], "with \(final)")
  }

  /// Flags kept across loads reach PUSHF intact: after a load that overwrites the recipe's
  /// source (PUSHF two loads later), and after a register move and a BSWAP, which leave them
  /// alone. A short loop keeps each sequence inside one block.
  @Test func parkedFlagsStayLiveUntilRead() throws {
    let source = """
        mov r12, 0x101FFC
        mov r15, 0x102FFC
      \(Self.changingOperands)
        mov [r12], r13
        mov rax, r13
        mov rbx, r14
        add rax, rbx
        mov rcx, [r12]
        mov rbx, [r15]
        mov rdx, [r12]
        pushfq
        pop r11
        add r8, r11
        sub rax, rbx
        mov rcx, [r12]
        mov rdx, [r15]
        mov r10, rcx
        bswap r10
        pushfq
        pop r11
        add r8, r11
        add r8, r10
        rol r8, 7
        dec r9d
        jnz again
        hlt
      """
    try Self.expectTheTranslatorMatchesTheInterpreter(source, stops: ["halted"])
  }

  /// Flags of an operation on the stack pointer, computed again after POPs moved it (the
  /// recipe's adjustment) and after a PUSH, on a hit, on a page-crossing POP's miss path and at
  /// a fault, in 64-bit code.
  @Test func stackPointerRecipesFollowPushAndPop64() throws {
    let source = """
        mov r9d, 48
        xor r8, r8
      again:
        push r9
        push 1
        push 2
        push 3
        mov rdx, r9
        and edx, 3
        lea rax, [rsp + rdx * 8 - 16]
        cmp rsp, rax
        pop rbx
        pop rbx
        pop rbx
        pushfq
        pop r11
        add r8, r11
        rol r8, 3
        pop r9
        sub rsp, 40
        add rsp, 32
        pop rbx
        push rbx
        pop rbx
        pushfq
        pop r11
        add r8, r11
        dec r9d
        jnz again
        mov rsp, 0x100FFC
        add rsp, 0
        pop rbx
        pop rbx
        pushfq
        pop r11
        add r8, r11
        mov rsp, 0x8000000000000010
        add rsp, -8
        pop rbx
        hlt
      """
    // The POP from a non-canonical stack faults (#SS or #GP).
    try Self.expectTheTranslatorMatchesTheInterpreter(source, stops: ["vector: 12", "vector: 13"])
  }

  /// The same in 32-bit code, whose POPs move ESP by 4 and keep RSP's upper half: an
  /// epilogue's `add esp, 12` and a CMP of ESP, then POPs, a page-crossing load and PUSHFD; last
  /// a POP from beyond RAM (#PF) after `add esp, 4`.
  @Test func stackPointerRecipesFollowPushAndPop32() throws {
    let image = try Translator32BitTests.assemble(
      """
        mov ecx, 60
        xor edi, edi
      again:
        push ecx
        push 1
        push 2
        push 3
        mov edx, ecx
        and edx, 3
        lea eax, [esp + edx * 4 - 8]
        cmp esp, eax
        pop ebx
        pop ebx
        pop ebx
        pushfd
        pop edx
        add edi, edx
        rol edi, 3
        pop ecx
        sub esp, 20
        add esp, 12
        pop ebx
        mov ebx, dword ptr [0x100FFE]
        pop ebx
        pushfd
        pop edx
        add edi, edx
        dec ecx
        jnz again
        mov esp, 0x3FFFF8
        add esp, 4
        pop ebx
        pop ebx
        hlt
      """)
    let (reference, _) = try Translator32BitTests.execute(image, tier: .interpreter)
    #expect(reference.stop.contains("vector: 14"), "the POP past RAM faults: \(reference.stop)")
    let (outcome, cpu) = try Translator32BitTests.execute(image, tier: .translator)
    #expect(cpu.translatedBlockCount > 0)
    #expect(outcome == reference)
  }
}

/// Shifts by an immediate whose flags only the miss paths of the accesses after them read
/// (a later instruction overwrites them all) keep their operand for a recipe instead of
/// setting the interpreter's undefined flags in line: the flags at a fault inside that window
/// must still be the interpreter's (AF and, for counts above 1, OF are undefined and differ
/// on some hosts).
@Suite("ShiftFlagRecipeTests")
struct ShiftFlagRecipeTests {
  static let shifts = [
    "shr eax, 11", "shl eax, 7", "sar eax, 3", "shr eax, 31", "shl eax, 1", "shr rax, 1", "shl rax, 33", "sar rax, 63",
    "shr rax, 5",
  ]

  /// 40 rounds of the shift on changing values, a page-crossing load (a miss that goes on), a
  /// load that hits and an ADD that overwrites the flags; then the shift once more before a
  /// load from a non-canonical address (#GP).
  static func program(_ shift: String, seed: UInt64) -> String {
    """
      mov rsi, 0x100000
      mov r12, 0x101FFC
      mov r13, \(seed)
      xor r8, r8
      mov r9d, 40
    again:
      rol r13, 9
      mov rax, r13
      \(shift)
      mov rcx, [r12]
      mov rdx, [rsi]
      add r8, rcx
      add r8, rax
      dec r9d
      jnz again
      rol r13, 9
      mov rax, r13
      \(shift)
      mov rcx, [r12]
      mov rdx, 0x8000000000000000
      mov rcx, [rdx]
      add r8, rcx
      hlt
    """
  }

  @Test(arguments: shifts)
  func flagsOfAShiftAtAFaultMatchTheInterpreter(shift: String) throws {
    for seed in [0x0123_4567_89AB_CDEF, 0x8000_0000_8000_0001, 0x7FFF_FFFF_0F0F_F0F0] as [UInt64] {
      // The non-canonical load faults, with the shift's flags.
      try FlagRecipeTests.expectTheTranslatorMatchesTheInterpreter(
        Self.program(shift, seed: seed), stops: ["vector: 13"], "\(shift), seed \(seed)")
    }
  }
}
