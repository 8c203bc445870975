import CShim
import Glibc
import VMCore

/// The state KVM keeps for a machine, in the kernel's own structures: every vCPU (CPUID, MP
/// state, registers, x87/SSE/AVX state, XCRs, debug registers, local APIC, MSRs, pending
/// events), the in-kernel irqchip (both 8259 PICs and the IOAPIC), the PIT and the kvmclock.
/// Captured while the machine is paused (every vCPU parked outside KVM_RUN with no exit left
/// to complete) and applied to a freshly built machine before it runs. See
/// docs/machine-state.md, section `accelerator` on KVM.
public struct KVMMachineState: Sendable {
  /// The kvmclock (nanoseconds) when the machine was paused.
  public var clock: UInt64
  /// One entry per vCPU, in vCPU order.
  public var vcpus: [KVMVCPUState]
  /// PIC master, PIC slave and IOAPIC (KVM_GET_IRQCHIP chips 0, 1, 2).
  public var irqchips: [kvm_irqchip]
  /// The in-kernel PIT (KVM_GET_PIT2).
  public var pit: kvm_pit_state2

  /// Appends this state (the content of the `accelerator` section of a KVM machine).
  public func save(into writer: inout StateWriter) {
    writer.write(clock)
    writer.write(UInt32(vcpus.count))
    for vcpu in vcpus { writer.section("kvm-vcpu") { vcpu.save(into: &$0) } }
    writer.section("kvm-irqchip") { writer in
      for chip in irqchips { writer.write(raw: chip) }
    }
    writer.section("kvm-pit") { $0.write(raw: pit) }
  }

  /// Reads a state written by `save`, checking its shape; KVM checks the values when they are
  /// applied.
  public static func read(from reader: inout StateReader, cpuCount: Int) throws(MachineStateError) -> KVMMachineState {
    let clock: UInt64 = try reader.read()
    let count = Int(try reader.read(UInt32.self))
    guard count == cpuCount else {
      throw MachineStateError(
        "the state file does not match this machine: it has \(count) vCPUs, this machine \(cpuCount)")
    }
    var vcpus: [KVMVCPUState] = []
    for _ in 0..<count {
      vcpus.append(
        try reader.section("kvm-vcpu") { (reader) throws(MachineStateError) in try KVMVCPUState.read(from: &reader) })
    }
    let irqchips = try reader.section("kvm-irqchip") { (reader) throws(MachineStateError) -> [kvm_irqchip] in
      var chips: [kvm_irqchip] = []
      for expected in UInt32(0)..<3 {
        let chip = try reader.readRaw(kvm_irqchip.self, "irqchip state")
        guard chip.chip_id == expected else { throw .invalid("irqchip identifier \(chip.chip_id)") }
        chips.append(chip)
      }
      return chips
    }
    let pit = try reader.section("kvm-pit") { (reader) throws(MachineStateError) in
      try reader.readRaw(kvm_pit_state2.self, "PIT state")
    }
    return KVMMachineState(clock: clock, vcpus: vcpus, irqchips: irqchips, pit: pit)
  }
}

/// The state of one KVM vCPU, in the order the kernel wants it restored.
public struct KVMVCPUState: Sendable {
  /// The CPUID table the vCPU presents (KVM_GET_CPUID2).
  public var cpuid: [CPUIDEntry]
  /// KVM_MP_STATE_RUNNABLE, HALTED, INIT_RECEIVED, UNINITIALIZED (wait-for-SIPI), ...
  public var mpState: kvm_mp_state
  public var registers: kvm_regs
  public var specialRegisters: kvm_sregs
  /// The XSAVE area (KVM_GET_XSAVE or KVM_GET_XSAVE2), or nil when the host has no XSAVE and
  /// `fpu` holds the x87/SSE state instead.
  public var xsave: [UInt8]?
  /// The legacy x87/SSE state, used only without XSAVE.
  public var fpu: kvm_fpu?
  /// XCR0 (nil without KVM_CAP_XCRS).
  public var xcrs: kvm_xcrs?
  public var debugRegisters: kvm_debugregs
  /// The local APIC's 1 KiB register page.
  public var lapic: kvm_lapic_state
  /// (index, value) in the order they are restored.
  public var msrs: [(index: UInt32, value: UInt64)]
  /// Pending exception, interrupt, NMI, SIPI, interrupt shadow, SMM.
  public var events: kvm_vcpu_events

