import SoftCPU

// Turns a list of instruction forms into one differential test case: machine code, initial
// state, initial data buffer and the comparison mask (undefined flags tracked through the
// sequence, including across forward branches).

/// One generated differential case.
struct DiffCase {
  var code: [UInt8]
  var initial: MachineState
  var data: [UInt8]
  var mask: ComparisonMask
  /// Names of the forms in the sequence, in order.
  var forms: [String]
  /// Offset of each main instruction in `code` and its form.
  var instructionStarts: [(offset: Int, form: String)]
  /// Comparison mask for a run that faults at each main instruction.
  var faultMasks: [ComparisonMask]
  /// Comparison mask for a run that traps right after each main instruction (INT3, INTO).
  var trapMasks: [ComparisonMask]

  /// The comparison mask for a run that ended at `rip` with a fault (or the final mask).
  func mask(faultAt rip: UInt64?) -> ComparisonMask {
    guard let rip else { return mask }
    for (index, start) in instructionStarts.enumerated() where DiffLayout.codeBase + UInt64(start.offset) == rip {
      return faultMasks[index]
    }
    return mask
  }

  /// The comparison mask for a trap (vector 1, 3 or 4) reported with RIP after the instruction.
  func mask(trapBefore rip: UInt64) -> ComparisonMask {
    let index = instructionStarts.lastIndex { DiffLayout.codeBase + UInt64($0.offset) < rip }
    guard let index else { return mask }
    return trapMasks[index]
  }

  /// The form whose instruction starts at `rip`, if any.
  func form(at rip: UInt64) -> String? {
    instructionStarts.first { DiffLayout.codeBase + UInt64($0.offset) == rip }?.form
  }
}

struct SequenceBuilder {
  var rng: DiffRNG
  var code: [UInt8] = []
  var data: [UInt8]
  let groupCount: Int
  var groupOffsets: [Int] = []
  /// Relative branch displacements to patch: position, size, next-instruction offset, target group.
  var branchPatches: [(at: Int, size: Int, next: Int, target: Int)] = []
  /// Absolute 32-bit addresses of group starts to patch (PUSH imm32 before RET).
  var addressPatches: [(at: Int, target: Int)] = []
  var undefinedFlags: UInt64 = 0
  /// Data-buffer offsets left out of the comparison (`ComparisonMask.dataIgnored`).
  var dataIgnored: [Int] = []
  var undefinedCC: UInt16 = 0
  /// Undefined-flag state arriving at a group by a branch.
  var joins: [Int: (UInt64, UInt16)] = [:]
  var x87Tolerance: Double? = nil
  /// A branch displacement did not fit: the case must be regenerated.
  var failed = false
  /// Offset of each main instruction (after its preludes) and its form name.
  var instructionStarts: [(offset: Int, form: String)] = []
  /// Undefined flags / condition codes just before each main instruction (for faults).
  var undefinedBefore: [(flags: UInt64, cc: UInt16)] = []
  /// Undefined flags / condition codes right after each main instruction (for traps).
  var undefinedAfter: [(flags: UInt64, cc: UInt16)] = []
  /// Registers memory operands must not use (they are set for the instruction itself).
  var reservedRegisters: [UInt8] = []
  /// An x87 instruction or XRSTOR ran: the x87 instruction and data pointers may differ between
  /// an Intel host and the AMD model (AMD saves them only with an exception pending).
  var x87PointersSet = false

  init(rng: DiffRNG, groupCount: Int, data: [UInt8]) {
    self.rng = rng
    self.groupCount = groupCount
    self.data = data
  }

  // MARK: Groups and patches

  mutating func beginGroup(_ index: Int) {
    groupOffsets.append(code.count)
    if let join = joins[index] {
      undefinedFlags |= join.0
      undefinedCC |= join.1
    }
  }

