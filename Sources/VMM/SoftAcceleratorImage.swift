import VMCore

/// The `accelerator` section of a software-CPU machine as plain values (docs/machine-state.md,
/// sections `cpu` and `interrupt-controllers`), so the cross-accelerator converter can read and
/// write it without a running software CPU. `read` and `write` follow the layout the software
/// CPU and the interrupt controllers save; the controllers validate every value again when the
/// converted section is restored.
struct SoftAcceleratorImage: Equatable {
  var clock: UInt64 = 0
  var cpus: [SoftCPUImage] = []
  var lapics: [SoftLAPICImage] = []
  var ioapic = SoftIOAPICImage()
  var picMaster = SoftPICChipImage()
  var picSlave = SoftPICChipImage()
  /// The 8259 pair's INTR output.
  var picOutput = false
  var pitChannels: [SoftPITChannelImage] = []
  /// PIT channel 0 interrupts due and not yet raised (lost-tick reinjection).
  var pitOwedTicks: UInt64 = 0
  /// Port 0x61's stored bits.
  var port61: UInt8 = 0
  /// The 24 GSI line levels.
  var gsiLevels: [Bool] = []

  static func read(from reader: inout StateReader) throws(MachineStateError) -> SoftAcceleratorImage {
    var image = SoftAcceleratorImage()
    image.clock = try reader.read()
    let count = Int(try reader.read(UInt32.self))
    guard count <= 255 else { throw .invalid("vCPU count") }
    for _ in 0..<count {
      image.cpus.append(
        try reader.section("cpu") { (reader) throws(MachineStateError) in try SoftCPUImage.read(from: &reader) })
    }
    try reader.section("interrupt-controllers") { (reader) throws(MachineStateError) in
      let apicCount = Int(try reader.read(UInt32.self))
      guard apicCount <= 255 else { throw .invalid("local APIC count") }
      for _ in 0..<apicCount {
        image.lapics.append(
          try reader.section("lapic") { (reader) throws(MachineStateError) in try SoftLAPICImage.read(from: &reader) })
      }
      image.ioapic = try reader.section("ioapic") { (reader) throws(MachineStateError) in
        try SoftIOAPICImage.read(from: &reader)
      }
      try reader.section("pic") { (reader) throws(MachineStateError) in
        image.picMaster = try SoftPICChipImage.read(from: &reader)
        image.picSlave = try SoftPICChipImage.read(from: &reader)
        image.picOutput = try reader.readBool()
      }
      image.pitChannels = try reader.section("pit") { (reader) throws(MachineStateError) in
        var channels: [SoftPITChannelImage] = []
        for _ in 0..<3 { channels.append(try SoftPITChannelImage.read(from: &reader)) }
        // The reinjection backlog (channel 0's owed interrupts); absent in older sections.
        image.pitOwedTicks = reader.isAtEnd ? 0 : try reader.read()
        return channels
      }
      image.port61 = try reader.section("port61") { (reader) throws(MachineStateError) in try reader.read(UInt8.self) }
      image.gsiLevels = try reader.section("gsi") { (reader) throws(MachineStateError) in
        let count = Int(try reader.read(UInt32.self))
        guard count <= 256 else { throw .invalid("GSI count") }
        var levels: [Bool] = []
        for _ in 0..<count { levels.append(try reader.readBool()) }
        return levels
      }
    }
    return image
  }

  func write(into writer: inout StateWriter) {
    writer.write(clock)
    writer.write(UInt32(cpus.count))
    for cpu in cpus { writer.section("cpu") { cpu.write(into: &$0) } }
    writer.section("interrupt-controllers") { writer in
      writer.write(UInt32(lapics.count))
      for lapic in lapics { writer.section("lapic") { lapic.write(into: &$0) } }
      writer.section("ioapic") { ioapic.write(into: &$0) }
      writer.section("pic") { writer in
        picMaster.write(into: &writer)
        picSlave.write(into: &writer)
        writer.write(picOutput)
      }
      writer.section("pit") { writer in
        for channel in pitChannels { channel.write(into: &writer) }
        writer.write(pitOwedTicks)
      }
      writer.section("port61") { $0.write(port61) }
      writer.section("gsi") { writer in
        writer.write(UInt32(gsiLevels.count))
        for level in gsiLevels { writer.write(level) }
      }
    }
  }

  /// The section's bytes.
  var bytes: [UInt8] {
    var writer = StateWriter()
    write(into: &writer)
    return writer.bytes
  }
}

