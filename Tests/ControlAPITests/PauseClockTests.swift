import Foundation
import Testing

/// The default Debian guest driven through the Cloud Hypervisor endpoints with curl: created,
/// booted, paused for several seconds and resumed. Its monotonic clock does not count the
/// paused time, and it keeps running afterwards.
@Suite("Cloud Hypervisor API: a Debian guest's clock across a pause")
struct PauseClockTests {
  @Test func pausedTimeDoesNotExistForTheGuest() throws {
    let (kernel, initrd) = try defaultGuest()
    let scratch = try Scratch()
    let socket = scratch.file("ch.sock")
    let server = try HostvisorProcess(["serve", "--api-sock", socket, "--accel", "soft"])
    defer { server.process.terminate() }
    try server.waitForSocket(socket)
    func api(_ method: String, _ endpoint: String, _ body: String? = nil) throws -> CurlResult {
      try curl(socket, method, "/api/v1/\(endpoint)", body)
    }
    let create = #"""
      {"payload": {"kernel": "\#(kernel)", "initramfs": "\#(initrd)", "cmdline": "console=ttyS0 panic=-1"},
       "cpus": {"boot_vcpus": 1, "max_vcpus": 1}, "memory": {"size": 268435456},
       "serial": {"mode": "Tty"}, "console": {"mode": "Off"}}
      """#
    #expect(try api("PUT", "vm.create", create).status == 204)
    #expect(try api("PUT", "vm.boot").status == 204)
    try server.waitForGuestShell()

    /// The guest's seconds since boot (`/proc/uptime`, CLOCK_BOOTTIME).
    func guestUptime(_ tag: String) throws -> Double {
      let text = try server.guestOutput(tag, "cut -d' ' -f1 /proc/uptime")
      let value = text.split(whereSeparator: \.isWhitespace).compactMap { Double($0) }.last
      return try #require(value, "no uptime in: \(text)")
    }
    let before = try guestUptime("UPA")
    let hostBefore = Date()
    #expect(try api("PUT", "vm.pause").status == 204)
    #expect(try api("GET", "vm.info").json["state"] as? String == "Paused")
    sleep(6)
    #expect(try api("PUT", "vm.resume").status == 204)
    let after = try guestUptime("UPB")
    let hostElapsed = Date().timeIntervalSince(hostBefore)
    #expect(hostElapsed >= 6)
    // The guest saw only the time it ran: the two reads and the API calls, never the 6 s pause.
    #expect(after > before, "uptime \(before) -> \(after)")
    #expect(after - before < hostElapsed - 4, "uptime \(before) -> \(after) over \(hostElapsed) s of host time")

    #expect(try api("PUT", "vm.shutdown").status == 204)
    #expect(try api("GET", "vm.info").json["state"] as? String == "Shutdown")
  }
}