  mutating func finish() -> [UInt8]? {
    groupOffsets.append(code.count)  // group `groupCount` = end of sequence
    if let join = joins[groupCount] {
      undefinedFlags |= join.0
      undefinedCC |= join.1
    }
    for patch in branchPatches {
      let distance = groupOffsets[patch.target] - patch.next
      if patch.size == 1 {
        guard distance <= 127 else { return nil }
        code[patch.at] = UInt8(truncatingIfNeeded: distance)
      } else {
        for byte in 0..<4 { code[patch.at + byte] = UInt8(truncatingIfNeeded: distance >> (8 * byte)) }
      }
    }
    for patch in addressPatches {
      let address = DiffLayout.codeBase + UInt64(groupOffsets[patch.target])
      for byte in 0..<4 { code[patch.at + byte] = UInt8(truncatingIfNeeded: address >> UInt64(8 * byte)) }
    }
    return failed ? nil : code
  }

  // MARK: Small helpers

  mutating func emit(_ bytes: [UInt8]) { code += bytes }

  mutating func emitLittleEndian(_ value: UInt64, bytes: Int) {
    for byte in 0..<bytes { code.append(UInt8(truncatingIfNeeded: value >> UInt64(8 * byte))) }
  }

  /// MOV r64, imm64.
  mutating func emitMoveImmediate(_ register: UInt8, _ value: UInt64) {
    emit([0x48 | (register >> 3), 0xB8 + (register & 7)])
    emitLittleEndian(value, bytes: 8)
  }

  /// CMP r64, r64 with random registers: defines all six status flags.
  mutating func emitFlagDefiner() {
    let a = UInt8(rng.below(16))
    let b = UInt8(rng.below(16))
    emit([0x48 | (a >> 3) << 2 | (b >> 3), 0x39, 0xC0 | (a & 7) << 3 | (b & 7)])
    undefinedFlags = 0
  }

  /// A random address inside the data buffer for an operand of `bytes` bytes.
  mutating func dataAddress(bytes: Int, alignment: Int) -> UInt64 {
    var offset = 0x100 + rng.below(0xEE00)
    if alignment > 1 {
      offset &= ~(alignment - 1)
      if rng.chance(4) { offset += 1 + rng.below(alignment - 1) }
    }
    return DiffLayout.dataBase + UInt64(offset)
  }

  mutating func fillMemory(at address: UInt64, bytes: Int, kind: MemoryFill) {
    let offset = Int(address - DiffLayout.dataBase)
    func store(_ value: UInt64, _ count: Int, at position: Int) {
      for byte in 0..<count where position + byte < data.count {
        data[position + byte] = UInt8(truncatingIfNeeded: value >> UInt64(8 * byte))
      }
    }
    guard rng.chance(85) else { return }
    switch kind {
    case .random: return
    case .float32:
      for lane in stride(from: 0, to: max(bytes, 4), by: 4) {
        store(UInt64(DiffValues.float32(&rng)), 4, at: offset + lane)
      }
    case .float64:
      for lane in stride(from: 0, to: max(bytes, 8), by: 8) { store(DiffValues.float64(&rng), 8, at: offset + lane) }
    case .float80:
      let value = DiffValues.x87(&rng)
      store(value.significand, 8, at: offset)
      store(UInt64(value.signExponent), 2, at: offset + 8)
    case .int16: store(DiffValues.integer(&rng), 2, at: offset)
    case .int32: store(DiffValues.integer(&rng), 4, at: offset)
    case .int64: store(DiffValues.integer(&rng), 8, at: offset)
    }
  }

  /// An XRSTOR source area: random legacy region with a mostly valid MXCSR, a header that is
  /// mostly valid for the form (components within x87/SSE/AVX), random AVX state.
  mutating func fillXSAVEArea(at address: UInt64, compacted: Bool) {
    let offset = Int(address - DiffLayout.dataBase)
    func store(_ value: UInt64, _ count: Int, at position: Int) {
      for byte in 0..<count where offset + position + byte < data.count {
        data[offset + position + byte] = UInt8(truncatingIfNeeded: value >> UInt64(8 * byte))
      }
    }
    var mxcsr = UInt64(0x1F80) ^ UInt64(rng.below(0x10000)) & 0xE07F
    mxcsr &= ~UInt64(HostModel.mxcsrMaskDifference)
    // Always valid: with a reserved MXCSR bit the host may load some components before its #GP
    // (SSETests checks the #GP).
    store(mxcsr, 4, at: 24)
    let format = UInt64(rng.below(8))
    var stateMask = compacted ? format & UInt64(rng.below(8)) : UInt64(rng.below(8))
    if rng.chance(4) { stateMask |= 1 << UInt64(10 + rng.below(54)) }
    store(stateMask, 8, at: 512)
    store(compacted ? 1 << 63 | format : 0, 8, at: 520)
    for position in stride(from: 528, to: 576, by: 8) { store(0, 8, at: position) }
    if rng.chance(4) { store(rng.next() | 1, 8, at: 520 + 8 * rng.below(compacted ? 7 : 2)) }
  }

