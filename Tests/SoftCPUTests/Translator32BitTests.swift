import Foundation
import TestSupport
import Testing
import VMCore

@testable import SoftCPU

/// The translating tier on 32-bit code against the interpreter: a program of the stack forms
/// (PUSH and POP of registers, immediates and memory, CALL and RET, direct and indirect, LEAVE),
/// FS-relative accesses, addresses that wrap at 4 GiB and registers whose upper halves are not
/// zero, run in flat protected mode under each tier (and in lockstep), must leave the same
/// registers, flags, instruction count and memory. Translated 32-bit code runs only while the
/// segments are flat (`CPU.flatLegacyCode`): with a based DS, ES or SS, or a 16-bit stack, the
/// interpreter runs everything and the results still match.
@Suite("Translator32BitTests")
struct Translator32BitTests {
  static let codeBase: UInt64 = 0x10000
  static let dataBase: UInt64 = 0x10_0000
  static let stackTop: UInt64 = 0x8_0000
  /// FS base: a per-CPU area inside the data page, as a 32-bit kernel's per-CPU segment.
  static let fsBase: UInt64 = dataBase + 0x1000

  /// Assembles and links Intel-syntax 32-bit source at `codeBase`; returns the flat image.
  static func assemble(_ source: String) throws -> [UInt8] {
    let sourcePath = FileManager.default.temporaryDirectory.appendingPathComponent(
      "hostvisor-jit32-\(UUID().uuidString).s"
    ).path
    defer { try? FileManager.default.removeItem(atPath: sourcePath) }
    try (".intel_syntax noprefix\n.code32\n.text\n" + source + "\n")
      .write(toFile: sourcePath, atomically: true, encoding: .utf8)
    return try CoreAssembler.linkedImage(sourcePath: sourcePath, bits: 32, at: codeBase)
  }

  /// 300 rounds of calls through a register, through memory and by displacement, pushes of
  /// every kind, a frame torn down by LEAVE, FS-relative reads and writes, and a load whose
  /// address (EBX + displacement) wraps at 4 GiB onto the data page. Nothing writes ESP but the
  /// stack forms (a 32-bit ALU result would clear RSP's upper half).
  static let program = """
      mov ecx, 300
      xor eax, eax
      xor edx, edx
      mov ebx, offset function
      mov dword ptr [esi], ebx
    again:
      push ecx
      push 0x12345678
      push dword ptr [esi]
      pop edi
      call edi
      call dword ptr [esi]
      call frame
      pop ebx
      pop ecx
      add edx, dword ptr fs:[8]
      mov dword ptr fs:[12], ecx
      mov ebx, 0x80000000
      add edx, dword ptr [ebx + 0x80100010]
      lea edi, [next]
      jmp edi
    next:
      dec ecx
      jnz again
      hlt
    function:
      add eax, 3
      ret
    frame:
      push ebp
      mov ebp, esp
      push eax
      push eax
      mov dword ptr [ebp - 4], eax
      add eax, dword ptr [ebp + 8]
      leave
      ret
    """

  struct Outcome: Equatable {
    var gpr: [UInt64]
    var rip: UInt64
    var rflags: UInt64
    var instructions: UInt64
    var memoryDigest: UInt64
    var stop: String
  }

  /// Runs `image` in flat protected mode at CPL 0 under `tier`, after `prepare` (segment set-up).
  static func execute(
    _ image: [UInt8], tier: SoftCPUTier, threshold: UInt32 = 0, prepare: (CPU) -> Void = { _ in }
  ) throws -> (Outcome, CPU) {
    let memory = try GuestMemory(size: 4 << 20)
    try memory.writeBytes(image, at: codeBase)
    try memory.write(UInt32(7), at: fsBase + 8)
    try memory.write(UInt32(1000), at: dataBase + 0x10)
    // What DS- and ES-relative reads find at the flat and at the based addresses.
    for (offset, value) in [(0, 11), (4, 13), (0x2000, 17), (0x3004, 19)] as [(UInt64, UInt32)] {
      try memory.write(value, at: dataBase + offset)
    }
    let cpu = CPU(memory: memory, bus: IOBus())
    cpu.enterFlatProtectedMode(cpl: 0)
    cpu.setSegmentBase(SegmentIndex.fs, fsBase)
    cpu.setExecutionTier(tier, threshold: threshold)
    cpu.rip = codeBase
    // Upper halves that 32-bit code must neither use in addresses nor clear in RSP.
    cpu.gpr[4] = 0xABCD_0000_0000_0000 | stackTop
    cpu.gpr[6] = 0x5555_0000_0000_0000 | dataBase
    cpu.gpr[9] = 0x1111_2222_3333_4444
    prepare(cpu)
    let stop = cpu.run(instructionLimit: 1_000_000)
    let ram = try memory.slice(at: 0, length: 4 << 20)
    var digest: UInt64 = 0xCBF2_9CE4_8422_2325
    for index in stride(from: 0, to: ram.count, by: 8) {
      digest = (digest ^ ram.loadUnaligned(fromByteOffset: index, as: UInt64.self)) &* 0x100_0000_01B3
    }
    let outcome = Outcome(
      gpr: (0..<16).map { cpu.gpr[$0] }, rip: cpu.rip, rflags: cpu.rflags, instructions: cpu.retiredInstructions,
      memoryDigest: digest, stop: "\(stop)")
    return (outcome, cpu)
  }

