import Foundation
import Testing

/// Debian's kernels (cloud and generic amd64, and the 32-bit 686 kernel with an i386 busybox,
/// entered through the 32-bit boot protocol) boot to a busybox shell on the software CPU, a
/// scripted session runs, and `poweroff -f` ends the VMM with status 0.
///
/// The 686 kernel's boot exercises the translator on 32-bit code (flat protected mode, the
/// kernel's FS-based per-CPU accesses, i386 user space).
@Suite("Linux boots on the software CPU", .serialized)
struct LinuxBootTests {
  @Test(arguments: ["guest-686", "guest", "guest-generic"])
  func debianKernelBootsToAShellAndPowersOff(folder: String) async throws {
    let (kernel, initrd, version) = try GuestImages.images(folder)

    let session = try GuestSession(arguments: [
      "run", "--accel", "soft", "--memory", "512M", "--serial", "stdio", "--kernel", kernel, "--initrd", initrd,
      "--cmdline", "console=ttyS0 panic=-1",
    ])
    defer { session.saveTranscript(name: "linux-boot-\(folder)") }
    try await session.waitForShell()

    #expect(try await session.run("uname -r") == version)
    #expect(try await session.run("uname -m") == (folder == "guest-686" ? "i686" : "x86_64"))

    let cpuinfo = try await session.run("cat /proc/cpuinfo")
    #expect(cpuinfo.contains("processor\t: 0"))
    #expect(cpuinfo.contains(" sse2"))

    let phrase = "hostvisor runs guests \(UInt32.random(in: 0...UInt32.max))"
    let expectedDigest = try host("/usr/bin/sha256sum", [], input: phrase).split(separator: " ").first.map(String.init)
    let guestDigest = try await session.run("echo -n '\(phrase)' | sha256sum").split(separator: " ").first.map(
      String.init)
    #expect(guestDigest != nil && guestDigest == expectedDigest)

    let n = Int.random(in: 500...2000)
    let expectedSum = (1...n).reduce(0) { $0 + $1 * $1 }
    let awkSum = try await session.run("awk 'BEGIN { s = 0; for (i = 1; i <= \(n); i++) s += i * i; print s }'")
    #expect(awkSum == "\(expectedSum)")

    let mounts = try await session.run(
      "mkdir -p /mnt/p /mnt/s && mount -t proc proc /mnt/p && mount -t sysfs sys /mnt/s && cat /mnt/p/sys/kernel/osrelease && ls /mnt/s"
    )
    #expect(mounts.contains(version))
    #expect(mounts.contains("kernel") && mounts.contains("devices"))

    try await Task.sleep(for: .seconds(1))
    session.type("poweroff -f\n")
    #expect(try await session.waitForExit(timeout: .seconds(120)) == 0)
  }
}

/// The software CPU's translating tier boots the default guest and runs real work; in lockstep
/// mode every translated block of the boot is checked against the interpreter (a difference
/// stops the machine, so the shell never comes). The lockstep boot takes about seven minutes of
/// one core, the longest test by far: it runs when `HOSTVISOR_LOCKSTEP_BOOT=1` is set
/// (docs/softcpu-testing.md); the differential and fuzz tests run every form in lockstep in
/// every run.
@Suite("Linux boots with the software CPU's translator", .serialized)
struct LinuxTranslatorBootTests {
  static let tiers =
    ProcessInfo.processInfo.environment["HOSTVISOR_LOCKSTEP_BOOT"] == "1" ? ["jit", "lockstep"] : ["jit"]

  @Test(arguments: tiers)
  func defaultGuestBootsWithTheTranslator(tier: String) async throws {
    let (kernel, initrd, version) = try GuestImages.images()
    let session = try GuestSession(arguments: [
      "run", "--accel", "soft", "--softcpu-tier", tier, "--memory", "512M", "--serial", "stdio", "--kernel", kernel,
      "--initrd", initrd, "--cmdline", "console=ttyS0 panic=-1",
    ])
    defer { session.saveTranscript(name: "linux-boot-\(tier)") }
    try await session.waitForShell(timeout: .seconds(tier == "lockstep" ? 600 : 300))
    #expect(try await session.run("uname -r") == version)
    let phrase = "translated \(UInt32.random(in: 0...UInt32.max))"
    let expectedDigest = try host("/usr/bin/sha256sum", [], input: phrase).split(separator: " ").first.map(String.init)
    let guestDigest = try await session.run("echo -n '\(phrase)' | sha256sum").split(separator: " ").first.map(
      String.init)
    #expect(guestDigest != nil && guestDigest == expectedDigest)
    let n = Int.random(in: 500...2000)
    let expectedSum = (1...n).reduce(0) { $0 + $1 * $1 }
    let awkSum = try await session.run("awk 'BEGIN { s = 0; for (i = 1; i <= \(n); i++) s += i * i; print s }'")
    #expect(awkSum == "\(expectedSum)")
    try await Task.sleep(for: .seconds(1))
    session.type("poweroff -f\n")
    #expect(try await session.waitForExit(timeout: .seconds(120)) == 0)
  }
}

