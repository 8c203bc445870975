import SoftCPU
import Testing

/// Translated blocks linked directly to the blocks they branch to on their own page
/// (`DirectLinkSite`): the programs below run under the translator (linked) and the
/// interpreter, and must leave the same registers, flags and instruction counts, also when run
/// in slices that end in the middle of a chain (the link's budget check) and when they rewrite
/// code that linked blocks lead to.
@Suite("DirectLinkTests")
struct DirectLinkTests {
  /// Runs `source` from the start to HLT (or `total` instructions) in slices of `slice`
  /// instructions under `tier`, RSI at the data page; also returns the direct links made.
  static func run(_ source: String, tier: SoftCPUTier, threshold: UInt32, slice: Int, total: Int = 1_000_000)
    throws -> (CoreRunOutcome, links: Int)
  {
    let (outcome, cpu) = try CoreMachine.run(
      source, tier: tier, threshold: threshold, slice: slice, total: total,
      prepare: { machine in machine.cpu.gpr[6] = CoreMachine.dataBase })
    return (outcome, cpu.directLinkCount)
  }

  /// A loop of several blocks on one page: a Jcc to a later block, a fall-through, a CALL to
  /// a function on the page and a JMP back. Its blocks are linked to each other (when the
  /// target was translated first and, with the back edges, later), and slices of 3, 7 and 11
  /// instructions end runs inside chains of linked blocks.
  @Test(arguments: [3, 7, 11, 1_000_000])
  func loopsOfLinkedBlocksMatchTheInterpreter(slice: Int) throws {
    let source = """
        mov ecx, 500
        xor eax, eax
        mov rdx, 0x123456789
      top:
        add rax, rcx
        test ecx, 3
        jz every_fourth
        xor rdx, rax
        jmp join
      every_fourth:
        call twist
      join:
        adc r8, rdx
        dec ecx
        jnz top
        hlt
      twist:
        rol rdx, 7
        sub rax, 3
        ret
      """
    let (reference, _) = try Self.run(source, tier: .interpreter, threshold: 0, slice: slice)
    #expect(reference.stop == "halted")
    for threshold: UInt32 in [0, 2] {
      let (outcome, links) = try Self.run(source, tier: .translator, threshold: threshold, slice: slice)
      #expect(links > 0, "threshold \(threshold)")
      #expect(outcome == reference, "threshold \(threshold)")
    }
  }

  /// A function on the loop's page has its immediate rewritten halfway through (a store into
  /// code that linked blocks call): the rest of the loop must run the new code.
  @Test func storesIntoLinkedCodeTakeEffect() throws {
    let source = """
        mov ecx, 200
        xor eax, eax
      again:
        call bump
        cmp ecx, 100
        jne keep
        mov dword ptr [rip + bump_amount], 5
      keep:
        dec ecx
        jnz again
        hlt
      bump:
        .byte 0x48, 0x05
      bump_amount:
        .long 1
        ret
      """
    let (reference, _) = try Self.run(source, tier: .interpreter, threshold: 0, slice: 1_000_000)
    #expect(reference.stop == "halted")
    // 101 runs of the old code (the store comes after the 101st), 99 of the new.
    #expect(reference.registers[0] == 101 * 1 + 99 * 5)
    let (outcome, links) = try Self.run(source, tier: .translator, threshold: 0, slice: 1_000_000)
    #expect(links > 0)
    #expect(outcome == reference)
  }

  /// A block that continues onto the next page (its ADD's immediate straddles the boundary),
  /// jumped to from a block on the first page only: a store into the next page invalidates
  /// the target but not the block that jumps to it, so that jump must not lead to the
  /// target's old translation.
  @Test func aTargetContinuingOntoTheNextPageIsNotRunStale() throws {
    let source = """
        mov ecx, 200
        xor eax, eax
      again:
        jmp straddling
      back:
        cmp ecx, 100
        jne keep
        mov byte ptr [rip + amount + 3], 1
      keep:
        dec ecx
        jnz again
        hlt
        .org 4093
      straddling:
        .byte 0x48, 0x05
      amount:
        .long 1
        jmp back
      """
    let (reference, _) = try Self.run(source, tier: .interpreter, threshold: 0, slice: 1_000_000)
    #expect(reference.stop == "halted")
    #expect(reference.registers[0] == 101 * 1 + 99 * 0x0100_0001)
    let (outcome, _) = try Self.run(source, tier: .translator, threshold: 0, slice: 1_000_000)
    #expect(outcome == reference)
  }
}
