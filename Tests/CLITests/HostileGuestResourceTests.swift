import Foundation
import Synchronization
import TestSupport
import Testing

/// Hostile guests against the VMM's own resources (docs/isolation.md): whatever a guest does,
/// its `hostvisor` process stays manageable (the API pauses and resumes it promptly, SIGTERM
/// ends it) and bounded (its resident memory does not grow with the abuse, its threads do not
/// spin beyond the vCPU's).
@Suite("hostile guests against the VMM's resources", .serialized)
struct HostileGuestResourceTests {
  /// A `hostvisor run` child with its API on a socket, its serial console on a pipe the test
  /// reads (`collect`) or leaves unread, and its own messages in a file.
  final class GuestVMM {
    let processIdentifier: pid_t
    let socket: String
    let errorsPath: String
    /// The pipe's read end (the test's).
    let outputDescriptor: Int32
    /// What the reader thread collected.
    final class Collected: Sendable {
      let data = Mutex<Data>(Data())
    }
    private let output = Collected()
    private let reaped = Mutex<Bool>(false)

    init(kernel: String, accelerator: String, collect: Bool, scratch: ScratchDirectory) throws {
      socket = scratch.path("api-\(accelerator).sock")
      errorsPath = scratch.path("errors-\(accelerator).txt")
      var ends: [Int32] = [-1, -1]
      guard pipe(&ends) == 0 else { throw HostCommandError("cannot create a pipe") }
      for end in ends { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
      var actions = posix_spawn_file_actions_t()
      posix_spawn_file_actions_init(&actions)
      defer { posix_spawn_file_actions_destroy(&actions) }
      posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
      posix_spawn_file_actions_adddup2(&actions, ends[1], 1)
      posix_spawn_file_actions_addopen(&actions, 2, errorsPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
      do {
        processIdentifier = try spawnChild(
          HostvisorProcess.executable.path,
          [
            "run", "--kernel", kernel, "--accel", accelerator, "--memory", "64", "--api-sock", socket,
            "--no-sandbox",
          ], environment: nil, actions: &actions)
      } catch {
        close(ends[0])
        close(ends[1])
        throw error
      }
      close(ends[1])
      outputDescriptor = ends[0]
      if collect {
        let descriptor = ends[0]
        Thread.detachNewThread { [output] in
          var buffer = [UInt8](repeating: 0, count: 65536)
          while true {
            let count = read(descriptor, &buffer, buffer.count)
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { return }
            // The last 256 KiB are enough to find the newest report lines.
            output.data.withLock { data in
              data.append(contentsOf: buffer[0..<count])
              if data.count > 1 << 19 { data.removeFirst(data.count - (1 << 18)) }
            }
          }
        }
      }
    }

    /// What the guest printed so far (the newest part when it printed much).
    var text: String { output.data.withLock { String(decoding: $0, as: UTF8.self) } }

    /// The VMM's own messages.
    var errors: String { (try? String(contentsOfFile: errorsPath, encoding: .utf8)) ?? "" }

    /// A field of /proc/PID/status in kB (VmRSS) or as a count (Threads).
    func status(_ field: String) -> Int? {
      SandboxTests.status(processIdentifier, field)?.split(separator: " ").first.flatMap { Int($0) }
    }

    /// User plus system CPU seconds the process used.
    var cpuSeconds: Double { CgroupTests.processCPUSeconds(processIdentifier) }

    /// Sends an API request with curl; the HTTP status and how long the answer took.
    func request(_ method: String, _ path: String) throws -> (status: Int, seconds: Double) {
      let start = Date()
      let result = try HostCommand.run(
        "curl",
        [
          "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20", "--unix-socket", socket, "-X", method,
          "http://localhost\(path)",
        ], timeout: 30)
      return (Int(result.text.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0, Date().timeIntervalSince(start))
    }

    /// Waits until the API socket exists.
    func waitForAPI() -> Bool {
      let deadline = Date().addingTimeInterval(30)
      while !FileManager.default.fileExists(atPath: socket) {
        guard Date() < deadline, isRunning else { return false }
        usleep(20_000)
      }
      return true
    }

    var isRunning: Bool {
      reaped.withLock { reaped in
        if reaped { return false }
        var status: Int32 = 0
        if waitpid(processIdentifier, &status, WNOHANG) == processIdentifier { reaped = true }
        return !reaped
      }
    }

    /// Sends `signal` and waits at most `timeout` seconds for the process to end.
    func stop(_ signal: Int32 = SIGTERM, timeout: Double) -> Bool {
      kill(processIdentifier, signal)
      let deadline = Date().addingTimeInterval(timeout)
      while isRunning {
        guard Date() < deadline else { return false }
        usleep(10_000)
      }
      return true
    }

    deinit {
      if isRunning { _ = stop(SIGKILL, timeout: 10) }
      close(outputDescriptor)
    }
  }

  let scratch: ScratchDirectory

  init() throws { scratch = try ScratchDirectory() }

  static var accelerators: [String] {
    FileManager.default.isWritableFile(atPath: "/dev/kvm") ? ["soft", "kvm"] : ["soft"]
  }

  /// Pauses through the API (within 3 s), checks `whilePaused`, resumes (within 3 s).
  func pauseAndResume(_ vmm: GuestVMM, whilePaused: () throws -> Void = {}) throws {
    let pause = try vmm.request("PUT", "/api/v1/vm.pause")
    #expect(
      pause.status == 204 && pause.seconds < 3, "pause: HTTP \(pause.status) after \(pause.seconds) s; \(vmm.errors)")
    try whilePaused()
    let resume = try vmm.request("PUT", "/api/v1/vm.resume")
    #expect(resume.status == 204 && resume.seconds < 3, "resume: HTTP \(resume.status) after \(resume.seconds) s")
  }

  /// A guest writes its UART as fast as it can into a console nobody reads any more (the pipe
  /// fills): the vCPU must not block on the host write, so the VM still pauses and resumes at
  /// once, the VMM's memory does not grow with what the guest keeps writing, and SIGTERM ends it.
  /// What reached the pipe is the guest's output, in order.
  @Test(arguments: Self.accelerators)
  func serialFloodIntoAConsumerThatStoppedReading(accelerator: String) throws {
    let kernel = try buildGuest("cli/serial-flood.S", in: scratch)
    let vmm = try GuestVMM(kernel: kernel, accelerator: accelerator, collect: false, scratch: scratch)
    try #require(vmm.waitForAPI(), "the API socket did not appear: \(vmm.errors)")
    // The pipe fills (64 KiB by default, less when written a byte at a time) once the guest has
    // flooded it.
    var queued: Int32 = 0
    let deadline = Date().addingTimeInterval(30)
    while ioctl(vmm.outputDescriptor, UInt(FIONREAD), &queued) == 0 && queued < 32_768 && Date() < deadline {
      usleep(50_000)
    }
    try #require(queued >= 32_768, "the guest's output did not fill the pipe (\(queued) bytes): \(vmm.errors)")
    let residentBefore = try #require(vmm.status("VmRSS"))
    try pauseAndResume(vmm)
    sleep(3)
    try pauseAndResume(vmm)
    let residentAfter = try #require(vmm.status("VmRSS"))
    #expect(
      residentAfter - residentBefore < 8 * 1024, "resident memory grew from \(residentBefore) to \(residentAfter) kB")
    #expect(vmm.stop(timeout: 5), "the VMM did not end within 5 s of SIGTERM")
    var buffer = [UInt8](repeating: 0, count: 4096)
    let count = read(vmm.outputDescriptor, &buffer, buffer.count)
    let start = String(decoding: buffer[0..<max(count, 0)], as: UTF8.self)
    #expect(start.hasPrefix("flood running\nxxxx") && start.dropFirst(14).allSatisfy { $0 == "x" })
  }

