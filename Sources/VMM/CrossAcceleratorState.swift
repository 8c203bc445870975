import CShim
import InterruptControllers
import KVMBackend
import SoftCPU
import VMCore

/// Moves a machine's `accelerator` section between KVM and the software CPU
/// (docs/machine-state.md, "Across accelerators"). A snapshot's KVM section holds the kernel's
/// structures, a software-CPU section the software CPU's own state; each direction starts from
/// the state the freshly built target machine holds (so everything the source does not say
/// keeps its power-on value), overwrites it with the source's architectural state and restores
/// the result through the target's ordinary restore path, which validates it again. A source
/// state that uses something the target cannot provide is refused with one line before
/// anything is applied.
enum CrossAcceleratorState {
  // MARK: Entry point

  /// Restores the `accelerator` and `legacy-devices` section contents of a snapshot taken on
  /// `source` into `machine`, whose accelerator is the other one.
  static func restore(
    acceleratorSection: [UInt8], legacyDevicesSection: [UInt8], source: String, into machine: VirtualMachine
  ) throws(MachineStateError) {
    var reader = StateReader(bytes: acceleratorSection)
    var legacyReader = StateReader(bytes: legacyDevicesSection)
    var legacyDevices: [(tag: String, content: [UInt8])] = []
    for tag in ["uart", "i8042", "cmos", "port92"] {
      legacyDevices.append(
        (tag, try legacyReader.section(tag) { (reader) throws(MachineStateError) in try reader.remainingBytes() }))
    }
    var legacyPort61: UInt8?
    if try legacyReader.readBool() {
      legacyPort61 = try legacyReader.section("port61") { (reader) throws(MachineStateError) in
        try reader.read(UInt8.self)
      }
    }
    guard legacyReader.isAtEnd else { throw .invalid("legacy device section (trailing bytes)") }
    let port61: UInt8
    if let soft = machine.accelerator as? SoftAccelerator, source == "kvm" {
      let kvmState = try KVMMachineState.read(from: &reader, cpuCount: machine.configuration.cpuCount)
      guard reader.isAtEnd else { throw .invalid("KVM accelerator section (trailing bytes)") }
      var templateWriter = StateWriter()
      soft.saveState(into: &templateWriter)
      var templateReader = StateReader(bytes: templateWriter.bytes)
      var image = try SoftAcceleratorImage.read(from: &templateReader)
      try convert(kvmState, into: &image)
      if let legacyPort61 { image.port61 = legacyPort61 }
      port61 = image.port61
      var converted = StateReader(bytes: image.bytes)
      try soft.restoreState(from: &converted)
    } else if let kvm = machine.accelerator as? KVMAccelerator, source == "soft" {
      let image = try SoftAcceleratorImage.read(from: &reader)
      guard reader.isAtEnd else { throw .invalid("software-CPU accelerator section (trailing bytes)") }
      guard image.cpus.count == machine.configuration.cpuCount, image.lapics.count == image.cpus.count,
        image.pitChannels.count == 3
      else {
        throw MachineStateError(
          "the state file does not match this machine: it has \(image.cpus.count) vCPUs, this machine "
            + "\(machine.configuration.cpuCount)")
      }
      var state = try kvm.captureState()
      try convert(image, into: &state, memory: machine.parts.memory)
      try kvm.applyState(state)
      port61 = legacyPort61 ?? image.port61
    } else {
      throw MachineStateError(
        "cannot move a machine from the \(source) accelerator to the \(machine.accelerator.name) accelerator")
    }
    // Port 0x61 lives with the software CPU's PIT, and in a KVM machine's legacy devices when
    // the kernel does not answer it (KVM's in-kernel PIT keeps the channel 2 gate itself).
    var writer = StateWriter()
    for device in legacyDevices { writer.section(device.tag) { $0.append(raw: device.content) } }
    writer.write(machine.devices.systemControlB != nil)
    if machine.devices.systemControlB != nil { writer.section("port61") { $0.write(port61) } }
    var converted = StateReader(bytes: writer.bytes)
    try machine.devices.restoreState(from: &converted)
  }

  // MARK: KVM → software CPU

  /// Architectural MSRs the software CPU keeps in its own fields or its MSR table.
  static let storedSoftMSRs: Set<UInt32> = Set(
    [0x2FF, 0x250, 0x258, 0x259, 0x3A, 0x3B] + Array(0x200...0x20F) + Array(0x268...0x26F))

  /// Paravirtual MSRs whose enable bit (bit 0) the software CPU cannot honour.
  static let paravirtualMSRs: [(index: UInt32, name: String)] = [
    (0x12, "kvmclock"), (0x4B56_4D01, "kvmclock"), (0x4B56_4D02, "asynchronous page faults"),
    (0x4B56_4D03, "steal time"), (0x4B56_4D04, "paravirtual EOI"),
  ]

