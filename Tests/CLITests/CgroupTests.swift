import Foundation
import TestSupport
import Testing

@testable import Sandbox

/// Where the tests find the host's cgroups: the cgroup2 mount whose root offers the cpu and
/// memory controllers, or else cgroup v1's cpu and memory hierarchies, if writable (the
/// hierarchy `--cgroup` picks).
enum TestCgroups {
  case unified(String)
  case legacy(cpu: String, memory: String, others: [String])

  /// The hierarchy `--cgroup` itself would use (`CgroupSlice.hierarchy()`), as the tests see it.
  static let host: TestCgroups? = {
    guard case .success(let hierarchy) = CgroupSlice.hierarchy() else { return nil }
    switch hierarchy {
    case .unified(let root): return .unified(root)
    case .legacy(let roots):
      guard let cpu = roots["cpu"], let memory = roots["memory"] else { return nil }
      return .legacy(cpu: cpu, memory: memory, others: [roots["pids"], roots["blkio"]].compactMap { $0 })
    }
  }()

  /// The group's directory that holds the CPU limits.
  func cpuGroup(_ name: String) -> String {
    switch self {
    case .unified(let root): return root + "/" + name
    case .legacy(let cpu, _, _): return cpu + "/" + name
    }
  }

  /// The group's memory OOM-kill count (v2 `memory.events`, v1 `memory.oom_control`).
  func oomKills(_ name: String) -> Int? {
    let file: String
    switch self {
    case .unified(let root): file = root + "/" + name + "/memory.events"
    case .legacy(_, let memory, _): file = memory + "/" + name + "/memory.oom_control"
    }
    let text = (try? String(contentsOfFile: file, encoding: .utf8)) ?? ""
    return text.split(separator: "\n").first { $0.hasPrefix("oom_kill ") }.flatMap { Int($0.dropFirst(9)) }
  }

  /// The group's count of periods in which its CPU quota throttled it.
  func throttledPeriods(_ name: String) -> Int? {
    let text = (try? String(contentsOfFile: cpuGroup(name) + "/cpu.stat", encoding: .utf8)) ?? ""
    return text.split(separator: "\n").first { $0.hasPrefix("nr_throttled ") }.flatMap { Int($0.dropFirst(13)) }
  }

  /// Removes a test group and its children from every hierarchy.
  func remove(_ name: String) {
    switch self {
    case .unified(let root):
      for child in ["vcpu", "io", ""] { rmdir("\(root)/\(name)/\(child)") }
    case .legacy(let cpu, let memory, let others):
      for child in ["vcpu", "io", ""] { rmdir("\(cpu)/\(name)/\(child)") }
      for root in [memory] + others { rmdir("\(root)/\(name)") }
    }
  }
}