  func save(into writer: inout StateWriter) {
    writer.write(UInt32(cpuid.count))
    for entry in cpuid {
      for value in [entry.function, entry.index, entry.flags, entry.eax, entry.ebx, entry.ecx, entry.edx] {
        writer.write(value)
      }
    }
    writer.write(mpState.mp_state)
    writer.write(raw: registers)
    writer.write(raw: specialRegisters)
    writer.write(xsave != nil)
    if let xsave { writer.write(bytes: xsave) } else { writer.write(raw: fpu ?? kvm_fpu()) }
    writer.write(xcrs != nil)
    if let xcrs { writer.write(raw: xcrs) }
    writer.write(raw: debugRegisters)
    writer.write(raw: lapic)
    writer.write(UInt32(msrs.count))
    for msr in msrs {
      writer.write(msr.index)
      writer.write(msr.value)
    }
    writer.write(raw: events)
  }

  static func read(from reader: inout StateReader) throws(MachineStateError) -> KVMVCPUState {
    let cpuidCount = Int(try reader.read(UInt32.self))
    guard cpuidCount <= 4096 else { throw .invalid("CPUID table size") }
    var cpuid: [CPUIDEntry] = []
    for _ in 0..<cpuidCount {
      var values: [UInt32] = []
      for _ in 0..<7 { values.append(try reader.read()) }
      cpuid.append(
        CPUIDEntry(
          function: values[0], index: values[1], flags: values[2], eax: values[3], ebx: values[4], ecx: values[5],
          edx: values[6]))
    }
    var mpState = kvm_mp_state()
    mpState.mp_state = try reader.read()
    guard mpState.mp_state <= 8 else { throw .invalid("vCPU MP state \(mpState.mp_state)") }
    let registers = try reader.readRaw(kvm_regs.self, "vCPU registers")
    let specialRegisters = try reader.readRaw(kvm_sregs.self, "vCPU special registers")
    var xsave: [UInt8]?
    var fpu: kvm_fpu?
    if try reader.readBool() {
      let area = try reader.readBytes(maximumCount: 1 << 20)
      guard area.count >= 4096, area.count % 64 == 0 else { throw .invalid("XSAVE area size \(area.count)") }
      xsave = area
    } else {
      fpu = try reader.readRaw(kvm_fpu.self, "x87/SSE state")
    }
    let xcrs = try reader.readBool() ? try reader.readRaw(kvm_xcrs.self, "XCR state") : nil
    if let xcrs, xcrs.nr_xcrs > UInt32(KVM_MAX_XCRS) { throw .invalid("XCR count") }
    let debugRegisters = try reader.readRaw(kvm_debugregs.self, "debug registers")
    let lapic = try reader.readRaw(kvm_lapic_state.self, "local APIC state")
    let msrCount = Int(try reader.read(UInt32.self))
    guard msrCount <= 4096 else { throw .invalid("MSR count") }
    var msrs: [(index: UInt32, value: UInt64)] = []
    for _ in 0..<msrCount { msrs.append((try reader.read(), try reader.read())) }
    let events = try reader.readRaw(kvm_vcpu_events.self, "pending vCPU events")
    return KVMVCPUState(
      cpuid: cpuid, mpState: mpState, registers: registers, specialRegisters: specialRegisters, xsave: xsave,
      fpu: fpu, xcrs: xcrs, debugRegisters: debugRegisters, lapic: lapic, msrs: msrs, events: events)
  }
}

