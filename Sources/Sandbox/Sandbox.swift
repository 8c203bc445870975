import CSandbox
import Glibc
import Synchronization
import VMCore

/// A failure while entering the sandbox, as one clear line.
public struct SandboxError: Error, CustomStringConvertible, Sendable {
  public let description: String
  /// Whether the host refused the namespaces themselves (no CAP_SYS_ADMIN, e.g. root inside
  /// an unprivileged container, or a kernel without them): nothing was changed, so the
  /// process can go on without the sandbox.
  public let isUnavailable: Bool
  init(_ description: String) {
    self.description = description
    isUnavailable = false
  }
  init(_ step: String, errno number: Int32, unavailable: Bool = false) {
    description = "sandbox: \(step): \(String(cString: strerror(number)))"
    isUnavailable = unavailable
  }
}

/// Test-only actions that show each sandbox layer from inside the sandboxed VMM.
public enum SandboxProbe: String, Sendable, CaseIterable {
  /// After the jail and credentials are in place: reports on standard error what the VMM can
  /// still see (an `open` of a host file, the host's processes, its capabilities).
  case report
  /// After the seccomp filters are installed: the main thread makes a forbidden system call.
  case forbiddenCall = "forbidden-call"
  /// vCPU 0's thread makes a system call its own filter forbids (one the main thread may make).
  case forbiddenCallOnVCPU = "forbidden-call-vcpu"
  /// Each vCPU thread, once its filter is in place, opens the jail's root directory (which
  /// every jail has) and reports the result on standard error: the filter refuses `openat` on
  /// vCPU threads with EACCES instead of stopping the VMM (glibc's malloc opens a file by
  /// itself on whatever thread it runs).
  case openOnVCPU = "open-vcpu"
  /// The same on each device worker thread that starts after entry (a virtio device's queues,
  /// once its driver activates it): its filter refuses `openat` with EACCES too.
  case openOnDeviceWorker = "open-worker"
}

/// What `Sandbox.enter` applies.
public struct SandboxOptions: Sendable {
  /// The directory that becomes the VMM's root; nil for an empty read-only tmpfs.
  public var jailDirectory: String?
  /// The unprivileged user and group the VMM runs as.
  public var uid: uid_t
  public var gid: gid_t
  /// Test-only actions (see `SandboxProbe`).
  public var probes: Set<SandboxProbe> = []
  /// The host process whose visibility the `report` probe checks (a host PID outside the
  /// sandbox's PID namespace).
  public var probeHostPID: pid_t = 1
  /// A host path the `report` probe tries to open.
  public var probeHostPath: String = "/etc/passwd"
  /// Host character devices (such as /dev/kvm) recreated under the jail's /dev, a tmpfs of its
  /// own, with the same device numbers and owned by the sandbox's user: for a VMM that opens
  /// them after entry (`serve`, which builds its machine when the API says so), as Firecracker's
  /// jailer does. Needs a jail directory.
  public var devices: [String] = []

  /// - Parameters: see the properties.
  public init(jailDirectory: String?, uid: uid_t, gid: gid_t) {
    self.jailDirectory = jailDirectory
    self.uid = uid
    self.gid = gid
  }

  /// The user and group `nobody`/`nogroup` (`nobody`'s group when there is no `nogroup`),
  /// looked up before the jail hides /etc; 65534 when the host has neither.
  public static func defaultIdentity() -> (uid: uid_t, gid: gid_t) {
    let uid = getpwnam("nobody")?.pointee.pw_uid ?? 65534
    let gid = getgrnam("nogroup")?.pointee.gr_gid ?? getpwnam("nobody")?.pointee.pw_gid ?? 65534
    return (uid, gid)
  }
}

/// The VMM's sandbox, entered in two steps.
///
/// `prepare` runs first, while the process has one thread and nothing open but its standard
/// descriptors: it enters new mount, PID, IPC and UTS namespaces and forks, so the VMM is PID 1
/// of its PID namespace, and the VMM closes every inherited descriptor; the original process
/// stays outside as a supervisor that mirrors the VMM's exit.
///
/// `enter` runs once everything the machine needs is open (disks, TAP, /dev/kvm, sockets,
/// the passt child): it pivots into the jail, drops to the unprivileged user with no
/// capabilities and no_new_privs, lowers resource limits and installs the seccomp filters.
public enum Sandbox {
  /// Whether `enter` completed (thread kinds then install their own filters as they start).
  private static let active = SandboxFlag()

