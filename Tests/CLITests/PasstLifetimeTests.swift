import Foundation
import Synchronization
import TestSupport
import Testing

/// passt, the child behind `--net user`, never outlives its VMM: a VMM killed by a signal runs
/// no exit hook, and a passt that does not notice its socket closing (it was seen spinning)
/// would stay behind.
@Suite struct PasstLifetimeTests {
  /// The VMM is killed with SIGKILL while its passt child is held (a passt that cannot react
  /// to its socket closing, as one caught in a spin); the child (`passt`, or `passt.avx2`,
  /// which it execs on hosts with AVX2) must be gone within seconds. Started by root, passt is
  /// held only once it changed to nobody, which cleared its own parent-death signal: the init
  /// of its PID namespace must take it down.
  @Test func passtEndsWithAVMMKilledBySignal() throws {
    try checkPasstEnds(sandbox: "--no-sandbox")
  }

  /// The same with the sandbox (as root, the default): passt runs in the VMM's PID namespace,
  /// and SIGKILL goes to the supervisor, whose death takes the VMM and the namespace with it.
  @Test(.enabled(if: getuid() == 0, "the sandbox needs root"))
  func passtEndsWithASandboxedVMMWhoseSupervisorIsKilled() throws {
    try checkPasstEnds(sandbox: "--sandbox")
  }

