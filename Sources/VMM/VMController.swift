import Glibc
import Synchronization
import VMCore
import Virtio

/// Where a managed machine is in its life. Both management APIs map onto these states
/// (Firecracker: "Not started", "Running", "Paused"; Cloud Hypervisor: "Created", "Running",
/// "Paused", "Shutdown").
public enum VMLifecycle: String, Sendable, Equatable {
  /// Being configured; not booted yet.
  case notStarted
  /// Booted and running.
  case running
  /// Booted, every vCPU parked and the clocks frozen.
  case paused
  /// The guest stopped (powered off, reset, exited, or was shut down by the host).
  case shutDown
}

/// A failed control request, as one line. Frontends map the kind to their status codes.
public struct ControlError: Error, Equatable, Sendable, CustomStringConvertible {
  /// Why the request failed.
  public enum Kind: Sendable, Equatable {
    /// The request is malformed or names something invalid (a bad path, size or ID).
    case invalidArgument
    /// The request is not allowed in the machine's current state (e.g. a pre-boot resource
    /// after InstanceStart, or resume while running).
    case invalidState
    /// Hostvisor does not implement this request (yet).
    case unsupported
    /// The request was valid but the machine could not carry it out.
    case failed
  }

  /// Why the request failed.
  public let kind: Kind
  /// One line for the user (Firecracker's `fault_message`).
  public let description: String

  public init(_ kind: Kind, _ description: String) {
    self.kind = kind
    self.description = description
  }
}

/// A virtio-blk drive as the control plane configures it.
public struct DriveSpec: Sendable, Equatable {
  /// The drive's ID (Firecracker's `drive_id`, Cloud Hypervisor's `id`).
  public var id: String
  /// The backing file or block device.
  public var path: String
  /// Whether the guest sees a read-only disk.
  public var readOnly: Bool
  /// Whether the drive holds the root filesystem: the kernel command line gets
  /// `root=/dev/vdX` for it (and `ro` when it is read-only), as Firecracker does.
  public var isRootDevice: Bool

  public init(id: String, path: String, readOnly: Bool = false, isRootDevice: Bool = false) {
    self.id = id
    self.path = path
    self.readOnly = readOnly
    self.isRootDevice = isRootDevice
  }
}

/// A virtio-net interface as the control plane configures it.
public struct NetworkInterfaceSpec: Sendable, Equatable {
  /// The interface's ID (Firecracker's `iface_id`).
  public var id: String
  /// The host TAP device.
  public var hostDeviceName: String
  /// The guest's MAC address; nil picks a random one.
  public var guestMAC: MACAddress?

  public init(id: String, hostDeviceName: String, guestMAC: MACAddress? = nil) {
    self.id = id
    self.hostDeviceName = hostDeviceName
    self.guestMAC = guestMAC
  }
}

/// Everything the control plane collects before boot, piece by piece (Firecracker) or in one
/// request (Cloud Hypervisor's `vm.create`). `machineConfiguration()` turns it into the
/// `MachineConfiguration` that `VirtualMachine` builds from.
public struct VMSpec: Sendable, Equatable {
  /// The kernel image; required before boot.
  public var kernelPath: String?
  /// The initial ramdisk.
  public var initrdPath: String?
  /// The kernel command line; nil uses Firecracker's default (`console=ttyS0 reboot=k panic=1`).
  public var bootArgs: String?
  /// Number of vCPUs.
  public var vcpuCount: Int = 1
  /// Guest RAM in MiB (Firecracker's default: 128).
  public var memoryMiB: Int = 128
  /// KSM merging and transparent huge pages for guest RAM (Cloud Hypervisor's `mergeable`, `thp`).
  public var memoryAdvice = GuestMemoryAdvice()
  /// Simultaneous multithreading as Firecracker's machine-config describes it (reported back;
  /// the vCPU topology is one thread per core either way).
  public var smt: Bool = false
  /// Whether dirty pages are tracked for diff snapshots.
  public var trackDirtyPages: Bool = false
  /// Drives in the order they were added; the root drive (if any) is attached first.
  public var drives: [DriveSpec] = []
  /// Network interfaces in the order they were added.
  public var networkInterfaces: [NetworkInterfaceSpec] = []
  /// Where COM1 goes.
  public var serial: SerialChoice = .stdio
  /// The guest console.
  public var console: ConsoleChoice = .serial
  /// Which accelerator runs the vCPUs.
  public var accelerator: AcceleratorChoice = .auto
  /// The CPU model the vCPUs present (`--cpu-model`); nil: the accelerator's default.
  public var cpuModel: GuestCPUModel?
  /// Report choices and the stop reason on standard error.
  public var verbose: Bool = false
  /// A virtio-balloon device.
  public var balloon: BalloonConfiguration?
  /// The framebuffer and its VNC server (`--display`); none by default.
  public var display: DisplayChoice = .none

