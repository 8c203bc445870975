import Foundation
import Testing

/// The cgroup2 mount point whose root offers the cpu and memory controllers, if writable.
let cgroupV2Hierarchy: String? = {
  let mounts = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
  for line in mounts.split(separator: "\n") {
    let fields = line.split(separator: " ")
    guard let dash = fields.firstIndex(of: "-"), dash + 1 < fields.count, fields[dash + 1] == "cgroup2" else {
      continue
    }
    let root = String(fields[4])
    let controllers = (try? String(contentsOfFile: root + "/cgroup.controllers", encoding: .utf8)) ?? ""
    if controllers.contains("cpu"), controllers.contains("memory"), access(root + "/cgroup.procs", W_OK) == 0 {
      return root
    }
  }
  return nil
}()

/// `--cgroup` (docs/isolation.md) on the host's cgroup v2 hierarchy, with real guests: a busy
/// loop slowed to the `cpu.max` share, a guest filling its RAM contained by `memory.max`.
@Suite(
  "cgroup v2 limits", .serialized,
  .enabled(if: cgroupV2Hierarchy != nil, "the host has no writable cgroup v2 hierarchy with cpu and memory"),
  .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct CgroupTests {
  static var hierarchy: String? { cgroupV2Hierarchy }

  /// Removes a test group and its children.
  static func remove(_ name: String) {
    guard let root = hierarchy else { return }
    for child in ["vcpu", "io", ""] { rmdir("\(root)/\(name)/\(child)") }
  }

  /// Ticks the busy-loop guest prints in `seconds`, with `extra` arguments.
  static func ticks(_ extra: [String], seconds: UInt32, scratch: ScratchDirectory) throws -> Int {
    let kernel = try buildGuest("cli/busy-loop.S", in: scratch)
    let output = scratch.path("ticks-\(UUID().uuidString).log")
    let process = Process()
    process.executableURL = HostvisorProcess.executable
    process.arguments = ["run", "--kernel", kernel, "--accel", "kvm", "--serial", "file:\(output)"] + extra
    process.standardInput = FileHandle.nullDevice
    process.standardOutput = FileHandle.nullDevice
    process.standardError = FileHandle.nullDevice
    try process.run()
    // Count from the first line on, so start-up time does not count.
    for _ in 0..<200 {
      if ((try? String(contentsOfFile: output, encoding: .utf8)) ?? "").contains("running") { break }
      usleep(50_000)
    }
    let before = ((try? String(contentsOfFile: output, encoding: .utf8)) ?? "").components(separatedBy: "tick").count
    sleep(seconds)
    let after = ((try? String(contentsOfFile: output, encoding: .utf8)) ?? "").components(separatedBy: "tick").count
    kill(process.processIdentifier, SIGKILL)
    process.waitUntilExit()
    return after - before
  }

  @Test func cpuMaxSlowsABusyLoopToItsShare() throws {
    let scratch = try ScratchDirectory()
    let name = "hostvisor-test-\(getpid())-cpu"
    defer { Self.remove(name) }
    let free = try Self.ticks([], seconds: 5, scratch: scratch)
    let limited = try Self.ticks(["--cgroup", name, "--cpu-max", "20%"], seconds: 5, scratch: scratch)
    let quota = try String(contentsOfFile: "\(Self.hierarchy!)/\(name)/cpu.max", encoding: .utf8)
    #expect(quota.hasPrefix("20000 100000"), "\(quota)")
    #expect(free > 20, "too few ticks to compare: \(free)")
    let ratio = Double(limited) / Double(max(free, 1))
    #expect(ratio > 0.1 && ratio < 0.35, "unlimited \(free) ticks, at 20%: \(limited)")
  }

  @Test func memoryMaxContainsAGuestFillingItsRAM() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/fill-ram.S", in: scratch)
    let name = "hostvisor-test-\(getpid())-memory"
    defer { Self.remove(name) }
    let base = ["run", "--kernel", kernel, "--accel", "kvm", "--memory", "256M", "--serial", "stdio", "--no-sandbox"]
    let free = try HostvisorProcess.run(base)
    #expect(free.status == (0x21 << 1) | 1 && free.stdout.contains("filled"), "\(free.stderr)")
    let limited = try HostvisorProcess.run(base + ["--cgroup", name, "--memory-max", "64M"])
    #expect(!limited.stdout.contains("filled"), "the guest filled 190 MiB under memory.max 64M")
    let events = try String(contentsOfFile: "\(Self.hierarchy!)/\(name)/memory.events", encoding: .utf8)
    #expect(events.contains("oom_kill 1"), "\(events)")
  }
}