  @Test func stackFormsAndBranchesMatchTheInterpreter() throws {
    let image = try Self.assemble(Self.program)
    let (reference, _) = try Self.execute(image, tier: .interpreter)
    #expect(reference.stop == "halted")
    // The known answer: per round 3 + 3 from `function` and 0x12345678 from `frame` in EAX,
    // the FS-relative 7 and the wrapped load's 1000 in EDX.
    #expect(reference.gpr[0] == UInt64(UInt32(truncatingIfNeeded: 300 * (6 + 0x1234_5678))))
    #expect(reference.gpr[2] == 300 * 1007)
    #expect(reference.gpr[4] == 0xABCD_0000_0000_0000 | Self.stackTop, "ESP back at the top, upper half kept")
    for (tier, threshold) in [(SoftCPUTier.translator, UInt32(0)), (.translator, SoftCPUTier.defaultThreshold)] {
      let (outcome, cpu) = try Self.execute(image, tier: tier, threshold: threshold)
      #expect(outcome == reference, "tier \(tier.rawValue) threshold \(threshold)")
      #expect(cpu.translatedBlockCount > 0)
      // Most instructions ran translated (the interpreter ran the first rounds at most).
      #expect(cpu.statistics.interpretedInstructions < cpu.retiredInstructions / 4)
    }
    let (checked, cpu) = try Self.execute(image, tier: .lockstep)
    #expect(cpu.lockstepFailure == nil, "\(cpu.lockstepFailure ?? "")")
    #expect(checked == reference)
    #expect(cpu.lockstepCheckCount > 0)
  }

  /// A fault inside translated 32-bit code is raised with the state before the instruction: a
  /// RET whose stack is not in RAM, after pushes and calls in the same block.
  @Test func faultInTranslated32BitCodeIsPrecise() throws {
    let image = try Self.assemble(
      """
        mov ecx, 50
      again:
        push ecx
        call function
        pop ecx
        dec ecx
        jnz again
        mov esp, 0xFFFFFF00
        push 5
        hlt
      function:
        add eax, 1
        ret
      """)
    let (reference, _) = try Self.execute(image, tier: .interpreter)
    #expect(reference.stop.contains("vector: 14"), "the push past RAM faults: \(reference.stop)")
    let (outcome, cpu) = try Self.execute(image, tier: .translator)
    #expect(outcome == reference)
    #expect(cpu.translatedBlockCount > 0)
  }

  /// With a segment that is not flat, translated 32-bit code does not run: the interpreter
  /// applies the base (or the 16-bit stack), and both tiers end alike.
  @Test(arguments: ["ds base", "es base", "ss base", "16-bit stack"])
  func segmentsThatAreNotFlatKeepTheInterpreter(change: String) throws {
    let image = try Self.assemble(
      """
        mov ecx, 100
      again:
        add eax, dword ptr [esi]
        add eax, dword ptr es:[esi + 4]
        push ecx
        pop edx
        dec ecx
        jnz again
        hlt
      """)
    let prepare: (CPU) -> Void = { cpu in
      switch change {
      case "ds base": cpu.setSegmentBase(SegmentIndex.ds, 0x2000)
      case "es base": cpu.setSegmentBase(SegmentIndex.es, 0x3000)
      case "ss base": cpu.setSegmentBase(SegmentIndex.ss, 0x4000)
      default:
        cpu.segments[Int(SegmentIndex.ss)].access &= ~SegmentAccess.defaultBig
        cpu.refreshStackMask()
      }
    }
    let (flat, _) = try Self.execute(image, tier: .interpreter)
    let (reference, _) = try Self.execute(image, tier: .interpreter, prepare: prepare)
    let (outcome, cpu) = try Self.execute(image, tier: .translator, prepare: prepare)
    #expect(reference.stop == "halted")
    #expect(reference != flat, "the change is visible to the program")
    #expect(outcome == reference)
    #expect(cpu.translatedBlockCount == 0)
    #expect(cpu.statistics.interpretedInstructions == cpu.retiredInstructions)
  }

