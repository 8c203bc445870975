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

/// The VM's own cgroup v2 group, `ROOT/NAME`, holding the whole VMM process with its limits,
/// and two threaded child groups: `vcpu` (vCPU threads) and `io` (device worker threads), so
/// `cpu.max` / `cpu.weight` can be set per kind inside the VM's share. The children's
/// `cgroup.threads` files are opened at start, so threads that start inside the sandbox still
/// move themselves.
public final class CgroupSlice: Sendable {
  /// The group's directory.
  public let path: String
  private let vcpuThreads: Int32
  private let ioThreads: Int32

  /// The mount point of the host's cgroup v2 hierarchy, if there is one this process can
  /// write to; else a reason.
  public static func hierarchy() -> Result<String, CgroupError> {
    guard let file = fopen("/proc/self/mountinfo", "r") else { return .failure(CgroupError("cannot read mountinfo")) }
    defer { fclose(file) }
    var line: UnsafeMutablePointer<CChar>?
    var capacity = 0
    defer { free(line) }
    while getline(&line, &capacity, file) > 0, let line {
      let fields = String(cString: line).split(separator: " ")
      guard let dash = fields.firstIndex(of: "-"), dash + 1 < fields.count, fields[dash + 1] == "cgroup2" else {
        continue
      }
      let mountPoint = String(fields[4])
      guard access(mountPoint + "/cgroup.subtree_control", W_OK) == 0 else {
        return .failure(CgroupError("the cgroup v2 hierarchy at \(mountPoint) is not writable"))
      }
      return .success(mountPoint)
    }
    return .failure(CgroupError("the host has no cgroup v2 hierarchy (only cgroup v1, or none)"))
  }

  /// Creates (or reuses) `ROOT/name`, writes the limits, creates the threaded `vcpu` and `io`
  /// children and moves this process into the group. `diskDevices` are the block devices
  /// (`major:minor`) under the VM's disks, for `io.max`.
  public init(name: String, limits: CgroupLimits, diskDevices: [String]) throws(CgroupError) {
    guard !name.isEmpty, !name.contains(".."), !name.hasPrefix("/") else {
      throw CgroupError("invalid --cgroup '\(name)': use a relative name without '..'")
    }
    let root: String
    switch Self.hierarchy() {
    case .success(let mountPoint): root = mountPoint
    case .failure(let error): throw CgroupError("cannot use --cgroup: \(error.description)")
    }
    path = root + "/" + name
    // Every level down to the group must pass the controllers on.
    var level = root
    for component in name.split(separator: "/") {
      for controller in ["cpu", "memory", "io", "pids"] {
        try? Self.write("+\(controller)", to: level + "/cgroup.subtree_control")
      }
      level += "/" + component
      if mkdir(level, 0o755) != 0 && errno != EEXIST {
        throw CgroupError("cannot create cgroup \(level): \(String(cString: strerror(errno)))")
      }
    }
    let files: [(String, String?)] = [
      ("cpu.max", limits.cpuMax), ("cpu.weight", limits.cpuWeight), ("memory.max", limits.memoryMax),
      ("memory.high", limits.memoryHigh), ("pids.max", limits.pidsMax),
    ]
    for (file, value) in files {
      if let value { try Self.write(value, to: path + "/" + file) }
    }
    if let ioMax = limits.ioMax {
      for device in Set(diskDevices) { try Self.write("\(device) \(ioMax)", to: path + "/io.max") }
    }
    for child in ["vcpu", "io"] {
      let childPath = path + "/" + child
      if mkdir(childPath, 0o755) != 0 && errno != EEXIST {
        throw CgroupError("cannot create cgroup \(childPath): \(String(cString: strerror(errno)))")
      }
      try Self.write("threaded", to: childPath + "/cgroup.type")
    }
    for controller in ["cpu", "pids"] { try? Self.write("+\(controller)", to: path + "/cgroup.subtree_control") }
    try Self.write("\(getpid())", to: path + "/cgroup.procs")
    vcpuThreads = open(path + "/vcpu/cgroup.threads", O_WRONLY | O_CLOEXEC)
    ioThreads = open(path + "/io/cgroup.threads", O_WRONLY | O_CLOEXEC)
    guard vcpuThreads >= 0, ioThreads >= 0 else {
      throw CgroupError("cannot open the thread lists of \(path): \(String(cString: strerror(errno)))")
    }
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
    return "\(hv_sandbox_major(device)):\(hv_sandbox_minor(device))"
  }

  private static func write(_ value: String, to file: String) throws(CgroupError) {
    let descriptor = open(file, O_WRONLY | O_CLOEXEC)
    guard descriptor >= 0 else { throw CgroupError("cannot open \(file): \(String(cString: strerror(errno)))") }
    defer { close(descriptor) }
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
