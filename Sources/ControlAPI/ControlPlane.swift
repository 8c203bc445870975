import Glibc
import KVMBackend
import Logging
import Synchronization
import VMCore
import VMM

/// What both HTTP frontends share: the machine's controller (replaced when Cloud Hypervisor's
/// `vm.delete`, `vm.create` or `vm.reboot` starts over), the metrics and the logger.
public final class ControlPlane: Sendable {
  /// The instance ID (Firecracker's `--id`).
  public let instanceID: String
  /// Settings every machine of this process gets that the APIs do not carry (accelerator,
  /// where COM1 goes when the API does not say, verbosity).
  public let baseSpec: VMSpec
  /// The metrics (Firecracker's `/metrics`, Cloud Hypervisor's `vm.counters`).
  public let metrics: APIMetrics
  /// The logger (Firecracker's `/logger`).
  public let logSink: LogSink
  let log: Logger

  private struct State {
    var controller: VMController
    /// Whether a machine exists (Cloud Hypervisor's "created"); Firecracker's piecewise
    /// configuration always works on the one controller.
    var created: Bool
    /// Controllers this process stopped itself (reboot, `vm.shutdown`, `vm.delete`): their
    /// stop does not end the process.
    var stoppedByAPI: Set<ObjectIdentifier>
  }

  private let state: Mutex<State>
  private let onGuestStop: @Sendable (MachineStopReason) -> Void

  /// A control plane for one machine. `onGuestStop` runs when the guest stops by itself
  /// (powered off, reset, debug exit, failure, Ctrl-A x), not when an API request stopped it.
  public init(
    instanceID: String, baseSpec: VMSpec, logSink: LogSink = .shared,
    onGuestStop: @escaping @Sendable (MachineStopReason) -> Void = { _ in }
  ) {
    self.instanceID = instanceID
    self.baseSpec = baseSpec
    self.metrics = APIMetrics()
    self.logSink = logSink
    self.log = Logger(label: "vmm")
    self.onGuestStop = onGuestStop
    let placeholder = VMController(id: instanceID, spec: baseSpec)
    state = Mutex(State(controller: placeholder, created: false, stoppedByAPI: []))
    let first = makeController(spec: baseSpec)
    state.withLock { $0.controller = first }
  }

  /// The current controller.
  public var controller: VMController { state.withLock { $0.controller } }

  /// Whether Cloud Hypervisor's `vm.create` (or a Firecracker configuration) made a machine.
  public var isCreated: Bool { state.withLock { $0.created } }

  /// Marks the machine as created (after a Firecracker configuration request or `vm.create`).
  func markCreated() { state.withLock { $0.created = true } }

  /// Boots the machine configured when the process started (`hostvisor run --api-sock`): it
  /// counts as created for both APIs, as if `vm.create` and `vm.boot` had made it.
  public func bootConfiguredMachine() throws(ControlError) {
    markCreated()
    try controller.start()
  }

  /// Waits at `url` for a migrating machine and runs it (`hostvisor serve --incoming`); the
  /// machine then counts as created for both APIs.
  public func receiveIncomingMigration(from url: String) throws(ControlError) {
    try controller.receiveMigration(from: url)
    markCreated()
  }

  private func makeController(spec: VMSpec) -> VMController {
    let identity = Mutex<ObjectIdentifier?>(nil)
    let controller = VMController(id: instanceID, spec: spec) { [weak self] reason in
      self?.controllerStopped(reason, identity: identity.withLock { $0 })
    }
    identity.withLock { $0 = ObjectIdentifier(controller) }
    return controller
  }

  private func controllerStopped(_ reason: MachineStopReason, identity: ObjectIdentifier?) {
    log.info("the guest stopped: \(reason)")
    let byAPI = state.withLock { state -> Bool in
      guard let identity else { return true }
      return state.stoppedByAPI.contains(identity) || ObjectIdentifier(state.controller) != identity
    }
    if !byAPI { onGuestStop(reason) }
  }

  /// Stops the current machine on behalf of an API request; its stop does not end the process.
  func stopByAPI() throws(ControlError) {
    let controller = state.withLock { state -> VMController in
      state.stoppedByAPI.insert(ObjectIdentifier(state.controller))
      return state.controller
    }
    try controller.shutdown()
  }

  /// Starts over with a fresh, unconfigured controller (Cloud Hypervisor's `vm.delete`).
  func deleteMachine() throws(ControlError) {
    let lifecycle = controller.lifecycle
    if lifecycle == .running || lifecycle == .paused { try stopByAPI() }
    let fresh = makeController(spec: baseSpec)
    state.withLock {
      $0.controller = fresh
      $0.created = false
    }
  }

  /// Replaces the machine's configuration with `spec` (Cloud Hypervisor's `vm.create`).
  func createMachine(_ spec: VMSpec) {
    let fresh = makeController(spec: spec)
    state.withLock {
      $0.controller = fresh
      $0.created = true
    }
  }

  /// Stops the machine and boots a new one from the same configuration.
  func reboot() throws(ControlError) {
    let old = controller
    let lifecycle = old.lifecycle
    guard lifecycle == .running || lifecycle == .paused else {
      throw ControlError(
        .invalidState, "cannot reboot a microVM that is \(lifecycle == .notStarted ? "not booted" : "shut down")")
    }
    try stopByAPI()
    let fresh = makeController(spec: old.spec)
    state.withLock { $0.controller = fresh }
    try fresh.start()
  }

  /// Counters of the current machine, grouped as Cloud Hypervisor's `vm.counters` groups them.
  func counters() -> [String: [String: Int64]] {
    let controller = self.controller
    var groups: [String: [String: Int64]] = [:]
    groups["vmm"] = [
      "uptime_ns": Int64(clamping: controller.uptimeNanoseconds ?? 0),
      "paused_ns": Int64(clamping: controller.pausedNanoseconds),
    ]
    if let statistics = (controller.machine?.accelerator as? KVMAccelerator)?.exitStatistics {
      groups["kvm_exits"] = [
        "total": Int64(clamping: statistics.total), "io": Int64(clamping: statistics.portIO),
        "mmio": Int64(clamping: statistics.mmio), "hlt": Int64(clamping: statistics.halt),
        "interrupted": Int64(clamping: statistics.interrupted), "other": Int64(clamping: statistics.other),
      ]
    }
    let runTimes = controller.vcpuRunTimeNanoseconds()
    if !runTimes.isEmpty {
      groups["vcpu_run_time_ns"] = Dictionary(
        uniqueKeysWithValues: runTimes.map { ("vcpu\($0.key)", Int64(clamping: $0.value)) })
    }
    for device in controller.deviceCounters() {
      groups[device.id] = device.values.mapValues { Int64(clamping: $0) }
    }
    groups["api"] = metrics.totals()
    return groups
  }
}
