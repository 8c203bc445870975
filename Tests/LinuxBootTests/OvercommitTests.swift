import Foundation
import Testing

/// Guest RAM is reserved, not committed (MAP_NORESERVE, backed on first touch): four Debian
/// guests whose configured RAM together exceeds the host's boot to their shells at once on the
/// software CPU, and each VMM's resident guest RAM stays near what its guest touched.
@Suite("memory overcommit")
struct OvercommitTests {
  /// A `/proc/meminfo`-style field (`MemTotal:` ...) in KiB.
  static func field(_ name: String, in text: String) -> Int? {
    for line in text.split(whereSeparator: \.isNewline) where line.hasPrefix(name + ":") {
      return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "")
    }
    return nil
  }

  /// The resident KiB of `pid`'s guest RAM: its mappings of at least `minimumKiB` (the RAM
  /// regions; nothing else in a VMM is that large).
  static func residentGuestRAMKiB(_ pid: Int32, minimumKiB: Int) -> Int {
    // cat, not Foundation: Foundation stops after the first read of a /proc file (size 0).
    let text = (try? host("/bin/cat", ["/proc/\(pid)/smaps"])) ?? ""
    var size = 0
    var resident = 0
    for line in text.split(separator: "\n") {
      let fields = line.split(separator: " ", omittingEmptySubsequences: true)
      if fields.first == "Size:" { size = Int(fields[1]) ?? 0 }
      if fields.first == "Rss:", size >= minimumKiB { resident += Int(fields[1]) ?? 0 }
    }
    return resident
  }

  @Test func fourGuestsLargerThanTheHostTogetherBootAndStayNearWhatTheyTouched() async throws {
    let (kernel, initrd, _) = try GuestImages.images()
    let hostMeminfo = try String(contentsOfFile: "/proc/meminfo", encoding: .utf8)
    let hostTotalKiB = try #require(Self.field("MemTotal", in: hostMeminfo))
    // Each guest a third of the host (below the per-guest limit of the host's RAM), four of them.
    let guestMiB = hostTotalKiB / 1024 / 3 / 2 * 2
    #expect(4 * guestMiB * 1024 > hostTotalKiB)
    let sessions = try (0..<4).map { _ in
      try GuestSession(arguments: [
        "run", "--accel", "soft", "--memory", "\(guestMiB)M", "--serial", "stdio", "--no-sandbox", "--kernel", kernel,
        "--initrd", initrd, "--cmdline", "console=ttyS0 panic=-1 quiet",
      ])
    }
    defer {
      for (index, session) in sessions.enumerated() {
        session.saveTranscript(name: "overcommit-\(index)")
        session.kill()
      }
    }
    for session in sessions { try await session.waitForShell(timeout: .seconds(900)) }
    for (index, session) in sessions.enumerated() {
      // Every guest sees all of its RAM and touches 64 MiB of it (a tmpfs file).
      let meminfo = try await session.run("cat /proc/meminfo")
      let guestTotalKiB = Self.field("MemTotal", in: meminfo) ?? 0
      #expect(guestTotalKiB > (guestMiB - 256) * 1024, "guest \(index): MemTotal \(guestTotalKiB) KiB")
      // 64 MiB from the guest's ChaCha20 on the software CPU, four guests at once on a loaded
      // host: minutes, not the default two.
      let written = try await session.run(
        "dd if=/dev/urandom of=/tmp/touched bs=1M count=64 2>/dev/null; wc -c < /tmp/touched", timeout: .seconds(600))
      #expect(written == "\(64 << 20)", "guest \(index): \(written)")
      let after = try await session.run("cat /proc/meminfo")
      // Everything that is not free in the guest: the kernel's own reservations (its image, the
      // page structures of all its RAM) and what it allocated.
      let notFreeKiB = guestMiB * 1024 - (Self.field("MemFree", in: after) ?? 0)
      let residentKiB = Self.residentGuestRAMKiB(session.process.processIdentifier, minimumKiB: 512 << 10)
      // Resident guest RAM: at least the 64 MiB just written, at most what is not free in the
      // guest plus what its boot touched and freed again (the kernel's decompression area, the
      // initramfs, init memory), and far below the configured size.
      #expect(residentKiB >= 64 << 10, "guest \(index): \(residentKiB) KiB resident")
      #expect(
        residentKiB <= notFreeKiB + (64 << 10),
        "guest \(index): \(residentKiB) KiB resident, \(notFreeKiB) KiB not free in the guest")
      #expect(residentKiB < guestMiB * 1024 / 8, "guest \(index): \(residentKiB) KiB of \(guestMiB) MiB resident")
    }
  }
}
