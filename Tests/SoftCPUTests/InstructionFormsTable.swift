// The instruction forms the differential tests generate: integer, control flow, string,
// SSE..SSE4.2 and x87. Flag effects follow the Intel SDM (undefined flags are masked).

enum FormTable {
  static let all: [InstructionForm] = integer + control + sse + x87 + bitManipulation + xsaveFamily + avx + avxExtended

  // MARK: Flag effects

  static let arith = FlagEffect(writes: F.all)
  static let arithCarry = FlagEffect(reads: F.c, writes: F.all)
  static let logic = FlagEffect(writes: F.all & ~F.a, undefined: F.a)
  static let incDec = FlagEffect(writes: F.all & ~F.c)
  static let multiply = FlagEffect(writes: F.c | F.o, undefined: F.s | F.z | F.a | F.p)
  static let divide = FlagEffect(undefined: F.all)
  static let none = FlagEffect()
  static let readsAll = FlagEffect(reads: F.all)

  static func modrm(_ ext: UInt8? = nil, _ rm: RMKind = .any) -> Encoding { .modrm(ext: ext, rm: rm) }

  // MARK: Integer

  static var integer: [InstructionForm] {
    var forms: [InstructionForm] = []
    let aluNames = ["add", "or", "adc", "sbb", "and", "sub", "xor", "cmp"]
    for (index, name) in aluNames.enumerated() {
      let base = UInt8(index * 8)
      let flags = [2, 3].contains(index) ? arithCarry : ([1, 4, 6].contains(index) ? logic : arith)
      let lock = name != "cmp"
      forms += [
        InstructionForm(
          name: "\(name) r/m8, r8", group: "int", opcode: [base], encoding: modrm(), sizes: [1], flags: flags,
          allowLock: lock),
        InstructionForm(
          name: "\(name) r/m, r", group: "int", opcode: [base + 1], encoding: modrm(), sizes: [2, 4, 8], flags: flags,
          allowLock: lock),
        InstructionForm(
          name: "\(name) r8, r/m8", group: "int", opcode: [base + 2], encoding: modrm(), sizes: [1], flags: flags),
        InstructionForm(
          name: "\(name) r, r/m", group: "int", opcode: [base + 3], encoding: modrm(), sizes: [2, 4, 8], flags: flags),
        InstructionForm(
          name: "\(name) al, imm8", group: "int", opcode: [base + 4], encoding: .plain, sizes: [1],
          immediate: .bytes(1),
          flags: flags),
        InstructionForm(
          name: "\(name) rax, imm", group: "int", opcode: [base + 5], encoding: .plain, sizes: [2, 4, 8], immediate: .z,
          flags: flags),
        InstructionForm(
          name: "\(name) r/m8, imm8", group: "int", opcode: [0x80], encoding: modrm(UInt8(index)), sizes: [1],
          immediate: .bytes(1), flags: flags, allowLock: lock),
        InstructionForm(
          name: "\(name) r/m, imm", group: "int", opcode: [0x81], encoding: modrm(UInt8(index)), sizes: [2, 4, 8],
          immediate: .z, flags: flags, allowLock: lock),
        InstructionForm(
          name: "\(name) r/m, imm8", group: "int", opcode: [0x83], encoding: modrm(UInt8(index)), sizes: [2, 4, 8],
          immediate: .bytes(1), flags: flags, allowLock: lock),
      ]
    }
    forms += [
      InstructionForm(
        name: "inc r/m8", group: "int", opcode: [0xFE], encoding: modrm(0), sizes: [1], flags: incDec, allowLock: true),
      InstructionForm(
        name: "dec r/m8", group: "int", opcode: [0xFE], encoding: modrm(1), sizes: [1], flags: incDec, allowLock: true),
      InstructionForm(
        name: "inc r/m", group: "int", opcode: [0xFF], encoding: modrm(0), sizes: [2, 4, 8], flags: incDec,
        allowLock: true),
      InstructionForm(
        name: "dec r/m", group: "int", opcode: [0xFF], encoding: modrm(1), sizes: [2, 4, 8], flags: incDec,
        allowLock: true),
      InstructionForm(name: "test r/m8, r8", group: "int", opcode: [0x84], encoding: modrm(), sizes: [1], flags: logic),
      InstructionForm(
        name: "test r/m, r", group: "int", opcode: [0x85], encoding: modrm(), sizes: [2, 4, 8], flags: logic),
      InstructionForm(
        name: "test al, imm8", group: "int", opcode: [0xA8], encoding: .plain, sizes: [1], immediate: .bytes(1),
        flags: logic),
      InstructionForm(
        name: "test rax, imm", group: "int", opcode: [0xA9], encoding: .plain, sizes: [2, 4, 8], immediate: .z,
        flags: logic),
    ]
    for (byteOpcode, wideOpcode) in [(UInt8(0xF6), UInt8(0xF7))] {
      let names: [(UInt8, String, FlagEffect, Bool, Special)] = [
        (0, "test", logic, false, .none), (2, "not", none, true, .none), (3, "neg", arith, true, .none),
        (4, "mul", multiply, false, .none), (5, "imul", multiply, false, .none), (6, "div", divide, false, .divide),
        (7, "idiv", divide, false, .divide),
      ]
      for (ext, name, flags, lock, special) in names {
        let immediate: ImmediateKind = ext == 0 ? .bytes(1) : .none
        forms.append(
          InstructionForm(
            name: "\(name) r/m8\(ext == 0 ? ", imm8" : "")", group: "int", opcode: [byteOpcode], encoding: modrm(ext),
            sizes: [1], immediate: immediate, flags: flags, allowLock: lock, special: special))
        forms.append(
          InstructionForm(
            name: "\(name) r/m\(ext == 0 ? ", imm" : "")", group: "int", opcode: [wideOpcode], encoding: modrm(ext),
            sizes: [2, 4, 8], immediate: ext == 0 ? .z : .none, flags: flags, allowLock: lock, special: special))
      }
    }
    forms += [
      InstructionForm(
        name: "imul r, r/m", group: "int", opcode: [0x0F, 0xAF], encoding: modrm(), sizes: [2, 4, 8], flags: multiply),
      InstructionForm(
        name: "imul r, r/m, imm8", group: "int", opcode: [0x6B], encoding: modrm(), sizes: [2, 4, 8],
        immediate: .bytes(1), flags: multiply),
      InstructionForm(
        name: "imul r, r/m, imm", group: "int", opcode: [0x69], encoding: modrm(), sizes: [2, 4, 8], immediate: .z,
        flags: multiply),
    ]
    // Shifts and rotates.
    let shiftNames = ["rol", "ror", "rcl", "rcr", "shl", "shr", "sal", "sar"]
    for (index, name) in shiftNames.enumerated() {
      let ext = UInt8(index)
      let isRotate = index < 4
      let readsCarry: UInt64 = (index == 2 || index == 3) ? F.c : 0
      for (byteForm, sizes) in [(true, [UInt8(1)]), (false, [UInt8(2), 4, 8])] {
        // CF is undefined for SHL/SHR when the count reaches the operand width (only 8/16-bit).
        let carryUndefined: UInt64 = !isRotate && index != 7 && (byteForm || true) ? (byteForm ? F.c : 0) : 0
        let byOne =
          isRotate
          ? FlagEffect(reads: readsCarry, writes: F.c | F.o)
          : FlagEffect(writes: F.all & ~F.a, undefined: F.a)
        let byCount =
          isRotate
          ? FlagEffect(reads: readsCarry, writes: F.c, undefined: F.o, conditional: true)
          : FlagEffect(
            writes: F.all & ~(F.a | F.o | carryUndefined), undefined: F.a | F.o | carryUndefined, conditional: true)
        var wordCountEffect = byCount
        if !isRotate && !byteForm && index != 7 {
          wordCountEffect.writes &= ~F.c
          wordCountEffect.undefined |= F.c  // 16-bit operand: counts 16-31 leave CF undefined
        }
        let suffix = byteForm ? "r/m8" : "r/m"
        let byCountEffect = byteForm ? byCount : wordCountEffect
        forms += [
          InstructionForm(
            name: "\(name) \(suffix), 1", group: "int", opcode: [byteForm ? 0xD0 : 0xD1], encoding: modrm(ext),
            sizes: sizes,
            flags: byOne),
          InstructionForm(
            name: "\(name) \(suffix), cl", group: "int", opcode: [byteForm ? 0xD2 : 0xD3], encoding: modrm(ext),
            sizes: sizes,
            flags: byCountEffect),
          InstructionForm(
            name: "\(name) \(suffix), imm8", group: "int", opcode: [byteForm ? 0xC0 : 0xC1], encoding: modrm(ext),
            sizes: sizes, immediate: .bytes(1), flags: byCountEffect),
        ]
      }
    }
    let doubleShift = FlagEffect(writes: F.c | F.p | F.z | F.s, undefined: F.a | F.o, conditional: true)
    forms += [
      InstructionForm(
        name: "shld r/m, r, imm8", group: "int", opcode: [0x0F, 0xA4], encoding: modrm(), sizes: [2, 4, 8],
        immediate: .bytes(1), flags: doubleShift, special: .shiftDouble16),
      InstructionForm(
        name: "shld r/m, r, cl", group: "int", opcode: [0x0F, 0xA5], encoding: modrm(), sizes: [4, 8],
        flags: doubleShift),
      InstructionForm(
        name: "shrd r/m, r, imm8", group: "int", opcode: [0x0F, 0xAC], encoding: modrm(), sizes: [2, 4, 8],
        immediate: .bytes(1), flags: doubleShift, special: .shiftDouble16),
      InstructionForm(
        name: "shrd r/m, r, cl", group: "int", opcode: [0x0F, 0xAD], encoding: modrm(), sizes: [4, 8],
        flags: doubleShift),
    ]
    // Bit operations.
    let bitTest = FlagEffect(writes: F.c, undefined: F.o | F.s | F.a | F.p)
    let bitScan = FlagEffect(writes: F.z, undefined: F.c | F.o | F.s | F.a | F.p)
    let count = FlagEffect(writes: F.c | F.z, undefined: F.o | F.s | F.a | F.p)
    for (index, name) in ["bt", "bts", "btr", "btc"].enumerated() {
      forms.append(
        InstructionForm(
          name: "\(name) r/m, r", group: "int", opcode: [0x0F, 0xA3 + UInt8(index) * 8], encoding: modrm(),
          sizes: [2, 4, 8], flags: bitTest, allowLock: index > 0, special: .smallBitOffset))
      forms.append(
        InstructionForm(
          name: "\(name) r/m, imm8", group: "int", opcode: [0x0F, 0xBA], encoding: modrm(4 + UInt8(index)),
          sizes: [2, 4, 8], immediate: .bytes(1), flags: bitTest, allowLock: index > 0))
    }
    forms += [
      InstructionForm(
        name: "bsf r, r/m", group: "int", opcode: [0x0F, 0xBC], encoding: modrm(), sizes: [2, 4, 8], flags: bitScan),
      InstructionForm(
        name: "bsr r, r/m", group: "int", opcode: [0x0F, 0xBD], encoding: modrm(), sizes: [2, 4, 8], flags: bitScan),
      InstructionForm(
        name: "popcnt r, r/m", group: "int", prefixes: [0xF3], opcode: [0x0F, 0xB8], encoding: modrm(),
        sizes: [2, 4, 8], flags: arith),
      InstructionForm(
        name: "lzcnt r, r/m", group: "int", prefixes: [0xF3], opcode: [0x0F, 0xBD], encoding: modrm(),
        sizes: [2, 4, 8], flags: count),
      InstructionForm(
        name: "tzcnt r, r/m", group: "int", prefixes: [0xF3], opcode: [0x0F, 0xBC], encoding: modrm(),
        sizes: [2, 4, 8], flags: count),
      InstructionForm(name: "bswap r", group: "int", opcode: [0x0F, 0xC8], encoding: .opcodeRegister, sizes: [4, 8]),
    ]
    // Data movement.
    forms += [
      InstructionForm(name: "mov r/m8, r8", group: "int", opcode: [0x88], encoding: modrm(), sizes: [1]),
      InstructionForm(name: "mov r/m, r", group: "int", opcode: [0x89], encoding: modrm(), sizes: [2, 4, 8]),
      InstructionForm(name: "mov r8, r/m8", group: "int", opcode: [0x8A], encoding: modrm(), sizes: [1]),
      InstructionForm(name: "mov r, r/m", group: "int", opcode: [0x8B], encoding: modrm(), sizes: [2, 4, 8]),
      InstructionForm(
        name: "mov r/m8, imm8", group: "int", opcode: [0xC6], encoding: modrm(0), sizes: [1], immediate: .bytes(1)),
      InstructionForm(
        name: "mov r/m, imm", group: "int", opcode: [0xC7], encoding: modrm(0), sizes: [2, 4, 8], immediate: .z),
      InstructionForm(
        name: "mov r8, imm8", group: "int", opcode: [0xB0], encoding: .opcodeRegister, sizes: [1], immediate: .bytes(1)),
      InstructionForm(
        name: "mov r, imm", group: "int", opcode: [0xB8], encoding: .opcodeRegister, sizes: [2, 4, 8], immediate: .v),
      InstructionForm(
        name: "mov moffs al", group: "int", opcode: [0xA0], encoding: .plain, sizes: [1], immediate: .bytes(8)),
      InstructionForm(
        name: "mov moffs rax", group: "int", opcode: [0xA1], encoding: .plain, sizes: [2, 4, 8], immediate: .bytes(8)),
      InstructionForm(
        name: "mov moffs, al", group: "int", opcode: [0xA2], encoding: .plain, sizes: [1], immediate: .bytes(8)),
      InstructionForm(
        name: "mov moffs, rax", group: "int", opcode: [0xA3], encoding: .plain, sizes: [2, 4, 8], immediate: .bytes(8)),
      InstructionForm(
        name: "movzx r, r/m8", group: "int", opcode: [0x0F, 0xB6], encoding: modrm(), sizes: [2, 4, 8], memoryBytes: 1),
      InstructionForm(
        name: "movzx r, r/m16", group: "int", opcode: [0x0F, 0xB7], encoding: modrm(), sizes: [4, 8], memoryBytes: 2),
      InstructionForm(
        name: "movsx r, r/m8", group: "int", opcode: [0x0F, 0xBE], encoding: modrm(), sizes: [2, 4, 8], memoryBytes: 1),
      InstructionForm(
        name: "movsx r, r/m16", group: "int", opcode: [0x0F, 0xBF], encoding: modrm(), sizes: [4, 8], memoryBytes: 2),
      InstructionForm(
        name: "movsxd r, r/m32", group: "int", opcode: [0x63], encoding: modrm(), sizes: [4, 8], memoryBytes: 4),
      InstructionForm(
        name: "movbe r, m", group: "int", opcode: [0x0F, 0x38, 0xF0], encoding: modrm(nil, .memory), sizes: [2, 4, 8]),
      InstructionForm(
        name: "movbe m, r", group: "int", opcode: [0x0F, 0x38, 0xF1], encoding: modrm(nil, .memory), sizes: [2, 4, 8]),
      InstructionForm(name: "lea r, m", group: "int", opcode: [0x8D], encoding: modrm(nil, .memory), sizes: [2, 4, 8]),
      InstructionForm(
        name: "xchg r/m8, r8", group: "int", opcode: [0x86], encoding: modrm(), sizes: [1], allowLock: true),
      InstructionForm(
        name: "xchg r/m, r", group: "int", opcode: [0x87], encoding: modrm(), sizes: [2, 4, 8], allowLock: true),
      InstructionForm(name: "xchg rax, r", group: "int", opcode: [0x90], encoding: .opcodeRegister, sizes: [2, 4, 8]),
      InstructionForm(
        name: "xadd r/m8, r8", group: "int", opcode: [0x0F, 0xC0], encoding: modrm(), sizes: [1], flags: arith,
        allowLock: true),
      InstructionForm(
        name: "xadd r/m, r", group: "int", opcode: [0x0F, 0xC1], encoding: modrm(), sizes: [2, 4, 8], flags: arith,
        allowLock: true),
      InstructionForm(
        name: "cmpxchg r/m8, r8", group: "int", opcode: [0x0F, 0xB0], encoding: modrm(), sizes: [1], flags: arith,
        allowLock: true),
      InstructionForm(
        name: "cmpxchg r/m, r", group: "int", opcode: [0x0F, 0xB1], encoding: modrm(), sizes: [2, 4, 8], flags: arith,
        allowLock: true),
      InstructionForm(
        name: "cmpxchg8b m64", group: "int", opcode: [0x0F, 0xC7], encoding: modrm(1, .memory), sizes: [4],
        memoryBytes: 8, flags: FlagEffect(writes: F.z), allowLock: true),
      InstructionForm(
        name: "cmpxchg16b m128", group: "int", opcode: [0x0F, 0xC7], encoding: modrm(1, .memory), sizes: [8],
        memoryBytes: 16, alignment: 16, flags: FlagEffect(writes: F.z), allowLock: true),
      InstructionForm(name: "cbw/cwde/cdqe", group: "int", opcode: [0x98], encoding: .plain, sizes: [2, 4, 8]),
      InstructionForm(name: "cwd/cdq/cqo", group: "int", opcode: [0x99], encoding: .plain, sizes: [2, 4, 8]),
      InstructionForm(
        name: "cmovcc r, r/m", group: "int", opcode: [0x0F, 0x40], encoding: modrm(), sizes: [2, 4, 8], flags: readsAll,
        conditionInOpcode: true),
      InstructionForm(
        name: "setcc r/m8", group: "int", opcode: [0x0F, 0x90], encoding: modrm(0), sizes: [1], flags: readsAll,
        conditionInOpcode: true),
      InstructionForm(name: "clc", group: "int", opcode: [0xF8], encoding: .plain, flags: FlagEffect(writes: F.c)),
      InstructionForm(name: "stc", group: "int", opcode: [0xF9], encoding: .plain, flags: FlagEffect(writes: F.c)),
      InstructionForm(
        name: "cmc", group: "int", opcode: [0xF5], encoding: .plain, flags: FlagEffect(reads: F.c, writes: F.c)),
      InstructionForm(name: "cld", group: "int", opcode: [0xFC], encoding: .plain),
      InstructionForm(name: "std", group: "int", opcode: [0xFD], encoding: .plain),
      InstructionForm(
        name: "lahf", group: "int", opcode: [0x9F], encoding: .plain, flags: FlagEffect(reads: F.all & ~F.o)),
      InstructionForm(
        name: "sahf", group: "int", opcode: [0x9E], encoding: .plain, flags: FlagEffect(writes: F.all & ~F.o)),
      InstructionForm(name: "nop", group: "int", opcode: [0x90], encoding: .plain),
      InstructionForm(name: "nop r/m", group: "int", opcode: [0x0F, 0x1F], encoding: modrm(0), sizes: [2, 4]),
      InstructionForm(name: "pause", group: "int", prefixes: [0xF3], opcode: [0x90], encoding: .plain),
      InstructionForm(name: "xlat", group: "int", opcode: [0xD7], encoding: .plain, special: .xlat),
    ]
    // Stack.
    forms += [
      InstructionForm(
        name: "push r", group: "int", opcode: [0x50], encoding: .opcodeRegister, sizes: [4, 2],
        registerOperandsExcludeRSP: false),
      InstructionForm(name: "pop r", group: "int", opcode: [0x58], encoding: .opcodeRegister, sizes: [4, 2]),
      InstructionForm(
        name: "push imm8", group: "int", opcode: [0x6A], encoding: .plain, sizes: [4, 2], immediate: .bytes(1)),
      InstructionForm(name: "push imm", group: "int", opcode: [0x68], encoding: .plain, sizes: [4, 2], immediate: .z),
      InstructionForm(
        name: "push r/m", group: "int", opcode: [0xFF], encoding: modrm(6), sizes: [4, 2], memoryBytes: 8,
        registerOperandsExcludeRSP: false),
      InstructionForm(
        name: "pop r/m", group: "int", opcode: [0x8F], encoding: modrm(0), sizes: [4, 2], memoryBytes: 8),
      InstructionForm(name: "pushf", group: "int", opcode: [0x9C], encoding: .plain, sizes: [4, 2], flags: readsAll),
      InstructionForm(
        name: "popf", group: "int", opcode: [0x9D], encoding: .plain, sizes: [4, 2], flags: FlagEffect(writes: F.all),
        special: .popf),
      InstructionForm(
        name: "enter imm16, imm8", group: "int", opcode: [0xC8], encoding: .plain, immediate: .bytes(3),
        special: .framePointer),
      InstructionForm(name: "leave", group: "int", opcode: [0xC9], encoding: .plain, special: .framePointer),
    ]
    // Strings.
    let stringCompare = FlagEffect(writes: F.all, conditional: true)
    for (opcode, name, flags) in [
      (UInt8(0xA4), "movs", none), (0xA6, "cmps", stringCompare), (0xAA, "stos", none), (0xAC, "lods", none),
      (0xAE, "scas", stringCompare),
    ] {
      forms.append(
        InstructionForm(
          name: "\(name)b", group: "int", opcode: [opcode], encoding: .plain, sizes: [1], flags: flags, allowRep: true,
          special: .string))
      forms.append(
        InstructionForm(
          name: "\(name) w/d/q", group: "int", opcode: [opcode + 1], encoding: .plain, sizes: [2, 4, 8], flags: flags,
          allowRep: true, special: .string))
    }
    // Faulting and privileged instructions (CPL 3).
    forms += [
      InstructionForm(name: "ud2", group: "int", opcode: [0x0F, 0x0B], encoding: .plain),
      InstructionForm(name: "int3", group: "int", opcode: [0xCC], encoding: .plain),
      InstructionForm(name: "cli", group: "int", opcode: [0xFA], encoding: .plain),
      InstructionForm(name: "sti", group: "int", opcode: [0xFB], encoding: .plain),
      InstructionForm(name: "in al, dx", group: "int", opcode: [0xEC], encoding: .plain),
      InstructionForm(name: "out dx, al", group: "int", opcode: [0xEE], encoding: .plain),
      InstructionForm(name: "in al, imm8", group: "int", opcode: [0xE4], encoding: .plain, immediate: .bytes(1)),
      InstructionForm(
        name: "mov cr0, r", group: "int", opcode: [0x0F, 0x22], encoding: modrm(0, .register), sizes: [8]),
      InstructionForm(name: "rdmsr", group: "int", opcode: [0x0F, 0x32], encoding: .plain),
      InstructionForm(name: "wbinvd", group: "int", opcode: [0x0F, 0x09], encoding: .plain),
      InstructionForm(name: "clts", group: "int", opcode: [0x0F, 0x06], encoding: .plain),
    ]
    return forms
  }

