import Glibc

// Flags recomputed instead of saved around a TLB probe (docs/softcpu-performance.md,
// "Seventeenth step").
//
// A probe's compare clobbers the host RFLAGS, and a probe's miss path must hand the guest's
// flags to the helper exactly. The translator used to save them in EBP before every probe
// they were valid at (LAHF, SETO, a move: LAHF alone is several micro-ops) even where nothing
// but the miss path would ever read them. Most of the time they come from an ALU instruction
// on registers a few instructions earlier (`add ecx, ebx` then a store of ECX): as long as its
// operands are still in their registers, running the same host instruction again on the same
// operand values gives exactly the same six flags. The miss path (and a hit path whose flags
// are read later) does that instead, and the hit path saves nothing.

/// How to compute again the status flags an instruction left, on a slow path, without having
/// saved them.
///
/// An ALU instruction on registers (ADD, SUB, CMP, AND, OR, XOR, TEST of 32- or 64-bit register
/// or immediate operands) runs again on its operands while they are still in their registers:
/// the destination's value before the operation is recovered with the inverse operation where
/// there is one (ADD: result - source; SUB: result + source; XOR: result ^ source), and the
/// operation runs again on it in RAX. AND and OR run on their result, which gives the same
/// result and so the same flags (SF, ZF, PF from the result; CF, OF clear; AF as the host's
/// logic instructions leave it). CMP and TEST wrote no register: they run again as they were.
///
/// A shift of a 32- or 64-bit register by a nonzero immediate stores its operand's value
/// before the shift in the context (`flag_operand`) instead of setting the interpreter's
/// undefined flags after it, when nothing but the miss paths of the accesses after it reads
/// its flags before they are overwritten (`BlockTranslator.flagsReachOnlyRecipes`): the shift
/// runs again on that value, with the fix-up, only on a miss.
struct FlagRecipe {
  enum Source {
    case register(UInt8)
    case immediate(Int32)
  }

  enum Replay {
    /// The ALU operation (nil for TEST) and its inverse, on `destination` and `source`.
    case alu(operation: HostALU?, inverse: HostALU?, destination: UInt8, source: Source)
    /// The shift by `count` of the operand kept in the context.
    case shift(HostShift, count: UInt8)
  }

  /// The index of the instruction that wrote the flags: two recipes are the same when they
  /// name the same writer.
  var writer: Int
  var replay: Replay
  var size: Int
  /// What PUSH and POP since the writer added to the destination, the stack pointer (the
  /// epilogue's `add esp, 12` before its POPs).
  var adjustment: Int32 = 0

  /// The guest registers (bits 0-15) whose values the recipe reads.
  var registers: UInt32 {
    guard case .alu(_, _, let destination, _) = replay else { return 0 }
    return 1 << destination | sourceRegisters
  }

  /// The source's register (bits 0-15), if it is one.
  var sourceRegisters: UInt32 {
    if case .alu(_, _, _, .register(let register)) = replay { return 1 << register }
    return 0
  }

  /// The stack pointer is the destination of an ALU recipe.
  private var computesFromTheStackPointer: Bool {
    guard case .alu(_, _, let destination, _) = replay else { return false }
    return destination == 4
  }

  /// The recipe of the flags `slot` leaves, when it is a shift of a 32- or 64-bit register by
  /// an immediate whose masked count is not 0 (and stores its operand for it); `index` is its
  /// place in the block.
  static func shift(_ slot: UnsafePointer<Instruction>, index: Int) -> FlagRecipe? {
    let instruction = slot.pointee
    let kind: HostShift
    switch instruction.fast {
    case .shlRI64, .shlRI32: kind = .shl
    case .shrRI64, .shrRI32: kind = .shr
    case .sarRI64, .sarRI32: kind = .sar
    default: return nil
    }
    let wide = instruction.fast == .shlRI64 || instruction.fast == .shrRI64 || instruction.fast == .sarRI64
    let count = UInt8(truncatingIfNeeded: instruction.immediate) & (wide ? 63 : 31)
    guard count != 0 else { return nil }
    return FlagRecipe(writer: index, replay: .shift(kind, count: count), size: wide ? 8 : 4)
  }

