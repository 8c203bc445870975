// Fast forms: the most frequent integer instructions, specialized when their block is decoded.
//
// `Instruction.selectFastForm(codeSize:)` looks at a decoded instruction once, at block-build
// time, and picks a `FastOp` whose operand size and operand kinds (register, immediate, memory)
// are fixed, with the destination and source registers resolved into `fastDst` / `fastSrc`.
// `CPU.executeFast` runs those forms straight from the decoded slot, without copying the
// `Instruction`, without the size switches of `readRegister` / `writeRegister`, and inlined into
// the run loop; everything else (and every instruction whose fast form is `.none`) goes to the
// generic `execute`. Each fast form computes exactly what the generic handler computes,
// including the lazy-flag record (see Flags.swift); the differential tests check both paths
// against the host CPU.
//
// Register forms are 32- or 64-bit only (no high-byte registers, no merging); memory forms go
// through the TLB fast paths (`load64`, `store32`, ...), which fall back to the slow paths.
// LOCK-prefixed instructions are never fast (their read-modify-write goes through `modifyRm`).

import CShim

/// A specialized execution form (see above). Names: R register, I immediate, M memory;
/// destination first; the suffix is the operand size in bits.
enum FastOp: UInt8 {
  case none
  case nop
  // Register, register.
  case movRR64, movRR32
  case addRR64, addRR32, subRR64, subRR32, andRR64, andRR32, orRR64, orRR32, xorRR64, xorRR32
  case adcRR64, adcRR32, sbbRR64, sbbRR32
  case cmpRR64, cmpRR32, testRR64, testRR32
  // Register, immediate (immediate already sign-extended and truncated by the decoder).
  case movRI64, movRI32
  case addRI64, addRI32, subRI64, subRI32, andRI64, andRI32, orRI64, orRI32, xorRI64, xorRI32
  case cmpRI64, cmpRI32, testRI64, testRI32
  case shlRI64, shlRI32, shrRI64, shrRI32, sarRI64, sarRI32, adcRI64, adcRI32, sbbRI64, sbbRI32
  // Shifts by CL.
  case shlRC64, shlRC32, shrRC64, shrRC32, sarRC64, sarRC32
  // Byte operands (registers 0-15 only: no AH..BH).
  case testRR8, testRI8, cmpRI8, cmpRM8, loadRM8, storeMR8, storeMI8, storeMR16
  // Register, one operand.
  case incR64, incR32, decR64, decR32, negR64, negR32, notR64, notR32
  // Extensions, multiply, conditional moves and sets (register sources).
  case movzxByteRR, movzxWordRR, movsxByteRR64, movsxByteRR32, movsxWordRR64, movsxWordRR32, movsxdRR
  case imulRR64, imulRR32, imulRRI64, imulRRI32
  case cmovRR64, cmovRR32, setccR
  // Address computation.
  case lea64, lea32
  // Memory operands.
  case loadRM64, loadRM32, storeMR64, storeMR32, storeMI64, storeMI32
  case movzxByteRM, movzxWordRM, movsxdRM
  case addRM64, addRM32, subRM64, subRM32, andRM64, andRM32, orRM64, orRM32, xorRM64, xorRM32
  case cmpRM64, cmpRM32, cmpMR64, cmpMR32, cmpMI64, cmpMI32, cmpMI8, testMI8, testMR64, testMR32
  case adcRM64, sbbRM64, addMR64, subMR64, adcMR64, sbbMR64
  // MUL r/m64 (RDX:RAX = RAX * source).
  case mulR64, mulM64
  // Control transfer and the stack (64-bit operand size, and 32-bit for 32-bit code).
  case jcc, jmpRel, push64, pop64, callRel64, ret64, push32, pop32, callRel32, ret32
}