  // MARK: Memory operands

  /// The bytes after the opcode for a memory operand, and what the instruction needs around them.
  struct MemoryEncoding {
    var mod: UInt8
    var rm: UInt8
    var sib: UInt8?
    var displacement: Int64
    var displacementBytes: Int
    var rexX = false
    var rexB = false
    var addressSize32 = false
    /// For RIP-relative: the absolute target, patched once the instruction length is known.
    var ripTarget: UInt64?
  }

  /// Chooses an addressing mode for `address` and emits the preludes that set its registers.
  mutating func memoryOperand(address: UInt64, lowRegistersOnly: Bool) -> MemoryEncoding {
    let registerBound = lowRegistersOnly ? 8 : 16
    func pickRegister(_ rng: inout DiffRNG) -> UInt8 {
      while true {
        let register = UInt8(rng.below(registerBound))
        if register != 4 && !reservedRegisters.contains(register) { return register }
      }
    }
    let mode = rng.below(lowRegistersOnly ? 6 : 8)
    let addressSize32 = rng.chance(15) && mode != 4
    var encoding = MemoryEncoding(mod: 0, rm: 0, sib: nil, displacement: 0, displacementBytes: 0)
    encoding.addressSize32 = addressSize32
    let garbage: UInt64 = addressSize32 ? rng.next() << 32 : 0
    switch mode {
    case 4:
      // RIP-relative.
      encoding.mod = 0
      encoding.rm = 5
      encoding.displacementBytes = 4
      encoding.ripTarget = address
    case 5:
      // Absolute [disp32] through a SIB without base and index.
      encoding.mod = 0
      encoding.rm = 4
      encoding.sib = 0x25
      encoding.displacement = Int64(address)
      encoding.displacementBytes = 4
    case 6, 7:
      // Base + index * scale + displacement (mode 7 without a base).
      let index = pickRegister(&rng)
      let scale = UInt8(rng.below(4))
      let indexValue = UInt64(bitPattern: Int64(rng.below(129) - 64))
      var displacement: Int64 = 0
      if mode == 7 {
        displacement = Int64(address) - Int64(bitPattern: indexValue << UInt64(scale))
        encoding.mod = 0
        encoding.sib = scale << 6 | (index & 7) << 3 | 5
        encoding.displacementBytes = 4
        encoding.rexX = index >= 8
      } else {
        var base = pickRegister(&rng)
        if base == index && rng.chance(70) { base = base == 0 ? 1 : (base == 5 ? 3 : base - 1) }
        let dispChoice = rng.below(3)
        if dispChoice == 1 { displacement = Int64(rng.below(256) - 128) }
        if dispChoice == 2 { displacement = Int64(rng.below(0x2000) - 0x1000) }
        if dispChoice == 0 && base & 7 == 5 { displacement = 0 }
        encoding.mod = dispChoice == 0 ? (base & 7 == 5 ? 1 : 0) : UInt8(dispChoice)
        encoding.displacementBytes = encoding.mod == 1 ? 1 : (encoding.mod == 2 ? 4 : 0)
        encoding.sib = scale << 6 | (index & 7) << 3 | (base & 7)
        encoding.rexX = index >= 8
        encoding.rexB = base >= 8
        let baseValue: UInt64
        if base == index {
          // Same register as base and index: address = value * (1 + 2^scale) + displacement.
          let multiplier = UInt64(1) + (UInt64(1) << UInt64(scale))
          let wanted = address &- UInt64(bitPattern: displacement)
          let value = wanted / multiplier
          displacement += Int64(wanted - value * multiplier)
          if encoding.mod == 0 && displacement != 0 {
            encoding.mod = 2
            encoding.displacementBytes = 4
          }
          if encoding.mod == 1 && !(-128...127).contains(displacement) {
            encoding.mod = 2
            encoding.displacementBytes = 4
          }
          baseValue = value
          emitMoveImmediate(base, (addressSize32 ? baseValue & 0xFFFF_FFFF : baseValue) | garbage)
          encoding.displacement = displacement
          encoding.rm = 4
          return encoding
        }
        baseValue = address &- UInt64(bitPattern: displacement) &- (indexValue << UInt64(scale))
        emitMoveImmediate(base, (baseValue & (addressSize32 ? 0xFFFF_FFFF : ~0)) | garbage)
      }
      emitMoveImmediate(
        index, (indexValue & (addressSize32 ? 0xFFFF_FFFF : ~0)) | (addressSize32 ? rng.next() << 32 : 0))
      encoding.rm = 4
      encoding.displacement = displacement
    default:
      // Base (+ disp8 / disp32); R12/RSP-like bases need a SIB, RBP/R13 a displacement.
      let base = pickRegister(&rng)
      var mod = UInt8(min(mode, 2))
      if mod == 0 && base & 7 == 5 { mod = 1 }
      let displacement: Int64 =
        mod == 1 ? Int64(rng.below(256) - 128) : (mod == 2 ? Int64(rng.below(0x4000) - 0x2000) : 0)
      encoding.mod = mod
      encoding.displacementBytes = mod == 1 ? 1 : (mod == 2 ? 4 : 0)
      encoding.displacement = displacement
      encoding.rexB = base >= 8
      if base & 7 == 4 {
        encoding.rm = 4
        encoding.sib = 0x24  // no index, base = 100 (R12 with REX.B)
      } else {
        encoding.rm = base & 7
      }
      let baseValue = address &- UInt64(bitPattern: displacement)
      emitMoveImmediate(base, (baseValue & (addressSize32 ? 0xFFFF_FFFF : ~0)) | garbage)
    }
    return encoding
  }

