import Foundation
import Logging
import Synchronization
import VMM
import Virtio

/// The Firecracker API (firecracker.yaml v1.16.1) at `/`: 204 on success, 400 with
/// `{"fault_message": ...}` on every error, unknown fields refused, pre-boot resources refused
/// after InstanceStart. A thin layer over `VMController`.
public final class FirecrackerAPI: Sendable {
  /// The Firecracker version this API follows (reported by `GET /version` and `GET /`).
  public static let apiVersion = "1.16.1"

  let plane: ControlPlane
  private let log = Logger(label: "api_server")

  /// What the API records beyond `VMSpec`, to report it back in `GET /vm/config`.
  private struct Records {
    var drives: [String: Drive] = [:]
    var driveOrder: [String] = []
    var interfaces: [String: NetworkInterfaceBody] = [:]
    var interfaceOrder: [String] = []
    var bootSource: BootSource?
    var logger: LoggerBody?
    var metrics: MetricsBody?
    var entropy: EntropyDeviceBody?
    var serial: SerialDeviceBody?
    var machineConfig = MachineConfigurationBody(
      cpu_template: nil, smt: false, mem_size_mib: 128, track_dirty_pages: false, vcpu_count: 1,
      huge_pages: "None")
  }

  private let records = Mutex(Records())

  public init(plane: ControlPlane) {
    self.plane = plane
  }

  var controller: VMController { plane.controller }

  /// Answers one request whose path is not under `/api/v1/`.
  public func handle(_ request: APIRequest) -> APIResponse {
    let resource = Self.resourceName(request.path)
    log.debug("The API server received a \(request.method) request on \"\(request.path)\".")
    let response: APIResponse
    do {
      response = try route(request)
    } catch {
      log.warning("\(request.method) \(request.path) failed: \(error.description)")
      plane.metrics.countRequest(method: request.method, resource: resource, failed: true)
      return Self.fault(error.description)
    }
    plane.metrics.countRequest(method: request.method, resource: resource, failed: false)
    if response.status == 204 {
      // The spec says every operation produces application/json, 204 included.
      return APIResponse(status: 204, contentType: "application/json")
    }
    return response
  }

  /// A 400 response with `message` as the fault message.
  static func fault(_ message: String) -> APIResponse {
    .json(400, StrictJSON.encode(FaultMessage(fault_message: message)))
  }

  /// Firecracker's metric names for each resource.
  static func resourceName(_ path: String) -> String {
    let first = path.split(separator: "/").first.map(String.init) ?? ""
    switch first {
    case "": return "instance_info"
    case "machine-config": return "machine_cfg"
    case "boot-source": return "boot_source"
    case "drives": return "drive"
    case "network-interfaces": return "network"
    case "version": return "vmm_version"
    case "vm": return path.hasSuffix("/config") ? "vm_config" : "vm"
    case "snapshot": return path.hasSuffix("load") ? "snapshot_load" : "snapshot_create"
    default: return first.replacingOccurrences(of: "-", with: "_")
    }
  }

  // MARK: Routing

