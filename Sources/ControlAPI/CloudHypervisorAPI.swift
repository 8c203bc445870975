import Glibc
import Logging
import VMCore
import VMM
import Virtio

/// The Cloud Hypervisor API (cloud-hypervisor.yaml) under `/api/v1/`: `vmm.*` and `vm.*`
/// endpoints with Cloud Hypervisor's status codes (204 on success, 404 when no VM is created,
/// 405 when the VM is not in a state that allows the request, 400 for a bad body, 500 when a
/// valid request could not be carried out). Error bodies are one line of plain text, as
/// `ch-remote` prints them.
public final class CloudHypervisorAPI: Sendable {
  /// The Cloud Hypervisor release whose API this follows (`vmm.ping`'s `version`).
  public static let apiVersion = "53.0.0"
  /// The path prefix of every endpoint.
  public static let prefix = "/api/v1/"

  let plane: ControlPlane
  private let log = Logger(label: "ch_api")
  private let requestExit: @Sendable (Int32) -> Void

  /// `requestExit` ends the process after `vmm.shutdown` has been answered.
  public init(plane: ControlPlane, requestExit: @escaping @Sendable (Int32) -> Void) {
    self.plane = plane
    self.requestExit = requestExit
  }

  var controller: VMController { plane.controller }

  /// A failed request: its status and one line.
  struct Failure: Error {
    let status: Int
    let message: String
  }

  private static let endpoints: [String: String] = [
    "vmm.ping": "GET", "vmm.shutdown": "PUT", "vm.create": "PUT", "vm.boot": "PUT", "vm.info": "GET",
    "vm.counters": "GET", "vm.pause": "PUT", "vm.resume": "PUT", "vm.shutdown": "PUT", "vm.reboot": "PUT",
    "vm.power-button": "PUT", "vm.delete": "PUT", "vm.snapshot": "PUT", "vm.restore": "PUT",
    "vm.send-migration": "PUT", "vm.receive-migration": "PUT", "vm.resize": "PUT",
    "vm.hostvisor-screenshot": "PUT", "vm.hostvisor-sendkey": "PUT",
  ]

  private static let unsupportedEndpoints: Set<String> = [
    "vm.resize-disk", "vm.resize-zone", "vm.add-device", "vm.remove-device", "vm.add-disk",
    "vm.add-fs", "vm.add-generic-vhost-user", "vm.add-pmem", "vm.add-net", "vm.add-vsock", "vm.add-vdpa",
    "vm.add-user-device", "vm.coredump", "vm.nmi",
  ]

  /// Answers one request whose path starts with `/api/v1/`.
  public func handle(_ request: APIRequest) -> APIResponse {
    let name = String(request.path.dropFirst(Self.prefix.count))
    log.debug("The API server received a \(request.method) request on \"\(request.path)\".")
    let response: APIResponse
    do {
      response = try route(name: name, request: request)
    } catch {
      log.warning("\(request.method) \(request.path) failed: \(error.message)")
      plane.metrics.countRequest(method: request.method, resource: name, failed: true)
      var failure = APIResponse.text(error.status, error.message)
      if error.status == 405, let method = Self.endpoints[name], method != request.method {
        failure.headers = [("Allow", method)]
      }
      return failure
    }
    plane.metrics.countRequest(method: request.method, resource: name, failed: false)
    return response
  }

  private func route(name: String, request: APIRequest) throws(Failure) -> APIResponse {
    guard let method = Self.endpoints[name] else {
      if Self.unsupportedEndpoints.contains(name) {
        throw Failure(status: 400, message: "Hostvisor does not support \(name) yet")
      }
      throw Failure(status: 404, message: "no such endpoint: \(request.path)")
    }
    guard request.method == method else {
      throw Failure(status: 405, message: "\(name) takes \(method), not \(request.method)")
    }
    let body = request.body
    switch name {
    case "vmm.ping":
      let ping = VmmPingResponse(
        build_version: "hostvisor-\(HostvisorVersion.version)", version: Self.apiVersion, pid: Int64(getpid()),
        features: [])
      return .json(200, StrictJSON.encode(ping))
    case "vmm.shutdown":
      let lifecycle = controller.lifecycle
      if lifecycle == .running || lifecycle == .paused { try? plane.stopByAPI() }
      let exit = requestExit
      return APIResponse(status: 204, afterResponse: { exit(0) })
    case "vm.create":
      try create(decode(CHVmConfig.self, body))
    case "vm.boot":
      try boot()
    case "vm.info":
      return .json(200, StrictJSON.encode(try info()))
    case "vm.counters":
      try requireCreated()
      guard controller.machine != nil else { throw Failure(status: 405, message: "the VM is not booted") }
      return .json(200, StrictJSON.encode(plane.counters()))
    case "vm.pause":
      try requireBooted()
      try perform { () throws(ControlError) in try controller.pause() }
    case "vm.resume":
      try requireBooted()
      try perform { () throws(ControlError) in try controller.resume() }
    case "vm.shutdown":
      try requireBooted()
      try perform { () throws(ControlError) in try plane.stopByAPI() }
    case "vm.reboot":
      try requireBooted()
      try perform { () throws(ControlError) in try plane.reboot() }
    case "vm.power-button":
      try requireBooted()
      try perform { () throws(ControlError) in try controller.pressPowerButton() }
    case "vm.delete":
      try perform { () throws(ControlError) in try plane.deleteMachine() }
    case "vm.snapshot":
      try snapshot(decode(CHSnapshotConfig.self, body))
    case "vm.restore":
      try restore(decode(CHRestoreConfig.self, body))
    case "vm.send-migration":
      try sendMigration(decode(CHSendMigrationData.self, body))
    case "vm.receive-migration":
      try receiveMigration(decode(CHReceiveMigrationData.self, body))
    case "vm.resize":
      try resize(decode(CHVmResize.self, body))
    case "vm.hostvisor-screenshot":
      try screenshot(decode(HostvisorScreenshotConfig.self, body))
    case "vm.hostvisor-sendkey":
      try sendKey(decode(HostvisorSendKeyConfig.self, body))
    default:
      throw Failure(status: 404, message: "no such endpoint: \(request.path)")
    }
    return .noContent
  }

