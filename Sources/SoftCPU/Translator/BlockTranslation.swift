import CShim
import Glibc

// Translation of one decoded block into host x86-64 code (see docs/softcpu-performance.md,
// "The translating tier").
//
// What is translated: the longest prefix of the block whose instructions have one of the fast
// forms below (64-bit code only). Each guest instruction becomes the same host instruction on
// the guest register in the CPU's register array (RBX points at it), so the host computes the
// result and the status flags exactly. The first instruction without a translation ends the
// prefix; the interpreter runs the rest of the block.
//
// Register use inside a block: RBX = guest registers, R12 = the `hv_jit_context`, R13 / R14 =
// the read / write TLB, R15 = the TLB tag bits of the current privilege, RBP = status flags
// saved around a TLB probe (LAHF + SETO), RAX RCX RDX RSI RDI = scratch, R8-R11 = the guest
// registers the block uses most (write-through: see `X86Emitter.cachedRegisters`).
//
// Flags: the run loop materializes the interpreter's lazy flags before a block, so the
// context holds the status flags. The block loads them into the host RFLAGS (POPFQ, status
// bits only) when an instruction reads them before any instruction writes all six, and
// stores them back at every exit once they are valid in the host. Around a TLB probe (whose
// compare clobbers the host flags) they are kept in RBP.
//
// Memory: an inline probe of the CPU's software TLB (`TLB.swift`: tag = page | privilege
// bits, delta = host - linear; a page-crossing access misses because the tag is compared with
// the page of the access's last byte). On a miss a load or store calls a Swift helper that
// performs the access exactly as the interpreter would (page walk, MMIO, code-page
// invalidation, cross-vCPU coherence); on a fault the helper reports it and the block returns
// *before* the faulting instruction, which the interpreter then executes again and faults on:
// guest state at the fault is precisely the interpreter's. Read-modify-write forms return to
// the interpreter on a write-TLB miss.
//
// Exits return `executed | endedBit`: the number of guest instructions completed, and whether
// the block ended (taken branch, jump, or a store that invalidated decoded code). The
// context's RIP is the next instruction's.

/// Bit of a translated block's return value: the block ended (no interpreter continuation).
let translationEndedBit: UInt64 = 1 << 63

/// How an instruction uses the six status flags.
struct FlagUse {
  /// Reads some status flag (Jcc, CMOVcc, SETcc, ADC/SBB, INC/DEC keep CF, shifts by CL keep
  /// all flags for a zero count).
  var reads = false
  /// Writes all six (the host's values, defined or not).
  var writesAll = false
  /// Flags the architecture leaves undefined after it (lockstep does not compare them).
  var undefined: UInt64 = 0
  /// ROL/ROR (CF and OF written, the rest kept).
  var rotate = false
}

/// The result of translating a block prefix.
struct TranslatedCode {
  var code: [UInt8]
  /// Guest instructions translated.
  var instructions: Int
  /// Per instruction count `n` (0...instructions): status flags undefined after the first `n`.
  var undefinedAfter: [UInt64]
  /// Offset of the entry a chained block jumps to (past the frame set-up, which every block
  /// shares).
  var chainEntry: Int
  /// The translation has SSE floating-point arithmetic (it runs only under the guest's MXCSR).
  var usesFloatingPoint = false
  /// Its direct exits, which the translator links to their targets' translations.
  var linkSites: [DirectLinkSite] = []
}

/// A translated block's exit to a fixed target on the page of the block's entry (a direct
/// JMP, CALL or Jcc, or the fall-through at the block's end), emitted by `directExit`.
///
/// Until it is linked the exit goes through the jump cache (`chainOrLeave`). Linking
/// (`Translator.linkBatch`, `Translator.linkWaitingSites`) patches it to jump straight into the target block's translation, with
/// only the stop request and the instruction budget checked on the way: no jump-cache hash, tag or
/// generation compare. The target is found by physical address (the entry's page plus the
/// target's offset), and that needs no check at run time: the branch stays on the page the
/// block is running from, which maps the same physical page for as long as the block runs
/// (an instruction that changes a mapping leaves translated code), and a store into that page
/// invalidates the block and its target together. A target that continues onto another page
/// is linked only when the block continues onto the same one.
///
/// Offsets are from the start of the block's code.
struct DirectLinkSite {
  /// The rel32 of the gate, a JMP that leads to the jump-cache path until the site is linked,
  /// then to `directPath`.
  var gate: Int
  /// The direct path's first instruction.
  var directPath: Int
  /// The imm32 of the direct path's budget compare: the exit's instructions plus the target's.
  var budgetImmediate: Int
  /// The imm32 of the direct path's store of the target's block index into `last_block`.
  var blockImmediate: Int
  /// The rel32 of the direct path's final JMP into the target's chained entry.
  var targetJump: Int
  /// Guest instructions the block has completed when it takes this exit.
  var instructions: Int
  /// The target's offset from the block's entry RIP.
  var targetOffset: Int
}

/// Offsets of the context fields in generated code.
enum ContextOffset {
  static let flags = MemoryLayout<hv_jit_context>.offset(of: \.flags)!
  static let rip = MemoryLayout<hv_jit_context>.offset(of: \.rip)!
  static let exit = MemoryLayout<hv_jit_context>.offset(of: \.exit)!
  static let readTLB = MemoryLayout<hv_jit_context>.offset(of: \.read_tlb)!
  static let writeTLB = MemoryLayout<hv_jit_context>.offset(of: \.write_tlb)!
  static let tagExtra = MemoryLayout<hv_jit_context>.offset(of: \.tag_extra)!
  static let segmentBase = MemoryLayout<hv_jit_context>.offset(of: \.segment_base)!
  static let loadHelper = MemoryLayout<hv_jit_context>.offset(of: \.load_helper)!
  static let storeHelper = MemoryLayout<hv_jit_context>.offset(of: \.store_helper)!
  static let entryRIP = MemoryLayout<hv_jit_context>.offset(of: \.entry_rip)!
  static let generation = MemoryLayout<hv_jit_context>.offset(of: \.generation)!
  static let budget = MemoryLayout<hv_jit_context>.offset(of: \.budget)!
  static let lastBlock = MemoryLayout<hv_jit_context>.offset(of: \.last_block)!
  static let jumpCache = MemoryLayout<hv_jit_context>.offset(of: \.jump_cache)!
  static let stop = MemoryLayout<hv_jit_context>.offset(of: \.stop)!
  static let xmm = MemoryLayout<hv_jit_context>.offset(of: \.xmm)!
  static let sseState = MemoryLayout<hv_jit_context>.offset(of: \.sse_state)!
  static let sseWritten = MemoryLayout<hv_jit_context>.offset(of: \.sse_written)!
  static let vectorLoadHelper = MemoryLayout<hv_jit_context>.offset(of: \.vector_load_helper)!
  static let vectorStoreHelper = MemoryLayout<hv_jit_context>.offset(of: \.vector_store_helper)!
  static let interpretHelper = MemoryLayout<hv_jit_context>.offset(of: \.interpret_helper)!
  static let vector = MemoryLayout<hv_jit_context>.offset(of: \.vector)!
  static let flagOperand = MemoryLayout<hv_jit_context>.offset(of: \.flag_operand)!
}

/// An SSE instruction translated as the same host instruction (SSE2 and older: every x86-64
/// host has it). The operands are moved between the guest's XMM registers (in the CPU state)
/// and host XMM0 / XMM1; a memory operand is the host address the TLB probe found (or, after
/// a miss, the context's `vector`, filled or drained by a helper).
struct SSEForm {
  /// The destination is the ModRM.reg XMM register (loads, arithmetic), or the r/m operand
  /// (store forms: an XMM register, a general register or memory).
  var destinationIsRM = false
  /// Bytes the memory operand accesses (4, 8 or 16).
  var memorySize = 16
  /// A 16-byte memory operand must be aligned (#GP(0) otherwise).
  var aligned = false
  /// Floating-point arithmetic: runs only under the guest's MXCSR, which must mask every
  /// exception (the interpreter raises #XM/#UD for unmasked ones).
  var floatingPoint = false
  /// The r/m register operand is a general register (MOVD/MOVQ, 66 0F 6E/7E).
  var generalRegister = false
  /// The register destination's old value is part of the result.
  var readsDestination = true
  /// REX.W in the host encoding (MOVQ forms of 6E/7E).
  var wide = false

  /// The translated form of `instruction`, nil when it has none.
  init?(_ instruction: Instruction) {
    guard instruction.op == .sse, instruction.opcode >> 8 == 1 else { return nil }
    let prefix = instruction.mandatoryPrefix
    let memory = instruction.hasMemoryOperand
    let scalarSize = prefix == 2 ? 4 : prefix == 3 ? 8 : 16
    switch UInt8(truncatingIfNeeded: instruction.opcode) {
    case 0x10, 0x11:
      // MOVUPS/MOVUPD/MOVSS/MOVSD; the scalar register forms merge, the memory loads zero.
      memorySize = scalarSize
      destinationIsRM = instruction.opcode & 1 != 0
      readsDestination = prefix >= 2 && !memory
    case 0x28, 0x29:  // MOVAPS/MOVAPD
      guard prefix <= 1 else { return nil }
      aligned = true
      destinationIsRM = instruction.opcode == 0x129
      readsDestination = false
    case 0x6F, 0x7F:  // MOVDQA (66) / MOVDQU (F3)
      guard prefix == 1 || prefix == 2 else { return nil }
      aligned = prefix == 1
      destinationIsRM = instruction.opcode == 0x17F
      readsDestination = false
    case 0x6E:  // MOVD/MOVQ xmm, r/m32/64
      guard prefix == 1 else { return nil }
      generalRegister = true
      wide = instruction.rexW
      memorySize = wide ? 8 : 4
      readsDestination = false
    case 0x7E:
      if prefix == 1 {  // MOVD/MOVQ r/m32/64, xmm
        generalRegister = true
        destinationIsRM = true
        wide = instruction.rexW
        memorySize = wide ? 8 : 4
      } else if prefix == 2 {  // MOVQ xmm, xmm/m64
        memorySize = 8
        readsDestination = false
      } else {
        return nil
      }
    case 0xD6:  // MOVQ xmm/m64, xmm
      guard prefix == 1 else { return nil }
      memorySize = 8
      destinationIsRM = true
    case 0x14, 0x15, 0x54...0x57:  // UNPCKL/HPS/PD, ANDPS, ANDNPS, ORPS, XORPS (and PD)
      guard prefix <= 1 else { return nil }
      aligned = true
    case 0x51, 0x58, 0x59, 0x5C...0x5F:  // SQRT, ADD, MUL, SUB, MIN, DIV, MAX (PS/PD/SS/SD)
      memorySize = scalarSize
      aligned = scalarSize == 16
      floatingPoint = true
    case 0x60...0x6D, 0x74...0x76, 0xD1...0xD5, 0xD8...0xDF, 0xE0...0xE5, 0xE8...0xEF, 0xF1...0xF6, 0xF8...0xFE:
      // SSE2 integer operations (66 only; without it they are MMX).
      guard prefix == 1 else { return nil }
      aligned = true
    default:
      return nil
    }
    if !memory && generalRegister && instruction.rm >= 16 { return nil }
  }

  /// The host's prefix byte for the guest's mandatory prefix.
  static func hostPrefix(_ mandatoryPrefix: UInt8) -> UInt8 {
    [0, 0x66, 0xF3, 0xF2][Int(mandatoryPrefix & 3)]
  }
}

/// The per-vCPU jump cache that chains translated blocks: entry `jumpCacheIndex(rip)` holds the
/// translation of the block at `rip` under one block-chain generation (`hv_jit_cache_entry`).
enum JumpCache {
  /// Entries (a power of two).
  static let entries = 32768
  /// An entry that matches no block: all zeros, generation 0, which `CPU.chainGeneration`
  /// never is. The cache lives in zero-filled pages (`allocateZeroedPages`) that cost nothing
  /// until an entry is made in them, and an idle vCPU gives them back with its code.
  static var empty: hv_jit_cache_entry {
    hv_jit_cache_entry(rip: 0, generation: 0, code: nil, count: 0, block: 0)
  }
  /// The entry for a block starting at `rip`.
  @inline(__always)
  static func index(_ rip: UInt64) -> Int {
    Int(truncatingIfNeeded: (rip ^ (rip >> 12)) & UInt64(entries - 1))
  }
}

extension FastOp {
  /// Status-flag use of the translated form; nil when the form is not translated.
  var translatedFlagUse: FlagUse? {
    let none = FlagUse()
    let all = FlagUse(reads: false, writesAll: true)
    let logic = FlagUse(reads: false, writesAll: true, undefined: RFlags.af)
    switch self {
    case .movRR64, .movRR32, .movRI64, .movRI32, .notR64, .notR32, .movzxByteRR, .movzxWordRR, .movsxByteRR64,
      .movsxByteRR32, .movsxWordRR64, .movsxWordRR32, .movsxdRR, .lea64, .lea32, .loadRM64, .loadRM32, .loadRM8,
      .storeMR64, .storeMR32, .storeMR16, .storeMR8, .storeMI64, .storeMI32, .storeMI8, .movzxByteRM, .movzxWordRM,
      .movsxdRM, .jmpRel, .nop, .push64, .pop64, .callRel64, .ret64, .push32, .pop32, .callRel32, .ret32:
      return none
    case .mulR64:
      return FlagUse(reads: false, writesAll: true, undefined: RFlags.sf | RFlags.zf | RFlags.af | RFlags.pf)
    case .addRR64, .addRR32, .subRR64, .subRR32, .cmpRR64, .cmpRR32, .addRI64, .addRI32, .subRI64, .subRI32,
      .cmpRI64, .cmpRI32, .cmpRI8, .cmpRM8, .negR64, .negR32, .addRM64, .addRM32, .subRM64, .subRM32, .cmpRM64,
      .cmpRM32, .cmpMR64, .cmpMR32, .cmpMI64, .cmpMI32, .cmpMI8, .addMR64, .subMR64:
      return all
    case .andRR64, .andRR32, .orRR64, .orRR32, .xorRR64, .xorRR32, .testRR64, .testRR32, .andRI64, .andRI32,
      .orRI64, .orRI32, .xorRI64, .xorRI32, .testRI64, .testRI32, .testRR8, .testRI8, .andRM64, .andRM32, .orRM64,
      .orRM32, .xorRM64, .xorRM32, .testMI8, .testMR64, .testMR32:
      return logic
    case .adcRR64, .adcRR32, .sbbRR64, .sbbRR32, .adcRI64, .adcRI32, .sbbRI64, .sbbRI32, .adcRM64, .sbbRM64,
      .adcMR64, .sbbMR64:
      return FlagUse(reads: true, writesAll: true)
    case .shlRI64, .shlRI32, .shrRI64, .shrRI32, .sarRI64, .sarRI32:
      // OF is undefined unless the count is 1 (`undefinedFlags(of:)` refines it).
      return FlagUse(reads: false, writesAll: true, undefined: RFlags.af | RFlags.of)
    case .shlRC64, .shlRC32, .shrRC64, .shrRC32, .sarRC64, .sarRC32:
      return FlagUse(reads: true, writesAll: false, undefined: RFlags.af | RFlags.of)
    case .incR64, .incR32, .decR64, .decR32:
      return FlagUse(reads: true, writesAll: false)
    case .imulRR64, .imulRR32, .imulRRI64, .imulRRI32:
      return FlagUse(
        reads: false, writesAll: true, undefined: RFlags.sf | RFlags.zf | RFlags.af | RFlags.pf)
    case .cmovRR64, .cmovRR32, .setccR, .jcc:
      return FlagUse(reads: true, writesAll: false)
    default:
      return nil
    }
  }
}