/// The MSRs a snapshot carries (those of them this host's KVM reports in
/// KVM_GET_MSR_INDEX_LIST), in the order they are restored. EFER, FS/GS base and the APIC base
/// travel in the special registers; the APIC base is repeated here as KVM's own save code does.
let kvmSavedMSRs: [UInt32] = [
  0x10,  // IA32_TSC
  0x3B,  // IA32_TSC_ADJUST
  0x1B,  // IA32_APIC_BASE
  0x3A,  // IA32_FEATURE_CONTROL
  0x48,  // IA32_SPEC_CTRL
  0x174, 0x175, 0x176,  // IA32_SYSENTER_CS / ESP / EIP
  0x1A0,  // IA32_MISC_ENABLE
  0x277,  // IA32_PAT
  0x2FF,  // IA32_MTRR_DEF_TYPE
  0x250, 0x258, 0x259, 0x268, 0x269, 0x26A, 0x26B, 0x26C, 0x26D, 0x26E, 0x26F,  // fixed MTRRs
  0x200, 0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207,  // variable MTRRs 0-3
  0x208, 0x209, 0x20A, 0x20B, 0x20C, 0x20D, 0x20E, 0x20F,  // variable MTRRs 4-7
  0x6E0,  // IA32_TSC_DEADLINE (after the local APIC, which is restored first)
  0xDA0,  // IA32_XSS
  0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084,  // STAR, LSTAR, CSTAR, SFMASK
  0xC000_0102,  // KERNEL_GS_BASE
  0xC000_0103,  // TSC_AUX
  0x11, 0x12,  // kvmclock (old numbers): wall clock, system time
  0x4B56_4D00, 0x4B56_4D01,  // kvmclock: wall clock, system time
  0x4B56_4D06,  // async page fault interrupt vector (before the enable MSR that uses it)
  0x4B56_4D02,  // async page fault enable
  0x4B56_4D03,  // steal time
  0x4B56_4D04,  // PV EOI
]

extension StateWriter {
  /// Appends the bytes of a kernel ABI structure (x86-64 layout), length-prefixed.
  fileprivate mutating func write<T>(raw value: T) {
    withUnsafeBytes(of: value) { write(bytes: $0) }
  }
}

extension StateReader {
  /// Reads a kernel ABI structure written with `write(raw:)`; its size must match exactly.
  fileprivate mutating func readRaw<T>(_: T.Type, _ what: String) throws(MachineStateError) -> T {
    let bytes = try readBytes(exactly: MemoryLayout<T>.size, what)
    let storage = UnsafeMutableRawPointer.allocate(
      byteCount: MemoryLayout<T>.size, alignment: MemoryLayout<T>.alignment)
    defer { storage.deallocate() }
    bytes.withUnsafeBytes { storage.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    return storage.load(as: T.self)
  }
}

extension KVMSystemDevice {
  /// The MSR indices KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST).
  func msrIndexList() throws(KVMError) -> Set<UInt32> {
    var capacity = 256
    while true {
      let byteCount = MemoryLayout<kvm_msr_list>.size + capacity * 4
      let buffer = UnsafeMutableRawPointer.allocate(byteCount: byteCount, alignment: 8)
      defer { buffer.deallocate() }
      memset(buffer, 0, byteCount)
      let list = buffer.bindMemory(to: kvm_msr_list.self, capacity: 1)
      list.pointee.nmsrs = UInt32(capacity)
      if hv_ioctl_ptr(fd, HV_KVM_GET_MSR_INDEX_LIST, list) < 0 {
        let err = errno
        if err == E2BIG && capacity < 65536 {
          capacity = max(capacity * 2, Int(list.pointee.nmsrs))
          continue
        }
        throw .systemCallFailed(operation: "KVM_GET_MSR_INDEX_LIST", errno: err)
      }
      let indices = hv_kvm_msr_list_indices(list)!
      return Set((0..<Int(list.pointee.nmsrs)).map { indices[$0] })
    }
  }
}

extension KVMVCPU {
  private func stateCall(_ operation: String, _ request: UInt, _ argument: UnsafeMutableRawPointer)
    throws(KVMError)
  {
    if hv_ioctl_ptr(fd, request, argument) < 0 {
      throw .systemCallFailed(operation: "\(operation) on vCPU \(index)", errno: errno)
    }
  }

