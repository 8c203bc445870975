// The x86 instruction decoder: the one place where bytes become `Instruction`s.
//
// Decode rules (for everyone reading `Instruction`, in particular the SIMD/FPU units):
// - Legacy prefixes may come in any order and number (up to the 15-byte limit). The last
//   F2/F3 wins; the last segment override wins; in 64-bit mode ES/CS/SS/DS overrides are
//   ignored (only FS/GS change `segment`). A REX prefix (64-bit mode only) counts only when it
//   immediately precedes the opcode; a legacy prefix after it discards it. Of several REX
//   prefixes the last one counts.
// - More than 15 bytes raises #GP(0). A fetch from unmapped memory raises #PF at the first
//   byte that is needed (so an instruction that ends before a page boundary never touches
//   the next page). EVEX (62) and every other opcode invalid in 64-bit mode raise #UD. LOCK on an instruction that does not allow it, or with a register
//   destination, raises #UD. Decode faults surface when the instruction would execute.
// - `.sse`: opcode = map << 8 | byte (map 1 = 0F, 2 = 0F 38, 3 = 0F 3A). Classified as SSE:
//   0F 10-17, 0F 28-2F, 0F 50-7F (0F 77 EMMS has no ModRM), 0F C2, 0F C4-C6, 0F D0-FF,
//   every 0F 38 xx except MOVBE (0F 38 F0/F1 without F2; with F2 it is CRC32 = .sse),
//   every 0F 3A xx, and 0F AE /0-/3 with a memory operand (FXSAVE, FXRSTOR, LDMXCSR,
//   STMXCSR). `mandatoryPrefix`: the last F2/F3 if any (3 = F2, 2 = F3), else 1 when 66 is
//   present, else 0. `operandSize` is 8 with REX.W, else 2 only when 66 is present and is not
//   the mandatory prefix, else 4. ModRM is always decoded (`reg` with REX.R, `rm` with
//   REX.B, memory operand in base/index/scale/displacement/segment). An imm8 follows for
//   0F 70-73, 0F C2, 0F C4, 0F C5, 0F C6 and all of 0F 3A; it is in `immediate`,
//   zero-extended. `reg` and `rm` never use the AH..BH numbering for SSE instructions.
// - `.vex`: VEX-encoded (C4 three-byte, C5 two-byte prefix; outside 64-bit mode only when the
//   next byte has ModRM.mod = 11, else LES/LDS, and never in real or virtual-8086 mode).
//   LOCK, 66, F2, F3 or REX before VEX, or a map other than 0F/0F 38/0F 3A, raise #UD.
//   opcode = map << 8 | byte, `mandatoryPrefix` = VEX.pp, `rexW` = VEX.W, `vexRegister` =
//   VEX.vvvv (0-7 outside 64-bit mode, where VEX.R/X/B are ignored), `vexL` = VEX.L.
//   `operandSize` is 8 with VEX.W in 64-bit mode, else 4. ModRM always, except 0F 77
//   (VZEROUPPER/VZEROALL); an imm8 for all of 0F 3A and for 0F 70-73, C2, C4-C6.
// - `.x87`: opcode = escape byte D8-DF, `modrm` raw, memory operand decoded when mod != 3.
// - Core ops: see Op.swift for operand conventions. Register operands of byte-sized
//   operations without any REX prefix use 16-19 for AH, CH, DH, BH.
// - Operand size: 1 for byte forms; 8 with REX.W; in 64-bit mode near branches, PUSH/POP,
//   CALL/JMP r/m, ENTER/LEAVE, PUSHF/POPF default to 8 (66h selects 2, as AMD does for
//   branches too); otherwise 4, or 2 with 66h. Address size: 8, or 4 with 67h.

/// Bytes of the instruction stream being decoded; tracks which physical pages were read.
struct CodeFetch {
  /// Linear address of the page `host` maps.
  var pageLinear: UInt64 = .max
  var host: UnsafeMutableRawPointer? = nil
  /// Physical page numbers the instructions came from (the second for a page-crossing block).
  var firstPhysicalPage: UInt64 = .max
  var secondPhysicalPage: UInt64 = .max
}