  /// Firecracker's default kernel command line.
  public static let defaultBootArgs = "console=ttyS0 reboot=k panic=1"

  public init() {}

  /// The ID of the network interface other than `id` that names `tapName`, when `tapName` is a
  /// TAP the process opened at start (`PreopenedTaps`, `serve --tap`): such a TAP is attached
  /// to one interface at a time. Nil for other TAPs, which the machine opens when it is built
  /// (two interfaces on one of them fail then, as the kernel refuses the second).
  public func interfaceHoldingPreopenedTap(_ tapName: String, except id: String) -> String? {
    guard PreopenedTaps.named(tapName) != nil else { return nil }
    return networkInterfaces.first { $0.hostDeviceName == tapName && $0.id != id }?.id
  }

  /// The one-line refusal of interface `id` naming pre-opened TAP `tapName`, which interface
  /// `holder` names already.
  public static func preopenedTapTaken(_ tapName: String, by holder: String, for id: String) -> String {
    "Network interface \(id) cannot use TAP \(tapName): network interface \(holder) has it already (a TAP that"
      + " serve opened with --tap is attached to one interface at a time)."
  }

  /// The drives in the order their virtio-blk devices are attached: the root drive (if any)
  /// first, so it is `/dev/vda`, then the others as they were added.
  public var drivesInDeviceOrder: [DriveSpec] { drives.filter(\.isRootDevice) + drives.filter { !$0.isRootDevice } }

  /// The machine configuration this spec describes; fails with `.invalidArgument` when a
  /// required piece is missing or a value is out of range.
  public func machineConfiguration() throws(ControlError) -> MachineConfiguration {
    guard let kernelPath else {
      throw ControlError(.invalidArgument, "cannot start the machine: no boot source (kernel image) is configured")
    }
    guard memoryMiB >= 1 else { throw ControlError(.invalidArgument, "memory size must be at least 1 MiB") }
    for interface in networkInterfaces {
      if let holder = interfaceHoldingPreopenedTap(interface.hostDeviceName, except: interface.id) {
        throw ControlError(
          .invalidArgument, Self.preopenedTapTaken(interface.hostDeviceName, by: holder, for: interface.id))
      }
    }
    var commandLine = bootArgs ?? Self.defaultBootArgs
    let ordered = drivesInDeviceOrder
    if let root = ordered.first, root.isRootDevice {
      commandLine += " root=/dev/vda \(root.readOnly ? "ro" : "rw")"
    }
    var configuration = MachineConfiguration(kernelPath: kernelPath)
    configuration.initrdPath = initrdPath
    configuration.commandLine = commandLine
    configuration.memorySize = UInt64(memoryMiB) << 20
    configuration.memoryAdvice = memoryAdvice
    configuration.cpuCount = vcpuCount
    configuration.accelerator = accelerator
    configuration.cpuModel = cpuModel
    configuration.serial = serial
    configuration.console = console
    configuration.verbose = verbose
    configuration.balloon = balloon
    configuration.display = display
    configuration.disks = ordered.map { DiskConfiguration(path: $0.path, readOnly: $0.readOnly) }
    configuration.networks = networkInterfaces.map {
      NetworkConfiguration(tapName: $0.hostDeviceName, mac: $0.guestMAC)
    }
    do {
      try configuration.validate()
    } catch {
      throw ControlError(.invalidArgument, error.description)
    }
    return configuration
  }
}

/// The one control interface of a managed machine: configure it before boot, boot it, pause,
/// resume, press its buttons, stop it and query it. The Firecracker and Cloud Hypervisor HTTP
/// frontends and the CLI are thin layers over this type. Thread-safe; no call blocks a vCPU.
public final class VMController: Sendable {
  private struct State {
    var lifecycle: VMLifecycle = .notStarted
    var spec: VMSpec
    var machine: VirtualMachine?
    var stopReason: MachineStopReason?
    var bootTime: UInt64?
    var pausedAt: UInt64?
    var pausedNanoseconds: UInt64 = 0
  }