  /// Step one (see the type's description). Returns in the sandboxed child; the supervising
  /// parent never returns from here.
  public static func prepare() throws(SandboxError) {
    let threads = taskCount()
    guard threads == 1 else {
      throw SandboxError("sandbox: the process already runs \(threads) threads; cannot enter namespaces")
    }
    let unshared = hv_sandbox_unshare_namespaces()
    if unshared != 0 {
      throw SandboxError("cannot enter new namespaces (needs root)", errno: unshared, unavailable: true)
    }
    // Nothing mounted from here on reaches the host's namespace.
    if mount(nil, "/", nil, UInt(MS_REC | MS_PRIVATE), nil) != 0 {
      throw SandboxError("cannot make the mounts private", errno: errno)
    }
    supervisorPIDValue.store(getpid(), ordering: .relaxed)
    var liveness: Int32 = -1
    let child = hv_sandbox_fork(&liveness)
    if child < 0 { throw SandboxError("cannot fork the VMM into its PID namespace", errno: -child) }
    if child > 0 { hv_sandbox_supervise(child) }
    // Only the VMM drops what it inherited. The supervisor keeps its descriptors: a parent may
    // watch one of them for the end of its child (Foundation's `Process` does, with a socket
    // it passes down), and closing it would read as the supervisor's exit. The VMM keeps only
    // the supervisor's liveness pipe, as descriptor 3, until `enter` no longer needs it.
    if liveness != livenessDescriptor {
      guard dup2(liveness, livenessDescriptor) == livenessDescriptor,
        fcntl(livenessDescriptor, F_SETFD, FD_CLOEXEC) == 0
      else {
        throw SandboxError("cannot keep the supervisor's liveness pipe", errno: errno)
      }
    }
    _ = hv_sandbox_close_from(UInt32(livenessDescriptor) + 1)
    livenessKept.set()
    _ = "hostvisor".withCString { sethostname($0, 9) }
  }

  /// The descriptor of the pipe whose write end only the supervisor holds (see `prepare`).
  private static let livenessDescriptor: Int32 = 3
  /// Whether `prepare` left the liveness pipe at `livenessDescriptor`.
  private static let livenessKept = SandboxFlag()

