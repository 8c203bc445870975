import Glibc
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// One HTTP request as the frontends see it: method, path, query and the whole body.
public struct APIRequest: Sendable {
  /// The HTTP method, e.g. `GET`.
  public var method: String
  /// The path without the query, e.g. `/drives/rootfs`.
  public var path: String
  /// The query string after `?`, if any.
  public var query: String?
  /// The request body (empty when there is none).
  public var body: [UInt8]

  public init(method: String, path: String, query: String? = nil, body: [UInt8] = []) {
    self.method = method
    self.path = path
    self.query = query
    self.body = body
  }
}

/// One HTTP response from a frontend.
public struct APIResponse: Sendable {
  /// The HTTP status code.
  public var status: Int
  /// The body (empty for 204).
  public var body: [UInt8]
  /// The body's media type; nil when there is no body.
  public var contentType: String?
  /// Extra response headers (e.g. `Allow` on 405).
  public var headers: [(name: String, value: String)] = []
  /// Work to do once the response has been written (e.g. exiting the process after
  /// `vmm.shutdown`).
  public var afterResponse: (@Sendable () -> Void)?

  public init(
    status: Int, body: [UInt8] = [], contentType: String? = nil, afterResponse: (@Sendable () -> Void)? = nil
  ) {
    self.status = status
    self.body = body
    self.contentType = contentType
    self.afterResponse = afterResponse
  }

  /// 204 No Content.
  public static let noContent = APIResponse(status: 204)

  /// A JSON body with `status`.
  public static func json(_ status: Int, _ body: [UInt8]) -> APIResponse {
    APIResponse(status: status, body: body, contentType: "application/json")
  }

  /// A one-line plain-text body with `status`.
  public static func text(_ status: Int, _ message: String) -> APIResponse {
    APIResponse(status: status, body: Array((message + "\n").utf8), contentType: "text/plain")
  }
}

/// Limits that keep a slow, silent or hostile client from stalling the API or the VMM.
public struct APIServerLimits: Sendable {
  /// Largest request body accepted (Firecracker's default `--http-api-max-payload-size`).
  public var maxBodyBytes = 51_200
  /// Largest total size of all request header names and values.
  public var maxHeaderBytes = 8 * 1024
  /// Most header fields in one request.
  public var maxHeaderCount = 64
  /// Most connections open at once; further ones are closed as soon as they are accepted.
  public var maxConnections = 32
  /// A connection with no traffic at all for this long is closed.
  public var idleTimeout: TimeAmount = .seconds(60)
  /// A request whose head has arrived but whose body has not completed within this time is
  /// answered with 400 and the connection closed.
  public var requestTimeout: TimeAmount = .seconds(10)

  public init() {}
}

/// Why the API server could not start.
public struct APIServerError: Error, CustomStringConvertible, Sendable {
  public let description: String
  public init(_ description: String) { self.description = description }
}

/// Something that answers API requests. `handle` runs on a worker thread of the server's
/// blocking pool, never on the event loop and never on a vCPU thread, so it may block.
public protocol APIRequestHandler: Sendable {
  /// Answers one request.
  func handle(_ request: APIRequest) -> APIResponse
  /// The response for a request that was refused before it reached `handle` (too large,
  /// too many headers, timed out): status and one line.
  func rejection(for path: String, status: Int, message: String) -> APIResponse
}

/// The control API's HTTP/1.1 server on a Unix socket, on SwiftNIO. One event-loop thread
/// does all socket I/O; request handling runs on a small blocking pool.
public final class APIServer: Sendable {
  /// The socket's path.
  public let socketPath: String
  private let group: MultiThreadedEventLoopGroup
  private let pool: NIOThreadPool
  private let channel: any Channel