  /// The instance ID (Firecracker's `--id`).
  public let id: String
  private let state: Mutex<State>
  private let stopped = VMStopSignal()
  /// Serializes lifecycle transitions (start/pause/resume/stop) with each other.
  let transitions = Mutex<Void>(())
  private let onStop: @Sendable (MachineStopReason) -> Void

  /// Creates a controller for a machine that is not configured yet. `onStop` runs on the
  /// machine's run thread when the guest stops.
  public init(
    id: String = "anonymous-instance", spec: VMSpec = VMSpec(),
    onStop: @escaping @Sendable (MachineStopReason) -> Void = { _ in }
  ) {
    self.id = id
    self.state = Mutex(State(spec: spec))
    self.onStop = onStop
  }

  /// The current lifecycle state.
  public var lifecycle: VMLifecycle { state.withLock { $0.lifecycle } }

  /// The configuration as collected so far (after boot: what the machine was built from).
  public var spec: VMSpec { state.withLock { $0.spec } }

  /// Why the machine stopped, once it has.
  public var stopReason: MachineStopReason? { state.withLock { $0.stopReason } }

  /// The running machine, once booted.
  public var machine: VirtualMachine? { state.withLock { $0.machine } }

  /// Changes the pre-boot configuration. Refused with `.invalidState` once the machine has
  /// started; `body`'s own errors pass through and leave the spec unchanged.
  public func configure(_ body: (inout VMSpec) throws(ControlError) -> Void) throws(ControlError) {
    try state.withLock { (state) throws(ControlError) in
      guard state.lifecycle == .notStarted else {
        throw ControlError(.invalidState, "the operation is not allowed after the microVM has started")
      }
      var spec = state.spec
      try body(&spec)
      state.spec = spec
    }
  }

  /// Builds the machine from the collected configuration and boots it on a new host thread.
  /// Build failures (missing kernel, bad disk, no KVM) are returned as `.failed` and leave the
  /// controller not started, so the configuration can be fixed and the start retried.
  public func start() throws(ControlError) {
    try transitions.withLock { _ throws(ControlError) in
      let spec = try state.withLock { (state) throws(ControlError) -> VMSpec in
        guard state.lifecycle == .notStarted else {
          throw ControlError(.invalidState, "the microVM has already been started")
        }
        return state.spec
      }
      let configuration = try spec.machineConfiguration()
      let machine: VirtualMachine
      do {
        machine = try VirtualMachine(configuration: configuration)
      } catch let error as MachineError {
        throw ControlError(.failed, error.description)
      } catch {
        throw ControlError(.failed, "\(error)")
      }
      if spec.trackDirtyPages {
        do throws(ControlError) {
          try startDirtyPageTracking(machine)
        } catch {
          machine.shutdownDevices()
          throw error
        }
      }
      state.withLock {
        $0.machine = machine
        $0.lifecycle = .running
        $0.bootTime = VirtualClockNow.host()
      }
      try runOnItsOwnThread(machine)
    }
  }

  /// Runs `machine` on a detached host thread; when it stops, the controller moves to
  /// `shutDown`, records the reason and calls `onStop`. A thread that cannot start shuts the
  /// controller down at once.
  private func runOnItsOwnThread(_ machine: VirtualMachine) throws(ControlError) {
    do throws(ControlError) {
      try startDetachedThread(name: "vmm-run") { [self] in
        let reason: MachineStopReason
        do {
          reason = try machine.run()
        } catch {
          reason = .failure("\(error)")
        }
        state.withLock {
          $0.lifecycle = .shutDown
          $0.stopReason = reason
        }
        stopped.signal()
        onStop(reason)
      }
    } catch {
      state.withLock {
        $0.lifecycle = .shutDown
        $0.stopReason = .failure(error.description)
      }
      stopped.signal()
      throw error
    }
  }

  /// Runs `machine`, built elsewhere (restored from a snapshot), as this controller's machine:
  /// only before start. With `paused`, the machine was paused before it ran and stays paused.
  func adopt(_ machine: VirtualMachine, paused: Bool) throws(ControlError) {
    try transitions.withLock { _ throws(ControlError) in
      try state.withLock { (state) throws(ControlError) in
        guard state.lifecycle == .notStarted else {
          throw ControlError(.invalidState, "a snapshot can only be loaded before the microVM has started")
        }
        state.machine = machine
        // A restored balloon is configured as the snapshot's was (the balloon endpoints use it).
        if let balloon = machine.balloon {
          state.spec.balloon = BalloonConfiguration(
            targetMiB: balloon.targetPages / BalloonConfiguration.pagesPerMiB, options: balloon.options)
        }
        state.lifecycle = paused ? .paused : .running
        state.bootTime = VirtualClockNow.host()
        if paused { state.pausedAt = VirtualClockNow.host() }
      }
      try runOnItsOwnThread(machine)
    }
  }

