import ArgumentParser
import ControlAPI
import Foundation
import Glibc
import Sandbox
import VMCore
import VMM

/// What `serve`, `run --api-sock` and the Firecracker and Cloud Hypervisor personalities share:
/// starting the control-plane service, exiting cleanly, waiting.
enum ManagedProcess {
  struct Options {
    var socketPath: String?
    var configFile: String?
    var noAPI = false
    var id = "anonymous-instance"
    var accelerator = AcceleratorChoice.auto
    var cpuModel: GuestCPUModel?
    var level: String?
    var logPath: String?
    var verbose = false
    var incoming: String?
    /// The sandbox to enter once the API socket is open (`serve --sandbox`).
    var sandbox: SandboxOptions?
  }

  /// The socket to remove when the process exits.
  nonisolated(unsafe) static var socketToRemove: String?

  /// Prints one error line and exits with `status`.
  static func exit(_ status: Int32, message: String? = nil, tool: String = "hostvisor") -> Never {
    if let message { printError("\(tool): error: \(message)") }
    if let socketToRemove { unlink(socketToRemove) }
    Glibc.exit(status)
  }

  /// Starts the control plane (and the API server when `socketPath` is set). The process exits
  /// when the guest stops by itself or after `vmm.shutdown`.
  static func startService(instanceID: String, spec: VMSpec, socketPath: String?) throws -> ControlAPIService {
    do {
      let service = try ControlAPIService(instanceID: instanceID, baseSpec: spec, socketPath: socketPath) { status in
        // Let responses already being written (e.g. the InstanceStart that booted a guest which
        // stopped at once, or vmm.shutdown's 204) reach their clients.
        usleep(100_000)
        ManagedProcess.exit(status)
      }
      socketToRemove = socketPath
      return service
    } catch {
      throw CommandFailure(error.description)
    }
  }

  /// Parks the main thread; the process ends through `exit`.
  static func waitForever() -> Never {
    while true { sleep(3600) }
  }

  /// Enters the sandbox (the API's threads and socket exist; the machine does not yet). Paths
  /// the API is given from now on are paths inside the jail; the socket is removed at exit
  /// only if it lies inside the jail too.
  static func enterSandbox(_ sandbox: SandboxOptions, socketPath: String?, verbose: Bool) {
    func resolved(_ path: String) -> String? {
      guard let result = realpath(path, nil) else { return nil }
      defer { free(result) }
      return String(cString: result)
    }
    let jail = sandbox.jailDirectory.flatMap(resolved)
    let socket = socketPath.flatMap { path in
      resolved(URL(fileURLWithPath: path).deletingLastPathComponent().path).map {
        $0 + "/" + URL(fileURLWithPath: path).lastPathComponent
      }
    }
    do {
      try Sandbox.enter(sandbox)
    } catch {
      exit(1, message: "\(error)")
    }
    if let jail, let socket, socket.hasPrefix(jail + "/") {
      socketToRemove = String(socket.dropFirst(jail.count))
    } else {
      socketToRemove = nil
    }
    if verbose { reportSandboxEntered(sandbox) }
  }

  /// The `--verbose` line that says the sandbox is in place (tests wait for it).
  static func reportSandboxEntered(_ sandbox: SandboxOptions) {
    printError(
      "hostvisor: sandbox: entered (root: \(sandbox.jailDirectory ?? "empty"); user \(sandbox.uid), group \(sandbox.gid); seccomp filters per thread kind)"
    )
  }

