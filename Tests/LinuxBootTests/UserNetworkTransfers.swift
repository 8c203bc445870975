import Foundation
import TestSupport
import Testing

/// Bulk transfers between the host and a guest on user-mode networking, each checked with
/// SHA-256 on both ends: host to guest and guest to host through the gateway (the host's
/// loopback), and both ways through port forwards into the guest.
enum UserNetworkTransfers {
  /// A Python program on the host: `send FILE PORT` connects to 127.0.0.1:PORT, sends FILE and
  /// closes; `receive FILE PORT [BYTES]` connects and writes what arrives until the peer closes
  /// or BYTES have arrived (then it closes);
  /// `listen FILE PORT` accepts one connection on 127.0.0.1:PORT and writes what arrives.
  /// Every step has a deadline of `seconds`. `receive` connects again while a connection ends
  /// (closed or reset) before its first byte: the port forward accepts at once, and the guest's
  /// listener, started in the background, may not be listening yet.
  static let hostPeer = """
    import socket, sys, time
    mode, path, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    expected = int(sys.argv[5]) if len(sys.argv) > 5 else None
    if mode == "receive":
        deadline = time.monotonic() + seconds
        while True:
            connection = socket.create_connection(("127.0.0.1", port), timeout=seconds)
            connection.settimeout(seconds)
            received = 0
            try:
                with open(path, "wb") as out:
                    while expected is None or received < expected:
                        chunk = connection.recv(65536)
                        if not chunk:
                            break
                        out.write(chunk)
                        received += len(chunk)
            except ConnectionResetError:
                if received:
                    raise
            connection.close()
            if received or time.monotonic() > deadline:
                sys.exit(0 if received else 1)
            time.sleep(0.5)
    if mode == "listen":
        server = socket.create_server(("127.0.0.1", port))
        server.settimeout(seconds)
        connection, _ = server.accept()
    else:
        connection = socket.create_connection(("127.0.0.1", port), timeout=seconds)
    connection.settimeout(seconds)
    if mode == "send":
        with open(path, "rb") as source:
            connection.sendall(source.read())
        connection.shutdown(socket.SHUT_WR)
        while connection.recv(65536):
            pass
    else:
        with open(path, "wb") as out:
            while chunk := connection.recv(65536):
                out.write(chunk)
    connection.close()
    """

  /// Starts the host peer in `mode` (see `hostPeer`) as a child process.
  static func startHostPeer(
    _ mode: String, file: String, port: UInt16, seconds: Int = 300, expectedBytes: Int? = nil
  ) throws -> HostProcess {
    try HostProcess(
      "/usr/bin/env",
      ["python3", "-c", hostPeer, mode, file, "\(port)", "\(seconds)"] + (expectedBytes.map { ["\($0)"] } ?? []),
      errors: { _ in }, output: { _ in })
  }

  /// The size of the file at `path` in bytes, or -1 when it does not exist.
  static func byteCount(ofFile path: String) -> Int {
    ((try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? NSNumber)?.intValue ?? -1
  }

  /// Waits up to `seconds` for `process` to exit (killing it after that); its exit status.
  static func wait(for process: HostProcess, seconds: Int = 300) async throws -> Int32 {
    for _ in 0..<(seconds * 5) where process.isRunning { try await Task.sleep(for: .milliseconds(200)) }
    if process.isRunning { kill(process.processIdentifier, SIGKILL) }
    process.waitUntilExit()
    return process.terminationStatus
  }

  /// Host to guest through the gateway: the guest downloads `payload` (served as
  /// `/payload.bin` by an HTTP server on the host's loopback port `httpPort`); its SHA-256 in
  /// the guest must be the file's.
  static func downloadThroughTheGateway(
    _ session: GuestSession, payload: String, httpPort: UInt16, sourceLocation: SourceLocation = #_sourceLocation
  ) async throws {
    let download = try await session.run(
      "wget -q -O /tmp/in http://10.0.2.2:\(httpPort)/payload.bin; sha256sum /tmp/in; rm -f /tmp/in",
      timeout: .seconds(600))
    #expect(
      LinuxVirtioTests.digest(in: download, for: "/tmp/in") == (try LinuxVirtioTests.sha256(ofFile: payload)),
      "host to guest through the gateway: \(download)", sourceLocation: sourceLocation)
  }