  /// Fills `image` (the target's own state) from `state`.
  static func convert(_ state: KVMMachineState, into image: inout SoftAcceleratorImage) throws(MachineStateError) {
    guard state.vcpus.count == image.cpus.count, image.lapics.count == image.cpus.count else {
      throw MachineStateError("the state file does not match this machine: its vCPU count differs")
    }
    image.clock = state.clock
    for (index, vcpu) in state.vcpus.enumerated() {
      try convert(vcpu, clock: state.clock, cpu: &image.cpus[index], lapic: &image.lapics[index], index: index)
    }
    // Interrupt controllers.
    let master = state.irqchips[0].chip.pic
    let slave = state.irqchips[1].chip.pic
    image.picMaster = convert(master, template: image.picMaster)
    image.picSlave = convert(slave, template: image.picSlave)
    image.picOutput = image.picMaster.output
    if let bsp = image.lapics.firstIndex(where: { $0.isBSP }) { image.lapics[bsp].lintLevels[0] = image.picOutput }
    var ioapic = state.irqchips[2].chip.ioapic
    image.ioapic.id = ioapic.id & 0xF
    image.ioapic.selector = ioapic.ioregsel
    let entries: [UInt64] = withUnsafeBytes(of: &ioapic) { raw in
      (0..<24).map { raw.loadUnaligned(fromByteOffset: redirectionTableOffset + 8 * $0, as: UInt64.self) }
    }
    image.ioapic.entries = entries
    // KVM's IRR holds the asserted level-triggered pins; edge-triggered pins are idle.
    for pin in 0..<24 {
      image.ioapic.levels[pin] = ioapic.irr & (1 << UInt32(pin)) != 0 && entries[pin] & (1 << 15) != 0
    }
    let isaLevels = UInt16(master.last_irr) | UInt16(slave.last_irr) << 8
    for gsi in image.gsiLevels.indices {
      let level: Bool = gsi < 16 ? isaLevels & (1 << UInt16(gsi)) != 0 : gsi < 24 && image.ioapic.levels[gsi]
      image.gsiLevels[gsi] = level
    }
    var pit = state.pit
    withUnsafeMutablePointer(to: &pit.channels) { pointer in
      pointer.withMemoryRebound(to: kvm_pit_channel_state.self, capacity: 3) { channels in
        for index in 0..<3 {
          image.pitChannels[index] = convert(channels[index], template: image.pitChannels[index], clock: state.clock)
        }
      }
    }
  }

