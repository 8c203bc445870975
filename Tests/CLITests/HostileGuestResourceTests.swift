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
  /// reads (`collect`) or leaves unread, and its own messages in a file (or on a descriptor
  /// the test gives).
  final class GuestVMM {
    let processIdentifier: pid_t
    let socket: String
    let errorsPath: String
    /// The pipe's read end (the test's).
    let outputDescriptor: Int32
    /// The write end of the VMM's standard input (COM1's input), when asked for; else -1.
    let inputDescriptor: Int32
    /// What the reader thread collected.
    final class Collected: Sendable {
      let data = Mutex<Data>(Data())
    }
    private let output = Collected()
    private let reaped = Mutex<Bool>(false)
    /// The wait status once the process has been reaped.
    private let waitStatus = Mutex<Int32?>(nil)

    /// Starts `hostvisor run` with `kernel` on `accelerator` and `memory` MiB, plus `arguments`;
    /// `launcher` goes in front (e.g. `ip netns exec NAME`, which execs the VMM in place, so
    /// the child's PID is the VMM's); `input` gives it a standard input the test writes;
    /// `standardError` is a descriptor to give it as standard error instead of `errorsPath`.
    init(
      kernel: String, accelerator: String, collect: Bool, scratch: ScratchDirectory, memory: String = "64",
      arguments: [String] = [], launcher: [String] = [], input: Bool = false, api: Bool = true,
      standardError: Int32? = nil
    ) throws {
      socket = scratch.path("api-\(accelerator).sock")
      errorsPath = scratch.path("errors-\(accelerator).txt")
      var ends: [Int32] = [-1, -1, -1, -1]
      guard pipe(&ends) == 0 else { throw HostCommandError("cannot create a pipe") }
      if input {
        guard ends.withUnsafeMutableBufferPointer({ pipe($0.baseAddress! + 2) }) == 0 else {
          close(ends[0])
          close(ends[1])
          throw HostCommandError("cannot create a pipe")
        }
      }
      for end in ends where end >= 0 { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
      var actions = posix_spawn_file_actions_t()
      posix_spawn_file_actions_init(&actions)
      defer { posix_spawn_file_actions_destroy(&actions) }
      if input {
        posix_spawn_file_actions_adddup2(&actions, ends[2], 0)
      } else {
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
      }
      posix_spawn_file_actions_adddup2(&actions, ends[1], 1)
      if let standardError {
        posix_spawn_file_actions_adddup2(&actions, standardError, 2)
      } else {
        posix_spawn_file_actions_addopen(&actions, 2, errorsPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
      }
      let command =
        [
          HostvisorProcess.executable.path, "run", "--kernel", kernel, "--accel", accelerator, "--memory", memory,
          "--no-sandbox",
        ] + (api ? ["--api-sock", socket] : []) + arguments
      do {
        processIdentifier =
          if launcher.isEmpty {
            try spawnChild(command[0], Array(command.dropFirst()), environment: nil, actions: &actions)
          } else {
            try spawnChild(launcher[0], Array(launcher.dropFirst()) + command, environment: nil, actions: &actions)
          }
      } catch {
        for end in ends where end >= 0 { close(end) }
        throw error
      }
      close(ends[1])
      if input { close(ends[2]) }
      outputDescriptor = ends[0]
      inputDescriptor = input ? ends[3] : -1
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
      waitWhileRunning(seconds: 30) { FileManager.default.fileExists(atPath: socket) }
    }

    /// Polls `condition` every 20 ms for at most `seconds`; false when the time ran out or the
    /// VMM ended first.
    func waitWhileRunning(seconds: Double, until condition: () -> Bool) -> Bool {
      let deadline = Date().addingTimeInterval(seconds)
      while !condition() {
        guard Date() < deadline, isRunning else { return false }
        usleep(20_000)
      }
      return true
    }

    var isRunning: Bool {
      reaped.withLock { reaped in
        if reaped { return false }
        var status: Int32 = 0
        if waitpid(processIdentifier, &status, WNOHANG) == processIdentifier {
          reaped = true
          waitStatus.withLock { $0 = status }
        }
        return !reaped
      }
    }

    /// Waits at most `timeout` seconds for the process to end by itself; its exit status (or
    /// nil if it is still running or ended on a signal).
    func exitStatus(within timeout: Double) -> Int32? {
      let deadline = Date().addingTimeInterval(timeout)
      while isRunning {
        guard Date() < deadline else { return nil }
        usleep(20_000)
      }
      guard let status = waitStatus.withLock({ $0 }), status & 0x7F == 0 else { return nil }
      return (status >> 8) & 0xFF
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
      if inputDescriptor >= 0 { close(inputDescriptor) }
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

  /// A network namespace with a TAP `hvnic0` at 10.0.2.1/24 (the emulated-NIC guests' peer),
  /// deleted by `remove`.
  struct TapNamespace {
    let name = "hvhostile-\(UInt32.random(in: 0...UInt32.max))"
    let tap = "hvnic0"

    init() throws {
      try EmulatedNICGuestTests.ip(["netns", "add", name])
      do {
        try EmulatedNICGuestTests.ip(["-n", name, "link", "set", "lo", "up"])
        try EmulatedNICGuestTests.ip(["-n", name, "tuntap", "add", "dev", tap, "mode", "tap"])
        try EmulatedNICGuestTests.ip(["-n", name, "addr", "add", "10.0.2.1/24", "dev", tap])
        try EmulatedNICGuestTests.ip(["-n", name, "link", "set", tap, "up"])
      } catch {
        remove()
        throw error
      }
    }

    /// `ip netns exec NAME`: runs the VMM in the namespace (exec'd in place).
    var launcher: [String] { ["/usr/bin/env", "ip", "netns", "exec", name] }

    /// The TAP's MAC address.
    func tapAddress() throws -> String {
      try HostCommand.run(
        "/usr/bin/env", ["ip", "netns", "exec", name, "cat", "/sys/class/net/\(tap)/address"], timeout: 30
      ).text.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func remove() { _ = try? HostCommand.run("/usr/bin/env", ["ip", "netns", "del", name], errors: .discarded) }
  }

  /// The virtio-hostile guest's "round N scenarios S refused R good G" lines.
  static func rounds(_ text: String) -> [(round: Int, scenarios: Int, refused: Int, good: Int)] {
    text.split(separator: "\n").compactMap { line in
      let fields = line.split(separator: " ")
      guard fields.count == 8, fields[0] == "round", fields[2] == "scenarios", fields[4] == "refused",
        fields[6] == "good", let round = Int(fields[1]), let scenarios = Int(fields[3]),
        let refused = Int(fields[5]), let good = Int(fields[7])
      else { return nil }
      return (round, scenarios, refused, good)
    }
  }

  /// Every virtio device (block, console, entropy, balloon, and with root a network interface
  /// on a TAP) attacked by a guest that points its rings and buffers everywhere but its RAM:
  /// outside RAM, at MMIO, across the ends of both RAM regions, into the PCI hole, at addresses
  /// that wrap, with lengths that wrap, descriptor loops, bad indirect tables, an available
  /// index far ahead, a head outside the table (Tests/GuestPrograms/cli/virtio-hostile.S),
  /// round after round, each scenario after a reset and with 16 notifications. Every scenario
  /// must end in DEVICE_NEEDS_RESET with nothing used, a good request must work after them, the
  /// guest's canary next to the hole must stay, and no byte may reach the disk from outside
  /// guest RAM (the buffers of the write requests point past RAM; sector 1 keeps the test's
  /// pattern). Meanwhile the VMM's memory, threads and log stay bounded, and it pauses,
  /// resumes and ends on SIGTERM at once. RAM is 3328 MiB, so that RAM lies on both sides of
  /// the hole (untouched RAM costs nothing).
  @Test(arguments: Self.accelerators)
  func virtioRingsAndBuffersPointingEverywhere(accelerator: String) throws {
    let kernel = try buildGuest("cli/virtio-hostile.S", in: scratch)
    let disk = scratch.path("disk-\(accelerator).img")
    var image = [UInt8](repeating: 0, count: 1 << 20)
    image.replaceSubrange(0..<8, with: Array("HVDISK00".utf8))
    image.replaceSubrange(512..<1024, with: [UInt8](repeating: 0xC3, count: 512))
    try Data(image).write(to: URL(fileURLWithPath: disk))
    let serial = scratch.path("serial-\(accelerator).txt")
    var arguments = [
      "--disk", disk, "--balloon", "on", "--console", "virtio", "--serial", "file:\(serial)",
    ]
    var devices: Set<String> = ["1042", "1043", "1044", "1045"]
    let namespace = getuid() == 0 ? try TapNamespace() : nil
    defer { namespace?.remove() }
    if let namespace {
      arguments += ["--net", "tap=\(namespace.tap)"]
      devices.insert("1041")
    }
    let vmm = try GuestVMM(
      kernel: kernel, accelerator: accelerator, collect: false, scratch: scratch, memory: "3328",
      arguments: arguments, launcher: namespace?.launcher ?? [])
    try #require(vmm.waitForAPI(), "the API socket did not appear: \(vmm.errors)")
    func text() -> String { (try? String(contentsOfFile: serial, encoding: .utf8)) ?? "" }
    func lastRound() -> Int { Self.rounds(text()).last?.round ?? 0 }
    func waitForRound(_ round: Int, seconds: Double) -> Bool {
      vmm.waitWhileRunning(seconds: seconds) { lastRound() >= round }
    }
    try #require(waitForRound(3, seconds: 120), "no third round: \(text().suffix(2000))\n\(vmm.errors.prefix(2000))")
    sleep(2)
    let residentBefore = try #require(vmm.status("VmRSS"))
    let threadsBefore = try #require(vmm.status("Threads"))
    let roundBefore = lastRound()
    sleep(5)
    try #require(waitForRound(roundBefore + 2, seconds: 60), "the guest stopped making rounds: \(text().suffix(2000))")
    let residentAfter = try #require(vmm.status("VmRSS"))
    #expect(
      residentAfter - residentBefore < 8 * 1024, "resident memory grew from \(residentBefore) to \(residentAfter) kB")
    #expect(vmm.status("Threads") == threadsBefore, "threads: \(threadsBefore), then \(vmm.status("Threads") ?? 0)")
    try pauseAndResume(vmm) {
      usleep(300_000)
      let paused = lastRound()
      sleep(1)
      #expect(lastRound() == paused, "the guest made rounds while paused")
    }
    let resumed = lastRound()
    #expect(waitForRound(resumed + 1, seconds: 60), "no round after resuming")
    // The log says what went wrong, but a guest breaking its devices in a loop must not
    // flood it: the first lines, then about one a minute.
    let errors = vmm.errors
    let logLines = errors.split(separator: "\n").filter { $0.hasPrefix("hostvisor: virtio: ") }
    #expect(logLines.count <= 24, "\(logLines.count) device messages on standard error: \(errors.prefix(1500))")
    #expect(logLines.count >= 1, "no device message on standard error")
    #expect(vmm.stop(timeout: 5), "the VMM did not end within 5 s of SIGTERM")

    let output = text()
    let found = Set(
      output.split(separator: "\n").filter { $0.hasPrefix("virtio ") }.compactMap {
        $0.split(separator: " ").dropFirst().first
      }
      .map(String.init))
    #expect(found == devices, "devices found: \(found)")
    let rounds = Self.rounds(output)
    #expect(rounds.count >= 5, "\(output.suffix(2000))")
    for round in rounds {
      #expect(
        round.scenarios == 36 * devices.count && round.refused == round.scenarios && round.good == devices.count,
        "round \(round.round): \(round.scenarios) scenarios, \(round.refused) refused, \(round.good) good")
    }
    #expect(!output.contains("FAIL"), "\(output.split(separator: "\n").filter { $0.contains("FAIL") }.prefix(20))")
    let after = try [UInt8](Data(contentsOf: URL(fileURLWithPath: disk)))
    #expect(
      after.count == image.count && Array(after[0..<1024]) == Array(image[0..<1024]), "the disk's first sectors changed"
    )
  }

  /// The virtio-hostile guest (every scenario makes a device complain on standard error) with
  /// the VMM's standard error on a pipe that is full before it starts and that the test does
  /// not read while it runs, as behind a supervisor that never drains it. Writing a device
  /// message to it would block the thread that found the problem (a vCPU, for a queue refused
  /// when the guest enables it, or a device worker) forever: instead the guest keeps making its
  /// rounds (its serial output is a file) for seconds after its first messages, the VMM pauses
  /// and resumes at once, and once the test reads the pipe the messages the VMM kept arrive
  /// whole.
  @Test func deviceMessagesBehindAStandardErrorNobodyReadsDoNotStallTheGuest() throws {
    let kernel = try buildGuest("cli/virtio-hostile.S", in: scratch)
    let disk = scratch.path("disk-stderr.img")
    var image = [UInt8](repeating: 0, count: 1 << 20)
    image.replaceSubrange(0..<8, with: Array("HVDISK00".utf8))
    try Data(image).write(to: URL(fileURLWithPath: disk))
    let serial = scratch.path("serial-stderr.txt")
    let errors = try FullPipe()
    defer { close(errors.read) }
    let vmm: GuestVMM
    do {
      defer { close(errors.write) }
      vmm = try GuestVMM(
        kernel: kernel, accelerator: "soft", collect: false, scratch: scratch, memory: "3328",
        arguments: ["--disk", disk, "--balloon", "on", "--console", "virtio", "--serial", "file:\(serial)"],
        standardError: errors.write)
    }
    try #require(vmm.waitForAPI(), "the API socket did not appear")
    func text() -> String { (try? String(contentsOfFile: serial, encoding: .utf8)) ?? "" }
    func lastRound() -> Int { Self.rounds(text()).last?.round ?? 0 }
    func waitForRound(_ round: Int, seconds: Double) -> Bool {
      vmm.waitWhileRunning(seconds: seconds) { lastRound() >= round }
    }
    // Every round breaks every device 36 times: from the first scenario on, the VMM has
    // messages for its standard error, and the pipe has no room for any of them.
    try #require(waitForRound(2, seconds: 120), "the guest stalled before its second round: \(text().suffix(2000))")
    var queued: Int32 = 0
    #expect(ioctl(errors.read, UInt(FIONREAD), &queued) == 0 && queued == 4096, "the pipe has room: \(queued) bytes")
    let roundBefore = lastRound()
    sleep(5)
    #expect(
      waitForRound(roundBefore + 2, seconds: 60),
      "the guest stopped making rounds behind a full standard error: \(text().suffix(2000))")
    try pauseAndResume(vmm)
    let resumed = lastRound()
    #expect(waitForRound(resumed + 1, seconds: 60), "no round after resuming")
    // Still nothing could be written: the messages waited in the VMM's buffer.
    #expect(ioctl(errors.read, UInt(FIONREAD), &queued) == 0 && queued == 4096, "the pipe has room: \(queued) bytes")

    // Read the pipe while the VMM runs: what it kept arrives, in whole lines.
    var received: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    let flags = fcntl(errors.read, F_GETFL)
    _ = fcntl(errors.read, F_SETFL, flags | O_NONBLOCK)
    let deadline = Date().addingTimeInterval(20)
    var lastData = Date()
    while Date() < deadline {
      let count = read(errors.read, &buffer, buffer.count)
      if count > 0 {
        received += buffer[0..<count]
        lastData = Date()
      } else {
        // Done once the messages have come and a second passed without more.
        if received.count > 4096 && Date().timeIntervalSince(lastData) > 1 { break }
        usleep(50_000)
      }
    }
    #expect(vmm.stop(timeout: 5), "the VMM did not end within 5 s of SIGTERM")
    try #require(received.count > 4096, "nothing came after the filler")
    #expect(received[0..<4096].allSatisfy { $0 == UInt8(ascii: "p") })
    let messages = String(decoding: received[4096...], as: UTF8.self)
    let lines = messages.split(separator: "\n")
    #expect(lines.first?.hasPrefix("hostvisor: virtio: device ") == true, "\(messages.prefix(1500))")
    #expect(lines.allSatisfy { $0.hasPrefix("hostvisor: ") }, "\(messages.prefix(1500))")
    // The rate limit still holds: the burst of 20, perhaps one more a minute later.
    let deviceLines = lines.filter { $0.hasPrefix("hostvisor: virtio: ") }
    #expect((1...24).contains(deviceLines.count), "\(deviceLines.count) device messages: \(messages.prefix(1500))")
  }

  /// An emulated NIC (e1000, RTL8139) reset in a tight loop while its rings are programmed and
  /// frames come and go (Tests/GuestPrograms/nic with RESET_LOOP: reset, rings set up, an ARP
  /// request sent, whose reply lands during the next resets): the VMM's memory and threads stay
  /// as they were, and when the test stops the loop (a byte on COM1, through the VMM's standard
  /// input) the device works: the guest's next ARP request is answered by the TAP. (The API,
  /// which the other tests pause through, does not take the emulated NICs yet.)
  @Test(
    .enabled(if: getuid() == 0, "needs root to make a network namespace and a TAP"),
    arguments: EmulatedNICGuestTests.models, Self.accelerators)
  func emulatedNICResetLoop(model: String, accelerator: String) throws {
    let kernel = try EmulatedNICGuestTests.guest(model: model, in: scratch, definitions: ".set RESET_LOOP, 1\n")
    let namespace = try TapNamespace()
    defer { namespace.remove() }
    let tapAddress = try namespace.tapAddress()
    let vmm = try GuestVMM(
      kernel: kernel, accelerator: accelerator, collect: true, scratch: scratch, memory: "32",
      arguments: ["--net", "tap=\(namespace.tap),model=\(model)"], launcher: namespace.launcher, input: true,
      api: false)
    func resets() -> Int {
      vmm.text.split(separator: "\n").last { $0.hasPrefix("resets ") }.flatMap { Int($0.dropFirst(7)) } ?? 0
    }
    func waitForResets(_ count: Int, seconds: Double) -> Bool {
      vmm.waitWhileRunning(seconds: seconds) { resets() >= count }
    }
    try #require(waitForResets(512, seconds: 120), "the reset loop did not run: \(vmm.text.suffix(2000)) \(vmm.errors)")
    let residentBefore = try #require(vmm.status("VmRSS"))
    let threadsBefore = try #require(vmm.status("Threads"))
    let before = resets()
    try #require(waitForResets(before + 1024, seconds: 120), "the reset loop stalled: \(vmm.text.suffix(2000))")
    let residentAfter = try #require(vmm.status("VmRSS"))
    #expect(
      residentAfter - residentBefore < 8 * 1024, "resident memory grew from \(residentBefore) to \(residentAfter) kB")
    #expect(vmm.status("Threads") == threadsBefore, "threads: \(threadsBefore), then \(vmm.status("Threads") ?? 0)")
    var stop: UInt8 = 0x71
    #expect(write(vmm.inputDescriptor, &stop, 1) == 1)
    // The VMM still answers its console: the byte ends the loop.
    let status = vmm.exitStatus(within: 60)
    let context = "serial:\n\(vmm.text.suffix(3000))\nstderr:\n\(vmm.errors.prefix(2000))"
    let expected: Int32 = (0x31 << 1) | 1
    #expect(status == expected, "exit status \(status.map(String.init) ?? "none")\n\(context)")
    let lines = vmm.text.split(separator: "\n").map(String.init)
    #expect(lines.contains { $0.hasPrefix("reset loop stopped after ") }, "\(context)")
    #expect(lines.contains("alive: arp reply 10.0.2.1 is-at \(tapAddress)"), "\(context)")
    #expect(lines.last == "nic guest done", "\(context)")
    #expect(!vmm.text.contains("FAIL"), "\(context)")
  }
}