  /// Pauses a running machine: returns once every vCPU is parked and the clocks are frozen.
  public func pause() throws(ControlError) {
    try transitions.withLock { _ throws(ControlError) in
      let machine = try runningMachine(expecting: .running, verb: "pause")
      do throws(MachinePauseError) {
        try machine.pause()
      } catch {
        throw ControlError(.failed, error.description)
      }
      state.withLock { state in
        // The guest may have stopped while pausing; never move back from shutDown.
        if state.lifecycle == .running {
          state.lifecycle = .paused
          state.pausedAt = VirtualClockNow.host()
        }
      }
    }
  }

  /// Resumes a paused machine exactly where it stopped.
  public func resume() throws(ControlError) {
    try transitions.withLock { _ throws(ControlError) in
      let machine = try runningMachine(expecting: .paused, verb: "resume")
      state.withLock { state in
        state.lifecycle = .running
        if let pausedAt = state.pausedAt {
          state.pausedNanoseconds &+= VirtualClockNow.host() &- pausedAt
        }
        state.pausedAt = nil
      }
      machine.resume()
    }
  }

  /// Presses the ACPI power button of a booted machine.
  public func pressPowerButton() throws(ControlError) {
    try runningMachine(expecting: nil, verb: "press the power button of").pressPowerButton()
  }

  /// Types Ctrl-Alt-Del on the machine's keyboard.
  public func sendCtrlAltDel() throws(ControlError) {
    try runningMachine(expecting: nil, verb: "send Ctrl-Alt-Del to").sendCtrlAltDel()
  }

  /// Stops a booted machine (from running or paused) and waits until its run thread is done.
  /// A machine that was never started moves straight to `shutDown`.
  public func shutdown(timeoutNanoseconds: UInt64 = 10_000_000_000) throws(ControlError) {
    let machine = state.withLock { state -> VirtualMachine? in
      if state.lifecycle == .notStarted {
        state.lifecycle = .shutDown
        state.stopReason = .stopRequested
        return nil
      }
      return state.machine
    }
    guard let machine else {
      stopped.signal()
      return
    }
    machine.requestStop(.stopRequested)
    guard stopped.wait(timeoutNanoseconds: timeoutNanoseconds) else {
      throw ControlError(.failed, "the machine did not stop within \(timeoutNanoseconds / 1_000_000_000) s")
    }
  }

  /// Waits until the machine stops; nil on timeout.
  public func waitUntilStopped(timeoutNanoseconds: UInt64? = nil) -> MachineStopReason? {
    guard stopped.wait(timeoutNanoseconds: timeoutNanoseconds) else { return nil }
    return stopReason
  }

  /// Host nanoseconds the machine has spent paused since boot (for counters and tests).
  public var pausedNanoseconds: UInt64 {
    state.withLock { state in
      var total = state.pausedNanoseconds
      if let pausedAt = state.pausedAt { total &+= VirtualClockNow.host() &- pausedAt }
      return total
    }
  }

  /// Host nanoseconds since boot, nil before.
  public var uptimeNanoseconds: UInt64? {
    state.withLock { state in state.bootTime.map { VirtualClockNow.host() &- $0 } }
  }

  private func runningMachine(expecting lifecycle: VMLifecycle?, verb: String) throws(ControlError) -> VirtualMachine {
    try state.withLock { (state) throws(ControlError) -> VirtualMachine in
      guard let machine = state.machine, state.lifecycle == .running || state.lifecycle == .paused else {
        throw ControlError(.invalidState, "cannot \(verb) a microVM that is \(state.lifecycle.phrase)")
      }
      if let lifecycle, state.lifecycle != lifecycle {
        throw ControlError(.invalidState, "cannot \(verb) a microVM that is \(state.lifecycle.phrase)")
      }
      return machine
    }
  }
}

extension VMLifecycle {
  /// The state as a phrase for error messages.
  var phrase: String {
    switch self {
    case .notStarted: return "not started"
    case .running: return "running"
    case .paused: return "paused"
    case .shutDown: return "shut down"
    }
  }
}

