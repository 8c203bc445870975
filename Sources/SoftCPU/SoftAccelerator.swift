import Glibc
import InterruptControllers
import Synchronization
import VMCore

/// Runs a machine on the software x86-64 CPU: one interpreter per vCPU on its own host thread,
/// with the interrupt controllers KVM would otherwise provide (PIC, IOAPIC, PIT, one local
/// APIC per vCPU) from module InterruptControllers.
///
/// Usage: build the `MachineParts`, create the accelerator (this registers the PIC, PIT, port
/// 0x61, IOAPIC and the local-APIC page on `parts.bus` and attaches the GSI routing to
/// `parts.interrupts`), then call `run(bootState:)` once. vCPU 0 starts from the boot state;
/// the others wait for INIT/SIPI. The accelerator observes `parts.memory`'s host-side writes
/// (device DMA) so decoded code on those pages is dropped.
public final class SoftAccelerator: Accelerator, GuestMemoryWriteObserver {
  public let name = "soft"
  /// Number of vCPUs.
  public let cpuCount: Int
  /// The interrupt controllers and timers of the machine.
  public let controllers: PlatformInterruptControllers
  /// The machine clock (TSC, APIC timers, PIT).
  public let clock: any MachineClock
  /// Instructions executed between two timer polls.
  public static let instructionsPerSlice = 20_000
  /// Where a debugger (the gdb stub) attaches; inactive unless it has work.
  public let debugHook = SoftDebugHook()

  let parts: MachineParts
  let cpus: [CPU]
  private let wakeups: [VCPUSleeper]
  let started = Atomic<Bool>(false)
  /// Set by `restoreState`: `run` then keeps the restored vCPU state instead of booting.
  let restoredFromSnapshot = Atomic<Bool>(false)

  /// Builds the vCPUs and the interrupt controllers of a machine made of `parts`.
  /// `tier` selects the interpreter only, the translating tier, or lockstep checking of the
  /// translator against the interpreter; `threshold` is the executions of a block before it
  /// is translated. The vCPUs present `cpuModel` (refused when it asks for something the
  /// software CPU does not implement, or is `host`).
  public init(
    parts: MachineParts, cpuCount: Int = 1, clock: (any MachineClock)? = nil, tier: SoftCPUTier = .standard,
    threshold: UInt32 = SoftCPUTier.defaultThreshold, cpuModel: GuestCPUModel = .hostvisor
  ) throws {
    guard (1...255).contains(cpuCount) else { throw SoftAcceleratorError.invalidCPUCount(cpuCount) }
    guard let features = cpuModel.features else { throw SoftAcceleratorError.cpuModelUnavailable(cpuModel.name, []) }
    let lacking = GuestCPUModel.featuresTheSoftwareCPULacks(features)
    guard lacking.isEmpty else { throw SoftAcceleratorError.cpuModelUnavailable(cpuModel.name, lacking) }
    let clock = clock ?? VirtualClock()
    self.clock = clock
    self.parts = parts
    self.cpuCount = cpuCount
    let controllers = PlatformInterruptControllers(cpuCount: cpuCount, clock: clock)
    self.controllers = controllers
    try controllers.register(on: parts.bus)
    try parts.bus.registerMMIO(
      LocalAPIC.defaultBase, length: LocalAPIC.mmioLength, device: LocalAPICPage(apics: controllers.localAPICs))
    parts.interrupts.attach(controllers.routing)

    var cpus: [CPU] = []
    var wakeups: [VCPUSleeper] = []
    for index in 0..<cpuCount {
      let cpu = CPU(memory: parts.memory, bus: parts.bus)
      if tier != .interpreter { cpu.setExecutionTier(tier, threshold: threshold) }
      let apic = controllers.localAPICs[index]
      cpu.system.localAPIC = apic
      cpu.system.clock = clock
      cpu.system.apicID = UInt32(index)
      cpu.system.topology = CPUTopology(cpuCount: cpuCount)
      cpu.system.cpuidFeatures = features
      cpu.system.tscKilohertz = TimeBase.tscFrequency / 1000
      cpu.apicBase = apic.apicBaseMSR
      let wakeup = VCPUSleeper()
      // Weak: the APIC and the machine control (which devices and host threads may still call
      // after `run` returned) can outlive this accelerator's CPUs.
      apic.setInterruptPendingHandler { [weak cpu] in
        cpu?.requestStop()
        wakeup.wake()
      }
      parts.control.addKick { [weak cpu] in
        cpu?.requestStop()
        wakeup.wake()
      }
      cpus.append(cpu)
      wakeups.append(wakeup)
    }
    CPU.connectSiblings(cpus)
    self.cpus = cpus
    self.wakeups = wakeups
    parts.memory.setWriteObserver(self)
  }