  /// Completes an exit that still waits for KVM (the data of a port or MMIO read, the end of a
  /// string I/O): re-enters KVM_RUN with `immediate_exit` set, which finishes the instruction
  /// and returns without running the guest, as the KVM API documentation asks before the
  /// vCPU state is read. Exits KVM reports on the way (a further MMIO fragment) are served.
  /// Runs on the vCPU thread while it parks.
  func completePendingExit(parts: MachineParts) {
    for _ in 0..<16 {
      hv_kvm_run_set_immediate_exit(run, 1)
      if hv_ioctl_int(fd, HV_KVM_RUN, 0) < 0 {
        hv_consume_pending_signal(KVMAccelerator.kickSignal)
        return
      }
      handleExitForCompletion(parts: parts)
    }
  }

  /// Everything KVM holds for this vCPU, read in the order the kernel requires: MP state first
  /// (it may take pending INIT/SIPI into the registers), vCPU events last.
  func captureState(msrIndices: Set<UInt32>, xsaveSize: Int?, hasXCRs: Bool) throws(KVMError) -> KVMVCPUState {
    var mpState = kvm_mp_state()
    try stateCall("KVM_GET_MP_STATE", HV_KVM_GET_MP_STATE, &mpState)
    let registers = try registers()
    let specialRegisters = try specialRegisters()
    var xsave: [UInt8]?
    var fpu: kvm_fpu?
    if let xsaveSize {
      var area = [UInt8](repeating: 0, count: xsaveSize)
      let request = xsaveSize > MemoryLayout<kvm_xsave>.size ? HV_KVM_GET_XSAVE2 : HV_KVM_GET_XSAVE
      let result = area.withUnsafeMutableBytes { hv_ioctl_ptr(fd, request, $0.baseAddress!) }
      if result < 0 { throw .systemCallFailed(operation: "KVM_GET_XSAVE on vCPU \(index)", errno: errno) }
      xsave = area
    } else {
      var value = kvm_fpu()
      try stateCall("KVM_GET_FPU", HV_KVM_GET_FPU, &value)
      fpu = value
    }
    var xcrs: kvm_xcrs?
    if hasXCRs {
      var value = kvm_xcrs()
      try stateCall("KVM_GET_XCRS", HV_KVM_GET_XCRS, &value)
      xcrs = value
    }
    var debugRegisters = kvm_debugregs()
    try stateCall("KVM_GET_DEBUGREGS", HV_KVM_GET_DEBUGREGS, &debugRegisters)
    var lapic = kvm_lapic_state()
    try stateCall("KVM_GET_LAPIC", HV_KVM_GET_LAPIC, &lapic)
    let msrs = try readMSRs(kvmSavedMSRs.filter { msrIndices.contains($0) })
    var events = kvm_vcpu_events()
    try stateCall("KVM_GET_VCPU_EVENTS", HV_KVM_GET_VCPU_EVENTS, &events)
    return KVMVCPUState(
      cpuid: try cpuid(), mpState: mpState, registers: registers, specialRegisters: specialRegisters, xsave: xsave,
      fpu: fpu, xcrs: xcrs, debugRegisters: debugRegisters, lapic: lapic, msrs: msrs, events: events)
  }