  /// `serve` and the Firecracker personality: serve the APIs, boot from a configuration file
  /// when given one, and wait.
  static func serve(options: Options) -> Never {
    LogSink.bootstrap(instanceID: options.id)
    if options.level != nil || options.logPath != nil {
      var level: LogSink.Level?
      if let name = options.level {
        guard let parsed = LogSink.Level(name: name) else {
          exit(1, message: "invalid log level '\(name)': use Error, Warning, Info, Debug, Trace or Off")
        }
        level = parsed
      }
      do {
        try LogSink.shared.configure(path: options.logPath, level: level, showLevel: nil, showOrigin: nil, module: nil)
      } catch {
        exit(1, message: error.description)
      }
    }
    if options.noAPI, options.configFile == nil {
      exit(1, message: "--no-api needs --config-file: without the API nothing could configure the machine")
    }
    guard options.noAPI || options.socketPath != nil else {
      exit(1, message: "--api-sock is required (or --no-api with --config-file)")
    }
    var spec = VMSpec()
    spec.accelerator = options.accelerator
    spec.cpuModel = options.cpuModel
    spec.verbose = options.verbose
    let service: ControlAPIService
    do {
      service = try startService(
        instanceID: options.id, spec: spec, socketPath: options.noAPI ? nil : options.socketPath)
    } catch let error as CommandFailure {
      exit(1, message: error.message)
    } catch {
      exit(1, message: "\(error)")
    }
    // A configuration file is a host path: read before the jail hides it.
    let configuration = options.configFile.map { FileManager.default.contents(atPath: $0) }
    if let sandbox = options.sandbox {
      enterSandbox(sandbox, socketPath: options.socketPath, verbose: options.verbose)
    }
    if let incoming = options.incoming {
      guard options.configFile == nil else { exit(1, message: "--incoming and --config-file exclude each other") }
      do {
        try service.plane.receiveIncomingMigration(from: incoming)
      } catch {
        exit(1, message: error.description)
      }
    }
    if let configFile = options.configFile {
      guard let contents = configuration ?? nil else {
        exit(1, message: "cannot read the configuration file \(configFile)")
      }
      do {
        try service.router.firecracker.applyConfigFile(Array(contents))
        try service.plane.controller.start()
      } catch let error as ControlFailure {
        exit(1, message: error.description)
      } catch {
        exit(1, message: "\(error)")
      }
    }
    waitForever()
  }
}

/// The `firecracker` personality: Firecracker's own command-line flags.
struct FirecrackerMode: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "firecracker",
    abstract: "Hostvisor with Firecracker's command line and API (a drop-in for the firecracker binary).")

  @Option(name: .customLong("api-sock"), help: "Path to the API Unix socket.")
  var apiSocket: String = "/run/firecracker.socket"
  @Option(name: .customLong("config-file"), help: "Firecracker JSON configuration to boot at once.")
  var configFile: String?
  @Flag(name: .customLong("no-api"), help: "Serve no API (needs --config-file).")
  var noAPI = false
  @Option(name: .long, help: "MicroVM unique identifier.")
  var id: String = "anonymous-instance"
  @Flag(name: .long, help: "Print the version and exit.")
  var version = false
  @Option(name: .long, help: "Log level: Error, Warning, Info, Debug, Trace or Off.")
  var level: String?
  @Option(name: .customLong("log-path"), help: "Path to a file or named pipe for the log.")
  var logPath: String?
  @Flag(name: .customLong("show-level"), help: "Show the level in each log line.")
  var showLevel = false
  @Flag(name: .customLong("show-log-origin"), help: "Show the file and line in each log line.")
  var showLogOrigin = false
  @Option(name: .long, help: "Only log messages from this module.")
  var module: String?
  @Option(name: .customLong("metrics-path"), help: "Path to a file or named pipe for the metrics.")
  var metricsPath: String?
  @Option(name: .customLong("http-api-max-payload-size"), help: "Largest API request body in bytes.")
  var maxPayloadSize: Int = 51_200
  @Flag(name: .customLong("boot-timer"), help: "Accepted for compatibility; no effect.")
  var bootTimer = false
  @Flag(name: .customLong("no-seccomp"), help: "Accepted for compatibility; Hostvisor installs no seccomp filter.")
  var noSeccomp = false
  @Option(name: .customLong("seccomp-filter"), help: "Refused: Hostvisor installs no seccomp filter.")
  var seccompFilter: String?
  @Option(name: .customLong("mmds-size-limit"), help: "Accepted for compatibility; there is no MMDS.")
  var mmdsSizeLimit: Int?
  @Option(name: .customLong("start-time-us"), help: "Accepted for compatibility (jailer).")
  var startTimeMicroseconds: UInt64?
  @Option(name: .customLong("start-time-cpu-us"), help: "Accepted for compatibility (jailer).")
  var startTimeCPUMicroseconds: UInt64?
  @Option(name: .customLong("parent-cpu-time-us"), help: "Accepted for compatibility (jailer).")
  var parentCPUTimeMicroseconds: UInt64?
  @Flag(name: .customLong("enable-pci"), help: "Accepted for compatibility; devices are always on PCI.")
  var enablePCI = false

  func run() throws {
    if version {
      // Kata's Firecracker driver takes the second word of the first line as the version.
      print("Firecracker v\(FirecrackerAPI.apiVersion) (Hostvisor \(HostvisorVersion.version), Firecracker-compatible)")
      return
    }
    if seccompFilter != nil {
      ManagedProcess.exit(1, message: "--seccomp-filter is not supported: Hostvisor installs no seccomp filter")
    }
    LogSink.bootstrap(instanceID: id)
    let accelerator = ProcessInfo.processInfo.environment["HOSTVISOR_ACCEL"].flatMap(AcceleratorChoice.init) ?? .auto
    if showLevel || showLogOrigin || module != nil {
      try? LogSink.shared.configure(
        path: nil, level: nil, showLevel: showLevel, showOrigin: showLogOrigin, module: module)
    }
    ManagedProcess.serve(
      options: ManagedProcess.Options(
        socketPath: apiSocket, configFile: configFile, noAPI: noAPI, id: id, accelerator: accelerator,
        level: level, logPath: logPath))
  }
}