/// A segment register in the software CPU's layout: the access rights are in the VMX layout
/// (type 0-3, S 4, DPL 5-6, P 7, AVL 12, L 13, D/B 14, G 15, unusable 16).
struct SoftSegmentImage: Equatable {
  var selector: UInt16 = 0
  var base: UInt64 = 0
  var limit: UInt32 = 0
  var access: UInt32 = 0

  static func read(from reader: inout StateReader) throws(MachineStateError) -> SoftSegmentImage {
    SoftSegmentImage(
      selector: try reader.read(), base: try reader.read(), limit: try reader.read(), access: try reader.read())
  }

  func write(into writer: inout StateWriter) {
    writer.write(selector)
    writer.write(base)
    writer.write(limit)
    writer.write(access)
  }
}

/// One software vCPU (section `cpu`).
struct SoftCPUImage: Equatable {
  /// RAX..R15 in encoding order (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15).
  var gpr = [UInt64](repeating: 0, count: 16)
  var rip: UInt64 = 0
  var rflags: UInt64 = 2
  var cpl: UInt8 = 0
  /// ES, CS, SS, DS, FS, GS, LDTR, TR.
  var segments = [SoftSegmentImage](repeating: SoftSegmentImage(), count: 8)
  var gdtBase: UInt64 = 0
  var gdtLimit: UInt16 = 0
  var idtBase: UInt64 = 0
  var idtLimit: UInt16 = 0
  /// CR0, CR2, CR3, CR4, CR8, EFER, APIC base, TSC offset, KERNEL_GS_BASE, STAR, LSTAR, CSTAR,
  /// SFMASK, SYSENTER_CS, SYSENTER_ESP, SYSENTER_EIP, PAT, TSC_AUX.
  var control = [UInt64](repeating: 0, count: 18)
  /// Physical registers R0-R7: (significand, sign and exponent).
  var fpuRegisters = [(UInt64, UInt16)](repeating: (0, 0), count: 8)
  var fpuTop: UInt8 = 0
  var fpuStatus: UInt16 = 0
  var fpuControl: UInt16 = 0x37F
  /// The full tag word (2 bits per physical register, 3 = empty).
  var fpuTags: UInt16 = 0xFFFF
  var fpuLastIP: UInt64 = 0
  var fpuLastDP: UInt64 = 0
  var fpuLastOpcode: UInt16 = 0
  /// XMM0-15 as (low, high) quadwords.
  var xmm = [(UInt64, UInt64)](repeating: (0, 0), count: 16)
  var mxcsr: UInt32 = 0x1F80
  var interruptShadowRIP: UInt64 = ~0
  var nmiBlocked = false
  var halted = false
  var waitingForSIPI = false
  var recheckAfterShadow = false
  var miscEnable: UInt64 = 0
  var tscDeadline: UInt64 = 0
  var debugRegisters = [UInt64](repeating: 0, count: 8)
  var apicID: UInt32 = 0
  var tscKilohertz: UInt64 = 1_000_000
  var msrs: [UInt32: UInt64] = [:]
  /// XCR0 and YMM0-15 bits 255:128 as (low, high) quadwords: the section's optional trailing
  /// extension (files written before the software CPU had XSAVE end before it).
  var xcr0: UInt64 = 1
  var ymmHigh = [(UInt64, UInt64)](repeating: (0, 0), count: 16)

  /// Indices into `control`.
  enum Control {
    static let cr0 = 0, cr2 = 1, cr3 = 2, cr4 = 3, cr8 = 4, efer = 5, apicBase = 6, tscOffset = 7
    static let kernelGSBase = 8, star = 9, lstar = 10, cstar = 11, sfmask = 12
    static let sysenterCS = 13, sysenterESP = 14, sysenterEIP = 15, pat = 16, tscAux = 17
  }

  static func == (lhs: SoftCPUImage, rhs: SoftCPUImage) -> Bool {
    var left = StateWriter()
    var right = StateWriter()
    lhs.write(into: &left)
    rhs.write(into: &right)
    return left.bytes == right.bytes
  }