  private func decode<Model: Codable>(_ type: Model.Type, _ body: [UInt8]) throws(Failure) -> Model {
    do {
      return try StrictJSON.decode(type, from: body, unknownFieldWording: "unknown or unsupported field")
    } catch {
      throw Failure(status: 400, message: "invalid request body: \(error.description)")
    }
  }

  /// Runs a controller call, mapping its error kind to Cloud Hypervisor's status codes.
  private func perform(_ body: () throws(ControlError) -> Void) throws(Failure) {
    do {
      try body()
    } catch {
      switch error.kind {
      case .invalidArgument: throw Failure(status: 400, message: error.description)
      case .invalidState: throw Failure(status: 405, message: error.description)
      case .unsupported, .failed: throw Failure(status: 500, message: error.description)
      }
    }
  }

  private func requireCreated() throws(Failure) {
    guard plane.isCreated else { throw Failure(status: 404, message: "the VM is not created") }
  }

  private func requireBooted() throws(Failure) {
    try requireCreated()
    let lifecycle = controller.lifecycle
    guard lifecycle == .running || lifecycle == .paused else {
      throw Failure(status: 405, message: "the VM is \(lifecycle == .notStarted ? "not booted" : "shut down")")
    }
  }

  // MARK: VM configuration

  private func create(_ config: CHVmConfig) throws(Failure) {
    guard !plane.isCreated else { throw Failure(status: 400, message: "the VM is already created") }
    let spec = try Self.spec(from: config, base: plane.baseSpec)
    plane.createMachine(spec)
    log.info("The VM was created.")
  }