/// The `cloud-hypervisor` personality: Cloud Hypervisor's `--api-socket` and the boot options
/// that map onto Hostvisor.
struct CloudHypervisorMode: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "cloud-hypervisor",
    abstract: "Hostvisor with Cloud Hypervisor's command line and API (a drop-in for cloud-hypervisor).")

  @Option(name: .customLong("api-socket"), help: "API socket: path=PATH or PATH.")
  var apiSocket: String?
  @Flag(name: .customLong("version"), help: "Print the version and exit.")
  var version = false
  @Option(name: .long, help: "Kernel to boot at once (creates and boots the VM).")
  var kernel: String?
  @Option(name: .long, help: "Kernel command line.")
  var cmdline: String?
  @Option(name: .long, help: "Initial ramdisk.")
  var initramfs: String?
  @Option(name: .long, help: "boot=N[,max=N]")
  var cpus: String?
  @Option(name: .long, help: "size=SIZE (e.g. 512M)")
  var memory: String?
  @Option(name: .long, help: "path=PATH[,readonly=on] (repeatable)")
  var disk: [String] = []
  @Option(name: .long, help: "tty, off, null or file=PATH")
  var serial: String?
  @Option(name: .long, help: "tty, off or null")
  var console: String?
  @Option(name: .customLong("log-file"), help: "Write the log to this file.")
  var logFile: String?
  @Flag(name: .customShort("v"), help: "More log output (repeatable).")
  var verbosity: Int
  @Option(name: .long, help: "Accepted for compatibility; Hostvisor installs no seccomp filter.")
  var seccomp: String?

  func run() throws {
    if version {
      // Kata's Cloud Hypervisor driver expects exactly two words, the second MAJOR.MINOR.REVISION.
      print("cloud-hypervisor v\(CloudHypervisorAPI.apiVersion)-hostvisor")
      return
    }
    var socketPath: String?
    if let apiSocket {
      let value = apiSocket.hasPrefix("path=") ? String(apiSocket.dropFirst(5)) : apiSocket
      guard !value.hasPrefix("fd="), !value.contains(",") else {
        ManagedProcess.exit(1, message: "--api-socket: only path=PATH is supported", tool: "cloud-hypervisor")
      }
      socketPath = value
    }
    LogSink.bootstrap(instanceID: "cloud-hypervisor")
    let levels: [LogSink.Level] = [.warning, .info, .debug, .trace]
    try? LogSink.shared.configure(
      path: logFile, level: levels[min(verbosity, 3)], showLevel: true, showOrigin: false, module: nil)
    var spec = VMSpec()
    spec.accelerator = ProcessInfo.processInfo.environment["HOSTVISOR_ACCEL"].flatMap(AcceleratorChoice.init) ?? .auto
    let service: ControlAPIService
    do {
      service = try ManagedProcess.startService(instanceID: "cloud-hypervisor", spec: spec, socketPath: socketPath)
    } catch {
      ManagedProcess.exit(1, message: "\(error)", tool: "cloud-hypervisor")
    }
    if let kernel {
      let body = try bootConfiguration(kernel: kernel)
      for (endpoint, payload) in [("vm.create", body), ("vm.boot", "")] {
        let response = service.router.cloudHypervisor.handle(
          APIRequest(method: "PUT", path: CloudHypervisorAPI.prefix + endpoint, body: Array(payload.utf8)))
        guard response.status < 300 else {
          ManagedProcess.exit(
            1, message: String(decoding: response.body, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines),
            tool: "cloud-hypervisor")
        }
      }
    } else if socketPath == nil {
      ManagedProcess.exit(1, message: "give --kernel or --api-socket", tool: "cloud-hypervisor")
    }
    ManagedProcess.waitForever()
  }

  /// A `VmConfig` JSON body from the command-line options.
  private func bootConfiguration(kernel: String) throws -> String {
    func options(_ text: String) -> [String: String] {
      var result: [String: String] = [:]
      for part in text.split(separator: ",") {
        let pair = part.split(separator: "=", maxSplits: 1).map(String.init)
        result[pair[0]] = pair.count > 1 ? pair[1] : ""
      }
      return result
    }
    func fail(_ message: String) -> Never { ManagedProcess.exit(1, message: message, tool: "cloud-hypervisor") }
    var config: [String: Any] = [
      "payload": ["kernel": kernel, "cmdline": cmdline ?? "", "initramfs": initramfs as Any]
    ]
    if initramfs == nil { config["payload"] = ["kernel": kernel, "cmdline": cmdline ?? ""] }
    if let cpus {
      guard let boot = options(cpus)["boot"].flatMap({ Int($0) }) else { fail("--cpus: expected boot=N") }
      config["cpus"] = ["boot_vcpus": boot, "max_vcpus": options(cpus)["max"].flatMap { Int($0) } ?? boot]
    }
    if let memory {
      guard let size = options(memory)["size"], let bytes = try? MemorySize.parse(size) else {
        fail("--memory: expected size=SIZE")
      }
      config["memory"] = ["size": bytes]
    }
    config["disks"] = try disk.map { text -> [String: Any] in
      let values = options(text)
      guard let path = values["path"] else { throw CommandFailure("--disk: expected path=PATH") }
      return ["path": path, "readonly": values["readonly"] == "on" || values["readonly"] == "true"]
    }
    func mode(_ text: String?, allowFile: Bool) -> [String: Any]? {
      guard let text else { return nil }
      switch text.lowercased() {
      case "tty": return ["mode": "Tty"]
      case "off": return ["mode": "Off"]
      case "null": return ["mode": "Null"]
      default:
        if allowFile, text.hasPrefix("file=") { return ["mode": "File", "file": String(text.dropFirst(5))] }
        fail("unsupported console mode '\(text)'")
      }
    }
    config["serial"] = mode(serial, allowFile: true)
    config["console"] = mode(console, allowFile: false)
    let data = try JSONSerialization.data(withJSONObject: config, options: [.withoutEscapingSlashes])
    return String(decoding: data, as: UTF8.self)
  }
}
