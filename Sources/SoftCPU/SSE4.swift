// SSSE3, SSE4.1, SSE4.2 and PCLMULQDQ (0F 38 and 0F 3A maps). Arithmetic runs on the host
// through CSoftFloat like the SSE2 forms; inserts, extracts and blends are plain Swift.

import CSoftFloat

extension CPU {
  /// 0F 38 map.
  func executeSSEMap38(_ instruction: Instruction, prefix: UInt8) throws(Fault) {
    let byte = UInt8(truncatingIfNeeded: instruction.opcode)
    if byte == 0xF0 || byte == 0xF1 {
      guard prefix == 3 else { throw .invalidOpcode }
      try crc32(instruction, byteSource: byte == 0xF0)
      return
    }
    guard prefix == 1 else { throw .invalidOpcode }  // no-prefix forms are MMX
    let reg = Int(instruction.reg)
    switch byte {
    case 0x00...0x0B, 0x1C...0x1E, 0x28, 0x29, 0x2B, 0x37...0x41:
      try hostInteger(instruction, prefix: prefix)
    case 0x20...0x25, 0x30...0x35:
      // PMOVSX/PMOVZX: the memory operand is 8, 4 or 2 bytes.
      let size: Int
      switch byte & 0xF {
      case 2: size = 2
      case 1, 4: size = 4
      default: size = 8
      }
      var source: XMMValue
      if instruction.hasMemoryOperand {
        let address = linearAddress(instruction)
        switch size {
        case 2: source = XMMValue(UInt64(try read16(address)), 0)
        case 4: source = XMMValue(UInt64(try read32(address)), 0)
        default: source = XMMValue(try read64(address), 0)
        }
      } else {
        source = xmm[Int(instruction.rm)]
      }
      var destination = xmm[reg]
      guard csf_sse_integer(CSF_SSE_MAP38 | 0x100 | UInt32(byte), 0, &destination, &source) == 0 else {
        throw .invalidOpcode
      }
      xmm[reg] = destination
    case 0x10, 0x14, 0x15:
      // PBLENDVB / BLENDVPS / BLENDVPD with the implicit XMM0 mask.
      let source = try source128(instruction, aligned: sseArithmeticNeedsAlignment)
      let mask = xmm[0]
      var result = xmm[reg]
      switch byte {
      case 0x10:
        let selector = byteSignMask(mask)
        var bytes = unsafeBitCast(result, to: SIMD16<UInt8>.self)
        let sourceBytes = unsafeBitCast(source, to: SIMD16<UInt8>.self)
        for index in 0..<16 where selector & (1 << UInt32(index)) != 0 { bytes[index] = sourceBytes[index] }
        result = unsafeBitCast(bytes, to: XMMValue.self)
      case 0x14:
        var lanes = unsafeBitCast(result, to: SIMD4<UInt32>.self)
        let sourceLanes = unsafeBitCast(source, to: SIMD4<UInt32>.self)
        let maskLanes = unsafeBitCast(mask, to: SIMD4<UInt32>.self)
        for index in 0..<4 where maskLanes[index] >> 31 != 0 { lanes[index] = sourceLanes[index] }
        result = unsafeBitCast(lanes, to: XMMValue.self)
      default:
        for index in 0..<2 where mask[index] >> 63 != 0 { result[index] = source[index] }
      }
      xmm[reg] = result
    case 0x17:  // PTEST
      let source = try source128(instruction, aligned: sseArithmeticNeedsAlignment)
      let destination = xmm[reg]
      let and = destination & source
      let andNot = source & ~destination
      var flags: UInt64 = 0
      if and[0] | and[1] == 0 { flags |= RFlags.zf }
      if andNot[0] | andNot[1] == 0 { flags |= RFlags.cf }
      setStatusFlags(flags)
    case 0x2A:  // MOVNTDQA
      guard instruction.hasMemoryOperand else { throw .invalidOpcode }
      xmm[reg] = try read128(linearAddress(instruction), aligned: true)
    default:
      throw .invalidOpcode
    }
  }