  static func read(from reader: inout StateReader) throws(MachineStateError) -> SoftCPUImage {
    var cpu = SoftCPUImage()
    for index in 0..<16 { cpu.gpr[index] = try reader.read() }
    cpu.rip = try reader.read()
    cpu.rflags = try reader.read()
    cpu.cpl = try reader.read()
    for index in 0..<8 { cpu.segments[index] = try SoftSegmentImage.read(from: &reader) }
    cpu.gdtBase = try reader.read()
    cpu.gdtLimit = try reader.read()
    cpu.idtBase = try reader.read()
    cpu.idtLimit = try reader.read()
    for index in 0..<18 { cpu.control[index] = try reader.read() }
    for index in 0..<8 { cpu.fpuRegisters[index] = (try reader.read(), try reader.read()) }
    cpu.fpuTop = try reader.read()
    cpu.fpuStatus = try reader.read()
    cpu.fpuControl = try reader.read()
    cpu.fpuTags = try reader.read()
    cpu.fpuLastIP = try reader.read()
    cpu.fpuLastDP = try reader.read()
    cpu.fpuLastOpcode = try reader.read()
    for index in 0..<16 { cpu.xmm[index] = (try reader.read(), try reader.read()) }
    cpu.mxcsr = try reader.read()
    cpu.interruptShadowRIP = try reader.read()
    cpu.nmiBlocked = try reader.readBool()
    cpu.halted = try reader.readBool()
    cpu.waitingForSIPI = try reader.readBool()
    cpu.recheckAfterShadow = try reader.readBool()
    cpu.miscEnable = try reader.read()
    cpu.tscDeadline = try reader.read()
    cpu.debugRegisters = try reader.readArray(UInt64.self, count: 8, "debug register set")
    cpu.apicID = try reader.read()
    cpu.tscKilohertz = try reader.read()
    let msrCount = Int(try reader.read(UInt32.self))
    guard msrCount <= 4096 else { throw .invalid("MSR count") }
    for _ in 0..<msrCount { cpu.msrs[try reader.read(UInt32.self)] = try reader.read(UInt64.self) }
    if !reader.isAtEnd {
      cpu.xcr0 = try reader.read()
      for index in 0..<16 { cpu.ymmHigh[index] = (try reader.read(), try reader.read()) }
    }
    return cpu
  }

  func write(into writer: inout StateWriter) {
    for value in gpr { writer.write(value) }
    writer.write(rip)
    writer.write(rflags)
    writer.write(cpl)
    for segment in segments { segment.write(into: &writer) }
    writer.write(gdtBase)
    writer.write(gdtLimit)
    writer.write(idtBase)
    writer.write(idtLimit)
    for value in control { writer.write(value) }
    for register in fpuRegisters {
      writer.write(register.0)
      writer.write(register.1)
    }
    writer.write(fpuTop)
    writer.write(fpuStatus)
    writer.write(fpuControl)
    writer.write(fpuTags)
    writer.write(fpuLastIP)
    writer.write(fpuLastDP)
    writer.write(fpuLastOpcode)
    for value in xmm {
      writer.write(value.0)
      writer.write(value.1)
    }
    writer.write(mxcsr)
    writer.write(interruptShadowRIP)
    writer.write(nmiBlocked)
    writer.write(halted)
    writer.write(waitingForSIPI)
    writer.write(recheckAfterShadow)
    writer.write(miscEnable)
    writer.write(tscDeadline)
    writer.write(array: debugRegisters)
    writer.write(apicID)
    writer.write(tscKilohertz)
    writer.write(UInt32(msrs.count))
    for (index, value) in msrs.sorted(by: { $0.key < $1.key }) {
      writer.write(index)
      writer.write(value)
    }
    writer.write(xcr0)
    for value in ymmHigh {
      writer.write(value.0)
      writer.write(value.1)
    }
  }
}

/// One local APIC (section `lapic`). The vector sets are four 64-bit words (vector 64 × word +
/// bit).
struct SoftLAPICImage: Equatable {
  var id: UInt8 = 0
  var isBSP = false
  var apicBase: UInt64 = 0
  var tpr: UInt32 = 0
  var ldr: UInt32 = 0
  var dfr: UInt32 = 0xFFFF_FFFF
  var svr: UInt32 = 0xFF
  var isr = [UInt64](repeating: 0, count: 4)
  var tmr = [UInt64](repeating: 0, count: 4)
  var irr = [UInt64](repeating: 0, count: 4)
  var errorsPending: UInt32 = 0
  var errorStatus: UInt32 = 0
  var icrLow: UInt32 = 0
  var icrHigh: UInt32 = 0
  /// Timer, thermal, performance, LINT0, LINT1, error.
  var lvt = [UInt32](repeating: 1 << 16, count: 6)
  var divideConfiguration: UInt32 = 0
  var initialCount: UInt32 = 0
  var timerStart: UInt64 = 0
  var timerNextFire: UInt64?
  var tscDeadline: UInt64 = 0
  var nmiPending = false
  var initPending = false
  var startupVector: UInt8?
  var waitingForStartup = false
  var lintLevels = [false, false]
  var externalInterruptLatched = false
  /// The current count at `timerStart`.
  var timerCountAtStart: UInt64 = 0