extension Instruction {
  /// Chooses `fast`, `fastDst` and `fastSrc` for this decoded instruction (see FastPath.swift).
  mutating func selectFastForm() {
    fast = .none
    if prefixes & Instruction.Prefix.lock != 0 { return }
    let size = operandSize
    let wide = size == 8
    let isRegister = !hasMemoryOperand
    @inline(__always) func pick(_ form64: FastOp, _ form32: FastOp) -> FastOp {
      wide ? form64 : form32
    }
    // Register-register ALU with destination `dst` and source `src`.
    @inline(__always) func registerForm(_ form64: FastOp, _ form32: FastOp, dst: UInt8, src: UInt8) {
      guard size >= 4, isRegister else { return }
      fast = pick(form64, form32)
      fastDst = dst
      fastSrc = src
    }
    // ALU `reg op= [mem]` with a 32/64-bit operand.
    @inline(__always) func loadForm(_ form64: FastOp, _ form32: FastOp) {
      guard size >= 4, hasMemoryOperand else { return }
      fast = pick(form64, form32)
      fastDst = reg
    }
    // Read-modify-write `[mem] op= reg` with a 64-bit operand.
    @inline(__always) func storeForm(_ form64: FastOp) {
      guard wide, hasMemoryOperand else { return }
      fast = form64
      fastSrc = reg
    }
    switch op {
    case .nop:
      fast = .nop
    case .movRmReg:
      if isRegister {
        registerForm(.movRR64, .movRR32, dst: rm, src: reg)
      } else if size >= 4 {
        fast = pick(.storeMR64, .storeMR32)
        fastSrc = reg
      } else if reg < 16 {
        fast = size == 2 ? .storeMR16 : .storeMR8
        fastSrc = reg
      }
    case .movRegRm:
      if isRegister {
        registerForm(.movRR64, .movRR32, dst: reg, src: rm)
      } else if size == 1 {
        guard reg < 16 else { return }
        fast = .loadRM8
        fastDst = reg
      } else {
        loadForm(.loadRM64, .loadRM32)
      }
    case .movRmImm:
      if size == 1 && !isRegister {
        fast = .storeMI8
        return
      }
      guard size >= 4 else { return }
      if isRegister {
        fast = pick(.movRI64, .movRI32)
        fastDst = rm
      } else {
        fast = pick(.storeMI64, .storeMI32)
      }
    case .addRmReg:
      if isRegister { registerForm(.addRR64, .addRR32, dst: rm, src: reg) } else { storeForm(.addMR64) }
    case .addRegRm:
      if isRegister { registerForm(.addRR64, .addRR32, dst: reg, src: rm) } else { loadForm(.addRM64, .addRM32) }
    case .subRmReg:
      if isRegister { registerForm(.subRR64, .subRR32, dst: rm, src: reg) } else { storeForm(.subMR64) }
    case .subRegRm:
      if isRegister { registerForm(.subRR64, .subRR32, dst: reg, src: rm) } else { loadForm(.subRM64, .subRM32) }
    case .andRmReg: registerForm(.andRR64, .andRR32, dst: rm, src: reg)
    case .andRegRm:
      if isRegister { registerForm(.andRR64, .andRR32, dst: reg, src: rm) } else { loadForm(.andRM64, .andRM32) }
    case .orRmReg: registerForm(.orRR64, .orRR32, dst: rm, src: reg)
    case .orRegRm:
      if isRegister { registerForm(.orRR64, .orRR32, dst: reg, src: rm) } else { loadForm(.orRM64, .orRM32) }
    case .xorRmReg: registerForm(.xorRR64, .xorRR32, dst: rm, src: reg)
    case .xorRegRm:
      if isRegister { registerForm(.xorRR64, .xorRR32, dst: reg, src: rm) } else { loadForm(.xorRM64, .xorRM32) }
    case .adcRmReg:
      if isRegister { registerForm(.adcRR64, .adcRR32, dst: rm, src: reg) } else { storeForm(.adcMR64) }
    case .adcRegRm:
      if isRegister {
        registerForm(.adcRR64, .adcRR32, dst: reg, src: rm)
      } else if wide {
        fast = .adcRM64
        fastDst = reg
      }
    case .sbbRmReg:
      if isRegister { registerForm(.sbbRR64, .sbbRR32, dst: rm, src: reg) } else { storeForm(.sbbMR64) }
    case .sbbRegRm:
      if isRegister {
        registerForm(.sbbRR64, .sbbRR32, dst: reg, src: rm)
      } else if wide {
        fast = .sbbRM64
        fastDst = reg
      }
    case .mulRm:
      guard wide else { return }
      if isRegister {
        fast = .mulR64
        fastSrc = rm
      } else {
        fast = .mulM64
      }
    case .cmpRmReg:
      if isRegister {
        registerForm(.cmpRR64, .cmpRR32, dst: rm, src: reg)
      } else if size >= 4 {
        fast = pick(.cmpMR64, .cmpMR32)
        fastSrc = reg
      }
    case .cmpRegRm:
      if isRegister {
        registerForm(.cmpRR64, .cmpRR32, dst: reg, src: rm)
      } else if size == 1 {
        guard reg < 16 else { return }
        fast = .cmpRM8
        fastDst = reg
      } else {
        loadForm(.cmpRM64, .cmpRM32)
      }
    case .testRmReg:
      if isRegister && size == 1 {
        guard reg < 16, rm < 16 else { return }
        fast = .testRR8
        fastDst = rm
        fastSrc = reg
      } else if isRegister {
        registerForm(.testRR64, .testRR32, dst: rm, src: reg)
      } else if size >= 4 {
        fast = pick(.testMR64, .testMR32)
        fastSrc = reg
      }
    case .addRmImm, .subRmImm, .andRmImm, .orRmImm, .xorRmImm, .cmpRmImm, .testRmImm, .adcRmImm, .sbbRmImm:
      if isRegister && size == 1 {
        guard rm < 16, op == .cmpRmImm || op == .testRmImm else { return }
        fast = op == .cmpRmImm ? .cmpRI8 : .testRI8
        fastDst = rm
      } else if isRegister {
        guard size >= 4 else { return }
        fastDst = rm
        switch op {
        case .adcRmImm: fast = pick(.adcRI64, .adcRI32)
        case .sbbRmImm: fast = pick(.sbbRI64, .sbbRI32)
        case .addRmImm: fast = pick(.addRI64, .addRI32)
        case .subRmImm: fast = pick(.subRI64, .subRI32)
        case .andRmImm: fast = pick(.andRI64, .andRI32)
        case .orRmImm: fast = pick(.orRI64, .orRI32)
        case .xorRmImm: fast = pick(.xorRI64, .xorRI32)
        case .cmpRmImm: fast = pick(.cmpRI64, .cmpRI32)
        default: fast = pick(.testRI64, .testRI32)
        }
      } else if op == .cmpRmImm {
        if size >= 4 {
          fast = pick(.cmpMI64, .cmpMI32)
        } else if size == 1 {
          fast = .cmpMI8
        }
      } else if op == .testRmImm && size == 1 {
        fast = .testMI8
      }
    case .shlRm, .shrRm, .sarRm:
      guard size >= 4, isRegister else { return }
      if opcode == 0xD3 {
        fastDst = rm
        switch op {
        case .shlRm: fast = pick(.shlRC64, .shlRC32)
        case .shrRm: fast = pick(.shrRC64, .shrRC32)
        default: fast = pick(.sarRC64, .sarRC32)
        }
        return
      }
      // Immediate counts (C1/D1): register destination, masked count not 0.
      guard opcode != 0xD2 else { return }
      let count = immediate & (wide ? 0x3F : 0x1F)
      guard count != 0 else { return }
      immediate = count
      fastDst = rm
      switch op {
      case .shlRm: fast = pick(.shlRI64, .shlRI32)
      case .shrRm: fast = pick(.shrRI64, .shrRI32)
      default: fast = pick(.sarRI64, .sarRI32)
      }
    case .incRm: registerForm(.incR64, .incR32, dst: rm, src: rm)
    case .decRm: registerForm(.decR64, .decR32, dst: rm, src: rm)
    case .negRm: registerForm(.negR64, .negR32, dst: rm, src: rm)
    case .notRm: registerForm(.notR64, .notR32, dst: rm, src: rm)
    case .movzxByte, .movzxWord:
      guard size >= 4 else { return }
      if isRegister {
        guard rm < 16 else { return }
        fast = op == .movzxByte ? .movzxByteRR : .movzxWordRR
        fastDst = reg
        fastSrc = rm
      } else {
        fast = op == .movzxByte ? .movzxByteRM : .movzxWordRM
        fastDst = reg
      }
    case .movsxByte, .movsxWord:
      guard size >= 4, isRegister, rm < 16 else { return }
      fast = op == .movsxByte ? pick(.movsxByteRR64, .movsxByteRR32) : pick(.movsxWordRR64, .movsxWordRR32)
      fastDst = reg
      fastSrc = rm
    case .movsxd:
      guard wide else { return }
      if isRegister {
        fast = .movsxdRR
        fastDst = reg
        fastSrc = rm
      } else {
        fast = .movsxdRM
        fastDst = reg
      }
    case .imulRegRm: registerForm(.imulRR64, .imulRR32, dst: reg, src: rm)
    case .imulRegRmImm: registerForm(.imulRRI64, .imulRRI32, dst: reg, src: rm)
    case .cmovcc: registerForm(.cmovRR64, .cmovRR32, dst: reg, src: rm)
    case .setcc:
      guard isRegister, rm < 16 else { return }
      fast = .setccR
      fastDst = rm
    case .lea:
      guard size >= 4 else { return }
      fast = pick(.lea64, .lea32)
      fastDst = reg
    case .jcc: fast = .jcc
    case .jmpRel: fast = .jmpRel
    case .pushRm:
      guard size >= 4, isRegister else { return }
      fast = pick(.push64, .push32)
      fastSrc = rm
    case .popRm:
      guard size >= 4, isRegister else { return }
      fast = pick(.pop64, .pop32)
      fastDst = rm
    case .callRel:
      if size >= 4 { fast = pick(.callRel64, .callRel32) }
    case .ret:
      if size >= 4 { fast = pick(.ret64, .ret32) }
    default:
      break
    }
  }
}

