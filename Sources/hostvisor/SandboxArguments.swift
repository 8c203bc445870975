import ArgumentParser
import Glibc
import Sandbox

/// `run`'s sandbox options (see docs/isolation.md).
struct SandboxArguments: ParsableArguments {
  @Flag(
    inversion: .prefixedNo,
    help: ArgumentHelp(
      "Run the VMM sandboxed once the machine is open: new mount, PID, IPC and UTS namespaces, an empty root (or --jail), an unprivileged user, no capabilities, resource limits, seccomp filters per thread. Needs root. Default for run: on when started as root, except with --api-sock, --gdb, --snapshot-on-signal or $HOSTVISOR_PERF_MAP set (they use host paths, the host's view of the VMM or debugging after start; give --sandbox to have it anyway), and off when the host refuses the namespaces (a warning says so). Default for serve: off (it needs --jail). See docs/isolation.md."
    ))
  var sandbox: Bool?

  @Option(
    name: .long,
    help: ArgumentHelp(
      "With the sandbox: this directory becomes the VMM's root (default: an empty read-only one). Snapshot paths given after start must be inside it.",
      valueName: "dir"))
  var jail: String?

  @Option(
    name: .long,
    help: ArgumentHelp("With the sandbox: the user to run as, a name or number (default: nobody).", valueName: "user"))
  var uid: String?

  @Option(
    name: .long,
    help: ArgumentHelp(
      "With the sandbox: the group to run as, a name or number (default: nogroup).", valueName: "group"))
  var gid: String?

  @Option(
    name: .customLong("sandbox-probe"),
    help: ArgumentHelp(
      "Test hook: report,forbidden-call,forbidden-call-vcpu,open-vcpu,open-worker.", visibility: .private))
  var probes: String?

  /// Whether the command line speaks of the sandbox: `--sandbox`, `--no-sandbox`, `--jail`,
  /// `--uid` or `--gid`.
  var isExplicit: Bool { sandbox != nil || jail != nil || uid != nil || gid != nil }

  /// Whether to sandbox this run: as `--sandbox`/`--no-sandbox` say, otherwise on when started
  /// as root (effective user 0) unless `defaultOffReason` is given.
  func enabled(defaultOffReason: String?) -> Bool {
    sandbox ?? (geteuid() == 0 && defaultOffReason == nil)
  }

  /// Why `run` leaves the sandbox off by default: an option that needs host paths, the host's
  /// view of the VMM process or a debugger after start; nil when none applies.
  static func defaultOffReason(apiSocket: String?, gdb: String?, snapshotOnSignal: String?) -> String? {
    if apiSocket != nil { return "--api-sock (the API names host paths after start)" }
    if gdb != nil { return "--gdb (a debugger attaches after start)" }
    if snapshotOnSignal != nil { return "--snapshot-on-signal (it writes host paths after start)" }
    if getenv("HOSTVISOR_PERF_MAP") != nil {
      return "HOSTVISOR_PERF_MAP (the perf map names the VMM's host PID under /tmp)"
    }
    return nil
  }

  /// The options for `Sandbox.enter`, or a one-line error.
  func options(probePath: String?) throws -> SandboxOptions {
    var (defaultUID, defaultGID) = SandboxOptions.defaultIdentity()
    if let uid {
      guard let value = UInt32(uid) ?? getpwnam(uid)?.pointee.pw_uid else {
        throw CommandFailure("invalid --uid '\(uid)': no such user")
      }
      defaultUID = value
    }
    if let gid {
      guard let value = UInt32(gid) ?? getgrnam(gid)?.pointee.gr_gid else {
        throw CommandFailure("invalid --gid '\(gid)': no such group")
      }
      defaultGID = value
    }
    var options = SandboxOptions(jailDirectory: jail, uid: defaultUID, gid: defaultGID)
    for name in (probes ?? "").split(separator: ",") {
      guard let probe = SandboxProbe(rawValue: String(name)) else {
        throw CommandFailure("invalid --sandbox-probe '\(name)'")
      }
      options.probes.insert(probe)
    }
    options.probeHostPID = Sandbox.supervisorPID
    if let probePath { options.probeHostPath = probePath }
    return options
  }

  /// Rejects sandbox options given with the sandbox off.
  func validate(enabled: Bool) throws {
    if !enabled && (jail != nil || uid != nil || gid != nil) {
      throw CommandFailure("--jail, --uid and --gid need the sandbox (it is off: --no-sandbox, or not root)")
    }
  }
}
