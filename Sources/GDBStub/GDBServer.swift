import Glibc
import KVMBackend
import SoftCPU
import Synchronization
import VMCore

/// A failure to start the gdb stub, as one clear line.
public struct GDBServerError: Error, CustomStringConvertible, Sendable {
  public let description: String
  init(_ description: String) { self.description = description }
}

/// The gdb remote-protocol server: one listening TCP socket and one client at a time, served
/// on a host thread of its own (vCPU threads only post stop events to it and never block on
/// the network).
public final class GDBServer: @unchecked Sendable {
  private let target: any GDBTarget
  private let listener: Int32
  /// Written by vCPU threads (one byte per event) and `machineStopped`; wakes the server.
  private let wakeRead: Int32
  private let wakeWrite: Int32
  private let events = Mutex<[GDBStopEvent]>([])
  private let exitStatus = Mutex<Int32?>(nil)
  private let finished = Atomic<Bool>(false)
  private var thread = pthread_t()
  /// The bound address, as `HOST:PORT`.
  public let address: String

  /// Parses `[HOST:]PORT` (host an IPv4 address or `localhost`; default 127.0.0.1).
  public static func parseAddress(_ text: String) throws(GDBServerError) -> (host: String, port: UInt16) {
    var host = "127.0.0.1"
    var portText = Substring(text)
    if let colon = text.lastIndex(of: ":") {
      host = String(text[..<colon])
      portText = text[text.index(after: colon)...]
      if host.isEmpty || host == "localhost" { host = "127.0.0.1" }
    }
    guard let port = UInt16(portText) else {
      throw GDBServerError("invalid --gdb '\(text)': expected [HOST:]PORT with PORT 0-65535")
    }
    var probe = in_addr()
    guard inet_pton(AF_INET, host, &probe) == 1 else {
      throw GDBServerError("invalid --gdb host '\(host)': expected an IPv4 address or localhost")
    }
    return (host, port)
  }

  /// Binds `[HOST:]PORT` and starts serving `target`. With `startStopped`, the machine is
  /// stopped before its first instruction and stays so until gdb continues it. `kill` is
  /// called for gdb's `k` (it should stop the machine).
  public init(
    target: any GDBTarget, listenAddress: String, startStopped: Bool, kill: @escaping @Sendable () -> Void
  ) throws(GDBServerError) {
    let (host, port) = try Self.parseAddress(listenAddress)
    self.target = target
    let fd: Int32
    do {
      let opened = try TCPListener.open(host: host, port: port, backlog: 1)
      fd = opened.descriptor
      address = "\(host):\(opened.port)"
    } catch {
      throw GDBServerError("gdb stub: \(error)")
    }
    listener = fd
    var pipeEnds: [Int32] = [-1, -1]
    guard pipe(&pipeEnds) == 0 else {
      close(fd)
      throw GDBServerError("cannot create the gdb stub's wake-up pipe: \(String(cString: strerror(errno)))")
    }
    for end in pipeEnds {
      _ = fcntl(end, F_SETFD, FD_CLOEXEC)
      _ = fcntl(end, F_SETFL, O_NONBLOCK)
    }
    wakeRead = pipeEnds[0]
    wakeWrite = pipeEnds[1]
    target.setStopHandler { [weak self] event in self?.post(event) }
    if startStopped { _ = target.stop() }
    let session = Session(target: target, startStopped: startStopped)
    session.killMachine = kill
    try startThread { [self] in self.serve(session) }
  }

  deinit {
    close(listener)
    close(wakeRead)
    close(wakeWrite)
  }

  /// The gdb view of `accelerator`: the software CPU or KVM.
  public static func makeTarget(for accelerator: any Accelerator, memory: GuestMemory) throws(GDBServerError)
    -> any GDBTarget
  {
    if let soft = accelerator as? SoftAccelerator { return SoftGDBTarget(accelerator: soft, memory: memory) }
    if let kvm = accelerator as? KVMAccelerator { return KVMGDBTarget(accelerator: kvm, memory: memory) }
    throw GDBServerError("the gdb stub does not support the \(accelerator.name) accelerator")
  }

  private func post(_ event: GDBStopEvent) {
    events.withLock { $0.append(event) }
    wake()
  }

  private func wake() {
    var byte: UInt8 = 1
    _ = write(wakeWrite, &byte, 1)
  }