/// Translates decoded blocks of 64-bit and 32-bit code into host code.
///
/// 32-bit code (protected mode, or compatibility mode under a 64-bit kernel) is translated
/// for the conditions the run loop checks before it enters any translated block of it
/// (`CPU.flatLegacyCode`): a 32-bit stack (SS.B set) and CS, DS, ES and SS with base 0, as
/// every flat-model kernel and user space sets them up. Its addresses are 32 bits wide (the
/// address-size truncation), FS and GS add their bases as in 64-bit code, near branches wrap
/// at 4 GiB instead of checking for canonical form, and the stack forms move 4 bytes and
/// update ESP (the upper half of RSP kept, as the interpreter does).
struct BlockTranslator {
  /// Every memory access through the helpers (lockstep mode: the helpers journal stores and
  /// leave MMIO to the interpreter).
  var inlineTLBProbes = true
  /// The code size the block was decoded for: 8 (64-bit code) or 4 (32-bit code). Also the
  /// width of the stack pointer and of the near branches' targets.
  let codeSize: Int

  var emitter = X86Emitter()
  var outOfLine: [(inout X86Emitter) -> Void] = []
  var epilogue = HostLabel(id: 0)
  var instructionOffsets: [Int] = []
  var flagsValidAt: [Bool] = []
  /// The guest's status flags are parked in EBP, where a probe saved them, and the host
  /// RFLAGS hold whatever the probe left: between loads, stores, pushes and pops that neither
  /// read nor write a flag (`keepsFlagsParked`), the flags are put back only once, before the
  /// next instruction that needs them, instead of after every probe. Every exit of those
  /// instructions (a probe's miss path) restores them from EBP.
  var flagsParked = false
  /// The probe of the instruction being emitted leaves the flags parked instead of restoring
  /// them: it and the next instruction keep them parked.
  var parksFlagsAfterProbe = false
  /// Per instruction of the prefix (and after the last): the recipe that computes the flags
  /// again from the guest registers, where one holds (`FlagRecipe.recipes`).
  var flagRecipes: [FlagRecipe?] = []
  /// How the miss paths of the probe being emitted, and the code that unparks the flags, get
  /// the guest's flags back into the host RFLAGS.
  var flagRecovery = FlagRecovery.savedInEBP
  /// The index of the instruction being emitted.
  var emittingIndex = 0
  /// The shifts by an immediate (their indices) that store their operand for a `FlagRecipe`
  /// instead of fixing up their flags in line.
  var shiftRecipes: Set<Int> = []
  /// The decoded block being translated (its index, for the run loop's `last_block`) and its
  /// instruction count; `selfLoopEntry` is the chained entry, the target of a branch back to
  /// the block's first instruction (a loop of one block), nil when the index is unknown.
  private var blockIndex: Int32 = -1
  /// The block's first decoded instruction and the length of the translated prefix.
  private var firstSlot: UnsafePointer<Instruction>?
  private var translatedCount = 0
  private var decodedCount = 0
  private var selfLoopEntry: HostLabel?
  /// Where a branch back to the block's first instruction goes with the guest flags still in
  /// the host RFLAGS: after the entry's flag load, so a loop that carries its flags from one
  /// run of the block to the next (the bzImage decompressor's byte loops, an ADC chain) keeps
  /// them in RFLAGS instead of storing them (PUSHF) and loading them again each time. Nil
  /// when the block does not load the flags at its entry (its first instructions then take
  /// the flags in the context as the guest's: they must be stored) or checks the SSE state
  /// there (which clobbers them).
  private var selfLoopFlagsEntry: HostLabel?

  /// The offset of the block's entry RIP within its page, when its exits to that page are to
  /// be linked directly (`DirectLinkSite`); nil for none.
  var entryPageOffset: Int?

  init(inlineTLBProbes: Bool, codeSize: Int = 8, entryPageOffset: Int? = nil) {
    self.inlineTLBProbes = inlineTLBProbes
    self.codeSize = codeSize
    self.entryPageOffset = entryPageOffset
  }

  /// Whether blocks decoded for `codeSize` are translated (64-bit and 32-bit code).
  static func translates(codeSize: Int) -> Bool { codeSize == 8 || codeSize == 4 }

  /// Instructions without a translation of their own that translated code runs by calling the
  /// interpreter for them (`emitInterpreted`), rather than leaving the block: the string
  /// instructions but INS and OUTS (MOVS, STOS, LODS, SCAS, CMPS, with or without REP), CLI,
  /// PUSHF, RDTSC(P), CMPXCHG8B/16B, SWAPGS and the integer forms the translator lacks (byte
  /// and memory shifts, BT, BSF/BSR, 16-bit CMOVcc, SETcc, XCHG, XADD, CMPXCHG, IMUL and the
  /// zero- and sign-extending moves). None of them transfers control or changes the mode;
  /// should one end the block anyway (a store into decoded code, a fault), the helper says so.
  static let interpretedOps: Set<Op> = [
    .movs, .stos, .lods, .scas, .cmps, .cli, .pushf, .rdtsc, .rdtscp, .cmpxchg8b16b, .swapgs, .shrRm, .shlRm, .sarRm,
    .btRmReg, .bsf, .bsr, .cmovcc, .setcc, .xchgRmReg, .xadd, .cmpxchg, .imulRegRm, .movzxByte, .movzxWord, .movsxByte,
  ]

  /// Whether `slot` has no translation of its own but is run through the interpreter helper.
  static func isInterpreted(_ slot: UnsafePointer<Instruction>) -> Bool {
    translatedFlagUse(slot) == nil && interpretedOps.contains(slot.pointee.op)
  }

  /// Whether `slot` has a translation (and its operands fit the encodings used).
  /// `interpreting`: instructions of `interpretedOps` count as translatable (not in lockstep
  /// mode, whose journal of stores the interpreter would bypass).
  /// `codeSize`: as `BlockTranslator.codeSize`; near branches and stack forms must have it as
  /// their operand size.
  static func canTranslate(
    _ slot: UnsafePointer<Instruction>, offsetAfter: Int, interpreting: Bool, codeSize: Int
  ) -> Bool {
    let instruction = slot.pointee
    if isInterpreted(slot) { return interpreting }
    guard let use = flagUse(slot) else { return false }
    if isIndirectBranch(instruction) && Int(instruction.operandSize) != codeSize { return false }
    if let form = integerForm(instruction), form.kind == .push || form.kind == .leave, form.size != codeSize {
      return false
    }
    // Where the host's undefined shift flags differ from the interpreter's, shifts and rotates
    // get the interpreter's flags set after them (`X86Emitter`'s `interpreterShiftFlags`,
    // `interpreterRotateFlags`; after a shift by CL only for a nonzero count).
    if use.rotate {
      // ROL/ROR of a 32- or 64-bit register by a nonzero immediate count (C1 /0-1, D1 /0-1).
      return !instruction.hasMemoryOperand && instruction.operandSize >= 4 && instruction.rm < 16
        && (instruction.opcode == 0xC1 || instruction.opcode == 0xD1) && rotateCount(instruction) != 0
    }
    if instruction.prefixes & Instruction.Prefix.lock != 0 && integerForm(instruction)?.locked != true { return false }
    switch instruction.fast {
    case .addRI64, .subRI64, .andRI64, .orRI64, .xorRI64, .cmpRI64, .testRI64, .adcRI64, .sbbRI64, .cmpMI64,
      .storeMI64, .imulRRI64:
      return fitsInt32(instruction.immediate)
    case .jcc, .jmpRel, .callRel64, .callRel32:
      return Int(instruction.operandSize) == codeSize
        && fitsInt32(instruction.immediate &+ UInt64(offsetAfter))
    case .push64, .pop64, .ret64:
      return codeSize == 8
    case .push32, .pop32, .ret32:
      return codeSize == 4
    default:
      break
    }
    if instruction.hasMemoryOperand && instruction.fast != .nop {
      if instruction.addressSize == 2 { return false }
      // MOV AL/AX/EAX/RAX with a 64-bit absolute address (A0-A3) has a displacement that
      // does not fit the host's 32-bit one (a 32-bit address is truncated after the sum, so
      // any 32-bit displacement serves).
      let displacement = UInt64(bitPattern: instruction.displacement)
      let fits = fitsInt32(displacement) || (instruction.addressSize == 4 && displacement >> 32 == 0)
      if !fits { return false }
      if instruction.base == Instruction.ripRelative {
        return fitsInt32(UInt64(bitPattern: instruction.displacement) &+ UInt64(offsetAfter))
      }
    }
    return true
  }

  /// Status-flag use of the translated form of `slot`; nil when it has none. Most forms are
  /// the interpreter's fast forms; ROL and ROR (no fast form) are recognized by their op.
  /// An interpreted instruction (`isInterpreted`) reads and writes them all, through the
  /// context.
  static func flagUse(_ slot: UnsafePointer<Instruction>) -> FlagUse? {
    if let use = translatedFlagUse(slot) { return use }
    return interpretedOps.contains(slot.pointee.op) ? FlagUse(reads: true, writesAll: true) : nil
  }

  /// Status-flag use of the instruction's own translation; nil when it has none.
  static func translatedFlagUse(_ slot: UnsafePointer<Instruction>) -> FlagUse? {
    let instruction = slot.pointee
    if instruction.fast == .none && (instruction.op == .rolRm || instruction.op == .rorRm) {
      return FlagUse(reads: true, writesAll: false, undefined: RFlags.of, rotate: true)
    }
    if instruction.fast == .none && (isIndirectBranch(instruction) || SSEForm(instruction) != nil) {
      return FlagUse()
    }
    if let use = instruction.fast.translatedFlagUse { return use }
    return IntegerForm(instruction)?.flagUse
  }

  /// The op-recognized form of an integer instruction whose fast form (if any) has no
  /// translation.
  static func integerForm(_ instruction: Instruction) -> IntegerForm? {
    instruction.fast.translatedFlagUse == nil ? IntegerForm(instruction) : nil
  }

  /// JMP r/m64 or CALL r/m64, or their 32-bit forms in 32-bit code (no fast form: recognized
  /// by its op; `canTranslate` matches the operand size with the code size).
  static func isIndirectBranch(_ instruction: Instruction) -> Bool {
    (instruction.op == .jmpRm || instruction.op == .callRm)
      && (instruction.operandSize == 8 || instruction.operandSize == 4)
  }

  /// Whether this host's MUL and IMUL leave SF, ZF, AF and PF (undefined architecturally) as
  /// the interpreter sets them (`recordMultiplyFlags`: from the low half, AF clear). Where they
  /// differ (an AMD EPYC host does), each translated multiply is followed by code that sets the
  /// interpreter's flags (`X86Emitter.interpreterMultiplyFlags`), so a guest that branches on
  /// them sees the same thing on both tiers.
  static let hostMultiplyFlagsMatchTheInterpreter: Bool = {
    let operands: [(UInt64, UInt64)] = [
      (3, 5), (UInt64.max, 1), (0, 7), (7, 1), (2, 1 << 62), (0x100, 0x100), (1 << 63, 1),
      (UInt64(bitPattern: -59), 0x10_0573), (0xFFFF_FFFF, 0xFFFF_FFFF), (0x1234_5678_9ABC_DEF1, 0x0F0F_0F0F_0F0F_0F0F),
    ]
    let compared = RFlags.sf | RFlags.zf | RFlags.af | RFlags.pf | RFlags.cf
    func expected(low: UInt64, overflow: Bool) -> UInt64 {
      var flags: UInt64 = overflow ? RFlags.cf : 0
      if low.nonzeroBitCount == 0 { flags |= RFlags.zf }
      if low >> 63 != 0 { flags |= RFlags.sf }
      if (low & 0xFF).nonzeroBitCount % 2 == 0 { flags |= RFlags.pf }
      return flags
    }
    for (a, b) in operands {
      let signed = Int64(bitPattern: a).multipliedFullWidth(by: Int64(bitPattern: b))
      let signedOverflow = Int64(bitPattern: signed.low) >> 63 != signed.high
      if hv_host_imul64_flags(a, b) & compared != expected(low: signed.low, overflow: signedOverflow) { return false }
      let unsigned = a.multipliedFullWidth(by: b)
      if hv_host_mul64_flags(a, b) & compared != expected(low: unsigned.low, overflow: unsigned.high != 0) {
        return false
      }
    }
    return true
  }()