  private static func convert(
    _ vcpu: KVMVCPUState, clock: UInt64, cpu: inout SoftCPUImage, lapic: inout SoftLAPICImage, index: Int
  ) throws(MachineStateError) {
    let prefix = "cannot move vCPU \(index) to the software CPU"
    let regs = vcpu.registers
    let sregs = vcpu.specialRegisters
    var msrs: [UInt32: UInt64] = [:]
    for msr in vcpu.msrs { msrs[msr.index] = msr.value }
    // What the software CPU cannot provide.
    let unsupportedCR4 = sregs.cr4 & ~SoftCPU.CPU.supportedCR4Bits
    guard unsupportedCR4 == 0 else {
      throw MachineStateError(
        "\(prefix): the guest enabled CR4 bits \(hex(unsupportedCR4)) (\(cr4Names(unsupportedCR4)))")
    }
    let unsupportedEFER = sregs.efer & ~(X86.eferSCE | X86.eferLME | X86.eferLMA | X86.eferNXE)
    guard unsupportedEFER == 0 else {
      throw MachineStateError("\(prefix): the guest set EFER bits \(hex(unsupportedEFER))")
    }
    if let xcrs = vcpu.xcrs, xcrs.nr_xcrs > 0 {
      let xcr0 = xcrs.xcrs.0.value
      guard xcr0 & ~softXSAVEComponents == 0 else {
        throw MachineStateError("\(prefix): the guest enabled XSAVE state components \(hex(xcr0)) (beyond AVX)")
      }
      cpu.xcr0 = xcr0 | 1
    }
    guard sregs.apic_base & (1 << 10) == 0 else { throw MachineStateError("\(prefix): the guest uses x2APIC mode") }
    for (msr, name) in paravirtualMSRs where (msrs[msr] ?? 0) & 1 != 0 {
      throw MachineStateError("\(prefix): the guest uses KVM's \(name) (MSR \(hex(msr)))")
    }
    guard (msrs[0xDA0] ?? 0) == 0 else { throw MachineStateError("\(prefix): the guest set IA32_XSS") }
    let events = vcpu.events
    guard events.exception.injected == 0, events.exception.pending == 0 else {
      throw MachineStateError("\(prefix): an exception (vector \(events.exception.nr)) is being delivered")
    }
    guard events.interrupt.injected == 0 || events.interrupt.soft == 0 else {
      throw MachineStateError("\(prefix): a software interrupt is being delivered")
    }
    guard events.smi.smm == 0 else { throw MachineStateError("\(prefix): the vCPU is in system-management mode") }

    cpu.gpr = [
      regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi,
      regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
    ]
    cpu.rip = regs.rip
    cpu.rflags = regs.rflags | 2
    cpu.segments = [sregs.es, sregs.cs, sregs.ss, sregs.ds, sregs.fs, sregs.gs, sregs.ldt, sregs.tr].map(softSegment)
    if sregs.cr0 & X86.cr0PE == 0 {
      cpu.cpl = 0
    } else if regs.rflags & (1 << 17) != 0 {
      cpu.cpl = 3
    } else {
      cpu.cpl = sregs.ss.dpl & 3
    }
    cpu.gdtBase = sregs.gdt.base
    cpu.gdtLimit = sregs.gdt.limit
    cpu.idtBase = sregs.idt.base
    cpu.idtLimit = sregs.idt.limit
    typealias C = SoftCPUImage.Control
    cpu.control[C.cr0] = sregs.cr0
    cpu.control[C.cr2] = sregs.cr2
    cpu.control[C.cr3] = sregs.cr3
    cpu.control[C.cr4] = sregs.cr4
    cpu.control[C.cr8] = sregs.cr8
    cpu.control[C.efer] = sregs.efer
    cpu.control[C.apicBase] = sregs.apic_base
    // The TSC continues from its value at the snapshot, at the software CPU's frequency.
    if let tsc = msrs[0x10] {
      cpu.control[C.tscOffset] = tsc &- softTSCTicks(nanoseconds: clock, kilohertz: cpu.tscKilohertz)
    }
    let msrFields: [(UInt32, Int)] = [
      (0xC000_0102, C.kernelGSBase), (0xC000_0081, C.star), (0xC000_0082, C.lstar), (0xC000_0083, C.cstar),
      (0xC000_0084, C.sfmask), (0x174, C.sysenterCS), (0x175, C.sysenterESP), (0x176, C.sysenterEIP),
      (0x277, C.pat), (0xC000_0103, C.tscAux),
    ]
    for (msr, field) in msrFields { if let value = msrs[msr] { cpu.control[field] = value } }
    if let value = msrs[0x1A0] { cpu.miscEnable = value }
    for (msr, value) in msrs where storedSoftMSRs.contains(msr) { cpu.msrs[msr] = value }

    try convertFloatingPoint(from: vcpu, into: &cpu)

    var debug = vcpu.debugRegisters
    let debugValues = withUnsafeBytes(of: &debug) { raw in
      (0..<6).map { raw.loadUnaligned(fromByteOffset: 8 * $0, as: UInt64.self) }
    }
    cpu.debugRegisters = [
      debugValues[0], debugValues[1], debugValues[2], debugValues[3], debugValues[4], debugValues[5], debugValues[4],
      debugValues[5],
    ]

    // Interrupt shadow, NMI and the MP state.
    let mpState = vcpu.mpState.mp_state
    let shadow = events.interrupt.shadow != 0
    cpu.interruptShadowRIP = shadow ? regs.rip : ~0
    cpu.recheckAfterShadow = shadow
    cpu.nmiBlocked = events.nmi.masked != 0 && events.nmi.injected == 0
    cpu.halted = mpState == UInt32(KVM_MP_STATE_HALTED)
    cpu.waitingForSIPI = mpState == UInt32(KVM_MP_STATE_UNINITIALIZED) || mpState == UInt32(KVM_MP_STATE_SIPI_RECEIVED)

    // The local APIC.
    var page = vcpu.lapic
    let register = { (offset: Int) -> UInt32 in
      withUnsafeBytes(of: &page) { $0.loadUnaligned(fromByteOffset: offset, as: UInt32.self) }
    }
    lapic.id = UInt8(truncatingIfNeeded: register(0x20) >> 24)
    lapic.apicBase = sregs.apic_base
    lapic.tpr = register(0x80) & 0xFF
    lapic.ldr = register(0xD0) & 0xFF00_0000
    lapic.dfr = register(0xE0) | 0x0FFF_FFFF
    lapic.svr = register(0xF0) & 0x13FF
    func vectorSet(_ base: Int) -> [UInt64] {
      (0..<4).map { word in UInt64(register(base + 0x20 * word)) | UInt64(register(base + 0x20 * word + 0x10)) << 32 }
    }
    lapic.isr = vectorSet(0x100)
    lapic.tmr = vectorSet(0x180)
    lapic.irr = vectorSet(0x200)
    lapic.errorsPending = 0
    lapic.errorStatus = register(0x280)
    lapic.icrLow = register(0x300) & ~(1 << 12)
    lapic.icrHigh = register(0x310) & 0xFF00_0000
    let writableLVT: [UInt32] = [0x700FF, 0x107FF, 0x107FF, 0x1A7FF, 0x1A7FF, 0x100FF]
    lapic.lvt = (0..<6).map { register(0x320 + 0x10 * $0) & writableLVT[$0] }
    lapic.divideConfiguration = register(0x3E0) & 0xB
    lapic.initialCount = register(0x380)
    let timerMode = (lapic.lvt[0] >> 17) & 3
    let code = ((lapic.divideConfiguration & 8) >> 1) | (lapic.divideConfiguration & 3)
    let divisor: UInt64 = code == 7 ? 1 : 2 << UInt64(code)
    lapic.tscDeadline = 0
    lapic.timerNextFire = nil
    lapic.timerStart = clock
    lapic.timerCountAtStart = 0
    if timerMode == 2 {
      let deadline = msrs[0x6E0] ?? 0
      lapic.tscDeadline = deadline
      if deadline != 0 {
        let offset = cpu.control[C.tscOffset]
        lapic.timerNextFire = deadline > offset ? TimeBase.nanoseconds(atTSC: deadline - offset) : 0
      }
    } else if register(0x390) != 0 {
      // The APIC timer counts at 1 GHz / divisor on both accelerators.
      lapic.timerCountAtStart = UInt64(register(0x390))
      lapic.timerNextFire = clock &+ lapic.timerCountAtStart &* divisor
    }
    lapic.nmiPending = events.nmi.pending != 0 || events.nmi.injected != 0
    lapic.initPending = mpState == UInt32(KVM_MP_STATE_INIT_RECEIVED)
    lapic.startupVector =
      mpState == UInt32(KVM_MP_STATE_SIPI_RECEIVED) ? UInt8(truncatingIfNeeded: events.sipi_vector) : nil
    lapic.waitingForStartup = cpu.waitingForSIPI
    lapic.lintLevels[1] = false
    lapic.externalInterruptLatched = false
    // An external interrupt KVM was delivering goes back to the APIC's request register.
    if events.interrupt.injected != 0 {
      let vector = Int(events.interrupt.nr)
      let bit: UInt64 = 1 << UInt64(vector & 63)
      if lapic.isr[vector >> 6] & bit != 0 && highestVector(lapic.isr) == vector { lapic.isr[vector >> 6] &= ~bit }
      lapic.irr[vector >> 6] |= bit
    }
  }

