import Foundation
import SoftCPU
import Testing
import VMCore

@Suite("Decoder")
struct CoreDecoderTests {
  /// Decodes `bytes` placed at 0x10000 (or `address`).
  func decode(_ bytes: [UInt8], codeSize: UInt8 = 8, at address: UInt64 = 0x10000) throws -> Result<Instruction, Fault>
  {
    let machine = try CoreMachine()
    try machine.memory.writeBytes(bytes, at: address)
    return machine.cpu.decode(at: address, codeSize: codeSize)
  }

  func decoded(_ bytes: [UInt8], codeSize: UInt8 = 8) throws -> Instruction {
    try decode(bytes, codeSize: codeSize).get()
  }

  @Test("Prefixes: last F2/F3 wins, REX only right before the opcode, segment overrides")
  func prefixes() throws {
    let rep = try decoded([0xF2, 0xF3, 0xA4])
    #expect(rep.op == .movs)
    #expect(rep.prefixes & Instruction.Prefix.rep != 0)
    #expect(rep.prefixes & Instruction.Prefix.repne == 0)
    #expect(rep.length == 3)

    let ignoredRex = try decoded([0x48, 0x66, 0x01, 0xC0])
    #expect(ignoredRex.operandSize == 2)
    #expect(!ignoredRex.rexW)
    let rexAfter = try decoded([0x66, 0x48, 0x01, 0xC0])
    #expect(rexAfter.operandSize == 8)
    #expect(rexAfter.rexW)

    #expect(try decoded([0x64, 0x8B, 0x00]).segment == SegmentIndex.fs)
    #expect(try decoded([0x65, 0x8B, 0x00]).segment == SegmentIndex.gs)
    #expect(try decoded([0x2E, 0x8B, 0x00]).segment == SegmentIndex.ds)  // ignored in 64-bit mode
    #expect(try decoded([0x8B, 0x04, 0x24]).segment == SegmentIndex.ss)  // [rsp]
    #expect(try decoded([0x8B, 0x45, 0x00]).segment == SegmentIndex.ss)  // [rbp]
    #expect(try decoded([0x41, 0x8B, 0x45, 0x00]).segment == SegmentIndex.ds)  // [r13]
    #expect(try decoded([0x26, 0x8B, 0x00], codeSize: 4).segment == SegmentIndex.es)
  }

  @Test("ModRM, SIB, RIP-relative and 32-bit address size")
  func addressing() throws {
    let ripRelative = try decoded([0x8B, 0x05, 0x10, 0x00, 0x00, 0x00])
    #expect(ripRelative.base == Instruction.ripRelative)
    #expect(ripRelative.displacement == 0x10)
    #expect(ripRelative.length == 6)
    #expect(ripRelative.addressSize == 8)

    let ripRelative32 = try decoded([0x67, 0x8B, 0x05, 0xF0, 0xFF, 0xFF, 0xFF])
    #expect(ripRelative32.addressSize == 4)
    #expect(ripRelative32.displacement == -16)

    let absolute = try decoded([0x8B, 0x04, 0x25, 0x00, 0x10, 0x00, 0x00])
    #expect(absolute.base == Instruction.noRegister)
    #expect(absolute.index == Instruction.noRegister)
    #expect(absolute.displacement == 0x1000)

    let sib = try decoded([0x4B, 0x8B, 0x44, 0xC8, 0x80])  // mov rax, [r8 + r9*8 - 128]
    #expect(sib.base == 8)
    #expect(sib.index == 9)
    #expect(sib.scaleShift == 3)
    #expect(sib.displacement == -128)
    #expect(sib.operandSize == 8)
  }