  /// Whether this host's shifts and rotates leave AF, and OF for counts above 1 (undefined
  /// architecturally), as the interpreter sets them (Flags.swift: AF clear; SHL OF = MSB ^ CF,
  /// SHR OF = the original MSB, SAR OF = 0; ROL OF = MSB ^ CF, ROR OF = the two top bits
  /// differ). Where they differ (an AMD EPYC host does), shifts and rotates are followed by code
  /// that sets the interpreter's flags (for a shift by CL, behind a test of the count).
  static let hostShiftFlagsMatchTheInterpreter: Bool = {
    let values: [UInt64] = [
      0x8000_0000_0000_0001, 0x7FFF_FFFF_FFFF_FFFF, 0x0123_4567_89AB_CDEF, 0xFFFF_FFFF_8000_0000, 0xF0,
    ]
    let compared = RFlags.status
    for wide in [false, true] {
      let bits: UInt64 = wide ? 64 : 32
      let mask: UInt64 = wide ? .max : 0xFFFF_FFFF
      for value in values {
        let operand = value & mask
        for count in [1, 2, 3, 7, 31] as [UInt64] {
          for kind in 0..<5 {
            var result: UInt64
            var carry: UInt64
            var overflow: UInt64
            let msbOf = { (x: UInt64) in (x >> (bits - 1)) & 1 }
            switch kind {
            case 0:
              result = (operand << count) & mask
              carry = (operand >> (bits - count)) & 1
              overflow = msbOf(result) ^ carry
            case 1:
              result = operand >> count
              carry = (operand >> (count - 1)) & 1
              overflow = msbOf(operand)
            case 2:
              let signed = wide ? Int64(bitPattern: operand) : Int64(Int32(bitPattern: UInt32(operand)))
              result = UInt64(bitPattern: signed >> Int64(count)) & mask
              carry = (operand >> (count - 1)) & 1
              overflow = 0
            case 3:
              result = ((operand << count) | (operand >> (bits - count))) & mask
              carry = result & 1
              overflow = msbOf(result) ^ carry
            default:
              result = ((operand >> count) | (operand << (bits - count))) & mask
              carry = msbOf(result)
              overflow = carry ^ ((result >> (bits - 2)) & 1)
            }
            var expected = carry | overflow << 11
            if kind < 3 {
              if result == 0 { expected |= RFlags.zf }
              if msbOf(result) != 0 { expected |= RFlags.sf }
              if (result & 0xFF).nonzeroBitCount % 2 == 0 { expected |= RFlags.pf }
            }
            // Rotates leave SF, ZF, AF and PF as they were: compare CF and OF only.
            let checked = kind < 3 ? compared : RFlags.cf | RFlags.of
            let host = hv_host_shift_flags(Int32(kind), wide ? 1 : 0, operand, UInt8(count))
            if host & checked != expected & checked { return false }
          }
        }
      }
    }
    return true
  }()

  /// The masked count of a ROL/ROR by immediate.
  static func rotateCount(_ instruction: Instruction) -> UInt8 {
    UInt8(truncatingIfNeeded: instruction.immediate) & (instruction.operandSize == 8 ? 63 : 31)
  }

  static func fitsInt32(_ value: UInt64) -> Bool {
    let signed = Int64(bitPattern: value)
    return signed >= Int64(Int32.min) && signed <= Int64(Int32.max)
  }

  /// Status flags undefined after `slot`, given those undefined before it.
  static func undefinedFlags(after slot: UnsafePointer<Instruction>, before: UInt64) -> UInt64 {
    guard let use = flagUse(slot) else { return before }
    if use.rotate {
      // CF is the last bit rotated; OF is defined for a count of 1 only.
      return before & ~(RFlags.cf | RFlags.of) | (rotateCount(slot.pointee) == 1 ? 0 : RFlags.of)
    }
    if let form = integerForm(slot.pointee) {
      switch form.kind {
      case .inc, .dec: return before & RFlags.cf
      case .bitTest: return before & ~RFlags.cf
      case .shift: return slot.pointee.immediate & 0x1F == 1 ? RFlags.af : RFlags.af | RFlags.of
      default: break
      }
    }
    switch slot.pointee.fast {
    case .shlRI64, .shlRI32, .shrRI64, .shrRI32, .sarRI64, .sarRI32:
      return slot.pointee.immediate == 1 ? RFlags.af : RFlags.af | RFlags.of
    case .incR64, .incR32, .decR64, .decR32:
      return before & RFlags.cf
    case .shlRC64, .shlRC32, .shrRC64, .shrRC32, .sarRC64, .sarRC32:
      return before | use.undefined
    default:
      return use.writesAll ? use.undefined : before
    }
  }

  /// The number of instructions at the start of the `count` at `first` that have no
  /// translation, when a later one has (0 when the first has one, or none has).
  static func untranslatableLead(
    _ first: UnsafePointer<Instruction>, count: Int, interpreting: Bool, codeSize: Int
  ) -> Int {
    var offset = 0
    for index in 0..<count {
      let after = offset + Int((first + index).pointee.length)
      if canTranslate(first + index, offsetAfter: after, interpreting: interpreting, codeSize: codeSize) {
        return index
      }
      offset = after
    }
    return 0
  }

  /// Host registers that can cache guest registers inside a block: the caller-saved ones the
  /// translation uses for nothing else.
  static let cacheHostRegisters: [UInt8] = [HostRegister.r8, HostRegister.r9, HostRegister.r10, HostRegister.r11]

  /// Whether blocks cache guest registers in host registers: on unless the environment sets
  /// `HOSTVISOR_SOFTCPU_REGISTER_CACHE=off` (for measuring what the cache gives, and for
  /// telling a defect of the cache from one of the forms).
  static let cachesRegisters = getenv("HOSTVISOR_SOFTCPU_REGISTER_CACHE").map { String(cString: $0) != "off" } ?? true

  /// The guest-register cache of the first `count` instructions at `first` (the map of
  /// `X86Emitter.cachedRegisters`): the general registers their operands name most often, at
  /// least twice (a cached register costs one load at the block's entry), in
  /// `cacheHostRegisters`, except registers the block writes in part (`codeSize` 4: the
  /// stack pointer). Instructions the interpreter helper runs do not count (their
  /// registers are read from the register array).
  static func registerCache(_ first: UnsafePointer<Instruction>, count: Int, codeSize: Int = 8) -> [UInt8] {
    var uses = [Int](repeating: 0, count: 16)
    // Registers whose slot is written in part (AH..BH, or a 32-bit stack pointer's low half,
    // which keeps the upper one) are left in memory: reloading the whole slot right after a
    // narrower store would wait for the store to complete (no store-to-load forwarding).
    // Bit n: guest register n (0-15) or AH..BH (16-19, `Instruction.highByteBase + n`).
    var partlyWritten: UInt32 = codeSize == 4 ? 1 << 4 : 0
    for index in 0..<count {
      let slot = first + index
      if isInterpreted(slot) { continue }
      let instruction = slot.pointee
      var named: UInt32 = 0
      func name(_ register: UInt8) { if register < 20 { named |= 1 << register } }
      name(instruction.reg)
      if instruction.hasMemoryOperand {
        name(instruction.base)
        name(instruction.index)
      } else {
        name(instruction.rm)
      }
      if instruction.fast != .none {
        name(instruction.fastDst)
        name(instruction.fastSrc)
      }
      for register in 0..<16 where named & 1 << register != 0 { uses[register] += 1 }
      partlyWritten |= named >> 16
      if usesStack(instruction) { uses[4] += 2 }
    }
    var cache = [UInt8](repeating: 0, count: 16)
    let chosen = (0..<16).filter { uses[$0] >= 2 && partlyWritten & 1 << $0 == 0 }.sorted { uses[$0] > uses[$1] }
      .prefix(cacheHostRegisters.count)
    guard !chosen.isEmpty else { return [] }
    for (host, register) in zip(cacheHostRegisters, chosen) { cache[register] = host }
    return cache
  }

  /// Whether the translation of `instruction` reads and writes the guest RSP implicitly.
  static func usesStack(_ instruction: Instruction) -> Bool {
    switch instruction.fast {
    case .push64, .push32, .pop64, .pop32, .callRel64, .callRel32, .ret64, .ret32: return true
    default: break
    }
    switch instruction.op {
    case .pushImm, .pushRm, .leave, .callRm: return true
    default: return false
    }
  }

  /// The fast forms that jump unconditionally: nothing after them in the block is translated.
  static let endsTranslation: Set<FastOp> = [.jmpRel, .callRel64, .ret64, .callRel32, .ret32]

  /// Translates the translatable prefix of the `count` instructions at `first`; nil when not
  /// even the first instruction has a translation.
  mutating func translate(_ first: UnsafePointer<Instruction>, count: Int, block: Int32 = -1) -> TranslatedCode? {
    // Prefix and instruction offsets from the block's entry RIP.
    var offsets = [0]
    var translated = 0
    while translated < count {
      let after = offsets[translated] + Int((first + translated).pointee.length)
      guard
        Self.canTranslate(first + translated, offsetAfter: after, interpreting: inlineTLBProbes, codeSize: codeSize)
      else { break }
      offsets.append(after)
      translated += 1
      // A jump ends the block.
      let last = (first + translated - 1).pointee
      if Self.endsTranslation.contains(last.fast) || Self.isIndirectBranch(last) { break }
    }
    guard translated > 0 else { return nil }
    instructionOffsets = offsets

    // Flag analysis: load at entry if something reads before anything writes all six.
    var loadAtEntry = false
    var written = false
    var undefined: [UInt64] = [0]
    for index in 0..<translated {
      let use = Self.flagUse(first + index)!
      if use.reads && !written { loadAtEntry = true }
      if use.writesAll { written = true }
      undefined.append(Self.undefinedFlags(after: first + index, before: undefined[index]))
    }
    // flagsValidAt[i]: before instruction i the guest flags are in the host RFLAGS.
    flagsValidAt = []
    var valid = loadAtEntry
    for index in 0...translated {
      flagsValidAt.append(valid)
      if index < translated, Self.flagUse(first + index)!.writesAll { valid = true }
    }

    emitter = X86Emitter()
    emitter.entryPageOffset = entryPageOffset
    outOfLine = []
    epilogue = emitter.newLabel()
    emitFrame()
    let chainEntry = emitter.count
    // The guest registers this prefix uses most live in host registers from here on (see
    // `X86Emitter.cachedRegisters`); a block chained to enters here and loads its own.
    emitter.cachedRegisters =
      Self.cachesRegisters ? Self.registerCache(first, count: translated, codeSize: codeSize) : []
    emitter.loadCachedRegisters()
    blockIndex = block
    decodedCount = count
    firstSlot = first
    translatedCount = translated
    // Shifts whose flags only the miss paths after them read keep their operand for a recipe
    // instead of fixing up their flags in line.
    shiftRecipes = []
    if inlineTLBProbes && Self.recomputesFlags {
      for index in 0..<translated where FlagRecipe.shift(first + index, index: index) != nil {
        if !flagsOverwrittenNext(index) && flagsReachOnlyRecipes(after: index) { shiftRecipes.insert(index) }
      }
    }
    flagRecipes = FlagRecipe.recipes(first, count: translated, codeSize: codeSize, shifts: shiftRecipes)
    flagRecovery = .savedInEBP
    selfLoopEntry = nil
    if block >= 0 {
      let entry = emitter.newLabel()
      emitter.bind(entry)
      selfLoopEntry = entry
    }
    // SSE: the block runs only when the run loop found SSE usable (CR0.EM/TS clear, CR4.OSFXSR
    // set) and, for floating-point arithmetic, the guest's MXCSR loaded with every exception
    // masked; otherwise it leaves before its first instruction and the interpreter runs it
    // (and raises #UD, #NM or #XM exactly).
    let forms = (0..<translated).map { SSEForm((first + $0).pointee) }
    let usesSSE = forms.contains { $0 != nil }
    let usesFloatingPoint = forms.contains { $0?.floatingPoint == true }
    if usesSSE {
      let required: Int32 = usesFloatingPoint ? 3 : 1
      emitter.mov(size: 4, HostRegister.rax, .at(HostRegister.r12, ContextOffset.sseState))
      emitter.alu(.and, size: 4, .register(HostRegister.rax), immediate: required)
      emitter.alu(.cmp, size: 4, .register(HostRegister.rax), immediate: required)
      let ready = emitter.newLabel()
      emitter.jump(HostCondition.equal, to: ready)
      emitLeave(rip: 0, result: 0)
      emitter.bind(ready)
    }
    if loadAtEntry { emitter.loadGuestFlags() }
    selfLoopFlagsEntry = nil
    if selfLoopEntry != nil && loadAtEntry && !usesSSE {
      let flagsEntry = emitter.newLabel()
      emitter.bind(flagsEntry)
      selfLoopFlagsEntry = flagsEntry
    }
    var ended = false
    flagsParked = false
    let keepsParked = (0..<translated).map { Self.keepsFlagsParked(first + $0) }
    for index in 0..<translated {
      refreshParkedRecipe(index)
      var parkedFlagsDieHere = false
      if flagsParked && !keepsParked[index] {
        // Parked flags come back before an instruction that is not run with them parked,
        // unless it overwrites them before anything reads them.
        if Self.writesAllFlagsFromRegisters(first + index) {
          flagsParked = false
        } else {
          unparkFlags()
        }
      } else if flagsParked && !parkedFlagsSurvive(index) {
        // Flags parked as a recipe come back before an instruction that writes one of its
        // registers, unless they are dead after it: the recipe still holds on the miss path of
        // the instruction's access, which comes before the write, so they are neither put back
        // nor saved for it.
        if flagsOverwrittenNext(index) {
          parkedFlagsDieHere = true
        } else {
          unparkFlags()
        }
      }
      parksFlagsAfterProbe =
        inlineTLBProbes && keepsParked[index] && index + 1 < translated && keepsParked[index + 1]
        && !parkedFlagsDieHere
      emittingIndex = index
      ended = emitInstruction(first + index, index: index)
      if parkedFlagsDieHere { flagsParked = false }
    }
    if flagsParked { unparkFlags() }
    if !ended {
      storeFlagsIfValid(at: translated)
      if translated == count {
        // The whole block ran: go on to the next one (chained when translated).
        if emitter.staysOnEntryPage(offsets[translated]) {
          emitter.directExit(
            targetOffset: offsets[translated], instructions: translated, result: UInt64(translated),
            epilogue: epilogue)
        } else {
          emitter.chainOrLeave(
            toOffset: offsets[translated], instructions: translated, result: UInt64(translated), epilogue: epilogue)
        }
      } else {
        emitLeave(rip: offsets[translated], result: UInt64(translated))
      }
    }
    for emit in outOfLine { emit(&emitter) }
    emitter.bind(epilogue)
    emitter.alu(.add, size: 8, .register(HostRegister.rsp), immediate: 8)
    for register in [HostRegister.r15, HostRegister.r14, HostRegister.r13, HostRegister.r12, HostRegister.rbp] {
      emitter.pop(register)
    }
    emitter.pop(HostRegister.rbx)
    emitter.ret()
    guard let code = emitter.finish() else { return nil }
    return TranslatedCode(
      code: code, instructions: translated, undefinedAfter: undefined, chainEntry: chainEntry,
      usesFloatingPoint: usesFloatingPoint, linkSites: emitter.linkSites)
  }