  /// Step two (see the type's description), for a machine whose devices are all open.
  public static func enter(_ options: SandboxOptions) throws(SandboxError) {
    guard options.uid != 0, options.gid != 0 else {
      throw SandboxError("sandbox: --uid and --gid must not be 0 (root); use --no-sandbox to keep root")
    }
    let openDescriptors = highestOpenDescriptor()
    try pivot(into: options.jailDirectory, devices: options.devices, uid: options.uid, gid: options.gid)
    // Capabilities: the bounding and ambient sets first (needs CAP_SETPCAP), then the
    // identity change clears the permitted and effective sets of every thread (glibc applies
    // set*id to all threads), then this thread's sets are cleared explicitly.
    let dropped = hv_sandbox_drop_bounding_set()
    if dropped != 0 { throw SandboxError("cannot drop the capability bounding set", errno: dropped) }
    if setgroups(0, nil) != 0 { throw SandboxError("cannot clear the supplementary groups", errno: errno) }
    let group = hv_sandbox_set_group(options.gid)
    if group != 0 { throw SandboxError("cannot switch to group \(options.gid)", errno: group) }
    let user = hv_sandbox_set_user(options.uid)
    if user != 0 { throw SandboxError("cannot switch to user \(options.uid)", errno: user) }
    // Changing credentials cleared PR_SET_PDEATHSIG: without it the VMM would outlive a
    // killed supervisor. A supervisor that died while it was cleared sent nothing: the pipe
    // whose only write end it held tells.
    hv_sandbox_renew_parent_death_signal()
    if livenessKept.isSet {
      if hv_sandbox_supervisor_alive(livenessDescriptor) == 0 { _exit(128 + SIGKILL) }
      close(livenessDescriptor)
    }
    let cleared = hv_sandbox_clear_capabilities()
    if cleared != 0 { throw SandboxError("cannot clear the capabilities", errno: cleared) }
    let noNewPrivileges = hv_sandbox_set_no_new_privs()
    if noNewPrivileges != 0 { throw SandboxError("cannot set no_new_privs", errno: noNewPrivileges) }
    try limitResources(highestDescriptor: openDescriptors)
    if options.probes.contains(.report) { SandboxReport.print(options) }

    let reporter = hv_sandbox_install_sigsys_reporter()
    if reporter != 0 { throw SandboxError("cannot install the SIGSYS reporter", errno: reporter) }
    try SeccompPolicy.process.install(allThreads: true)
    let vcpuProbe = options.probes.contains(.forbiddenCallOnVCPU)
    let vcpuOpenProbe = options.probes.contains(.openOnVCPU)
    let workerOpenProbe = options.probes.contains(.openOnDeviceWorker)
    ThreadStartActions.add { kind in
      let policy: SeccompPolicy = kind == .vcpu ? .vcpu : .deviceWorker
      kind.rawValue.withCString { hv_sandbox_set_thread_kind($0) }
      do {
        try policy.install(allThreads: false)
      } catch {
        SandboxReport.line("\(error)")
        exit(1)
      }
      if kind == .vcpu ? vcpuOpenProbe : workerOpenProbe { SandboxReport.openOnThread(kind: kind.rawValue) }
      if kind == .vcpu && vcpuProbe { _ = hv_sandbox_socket_call() }
    }
    HostSandboxIdentity.record(uid: options.uid, gid: options.gid)
    active.set()
    if options.probes.contains(.forbiddenCall) { _ = hv_sandbox_forbidden_call() }
  }

  private static let supervisorPIDValue = Atomic<Int32>(1)
  /// The host PID of the process that stays outside the PID namespace (1 before `prepare`).
  public static var supervisorPID: pid_t { supervisorPIDValue.load(ordering: .relaxed) }

  /// Whether `enter` completed in this process.
  public static var isActive: Bool { active.isSet }

  /// Makes `directory` (or a new empty tmpfs) the root and current directory, with the old
  /// root detached.
  private static func pivot(into directory: String?, devices: [String], uid: uid_t, gid: gid_t) throws(SandboxError) {
    let newRoot: String
    if let directory {
      guard let resolved = realpath(directory, nil) else {
        throw SandboxError("sandbox: cannot use jail '\(directory)': \(String(cString: strerror(errno)))")
      }
      newRoot = String(cString: resolved)
      free(resolved)
      var info = stat()
      guard stat(newRoot, &info) == 0, info.st_mode & S_IFMT == S_IFDIR else {
        throw SandboxError("sandbox: jail '\(directory)' is not a directory")
      }
      if mount(newRoot, newRoot, nil, UInt(MS_BIND | MS_REC), nil) != 0 {
        throw SandboxError("cannot bind the jail '\(directory)'", errno: errno)
      }
      try makeDeviceNodes(devices, under: newRoot, uid: uid, gid: gid)
    } else {
      guard devices.isEmpty else { throw SandboxError("sandbox: device nodes need a jail directory") }
      newRoot = "/tmp"
      if mount("tmpfs", newRoot, "tmpfs", UInt(MS_NOSUID | MS_NODEV | MS_NOEXEC), "size=16k,mode=0555") != 0 {
        throw SandboxError("cannot mount the empty root", errno: errno)
      }
    }
    guard chdir(newRoot) == 0 else { throw SandboxError("cannot enter the jail", errno: errno) }
    // pivot_root(".", "."): the old root ends up stacked on the new one, then detached.
    let pivoted = hv_sandbox_pivot_root(".", ".")
    if pivoted != 0 { throw SandboxError("cannot pivot into the jail", errno: pivoted) }
    if umount2(".", Int32(MNT_DETACH)) != 0 { throw SandboxError("cannot detach the host's root", errno: errno) }
    guard chdir("/") == 0 else { throw SandboxError("cannot enter the jail's root", errno: errno) }
    if directory == nil {
      let flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
      if mount(nil, "/", nil, UInt(flags), nil) != 0 {
        throw SandboxError("cannot make the empty root read-only", errno: errno)
      }
    }
  }