  /// The x87 and SSE state from the legacy region of the XSAVE area (or `kvm_fpu`).
  private static func convertFloatingPoint(from vcpu: KVMVCPUState, into cpu: inout SoftCPUImage)
    throws(MachineStateError)
  {
    var legacy: [UInt8]
    var components: UInt64 = 3
    if let xsave = vcpu.xsave {
      legacy = Array(xsave[0..<512])
      components = load(xsave, 512, UInt64.self)
    } else if var fpu = vcpu.fpu {
      legacy = [UInt8](repeating: 0, count: 512)
      withUnsafeBytes(of: &fpu) { raw in
        let bytes = Array(raw)
        for index in 0..<8 {
          legacy.replaceSubrange((32 + 16 * index)..<(42 + 16 * index), with: bytes[(16 * index)..<(16 * index + 10)])
        }
        legacy.replaceSubrange(0..<4, with: bytes[128..<132])  // FCW, FSW
        legacy[4] = bytes[132]  // abridged tags
        legacy.replaceSubrange(6..<24, with: bytes[134..<152])  // FOP, FIP, FDP
        legacy.replaceSubrange(24..<28, with: bytes[408..<412])  // MXCSR
        legacy.replaceSubrange(160..<416, with: bytes[152..<408])  // XMM0-15
      }
    } else {
      throw MachineStateError("the KVM state has no x87/SSE state")
    }
    if components & 1 == 0 {
      cpu.fpuControl = 0x37F
      cpu.fpuStatus = 0
      cpu.fpuTop = 0
      cpu.fpuTags = 0xFFFF
      cpu.fpuLastOpcode = 0
      cpu.fpuLastIP = 0
      cpu.fpuLastDP = 0
      cpu.fpuRegisters = [(UInt64, UInt16)](repeating: (0, 0), count: 8)
    } else {
      cpu.fpuControl = load(legacy, 0, UInt16.self)
      let status = load(legacy, 2, UInt16.self)
      cpu.fpuTop = UInt8((status >> 11) & 7)
      cpu.fpuStatus = status & ~0x3800
      cpu.fpuLastOpcode = load(legacy, 6, UInt16.self) & 0x7FF
      cpu.fpuLastIP = load(legacy, 8, UInt64.self)
      cpu.fpuLastDP = load(legacy, 16, UInt64.self)
      for index in 0..<8 {
        let physical = (Int(cpu.fpuTop) + index) & 7
        cpu.fpuRegisters[physical] = (
          load(legacy, 32 + 16 * index, UInt64.self), load(legacy, 40 + 16 * index, UInt16.self)
        )
      }
      let abridged = legacy[4]
      var tags: UInt16 = 0
      for register in 0..<8 {
        let tag = abridged & (1 << UInt8(register)) != 0 ? x87Tag(cpu.fpuRegisters[register]) : 3
        tags |= tag << (2 * UInt16(register))
      }
      cpu.fpuTags = tags
    }
    let mxcsr = load(legacy, 24, UInt32.self)
    guard mxcsr & ~0xFFFF == 0 else {
      throw MachineStateError("the KVM state holds an MXCSR the software CPU cannot load")
    }
    cpu.mxcsr = mxcsr
    for index in 0..<16 {
      cpu.xmm[index] =
        components & 2 == 0
        ? (0, 0) : (load(legacy, 160 + 16 * index, UInt64.self), load(legacy, 168 + 16 * index, UInt64.self))
    }
    // The AVX component (YMM_Hi128) at its standard-format offset; a clear XSTATE_BV bit means
    // the initial state (zero upper halves).
    for index in 0..<16 {
      if let xsave = vcpu.xsave, components & 4 != 0, xsave.count >= avxOffset + 256 {
        cpu.ymmHigh[index] = (
          load(xsave, avxOffset + 16 * index, UInt64.self), load(xsave, avxOffset + 8 + 16 * index, UInt64.self)
        )
      } else {
        cpu.ymmHigh[index] = (0, 0)
      }
    }
  }

  /// XCR0 components the software CPU implements: x87, SSE, AVX.
  static let softXSAVEComponents: UInt64 = 7
  /// Offset of the AVX state component (YMM_Hi128) in a standard-format XSAVE area (Intel SDM
  /// Vol. 1 §13.4; CPUID.(EAX=0DH, ECX=2):EBX).
  static let avxOffset = 576

  /// The full-tag-word value of an x87 register that is not empty (SDM Vol. 1 §8.1.7).
  static func x87Tag(_ register: (significand: UInt64, signAndExponent: UInt16)) -> UInt16 {
    let exponent = register.signAndExponent & 0x7FFF
    if exponent == 0 { return register.significand == 0 ? 1 : 2 }
    if exponent == 0x7FFF || register.significand >> 63 == 0 { return 2 }
    return 0
  }

  private static func convert(_ pic: kvm_pic_state, template: SoftPICChipImage) -> SoftPICChipImage {
    var chip = template
    chip.irr = pic.irr
    chip.isr = pic.isr
    chip.imr = pic.imr
    chip.lineLevels = pic.last_irr
    chip.elcr = pic.elcr & pic.elcr_mask
    chip.vectorBase = pic.irq_base & 0xF8
    chip.initStep = pic.init_state == 0 ? 0 : min(pic.init_state, 3) + 1
    chip.lowestPriority = (pic.priority_add &+ 7) & 7
    chip.expectsICW4 = pic.init4 != 0
    chip.singleMode = false
    chip.autoEOI = pic.auto_eoi != 0
    chip.rotateOnAutoEOI = pic.rotate_on_auto_eoi != 0
    chip.specialFullyNested = pic.special_fully_nested_mode != 0
    chip.specialMask = pic.special_mask != 0
    chip.readISR = pic.read_reg_select != 0
    chip.pollPending = pic.poll != 0
    return chip
  }