  // MARK: Frame, flags and exits

  /// Saves the callee-saved registers and loads the block's fixed registers from the context
  /// (the same in every block, so chained blocks skip it).
  private mutating func emitFrame() {
    for register in [HostRegister.rbx, HostRegister.rbp, HostRegister.r12, HostRegister.r13] {
      emitter.push(register)
    }
    emitter.push(HostRegister.r14)
    emitter.push(HostRegister.r15)
    // Six pushes after the return address: align the stack for helper calls.
    emitter.alu(.sub, size: 8, .register(HostRegister.rsp), immediate: 8)
    emitter.mov(size: 8, HostRegister.r12, .register(HostRegister.rdi))
    emitter.mov(size: 8, HostRegister.rbx, .register(HostRegister.rsi))
    emitter.mov(size: 8, HostRegister.r13, .at(HostRegister.r12, ContextOffset.readTLB))
    emitter.mov(size: 8, HostRegister.r14, .at(HostRegister.r12, ContextOffset.writeTLB))
    emitter.mov(size: 8, HostRegister.r15, .at(HostRegister.r12, ContextOffset.tagExtra))
  }

  /// Puts the flags parked in EBP back into the host RFLAGS (clobbers RAX).
  private mutating func unparkFlags() {
    flagRecovery.emit(&emitter)
    flagsParked = false
  }

  /// Whether flags parked before instruction `index` can stay parked across it: saved in
  /// EBP, or recomputed by a recipe that still holds after it.
  private func parkedFlagsSurvive(_ index: Int) -> Bool {
    guard case .recomputed = flagRecovery else { return true }
    return recipeSurvives(index)
  }

  /// Whether the translation of `slot` can run with the guest's flags parked in EBP
  /// (`flagsParked`): it reads and writes no flag, and its only exits are the miss paths of
  /// its one probe, which restore them from EBP. Loads into and stores from general registers
  /// (8- and 16-bit MOV and MOVZX/MOVSX among them: `IntegerForm`'s `move` and `extend`),
  /// PUSH and POP, and the register forms of `leavesFlagsAndBlockAlone`.
  static func keepsFlagsParked(_ slot: UnsafePointer<Instruction>) -> Bool {
    switch slot.pointee.fast {
    case .loadRM64, .loadRM32, .loadRM8, .movzxByteRM, .movzxWordRM, .movsxdRM, .storeMR64, .storeMR32, .storeMR16,
      .storeMR8, .storeMI64, .storeMI32, .storeMI8, .push64, .push32, .pop64, .pop32:
      return true
    default:
      if leavesFlagsAndBlockAlone(slot) { return true }
      switch integerForm(slot.pointee)?.kind {
      case .move, .extend: return true
      default: return false
      }
    }
  }

  private mutating func storeFlagsIfValid(at index: Int) {
    if flagsValidAt[index] { emitter.storeGuestFlags() }
  }

  /// Whether a later instruction of the translated prefix writes every status flag without
  /// reading one and cannot leave the block before it completes (register operands only, no
  /// shift by a zero count), with only instructions that leave the flags alone and cannot leave
  /// the block in between (`leavesFlagsAndBlockAlone`): whatever flags instruction `index`
  /// leaves are then never seen by the guest, so the code that sets the interpreter's undefined
  /// flags after a multiply, shift or rotate on hosts that differ can be left out. (The
  /// kernel's multi-precision multiply runs four IMULs with MOVs between them.)
  private func flagsOverwrittenNext(_ index: Int) -> Bool {
    guard let firstSlot else { return false }
    var position = index + 1
    while position < translatedCount && Self.leavesFlagsAndBlockAlone(firstSlot + position) { position += 1 }
    guard position < translatedCount else { return false }
    return Self.writesAllFlagsFromRegisters(firstSlot + position)
  }

  /// Whether the flags instruction `index` leaves are read by nothing but the miss paths of
  /// the loads, stores, pushes and pops after it (`keepsFlagsParked`), which recover them from
  /// a `FlagRecipe`, before a later instruction writes all six from registers: a shift's
  /// flags then need no fix-up in line (see `FlagRecipe.Replay.shift`).
  func flagsReachOnlyRecipes(after index: Int) -> Bool {
    guard let firstSlot else { return false }
    var position = index + 1
    while position < translatedCount && Self.keepsFlagsParked(firstSlot + position) { position += 1 }
    guard position < translatedCount else { return false }
    return Self.writesAllFlagsFromRegisters(firstSlot + position)
  }

  /// Whether `next` writes every status flag without reading one and cannot leave the block
  /// before it completes (register operands only, no shift by a zero count).
  private static func writesAllFlagsFromRegisters(_ next: UnsafePointer<Instruction>) -> Bool {
    guard let use = Self.flagUse(next), use.writesAll, !use.reads, !next.pointee.hasMemoryOperand else {
      return false
    }
    switch next.pointee.fast {
    case .shlRI64, .shrRI64, .sarRI64: return next.pointee.immediate & 63 != 0
    case .shlRI32, .shrRI32, .sarRI32: return next.pointee.immediate & 31 != 0
    default: return true
    }
  }

  /// Whether the translation of `slot` neither reads nor writes a status flag nor can leave
  /// the block: moves, zero- and sign-extensions and NOT between registers, LEA, NOP. (PUSH,
  /// POP and the other forms without a flag effect access memory or can fault.)
  static func leavesFlagsAndBlockAlone(_ slot: UnsafePointer<Instruction>) -> Bool {
    switch slot.pointee.fast {
    case .movRR64, .movRR32, .movRI64, .movRI32, .notR64, .notR32, .movzxByteRR, .movzxWordRR, .movsxByteRR64,
      .movsxByteRR32, .movsxWordRR64, .movsxWordRR32, .movsxdRR, .lea64, .lea32, .nop:
      return true
    default:
      return false
    }
  }

  /// Whether the guest's flags in the host RFLAGS are dead once instruction `index` has made
  /// its (only) memory access, so the probe need not put them back after saving them for its
  /// miss path: the instruction writes all six itself after the access without reading one
  /// (`writesAllFlags`), or it touches none and a later one writes all six before anything can
  /// read them or leave (`flagsOverwrittenNext`). Only for translations that read no
  /// host flag after the access.
  func flagsDeadAfterAccess(_ index: Int, writesAllFlags: Bool) -> Bool {
    writesAllFlags || flagsOverwrittenNext(index)
  }

  /// Whether the shift or rotate at `index` needs the code that sets the interpreter's
  /// undefined flags after it: the host's differ and someone may see them.
  func fixesShiftFlags(after index: Int) -> Bool {
    !Self.hostShiftFlagsMatchTheInterpreter && !flagsOverwrittenNext(index)
  }

  /// The same for the multiply at `index`.
  func fixesMultiplyFlags(after index: Int) -> Bool {
    !Self.hostMultiplyFlagsMatchTheInterpreter && !flagsOverwrittenNext(index)
  }

  /// After a shift by CL (count in RCX, the operand before the shift in RDX) on a host whose
  /// undefined shift flags differ from the interpreter's: the interpreter's flags, unless the
  /// masked count is 0 (the shift then left every flag alone). Tests the count without
  /// touching the flags: its low 6 (5) bits moved to the top of CL, then JRCXZ.
  private mutating func emitShiftFlagsForNonzeroCount(_ kind: HostShift, size: Int) {
    let rcx = HostRegister.rcx
    for _ in 0..<(size == 8 ? 2 : 3) {
      emitter.lea(rcx, .memory(base: rcx, index: rcx, scale: 0, displacement: 0))
    }
    emitter.movzx(rcx, sourceSize: 1, .register(rcx))
    emitter.skipIfRCXIsZero { emitter in emitter.interpreterShiftFlags(kind, size: size) }
  }

  private mutating func emitLeave(rip offset: Int, result: UInt64) {
    emitter.leave(ripOffset: offset, result: result, epilogue: epilogue)
  }

  // MARK: Operands

  /// The whole guest register `register` (see `guestRegister(_:size:)`).
  private func guest(_ register: UInt8) -> HostOperand {
    guestRegister(register, size: 8)
  }

  /// A 32-bit operation whose result goes zero-extended into the whole guest register slot
  /// `destination`: `operation` gets the host register that holds the destination's value (its
  /// cached host register, or `scratch` loaded from the slot, or not loaded when
  /// `readsDestination` is false) and writes it with a 4-byte instruction; the register is
  /// then stored whole to the slot.
  mutating func emitWrite32(
    _ destination: HostOperand, scratch: UInt8 = HostRegister.rax, readsDestination: Bool = true,
    _ operation: (inout X86Emitter, UInt8) -> Void
  ) {
    if let host = emitter.cachedHost(destination) {
      operation(&emitter, host)
      emitter.storeToSlot(host, destination)
    } else {
      if readsDestination { emitter.mov(size: 4, scratch, destination) }
      operation(&emitter, scratch)
      emitter.mov(size: 8, destination, scratch)
    }
  }

  /// `target` = the effective address (no segment) of the memory operand of `slot`, `width`
  /// bytes wide (4: wrapped at 4 GiB and zero-extended; nil: the instruction's address size),
  /// without touching the host flags. Registers held in the guest-register cache are used
  /// where they are; the others are loaded into RSI (base) and RDI (index), so the sum is one
  /// LEA. Clobbers RSI and RDI.
  private mutating func emitEffectiveAddress(
    _ slot: UnsafePointer<Instruction>, index: Int, into target: UInt8 = HostRegister.rsi, width: Int? = nil
  ) {
    let instruction = slot.pointee
    let width = width ?? (instruction.addressSize == 4 ? 4 : 8)
    var displacement = instruction.displacement
    let base: UInt8
    if instruction.base < 16 {
      if let host = emitter.cachedHost(guest(instruction.base)) {
        base = host
      } else {
        base = HostRegister.rsi
        emitter.mov(size: 8, base, guest(instruction.base))
      }
    } else if instruction.base == Instruction.ripRelative {
      base = HostRegister.rsi
      emitter.mov(size: 8, base, .at(HostRegister.r12, ContextOffset.entryRIP))
      displacement &+= Int64(instructionOffsets[index + 1])
    } else {
      base = HostRegister.rsi
      emitter.mov(size: 4, .register(base), immediate: 0)
    }
    var indexRegister: UInt8?
    if instruction.index != Instruction.noRegister {
      if let host = emitter.cachedHost(guest(instruction.index)) {
        indexRegister = host
      } else {
        indexRegister = HostRegister.rdi
        emitter.mov(size: 8, HostRegister.rdi, guest(instruction.index))
      }
    }
    let displacement32 = Int32(truncatingIfNeeded: displacement)
    if indexRegister == nil && displacement32 == 0 {
      // A MOV of 4 bytes zero-extends as the 4-byte LEA would.
      if base != target || width == 4 { emitter.mov(size: width, target, .register(base)) }
      return
    }
    emitter.lea(
      size: width, target,
      .memory(base: base, index: indexRegister, scale: instruction.scaleShift, displacement: displacement32))
  }

  /// RSI = the linear address of the access: the memory operand, or the stack (`stackOffset`
  /// bytes from the guest RSP, or from RBP for LEAVE's `stackRegister` 5). SS has no base (64-bit
  /// mode, or a base of 0 checked before 32-bit code runs); the stack pointer is `codeSize`
  /// bytes wide, so a 32-bit one wraps at 4 GiB.
  private mutating func emitAccessAddress(
    _ slot: UnsafePointer<Instruction>, index: Int, stackOffset: Int?, stackRegister: UInt8 = 4
  ) {
    guard let stackOffset else {
      emitLinearAddress(slot, index: index)
      return
    }
    emitter.mov(size: codeSize, HostRegister.rsi, guest(stackRegister))
    if stackOffset != 0 { emitter.lea(size: codeSize, HostRegister.rsi, .at(HostRegister.rsi, stackOffset)) }
  }

  /// RSI = the linear address of the memory operand (64-bit mode: only FS and GS have bases).
  mutating func emitLinearAddress(_ slot: UnsafePointer<Instruction>, index: Int) {
    emitEffectiveAddress(slot, index: index)
    let segment = slot.pointee.segment
    if segment == SegmentIndex.fs || segment == SegmentIndex.gs {
      emitter.mov(size: 8, HostRegister.rdi, .at(HostRegister.r12, ContextOffset.segmentBase))
      emitter.mov(size: 8, HostRegister.rdi, .at(HostRegister.rdi, Int(segment) * 8))
      emitter.lea(HostRegister.rsi, .memory(base: HostRegister.rsi, index: HostRegister.rdi, scale: 0, displacement: 0))
    }
  }