  // MARK: Forms

  /// Emits one instance of `form` (with its preludes) as the current group's instruction.
  mutating func emit(form: InstructionForm, group: Int) {
    // Never let an instruction read an undefined flag or condition code.
    if form.flags.reads & undefinedFlags != 0 { emitFlagDefiner() }
    if form.flags.ccReads & undefinedCC != 0 {
      emit([0xD9, 0xE5])  // FXAM defines C0-C3 and raises nothing.
      undefinedCC = 0
    }
    if let tolerance = form.x87Tolerance { x87Tolerance = max(x87Tolerance ?? 0, tolerance) }

    let size = rng.pick(form.sizes)
    let usesByteRegisters =
      size == 1 && (form.regSpace == .gpr || form.rmSpace == .gpr)
    let legacyBytes = usesByteRegisters && rng.chance(40)
    let registerBound = legacyBytes ? 8 : 16

    func pickGPR(_ rng: inout DiffRNG, excludeRSP: Bool) -> UInt8 {
      while true {
        let register = UInt8(rng.below(registerBound))
        if register == 4 && excludeRSP && size >= 4 { continue }
        return register
      }
    }

    var prefixes: [UInt8] = []
    var rexW = size == 8
    var rexR = false
    var rexX = false
    var rexB = false
    var modrmBytes: [UInt8] = []
    var ripTarget: UInt64?
    var displacementBytes = 0
    var memoryAddress: UInt64?
    var hasLockableMemory = false
    var opcode = form.opcode

    switch form.special {
    case .divide where rng.chance(60):
      var isSigned = false
      if case .modrm(let ext, _) = form.encoding, ext == 7 { isSigned = true }
      if size == 1 {
        emit([0x30, 0xE4])  // xor ah, ah
        undefinedFlags = 0
      } else if isSigned && rng.chance(50) {
        emit(size == 8 ? [0x48, 0x99] : (size == 2 ? [0x66, 0x99] : [0x99]))  // cqo / cwd / cdq
      } else {
        emit([0x31, 0xD2])  // xor edx, edx
        undefinedFlags = 0
      }
    case .string:
      let source = DiffLayout.dataBase + 0x2000 + UInt64(rng.below(0xA000))
      let destination = DiffLayout.dataBase + 0x2000 + UInt64(rng.below(0xA000))
      emitMoveImmediate(6, source)
      emitMoveImmediate(7, destination)
      emitMoveImmediate(1, UInt64(rng.below(24)))
      if rng.chance(10) { prefixes.append(0x67) }
    case .xlat:
      emitMoveImmediate(3, DiffLayout.dataBase + 0x4000 + UInt64(rng.below(0x1000)))
    case .maskmov:
      emitMoveImmediate(7, dataAddress(bytes: 16, alignment: 1))
    case .xsaveArea:
      reservedRegisters = [0, 2]
    case .invalidXCRIndex:
      emitMoveImmediate(1, rng.next() << 32 | UInt64(2 + rng.below(rng.chance(50) ? 14 : 0x7FFF_FFFF)))
    case .framePointer:
      emitMoveImmediate(5, DiffLayout.dataBase + 0x6000 + UInt64(rng.below(0x1000) & ~7))
    case .popf:
      let flags = rng.next() & (F.all | RFlags.df)
      if size == 2 {
        emit([0x66, 0x68])
        emitLittleEndian(flags, bytes: 2)
      } else {
        emit([0x68])
        emitLittleEndian(flags, bytes: 4)
      }
    case .ret:
      let target = group + 1 + rng.below(groupCount - group)
      emit([0x68])
      addressPatches.append((at: code.count, target: target))
      emitLittleEndian(0, bytes: 4)
      joins[target, default: (0, 0)].0 |= undefinedFlags
      joins[target, default: (0, 0)].1 |= undefinedCC
    default: break
    }

    // Operand registers and the memory operand.
    var regField: UInt8 = 0
    var rmField: UInt8 = 0
    switch form.encoding {
    case .modrm(let ext, let rmKind):
      if let ext {
        regField = ext
      } else if form.regSpace == .xmm {
        regField = UInt8(rng.below(16))
      } else {
        regField = pickGPR(&rng, excludeRSP: form.registerOperandsExcludeRSP)
      }
      if case .smallBitOffset = form.special {
        emitMoveImmediate(regField, UInt64(bitPattern: Int64(rng.below(400) - 100)))
      }
      let useMemory: Bool
      switch rmKind {
      case .memory: useMemory = true
      case .register: useMemory = false
      case .any: useMemory = rng.chance(50) || !HostModel.allowsRegisterDestination(form: form.name, size: size)
      }
      rexR = regField >= 8
      if useMemory {
        let bytes = form.memoryBytes > 0 ? form.memoryBytes : Int(size)
        let address = dataAddress(bytes: bytes, alignment: form.alignment)
        memoryAddress = address
        fillMemory(at: address, bytes: bytes, kind: form.memoryFill)
        switch form.special {
        case .ldmxcsr:
          var value = UInt32(0x1F80)
          value ^= UInt32(rng.below(4)) << 13
          if rng.chance(30) { value |= 1 << 15 }
          if rng.chance(30) { value |= 1 << 6 }
          if rng.chance(15) { value &= ~(UInt32(1 << rng.below(6)) << 7) }
          if rng.chance(8) { value |= UInt32(1) << UInt32(16 + rng.below(16)) }
          // Bits only one of host and model accept (MM on an Intel host): not compared.
          value &= ~HostModel.mxcsrMaskDifference
          let offset = Int(address - DiffLayout.dataBase)
          for byte in 0..<4 { data[offset + byte] = UInt8(truncatingIfNeeded: value >> UInt32(8 * byte)) }
        case .xsaveArea(let restore, let compacted) where restore:
          fillXSAVEArea(at: address, compacted: compacted)
        case .xsaveArea:
          // The stored MXCSR_MASK is the host's (AMD: 0x2FFFF with MM) or the model's (0xFFFF).
          if HostModel.mxcsrMaskDifference != 0 {
            let offset = Int(address - DiffLayout.dataBase) + 28
            dataIgnored += Array(offset..<offset + 4)
          }
          // AVX in use (XINUSE[2]): an Intel host, as the model, counts it from a VEX.256
          // instruction until VZEROUPPER; an AMD host judges the upper halves' values, and
          // XSAVEOPT/XSAVEC then leave the AVX area unwritten. Not compared on other hosts:
          // XSTATE_BV's first byte and the AVX area (offset 576 in both formats).
          if !HostModel.hostTracksAVXInUseAsTheModel {
            let base = Int(address - DiffLayout.dataBase)
            dataIgnored += [base + 512] + Array(base + 576..<base + 832)
          }
        case .fldcw:
          var value = UInt16(0x037F)
          value ^= UInt16(rng.below(4)) << 10
          value = (value & ~0x300) | UInt16(rng.pick([0, 2, 3])) << 8
          if rng.chance(10) { value &= ~UInt16(1 << rng.below(6)) }
          let offset = Int(address - DiffLayout.dataBase)
          data[offset] = UInt8(value & 0xFF)
          data[offset + 1] = UInt8(value >> 8)
        default: break
        }
        let memory = memoryOperand(address: address, lowRegistersOnly: legacyBytes)
        if memory.addressSize32 { prefixes.append(0x67) }
        rexX = memory.rexX
        rexB = memory.rexB
        modrmBytes.append(memory.mod << 6 | (regField & 7) << 3 | memory.rm)
        if let sib = memory.sib { modrmBytes.append(sib) }
        displacementBytes = memory.displacementBytes
        for byte in 0..<memory.displacementBytes {
          modrmBytes.append(UInt8(truncatingIfNeeded: memory.displacement >> Int64(8 * byte)))
        }
        ripTarget = memory.ripTarget
        hasLockableMemory = true
      } else {
        if form.rmSpace == .xmm {
          rmField = UInt8(rng.below(16))
        } else {
          rmField = pickGPR(&rng, excludeRSP: form.registerOperandsExcludeRSP)
        }
        rexB = rmField >= 8
        modrmBytes.append(0xC0 | (regField & 7) << 3 | (rmField & 7))
      }
    case .opcodeRegister:
      rmField = pickGPR(&rng, excludeRSP: form.registerOperandsExcludeRSP)
      rexB = rmField >= 8
      opcode[opcode.count - 1] += rmField & 7
    case .x87Register(let ext):
      modrmBytes.append(0xC0 | ext << 3 | UInt8(rng.below(8)))
    case .plain:
      break
    }

    if case .xsaveArea(let restore, _) = form.special {
      // Requested-feature mask in EDX:EAX (upper halves ignored); x87 left out where the host
      // vendor's x87 pointers may differ from the model's.
      reservedRegisters = []
      var mask = UInt64(rng.below(8))
      if !restore && x87PointersSet && HostModel.vendorsDiffer { mask &= ~1 }
      emitMoveImmediate(0, rng.next() << 32 | mask)
      emitMoveImmediate(2, rng.next() << 32)
      if restore { x87PointersSet = true }
    }
    if form.group == "x87" { x87PointersSet = true }

    // Prefixes: LOCK, REP, segment overrides (ignored in 64-bit mode), operand size.
    if form.allowLock && hasLockableMemory && rng.chance(40) { prefixes.insert(0xF0, at: 0) }
    if form.allowLock && !hasLockableMemory && rng.chance(3) { prefixes.insert(0xF0, at: 0) }
    if form.allowRep {
      let isCompare = form.name.hasPrefix("cmps") || form.name.hasPrefix("scas")
      if rng.chance(60) { prefixes.append(isCompare && rng.chance(50) ? 0xF2 : 0xF3) }
    }
    if rng.chance(5) { prefixes.insert(rng.pick([0x2E, 0x3E, 0x26, 0x36]), at: 0) }
    if size == 2 && form.group != "sse" && form.group != "x87" { prefixes.append(0x66) }
    prefixes += form.prefixes
    if case .ldmxcsr = form.special { rexW = false }
    let needsREX = rexW || rexR || rexX || rexB || (usesByteRegisters && !legacyBytes && rng.chance(50))
    let rexAllowed = !legacyBytes
    let instructionStart = code.count
    emit(prefixes)
    if let vex = form.vex {
      // VEX.vvvv: a random register of its space (never RSP among GPRs: it may be written).
      var vvvv: UInt8 = 0
      switch vex.vvvv {
      case .gpr?: vvvv = pickGPR(&rng, excludeRSP: true)
      case .xmm?: vvvv = UInt8(rng.below(16))
      case nil: vvvv = vex.vvvvNotUnused ? UInt8(1 + rng.below(15)) : 0
      }
      let w = vex.w ?? (size == 8)
      let length = rng.pick(vex.lengths)
      let tail = (~vvvv & 15) << 3 | length << 2 | vex.pp
      if vex.map == 1 && !w && !rexX && !rexB && rng.chance(50) {
        emit([0xC5, (rexR ? 0 : 0x80) | tail])
      } else {
        emit([0xC4, (rexR ? 0 : 0x80) | (rexX ? 0 : 0x40) | (rexB ? 0 : 0x20) | vex.map, (w ? 0x80 : 0) | tail])
      }
    } else if needsREX && rexAllowed {
      emit([0x40 | (rexW ? 8 : 0) | (rexR ? 4 : 0) | (rexX ? 2 : 0) | (rexB ? 1 : 0)])
    }
    if form.conditionInOpcode { opcode[opcode.count - 1] |= UInt8(rng.below(16)) }
    instructionStarts.append((offset: instructionStart, form: form.name))
    undefinedBefore.append((flags: undefinedFlags, cc: undefinedCC))
    emit(opcode)
    emit(modrmBytes)
    let displacementPosition = code.count - displacementBytes

    // Branch displacement or immediate.
    if case .branch(let bytes) = form.special {
      let maximum = bytes == 1 ? min(groupCount - group, 2) : groupCount - group
      let target = group + 1 + rng.below(maximum)
      branchPatches.append((at: code.count, size: bytes, next: code.count + bytes, target: target))
      emitLittleEndian(0, bytes: bytes)
      joins[target, default: (0, 0)].0 |= undefinedFlags
      joins[target, default: (0, 0)].1 |= undefinedCC
    } else {
      var immediateBytes = 0
      switch form.immediate {
      case .none: break
      case .bytes(let count): immediateBytes = count
      case .z: immediateBytes = size == 2 ? 2 : 4
      case .v: immediateBytes = Int(size)
      }
      if immediateBytes > 0 {
        var value = DiffValues.integer(&rng)
        if case .shiftDouble16 = form.special, size == 2 { value = UInt64(rng.below(17)) | (rng.chance(30) ? 0x20 : 0) }
        if form.name.hasPrefix("enter") { value = UInt64(rng.below(64)) | UInt64(rng.below(4)) << 16 }
        if form.name.hasPrefix("ret") { value = UInt64(rng.below(5) * 8) }
        if form.name.hasPrefix("mov moffs") { value = dataAddress(bytes: 8, alignment: 1) }
        emitLittleEndian(value, bytes: immediateBytes)
      }
    }
    if let target = ripTarget {
      let next = DiffLayout.codeBase + UInt64(code.count)
      let displacement = target &- next
      for byte in 0..<4 {
        code[displacementPosition + byte] = UInt8(truncatingIfNeeded: displacement >> UInt64(8 * byte))
      }
    }
    _ = memoryAddress

    // Flag tracking.
    let effect = form.flags
    if effect.conditional {
      undefinedFlags |= effect.undefined
      undefinedCC |= effect.ccUndefined
    } else {
      undefinedFlags = (undefinedFlags & ~effect.writes) | effect.undefined
      undefinedCC = (undefinedCC & ~effect.ccWrites) | effect.ccUndefined
    }
    undefinedAfter.append((flags: undefinedFlags, cc: undefinedCC))
  }
}

