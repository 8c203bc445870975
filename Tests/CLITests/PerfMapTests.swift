import Foundation
import TestSupport
import Testing

/// `HOSTVISOR_PERF_MAP` (docs/softcpu-performance.md, "How to profile"): `hostvisor run` on the
/// software CPU writes `/tmp/perf-PID.map`, one line per translated block naming the guest RIP
/// of its first instruction, which `perf report` reads for samples in generated code.
@Suite("perf map of translated code")
struct PerfMapTests {
  /// bench.S's checksum program (64-bit code linked at 1 MiB, its loop translated once hot)
  /// run with the variable set: the new map's lines parse, their code ranges do not overlap,
  /// and some block starts inside the program's own code.
  @Test func mapNamesTranslatedBlocksByGuestRIP() throws {
    let scratch = try ScratchDirectory()
    let source = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
      .appendingPathComponent("GuestPrograms/bench/bench.S").path
    let object = scratch.path("checksum.o")
    let elf = scratch.path("checksum.elf")
    let image = scratch.path("checksum.bin")
    for (tool, arguments) in [
      ("as", ["--64", "--defsym", "PROGRAM=1", "--defsym", "REPEAT=1", "-o", object, source]),
      ("ld", ["-m", "elf_x86_64", "-Ttext=0x100000", "-e", "0x100000", "-o", elf, object]),
      ("objcopy", ["-O", "binary", elf, image]),
    ] {
      let step = try HostCommand.run(tool, arguments)
      try #require(step.status == 0, "\(tool) failed: \(step.errorText)")
    }

    let maps = {
      Set((try? FileManager.default.contentsOfDirectory(atPath: "/tmp")) ?? []).filter {
        $0.hasPrefix("perf-") && $0.hasSuffix(".map")
      }
    }
    let before = maps()
    var environment = ProcessInfo.processInfo.environment
    environment["HOSTVISOR_PERF_MAP"] = "1"
    let run = try HostCommand.run(
      HostvisorProcess.executable.path,
      ["run", "--accel", "soft", "--softcpu-tier", "jit", "--memory", "128M", "--serial", "stdio", "--kernel", image],
      environment: environment, timeout: 300)
    // The program leaves through isa-debug-exit with 0: status (0 << 1) | 1.
    #expect(run.status == 1, "stderr: \(run.errorText)")
    #expect(run.text.contains("result="), "output: \(run.text)")

    let created = maps().subtracting(before)
    try #require(created.count == 1, "new perf maps: \(created.sorted())")
    let path = "/tmp/" + created.first!
    defer { try? FileManager.default.removeItem(atPath: path) }
    let lines = try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n")
    try #require(!lines.isEmpty, "the map is empty")
    var ranges: [(start: UInt64, end: UInt64)] = []
    var programBlocks = 0
    for line in lines {
      let fields = line.split(separator: " ")
      try #require(fields.count == 3 && fields[2].hasPrefix("guest_"), "malformed line: \(line)")
      let start = try #require(UInt64(fields[0], radix: 16), "start: \(line)")
      let size = try #require(UInt64(fields[1], radix: 16), "size: \(line)")
      let rip = try #require(UInt64(fields[2].dropFirst("guest_".count), radix: 16), "RIP: \(line)")
      #expect(size > 0)
      ranges.append((start, start + size))
      if rip >= 0x10_0000 && rip < 0x10_0000 + 0x1_0000 { programBlocks += 1 }
    }
    #expect(programBlocks > 0, "no translated block starts in the program: \(lines.prefix(5))")
    let sorted = ranges.sorted { $0.start < $1.start }
    for (earlier, later) in zip(sorted, sorted.dropFirst()) {
      #expect(earlier.end <= later.start, "translations overlap: \(earlier) and \(later)")
    }
  }
}