  /// Device writes to guest RAM (virtio DMA): every vCPU drops decoded code from those pages
  /// before it runs another block.
  public func guestMemoryWritten(at address: UInt64, length: UInt64) {
    for cpu in cpus { cpu.postExternalWrite(physical: address, length: length) }
  }

  /// The vCPUs (for tests and debuggers; touch them only while the machine is not running).
  public var processors: [CPU] { cpus }

  /// Loads `bootState` into vCPU 0, runs every vCPU on its own host thread until the machine
  /// stops, and returns the first stop reason.
  public func run(bootState: X86CPUState) throws -> MachineStopReason {
    guard started.compareExchange(expected: false, desired: true, ordering: .sequentiallyConsistent).exchanged
    else { throw SoftAcceleratorError.alreadyStarted }
    if !restoredFromSnapshot.load(ordering: .acquiring) {
      cpus[0].load(bootState)
      for index in 1..<max(cpuCount, 1) where index < cpuCount {
        cpus[index].resetForINIT(bootstrap: false)
      }
    }
    var threads: [pthread_t] = []
    let parts = self.parts
    for index in 0..<cpuCount {
      let cpu = cpus[index]
      let wakeup = wakeups[index]
      let controllers = self.controllers
      let clock = self.clock
      let debugHook = self.debugHook
      do {
        threads.append(
          try startInterpreterThread {
            parts.control.registerVCPUThread(index: index)
            LocalAPICPage.setCurrentCPU(index)
            runVCPU(
              cpu, index: index, parts: parts, controllers: controllers, clock: clock, wakeup: wakeup,
              debugHook: debugHook)
          })
      } catch {
        parts.control.requestStop(.failure(error.description))
        break
      }
    }
    for thread in threads { pthread_join(thread, nil) }
    return parts.control.stopReason ?? .failure("software CPU stopped without a stop reason")
  }
}

extension SoftAccelerator {
  /// Parks every vCPU thread at an instruction boundary, then freezes the machine clock (TSC,
  /// APIC timers, PIT, ACPI PM timer), so no timer advances while paused.
  public func pause() throws(MachinePauseError) {
    let control = parts.control
    guard control.pauseGate.pause(kick: { control.kickAll() }) else {
      throw MachinePauseError("the software vCPUs did not stop within 5 s")
    }
    (clock as? VirtualClock)?.pause()
  }

  /// Resumes the clock from the paused time, then releases the vCPU threads.
  public func resume() {
    (clock as? VirtualClock)?.resume()
    parts.control.pauseGate.resume()
  }
}

/// Errors of the software accelerator's setup.
public enum SoftAcceleratorError: Error, CustomStringConvertible {
  case invalidCPUCount(Int)
  case alreadyStarted
  case cannotCreateThread(errno: Int32)
  /// The CPU model is `host` (no features listed), or asks for features the software CPU lacks.
  case cpuModelUnavailable(String, [String])

  public var description: String {
    switch self {
    case .cpuModelUnavailable(let model, let lacking) where lacking.isEmpty:
      return "the software CPU cannot present the CPU model '\(model)' (KVM's own CPUID); "
        + "use hostvisor, x86-64-v3, x86-64-v2 or x86-64"
    case .cpuModelUnavailable(let model, let lacking):
      return "the software CPU cannot present the CPU model '\(model)': it lacks \(lacking.joined(separator: ", "))"
    case .invalidCPUCount(let count): return "the software CPU supports 1-255 vCPUs, not \(count)"
    case .alreadyStarted: return "the software accelerator runs only once"
    case .cannotCreateThread(let err): return "cannot start a vCPU thread: \(String(cString: strerror(err)))"
    }
  }
}

