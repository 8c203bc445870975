import FuzzSupport
import NIOCore
import NIOEmbedded
import NIOHTTP1
import VMM

@testable import ControlAPI

/// The control API's request handling: HTTP/1.1 parsing with the server's own pipeline
/// configuration (SwiftNIO's decoder with the server's limits, on an `EmbeddedChannel`, no
/// socket), the split of the request target, routing to the Firecracker or the Cloud
/// Hypervisor frontend, and the strict JSON decoding of every request body, on a fresh control
/// plane for each input.
///
/// Input: a mode byte. Even: the rest is a byte stream from a client (one or more requests).
/// Odd: an endpoint from the table of both APIs, then the body, so the fuzzer reaches the JSON
/// models directly.
///
/// Requests that act on the host (start a machine, write snapshots, logs or metrics, open
/// migration sockets, exit the process) are not performed: their bodies go through the same
/// strict decoding into their models instead, and the request is answered 400.
@main
enum FuzzAPI {
  /// Every endpoint both frontends serve (method, path).
  static let endpoints: [(String, String)] = [
    ("GET", "/"), ("GET", "/version"), ("GET", "/machine-config"), ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"), ("GET", "/vm/config"), ("PUT", "/boot-source"), ("PUT", "/drives/rootfs"),
    ("PATCH", "/drives/rootfs"), ("PUT", "/network-interfaces/eth0"), ("PATCH", "/network-interfaces/eth0"),
    ("PUT", "/entropy"), ("PUT", "/serial"), ("PUT", "/logger"), ("PUT", "/metrics"), ("PUT", "/actions"),
    ("PATCH", "/vm"), ("PUT", "/snapshot/create"), ("PUT", "/snapshot/load"), ("PUT", "/balloon"),
    ("PATCH", "/balloon"), ("GET", "/balloon"), ("GET", "/balloon/statistics"), ("PATCH", "/balloon/statistics"),
    ("GET", "/api/v1/vmm.ping"), ("PUT", "/api/v1/vmm.shutdown"), ("PUT", "/api/v1/vm.create"),
    ("PUT", "/api/v1/vm.boot"), ("GET", "/api/v1/vm.info"), ("GET", "/api/v1/vm.counters"),
    ("PUT", "/api/v1/vm.pause"), ("PUT", "/api/v1/vm.resume"), ("PUT", "/api/v1/vm.shutdown"),
    ("PUT", "/api/v1/vm.reboot"), ("PUT", "/api/v1/vm.power-button"), ("PUT", "/api/v1/vm.delete"),
    ("PUT", "/api/v1/vm.snapshot"), ("PUT", "/api/v1/vm.restore"), ("PUT", "/api/v1/vm.send-migration"),
    ("PUT", "/api/v1/vm.receive-migration"), ("PUT", "/api/v1/vm.resize"),
    ("PUT", "/api/v1/vm.hostvisor-screenshot"), ("PUT", "/api/v1/vm.hostvisor-sendkey"),
    ("PUT", "/api/v1/vm.add-disk"),
  ]

  /// Requests that would act on the host, with the decoding their body gets instead: any path
  /// that contains one of these words (however the frontends would normalise it).
  static let hostActing: [(word: String, decode: @Sendable ([UInt8]) -> Void)] = [
    ("logger", { _ = try? StrictJSON.decode(LoggerBody.self, from: $0) }),
    ("metrics", { _ = try? StrictJSON.decode(MetricsBody.self, from: $0) }),
    ("actions", { _ = try? StrictJSON.decode(InstanceActionInfo.self, from: $0) }),
    ("snapshot", { _ = try? StrictJSON.decode(SnapshotCreateParams.self, from: $0) }),
    ("load", { _ = try? StrictJSON.decode(SnapshotLoadParams.self, from: $0) }),
    ("vmm.shutdown", { _ in }),
    ("vm.boot", { _ in }),
    ("vm.snapshot", { _ = try? StrictJSON.decode(CHSnapshotConfig.self, from: $0) }),
    ("restore", { _ = try? StrictJSON.decode(CHRestoreConfig.self, from: $0) }),
    ("send-migration", { _ = try? StrictJSON.decode(CHSendMigrationData.self, from: $0) }),
    ("receive-migration", { _ = try? StrictJSON.decode(CHReceiveMigrationData.self, from: $0) }),
    ("screenshot", { _ = try? StrictJSON.decode(HostvisorScreenshotConfig.self, from: $0) }),
  ]

  static let limits = APIServerLimits()

  static func main() {
    LogSink.bootstrap(instanceID: "fuzz")
    FuzzDriver.run(name: "api", seeds: seeds) { input in runOne(&input) }
  }