  // MARK: Control flow

  static var control: [InstructionForm] {
    [
      InstructionForm(
        name: "jcc rel8", group: "control", opcode: [0x70], encoding: .plain, flags: readsAll,
        special: .branch(displacementBytes: 1), conditionInOpcode: true),
      InstructionForm(
        name: "jcc rel32", group: "control", opcode: [0x0F, 0x80], encoding: .plain, flags: readsAll,
        special: .branch(displacementBytes: 4), conditionInOpcode: true),
      InstructionForm(
        name: "jmp rel8", group: "control", opcode: [0xEB], encoding: .plain, special: .branch(displacementBytes: 1)),
      InstructionForm(
        name: "jmp rel32", group: "control", opcode: [0xE9], encoding: .plain, special: .branch(displacementBytes: 4)),
      InstructionForm(
        name: "call rel32", group: "control", opcode: [0xE8], encoding: .plain, special: .branch(displacementBytes: 4)),
      InstructionForm(
        name: "loop rel8", group: "control", opcode: [0xE2], encoding: .plain, special: .branch(displacementBytes: 1)),
      InstructionForm(
        name: "loope rel8", group: "control", opcode: [0xE1], encoding: .plain, flags: FlagEffect(reads: F.z),
        special: .branch(displacementBytes: 1)),
      InstructionForm(
        name: "loopne rel8", group: "control", opcode: [0xE0], encoding: .plain, flags: FlagEffect(reads: F.z),
        special: .branch(displacementBytes: 1)),
      InstructionForm(
        name: "jrcxz rel8", group: "control", opcode: [0xE3], encoding: .plain, special: .branch(displacementBytes: 1)),
      InstructionForm(name: "ret", group: "control", opcode: [0xC3], encoding: .plain, special: .ret),
      InstructionForm(
        name: "ret imm16", group: "control", opcode: [0xC2], encoding: .plain, immediate: .bytes(2), special: .ret),
    ]
  }