  /// Loads `state` into this (not yet run) vCPU in the order the kernel requires: CPUID, MP
  /// state, REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC, MSRs, vCPU events.
  func applyState(_ state: KVMVCPUState) throws(KVMError) {
    try setCPUID(state.cpuid)
    var mpState = state.mpState
    try stateCall("KVM_SET_MP_STATE", HV_KVM_SET_MP_STATE, &mpState)
    var registers = state.registers
    try stateCall("KVM_SET_REGS", HV_KVM_SET_REGS, &registers)
    var specialRegisters = state.specialRegisters
    try stateCall("KVM_SET_SREGS", HV_KVM_SET_SREGS, &specialRegisters)
    if var area = state.xsave {
      let result = area.withUnsafeMutableBytes { hv_ioctl_ptr(fd, HV_KVM_SET_XSAVE, $0.baseAddress!) }
      if result < 0 { throw .systemCallFailed(operation: "KVM_SET_XSAVE on vCPU \(index)", errno: errno) }
    } else if var fpu = state.fpu {
      try stateCall("KVM_SET_FPU", HV_KVM_SET_FPU, &fpu)
    }
    if var xcrs = state.xcrs { try stateCall("KVM_SET_XCRS", HV_KVM_SET_XCRS, &xcrs) }
    var debugRegisters = state.debugRegisters
    try stateCall("KVM_SET_DEBUGREGS", HV_KVM_SET_DEBUGREGS, &debugRegisters)
    var lapic = state.lapic
    try stateCall("KVM_SET_LAPIC", HV_KVM_SET_LAPIC, &lapic)
    try writeMSRs(state.msrs)
    var events = state.events
    events.flags |= UInt32(KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR)
    try stateCall("KVM_SET_VCPU_EVENTS", HV_KVM_SET_VCPU_EVENTS, &events)
  }

  /// Reads `indices` with KVM_GET_MSRS; an MSR KVM refuses to read is left out.
  private func readMSRs(_ indices: [UInt32]) throws(KVMError) -> [(index: UInt32, value: UInt64)] {
    var remaining = indices
    var result: [(index: UInt32, value: UInt64)] = []
    while !remaining.isEmpty {
      let values = try msrCall(read: true, remaining.map { ($0, 0) })
      result.append(contentsOf: values)
      // KVM stops at the first MSR it cannot read: skip it and continue after it.
      remaining.removeFirst(min(values.count + 1, remaining.count))
    }
    return result
  }

  /// Writes `msrs` with KVM_SET_MSRS; every one must be accepted.
  private func writeMSRs(_ msrs: [(index: UInt32, value: UInt64)]) throws(KVMError) {
    guard !msrs.isEmpty else { return }
    let done = try msrCall(read: false, msrs).count
    guard done == msrs.count else {
      throw .systemCallFailed(
        operation: "KVM_SET_MSRS of MSR \(hex(msrs[done].index)) on vCPU \(index)", errno: EINVAL)
    }
  }

  /// One KVM_GET_MSRS / KVM_SET_MSRS call; returns the entries KVM processed.
  private func msrCall(read: Bool, _ entries: [(index: UInt32, value: UInt64)]) throws(KVMError) -> [(
    index: UInt32, value: UInt64
  )] {
    let byteCount = MemoryLayout<kvm_msrs>.size + entries.count * MemoryLayout<kvm_msr_entry>.stride
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: byteCount, alignment: 8)
    defer { buffer.deallocate() }
    memset(buffer, 0, byteCount)
    let msrs = buffer.bindMemory(to: kvm_msrs.self, capacity: 1)
    msrs.pointee.nmsrs = UInt32(entries.count)
    let table = hv_kvm_msrs_entries(msrs)!
    for (slot, entry) in entries.enumerated() {
      table[slot].index = entry.index
      table[slot].data = entry.value
    }
    let count = hv_ioctl_ptr(fd, read ? HV_KVM_GET_MSRS : HV_KVM_SET_MSRS, msrs)
    guard count >= 0 else {
      throw .systemCallFailed(operation: "\(read ? "KVM_GET_MSRS" : "KVM_SET_MSRS") on vCPU \(index)", errno: errno)
    }
    return (0..<min(Int(count), entries.count)).map { (table[$0].index, table[$0].data) }
  }
}

