// Request and response bodies of the Cloud Hypervisor API, named and shaped as the schemas of
// cloud-hypervisor.yaml. Only the properties Hostvisor implements are modelled; a request that
// uses any other property is refused with 400 naming it. The tests check these field names
// against the spec.

/// `VmmPingResponse`.
struct VmmPingResponse: Codable {
  var build_version: String?
  var version: String
  var pid: Int64?
  var features: [String]?
}

/// `PayloadConfig`.
struct CHPayloadConfig: Codable, Equatable {
  var firmware: String?
  var kernel: String?
  var cmdline: String?
  var initramfs: String?
}

/// `CpusConfig`.
struct CHCpusConfig: Codable, Equatable {
  var boot_vcpus: Int
  var max_vcpus: Int
}

/// `MemoryConfig`.
struct CHMemoryConfig: Codable, Equatable {
  var size: Int64
  var mergeable: Bool?
  var shared: Bool?
  var hugepages: Bool?
  var prefault: Bool?
  var thp: Bool?
}

/// `DiskConfig`.
struct CHDiskConfig: Codable, Equatable {
  var path: String?
  var readonly: Bool?
  var direct: Bool?
  var id: String?
}

/// `NetConfig`.
struct CHNetConfig: Codable, Equatable {
  var tap: String?
  var mac: String?
  var id: String?
}

/// `RngConfig`.
struct CHRngConfig: Codable, Equatable {
  var src: String
}

/// `ConsoleMode`.
enum CHConsoleMode: String, Codable {
  case Off, Pty, Tty, File, Socket, Null
}

/// `SerialConfig` and `ConsoleConfig`.
struct CHConsoleConfig: Codable, Equatable {
  var file: String?
  var mode: CHConsoleMode
}

/// `VmConfig`.
struct CHVmConfig: Codable, Equatable {
  var cpus: CHCpusConfig?
  var memory: CHMemoryConfig?
  var payload: CHPayloadConfig
  var disks: [CHDiskConfig]?
  var net: [CHNetConfig]?
  var rng: CHRngConfig?
  var serial: CHConsoleConfig?
  var console: CHConsoleConfig?
  var iommu: Bool?
  var watchdog: Bool?
  var pvpanic: Bool?
  var balloon: CHBalloonConfig?
}

/// `VmInfo`.
struct CHVmInfo: Codable {
  var config: CHVmConfig
  var state: String
  var memory_actual_size: Int64?
}

/// `VmSnapshotConfig`.
struct CHSnapshotConfig: Codable {
  var destination_url: String?
}

/// `RestoreConfig`.
struct CHRestoreConfig: Codable {
  enum MemoryRestoreMode: String, Codable {
    case Copy, OnDemand
  }
  var source_url: String
  var prefault: Bool?
  var memory_restore_mode: MemoryRestoreMode?
  var resume: Bool?
}

/// `MigrationMode`.
enum CHMigrationMode: String, Codable {
  case Precopy, Postcopy
}

/// `ReceiveMigrationData`.
struct CHReceiveMigrationData: Codable {
  var receiver_url: String
  var tls_dir: String?
  var memory_mode: CHMigrationMode?
}

/// `SendMigrationData`.
struct CHSendMigrationData: Codable {
  enum TimeoutStrategy: String, Codable {
    case Cancel, Ignore
  }
  var destination_url: String
  var local: Bool?
  var downtime_ms: Int64?
  var timeout_s: Int64?
  var timeout_strategy: TimeoutStrategy?
  var connections: Int64?
  var tls_dir: String?
  var memory_mode: CHMigrationMode?
  /// Hostvisor's extension: throttle a guest whose dirty pages do not converge (default true;
  /// QEMU's `auto-converge` capability). Cloud Hypervisor has no such field.
  var auto_converge: Bool?
}