  /// Translated 32-bit code's TLB probes under 4 KiB paging whose pages are not contiguous in
  /// RAM: accesses through one register that go on to the next page, ones that cross the
  /// page's end (virtual 0x300000 and 0x301000 map to physical 0x350000 and 0x340000, so a
  /// crossing read done in one piece would read 0x351000's bytes), and a page the loop maps to
  /// another frame (with INVLPG) before each run of the block that reads it, whose first access
  /// then misses the TLB and whose next ones must see the new frame (an address remembered
  /// from the block's previous run would see the old one). Every tier must end alike.
  @Test func accessesThroughOneRegisterAcrossPagesMatchTheInterpreter() throws {
    let pageDirectory: UInt64 = 0x20_0000
    let pageTable: UInt64 = pageDirectory + 0x1000
    let image = try Self.assemble(
      """
        mov eax, \(pageDirectory)
        mov cr3, eax
        mov eax, cr0
        or eax, 0x80000000
        mov cr0, eax
        jmp paged
      paged:
        mov ecx, 200
        xor edx, edx
      again:
        mov eax, ecx
        and eax, 1
        shl eax, 12
        add eax, 0x360003
        mov dword ptr [\(pageTable + 0x302 * 4)], eax
        invlpg [0x302000]
        mov ebp, 0x302000
        mov eax, dword ptr [ebp + 4]
        add edx, eax
        mov eax, dword ptr [ebp + 8]
        add edx, eax
        mov dword ptr [ebp + 12], edx
        mov dword ptr [ebp + 16], ecx
        mov ebp, 0x300ff8
        mov eax, dword ptr [ebp]
        add edx, eax
        mov eax, dword ptr [ebp + 6]
        add edx, eax
        mov eax, dword ptr [ebp + 8]
        add edx, eax
        mov ax, word ptr [ebp + 7]
        add dx, ax
        mov eax, dword ptr [ebp + 4]
        add edx, eax
        mov dword ptr [ebp + 0x10], edx
        mov dword ptr [ebp - 0x10], ecx
        mov dword ptr [ebp + 6], ecx
        dec ecx
        jnz again
        hlt
      """)
    let prepare: (CPU) -> Void = { cpu in
      let memory = cpu.memory
      try? memory.write(UInt32(pageTable | 3), at: pageDirectory)
      for page in 0..<1024 as Range<UInt64> {
        let frame: UInt64 =
          switch page {
          case 0x300: 0x35_0000
          case 0x301: 0x34_0000
          case 0x302: 0x36_0000
          default: page << 12
          }
        try? memory.write(UInt32(frame | 3), at: pageTable + page * 4)
      }
      for (frame, step) in [(0x34_0000, 13), (0x35_0000, 7), (0x35_1000, 3), (0x36_0000, 11), (0x36_1000, 5)]
        as [(UInt64, Int)]
      {
        let bytes = (0..<4096).map { UInt8(truncatingIfNeeded: $0 * step + 1) }
        try? memory.writeBytes(bytes, at: frame)
      }
    }
    let (reference, _) = try Self.execute(image, tier: .interpreter, prepare: prepare)
    #expect(reference.stop == "halted")
    for (tier, threshold) in [(SoftCPUTier.translator, UInt32(0)), (.translator, SoftCPUTier.defaultThreshold)] {
      let (outcome, cpu) = try Self.execute(image, tier: tier, threshold: threshold, prepare: prepare)
      #expect(outcome == reference, "tier \(tier.rawValue) threshold \(threshold)")
      #expect(cpu.translatedBlockCount > 0)
    }
    let (checked, cpu) = try Self.execute(image, tier: .lockstep, prepare: prepare)
    #expect(cpu.lockstepFailure == nil, "\(cpu.lockstepFailure ?? "")")
    #expect(checked == reference)
  }
}
