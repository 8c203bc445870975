import CShim
import Glibc
import Synchronization
import VMCore

/// Runs a machine's vCPUs with Linux KVM: one host thread per vCPU, an in-kernel irqchip
/// (PIC, IOAPIC, LAPICs) and PIT, and every port-I/O or MMIO exit dispatched to `parts.bus`.
///
/// Usage: build the `MachineParts`, create the accelerator (this opens the KVM device, creates
/// the VM and its vCPUs and attaches the irqchip to `parts.interrupts`), then call
/// `run(bootState:)` once. Any device or host thread stops the machine with
/// `parts.control.requestStop(_:)`; `run` then returns that reason.
public final class KVMAccelerator: Accelerator {
  public let name = "kvm"
  /// Number of vCPUs. vCPU 0 is the bootstrap processor; the others wait for INIT/SIPI.
  public let cpuCount: Int
  /// The signal used to kick vCPU threads out of KVM_RUN. A no-op handler (without
  /// SA_RESTART) is installed for it; vCPU threads keep it blocked except inside KVM_RUN.
  public static let kickSignal: Int32 = SIGUSR1
  /// KVM API version this backend speaks.
  public static let apiVersion: Int32 = 12
  /// Guest-physical pages KVM reserves for its own use (identity-map page table and the
  /// three-page real-mode TSS): no RAM or device may be placed here.
  public static let reservedGuestPhysicalRange: Range<UInt64> = 0xFEFF_C000..<0xFF00_0000

  let parts: MachineParts
  let system: KVMSystemDevice
  let machine: KVMVirtualMachine
  let vcpus: [KVMVCPU]
  let started = Atomic<Bool>(false)
  /// Set once a snapshot's state was applied: `run` then continues from it.
  let restoredFromSnapshot = Atomic<Bool>(false)
  let running = Atomic<Bool>(false)
  /// The kvmclock read when the machine was paused.
  let pausedClock = Mutex<kvm_clock_data?>(nil)
  /// Every vCPU's guest TSC and TSC offset when the machine was paused (see KVMGuestTSC.swift).
  let frozenTSCs = Mutex<[FrozenGuestTSC]?>(nil)

  /// The capabilities the backend relies on, by KVM_CAP_ name.
  static let requiredCapabilities: [(name: String, value: Int32)] = [
    ("KVM_CAP_USER_MEMORY", KVM_CAP_USER_MEMORY),
    ("KVM_CAP_IRQCHIP", KVM_CAP_IRQCHIP),
    ("KVM_CAP_PIT2", KVM_CAP_PIT2),
    ("KVM_CAP_IMMEDIATE_EXIT", KVM_CAP_IMMEDIATE_EXIT),
    ("KVM_CAP_SET_TSS_ADDR", KVM_CAP_SET_TSS_ADDR),
    ("KVM_CAP_SET_IDENTITY_MAP_ADDR", KVM_CAP_SET_IDENTITY_MAP_ADDR),
    ("KVM_CAP_EXT_CPUID", KVM_CAP_EXT_CPUID),
  ]