// MARK: - Initial state

enum DiffStates {
  static func random(_ rng: inout DiffRNG, x87: Bool, unmaskedSIMD: Bool) -> MachineState {
    var state = MachineState()
    for index in 0..<16 { state.gpr[index] = DiffValues.integer(&rng) }
    state.gpr[4] = DiffLayout.stackTop
    state.rflags = 0x202 | (rng.next() & (F.all | RFlags.df))
    for index in 0..<16 { state.xmm[index] = DiffValues.xmm(&rng) }
    // The AVX state: in its initial configuration (all upper halves zero) in a third of the cases.
    if !rng.chance(33) {
      for index in 0..<16 { state.ymmHigh[index] = DiffValues.xmm(&rng) }
    }
    var mxcsr: UInt32 = 0x1F80 | UInt32(rng.below(4)) << 13
    if rng.chance(25) { mxcsr |= 1 << 15 }
    if rng.chance(25) { mxcsr |= 1 << 6 }
    if rng.chance(30) { mxcsr |= UInt32(rng.below(64)) }
    if unmaskedSIMD || rng.chance(5) {
      mxcsr &= ~0x3F
      mxcsr &= ~(UInt32(rng.below(64)) << 7)
    }
    state.mxcsr = mxcsr
    var fcw: UInt16 = 0x037F
    fcw ^= UInt16(rng.below(4)) << 10
    if rng.chance(40) { fcw = (fcw & ~0x300) | UInt16(rng.pick([0, 2])) << 8 }
    let unmaskX87 = rng.chance(5)
    if unmaskX87 { fcw &= ~UInt16(rng.below(64)) }
    state.fcw = fcw
    let top = UInt16(rng.below(8))
    var fsw = top << 11 | (UInt16(rng.below(16)) & 0x7) << 8 | (rng.chance(50) ? CC.c3 : 0)
    if !unmaskX87 && rng.chance(20) { fsw |= UInt16(rng.below(64)) & 0x3F }
    state.fsw = fsw
    let depth = x87 ? rng.pick([0, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8]) : rng.below(3)
    state.ftw = 0
    for index in 0..<8 {
      state.st[index] = DiffValues.x87(&rng)
      if index < depth { state.ftw |= 1 << UInt8((Int(top) + index) & 7) }
    }
    return state
  }

