// Request and response bodies of the Firecracker API, named and shaped as the definitions of
// firecracker.yaml (v1.16.1). Optional properties are optionals; encoding omits them when nil.
// The tests decode the spec and check these field names against it.

/// `Error`.
struct FaultMessage: Codable {
  var fault_message: String
}

/// `InstanceInfo`.
struct InstanceInfo: Codable {
  var app_name: String
  var id: String
  var state: String
  var vmm_version: String
}

/// `FirecrackerVersion`.
struct FirecrackerVersion: Codable {
  var firecracker_version: String
}

/// `BootSource`.
struct BootSource: Codable, Equatable {
  var boot_args: String?
  var initrd_path: String?
  var kernel_image_path: String
}

/// `TokenBucket`.
struct TokenBucket: Codable, Equatable {
  var one_time_burst: Int64?
  var refill_time: Int64
  var size: Int64
}

/// `RateLimiter`.
struct RateLimiter: Codable, Equatable {
  var bandwidth: TokenBucket?
  var ops: TokenBucket?
}

/// `Drive`.
struct Drive: Codable, Equatable {
  var drive_id: String
  var partuuid: String?
  var is_root_device: Bool
  var cache_type: String?
  var is_read_only: Bool?
  var path_on_host: String?
  var rate_limiter: RateLimiter?
  var io_engine: String?
  var socket: String?
}

/// `PartialDrive`.
struct PartialDrive: Codable {
  var drive_id: String
  var path_on_host: String?
  var rate_limiter: RateLimiter?
}

/// `MachineConfiguration` (every field optional so PATCH can send a subset; PUT checks the
/// required ones).
struct MachineConfigurationBody: Codable, Equatable {
  var cpu_template: String?
  var smt: Bool?
  var mem_size_mib: Int?
  var track_dirty_pages: Bool?
  var vcpu_count: Int?
  var huge_pages: String?
}

/// `NetworkInterface`.
struct NetworkInterfaceBody: Codable, Equatable {
  var guest_mac: String?
  var host_dev_name: String
  var iface_id: String
  var mtu: Int?
  var rx_rate_limiter: RateLimiter?
  var tx_rate_limiter: RateLimiter?
}

/// `PartialNetworkInterface`.
struct PartialNetworkInterface: Codable {
  var iface_id: String
  var rx_rate_limiter: RateLimiter?
  var tx_rate_limiter: RateLimiter?
}

/// `InstanceActionInfo`.
struct InstanceActionInfo: Codable {
  enum ActionType: String, Codable {
    case FlushMetrics, InstanceStart, SendCtrlAltDel
  }
  var action_type: ActionType
}

/// `Vm`.
struct VmStateBody: Codable {
  enum State: String, Codable {
    case Paused, Resumed
  }
  var state: State
}

/// `Logger`.
struct LoggerBody: Codable, Equatable {
  var level: String?
  var log_path: String?
  var show_level: Bool?
  var show_log_origin: Bool?
  var module: String?
}

/// `Metrics`.
struct MetricsBody: Codable, Equatable {
  var metrics_path: String
}

/// `EntropyDevice`.
struct EntropyDeviceBody: Codable, Equatable {
  var rate_limiter: RateLimiter?
}

/// `SerialDevice`.
struct SerialDeviceBody: Codable, Equatable {
  var serial_out_path: String?
  var rate_limiter: TokenBucket?
}

/// `SnapshotCreateParams`.
struct SnapshotCreateParams: Codable {
  enum SnapshotType: String, Codable {
    case Full, Diff
  }
  var mem_file_path: String
  var snapshot_path: String
  var snapshot_type: SnapshotType?
}

/// `MemoryBackend`.
struct MemoryBackend: Codable {
  enum BackendType: String, Codable {
    case File, Uffd
  }
  var backend_type: BackendType
  var backend_path: String
}

/// `NetworkOverride`.
struct NetworkOverride: Codable {
  var iface_id: String
  var host_dev_name: String
}

/// `VsockOverride`.
struct VsockOverride: Codable {
  var uds_path: String
}

/// `SnapshotLoadParams`.
struct SnapshotLoadParams: Codable {
  var enable_diff_snapshots: Bool?
  var track_dirty_pages: Bool?
  var mem_file_path: String?
  var mem_backend: MemoryBackend?
  var snapshot_path: String
  var resume_vm: Bool?
  var network_overrides: [NetworkOverride]?
  var vsock_override: VsockOverride?
  var clock_realtime: Bool?
}

/// `FullVmConfiguration` (GET /vm/config and `--config-file`). The resources Hostvisor does
/// not have yet are decoded as raw presence markers so a config file naming them is refused
/// with a clear message rather than ignored.
struct FullVmConfiguration: Codable {
  var balloon: BalloonBody?
  var drives: [Drive]?
  var boot_source: BootSource?
  var cpu_config: UnsupportedResource?
  var logger: LoggerBody?
  var machine_config: MachineConfigurationBody?
  var metrics: MetricsBody?
  var memory_hotplug: UnsupportedResource?
  var mmds_config: UnsupportedResource?
  var network_interfaces: [NetworkInterfaceBody]?
  var pmem: [UnsupportedResource]?
  var vsock: UnsupportedResource?
  var entropy: EntropyDeviceBody?

  enum CodingKeys: String, CodingKey {
    case balloon, drives, logger, metrics, pmem, vsock, entropy
    case boot_source = "boot-source"
    case cpu_config = "cpu-config"
    case machine_config = "machine-config"
    case memory_hotplug = "memory-hotplug"
    case mmds_config = "mmds-config"
    case network_interfaces = "network-interfaces"
  }
}

/// Any JSON value, kept only to know that it was there (encodes as an empty object).
struct UnsupportedResource: Codable {
  init() {}
  init(from decoder: any Decoder) throws {}
  func encode(to encoder: any Encoder) throws {
    _ = encoder.container(keyedBy: EmptyKeys.self)
  }
  private enum EmptyKeys: CodingKey {}
}