  /// Opens `devicePath`, creates the VM with `cpuCount` vCPUs over `parts.memory` presenting
  /// `cpuModel` (refused when the host's KVM lacks one of its features), and attaches the
  /// in-kernel irqchip to `parts.interrupts`.
  public init(
    parts: MachineParts, cpuCount: Int, devicePath: String = "/dev/kvm", cpuModel: GuestCPUModel = .host
  ) throws(KVMError) {
    let system = try KVMSystemDevice(path: devicePath)
    let version = hv_ioctl_int(system.fd, HV_KVM_GET_API_VERSION, 0)
    guard version >= 0 else { throw .notAKVMDevice(path: devicePath, errno: errno) }
    guard version == Self.apiVersion else { throw .unsupportedAPIVersion(path: devicePath, version: version) }
    for capability in Self.requiredCapabilities where system.extensionValue(capability.value) <= 0 {
      throw .missingCapability(name: capability.name)
    }

    var maximumCPUs = Int(system.extensionValue(KVM_CAP_MAX_VCPUS))
    if maximumCPUs == 0 { maximumCPUs = Int(system.extensionValue(KVM_CAP_NR_VCPUS)) }
    if maximumCPUs == 0 { maximumCPUs = 4 }
    maximumCPUs = min(maximumCPUs, 255)  // xAPIC IDs are 8 bits; ID 255 is broadcast
    guard cpuCount >= 1, cpuCount <= maximumCPUs else {
      throw .invalidCPUCount(requested: cpuCount, maximum: maximumCPUs)
    }
    let slots = Int(system.extensionValue(KVM_CAP_NR_MEMSLOTS))
    if slots > 0, parts.memory.regions.count > slots {
      throw .tooManyMemoryRegions(regions: parts.memory.regions.count, slots: slots)
    }
    let runSize = hv_ioctl_int(system.fd, HV_KVM_GET_VCPU_MMAP_SIZE, 0)
    guard runSize >= Int32(MemoryLayout<kvm_run>.size) else {
      throw .systemCallFailed(operation: "KVM_GET_VCPU_MMAP_SIZE", errno: runSize < 0 ? errno : EINVAL)
    }

    // The VM: KVM's private pages, RAM, then the irqchip and PIT (both before any vCPU).
    let machine = try KVMVirtualMachine(system: system, memory: parts.memory)
    var identityMap = Self.reservedGuestPhysicalRange.lowerBound
    try machine.call("KVM_SET_IDENTITY_MAP_ADDR", HV_KVM_SET_IDENTITY_MAP_ADDR, &identityMap)
    try machine.call(
      "KVM_SET_TSS_ADDR", HV_KVM_SET_TSS_ADDR, integer: UInt(Self.reservedGuestPhysicalRange.lowerBound + 0x1000))
    try machine.registerMemorySlots()
    try machine.call("KVM_CREATE_IRQCHIP", HV_KVM_CREATE_IRQCHIP, integer: 0)
    var pit = kvm_pit_config()
    pit.flags = UInt32(KVM_PIT_SPEAKER_DUMMY)  // the kernel also answers port 0x61 (PIT channel 2 gate/output)
    try machine.call("KVM_CREATE_PIT2", HV_KVM_CREATE_PIT2, &pit)

    let supported = try system.supportedCPUID()
    try CPUIDPolicy.check(cpuModel, supported: supported)
    var vcpus: [KVMVCPU] = []
    for index in 0..<cpuCount {
      let cpuid = CPUIDPolicy.entries(apicID: index, cpuCount: cpuCount, supported: supported, model: cpuModel)
      vcpus.append(try KVMVCPU(machine: machine, index: index, runSize: Int(runSize), cpuid: cpuid))
    }

    guard Self.kickHandlerInstalled else {
      throw .systemCallFailed(operation: "sigaction for the vCPU kick signal", errno: EINVAL)
    }
    self.parts = parts
    self.system = system
    self.machine = machine
    self.vcpus = vcpus
    self.cpuCount = cpuCount
    for vcpu in vcpus {
      parts.control.addKick { [weak vcpu] in vcpu?.kick() }
    }
    parts.interrupts.attach(KVMInterruptSink(machine: machine))
  }

  /// Installed once per process, on first use.
  private static let kickHandlerInstalled: Bool = hv_install_wakeup_signal_handler(kickSignal) == 0