  /// The machine stopped: a connected gdb is told the exit status (`W`), then the server ends.
  /// Waits briefly so the reply leaves before the process exits.
  public func machineStopped(_ reason: MachineStopReason) {
    exitStatus.withLock { $0 = reason.exitStatus }
    wake()
    for _ in 0..<200 where !finished.load(ordering: .acquiring) { usleep(5000) }
  }

  private func startThread(_ body: @escaping @Sendable () -> Void) throws(GDBServerError) {
    final class Start {
      let body: @Sendable () -> Void
      init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    let context = Unmanaged.passRetained(Start(body)).toOpaque()
    let result = pthread_create(
      &thread, nil,
      { context in
        Unmanaged<Start>.fromOpaque(context!).takeRetainedValue().body()
        return nil
      }, context)
    guard result == 0 else {
      Unmanaged<Start>.fromOpaque(context).release()
      throw GDBServerError("cannot start the gdb stub thread: \(String(cString: strerror(result)))")
    }
    pthread_detach(thread)
  }

  // MARK: Server thread

  private func drainWake() {
    var buffer = [UInt8](repeating: 0, count: 64)
    while read(wakeRead, &buffer, buffer.count) > 0 {}
  }

  private func serve(_ session: Session) {
    defer { finished.store(true, ordering: .releasing) }
    while exitStatus.withLock({ $0 }) == nil {
      var fds = [
        pollfd(fd: listener, events: Int16(POLLIN), revents: 0),
        pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0),
      ]
      guard poll(&fds, 2, 1000) >= 0 || errno == EINTR else { return }
      if fds[1].revents != 0 { drainWake() }
      if fds[0].revents & Int16(POLLIN) != 0 {
        let client = accept(listener, nil, nil)
        if client < 0 { continue }
        _ = fcntl(client, F_SETFD, FD_CLOEXEC)
        var yes: Int32 = 1
        setsockopt(client, Int32(IPPROTO_TCP), TCP_NODELAY, &yes, socklen_t(MemoryLayout<Int32>.size))
        serveClient(client, session)
        close(client)
      }
    }
  }

  /// Serves one gdb connection until it detaches, disconnects or the machine stops.
  private func serveClient(_ client: Int32, _ session: Session) {
    let connection = Connection(fd: client)
    session.connected()
    var reader = GDBPacketReader()
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
      if let status = exitStatus.withLock({ $0 }) {
        connection.send(session.machineExited(status: status))
        return
      }
      if session.isRunning, let event = events.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) {
        connection.send(session.stopped(by: event))
        continue
      }
      var fds = [
        pollfd(fd: client, events: Int16(POLLIN), revents: 0), pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0),
      ]
      guard poll(&fds, 2, 1000) >= 0 || errno == EINTR else { break }
      if fds[1].revents != 0 { drainWake() }
      guard fds[0].revents != 0 else { continue }
      let count = read(client, &buffer, buffer.count)
      if count <= 0 { break }
      for event in reader.feed(buffer[0..<count]) {
        switch event {
        case .acknowledgement: break
        case .corrupt: if !session.noAcknowledgements { connection.sendRaw([UInt8(ascii: "-")]) }
        case .interrupt:
          if session.isRunning {
            let pending = events.withLock { $0.isEmpty ? nil : $0.removeFirst() }
            connection.send(session.interrupt(pending: pending))
          }
        case .packet(let payload):
          if !session.noAcknowledgements { connection.sendRaw([UInt8(ascii: "+")]) }
          // In all-stop mode gdb sends nothing but Ctrl-C while the machine runs.
          if session.isRunning { continue }
          // The machine is stopped: queued events are stale (reported or superseded).
          events.withLock { $0.removeAll() }
          let outcome = session.handle(payload)
          if let reply = outcome.reply { connection.send(reply) }
          if outcome.closeConnection { return }
        }
      }
    }
    // The connection ended without D: detach.
    session.detach()
  }
}

/// One TCP connection's sending side.
private struct Connection {
  let fd: Int32

  func send(_ payload: String) { sendRaw(GDBWire.frame(Array(payload.utf8))) }
  func send(_ payload: [UInt8]) { sendRaw(GDBWire.frame(payload)) }

  func sendRaw(_ bytes: [UInt8]) {
    var offset = 0
    while offset < bytes.count {
      let sent = bytes[offset...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
      if sent < 0 && errno == EINTR { continue }
      if sent <= 0 { return }
      offset += sent
    }
  }
}
