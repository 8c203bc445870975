import NIOCore
import NIOHTTP1
import NIOPosix

/// A minimal HTTP/1.1 client over a Unix socket, on SwiftNIO, for `hostvisor ctl`.
public enum APIClient {
  /// The answer to one request.
  public struct Response: Sendable {
    /// The HTTP status code.
    public var status: Int
    /// The body as text.
    public var body: String
  }

  /// Sends one request to the server at `socketPath` and waits for its answer (at most
  /// `timeoutSeconds`).
  public static func send(
    socketPath: String, method: String, path: String, body: String? = nil, timeoutSeconds: Int64 = 120
  ) throws(APIServerError) -> Response {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    defer { try? group.syncShutdownGracefully() }
    let promise = group.next().makePromise(of: Response.self)
    let bootstrap = ClientBootstrap(group: group)
      .connectTimeout(.seconds(5))
      .channelInitializer { channel in
        channel.eventLoop.makeCompletedFuture {
          try channel.pipeline.syncOperations.addHTTPClientHandlers()
          try channel.pipeline.syncOperations.addHandler(ResponseCollector(promise: promise))
        }
      }
    let channel: any Channel
    do {
      channel = try bootstrap.connect(unixDomainSocketPath: socketPath).wait()
    } catch {
      promise.fail(error)
      throw APIServerError("cannot connect to the API socket \(socketPath): \(error)")
    }
    defer { channel.close(promise: nil) }
    var headers = HTTPHeaders()
    headers.add(name: "Host", value: "localhost")
    headers.add(name: "Accept", value: "application/json")
    let bytes = Array((body ?? "").utf8)
    headers.add(name: "Content-Length", value: "\(bytes.count)")
    if body != nil { headers.add(name: "Content-Type", value: "application/json") }
    let head = HTTPRequestHead(
      version: .http1_1, method: HTTPMethod(rawValue: method), uri: path, headers: headers)
    channel.write(HTTPClientRequestPart.head(head), promise: nil)
    if !bytes.isEmpty {
      var buffer = channel.allocator.buffer(capacity: bytes.count)
      buffer.writeBytes(bytes)
      channel.write(HTTPClientRequestPart.body(.byteBuffer(buffer)), promise: nil)
    }
    channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
    let timeout = channel.eventLoop.scheduleTask(in: .seconds(timeoutSeconds)) {
      promise.fail(APIServerError("no answer within \(timeoutSeconds) s"))
    }
    defer { timeout.cancel() }
    do {
      return try promise.futureResult.wait()
    } catch let error as APIServerError {
      throw error
    } catch {
      throw APIServerError("the request failed: \(error)")
    }
  }
}

/// Collects one response and completes the promise.
final class ResponseCollector: ChannelInboundHandler {
  typealias InboundIn = HTTPClientResponsePart

  private let promise: EventLoopPromise<APIClient.Response>
  private var status = 0
  private var body: [UInt8] = []

  init(promise: EventLoopPromise<APIClient.Response>) {
    self.promise = promise
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    switch unwrapInboundIn(data) {
    case .head(let head):
      status = Int(head.status.code)
    case .body(var buffer):
      body += buffer.readBytes(length: buffer.readableBytes) ?? []
    case .end:
      promise.succeed(APIClient.Response(status: status, body: String(decoding: body, as: UTF8.self)))
    }
  }

  func channelInactive(context: ChannelHandlerContext) {
    promise.fail(APIServerError("the server closed the connection"))
    context.fireChannelInactive()
  }

  func errorCaught(context: ChannelHandlerContext, error: any Error) {
    promise.fail(error)
    context.close(promise: nil)
  }
}
