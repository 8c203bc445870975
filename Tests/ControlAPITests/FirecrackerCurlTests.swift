import Foundation
import Testing

/// The Firecracker API driven with curl over the Unix socket, against a real `hostvisor serve`.
@Suite("Firecracker API over curl", .serialized)
struct FirecrackerCurlTests {
  let scratch: Scratch
  let socket: String

  init() throws {
    scratch = try Scratch()
    socket = scratch.file("api.sock")
  }

  func serve(_ extra: [String] = []) throws -> HostvisorProcess {
    let server = try HostvisorProcess(["serve", "--api-sock", socket, "--accel", "soft"] + extra)
    try server.waitForSocket(socket)
    return server
  }

  func expectFault(_ result: CurlResult, containing phrase: String, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(result.status == 400, "status \(result.status): \(result.body)", sourceLocation: sourceLocation)
    let message = result.json["fault_message"] as? String ?? ""
    #expect(message.contains(phrase), "fault_message: \(result.body)", sourceLocation: sourceLocation)
  }

  /// The boot sequence a Firecracker client sends, then pause and resume: the guest's counter
  /// stops while paused and continues from the next value; every bad request on the way gets
  /// its documented 400 and the guest keeps running.
  @Test func bootPauseResumeAndBadInputWhileRunning() throws {
    let kernel = try assembleGuest(counterGuestSource, in: scratch)
    let server = try serve()

    #expect(try curl(socket, "GET", "/").json["state"] as? String == "Not started")
    #expect(
      try curl(socket, "PUT", "/boot-source", #"{"kernel_image_path": "\#(kernel)", "boot_args": ""}"#).status == 204)
    #expect(try curl(socket, "PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 32}"#).status == 204)
    #expect(try curl(socket, "PATCH", "/machine-config", #"{"smt": false}"#).status == 204)
    let machine = try curl(socket, "GET", "/machine-config").json
    #expect(machine["mem_size_mib"] as? Int == 32 && machine["vcpu_count"] as? Int == 1)
    expectFault(try curl(socket, "PATCH", "/vm", #"{"state": "Paused"}"#), containing: "before starting")
    #expect(try curl(socket, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
    #expect(try curl(socket, "GET", "/").json["state"] as? String == "Running")
    try server.waitForOutput("the counter") { counterValues($0).count >= 3 }

    // Bad input of every class while the guest runs.
    expectFault(
      try curl(socket, "PUT", "/boot-source", #"{"kernel_image_path": "\#(kernel)"}"#), containing: "after starting")
    expectFault(
      try curl(socket, "PUT", "/machine-config", #"{"vcpu_count": 2, "mem_size_mib": 32}"#),
      containing: "after starting")
    expectFault(try curl(socket, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#), containing: "after starting")
    expectFault(try curl(socket, "PATCH", "/vm", #"{"state": "Resumed"}"#), containing: "running")
    expectFault(try curl(socket, "PATCH", "/vm", #"{"state": "Paused""#), containing: "not valid JSON")
    expectFault(
      try curl(socket, "PATCH", "/vm", #"{"state": "Paused", "extra": 1}"#), containing: "unknown field `extra`")
    expectFault(try curl(socket, "PATCH", "/vm", #"{"state": "Sleeping"}"#), containing: "state")
    expectFault(try curl(socket, "PATCH", "/vm", #"{"state": 7}"#), containing: "state")
    expectFault(try curl(socket, "DELETE", "/vm"), containing: "Invalid request method")
    expectFault(
      try curl(socket, "POST", "/actions", #"{"action_type": "InstanceStart"}"#), containing: "Invalid request method")
    expectFault(try curl(socket, "GET", "/no-such-resource"), containing: "Invalid request method and/or path")
    let big = scratch.file("big.json")
    try Data(("{\"kernel_image_path\": \"" + String(repeating: "a", count: 60_000) + "\"}").utf8).write(
      to: URL(fileURLWithPath: big))
    expectFault(try curl(socket, "PUT", "/boot-source", bodyFile: big), containing: "larger than the limit")
    expectFault(
      try curl(socket, "PUT", "/balloon", #"{"amount_mib": 1, "deflate_on_oom": false}"#),
      containing: "after starting")
    expectFault(try curl(socket, "GET", "/balloon"), containing: "No balloon device")
    expectFault(try curl(socket, "PUT", "/vsock", #"{"guest_cid": 3, "uds_path": "/tmp/v"}"#), containing: "vsock")
    expectFault(try curl(socket, "PUT", "/mmds", #"{}"#), containing: "MMDS")
    let stillRunning = counterValues(server.text).last ?? 0
    try server.waitForOutput("the counter after bad requests") { (counterValues($0).last ?? 0) > stillRunning + 2 }
    #expect(try curl(socket, "GET", "/").json["state"] as? String == "Running")

    // Pause: the counter stops; resume: it continues from the next value.
    #expect(try curl(socket, "PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
    #expect(try curl(socket, "GET", "/").json["state"] as? String == "Paused")
    usleep(200_000)  // output already on its way through the pipe
    let atPause = counterValues(server.text)
    usleep(600_000)
    #expect(counterValues(server.text) == atPause, "the guest printed while paused")
    expectFault(try curl(socket, "PATCH", "/vm", #"{"state": "Paused"}"#), containing: "paused")
    #expect(try curl(socket, "PATCH", "/vm", #"{"state": "Resumed"}"#).status == 204)
    try server.waitForOutput("the counter after resume") { counterValues($0).count > atPause.count + 3 }
    let values = counterValues(server.text)
    #expect(values == Array(1...values.count), "the counter skipped or repeated values")
    #expect(try curl(socket, "GET", "/").json["state"] as? String == "Running")

    // SendCtrlAltDel reaches the guest's keyboard controller (the guest ignores it and runs on).
    #expect(try curl(socket, "PUT", "/actions", #"{"action_type": "SendCtrlAltDel"}"#).status == 204)
    server.process.terminate()
  }

  /// Pre-boot resources: stored, reported by GET /vm/config, and checked.
  @Test func preBootConfigurationIsCheckedAndReported() throws {
    let kernel = try assembleGuest(counterGuestSource, in: scratch)
    let disk = scratch.file("disk.img")
    _ = FileManager.default.createFile(atPath: disk, contents: Data(count: 1 << 20))
    let server = try serve(["--id", "vm-42"])
    defer { server.process.terminate() }

    let info = try curl(socket, "GET", "/").json
    #expect(info["id"] as? String == "vm-42")
    #expect(try curl(socket, "GET", "/version").json["firecracker_version"] as? String == "1.16.1")
    #expect(try curl(socket, "PUT", "/boot-source", #"{"kernel_image_path": "\#(kernel)"}"#).status == 204)
    let drive = #"{"drive_id": "rootfs", "path_on_host": "\#(disk)", "is_root_device": true, "is_read_only": true}"#
    #expect(try curl(socket, "PUT", "/drives/rootfs", drive).status == 204)
    expectFault(
      try curl(
        socket, "PUT", "/drives/other", #"{"drive_id": "other", "path_on_host": "\#(disk)", "is_root_device": true}"#),
      containing: "root block device already exists")
    expectFault(
      try curl(socket, "PUT", "/drives/x", #"{"drive_id": "y", "path_on_host": "\#(disk)", "is_root_device": false}"#),
      containing: "does not match")
    expectFault(
      try curl(socket, "PUT", "/drives/x", #"{"drive_id": "x", "is_root_device": false}"#), containing: "path_on_host")
    expectFault(
      try curl(socket, "PUT", "/drives/x", #"{"drive_id": "x"}"#), containing: "missing field `is_root_device`")
    expectFault(try curl(socket, "PATCH", "/drives/rootfs", #"{"drive_id": "rootfs"}"#), containing: "before starting")
    expectFault(
      try curl(socket, "PUT", "/machine-config", #"{"vcpu_count": 0, "mem_size_mib": 64}"#), containing: "vCPU number")
    expectFault(
      try curl(socket, "PUT", "/machine-config", #"{"vcpu_count": 3, "mem_size_mib": 64, "smt": true}"#),
      containing: "SMT")
    expectFault(try curl(socket, "PUT", "/machine-config", #"{"vcpu_count": 1}"#), containing: "mem_size_mib")
    expectFault(
      try curl(socket, "PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "2M"}"#),
      containing: "huge pages")
    #expect(
      try curl(
        socket, "PUT", "/network-interfaces/eth0",
        #"{"iface_id": "eth0", "host_dev_name": "hvtap0", "guest_mac": "52:54:00:12:34:56"}"#
      ).status == 204)
    expectFault(
      try curl(
        socket, "PUT", "/network-interfaces/eth1", #"{"iface_id": "eth1", "host_dev_name": "t", "guest_mac": "zz"}"#),
      containing: "guest_mac")
    #expect(try curl(socket, "PUT", "/entropy", "{}").status == 204)
    expectFault(
      try curl(socket, "PUT", "/entropy", #"{"rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}}"#),
      containing: "rate limiters")
    let config = try curl(socket, "GET", "/vm/config").json
    let drives = config["drives"] as? [[String: Any]] ?? []
    #expect(drives.count == 1 && drives.first?["path_on_host"] as? String == disk)
    #expect((config["boot-source"] as? [String: Any])?["kernel_image_path"] as? String == kernel)
    #expect((config["network-interfaces"] as? [[String: Any]])?.first?["host_dev_name"] as? String == "hvtap0")
    expectFault(
      try curl(socket, "PUT", "/snapshot/create", #"{"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}"#),
      containing: "before starting")
    expectFault(try curl(socket, "PUT", "/snapshot/load", #"{"snapshot_path": "/tmp/s"}"#), containing: "mem_file_path")
    #expect(try curl(socket, "GET", "/").json["state"] as? String == "Not started")
  }

  /// PUT /logger and PUT /metrics write Firecracker-style lines; FlushMetrics writes one JSON
  /// object per line with the API request counts.
  @Test func loggerAndMetricsWriteLines() throws {
    let server = try serve(["--id", "metrics-vm"])
    defer { server.process.terminate() }
    let log = scratch.file("log.txt")
    let metrics = scratch.file("metrics.json")
    #expect(
      try curl(socket, "PUT", "/logger", #"{"log_path": "\#(log)", "level": "Info", "show_level": true}"#).status == 204
    )
    #expect(try curl(socket, "PUT", "/metrics", #"{"metrics_path": "\#(metrics)"}"#).status == 204)
    let fault = try curl(socket, "PUT", "/metrics", #"{"metrics_path": "\#(metrics)"}"#)
    #expect(fault.status == 400)
    _ = try curl(socket, "GET", "/machine-config")
    _ = try curl(socket, "PUT", "/boot-source", #"{"kernel_image_path": "/nonexistent"}"#)
    #expect(try curl(socket, "PUT", "/actions", #"{"action_type": "FlushMetrics"}"#).status == 204)
    let lines = try String(contentsOfFile: metrics, encoding: .utf8).split(separator: "\n")
    #expect(lines.count == 1)
    let object =
      (try? JSONSerialization.jsonObject(with: Data(lines.first.map(String.init)?.utf8 ?? "".utf8))) as? [String: Any]
    let gets = object?["get_api_requests"] as? [String: Int]
    let puts = object?["put_api_requests"] as? [String: Int]
    #expect(gets?["machine_cfg_count"] == 1)
    #expect(puts?["boot_source_fails"] == 1)
    #expect(object?["utc_timestamp_ms"] != nil)
    let logText = try String(contentsOfFile: log, encoding: .utf8)
    #expect(logText.contains("[metrics-vm:"))
    #expect(logText.contains(":WARN]") && logText.contains("/boot-source"))
  }

  /// The socket is created 0600; an existing file, directory or symbolic link at the path is
  /// never replaced; a stale socket is.
  @Test func socketSafety() throws {
    let regular = scratch.file("regular")
    try Data("keep me".utf8).write(to: URL(fileURLWithPath: regular))
    let refused = try runProgram(hostvisorBinary, ["serve", "--api-sock", regular])
    #expect(refused.status == 1)
    #expect(refused.stderr.contains("not a socket") && refused.stderr.split(separator: "\n").count == 1)
    #expect(try String(contentsOfFile: regular, encoding: .utf8) == "keep me")

    let link = scratch.file("link")
    try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: scratch.file("target.sock"))
    #expect(try runProgram(hostvisorBinary, ["serve", "--api-sock", link]).status == 1)
    #expect(!FileManager.default.fileExists(atPath: scratch.file("target.sock")))

    let server = try serve()
    let attributes = try FileManager.default.attributesOfItem(atPath: socket)
    #expect((attributes[.posixPermissions] as? Int) == 0o600)
    let second = try runProgram(hostvisorBinary, ["serve", "--api-sock", socket])
    #expect(second.status == 1 && second.stderr.contains("in use"))
    server.process.interrupt()
    _ = server.waitForExit()
    // The killed server left its socket behind (SIGINT ends it without cleanup) or removed it;
    // either way a new server starts.
    let again = try serve()
    var status = 0
    for _ in 0..<100 where status != 200 {
      status = (try? curl(socket, "GET", "/").status) ?? 0
      usleep(50_000)
    }
    #expect(status == 200)
    again.process.terminate()
  }

  /// A client that connects and sends half a request neither blocks other clients nor keeps
  /// its connection for ever; many idle connections beyond the limit are refused, not queued.
  @Test func slowAndSilentClientsDoNotStallTheAPI() throws {
    let server = try serve()
    defer { server.process.terminate() }
    var silent: [FileHandle] = []
    for _ in 0..<40 {
      let descriptor = socketConnect(socket)
      guard descriptor >= 0 else { continue }
      let handle = FileHandle(fileDescriptor: descriptor, closeOnDealloc: true)
      handle.write(Data("PUT /actions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{".utf8))
      silent.append(handle)
    }
    let started = Date()
    // Connections over the limit are closed at once; the silent ones time out; the API answers.
    var answered = false
    while Date().timeIntervalSince(started) < 15 {
      if let result = try? curl(socket, "GET", "/"), result.status == 200 {
        answered = true
        break
      }
      usleep(200_000)
    }
    #expect(answered, "the API did not answer while silent clients held connections")
    // A half-sent request is answered with 400 after the request timeout.
    let reply = silent.first.map { String(decoding: $0.readDataToEndOfFile(), as: UTF8.self) } ?? ""
    #expect(reply.hasPrefix("HTTP/1.1 400") && reply.contains("did not complete in time"))
  }

  /// `--config-file` with Firecracker's keys boots at once; `--no-api` serves no socket.
  @Test func configFileBootsWithoutAPI() throws {
    let kernel = try assembleGuest(counterGuestSource, in: scratch)
    let config = scratch.file("vm.json")
    try Data(
      #"{"boot-source": {"kernel_image_path": "\#(kernel)", "boot_args": ""}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 32}, "drives": [], "network-interfaces": []}"#
        .utf8
    ).write(to: URL(fileURLWithPath: config))
    let server = try HostvisorProcess(["serve", "--no-api", "--config-file", config, "--accel", "soft"])
    defer { server.process.terminate() }
    try server.waitForOutput("the counter") { counterValues($0).count >= 2 }
    #expect(!FileManager.default.fileExists(atPath: socket))

    let bad = scratch.file("bad.json")
    try Data(#"{"boot-source": {"kernel_image_path": "\#(kernel)"}, "vsock": {"guest_cid": 3, "uds_path": "/x"}}"#.utf8)
      .write(to: URL(fileURLWithPath: bad))
    let refused = try runProgram(hostvisorBinary, ["serve", "--no-api", "--config-file", bad])
    #expect(refused.status == 1 && refused.stderr.contains("vsock"))
    let noConfig = try runProgram(hostvisorBinary, ["serve", "--no-api"])
    #expect(noConfig.status == 1 && noConfig.stderr.contains("--config-file"))
  }

  /// Invoked as `firecracker` or `cloud-hypervisor`, the binary takes their flags, and
  /// `--version` prints what Kata's drivers parse while naming Hostvisor.
  @Test func personalities() throws {
    let firecracker = scratch.file("firecracker")
    let cloudHypervisor = scratch.file("cloud-hypervisor")
    try FileManager.default.createSymbolicLink(atPath: firecracker, withDestinationPath: hostvisorBinary)
    try FileManager.default.createSymbolicLink(atPath: cloudHypervisor, withDestinationPath: hostvisorBinary)

    let fcVersion = try runProgram(firecracker, ["--version"])
    #expect(fcVersion.status == 0)
    // Kata: the second space-separated field of the first line, without its leading "v", is semver.
    let fields = fcVersion.stdout.split(separator: "\n").first?.split(separator: " ") ?? []
    #expect(fields.count > 1 && fields[1] == "v1.16.1")
    #expect(fcVersion.stdout.contains("Hostvisor"))

    let chVersion = try runProgram(cloudHypervisor, ["--version"])
    // Kata: exactly two words; the second splits on "." into three numeric parts (after a
    // leading "v", the last may carry "-suffix").
    let words = chVersion.stdout.split(whereSeparator: \.isWhitespace)
    #expect(words.count == 2)
    let parts = words.last.map { $0.dropFirst().split(separator: ".") } ?? []
    #expect(parts.count == 3 && Int(parts[0]) != nil && Int(parts[1]) != nil)
    #expect(Int(parts.last?.split(separator: "-").first ?? "") != nil)
    #expect(chVersion.stdout.lowercased().contains("hostvisor"))

    let server = try HostvisorProcess(
      [
        "--api-sock", socket, "--id", "fc-mode", "--level", "Debug", "--log-path", scratch.file("fc.log"),
        "--no-seccomp",
      ], executable: firecracker)
    try server.waitForSocket(socket)
    #expect(try curl(socket, "GET", "/").json["id"] as? String == "fc-mode")
    server.process.terminate()
    _ = server.waitForExit()

    let chSocket = scratch.file("ch.sock")
    let chServer = try HostvisorProcess(["--api-socket", "path=\(chSocket)"], executable: cloudHypervisor)
    try chServer.waitForSocket(chSocket)
    #expect(try curl(chSocket, "GET", "/api/v1/vmm.ping").json["version"] as? String != nil)
    #expect(try curl(chSocket, "PUT", "/api/v1/vmm.shutdown").status == 204)
    #expect(chServer.waitForExit() == 0)
  }
}

/// Connects a stream socket to `path`; -1 on failure.
func socketConnect(_ path: String) -> Int32 {
  let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
  guard descriptor >= 0 else { return -1 }
  var address = sockaddr_un()
  address.sun_family = sa_family_t(AF_UNIX)
  withUnsafeMutableBytes(of: &address.sun_path) { raw in
    for (index, byte) in path.utf8.enumerated() where index < raw.count - 1 { raw[index] = byte }
  }
  let connected = withUnsafePointer(to: &address) { pointer in
    pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
      connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
    }
  }
  if connected != 0 {
    close(descriptor)
    return -1
  }
  return descriptor
}