  /// KVM's counter state machine (RW_STATE_LSB 1, MSB 2, WORD0 3, WORD1 4).
  private static func convert(_ channel: kvm_pit_channel_state, template: SoftPITChannelImage, clock: UInt64)
    -> SoftPITChannelImage
  {
    var converted = template
    converted.gate = channel.gate != 0
    guard channel.mode <= 5, (1...3).contains(channel.rw_mode) else { return converted }
    converted.mode = channel.mode
    converted.access = channel.rw_mode
    converted.bcd = channel.bcd != 0
    converted.reload = channel.count == 0 ? 0x10000 : min(channel.count, 0x10000)
    converted.nullCount = false
    converted.writeHighNext = channel.write_state == 4
    converted.pendingLow = channel.write_latch
    converted.readHighNext = channel.read_state == 4
    converted.latchedCount = channel.count_latched != 0 ? channel.latched_count : nil
    converted.latchedCountHighNext = channel.count_latched == 4
    converted.latchedStatus = channel.status_latched != 0 ? channel.status : nil
    // KVM restarts a loaded counter from its full count on restore; so does this conversion.
    converted.armed = true
    converted.baseTicks = 0
    converted.runningSince = converted.gate || channel.mode == 1 || channel.mode == 5 ? clock : nil
    converted.nextEventTick = UInt64(converted.reload)
    return converted
  }

  // MARK: Software CPU → KVM

  /// Fills `state` (the target's own KVM state) from `image`.
  static func convert(_ image: SoftAcceleratorImage, into state: inout KVMMachineState, memory: GuestMemory)
    throws(MachineStateError)
  {
    state.clock = image.clock
    for index in state.vcpus.indices {
      try convert(
        image.cpus[index], lapic: image.lapics[index], clock: image.clock, into: &state.vcpus[index], index: index,
        memory: memory)
    }
    state.irqchips[0].chip.pic = convert(image.picMaster, template: state.irqchips[0].chip.pic)
    state.irqchips[1].chip.pic = convert(image.picSlave, template: state.irqchips[1].chip.pic)
    var ioapic = state.irqchips[2].chip.ioapic
    ioapic.id = image.ioapic.id & 0xF
    ioapic.ioregsel = image.ioapic.selector
    ioapic.irr = 0
    for pin in 0..<24 where image.ioapic.levels[pin] && image.ioapic.entries[pin] & (1 << 15) != 0 {
      ioapic.irr |= 1 << UInt32(pin)
    }
    withUnsafeMutableBytes(of: &ioapic) { raw in
      for pin in 0..<24 {
        raw.storeBytes(of: image.ioapic.entries[pin], toByteOffset: redirectionTableOffset + 8 * pin, as: UInt64.self)
      }
    }
    state.irqchips[2].chip.ioapic = ioapic
    withUnsafeMutablePointer(to: &state.pit.channels) { pointer in
      pointer.withMemoryRebound(to: kvm_pit_channel_state.self, capacity: 3) { channels in
        for index in 0..<3 { channels[index] = convert(image.pitChannels[index], template: channels[index]) }
      }
    }
  }