/// SMP on the software CPU: two vCPUs come up, and work runs on both at once.
@Suite("Linux SMP on the software CPU")
struct LinuxSMPTests {
  @Test func twoVCPUsBootAndRunParallelWork() async throws {
    let (kernel, initrd, _) = try GuestImages.images()
    let session = try GuestSession(arguments: [
      "run", "--accel", "soft", "--cpus", "2", "--memory", "512M", "--serial", "stdio", "--kernel", kernel,
      "--initrd", initrd, "--cmdline", "console=ttyS0 panic=-1 loglevel=4",
    ])
    defer { session.saveTranscript(name: "linux-smp") }
    try await session.waitForShell()
    #expect(try await session.run("nproc") == "2")
    #expect(try await session.run("grep -c ^processor /proc/cpuinfo") == "2")
    // CPUID describes one package of two single-thread cores (CPUTopology: leaf 1, leaf 0BH and
    // 8000_0008 ECX, which Linux's AMD code reads), as the MADT lists them.
    #expect(try await session.run("grep '^physical id' /proc/cpuinfo | sort -u | wc -l") == "1")
    #expect(try await session.run("grep '^cpu cores' /proc/cpuinfo | sort -u | tr -d ' \\t'") == "cpucores:2")
    #expect(try await session.run("grep '^core id' /proc/cpuinfo | sort -u | wc -l") == "2")
    // The invariant TSC (CPUID 8000_0007 EDX[8]) gives both vCPUs constant_tsc/nonstop_tsc, so
    // the kernel keeps the TSC instead of marking it unstable as unsynchronized at boot.
    #expect(try await session.run("grep -c 'constant_tsc.*nonstop_tsc' /proc/cpuinfo") == "2")
    // Under a loaded host the kernel can still find the vCPUs' TSCs apart at boot (docs/TODO.md).
    let unstable = try await session.run("dmesg | grep 'Marking TSC unstable'; true")
    withKnownIssue("a loaded host can still make the boot-time TSC sync check fail", isIntermittent: true) {
      #expect(unstable.isEmpty, "\(unstable)")
    }
    // Two CPU-bound jobs pinned one per vCPU; each prints its sum.
    let n = Int.random(in: 20_000...40_000)
    let expected = (1...n).reduce(0) { $0 + ($1 % 7) * $1 }
    let job = "awk 'BEGIN { s = 0; for (i = 1; i <= \(n); i++) s += (i % 7) * i; print s }'"
    let output = try await session.run(
      "taskset 1 \(job) > /tmp/a & taskset 2 \(job) > /tmp/b & wait; cat /tmp/a /tmp/b",
      timeout: .seconds(240))
    let sums = output.split(separator: "\n").prefix(2).map(String.init)
    #expect(sums == ["\(expected)", "\(expected)"])
    try await Task.sleep(for: .seconds(1))
    session.type("poweroff -f\n")
    #expect(try await session.waitForExit(timeout: .seconds(120)) == 0)
  }
}

/// x86-64-v3 on the software CPU: the default guest, with the host's dynamic loader and C
/// library and a program the test compiles with `gcc -march=x86-64-v3 -O2 -static` added in a
/// second cpio archive appended to its initramfs (Linux unpacks concatenated archives). The
/// guest's glibc finds the v3 level usable (CPUID, XCR0 with the AVX state enabled by the
/// kernel) and the program gives the host's answers.
@Suite("x86-64-v3 in a Linux guest on the software CPU")
struct LinuxX86_64V3Tests {
  /// The program's source, Tests/GuestPrograms/linux/x86-64-v3-check.c.
  static let source = GuestImages.packageRoot.appendingPathComponent(
    "Tests/GuestPrograms/linux/x86-64-v3-check.c")

  /// The output lines of a console command or a host run, trimmed and without empty lines.
  static func lines(_ text: String) -> [String] {
    text.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
  }

