import Foundation
import Testing

/// The virtio-balloon on the default Debian guest (its own virtio_balloon module), driven through
/// Firecracker's balloon resources: memory the guest touched and freed goes back to the host by
/// free page reporting, the target set with `PATCH /balloon` is followed by the guest's
/// `actual` and takes that memory from the guest, and statistics read back. With
/// `deflate_on_oom`, an allocation beyond what an inflated balloon leaves deflates it instead of
/// invoking the OOM killer; without it, the same allocation is OOM-killed.
@Suite("virtio-balloon on a Debian guest")
struct BalloonGuestTests {
  /// The server's resident set in MiB.
  func residentMiB(_ process: HostvisorProcess) -> Int {
    let status =
      (try? String(contentsOfFile: "/proc/\(process.process.processIdentifier)/status", encoding: .utf8)) ?? ""
    let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
    return (Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0) / 1024
  }

  /// Polls `condition` every 100 ms for up to `seconds`.
  func eventually(_ seconds: Double, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
      if try condition() { return true }
      usleep(100_000)
    }
    return try condition()
  }

  @Test(arguments: ["soft"])
  func balloonTakesMemoryBackFromADebianGuest(accelerator: String) throws {
    if accelerator == "kvm" && access("/dev/kvm", R_OK | W_OK) != 0 { return }
    let (kernel, initrd) = try defaultGuest()
    let scratch = try Scratch()
    let socket = scratch.file("api.sock")
    let server = try HostvisorProcess(["serve", "--api-sock", socket, "--accel", accelerator])
    defer { server.process.terminate() }
    try server.waitForSocket(socket)
    let bootSource =
      #"{"kernel_image_path": "\#(kernel)", "initrd_path": "\#(initrd)", "boot_args": "console=ttyS0 panic=-1 hostvisor.modules=virtio_pci,virtio_balloon"}"#
    #expect(try curl(socket, "PUT", "/boot-source", bootSource).status == 204)
    #expect(try curl(socket, "PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 1024}"#).status == 204)
    let tooBig = try curl(socket, "PUT", "/balloon", #"{"amount_mib": 1100, "deflate_on_oom": false}"#)
    #expect(tooBig.status == 400, "\(tooBig.body)")
    let balloon =
      #"{"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1, "free_page_reporting": true}"#
    #expect(try curl(socket, "PUT", "/balloon", balloon).status == 204)
    #expect(try curl(socket, "GET", "/balloon").json["stats_polling_interval_s"] as? Int == 1)
    #expect(try curl(socket, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
    try server.waitForGuestShell()

    func memTotalKiB() throws -> Int {
      let text = try server.guestOutput("MEM\(Int.random(in: 0..<1_000_000))", "grep MemTotal /proc/meminfo")
      return Int(text.split(whereSeparator: { !$0.isNumber }).first ?? "") ?? 0
    }
    let driver = try server.guestOutput("DRV", "ls /sys/bus/virtio/drivers/virtio_balloon/")
    #expect(driver.contains("virtio"), "guest saw: \(driver)")

    // Statistics arrive (every second) and describe the guest's memory.
    var statistics: [String: Any] = [:]
    #expect(
      try eventually(10) {
        statistics = try curl(socket, "GET", "/balloon/statistics").json
        return (statistics["total_memory"] as? Int ?? 0) > 400 << 20
      }, "statistics: \(statistics)")

    // The guest touches 300 MiB and frees it; free page reporting gives it back to the host.
    let before = residentMiB(server)
    let touched = try server.guestOutput(
      "TOUCH", "dd if=/dev/zero of=/tmp/fill bs=1M count=300 2>/dev/null; ls -l /tmp/fill")
    #expect(touched.contains("314572800"), "guest saw: \(touched)")
    let peak = residentMiB(server)
    #expect(peak >= before + 250, "RSS \(before) MiB -> \(peak) MiB after touching 300 MiB")
    _ = try server.guestOutput("FREE", "rm /tmp/fill")
    #expect(
      eventually(10) { residentMiB(server) <= peak - 200 }, "RSS stayed at \(residentMiB(server)) MiB (peak \(peak))")

    // Inflating by 128 MiB: the guest's `actual` follows and its MemTotal shrinks by that much.
    let totalBefore = try memTotalKiB()
    #expect(try curl(socket, "PATCH", "/balloon", #"{"amount_mib": 128}"#).status == 204)
    #expect(
      try eventually(20) {
        try curl(socket, "GET", "/balloon/statistics").json["actual_mib"] as? Int == 128
      })
    #expect(try curl(socket, "GET", "/balloon").json["amount_mib"] as? Int == 128)
    let totalAfter = try memTotalKiB()
    #expect(totalBefore - totalAfter == 128 * 1024, "MemTotal \(totalBefore) -> \(totalAfter) KiB")
    // And back.
    #expect(try curl(socket, "PATCH", "/balloon", #"{"amount_mib": 0}"#).status == 204)
    #expect(
      try eventually(20) {
        try curl(socket, "GET", "/balloon/statistics").json["actual_pages"] as? Int == 0
      })
    #expect(try memTotalKiB() == totalBefore)
    #expect(try curl(socket, "PATCH", "/balloon/statistics", #"{"stats_polling_interval_s": 2}"#).status == 204)
    #expect(try curl(socket, "PATCH", "/balloon/statistics", #"{"stats_polling_interval_s": 0}"#).status == 400)
  }

  /// A guest of 256 MiB whose balloon leaves it about 40 MiB available allocates (and touches)
  /// 12 MiB more than it has available with busybox `dd bs=...M` (less than its MemTotal, which
  /// the balloon lowers without `deflate_on_oom`, so the kernel's overcommit check lets it
  /// through). With `deflate_on_oom`, Linux's OOM notifier deflates the balloon: the allocation
  /// succeeds, no process is killed, and `actual` falls below the target. Without it, the OOM
  /// killer kills `dd` and the balloon keeps its size.
  @Test(arguments: [true, false])
  func allocationBeyondAnInflatedBalloon(deflateOnOOM: Bool) throws {
    let (kernel, initrd) = try defaultGuest()
    let scratch = try Scratch()
    let socket = scratch.file("api.sock")
    let server = try HostvisorProcess(["serve", "--api-sock", socket, "--accel", "soft"])
    defer { server.process.terminate() }
    try server.waitForSocket(socket)
    let bootSource =
      #"{"kernel_image_path": "\#(kernel)", "initrd_path": "\#(initrd)", "boot_args": "console=ttyS0 panic=-1 quiet hostvisor.modules=virtio_pci,virtio_balloon"}"#
    #expect(try curl(socket, "PUT", "/boot-source", bootSource).status == 204)
    #expect(try curl(socket, "PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 256}"#).status == 204)
    let balloon = #"{"amount_mib": 0, "deflate_on_oom": \#(deflateOnOOM), "stats_polling_interval_s": 1}"#
    #expect(try curl(socket, "PUT", "/balloon", balloon).status == 204)
    #expect(try curl(socket, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
    try server.waitForGuestShell()

    func guestNumber(_ tag: String, _ command: String) throws -> Int {
      let text = try server.guestOutput(tag, command)
      return Int(text.split(whereSeparator: { !$0.isNumber }).first ?? "") ?? -1
    }
    func actualMiB() throws -> Int {
      try curl(socket, "GET", "/balloon/statistics").json["actual_mib"] as? Int ?? -1
    }

    // Inflate until about 40 MiB stay available to the guest.
    let availableMiB = try guestNumber("AVAIL", "grep MemAvailable /proc/meminfo") / 1024
    let target = availableMiB - 40
    try #require(target >= 64, "the guest has only \(availableMiB) MiB available")
    #expect(try curl(socket, "PATCH", "/balloon", #"{"amount_mib": \#(target)}"#).status == 204)
    var actual = -1
    #expect(
      try eventually(60) {
        actual = try actualMiB()
        return actual == target
      }, "actual \(actual) MiB, target \(target) MiB")
    let left = try guestNumber("LEFT", "grep MemAvailable /proc/meminfo") / 1024
    let total = try guestNumber("TOTAL", "grep MemTotal /proc/meminfo") / 1024
    #expect(left < 60, "MemAvailable \(left) MiB after inflating to \(target) MiB")

    // More than is left, less than the balloon holds and less than MemTotal.
    let allocationMiB = left + 12
    #expect(allocationMiB < total, "MemTotal \(total) MiB, MemAvailable \(left) MiB")
    let allocation = try server.guestOutput(
      "ALLOC", "dd if=/dev/zero of=/dev/null bs=\(allocationMiB)M count=1 2>&1; echo status=$?", timeout: 300)
    let killed = try guestNumber("KILLS", "dmesg | grep -c 'Killed process'")
    let actualAfter = try actualMiB()
    if deflateOnOOM {
      #expect(allocation.contains("1+0 records in") && allocation.contains("status=0"), "dd: \(allocation)")
      #expect(killed == 0, "the OOM killer ran \(killed) times")
      #expect(actualAfter < target, "the balloon still holds \(actualAfter) MiB (target \(target) MiB)")
      #expect(actualAfter >= target - allocationMiB, "the balloon fell from \(target) to \(actualAfter) MiB")
    } else {
      #expect(!allocation.contains("status=0"), "dd: \(allocation)")
      let victim = try server.guestOutput("VICTIM", "dmesg | grep 'Killed process'")
      let log =
        killed >= 1 ? "" : try server.guestOutput("DMESG", "dmesg | tail -n 30; grep -E 'Mem|Committed' /proc/meminfo")
      #expect(killed >= 1 && victim.contains("(dd)"), "dd: \(allocation); dmesg: \(victim) \(log)")
      #expect(actualAfter == target, "the balloon holds \(actualAfter) MiB (target \(target) MiB)")
    }
  }
}