  private static func convert(
    _ cpu: SoftCPUImage, lapic: SoftLAPICImage, clock: UInt64, into vcpu: inout KVMVCPUState, index: Int,
    memory: GuestMemory
  ) throws(MachineStateError) {
    typealias C = SoftCPUImage.Control
    // Features of the model the host's KVM lacks are refused only where the state shows their
    // use; an instruction the guest may execute later leaves no trace (docs/machine-state.md).
    // The target presents the snapshot's CPU model (its KVM machine was refused otherwise), so
    // everything the model offers is there; XCR0 can only hold what KVM's XSAVE area holds.
    let kvmFeatures = CPUIDPolicy.availableFeatures(supported: vcpu.cpuid)
    let kvmComponents = UInt64(kvmFeatures.xsaveComponents)
    guard cpu.xcr0 & ~(kvmComponents | 1) == 0, cpu.xcr0 & 4 == 0 || vcpu.xsave != nil else {
      throw MachineStateError(
        "cannot move vCPU \(index) to KVM: the guest enabled XSAVE state components \(hex(cpu.xcr0)), "
          + "which this host's KVM does not offer")
    }
    if kvmFeatures.extendedEDX & (1 << 26) == 0,
      usesGigabytePages(cr0: cpu.control[C.cr0], cr3: cpu.control[C.cr3], efer: cpu.control[C.efer], memory: memory)
    {
      throw MachineStateError(
        "cannot move vCPU \(index) to KVM: the guest maps 1 GiB pages, which this host's KVM does not offer")
    }
    let gpr = cpu.gpr
    vcpu.registers.rax = gpr[0]
    vcpu.registers.rcx = gpr[1]
    vcpu.registers.rdx = gpr[2]
    vcpu.registers.rbx = gpr[3]
    vcpu.registers.rsp = gpr[4]
    vcpu.registers.rbp = gpr[5]
    vcpu.registers.rsi = gpr[6]
    vcpu.registers.rdi = gpr[7]
    vcpu.registers.r8 = gpr[8]
    vcpu.registers.r9 = gpr[9]
    vcpu.registers.r10 = gpr[10]
    vcpu.registers.r11 = gpr[11]
    vcpu.registers.r12 = gpr[12]
    vcpu.registers.r13 = gpr[13]
    vcpu.registers.r14 = gpr[14]
    vcpu.registers.r15 = gpr[15]
    vcpu.registers.rip = cpu.rip
    vcpu.registers.rflags = cpu.rflags | 2

    var sregs = vcpu.specialRegisters
    sregs.es = kvmSegment(cpu.segments[0])
    sregs.cs = kvmSegment(cpu.segments[1])
    sregs.ss = kvmSegment(cpu.segments[2])
    sregs.ds = kvmSegment(cpu.segments[3])
    sregs.fs = kvmSegment(cpu.segments[4])
    sregs.gs = kvmSegment(cpu.segments[5])
    sregs.ldt = kvmSegment(cpu.segments[6])
    sregs.tr = kvmSegment(cpu.segments[7])
    // VM entry needs a usable busy TSS in TR, even for a guest that never loaded one.
    if sregs.tr.unusable != 0 || sregs.tr.present == 0 || (sregs.tr.type != 3 && sregs.tr.type != 11) {
      sregs.tr.type = 11
      sregs.tr.present = 1
      sregs.tr.s = 0
      sregs.tr.unusable = 0
    }
    // KVM takes the CPL from SS.DPL (and CS.RPL in real mode); the software CPU keeps it apart.
    if cpu.control[C.cr0] & X86.cr0PE != 0 && cpu.rflags & (1 << 17) == 0 {
      sregs.ss.dpl = cpu.cpl
      if sregs.ss.unusable != 0 { sregs.ss.selector = (sregs.ss.selector & ~3) | UInt16(cpu.cpl) }
    }
    sregs.gdt.base = cpu.gdtBase
    sregs.gdt.limit = cpu.gdtLimit
    sregs.idt.base = cpu.idtBase
    sregs.idt.limit = cpu.idtLimit
    sregs.cr0 = cpu.control[C.cr0]
    sregs.cr2 = cpu.control[C.cr2]
    sregs.cr3 = cpu.control[C.cr3]
    sregs.cr4 = cpu.control[C.cr4]
    sregs.cr8 = cpu.control[C.cr8]
    sregs.efer = cpu.control[C.efer]
    sregs.apic_base = lapic.apicBase
    sregs.interrupt_bitmap = (0, 0, 0, 0)
    vcpu.specialRegisters = sregs

    convertFloatingPoint(from: cpu, into: &vcpu)
    if var xcrs = vcpu.xcrs, xcrs.nr_xcrs > 0 {
      xcrs.xcrs.0.value = cpu.xcr0 | 1
      vcpu.xcrs = xcrs
    }

    withUnsafeMutableBytes(of: &vcpu.debugRegisters) { raw in
      for register in 0..<4 {
        raw.storeBytes(of: cpu.debugRegisters[register], toByteOffset: 8 * register, as: UInt64.self)
      }
      raw.storeBytes(of: cpu.debugRegisters[6], toByteOffset: 32, as: UInt64.self)
      raw.storeBytes(of: cpu.debugRegisters[7], toByteOffset: 40, as: UInt64.self)
    }

    // The local APIC's register page.
    let timerMode = (lapic.lvt[0] >> 17) & 3
    let code = ((lapic.divideConfiguration & 8) >> 1) | (lapic.divideConfiguration & 3)
    let divisor: UInt64 = code == 7 ? 1 : 2 << UInt64(code)
    var currentCount: UInt32 = 0
    if timerMode != 2, let next = lapic.timerNextFire {
      currentCount = UInt32(clamping: max(1, (next > clock ? next - clock : 0) / divisor))
    }
    withUnsafeMutableBytes(of: &vcpu.lapic) { raw in
      func set(_ offset: Int, _ value: UInt32) { raw.storeBytes(of: value, toByteOffset: offset, as: UInt32.self) }
      set(0x20, UInt32(lapic.id) << 24)
      set(0x80, lapic.tpr)
      set(0xD0, lapic.ldr)
      set(0xE0, lapic.dfr)
      set(0xF0, lapic.svr)
      for word in 0..<8 {
        let shift = UInt64(32 * (word & 1))
        set(0x100 + 0x10 * word, UInt32(truncatingIfNeeded: lapic.isr[word >> 1] >> shift))
        set(0x180 + 0x10 * word, UInt32(truncatingIfNeeded: lapic.tmr[word >> 1] >> shift))
        set(0x200 + 0x10 * word, UInt32(truncatingIfNeeded: lapic.irr[word >> 1] >> shift))
      }
      set(0x280, lapic.errorStatus)
      set(0x300, lapic.icrLow)
      set(0x310, lapic.icrHigh)
      for entry in 0..<6 { set(0x320 + 0x10 * entry, lapic.lvt[entry]) }
      set(0x380, lapic.initialCount)
      set(0x390, currentCount)
      set(0x3E0, lapic.divideConfiguration)
    }

    // MSRs: the target's list, with the values the software CPU had.
    let tsc = softTSCTicks(nanoseconds: clock, kilohertz: cpu.tscKilohertz) &+ cpu.control[C.tscOffset]
    var values: [UInt32: UInt64] = [
      0x10: tsc, 0x1B: lapic.apicBase, 0x174: cpu.control[C.sysenterCS], 0x175: cpu.control[C.sysenterESP],
      0x176: cpu.control[C.sysenterEIP], 0x277: cpu.control[C.pat], 0x6E0: lapic.tscDeadline,
      0xC000_0081: cpu.control[C.star], 0xC000_0082: cpu.control[C.lstar], 0xC000_0083: cpu.control[C.cstar],
      0xC000_0084: cpu.control[C.sfmask], 0xC000_0102: cpu.control[C.kernelGSBase], 0xC000_0103: cpu.control[C.tscAux],
    ]
    for (msr, value) in cpu.msrs where storedSoftMSRs.contains(msr) { values[msr] = value }
    vcpu.msrs = vcpu.msrs.map { msr in (msr.index, values[msr.index] ?? msr.value) }

    // Pending events and the MP state.
    var events = vcpu.events
    events.exception.injected = 0
    events.exception.pending = 0
    events.interrupt.injected = 0
    events.interrupt.shadow = cpu.interruptShadowRIP == cpu.rip ? UInt8(KVM_X86_SHADOW_INT_STI) : 0
    events.nmi.injected = 0
    events.nmi.pending = lapic.nmiPending ? 1 : 0
    events.nmi.masked = cpu.nmiBlocked ? 1 : 0
    events.sipi_vector = UInt32(lapic.startupVector ?? 0)
    events.flags |= UInt32(KVM_VCPUEVENT_VALID_SHADOW)
    vcpu.events = events
    let mpState: Int32
    if lapic.initPending {
      mpState = KVM_MP_STATE_INIT_RECEIVED
    } else if cpu.waitingForSIPI || lapic.waitingForStartup {
      mpState = lapic.startupVector != nil ? KVM_MP_STATE_SIPI_RECEIVED : KVM_MP_STATE_UNINITIALIZED
    } else if cpu.halted {
      mpState = KVM_MP_STATE_HALTED
    } else {
      mpState = KVM_MP_STATE_RUNNABLE
    }
    vcpu.mpState.mp_state = UInt32(mpState)
  }