  /// The software CPU does not speculate and says so in CPUID (docs/cpu-model.md): the guest
  /// kernel reports no speculative-execution bug that would make it put return thunks, entry
  /// untraining or division clearing in its hot paths.
  @Test func guestKernelSeesNoSpeculationBugs() async throws {
    let (kernel, initrd, _) = try GuestImages.images()
    let session = try GuestSession(arguments: [
      "run", "--accel", "soft", "--memory", "256M", "--serial", "stdio", "--kernel", kernel, "--initrd", initrd,
      "--cmdline", "console=ttyS0 panic=-1",
    ])
    defer { session.saveTranscript(name: "linux-speculation-bugs") }
    try await session.waitForShell()
    for issue in ["retbleed", "spec_rstack_overflow", "spec_store_bypass", "tsa"] {
      let state = try await session.run("cat /sys/devices/system/cpu/vulnerabilities/\(issue)")
      #expect(state.contains("Not affected"), "\(issue): \(state)")
    }
    let bugs = Set(try await session.run("grep -m1 ^bugs /proc/cpuinfo").split(separator: " ").map(String.init))
    for bug in ["retbleed", "srso", "div0", "smt_rsb", "spec_store_bypass"] {
      #expect(!bugs.contains(bug), "/proc/cpuinfo lists the bug \(bug)")
    }
    session.type("poweroff -f\n")
    #expect(try await session.waitForExit(timeout: .seconds(120)) == 0)
  }

  @Test func loaderFindsTheV3LevelAndAV3ProgramGivesTheHostsAnswers() async throws {
    let work = URL(fileURLWithPath: NSTemporaryDirectory()).appendingPathComponent("hostvisor-v3-\(UUID())")
    let stage = work.appendingPathComponent("stage")
    try FileManager.default.createDirectory(at: stage, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: work) }

    let program = stage.appendingPathComponent("bin/x86-64-v3-check")
    try FileManager.default.createDirectory(
      at: program.deletingLastPathComponent(), withIntermediateDirectories: true)
    let compile = try hostCommand(
      "gcc", ["-march=x86-64-v3", "-O2", "-static", "-o", program.path, Self.source.path])
    try #require(compile.status == 0, "gcc failed to build \(Self.source.path)")
    let hostRun = try hostCommand(program.path, [])
    try #require(hostRun.status == 0)
    let expected = Self.lines(hostRun.output)
    try #require(expected.first == "avx2 1 fma 1 f16c 1 bmi2 1", "the host CPU must have x86-64-v3")

    // The host's loader and C library at the paths the loader itself expects.
    for (hostPath, guestPath) in [
      ("/lib64/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2"),
      ("/lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/libc.so.6"),
    ] {
      let destination = stage.appendingPathComponent(guestPath)
      try FileManager.default.createDirectory(
        at: destination.deletingLastPathComponent(), withIntermediateDirectories: true)
      let resolved = URL(fileURLWithPath: hostPath).resolvingSymlinksInPath()
      try FileManager.default.copyItem(at: resolved, to: destination)
    }
    let archive = try hostCommandData(
      "/bin/sh", ["-c", "cd '\(stage.path)' && find . -mindepth 1 | cpio -o -H newc -R 0:0 --quiet"])
    try #require(archive.status == 0 && !archive.output.isEmpty, "cpio failed")

    // The default initramfs, padded to a 4-byte boundary (where Linux looks for the next
    // archive's header), then the extra archive.
    let (kernel, initrd, _) = try GuestImages.images()
    var combined = try Data(contentsOf: URL(fileURLWithPath: initrd))
    combined.append(Data(count: (4 - combined.count % 4) % 4))
    combined.append(archive.output)
    let combinedInitrd = work.appendingPathComponent("initramfs-v3.cpio")
    try combined.write(to: combinedInitrd)

    let session = try GuestSession(arguments: [
      "run", "--accel", "soft", "--memory", "512M", "--serial", "stdio", "--kernel", kernel, "--initrd",
      combinedInitrd.path, "--cmdline", "console=ttyS0 panic=-1",
    ])
    defer { session.saveTranscript(name: "linux-x86-64-v3") }
    try await session.waitForShell()

    let flags = Set(try await session.run("grep -m1 ^flags /proc/cpuinfo").split(separator: " ").map(String.init))
    for flag in ["avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe", "xsave"] {
      #expect(flags.contains(flag), "/proc/cpuinfo lacks \(flag)")
    }
    let loaderHelp = try await session.run("/lib64/ld-linux-x86-64.so.2 --help")
    #expect(loaderHelp.contains("x86-64-v3 (supported, searched)"), "\(loaderHelp)")
    #expect(loaderHelp.contains("x86-64-v2 (supported, searched)"), "\(loaderHelp)")
    let guestOutput = Self.lines(try await session.run("/bin/x86-64-v3-check", timeout: .seconds(180)))
    #expect(guestOutput == expected)

    try await Task.sleep(for: .seconds(1))
    session.type("poweroff -f\n")
    #expect(try await session.waitForExit(timeout: .seconds(120)) == 0)
  }
}