  @Test("16-bit addressing forms: BX+SI, BP+DI (SS), disp16")
  func addressing16() throws {
    let bxSi = try decoded([0x8B, 0x00], codeSize: 2)
    #expect(bxSi.base == 3)
    #expect(bxSi.index == 6)
    #expect(bxSi.operandSize == 2)
    #expect(bxSi.addressSize == 2)
    #expect(bxSi.segment == SegmentIndex.ds)
    let bpDi = try decoded([0x8B, 0x43, 0xFE], codeSize: 2)
    #expect(bpDi.base == 5)
    #expect(bpDi.index == 7)
    #expect(bpDi.displacement == -2)
    #expect(bpDi.segment == SegmentIndex.ss)
    let direct = try decoded([0x8B, 0x06, 0x34, 0x12], codeSize: 2)
    #expect(direct.base == Instruction.noRegister)
    #expect(direct.displacement == 0x1234)
    #expect(direct.length == 4)
    let bp = try decoded([0x8B, 0x46, 0x04], codeSize: 2)
    #expect(bp.base == 5)
    #expect(bp.segment == SegmentIndex.ss)
    let prefixed = try decoded([0x66, 0x67, 0x8B, 0x00], codeSize: 2)
    #expect(prefixed.operandSize == 4)
    #expect(prefixed.addressSize == 4)
    #expect(prefixed.base == 0)
  }

  @Test("15-byte limit: 15 bytes decode, 16 raise #GP(0)")
  func lengthLimit() throws {
    let fifteen = try decoded([UInt8](repeating: 0x66, count: 14) + [0x90])
    #expect(fifteen.length == 15)
    let sixteen = try decode([UInt8](repeating: 0x66, count: 15) + [0x90])
    #expect(throws: Fault.generalProtection(0)) { try sixteen.get() }
  }

  @Test("Byte registers: AH..BH without REX, SPL..DIL with REX")
  func byteRegisters() throws {
    let high = try decoded([0x88, 0xE0])  // mov al, ah
    #expect(high.reg == Instruction.highByteBase + 0)
    #expect(high.rm == 0)
    let low = try decoded([0x40, 0x88, 0xE0])  // mov al, spl
    #expect(low.reg == 4)
    let movzx = try decoded([0x0F, 0xB6, 0xC7])  // movzx eax, bh
    #expect(movzx.rm == Instruction.highByteBase + 3)
  }

  @Test("Immediates: sign extension by form, imm64, branch displacements")
  func immediates() throws {
    #expect(try decoded([0x48, 0x83, 0xC0, 0xFF]).immediate == UInt64.max)
    #expect(try decoded([0x83, 0xC0, 0xFF]).immediate == 0xFFFF_FFFF)
    #expect(try decoded([0x48, 0x05, 0x00, 0x00, 0x00, 0x80]).immediate == 0xFFFF_FFFF_8000_0000)
    let imm64 = try decoded([0x48, 0xB8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11])
    #expect(imm64.immediate == 0x1122_3344_5566_7788)
    #expect(imm64.length == 10)
    let jcc = try decoded([0x0F, 0x85, 0xFC, 0xFF, 0xFF, 0xFF])
    #expect(jcc.op == .jcc)
    #expect(jcc.immediate == UInt64(bitPattern: -4))
    #expect(jcc.operandSize == 8)
    let push = try decoded([0x66, 0x50])
    #expect(push.operandSize == 2)
    #expect(try decoded([0x50]).operandSize == 8)
  }

  @Test("SIMD and x87 classification")
  func simd() throws {
    let movdqa = try decoded([0x66, 0x0F, 0x6F, 0x04, 0x24])
    #expect(movdqa.op == .sse)
    #expect(movdqa.opcode == 0x16F)
    #expect(movdqa.mandatoryPrefix == 1)
    #expect(movdqa.operandSize == 4)
    #expect(movdqa.hasMemoryOperand)
    let movss = try decoded([0xF3, 0x0F, 0x10, 0xC1])
    #expect(movss.mandatoryPrefix == 2)
    #expect(movss.reg == 0)
    #expect(movss.rm == 1)
    let palignr = try decoded([0x66, 0x0F, 0x3A, 0x0F, 0xC1, 0x08])
    #expect(palignr.opcode == 0x30F)
    #expect(palignr.immediate == 8)
    let pshufd = try decoded([0x66, 0x0F, 0x70, 0xC1, 0x1B])
    #expect(pshufd.immediate == 0x1B)
    #expect(pshufd.length == 5)
    let fxsave = try decoded([0x0F, 0xAE, 0x00])
    #expect(fxsave.op == .sse)
    #expect(try decoded([0x0F, 0xAE, 0xF0]).op == .fence)  // mfence
    let x87 = try decoded([0xD9, 0xC0])
    #expect(x87.op == .x87)
    #expect(x87.opcode == 0xD9)
    #expect(x87.modrm == 0xC0)
    let movbe = try decoded([0x0F, 0x38, 0xF0, 0x07])
    #expect(movbe.op == .movbeLoad)
    #expect(try decoded([0xF2, 0x0F, 0x38, 0xF0, 0xC1]).op == .sse)  // CRC32
  }

