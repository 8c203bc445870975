import Foundation
import TestSupport
import Testing

/// `--memory SIZE,merge=on,hugepages=on`: the guest RAM mapping carries the madvise flags the
/// host's KSM and transparent huge pages act on, seen from outside in /proc/PID/smaps.
@Suite("guest memory advice (KSM, transparent huge pages)")
struct MemoryAdviceTests {
  /// One mapping of /proc/PID/smaps: its size, its VmFlags and its AnonHugePages in KiB.
  struct Mapping {
    var sizeKiB = 0
    var flags: Set<Substring> = []
    var anonHugeKiB = 0
  }

  /// A /proc file read to its end (Foundation's file reading stops after the first read of
  /// these, whose size is 0).
  static func procFile(_ path: String) -> String {
    let descriptor = open(path, O_RDONLY)
    guard descriptor >= 0 else { return "" }
    defer { close(descriptor) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
      let count = buffer.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
      if count <= 0 { break }
      bytes += buffer[0..<count]
    }
    return String(decoding: bytes, as: UTF8.self)
  }

  /// The mappings of `pid` whose size is `sizeKiB` (the guest RAM of a machine below 3 GiB).
  static func mappings(of pid: Int32, sizeKiB: Int) -> [Mapping] {
    let text = procFile("/proc/\(pid)/smaps")
    var result: [Mapping] = []
    var current = Mapping()
    for line in text.split(separator: "\n") {
      let fields = line.split(separator: " ", omittingEmptySubsequences: true)
      guard let key = fields.first else { continue }
      switch key {
      case "Size:": current = Mapping(sizeKiB: Int(fields[1]) ?? 0)
      case "AnonHugePages:": current.anonHugeKiB = Int(fields[1]) ?? 0
      case "VmFlags:":
        current.flags = Set(fields.dropFirst())
        if current.sizeKiB == sizeKiB { result.append(current) }
      default: break
      }
    }
    return result
  }

  /// Runs the fill-and-idle guest in 64 MiB with `memory` options until it filled 46 MiB, then
  /// returns its guest RAM mapping.
  func guestRAMMapping(_ memory: String) throws -> Mapping {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/fill-and-idle.S", in: scratch)
    let log = scratch.path("serial.log")
    let process = try HostProcess(
      HostvisorProcess.executable.path,
      ["run", "--kernel", kernel, "--accel", "soft", "--memory", memory, "--serial", "file:\(log)", "--no-sandbox"]
    ) { _ in }
    defer {
      process.signal(SIGKILL)
      process.waitUntilExit()
    }
    let deadline = Date().addingTimeInterval(60)
    while !((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("filled") {
      try #require(Date() < deadline && process.isRunning, "the guest did not fill its memory")
      usleep(50_000)
    }
    let found = Self.mappings(of: process.processIdentifier, sizeKiB: 64 << 10)
    try #require(found.count == 1, "guest RAM mappings of 64 MiB: \(found.count)")
    return found[0]
  }

  @Test func mergeAndHugePagesAreAdvisedOnGuestRAM() throws {
    let advised = try guestRAMMapping("64M,merge=on,hugepages=on")
    #expect(advised.flags.contains("mg"), "VmFlags \(advised.flags.sorted())")
    #expect(advised.flags.contains("hg"), "VmFlags \(advised.flags.sorted())")
    let plain = try guestRAMMapping("64M")
    #expect(!plain.flags.contains("mg") && !plain.flags.contains("hg"), "VmFlags \(plain.flags.sorted())")
    // With the host's THP policy at `madvise`, only the advised RAM gets huge pages when the
    // guest touches whole 2 MiB ranges (it filled 2 MiB to 48 MiB).
    let policy = (try? String(contentsOfFile: "/sys/kernel/mm/transparent_hugepage/enabled", encoding: .utf8)) ?? ""
    if policy.contains("[madvise]") {
      #expect(advised.anonHugeKiB >= 2048, "AnonHugePages \(advised.anonHugeKiB) KiB with hugepages=on")
      #expect(plain.anonHugeKiB == 0, "AnonHugePages \(plain.anonHugeKiB) KiB without hugepages=on")
    }
    let offAgain = try guestRAMMapping("64M,merge=off,hugepages=off")
    #expect(!offAgain.flags.contains("mg") && !offAgain.flags.contains("hg"), "VmFlags \(offAgain.flags.sorted())")
  }

  @Test(arguments: ["64M,merge=yes", "64M,hugepages", "64M,ksm=on", "64M,", "lots,merge=on"])
  func badMemoryOptionsAreOneLineErrors(memory: String) throws {
    let result = try HostvisorProcess.run(["run", "--kernel", "/bin/true", "--memory", memory, "--serial", "none"])
    #expect(result.status == 1)
    let lines = result.stderr.split(separator: "\n", omittingEmptySubsequences: true)
    #expect(lines.count == 1 && result.stderr.hasPrefix("hostvisor: error: "), "stderr: \(result.stderr)")
    #expect(result.stderr.contains(memory.hasPrefix("lots") ? "invalid memory size" : "invalid memory option"))
  }
}