  /// The recipe of the flags `slot` leaves, when it is one of the ALU forms above and they can
  /// be had again from its registers; `index` is its place in the block.
  static func of(_ slot: UnsafePointer<Instruction>, index: Int) -> FlagRecipe? {
    let instruction = slot.pointee
    let size: Int
    let source: Source
    switch instruction.fast {
    case .addRR64, .subRR64, .andRR64, .orRR64, .xorRR64, .cmpRR64, .testRR64:
      size = 8
      source = .register(instruction.fastSrc)
    case .addRR32, .subRR32, .andRR32, .orRR32, .xorRR32, .cmpRR32, .testRR32:
      size = 4
      source = .register(instruction.fastSrc)
    case .addRI64, .subRI64, .andRI64, .orRI64, .xorRI64, .cmpRI64, .testRI64:
      size = 8
      source = .immediate(Int32(truncatingIfNeeded: instruction.immediate))
    case .addRI32, .subRI32, .andRI32, .orRI32, .xorRI32, .cmpRI32, .testRI32:
      size = 4
      source = .immediate(Int32(truncatingIfNeeded: instruction.immediate))
    default:
      return nil
    }
    guard instruction.fastDst < 16 else { return nil }
    if case .register(let register) = source, register >= 16 { return nil }
    var operation: HostALU? = BlockTranslator.aluKind(instruction.fast)
    var inverse: HostALU?
    switch instruction.fast {
    case .addRR64, .addRR32, .addRI64, .addRI32:
      // ADD of a register to itself doubles it: its earlier value is not the result's half
      // when the top bit was carried out.
      if case .register(let register) = source, register == instruction.fastDst { return nil }
      inverse = .sub
    case .subRR64, .subRR32, .subRI64, .subRI32:
      inverse = .add
    case .xorRR64, .xorRR32, .xorRI64, .xorRI32:
      inverse = .xor
    case .testRR64, .testRR32, .testRI64, .testRI32:
      operation = nil
    default:
      break
    }
    return FlagRecipe(
      writer: index,
      replay: .alu(operation: operation, inverse: inverse, destination: instruction.fastDst, source: source),
      size: size)
  }

  /// The guest registers (bits 0-15) `slot` writes, when it neither reads nor writes a status
  /// flag, or only reads them (Jcc, CMOVcc, SETcc), and nothing else; nil for every other
  /// instruction (a recipe does not survive it). AH..BH count as their whole register.
  static func registersWritten(byFlagNeutral slot: UnsafePointer<Instruction>) -> UInt32? {
    let instruction = slot.pointee
    func bit(_ register: UInt8) -> UInt32 {
      if register < 16 { return 1 << register }
      if register >= Instruction.highByteBase && register < Instruction.highByteBase + 4 {
        return 1 << (register - Instruction.highByteBase)
      }
      return 0
    }
    let stackPointer: UInt32 = 1 << 4
    switch instruction.fast {
    case .movRR64, .movRR32, .movRI64, .movRI32, .notR64, .notR32, .movzxByteRR, .movzxWordRR, .movsxByteRR64,
      .movsxByteRR32, .movsxWordRR64, .movsxWordRR32, .movsxdRR, .lea64, .lea32, .loadRM64, .loadRM32, .loadRM8,
      .movzxByteRM, .movzxWordRM, .movsxdRM, .cmovRR64, .cmovRR32, .setccR:
      return bit(instruction.fastDst)
    case .pop64, .pop32:
      return bit(instruction.fastDst) | stackPointer
    case .push64, .push32:
      return stackPointer
    case .storeMR64, .storeMR32, .storeMR16, .storeMR8, .storeMI64, .storeMI32, .storeMI8, .nop, .jcc:
      return 0
    default:
      break
    }
    guard let form = BlockTranslator.integerForm(instruction) else { return nil }
    switch form.kind {
    case .move, .extend:
      // The register operand may be the source or the destination: count it written.
      return bit(instruction.reg) | (instruction.hasMemoryOperand ? 0 : bit(instruction.rm))
    default:
      return nil
    }
  }

  /// The recipe valid before each of the `count` instructions at `first` and after the last
  /// (`count + 1` entries): the last writer of the flags when it has a recipe and no
  /// instruction since has written one of its registers, but for PUSH and POP moving a stack
  /// pointer the recipe computes from (`adjustment`). `codeSize`: as the translator's.
  /// `shifts`: the shifts that keep their operand for a recipe.
  static func recipes(
    _ first: UnsafePointer<Instruction>, count: Int, codeSize: Int, shifts: Set<Int> = []
  ) -> [FlagRecipe?] {
    var recipes: [FlagRecipe?] = []
    recipes.reserveCapacity(count + 1)
    var current: FlagRecipe?
    for index in 0..<count {
      recipes.append(current)
      let slot = first + index
      if shifts.contains(index), let recipe = shift(slot, index: index) {
        current = recipe
      } else if let recipe = of(slot, index: index) {
        current = recipe
      } else if let written = registersWritten(byFlagNeutral: slot) {
        guard var recipe = current, recipe.registers & written != 0 else { continue }
        let stackPointer: UInt32 = 1 << 4
        // The stack pointer as the destination alone (not also the source).
        if let step = stackStep(slot, codeSize: codeSize), recipe.size == codeSize, recipe.computesFromTheStackPointer,
          recipe.sourceRegisters & stackPointer == 0, written & recipe.sourceRegisters == 0
        {
          recipe.adjustment &+= step
          current = recipe
        } else {
          current = nil
        }
      } else {
        current = nil
      }
    }
    recipes.append(current)
    return recipes
  }