  static func read(from reader: inout StateReader) throws(MachineStateError) -> SoftLAPICImage {
    var apic = SoftLAPICImage()
    apic.id = try reader.read()
    apic.isBSP = try reader.readBool()
    apic.apicBase = try reader.read()
    apic.tpr = try reader.read()
    apic.ldr = try reader.read()
    apic.dfr = try reader.read()
    apic.svr = try reader.read()
    for index in 0..<4 { apic.isr[index] = try reader.read() }
    for index in 0..<4 { apic.tmr[index] = try reader.read() }
    for index in 0..<4 { apic.irr[index] = try reader.read() }
    apic.errorsPending = try reader.read()
    apic.errorStatus = try reader.read()
    apic.icrLow = try reader.read()
    apic.icrHigh = try reader.read()
    apic.lvt = try reader.readArray(UInt32.self, count: 6, "local APIC LVT")
    apic.divideConfiguration = try reader.read()
    apic.initialCount = try reader.read()
    apic.timerStart = try reader.read()
    apic.timerNextFire = try reader.readOptional(UInt64.self)
    apic.tscDeadline = try reader.read()
    apic.nmiPending = try reader.readBool()
    apic.initPending = try reader.readBool()
    apic.startupVector = try reader.readOptional(UInt8.self)
    apic.waitingForStartup = try reader.readBool()
    apic.lintLevels = [try reader.readBool(), try reader.readBool()]
    apic.externalInterruptLatched = try reader.readBool()
    apic.timerCountAtStart = reader.isAtEnd ? UInt64(apic.initialCount) : try reader.read()
    return apic
  }

  func write(into writer: inout StateWriter) {
    writer.write(id)
    writer.write(isBSP)
    writer.write(apicBase)
    for value in [tpr, ldr, dfr, svr] { writer.write(value) }
    for set in [isr, tmr, irr] {
      for word in set { writer.write(word) }
    }
    for value in [errorsPending, errorStatus, icrLow, icrHigh] { writer.write(value) }
    writer.write(array: lvt)
    writer.write(divideConfiguration)
    writer.write(initialCount)
    writer.write(timerStart)
    writer.write(optional: timerNextFire)
    writer.write(tscDeadline)
    writer.write(nmiPending)
    writer.write(initPending)
    writer.write(optional: startupVector)
    writer.write(waitingForStartup)
    writer.write(lintLevels[0])
    writer.write(lintLevels[1])
    writer.write(externalInterruptLatched)
    writer.write(timerCountAtStart)
  }
}

/// The IOAPIC (section `ioapic`).
struct SoftIOAPICImage: Equatable {
  var id: UInt32 = 0
  var selector: UInt32 = 0
  var entries = [UInt64](repeating: 1 << 16, count: 24)
  var levels = [Bool](repeating: false, count: 24)

  static func read(from reader: inout StateReader) throws(MachineStateError) -> SoftIOAPICImage {
    var ioapic = SoftIOAPICImage()
    ioapic.id = try reader.read()
    ioapic.selector = try reader.read()
    ioapic.entries = try reader.readArray(UInt64.self, count: 24, "IOAPIC redirection table")
    guard Int(try reader.read(UInt32.self)) == 24 else { throw .invalid("IOAPIC pin count") }
    for pin in 0..<24 { ioapic.levels[pin] = try reader.readBool() }
    return ioapic
  }

  func write(into writer: inout StateWriter) {
    writer.write(id)
    writer.write(selector)
    writer.write(array: entries)
    writer.write(UInt32(levels.count))
    for level in levels { writer.write(level) }
  }
}