/// The vCPU loop: run slices of the interpreter, poll timers, deliver interrupts, sleep in HLT.
private func runVCPU(
  _ cpu: CPU, index: Int, parts: MachineParts, controllers: PlatformInterruptControllers, clock: any MachineClock,
  wakeup: VCPUSleeper, debugHook: SoftDebugHook
) {
  let control = parts.control
  control.pauseGate.enter()
  defer { control.pauseGate.leave() }
  debugHook.noteVCPUStarted()
  defer {
    if SoftCPUStatistics.reportRequested {
      DiagnosticOutput.standardError.write(cpu.statisticsReport(index: index))
    }
  }
  // Where this vCPU is in the throttle's timeslices (while a throttle is set).
  var throttleTimeslice = VCPUThrottle.Timeslice()
  // When this vCPU, idle, gives the memory of its decoded code back.
  var idleTrim = IdleCodeTrim()
  while true {
    if control.isStopping { return }
    if control.pauseGate.isPauseRequested {
      // Between slices: an instruction boundary, with every posted write applied.
      control.pauseGate.parkIfRequested()
      continue
    }
    if control.throttle.isActive {
      // Between slices too: sleep the throttle's share of each timeslice.
      if control.throttle.throttleIfDue(&throttleTimeslice) { continue }
    } else {
      throttleTimeslice.reset()
    }
    if let report = cpu.lockstepFailure {
      control.requestStop(.failure(report))
      return
    }
    if let reason = cpu.system.shutdownReason {
      if let fault = cpu.system.tripleFault {
        control.requestStop(.tripleFault(vector: fault.vector, rip: fault.rip))
      } else {
        control.requestStop(.reset(reason: reason))
      }
      return
    }
    controllers.poll(cpu: index, now: clock.nanoseconds)
    // An attached debugger with breakpoints, watchpoints or a step: one instruction at a time.
    let debugger = debugHook.activeDebugger
    var taken = 0
    if debugger == nil || cpu.system.halted || !debugger!.isStepping(index) {
      while taken < 4 && cpu.serviceSystemEvents() { taken += 1 }
    }

    if cpu.system.halted || cpu.system.waitingForSIPI {
      if cpu.system.halted && index == 0 && cpu.rflags & RFlags.if == 0 && !cpu.hasWakeupEvent() {
        // The bootstrap processor halted with interrupts disabled: nothing can wake it but an
        // NMI or INIT, which no device here sends. Treat it as power-off.
        if cpu.system.localAPIC?.pendingEvents.isEmpty ?? true {
          control.requestStop(.powerOff)
          return
        }
      }
      if cpu.hasWakeupEvent() { continue }
      let deadline = controllers.nextDeadline(cpu: index)
      let now = clock.nanoseconds
      if let deadline, deadline <= now { continue }
      if idleTrim.shouldRelease(now: now, retired: cpu.retiredInstructions, decoded: cpu.decodedInstructionCount) {
        cpu.releaseDecodedCode()
      }
      wakeup.sleep(untilVirtual: deadline, clock: clock)
      continue
    }

    if let debugger {
      if debugger.shouldStop(before: cpu, index: index) {
        waitForDebuggerPause(control)
        continue
      }
      if debugger.needsEveryInstruction(index) || cpu.isOnDebugStopPage || cpu.system.recheckAfterShadow {
        cpu.system.recheckAfterShadow = false
        runOneInstruction(cpu)
      } else {
        runSlice(cpu, limit: SoftAccelerator.instructionsPerSlice)
      }
      if debugger.shouldStop(after: cpu, index: index) { waitForDebuggerPause(control) }
      continue
    }
    let limit = cpu.system.recheckAfterShadow ? 1 : SoftAccelerator.instructionsPerSlice
    cpu.system.recheckAfterShadow = false
    runSlice(cpu, limit: limit)
  }
}

@inline(__always)
private func runSlice(_ cpu: CPU, limit: Int) {
  switch cpu.run(instructionLimit: limit) {
  case .halted:
    cpu.system.halted = true
  case .fault(let fault):
    cpu.deliverException(fault)
  case .instructionLimit, .stopRequested:
    break
  }
}

/// Runs exactly one instruction (or one exception delivery). A `run` that only consumes a stop
/// request (a kick from the debugger's own pause) executes nothing, so it is repeated.
private func runOneInstruction(_ cpu: CPU) {
  for _ in 0..<8 {
    let cause = cpu.run(instructionLimit: 1)
    switch cause {
    case .halted:
      cpu.system.halted = true
    case .fault(let fault):
      cpu.deliverException(fault)
    case .instructionLimit:
      break
    case .stopRequested:
      if cpu.system.shutdownReason == nil { continue }
    }
    return
  }
}

/// A debugger stopped this vCPU: it stays at the instruction boundary until the debugger's
/// pause request arrives (the loop's top then parks it) or the machine stops.
private func waitForDebuggerPause(_ control: MachineControl) {
  while !control.pauseGate.isPauseRequested && !control.isStopping { usleep(200) }
}

/// Starts a joinable host thread with a large stack for an interpreter.
private func startInterpreterThread(_ body: @escaping @Sendable () -> Void) throws(SoftAcceleratorError) -> pthread_t {
  switch HostThread.start(stackSize: 16 << 20, body) {
  case .success(let thread): return thread
  case .failure(let error): throw .cannotCreateThread(errno: error.errno)
  }
}

/// The local-APIC page at 0xFEE00000: each CPU sees its own APIC there, so accesses are routed
/// by the calling vCPU thread.
final class LocalAPICPage: MMIODevice {
  private let apics: [LocalAPIC]
  private static let key: pthread_key_t = {
    var key = pthread_key_t()
    pthread_key_create(&key, nil)
    return key
  }()

  init(apics: [LocalAPIC]) { self.apics = apics }

  /// Records that the calling thread runs vCPU `index`.
  static func setCurrentCPU(_ index: Int) {
    pthread_setspecific(key, UnsafeRawPointer(bitPattern: index + 1))
  }