/// `--cgroup` (docs/isolation.md) on the host's cgroups (v2, or v1 where that is what the host
/// has), with real guests: a busy loop held to its `cpu.max` share, two busy loops on one core
/// sharing it by `cpu.weight`, a guest filling its RAM contained by `memory.max`.
@Suite(
  "cgroup limits", .serialized,
  .enabled(if: TestCgroups.host != nil, "the host has no writable cgroup hierarchy with cpu and memory"),
  .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct CgroupTests {
  static var host: TestCgroups { TestCgroups.host! }

  /// A busy-loop guest on KVM (ring 0: the host kernel emulates it, so its vCPU thread is
  /// CPU-bound on the host), optionally pinned to host CPU 0.
  final class BusyGuest {
    let process: HostProcess

    init(_ extra: [String], pinned: Bool, scratch: ScratchDirectory) throws {
      let kernel = try buildGuest("cli/busy-loop.S", in: scratch)
      let arguments = ["run", "--kernel", kernel, "--accel", "kvm", "--serial", "none", "--no-sandbox"] + extra
      let hostvisor = HostvisorProcess.executable.path
      process =
        pinned
        ? try HostProcess("/usr/bin/taskset", ["-c", "0", hostvisor] + arguments) { _ in }
        : try HostProcess(hostvisor, arguments) { _ in }
    }

    /// The process's user + system CPU time in seconds (/proc/PID/stat, clock ticks).
    var cpuSeconds: Double { CgroupTests.processCPUSeconds(process.processIdentifier) }

    func stop() {
      process.signal(SIGKILL)
      process.waitUntilExit()
    }

    deinit { if process.isRunning { stop() } }
  }

  /// The CPU share (CPU seconds per wall second) each guest used over `seconds`, after a second
  /// of start-up.
  static func shares(_ guests: [BusyGuest], seconds: Double) -> [Double] {
    sleep(1)
    let before = guests.map(\.cpuSeconds)
    let start = Date()
    usleep(UInt32(seconds * 1_000_000))
    let wall = Date().timeIntervalSince(start)
    return zip(guests, before).map { ($0.cpuSeconds - $1) / wall }
  }

  @Test func cpuMaxHoldsABusyLoopToItsShare() throws {
    let scratch = try ScratchDirectory()
    let name = "hostvisor-test-\(getpid())-cpu"
    defer { Self.host.remove(name) }
    let free = try BusyGuest([], pinned: false, scratch: scratch)
    let freeShare = Self.shares([free], seconds: 4)[0]
    free.stop()
    let limited = try BusyGuest(["--cgroup", name, "--cpu-max", "20%"], pinned: false, scratch: scratch)
    let limitedShare = Self.shares([limited], seconds: 4)[0]
    let throttled = Self.host.throttledPeriods(name) ?? 0
    limited.stop()
    switch Self.host {
    case .unified:
      let quota = try String(contentsOfFile: Self.host.cpuGroup(name) + "/cpu.max", encoding: .utf8)
      #expect(quota.hasPrefix("20000 100000"), "\(quota)")
    case .legacy:
      let quota = try String(contentsOfFile: Self.host.cpuGroup(name) + "/cpu.cfs_quota_us", encoding: .utf8)
      let period = try String(contentsOfFile: Self.host.cpuGroup(name) + "/cpu.cfs_period_us", encoding: .utf8)
      #expect(quota.hasPrefix("20000") && period.hasPrefix("100000"), "\(quota) \(period)")
    }
    // The quota is an upper bound whatever the host's load; it bites (throttles) whenever the
    // unlimited loop used more than the quota.
    #expect(limitedShare > 0.02 && limitedShare < 0.27, "unlimited \(freeShare), at 20%: \(limitedShare)")
    if freeShare > 0.3 {
      #expect(throttled > 0, "never throttled (unlimited share \(freeShare), limited \(limitedShare))")
    }
  }

  /// `serve --cgroup NAME --cpu-max 20%`: the API process is in the group from the start, the
  /// busy-loop guest booted later through the Firecracker API is held to its share, and the
  /// vCPU thread that boot started placed itself in `NAME/vcpu`.
  @Test func serveKeepsTheVMItBootsInItsGroup() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/busy-loop.S", in: scratch)
    let name = "hostvisor-test-\(getpid())-serve"
    defer { Self.host.remove(name) }
    let api = try ServedAPI(in: scratch, ["--accel", "kvm", "--cgroup", name, "--cpu-max", "20%"])
    defer { api.stop() }
    let served = api.process
    let put = api.put
    #expect(try put("/boot-source", "{\"kernel_image_path\": \"\(kernel)\"}") == "204")
    #expect(try put("/actions", "{\"action_type\": \"InstanceStart\"}") == "204")
    let cgroupOfProcess = try String(contentsOfFile: "/proc/\(served.processIdentifier)/cgroup", encoding: .utf8)
    #expect(cgroupOfProcess.contains("/\(name)"), "\(cgroupOfProcess)")
    sleep(1)
    let threads =
      ["cgroup.threads", "tasks"].compactMap {
        try? String(contentsOfFile: Self.host.cpuGroup(name) + "/vcpu/" + $0, encoding: .utf8)
      }.first ?? ""
    #expect(!threads.split(separator: "\n").isEmpty, "no thread in \(name)/vcpu")
    let before = Self.processCPUSeconds(served.processIdentifier)
    let start = Date()
    sleep(4)
    let share = (Self.processCPUSeconds(served.processIdentifier) - before) / Date().timeIntervalSince(start)
    #expect(share > 0.02 && share < 0.27, "the served VM used \(share) CPUs at cpu.max 20%")
    #expect((Self.host.throttledPeriods(name) ?? 0) > 0, "the group was never throttled")
  }

  /// `serve --cgroup NAME --io-max ...`: a drive given through the Firecracker API gets the
  /// limits on its host device when the machine starts (cgroup v2's `io.max`, or v1's
  /// `blkio.throttle.*` files).
  @Test(.enabled(if: CgroupSlice.blockDevice(of: NSTemporaryDirectory())?.hasPrefix("0:") == false))
  func serveLimitsTheIOOfTheAPIsDrives() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/busy-loop.S", in: scratch)
    let disk = scratch.path("disk.img")
    #expect(FileManager.default.createFile(atPath: disk, contents: Data(count: 1 << 20)))
    let device = try #require(CgroupSlice.blockDevice(of: disk))
    let name = "hostvisor-test-\(getpid())-io"
    defer { Self.host.remove(name) }
    let api = try ServedAPI(in: scratch, ["--accel", "soft", "--cgroup", name, "--io-max", "rbps=1048576,wiops=100"])
    defer { api.stop() }
    let put = api.put
    #expect(try put("/boot-source", "{\"kernel_image_path\": \"\(kernel)\"}") == "204")
    let drive =
      "{\"drive_id\": \"data\", \"path_on_host\": \"\(disk)\", \"is_root_device\": false, \"is_read_only\": false}"
    #expect(try put("/drives/data", drive) == "204")
    #expect(try put("/actions", "{\"action_type\": \"InstanceStart\"}") == "204")
    let lines: [String]
    switch try #require(try? CgroupSlice.hierarchy().get()) {
    case .unified(let root):
      lines = [try String(contentsOfFile: root + "/" + name + "/io.max", encoding: .utf8)]
    case .legacy(let roots):
      let blkio = try #require(roots["blkio"], "no writable blkio hierarchy")
      lines = try ["read_bps_device", "write_iops_device"].map {
        try String(contentsOfFile: blkio + "/" + name + "/blkio.throttle." + $0, encoding: .utf8)
      }
    }
    let text = lines.joined(separator: "\n")
    #expect(text.contains("\(device) 1048576") || text.contains("\(device) rbps=1048576"), "\(text)")
    #expect(text.contains("\(device) 100") || text.contains("wiops=100"), "\(text)")
  }

  /// A drive whose host device takes no I/O limits (a file on tmpfs) is refused when the
  /// machine starts, with a message that names the image, instead of running unlimited.
  @Test(.enabled(if: CgroupSlice.blockDevice(of: "/dev/shm")?.hasPrefix("0:") == true))
  func serveRefusesADriveWhoseDeviceTakesNoIOLimits() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/busy-loop.S", in: scratch)
    let disk = "/dev/shm/hostvisor-test-\(getpid())-io.img"
    #expect(FileManager.default.createFile(atPath: disk, contents: Data(count: 1 << 20)))
    defer { try? FileManager.default.removeItem(atPath: disk) }
    let name = "hostvisor-test-\(getpid())-io-tmpfs"
    defer { Self.host.remove(name) }
    let api = try ServedAPI(in: scratch, ["--accel", "soft", "--cgroup", name, "--io-max", "rbps=1048576"])
    defer { api.stop() }
    #expect(try api.put("/boot-source", "{\"kernel_image_path\": \"\(kernel)\"}") == "204")
    let drive =
      "{\"drive_id\": \"data\", \"path_on_host\": \"\(disk)\", \"is_root_device\": false, \"is_read_only\": false}"
    #expect(try api.put("/drives/data", drive) == "204")
    let start = try api.request("/actions", "{\"action_type\": \"InstanceStart\"}")
    #expect(start.status == "400", "\(start)")
    #expect(start.body.contains("cannot limit the I/O of disk image"), "\(start.body)")
    #expect(start.body.contains(disk), "\(start.body)")
  }

  /// `hostvisor serve` on a socket in `scratch` with `arguments`, and PUT requests to it.
  struct ServedAPI {
    let process: HostProcess
    let socket: String

    /// Starts the server and waits (up to 30 s) for its socket.
    init(in scratch: ScratchDirectory, _ arguments: [String]) throws {
      socket = scratch.path("api.sock")
      process = try HostProcess(HostvisorProcess.executable.path, ["serve", "--api-sock", socket] + arguments) { _ in }
      let deadline = Date().addingTimeInterval(30)
      while !FileManager.default.fileExists(atPath: socket) && Date() < deadline { usleep(20_000) }
    }

    /// The HTTP status of PUT `path` with the JSON `body`.
    func put(_ path: String, _ body: String) throws -> String {
      try request(path, body).status
    }

    /// The HTTP status and the response's body of PUT `path` with the JSON `body`.
    func request(_ path: String, _ body: String) throws -> (status: String, body: String) {
      let text = try HostCommand.run(
        "curl",
        [
          "-s", "-w", "\n%{http_code}", "--max-time", "20", "--unix-socket", socket, "-X", "PUT",
          "-H", "Content-Type: application/json", "-d", body, "http://localhost\(path)",
        ]
      ).text
      let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
      return (String(lines.last ?? ""), lines.dropLast().joined(separator: "\n"))
    }

    func stop() {
      process.signal(SIGKILL)
      _ = process.waitUntilExit(timeout: 10)
    }
  }

  /// User plus system CPU seconds of process `pid` (/proc/PID/stat: utime and stime are fields
  /// 14 and 15, counted after the command name in parentheses).
  static func processCPUSeconds(_ pid: pid_t) -> Double {
    let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
    guard let close = stat.lastIndex(of: ")") else { return 0 }
    let fields = stat[stat.index(after: close)...].split(separator: " ")
    guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return 0 }
    return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
  }

  @Test func cpuWeightSharesACoreInItsRatio() throws {
    let scratch = try ScratchDirectory()
    let light = "hostvisor-test-\(getpid())-light"
    let heavy = "hostvisor-test-\(getpid())-heavy"
    defer {
      Self.host.remove(light)
      Self.host.remove(heavy)
    }
    let guests = [
      try BusyGuest(["--cgroup", light, "--cpu-weight", "100"], pinned: true, scratch: scratch),
      try BusyGuest(["--cgroup", heavy, "--cpu-weight", "300"], pinned: true, scratch: scratch),
    ]
    let used = Self.shares(guests, seconds: 5)
    for guest in guests { guest.stop() }
    #expect(used[0] > 0.02, "the light guest barely ran: \(used)")
    let ratio = used[1] / max(used[0], 0.001)
    #expect(ratio > 2 && ratio < 4.5, "weights 100 and 300 on one core used \(used)")
  }

  @Test func memoryMaxContainsAGuestFillingItsRAM() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/fill-ram.S", in: scratch)
    let name = "hostvisor-test-\(getpid())-memory"
    defer { Self.host.remove(name) }
    let base = ["run", "--kernel", kernel, "--accel", "kvm", "--memory", "256M", "--serial", "stdio", "--no-sandbox"]
    let free = try HostvisorProcess.run(base)
    #expect(free.status == (0x21 << 1) | 1 && free.stdout.contains("filled"), "\(free.stderr)")
    let limited = try HostvisorProcess.run(base + ["--cgroup", name, "--memory-max", "64M"])
    #expect(!limited.stdout.contains("filled"), "the guest filled 190 MiB under memory.max 64M")
    #expect(Self.host.oomKills(name) == 1)
  }
}