  /// 0F 3A map (all forms take an imm8).
  func executeSSEMap3A(_ instruction: Instruction, prefix: UInt8) throws(Fault) {
    guard prefix == 1 else { throw .invalidOpcode }
    let byte = UInt8(truncatingIfNeeded: instruction.opcode)
    let reg = Int(instruction.reg)
    let immediate = Int(instruction.immediate & 0xFF)
    switch byte {
    case 0x08, 0x09:
      try hostFloat(instruction, prefix: prefix, sourceSize: 16)
    case 0x40, 0x41:  // DPPS, DPPD
      try dotProduct(instruction)
    case 0x0A, 0x0B:
      try hostFloat(instruction, prefix: prefix, sourceSize: byte == 0x0A ? 4 : 8)
    case 0x42, 0x44:
      try hostInteger(instruction, prefix: prefix)
    case 0x0C, 0x0D, 0x0E:
      // BLENDPS / BLENDPD / PBLENDW
      let source = try source128(instruction, aligned: sseArithmeticNeedsAlignment)
      var result = xmm[reg]
      switch byte {
      case 0x0C:
        var lanes = unsafeBitCast(result, to: SIMD4<UInt32>.self)
        let sourceLanes = unsafeBitCast(source, to: SIMD4<UInt32>.self)
        for index in 0..<4 where immediate & (1 << index) != 0 { lanes[index] = sourceLanes[index] }
        result = unsafeBitCast(lanes, to: XMMValue.self)
      case 0x0D:
        for index in 0..<2 where immediate & (1 << index) != 0 { result[index] = source[index] }
      default:
        var words = unsafeBitCast(result, to: SIMD8<UInt16>.self)
        let sourceWords = unsafeBitCast(source, to: SIMD8<UInt16>.self)
        for index in 0..<8 where immediate & (1 << index) != 0 { words[index] = sourceWords[index] }
        result = unsafeBitCast(words, to: XMMValue.self)
      }
      xmm[reg] = result
    case 0x0F:  // PALIGNR: (destination:source) >> (8 * imm), low 128 bits
      let source = try source128(instruction, aligned: sseArithmeticNeedsAlignment)
      let destination = xmm[reg]
      func quad(_ index: Int) -> UInt64 {
        switch index {
        case 0: return source[0]
        case 1: return source[1]
        case 2: return destination[0]
        case 3: return destination[1]
        default: return 0
        }
      }
      let first = immediate / 8
      let bits = UInt64(immediate % 8) * 8
      func word(_ index: Int) -> UInt64 {
        bits == 0 ? quad(index) : quad(index) >> bits | quad(index + 1) << (64 - bits)
      }
      xmm[reg] = XMMValue(word(first), word(first + 1))
    case 0x14, 0x15, 0x16, 0x17:
      try extractElement(instruction, byte: byte, immediate: immediate)
    case 0x20, 0x21, 0x22:
      try insertElement(instruction, byte: byte, immediate: immediate)
    case 0x60...0x63:
      try stringCompare(instruction, byte: byte)
    default:
      throw .invalidOpcode
    }
  }

  /// PEXTRB / PEXTRW / PEXTRD / PEXTRQ / EXTRACTPS to a register (zero-extended) or memory.
  private func extractElement(_ instruction: Instruction, byte: UInt8, immediate: Int) throws(Fault) {
    let value = xmm[Int(instruction.reg)]
    let size: Int
    let element: UInt64
    switch byte {
    case 0x14:
      size = 1
      element = UInt64(unsafeBitCast(value, to: SIMD16<UInt8>.self)[immediate & 15])
    case 0x15:
      size = 2
      element = UInt64(unsafeBitCast(value, to: SIMD8<UInt16>.self)[immediate & 7])
    case 0x16 where instruction.rexW:
      size = 8
      element = value[immediate & 1]
    default:
      size = 4
      element = UInt64(unsafeBitCast(value, to: SIMD4<UInt32>.self)[immediate & 3])
    }
    guard instruction.hasMemoryOperand else {
      gpr[Int(instruction.rm)] = element
      return
    }
    let address = linearAddress(instruction)
    switch size {
    case 1: try write8(address, UInt8(truncatingIfNeeded: element))
    case 2: try write16(address, UInt16(truncatingIfNeeded: element))
    case 4: try write32(address, UInt32(truncatingIfNeeded: element))
    default: try write64(address, element)
    }
  }

