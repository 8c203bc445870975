import ArgumentParser
import Glibc
import Sandbox

/// `run`'s sandbox options (see docs/isolation.md).
struct SandboxArguments: ParsableArguments {
  @Flag(
    inversion: .prefixedNo,
    help: ArgumentHelp(
      "Run the VMM sandboxed once the machine is open: new mount, PID, IPC and UTS namespaces, an empty root (or --jail), an unprivileged user, no capabilities, resource limits, seccomp filters per thread. Needs root. Default: off for now (see docs/isolation.md)."
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
    help: ArgumentHelp("Test hook: report,forbidden-call,forbidden-call-vcpu.", visibility: .private))
  var probes: String?

  /// Whether to sandbox this run.
  func enabled(apiSocket: String?, gdb: String?, snapshotOnSignal: String?) -> Bool {
    // Default on as root once killing the supervisor reliably ends the VMM (docs/TODO.md):
    // (getuid() == 0 && apiSocket == nil && gdb == nil && snapshotOnSignal == nil)
    sandbox ?? false
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