  @Test("VEX prefixes: C4/C5 fields, prefixes before VEX, LES/LDS outside 64-bit mode")
  func vex() throws {
    // andn eax, ecx, ebx: three-byte VEX, map 0F 38, vvvv = ECX.
    let andn = try decoded([0xC4, 0xE2, 0x70, 0xF2, 0xC3])
    #expect(andn.op == .vex)
    #expect(andn.opcode == 0x2F2)
    #expect(andn.reg == 0 && andn.rm == 3 && andn.vexRegister == 1)
    #expect(andn.operandSize == 4 && !andn.vexL && andn.length == 5)
    // andn r9, r14, [rax]: VEX.R, VEX.W, vvvv = 14 (inverted 0001).
    let wide = try decoded([0xC4, 0x62, 0x88, 0xF2, 0x08])
    #expect(wide.reg == 9 && wide.vexRegister == 14 && wide.operandSize == 8 && wide.hasMemoryOperand)
    // rorx eax, ebx, 5: map 0F 3A carries an imm8; pp = F2.
    let rorx = try decoded([0xC4, 0xE3, 0x7B, 0xF0, 0xC3, 0x05])
    #expect(rorx.opcode == 0x3F0 && rorx.mandatoryPrefix == 3 && rorx.immediate == 5 && rorx.length == 6)
    // Two-byte VEX: vzeroupper (no ModRM) and a 256-bit form with VEX.R.
    let vzeroupper = try decoded([0xC5, 0xF8, 0x77])
    #expect(vzeroupper.op == .vex && vzeroupper.opcode == 0x177 && vzeroupper.length == 3)
    let wideVector = try decoded([0xC5, 0x7C, 0x28, 0xC1])
    #expect(wideVector.vexL && wideVector.reg == 8 && wideVector.rm == 1 && wideVector.vexRegister == 0)
    // LOCK, 66, F2, F3 or REX before VEX, and map 0: #UD.
    for bytes: [UInt8] in [
      [0x66, 0xC5, 0xF8, 0x77], [0xF3, 0xC5, 0xF8, 0x77], [0xF2, 0xC5, 0xF8, 0x77], [0xF0, 0xC5, 0xF8, 0x77],
      [0x40, 0xC5, 0xF8, 0x77], [0xC4, 0xE0, 0x78, 0x77],
    ] {
      #expect(throws: Fault.invalidOpcode) { try decode(bytes).get() }
    }
    // Segment and address-size prefixes are allowed.
    #expect(try decoded([0x64, 0x67, 0xC4, 0xE2, 0x70, 0xF2, 0x03]).segment == SegmentIndex.fs)
    // 32-bit protected mode: ModRM.mod = 11 in the next byte means VEX (R, X, B forced to 0,
    // vvvv to 0-7); otherwise LES/LDS.
    let andn32 = try decoded([0xC4, 0xE2, 0xF0, 0xF2, 0xC3], codeSize: 4)
    #expect(andn32.op == .vex && andn32.vexRegister == 1 && andn32.operandSize == 4 && andn32.rexW)
    #expect(try decoded([0xC4, 0x62, 0x88, 0xF2, 0x08], codeSize: 4).op == .legacyOnly)  // les esp, [edx-0x78]
    #expect(try decoded([0xC5, 0x06, 0x00, 0x10], codeSize: 4).op == .legacyOnly)  // lds eax, [esi]
    #expect(try decoded([0xC5, 0xF8, 0x77], codeSize: 2).op == .vex)
  }

  @Test("Invalid encodings raise #UD: EVEX, LOCK misuse, UD2")
  func invalid() throws {
    for bytes: [UInt8] in [
      [0x62, 0xF1, 0x7C, 0x48, 0x10, 0x00],
      [0xF0, 0x8B, 0x00], [0xF0, 0x01, 0xC0], [0x0F, 0x0B], [0x8D, 0xC0], [0xFF, 0xF8],
    ] {
      #expect(throws: Fault.invalidOpcode) { try decode(bytes).get() }
    }
    #expect(try decoded([0xF0, 0x01, 0x00]).op == .addRmReg)  // lock add [rax], eax is valid
  }