  /// Creates the socket at `path` (mode 0600) and starts serving `handler`. Refuses a path
  /// that exists and is not a socket (it never follows or replaces a regular file, directory
  /// or symbolic link); a socket that nobody listens on any more is replaced, one in use is
  /// an error.
  public init(socketPath path: String, handler: any APIRequestHandler, limits: APIServerLimits = APIServerLimits())
    throws(APIServerError)
  {
    try Self.prepareSocketPath(path)
    socketPath = path
    group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    pool = NIOThreadPool(numberOfThreads: 4)
    pool.start()
    let connections = ConnectionCounter()
    let pool = self.pool
    let bootstrap = ServerBootstrap(group: group)
      .serverChannelOption(.backlog, value: 32)
      .childChannelInitializer { channel in
        channel.eventLoop.makeCompletedFuture {
          guard connections.open(limit: limits.maxConnections) else {
            channel.close(promise: nil)
            return
          }
          channel.closeFuture.whenComplete { _ in connections.close() }
          var decoderLimits = NIOHTTPDecoderLimitConfiguration()
          decoderLimits.maxHeaderListSize = limits.maxHeaderBytes
          decoderLimits.maxHeaderFieldSize = limits.maxHeaderBytes
          decoderLimits.maxHeaderFieldCount = limits.maxHeaderCount
          try channel.pipeline.syncOperations.addHandler(IdleStateHandler(allTimeout: limits.idleTimeout))
          try channel.pipeline.syncOperations.configureHTTPServerPipeline(
            withErrorHandling: true, withEncoderConfiguration: .init(),
            withDecoderLimitConfiguration: decoderLimits)
          try channel.pipeline.syncOperations.addHandler(
            APIConnectionHandler(handler: handler, pool: pool, limits: limits))
        }
      }
    // The socket is created with the umask in force: make it 0600 from the start.
    let savedMask = umask(0o177)
    defer { umask(savedMask) }
    do {
      channel = try bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: false).wait()
    } catch {
      try? pool.syncShutdownGracefully()
      try? group.syncShutdownGracefully()
      throw APIServerError("cannot listen on the API socket \(path): \(error)")
    }
    chmod(path, 0o600)
  }

  /// Stops accepting connections, closes the socket and removes its path.
  public func close() {
    try? channel.close().wait()
    unlink(socketPath)
    try? pool.syncShutdownGracefully()
    try? group.syncShutdownGracefully()
  }

  /// Checks the socket path: nothing there, or a stale socket (removed); anything else is an
  /// error.
  static func prepareSocketPath(_ path: String) throws(APIServerError) {
    guard !path.isEmpty else { throw APIServerError("the API socket path is empty") }
    guard path.utf8.count < 108 else { throw APIServerError("the API socket path is too long: \(path)") }
    var status = stat()
    guard lstat(path, &status) == 0 else {
      if errno == ENOENT { return }
      throw APIServerError("cannot use the API socket path \(path): \(String(cString: strerror(errno)))")
    }
    guard status.st_mode & S_IFMT == S_IFSOCK else {
      throw APIServerError("the API socket path \(path) exists and is not a socket; refusing to replace it")
    }
    if socketAcceptsConnections(path) {
      throw APIServerError("the API socket \(path) is in use by another process")
    }
    guard unlink(path) == 0 else {
      throw APIServerError("cannot remove the stale API socket \(path): \(String(cString: strerror(errno)))")
    }
  }

  private static func socketAcceptsConnections(_ path: String) -> Bool {
    let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard descriptor >= 0 else { return false }
    defer { Glibc.close(descriptor) }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
      for (index, byte) in path.utf8.enumerated() where index < raw.count - 1 { raw[index] = byte }
    }
    return withUnsafePointer(to: &address) { pointer in
      pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0
      }
    }
  }
}

/// Counts open connections against the limit.
final class ConnectionCounter: Sendable {
  private let count = Atomic<Int>(0)

  func open(limit: Int) -> Bool {
    let now = count.wrappingAdd(1, ordering: .relaxed).newValue
    if now > limit {
      count.wrappingSubtract(1, ordering: .relaxed)
      return false
    }
    return true
  }

  func close() { count.wrappingSubtract(1, ordering: .relaxed) }
}

/// Collects one request (head, body up to the limit), hands it to the blocking pool and writes
/// the answer. Runs on the event loop only.
final class APIConnectionHandler: ChannelInboundHandler {
  typealias InboundIn = HTTPServerRequestPart
  typealias OutboundOut = HTTPServerResponsePart

  private let handler: any APIRequestHandler
  private let pool: NIOThreadPool
  private let limits: APIServerLimits
  private var head: HTTPRequestHead?
  private var body: [UInt8] = []
  private var rejected = false
  /// A rejected request's remaining body is read and dropped, then the connection closes (so
  /// the client, still sending, reads the answer instead of a reset).
  private var closeAtEnd = false
  private var busy = false
  private var requestTimer: Scheduled<Void>?

