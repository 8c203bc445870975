import VMCore

// XSAVE-managed state (Intel SDM vol. 1 ch. 13, vol. 2 XSAVE/XRSTOR/XSAVEOPT/XSAVEC/XGETBV/
// XSETBV): state components 0 (x87), 1 (SSE: XMM0-15 and MXCSR) and 2 (AVX: the upper halves of
// YMM0-15, at offset 576 in both the standard and the compacted format, 256 bytes).
//
// XINUSE (`xsaveInUse`) is tracked as the SDM describes it and as the host CPU shows it: an
// instruction that writes a component's registers sets its bit (an x87 instruction other than
// FNSTSW/FNSTCW; an SSE instruction that writes an XMM register), XRSTOR clears the bits of the
// components it initializes. There is no modified-state
// optimization: XSAVEOPT saves what is in use, as XSAVE does. XSAVES/XRSTORS (supervisor state) are not offered.

/// The XSAVE feature set of the CPU model.
enum XSaveModel {
  /// XCR0 bits XSETBV accepts: x87, SSE, AVX.
  static let supportedComponents: UInt64 = 0x7
  /// Offset and size of the AVX component (standard and compacted format alike).
  static let avxOffset: UInt64 = 576
  static let avxSize: UInt64 = 256
  /// Size of the legacy region plus the XSAVE header.
  static let baseSize: UInt64 = 576
  /// XCR0 bit of each component.
  static let x87: UInt64 = 1
  static let sse: UInt64 = 2
  static let avx: UInt64 = 4
  /// CPUID.(EAX=0DH, ECX=1):EAX: XSAVEOPT(0) and XSAVEC(1).
  static let instructions: UInt32 = 1 << 0 | 1 << 1

  /// Bytes an XSAVE area needs for the components in `mask` (standard and compacted alike).
  static func areaSize(_ mask: UInt64) -> UInt64 { mask & avx != 0 ? avxOffset + avxSize : baseSize }
}

extension CPU {
  /// XGETBV (0F 01 D0): EDX:EAX = XCR[ECX]. Only XCR0 exists (no XGETBV with ECX = 1).
  func executeXGETBV() throws(Fault) {
    guard cr4 & X86.cr4OSXSAVE != 0 else { throw .invalidOpcode }
    guard gpr[1] & 0xFFFF_FFFF == 0 else { throw .generalProtection(0) }
    gpr[0] = xcr0 & 0xFFFF_FFFF
    gpr[2] = xcr0 >> 32
  }

  /// XSETBV (0F 01 D1): XCR[ECX] = EDX:EAX at CPL 0. x87 must stay enabled, AVX needs SSE, and
  /// only components the CPU model offers (CPUID leaf 0DH) may be enabled: a model without AVX
  /// keeps every VEX vector instruction #UD.
  func executeXSETBV() throws(Fault) {
    guard cr4 & X86.cr4OSXSAVE != 0 else { throw .invalidOpcode }
    guard currentPrivilegeLevel == 0, rflags & RFlags.vm == 0 else { throw .generalProtection(0) }
    let value = (gpr[2] & 0xFFFF_FFFF) << 32 | gpr[0] & 0xFFFF_FFFF
    guard gpr[1] & 0xFFFF_FFFF == 0, value & ~UInt64(system.cpuidFeatures.xsaveComponents) == 0,
      value & XSaveModel.x87 != 0,
      value & XSaveModel.avx == 0 || value & XSaveModel.sse != 0
    else { throw .generalProtection(0) }
    xcr0 = value
  }

  /// XSAVE (0F AE /4), XRSTOR (/5), XSAVEOPT (/6) and XSAVEC (0F C7 /4), each with REX.W for the
  /// 64-bit x87 pointer layout.
  func executeXSAVE(_ ins: Instruction) throws(Fault) {
    guard cr4 & X86.cr4OSXSAVE != 0 else { throw .invalidOpcode }
    guard cr0 & X86.cr0TS == 0 else { throw .deviceNotAvailable }
    let address = linearAddress(ins)
    guard address & 63 == 0 else { throw .generalProtection(0) }
    let requested = xcr0 & ((gpr[2] & 0xFFFF_FFFF) << 32 | gpr[0] & 0xFFFF_FFFF)
    switch ins.op {
    case .xrstor: try xrstor(from: address, requested: requested, wide: ins.rexW)
    case .xsavec: try xsaveCompacted(at: address, requested: requested, wide: ins.rexW)
    default: try xsave(at: address, requested: requested, wide: ins.rexW, onlyInUse: ins.op == .xsaveopt)
    }
  }

  /// XSAVE and XSAVEOPT (standard format). XSAVEOPT leaves components in their initial
  /// configuration unwritten; MXCSR and MXCSR_MASK are saved whenever SSE or AVX is requested.
  private func xsave(at address: UInt64, requested: UInt64, wide: Bool, onlyInUse: Bool) throws(Fault) {
    let inUse = xsaveInUse
    let toSave = onlyInUse ? requested & inUse : requested
    let oldHeader = try read64(address &+ 512)
    if toSave & XSaveModel.x87 != 0 { try storeX87Image(at: address, wide: wide) }
    if toSave & XSaveModel.sse != 0 { try storeXMMImage(at: address) }
    if requested & (XSaveModel.sse | XSaveModel.avx) != 0 {
      try write32(address &+ 24, mxcsr)
      try write32(address &+ 28, MXCSR.writableMask)
    }
    if toSave & XSaveModel.avx != 0 { try storeUpperHalves(at: address &+ XSaveModel.avxOffset) }
    try write64(address &+ 512, (oldHeader & ~requested) | (inUse & requested))
  }

