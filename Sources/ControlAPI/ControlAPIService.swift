import Dispatch
import Foundation
import Glibc
import Logging
import VMCore
import VMM

/// Sends `/api/v1/...` to the Cloud Hypervisor frontend and everything else to the Firecracker
/// frontend.
public struct ControlAPIRouter: APIRequestHandler {
  /// The Firecracker frontend.
  public let firecracker: FirecrackerAPI
  /// The Cloud Hypervisor frontend.
  public let cloudHypervisor: CloudHypervisorAPI

  public init(firecracker: FirecrackerAPI, cloudHypervisor: CloudHypervisorAPI) {
    self.firecracker = firecracker
    self.cloudHypervisor = cloudHypervisor
  }

  public func handle(_ request: APIRequest) -> APIResponse {
    if request.path.hasPrefix(CloudHypervisorAPI.prefix) {
      return cloudHypervisor.handle(request)
    }
    return firecracker.handle(request)
  }

  public func rejection(for path: String, status: Int, message: String) -> APIResponse {
    if path.hasPrefix(CloudHypervisorAPI.prefix) { return .text(status, message) }
    var response = FirecrackerAPI.fault(message)
    response.status = status
    return response
  }
}

/// A managed machine with both APIs: the control plane, the two frontends and (unless the API
/// is disabled) the server on the Unix socket. `hostvisor serve` and `run --api-sock` use it.
public final class ControlAPIService: Sendable {
  /// The shared state of both frontends.
  public let plane: ControlPlane
  /// The request router.
  public let router: ControlAPIRouter
  /// The socket server; nil with `--no-api`.
  public let server: APIServer?
  private let flusher: MetricsFlusher

  /// Creates the control plane for `baseSpec` and, when `socketPath` is given, serves both
  /// APIs on it. `onExit` ends the process with a status: after `vmm.shutdown`, or when the
  /// guest stops by itself.
  public init(
    instanceID: String, baseSpec: VMSpec, socketPath: String?, limits: APIServerLimits = APIServerLimits(),
    onExit: @escaping @Sendable (Int32) -> Void
  ) throws(APIServerError) {
    // From here on the process has event loops and, later, machines: their messages must not
    // wait for standard error (a failure to start the writer leaves them written directly).
    try? DiagnosticOutput.standardError.start()
    LogSink.bootstrap(instanceID: instanceID)
    plane = ControlPlane(instanceID: instanceID, baseSpec: baseSpec) { reason in
      if case .failure(let message) = reason {
        Logger(label: "vmm").error("the machine failed: \(message)")
      }
      onExit(reason.exitStatus)
    }
    let firecracker = FirecrackerAPI(plane: plane)
    let router = ControlAPIRouter(
      firecracker: firecracker, cloudHypervisor: CloudHypervisorAPI(plane: plane, requestExit: onExit))
    self.router = router
    if let socketPath {
      server = try APIServer(socketPath: socketPath, handler: router, limits: limits)
    } else {
      server = nil
    }
    flusher = MetricsFlusher(api: firecracker)
  }

  /// Stops serving and removes the socket.
  public func close() {
    flusher.stop()
    server?.close()
  }
}

/// Writes a metrics line once a minute while metrics are configured, as Firecracker does.
final class MetricsFlusher: Sendable {
  private let stopped = DispatchSemaphore(value: 0)

  init(api: FirecrackerAPI) {
    let stopped = self.stopped
    let thread = Thread {
      while stopped.wait(timeout: .now() + .seconds(60)) == .timedOut {
        if api.plane.metrics.isConfigured { try? api.flushMetrics() }
      }
    }
    thread.name = "metrics"
    thread.start()
  }

  func stop() { stopped.signal() }
}