  /// Probes the read (or write) TLB for `size` bytes at RSI. On a hit RDX = host address and
  /// the host flags are intact, unless `restoresFlags` is false (nobody reads them before they
  /// are written again: `flagsDeadAfterAccess`); on a miss jumps to `miss` with the flags
  /// saved in EBP (when valid).
  mutating func emitProbe(
    size: Int, write: Bool, flagsValid: Bool, restoresFlags: Bool = true, miss: HostLabel, aligned: Bool = false
  ) {
    // Parked flags are in EBP or recomputable already.
    if flagsValid && !flagsParked {
      keepFlagsForProbe(at: emittingIndex, parking: restoresFlags && parksFlagsAfterProbe)
    }
    if aligned {
      // A misaligned access takes the slow path, whose helper raises the #GP(0).
      emitter.test(size: 4, .register(HostRegister.rsi), immediate: Int32(size - 1))
      emitter.jump(HostCondition.notEqual, to: miss)
    }
    // RCX = `tlbIndex(RSI)` scaled by the entry's size: two steps (the page's low bits are
    // the low bits of ESI), the table's base added by the compare's address.
    assert(MemoryLayout<TLBEntry>.stride == 16)
    let table = write ? HostRegister.r14 : HostRegister.r13
    func entry(_ offset: Int) -> HostOperand {
      .memory(base: HostRegister.rcx, index: table, scale: 0, displacement: Int32(offset))
    }
    emitter.mov(size: 4, HostRegister.rcx, .register(HostRegister.rsi))
    emitter.shift(.shr, size: 4, .register(HostRegister.rcx), count: 12 - 4)
    emitter.alu(.and, size: 4, .register(HostRegister.rcx), immediate: Int32(tlbIndexMask << 4))
    emitter.lea(HostRegister.rdx, .at(HostRegister.rsi, size - 1))
    emitter.alu(.and, size: 8, .register(HostRegister.rdx), immediate: -4096)
    emitter.alu(.or, size: 8, HostRegister.rdx, .register(HostRegister.r15))
    emitter.alu(.cmp, size: 8, HostRegister.rdx, entry(0))
    let victim = emitter.newLabel()
    let found = emitter.newLabel()
    emitter.jump(HostCondition.notEqual, to: victim)
    emitter.mov(size: 8, HostRegister.rdx, entry(8))
    emitter.bind(found)
    emitter.alu(.add, size: 8, HostRegister.rdx, .register(HostRegister.rsi))
    if flagsValid {
      // Flags the probe need not restore are dead: nothing reads them before they are written.
      if restoresFlags && !parksFlagsAfterProbe {
        // RDX holds the host address; RCX (the probe's index) is free.
        if case .recomputed(let recipe) = flagRecovery, !recipe.keepsRDX {
          emitter.mov(size: 8, HostRegister.rcx, .register(HostRegister.rdx))
          recipe.emit(&emitter)
          emitter.mov(size: 8, HostRegister.rdx, .register(HostRegister.rcx))
        } else {
          flagRecovery.emit(&emitter)
        }
      }
      flagsParked = restoresFlags && parksFlagsAfterProbe
    }
    // The victim way (`tlbSlots`), out of line: a hit there goes on as a primary hit.
    let victimOffset = tlbEntries * MemoryLayout<TLBEntry>.stride
    outOfLine.append { emitter in
      emitter.bind(victim)
      emitter.alu(.cmp, size: 8, HostRegister.rdx, entry(victimOffset))
      emitter.jump(HostCondition.notEqual, to: miss)
      emitter.mov(size: 8, HostRegister.rdx, entry(victimOffset + 8))
      emitter.jump(to: found)
    }
  }

  /// RAX = `size` bytes at [RDX], zero-extended.
  private mutating func emitLoadHost(size: Int, from source: HostOperand) {
    switch size {
    case 8: emitter.mov(size: 8, HostRegister.rax, source)
    case 4: emitter.mov(size: 4, HostRegister.rax, source)
    default: emitter.movzx(HostRegister.rax, sourceSize: size, source)
    }
  }

  /// Instruction `index` run by the interpreter (`CPU.translatedInterpret`): the status flags
  /// go to the context before and come back after; the helper's verdict is the memory
  /// helpers' (1: leave before the instruction, which the interpreter then runs and faults on;
  /// 2: the block ends after it, with the RIP the interpreter left in the context).
  private mutating func emitInterpreted(_ slot: UnsafePointer<Instruction>, index: Int) {
    if flagsValidAt[index] { emitter.storeGuestFlags() }
    emitter.mov(size: 8, HostRegister.rdi, .register(HostRegister.r12))
    emitter.movImmediate64(HostRegister.rsi, UInt64(UInt(bitPattern: slot)))
    emitter.mov(size: 4, .register(HostRegister.rdx), immediate: Int32(instructionOffsets[index]))
    emitter.call(.at(HostRegister.r12, ContextOffset.interpretHelper))
    emitter.alu(.cmp, size: 8, .at(HostRegister.r12, ContextOffset.exit), immediate: 0)
    let leaving = emitter.newLabel()
    emitter.jump(HostCondition.notEqual, to: leaving)
    emitter.loadGuestFlags()
    let epilogue = self.epilogue
    let offset = instructionOffsets[index]
    outOfLine.append { emitter in
      emitter.bind(leaving)
      let ended = emitter.newLabel()
      emitter.alu(.cmp, size: 8, .at(HostRegister.r12, ContextOffset.exit), immediate: 2)
      emitter.jump(HostCondition.equal, to: ended)
      emitter.leave(ripOffset: offset, result: UInt64(index), epilogue: epilogue)
      emitter.bind(ended)
      emitter.movImmediate64(HostRegister.rax, UInt64(index + 1) | translationEndedBit)
      emitter.jump(to: epilogue)
    }
  }

  /// Out-of-line code: on a miss in instruction `index` (flags in EBP when valid), stores the
  /// flags to the context and leaves before the instruction.
  mutating func deferLeaveBefore(_ index: Int, miss: HostLabel) {
    let valid = flagsValidAt[index]
    let offset = instructionOffsets[index]
    let epilogue = self.epilogue
    let recovery = flagRecovery
    outOfLine.append { emitter in
      emitter.bind(miss)
      if valid {
        recovery.emit(&emitter)
        emitter.storeGuestFlags()
      }
      emitter.leave(ripOffset: offset, result: UInt64(index), epilogue: epilogue)
    }
  }

  /// Load of `size` bytes at the memory operand into RAX (zero-extended), with the host flags
  /// intact afterwards: inline probe, helper call on a miss.
  ///
  /// `flagsDead`: the flags need not survive the access on its fast path
  /// (`flagsDeadAfterAccess`).
  mutating func emitLoad(
    _ slot: UnsafePointer<Instruction>, index: Int, size: Int, stackOffset: Int? = nil, stackRegister: UInt8 = 4,
    flagsDead: Bool = false
  ) {
    emitAccessAddress(slot, index: index, stackOffset: stackOffset, stackRegister: stackRegister)
    let valid = flagsValidAt[index]
    let miss = emitter.newLabel()
    let resume = emitter.newLabel()
    if inlineTLBProbes {
      emitProbe(size: size, write: false, flagsValid: valid, restoresFlags: !flagsDead, miss: miss)
      emitLoadHost(size: size, from: .at(HostRegister.rdx, 0))
    } else {
      if valid { saveFlagsInEBP() }
      emitter.jump(to: miss)
    }
    emitter.bind(resume)
    let epilogue = self.epilogue
    let offset = instructionOffsets[index]
    let recovery = flagRecovery
    outOfLine.append { emitter in
      emitter.bind(miss)
      if valid {
        recovery.emit(&emitter)
        emitter.storeGuestFlags()
      }
      emitter.mov(size: 8, HostRegister.rdi, .register(HostRegister.r12))
      emitter.mov(size: 4, .register(HostRegister.rdx), immediate: Int32(size))
      emitter.call(.at(HostRegister.r12, ContextOffset.loadHelper))
      emitter.alu(.cmp, size: 8, .at(HostRegister.r12, ContextOffset.exit), immediate: 0)
      let fine = emitter.newLabel()
      emitter.jump(HostCondition.equal, to: fine)  // JE
      emitter.leave(ripOffset: offset, result: UInt64(index), epilogue: epilogue)
      emitter.bind(fine)
      if valid {
        emitter.mov(size: 8, HostRegister.rdi, .register(HostRegister.rax))
        emitter.loadGuestFlags()
        emitter.mov(size: 8, HostRegister.rax, .register(HostRegister.rdi))
      }
      emitter.jump(to: resume)
    }
  }

  /// Store of `size` bytes of RAX's value, computed by `value` (which must not touch flags),
  /// to the memory operand.
  ///
  /// `stackOffset`: the access is to the stack (see `emitAccessAddress`). `flagsLive`: false
  /// when the flags were already stored (the instruction ends the block). `flagsDead`: as for
  /// `emitLoad`. `after` completes the instruction once the store is done (both paths);
  /// `endedRIPOffset` is where a store that invalidated decoded code leaves the block
  /// (default: the next instruction).
  mutating func emitStore(
    _ slot: UnsafePointer<Instruction>, index: Int, size: Int, stackOffset: Int? = nil, flagsLive: Bool = true,
    flagsDead: Bool = false, after: ((inout X86Emitter) -> Void)? = nil, endedRIPOffset: Int? = nil,
    endedRIPInContext: Bool = false, value: @escaping (inout X86Emitter, UInt8) -> Void
  ) {
    emitAccessAddress(slot, index: index, stackOffset: stackOffset)
    let valid = flagsLive && flagsValidAt[index]
    let miss = emitter.newLabel()
    let resume = emitter.newLabel()
    if inlineTLBProbes {
      emitProbe(size: size, write: true, flagsValid: valid, restoresFlags: !flagsDead, miss: miss)
      value(&emitter, HostRegister.rax)
      emitter.mov(size: size, .at(HostRegister.rdx, 0), HostRegister.rax)
    } else {
      if valid { saveFlagsInEBP() }
      emitter.jump(to: miss)
    }
    emitter.bind(resume)
    after?(&emitter)
    let epilogue = self.epilogue
    let offset = instructionOffsets[index]
    let nextOffset = endedRIPOffset ?? instructionOffsets[index + 1]
    let recovery = flagRecovery
    outOfLine.append { emitter in
      emitter.bind(miss)
      if valid {
        recovery.emit(&emitter)
        emitter.storeGuestFlags()
      }
      value(&emitter, HostRegister.rcx)
      emitter.mov(size: 8, HostRegister.rdi, .register(HostRegister.r12))
      emitter.mov(size: 4, .register(HostRegister.rdx), immediate: Int32(size))
      emitter.call(.at(HostRegister.r12, ContextOffset.storeHelper))
      emitter.mov(size: 8, HostRegister.rax, .at(HostRegister.r12, ContextOffset.exit))
      emitter.alu(.cmp, size: 8, .register(HostRegister.rax), immediate: 0)
      let fine = emitter.newLabel()
      let ended = emitter.newLabel()
      emitter.jump(HostCondition.equal, to: fine)  // JE
      emitter.alu(.cmp, size: 8, .register(HostRegister.rax), immediate: 2)
      emitter.jump(HostCondition.equal, to: ended)  // JE
      emitter.leave(ripOffset: offset, result: UInt64(index), epilogue: epilogue)
      emitter.bind(ended)
      after?(&emitter)
      if endedRIPInContext {
        emitter.movImmediate64(HostRegister.rax, UInt64(index + 1) | translationEndedBit)
        emitter.jump(to: epilogue)
      } else {
        emitter.leave(ripOffset: nextOffset, result: UInt64(index + 1) | translationEndedBit, epilogue: epilogue)
      }
      emitter.bind(fine)
      if valid { emitter.loadGuestFlags() }
      emitter.jump(to: resume)
    }
  }

  // MARK: Instructions

