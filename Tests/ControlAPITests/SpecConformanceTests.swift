import Foundation
import Testing

@testable import ControlAPI

/// The Codable models against the two spec files: every field a model sends or accepts is a
/// property of the spec's definition, and every property the spec requires is in the model.
@Suite("Models match the API specs")
struct SpecConformanceTests {
  static let specs = packageRoot.deletingLastPathComponent().appendingPathComponent("shared/specs")

  /// The properties and required properties of each schema in a YAML spec, read by
  /// indentation: schemas sit at `schemaIndent` under `definitions:` or `schemas:`.
  static func schemas(_ file: String, section: String, schemaIndent: Int) throws -> [String: (
    properties: Set<String>, required: Set<String>
  )] {
    let text = try String(contentsOf: specs.appendingPathComponent(file), encoding: .utf8)
    var result: [String: (properties: Set<String>, required: Set<String>)] = [:]
    var inSection = false
    var current: String?
    var list: String?
    for rawLine in text.split(separator: "\n", omittingEmptySubsequences: false) {
      let line = String(rawLine)
      let trimmed = line.trimmingCharacters(in: .whitespaces)
      if trimmed.isEmpty || trimmed.hasPrefix("#") { continue }
      let indent = line.prefix(while: { $0 == " " }).count
      if trimmed == section {
        inSection = true
        continue
      }
      guard inSection else { continue }
      if indent < schemaIndent { break }
      if indent == schemaIndent, trimmed.hasSuffix(":") {
        current = String(trimmed.dropLast())
        result[current!] = ([], [])
        list = nil
        continue
      }
      guard let name = current else { continue }
      if indent == schemaIndent + 2 {
        list = trimmed == "properties:" ? "properties" : trimmed == "required:" ? "required" : nil
        continue
      }
      if list == "properties", indent == schemaIndent + 4, trimmed.hasSuffix(":") {
        result[name]!.properties.insert(String(trimmed.dropLast()).replacingOccurrences(of: "\"", with: ""))
      }
      if list == "required", indent == schemaIndent + 4, trimmed.hasPrefix("- ") {
        result[name]!.required.insert(String(trimmed.dropFirst(2)))
      }
    }
    return result
  }

  /// The JSON keys a model uses: those of a fully populated value, encoded.
  static func keys<Model: Encodable>(_ value: Model) throws -> Set<String> {
    let object = try JSONSerialization.jsonObject(with: JSONEncoder().encode(value)) as? [String: Any] ?? [:]
    return Set(object.keys)
  }

  static func check(
    _ keys: Set<String>, against schema: (properties: Set<String>, required: Set<String>)?, _ name: String
  ) {
    guard let schema else {
      Issue.record("the spec has no schema \(name)")
      return
    }
    #expect(keys.isSubset(of: schema.properties), "\(name): not in the spec: \(keys.subtracting(schema.properties))")
    #expect(schema.required.isSubset(of: keys), "\(name): required but missing: \(schema.required.subtracting(keys))")
  }