  private func route(_ request: APIRequest) throws(ControlFailure) -> APIResponse {
    var components = request.path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
    var id = ""
    if components.count == 2, ["drives", "network-interfaces", "pmem"].contains(components[0]) {
      id = components[1]
      components[1] = "{id}"
    }
    let key = components.joined(separator: "/")
    let method = request.method
    let body = request.body
    switch (method, key) {
    case ("GET", ""):
      return .json(200, StrictJSON.encode(instanceInfo()))
    case ("GET", "version"):
      return .json(200, StrictJSON.encode(FirecrackerVersion(firecracker_version: Self.apiVersion)))
    case ("GET", "machine-config"):
      return .json(200, StrictJSON.encode(records.withLock { $0.machineConfig }))
    case ("PUT", "machine-config"):
      try putMachineConfig(decode(MachineConfigurationBody.self, body), partial: false)
    case ("PATCH", "machine-config"):
      try putMachineConfig(decode(MachineConfigurationBody.self, body), partial: true)
    case ("GET", "vm/config"):
      return .json(200, StrictJSON.encode(fullConfiguration()))
    case ("PUT", "boot-source"):
      try putBootSource(decode(BootSource.self, body))
    case ("PUT", "drives/{id}"):
      try putDrive(id: id, decode(Drive.self, body))
    case ("PATCH", "drives/{id}"):
      try patchDrive(id: id, decode(PartialDrive.self, body))
    case ("PUT", "network-interfaces/{id}"):
      try putNetworkInterface(id: id, decode(NetworkInterfaceBody.self, body))
    case ("PATCH", "network-interfaces/{id}"):
      try patchNetworkInterface(id: id, decode(PartialNetworkInterface.self, body))
    case ("PUT", "entropy"):
      try putEntropy(decode(EntropyDeviceBody.self, body))
    case ("PUT", "serial"):
      try putSerial(decode(SerialDeviceBody.self, body))
    case ("PUT", "logger"):
      try putLogger(decode(LoggerBody.self, body))
    case ("PUT", "metrics"):
      try putMetrics(decode(MetricsBody.self, body))
    case ("PUT", "actions"):
      try performAction(decode(InstanceActionInfo.self, body))
    case ("PATCH", "vm"):
      try patchVM(decode(VmStateBody.self, body))
    case ("PUT", "snapshot/create"):
      try createSnapshot(decode(SnapshotCreateParams.self, body))
    case ("PUT", "snapshot/load"):
      try loadSnapshot(decode(SnapshotLoadParams.self, body))
    case ("PUT", "balloon"):
      try putBalloon(decode(BalloonBody.self, body))
    case ("PATCH", "balloon"):
      try patchBalloon(decode(BalloonUpdateBody.self, body))
    case ("GET", "balloon"):
      return .json(200, StrictJSON.encode(try balloonConfiguration()))
    case ("GET", "balloon/statistics"):
      return .json(200, StrictJSON.encode(try balloonStatistics()))
    case ("PATCH", "balloon/statistics"):
      try patchBalloonStatistics(decode(BalloonStatisticsUpdateBody.self, body))
    case (_, "balloon/hinting/start"), (_, "balloon/hinting/status"), (_, "balloon/hinting/stop"):
      throw ControlFailure(
        "Hostvisor does not support free page hinting; the balloon hinting endpoints are not supported.")
    case (_, "vsock"):
      throw ControlFailure("Hostvisor has no vsock device yet; PUT /vsock is not supported.")
    case (_, "mmds"), (_, "mmds/config"):
      throw ControlFailure(
        "Hostvisor has no microVM metadata service (MMDS) yet; the MMDS endpoints are not supported.")
    case (_, "cpu-config"):
      throw ControlFailure("Hostvisor does not support custom CPU templates; PUT /cpu-config is not supported.")
    case (_, "pmem/{id}"):
      throw ControlFailure("Hostvisor has no virtio-pmem device; the pmem endpoints are not supported.")
    case (_, "hotplug/memory"):
      throw ControlFailure("Hostvisor does not support memory hotplug; /hotplug/memory is not supported.")
    default:
      throw ControlFailure("Invalid request method and/or path: \(method) \(request.path).")
    }
    return .noContent
  }

  private func decode<Model: Codable>(_ type: Model.Type, _ body: [UInt8]) throws(ControlFailure) -> Model {
    do {
      return try StrictJSON.decode(type, from: body)
    } catch {
      throw ControlFailure("An error occurred when deserializing the json body of a request: \(error.description).")
    }
  }

  // MARK: Queries

  func instanceInfo() -> InstanceInfo {
    let state: String
    switch controller.lifecycle {
    case .notStarted, .shutDown: state = "Not started"
    case .running: state = "Running"
    case .paused: state = "Paused"
    }
    return InstanceInfo(app_name: "Hostvisor", id: plane.instanceID, state: state, vmm_version: Self.apiVersion)
  }

  func fullConfiguration() -> FullVmConfiguration {
    records.withLock { records in
      var configuration = FullVmConfiguration()
      configuration.boot_source = records.bootSource
      configuration.machine_config = records.machineConfig
      configuration.drives = records.driveOrder.compactMap { records.drives[$0] }
      configuration.network_interfaces = records.interfaceOrder.compactMap { records.interfaces[$0] }
      configuration.logger = records.logger
      configuration.metrics = records.metrics
      configuration.entropy = records.entropy
      configuration.balloon = controller.spec.balloon.map(Self.body)
      return configuration
    }
  }

  // MARK: Pre-boot resources

  private static let notAfterStart = "The requested operation is not supported after starting the microVM."
  private static let notBeforeStart = "The requested operation is not supported before starting the microVM."
  static var notBeforeStartMessage: String { notBeforeStart }