  // MARK: SSE

  static func sse(
    _ name: String, _ prefix: [UInt8], _ opcode: [UInt8], memory: Int = 16, align: Int = 16, fill: MemoryFill = .random,
    imm: Bool = false, rm: RMKind = .any, reg: OperandSpace = .xmm, rmSpace: OperandSpace = .xmm, sizes: [UInt8] = [4],
    ext: UInt8? = nil, flags: FlagEffect = FlagEffect()
  ) -> InstructionForm {
    InstructionForm(
      name: name, group: "sse", prefixes: prefix, opcode: opcode, encoding: .modrm(ext: ext, rm: rm), sizes: sizes,
      immediate: imm ? .bytes(1) : .none, regSpace: reg, rmSpace: rmSpace, memoryBytes: memory, alignment: align,
      flags: flags, memoryFill: fill)
  }

  static var sse: [InstructionForm] {
    var forms: [InstructionForm] = []
    let comiFlags = FlagEffect(writes: F.all)
    // Floating-point arithmetic: ps, pd, ss, sd.
    let arithmetic: [(UInt8, String)] = [
      (0x58, "add"), (0x59, "mul"), (0x5C, "sub"), (0x5D, "min"), (0x5E, "div"), (0x5F, "max"), (0x51, "sqrt"),
    ]
    for (opcode, name) in arithmetic {
      forms += [
        sse("\(name)ps", [], [0x0F, opcode], fill: .float32),
        sse("\(name)pd", [0x66], [0x0F, opcode], fill: .float64),
        sse("\(name)ss", [0xF3], [0x0F, opcode], memory: 4, align: 1, fill: .float32),
        sse("\(name)sd", [0xF2], [0x0F, opcode], memory: 8, align: 1, fill: .float64),
      ]
    }
    for (opcode, name) in [(UInt8(0x54), "and"), (0x55, "andn"), (0x56, "or"), (0x57, "xor")] {
      forms += [sse("\(name)ps", [], [0x0F, opcode]), sse("\(name)pd", [0x66], [0x0F, opcode])]
    }
    forms += [
      sse("rcpps", [], [0x0F, 0x53], fill: .float32),
      sse("rsqrtps", [], [0x0F, 0x52], fill: .float32),
      sse("rcpss", [0xF3], [0x0F, 0x53], memory: 4, align: 1, fill: .float32),
      sse("rsqrtss", [0xF3], [0x0F, 0x52], memory: 4, align: 1, fill: .float32),
      sse("cmpps", [], [0x0F, 0xC2], fill: .float32, imm: true),
      sse("cmppd", [0x66], [0x0F, 0xC2], fill: .float64, imm: true),
      sse("cmpss", [0xF3], [0x0F, 0xC2], memory: 4, align: 1, fill: .float32, imm: true),
      sse("cmpsd", [0xF2], [0x0F, 0xC2], memory: 8, align: 1, fill: .float64, imm: true),
      sse("ucomiss", [], [0x0F, 0x2E], memory: 4, align: 1, fill: .float32, flags: comiFlags),
      sse("comiss", [], [0x0F, 0x2F], memory: 4, align: 1, fill: .float32, flags: comiFlags),
      sse("ucomisd", [0x66], [0x0F, 0x2E], memory: 8, align: 1, fill: .float64, flags: comiFlags),
      sse("comisd", [0x66], [0x0F, 0x2F], memory: 8, align: 1, fill: .float64, flags: comiFlags),
      // Moves.
      sse("movups", [], [0x0F, 0x10], align: 1),
      sse("movups store", [], [0x0F, 0x11], align: 1),
      sse("movupd", [0x66], [0x0F, 0x10], align: 1),
      sse("movupd store", [0x66], [0x0F, 0x11], align: 1),
      sse("movss", [0xF3], [0x0F, 0x10], memory: 4, align: 1),
      sse("movss store", [0xF3], [0x0F, 0x11], memory: 4, align: 1),
      sse("movsd", [0xF2], [0x0F, 0x10], memory: 8, align: 1),
      sse("movsd store", [0xF2], [0x0F, 0x11], memory: 8, align: 1),
      sse("movaps", [], [0x0F, 0x28]),
      sse("movaps store", [], [0x0F, 0x29]),
      sse("movapd", [0x66], [0x0F, 0x28]),
      sse("movapd store", [0x66], [0x0F, 0x29]),
      sse("movlps/movhlps", [], [0x0F, 0x12], memory: 8, align: 1),
      sse("movlps store", [], [0x0F, 0x13], memory: 8, align: 1, rm: .memory),
      sse("movhps/movlhps", [], [0x0F, 0x16], memory: 8, align: 1),
      sse("movhps store", [], [0x0F, 0x17], memory: 8, align: 1, rm: .memory),
      sse("movlpd", [0x66], [0x0F, 0x12], memory: 8, align: 1, rm: .memory),
      sse("movlpd store", [0x66], [0x0F, 0x13], memory: 8, align: 1, rm: .memory),
      sse("movhpd", [0x66], [0x0F, 0x16], memory: 8, align: 1, rm: .memory),
      sse("movhpd store", [0x66], [0x0F, 0x17], memory: 8, align: 1, rm: .memory),
      sse("movq xmm, xmm/m64", [0xF3], [0x0F, 0x7E], memory: 8, align: 1),
      sse("movq xmm/m64, xmm", [0x66], [0x0F, 0xD6], memory: 8, align: 1),
      sse("movd/movq xmm, r/m", [0x66], [0x0F, 0x6E], memory: 0, align: 1, rmSpace: .gpr, sizes: [4, 8]),
      sse("movd/movq r/m, xmm", [0x66], [0x0F, 0x7E], memory: 0, align: 1, rmSpace: .gpr, sizes: [4, 8]),
      sse("movdqa", [0x66], [0x0F, 0x6F]),
      sse("movdqa store", [0x66], [0x0F, 0x7F]),
      sse("movdqu", [0xF3], [0x0F, 0x6F], align: 1),
      sse("movdqu store", [0xF3], [0x0F, 0x7F], align: 1),
      sse("movmskps", [], [0x0F, 0x50], rm: .register, reg: .gpr, sizes: [4, 8]),
      sse("movmskpd", [0x66], [0x0F, 0x50], rm: .register, reg: .gpr, sizes: [4, 8]),
      sse("pmovmskb", [0x66], [0x0F, 0xD7], rm: .register, reg: .gpr, sizes: [4, 8]),
      sse("movntps", [], [0x0F, 0x2B], rm: .memory),
      sse("movntpd", [0x66], [0x0F, 0x2B], rm: .memory),
      sse("movntdq", [0x66], [0x0F, 0xE7], rm: .memory),
      sse("movnti", [], [0x0F, 0xC3], memory: 0, align: 1, rm: .memory, reg: .gpr, sizes: [4, 8]),
      sse("shufps", [], [0x0F, 0xC6], imm: true),
      sse("shufpd", [0x66], [0x0F, 0xC6], imm: true),
      sse("unpcklps", [], [0x0F, 0x14]),
      sse("unpckhps", [], [0x0F, 0x15]),
      sse("unpcklpd", [0x66], [0x0F, 0x14]),
      sse("unpckhpd", [0x66], [0x0F, 0x15]),
      // Conversions.
      sse("cvtsi2ss", [0xF3], [0x0F, 0x2A], memory: 0, align: 1, fill: .int64, rmSpace: .gpr, sizes: [4, 8]),
      sse("cvtsi2sd", [0xF2], [0x0F, 0x2A], memory: 0, align: 1, fill: .int64, rmSpace: .gpr, sizes: [4, 8]),
      sse("cvttss2si", [0xF3], [0x0F, 0x2C], memory: 4, align: 1, fill: .float32, reg: .gpr, sizes: [4, 8]),
      sse("cvtss2si", [0xF3], [0x0F, 0x2D], memory: 4, align: 1, fill: .float32, reg: .gpr, sizes: [4, 8]),
      sse("cvttsd2si", [0xF2], [0x0F, 0x2C], memory: 8, align: 1, fill: .float64, reg: .gpr, sizes: [4, 8]),
      sse("cvtsd2si", [0xF2], [0x0F, 0x2D], memory: 8, align: 1, fill: .float64, reg: .gpr, sizes: [4, 8]),
      sse("cvtps2pd", [], [0x0F, 0x5A], memory: 8, align: 1, fill: .float32),
      sse("cvtpd2ps", [0x66], [0x0F, 0x5A], fill: .float64),
      sse("cvtss2sd", [0xF3], [0x0F, 0x5A], memory: 4, align: 1, fill: .float32),
      sse("cvtsd2ss", [0xF2], [0x0F, 0x5A], memory: 8, align: 1, fill: .float64),
      sse("cvtdq2ps", [], [0x0F, 0x5B]),
      sse("cvtps2dq", [0x66], [0x0F, 0x5B], fill: .float32),
      sse("cvttps2dq", [0xF3], [0x0F, 0x5B], fill: .float32),
      sse("cvtdq2pd", [0xF3], [0x0F, 0xE6], memory: 8, align: 1),
      sse("cvtpd2dq", [0xF2], [0x0F, 0xE6], fill: .float64),
      sse("cvttpd2dq", [0x66], [0x0F, 0xE6], fill: .float64),
      // Integer SSE2.
      sse("pshufd", [0x66], [0x0F, 0x70], imm: true),
      sse("pshufhw", [0xF3], [0x0F, 0x70], imm: true),
      sse("pshuflw", [0xF2], [0x0F, 0x70], imm: true),
      sse("pextrw r, xmm, imm8", [0x66], [0x0F, 0xC5], imm: true, rm: .register, reg: .gpr, sizes: [4, 8]),
      sse("pinsrw xmm, r/m16, imm8", [0x66], [0x0F, 0xC4], memory: 2, align: 1, imm: true, rmSpace: .gpr),
    ]
    let integerOps: [(UInt8, String)] = [
      (0x60, "punpcklbw"), (0x61, "punpcklwd"), (0x62, "punpckldq"), (0x63, "packsswb"), (0x64, "pcmpgtb"),
      (0x65, "pcmpgtw"), (0x66, "pcmpgtd"), (0x67, "packuswb"), (0x68, "punpckhbw"), (0x69, "punpckhwd"),
      (0x6A, "punpckhdq"), (0x6B, "packssdw"), (0x6C, "punpcklqdq"), (0x6D, "punpckhqdq"), (0x74, "pcmpeqb"),
      (0x75, "pcmpeqw"), (0x76, "pcmpeqd"), (0xD1, "psrlw"), (0xD2, "psrld"), (0xD3, "psrlq"), (0xD4, "paddq"),
      (0xD5, "pmullw"), (0xD8, "psubusb"), (0xD9, "psubusw"), (0xDA, "pminub"), (0xDB, "pand"), (0xDC, "paddusb"),
      (0xDD, "paddusw"), (0xDE, "pmaxub"), (0xDF, "pandn"), (0xE0, "pavgb"), (0xE1, "psraw"), (0xE2, "psrad"),
      (0xE3, "pavgw"), (0xE4, "pmulhuw"), (0xE5, "pmulhw"), (0xE8, "psubsb"), (0xE9, "psubsw"), (0xEA, "pminsw"),
      (0xEB, "por"), (0xEC, "paddsb"), (0xED, "paddsw"), (0xEE, "pmaxsw"), (0xEF, "pxor"), (0xF1, "psllw"),
      (0xF2, "pslld"), (0xF3, "psllq"), (0xF4, "pmuludq"), (0xF5, "pmaddwd"), (0xF6, "psadbw"), (0xF8, "psubb"),
      (0xF9, "psubw"), (0xFA, "psubd"), (0xFB, "psubq"), (0xFC, "paddb"), (0xFD, "paddw"), (0xFE, "paddd"),
    ]
    for (opcode, name) in integerOps { forms.append(sse(name, [0x66], [0x0F, opcode])) }
    for (opcode, ext, name) in [
      (UInt8(0x71), UInt8(2), "psrlw imm"), (0x71, 4, "psraw imm"), (0x71, 6, "psllw imm"), (0x72, 2, "psrld imm"),
      (0x72, 4, "psrad imm"), (0x72, 6, "pslld imm"), (0x73, 2, "psrlq imm"), (0x73, 3, "psrldq imm"),
      (0x73, 6, "psllq imm"), (0x73, 7, "pslldq imm"),
    ] {
      forms.append(sse(name, [0x66], [0x0F, opcode], imm: true, rm: .register, ext: ext))
    }
    forms += [
      InstructionForm(
        name: "maskmovdqu", group: "sse", prefixes: [0x66], opcode: [0x0F, 0xF7],
        encoding: .modrm(ext: nil, rm: .register),
        regSpace: .xmm, rmSpace: .xmm, special: .maskmov),
      InstructionForm(
        name: "ldmxcsr", group: "sse", opcode: [0x0F, 0xAE], encoding: .modrm(ext: 2, rm: .memory), memoryBytes: 4,
        special: .ldmxcsr),
      InstructionForm(
        name: "stmxcsr", group: "sse", opcode: [0x0F, 0xAE], encoding: .modrm(ext: 3, rm: .memory), memoryBytes: 4),
      InstructionForm(name: "lfence", group: "sse", opcode: [0x0F, 0xAE, 0xE8], encoding: .plain),
      InstructionForm(name: "mfence", group: "sse", opcode: [0x0F, 0xAE, 0xF0], encoding: .plain),
      InstructionForm(name: "sfence", group: "sse", opcode: [0x0F, 0xAE, 0xF8], encoding: .plain),
      InstructionForm(
        name: "prefetch m", group: "sse", opcode: [0x0F, 0x18], encoding: .modrm(ext: 1, rm: .memory), memoryBytes: 1),
      // SSE3.
      sse("addsubps", [0xF2], [0x0F, 0xD0], fill: .float32),
      sse("addsubpd", [0x66], [0x0F, 0xD0], fill: .float64),
      sse("haddps", [0xF2], [0x0F, 0x7C], fill: .float32),
      sse("haddpd", [0x66], [0x0F, 0x7C], fill: .float64),
      sse("hsubps", [0xF2], [0x0F, 0x7D], fill: .float32),
      sse("hsubpd", [0x66], [0x0F, 0x7D], fill: .float64),
      sse("movsldup", [0xF3], [0x0F, 0x12]),
      sse("movshdup", [0xF3], [0x0F, 0x16]),
      sse("movddup", [0xF2], [0x0F, 0x12], memory: 8, align: 1),
      sse("lddqu", [0xF2], [0x0F, 0xF0], align: 1, rm: .memory),
      // SSSE3.
      sse("palignr", [0x66], [0x0F, 0x3A, 0x0F], imm: true),
    ]
    let ssse3: [(UInt8, String)] = [
      (0x00, "pshufb"), (0x01, "phaddw"), (0x02, "phaddd"), (0x03, "phaddsw"), (0x04, "pmaddubsw"), (0x05, "phsubw"),
      (0x06, "phsubd"), (0x07, "phsubsw"), (0x08, "psignb"), (0x09, "psignw"), (0x0A, "psignd"), (0x0B, "pmulhrsw"),
      (0x1C, "pabsb"), (0x1D, "pabsw"), (0x1E, "pabsd"),
      // SSE4.1 / 4.2 (0F 38).
      (0x10, "pblendvb"), (0x14, "blendvps"), (0x15, "blendvpd"), (0x28, "pmuldq"), (0x29, "pcmpeqq"),
      (0x2B, "packusdw"), (0x37, "pcmpgtq"), (0x38, "pminsb"), (0x39, "pminsd"), (0x3A, "pminuw"), (0x3B, "pminud"),
      (0x3C, "pmaxsb"), (0x3D, "pmaxsd"), (0x3E, "pmaxuw"), (0x3F, "pmaxud"), (0x40, "pmulld"), (0x41, "phminposuw"),
    ]
    for (opcode, name) in ssse3 { forms.append(sse(name, [0x66], [0x0F, 0x38, opcode])) }
    for (opcode, name, bytes) in [
      (UInt8(0x20), "pmovsxbw", 8), (0x21, "pmovsxbd", 4), (0x22, "pmovsxbq", 2), (0x23, "pmovsxwd", 8),
      (0x24, "pmovsxwq", 4), (0x25, "pmovsxdq", 8), (0x30, "pmovzxbw", 8), (0x31, "pmovzxbd", 4), (0x32, "pmovzxbq", 2),
      (0x33, "pmovzxwd", 8), (0x34, "pmovzxwq", 4), (0x35, "pmovzxdq", 8),
    ] {
      forms.append(sse(name, [0x66], [0x0F, 0x38, opcode], memory: bytes, align: 1))
    }
    forms += [
      sse("ptest", [0x66], [0x0F, 0x38, 0x17], flags: FlagEffect(writes: F.all)),
      sse("movntdqa", [0x66], [0x0F, 0x38, 0x2A], rm: .memory),
      sse("roundps", [0x66], [0x0F, 0x3A, 0x08], fill: .float32, imm: true),
      sse("roundpd", [0x66], [0x0F, 0x3A, 0x09], fill: .float64, imm: true),
      sse("roundss", [0x66], [0x0F, 0x3A, 0x0A], memory: 4, align: 1, fill: .float32, imm: true),
      sse("roundsd", [0x66], [0x0F, 0x3A, 0x0B], memory: 8, align: 1, fill: .float64, imm: true),
      sse("blendps", [0x66], [0x0F, 0x3A, 0x0C], imm: true),
      sse("blendpd", [0x66], [0x0F, 0x3A, 0x0D], imm: true),
      sse("pblendw", [0x66], [0x0F, 0x3A, 0x0E], imm: true),
      sse("pextrb r/m8, xmm, imm8", [0x66], [0x0F, 0x3A, 0x14], memory: 1, align: 1, imm: true, rmSpace: .gpr),
      sse("pextrw r/m16, xmm, imm8", [0x66], [0x0F, 0x3A, 0x15], memory: 2, align: 1, imm: true, rmSpace: .gpr),
      sse(
        "pextrd/q r/m, xmm, imm8", [0x66], [0x0F, 0x3A, 0x16], memory: 0, align: 1, imm: true, rmSpace: .gpr,
        sizes: [4, 8]),
      sse("extractps r/m32, xmm, imm8", [0x66], [0x0F, 0x3A, 0x17], memory: 4, align: 1, imm: true, rmSpace: .gpr),
      sse("pinsrb xmm, r/m8, imm8", [0x66], [0x0F, 0x3A, 0x20], memory: 1, align: 1, imm: true, rmSpace: .gpr),
      sse("insertps", [0x66], [0x0F, 0x3A, 0x21], memory: 4, align: 1, fill: .float32, imm: true),
      sse(
        "pinsrd/q xmm, r/m, imm8", [0x66], [0x0F, 0x3A, 0x22], memory: 0, align: 1, imm: true, rmSpace: .gpr,
        sizes: [4, 8]),
      sse("dpps", [0x66], [0x0F, 0x3A, 0x40], fill: .float32, imm: true),
      sse("dppd", [0x66], [0x0F, 0x3A, 0x41], fill: .float64, imm: true),
      sse("mpsadbw", [0x66], [0x0F, 0x3A, 0x42], imm: true),
      sse("pclmulqdq", [0x66], [0x0F, 0x3A, 0x44], imm: true),
      sse("pcmpestrm", [0x66], [0x0F, 0x3A, 0x60], align: 1, imm: true, flags: FlagEffect(writes: F.all)),
      sse("pcmpestri", [0x66], [0x0F, 0x3A, 0x61], align: 1, imm: true, flags: FlagEffect(writes: F.all)),
      sse("pcmpistrm", [0x66], [0x0F, 0x3A, 0x62], align: 1, imm: true, flags: FlagEffect(writes: F.all)),
      sse("pcmpistri", [0x66], [0x0F, 0x3A, 0x63], align: 1, imm: true, flags: FlagEffect(writes: F.all)),
      sse("crc32 r, r/m8", [0xF2], [0x0F, 0x38, 0xF0], memory: 1, align: 1, reg: .gpr, rmSpace: .gpr, sizes: [4, 8]),
      sse("crc32 r, r/m", [0xF2], [0x0F, 0x38, 0xF1], memory: 0, align: 1, reg: .gpr, rmSpace: .gpr, sizes: [4, 8]),
    ]
    return forms
  }

