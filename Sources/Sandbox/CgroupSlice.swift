import CSandbox
import Glibc
import Synchronization
import VMCore

/// A failure while setting up the VM's cgroup, as one clear line.
public struct CgroupError: Error, CustomStringConvertible, Sendable {
  public let description: String
  init(_ description: String) { self.description = description }
}

/// The limits `--cgroup` applies, each in cgroup v2's own syntax; nil leaves the file alone.
public struct CgroupLimits: Sendable {
  /// `cpu.max`: "QUOTA PERIOD" in microseconds, or "max".
  public var cpuMax: String?
  /// `cpu.weight`: 1-10000.
  public var cpuWeight: String?
  /// `memory.max` and `memory.high`: bytes (K/M/G suffixes) or "max".
  public var memoryMax: String?
  public var memoryHigh: String?
  /// `pids.max`: a count or "max".
  public var pidsMax: String?
  /// `io.max` keys for the device under each disk: e.g. "rbps=1048576 wiops=100".
  public var ioMax: String?

  public init() {}
}

/// Where the host's cgroups are: one cgroup v2 hierarchy, or cgroup v1's hierarchy per
/// controller.
public enum CgroupHierarchy: Sendable, Equatable {
  /// The cgroup2 mount point.
  case unified(String)
  /// The cgroup v1 mount point of each controller this process can write to (`cpu`, `memory`,
  /// `pids`, `blkio`; `cpu` and `memory` are always present).
  case legacy([String: String])
}

/// The VM's own cgroup, `NAME`, holding the whole VMM process with its limits, and two child
/// groups: `vcpu` (vCPU threads) and `io` (device worker threads), so CPU limits can be set per
/// kind inside the VM's share. On cgroup v2 the children are threaded groups; on cgroup v1
/// they live in the `cpu` hierarchy (v1 places threads one by one). The children's thread
/// lists are opened at start, so threads that start inside the sandbox still move themselves.
public final class CgroupSlice: Sendable {
  /// The group's directory (on cgroup v1: in the `cpu` hierarchy).
  public let path: String
  private let vcpuThreads: Int32
  private let ioThreads: Int32
  /// With I/O limits: the `io.max` keys, and the files they go to (cgroup v2's `io.max`, or
  /// v1's `blkio.throttle.*_device`), opened at start so disks attached later (through the
  /// API, maybe inside the sandbox) get them too (`limitDevice`).
  private let ioMax: String?
  private let ioLimitFiles: [String: Int32]

  /// The host's cgroup hierarchy this process can write to: cgroup v2 when its root offers the
  /// cpu and memory controllers, else cgroup v1 when its cpu and memory hierarchies are
  /// writable; else a reason.
  public static func hierarchy() -> Result<CgroupHierarchy, CgroupError> {
    guard let file = fopen("/proc/self/mountinfo", "r") else { return .failure(CgroupError("cannot read mountinfo")) }
    defer { fclose(file) }
    var line: UnsafeMutablePointer<CChar>?
    var capacity = 0
    defer { free(line) }
    var unified: String?
    var legacy: [String: String] = [:]
    while getline(&line, &capacity, file) > 0, let line {
      let fields = String(cString: line).split(whereSeparator: { $0 == " " || $0 == "\n" })
      guard let dash = fields.firstIndex(of: "-"), dash + 3 < fields.count else { continue }
      let mountPoint = String(fields[4])
      if fields[dash + 1] == "cgroup2" {
        let controllers = Self.read(mountPoint + "/cgroup.controllers") ?? ""
        if controllers.contains("cpu"), controllers.contains("memory"),
          access(mountPoint + "/cgroup.subtree_control", W_OK) == 0
        {
          unified = mountPoint
        }
      } else if fields[dash + 1] == "cgroup" {
        let options = fields[dash + 3].split(separator: ",").map(String.init)
        for controller in ["cpu", "memory", "pids", "blkio"] where options.contains(controller) {
          if access(mountPoint + "/cgroup.procs", W_OK) == 0 { legacy[controller] = mountPoint }
        }
      }
    }
    if let unified { return .success(.unified(unified)) }
    if legacy["cpu"] != nil, legacy["memory"] != nil { return .success(.legacy(legacy)) }
    return .failure(
      CgroupError("the host has no writable cgroup hierarchy with the cpu and memory controllers (v2 or v1)"))
  }

