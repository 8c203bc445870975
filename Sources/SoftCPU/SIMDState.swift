// LDMXCSR / STMXCSR / FXSAVE / FXRSTOR (0F AE /0-/3 with a memory operand), and the x87 and
// XMM parts of the legacy region they share with XSAVE (XSAVE.swift).

import VMCore

extension CPU {
  /// Executes 0F AE /0 FXSAVE, /1 FXRSTOR, /2 LDMXCSR, /3 STMXCSR.
  func executeSIMDStateInstruction(_ instruction: Instruction) throws(Fault) {
    guard instruction.hasMemoryOperand, instruction.reg & 7 <= 3 else { throw .invalidOpcode }
    let kind = instruction.reg & 7
    if kind >= 2 {
      guard cr0 & X86.cr0EM == 0, cr4 & X86.cr4OSFXSR != 0 else { throw .invalidOpcode }
    } else {
      guard cr0 & X86.cr0EM == 0 else { throw .deviceNotAvailable }
    }
    guard cr0 & X86.cr0TS == 0 else { throw .deviceNotAvailable }
    let address = linearAddress(instruction)
    switch kind {
    case 0: try fxsave(at: address, wide: instruction.rexW)
    case 1:
      try fxrstor(from: address, wide: instruction.rexW)
      xsaveInUse |= XSaveModel.x87 | XSaveModel.sse
    case 2:
      let value = try read32(address)
      guard value & ~MXCSR.writableMask == 0 else { throw .generalProtection(0) }
      mxcsr = value
    default:
      try write32(address, mxcsr)
    }
  }

  /// The x87 status word with the TOP field filled in.
  @inline(__always) var fpuStatusWord: UInt16 {
    (fpuStatus & ~0x3800) | UInt16(truncatingIfNeeded: fpuTop & 7) << 11
  }

  /// Abridged tag byte: bit i set when physical register i is not empty.
  var fpuAbridgedTags: UInt8 {
    var abridged: UInt8 = 0
    for register in 0..<8 where (fpuTags >> (2 * UInt16(register))) & 3 != 3 {
      abridged |= 1 << UInt8(register)
    }
    return abridged
  }

  /// Writes the 512-byte FXSAVE image (bytes 0-415; 416-511 are left untouched as on the host).
  func fxsave(at address: UInt64, wide: Bool) throws(Fault) {
    guard address & 15 == 0 else { throw .generalProtection(0) }
    try storeX87Image(at: address, wide: wide)
    try write32(address &+ 24, mxcsr)
    try write32(address &+ 28, MXCSR.writableMask)
    try storeXMMImage(at: address)
  }

  /// The x87 part of an FXSAVE/XSAVE legacy region: bytes 0-23 and 32-159.
  /// FOP/FIP/FDP are saved only while an unmasked exception is pending (ES), as AMD CPUs do.
  func storeX87Image(at address: UInt64, wide: Bool) throws(Fault) {
    let status = fpuStatusWord
    let pointersValid = status & 0x80 != 0
    try write16(address, fpuControl)
    try write16(address &+ 2, status)
    try write16(address &+ 4, UInt16(fpuAbridgedTags))
    try write16(address &+ 6, pointersValid ? fpuLastOpcode & 0x7FF : 0)
    let instructionPointer = pointersValid ? fpuLastIP : 0
    let dataPointer = pointersValid ? fpuLastDP : 0
    if wide {
      try write64(address &+ 8, instructionPointer)
      try write64(address &+ 16, dataPointer)
    } else {
      let codeSelector = pointersValid ? UInt32(segments[Int(SegmentIndex.cs)].selector) : 0
      let dataSelector = pointersValid ? UInt32(segments[Int(SegmentIndex.ds)].selector) : 0
      try write32(address &+ 8, UInt32(truncatingIfNeeded: instructionPointer))
      try write32(address &+ 12, codeSelector)
      try write32(address &+ 16, UInt32(truncatingIfNeeded: dataPointer))
      try write32(address &+ 20, dataSelector)
    }
    for index in 0..<8 {
      let slot = address &+ 32 &+ UInt64(16 * index)
      let bits = fpuRegisters[(fpuTop + index) & 7].x87Bits
      try write64(slot, bits.significand)
      try write64(slot &+ 8, UInt64(bits.signAndExponent))
    }
  }

  /// XMM0-15 into bytes 160-415 of an FXSAVE/XSAVE legacy region.
  func storeXMMImage(at address: UInt64) throws(Fault) {
    for index in 0..<16 {
      try write128(address &+ 160 &+ UInt64(16 * index), xmm[index], aligned: false)
    }
  }