  /// Emits instruction `index`; returns true when it ended the block (a jump).
  private mutating func emitInstruction(_ slot: UnsafePointer<Instruction>, index: Int) -> Bool {
    let instruction = slot.pointee
    let dst = guest(instruction.fastDst)
    let src = guest(instruction.fastSrc)
    let rax = HostRegister.rax
    let rcx = HostRegister.rcx
    let immediate = instruction.immediate
    let imm32 = Int32(truncatingIfNeeded: immediate)

    if Self.isInterpreted(slot) {
      emitInterpreted(slot, index: index)
      return false
    }
    if let form = SSEForm(instruction) {
      emitSSE(slot, index: index, form: form)
      return false
    }
    if Self.isIndirectBranch(instruction) {
      emitIndirectBranch(slot, index: index)
      return true
    }
    if Self.flagUse(slot)!.rotate {
      let kind: HostShift = instruction.op == .rolRm ? .rol : .ror
      let count = Self.rotateCount(instruction)
      let register = guest(instruction.rm)
      if instruction.operandSize == 8 {
        emitter.shift(kind, size: 8, register, count: count)
      } else {
        emitter.mov(size: 4, rax, register)
        emitter.shift(kind, size: 4, .register(rax), count: count)
        emitter.mov(size: 8, register, rax)
      }
      if fixesShiftFlags(after: index) {
        let size = Int(instruction.operandSize == 8 ? 8 : 4)
        emitter.mov(size: size, HostRegister.rdx, register)
        emitter.interpreterRotateFlags(kind, size: size)
      }
      return false
    }
    if let form = Self.integerForm(instruction) {
      emitInteger(slot, index: index, form: form)
      return false
    }
    switch instruction.fast {
    case .nop: break
    case .movRR64:
      emitter.mov(size: 8, rax, src)
      emitter.mov(size: 8, dst, rax)
    case .movRR32:
      emitWrite32(dst, readsDestination: false) { emitter, register in emitter.mov(size: 4, register, src) }
    case .movRI64:
      if Self.fitsInt32(immediate) {
        emitter.mov(size: 8, dst, immediate: imm32)
      } else {
        emitter.movImmediate64(rax, immediate)
        emitter.mov(size: 8, dst, rax)
      }
    case .movRI32:
      emitter.movImmediate64(rax, immediate & 0xFFFF_FFFF)
      emitter.mov(size: 8, dst, rax)

    case .addRR64, .subRR64, .andRR64, .orRR64, .xorRR64, .adcRR64, .sbbRR64, .cmpRR64:
      emitter.mov(size: 8, rax, src)
      emitter.alu(Self.aluKind(instruction.fast), size: 8, dst, rax)
    case .testRR64:
      emitter.mov(size: 8, rax, src)
      emitter.test(size: 8, dst, rax)
    case .addRR32, .subRR32, .andRR32, .orRR32, .xorRR32, .adcRR32, .sbbRR32:
      let kind = Self.aluKind(instruction.fast)
      emitWrite32(dst) { emitter, register in emitter.alu(kind, size: 4, register, src) }
    case .cmpRR32:
      emitter.mov(size: 4, rax, dst)
      emitter.alu(.cmp, size: 4, rax, src)
    case .testRR32:
      emitter.mov(size: 4, rax, dst)
      emitter.test(size: 4, src, rax)
    case .addRI64, .subRI64, .andRI64, .orRI64, .xorRI64, .adcRI64, .sbbRI64, .cmpRI64:
      emitter.alu(Self.aluKind(instruction.fast), size: 8, dst, immediate: imm32)
    case .testRI64:
      emitter.test(size: 8, dst, immediate: imm32)
    case .addRI32, .subRI32, .andRI32, .orRI32, .xorRI32, .adcRI32, .sbbRI32:
      let kind = Self.aluKind(instruction.fast)
      emitWrite32(dst) { emitter, register in emitter.alu(kind, size: 4, .register(register), immediate: imm32) }
    case .cmpRI32:
      emitter.alu(.cmp, size: 4, dst, immediate: imm32)
    case .testRI32:
      emitter.test(size: 4, dst, immediate: imm32)
    case .testRR8:
      emitter.mov(size: 1, rax, src)
      emitter.test(size: 1, dst, rax)
    case .testRI8:
      emitter.test(size: 1, dst, immediate: imm32)
    case .cmpRI8:
      emitter.alu(.cmp, size: 1, dst, immediate: imm32)

    case .shlRI64, .shrRI64, .sarRI64:
      let fixFlags = immediate & 63 != 0 && fixesShiftFlags(after: index) && !shiftRecipes.contains(index)
      if shiftRecipes.contains(index) {
        emitter.mov(size: 8, rax, dst)
        emitter.mov(size: 8, .at(HostRegister.r12, ContextOffset.flagOperand), rax)
      }
      if fixFlags { emitter.mov(size: 8, HostRegister.rdx, dst) }
      emitter.shift(Self.shiftKind(instruction.fast), size: 8, dst, count: UInt8(truncatingIfNeeded: immediate))
      if fixFlags { emitter.interpreterShiftFlags(Self.shiftKind(instruction.fast), size: 8) }
    case .shlRI32, .shrRI32, .sarRI32:
      let fixFlags = immediate & 31 != 0 && fixesShiftFlags(after: index) && !shiftRecipes.contains(index)
      emitter.mov(size: 4, rax, dst)
      if shiftRecipes.contains(index) { emitter.mov(size: 8, .at(HostRegister.r12, ContextOffset.flagOperand), rax) }
      if fixFlags { emitter.mov(size: 4, HostRegister.rdx, .register(rax)) }
      emitter.shift(
        Self.shiftKind(instruction.fast), size: 4, .register(rax), count: UInt8(truncatingIfNeeded: immediate))
      emitter.mov(size: 8, dst, rax)
      if fixFlags { emitter.interpreterShiftFlags(Self.shiftKind(instruction.fast), size: 4) }
    case .shlRC64, .shrRC64, .sarRC64:
      let fixFlags = fixesShiftFlags(after: index)
      emitter.movzx(rcx, sourceSize: 1, guest(1))
      if fixFlags { emitter.mov(size: 8, HostRegister.rdx, dst) }
      emitter.shiftByCL(Self.shiftKind(instruction.fast), size: 8, dst)
      if fixFlags { emitShiftFlagsForNonzeroCount(Self.shiftKind(instruction.fast), size: 8) }
    case .shlRC32, .shrRC32, .sarRC32:
      let fixFlags = fixesShiftFlags(after: index)
      emitter.movzx(rcx, sourceSize: 1, guest(1))
      emitter.mov(size: 4, rax, dst)
      if fixFlags { emitter.mov(size: 4, HostRegister.rdx, .register(rax)) }
      emitter.shiftByCL(Self.shiftKind(instruction.fast), size: 4, .register(rax))
      emitter.mov(size: 8, dst, rax)
      if fixFlags { emitShiftFlagsForNonzeroCount(Self.shiftKind(instruction.fast), size: 4) }

    case .incR64: emitter.inc(size: 8, dst)
    case .decR64: emitter.dec(size: 8, dst)
    case .negR64: emitter.neg(size: 8, dst)
    case .notR64: emitter.not(size: 8, dst)
    case .incR32, .decR32, .negR32, .notR32:
      let fast = instruction.fast
      emitWrite32(dst) { emitter, register in
        switch fast {
        case .incR32: emitter.inc(size: 4, .register(register))
        case .decR32: emitter.dec(size: 4, .register(register))
        case .negR32: emitter.neg(size: 4, .register(register))
        default: emitter.not(size: 4, .register(register))
        }
      }

    case .movzxByteRR, .movzxWordRR:
      emitter.movzx(rax, sourceSize: instruction.fast == .movzxByteRR ? 1 : 2, src)
      emitter.mov(size: 8, dst, rax)
    case .movsxByteRR64, .movsxWordRR64, .movsxdRR:
      let sourceSize = instruction.fast == .movsxByteRR64 ? 1 : instruction.fast == .movsxWordRR64 ? 2 : 4
      emitter.movsx(size: 8, rax, sourceSize: sourceSize, src)
      emitter.mov(size: 8, dst, rax)
    case .movsxByteRR32, .movsxWordRR32:
      emitter.movsx(size: 4, rax, sourceSize: instruction.fast == .movsxByteRR32 ? 1 : 2, src)
      emitter.mov(size: 8, dst, rax)

    case .imulRR64:
      emitter.mov(size: 8, rax, dst)
      emitter.imul(size: 8, rax, src)
      emitter.mov(size: 8, dst, rax)
      if fixesMultiplyFlags(after: index) {
        emitter.interpreterMultiplyFlags(size: 8)
      }
    case .imulRR32:
      if fixesMultiplyFlags(after: index) {
        // The flags' fix-up reads the product in EAX.
        emitter.mov(size: 4, rax, dst)
        emitter.imul(size: 4, rax, src)
        emitter.mov(size: 8, dst, rax)
        emitter.interpreterMultiplyFlags(size: 4)
      } else {
        emitWrite32(dst) { emitter, register in emitter.imul(size: 4, register, src) }
      }
    case .imulRRI64:
      emitter.imul(size: 8, rax, src, immediate: imm32)
      emitter.mov(size: 8, dst, rax)
      if fixesMultiplyFlags(after: index) {
        emitter.interpreterMultiplyFlags(size: 8)
      }
    case .imulRRI32:
      emitter.imul(size: 4, rax, src, immediate: imm32)
      emitter.mov(size: 8, dst, rax)
      if fixesMultiplyFlags(after: index) {
        emitter.interpreterMultiplyFlags(size: 4)
      }

    case .cmovRR64:
      emitter.mov(size: 8, rax, dst)
      emitter.cmov(UInt8(truncatingIfNeeded: instruction.opcode), size: 8, rax, src)
      emitter.mov(size: 8, dst, rax)
    case .cmovRR32:
      // A 32-bit CMOVcc zero-extends its destination whatever the condition.
      let condition = UInt8(truncatingIfNeeded: instruction.opcode)
      emitWrite32(dst) { emitter, register in emitter.cmov(condition, size: 4, register, src) }
    case .setccR:
      emitter.set(UInt8(truncatingIfNeeded: instruction.opcode), dst)

    case .lea64, .lea32:
      // The address computed into the destination's host register when it is cached.
      let width = instruction.fast == .lea32 || instruction.addressSize == 4 ? 4 : 8
      if let host = emitter.cachedHost(dst) {
        emitEffectiveAddress(slot, index: index, into: host, width: width)
        emitter.storeToSlot(host, dst)
      } else {
        emitEffectiveAddress(slot, index: index, width: width)
        emitter.mov(size: 8, dst, HostRegister.rsi)
      }

    case .loadRM64, .loadRM32, .movzxByteRM, .movzxWordRM:
      let size =
        instruction.fast == .loadRM64 ? 8 : instruction.fast == .loadRM32 ? 4 : instruction.fast == .movzxByteRM ? 1 : 2
      emitLoad(slot, index: index, size: size, flagsDead: flagsDeadAfterAccess(index, writesAllFlags: false))
      emitter.mov(size: 8, dst, rax)
    case .loadRM8:
      emitLoad(slot, index: index, size: 1, flagsDead: flagsDeadAfterAccess(index, writesAllFlags: false))
      emitter.mov(size: 1, dst, rax)
    case .movsxdRM:
      emitLoad(slot, index: index, size: 4, flagsDead: flagsDeadAfterAccess(index, writesAllFlags: false))
      emitter.movsx(size: 8, rax, sourceSize: 4, .register(rax))
      emitter.mov(size: 8, dst, rax)
    case .addRM64, .subRM64, .andRM64, .orRM64, .xorRM64, .cmpRM64, .adcRM64, .sbbRM64:
      // ADC and SBB read CF after the access: the probe puts the flags back, whatever follows.
      let readsCarry = instruction.fast == .adcRM64 || instruction.fast == .sbbRM64
      emitLoad(slot, index: index, size: 8, flagsDead: !readsCarry)
      emitter.alu(Self.aluKind(instruction.fast), size: 8, dst, rax)
    case .addRM32, .subRM32, .andRM32, .orRM32, .xorRM32:
      emitLoad(slot, index: index, size: 4, flagsDead: true)
      let kind = Self.aluKind(instruction.fast)
      emitWrite32(dst, scratch: rcx) { emitter, register in emitter.alu(kind, size: 4, .register(register), rax) }
    case .cmpRM32:
      emitLoad(slot, index: index, size: 4, flagsDead: true)
      emitter.alu(.cmp, size: 4, dst, rax)
    case .cmpRM8:
      emitLoad(slot, index: index, size: 1, flagsDead: true)
      emitter.alu(.cmp, size: 1, dst, rax)
    case .cmpMR64, .cmpMR32:
      let size = instruction.fast == .cmpMR64 ? 8 : 4
      emitLoad(slot, index: index, size: size, flagsDead: true)
      emitter.alu(.cmp, size: size, rax, src)
    case .cmpMI64, .cmpMI32, .cmpMI8:
      let size = instruction.fast == .cmpMI64 ? 8 : instruction.fast == .cmpMI32 ? 4 : 1
      emitLoad(slot, index: index, size: size, flagsDead: true)
      emitter.alu(.cmp, size: size, .register(rax), immediate: imm32)
    case .testMR64, .testMR32:
      let size = instruction.fast == .testMR64 ? 8 : 4
      emitLoad(slot, index: index, size: size, flagsDead: true)
      emitter.test(size: size, src, rax)
    case .testMI8:
      emitLoad(slot, index: index, size: 1, flagsDead: true)
      emitter.test(size: 1, .register(rax), immediate: imm32)

    case .storeMR64, .storeMR32, .storeMR16, .storeMR8:
      let size =
        instruction.fast == .storeMR64 ? 8 : instruction.fast == .storeMR32 ? 4 : instruction.fast == .storeMR16 ? 2 : 1
      let source = src
      emitStore(slot, index: index, size: size, flagsDead: flagsDeadAfterAccess(index, writesAllFlags: false)) {
        emitter, register in
        emitter.mov(size: 8, register, source)
      }
    case .storeMI64, .storeMI32, .storeMI8:
      let size = instruction.fast == .storeMI64 ? 8 : instruction.fast == .storeMI32 ? 4 : 1
      let value = size == 8 ? immediate : immediate & sizeMask(UInt8(size))
      emitStore(slot, index: index, size: size, flagsDead: flagsDeadAfterAccess(index, writesAllFlags: false)) {
        emitter, register in
        emitter.movImmediate64(register, value)
      }

    case .addMR64, .subMR64, .adcMR64, .sbbMR64:
      emitLinearAddress(slot, index: index)
      let miss = emitter.newLabel()
      if inlineTLBProbes {
        let readsCarry = instruction.fast == .adcMR64 || instruction.fast == .sbbMR64
        emitProbe(size: 8, write: true, flagsValid: flagsValidAt[index], restoresFlags: readsCarry, miss: miss)
        emitter.mov(size: 8, rax, src)
        emitter.alu(Self.aluKind(instruction.fast), size: 8, .at(HostRegister.rdx, 0), rax)
      } else {
        if flagsValidAt[index] { saveFlagsInEBP() }
        emitter.jump(to: miss)
      }
      deferLeaveBefore(index, miss: miss)

    case .jcc:
      let taken = emitter.newLabel()
      emitter.jump(UInt8(truncatingIfNeeded: instruction.opcode), to: taken)
      let target = instructionOffsets[index + 1] + Int(Int64(bitPattern: immediate))
      let epilogue = self.epilogue
      let offsets = instructionOffsets
      let selfLoop = target == 0 ? selfLoopEntry : nil
      let selfLoopKeepingFlags = target == 0 ? selfLoopFlagsEntry : nil
      let wraps = codeSize == 4
      let block = blockIndex
      let blockCount = decodedCount
      outOfLine.append { emitter in
        emitter.bind(taken)
        if let selfLoopKeepingFlags {
          emitter.loopToBlockEntryKeepingFlags(
            selfLoopKeepingFlags, block: block, completed: index + 1, blockCount: blockCount, epilogue: epilogue)
          return
        }
        emitter.storeGuestFlags()
        if let selfLoop {
          emitter.loopToBlockEntry(
            selfLoop, block: block, completed: index + 1, blockCount: blockCount, epilogue: epilogue)
        } else {
          emitter.branch(
            targetOffset: target, index: index, faultOffset: offsets[index], wraps: wraps, epilogue: epilogue)
        }
      }
    case .mulR64:
      emitter.mov(size: 8, rax, guest(0))
      emitter.mul(size: 8, src)
      emitter.mov(size: 8, guest(0), rax)
      emitter.mov(size: 8, guest(2), HostRegister.rdx)
      if fixesMultiplyFlags(after: index) {
        emitter.interpreterMultiplyFlags(size: 8)
      }
    case .push64, .push32:
      let source = src
      let width = codeSize
      emitStore(slot, index: index, size: width, stackOffset: -width, after: adjustStack(-width)) {
        emitter, register in
        emitter.mov(size: width, register, source)
      }
    case .pop64, .pop32:
      // A 32-bit POP zero-extends into the register (RAX holds the zero-extended load).
      emitLoad(slot, index: index, size: codeSize, stackOffset: 0)
      adjustStack(codeSize)(&emitter)
      emitter.mov(size: 8, dst, rax)
    case .callRel64, .callRel32:
      // The target (checked for canonical form in 64-bit code, wrapping at 4 GiB in 32-bit
      // code) goes to the context first, where a store that invalidated decoded code leaves
      // it; then the return address is pushed.
      storeFlagsIfValid(at: index)
      let width = codeSize
      let returnOffset = instructionOffsets[index + 1]
      let target = returnOffset + Int(Int64(bitPattern: immediate))
      if width == 8 {
        emitCanonicalCheck(targetOffset: target, index: index)
      } else {
        emitter.mov(size: 8, rax, .at(HostRegister.r12, ContextOffset.entryRIP))
        emitter.lea(size: 4, rax, .at(rax, target))
      }
      emitter.mov(size: 8, .at(HostRegister.r12, ContextOffset.rip), rax)
      emitStore(
        slot, index: index, size: width, stackOffset: -width, flagsLive: false, after: adjustStack(-width),
        endedRIPInContext: true
      ) { emitter, register in
        emitter.mov(size: 8, register, .at(HostRegister.r12, ContextOffset.entryRIP))
        emitter.lea(register, .at(register, returnOffset))
      }
      if emitter.staysOnEntryPage(target) {
        emitter.directExit(
          targetOffset: target, instructions: index + 1, result: UInt64(index + 1) | translationEndedBit,
          epilogue: epilogue)
        return true
      }
      emitter.mov(size: 8, rax, .at(HostRegister.r12, ContextOffset.rip))
      emitter.chainOrLeave(
        instructions: index + 1, result: UInt64(index + 1) | translationEndedBit, epilogue: epilogue)
      return true
    case .ret64, .ret32:
      emitLoad(slot, index: index, size: codeSize, stackOffset: 0)
      storeFlagsIfValid(at: index)
      // A non-canonical return address: #GP at the RET, which the interpreter raises (a 32-bit
      // one is the target as loaded).
      if codeSize == 8 { emitLeaveUnlessRAXIsCanonical(index: index) }
      emitter.mov(size: 8, .at(HostRegister.r12, ContextOffset.rip), rax)
      adjustStack(codeSize)(&emitter)
      emitter.chainOrLeave(
        instructions: index + 1, result: UInt64(index + 1) | translationEndedBit, epilogue: epilogue)
      return true
    case .jmpRel:
      let target = instructionOffsets[index + 1] + Int(Int64(bitPattern: immediate))
      if target == 0, let selfLoopFlagsEntry {
        emitter.loopToBlockEntryKeepingFlags(
          selfLoopFlagsEntry, block: blockIndex, completed: index + 1, blockCount: decodedCount, epilogue: epilogue)
        return true
      }
      storeFlagsIfValid(at: index)
      if target == 0, let selfLoopEntry {
        emitter.loopToBlockEntry(
          selfLoopEntry, block: blockIndex, completed: index + 1, blockCount: decodedCount, epilogue: epilogue)
      } else {
        emitter.branch(
          targetOffset: target, index: index, faultOffset: instructionOffsets[index], wraps: codeSize == 4,
          epilogue: epilogue)
      }
      return true
    default:
      preconditionFailure("untranslated fast form \(instruction.fast)")
    }
    return false
  }