  /// Guest to host through the gateway: the guest sends `size` random bytes to a listener on
  /// the host's loopback; the copy's SHA-256 must be the guest's. `meanwhile` runs beside the
  /// guest's sending, from the moment it starts.
  static func uploadThroughTheGateway(
    _ session: GuestSession, size: Int, folder: UserNetworkTests.SharedFolder, port: UInt16,
    meanwhile: (@Sendable () async throws -> Void)? = nil, sourceLocation: SourceLocation = #_sourceLocation
  ) async throws {
    let copy = folder.path("from-guest-\(port).bin")
    let prepared = try await session.run(
      "head -c \(size) /dev/urandom > /tmp/out && sha256sum /tmp/out", timeout: .seconds(300))
    let sentDigest = try #require(
      LinuxVirtioTests.digest(in: prepared, for: "/tmp/out"), sourceLocation: sourceLocation)
    let listener = try startHostPeer("listen", file: copy, port: port)
    defer { if listener.isRunning { kill(listener.processIdentifier, SIGKILL) } }
    try await Task.sleep(for: .seconds(1))
    let beside = meanwhile.map { action in Task { try await action() } }
    _ = try await session.run("nc 10.0.2.2 \(port) < /tmp/out; rm -f /tmp/out", timeout: .seconds(600))
    try await beside?.value
    // The guest's nc ends once its data is in its socket buffer; passt may take minutes more
    // to deliver it on a loaded host (it resends much of it on the emulated NICs), so the
    // listener gets the same time as the other transfers' peers.
    let status = try await wait(for: listener)
    #expect(
      (try? LinuxVirtioTests.sha256(ofFile: copy)) == sentDigest,
      "guest to host through the gateway (listener status \(status), \(byteCount(ofFile: copy)) of \(size) bytes)",
      sourceLocation: sourceLocation)
  }

  /// Host to guest through a port forward: a guest server on `guestPort` (reached from
  /// 127.0.0.1:`hostPort`) receives `payload`; its SHA-256 in the guest must be the file's.
  static func sendThroughAForward(
    _ session: GuestSession, payload: String, hostPort: UInt16, guestPort: UInt16,
    sourceLocation: SourceLocation = #_sourceLocation
  ) async throws {
    // The guest server's input stays open: a server that closes its sending side before the
    // data arrives (nc with its input at end of file sends FIN at once) makes Debian 12's passt
    // resend data the guest already acknowledged, over and over (docs/user-networking.md).
    _ = try await session.run("rm -f /tmp/fin; (sleep 3600 | nc -l -p \(guestPort) > /tmp/fin &)")
    try await Task.sleep(for: .seconds(1))
    let sender = try startHostPeer("send", file: payload, port: hostPort)
    let status = try await wait(for: sender)
    #expect(status == 0, "the host could not send through the forward", sourceLocation: sourceLocation)
    let received = try await session.run(
      "for i in $(seq 120); do pidof nc >/dev/null || break; sleep 1; done; sha256sum /tmp/fin; rm -f /tmp/fin",
      timeout: .seconds(300))
    #expect(
      LinuxVirtioTests.digest(in: received, for: "/tmp/fin") == (try LinuxVirtioTests.sha256(ofFile: payload)),
      "host to guest through the port forward: \(received)", sourceLocation: sourceLocation)
  }

  /// Guest to host through a port forward: a guest server on `guestPort` sends `size` random
  /// bytes as soon as the host connects to 127.0.0.1:`hostPort` (the host sends nothing
  /// first); the host's copy's SHA-256 must be the guest's. The guest server keeps its sending
  /// side open after the data (a FIN right behind it sometimes left Debian 12's passt resending
  /// data endlessly, as in `sendThroughAForward`); the host closes once `size` bytes arrived.
  static func receiveThroughAForward(
    _ session: GuestSession, size: Int, folder: UserNetworkTests.SharedFolder, hostPort: UInt16, guestPort: UInt16,
    sourceLocation: SourceLocation = #_sourceLocation
  ) async throws {
    let prepared = try await session.run(
      "head -c \(size) /dev/urandom > /tmp/fout && sha256sum /tmp/fout"
        + " && ((cat /tmp/fout; sleep 3600) | nc -l -p \(guestPort) &)",
      timeout: .seconds(300))
    let sentDigest = try #require(
      LinuxVirtioTests.digest(in: prepared, for: "/tmp/fout"), sourceLocation: sourceLocation)
    try await Task.sleep(for: .seconds(1))
    let copy = folder.path("forwarded-\(hostPort).bin")
    let receiver = try startHostPeer("receive", file: copy, port: hostPort, expectedBytes: size)
    let status = try await wait(for: receiver)
    if status != 0 {
      // What passt was doing: its CPU time and the bytes waiting in its sockets.
      let sockets = (try? host("/usr/bin/ss", ["-xtnp"])) ?? ""
      print(
        "passt after the stall:\n"
          + sockets.split(separator: "\n").filter { $0.contains("passt") }.joined(separator: "\n"))
      print((try? host("/bin/ps", ["-C", "passt.avx2,passt", "-o", "pid,stat,pcpu,time,etime"])) ?? "")
    }
    #expect(status == 0, "the host could not receive through the forward", sourceLocation: sourceLocation)
    #expect(
      (try? LinuxVirtioTests.sha256(ofFile: copy)) == sentDigest,
      "guest to host through the port forward (\(byteCount(ofFile: copy)) of \(size) bytes)",
      sourceLocation: sourceLocation)
    _ = try await session.run("rm -f /tmp/fout")
  }
}