  @Test func firecrackerModelsUseTheSpecFieldNames() throws {
    let spec = try Self.schemas("firecracker/firecracker.yaml", section: "definitions:", schemaIndent: 2)
    #expect(spec.count > 40, "the spec was not read")
    let bucket = TokenBucket(one_time_burst: 1, refill_time: 1, size: 1)
    let limiter = RateLimiter(bandwidth: bucket, ops: bucket)
    Self.check(try Self.keys(FaultMessage(fault_message: "x")), against: spec["Error"], "Error")
    Self.check(
      try Self.keys(InstanceInfo(app_name: "a", id: "i", state: "Running", vmm_version: "1")),
      against: spec["InstanceInfo"], "InstanceInfo")
    Self.check(
      try Self.keys(FirecrackerVersion(firecracker_version: "1")), against: spec["FirecrackerVersion"],
      "FirecrackerVersion")
    Self.check(
      try Self.keys(BootSource(boot_args: "", initrd_path: "", kernel_image_path: "")), against: spec["BootSource"],
      "BootSource")
    Self.check(try Self.keys(bucket), against: spec["TokenBucket"], "TokenBucket")
    Self.check(try Self.keys(limiter), against: spec["RateLimiter"], "RateLimiter")
    Self.check(
      try Self.keys(
        Drive(
          drive_id: "d", partuuid: "p", is_root_device: true, cache_type: "Unsafe", is_read_only: true,
          path_on_host: "/",
          rate_limiter: limiter, io_engine: "Sync", socket: "/s")), against: spec["Drive"], "Drive")
    Self.check(
      try Self.keys(PartialDrive(drive_id: "d", path_on_host: "/", rate_limiter: limiter)),
      against: spec["PartialDrive"], "PartialDrive")
    Self.check(
      try Self.keys(
        MachineConfigurationBody(
          cpu_template: "None", smt: false, mem_size_mib: 1, track_dirty_pages: false, vcpu_count: 1, huge_pages: "None"
        )),
      against: spec["MachineConfiguration"], "MachineConfiguration")
    Self.check(
      try Self.keys(
        NetworkInterfaceBody(
          guest_mac: "m", host_dev_name: "t", iface_id: "i", mtu: 1500, rx_rate_limiter: limiter,
          tx_rate_limiter: limiter)),
      against: spec["NetworkInterface"], "NetworkInterface")
    Self.check(
      try Self.keys(PartialNetworkInterface(iface_id: "i", rx_rate_limiter: limiter, tx_rate_limiter: limiter)),
      against: spec["PartialNetworkInterface"], "PartialNetworkInterface")
    Self.check(
      try Self.keys(InstanceActionInfo(action_type: .InstanceStart)), against: spec["InstanceActionInfo"],
      "InstanceActionInfo")
    Self.check(try Self.keys(VmStateBody(state: .Paused)), against: spec["Vm"], "Vm")
    Self.check(
      try Self.keys(LoggerBody(level: "Info", log_path: "/", show_level: true, show_log_origin: true, module: "m")),
      against: spec["Logger"], "Logger")
    Self.check(try Self.keys(MetricsBody(metrics_path: "/")), against: spec["Metrics"], "Metrics")
    Self.check(try Self.keys(EntropyDeviceBody(rate_limiter: limiter)), against: spec["EntropyDevice"], "EntropyDevice")
    Self.check(
      try Self.keys(
        BalloonBody(
          amount_mib: 1, deflate_on_oom: true, stats_polling_interval_s: 1, free_page_hinting: false,
          free_page_reporting: true)), against: spec["Balloon"], "Balloon")
    Self.check(try Self.keys(BalloonUpdateBody(amount_mib: 1)), against: spec["BalloonUpdate"], "BalloonUpdate")
    Self.check(
      try Self.keys(BalloonStatisticsUpdateBody(stats_polling_interval_s: 1)), against: spec["BalloonStatsUpdate"],
      "BalloonStatsUpdate")
    Self.check(
      try Self.keys(SerialDeviceBody(serial_out_path: "/", rate_limiter: bucket)), against: spec["SerialDevice"],
      "SerialDevice")
    Self.check(
      try Self.keys(SnapshotCreateParams(mem_file_path: "/", snapshot_path: "/", snapshot_type: .Full)),
      against: spec["SnapshotCreateParams"], "SnapshotCreateParams")
    Self.check(
      try Self.keys(MemoryBackend(backend_type: .File, backend_path: "/")), against: spec["MemoryBackend"],
      "MemoryBackend")
    Self.check(
      try Self.keys(NetworkOverride(iface_id: "i", host_dev_name: "t")), against: spec["NetworkOverride"],
      "NetworkOverride")
    Self.check(try Self.keys(VsockOverride(uds_path: "/")), against: spec["VsockOverride"], "VsockOverride")
    Self.check(
      try Self.keys(
        SnapshotLoadParams(
          enable_diff_snapshots: false, track_dirty_pages: false, mem_file_path: "/",
          mem_backend: MemoryBackend(backend_type: .File, backend_path: "/"), snapshot_path: "/", resume_vm: true,
          network_overrides: [], vsock_override: VsockOverride(uds_path: "/"), clock_realtime: false)),
      against: spec["SnapshotLoadParams"], "SnapshotLoadParams")
    var full = FullVmConfiguration()
    full.balloon = BalloonBody(
      amount_mib: 1, deflate_on_oom: false, stats_polling_interval_s: 1, free_page_hinting: false,
      free_page_reporting: false)
    full.drives = []
    full.boot_source = BootSource(kernel_image_path: "/")
    full.cpu_config = UnsupportedResource()
    full.logger = LoggerBody()
    full.machine_config = MachineConfigurationBody()
    full.metrics = MetricsBody(metrics_path: "/")
    full.memory_hotplug = UnsupportedResource()
    full.mmds_config = UnsupportedResource()
    full.network_interfaces = []
    full.pmem = []
    full.vsock = UnsupportedResource()
    full.entropy = EntropyDeviceBody()
    Self.check(try Self.keys(full), against: spec["FullVmConfiguration"], "FullVmConfiguration")
  }