  /// Mounts a tmpfs on `root`/dev (in the VMM's own mount namespace: the host's view of the
  /// jail is unchanged) and makes each device of `devices` there, owned by `uid`/`gid`.
  private static func makeDeviceNodes(_ devices: [String], under root: String, uid: uid_t, gid: gid_t)
    throws(SandboxError)
  {
    guard !devices.isEmpty else { return }
    let folder = root + "/dev"
    if mkdir(folder, 0o755) != 0 && errno != EEXIST {
      throw SandboxError("cannot create the jail's /dev", errno: errno)
    }
    if mount("tmpfs", folder, "tmpfs", UInt(MS_NOSUID | MS_NOEXEC), "size=64k,mode=0755") != 0 {
      throw SandboxError("cannot mount the jail's /dev", errno: errno)
    }
    for device in devices {
      var info = stat()
      guard device.hasPrefix("/dev/"), stat(device, &info) == 0, info.st_mode & S_IFMT == S_IFCHR else {
        throw SandboxError("sandbox: \(device) is not a character device under /dev")
      }
      // Subfolders (/dev/net/tun) first.
      var path = folder
      for part in device.dropFirst(5).split(separator: "/").dropLast() {
        path += "/" + part
        if mkdir(path, 0o755) != 0 && errno != EEXIST {
          throw SandboxError("cannot create \(path) in the jail", errno: errno)
        }
      }
      let node = root + device
      guard mknod(node, S_IFCHR | 0o600, info.st_rdev) == 0 else {
        throw SandboxError("cannot make \(device) in the jail", errno: errno)
      }
      guard chown(node, uid, gid) == 0 else {
        throw SandboxError("cannot hand \(device) to the sandbox's user", errno: errno)
      }
    }
  }

  /// RLIMIT_CORE 0 (no core dumps of guest memory), RLIMIT_NOFILE just above the descriptors
  /// in use (room for API connections and snapshot files), RLIMIT_NPROC for the threads still
  /// to come.
  private static func limitResources(highestDescriptor: Int32) throws(SandboxError) {
    let limits: [(resource: Int32, value: UInt64, name: String)] = [
      (HV_RLIMIT_CORE, 0, "RLIMIT_CORE"),
      (HV_RLIMIT_NOFILE, UInt64(highestDescriptor) + 1 + nofileHeadroom, "RLIMIT_NOFILE"),
      (HV_RLIMIT_NPROC, processLimit, "RLIMIT_NPROC"),
    ]
    for limit in limits {
      let result = hv_sandbox_set_limit(limit.resource, limit.value)
      if result != 0 { throw SandboxError("cannot set \(limit.name)", errno: result) }
    }
  }

  /// Descriptors the VMM may open after it entered the sandbox (API connections, snapshot
  /// files, eventfds of devices started by the guest).
  public static let nofileHeadroom: UInt64 = 256
  /// RLIMIT_NPROC: counted by the kernel per user across the host, so a per-VM `--uid` makes it
  /// a per-VM limit.
  public static let processLimit: UInt64 = 1024

  static func taskCount() -> Int {
    guard let directory = opendir("/proc/self/task") else { return 1 }
    defer { closedir(directory) }
    var count = 0
    while let entry = readdir(directory) {
      if entry.pointee.d_name.0 != UInt8(ascii: ".") { count += 1 }
    }
    return count
  }

  static func highestOpenDescriptor() -> Int32 {
    guard let directory = opendir("/proc/self/fd") else { return 64 }
    defer { closedir(directory) }
    var highest: Int32 = 2
    while let entry = readdir(directory) {
      let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
      if let number = Int32(name) { highest = max(highest, number) }
    }
    return highest
  }
}

/// A set-once flag.
final class SandboxFlag: Sendable {
  private let value = Atomic<Bool>(false)
  func set() { value.store(true, ordering: .releasing) }
  var isSet: Bool { value.load(ordering: .acquiring) }
}