  /// The guest's "storm P A I" report lines: the PIT, APIC timer and IPI counts.
  static func reports(_ text: String) -> [(pit: UInt32, timer: UInt32, ipi: UInt32)] {
    text.split(separator: "\n").compactMap { line in
      let fields = line.split(separator: " ")
      guard fields.count == 4, fields[0] == "storm", let pit = UInt32(fields[1], radix: 16),
        let timer = UInt32(fields[2], radix: 16), let ipi = UInt32(fields[3], radix: 16)
      else { return nil }
      return (pit, timer, ipi)
    }
  }

  /// An interrupt storm (the PIT at 600 kHz, the APIC timer with a count of 1, self-IPIs in a
  /// loop) on the software CPU: the guest takes hundreds of thousands of interrupts a second,
  /// and the VMM uses about one core (its vCPU) rather than spinning threads of its own, keeps
  /// its memory, pauses (no report comes while paused) and resumes at once, and ends on SIGTERM.
  @Test func interruptStormOnTheSoftwareCPU() throws {
    let kernel = try buildGuest("cli/interrupt-storm.S", in: scratch)
    let vmm = try GuestVMM(kernel: kernel, accelerator: "soft", collect: true, scratch: scratch)
    try #require(vmm.waitForAPI(), "the API socket did not appear: \(vmm.errors)")
    let deadline = Date().addingTimeInterval(30)
    while (Self.reports(vmm.text).last?.pit ?? 0) < 1 << 17 && Date() < deadline { usleep(50_000) }
    let first = try #require(Self.reports(vmm.text).last, "no report from the guest: \(vmm.text.prefix(200))")
    #expect(first.pit >= 1 << 17, "the PIT raised only \(first.pit) interrupts")
    let residentBefore = try #require(vmm.status("VmRSS"))
    let cpuBefore = vmm.cpuSeconds
    let wallStart = Date()
    sleep(3)
    let share = (vmm.cpuSeconds - cpuBefore) / Date().timeIntervalSince(wallStart)
    let cpuUsed = vmm.cpuSeconds - cpuBefore
    let second = try #require(Self.reports(vmm.text).last)
    // At least 50 000 interrupts per second of the VMM's CPU time (Linux asks for 1 000 of the
    // PIT a second): per CPU second, so that a host too loaded to give the VMM its core does
    // not fail the test (an idle host gives about 170 000 a second).
    let raised = Double(second.pit &- first.pit)
    #expect(raised >= 50_000 * cpuUsed, "\(raised) PIT interrupts in 3 s, \(cpuUsed) s of CPU")
    #expect(share < 1.5, "the VMM used \(share) CPUs for one vCPU")
    try pauseAndResume(vmm) {
      usleep(300_000)
      let paused = Self.reports(vmm.text).count
      sleep(1)
      #expect(Self.reports(vmm.text).count == paused, "the guest reported while paused")
    }
    let resumedCount = Self.reports(vmm.text).count
    let resumeDeadline = Date().addingTimeInterval(10)
    while Self.reports(vmm.text).count == resumedCount && Date() < resumeDeadline { usleep(50_000) }
    #expect(Self.reports(vmm.text).count > resumedCount, "no report after resuming")
    let residentAfter = try #require(vmm.status("VmRSS"))
    #expect(
      residentAfter - residentBefore < 8 * 1024, "resident memory grew from \(residentBefore) to \(residentAfter) kB")
    #expect(vmm.stop(timeout: 5), "the VMM did not end within 5 s of SIGTERM")
  }
}
