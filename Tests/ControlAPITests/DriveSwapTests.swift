import Foundation
import Testing

/// Firecracker's `PATCH /drives/{id}` with a new `path_on_host` on a running Debian guest: the
/// guest sees the new file's size and contents, and its writes land in the new file only. The
/// drive's counters (Cloud Hypervisor's `vm.counters`, Firecracker's metrics) follow the
/// guest's reads and writes, and the vCPU's run time is reported.
@Suite("Drives of a running guest: backing-file swap and counters")
struct DriveSwapTests {
  /// A `size`-byte image whose first bytes are `label`.
  func makeDisk(_ path: String, size: Int, label: String) {
    var bytes = Data(count: size)
    bytes.replaceSubrange(0..<label.utf8.count, with: Data(label.utf8))
    _ = FileManager.default.createFile(atPath: path, contents: bytes)
  }

  @Test func patchDriveSwapsTheBackingFileOfARunningGuest() throws {
    let (kernel, initrd) = try defaultGuest()

    let scratch = try Scratch()
    let socket = scratch.file("api.sock")
    let first = scratch.file("first.img")
    let second = scratch.file("second.img")
    makeDisk(first, size: 4 << 20, label: "FIRST-DISK-DATA")
    makeDisk(second, size: 8 << 20, label: "OTHER-DISK-DATA")

    let server = try HostvisorProcess(["serve", "--api-sock", socket, "--accel", "soft"])
    defer { server.process.terminate() }
    try server.waitForSocket(socket)
    let bootSource =
      #"{"kernel_image_path": "\#(kernel)", "initrd_path": "\#(initrd)", "boot_args": "console=ttyS0 panic=-1 hostvisor.modules=virtio_pci,virtio_blk"}"#
    #expect(try curl(socket, "PUT", "/boot-source", bootSource).status == 204)
    #expect(
      try curl(
        socket, "PUT", "/drives/data", #"{"drive_id": "data", "path_on_host": "\#(first)", "is_root_device": false}"#
      ).status == 204)
    #expect(try curl(socket, "PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 256}"#).status == 204)
    let metricsFile = scratch.file("metrics.json")
    _ = FileManager.default.createFile(atPath: metricsFile, contents: nil)
    #expect(try curl(socket, "PUT", "/metrics", #"{"metrics_path": "\#(metricsFile)"}"#).status == 204)
    #expect(try curl(socket, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
    try server.waitForGuestShell()

    let before = try server.guestOutput("ONE", "cat /sys/block/vda/size; head -c 15 /dev/vda; echo")
    #expect(before.contains("8192"), "guest saw: \(before)")
    #expect(before.contains("FIRST-DISK-DATA"), "guest saw: \(before)")