  static func randomData(_ rng: inout DiffRNG) -> [UInt8] {
    var data = [UInt8](repeating: 0, count: DiffLayout.dataSize)
    data.withUnsafeMutableBytes { raw in
      for index in 0..<(raw.count / 8) { raw.storeBytes(of: rng.next(), toByteOffset: index * 8, as: UInt64.self) }
    }
    return data
  }
}

enum CaseGenerator {
  /// A case exercising `focus` (one to three times) among random filler forms.
  static func makeCase(focus: InstructionForm, fillers: [InstructionForm], seed: UInt64) -> DiffCase {
    var attempt: UInt64 = 0
    while true {
      var rng = DiffRNG(seed: DiffRNG.mix(seed, attempt))
      let groupCount = 1 + rng.below(8)
      var chosen: [InstructionForm] = []
      for _ in 0..<groupCount {
        chosen.append(fillers.isEmpty || rng.chance(45) ? focus : rng.pick(fillers))
      }
      if !chosen.contains(where: { $0.name == focus.name }) { chosen[rng.below(groupCount)] = focus }
      let isX87 = chosen.contains { $0.group == "x87" }
      let unmasked = (focus.group == "sse" || focus.group == "avx") && rng.chance(8)
      let initial = DiffStates.random(&rng, x87: isX87, unmaskedSIMD: unmasked)
      let data = DiffStates.randomData(&rng)
      var builder = SequenceBuilder(rng: rng, groupCount: groupCount, data: data)
      for (index, form) in chosen.enumerated() {
        builder.beginGroup(index)
        builder.emit(form: form, group: index)
      }
      if let code = builder.finish() {
        var mask = ComparisonMask()
        mask.rflags &= ~builder.undefinedFlags
        mask.fswIgnored = builder.undefinedCC
        mask.x87Tolerance = builder.x87Tolerance
        mask.dataIgnored = builder.dataIgnored
        let faultMasks = builder.undefinedBefore.map { before in
          var faultMask = mask
          faultMask.rflags = ComparisonMask().rflags & ~before.flags
          faultMask.fswIgnored = before.cc
          return faultMask
        }
        let trapMasks = builder.undefinedAfter.map { after in
          var trapMask = mask
          trapMask.rflags = ComparisonMask().rflags & ~after.flags
          trapMask.fswIgnored = after.cc
          return trapMask
        }
        return DiffCase(
          code: code, initial: initial, data: builder.data, mask: mask, forms: chosen.map(\.name),
          instructionStarts: builder.instructionStarts, faultMasks: faultMasks, trapMasks: trapMasks)
      }
      attempt += 1
    }
  }
}