  /// The x87 and SSE state into the legacy region of the target's XSAVE area (or `kvm_fpu`).
  private static func convertFloatingPoint(from cpu: SoftCPUImage, into vcpu: inout KVMVCPUState) {
    let status = (cpu.fpuStatus & ~0x3800) | UInt16(cpu.fpuTop & 7) << 11
    var abridged: UInt8 = 0
    for register in 0..<8 where (cpu.fpuTags >> (2 * UInt16(register))) & 3 != 3 { abridged |= 1 << UInt8(register) }
    if var area = vcpu.xsave {
      store(&area, 0, cpu.fpuControl)
      store(&area, 2, status)
      area[4] = abridged
      area[5] = 0
      store(&area, 6, cpu.fpuLastOpcode & 0x7FF)
      store(&area, 8, cpu.fpuLastIP)
      store(&area, 16, cpu.fpuLastDP)
      store(&area, 24, cpu.mxcsr)
      for index in 0..<8 {
        let register = cpu.fpuRegisters[(Int(cpu.fpuTop) + index) & 7]
        store(&area, 32 + 16 * index, register.0)
        store(&area, 40 + 16 * index, register.1)
        for pad in (42 + 16 * index)..<(48 + 16 * index) { area[pad] = 0 }
      }
      for index in 0..<16 {
        store(&area, 160 + 16 * index, cpu.xmm[index].0)
        store(&area, 168 + 16 * index, cpu.xmm[index].1)
      }
      var stateBitmap = load(area, 512, UInt64.self) | 3
      if cpu.xcr0 & 4 != 0 && area.count >= avxOffset + 256 {
        for index in 0..<16 {
          store(&area, avxOffset + 16 * index, cpu.ymmHigh[index].0)
          store(&area, avxOffset + 8 + 16 * index, cpu.ymmHigh[index].1)
        }
        stateBitmap |= 4
      } else {
        stateBitmap &= ~4
      }
      store(&area, 512, stateBitmap)
      vcpu.xsave = area
    } else if var fpu = vcpu.fpu {
      withUnsafeMutableBytes(of: &fpu) { raw in
        for index in 0..<8 {
          let register = cpu.fpuRegisters[(Int(cpu.fpuTop) + index) & 7]
          raw.storeBytes(of: register.0, toByteOffset: 16 * index, as: UInt64.self)
          raw.storeBytes(of: register.1, toByteOffset: 16 * index + 8, as: UInt16.self)
        }
        raw.storeBytes(of: cpu.fpuControl, toByteOffset: 128, as: UInt16.self)
        raw.storeBytes(of: status, toByteOffset: 130, as: UInt16.self)
        raw.storeBytes(of: abridged, toByteOffset: 132, as: UInt8.self)
        raw.storeBytes(of: cpu.fpuLastOpcode & 0x7FF, toByteOffset: 134, as: UInt16.self)
        raw.storeBytes(of: cpu.fpuLastIP, toByteOffset: 136, as: UInt64.self)
        raw.storeBytes(of: cpu.fpuLastDP, toByteOffset: 144, as: UInt64.self)
        for index in 0..<16 {
          raw.storeBytes(of: cpu.xmm[index].0, toByteOffset: 152 + 16 * index, as: UInt64.self)
          raw.storeBytes(of: cpu.xmm[index].1, toByteOffset: 160 + 16 * index, as: UInt64.self)
        }
        raw.storeBytes(of: cpu.mxcsr, toByteOffset: 408, as: UInt32.self)
      }
      vcpu.fpu = fpu
    }
  }

  private static func convert(_ chip: SoftPICChipImage, template: kvm_pic_state) -> kvm_pic_state {
    var pic = template
    pic.last_irr = chip.lineLevels
    pic.irr = chip.irr
    pic.imr = chip.imr
    pic.isr = chip.isr
    pic.priority_add = (chip.lowestPriority &+ 1) & 7
    pic.irq_base = chip.vectorBase
    pic.read_reg_select = chip.readISR ? 1 : 0
    pic.poll = chip.pollPending ? 1 : 0
    pic.special_mask = chip.specialMask ? 1 : 0
    pic.init_state = chip.initStep == 0 ? 0 : chip.initStep - 1
    pic.auto_eoi = chip.autoEOI ? 1 : 0
    pic.rotate_on_auto_eoi = chip.rotateOnAutoEOI ? 1 : 0
    pic.special_fully_nested_mode = chip.specialFullyNested ? 1 : 0
    pic.init4 = chip.expectsICW4 ? 1 : 0
    pic.elcr = chip.elcr & pic.elcr_mask
    return pic
  }