  @Test func cloudHypervisorModelsUseTheSpecFieldNames() throws {
    let spec = try Self.schemas("cloud-hypervisor/cloud-hypervisor.yaml", section: "schemas:", schemaIndent: 4)
    #expect(spec.count > 40, "the spec was not read")
    Self.check(
      try Self.keys(VmmPingResponse(build_version: "b", version: "v", pid: 1, features: [])),
      against: spec["VmmPingResponse"], "VmmPingResponse")
    Self.check(
      try Self.keys(CHPayloadConfig(firmware: "f", kernel: "k", cmdline: "c", initramfs: "i")),
      against: spec["PayloadConfig"], "PayloadConfig")
    Self.check(try Self.keys(CHCpusConfig(boot_vcpus: 1, max_vcpus: 1)), against: spec["CpusConfig"], "CpusConfig")
    Self.check(
      try Self.keys(
        CHMemoryConfig(size: 1, mergeable: false, shared: false, hugepages: false, prefault: false, thp: true)),
      against: spec["MemoryConfig"], "MemoryConfig")
    Self.check(
      try Self.keys(CHDiskConfig(path: "/", readonly: true, direct: false, id: "d")), against: spec["DiskConfig"],
      "DiskConfig")
    Self.check(try Self.keys(CHNetConfig(tap: "t", mac: "m", id: "i")), against: spec["NetConfig"], "NetConfig")
    Self.check(try Self.keys(CHRngConfig(src: "/dev/urandom")), against: spec["RngConfig"], "RngConfig")
    Self.check(
      try Self.keys(CHBalloonConfig(size: 1, deflate_on_oom: true, free_page_reporting: true)),
      against: spec["BalloonConfig"], "BalloonConfig")
    Self.check(
      try Self.keys(CHVmResize(desired_vcpus: 1, desired_ram: 1, desired_balloon: 1)), against: spec["VmResize"],
      "VmResize")
    Self.check(try Self.keys(CHConsoleConfig(file: "/", mode: .File)), against: spec["SerialConfig"], "SerialConfig")
    Self.check(try Self.keys(CHConsoleConfig(file: "/", mode: .File)), against: spec["ConsoleConfig"], "ConsoleConfig")
    let config = CHVmConfig(
      cpus: CHCpusConfig(boot_vcpus: 1, max_vcpus: 1), memory: CHMemoryConfig(size: 1), payload: CHPayloadConfig(),
      disks: [], net: [], rng: CHRngConfig(src: "/"), serial: CHConsoleConfig(mode: .Tty),
      console: CHConsoleConfig(mode: .Off), iommu: false, watchdog: false, pvpanic: false)
    Self.check(try Self.keys(config), against: spec["VmConfig"], "VmConfig")
    Self.check(
      try Self.keys(CHVmInfo(config: config, state: "Running", memory_actual_size: 1)), against: spec["VmInfo"],
      "VmInfo")
    Self.check(
      try Self.keys(CHSnapshotConfig(destination_url: "file:///")), against: spec["VmSnapshotConfig"],
      "VmSnapshotConfig")
    Self.check(
      try Self.keys(CHRestoreConfig(source_url: "file:///", prefault: false, memory_restore_mode: .Copy, resume: true)),
      against: spec["RestoreConfig"], "RestoreConfig")
    Self.check(
      try Self.keys(CHReceiveMigrationData(receiver_url: "unix:/x", tls_dir: "/", memory_mode: .Precopy)),
      against: spec["ReceiveMigrationData"], "ReceiveMigrationData")
    Self.check(
      try Self.keys(
        CHSendMigrationData(
          destination_url: "unix:/x", local: false, downtime_ms: 1, timeout_s: 1, timeout_strategy: .Cancel,
          connections: 1,
          tls_dir: "/", memory_mode: .Precopy)), against: spec["SendMigrationData"], "SendMigrationData")
  }

  /// Unknown fields are refused at any depth; null counts as absent.
  @Test func strictDecodingRefusesUnknownFields() throws {
    #expect(throws: StrictJSON.Failure.self) {
      try StrictJSON.decode(
        Drive.self,
        from: Array(
          #"{"drive_id":"a","is_root_device":false,"rate_limiter":{"ops":{"size":1,"refill_time":1,"bogus":2}}}"#.utf8))
    }
    let drive = try StrictJSON.decode(Drive.self, from: Array(#"{"drive_id":"a","is_root_device":false}"#.utf8))
    #expect(drive.drive_id == "a" && drive.partuuid == nil)
    #expect(throws: StrictJSON.Failure.self) {
      try StrictJSON.decode(Drive.self, from: Array(#"{"drive_id":"a","is_root_device":false,"partuuid":null}"#.utf8))
    }
    do {
      _ = try StrictJSON.decode(BootSource.self, from: Array(#"{"kernel_image_path":"k","initrd":"x"}"#.utf8))
      Issue.record("an unknown field was accepted")
    } catch {
      #expect(error.description == "unknown field `initrd`")
    }
  }
}