  @Test("An instruction crossing into unmapped memory faults with #PF at the first missing byte")
  func pageCrossingFetch() throws {
    let machine = try CoreMachine()
    let end = machine.memory.totalSize
    try machine.memory.writeBytes([0x48, 0xB8, 1, 2], at: end - 4)
    let result = machine.cpu.decode(at: end - 4)
    guard case .failure(let fault) = result else {
      Issue.record("expected a fault")
      return
    }
    #expect(fault.vector == 14)
    #expect(fault.address == end)
    // A short instruction ending right at the boundary decodes.
    try machine.memory.writeBytes([0x90], at: end - 1)
    #expect(try machine.cpu.decode(at: end - 1).get().length == 1)
  }
}

@Suite("Core robustness")
struct CoreFuzzTests {
  @Test(
    "200k random 15-byte sequences from random states (seeded): every run stops with a canonical RIP and the CPU still runs a known-answer sequence"
  )
  func randomBytes() throws {
    let machine = try CoreMachine(ramSize: 4 << 20)
    let guards = HostileRunChecks.HostGuards(around: machine.memory)
    defer { guards.remove() }
    let cpu = machine.cpu
    // Reproducible: HOSTVISOR_DIFF_SEED (default 1) picks the byte sequences.
    var seed = DiffRNG.mix(DifferentialTests.seed, 0xC0DE)
    var nonCanonical = 0
    var knownAnswerFailures: [String] = []
    func next() -> UInt64 {
      // SplitMix64: reproducible from the printed seed.
      seed &+= 0x9E37_79B9_7F4A_7C15
      var z = seed
      z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
      z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
      return z ^ (z >> 31)
    }
    let initialSeed = seed
    var outcomes = [String: Int]()
    let codeAddress: UInt64 = 0x10000
    for iteration in 0..<200_000 {
      var bytes = [UInt8](repeating: 0, count: 15)
      for index in 0..<15 { bytes[index] = UInt8(truncatingIfNeeded: next()) }
      // Land sometimes right before the end of RAM so fetches cross into unmapped memory.
      let address = iteration % 16 == 0 ? machine.memory.totalSize - UInt64(1 + next() % 15) : codeAddress
      let length = min(15, Int(machine.memory.totalSize - address))
      try machine.memory.writeBytes(bytes[0..<length], at: address)
      cpu.noteExternalWrite(physical: address, length: UInt64(length))
      for register in 0..<16 {
        let choice = next()
        switch choice % 4 {
        case 0: cpu.gpr[register] = next()
        case 1: cpu.gpr[register] = 0x20000 + (next() & 0xFFFF)
        case 2: cpu.gpr[register] = next() & 0xFF
        default: cpu.gpr[register] = 0
        }
      }
      cpu.gpr[1] &= 0xFFFF  // keep REP counts small so the test stays fast
      cpu.gpr[4] = 0x80000 - (next() & 0xFF8)
      cpu.rflags = 0x2 | (next() & (RFlags.status | RFlags.df))
      cpu.rip = address
      let cause = cpu.run(instructionLimit: 8)
      let key: String
      switch cause {
      case .fault(let fault): key = fault.vector >= 32 ? "INT n" : "fault \(fault.vector)"
      case .halted: key = "halted"
      case .instructionLimit: key = "limit"
      case .stopRequested: key = "stop"
      }
      outcomes[key, default: 0] += 1
      if !HostileRunChecks.isCanonical(cpu.rip) { nonCanonical += 1 }
      if iteration % 1000 == 999, knownAnswerFailures.count < 5,
        let failure = try HostileRunChecks.knownAnswerFails(cpu: cpu, memory: machine.memory, at: 0x30000, seed: next())
      {
        knownAnswerFailures.append("after run \(iteration): \(failure)")
      }
    }
    print("random-bytes seed \(initialSeed): \(outcomes.sorted { $0.key < $1.key }); host guards: \(guards)")
    #expect(nonCanonical == 0, "runs that stopped with a non-canonical RIP")
    #expect(knownAnswerFailures.isEmpty, Comment(rawValue: knownAnswerFailures.joined(separator: "\n")))
    #expect(outcomes["fault 6", default: 0] > 0)
    #expect(outcomes["limit", default: 0] > 0)
  }
}