/// The cgroup v1 files that stand for limits given in cgroup v2's syntax (the kernel's
/// cgroup-v1 cpu/CFS bandwidth, memory and blkio throttling documents).
@Suite("cgroup v1 translation")
struct CgroupLegacyTranslationTests {
  @Test func everyLimitMapsToItsV1File() throws {
    var limits = CgroupLimits()
    limits.cpuMax = "20000 100000"
    limits.cpuWeight = "300"
    limits.memoryMax = "64M"
    limits.memoryHigh = "max"
    limits.pidsMax = "64"
    limits.ioMax = "rbps=1048576 wiops=max"
    let files = try CgroupSlice.legacyFiles(limits, diskDevices: ["8:16", "8:0", "8:0"])
    let expected: [(String, String)] = [
      ("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "20000"), ("cpu.shares", "3072"),
      ("memory.limit_in_bytes", "64M"), ("memory.soft_limit_in_bytes", "-1"), ("pids.max", "64"),
      ("blkio.throttle.read_bps_device", "8:0 1048576"), ("blkio.throttle.read_bps_device", "8:16 1048576"),
      ("blkio.throttle.write_iops_device", "8:0 0"), ("blkio.throttle.write_iops_device", "8:16 0"),
    ]
    #expect(files.map { "\($0.0)=\($0.1)" } == expected.map { "\($0.0)=\($0.1)" })
  }

  @Test func unlimitedQuotaSmallestWeightAndBadKeys() throws {
    var limits = CgroupLimits()
    limits.cpuMax = "max"
    limits.cpuWeight = "1"
    let files = try CgroupSlice.legacyFiles(limits, diskDevices: [])
    #expect(files.map { "\($0.0)=\($0.1)" } == ["cpu.cfs_quota_us=-1", "cpu.shares=10"])
    limits = CgroupLimits()
    limits.ioMax = "bogus=1"
    #expect(throws: CgroupError.self) { try CgroupSlice.legacyFiles(limits, diskDevices: ["8:0"]) }
  }
}