  // MARK: SSE

  /// The guest's XMM register `number` (RDI = the context's `xmm`).
  private func guestVector(_ number: UInt8) -> HostOperand {
    .at(HostRegister.rdi, Int(number) * 16)
  }

  /// Emits an SSE instruction as the same host instruction on host XMM0 (ModRM.reg) and XMM1
  /// or the host address of the memory operand (ModRM.rm). No status flags change.
  private mutating func emitSSE(_ slot: UnsafePointer<Instruction>, index: Int, form: SSEForm) {
    let instruction = slot.pointee
    let prefix = SSEForm.hostPrefix(instruction.mandatoryPrefix)
    let opcode = UInt8(truncatingIfNeeded: instruction.opcode)
    let rdi = HostRegister.rdi
    let written = !(form.destinationIsRM && (form.generalRegister || instruction.hasMemoryOperand))
    if instruction.hasMemoryOperand && form.destinationIsRM {
      emitVectorStore(slot, index: index, form: form, prefix: prefix, opcode: opcode)
    } else if instruction.hasMemoryOperand {
      // RDX = the operand's host address (or the context's `vector`).
      emitVectorLoad(slot, index: index, size: form.memorySize, aligned: form.aligned)
      emitter.mov(size: 8, rdi, .at(HostRegister.r12, ContextOffset.xmm))
      if form.readsDestination { emitter.loadVector(0, guestVector(instruction.reg)) }
      emitter.sse(prefix: prefix, opcode: opcode, wide: form.wide, reg: 0, rm: .at(HostRegister.rdx, 0))
      emitter.storeVector(guestVector(instruction.reg), 0)
    } else if form.generalRegister {
      // MOVD/MOVQ between an XMM register and the guest register array.
      emitter.mov(size: 8, rdi, .at(HostRegister.r12, ContextOffset.xmm))
      let general = guest(instruction.rm)
      if form.destinationIsRM {
        emitter.loadVector(0, guestVector(instruction.reg))
        emitter.sse(prefix: prefix, opcode: opcode, wide: form.wide, reg: 0, rm: general, writesRM: true)
        if !form.wide {
          // A 32-bit destination register is zero-extended.
          emitter.mov(size: 4, .at(HostRegister.rbx, Int(instruction.rm) * 8 + 4), immediate: 0)
        }
      } else {
        emitter.sse(prefix: prefix, opcode: opcode, wide: form.wide, reg: 0, rm: general)
        emitter.storeVector(guestVector(instruction.reg), 0)
      }
    } else {
      emitter.mov(size: 8, rdi, .at(HostRegister.r12, ContextOffset.xmm))
      if form.destinationIsRM {
        emitter.loadVector(1, guestVector(instruction.rm))
        emitter.loadVector(0, guestVector(instruction.reg))
        emitter.sse(prefix: prefix, opcode: opcode, wide: form.wide, reg: 0, rm: .register(1))
        emitter.storeVector(guestVector(instruction.rm), 1)
      } else {
        if form.readsDestination { emitter.loadVector(0, guestVector(instruction.reg)) }
        emitter.loadVector(1, guestVector(instruction.rm))
        emitter.sse(prefix: prefix, opcode: opcode, wide: form.wide, reg: 0, rm: .register(1))
        emitter.storeVector(guestVector(instruction.reg), 0)
      }
    }
    if written {
      emitter.mov(size: 1, .at(HostRegister.r12, ContextOffset.sseWritten), immediate: 1)
    }
  }

  /// RDX = the host address of the `size`-byte memory operand of SSE instruction `index`, with
  /// the host flags intact: inline probe; on a miss (or a misaligned `aligned` access) a
  /// helper reads the operand into the context's `vector` (RDX then points there) or leaves
  /// before the instruction on a fault.
  private mutating func emitVectorLoad(_ slot: UnsafePointer<Instruction>, index: Int, size: Int, aligned: Bool) {
    emitLinearAddress(slot, index: index)
    let valid = flagsValidAt[index]
    let miss = emitter.newLabel()
    let resume = emitter.newLabel()
    if inlineTLBProbes {
      emitProbe(size: size, write: false, flagsValid: valid, miss: miss, aligned: aligned && size == 16)
    } else {
      if valid { saveFlagsInEBP() }
      emitter.jump(to: miss)
    }
    emitter.bind(resume)
    let epilogue = self.epilogue
    let offset = instructionOffsets[index]
    let sizeArgument = Int32(size) | (aligned && size == 16 ? 0x100 : 0)
    let recovery = flagRecovery
    outOfLine.append { emitter in
      emitter.bind(miss)
      if valid {
        recovery.emit(&emitter)
        emitter.storeGuestFlags()
      }
      emitter.mov(size: 8, HostRegister.rdi, .register(HostRegister.r12))
      emitter.mov(size: 4, .register(HostRegister.rdx), immediate: sizeArgument)
      emitter.call(.at(HostRegister.r12, ContextOffset.vectorLoadHelper))
      emitter.alu(.cmp, size: 8, .at(HostRegister.r12, ContextOffset.exit), immediate: 0)
      let fine = emitter.newLabel()
      emitter.jump(HostCondition.equal, to: fine)
      emitter.leave(ripOffset: offset, result: UInt64(index), epilogue: epilogue)
      emitter.bind(fine)
      if valid { emitter.loadGuestFlags() }
      emitter.lea(HostRegister.rdx, .at(HostRegister.r12, ContextOffset.vector))
      emitter.jump(to: resume)
    }
  }

  /// An SSE store form with a memory destination: the host instruction stores to the host
  /// address the write probe found; on a miss (or a misaligned `aligned` access) the XMM
  /// register goes to the context's `vector` and a helper stores its low bytes as the
  /// interpreter would (a fault leaves before the instruction, a store into decoded code ends
  /// the block after it).
  private mutating func emitVectorStore(
    _ slot: UnsafePointer<Instruction>, index: Int, form: SSEForm, prefix: UInt8, opcode: UInt8
  ) {
    let instruction = slot.pointee
    emitLinearAddress(slot, index: index)
    let valid = flagsValidAt[index]
    let miss = emitter.newLabel()
    let resume = emitter.newLabel()
    let source = guestVector(instruction.reg)
    if inlineTLBProbes {
      emitProbe(
        size: form.memorySize, write: true, flagsValid: valid, miss: miss,
        aligned: form.aligned && form.memorySize == 16)
      emitter.mov(size: 8, HostRegister.rdi, .at(HostRegister.r12, ContextOffset.xmm))
      emitter.loadVector(0, source)
      emitter.sse(prefix: prefix, opcode: opcode, wide: form.wide, reg: 0, rm: .at(HostRegister.rdx, 0))
    } else {
      if valid { saveFlagsInEBP() }
      emitter.jump(to: miss)
    }
    emitter.bind(resume)
    let epilogue = self.epilogue
    let offset = instructionOffsets[index]
    let nextOffset = instructionOffsets[index + 1]
    let sizeArgument = Int32(form.memorySize) | (form.aligned && form.memorySize == 16 ? 0x100 : 0)
    let recovery = flagRecovery
    outOfLine.append { emitter in
      emitter.bind(miss)
      if valid {
        recovery.emit(&emitter)
        emitter.storeGuestFlags()
      }
      emitter.mov(size: 8, HostRegister.rdi, .at(HostRegister.r12, ContextOffset.xmm))
      emitter.loadVector(0, source)
      emitter.storeVector(.at(HostRegister.r12, ContextOffset.vector), 0)
      emitter.mov(size: 8, HostRegister.rdi, .register(HostRegister.r12))
      emitter.mov(size: 4, .register(HostRegister.rdx), immediate: sizeArgument)
      emitter.call(.at(HostRegister.r12, ContextOffset.vectorStoreHelper))
      emitter.mov(size: 8, HostRegister.rax, .at(HostRegister.r12, ContextOffset.exit))
      emitter.alu(.cmp, size: 8, .register(HostRegister.rax), immediate: 0)
      let fine = emitter.newLabel()
      let ended = emitter.newLabel()
      emitter.jump(HostCondition.equal, to: fine)
      emitter.alu(.cmp, size: 8, .register(HostRegister.rax), immediate: 2)
      emitter.jump(HostCondition.equal, to: ended)
      emitter.leave(ripOffset: offset, result: UInt64(index), epilogue: epilogue)
      emitter.bind(ended)
      emitter.leave(ripOffset: nextOffset, result: UInt64(index + 1) | translationEndedBit, epilogue: epilogue)
      emitter.bind(fine)
      if valid { emitter.loadGuestFlags() }
      emitter.jump(to: resume)
    }
  }

  // MARK: Indirect branches

  /// JMP r/m64 or CALL r/m64: the target is read (register or memory), checked for canonical
  /// form (#GP(0) at the branch otherwise: the block leaves before it), CALL pushes the return
  /// address, and the block chains to the target through the jump cache. In 32-bit code the
  /// target and the return address are 32 bits (no canonical check).
  private mutating func emitIndirectBranch(_ slot: UnsafePointer<Instruction>, index: Int) {
    let instruction = slot.pointee
    let rax = HostRegister.rax
    let width = codeSize
    if instruction.hasMemoryOperand {
      emitLoad(slot, index: index, size: width)
    } else {
      emitter.mov(size: width, rax, guest(instruction.rm))
    }
    storeFlagsIfValid(at: index)
    if width == 8 {
      emitLeaveUnlessRAXIsCanonical(index: index)
    }
    emitter.mov(size: 8, .at(HostRegister.r12, ContextOffset.rip), rax)
    if instruction.op == .callRm {
      let returnOffset = instructionOffsets[index + 1]
      emitStore(
        slot, index: index, size: width, stackOffset: -width, flagsLive: false, after: adjustStack(-width),
        endedRIPInContext: true
      ) { emitter, register in
        emitter.mov(size: 8, register, .at(HostRegister.r12, ContextOffset.entryRIP))
        emitter.lea(register, .at(register, returnOffset))
      }
      emitter.mov(size: 8, rax, .at(HostRegister.r12, ContextOffset.rip))
    }
    emitter.chainOrLeave(
      instructions: index + 1, result: UInt64(index + 1) | translationEndedBit, epilogue: epilogue)
  }

  /// Guest RSP += `delta` at the stack's width without touching the host flags: a 32-bit
  /// stack pointer wraps at 4 GiB and the upper half of RSP is kept (only its low 4 bytes are
  /// stored), as the interpreter's `adjustStack` does. Clobbers RCX.
  func adjustStack(_ delta: Int) -> (inout X86Emitter) -> Void {
    let width = codeSize
    return { emitter in
      emitter.mov(size: width, HostRegister.rcx, .at(HostRegister.rbx, 4 * 8))
      emitter.lea(size: width, HostRegister.rcx, .at(HostRegister.rcx, delta))
      emitter.mov(size: width, .at(HostRegister.rbx, 4 * 8), HostRegister.rcx)
    }
  }

  /// Leaves before instruction `index` (whose flags are stored) when entry + `targetOffset`
  /// is not canonical (the interpreter then raises the #GP). Clobbers RAX, RCX and the flags.
  private mutating func emitCanonicalCheck(targetOffset: Int, index: Int) {
    emitter.mov(size: 8, HostRegister.rax, .at(HostRegister.r12, ContextOffset.entryRIP))
    emitter.lea(HostRegister.rax, .at(HostRegister.rax, targetOffset))
    emitLeaveUnlessRAXIsCanonical(index: index)
  }

  /// Leaves before instruction `index` (whose flags are stored) unless RAX, a branch target,
  /// is canonical (the interpreter then raises the #GP). Clobbers RCX and the flags.
  private mutating func emitLeaveUnlessRAXIsCanonical(index: Int) {
    emitter.mov(size: 8, HostRegister.rcx, .register(HostRegister.rax))
    emitter.shift(.shl, size: 8, .register(HostRegister.rcx), count: 16)
    emitter.shift(.sar, size: 8, .register(HostRegister.rcx), count: 16)
    emitter.alu(.cmp, size: 8, .register(HostRegister.rcx), HostRegister.rax)
    let canonical = emitter.newLabel()
    emitter.jump(HostCondition.equal, to: canonical)
    emitLeave(rip: instructionOffsets[index], result: UInt64(index))
    emitter.bind(canonical)
  }