extension CPU {
  /// Effective address (what LEA computes) of the memory operand of the instruction in `slot`.
  @_transparent
  func fastEffectiveAddress(_ slot: UnsafeMutablePointer<Instruction>) -> UInt64 {
    var offset = UInt64(bitPattern: slot.pointee.displacement)
    let base = slot.pointee.base
    if base < 16 {
      offset &+= gpr[Int(base)]
    } else if base == Instruction.ripRelative {
      offset &+= rip
    }
    let index = slot.pointee.index
    if index != Instruction.noRegister {
      offset &+= gpr[Int(index)] << UInt64(slot.pointee.scaleShift)
    }
    let addressSize = slot.pointee.addressSize
    if addressSize != 8 {
      offset &= addressSize == 4 ? 0xFFFF_FFFF : 0xFFFF
    }
    return offset
  }

  /// Linear address of the memory operand of the instruction in `slot`.
  @_transparent
  func fastAddress(_ slot: UnsafeMutablePointer<Instruction>) -> UInt64 {
    segmentBase[Int(slot.pointee.segment)] &+ fastEffectiveAddress(slot)
  }

  /// Executes the instruction in `slot` (`rip` already points past it): its fast form, or the
  /// generic handler.
  @_transparent
  func executeFast(_ slot: UnsafeMutablePointer<Instruction>) throws(Fault) {
    let dst = Int(slot.pointee.fastDst)
    let src = Int(slot.pointee.fastSrc)
    let low32: UInt64 = 0xFFFF_FFFF
    switch slot.pointee.fast {
    case .none: try execute(slot)
    case .nop: break

    case .movRR64: gpr[dst] = gpr[src]
    case .movRR32: gpr[dst] = gpr[src] & low32
    case .movRI64: gpr[dst] = slot.pointee.immediate
    case .movRI32: gpr[dst] = slot.pointee.immediate & low32

    case .addRR64: add64(dst, gpr[src])
    case .addRR32: add32(dst, gpr[src] & low32)
    case .addRI64: add64(dst, slot.pointee.immediate)
    case .addRI32: add32(dst, slot.pointee.immediate)
    case .subRR64: sub64(dst, gpr[src], write: true)
    case .subRR32: sub32(dst, gpr[src] & low32, write: true)
    case .subRI64: sub64(dst, slot.pointee.immediate, write: true)
    case .subRI32: sub32(dst, slot.pointee.immediate, write: true)
    case .cmpRR64: sub64(dst, gpr[src], write: false)
    case .cmpRR32: sub32(dst, gpr[src] & low32, write: false)
    case .cmpRI64: sub64(dst, slot.pointee.immediate, write: false)
    case .cmpRI32: sub32(dst, slot.pointee.immediate, write: false)
    case .andRR64: logic64(dst, gpr[dst] & gpr[src], gpr[src], write: true)
    case .andRR32: logic32(dst, gpr[dst] & gpr[src] & low32, gpr[src] & low32, write: true)
    case .andRI64: logic64(dst, gpr[dst] & slot.pointee.immediate, slot.pointee.immediate, write: true)
    case .andRI32:
      logic32(dst, gpr[dst] & slot.pointee.immediate & low32, slot.pointee.immediate, write: true)
    case .orRR64: logic64(dst, gpr[dst] | gpr[src], gpr[src], write: true)
    case .orRR32: logic32(dst, (gpr[dst] | gpr[src]) & low32, gpr[src] & low32, write: true)
    case .orRI64: logic64(dst, gpr[dst] | slot.pointee.immediate, slot.pointee.immediate, write: true)
    case .orRI32: logic32(dst, (gpr[dst] | slot.pointee.immediate) & low32, slot.pointee.immediate, write: true)
    case .xorRR64: logic64(dst, gpr[dst] ^ gpr[src], gpr[src], write: true)
    case .xorRR32: logic32(dst, (gpr[dst] ^ gpr[src]) & low32, gpr[src] & low32, write: true)
    case .xorRI64: logic64(dst, gpr[dst] ^ slot.pointee.immediate, slot.pointee.immediate, write: true)
    case .xorRI32:
      logic32(dst, (gpr[dst] ^ slot.pointee.immediate) & low32, slot.pointee.immediate, write: true)
    case .testRR64: logic64(dst, gpr[dst] & gpr[src], gpr[src], write: false)
    case .testRR32: logic32(dst, gpr[dst] & gpr[src] & low32, gpr[src] & low32, write: false)
    case .testRI64: logic64(dst, gpr[dst] & slot.pointee.immediate, slot.pointee.immediate, write: false)
    case .testRI32:
      logic32(dst, gpr[dst] & slot.pointee.immediate & low32, slot.pointee.immediate, write: false)
    case .adcRR64, .adcRR32, .sbbRR64, .sbbRR32:
      let size: UInt8 = slot.pointee.fast == .adcRR64 || slot.pointee.fast == .sbbRR64 ? 8 : 4
      let mask = sizeMask(size)
      let carry: UInt64 = carryFlag ? 1 : 0
      let left = gpr[dst] & mask
      let right = gpr[src] & mask
      let isAdd = slot.pointee.fast == .adcRR64 || slot.pointee.fast == .adcRR32
      let result = isAdd ? (left &+ right &+ carry) & mask : (left &- right &- carry) & mask
      gpr[dst] = result
      recordFlags(isAdd ? .adc : .sbb, size: size, dst: left, src: right, result: result)
      flagCarry = carry

    case .shlRI64:
      let old = gpr[dst]
      let count = slot.pointee.immediate
      let result = old << count
      gpr[dst] = result
      recordFlags(.shl, size: 8, dst: old, src: count, result: result)
    case .shlRI32:
      let old = gpr[dst] & low32
      let count = slot.pointee.immediate
      let result = (old << count) & low32
      gpr[dst] = result
      recordFlags(.shl, size: 4, dst: old, src: count, result: result)
    case .shrRI64:
      let old = gpr[dst]
      let count = slot.pointee.immediate
      let result = old >> count
      gpr[dst] = result
      recordFlags(.shr, size: 8, dst: old, src: count, result: result)
    case .shrRI32:
      let old = gpr[dst] & low32
      let count = slot.pointee.immediate
      let result = old >> count
      gpr[dst] = result
      recordFlags(.shr, size: 4, dst: old, src: count, result: result)
    case .sarRI64:
      let old = gpr[dst]
      let count = slot.pointee.immediate
      let result = UInt64(bitPattern: Int64(bitPattern: old) >> Int64(count))
      gpr[dst] = result
      recordFlags(.sar, size: 8, dst: old, src: count, result: result)
    case .sarRI32:
      let old = gpr[dst] & low32
      let count = slot.pointee.immediate
      let result = UInt64(UInt32(bitPattern: Int32(truncatingIfNeeded: old) >> Int32(count)))
      gpr[dst] = result
      recordFlags(.sar, size: 4, dst: old, src: count, result: result)

    case .adcRI64, .adcRI32:
      let size: UInt8 = slot.pointee.fast == .adcRI64 ? 8 : 4
      let mask = sizeMask(size)
      let carry: UInt64 = carryFlag ? 1 : 0
      let left = gpr[dst] & mask
      let right = slot.pointee.immediate
      let result = (left &+ right &+ carry) & mask
      gpr[dst] = result
      recordFlags(.adc, size: size, dst: left, src: right, result: result)
      flagCarry = carry
    case .sbbRI64, .sbbRI32:
      let size: UInt8 = slot.pointee.fast == .sbbRI64 ? 8 : 4
      let mask = sizeMask(size)
      let carry: UInt64 = carryFlag ? 1 : 0
      let left = gpr[dst] & mask
      let right = slot.pointee.immediate
      let result = (left &- right &- carry) & mask
      gpr[dst] = result
      recordFlags(.sbb, size: size, dst: left, src: right, result: result)
      flagCarry = carry

    case .shlRC64, .shlRC32, .shrRC64, .shrRC32, .sarRC64, .sarRC32:
      let form = slot.pointee.fast
      let wide = form == .shlRC64 || form == .shrRC64 || form == .sarRC64
      let size: UInt8 = wide ? 8 : 4
      let mask = sizeMask(size)
      let count = gpr[1] & (wide ? 0x3F : 0x1F)
      let old = gpr[dst] & mask
      if count == 0 {
        // Flags and value unchanged; a 32-bit destination is still written (upper half cleared).
        gpr[dst] = old
        break
      }
      let result: UInt64
      switch form {
      case .shlRC64, .shlRC32:
        result = (old << count) & mask
        recordFlags(.shl, size: size, dst: old, src: count, result: result)
      case .shrRC64, .shrRC32:
        result = old >> count
        recordFlags(.shr, size: size, dst: old, src: count, result: result)
      default:
        result = UInt64(bitPattern: signExtend(old, size: size) >> Int64(count)) & mask
        recordFlags(.sar, size: size, dst: old, src: count, result: result)
      }
      gpr[dst] = result

    case .negR64, .negR32:
      let size: UInt8 = slot.pointee.fast == .negR64 ? 8 : 4
      let mask = sizeMask(size)
      let old = gpr[dst] & mask
      let result = (0 &- old) & mask
      gpr[dst] = result
      recordFlags(.sub, size: size, dst: 0, src: old, result: result)
    case .notR64: gpr[dst] = ~gpr[dst]
    case .notR32: gpr[dst] = ~gpr[dst] & low32

    case .testRR8:
      let left = gpr[dst] & 0xFF
      let right = gpr[src] & 0xFF
      recordFlags(.logic, size: 1, dst: left, src: right, result: left & right)
    case .testRI8:
      let left = gpr[dst] & 0xFF
      let right = slot.pointee.immediate
      recordFlags(.logic, size: 1, dst: left, src: right, result: left & right)
    case .cmpRI8:
      let left = gpr[dst] & 0xFF
      let right = slot.pointee.immediate
      recordFlags(.sub, size: 1, dst: left, src: right, result: (left &- right) & 0xFF)
    case .cmpRM8:
      let right = UInt64(try load8(fastAddress(slot)))
      let left = gpr[dst] & 0xFF
      recordFlags(.sub, size: 1, dst: left, src: right, result: (left &- right) & 0xFF)
    case .loadRM8:
      let value = UInt64(try load8(fastAddress(slot)))
      gpr[dst] = (gpr[dst] & ~0xFF) | value
    case .storeMR8: try store8(fastAddress(slot), UInt8(truncatingIfNeeded: gpr[src]))
    case .storeMR16: try store16(fastAddress(slot), UInt16(truncatingIfNeeded: gpr[src]))
    case .storeMI8: try store8(fastAddress(slot), UInt8(truncatingIfNeeded: slot.pointee.immediate))

    case .incR64, .incR32, .decR64, .decR32:
      let form = slot.pointee.fast
      let size: UInt8 = form == .incR64 || form == .decR64 ? 8 : 4
      let mask = sizeMask(size)
      let carry: UInt64 = flagOp == .inc || flagOp == .dec ? flagCarry : (carryFlag ? 1 : 0)
      let old = gpr[dst] & mask
      let increment = form == .incR64 || form == .incR32
      let result = increment ? (old &+ 1) & mask : (old &- 1) & mask
      gpr[dst] = result
      recordFlags(increment ? .inc : .dec, size: size, dst: old, src: 1, result: result)
      flagCarry = carry

    case .movzxByteRR: gpr[dst] = gpr[src] & 0xFF
    case .movzxWordRR: gpr[dst] = gpr[src] & 0xFFFF
    case .movsxByteRR64: gpr[dst] = UInt64(bitPattern: Int64(Int8(truncatingIfNeeded: gpr[src])))
    case .movsxByteRR32: gpr[dst] = UInt64(UInt32(bitPattern: Int32(Int8(truncatingIfNeeded: gpr[src]))))
    case .movsxWordRR64: gpr[dst] = UInt64(bitPattern: Int64(Int16(truncatingIfNeeded: gpr[src])))
    case .movsxWordRR32: gpr[dst] = UInt64(UInt32(bitPattern: Int32(Int16(truncatingIfNeeded: gpr[src]))))
    case .movsxdRR: gpr[dst] = UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: gpr[src])))

    case .imulRR64: multiply64(dst, gpr[src], gpr[dst])
    case .imulRRI64: multiply64(dst, gpr[src], slot.pointee.immediate)
    case .imulRR32: multiply32(dst, gpr[src], gpr[dst])
    case .imulRRI32: multiply32(dst, gpr[src], slot.pointee.immediate)

    case .cmovRR64:
      if condition(UInt8(truncatingIfNeeded: slot.pointee.opcode & 0xF)) { gpr[dst] = gpr[src] }
    case .cmovRR32:
      if condition(UInt8(truncatingIfNeeded: slot.pointee.opcode & 0xF)) {
        gpr[dst] = gpr[src] & low32
      } else {
        gpr[dst] &= low32
      }
    case .setccR:
      let value: UInt64 = condition(UInt8(truncatingIfNeeded: slot.pointee.opcode & 0xF)) ? 1 : 0
      gpr[dst] = (gpr[dst] & ~0xFF) | value

    case .lea64: gpr[dst] = fastEffectiveAddress(slot)
    case .lea32: gpr[dst] = fastEffectiveAddress(slot) & low32

    case .loadRM64: gpr[dst] = try load64(fastAddress(slot))
    case .loadRM32: gpr[dst] = UInt64(try load32(fastAddress(slot)))
    case .storeMR64: try store64(fastAddress(slot), gpr[src])
    case .storeMR32: try store32(fastAddress(slot), UInt32(truncatingIfNeeded: gpr[src]))
    case .storeMI64: try store64(fastAddress(slot), slot.pointee.immediate)
    case .storeMI32: try store32(fastAddress(slot), UInt32(truncatingIfNeeded: slot.pointee.immediate))
    case .movzxByteRM: gpr[dst] = UInt64(try load8(fastAddress(slot)))
    case .movzxWordRM: gpr[dst] = UInt64(try load16(fastAddress(slot)))
    case .movsxdRM: gpr[dst] = UInt64(bitPattern: Int64(Int32(bitPattern: try load32(fastAddress(slot)))))

    case .addRM64: add64(dst, try load64(fastAddress(slot)))
    case .addRM32: add32(dst, UInt64(try load32(fastAddress(slot))))
    case .subRM64: sub64(dst, try load64(fastAddress(slot)), write: true)
    case .subRM32: sub32(dst, UInt64(try load32(fastAddress(slot))), write: true)
    case .cmpRM64: sub64(dst, try load64(fastAddress(slot)), write: false)
    case .cmpRM32: sub32(dst, UInt64(try load32(fastAddress(slot))), write: false)
    case .andRM64:
      let value = try load64(fastAddress(slot))
      logic64(dst, gpr[dst] & value, value, write: true)
    case .andRM32:
      let value = UInt64(try load32(fastAddress(slot)))
      logic32(dst, gpr[dst] & value, value, write: true)
    case .orRM64:
      let value = try load64(fastAddress(slot))
      logic64(dst, gpr[dst] | value, value, write: true)
    case .orRM32:
      let value = UInt64(try load32(fastAddress(slot)))
      logic32(dst, (gpr[dst] | value) & low32, value, write: true)
    case .xorRM64:
      let value = try load64(fastAddress(slot))
      logic64(dst, gpr[dst] ^ value, value, write: true)
    case .xorRM32:
      let value = UInt64(try load32(fastAddress(slot)))
      logic32(dst, (gpr[dst] ^ value) & low32, value, write: true)
    case .cmpMR64:
      let left = try load64(fastAddress(slot))
      let right = gpr[src]
      recordFlags(.sub, size: 8, dst: left, src: right, result: left &- right)
    case .cmpMR32:
      let left = UInt64(try load32(fastAddress(slot)))
      let right = gpr[src] & low32
      recordFlags(.sub, size: 4, dst: left, src: right, result: (left &- right) & low32)
    case .cmpMI64:
      let left = try load64(fastAddress(slot))
      let right = slot.pointee.immediate
      recordFlags(.sub, size: 8, dst: left, src: right, result: left &- right)
    case .cmpMI32:
      let left = UInt64(try load32(fastAddress(slot)))
      let right = slot.pointee.immediate
      recordFlags(.sub, size: 4, dst: left, src: right, result: (left &- right) & low32)
    case .cmpMI8:
      let left = UInt64(try load8(fastAddress(slot)))
      let right = slot.pointee.immediate
      recordFlags(.sub, size: 1, dst: left, src: right, result: (left &- right) & 0xFF)
    case .testMI8:
      let left = UInt64(try load8(fastAddress(slot)))
      let right = slot.pointee.immediate
      recordFlags(.logic, size: 1, dst: left, src: right, result: left & right)
    case .testMR64:
      let left = try load64(fastAddress(slot))
      let right = gpr[src]
      recordFlags(.logic, size: 8, dst: left, src: right, result: left & right)
    case .testMR32:
      let left = UInt64(try load32(fastAddress(slot)))
      let right = gpr[src] & low32
      recordFlags(.logic, size: 4, dst: left, src: right, result: left & right)
    case .adcRM64:
      let right = try load64(fastAddress(slot))
      let carry: UInt64 = carryFlag ? 1 : 0
      let left = gpr[dst]
      let result = left &+ right &+ carry
      gpr[dst] = result
      recordFlags(.adc, size: 8, dst: left, src: right, result: result)
      flagCarry = carry
    case .sbbRM64:
      let right = try load64(fastAddress(slot))
      let carry: UInt64 = carryFlag ? 1 : 0
      let left = gpr[dst]
      let result = left &- right &- carry
      gpr[dst] = result
      recordFlags(.sbb, size: 8, dst: left, src: right, result: result)
      flagCarry = carry
    case .addMR64:
      let right = gpr[src]
      let left = try modify64(slot) { $0 &+ right }
      recordFlags(.add, size: 8, dst: left, src: right, result: left &+ right)
    case .subMR64:
      let right = gpr[src]
      let left = try modify64(slot) { $0 &- right }
      recordFlags(.sub, size: 8, dst: left, src: right, result: left &- right)
    case .adcMR64:
      let right = gpr[src]
      let carry: UInt64 = carryFlag ? 1 : 0
      let left = try modify64(slot) { $0 &+ right &+ carry }
      recordFlags(.adc, size: 8, dst: left, src: right, result: left &+ right &+ carry)
      flagCarry = carry
    case .sbbMR64:
      let right = gpr[src]
      let carry: UInt64 = carryFlag ? 1 : 0
      let left = try modify64(slot) { $0 &- right &- carry }
      recordFlags(.sbb, size: 8, dst: left, src: right, result: left &- right &- carry)
      flagCarry = carry
    case .mulR64: multiplyUnsigned64(gpr[src])
    case .mulM64: multiplyUnsigned64(try load64(fastAddress(slot)))

    case .jcc:
      // Jcc does not end its block (Decoder.swift `endsBlock`): a taken branch stops it here.
      if condition(UInt8(truncatingIfNeeded: slot.pointee.opcode & 0xF)) {
        rip = try branchTarget(rip &+ slot.pointee.immediate, size: slot.pointee.operandSize)
        blockInvalidated = true
      }
    case .jmpRel:
      rip = try branchTarget(rip &+ slot.pointee.immediate, size: slot.pointee.operandSize)
    case .push64:
      try push(gpr[src], size: 8)
    case .pop64:
      let value = try readMemory(segmentBase[2] &+ stackPointer, size: 8)
      adjustStack(8)
      gpr[dst] = value
    case .callRel64:
      let target = try branchTarget(rip &+ slot.pointee.immediate, size: 8)
      try push(rip, size: 8)
      rip = target
    case .ret64:
      let target = try branchTarget(try readMemory(segmentBase[2] &+ stackPointer, size: 8), size: 8)
      adjustStack(8)
      rip = target
    case .push32:
      try push(gpr[src], size: 4)
    case .pop32:
      let value = try readMemory(segmentBase[2] &+ stackPointer, size: 4)
      adjustStack(4)
      gpr[dst] = value
    case .callRel32:
      let target = (rip &+ slot.pointee.immediate) & low32
      try push(rip, size: 4)
      rip = target
    case .ret32:
      let target = try readMemory(segmentBase[2] &+ stackPointer, size: 4)
      adjustStack(4)
      rip = target
    }
  }

  // MARK: Helpers of the fast forms (operands already truncated to the operand size)

  @_transparent
  func add64(_ dst: Int, _ right: UInt64) {
    let left = gpr[dst]
    let result = left &+ right
    gpr[dst] = result
    recordFlags(.add, size: 8, dst: left, src: right, result: result)
  }

  @_transparent
  func add32(_ dst: Int, _ right: UInt64) {
    let left = gpr[dst] & 0xFFFF_FFFF
    let result = (left &+ right) & 0xFFFF_FFFF
    gpr[dst] = result
    recordFlags(.add, size: 4, dst: left, src: right, result: result)
  }

  @_transparent
  func sub64(_ dst: Int, _ right: UInt64, write: Bool) {
    let left = gpr[dst]
    let result = left &- right
    if write { gpr[dst] = result }
    recordFlags(.sub, size: 8, dst: left, src: right, result: result)
  }

  @_transparent
  func sub32(_ dst: Int, _ right: UInt64, write: Bool) {
    let left = gpr[dst] & 0xFFFF_FFFF
    let result = (left &- right) & 0xFFFF_FFFF
    if write { gpr[dst] = result }
    recordFlags(.sub, size: 4, dst: left, src: right, result: result)
  }

  /// AND/OR/XOR/TEST: `result` is already computed (and truncated); `right` is the source.
  @_transparent
  func logic64(_ dst: Int, _ result: UInt64, _ right: UInt64, write: Bool) {
    let left = gpr[dst]
    if write { gpr[dst] = result }
    recordFlags(.logic, size: 8, dst: left, src: right, result: result)
  }

  @_transparent
  func logic32(_ dst: Int, _ result: UInt64, _ right: UInt64, write: Bool) {
    let left = gpr[dst] & 0xFFFF_FFFF
    if write { gpr[dst] = result }
    recordFlags(.logic, size: 4, dst: left, src: right, result: result)
  }

  /// IMUL r64, r/m64 (, imm): `gpr[dst] = source * other`, flags as `multiplySigned`.
  @_transparent
  func multiply64(_ dst: Int, _ source: UInt64, _ other: UInt64) {
    var high: Int64 = 0
    let low = hv_imul64(Int64(bitPattern: source), Int64(bitPattern: other), &high)
    gpr[dst] = low
    recordMultiplyFlags(low: low, size: 8, overflow: Int64(bitPattern: low) >> 63 != high)
  }

  /// MUL r/m64: RDX:RAX = RAX * `source`, flags as `multiplyAccumulator`.
  @_transparent
  func multiplyUnsigned64(_ source: UInt64) {
    var high: UInt64 = 0
    let low = hv_mul64(gpr[0], source, &high)
    gpr[0] = low
    gpr[2] = high
    recordMultiplyFlags(low: low, size: 8, overflow: high != 0)
  }

  /// Read-modify-write of the 64-bit memory operand of the instruction in `slot` (not LOCK):
  /// stores `compute(old)` and returns the old value (as `modifyRm`).
  @_transparent
  func modify64(_ slot: UnsafeMutablePointer<Instruction>, _ compute: (UInt64) -> UInt64) throws(Fault) -> UInt64 {
    let address = fastAddress(slot)
    if let host = try modifyHost(address, 8) {
      let old = hv_load64(host)
      hv_store64(host, compute(old))
      return old
    }
    let old = try readMemory(address, size: 8)
    try writeMemory(address, size: 8, compute(old))
    return old
  }

  /// IMUL r32, r/m32 (, imm).
  @_transparent
  func multiply32(_ dst: Int, _ source: UInt64, _ other: UInt64) {
    let full = Int64(Int32(truncatingIfNeeded: source)) &* Int64(Int32(truncatingIfNeeded: other))
    let low = UInt64(bitPattern: full) & 0xFFFF_FFFF
    gpr[dst] = low
    recordMultiplyFlags(low: low, size: 4, overflow: Int64(Int32(truncatingIfNeeded: low)) != full)
  }
}