  // MARK: x87

  static let fpuArith = FlagEffect(ccWrites: CC.c1, ccUndefined: CC.c023)
  static let fpuCompare = FlagEffect(ccWrites: CC.all)
  static let fpuAllUndefined = FlagEffect(ccUndefined: CC.all)

  static func x87Memory(
    _ name: String, _ escape: UInt8, _ ext: UInt8, _ fill: MemoryFill, _ bytes: Int, flags: FlagEffect = fpuArith
  )
    -> InstructionForm
  {
    InstructionForm(
      name: name, group: "x87", opcode: [escape], encoding: .modrm(ext: ext, rm: .memory), memoryBytes: bytes,
      flags: flags,
      memoryFill: fill)
  }

  static func x87Register(_ name: String, _ escape: UInt8, _ ext: UInt8, flags: FlagEffect = fpuArith)
    -> InstructionForm
  {
    InstructionForm(name: name, group: "x87", opcode: [escape], encoding: .x87Register(ext: ext), flags: flags)
  }

  static func x87Fixed(_ name: String, _ bytes: [UInt8], flags: FlagEffect = fpuArith, tolerance: Double? = nil)
    -> InstructionForm
  {
    InstructionForm(name: name, group: "x87", opcode: bytes, encoding: .plain, flags: flags, x87Tolerance: tolerance)
  }