  static func aluKind(_ form: FastOp) -> HostALU {
    switch form {
    case .addRR64, .addRR32, .addRI64, .addRI32, .addRM64, .addRM32, .addMR64: return .add
    case .subRR64, .subRR32, .subRI64, .subRI32, .subRM64, .subRM32, .subMR64: return .sub
    case .andRR64, .andRR32, .andRI64, .andRI32, .andRM64, .andRM32: return .and
    case .orRR64, .orRR32, .orRI64, .orRI32, .orRM64, .orRM32: return .or
    case .xorRR64, .xorRR32, .xorRI64, .xorRI32, .xorRM64, .xorRM32: return .xor
    case .adcRR64, .adcRR32, .adcRI64, .adcRI32, .adcRM64, .adcMR64: return .adc
    case .sbbRR64, .sbbRR32, .sbbRI64, .sbbRI32, .sbbRM64, .sbbMR64: return .sbb
    default: return .cmp
    }
  }

  static func shiftKind(_ form: FastOp) -> HostShift {
    switch form {
    case .shlRI64, .shlRI32, .shlRC64, .shlRC32: return .shl
    case .shrRI64, .shrRI32, .shrRC64, .shrRC32: return .shr
    default: return .sar
    }
  }
}

extension X86Emitter {
  /// Host RFLAGS status bits = the context's (`TranslatedFlags`: LAHF's byte in bits 8-15,
  /// OF in bit 0); the host's other bits stay as they are (no TF, AC or DF in the host).
  /// Without POPF, which costs several times as much: ADD AL, 7FH sets OF exactly when bit 0
  /// is set, SAHF the rest. Clobbers RAX.
  mutating func loadGuestFlags() {
    mov(size: 4, HostRegister.rax, .at(HostRegister.r12, ContextOffset.flags))
    alu(.add, size: 1, .register(HostRegister.rax), immediate: 0x7F)
    storeAHIntoFlags()
  }

  /// Context status bits = the host's, packed as `TranslatedFlags` (LAHF, SETO and one store:
  /// no PUSHF). Clobbers RDX; RAX is kept.
  mutating func storeGuestFlags() {
    mov(size: 8, HostRegister.rdx, .register(HostRegister.rax))
    loadFlagsIntoAH()
    set(HostCondition.overflow, .register(HostRegister.rax))
    mov(size: 4, .at(HostRegister.r12, ContextOffset.flags), HostRegister.rax)
    mov(size: 8, HostRegister.rax, .register(HostRegister.rdx))
  }

  /// Saves the host status flags in EBP (LAHF; SETO AL). Clobbers RAX.
  mutating func saveFlags() {
    loadFlagsIntoAH()
    set(HostCondition.overflow, .register(HostRegister.rax))
    mov(size: 4, HostRegister.rbp, .register(HostRegister.rax))
  }

  /// Restores the host status flags from EBP (ADD AL, 7FH sets OF from SETO's 1; SAHF the
  /// rest); `carryFromCL`: CF from CL (0 or 1) instead. Clobbers RAX.
  mutating func restoreFlags(carryFromCL: Bool = false) {
    mov(size: 4, HostRegister.rax, .register(HostRegister.rbp))
    if carryFromCL {
      raw(0x80, 0xE4, 0xFE)  // and ah, ~CF
      raw(0x08, 0xCC)  // or ah, cl
    }
    alu(.add, size: 1, .register(HostRegister.rax), immediate: 0x7F)
    storeAHIntoFlags()
  }

  /// Sets the context RIP to entry + `ripOffset` and returns `result` (flags already stored).
  mutating func leave(ripOffset: Int, result: UInt64, epilogue: HostLabel) {
    mov(size: 8, HostRegister.rax, .at(HostRegister.r12, ContextOffset.entryRIP))
    lea(HostRegister.rax, .at(HostRegister.rax, ripOffset))
    mov(size: 8, .at(HostRegister.r12, ContextOffset.rip), HostRegister.rax)
    movImmediate64(HostRegister.rax, result)
    jump(to: epilogue)
  }

  /// RIP = entry + `targetOffset` (the branch of instruction `index`) and the block ends; a
  /// non-canonical target raises #GP(0) at the branch, so the block then returns before it
  /// (RIP = entry + `faultOffset`) and the interpreter re-executes it. `wraps`: 32-bit code,
  /// whose target wraps at 4 GiB instead. Flags already stored.
  mutating func branch(targetOffset: Int, index: Int, faultOffset: Int, wraps: Bool, epilogue: HostLabel) {
    if staysOnEntryPage(targetOffset) {
      // Canonical (and below 4 GiB in 32-bit code) as the block's entry is.
      directExit(
        targetOffset: targetOffset, instructions: index + 1, result: UInt64(index + 1) | translationEndedBit,
        epilogue: epilogue)
      return
    }
    mov(size: 8, HostRegister.rax, .at(HostRegister.r12, ContextOffset.entryRIP))
    if wraps {
      lea(size: 4, HostRegister.rax, .at(HostRegister.rax, targetOffset))
      mov(size: 8, .at(HostRegister.r12, ContextOffset.rip), HostRegister.rax)
      chainOrLeave(
        instructions: index + 1, result: UInt64(index + 1) | translationEndedBit, epilogue: epilogue)
      return
    }
    lea(HostRegister.rax, .at(HostRegister.rax, targetOffset))
    mov(size: 8, HostRegister.rcx, .register(HostRegister.rax))
    shift(.shl, size: 8, .register(HostRegister.rcx), count: 16)
    shift(.sar, size: 8, .register(HostRegister.rcx), count: 16)
    alu(.cmp, size: 8, .register(HostRegister.rcx), HostRegister.rax)
    let canonical = newLabel()
    jump(HostCondition.equal, to: canonical)
    leave(ripOffset: faultOffset, result: UInt64(index), epilogue: epilogue)
    bind(canonical)
    mov(size: 8, .at(HostRegister.r12, ContextOffset.rip), HostRegister.rax)
    chainOrLeave(instructions: index + 1, result: UInt64(index + 1) | translationEndedBit, epilogue: epilogue)
  }

  /// A branch back to the first instruction of the block being run (flags already stored):
  /// jumps to the block's own chained entry, skipping the jump cache, when no stop is requested
  /// and the budget holds the completed instructions and another run of the block, with the
  /// same accounting as `chainOrLeave`; otherwise leaves with RIP at the block's entry.
  mutating func loopToBlockEntry(_ entry: HostLabel, block: Int32, completed: Int, blockCount: Int, epilogue: HostLabel)
  {
    let leave = newLabel()
    accountForLoop(block: block, completed: completed, blockCount: blockCount, orLeaveTo: leave)
    jump(to: entry)
    bind(leave)
    leaveAtBlockEntry(completed: completed, epilogue: epilogue)
  }

  /// The checks and the accounting of a block's branch back to itself: to `leave` when a stop
  /// is requested or the budget does not hold another run of the block; otherwise the
  /// `completed` instructions are taken from the budget (the run loop counts what the budget
  /// lost as the chain's). Clobbers RDX and the flags.
  private mutating func accountForLoop(block: Int32, completed: Int, blockCount: Int, orLeaveTo leave: HostLabel) {
    mov(size: 8, HostRegister.rdx, .at(HostRegister.r12, ContextOffset.stop))
    alu(.cmp, size: 1, .at(HostRegister.rdx, 0), immediate: 0)
    jump(HostCondition.notEqual, to: leave)
    mov(size: 8, .register(HostRegister.rdx), immediate: Int32(completed + blockCount))
    alu(.cmp, size: 8, HostRegister.rdx, .at(HostRegister.r12, ContextOffset.budget))
    jump(HostCondition.greater, to: leave)
    alu(.sub, size: 8, .at(HostRegister.r12, ContextOffset.budget), immediate: Int32(completed))
    mov(size: 8, .at(HostRegister.r12, ContextOffset.lastBlock), immediate: block)
  }

  /// Returns from the block with RIP at its entry, `completed` instructions done (flags stored).
  private mutating func leaveAtBlockEntry(completed: Int, epilogue: HostLabel) {
    mov(size: 8, HostRegister.rax, .at(HostRegister.r12, ContextOffset.entryRIP))
    mov(size: 8, .at(HostRegister.r12, ContextOffset.rip), HostRegister.rax)
    movImmediate64(HostRegister.rax, UInt64(completed) | translationEndedBit)
    jump(to: epilogue)
  }

  /// `loopToBlockEntry` for a block that loads the guest flags at its entry, with the flags in
  /// the host RFLAGS (not stored): they wait in EBP (LAHF, SETO) while the stop request and
  /// the budget are checked, go back into RFLAGS, and the loop goes on at `flagsEntry`, after
  /// the entry's load. Leaving, they are stored in the context. Clobbers RAX, RDX and EBP.
  mutating func loopToBlockEntryKeepingFlags(
    _ flagsEntry: HostLabel, block: Int32, completed: Int, blockCount: Int, epilogue: HostLabel
  ) {
    let leave = newLabel()
    saveFlags()
    accountForLoop(block: block, completed: completed, blockCount: blockCount, orLeaveTo: leave)
    restoreFlags()
    jump(to: flagsEntry)
    bind(leave)
    restoreFlags()
    storeGuestFlags()
    leaveAtBlockEntry(completed: completed, epilogue: epilogue)
  }

  /// Whether `targetOffset` from the block's entry lies on the entry's page, and direct
  /// exits are wanted (`entryPageOffset`).
  func staysOnEntryPage(_ targetOffset: Int) -> Bool {
    guard let entryPageOffset else { return false }
    let offset = entryPageOffset + targetOffset
    return offset >= 0 && offset < 4096
  }

  /// The exit to `targetOffset` from the block's entry (on the entry's page, see
  /// `DirectLinkSite`) after `instructions` completed, flags stored: through the jump cache
  /// (`chainOrLeave`) until the translator links it, then straight into the target's
  /// translation while no stop is requested and the budget holds the target's instructions;
  /// otherwise returns `result` with RIP at the target. Clobbers RAX, RCX and RDX.
  mutating func directExit(targetOffset: Int, instructions: Int, result: UInt64, epilogue: HostLabel) {
    // The gate: falls through to the jump-cache path until linked.
    byte(0xE9)
    let gate = count
    int32(0)
    chainOrLeave(toOffset: targetOffset, instructions: instructions, result: result, epilogue: epilogue)
    let directPath = count
    let leave = newLabel()
    mov(size: 8, HostRegister.rdx, .at(HostRegister.r12, ContextOffset.stop))
    alu(.cmp, size: 1, .at(HostRegister.rdx, 0), immediate: 0)
    jump(HostCondition.notEqual, to: leave)
    aluWithPatchableImmediate(.cmp, size: 8, .at(HostRegister.r12, ContextOffset.budget), immediate: Int32.max)
    let budgetImmediate = count - 4
    jump(HostCondition.less, to: leave)
    alu(.sub, size: 8, .at(HostRegister.r12, ContextOffset.budget), immediate: Int32(instructions))
    mov(size: 8, .at(HostRegister.r12, ContextOffset.lastBlock), immediate: -1)
    let blockImmediate = count - 4
    alu(.add, size: 8, .at(HostRegister.r12, ContextOffset.entryRIP), immediate: Int32(targetOffset))
    byte(0xE9)
    let targetJump = count
    int32(0)
    bind(leave)
    self.leave(ripOffset: targetOffset, result: result, epilogue: epilogue)
    linkSites.append(
      DirectLinkSite(
        gate: gate, directPath: directPath, budgetImmediate: budgetImmediate, blockImmediate: blockImmediate,
        targetJump: targetJump, instructions: instructions, targetOffset: targetOffset))
  }

  /// Sets the context's RIP to the block's entry + `offset`, then `chainOrLeave`.
  mutating func chainOrLeave(toOffset offset: Int, instructions: Int, result: UInt64, epilogue: HostLabel) {
    mov(size: 8, HostRegister.rax, .at(HostRegister.r12, ContextOffset.entryRIP))
    lea(HostRegister.rax, .at(HostRegister.rax, offset))
    mov(size: 8, .at(HostRegister.r12, ContextOffset.rip), HostRegister.rax)
    chainOrLeave(instructions: instructions, result: result, epilogue: epilogue)
  }

  /// The block completed `instructions` guest instructions and RAX (= the context's RIP) is
  /// the next block's RIP, flags stored. Jumps straight into the next block's translation when
  /// the jump cache holds it under the current generation, its instructions fit the budget and
  /// no stop was requested; otherwise returns `result`. Clobbers RCX and RDX.
  mutating func chainOrLeave(instructions: Int, result: UInt64, epilogue: HostLabel) {
    let leave = newLabel()
    mov(size: 8, HostRegister.rdx, .at(HostRegister.r12, ContextOffset.stop))
    alu(.cmp, size: 1, .at(HostRegister.rdx, 0), immediate: 0)
    jump(HostCondition.notEqual, to: leave)
    mov(size: 8, HostRegister.rcx, .register(HostRegister.rax))
    shift(.shr, size: 8, .register(HostRegister.rcx), count: 12)
    alu(.xor, size: 8, HostRegister.rcx, .register(HostRegister.rax))
    alu(.and, size: 4, .register(HostRegister.rcx), immediate: Int32(JumpCache.entries - 1))
    shift(.shl, size: 4, .register(HostRegister.rcx), count: 5)
    alu(.add, size: 8, HostRegister.rcx, .at(HostRegister.r12, ContextOffset.jumpCache))
    alu(.cmp, size: 8, HostRegister.rax, .at(HostRegister.rcx, 0))
    jump(HostCondition.notEqual, to: leave)
    mov(size: 8, HostRegister.rdx, .at(HostRegister.r12, ContextOffset.generation))
    alu(.cmp, size: 8, HostRegister.rdx, .at(HostRegister.rcx, 8))
    jump(HostCondition.notEqual, to: leave)
    mov(size: 4, HostRegister.rdx, .at(HostRegister.rcx, 24))
    alu(.add, size: 8, .register(HostRegister.rdx), immediate: Int32(instructions))
    alu(.cmp, size: 8, HostRegister.rdx, .at(HostRegister.r12, ContextOffset.budget))
    jump(HostCondition.greater, to: leave)
    alu(.sub, size: 8, .at(HostRegister.r12, ContextOffset.budget), immediate: Int32(instructions))
    mov(size: 4, HostRegister.rdx, .at(HostRegister.rcx, 28))
    mov(size: 8, .at(HostRegister.r12, ContextOffset.lastBlock), HostRegister.rdx)
    mov(size: 8, .at(HostRegister.r12, ContextOffset.entryRIP), HostRegister.rax)
    jumpIndirect(.at(HostRegister.rcx, 16))
    bind(leave)
    movImmediate64(HostRegister.rax, result)
    jump(to: epilogue)
  }
}