extension CPU {
  /// Reads one instruction byte at linear `address`.
  @inline(__always)
  func fetchCodeByte(_ address: UInt64, _ fetch: inout CodeFetch) throws(Fault) -> UInt8 {
    if address & ~0xFFF != fetch.pageLinear {
      try mapCodePage(address, &fetch)
    }
    return fetch.host.unsafelyUnwrapped.load(fromByteOffset: Int(address & 0xFFF), as: UInt8.self)
  }

  @inline(never)
  func mapCodePage(_ address: UInt64, _ fetch: inout CodeFetch) throws(Fault) {
    let physical = try translate(address, access: .execute)
    guard let host = ramPointer(physical & ~0xFFF) else {
      // Executing from MMIO or unbacked memory is not supported: report a page fault.
      throw .pageFault(pageFaultErrorCode(access: .execute), address: address)
    }
    let page = physical >> 12
    if fetch.firstPhysicalPage == .max {
      fetch.firstPhysicalPage = page
    } else if page != fetch.firstPhysicalPage {
      fetch.secondPhysicalPage = page
    }
    fetch.pageLinear = address & ~0xFFF
    fetch.host = host
  }

  /// Decodes the instruction at linear `start` for the current code size.
  func decodeInstruction(at start: UInt64, _ fetch: inout CodeFetch) throws(Fault) -> Instruction {
    var ins = Instruction()
    var count = 0
    let is64 = codeSize == 8
    let defaultSize: UInt8 = codeSize == 2 ? 2 : 4

    @inline(__always) func next() throws(Fault) -> UInt8 {
      if count >= 15 { throw .generalProtection(0) }
      let byte = try fetchCodeByte(start &+ UInt64(count), &fetch)
      count += 1
      return byte
    }
    @inline(__always) func nextWord() throws(Fault) -> UInt64 {
      let low = UInt64(try next())
      return low | UInt64(try next()) << 8
    }
    @inline(__always) func nextDword() throws(Fault) -> UInt64 {
      let low = try nextWord()
      return low | (try nextWord()) << 16
    }

    // Prefixes.
    var operandPrefix = false
    var addressPrefix = false
    var lock = false
    var repeatPrefix: UInt8 = 0
    var segmentOverride: UInt8 = 0xFF
    var rex: UInt8 = 0
    var rexPresent = false
    var byte = try next()
    prefixes: while true {
      switch byte {
      case 0x66: operandPrefix = true
      case 0x67: addressPrefix = true
      case 0xF0: lock = true
      case 0xF2, 0xF3: repeatPrefix = byte
      case 0x26, 0x2E, 0x36, 0x3E:
        if !is64 { segmentOverride = (byte >> 3) & 3 }
      case 0x64: segmentOverride = SegmentIndex.fs
      case 0x65: segmentOverride = SegmentIndex.gs
      case 0x40...0x4F where is64:
        rex = byte
        rexPresent = true
        byte = try next()
        continue prefixes
      default: break prefixes
      }
      rex = 0
      rexPresent = false
      byte = try next()
    }
    // VEX (C4 three-byte, C5 two-byte form). Outside 64-bit mode C4/C5 are LES/LDS unless the
    // next byte has ModRM.mod = 11 (never valid for LES/LDS), and always in real and virtual-8086 mode.
    var isVEX = false
    var vexMap: UInt8 = 1
    if byte == 0xC4 || byte == 0xC5 {
      if is64 {
        isVEX = true
      } else if isProtectedMode && storedFlags & RFlags.vm == 0 {
        let following = try next()
        count -= 1
        isVEX = following >> 6 == 3
      }
    }
    if isVEX {
      // LOCK, 66, F2, F3 or REX before VEX: #UD.
      if lock || operandPrefix || repeatPrefix != 0 || rexPresent { throw .invalidOpcode }
      let first = try next()
      var vex: UInt8 = 0x40
      var vexByte = first  // holds W, vvvv, L, pp
      if byte == 0xC4 {
        vex |= ((~first >> 7) & 1) << 2 | ((~first >> 6) & 1) << 1 | ((~first >> 5) & 1)
        vexMap = first & 0x1F
        vexByte = try next()
        if vexByte & 0x80 != 0 { vex |= 8 }
      } else {
        vex |= ((~first >> 7) & 1) << 2
        vexByte = first & 0x7F
      }
      guard vexMap >= 1 && vexMap <= 3 else { throw .invalidOpcode }
      if !is64 { vex &= 0x48 }  // VEX.R, X and B are 0 outside 64-bit mode (the bits are 1 there)
      rex = vex
      ins.rexW = vex & 8 != 0
      ins.vexRegister = (~vexByte >> 3) & (is64 ? 15 : 7)
      ins.vexL = vexByte & 4 != 0
      ins.mandatoryPrefix = vexByte & 3
      byte = try next()
    }
    let rexW = rex & 8 != 0
    if !isVEX {
      ins.rexW = rexW
      ins.mandatoryPrefix = repeatPrefix == 0xF2 ? 3 : repeatPrefix == 0xF3 ? 2 : operandPrefix ? 1 : 0
    }
    let rexR = (rex >> 2) & 1
    let rexX = (rex >> 1) & 1
    let rexB = rex & 1
    var flags: UInt8 = 0
    if lock { flags |= Instruction.Prefix.lock }
    if repeatPrefix == 0xF3 { flags |= Instruction.Prefix.rep }
    if repeatPrefix == 0xF2 { flags |= Instruction.Prefix.repne }
    if operandPrefix { flags |= Instruction.Prefix.operandSize }
    if addressPrefix { flags |= Instruction.Prefix.addressSize }
    if rexPresent { flags |= Instruction.Prefix.rex }
    if segmentOverride != 0xFF { flags |= Instruction.Prefix.segmentOverride }
    ins.prefixes = flags

    // Opcode.
    var entry: OpcodeEntry
    if isVEX {
      ins.opcode = UInt16(vexMap) << 8 | UInt16(byte)
      entry = vexEntry(map: vexMap, byte: byte)
    } else if byte == 0x0F {
      let second = try next()
      if second == 0x38 {
        let third = try next()
        ins.opcode = 0x200 | UInt16(third)
        if third == 0xF0 || third == 0xF1, repeatPrefix != 0xF2 {
          if repeatPrefix == 0xF3 { throw .invalidOpcode }
          entry = OpcodeEntry(op: third == 0xF0 ? .movbeLoad : .movbeStore, hasModRM: true)
        } else {
          entry = OpcodeEntry(op: .sse, hasModRM: true, simd: true)
        }
      } else if second == 0x3A {
        ins.opcode = 0x300 | UInt16(try next())
        entry = OpcodeEntry(op: .sse, immediate: .byte, hasModRM: true, simd: true)
      } else {
        ins.opcode = 0x100 | UInt16(second)
        entry = twoByteOpcodes[Int(second)]
      }
    } else {
      ins.opcode = UInt16(byte)
      entry = oneByteOpcodes[Int(byte)]
    }
    if is64 && entry.invalidIn64 { throw .invalidOpcode }

    let addressSize: UInt8 = is64 ? (addressPrefix ? 4 : 8) : (addressPrefix ? 6 - codeSize : codeSize)
    ins.addressSize = addressSize
    ins.segment = segmentOverride != 0xFF ? segmentOverride : SegmentIndex.ds

    // ModRM and memory operand.
    var regField: UInt8 = 0
    var mod: UInt8 = 3
    if entry.hasModRM {
      let modrm = try next()
      ins.modrm = modrm
      mod = modrm >> 6
      regField = (modrm >> 3) & 7
      ins.reg = regField | rexR << 3
      let rmField = modrm & 7
      if mod == 3 {
        ins.rm = rmField | rexB << 3
      } else {
        ins.hasMemoryOperand = true
        var defaultSegment = SegmentIndex.ds
        if addressSize == 2 {
          let bases: (UInt8, UInt8) =
            switch rmField {
            case 0: (3, 6)
            case 1: (3, 7)
            case 2: (5, 6)
            case 3: (5, 7)
            case 4: (6, Instruction.noRegister)
            case 5: (7, Instruction.noRegister)
            case 6: (5, Instruction.noRegister)
            default: (3, Instruction.noRegister)
            }
          ins.base = bases.0
          ins.index = bases.1
          if rmField == 6 && mod == 0 {
            ins.base = Instruction.noRegister
            ins.displacement = Int64(Int16(bitPattern: UInt16(try nextWord())))
          } else {
            if ins.base == 5 { defaultSegment = SegmentIndex.ss }
            if mod == 1 {
              ins.displacement = Int64(Int8(bitPattern: try next()))
            } else if mod == 2 {
              ins.displacement = Int64(Int16(bitPattern: UInt16(try nextWord())))
            }
          }
        } else {
          var baseField = rmField
          if rmField == 4 {
            let sib = try next()
            ins.scaleShift = sib >> 6
            let indexRegister = (sib >> 3) & 7 | rexX << 3
            ins.index = indexRegister == 4 ? Instruction.noRegister : indexRegister
            baseField = sib & 7
            if baseField == 5 && mod == 0 {
              ins.base = Instruction.noRegister
              ins.displacement = Int64(Int32(bitPattern: UInt32(try nextDword())))
            } else {
              ins.base = baseField | rexB << 3
            }
          } else if rmField == 5 && mod == 0 {
            ins.base = is64 ? Instruction.ripRelative : Instruction.noRegister
            ins.displacement = Int64(Int32(bitPattern: UInt32(try nextDword())))
          } else {
            ins.base = rmField | rexB << 3
          }
          if ins.base == 4 || ins.base == 5 { defaultSegment = SegmentIndex.ss }
          if mod == 1 {
            ins.displacement = Int64(Int8(bitPattern: try next()))
          } else if mod == 2 {
            ins.displacement = Int64(Int32(bitPattern: UInt32(try nextDword())))
          }
        }
        if segmentOverride == 0xFF { ins.segment = defaultSegment }
      }
    } else if entry.registerInOpcode {
      ins.rm = UInt8(ins.opcode & 7) | rexB << 3
    }

    // Groups and opcode-specific rules.
    var op = entry.op
    var immediateKind = entry.immediate
    var defaultTo64 = entry.defaultTo64
    var requiresMemory = false
    let memory = mod != 3
    switch entry.group {
    case 0: break
    case DecoderGroup.arithmetic:
      op = [Op.addRmImm, .orRmImm, .adcRmImm, .sbbRmImm, .andRmImm, .subRmImm, .xorRmImm, .cmpRmImm][Int(regField)]
    case DecoderGroup.shift:
      op = [Op.rolRm, .rorRm, .rclRm, .rcrRm, .shlRm, .shrRm, .shlRm, .sarRm][Int(regField)]
      if byte == 0xD0 || byte == 0xD1 { ins.immediate = 1 }
    case DecoderGroup.unary:
      op = [Op.testRmImm, .testRmImm, .notRm, .negRm, .mulRm, .imulRm, .divRm, .idivRm][Int(regField)]
      if regField < 2 { immediateKind = entry.byteOperation ? .byte : .wordOrDword }
    case DecoderGroup.incDecByte:
      guard regField < 2 else { throw .invalidOpcode }
      op = regField == 0 ? .incRm : .decRm
    case DecoderGroup.incDecCallJmpPush:
      switch regField {
      case 0: op = .incRm
      case 1: op = .decRm
      case 2: op = .callRm; defaultTo64 = true
      case 3: op = .farCall; requiresMemory = true
      case 4: op = .jmpRm; defaultTo64 = true
      case 5: op = .farJmp; requiresMemory = true
      case 6: op = .pushRm; defaultTo64 = true
      default: throw .invalidOpcode
      }
    case DecoderGroup.pop:
      guard regField == 0 else { throw .invalidOpcode }
      op = .popRm
    case DecoderGroup.movImm:
      guard regField == 0 else { throw .invalidOpcode }
      op = .movRmImm
    case DecoderGroup.bitTestImm:
      guard regField >= 4 else { throw .invalidOpcode }
      op = [Op.btRmImm, .btsRmImm, .btrRmImm, .btcRmImm][Int(regField - 4)]
    case DecoderGroup.cmpxchgN:
      if !memory && regField == 7 && repeatPrefix == 0xF3 {
        op = .rdpid  // F3 0F C7 /7: RDPID r32/r64
      } else if memory && regField == 4 {
        guard repeatPrefix == 0, !operandPrefix else { throw .invalidOpcode }
        op = .xsavec  // 0F C7 /4 (XSAVES /5 and XRSTORS /3 are not offered)
      } else {
        guard regField == 1, memory else { throw .invalidOpcode }
        op = .cmpxchg8b16b
      }
    case DecoderGroup.fence:
      if memory {
        switch regField {
        case 0...3:
          // FXSAVE/FXRSTOR/LDMXCSR/STMXCSR take no 66/F2/F3 prefix.
          guard repeatPrefix == 0, !operandPrefix else { throw .invalidOpcode }
          op = .sse
          entry.simd = true
        case 4, 5:
          guard repeatPrefix == 0, !operandPrefix else { throw .invalidOpcode }
          op = regField == 4 ? .xsave : .xrstor
        case 6:
          // 66 0F AE /6: CLWB; without 66: XSAVEOPT.
          guard repeatPrefix == 0 else { throw .invalidOpcode }
          op = operandPrefix ? .clflush : .xsaveopt
        case 7:
          // CLFLUSH; with 66, CLFLUSHOPT.
          guard repeatPrefix == 0 else { throw .invalidOpcode }
          op = .clflush
        default: throw .invalidOpcode
        }
      } else {
        guard regField >= 5, repeatPrefix == 0, !operandPrefix else { throw .invalidOpcode }
        op = .fence
      }
    case DecoderGroup.system00:
      guard regField < 6 else { throw .invalidOpcode }
      op = [Op.sldt, .str, .lldt, .ltr, .verr, .verw][Int(regField)]
    case DecoderGroup.system01:
      if memory {
        switch regField {
        case 0: op = .sgdt
        case 1: op = .sidt
        case 2: op = .lgdt
        case 3: op = .lidt
        case 4: op = .smsw
        case 6: op = .lmsw
        case 7: op = .invlpg
        default: throw .invalidOpcode
        }
      } else {
        switch ins.modrm {
        case 0xF8 where is64: op = .swapgs
        case 0xF9: op = .rdtscp
        case 0xD0, 0xD1:
          guard repeatPrefix == 0, !operandPrefix else { throw .invalidOpcode }
          op = ins.modrm == 0xD0 ? .xgetbv : .xsetbv
        default:
          if regField == 4 {
            op = .smsw
          } else if regField == 6 {
            op = .lmsw
          } else {
            throw .invalidOpcode
          }
        }
      }
    default: throw .invalidOpcode
    }

    switch isVEX ? 0xFFFF : ins.opcode {
    case 0x90 where rexB == 0:
      op = repeatPrefix == 0xF3 ? .pause : .nop
    case 0x8C, 0x8E:
      // Segment register number: REX.R does not extend it.
      guard regField < 6, !(ins.opcode == 0x8E && regField == SegmentIndex.cs) else { throw .invalidOpcode }
      ins.reg = regField
    case 0x10B:  // UD2
      throw .invalidOpcode
    case 0x1B8:  // POPCNT needs F3 (0F B8 alone is JMPE)
      guard repeatPrefix == 0xF3 else { throw .invalidOpcode }
    case 0x1BC:
      if repeatPrefix == 0xF3 { op = .tzcnt }
    case 0x1BD:
      if repeatPrefix == 0xF3 { op = .lzcnt }
    case 0x8D, 0x10D:  // LEA; PREFETCH/PREFETCHW
      requiresMemory = true
    case 0x1C3:  // MOVNTI: memory only, no 66/F2/F3
      guard repeatPrefix == 0, !operandPrefix else { throw .invalidOpcode }
      requiresMemory = true
    case 0x177:  // EMMS takes no 66/F2/F3
      guard repeatPrefix == 0, !operandPrefix else { throw .invalidOpcode }
    case 0x2F0, 0x2F1:
      if op != .sse { requiresMemory = true }
    case 0x120, 0x121, 0x122, 0x123:
      // MOV to/from control and debug registers: always register operands, 64-bit in long mode.
      ins.hasMemoryOperand = false
      ins.rm = (ins.modrm & 7) | rexB << 3
      // Only CR0, CR2, CR3, CR4, CR8 and DR0-DR7 exist; others are #UD (before any privilege check).
      if ins.opcode == 0x120 || ins.opcode == 0x122 {
        guard [0, 2, 3, 4, 8].contains(ins.reg) else { throw .invalidOpcode }
      } else {
        guard ins.reg < 8 else { throw .invalidOpcode }
      }
      if is64 { defaultTo64 = true }
    case 0x1A0, 0x1A1:
      // PUSH FS / POP FS.
      ins.reg = SegmentIndex.fs
    case 0x1A8, 0x1A9:
      // PUSH GS / POP GS.
      ins.reg = SegmentIndex.gs
    default: break
    }
    if requiresMemory && !ins.hasMemoryOperand { throw .invalidOpcode }
    if op == .invalid { throw .invalidOpcode }

    // Operand size.
    var operandSize: UInt8
    if isVEX {
      // VEX.W selects 64-bit general-register operands in 64-bit mode only.
      operandSize = rexW && is64 ? 8 : 4
    } else if entry.simd {
      operandSize = rexW ? 8 : (operandPrefix && ins.mandatoryPrefix != 1 ? 2 : 4)
      if op == .x87 { operandSize = operandPrefix ? 2 : 4 }
    } else if entry.byteOperation {
      operandSize = 1
    } else if rexW {
      operandSize = 8
    } else if defaultTo64 && is64 {
      operandSize = operandPrefix ? 2 : 8
    } else {
      operandSize = operandPrefix ? 6 - defaultSize : defaultSize
    }
    if ins.opcode >= 0x120 && ins.opcode <= 0x123 { operandSize = is64 ? 8 : 4 }
    ins.operandSize = operandSize

    // Byte registers AH..BH when no REX prefix is present.
    if !rexPresent && !entry.simd {
      if entry.byteOperation {
        if ins.reg >= 4 && ins.reg < 8 && entry.hasModRM && entry.group == 0 {
          ins.reg += Instruction.highByteBase - 4
        }
        if !ins.hasMemoryOperand && ins.rm >= 4 && ins.rm < 8 { ins.rm += Instruction.highByteBase - 4 }
      } else if entry.byteRm && !ins.hasMemoryOperand && ins.rm >= 4 && ins.rm < 8 {
        ins.rm += Instruction.highByteBase - 4
      }
    }

    // Immediate.
    let sizeMask: UInt64 = operandSize == 8 ? ~0 : (UInt64(1) << (UInt64(operandSize) * 8)) &- 1
    switch immediateKind {
    case .none: break
    case .byte: ins.immediate = UInt64(try next())
    case .byteSigned:
      ins.immediate = UInt64(bitPattern: Int64(Int8(bitPattern: try next()))) & sizeMask
    case .word: ins.immediate = try nextWord()
    case .wordOrDword:
      if operandSize == 2 {
        ins.immediate = try nextWord()
      } else {
        ins.immediate = UInt64(bitPattern: Int64(Int32(bitPattern: UInt32(try nextDword())))) & sizeMask
      }
    case .full:
      switch operandSize {
      case 2: ins.immediate = try nextWord()
      case 4: ins.immediate = try nextDword()
      default:
        let low = try nextDword()
        ins.immediate = low | (try nextDword()) << 32
      }
    case .relative8:
      ins.immediate = UInt64(bitPattern: Int64(Int8(bitPattern: try next())))
    case .relative:
      if operandSize == 2 {
        ins.immediate = UInt64(bitPattern: Int64(Int16(bitPattern: UInt16(try nextWord()))))
      } else {
        ins.immediate = UInt64(bitPattern: Int64(Int32(bitPattern: UInt32(try nextDword()))))
      }
    case .memoryOffset:
      var offset: UInt64
      switch addressSize {
      case 2: offset = try nextWord()
      case 4: offset = try nextDword()
      default:
        offset = try nextDword()
        offset |= (try nextDword()) << 32
      }
      ins.hasMemoryOperand = true
      ins.base = Instruction.noRegister
      ins.index = Instruction.noRegister
      ins.displacement = Int64(bitPattern: offset)
      ins.reg = 0
      ins.rm = 0
    case .enter:
      ins.immediate = try nextWord()
      ins.immediate2 = UInt16(try next())
    case .farPointer:
      ins.immediate = operandSize == 2 ? try nextWord() : try nextDword()
      ins.immediate2 = UInt16(try nextWord())
    }

    // LOCK is valid only on read-modify-write instructions with a memory destination.
    if lock && (!ins.hasMemoryOperand || !op.allowsLock) { throw .invalidOpcode }

    // The no-prefix forms of the MMX opcodes run on MMX registers: told apart here, once per
    // decoded instruction, instead of on every execution of an SSE instruction.
    if op == .sse && ins.mandatoryPrefix == 0 && isMMXForm(ins.opcode & 0x3FF) { op = .mmx }
    ins.op = op
    ins.length = UInt8(count)
    return ins
  }
}