  init(handler: any APIRequestHandler, pool: NIOThreadPool, limits: APIServerLimits) {
    self.handler = handler
    self.pool = pool
    self.limits = limits
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    switch unwrapInboundIn(data) {
    case .head(let requestHead):
      head = requestHead
      body = []
      rejected = false
      closeAtEnd = false
      let declared = requestHead.headers.first(name: "content-length").flatMap { Int($0) } ?? 0
      if declared > limits.maxBodyBytes {
        reject(context: context, message: oversizeMessage(declared), closeNow: false)
      }
      let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
      requestTimer = context.eventLoop.scheduleTask(in: limits.requestTimeout) {
        let (handler, context) = bound.value
        if handler.rejected {
          context.close(promise: nil)
        } else {
          handler.reject(context: context, message: "The request did not complete in time.", closeNow: true)
        }
      }
    case .body(var buffer):
      guard !rejected else { return }
      if body.count + buffer.readableBytes > limits.maxBodyBytes {
        reject(context: context, message: oversizeMessage(body.count + buffer.readableBytes), closeNow: false)
        return
      }
      body += buffer.readBytes(length: buffer.readableBytes) ?? []
    case .end:
      requestTimer?.cancel()
      requestTimer = nil
      if rejected {
        if closeAtEnd { context.close(promise: nil) }
        return
      }
      guard let head else { return }
      dispatch(context: context, head: head)
    }
  }

  private func oversizeMessage(_ size: Int) -> String {
    "Request payload with size \(size) is larger than the limit of \(limits.maxBodyBytes) allowed by server."
  }

  /// Answers with 400 and closes the connection: at once (`closeNow`), or once the rest of the
  /// request has been read and dropped (the request timer still bounds that).
  private func reject(context: ChannelHandlerContext, message: String, closeNow: Bool) {
    guard !rejected, !busy else { return }
    rejected = true
    closeAtEnd = !closeNow
    if closeNow {
      requestTimer?.cancel()
      requestTimer = nil
    }
    let path = head.map { Self.splitTarget($0.uri).path } ?? "/"
    write(
      context: context, response: handler.rejection(for: path, status: 400, message: message), keepAlive: false,
      closeAfterWrite: closeNow)
  }

  private func dispatch(context: ChannelHandlerContext, head: HTTPRequestHead) {
    let target = Self.splitTarget(head.uri)
    let request = APIRequest(method: head.method.rawValue, path: target.path, query: target.query, body: body)
    body = []
    busy = true
    let handler = self.handler
    let keepAlive = head.isKeepAlive
    let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
    pool.runIfActive(eventLoop: context.eventLoop) { handler.handle(request) }.whenComplete { result in
      let (connection, context) = bound.value
      connection.busy = false
      switch result {
      case .success(let response):
        connection.write(context: context, response: response, keepAlive: keepAlive)
      case .failure:
        connection.write(
          context: context, response: handler.rejection(for: request.path, status: 500, message: "server stopping"),
          keepAlive: false)
      }
    }
  }

  private func write(
    context: ChannelHandlerContext, response: APIResponse, keepAlive: Bool, closeAfterWrite: Bool = true
  ) {
    var headers = HTTPHeaders()
    headers.add(name: "Server", value: "Hostvisor")
    if let contentType = response.contentType { headers.add(name: "Content-Type", value: contentType) }
    headers.add(name: "Content-Length", value: "\(response.body.count)")
    for header in response.headers { headers.add(name: header.name, value: header.value) }
    if !keepAlive { headers.add(name: "Connection", value: "close") }
    let status = HTTPResponseStatus(statusCode: response.status)
    context.write(
      wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
    if !response.body.isEmpty {
      var buffer = context.channel.allocator.buffer(capacity: response.body.count)
      buffer.writeBytes(response.body)
      context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
    }
    let channel = context.channel
    let after = response.afterResponse
    context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
      if !keepAlive, closeAfterWrite { channel.close(promise: nil) }
      after?()
    }
  }

  func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
    if event is IdleStateHandler.IdleStateEvent, !busy {
      context.close(promise: nil)
      return
    }
    context.fireUserInboundEventTriggered(event)
  }

  func errorCaught(context: ChannelHandlerContext, error: any Error) {
    context.close(promise: nil)
  }

  func channelInactive(context: ChannelHandlerContext) {
    requestTimer?.cancel()
    requestTimer = nil
    context.fireChannelInactive()
  }

  /// Splits a request target into its path and query.
  static func splitTarget(_ uri: String) -> (path: String, query: String?) {
    guard let mark = uri.firstIndex(of: "?") else { return (uri, nil) }
    return (String(uri[..<mark]), String(uri[uri.index(after: mark)...]))
  }
}