    // A file that does not exist is refused and the guest keeps its disk.
    let missing = try curl(
      socket, "PATCH", "/drives/data", #"{"drive_id": "data", "path_on_host": "\#(scratch.file("nope.img"))"}"#)
    #expect(missing.status == 400, "\(missing.body)")
    #expect((missing.json["fault_message"] as? String ?? "").contains("cannot open"), "\(missing.body)")

    let swap = try curl(socket, "PATCH", "/drives/data", #"{"drive_id": "data", "path_on_host": "\#(second)"}"#)
    #expect(swap.status == 204, "\(swap.body)")
    let config = try curl(socket, "GET", "/vm/config").json
    let drives = config["drives"] as? [[String: Any]] ?? []
    #expect(drives.first?["path_on_host"] as? String == second)

    // The configuration-change interrupt makes the driver reread the capacity; cached blocks of
    // the old file are dropped before reading.
    let after = try server.guestOutput(
      "TWO", "sleep 1; echo 3 > /proc/sys/vm/drop_caches; cat /sys/block/vda/size; head -c 15 /dev/vda; echo")
    #expect(after.contains("16384"), "guest saw: \(after)")
    #expect(after.contains("OTHER-DISK-DATA"), "guest saw: \(after)")

    /// The drive's counters from `vm.counters`.
    func driveCounters() throws -> [String: Int] {
      let counters = try curl(socket, "GET", "/api/v1/vm.counters")
      return (counters.json["data"] as? [String: Any] ?? [:]).compactMapValues { $0 as? Int }
    }
    let beforeWrite = try driveCounters()

    // The vCPU thread carries its name for host tools and its CPU time is counted.
    let tasks = "/proc/\(server.process.processIdentifier)/task"
    let names = try FileManager.default.contentsOfDirectory(atPath: tasks).compactMap {
      try? String(contentsOfFile: "\(tasks)/\($0)/comm", encoding: .utf8)
    }
    #expect(names.contains("vcpu 0\n"), "thread names: \(names)")
    let runTimes = try curl(socket, "GET", "/api/v1/vm.counters").json["vcpu_run_time_ns"] as? [String: Any] ?? [:]
    // Booting Linux on the software CPU takes well over 100 ms of CPU.
    #expect((runTimes["vcpu0"] as? Int ?? 0) > 100_000_000, "\(runTimes)")
    #expect(beforeWrite["read_ops", default: 0] > 0 && beforeWrite["read_bytes", default: 0] >= 512, "\(beforeWrite)")

    // Writes go to the new file, not the old one.
    _ = try server.guestOutput(
      "THREE", "echo SWAPPED-WRITE | dd of=/dev/vda bs=512 seek=100 conv=sync,fsync 2>/dev/null")
    let afterWrite = try driveCounters()
    #expect(afterWrite["write_ops", default: 0] > beforeWrite["write_ops", default: 0], "\(afterWrite)")
    #expect(afterWrite["write_bytes", default: 0] >= beforeWrite["write_bytes", default: 0] + 512, "\(afterWrite)")
    #expect(afterWrite["flush_ops", default: 0] > beforeWrite["flush_ops", default: 0], "\(afterWrite)")

    // Firecracker's metrics carry the same counts, per drive and in total.
    #expect(try curl(socket, "PUT", "/actions", #"{"action_type": "FlushMetrics"}"#).status == 204)
    let metricsText = try String(contentsOfFile: metricsFile, encoding: .utf8)
    let lastLine = metricsText.split(separator: "\n").last.map(String.init) ?? ""
    let metrics = (try? JSONSerialization.jsonObject(with: Data(lastLine.utf8))) as? [String: Any] ?? [:]
    let drive = metrics["block_data"] as? [String: Any] ?? [:]
    let total = metrics["block"] as? [String: Any] ?? [:]
    // The guest may still read or write in the moment between the two snapshots (a loaded host
    // once showed 3 reads in the counters and 4 in the metrics): each metric lies between the
    // counters taken before the flush and those taken after it.
    let afterFlush = try driveCounters()
    func within(_ metric: Any?, _ counter: String) -> Bool {
      guard let value = metric as? Int, let low = afterWrite[counter], let high = afterFlush[counter] else {
        return false
      }
      return low <= value && value <= high
    }
    #expect(within(drive["write_bytes"], "write_bytes"), "metrics: \(lastLine); counters \(afterWrite) \(afterFlush)")
    #expect(within(total["read_count"], "read_ops"), "metrics: \(lastLine); counters \(afterWrite) \(afterFlush)")
    let vcpu = metrics["vcpu"] as? [String: Any] ?? [:]
    #expect((vcpu["vcpu0_run_time_us"] as? Int ?? 0) > 100_000, "metrics: \(lastLine)")
    server.type("poweroff -f\n")
    #expect(server.waitForExit(timeout: 120) == 0)
    let secondBytes = try Data(contentsOf: URL(fileURLWithPath: second))
    let firstBytes = try Data(contentsOf: URL(fileURLWithPath: first))
    let written = Data("SWAPPED-WRITE".utf8)
    #expect(secondBytes.subdata(in: 51_200..<51_213) == written)
    #expect(firstBytes.range(of: written) == nil)
  }
}