  /// The `VMSpec` a `VmConfig` describes; refuses what Hostvisor does not implement.
  static func spec(from config: CHVmConfig, base: VMSpec) throws(Failure) -> VMSpec {
    func refuse(_ message: String) -> Failure { Failure(status: 400, message: message) }
    var spec = base
    if config.payload.firmware != nil {
      throw refuse("Hostvisor boots kernels directly; payload.firmware is not supported")
    }
    guard let kernel = config.payload.kernel, !kernel.isEmpty else { throw refuse("payload.kernel is required") }
    spec.kernelPath = kernel
    spec.initrdPath = config.payload.initramfs
    spec.bootArgs = config.payload.cmdline ?? ""
    if let cpus = config.cpus {
      guard (1...MachineConfiguration.maximumCPUs).contains(cpus.boot_vcpus) else {
        throw refuse("cpus.boot_vcpus must be between 1 and \(MachineConfiguration.maximumCPUs)")
      }
      guard cpus.max_vcpus == cpus.boot_vcpus else {
        throw refuse("Hostvisor does not hotplug vCPUs: cpus.max_vcpus must equal cpus.boot_vcpus")
      }
      spec.vcpuCount = cpus.boot_vcpus
    }
    spec.memoryMiB = 512
    if let memory = config.memory {
      for (flag, name) in [
        (memory.shared, "shared"), (memory.hugepages, "hugepages"), (memory.prefault, "prefault"),
      ] where flag == true {
        throw refuse("Hostvisor does not support memory.\(name)")
      }
      let mebibytes = (memory.size / (1 << 20)) + (memory.size % (1 << 20) == 0 ? 0 : 1)
      guard memory.size > 0, mebibytes >= 2, UInt64(mebibytes) << 20 <= MachineConfiguration.hostMemoryLimit() else {
        throw refuse("memory.size \(memory.size) is out of range")
      }
      spec.memoryMiB = Int(mebibytes)
      // THP only when asked for (Cloud Hypervisor's default is on; Hostvisor's is off).
      spec.memoryAdvice = GuestMemoryAdvice(mergeable: memory.mergeable ?? false, hugePages: memory.thp ?? false)
    }
    spec.drives = []
    for (index, disk) in (config.disks ?? []).enumerated() {
      guard let path = disk.path else { throw refuse("disks[\(index)].path is required (vhost-user is not supported)") }
      if disk.direct == true { throw refuse("Hostvisor does not open disks with O_DIRECT (disks[\(index)].direct)") }
      spec.drives.append(DriveSpec(id: disk.id ?? "_disk\(index)", path: path, readOnly: disk.readonly ?? false))
    }
    spec.networkInterfaces = []
    for (index, net) in (config.net ?? []).enumerated() {
      guard let tap = net.tap, !tap.isEmpty, tap.utf8.count < 16 else {
        throw refuse("net[\(index)].tap must name a TAP device (1 to 15 characters)")
      }
      var mac: MACAddress?
      if let text = net.mac {
        do { mac = try MACAddress(parsing: text) } catch { throw refuse("net[\(index)].mac is not a MAC address") }
      }
      let id = net.id ?? "_net\(index)"
      if let holder = spec.interfaceHoldingPreopenedTap(tap, except: id) {
        throw refuse(VMSpec.preopenedTapTaken(tap, by: holder, for: id))
      }
      spec.networkInterfaces.append(NetworkInterfaceSpec(id: id, hostDeviceName: tap, guestMAC: mac))
    }
    if let rng = config.rng, rng.src != "/dev/urandom", rng.src != "/dev/random" {
      throw refuse("Hostvisor's virtio-rng reads the host's random source; rng.src must be /dev/urandom")
    }
    for (flag, name) in [(config.iommu, "iommu"), (config.watchdog, "watchdog"), (config.pvpanic, "pvpanic")]
    where flag == true {
      throw refuse("Hostvisor does not support \(name)")
    }
    if let balloon = config.balloon { spec.balloon = try Self.balloon(from: balloon, memoryMiB: spec.memoryMiB) }
    // Cloud Hypervisor's defaults: serial Null, console Tty (virtio-console on the terminal).
    let serial = config.serial ?? CHConsoleConfig(mode: .Null)
    let console = config.console ?? CHConsoleConfig(mode: .Tty)
    switch console.mode {
    case .Tty: spec.console = .virtio
    case .Off, .Null: spec.console = .serial
    default: throw refuse("Hostvisor's virtio console supports the modes Tty, Null and Off")
    }
    switch serial.mode {
    case .Tty:
      guard spec.console != .virtio else {
        throw refuse("serial and console cannot both be Tty; set console.mode to Off")
      }
      spec.serial = .stdio
    case .File:
      guard let file = serial.file else { throw refuse("serial.file is required with mode File") }
      spec.serial = .file(file)
    case .Off, .Null: spec.serial = .none
    default: throw refuse("Hostvisor's serial port supports the modes Tty, File, Null and Off")
    }
    do {
      _ = try spec.machineConfiguration()
    } catch {
      throw refuse(error.description)
    }
    return spec
  }

  /// The `VmConfig` that describes `spec`.
  static func vmConfig(from spec: VMSpec) -> CHVmConfig {
    let serial: CHConsoleConfig
    switch spec.serial {
    case .stdio: serial = CHConsoleConfig(mode: .Tty)
    case .file(let path): serial = CHConsoleConfig(file: path, mode: .File)
    case .none: serial = CHConsoleConfig(mode: .Null)
    }
    return CHVmConfig(
      cpus: CHCpusConfig(boot_vcpus: spec.vcpuCount, max_vcpus: spec.vcpuCount),
      memory: CHMemoryConfig(size: Int64(spec.memoryMiB) << 20),
      payload: CHPayloadConfig(kernel: spec.kernelPath, cmdline: spec.bootArgs, initramfs: spec.initrdPath),
      disks: spec.drives.map { CHDiskConfig(path: $0.path, readonly: $0.readOnly, id: $0.id) },
      net: spec.networkInterfaces.map { CHNetConfig(tap: $0.hostDeviceName, mac: $0.guestMAC?.description, id: $0.id) },
      rng: CHRngConfig(src: "/dev/urandom"), serial: serial,
      console: CHConsoleConfig(mode: spec.console == .virtio ? .Tty : .Off), balloon: balloonConfig(from: spec.balloon))
  }