  /// A sandboxed VMM pivots into an empty jail in its mount namespace soon after it started
  /// passt; a passt that runs programs or sets up its own namespaces later than that (as on a
  /// loaded host, where Debian 12's passt then found no /tmp to mount on and exited) must still
  /// see the host's files. The stand-in runs a program a second after its start.
  @Test(.enabled(if: getuid() == 0, "the sandbox needs root"))
  func passtKeepsTheHostsFilesAfterTheSandboxedVMMEnteredItsJail() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/busy-loop.S", in: scratch)
    let folder = scratch.path("bin")
    try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
    let marker = scratch.path("late-program-ran")
    let created = FileManager.default.createFile(
      atPath: folder + "/passt",
      contents: Data("#!/bin/sh\nsleep 1\ntouch \(marker)\nexec sleep 60\n".utf8),
      attributes: [.posixPermissions: 0o755])
    try #require(created)
    var environment = ProcessInfo.processInfo.environment
    environment["PATH"] = folder + ":" + (environment["PATH"] ?? "/usr/bin:/bin")
    let messages = Mutex(Data())
    let vmm = try HostProcess(
      HostvisorProcess.executable.path,
      ["run", "--kernel", kernel, "--accel", "soft", "--net", "user", "--serial", "none", "--sandbox"],
      environment: environment
    ) { data in messages.withLock { $0.append(data) } }
    defer {
      vmm.signal(SIGKILL)
      _ = vmm.waitUntilExit(timeout: 10)
    }
    let deadline = Date().addingTimeInterval(30)
    while !FileManager.default.fileExists(atPath: marker) && vmm.isRunning && Date() < deadline { usleep(50_000) }
    #expect(
      FileManager.default.fileExists(atPath: marker),
      """
      the stand-in's program, run after the VMM's sandbox entry, did not run; VMM alive: \(vmm.isRunning), \
      its messages: \(messages.withLock { String(decoding: $0, as: UTF8.self) })
      """)
  }

  func checkPasstEnds(sandbox: String) throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/busy-loop.S", in: scratch)
    // The VMM's messages (passt's end is reported there) go into the failure messages.
    let messages = Mutex(Data())
    let vmm = try HostProcess(
      HostvisorProcess.executable.path,
      ["run", "--kernel", kernel, "--accel", "soft", "--net", "user", "--serial", "none", sandbox]
    ) { data in messages.withLock { $0.append(data) } }
    defer {
      vmm.signal(SIGKILL)
      _ = vmm.waitUntilExit(timeout: 10)
    }
    var found: pid_t?
    var seen: [pid_t] = []
    let deadline = Date().addingTimeInterval(60)
    while found == nil && Date() < deadline {
      // What the VMM spawned: with the sandbox, the VMM is the started supervisor's child; as
      // root, passt is the child of its PID namespace's init, the VMM's child. (A process
      // passt itself started is not what the VMM spawned.)
      let started = vmm.processIdentifier
      let vmms = sandbox == "--sandbox" ? Self.children(of: started) : [started]
      let children = vmms.flatMap { Self.children(of: $0) }
      let candidates = children + children.flatMap { Self.children(of: $0) }
      seen = vmms + candidates
      found = candidates.first { Self.command(of: $0)?.hasPrefix("passt") == true }
      // Root's passt changes to nobody; held before that, its parent-death signal would still
      // be set and the test would not test the init.
      if let passt = found, getuid() == 0, Self.effectiveUser(of: passt) == 0 { found = nil }
      if found == nil { usleep(20_000) }
    }
    let tree = seen.map {
      "\($0) \(Self.command(of: $0) ?? "gone") state \(Self.statFields($0)?.first ?? "-")"
        + " euid \(Self.effectiveUser(of: $0).map(String.init) ?? "-")"
    }
    let passt = try #require(
      found,
      """
      the VMM started no passt child (or it kept root's identity); VMM alive: \(vmm.isRunning), below it: \(tree); \
      its messages: \(messages.withLock { String(decoding: $0, as: UTF8.self) })
      """)
    defer { if Self.isAlive(passt) { kill(passt, SIGKILL) } }
    // Held by a tracer (gdb attached), not by SIGSTOP: a job-control stop would end passt by
    // itself once the VMM, its process group's leader, dies (the kernel sends SIGHUP to the
    // stopped members of a group that becomes orphaned), and a passt caught in a spin gets no
    // such help.
    // `set sysroot /`: gdb reads passt's files from the host's root, not through a helper in
    // passt's mount namespace (a sandboxed VMM's is an empty jail once it entered it).
    let gdbOutput = Mutex(Data())
    let tracer = try HostProcess(
      "gdb", ["-q", "-nx", "-batch", "-iex", "set sysroot /", "-p", "\(passt)", "-ex", "shell sleep 20"]
    ) { data in gdbOutput.withLock { $0.append(data) } }
    defer {
      // The whole process group (HostProcess gives the child its own): gdb forks a helper to
      // read files in passt's mount namespace, which would outlive gdb blocked on its socket.
      kill(-tracer.processIdentifier, SIGKILL)
      _ = tracer.waitUntilExit(timeout: 10)
    }
    let attached = Date().addingTimeInterval(30)
    while Self.tracer(of: passt) == 0 && Date() < attached { usleep(20_000) }
    try #require(
      Self.tracer(of: passt) != 0,
      """
      gdb did not attach to passt (PID \(passt), \(Self.command(of: passt) ?? "gone"), state \
      \(Self.statFields(passt)?.first ?? "-")); gdb running: \(tracer.isRunning), its output: \
      \(gdbOutput.withLock { String(decoding: $0, as: UTF8.self) })
      """)
    vmm.signal(SIGKILL)
    #expect(vmm.waitUntilExit(timeout: 10), "the VMM did not die of SIGKILL")
    let gone = Date().addingTimeInterval(5)
    while Self.isAlive(passt) && Date() < gone { usleep(20_000) }
    #expect(!Self.isAlive(passt), "passt (PID \(passt)) outlived its VMM")
  }

  /// The process tracing `pid` (/proc/PID/status), 0 for none or once it is gone.
  static func tracer(of pid: pid_t) -> pid_t {
    guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
      let line = status.split(separator: "\n").first(where: { $0.hasPrefix("TracerPid:") })
    else { return 0 }
    return pid_t(line.dropFirst("TracerPid:".count).trimmingCharacters(in: .whitespaces)) ?? 0
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