  /// Creates (or reuses) the group `name`, writes the limits, creates the `vcpu` and `io`
  /// children and moves this process into the group. The I/O limits go on each disk's device
  /// as it is opened (`limitDevice`).
  public init(name: String, limits: CgroupLimits) throws(CgroupError) {
    guard !name.isEmpty, !name.contains(".."), !name.hasPrefix("/") else {
      throw CgroupError("invalid --cgroup '\(name)': use a relative name without '..'")
    }
    let hierarchy: CgroupHierarchy
    switch Self.hierarchy() {
    case .success(let found): hierarchy = found
    case .failure(let error): throw CgroupError("cannot use --cgroup: \(error.description)")
    }
    let threadList: String
    // Where each I/O limit file is: the group's own directory on v2, its blkio group on v1.
    let ioGroup: String?
    switch hierarchy {
    case .unified(let root):
      path = try Self.createUnified(root: root, name: name, limits: limits)
      threadList = "cgroup.threads"
      ioGroup = path
    case .legacy(let roots):
      path = try Self.createLegacy(roots: roots, name: name, limits: limits)
      threadList = "tasks"
      ioGroup = roots["blkio"].map { $0 + "/" + name }
    }
    ioMax = limits.ioMax
    var ioLimitFiles: [String: Int32] = [:]
    if let ioMax = limits.ioMax {
      guard let ioGroup else {
        throw CgroupError("cannot apply --io-max: the host's cgroup v1 has no writable blkio hierarchy")
      }
      for (file, _) in try Self.ioLimitWrites(ioMax, device: "0:0", unified: ioGroup == path) {
        let descriptor = open(ioGroup + "/" + file, O_WRONLY | O_CLOEXEC)
        guard descriptor >= 0 else {
          throw CgroupError("cannot open \(ioGroup)/\(file): \(String(cString: strerror(errno)))")
        }
        ioLimitFiles[file] = descriptor
      }
    }
    self.ioLimitFiles = ioLimitFiles
    vcpuThreads = open(path + "/vcpu/" + threadList, O_WRONLY | O_CLOEXEC)
    ioThreads = open(path + "/io/" + threadList, O_WRONLY | O_CLOEXEC)
    guard vcpuThreads >= 0, ioThreads >= 0 else {
      throw CgroupError("cannot open the thread lists of \(path): \(String(cString: strerror(errno)))")
    }
  }

  /// cgroup v2: `ROOT/name` with the limits in v2's own files, threaded children; returns the
  /// group's path.
  private static func createUnified(
    root: String, name: String, limits: CgroupLimits
  ) throws(CgroupError) -> String {
    let path = root + "/" + name
    // Every level down to the group must pass the controllers on.
    var level = root
    for component in name.split(separator: "/") {
      for controller in ["cpu", "memory", "io", "pids"] {
        try? write("+\(controller)", to: level + "/cgroup.subtree_control")
      }
      level += "/" + component
      try makeDirectory(level)
    }
    let files: [(String, String?)] = [
      ("cpu.max", limits.cpuMax), ("cpu.weight", limits.cpuWeight), ("memory.max", limits.memoryMax),
      ("memory.high", limits.memoryHigh), ("pids.max", limits.pidsMax),
    ]
    for (file, value) in files {
      if let value { try write(value, to: path + "/" + file) }
    }
    for child in ["vcpu", "io"] {
      try makeDirectory(path + "/" + child)
      try write("threaded", to: path + "/" + child + "/cgroup.type")
    }
    for controller in ["cpu", "pids"] { try? write("+\(controller)", to: path + "/cgroup.subtree_control") }
    try write("\(getpid())", to: path + "/cgroup.procs")
    return path
  }

  /// cgroup v1: `name` in each controller's hierarchy, the v2-syntax limits translated to v1's
  /// files, children in the cpu hierarchy; returns the group's path there.
  private static func createLegacy(
    roots: [String: String], name: String, limits: CgroupLimits
  ) throws(CgroupError) -> String {
    var groups: [String: String] = [:]
    for (controller, root) in roots {
      var level = root
      for component in name.split(separator: "/") {
        level += "/" + component
        try makeDirectory(level)
      }
      groups[controller] = level
    }
    let cpu = groups["cpu"]!
    for (file, value) in try legacyFiles(limits, diskDevices: []) {
      let controller = String(file.prefix { $0 != "." })
      guard let group = groups[controller] else {
        throw CgroupError("cannot apply \(file): the host's cgroup v1 has no writable \(controller) hierarchy")
      }
      try write(value, to: group + "/" + file)
    }
    for child in ["vcpu", "io"] { try makeDirectory(cpu + "/" + child) }
    for group in groups.values { try write("\(getpid())", to: group + "/cgroup.procs") }
    return cpu
  }

  /// The cgroup v1 files and values that stand for `limits` (given in cgroup v2's syntax):
  /// `cpu.max` becomes `cpu.cfs_quota_us` / `cpu.cfs_period_us`, `cpu.weight` becomes
  /// `cpu.shares` (weight 100 = 1024 shares), `memory.max` `memory.limit_in_bytes`,
  /// `memory.high` `memory.soft_limit_in_bytes` (v1 has no throttling limit; the soft limit is
  /// the nearest), `io.max` keys the `blkio.throttle.*_device` files.
  static func legacyFiles(_ limits: CgroupLimits, diskDevices: [String]) throws(CgroupError) -> [(String, String)] {
    var files: [(String, String)] = []
    if let cpuMax = limits.cpuMax {
      let parts = cpuMax.split(separator: " ")
      if parts.count == 2 { files.append(("cpu.cfs_period_us", String(parts[1]))) }
      files.append(("cpu.cfs_quota_us", parts.first == "max" ? "-1" : String(parts.first ?? "-1")))
    }
    if let weight = limits.cpuWeight.flatMap({ Int($0) }) {
      files.append(("cpu.shares", "\(weight * 1024 / 100)"))
    }
    if let value = limits.memoryMax { files.append(("memory.limit_in_bytes", value == "max" ? "-1" : value)) }
    if let value = limits.memoryHigh { files.append(("memory.soft_limit_in_bytes", value == "max" ? "-1" : value)) }
    if let value = limits.pidsMax { files.append(("pids.max", value)) }
    if let ioMax = limits.ioMax {
      let names = [
        "rbps": "read_bps_device", "wbps": "write_bps_device", "riops": "read_iops_device",
        "wiops": "write_iops_device",
      ]
      for key in ioMax.split(separator: " ") {
        let pair = key.split(separator: "=", maxSplits: 1)
        guard pair.count == 2, let file = names[String(pair[0])] else {
          throw CgroupError("invalid I/O limit '\(key)': use rbps, wbps, riops or wiops")
        }
        let value = pair[1] == "max" ? "0" : String(pair[1])
        for device in Set(diskDevices).sorted() { files.append(("blkio.throttle.\(file)", "\(device) \(value)")) }
      }
    }
    return files
  }