  /// Changes the pre-boot spec; refused once the machine has started.
  func configure(_ body: (inout VMSpec) throws(ControlError) -> Void) throws(ControlFailure) {
    do {
      try controller.configure(body)
      plane.markCreated()
    } catch {
      throw ControlFailure(error.kind == .invalidState ? Self.notAfterStart : error.description)
    }
  }

  private func requireNotStarted() throws(ControlFailure) {
    guard controller.lifecycle == .notStarted else { throw ControlFailure(Self.notAfterStart) }
  }

  private func requireStarted() throws(ControlFailure) {
    let lifecycle = controller.lifecycle
    guard lifecycle == .running || lifecycle == .paused else {
      throw ControlFailure(lifecycle == .notStarted ? Self.notBeforeStart : "The microVM has shut down.")
    }
  }

  private static func rejectRateLimiter(_ limiter: RateLimiter?, _ field: String) throws(ControlFailure) {
    if limiter != nil { throw ControlFailure("Hostvisor does not support rate limiters (`\(field)`).") }
  }

  func putMachineConfig(_ body: MachineConfigurationBody, partial: Bool) throws(ControlFailure) {
    try requireNotStarted()
    var merged = records.withLock { $0.machineConfig }
    if !partial {
      guard let vcpus = body.vcpu_count, let memory = body.mem_size_mib else {
        throw ControlFailure(
          "An error occurred when deserializing the json body of a request: missing field `\(body.vcpu_count == nil ? "vcpu_count" : "mem_size_mib")`."
        )
      }
      merged = MachineConfigurationBody(
        cpu_template: body.cpu_template, smt: body.smt ?? false, mem_size_mib: memory,
        track_dirty_pages: body.track_dirty_pages ?? false, vcpu_count: vcpus, huge_pages: body.huge_pages ?? "None")
    } else {
      if let value = body.vcpu_count { merged.vcpu_count = value }
      if let value = body.mem_size_mib { merged.mem_size_mib = value }
      if let value = body.smt { merged.smt = value }
      if let value = body.track_dirty_pages { merged.track_dirty_pages = value }
      if let value = body.cpu_template { merged.cpu_template = value }
      if let value = body.huge_pages { merged.huge_pages = value }
    }
    let vcpus = merged.vcpu_count ?? 1
    let memory = merged.mem_size_mib ?? 128
    guard (1...32).contains(vcpus) else {
      throw ControlFailure(
        "The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled, and between 1 and 32."
      )
    }
    if merged.smt == true, vcpus != 1, vcpus % 2 != 0 {
      throw ControlFailure(
        "The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.")
    }
    guard memory >= 2 else {
      throw ControlFailure("The memory size (MiB) is invalid: \(memory); Hostvisor needs at least 2 MiB.")
    }
    guard UInt64(memory) << 20 <= MachineConfiguration.hostMemoryLimit() else {
      throw ControlFailure("The memory size (MiB) is invalid: \(memory) MiB is more than this host can give.")
    }
    if let template = merged.cpu_template, template != "None" {
      throw ControlFailure("Hostvisor does not support CPU template \(template); use None.")
    }
    if let pages = merged.huge_pages, pages != "None" {
      throw ControlFailure(
        pages == "2M"
          ? "Hostvisor does not back guest memory with huge pages; use None." : "Invalid huge_pages value: \(pages).")
    }
    let settled = merged
    try configure { spec throws(ControlError) in
      spec.vcpuCount = vcpus
      spec.memoryMiB = memory
      spec.smt = settled.smt ?? false
      spec.trackDirtyPages = settled.track_dirty_pages ?? false
    }
    records.withLock { $0.machineConfig = settled }
  }

  func putBootSource(_ body: BootSource) throws(ControlFailure) {
    try requireNotStarted()
    try Self.requireReadableFile(body.kernel_image_path, what: "kernel")
    if let initrd = body.initrd_path { try Self.requireReadableFile(initrd, what: "initrd") }
    try configure { spec throws(ControlError) in
      spec.kernelPath = body.kernel_image_path
      spec.initrdPath = body.initrd_path
      spec.bootArgs = body.boot_args
    }
    records.withLock { $0.bootSource = body }
  }