extension KVMAccelerator {
  /// Reads the whole KVM state of the paused (or not yet started) machine: every vCPU, the
  /// irqchip, the PIT and the kvmclock as it was when the machine paused.
  public func captureState() throws(MachineStateError) -> KVMMachineState {
    guard !running.load(ordering: .sequentiallyConsistent) || parts.control.pauseGate.isPaused else {
      throw MachineStateError("the machine must be paused to read its KVM state")
    }
    do {
      let msrIndices = try system.msrIndexList()
      let xsaveSize: Int? =
        system.extensionValue(KVM_CAP_XSAVE) > 0
        ? max(MemoryLayout<kvm_xsave>.size, Int(system.extensionValue(KVM_CAP_XSAVE2))) : nil
      let hasXCRs = system.extensionValue(KVM_CAP_XCRS) > 0
      var vcpuStates: [KVMVCPUState] = []
      for vcpu in vcpus {
        var state = try vcpu.captureState(msrIndices: msrIndices, xsaveSize: xsaveSize, hasXCRs: hasXCRs)
        // The TSC as the guest left it when the machine paused (it still runs in KVM).
        if let frozen = frozenGuestTSC(cpu: vcpu.index) {
          state.msrs = state.msrs.map { $0.index == 0x10 ? (0x10, frozen) : $0 }
        }
        vcpuStates.append(state)
      }
      var irqchips: [kvm_irqchip] = []
      for chip in UInt32(0)..<3 {
        var value = kvm_irqchip()
        value.chip_id = chip
        try machine.call("KVM_GET_IRQCHIP \(chip)", HV_KVM_GET_IRQCHIP, &value)
        irqchips.append(value)
      }
      var pit = kvm_pit_state2()
      try machine.call("KVM_GET_PIT2", HV_KVM_GET_PIT2, &pit)
      let clock = pausedClock.withLock { $0 } ?? machine.clock()
      guard let clock else { throw KVMError.systemCallFailed(operation: "KVM_GET_CLOCK", errno: errno) }
      return KVMMachineState(clock: clock.clock, vcpus: vcpuStates, irqchips: irqchips, pit: pit)
    } catch {
      throw MachineStateError("cannot read the KVM machine state: \(error)")
    }
  }

  /// Applies a state read from a snapshot to this machine before it starts: `run` then
  /// continues from it instead of loading a boot state. Everything is read and checked first;
  /// a value KVM refuses is a one-line error and the machine must not be run.
  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    let state = try KVMMachineState.read(from: &reader, cpuCount: cpuCount)
    try applyState(state)
  }

  /// Applies `state` (see `restoreState(from:)`).
  public func applyState(_ state: KVMMachineState) throws(MachineStateError) {
    guard !started.load(ordering: .sequentiallyConsistent) else {
      throw MachineStateError("cannot restore the state of a machine that has already started")
    }
    guard state.vcpus.count == vcpus.count else {
      throw MachineStateError(
        "the state file does not match this machine: it has \(state.vcpus.count) vCPUs, this machine \(vcpus.count)")
    }
    do {
      for (vcpu, vcpuState) in zip(vcpus, state.vcpus) { try vcpu.applyState(vcpuState) }
      for var chip in state.irqchips {
        try machine.call("KVM_SET_IRQCHIP \(chip.chip_id)", HV_KVM_SET_IRQCHIP, &chip)
      }
      var pit = state.pit
      try machine.call("KVM_SET_PIT2", HV_KVM_SET_PIT2, &pit)
    } catch {
      throw MachineStateError("KVM refused the saved machine state: \(error)")
    }
    var clock = kvm_clock_data()
    clock.clock = state.clock
    machine.setClock(clock)
    pausedClock.withLock { paused in
      if paused != nil { paused = clock }
    }
    // Restored while paused: the TSCs to hold until `resume` are the ones just restored.
    if frozenTSCs.withLock({ $0 != nil }) { freezeGuestTSCs() }
    restoredFromSnapshot.store(true, ordering: .sequentiallyConsistent)
  }
}