/// Decoder attributes of a VEX-encoded opcode: ModRM everywhere except VZEROUPPER/VZEROALL
/// (0F 77); an imm8 for all of map 0F 3A and for 0F 70-73, C2, C4-C6.
@inline(__always)
func vexEntry(map: UInt8, byte: UInt8) -> OpcodeEntry {
  var entry = OpcodeEntry(op: .vex, hasModRM: true, simd: true)
  switch map {
  case 1:
    switch byte {
    case 0x77: entry.hasModRM = false
    case 0x70...0x73, 0xC2, 0xC4...0xC6: entry.immediate = .byte
    default: break
    }
  case 3: entry.immediate = .byte
  default: break
  }
  return entry
}

extension Op {
  /// Whether a LOCK prefix is allowed (with a memory destination).
  var allowsLock: Bool {
    switch self {
    case .addRmReg, .addRmImm, .orRmReg, .orRmImm, .adcRmReg, .adcRmImm, .sbbRmReg, .sbbRmImm,
      .andRmReg, .andRmImm, .subRmReg, .subRmImm, .xorRmReg, .xorRmImm,
      .incRm, .decRm, .negRm, .notRm, .btsRmReg, .btrRmReg, .btcRmReg, .btsRmImm, .btrRmImm, .btcRmImm,
      .xchgRmReg, .cmpxchg, .cmpxchg8b16b, .xadd:
      return true
    default: return false
    }
  }