  /// Loads `bootState` into vCPU 0, starts one host thread per vCPU and waits until the
  /// machine stops; returns the first stop reason requested. Guest-caused failures (entry
  /// failure, internal error) come back as `.failure` with a register dump; only host setup
  /// problems throw. Runs once per accelerator.
  public func run(bootState: X86CPUState) throws(KVMError) -> MachineStopReason {
    guard started.compareExchange(expected: false, desired: true, ordering: .sequentiallyConsistent).exchanged
    else { throw .alreadyStarted }
    if !restoredFromSnapshot.load(ordering: .sequentiallyConsistent) { try vcpus[0].setState(bootState) }

    running.store(true, ordering: .sequentiallyConsistent)
    defer { running.store(false, ordering: .sequentiallyConsistent) }
    var threads: [pthread_t] = []
    var startError: KVMError?
    let parts = self.parts
    for vcpu in vcpus {
      do {
        threads.append(
          try startHostThread {
            parts.control.registerVCPUThread(index: vcpu.index)
            vcpu.runLoop(parts: parts)
          })
      } catch {
        startError = error
        parts.control.requestStop(.failure(error.description))
        break
      }
    }
    for thread in threads { pthread_join(thread, nil) }
    if let startError { throw startError }
    return parts.control.stopReason ?? .failure("KVM vCPUs stopped without a stop reason")
  }

  /// Parks every vCPU outside KVM_RUN. The kvmclock and every guest TSC are saved here and
  /// restored on `resume`, so guest time does not jump by the paused time.
  public func pause() throws(MachinePauseError) {
    let control = parts.control
    guard control.pauseGate.pause(kick: { control.kickAll() }) else {
      throw MachinePauseError("the KVM vCPUs did not stop within 5 s")
    }
    pausedClock.withLock { $0 = machine.clock() }
    freezeGuestTSCs()
  }

  /// Restores the kvmclock saved by `pause`, moves each guest TSC back to its value at the
  /// pause, and lets the vCPUs run again.
  public func resume() {
    thawGuestTSCs()
    if let clock = pausedClock.withLock({ value -> kvm_clock_data? in
      defer { value = nil }
      return value
    }) {
      machine.setClock(clock)
    }
    parts.control.pauseGate.resume()
  }

  /// The kvmclock in nanoseconds: as frozen by `pause` while paused, else as KVM reads it now;
  /// nil when the kernel refuses KVM_GET_CLOCK.
  public var clockNanoseconds: UInt64? {
    (pausedClock.withLock { $0 } ?? machine.clock())?.clock
  }

  /// Moves the kvmclock forward by `nanoseconds` (KVM_SET_CLOCK), before the machine runs or
  /// while it is paused (then the clock `resume` restores moves too): the guest's kvmclock-based
  /// time steps forward, as after a pause of that length without the freeze.
  public func advanceClock(byNanoseconds nanoseconds: UInt64) {
    guard let current = clockNanoseconds else { return }
    var clock = kvm_clock_data()
    clock.clock = current &+ nanoseconds
    machine.setClock(clock)
    pausedClock.withLock { paused in
      if paused != nil { paused = clock }
    }
  }

  /// Exit counts summed over all vCPUs (readable at any time, e.g. after `run` returns).
  public var exitStatistics: KVMExitStatistics {
    vcpus.reduce(KVMExitStatistics()) { $0 + $1.counters.snapshot }
  }

  /// Total number of returns from KVM_RUN over all vCPUs.
  public var exitCount: UInt64 { exitStatistics.total }

  /// The architectural state of vCPU `index`, read from KVM. Only while the machine is not
  /// running (before or after `run`), because KVM serializes vCPU ioctls with KVM_RUN.
  public func cpuState(cpu index: Int) throws(KVMError) -> X86CPUState {
    guard vcpus.indices.contains(index) else { throw .noSuchCPU(index: index, cpuCount: cpuCount) }
    guard !running.load(ordering: .sequentiallyConsistent) else { throw .machineRunning }
    return try vcpus[index].state()
  }

  /// The CPUID table vCPU `index` was given (KVM_GET_CPUID2); same rules as `cpuState(cpu:)`.
  public func cpuidEntries(cpu index: Int) throws(KVMError) -> [CPUIDEntry] {
    guard vcpus.indices.contains(index) else { throw .noSuchCPU(index: index, cpuCount: cpuCount) }
    guard !running.load(ordering: .sequentiallyConsistent) else { throw .machineRunning }
    return try vcpus[index].cpuid()
  }
}