  /// XSAVEC: compacted format, components in their initial configuration are not written (SSE
  /// is, with MXCSR, when MXCSR is not 1F80H); writes XSTATE_BV and XCOMP_BV.
  private func xsaveCompacted(at address: UInt64, requested: UInt64, wide: Bool) throws(Fault) {
    var saved = requested & xsaveInUse
    if mxcsr != MXCSR.reset && requested & XSaveModel.sse != 0 { saved |= XSaveModel.sse }
    if saved & XSaveModel.x87 != 0 { try storeX87Image(at: address, wide: wide) }
    if saved & XSaveModel.sse != 0 {
      try write32(address &+ 24, mxcsr)
      try write32(address &+ 28, MXCSR.writableMask)
      try storeXMMImage(at: address)
    }
    // Component 2 is the first extended one: at offset 576 whenever it is requested.
    if saved & XSaveModel.avx != 0 { try storeUpperHalves(at: address &+ XSaveModel.avxOffset) }
    try write64(address &+ 512, saved)
    try write64(address &+ 520, 1 << 63 | requested)
  }

  /// XRSTOR, standard and compacted form. Everything is read and checked before any register
  /// changes, so a fault leaves the state as it was.
  private func xrstor(from address: UInt64, requested: UInt64, wide: Bool) throws(Fault) {
    let stateMask = try read64(address &+ 512)
    let compactionMask = try read64(address &+ 520)
    let compacted = compactionMask >> 63 != 0
    var toLoad: UInt64
    var loadsMXCSR: Bool
    if compacted {
      let format = compactionMask & ~(1 << 63)
      guard format & ~xcr0 == 0, stateMask & ~format == 0 else { throw .generalProtection(0) }
      for offset in stride(from: UInt64(16), to: 64, by: 8) where try read64(address &+ 512 &+ offset) != 0 {
        throw .generalProtection(0)
      }
      toLoad = requested & format & stateMask
      loadsMXCSR = toLoad & XSaveModel.sse != 0
    } else {
      guard stateMask & ~xcr0 == 0, compactionMask == 0, try read64(address &+ 528) == 0 else {
        throw .generalProtection(0)
      }
      toLoad = requested & stateMask
      loadsMXCSR = requested & (XSaveModel.sse | XSaveModel.avx) != 0
    }
    var newMXCSR = mxcsr
    if loadsMXCSR {
      newMXCSR = try read32(address &+ 24)
      guard newMXCSR & ~MXCSR.writableMask == 0 else { throw .generalProtection(0) }
    } else if compacted && requested & XSaveModel.sse != 0 {
      newMXCSR = MXCSR.reset  // the compacted form initializes MXCSR with SSE
    }
    let x87Image = toLoad & XSaveModel.x87 != 0 ? try readX87Image(from: address, wide: wide) : nil
    var vectors: [XMMValue] = []
    if toLoad & XSaveModel.sse != 0 {
      for index in 0..<16 { vectors.append(try read128(address &+ 160 &+ UInt64(16 * index), aligned: false)) }
    }
    var uppers: [XMMValue] = []
    if toLoad & XSaveModel.avx != 0 {
      for index in 0..<16 {
        uppers.append(try read128(address &+ XSaveModel.avxOffset &+ UInt64(16 * index), aligned: false))
      }
    }
    // Apply.
    xsaveInUse = (xsaveInUse & ~requested) | toLoad
    if requested & XSaveModel.x87 != 0 {
      if let x87Image {
        applyX87Image(x87Image)
      } else {
        initializeX87()
        for index in 0..<8 { fpuRegisters[index] = 0 }
        refreshX87Summary()
      }
    }
    mxcsr = newMXCSR
    if requested & XSaveModel.sse != 0 {
      for index in 0..<16 { xmm[index] = vectors.isEmpty ? .zero : vectors[index] }
    }
    if requested & XSaveModel.avx != 0 {
      for index in 0..<16 { ymmHigh[index] = uppers.isEmpty ? .zero : uppers[index] }
    }
  }

  private func storeUpperHalves(at address: UInt64) throws(Fault) {
    for index in 0..<16 { try write128(address &+ UInt64(16 * index), ymmHigh[index], aligned: false) }
  }
}

extension Instruction {
  /// Whether an `.sse` instruction may write an XMM register (what sets XINUSE[1], as the host
  /// CPU tracks it): not the stores to memory, the moves and extractions into general registers
  /// or flags, and the state instructions other than FXRSTOR.
  var writesVectorRegister: Bool {
    let byte = UInt8(truncatingIfNeeded: opcode)
    switch opcode >> 8 {
    case 1:
      switch byte {
      case 0x11, 0x13, 0x17, 0x29, 0x2B, 0x7F, 0xE7: return !hasMemoryOperand
      case 0xD6: return !hasMemoryOperand && mandatoryPrefix != 3  // MOVDQ2Q writes an MMX register
      case 0x7E: return mandatoryPrefix == 2
      case 0x2C, 0x2D, 0x2E, 0x2F, 0x50, 0xC5, 0xD7, 0xF7: return false
      case 0xAE: return reg & 7 == 1
      default: return true
      }
    case 2: return byte != 0x17 && byte != 0xF0 && byte != 0xF1
    default: return !(0x14...0x17).contains(byte) && byte != 0x61 && byte != 0x63
    }
  }

  /// Whether an `.x87` instruction only reads the x87 state (FNSTSW, FNSTCW): it leaves XINUSE[0] alone.
  var onlyReadsX87State: Bool {
    switch (opcode, hasMemoryOperand, reg & 7) {
    case (0xDF, false, 4): return modrm == 0xE0
    case (0xDD, true, 7), (0xD9, true, 7): return true
    default: return false
    }
  }
}