  private func boot() throws(Failure) {
    try requireCreated()
    switch controller.lifecycle {
    case .running, .paused: throw Failure(status: 405, message: "the VM is already booted")
    case .shutDown: plane.createMachine(controller.spec)
    case .notStarted: break
    }
    do {
      try controller.start()
    } catch {
      let status: Int
      switch error.kind {
      case .invalidState: status = 405
      case .invalidArgument: status = 400
      case .unsupported, .failed: status = 500
      }
      throw Failure(status: status, message: error.description)
    }
    log.info("The VM was booted.")
  }

  private func info() throws(Failure) -> CHVmInfo {
    try requireCreated()
    let state: String
    switch controller.lifecycle {
    case .notStarted: state = "Created"
    case .running: state = "Running"
    case .paused: state = "Paused"
    case .shutDown: state = "Shutdown"
    }
    let spec = controller.spec
    // The balloon's pages are not the guest's.
    let ballooned = Int64(controller.machine?.balloon?.actualPages ?? 0) * 4096
    return CHVmInfo(
      config: Self.vmConfig(from: spec), state: state, memory_actual_size: (Int64(spec.memoryMiB) << 20) - ballooned)
  }

  // MARK: Snapshots and migration

  /// The directory a `file://` URL names.
  static func directory(fromFileURL url: String) throws(Failure) -> String {
    guard url.hasPrefix("file://"), url.count > "file://".count else {
      throw Failure(status: 400, message: "expected a file:// URL naming a directory, got \(url)")
    }
    return String(url.dropFirst("file://".count))
  }

  private func snapshot(_ config: CHSnapshotConfig) throws(Failure) {
    guard let url = config.destination_url else { throw Failure(status: 400, message: "destination_url is required") }
    let directory = try Self.directory(fromFileURL: url)
    try requireBooted()
    guard controller.lifecycle == .paused else {
      throw Failure(status: 405, message: "the VM must be paused before a snapshot")
    }
    try perform { () throws(ControlError) in
      try controller.createSnapshot(statePath: directory + "/state", memoryPath: directory + "/memory")
    }
  }

  private func restore(_ config: CHRestoreConfig) throws(Failure) {
    let directory = try Self.directory(fromFileURL: config.source_url)
    guard !plane.isCreated else {
      throw Failure(status: 404, message: "the VM is already created; restore needs a fresh VMM")
    }
    // Copy (the default) reads the memory file into RAM before the guest runs (eager), as does
    // `prefault`; OnDemand maps it copy-on-write, pages read when the guest touches them.
    let eager = (config.memory_restore_mode ?? .Copy) == .Copy || config.prefault == true
    try perform { () throws(ControlError) in
      try controller.loadSnapshot(
        statePath: directory + "/state", memoryPath: directory + "/memory", resume: config.resume ?? false,
        eagerMemory: eager)
    }
    plane.markCreated()
  }

  private func sendMigration(_ data: CHSendMigrationData) throws(Failure) {
    if data.tls_dir != nil { throw Failure(status: 400, message: "Hostvisor does not migrate over TLS (tls_dir)") }
    if data.memory_mode == .Postcopy {
      throw Failure(status: 400, message: "Hostvisor migrates with pre-copy only (memory_mode Precopy)")
    }
    if let connections = data.connections, connections != 1 {
      throw Failure(status: 400, message: "Hostvisor migrates over one connection (connections 1)")
    }
    if let downtime = data.downtime_ms, downtime < 1 {
      throw Failure(status: 400, message: "downtime_ms must be at least 1")
    }
    if let timeout = data.timeout_s, timeout < 1 {
      throw Failure(status: 400, message: "timeout_s must be at least 1")
    }
    try requireBooted()
    let downtime = Int(clamping: data.downtime_ms ?? 300)
    do {
      let statistics = try controller.sendMigration(
        to: data.destination_url, downtimeLimitMilliseconds: downtime,
        timeoutSeconds: Int(clamping: data.timeout_s ?? 3600),
        timeoutStrategy: data.timeout_strategy == .Ignore ? .ignore : .cancel,
        autoConverge: data.auto_converge ?? true)
      Logger(label: "vmm").info("migrated to \(data.destination_url): \(statistics)")
    } catch {
      throw Failure(status: error.kind == .invalidArgument ? 400 : 500, message: error.description)
    }
  }

  private func receiveMigration(_ data: CHReceiveMigrationData) throws(Failure) {
    if data.tls_dir != nil { throw Failure(status: 400, message: "Hostvisor does not migrate over TLS (tls_dir)") }
    if data.memory_mode == .Postcopy {
      throw Failure(status: 400, message: "Hostvisor migrates with pre-copy only (memory_mode Precopy)")
    }
    do {
      try controller.receiveMigration(from: data.receiver_url)
    } catch {
      throw Failure(status: error.kind == .invalidArgument ? 400 : 500, message: error.description)
    }
    plane.markCreated()
  }
}

/// Hostvisor's own version.
public enum HostvisorVersion {
  /// The release number.
  public static let version = "0.1.0"
}
