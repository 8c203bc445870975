import Glibc
import Synchronization
import VMCore

/// A failure to start the VNC server, as one clear line.
public struct VNCServerError: Error, CustomStringConvertible, Sendable {
  public let description: String
  init(_ description: String) { self.description = description }
}

/// What a VNC client does to the machine: key presses (X11 keysyms) and pointer events.
public struct VNCInputHandlers: Sendable {
  /// A key went down (`true`) or up: its X11 keysym.
  public var key: @Sendable (_ keysym: UInt32, _ down: Bool) -> Void
  /// The pointer moved or a button changed: position and button mask.
  public var pointer: @Sendable (_ x: Int, _ y: Int, _ buttons: UInt8) -> Void

  public init(
    key: @escaping @Sendable (UInt32, Bool) -> Void = { _, _ in },
    pointer: @escaping @Sendable (Int, Int, UInt8) -> Void = { _, _, _ in }
  ) {
    self.key = key
    self.pointer = pointer
  }
}

/// An RFB 3.8 server (RFC 6143; 3.3 and 3.7 clients too) with security type None, serving a
/// `Framebuffer`: Raw and ZRLE encodings, the DesktopSize pseudo-encoding, incremental updates
/// of the 64x64 tiles that changed since the client's last update, any number of clients.
///
/// One host thread accepts connections and each client has a thread of its own; none of them
/// touches the guest, which never waits for the server. With no client connected, nothing runs
/// but the blocked accept.
public final class VNCServer: @unchecked Sendable {
  /// The bound address, as `HOST:PORT`.
  public let address: String
  let framebuffer: Framebuffer
  let name: String
  let input: VNCInputHandlers
  private let listener: Int32
  private let stopped = Atomic<Bool>(false)
  private let clientSockets = Mutex<Set<Int32>>([])
  private let connectedCount = Atomic<Int>(0)

  /// Parses `[HOST:]PORT` (an IPv4 host or `localhost`; default 127.0.0.1).
  public static func parseAddress(_ text: String) -> (host: String, port: UInt16)? {
    var host = "127.0.0.1"
    var portText = Substring(text)
    if let colon = text.lastIndex(of: ":") {
      host = String(text[..<colon])
      portText = text[text.index(after: colon)...]
      if host.isEmpty || host == "localhost" { host = "127.0.0.1" }
    }
    var probe = in_addr()
    guard let port = UInt16(portText), inet_pton(AF_INET, host, &probe) == 1 else { return nil }
    return (host, port)
  }

  /// Binds `[HOST:]PORT` (port 0 picks a free one; see `address`) and starts accepting clients.
  public init(
    framebuffer: Framebuffer, listenAddress: String, name: String = "hostvisor", input: VNCInputHandlers = .init()
  ) throws(VNCServerError) {
    guard let (host, port) = Self.parseAddress(listenAddress) else {
      throw VNCServerError("invalid VNC address '\(listenAddress)': expected [HOST:]PORT with an IPv4 HOST")
    }
    self.framebuffer = framebuffer
    self.name = name
    self.input = input
    let fd: Int32
    do {
      let opened = try TCPListener.open(host: host, port: port, backlog: 8)
      fd = opened.descriptor
      address = "\(host):\(opened.port)"
    } catch {
      throw VNCServerError("VNC server: \(error)")
    }
    listener = fd
    if case .failure(let error) = HostThread.start(detached: true, { [self] in acceptLoop() }) {
      close(fd)
      throw VNCServerError("cannot start the VNC server: \(error)")
    }
  }

  /// Clients connected now.
  public var clientCount: Int { connectedCount.load(ordering: .relaxed) }

  /// Stops accepting, disconnects every client; their threads end on their own.
  public func stop() {
    guard !stopped.exchange(true, ordering: .acquiringAndReleasing) else { return }
    shutdown(listener, Int32(SHUT_RDWR))
    clientSockets.withLock { sockets in
      for socket in sockets { shutdown(socket, Int32(SHUT_RDWR)) }
    }
  }

  var isStopped: Bool { stopped.load(ordering: .acquiring) }

  private func acceptLoop() {
    defer { close(listener) }
    while !isStopped {
      let client = accept(listener, nil, nil)
      if client < 0 {
        if errno == EINTR || errno == ECONNABORTED { continue }
        return
      }
      if isStopped {
        close(client)
        return
      }
      _ = fcntl(client, F_SETFD, FD_CLOEXEC)
      var yes: Int32 = 1
      setsockopt(client, Int32(IPPROTO_TCP), TCP_NODELAY, &yes, socklen_t(MemoryLayout<Int32>.size))
      clientSockets.withLock { _ = $0.insert(client) }
      connectedCount.add(1, ordering: .relaxed)
      let started = HostThread.start(detached: true) { [self] in
        VNCSession(server: self, socket: client).run()
        clientSockets.withLock { _ = $0.remove(client) }
        connectedCount.subtract(1, ordering: .relaxed)
        close(client)
      }
      if case .failure = started {
        clientSockets.withLock { _ = $0.remove(client) }
        connectedCount.subtract(1, ordering: .relaxed)
        close(client)
      }
    }
  }
}