  private static func requireReadableFile(_ path: String, what: String) throws(ControlFailure) {
    var isDirectory: ObjCBool = false
    guard !path.isEmpty, FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory),
      !isDirectory.boolValue,
      FileManager.default.isReadableFile(atPath: path)
    else {
      throw ControlFailure("Cannot open the \(what) file \(path): no such readable file.")
    }
  }

  func putDrive(id: String, _ body: Drive) throws(ControlFailure) {
    try requireNotStarted()
    guard body.drive_id == id else {
      throw ControlFailure("The id from the path (\(id)) does not match the id from the body (\(body.drive_id)).")
    }
    if body.socket != nil {
      throw ControlFailure("Hostvisor does not support vhost-user block devices (`socket`).")
    }
    try Self.rejectRateLimiter(body.rate_limiter, "rate_limiter")
    guard let path = body.path_on_host else { throw ControlFailure("A virtio-block drive needs `path_on_host`.") }
    if let cache = body.cache_type, cache != "Unsafe", cache != "Writeback" {
      throw ControlFailure("Invalid cache_type \(cache): use Unsafe or Writeback.")
    }
    if let engine = body.io_engine, engine != "Sync", engine != "Async" {
      throw ControlFailure("Invalid io_engine \(engine): use Sync or Async.")
    }
    if body.partuuid != nil, body.is_root_device {
      throw ControlFailure(
        "Hostvisor does not support booting from a partition (`partuuid`); the root device is /dev/vda.")
    }
    try Self.requireReadableFile(path, what: "drive")
    let readOnly = body.is_read_only ?? false
    try configure { spec throws(ControlError) in
      if body.is_root_device, spec.drives.contains(where: { $0.isRootDevice && $0.id != id }) {
        throw ControlError(.invalidArgument, "A root block device already exists!")
      }
      let drive = DriveSpec(id: id, path: path, readOnly: readOnly, isRootDevice: body.is_root_device)
      if let index = spec.drives.firstIndex(where: { $0.id == id }) {
        spec.drives[index] = drive
      } else {
        spec.drives.append(drive)
      }
    }
    var recorded = body
    recorded.is_read_only = readOnly
    recorded.cache_type = body.cache_type ?? "Unsafe"
    recorded.io_engine = body.io_engine ?? "Sync"
    records.withLock { records in
      if records.drives[id] == nil { records.driveOrder.append(id) }
      records.drives[id] = recorded
    }
  }

  func patchDrive(id: String, _ body: PartialDrive) throws(ControlFailure) {
    try requireStarted()
    guard body.drive_id == id else {
      throw ControlFailure("The id from the path (\(id)) does not match the id from the body (\(body.drive_id)).")
    }
    try Self.rejectRateLimiter(body.rate_limiter, "rate_limiter")
    guard controller.spec.drives.contains(where: { $0.id == id }) else {
      throw ControlFailure("Invalid block device ID: \(id).")
    }
    guard let path = body.path_on_host else { return }
    do {
      try controller.replaceDriveBackingFile(id: id, path: path)
    } catch {
      throw ControlFailure(error.description)
    }
    records.withLock { $0.drives[id]?.path_on_host = path }
  }

  func putNetworkInterface(id: String, _ body: NetworkInterfaceBody) throws(ControlFailure) {
    try requireNotStarted()
    guard body.iface_id == id else {
      throw ControlFailure("The id from the path (\(id)) does not match the id from the body (\(body.iface_id)).")
    }
    try Self.rejectRateLimiter(body.rx_rate_limiter, "rx_rate_limiter")
    try Self.rejectRateLimiter(body.tx_rate_limiter, "tx_rate_limiter")
    if body.mtu != nil { throw ControlFailure("Hostvisor does not advertise an MTU to the guest (`mtu`).") }
    guard !body.host_dev_name.isEmpty, body.host_dev_name.utf8.count < 16 else {
      throw ControlFailure("Invalid host_dev_name \(body.host_dev_name): a TAP name has 1 to 15 characters.")
    }
    var mac: MACAddress?
    if let text = body.guest_mac {
      do { mac = try MACAddress(parsing: text) } catch { throw ControlFailure("Invalid guest_mac \(text).") }
    }
    let guestMAC = mac
    try configure { spec throws(ControlError) in
      if let holder = spec.interfaceHoldingPreopenedTap(body.host_dev_name, except: id) {
        throw ControlError(.invalidArgument, VMSpec.preopenedTapTaken(body.host_dev_name, by: holder, for: id))
      }
      let interface = NetworkInterfaceSpec(id: id, hostDeviceName: body.host_dev_name, guestMAC: guestMAC)
      if let index = spec.networkInterfaces.firstIndex(where: { $0.id == id }) {
        spec.networkInterfaces[index] = interface
      } else {
        spec.networkInterfaces.append(interface)
      }
    }
    records.withLock { records in
      if records.interfaces[id] == nil { records.interfaceOrder.append(id) }
      records.interfaces[id] = body
    }
  }

  func patchNetworkInterface(id: String, _ body: PartialNetworkInterface) throws(ControlFailure) {
    try requireStarted()
    guard body.iface_id == id else {
      throw ControlFailure("The id from the path (\(id)) does not match the id from the body (\(body.iface_id)).")
    }
    guard records.withLock({ $0.interfaces[id] != nil }) else {
      throw ControlFailure("Invalid network interface ID: \(id).")
    }
    try Self.rejectRateLimiter(body.rx_rate_limiter, "rx_rate_limiter")
    try Self.rejectRateLimiter(body.tx_rate_limiter, "tx_rate_limiter")
  }

  func putEntropy(_ body: EntropyDeviceBody) throws(ControlFailure) {
    try requireNotStarted()
    try Self.rejectRateLimiter(body.rate_limiter, "rate_limiter")
    // Every Hostvisor machine has a virtio-rng; this records that the client asked for one.
    records.withLock { $0.entropy = body }
  }

  func putSerial(_ body: SerialDeviceBody) throws(ControlFailure) {
    try requireNotStarted()
    if body.rate_limiter != nil { throw ControlFailure("Hostvisor does not rate-limit the serial console.") }
    try configure { spec throws(ControlError) in
      spec.serial = body.serial_out_path.map { .file($0) } ?? .stdio
    }
    records.withLock { $0.serial = body }
  }

  func putLogger(_ body: LoggerBody) throws(ControlFailure) {
    var level: LogSink.Level?
    if let name = body.level {
      guard let parsed = LogSink.Level(name: name) else {
        throw ControlFailure("Invalid log level \(name): use Error, Warning, Info, Debug, Trace or Off.")
      }
      level = parsed
    }
    try plane.logSink.configure(
      path: body.log_path, level: level, showLevel: body.show_level, showOrigin: body.show_log_origin,
      module: body.module)
    records.withLock { $0.logger = body }
    log.info("The logger was configured.")
  }

  func putMetrics(_ body: MetricsBody) throws(ControlFailure) {
    try plane.metrics.configure(path: body.metrics_path)
    records.withLock { $0.metrics = body }
  }

  // MARK: Actions and state

  func performAction(_ body: InstanceActionInfo) throws(ControlFailure) {
    switch body.action_type {
    case .InstanceStart:
      guard controller.lifecycle == .notStarted else { throw ControlFailure(Self.notAfterStart) }
      do {
        try controller.start()
      } catch {
        throw ControlFailure("Cannot start microvm that was not configured: \(error.description)")
      }
      plane.markCreated()
      log.info("The microVM was started.")
    case .SendCtrlAltDel:
      try requireStarted()
      do { try controller.sendCtrlAltDel() } catch { throw ControlFailure(error.description) }
    case .FlushMetrics:
      try flushMetrics()
    }
  }

  /// Writes one metrics line (also called once a minute by the server).
  public func flushMetrics() throws(ControlFailure) {
    let counters = plane.counters()
    for (name, value) in counters["kvm_exits"] ?? [:] {
      plane.metrics.set("vcpu", "exit_\(name)", to: UInt64(clamping: value))
    }
    for (name, value) in counters["vmm"] ?? [:] {
      plane.metrics.set("vmm", name, to: UInt64(clamping: value))
    }
    for (name, value) in counters["vcpu_run_time_ns"] ?? [:] {
      plane.metrics.set("vcpu", "\(name)_run_time_us", to: UInt64(clamping: value) / 1000)
    }
    // Firecracker's names: an aggregate `block` / `net` group and one per device.
    let names = [
      "read_ops": "read_count", "read_bytes": "read_bytes", "write_ops": "write_count", "write_bytes": "write_bytes",
      "flush_ops": "flush_count", "discard_ops": "discard_count", "errors": "io_errors",
      "rx_frames": "rx_packets_count", "rx_bytes": "rx_bytes_count", "tx_frames": "tx_packets_count",
      "tx_bytes": "tx_bytes_count", "tx_dropped": "tx_dropped_count", "rx_dropped": "rx_dropped_count",
    ]
    var totals: [String: [String: UInt64]] = [:]
    for device in controller.deviceCounters() {
      for (name, value) in device.values {
        let metric = names[name] ?? name
        plane.metrics.set("\(device.kind)_\(device.id)", metric, to: value)
        totals[device.kind, default: [:]][metric, default: 0] &+= value
      }
    }
    for (kind, values) in totals {
      for (metric, value) in values { plane.metrics.set(kind, metric, to: value) }
    }
    // The action's reply follows the line's write (at once on a file; a named pipe nobody
    // reads gets the line later, and the reply after a second).
    try plane.metrics.flush(writtenWithin: .seconds(1))
  }

  func patchVM(_ body: VmStateBody) throws(ControlFailure) {
    try requireStarted()
    do {
      switch body.state {
      case .Paused:
        try controller.pause()
        log.info("The microVM was paused.")
      case .Resumed:
        try controller.resume()
        log.info("The microVM was resumed.")
      }
    } catch {
      throw ControlFailure(error.description)
    }
  }

  // MARK: Snapshots

  func createSnapshot(_ body: SnapshotCreateParams) throws(ControlFailure) {
    try requireStarted()
    guard controller.lifecycle == .paused else {
      throw ControlFailure("Create snapshot is only allowed while the microVM is paused.")
    }
    do {
      try controller.createSnapshot(
        statePath: body.snapshot_path, memoryPath: body.mem_file_path, diff: body.snapshot_type == .Diff)
    } catch {
      throw ControlFailure("Cannot create the snapshot: \(error.description)")
    }
  }

  func loadSnapshot(_ body: SnapshotLoadParams) throws(ControlFailure) {
    guard controller.lifecycle == .notStarted else {
      throw ControlFailure("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
    }
    if body.vsock_override != nil { throw ControlFailure("Hostvisor has no vsock device (`vsock_override`).") }
    let memoryPath: String
    switch (body.mem_file_path, body.mem_backend) {
    case (let path?, nil):
      memoryPath = path
    case (nil, let backend?):
      guard backend.backend_type == .File else {
        throw ControlFailure("Hostvisor does not support the Uffd memory backend; use File.")
      }
      memoryPath = backend.backend_path
    default:
      throw ControlFailure("Exactly one of `mem_file_path` and `mem_backend` must be present.")
    }
    var overrides: [String: String] = [:]
    for item in body.network_overrides ?? [] { overrides[item.iface_id] = item.host_dev_name }
    do {
      try controller.loadSnapshot(
        statePath: body.snapshot_path, memoryPath: memoryPath, resume: body.resume_vm ?? false,
        networkOverrides: overrides, trackDirtyPages: body.track_dirty_pages ?? body.enable_diff_snapshots ?? false,
        clockRealtime: body.clock_realtime ?? false)
    } catch {
      throw ControlFailure("Cannot load the snapshot: \(error.description)")
    }
    plane.markCreated()
  }

  // MARK: Configuration file

  /// Configures the machine from a Firecracker `--config-file` (the keys of `GET /vm/config`).
  /// Fails with one line naming the first problem.
  public func applyConfigFile(_ contents: [UInt8]) throws(ControlFailure) {
    if let object = try? JSONSerialization.jsonObject(with: Data(contents)) as? [String: Any] {
      let unsupported = ["vsock", "mmds-config", "cpu-config", "pmem", "memory-hotplug"]
      if let key = unsupported.first(where: { object[$0] != nil && !(object[$0] is NSNull) }) {
        throw ControlFailure("The configuration file names `\(key)`, which Hostvisor does not support yet.")
      }
    }
    let configuration: FullVmConfiguration
    do {
      configuration = try StrictJSON.decode(FullVmConfiguration.self, from: contents)
    } catch {
      throw ControlFailure("The configuration file is not valid: \(error.description).")
    }
    if let logger = configuration.logger { try putLogger(logger) }
    if let metrics = configuration.metrics { try putMetrics(metrics) }
    if let machine = configuration.machine_config { try putMachineConfig(machine, partial: false) }
    guard let boot = configuration.boot_source else {
      throw ControlFailure("The configuration file has no `boot-source`.")
    }
    try putBootSource(boot)
    for drive in configuration.drives ?? [] { try putDrive(id: drive.drive_id, drive) }
    for interface in configuration.network_interfaces ?? [] {
      try putNetworkInterface(id: interface.iface_id, interface)
    }
    if let entropy = configuration.entropy { try putEntropy(entropy) }
    if let balloon = configuration.balloon { try putBalloon(balloon) }
  }
}