/// One 8259 (half of section `pic`). `initStep`: 0 ready, 2/3/4 waiting for ICW2/ICW3/ICW4.
struct SoftPICChipImage: Equatable {
  var irr: UInt8 = 0
  var isr: UInt8 = 0
  var imr: UInt8 = 0
  var lineLevels: UInt8 = 0
  var elcr: UInt8 = 0
  var vectorBase: UInt8 = 0
  var initStep: UInt8 = 0
  var lowestPriority: UInt8 = 7
  var expectsICW4 = false
  var singleMode = false
  var autoEOI = false
  var rotateOnAutoEOI = false
  var specialFullyNested = false
  var specialMask = false
  var readISR = false
  var pollPending = false

  static func read(from reader: inout StateReader) throws(MachineStateError) -> SoftPICChipImage {
    var chip = SoftPICChipImage()
    chip.irr = try reader.read()
    chip.isr = try reader.read()
    chip.imr = try reader.read()
    chip.lineLevels = try reader.read()
    chip.elcr = try reader.read()
    chip.vectorBase = try reader.read()
    chip.initStep = try reader.read()
    chip.lowestPriority = try reader.read()
    chip.expectsICW4 = try reader.readBool()
    chip.singleMode = try reader.readBool()
    chip.autoEOI = try reader.readBool()
    chip.rotateOnAutoEOI = try reader.readBool()
    chip.specialFullyNested = try reader.readBool()
    chip.specialMask = try reader.readBool()
    chip.readISR = try reader.readBool()
    chip.pollPending = try reader.readBool()
    return chip
  }

  func write(into writer: inout StateWriter) {
    for value in [irr, isr, imr, lineLevels, elcr, vectorBase, initStep, lowestPriority] { writer.write(value) }
    for flag in [
      expectsICW4, singleMode, autoEOI, rotateOnAutoEOI, specialFullyNested, specialMask, readISR, pollPending,
    ] {
      writer.write(flag)
    }
  }

  /// The INT output of this chip: an unmasked request above every in-service level (fully
  /// nested priority from `lowestPriority + 1`).
  var output: Bool {
    func rank(_ bits: UInt8) -> Int? {
      for rank in 0..<8 where bits & (1 << ((Int(lowestPriority) + 1 + rank) & 7)) != 0 { return rank }
      return nil
    }
    guard let request = rank(irr & ~imr) else { return false }
    guard !specialMask, let service = rank(isr) else { return true }
    return request < service
  }
}

/// One 8254 counter (a third of section `pit`).
struct SoftPITChannelImage: Equatable {
  var mode: UInt8 = 0
  /// 1 = low byte, 2 = high byte, 3 = low then high.
  var access: UInt8 = 3
  var bcd = false
  var reload: UInt32 = 0x10000
  var nullCount = true
  var writeHighNext = false
  var pendingLow: UInt8 = 0
  var readHighNext = false
  var latchedCount: UInt16?
  var latchedCountHighNext = false
  var latchedStatus: UInt8?
  var gate = false
  var armed = false
  var baseTicks: UInt64 = 0
  var runningSince: UInt64?
  var nextEventTick: UInt64?

  static func read(from reader: inout StateReader) throws(MachineStateError) -> SoftPITChannelImage {
    var channel = SoftPITChannelImage()
    channel.mode = try reader.read()
    channel.access = try reader.read()
    channel.bcd = try reader.readBool()
    channel.reload = try reader.read()
    channel.nullCount = try reader.readBool()
    channel.writeHighNext = try reader.readBool()
    channel.pendingLow = try reader.read()
    channel.readHighNext = try reader.readBool()
    channel.latchedCount = try reader.readOptional(UInt16.self)
    channel.latchedCountHighNext = try reader.readBool()
    channel.latchedStatus = try reader.readOptional(UInt8.self)
    channel.gate = try reader.readBool()
    channel.armed = try reader.readBool()
    channel.baseTicks = try reader.read()
    channel.runningSince = try reader.readOptional(UInt64.self)
    channel.nextEventTick = try reader.readOptional(UInt64.self)
    return channel
  }

  func write(into writer: inout StateWriter) {
    writer.write(mode)
    writer.write(access)
    writer.write(bcd)
    writer.write(reload)
    writer.write(nullCount)
    writer.write(writeHighNext)
    writer.write(pendingLow)
    writer.write(readHighNext)
    writer.write(optional: latchedCount)
    writer.write(latchedCountHighNext)
    writer.write(optional: latchedStatus)
    writer.write(gate)
    writer.write(armed)
    writer.write(baseTicks)
    writer.write(optional: runningSince)
    writer.write(optional: nextEventTick)
  }
}