  /// Whether the instruction ends a decoded block: control transfers, mode or interrupt-state
  /// changes, and instructions that stop the run loop.
  var endsBlock: Bool {
    switch self {
    case .jmpRel, .jmpRm, .callRel, .callRm, .ret, .retImm, .loop, .loope, .loopne, .jrcxz,
      .farCall, .farJmp, .retFar, .iret, .syscall, .sysret, .sysenter, .sysexit,
      .int3, .intN, .into, .int1, .hlt, .invalid, .tooLong, .legacyOnly,
      .popf, .sti, .cli, .movSegRm, .popSeg, .movToCR, .movToDR, .wrmsr, .lgdt, .lidt, .lldt, .ltr, .lmsw,
      .invlpg, .swapgs, .clts, .pause, .rdmsr:
      return true
    default: return false
    }
  }
}

extension CPU {
  /// Decodes the instruction at linear `address` without executing it (tests, debuggers).
  /// `codeSize` (2, 4 or 8) overrides the current code size for this decode only.
  public func decode(at address: UInt64, codeSize overrideSize: UInt8? = nil) -> Result<Instruction, Fault> {
    let savedSize = codeSize
    if let overrideSize { codeSize = overrideSize }
    defer { codeSize = savedSize }
    var fetch = CodeFetch()
    do {
      return .success(try decodeInstruction(at: address, &fetch))
    } catch {
      return .failure(error)
    }
  }
}