  private static func makeDirectory(_ path: String) throws(CgroupError) {
    if mkdir(path, 0o755) != 0 && errno != EEXIST {
      throw CgroupError("cannot create cgroup \(path): \(String(cString: strerror(errno)))")
    }
  }

  private static func read(_ file: String) -> String? {
    guard let handle = fopen(file, "r") else { return nil }
    defer { fclose(handle) }
    var buffer = [CChar](repeating: 0, count: 4096)
    let count = fread(&buffer, 1, buffer.count - 1, handle)
    return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
  }

  /// Applies the I/O limits to the block device `device` (`major:minor`), for a disk opened
  /// after start; nothing without I/O limits.
  public func limitDevice(_ device: String) throws(CgroupError) {
    guard let ioMax else { return }
    for (file, value) in try Self.ioLimitWrites(ioMax, device: device, unified: ioLimitFiles["io.max"] != nil) {
      guard let descriptor = ioLimitFiles[file] else { throw CgroupError("cannot apply \(file): not opened") }
      try Self.write(value, descriptor: descriptor, file: file)
    }
  }

  /// The files and lines that put the `io.max` keys `ioMax` on `device`.
  private static func ioLimitWrites(_ ioMax: String, device: String, unified: Bool) throws(CgroupError) -> [(
    String, String
  )] {
    if unified { return [("io.max", "\(device) \(ioMax)")] }
    var limits = CgroupLimits()
    limits.ioMax = ioMax
    return try legacyFiles(limits, diskDevices: [device])
  }

  /// Moves the calling thread into the child group of its kind.
  public func placeCurrentThread(_ kind: HostThreadKind) {
    let descriptor = kind == .vcpu ? vcpuThreads : ioThreads
    var text = "\(hv_sandbox_thread_id())"
    _ = text.withUTF8 { Glibc.write(descriptor, $0.baseAddress, $0.count) }
  }

  /// The `major:minor` of the block device holding `path` (a regular file's file system, or
  /// the device itself).
  public static func blockDevice(of path: String) -> String? {
    var info = stat()
    guard stat(path, &info) == 0 else { return nil }
    let device = (info.st_mode & S_IFMT) == S_IFBLK ? info.st_rdev : info.st_dev
    return deviceName(UInt64(device))
  }

  /// `major:minor` of the device number `device`.
  public static func deviceName(_ device: UInt64) -> String {
    "\(hv_sandbox_major(dev_t(device))):\(hv_sandbox_minor(dev_t(device)))"
  }

  private static func write(_ value: String, to file: String) throws(CgroupError) {
    let descriptor = open(file, O_WRONLY | O_CLOEXEC)
    guard descriptor >= 0 else { throw CgroupError("cannot open \(file): \(String(cString: strerror(errno)))") }
    defer { close(descriptor) }
    try write(value, descriptor: descriptor, file: file)
  }

  /// Writes `value` to the open `descriptor` of `file` in one call (a cgroup file takes one
  /// line per write).
  private static func write(_ value: String, descriptor: Int32, file: String) throws(CgroupError) {
    var text = value
    let written = text.withUTF8 { Glibc.write(descriptor, $0.baseAddress, $0.count) }
    guard written == value.utf8.count else {
      throw CgroupError("cannot write '\(value)' to \(file): \(String(cString: strerror(errno)))")
    }
  }
}

/// What each new vCPU or device thread does to itself when it starts: join its cgroup (when
/// there is one), then narrow its seccomp filter (when sandboxed).
public enum ThreadStartActions {
  private static let actions = Mutex<[@Sendable (HostThreadKind) -> Void]>([])

  /// Adds `action`; the first call routes VMCore's thread start hook here.
  public static func add(_ action: @escaping @Sendable (HostThreadKind) -> Void) {
    let first = actions.withLock { list in
      list.append(action)
      return list.count == 1
    }
    if first {
      HostThreadSandbox.setThreadStartHook { kind in
        for action in ThreadStartActions.actions.withLock({ $0 }) { action(kind) }
      }
    }
  }
}
