/// Execution handler selector for a decoded instruction. The core owns this list; `.sse`
/// and `.x87` hand the instruction to the SIMD and FPU units.
///
/// Conventions for core ops (set by the decoder, see Decoder.swift):
/// - "Rm" is the ModRM r/m operand (register `rm` or memory), "Reg" the ModRM reg operand.
/// - Accumulator-immediate forms (04, 05, A8, ...) decode as the `...RmImm` op with a register
///   r/m operand `rm = 0`; moffs forms (A0-A3) decode as `movRegRm`/`movRmReg` with a memory
///   operand; `B0-BF` decode as `movRmImm` with a register r/m operand.
/// - Immediates of core ops are already sign-extended as the form requires and truncated to
///   the operand size (branch displacements: sign-extended to 64 bits).
/// - For ops that take a condition (Jcc, SETcc, CMOVcc) the condition is `opcode & 0xF`.
public enum Op: UInt16, Sendable {
  case invalid
  /// SSE/SSE2 (and later) instruction: see `CPU.executeSSE`.
  case sse
  /// x87 escape D8-DF: see `CPU.executeX87`.
  case x87
  /// MMX: the no-prefix forms of the SSE integer opcodes, on MM0-MM7: see `CPU.executeMMX`.
  case mmx
  /// VEX-encoded instruction (C4/C5 prefix): see `CPU.executeVEX`.
  case vex
  /// Instruction longer than 15 bytes: #GP(0).
  case tooLong
  /// Valid only outside 64-bit mode (PUSHA, DAA, LES, ...); part 2 implements them. #UD for now.
  case legacyOnly

  // MARK: ALU
  case addRmReg, addRegRm, addRmImm
  case orRmReg, orRegRm, orRmImm
  case adcRmReg, adcRegRm, adcRmImm
  case sbbRmReg, sbbRegRm, sbbRmImm
  case andRmReg, andRegRm, andRmImm
  case subRmReg, subRegRm, subRmImm
  case xorRmReg, xorRegRm, xorRmImm
  case cmpRmReg, cmpRegRm, cmpRmImm
  case testRmReg, testRmImm
  case incRm, decRm, negRm, notRm

  // MARK: Shifts and rotates (count: immediate, or CL when `opcode` is D2/D3)
  case rolRm, rorRm, rclRm, rcrRm, shlRm, shrRm, sarRm
  case shldImm, shldCL, shrdImm, shrdCL

  // MARK: Multiply and divide
  case mulRm, imulRm, divRm, idivRm, imulRegRm, imulRegRmImm

  // MARK: Bit operations
  case btRmReg, btsRmReg, btrRmReg, btcRmReg
  case btRmImm, btsRmImm, btrRmImm, btcRmImm
  case bsf, bsr, tzcnt, lzcnt, popcnt, bswap

  // MARK: Data movement
  case movRmReg, movRegRm, movRmImm
  case movzxByte, movzxWord, movsxByte, movsxWord, movsxd
  case lea, xchgRmReg, cmpxchg, cmpxchg8b16b, xadd
  case movbeLoad, movbeStore
  case movRmSeg, movSegRm
  case cmovcc, setcc
  case cbw, cwd
  case xlat
  case lahf, sahf

  // MARK: Control transfer
  case jcc, jmpRel, jmpRm, callRel, callRm, ret, retImm
  case loop, loope, loopne, jrcxz

  // MARK: Stack
  case pushRm, pushImm, popRm, pushSeg, popSeg, pushf, popf, enter, leave

  // MARK: Strings (REP/REPE/REPNE from `prefixes`)
  case movs, cmps, stos, lods, scas, ins, outs

  // MARK: Flags, misc
  case clc, stc, cmc, cld, std, cli, sti
  case cpuid, rdtsc, rdtscp, rdpid, nop, pause, hlt, int3, intN, into, int1
  /// FWAIT/WAIT (9B): see `CPU.fwait`.
  case fwait
  case inImm, inDX, outImm, outDX
  case fence, clflush

  // MARK: System (decoded; part 2 implements the handlers, #UD until then)
  case farCall, farJmp, retFar, iret
  case syscall, sysret, sysenter, sysexit
  case sldt, str, lldt, ltr, verr, verw, lar, lsl
  case sgdt, sidt, lgdt, lidt, smsw, lmsw, invlpg, swapgs, clts, invd, wbinvd
  case movFromCR, movToCR, movFromDR, movToDR, rdmsr, wrmsr, rdpmc

  // MARK: XSAVE-managed state (XSAVE.swift)
  case xsave, xrstor, xsaveopt, xsavec, xgetbv, xsetbv
}