  private var current: LocalAPIC {
    let value = Int(bitPattern: pthread_getspecific(Self.key))
    return value >= 1 && value <= apics.count ? apics[value - 1] : apics[0]
  }

  /// A disabled or relocated APIC leaves the default page undecoded for its CPU: reads return
  /// all ones (nothing answers), writes are dropped.
  func mmioRead(offset: UInt64, size: Int) -> UInt64 {
    let apic = current
    guard apic.decodesDefaultPage else { return size >= 8 ? ~0 : (UInt64(1) << (size * 8)) - 1 }
    return apic.mmioRead(offset: offset, size: size)
  }
  func mmioWrite(offset: UInt64, size: Int, value: UInt64) {
    let apic = current
    guard apic.decodesDefaultPage else { return }
    apic.mmioWrite(offset: offset, size: size, value: value)
  }
}

extension CPU {
  /// Loads the loaders' CPU state: registers, segments (converted to the descriptor-cache
  /// layout), descriptor tables, control registers and EFER.
  public func load(_ state: X86CPUState) {
    let registers = state.gprs
    for index in 0..<16 { gpr[index] = registers[index] }
    rflags = state.rflags
    let caches = [state.es, state.cs, state.ss, state.ds, state.fs, state.gs]
    for index in 0..<6 { segments[index] = SegmentCache(caches[index]) }
    tr = SegmentCache(state.tr)
    ldtr = SegmentCache(state.ldt)
    gdtr = state.gdt
    idtr = state.idt
    cr0 = state.cr0 | X86.cr0ET
    cr2 = state.cr2
    cr3 = state.cr3
    cr4 = state.cr4
    cr8 = state.cr8
    efer = state.efer
    if cr0 & X86.cr0PG != 0 && efer & X86.eferLME != 0 { efer |= X86.eferLMA }
    if system.localAPIC == nil { apicBase = state.apicBase }
    system.shutdownReason = nil
    system.halted = false
    system.waitingForSIPI = false
    system.interruptShadowRIP = ~0
    let inProtectedMode = cr0 & X86.cr0PE != 0 && state.rflags & RFlags.vm == 0
    installCodeSegment(segments[Int(SegmentIndex.cs)], rip: state.rip)
    if !inProtectedMode { setPrivilegeLevel(0) }
    systemFlushTLB(includingGlobal: true)
    flushDecodedBlocks()
  }

  /// The architectural state in the loaders' layout (for dumps and snapshots).
  public var state: X86CPUState {
    var state = X86CPUState()
    var registers = [UInt64](repeating: 0, count: 16)
    for index in 0..<16 { registers[index] = gpr[index] }
    state.gprs = registers
    state.rip = rip
    state.rflags = rflags
    state.es = segments[0].register
    state.cs = segments[1].register
    state.ss = segments[2].register
    state.ds = segments[3].register
    state.fs = segments[4].register
    state.gs = segments[5].register
    state.tr = tr.register
    state.ldt = ldtr.register
    state.gdt = gdtr
    state.idt = idtr
    state.cr0 = cr0
    state.cr2 = cr2
    state.cr3 = cr3
    state.cr4 = cr4
    state.cr8 = cr8
    state.efer = efer
    state.apicBase = system.localAPIC?.apicBaseMSR ?? apicBase
    return state
  }
}

// MARK: Machine state

/// The software CPU's machine state: the virtual clock, every vCPU and every interrupt
/// controller and timer. Save while paused; restore before `run`, which then continues from it.
extension SoftAccelerator: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    writer.write(clock.nanoseconds)
    writer.write(UInt32(cpus.count))
    for cpu in cpus { writer.section("cpu", cpu) }
    writer.section("interrupt-controllers", controllers)
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    guard !started.load(ordering: .acquiring) else {
      throw MachineStateError("cannot restore the state of a machine that has already started")
    }
    let now: UInt64 = try reader.read()
    let count = Int(try reader.read(UInt32.self))
    guard count == cpus.count else {
      throw MachineStateError(
        "the state file does not match this machine: it has \(count) vCPUs, this machine \(cpus.count)")
    }
    guard let clock = clock as? VirtualClock else {
      throw MachineStateError("this machine's clock cannot be set to a saved time")
    }
    var clockState = StateWriter()
    clockState.write(now)
    var clockReader = StateReader(bytes: clockState.bytes)
    try clock.restoreState(from: &clockReader)
    for cpu in cpus { try reader.section("cpu", cpu) }
    try reader.section("interrupt-controllers", controllers)
    // IA32_APIC_BASE came back with the APICs' state, without the WRMSR that maps a relocated page.
    for cpu in cpus { cpu.refreshAPICDecoding() }
    restoredFromSnapshot.store(true, ordering: .releasing)
  }
}