  /// PINSRB / INSERTPS / PINSRD / PINSRQ.
  private func insertElement(_ instruction: Instruction, byte: UInt8, immediate: Int) throws(Fault) {
    let reg = Int(instruction.reg)
    let address = instruction.hasMemoryOperand ? linearAddress(instruction) : 0
    let register = instruction.hasMemoryOperand ? 0 : gpr[Int(instruction.rm)]
    switch byte {
    case 0x20:
      let value = instruction.hasMemoryOperand ? try read8(address) : UInt8(truncatingIfNeeded: register)
      var bytes = unsafeBitCast(xmm[reg], to: SIMD16<UInt8>.self)
      bytes[immediate & 15] = value
      xmm[reg] = unsafeBitCast(bytes, to: XMMValue.self)
    case 0x21:
      let element: UInt32
      if instruction.hasMemoryOperand {
        element = try read32(address)
      } else {
        element = unsafeBitCast(xmm[Int(instruction.rm)], to: SIMD4<UInt32>.self)[immediate >> 6]
      }
      var lanes = unsafeBitCast(xmm[reg], to: SIMD4<UInt32>.self)
      lanes[(immediate >> 4) & 3] = element
      for index in 0..<4 where immediate & (1 << index) != 0 { lanes[index] = 0 }
      xmm[reg] = unsafeBitCast(lanes, to: XMMValue.self)
    default:
      if instruction.rexW {
        xmm[reg][immediate & 1] = instruction.hasMemoryOperand ? try read64(address) : register
      } else {
        let value = instruction.hasMemoryOperand ? try read32(address) : UInt32(truncatingIfNeeded: register)
        var lanes = unsafeBitCast(xmm[reg], to: SIMD4<UInt32>.self)
        lanes[immediate & 3] = value
        xmm[reg] = unsafeBitCast(lanes, to: XMMValue.self)
      }
    }
  }

  /// PCMPESTRM / PCMPESTRI / PCMPISTRM / PCMPISTRI (no alignment requirement).
  private func stringCompare(_ instruction: Instruction, byte: UInt8) throws(Fault) {
    var source = try source128(instruction, aligned: false)
    var destination = xmm[Int(instruction.reg)]
    // Explicit lengths: RAX/RDX with REX.W, else EAX/EDX, as signed values; their absolute
    // value saturates at 16, so clamping keeps the meaning within 32 bits.
    func length(_ register: UInt64) -> Int32 {
      let value = instruction.rexW ? Int64(bitPattern: register) : Int64(Int32(truncatingIfNeeded: register))
      return Int32(clamping: max(-1024, min(1024, value)))
    }
    var index: UInt64 = 0
    let flags = csf_sse_string_compare(
      UInt32(byte), UInt32(instruction.immediate & 0xFF), length(gpr[0]), length(gpr[2]), &destination, &source,
      &index)
    guard flags != CSF_UNSUPPORTED else { throw .invalidOpcode }
    if byte & 1 == 0 {
      xmm[0] = destination
    } else {
      gpr[1] = index
    }
    setStatusFlags(UInt64(flags))
  }

  /// CRC32 r32/r64, r/m8 (F2 0F 38 F0) or r/m16/32/64 (F2 0F 38 F1).
  private func crc32(_ instruction: Instruction, byteSource: Bool) throws(Fault) {
    let size = byteSource ? 1 : Int(instruction.operandSize)
    var value: UInt64
    if instruction.hasMemoryOperand {
      let address = linearAddress(instruction)
      switch size {
      case 1: value = UInt64(try read8(address))
      case 2: value = UInt64(try read16(address))
      case 4: value = UInt64(try read32(address))
      default: value = try read64(address)
      }
    } else {
      let rm = Int(instruction.rm)
      if size == 1 && instruction.prefixes & Instruction.Prefix.rex == 0 && rm >= 4 && rm < 8 {
        value = gpr[rm - 4] >> 8  // AH, CH, DH, BH
      } else {
        value = gpr[rm]
      }
    }
    let crc = csf_crc32(UInt32(truncatingIfNeeded: gpr[Int(instruction.reg)]), value, UInt32(size))
    gpr[Int(instruction.reg)] = UInt64(crc)
  }
}