  /// Loads the FXSAVE image. #GP(0) when misaligned or when MXCSR has reserved bits set.
  func fxrstor(from address: UInt64, wide: Bool) throws(Fault) {
    guard address & 15 == 0 else { throw .generalProtection(0) }
    let newMXCSR = try read32(address &+ 24)
    guard newMXCSR & ~MXCSR.writableMask == 0 else { throw .generalProtection(0) }
    let image = try readX87Image(from: address, wide: wide)
    var vectors = [XMMValue](repeating: .zero, count: 16)
    for index in 0..<16 {
      vectors[index] = try read128(address &+ 160 &+ UInt64(16 * index), aligned: false)
    }
    for index in 0..<16 { xmm[index] = vectors[index] }
    mxcsr = newMXCSR
    applyX87Image(image)
  }

  /// The x87 part of an FXSAVE/XSAVE legacy region, read but not applied.
  struct X87Image {
    var control: UInt16
    var status: UInt16
    var abridgedTags: UInt8
    var opcode: UInt16
    var instructionPointer: UInt64
    var dataPointer: UInt64
    /// ST(0)-ST(7) as stored (significand, sign and exponent).
    var registers: [(UInt64, UInt16)]
  }

  func readX87Image(from address: UInt64, wide: Bool) throws(Fault) -> X87Image {
    let control = try read16(address)
    let status = try read16(address &+ 2)
    let abridged = try read8(address &+ 4)
    let opcode = try read16(address &+ 6)
    let instructionPointer: UInt64
    let dataPointer: UInt64
    if wide {
      instructionPointer = try read64(address &+ 8)
      dataPointer = try read64(address &+ 16)
    } else {
      instructionPointer = UInt64(try read32(address &+ 8))
      dataPointer = UInt64(try read32(address &+ 16))
    }
    var registers: [(UInt64, UInt16)] = []
    for index in 0..<8 {
      let slot = address &+ 32 &+ UInt64(16 * index)
      registers.append((try read64(slot), try read16(slot &+ 8)))
    }
    return X87Image(
      control: control, status: status, abridgedTags: abridged, opcode: opcode,
      instructionPointer: instructionPointer, dataPointer: dataPointer, registers: registers)
  }

  func applyX87Image(_ image: X87Image) {
    let top = Int(image.status >> 11) & 7
    for index in 0..<8 {
      fpuRegisters[(top + index) & 7] = Float80(
        x87Significand: image.registers[index].0, signAndExponent: image.registers[index].1)
    }
    fpuControl = image.control & 0x1F3F | 0x40
    fpuStatus = image.status & ~0x3800
    fpuTop = top
    // The pointers are loaded whatever the image's ES bit says (an AMD host does: a restored
    // status whose exception flags are unmasked by the restored control word has ES set after
    // the restore, and FXSAVE/XSAVE then store the restored pointers).
    // The processor keeps 48-bit linear addresses: bits 63:48 come back as copies of bit 47.
    fpuLastOpcode = image.opcode & 0x7FF
    fpuLastIP = UInt64(bitPattern: Int64(bitPattern: image.instructionPointer << 16) >> 16)
    fpuLastDP = UInt64(bitPattern: Int64(bitPattern: image.dataPointer << 16) >> 16)
    var tags: UInt16 = 0
    for register in 0..<8 {
      let tag = image.abridgedTags & (1 << UInt8(register)) != 0 ? fpuRegisters[register].x87Tag : 3
      tags |= tag << (2 * UInt16(register))
    }
    fpuTags = tags
    refreshX87Summary()
  }
}

extension Float80 {
  /// The raw 80-bit encoding: 64-bit significand (with the explicit integer bit) and 16-bit
  /// sign/exponent. Works for every encoding, including ones Swift's API cannot express.
  @inline(__always) var x87Bits: (significand: UInt64, signAndExponent: UInt16) {
    var copy = self
    return withUnsafeBytes(of: &copy) { bytes in
      (bytes.load(as: UInt64.self), bytes.load(fromByteOffset: 8, as: UInt16.self))
    }
  }

  /// Builds a value from its raw 80-bit encoding.
  @inline(__always) init(x87Significand significand: UInt64, signAndExponent: UInt16) {
    var value: Float80 = 0
    withUnsafeMutableBytes(of: &value) { bytes in
      bytes.storeBytes(of: significand, as: UInt64.self)
      bytes.storeBytes(of: signAndExponent, toByteOffset: 8, as: UInt16.self)
    }
    self = value
  }

  /// The x87 tag of a non-empty register holding this value: 0 valid, 1 zero, 2 special
  /// (NaN, infinity, denormal, unsupported encodings).
  @inline(__always) var x87Tag: UInt16 {
    let bits = x87Bits
    let exponent = bits.signAndExponent & 0x7FFF
    if exponent == 0 { return bits.significand == 0 ? 1 : 2 }
    if exponent == 0x7FFF || bits.significand >> 63 == 0 { return 2 }
    return 0
  }
}