  private static func convert(_ channel: SoftPITChannelImage, template: kvm_pit_channel_state) -> kvm_pit_channel_state
  {
    var converted = template
    converted.gate = channel.gate ? 1 : 0
    guard channel.armed || !channel.nullCount else { return converted }
    converted.count = channel.reload
    converted.mode = channel.mode
    converted.rw_mode = channel.access
    converted.bcd = channel.bcd ? 1 : 0
    let wordState: UInt8 = channel.access == 3 ? 3 : channel.access
    converted.write_state = channel.access == 3 && channel.writeHighNext ? 4 : wordState
    converted.write_latch = channel.pendingLow
    converted.read_state = channel.access == 3 && channel.readHighNext ? 4 : wordState
    if let latched = channel.latchedCount {
      converted.latched_count = latched
      converted.count_latched = channel.access == 3 && channel.latchedCountHighNext ? 4 : wordState
    } else {
      converted.count_latched = 0
    }
    converted.status_latched = channel.latchedStatus != nil ? 1 : 0
    converted.status = channel.latchedStatus ?? 0
    return converted
  }

  // MARK: Helpers

  /// Whether the 4-level page tables at `cr3` (long mode) map a 1 GiB page.
  static func usesGigabytePages(cr0: UInt64, cr3: UInt64, efer: UInt64, memory: GuestMemory) -> Bool {
    guard cr0 & X86.cr0PG != 0, efer & X86.eferLMA != 0 else { return false }
    let addressMask: UInt64 = 0x000F_FFFF_FFFF_F000
    for top in 0..<512 {
      guard let entry = try? memory.read(UInt64.self, at: (cr3 & addressMask) + UInt64(8 * top)), entry & 1 != 0
      else { continue }
      for middle in 0..<512 {
        guard let directory = try? memory.read(UInt64.self, at: (entry & addressMask) + UInt64(8 * middle)) else {
          break
        }
        if directory & 0x81 == 0x81 { return true }
      }
    }
    return false
  }

  /// Offset of `redirtbl` in `kvm_ioapic_state` (after base_address, ioregsel, id, irr, pad).
  static let redirectionTableOffset = 24

  private static func softSegment(_ segment: kvm_segment) -> SoftSegmentImage {
    var access = UInt32(segment.type & 0xF)
    access |= UInt32(segment.s & 1) << 4
    access |= UInt32(segment.dpl & 3) << 5
    access |= UInt32(segment.present & 1) << 7
    access |= UInt32(segment.avl & 1) << 12
    access |= UInt32(segment.l & 1) << 13
    access |= UInt32(segment.db & 1) << 14
    access |= UInt32(segment.g & 1) << 15
    access |= UInt32(segment.unusable & 1) << 16
    return SoftSegmentImage(selector: segment.selector, base: segment.base, limit: segment.limit, access: access)
  }

  private static func kvmSegment(_ segment: SoftSegmentImage) -> kvm_segment {
    var converted = kvm_segment()
    converted.base = segment.base
    converted.limit = segment.limit
    converted.selector = segment.selector
    converted.type = UInt8(segment.access & 0xF)
    converted.s = UInt8((segment.access >> 4) & 1)
    converted.dpl = UInt8((segment.access >> 5) & 3)
    converted.present = UInt8((segment.access >> 7) & 1)
    converted.avl = UInt8((segment.access >> 12) & 1)
    converted.l = UInt8((segment.access >> 13) & 1)
    converted.db = UInt8((segment.access >> 14) & 1)
    converted.g = UInt8((segment.access >> 15) & 1)
    converted.unusable = UInt8((segment.access >> 16) & 1)
    return converted
  }

  /// The software CPU's TSC before its offset: virtual time scaled to `kilohertz`.
  static func softTSCTicks(nanoseconds: UInt64, kilohertz: UInt64) -> UInt64 {
    TimeBase.ticks(nanoseconds: nanoseconds, frequency: kilohertz &* 1000)
  }

  private static func highestVector(_ set: [UInt64]) -> Int? {
    for word in stride(from: 3, through: 0, by: -1) where set[word] != 0 {
      return word * 64 + 63 - set[word].leadingZeroBitCount
    }
    return nil
  }

  private static func cr4Names(_ bits: UInt64) -> String {
    let names: [Int: String] = [
      11: "UMIP", 12: "LA57", 13: "VMXE", 14: "SMXE", 16: "FSGSBASE", 17: "PCIDE", 18: "OSXSAVE", 19: "KL", 20: "SMEP",
      21: "SMAP", 22: "PKE", 23: "CET", 24: "PKS",
    ]
    return (0..<64).filter { bits & (1 << UInt64($0)) != 0 }.map { names[$0] ?? "bit \($0)" }.joined(separator: ", ")
  }

  private static func load<T: FixedWidthInteger>(_ bytes: [UInt8], _ offset: Int, _: T.Type) -> T {
    var value: T = 0
    for index in 0..<MemoryLayout<T>.size { value |= T(truncatingIfNeeded: bytes[offset + index]) << (8 * index) }
    return value
  }

  private static func store<T: FixedWidthInteger>(_ bytes: inout [UInt8], _ offset: Int, _ value: T) {
    for index in 0..<MemoryLayout<T>.size { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
  }
}

private func hex<T: BinaryInteger>(_ value: T) -> String { "0x" + String(value, radix: 16, uppercase: true) }

extension StateReader {
  /// The rest of the current section, byte by byte (for moving a section unchanged).
  mutating func remainingBytes() throws(MachineStateError) -> [UInt8] {
    var bytes: [UInt8] = []
    bytes.reserveCapacity(remaining)
    while !isAtEnd { bytes.append(try read(UInt8.self)) }
    return bytes
  }
}

extension StateWriter {
  /// Appends bytes as they are (the content of a section moved unchanged).
  mutating func append(raw bytes: [UInt8]) {
    for byte in bytes { write(byte) }
  }
}