/// Host CLOCK_MONOTONIC for the controller's bookkeeping.
enum VirtualClockNow {
  static func host() -> UInt64 { HostCondition.now() }
}

/// A one-shot event: `signal` once, `wait` from any number of threads.
final class VMStopSignal: Sendable {
  private let monitor = HostCondition()
  /// Guarded by `monitor`'s mutex.
  nonisolated(unsafe) private var signalled = false

  func signal() {
    monitor.locked {
      signalled = true
      monitor.broadcast()
    }
  }

  /// Waits for the signal; false on timeout.
  func wait(timeoutNanoseconds: UInt64?) -> Bool {
    let deadline = timeoutNanoseconds.map { HostCondition.now() &+ $0 }
    return monitor.locked {
      while !signalled {
        if !monitor.wait(untilHost: deadline) { return signalled }
      }
      return true
    }
  }
}

/// Starts a detached host thread running `body`.
func startDetachedThread(name: String, _ body: @escaping @Sendable () -> Void) throws(ControlError) {
  if case .failure(let error) = HostThread.start(detached: true, body) {
    throw ControlError(.failed, "cannot start the machine's thread: \(error)")
  }
}

extension VMController {
  /// Points a booted machine's drive `id` at a new backing file (Firecracker's
  /// `PATCH /drives/{id}` with `path_on_host`): the file is opened with the drive's read-only
  /// setting, the old one is flushed, and the driver gets a configuration-change interrupt so
  /// it rereads the capacity. Before boot only the spec changes.
  public func replaceDriveBackingFile(id: String, path: String) throws(ControlError) {
    let (ordered, machine) = state.withLock { state in
      (state.spec.drivesInDeviceOrder, state.machine)
    }
    guard let index = ordered.firstIndex(where: { $0.id == id }) else {
      throw ControlError(.invalidArgument, "no drive with ID \(id)")
    }
    if let machine {
      let blocks = machine.virtioDevices.filter { $0.model is VirtioBlock }
      guard index < blocks.count, let block = blocks[index].model as? VirtioBlock else {
        throw ControlError(.failed, "drive \(id) has no device in the running machine")
      }
      let backend: RawFileBlockBackend
      do {
        backend = try RawFileBlockBackend(path: path, readOnly: ordered[index].readOnly)
      } catch {
        throw ControlError(.invalidArgument, "cannot open the new backing file of drive \(id): \(error)")
      }
      var flushFailure: BlockBackendError?
      do {
        try block.replaceBackend(backend)
      } catch {
        flushFailure = error
      }
      blocks[index].configurationChanged()
      recordDrivePath(id: id, path: path)
      if let flushFailure {
        throw ControlError(.failed, "drive \(id) now uses \(path), but flushing the old file failed: \(flushFailure)")
      }
    } else {
      recordDrivePath(id: id, path: path)
    }
  }

  private func recordDrivePath(id: String, path: String) {
    state.withLock { state in
      if let position = state.spec.drives.firstIndex(where: { $0.id == id }) { state.spec.drives[position].path = path }
    }
  }
}

/// The counters of one device of a running machine, named by its control-plane ID.
public struct DeviceCounterSet: Sendable {
  /// The drive or interface ID.
  public var id: String
  /// `block` or `net`.
  public var kind: String
  /// Counter name to value (`DeviceCounters`).
  public var values: [String: UInt64]
}

extension VMController {
  /// Host CPU time used by each vCPU thread so far, by vCPU index (empty before boot).
  public func vcpuRunTimeNanoseconds() -> [Int: UInt64] {
    machine?.parts.control.vcpuRunTimeNanoseconds() ?? [:]
  }

  /// Counters of every drive and network interface of the machine (empty before boot), drives
  /// first, each in the order the spec lists them.
  public func deviceCounters() -> [DeviceCounterSet] {
    let (spec, machine) = state.withLock { ($0.spec, $0.machine) }
    guard let machine else { return [] }
    let driveIDs = spec.drivesInDeviceOrder.map(\.id)
    let blocks = machine.virtioDevices.compactMap { $0.model as? VirtioBlock }
    let nets = machine.virtioDevices.compactMap { $0.model as? VirtioNet }
    var sets = zip(driveIDs, blocks).map { DeviceCounterSet(id: $0, kind: "block", values: $1.counters.values) }
    sets += zip(spec.networkInterfaces.map(\.id), nets).map {
      DeviceCounterSet(id: $0, kind: "net", values: $1.counters.values)
    }
    return sets
  }
}