  /// Collects the requests the HTTP decoder produces.
  final class RequestCollector: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    var requests: [APIRequest] = []
    var head: HTTPRequestHead?
    var body: [UInt8] = []
    var oversized = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
      switch unwrapInboundIn(data) {
      case .head(let requestHead):
        head = requestHead
        body = []
        let declared = requestHead.headers.first(name: "content-length").flatMap { Int($0) } ?? 0
        oversized = declared > FuzzAPI.limits.maxBodyBytes
      case .body(var buffer):
        if body.count + buffer.readableBytes > FuzzAPI.limits.maxBodyBytes { oversized = true }
        if !oversized { body += buffer.readBytes(length: buffer.readableBytes) ?? [] }
      case .end:
        guard let head, !oversized else { return }
        let target = APIConnectionHandler.splitTarget(head.uri)
        requests.append(APIRequest(method: head.method.rawValue, path: target.path, query: target.query, body: body))
        self.head = nil
      }
    }
  }

  static func runOne(_ input: inout FuzzInput) {
    let mode = input.byte()
    var requests: [APIRequest] = []
    if mode & 1 == 0 {
      requests = parseHTTP(input.rest())
    } else {
      let (method, path) = endpoints[Int(input.byte()) % endpoints.count]
      requests = [APIRequest(method: method, path: path, body: input.rest())]
    }
    guard !requests.isEmpty else { return }
    let plane = ControlPlane(instanceID: "fuzz", baseSpec: VMSpec())
    let router = ControlAPIRouter(
      firecracker: FirecrackerAPI(plane: plane), cloudHypervisor: CloudHypervisorAPI(plane: plane) { _ in })
    for request in requests {
      let acting = hostActing.filter { request.path.contains($0.word) }
      if !acting.isEmpty {
        for entry in acting { entry.decode(request.body) }
        _ = router.rejection(for: request.path, status: 400, message: "not performed while fuzzing")
        FuzzDriver.count("host-acting requests decoded")
        continue
      }
      let response = router.handle(request)
      precondition((200..<600).contains(response.status), "a response status outside HTTP's range")
      FuzzDriver.count(response.status < 300 ? "requests accepted" : "requests refused")
    }
  }

  /// The requests in `bytes` as the server's HTTP pipeline decodes them.
  static func parseHTTP(_ bytes: [UInt8]) -> [APIRequest] {
    let channel = EmbeddedChannel()
    let collector = RequestCollector()
    var decoderLimits = NIOHTTPDecoderLimitConfiguration()
    decoderLimits.maxHeaderListSize = limits.maxHeaderBytes
    decoderLimits.maxHeaderFieldSize = limits.maxHeaderBytes
    decoderLimits.maxHeaderFieldCount = limits.maxHeaderCount
    do {
      try channel.pipeline.syncOperations.configureHTTPServerPipeline(
        withErrorHandling: true, withEncoderConfiguration: .init(), withDecoderLimitConfiguration: decoderLimits)
      try channel.pipeline.syncOperations.addHandler(collector)
      var buffer = channel.allocator.buffer(capacity: bytes.count)
      buffer.writeBytes(bytes)
      try channel.writeInbound(buffer)
    } catch {
      FuzzDriver.count("HTTP streams refused")
    }
    _ = try? channel.finish()
    return collector.requests
  }

  static func seeds() -> [[UInt8]] {
    let bodies: [(String, String, String)] = [
      ("PUT", "/machine-config", #"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}"#),
      ("PUT", "/boot-source", #"{"kernel_image_path": "vmlinuz", "boot_args": "console=ttyS0"}"#),
      (
        "PUT", "/drives/rootfs",
        #"{"drive_id": "rootfs", "path_on_host": "disk.img", "is_root_device": true, "is_read_only": false}"#
      ),
      (
        "PUT", "/network-interfaces/eth0",
        #"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "52:54:00:12:34:56"}"#
      ),
      ("PUT", "/balloon", #"{"amount_mib": 16, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#),
      ("PATCH", "/vm", #"{"state": "Paused"}"#),
      ("PUT", "/actions", #"{"action_type": "InstanceStart"}"#),
      (
        "PUT", "/api/v1/vm.create",
        #"{"payload": {"kernel": "vmlinuz", "cmdline": "console=ttyS0"}, "cpus": {"boot_vcpus": 1, "max_vcpus": 1}, "memory": {"size": 268435456}, "disks": [{"path": "disk.img"}]}"#
      ),
      ("GET", "/api/v1/vm.info", ""),
      ("PUT", "/api/v1/vm.resize", #"{"desired_balloon": 1048576}"#),
    ]
    var seeds: [[UInt8]] = []
    for (method, path, body) in bodies {
      let request =
        "\(method) \(path)?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + "Content-Length: \(body.utf8.count)\r\n\r\n\(body)"
      seeds.append([0] + Array(request.utf8))
      if let index = endpoints.firstIndex(where: { $0.0 == method && $0.1 == path }) {
        seeds.append([1, UInt8(index)] + Array(body.utf8))
      }
    }
    return seeds
  }
}
