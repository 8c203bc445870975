import Foundation
import TestSupport
import Testing

/// The sandbox (docs/isolation.md) around the real binary and a real KVM guest: each layer is
/// checked from inside (the hidden `--sandbox-probe` hook) and from outside (/proc).
@Suite(
  "the sandboxed VMM", .serialized,
  .enabled(if: getuid() == 0, "the sandbox needs root"),
  .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct SandboxTests {
  /// A running `hostvisor` whose output goes to files (never the runner's pipes): one for
  /// stdout (the guest's serial console) and one for stderr (the VMM's own lines), so that a
  /// VMM line written while the guest is mid-line cannot split the guest's text.
  final class RunningVMM {
    let process: HostProcess
    let stdoutPath: String
    let stderrPath: String

    init(_ arguments: [String], scratch: ScratchDirectory) throws {
      let name = UUID().uuidString
      stdoutPath = scratch.path("vmm-\(name).stdout")
      stderrPath = scratch.path("vmm-\(name).stderr")
      process = try HostProcess(
        HostvisorProcess.executable.path, arguments, outputPath: stdoutPath, errorPath: stderrPath)
    }

    /// The guest's serial output followed by the VMM's own lines.
    var output: String {
      [stdoutPath, stderrPath].map { (try? String(contentsOfFile: $0, encoding: .utf8)) ?? "" }
        .joined(separator: "\n")
    }

    /// Waits until the output contains `text`.
    func waitFor(_ text: String, seconds: Double = 60) throws {
      let deadline = Date().addingTimeInterval(seconds)
      while !output.contains(text) {
        guard process.isRunning, Date() < deadline else {
          Issue.record("no '\(text)' in the output: \(output)")
          throw CocoaError(.fileReadUnknown)
        }
        usleep(50_000)
      }
    }

    /// The sandboxed VMM: the supervisor's only child (an error when there is none).
    func child() throws -> pid_t {
      guard let first = children.first else { throw CocoaError(.fileReadNoSuchFile) }
      return first
    }

    /// The children of the process started (the sandboxed VMM under its supervisor).
    var children: [pid_t] {
      let pid = process.processIdentifier
      let text = (try? String(contentsOfFile: "/proc/\(pid)/task/\(pid)/children", encoding: .utf8)) ?? ""
      return text.split(separator: " ").compactMap { pid_t($0) }
    }

    /// SIGKILL to the VMM and then its supervisor (the VMM goes first so that a failing test
    /// leaves nothing behind even if its parent-death signal did not work).
    func kill() {
      if process.isRunning {
        if let vmm = try? child() { Glibc.kill(vmm, SIGKILL) }
        Glibc.kill(process.processIdentifier, SIGKILL)
      }
      process.waitUntilExit()
    }

    deinit { kill() }
  }

  /// An API request with curl on `socket`: the answer's body.
  static func curl(_ socket: String, _ method: String, _ path: String, _ body: String? = nil) throws -> String {
    try HostCommand.run(
      "curl",
      ["-s", "--max-time", "60", "--unix-socket", socket, "-X", method, "http://localhost\(path)"]
        + (body.map { ["-H", "Content-Type: application/json", "-d", $0] } ?? []),
      errors: .discarded, timeout: 90
    ).text
  }

  /// One field of /proc/PID/status.
  static func status(_ pid: pid_t, _ field: String) -> String? {
    let text = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
    return text.split(separator: "\n").first { $0.hasPrefix(field + ":") }
      .map { $0.dropFirst(field.count + 1).trimmingCharacters(in: .whitespaces) }
  }

  static func namespace(_ pid: String, _ kind: String) -> String? {
    try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/ns/\(kind)")
  }

  static let nobody: (uid: UInt32, gid: UInt32) = (
    getpwnam("nobody")?.pointee.pw_uid ?? 65534,
    getgrnam("nogroup")?.pointee.gr_gid ?? getpwnam("nobody")?.pointee.pw_gid ?? 65534
  )

  /// After start-up, inside: the kernel file it booted is out of reach by its host path, the
  /// supervisor's host PID does not exist, it is PID 1 running as nobody with no /proc.
  /// Outside: no capabilities in any set, no_new_privs, seccomp filter mode, its own
  /// namespaces, PID 1 in its PID namespace; killing the supervisor kills it.
  @Test func layersSeenFromInsideAndOutside() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/busy-loop.S", in: scratch)
    let vmm = try RunningVMM(
      ["run", "--kernel", kernel, "--accel", "kvm", "--serial", "stdio", "--sandbox", "--sandbox-probe", "report"],
      scratch: scratch)
    try vmm.waitFor("busy loop running")
    let output = vmm.output
    let supervisor = vmm.process.processIdentifier
    #expect(output.contains("sandbox-probe: open \(kernel): No such file or directory"), "\(output)")
    #expect(output.contains("sandbox-probe: kill \(supervisor) 0: No such process"), "\(output)")
    #expect(output.contains("sandbox-probe: pid 1 uid \(Self.nobody.uid) gid \(Self.nobody.gid)"), "\(output)")
    #expect(output.contains("sandbox-probe: cwd / /proc absent"), "\(output)")

    let child = try vmm.child()
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
      #expect(Self.status(child, set) == "0000000000000000", "\(set)")
    }
    #expect(Self.status(child, "NoNewPrivs") == "1")
    #expect(Self.status(child, "Seccomp") == "2")
    #expect(Self.status(child, "Uid")?.split(separator: "\t").allSatisfy { $0 == "\(Self.nobody.uid)" } == true)
    #expect(Self.status(child, "NSpid") == "\(child)\t1")
    for kind in ["mnt", "pid", "ipc", "uts"] {
      let own = Self.namespace("self", kind)
      #expect(own != nil && Self.namespace("\(child)", kind) != own, "\(kind) namespace")
    }
    // Every thread carries a filter: the process one, plus its own for the vCPU.
    let tasks = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(child)/task")
    for task in tasks {
      let name = (try? String(contentsOfFile: "/proc/\(child)/task/\(task)/comm", encoding: .utf8)) ?? ""
      let status = (try? String(contentsOfFile: "/proc/\(child)/task/\(task)/status", encoding: .utf8)) ?? ""
      let filters = status.split(separator: "\n").first { $0.hasPrefix("Seccomp_filters:") }
        .flatMap { Int($0.split(separator: "\t").last ?? "") }
      if name.hasPrefix("vcpu") { #expect(filters == 2, "\(name)") }
      if name.hasPrefix("hostvisor") { #expect((filters ?? 0) >= 1, "\(name)") }
    }
    // SIGKILL to the supervisor alone: the VMM's parent-death signal ends it too (a zombie
    // waiting for the host's init to reap it counts as ended).
    Glibc.kill(supervisor, SIGKILL)
    vmm.process.waitUntilExit()
    var gone = false
    for _ in 0..<250 where !gone {
      let state = Self.status(child, "State")
      gone = state == nil || state!.hasPrefix("Z")
      if !gone { usleep(20_000) }
    }
    #expect(gone, "the VMM outlived its supervisor")
    if !gone { Glibc.kill(child, SIGKILL) }
  }

  /// A forbidden system call on the main thread (ptrace, 101) and on a vCPU thread (socket,
  /// 41, which the main thread may make) each stop the whole process with one line naming it.
  @Test(arguments: [("forbidden-call", 101, "main"), ("forbidden-call-vcpu", 41, "vcpu")])
  func forbiddenCallStopsTheVMM(probe: String, number: Int, thread: String) throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/busy-loop.S", in: scratch)
    let result = try HostvisorProcess.run([
      "run", "--kernel", kernel, "--accel", "kvm", "--serial", "none", "--sandbox", "--sandbox-probe", probe,
    ])
    #expect(result.status == 128 + SIGSYS, "stderr: \(result.stderr)")
    #expect(
      result.stderr.contains(
        "hostvisor: sandbox: seccomp stopped the VMM: forbidden system call \(number) on a \(thread) thread"),
      "stderr: \(result.stderr)")
  }

  /// As root the sandbox is on by default: a `run` without sandbox options ends up as an
  /// unprivileged, filtered VMM under its supervisor, and the guest still runs and exits with
  /// its own status; --no-sandbox keeps a single root process; the options that need the host's
  /// view after start leave it off by default (--verbose says why) unless --sandbox is given;
  /// sandbox options without the sandbox are an error.
  @Test func onByDefaultAsRootAndOptOut() throws {
    let scratch = try ScratchDirectory()
    let busy = try buildGuest("cli/busy-loop.S", in: scratch)
    let defaulted = try RunningVMM(["run", "--kernel", busy, "--accel", "kvm", "--serial", "stdio"], scratch: scratch)
    try defaulted.waitFor("busy loop running")
    let vmm = try defaulted.child()
    #expect(Self.status(vmm, "NoNewPrivs") == "1")
    #expect(Self.status(vmm, "Seccomp") == "2")
    #expect(Self.status(vmm, "Uid")?.split(separator: "\t").allSatisfy { $0 == "\(Self.nobody.uid)" } == true)
    #expect(Self.status(vmm, "CapEff") == "0000000000000000")
    #expect(Self.status(vmm, "NSpid") == "\(vmm)\t1")
    defaulted.kill()

    let plain = try RunningVMM(
      ["run", "--kernel", busy, "--accel", "kvm", "--serial", "stdio", "--no-sandbox"], scratch: scratch)
    try plain.waitFor("busy loop running")
    let pid = plain.process.processIdentifier
    #expect(Self.status(pid, "NoNewPrivs") == "0")
    #expect(Self.status(pid, "Seccomp") == "0")
    #expect(Self.status(pid, "Uid")?.split(separator: "\t").allSatisfy { $0 == "0" } == true)
    #expect(plain.children.isEmpty, "a VMM without the sandbox forked \(plain.children)")
    plain.kill()

    let kernel = try buildGuest("cli/hello-multiboot.S", in: scratch)
    let disk = scratch.path("disk.img")
    try Data(repeating: 0, count: 1 << 20).write(to: URL(fileURLWithPath: disk))
    let base = ["run", "--kernel", kernel, "--accel", "kvm", "--disk", disk, "--console", "virtio", "--verbose"]
    let sandboxed = try HostvisorProcess.run(base + ["--serial", "stdio"])
    #expect(sandboxed.status == (0x21 << 1) | 1, "stderr: \(sandboxed.stderr)")
    #expect(sandboxed.stdout.contains("hello from the guest"))
    #expect(sandboxed.stderr.contains("hostvisor: sandbox: entered (root: empty;"), "\(sandboxed.stderr)")
    let optedOut = try HostvisorProcess.run(base + ["--serial", "stdio", "--no-sandbox"])
    #expect(optedOut.status == (0x21 << 1) | 1, "stderr: \(optedOut.stderr)")
    #expect(!optedOut.stderr.contains("sandbox"), "\(optedOut.stderr)")
    let port = String(Int.random(in: 20000...40000))
    let debugged = try HostvisorProcess.run(base + ["--serial", "stdio", "--gdb", "127.0.0.1:\(port)"])
    #expect(debugged.status == (0x21 << 1) | 1, "stderr: \(debugged.stderr)")
    #expect(
      debugged.stderr.contains("hostvisor: sandbox: off by default with --gdb") && !debugged.stderr.contains("entered"),
      "\(debugged.stderr)")
    let asked = try HostvisorProcess.run(base + ["--serial", "stdio", "--gdb", "127.0.0.1:\(port)", "--sandbox"])
    #expect(asked.status == (0x21 << 1) | 1, "stderr: \(asked.stderr)")
    #expect(asked.stderr.contains("hostvisor: sandbox: entered"), "\(asked.stderr)")
    let wrong = try HostvisorProcess.run(base + ["--no-sandbox", "--uid", "1"])
    #expect(wrong.status == 1)
    #expect(wrong.stderr.hasPrefix("hostvisor: error: --jail, --uid and --gid need the sandbox"), "\(wrong.stderr)")
    let root = try HostvisorProcess.run(base + ["--uid", "0"])
    #expect(root.status == 1)
    #expect(root.stderr.contains("must not be 0"), "\(root.stderr)")
  }

  /// The open-vcpu probe: a vCPU thread's `openat` (of the jail's root, which exists) is
  /// refused with EACCES, and the VMM carries on and runs its guest to its own exit status. A
  /// filter that allowed the call would report "opened"; one that stopped the VMM would end it
  /// with status 159 and the seccomp line.
  @Test func openOnAVCPUThreadIsRefusedWithEACCES() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/hello-multiboot.S", in: scratch)
    let result = try HostvisorProcess.run([
      "run", "--kernel", kernel, "--accel", "kvm", "--serial", "stdio", "--sandbox", "--sandbox-probe", "open-vcpu",
    ])
    #expect(result.status == (0x21 << 1) | 1, "stderr: \(result.stderr)")
    #expect(result.stdout.contains("hello from the guest"), "stdout: \(result.stdout)")
    let reports = result.stderr.split(separator: "\n").filter {
      $0.hasPrefix("sandbox-probe: open / on a vcpu thread:")
    }
    #expect(
      reports == ["sandbox-probe: open / on a vcpu thread: \(String(cString: strerror(EACCES)))"],
      "stderr: \(result.stderr)")
    #expect(!result.stderr.contains("seccomp stopped the VMM"), "stderr: \(result.stderr)")
  }

  /// The state letter of /proc/PID/stat (R, S, T, Z, ...) of a process or one of its threads.
  static func state(_ path: String) -> Character? {
    guard let text = try? String(contentsOfFile: path + "/stat", encoding: .utf8),
      let end = text.range(of: ") ", options: .backwards)
    else { return nil }
    return text[end.upperBound...].first
  }

  /// Whether every thread of `pid` is stopped (T), or none is.
  static func threadsStopped(_ pid: pid_t) -> (all: Bool, none: Bool) {
    let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
    let states = tasks.compactMap { state("/proc/\(pid)/task/\($0)") }
    return (!states.isEmpty && states.allSatisfy { $0 == "T" }, !states.contains("T"))
  }

  /// Polls `condition` every 20 ms for up to `seconds`.
  static func eventually(seconds: Double = 10, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while !condition() {
      guard Date() < deadline else { return false }
      usleep(20_000)
    }
    return true
  }

  /// The size of a file (its growth shows the guest's serial output advancing).
  static func size(_ path: String) -> Int {
    ((try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? Int) ?? -1
  }

  /// Job control through the supervisor: SIGTSTP to it stops the VMM (every thread in state T,
  /// the guest's ticks no longer reach its serial file) and then the supervisor itself, as a
  /// shell waiting for its job expects; SIGCONT to the supervisor continues both, and the
  /// ticks advance again. SIGUSR1 and SIGUSR2 reach the VMM as they are where it takes them
  /// (the KVM kick's handler, the snapshot signal's waiting thread), so neither ends the
  /// machine, and SIGUSR2 makes a sandboxed `--snapshot-on-signal` VMM write its snapshot into
  /// its jail.
  @Test func jobControlSignalsReachTheVMMThroughTheSupervisor() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/busy-loop.S", in: scratch)
    let jail = scratch.path("jail")
    try FileManager.default.createDirectory(atPath: jail, withIntermediateDirectories: true)
    #expect(chown(jail, Self.nobody.uid, Self.nobody.gid) == 0)
    let vmm = try RunningVMM(
      [
        "run", "--kernel", kernel, "--accel", "kvm", "--memory", "32M", "--serial", "stdio", "--sandbox", "--jail",
        jail, "--snapshot-on-signal", "/vm.state",
      ], scratch: scratch)
    try vmm.waitFor("busy loop running")
    let supervisor = vmm.process.processIdentifier
    let child = try vmm.child()
    func advances() -> Bool {
      let before = Self.size(vmm.stdoutPath)
      return Self.eventually(seconds: 10) { Self.size(vmm.stdoutPath) > before }
    }
    #expect(advances(), "the guest's output does not advance before the stop")

    for round in 0..<2 {
      Glibc.kill(supervisor, SIGTSTP)
      #expect(Self.eventually { Self.threadsStopped(child).all }, "round \(round): the VMM did not stop")
      #expect(
        Self.eventually { Self.state("/proc/\(supervisor)") == "T" }, "round \(round): the supervisor did not stop")
      // Every thread stopped: nothing more reaches the file (a write under way when the stop
      // came has completed).
      let stopped = Self.size(vmm.stdoutPath)
      usleep(1_000_000)
      #expect(Self.size(vmm.stdoutPath) == stopped, "round \(round): the guest's output advanced while stopped")
      #expect(Self.threadsStopped(child).all, "round \(round): the VMM did not stay stopped")

      Glibc.kill(supervisor, SIGCONT)
      #expect(Self.eventually { Self.threadsStopped(child).none }, "round \(round): the VMM was not continued")
      #expect(
        Self.eventually { Self.state("/proc/\(supervisor)") != "T" }, "round \(round): the supervisor stays stopped")
      #expect(advances(), "round \(round): the guest's output does not advance after SIGCONT")
    }

    // SIGUSR1 (the KVM kick signal, which the VMM handles) and SIGUSR2 (the snapshot signal).
    Glibc.kill(supervisor, SIGUSR1)
    Glibc.kill(supervisor, SIGUSR2)
    try vmm.waitFor("hostvisor: snapshot written to /vm.state", seconds: 60)
    #expect(FileManager.default.fileExists(atPath: jail + "/vm.state"))
    #expect(vmm.process.isRunning, "the supervisor ended: \(vmm.output)")
    #expect(advances(), "the guest's output does not advance after SIGUSR1 and SIGUSR2")
    vmm.kill()
  }

  /// A VMM that neither handles, ignores nor blocks SIGUSR2 (no `--snapshot-on-signal`) is
  /// ended by it under the sandbox as without: the process started ends by SIGUSR2 and no VMM
  /// is left. (As its PID namespace's init the sandboxed VMM would never see the signal; the
  /// supervisor sees from /proc that it takes the default action and ends it.)
  @Test func anUnhandledUserSignalEndsTheVMMAsWithoutTheSandbox() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/busy-loop.S", in: scratch)
    for sandbox in ["--no-sandbox", "--sandbox"] {
      let vmm = try RunningVMM(
        ["run", "--kernel", kernel, "--accel", "kvm", "--memory", "32M", "--serial", "stdio", sandbox],
        scratch: scratch)
      try vmm.waitFor("busy loop running")
      let target = sandbox == "--sandbox" ? try vmm.child() : vmm.process.processIdentifier
      let mask = UInt64(Self.status(target, "SigBlk") ?? "", radix: 16) ?? ~0
      #expect(mask & (1 << (UInt64(SIGUSR2) - 1)) == 0, "\(sandbox): the VMM blocks SIGUSR2 (SigBlk \(mask))")
      Glibc.kill(vmm.process.processIdentifier, SIGUSR2)
      #expect(Self.eventually(seconds: 10) { !vmm.process.isRunning }, "\(sandbox): SIGUSR2 did not end the VMM")
      vmm.kill()
      #expect(vmm.process.wasSignaled, "\(sandbox): \(vmm.output)")
      #expect(vmm.process.terminationStatus == SIGUSR2, "\(sandbox): \(vmm.output)")
      if sandbox == "--sandbox" {
        #expect(Self.eventually { Glibc.kill(target, 0) != 0 || Self.state("/proc/\(target)") == "Z" })
      }
    }
  }

  /// Root without CAP_SYS_ADMIN (as in an unprivileged container) cannot enter namespaces: by
  /// default the guest runs without the sandbox after one warning line; with --sandbox that is
  /// a one-line error.
  @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv"), "needs setpriv"))
  func rootDeniedNamespacesRunsWithoutTheSandboxByDefault() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/hello-multiboot.S", in: scratch)
    let command = [
      "--bounding-set=-sys_admin", "--", HostvisorProcess.executable.path, "run", "--kernel", kernel, "--accel", "kvm",
      "--serial", "stdio",
    ]
    let defaulted = try HostCommand.run("/usr/bin/setpriv", command, timeout: 120)
    #expect(defaulted.status == (0x21 << 1) | 1, "stderr: \(defaulted.errorText)")
    #expect(defaulted.text.contains("hello from the guest"))
    #expect(
      defaulted.errorText
        == "hostvisor: warning: sandbox: cannot enter new namespaces (needs root): Operation not permitted; "
        + "running without the sandbox (--no-sandbox: no warning)\n")
    let asked = try HostCommand.run("/usr/bin/setpriv", command + ["--sandbox"], timeout: 120)
    #expect(asked.status == 1)
    #expect(
      asked.errorText
        == "hostvisor: error: sandbox: cannot enter new namespaces (needs root): Operation not permitted\n")
  }

  /// SIGKILL to the supervisor at any point of the VMM's life (before its machine exists,
  /// while it enters the sandbox, while 16 vCPU threads run) leaves no VMM behind: every
  /// process started with this run's kernel path is gone (or a zombie) within 5 s.
  @Test func killingTheSupervisorAnytimeEndsAManyThreadedVMM() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/busy-loop.S", in: scratch)
    var killedAfterEntry = 0
    for (round, delay) in [0, 5, 15, 30, 50, 80, 120, 200, 300, 500, -1, -1].enumerated() {
      // A path of its own names every process of this round in /proc/PID/cmdline.
      let copy = scratch.path("busy-\(round).elf")
      try FileManager.default.copyItem(atPath: kernel, toPath: copy)
      let vmm = try RunningVMM(
        ["run", "--kernel", copy, "--accel", "soft", "--cpus", "16", "--memory", "64", "--serial", "stdio"],
        scratch: scratch)
      if delay < 0 {
        try vmm.waitFor("busy loop running")
      } else {
        usleep(UInt32(delay) * 1000)
      }
      if let child = try? vmm.child(), Self.status(child, "Seccomp") == "2" { killedAfterEntry += 1 }
      Glibc.kill(vmm.process.processIdentifier, SIGKILL)
      vmm.process.waitUntilExit()
      var left = Self.liveProcesses(naming: copy)
      for _ in 0..<250 where !left.isEmpty {
        usleep(20_000)
        left = Self.liveProcesses(naming: copy)
      }
      #expect(left.isEmpty, "round \(round) (\(delay) ms): the VMM outlived its supervisor: \(left)")
      for pid in left { Glibc.kill(pid, SIGKILL) }
    }
    #expect(killedAfterEntry >= 2, "only \(killedAfterEntry) rounds killed a VMM that had entered the sandbox")
  }

  /// Processes (not zombies) whose command line contains `text`.
  static func liveProcesses(naming text: String) -> [pid_t] {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.compactMap { pid_t($0) }.filter { pid in
      guard let command = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"),
        String(decoding: command, as: UTF8.self).contains(text)
      else { return false }
      let state = status(pid, "State")
      return state != nil && !state!.hasPrefix("Z") && !state!.hasPrefix("X")
    }
  }

  /// With --api-sock and a --jail the API still answers after the VMM entered the sandbox, and
  /// a snapshot written by path lands in the jail (named as the VMM sees it).
  @Test
  func apiAnswersAndSnapshotsIntoTheJail() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/busy-loop.S", in: scratch)
    let jail = scratch.path("jail")
    try FileManager.default.createDirectory(atPath: jail, withIntermediateDirectories: true)
    #expect(chown(jail, Self.nobody.uid, Self.nobody.gid) == 0)
    let socket = scratch.path("api.sock")
    let vmm = try RunningVMM(
      [
        "run", "--kernel", kernel, "--accel", "kvm", "--serial", "stdio", "--api-sock", socket, "--sandbox",
        "--jail", jail, "--verbose",
      ], scratch: scratch)
    try vmm.waitFor("hostvisor: sandbox: entered (root: \(jail);")
    try vmm.waitFor("busy loop running")
    func curl(_ method: String, _ path: String, _ body: String? = nil) throws -> String {
      try Self.curl(socket, method, path, body)
    }
    #expect(try curl("GET", "/").contains("\"state\":\"Running\""))
    _ = try curl("PATCH", "/vm", #"{"state":"Paused"}"#)
    #expect(try curl("GET", "/").contains("\"state\":\"Paused\""))
    let answer = try curl("PUT", "/snapshot/create", #"{"snapshot_path":"/guest.state","mem_file_path":"/guest.mem"}"#)
    #expect(!answer.contains("fault_message"), "\(answer)")
    let memory = try FileManager.default.attributesOfItem(atPath: jail + "/guest.mem")
    #expect((memory[.size] as? Int ?? 0) > 0)
    #expect(FileManager.default.fileExists(atPath: jail + "/guest.state"))
    // A path outside the jail does not exist for the VMM.
    let outside = try curl(
      "PUT", "/snapshot/create", #"{"snapshot_path":"\#(scratch.path("x.state"))","mem_file_path":"/x.mem"}"#)
    #expect(outside.contains("fault_message"), "\(outside)")
    #expect(!FileManager.default.fileExists(atPath: scratch.path("x.state")))
    vmm.kill()
  }

  /// `serve --sandbox --jail DIR`: the API process enters its jail before any machine exists;
  /// the machine the API then configures comes from paths inside the jail (a host path is
  /// refused), /dev/kvm from the node the sandbox made there for its user, and the booted guest
  /// runs with the VMM unprivileged, without new privileges, under seccomp, its vCPU thread
  /// under a filter of its own.
  @Test(arguments: ["soft", "kvm"])
  func serveBootsWhatItsAPINamesInsideTheJail(accelerator: String) throws {
    let scratch = try ScratchDirectory()
    let jail = scratch.path("jail")
    try FileManager.default.createDirectory(atPath: jail, withIntermediateDirectories: true)
    let kernel = try buildGuest("cli/busy-loop.S", in: scratch)
    try FileManager.default.copyItem(atPath: kernel, toPath: jail + "/busy.elf")
    let socket = scratch.path("api.sock")
    let vmm = try RunningVMM(
      ["serve", "--api-sock", socket, "--accel", accelerator, "--sandbox", "--jail", jail, "--verbose"],
      scratch: scratch)
    try vmm.waitFor("hostvisor: sandbox: entered (root: \(jail);")
    let hostPath = try Self.curl(socket, "PUT", "/boot-source", #"{"kernel_image_path":"\#(jail)/busy.elf"}"#)
    #expect(hostPath.contains("fault_message"), "a host path reached through the jail: \(hostPath)")
    let jailed = try Self.curl(socket, "PUT", "/boot-source", #"{"kernel_image_path":"/busy.elf"}"#)
    #expect(!jailed.contains("fault_message"), "\(jailed)")
    let started = try Self.curl(socket, "PUT", "/actions", #"{"action_type":"InstanceStart"}"#)
    #expect(!started.contains("fault_message"), "\(started)")
    try vmm.waitFor("busy loop running")
    #expect(vmm.output.contains("accelerator: \(accelerator)"), "\(vmm.output)")
    let child = try vmm.child()
    #expect(Self.status(child, "Uid")?.split(separator: "\t").allSatisfy { $0 == "\(Self.nobody.uid)" } == true)
    #expect(Self.status(child, "NoNewPrivs") == "1")
    #expect(Self.status(child, "Seccomp") == "2")
    #expect(Self.status(child, "CapEff") == "0000000000000000")
    var vcpuFilters: [Int?] = []
    for task in try FileManager.default.contentsOfDirectory(atPath: "/proc/\(child)/task") {
      let name = (try? String(contentsOfFile: "/proc/\(child)/task/\(task)/comm", encoding: .utf8)) ?? ""
      let status = (try? String(contentsOfFile: "/proc/\(child)/task/\(task)/status", encoding: .utf8)) ?? ""
      guard name.hasPrefix("vcpu") else { continue }
      vcpuFilters.append(
        status.split(separator: "\n").first { $0.hasPrefix("Seccomp_filters:") }
          .flatMap { Int($0.split(separator: "\t").last ?? "") })
    }
    #expect(vcpuFilters == [2], "the vCPU threads' filters: \(vcpuFilters)")
    vmm.kill()
  }
}