  /// What a PUSH or POP of the stack's width adds to the stack pointer, when it writes no
  /// other register the stack pointer's value depends on (`pop esp`); nil for the others.
  private static func stackStep(_ slot: UnsafePointer<Instruction>, codeSize: Int) -> Int32? {
    switch slot.pointee.fast {
    case .push64, .push32: return -Int32(codeSize)
    case .pop64, .pop32: return slot.pointee.fastDst == 4 ? nil : Int32(codeSize)
    default: return nil
    }
  }

  /// Sets the host status flags as the writer left them. Clobbers RAX, and RDX for a shift.
  func emit(_ emitter: inout X86Emitter) {
    let rax = HostRegister.rax
    switch replay {
    case .alu(let operation, let inverse, let destination, let source):
      emitter.mov(size: size, rax, BlockTranslator.slot(destination))
      if adjustment != 0 { emitter.alu(.sub, size: size, .register(rax), immediate: adjustment) }
      switch source {
      case .register(let register):
        let operand = BlockTranslator.slot(register)
        if let inverse { emitter.alu(inverse, size: size, rax, operand) }
        if let operation {
          emitter.alu(operation, size: size, rax, operand)
        } else {
          emitter.test(size: size, operand, rax)
        }
      case .immediate(let value):
        if let inverse { emitter.alu(inverse, size: size, .register(rax), immediate: value) }
        if let operation {
          emitter.alu(operation, size: size, .register(rax), immediate: value)
        } else {
          emitter.test(size: size, .register(rax), immediate: value)
        }
      }
    case .shift(let kind, let count):
      // The interpreter's fix-up wants the operand before the shift in RDX.
      emitter.mov(size: 8, HostRegister.rdx, .at(HostRegister.r12, ContextOffset.flagOperand))
      emitter.mov(size: size, rax, .register(HostRegister.rdx))
      emitter.shift(kind, size: size, .register(rax), count: count)
      if !BlockTranslator.hostShiftFlagsMatchTheInterpreter { emitter.interpreterShiftFlags(kind, size: size) }
    }
  }

  /// Whether `emit` leaves RDX alone (it holds a probe's host address on its hit path).
  var keepsRDX: Bool {
    if case .shift = replay { return false }
    return true
  }
}

/// Where the guest's status flags are kept while a TLB probe clobbers the host RFLAGS.
enum FlagRecovery {
  /// Saved in EBP (LAHF, SETO): `X86Emitter.restoreFlags` puts them back.
  case savedInEBP
  /// Computed again when needed (`FlagRecipe.emit`).
  case recomputed(FlagRecipe)

  /// Puts the flags back into the host RFLAGS. Clobbers RAX (and RDX for a shift's recipe).
  func emit(_ emitter: inout X86Emitter) {
    switch self {
    case .savedInEBP: emitter.restoreFlags()
    case .recomputed(let recipe): recipe.emit(&emitter)
    }
  }
}

extension BlockTranslator {
  /// Whether probes recompute the flags from a `FlagRecipe` where one holds: on unless the
  /// environment sets `HOSTVISOR_SOFTCPU_FLAG_RECIPES=off` (every probe then saves them in EBP,
  /// for measuring what the recipes give and for telling their defects from others).
  static let recomputesFlags = getenv("HOSTVISOR_SOFTCPU_FLAG_RECIPES").map { String(cString: $0) != "off" } ?? true

  /// The slot of guest register `register` (0-15) in the register array.
  static func slot(_ register: UInt8) -> HostOperand { .at(HostRegister.rbx, Int(register) * 8) }

  /// Whether the recipe before instruction `index` still holds after it (with its stack
  /// adjustment brought up to date: `refreshParkedRecipe`).
  func recipeSurvives(_ index: Int) -> Bool {
    guard let before = flagRecipes[index], let after = flagRecipes[index + 1] else { return false }
    return before.writer == after.writer
  }

  /// Before a probe at instruction `index` with the guest's flags in the host RFLAGS: keeps
  /// them recomputable when a recipe holds (and still holds after the instruction when they
  /// are to stay parked past it), otherwise saves them in EBP.
  mutating func keepFlagsForProbe(at index: Int, parking: Bool) {
    if Self.recomputesFlags, let recipe = flagRecipes[index], !parking || recipeSurvives(index) {
      flagRecovery = .recomputed(recipe)
    } else {
      saveFlagsInEBP()
    }
  }

  /// Before instruction `index` with the flags parked as a recipe: the recipe as it stands
  /// there (a PUSH or POP since may have moved the stack pointer it computes from).
  mutating func refreshParkedRecipe(_ index: Int) {
    guard flagsParked, case .recomputed(let parked) = flagRecovery, let current = flagRecipes[index],
      current.writer == parked.writer
    else { return }
    flagRecovery = .recomputed(current)
  }

  /// Saves the host status flags in EBP for the miss paths that follow (`flagRecovery`).
  /// Clobbers RAX.
  mutating func saveFlagsInEBP() {
    emitter.saveFlags()
    flagRecovery = .savedInEBP
  }
}
