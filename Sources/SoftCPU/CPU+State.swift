import InterruptControllers
import VMCore

extension SegmentCache {
  fileprivate func save(into writer: inout StateWriter) {
    writer.write(selector)
    writer.write(base)
    writer.write(limit)
    writer.write(access)
  }

  fileprivate static func restore(from reader: inout StateReader) throws(MachineStateError) -> SegmentCache {
    var cache = SegmentCache()
    cache.selector = try reader.read()
    cache.base = try reader.read()
    cache.limit = try reader.read()
    cache.access = try reader.read()
    guard cache.access & ~0x1_F0FF == 0 else { throw .invalid("segment access-rights value") }
    return cache
  }
}

/// The software vCPU's complete architectural state (docs/machine-state.md, section `cpu`):
/// taken at an instruction boundary while the machine is paused, so no exception is half
/// delivered and every posted write has been applied. Interrupts waiting for this CPU live in
/// its local APIC (and the PIC), which are saved on their own.
extension CPU: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    for index in 0..<16 { writer.write(gpr[index]) }
    writer.write(rip)
    writer.write(rflags)
    writer.write(cpl)
    for index in 0..<6 { segments[index].save(into: &writer) }
    ldtr.save(into: &writer)
    tr.save(into: &writer)
    for table in [gdtr, idtr] {
      writer.write(table.base)
      writer.write(table.limit)
    }
    for value in [cr0, cr2, cr3, cr4, cr8, efer, apicBase, tscOffset, kernelGSBase, star, lstar, cstar, sfmask] {
      writer.write(value)
    }
    for value in [sysenterCS, sysenterESP, sysenterEIP, pat, tscAux] { writer.write(value) }
    // x87, SSE
    for index in 0..<8 {
      let bits = fpuRegisters[index].x87Bits
      writer.write(bits.significand)
      writer.write(bits.signAndExponent)
    }
    writer.write(UInt8(fpuTop & 7))
    writer.write(fpuStatus)
    writer.write(fpuControl)
    writer.write(fpuTags)
    writer.write(fpuLastIP)
    writer.write(fpuLastDP)
    writer.write(fpuLastOpcode)
    for index in 0..<16 {
      writer.write(xmm[index][0])
      writer.write(xmm[index][1])
    }
    writer.write(mxcsr)
    // System state
    writer.write(system.interruptShadowRIP)
    writer.write(system.nmiBlocked)
    writer.write(system.halted)
    writer.write(system.waitingForSIPI)
    writer.write(system.recheckAfterShadow)
    writer.write(system.miscEnable)
    writer.write(system.tscDeadlineValue)
    writer.write(array: system.debugRegisters)
    writer.write(system.apicID)
    writer.write(system.tscKilohertz)
    let msrs = system.storedMSRs.sorted { $0.key < $1.key }
    writer.write(UInt32(msrs.count))
    for (index, value) in msrs {
      writer.write(index)
      writer.write(value)
    }
    // Extension (files written before XSAVE support end here): XCR0, YMM0-15 bits 255:128.
    writer.write(xcr0)
    for index in 0..<16 {
      writer.write(ymmHigh[index][0])
      writer.write(ymmHigh[index][1])
    }
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    var registers = [UInt64](repeating: 0, count: 16)
    for index in 0..<16 { registers[index] = try reader.read() }
    let newRIP: UInt64 = try reader.read()
    let newFlags: UInt64 = try reader.read()
    let newCPL: UInt8 = try reader.read()
    guard newCPL <= 3 else { throw .invalid("privilege level") }
    var caches: [SegmentCache] = []
    for _ in 0..<8 { caches.append(try SegmentCache.restore(from: &reader)) }
    var tables: [DescriptorTableRegister] = []
    for _ in 0..<2 { tables.append(DescriptorTableRegister(base: try reader.read(), limit: try reader.read())) }
    var control: [UInt64] = []
    for _ in 0..<18 { control.append(try reader.read()) }
    var fpu: [Float80] = []
    for _ in 0..<8 {
      let significand: UInt64 = try reader.read()
      let signAndExponent: UInt16 = try reader.read()
      fpu.append(Float80(x87Significand: significand, signAndExponent: signAndExponent))
    }
    let top: UInt8 = try reader.read()
    guard top < 8 else { throw .invalid("x87 stack top") }
    let status: UInt16 = try reader.read()
    let controlWord: UInt16 = try reader.read()
    let tags: UInt16 = try reader.read()
    let lastIP: UInt64 = try reader.read()
    let lastDP: UInt64 = try reader.read()
    let lastOpcode: UInt16 = try reader.read()
    var vectors: [XMMValue] = []
    for _ in 0..<16 { vectors.append(XMMValue(try reader.read(), try reader.read())) }
    let newMXCSR: UInt32 = try reader.read()
    guard newMXCSR & ~MXCSR.writableMask == 0 else { throw .invalid("MXCSR value") }
    let shadow: UInt64 = try reader.read()
    let nmiBlocked = try reader.readBool()
    let halted = try reader.readBool()
    let waitingForSIPI = try reader.readBool()
    let recheck = try reader.readBool()
    let miscEnable: UInt64 = try reader.read()
    let deadline: UInt64 = try reader.read()
    let debug = try reader.readArray(UInt64.self, count: 8, "debug register set")
    let apicID: UInt32 = try reader.read()
    let khz: UInt64 = try reader.read()
    guard khz > 0 else { throw .invalid("TSC frequency") }
    let msrCount = Int(try reader.read(UInt32.self))
    guard msrCount <= 4096 else { throw .invalid("MSR count") }
    var msrs: [UInt32: UInt64] = [:]
    for _ in 0..<msrCount { msrs[try reader.read(UInt32.self)] = try reader.read(UInt64.self) }
    var newXCR0: UInt64 = 1
    var uppers = [XMMValue](repeating: .zero, count: 16)
    if !reader.isAtEnd {
      newXCR0 = try reader.read()
      guard newXCR0 & ~XSaveModel.supportedComponents == 0, newXCR0 & XSaveModel.x87 != 0,
        newXCR0 & XSaveModel.avx == 0 || newXCR0 & XSaveModel.sse != 0
      else { throw .invalid("XCR0 value") }
      for index in 0..<16 { uppers[index] = XMMValue(try reader.read(), try reader.read()) }
    }

    // Everything read and checked: apply.
    for index in 0..<16 { gpr[index] = registers[index] }
    rflags = newFlags
    for index in 0..<6 { segments[index] = caches[index] }
    ldtr = caches[6]
    tr = caches[7]
    gdtr = tables[0]
    idtr = tables[1]
    cr0 = control[0]
    cr2 = control[1]
    cr3 = control[2]
    cr4 = control[3]
    cr8 = control[4]
    efer = control[5]
    apicBase = control[6]
    tscOffset = control[7]
    kernelGSBase = control[8]
    star = control[9]
    lstar = control[10]
    cstar = control[11]
    sfmask = control[12]
    sysenterCS = control[13]
    sysenterESP = control[14]
    sysenterEIP = control[15]
    pat = control[16]
    tscAux = control[17]
    for index in 0..<8 { fpuRegisters[index] = fpu[index] }
    fpuTop = Int(top)
    fpuStatus = status
    fpuControl = controlWord
    fpuTags = tags
    fpuLastIP = lastIP
    fpuLastDP = lastDP
    fpuLastOpcode = lastOpcode
    for index in 0..<16 { xmm[index] = vectors[index] }
    mxcsr = newMXCSR
    xcr0 = newXCR0
    xsaveInUse = 0x7
    for index in 0..<16 { ymmHigh[index] = uppers[index] }
    system.interruptShadowRIP = shadow
    system.nmiBlocked = nmiBlocked
    system.halted = halted
    system.waitingForSIPI = waitingForSIPI
    system.recheckAfterShadow = recheck
    system.miscEnable = miscEnable
    system.tscDeadlineValue = deadline
    system.debugRegisters = debug
    system.apicID = apicID
    system.tscKilohertz = khz
    system.storedMSRs = msrs
    system.shutdownReason = nil
    rip = newRIP
    cpl = newCPL
    systemModeChanged()
    systemFlushTLB(includingGlobal: true)
    flushDecodedBlocks()
  }
}

extension CPU {
  /// Sets which physical page this CPU's memory path decodes as its local APIC's registers,
  /// from IA32_APIC_BASE (the APIC's, or this CPU's copy when it has none): a base other than
  /// 0xFEE00000 in xAPIC mode is decoded here; the default page is on the bus, and in x2APIC
  /// mode or with the APIC disabled no page is. Called after a WRMSR to IA32_APIC_BASE and
  /// after a restore, which sets the MSR without a WRMSR.
  func refreshAPICDecoding() {
    let base = system.localAPIC?.apicBaseMSR ?? apicBase
    let page = base & ~0xFFF
    let xAPICMode = base & (LocalAPIC.baseEnableBit | LocalAPIC.baseExtendedBit) == LocalAPIC.baseEnableBit
    system.relocatedAPICPage = xAPICMode && page != LocalAPIC.defaultBase ? page : UInt64.max
  }
}