  static var x87: [InstructionForm] {
    var forms: [InstructionForm] = []
    let arithmeticNames = ["fadd", "fmul", "fcom", "fcomp", "fsub", "fsubr", "fdiv", "fdivr"]
    for (index, name) in arithmeticNames.enumerated() {
      let ext = UInt8(index)
      let flags = (index == 2 || index == 3) ? fpuCompare : fpuArith
      let integerName = "fi" + name.dropFirst()
      forms += [
        x87Memory("\(name) m32", 0xD8, ext, .float32, 4, flags: flags),
        x87Memory("\(name) m64", 0xDC, ext, .float64, 8, flags: flags),
        x87Memory("\(integerName) m32", 0xDA, ext, .int32, 4, flags: flags),
        x87Memory("\(integerName) m16", 0xDE, ext, .int16, 2, flags: flags),
        x87Register("\(name) st, st(i)", 0xD8, ext, flags: flags),
      ]
      if index != 2 && index != 3 {
        forms.append(x87Register("\(name) st(i), st", 0xDC, ext))
        forms.append(x87Register("\(name)p st(i), st", 0xDE, ext))
      }
    }
    forms += [
      x87Memory("fld m32", 0xD9, 0, .float32, 4),
      x87Memory("fst m32", 0xD9, 2, .float32, 4),
      x87Memory("fstp m32", 0xD9, 3, .float32, 4),
      x87Memory("fnstcw m16", 0xD9, 7, .random, 2, flags: fpuAllUndefined),
      InstructionForm(
        name: "fldcw m16", group: "x87", opcode: [0xD9], encoding: .modrm(ext: 5, rm: .memory), memoryBytes: 2,
        flags: fpuAllUndefined, special: .fldcw),
      x87Memory("fld m64", 0xDD, 0, .float64, 8),
      x87Memory("fisttp m64", 0xDD, 1, .float64, 8),
      x87Memory("fst m64", 0xDD, 2, .float64, 8),
      x87Memory("fstp m64", 0xDD, 3, .float64, 8),
      x87Memory("fnstsw m16", 0xDD, 7, .random, 2, flags: FlagEffect(ccReads: CC.all)),
      x87Memory("fild m32", 0xDB, 0, .int32, 4),
      x87Memory("fisttp m32", 0xDB, 1, .int32, 4),
      x87Memory("fist m32", 0xDB, 2, .int32, 4),
      x87Memory("fistp m32", 0xDB, 3, .int32, 4),
      x87Memory("fld m80", 0xDB, 5, .float80, 10),
      x87Memory("fstp m80", 0xDB, 7, .float80, 10),
      x87Memory("fild m16", 0xDF, 0, .int16, 2),
      x87Memory("fisttp m16", 0xDF, 1, .int16, 2),
      x87Memory("fist m16", 0xDF, 2, .int16, 2),
      x87Memory("fistp m16", 0xDF, 3, .int16, 2),
      x87Memory("fbld m80", 0xDF, 4, .random, 10),
      x87Memory("fild m64", 0xDF, 5, .int64, 8),
      x87Memory("fbstp m80", 0xDF, 6, .random, 10),
      x87Memory("fistp m64", 0xDF, 7, .int64, 8),
      x87Register("fld st(i)", 0xD9, 0),
      x87Register("fxch st(i)", 0xD9, 1),
      x87Register("ffree st(i)", 0xDD, 0, flags: fpuAllUndefined),
      x87Register("fst st(i)", 0xDD, 2),
      x87Register("fstp st(i)", 0xDD, 3),
      x87Register("fucom st(i)", 0xDD, 4, flags: fpuCompare),
      x87Register("fucomp st(i)", 0xDD, 5, flags: fpuCompare),
      x87Register("fcmovb", 0xDA, 0, flags: FlagEffect(reads: F.all, ccWrites: CC.c1, ccUndefined: CC.c023)),
      x87Register("fcmove", 0xDA, 1, flags: FlagEffect(reads: F.all, ccWrites: CC.c1, ccUndefined: CC.c023)),
      x87Register("fcmovbe", 0xDA, 2, flags: FlagEffect(reads: F.all, ccWrites: CC.c1, ccUndefined: CC.c023)),
      x87Register("fcmovu", 0xDA, 3, flags: FlagEffect(reads: F.all, ccWrites: CC.c1, ccUndefined: CC.c023)),
      x87Register("fcmovnb", 0xDB, 0, flags: FlagEffect(reads: F.all, ccWrites: CC.c1, ccUndefined: CC.c023)),
      x87Register("fcmovne", 0xDB, 1, flags: FlagEffect(reads: F.all, ccWrites: CC.c1, ccUndefined: CC.c023)),
      x87Register("fcmovnbe", 0xDB, 2, flags: FlagEffect(reads: F.all, ccWrites: CC.c1, ccUndefined: CC.c023)),
      x87Register("fcmovnu", 0xDB, 3, flags: FlagEffect(reads: F.all, ccWrites: CC.c1, ccUndefined: CC.c023)),
      x87Register("fucomi st, st(i)", 0xDB, 5, flags: FlagEffect(writes: F.all, ccWrites: CC.c1, ccUndefined: 0)),
      x87Register("fcomi st, st(i)", 0xDB, 6, flags: FlagEffect(writes: F.all, ccWrites: CC.c1, ccUndefined: 0)),
      x87Register("fucomip st, st(i)", 0xDF, 5, flags: FlagEffect(writes: F.all, ccWrites: CC.c1, ccUndefined: 0)),
      x87Register("fcomip st, st(i)", 0xDF, 6, flags: FlagEffect(writes: F.all, ccWrites: CC.c1, ccUndefined: 0)),
      x87Fixed("fcompp", [0xDE, 0xD9], flags: fpuCompare),
      x87Fixed("fucompp", [0xDA, 0xE9], flags: fpuCompare),
      x87Fixed("fnop", [0xD9, 0xD0], flags: fpuAllUndefined),
      x87Fixed("fchs", [0xD9, 0xE0]),
      x87Fixed("fabs", [0xD9, 0xE1]),
      x87Fixed("ftst", [0xD9, 0xE4], flags: fpuCompare),
      x87Fixed("fxam", [0xD9, 0xE5], flags: fpuCompare),
      x87Fixed("fld1", [0xD9, 0xE8]),
      x87Fixed("fldl2t", [0xD9, 0xE9]),
      x87Fixed("fldl2e", [0xD9, 0xEA]),
      x87Fixed("fldpi", [0xD9, 0xEB]),
      x87Fixed("fldlg2", [0xD9, 0xEC]),
      x87Fixed("fldln2", [0xD9, 0xED]),
      x87Fixed("fldz", [0xD9, 0xEE]),
      x87Fixed("f2xm1", [0xD9, 0xF0]),
      x87Fixed("fyl2x", [0xD9, 0xF1]),
      x87Fixed("fptan", [0xD9, 0xF2], flags: FlagEffect(ccWrites: CC.c1 | CC.c2, ccUndefined: CC.c0 | CC.c3)),
      x87Fixed("fpatan", [0xD9, 0xF3]),
      x87Fixed("fxtract", [0xD9, 0xF4]),
      x87Fixed("fprem1", [0xD9, 0xF5], flags: fpuCompare),
      x87Fixed("fdecstp", [0xD9, 0xF6]),
      x87Fixed("fincstp", [0xD9, 0xF7]),
      x87Fixed("fprem", [0xD9, 0xF8], flags: fpuCompare),
      x87Fixed("fyl2xp1", [0xD9, 0xF9]),
      x87Fixed("fsqrt", [0xD9, 0xFA]),
      x87Fixed("fsincos", [0xD9, 0xFB], flags: FlagEffect(ccWrites: CC.c1 | CC.c2, ccUndefined: CC.c0 | CC.c3)),
      x87Fixed("frndint", [0xD9, 0xFC]),
      x87Fixed("fscale", [0xD9, 0xFD]),
      x87Fixed("fsin", [0xD9, 0xFE], flags: FlagEffect(ccWrites: CC.c1 | CC.c2, ccUndefined: CC.c0 | CC.c3)),
      x87Fixed("fcos", [0xD9, 0xFF], flags: FlagEffect(ccWrites: CC.c1 | CC.c2, ccUndefined: CC.c0 | CC.c3)),
      x87Fixed("fnclex", [0xDB, 0xE2], flags: fpuAllUndefined),
      x87Fixed("fninit", [0xDB, 0xE3], flags: fpuCompare),
      x87Fixed("fnstsw ax", [0xDF, 0xE0], flags: FlagEffect(ccReads: CC.all)),
    ]
    return forms
  }
}
