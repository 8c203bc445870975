import Foundation
import TestSupport
import Testing

/// passt, the child behind `--net user`, never outlives its VMM: a VMM killed by a signal runs
/// no exit hook, and a passt that does not notice its socket closing (it was seen spinning)
/// would stay behind.
@Suite struct PasstLifetimeTests {
  /// The VMM is killed with SIGKILL while its passt child is stopped (SIGSTOP: a passt that
  /// cannot react to its socket closing); the child (`passt`, or `passt.avx2`, which it execs on
  /// hosts with AVX2) must be gone within seconds.
  @Test func passtEndsWithAVMMKilledBySignal() throws {
    try checkPasstEnds(sandbox: "--no-sandbox")
  }

  /// The same with the sandbox (as root, the default): passt runs in the VMM's PID namespace,
  /// and SIGKILL goes to the supervisor, whose death takes the VMM and the namespace with it.
  @Test(.enabled(if: getuid() == 0, "the sandbox needs root"))
  func passtEndsWithASandboxedVMMWhoseSupervisorIsKilled() throws {
    try checkPasstEnds(sandbox: "--sandbox")
  }

  func checkPasstEnds(sandbox: String) throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/busy-loop.S", in: scratch)
    let vmm = try HostProcess(
      HostvisorProcess.executable.path,
      ["run", "--kernel", kernel, "--accel", "soft", "--net", "user", "--serial", "none", sandbox]
    ) { _ in }
    defer {
      vmm.signal(SIGKILL)
      _ = vmm.waitUntilExit(timeout: 10)
    }
    var found: pid_t?
    let deadline = Date().addingTimeInterval(30)
    while found == nil && Date() < deadline {
      // The VMM's child: with the sandbox, the VMM is the started supervisor's child. (Without
      // it only the VMM's own children count: a process passt itself started has no parent
      // death signal and is not what the VMM spawned.)
      let started = vmm.processIdentifier
      let vmms = sandbox == "--sandbox" ? Self.children(of: started) : [started]
      let candidates = vmms.flatMap { Self.children(of: $0) }
      found = candidates.first { Self.command(of: $0)?.hasPrefix("passt") == true }
      if found == nil { usleep(20_000) }
    }
    let passt = try #require(found, "the VMM started no passt child")
    defer { if Self.isAlive(passt) { kill(passt, SIGKILL) } }
    kill(passt, SIGSTOP)
    // passt started by root changes to nobody, and a change of credentials clears the
    // parent-death signal: stopped after that, an unsandboxed passt can outlive its VMM (a
    // known gap, docs/TODO.md; seen under load). Stopped before it, or sandboxed, it must die.
    let changedCredentials = sandbox == "--no-sandbox" && Self.effectiveUser(of: passt) != geteuid()
    vmm.signal(SIGKILL)
    #expect(vmm.waitUntilExit(timeout: 10), "the VMM did not die of SIGKILL")
    let gone = Date().addingTimeInterval(5)
    while Self.isAlive(passt) && Date() < gone { usleep(20_000) }
    withKnownIssue("passt changed its credentials, which can clear its parent-death signal", isIntermittent: true) {
      #expect(!Self.isAlive(passt), "passt (PID \(passt)) outlived its VMM")
    } when: {
      changedCredentials
    }
  }

  /// The effective user ID of `pid` (/proc/PID/status), nil once it is gone.
  static func effectiveUser(of pid: pid_t) -> uid_t? {
    guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
      let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Uid:") })
    else { return nil }
    let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
    return fields.count > 2 ? uid_t(fields[2]) : nil
  }

  /// The fields of /proc/PID/stat after the command name (state first), nil once the process
  /// is gone.
  static func statFields(_ pid: pid_t) -> [Substring]? {
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
      let close = stat.lastIndex(of: ")")
    else { return nil }
    return stat[stat.index(after: close)...].split(separator: " ")
  }

  /// Whether `pid` still exists and is not a zombie.
  static func isAlive(_ pid: pid_t) -> Bool {
    guard let fields = statFields(pid), let state = fields.first else { return false }
    return state != "Z" && state != "X"
  }

  /// The processes whose parent is `parent`.
  static func children(of parent: pid_t) -> [pid_t] {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.compactMap { pid_t($0) }.filter { pid in
      guard let fields = statFields(pid), fields.count > 1 else { return false }
      return pid_t(fields[1]) == parent
    }
  }

  /// The command name of `pid` (/proc/PID/comm).
  static func command(of pid: pid_t) -> String? {
    (try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
  }
}
