import ArgumentParser
import ControlAPI
import Devices
import Foundation
import Glibc
import Sandbox
import VMCore
import VMM
import Virtio

/// `hostvisor`: a hosted virtual machine monitor for x86-64 guests.
struct Hostvisor: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "hostvisor",
    abstract: "A hosted virtual machine monitor: runs an x86-64 PC guest as an ordinary process.",
    subcommands: [Run.self, Serve.self, Ctl.self, MergeMemory.self],
    defaultSubcommand: nil
  )
}

/// `hostvisor run`: boots one guest and runs it until it stops.
struct Run: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Boot a kernel and run the guest until it powers off, resets or exits.",
    discussion: """
      Exit status: the guest's isa-debug-exit code ((value << 1) | 1) when it writes to port 0xF4; \
      0 when the guest powers off or resets; 1 with one error line on any failure; 2 after a triple fault \
      (with one line naming the exception and RIP), unless --triple-fault reset treats it as a reset. \
      On the terminal, Ctrl-A x quits and Ctrl-A Ctrl-A sends Ctrl-A.

      Every machine has a PCI bus (ECAM at 0xE0000000, described by ACPI MCFG and \\_SB.PCI0) \
      with virtio devices in this order from slot 1: each --disk (virtio-blk), each --net \
      (virtio-net), the virtio console with --console virtio, and always a virtio-rng.
      """
  )

  @Option(
    name: .long,
    help: ArgumentHelp(
      "Kernel to boot: a Linux bzImage, an ELF64/ELF32 image or a Multiboot v1 image.", valueName: "path"))
  var kernel: String?

  @Option(name: .long, help: ArgumentHelp("Initial ramdisk handed to a Linux or Multiboot kernel.", valueName: "path"))
  var initrd: String?

  @Option(
    name: .long,
    help: ArgumentHelp(
      "Kernel command line (default: console=ttyS0, or console=hvc0 with --console virtio).", valueName: "string"))
  var cmdline: String?

  @Option(
    name: .long,
    help: ArgumentHelp(
      "Guest RAM: a number with an optional K/M/G/T suffix (a bare number is MiB); merge=on lets the host's KSM "
        + "merge identical pages (MADV_MERGEABLE), hugepages=on asks for transparent huge pages (MADV_HUGEPAGE).",
      valueName: "size[,merge=on][,hugepages=on]"))
  var memory: String = "512M"

  @Option(name: .long, help: ArgumentHelp("Number of virtual CPUs (1-64).", valueName: "n"))
  var cpus: Int = 1

  @Option(
    name: .long,
    help: ArgumentHelp(
      "CPU accelerator: auto (KVM when usable, else the software CPU), kvm, or soft.", valueName: "auto|kvm|soft"))
  var accel: String = "auto"

  @Option(
    name: .customLong("cpu-model"),
    help: ArgumentHelp(
      "The CPU model the guest sees: hostvisor (default on the software CPU), x86-64-v3, x86-64-v2 or x86-64 "
        + "(movable between accelerators), host (KVM's own CPUID; default on KVM).",
      valueName: "name"))
  var cpuModel: String?

  @Option(
    name: .long,
    help: ArgumentHelp(
      "Where COM1 goes: stdio (this terminal), file:PATH (appended), or none (default: stdio; none with --console virtio).",
      valueName: "stdio|file:PATH|none"))
  var serial: String?

  @Option(
    name: .long,
    help: ArgumentHelp(
      "A virtio-blk disk on a raw image file or block device; ',readonly' makes it read-only. Repeatable.",
      valueName: "path[,readonly]"))
  var disk: [String] = []

  @Option(
    name: .long,
    help: ArgumentHelp(
      "A network interface on host TAP device NAME (created if missing; not brought up; offloads=off offers the guest no checksum/segmentation offloads), or on user-mode networking through passt (no privileges; guest 10.0.2.15/24 by DHCP, gateway 10.0.2.2 reaches the host's loopback; hostfwd forwards a host port into the guest). model=e1000 emulates an Intel 82540EM (Linux e1000), model=rtl8139 a Realtek RTL8139C (Linux 8139too), instead of virtio-net. Optional MAC (default: random 52:54:00:xx:xx:xx). Repeatable.",
      valueName:
        "tap=NAME[,offloads=off]|user[,hostfwd=tcp:[HOST]:PORT-:GUESTPORT...][,mac=xx:xx:xx:xx:xx:xx][,model=virtio|e1000|rtl8139]"
    ))
  var net: [String] = []

  @Option(
    name: .long,
    help: ArgumentHelp(
      "Guest console: serial (COM1, ttyS0) or virtio (hvc0 on a virtio-console wired to this terminal).",
      valueName: "serial|virtio"))
  var console: String = "serial"

  @Option(
    name: .long,
    help: ArgumentHelp(
      "A virtio-balloon device (target 0 unless target= is given; the API changes it): on, or any of deflate-on-oom (the guest deflates instead of running out of memory), stats=SECONDS (statistics polling interval), reporting (free page reporting: the guest's free pages go back to the host), target=MIB.",
      valueName: "on|[deflate-on-oom][,stats=SECONDS][,reporting][,target=MIB]"))
  var balloon: String?

  @Option(
    name: .long,
    help: ArgumentHelp(
      "A screen: none (default: no display device), or vnc=[HOST:]PORT (a framebuffer the guest's efifb drives, a PS/2 keyboard, a virtio-input tablet unless tablet=off, and a VNC server on HOST, default 127.0.0.1); see docs/display.md.",
      valueName: "none|vnc=[HOST:]PORT[,tablet=off]"))
  var display: String = "none"

  @Option(
    name: .customLong("kvm-device"),
    help: ArgumentHelp("Path of the KVM device.", valueName: "path", visibility: .hidden))
  var kvmDevice: String = "/dev/kvm"

  @Option(
    name: .customLong("triple-fault"),
    help: ArgumentHelp(
      "What a guest triple fault does: error (one line on standard error, exit status 2; default) or reset (handled like any guest reset: exit status 0).",
      valueName: "error|reset"))
  var tripleFault: String = "error"

  @Option(
    name: .long,
    help: ArgumentHelp(
      "Serve the gdb remote protocol on [HOST:]PORT (default host 127.0.0.1); see docs/gdb.md.",
      valueName: "[host:]port"))
  var gdb: String?

  @Flag(name: .customLong("gdb-wait"), help: "With --gdb: stop before the first instruction until gdb continues.")
  var gdbWait = false

  @Option(
    name: .customLong("softcpu-tier"),
    help: ArgumentHelp(
      "With --accel soft: interp (the interpreter only), jit (hot blocks translated to host code) or lockstep (every translated block checked against the interpreter; a difference stops the machine with a report). Default: $HOSTVISOR_SOFTCPU_TIER, else jit.",
      valueName: "interp|jit|lockstep"))
  var softCPUTier: String =
    ProcessInfo.processInfo.environment["HOSTVISOR_SOFTCPU_TIER"] ?? SoftCPUExecutionTier.standard.rawValue

  @Option(
    name: .customLong("softcpu-threshold"),
    help: ArgumentHelp("Executions of a block before the software CPU translates it (0-1000000).", valueName: "n"))
  var softCPUThreshold: Int = Int(SoftCPUExecutionTier.defaultThreshold)

  @Flag(name: .long, help: "Report the chosen accelerator and machine layout on standard error.")
  var verbose = false

  @Option(
    name: .long,
    help: ArgumentHelp(
      "Restore a snapshot instead of booting: STATE (the memory file recorded in it), STATE,memory=PATH, or a diff snapshot STATE,memory=BASE[,diff=PATH]...; add ,eager to read the memory into RAM. "
        + "With --accel kvm|soft it restores on that accelerator, converting a state taken on the other one.",
      valueName: "state"))
  var restore: String?

  @Option(
    name: .customLong("snapshot-on-signal"),
    help: ArgumentHelp("On SIGUSR2, snapshot to STATE and STATE.mem.", valueName: "state", visibility: .hidden))
  var snapshotOnSignal: String?

  @Option(
    name: .customLong("api-sock"),
    help: ArgumentHelp(
      "Also serve the Firecracker and Cloud Hypervisor APIs on this Unix socket (created 0600).", valueName: "path"))
  var apiSocket: String?

  @OptionGroup(title: "Sandbox") var sandboxArguments: SandboxArguments

  @OptionGroup(title: "cgroups") var cgroupArguments: CgroupArguments

  func run() throws {
    do {
      let offReason = SandboxArguments.defaultOffReason(
        apiSocket: apiSocket, gdb: gdb, snapshotOnSignal: snapshotOnSignal)
      var sandboxed = sandboxArguments.enabled(defaultOffReason: offReason)
      try sandboxArguments.validate(enabled: sandboxed)
      if verbose, !sandboxArguments.isExplicit, geteuid() == 0, let offReason {
        printError("hostvisor: sandbox: off by default with \(offReason); --sandbox turns it on")
      }
      let probePath = (kernel ?? restore).map { URL(fileURLWithPath: $0).standardizedFileURL.path }
      if sandboxed {
        TerminalConsole.recordJobStateBeforePIDNamespace()
        do throws(SandboxError) {
          try Sandbox.prepare()
        } catch {
          // On by default only: a root the host denies namespaces (an unprivileged container)
          // still runs its VM, with one line saying it is not sandboxed.
          let explicit = sandboxArguments.isExplicit
          guard error.isUnavailable, !explicit else { throw error }
          printError("hostvisor: warning: \(error.description); running without the sandbox (--no-sandbox: no warning)")
          sandboxed = false
        }
      }
      let sandboxOptions = sandboxed ? try sandboxArguments.options(probePath: probePath) : nil
      // The disks get `--io-max` when the machine opens them (`HostDiskDevices`).
      if let limits = try cgroupArguments.limits() { try cgroupArguments.apply(limits) }
      guard let acceleratorChoice = AcceleratorChoice(rawValue: accel) else {
        throw CommandFailure("invalid accelerator '\(accel)': use auto, kvm or soft")
      }
      let consoleChoice = try ConsoleChoice(parsing: console)
      let serialChoice = try serial.map { text throws(ConfigurationError) in try SerialChoice(parsing: text) }
      if snapshotOnSignal != nil { VirtualMachine.blockSnapshotSignal() }
      let cpuModelChoice = try cpuModel.map { name throws(ConfigurationError) in try GuestCPUModel.named(name) }
      if let restore {
        guard cpuModelChoice == nil else {
          throw CommandFailure("--cpu-model does not apply to --restore: the snapshot records its CPU model")
        }
        let machine = try VirtualMachine.restore(
          commandLineArgument: restore, serial: serialChoice ?? .stdio, verbose: verbose,
          accelerator: acceleratorChoice)
        if let snapshotOnSignal { try machine.snapshotOnSignal(statePath: snapshotOnSignal) }
        if let sandboxOptions { try enterSandbox(sandboxOptions) }
        finish(try machine.run())
      }
      guard let kernel else { throw CommandFailure("missing --kernel (or --restore)") }
      let (memorySize, memoryAdvice) = try MemorySize.parseWithAdvice(memory)
      var configuration = MachineConfiguration(
        kernelPath: kernel, initrdPath: initrd,
        commandLine: cmdline ?? (consoleChoice == .virtio ? "console=hvc0" : "console=ttyS0"),
        memorySize: memorySize, cpuCount: cpus, accelerator: acceleratorChoice,
        serial: serialChoice ?? (consoleChoice == .virtio ? .none : .stdio), kvmDevicePath: kvmDevice,
        verbose: verbose)
      configuration.memoryAdvice = memoryAdvice
      configuration.console = consoleChoice
      configuration.cpuModel = cpuModelChoice
      guard let tier = SoftCPUExecutionTier(rawValue: softCPUTier) else {
        throw CommandFailure("invalid --softcpu-tier '\(softCPUTier)': use interp, jit or lockstep")
      }
      guard (0...1_000_000).contains(softCPUThreshold) else {
        throw CommandFailure("invalid --softcpu-threshold \(softCPUThreshold): use 0 to 1000000")
      }
      configuration.softCPUTier = tier
      configuration.softCPUThreshold = UInt32(softCPUThreshold)
      configuration.disks = try disk.map { text throws(ConfigurationError) in try DiskConfiguration(parsing: text) }
      configuration.networks = try net.map { text throws(ConfigurationError) in
        try NetworkConfiguration(parsing: text)
      }
      configuration.balloon = try balloon.map { text throws(ConfigurationError) in
        try BalloonConfiguration(parsing: text)
      }
      configuration.display = try DisplayChoice(parsing: display)
      guard tripleFault == "error" || tripleFault == "reset" else {
        throw CommandFailure("invalid --triple-fault '\(tripleFault)': use error or reset")
      }
      if let apiSocket {
        try runManaged(configuration, socketPath: apiSocket, sandbox: sandboxOptions)
      }
      let machine = try VirtualMachine(configuration: configuration)
      if let gdb { try machine.startGDBServer(listen: gdb, waitForDebugger: gdbWait) }
      if let snapshotOnSignal { try machine.snapshotOnSignal(statePath: snapshotOnSignal) }
      if let sandboxOptions { try enterSandbox(sandboxOptions) }
      finish(try machine.run())
    } catch let error as CommandFailure {
      fail(error.message)
    } catch {
      fail("\(error)")
    }
  }

  /// Enters the sandbox; with --verbose, says so.
  private func enterSandbox(_ options: SandboxOptions) throws {
    try Sandbox.enter(options)
    if verbose { ManagedProcess.reportSandboxEntered(options) }
  }

  private func finish(_ stopReason: MachineStopReason) -> Never {
    var reason = stopReason
    if case .tripleFault = reason, tripleFault == "reset" {
      reason = .reset(reason: reason.description)
    }
    if verbose { printError("hostvisor: \(reason)") }
    switch reason {
    case .failure(let message): printError("hostvisor: error: \(message)")
    case .tripleFault where !verbose: printError("hostvisor: \(reason)")
    default: break
    }
    Glibc.exit(reason.exitStatus)
  }

  private func fail(_ message: String) -> Never {
    printError("hostvisor: error: \(message)")
    Glibc.exit(1)
  }

  /// Boots the configured machine under a control plane serving both APIs on `socketPath`;
  /// exits when the guest stops.
  private func runManaged(
    _ configuration: MachineConfiguration, socketPath: String, sandbox: SandboxOptions?
  ) throws -> Never {
    var spec = VMSpec()
    spec.kernelPath = configuration.kernelPath
    spec.initrdPath = configuration.initrdPath
    spec.bootArgs = configuration.commandLine
    spec.memoryMiB = Int((configuration.memorySize + (1 << 20) - 1) >> 20)
    spec.memoryAdvice = configuration.memoryAdvice
    spec.vcpuCount = configuration.cpuCount
    spec.accelerator = configuration.accelerator
    spec.cpuModel = configuration.cpuModel
    spec.serial = configuration.serial
    spec.console = configuration.console
    spec.verbose = configuration.verbose
    spec.balloon = configuration.balloon
    spec.display = configuration.display
    spec.drives = configuration.disks.enumerated().map { index, disk in
      DriveSpec(id: "disk\(index)", path: disk.path, readOnly: disk.readOnly)
    }
    // The API's network interfaces are virtio-net on a TAP (Firecracker's model): anything else
    // would come up as a TAP without a name.
    if let network = configuration.networks.first(where: {
      $0.tapName.isEmpty || $0.model != .virtio || !$0.offloads
    }) {
      let kind = network.tapName.isEmpty ? "user networking" : "model=\(network.model.rawValue) or offloads=off"
      throw CommandFailure("--api-sock supports --net tap=NAME (virtio) only: \(kind) is not available with it")
    }
    spec.networkInterfaces = configuration.networks.enumerated().map { index, network in
      NetworkInterfaceSpec(id: "net\(index)", hostDeviceName: network.tapName, guestMAC: network.mac)
    }
    let service = try ManagedProcess.startService(instanceID: "anonymous-instance", spec: spec, socketPath: socketPath)
    do {
      try service.plane.bootConfiguredMachine()
    } catch {
      ManagedProcess.exit(1, message: error.description)
    }
    // The machine is built and running; its first instructions ran before this point.
    if let sandbox {
      do {
        try enterSandbox(sandbox)
      } catch {
        ManagedProcess.exit(1, message: "\(error)")
      }
    }
    ManagedProcess.waitForever()
  }
}

/// `hostvisor serve`: waits for configuration over the APIs and boots on InstanceStart or
/// `vm.boot`.
struct Serve: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Serve the Firecracker and Cloud Hypervisor APIs on a Unix socket and boot when told to.",
    discussion: """
      The guest's serial console is this process's standard input and output. The process exits \
      when the guest stops by itself (power-off, reset, debug exit) with the status `run` uses, \
      or after the Cloud Hypervisor request vmm.shutdown.
      """)

  @Option(
    name: .customLong("api-sock"),
    help: ArgumentHelp("Unix socket to serve both APIs on (created 0600).", valueName: "path"))
  var apiSocket: String?

  @Option(
    name: .customLong("config-file"),
    help: ArgumentHelp(
      "Firecracker JSON configuration (the keys of GET /vm/config) to boot at once.", valueName: "path"))
  var configFile: String?

  @Flag(name: .customLong("no-api"), help: "Serve no API; needs --config-file.")
  var noAPI = false

  @Option(name: .long, help: ArgumentHelp("Instance ID reported by GET /.", valueName: "id"))
  var id: String = "anonymous-instance"

  @Option(
    name: .long,
    help: ArgumentHelp("CPU accelerator: auto, kvm or soft.", valueName: "auto|kvm|soft"))
  var accel: String = "auto"

  @Option(
    name: .customLong("cpu-model"),
    help: ArgumentHelp(
      "The CPU model the guest sees: hostvisor (default on the software CPU), x86-64-v3, x86-64-v2 or x86-64 "
        + "(movable between accelerators), host (KVM's own CPUID; default on KVM).",
      valueName: "name"))
  var cpuModel: String?

  @Option(name: .long, help: ArgumentHelp("Log level: Error, Warning, Info, Debug, Trace or Off.", valueName: "level"))
  var level: String?

  @Option(name: .customLong("log-path"), help: ArgumentHelp("Write the log to this file or pipe.", valueName: "path"))
  var logPath: String?

  @Flag(name: .long, help: "Report the chosen accelerator and machine layout on standard error.")
  var verbose = false

  @Option(
    name: .long,
    help: ArgumentHelp(
      "Wait at URL (unix:PATH or tcp:HOST:PORT) for a live migration and run the migrated guest.", valueName: "url"))
  var incoming: String?

  @Option(
    name: .customLong("tap"),
    help: ArgumentHelp(
      "A TAP device the API may attach later (Firecracker's host_dev_name, Cloud Hypervisor's net tap): opened at start, while serve is still privileged (before --sandbox drops privileges), and created if missing. A TAP serve created is removed when serve exits; an existing persistent one stays. Each is attached to one network interface at a time. Repeatable. See docs/isolation.md.",
      valueName: "name"))
  var taps: [String] = []

  @OptionGroup(title: "Sandbox") var sandboxArguments: SandboxArguments

  @OptionGroup(title: "cgroups") var cgroupArguments: CgroupArguments

  func run() throws {
    guard let accelerator = AcceleratorChoice(rawValue: accel) else {
      ManagedProcess.exit(1, message: "invalid accelerator '\(accel)': use auto, kvm or soft")
    }
    validateTaps()
    // The sandbox: its namespaces now, while the process has one thread; the jail once the API
    // socket is open. The machine comes later from paths inside the jail, /dev/kvm and
    // /dev/net/tun from nodes the sandbox makes there for its user.
    var sandbox: SandboxOptions?
    do {
      // Off unless asked for: serve's sandbox needs a --jail holding what the API will name.
      let sandboxed = sandboxArguments.enabled(defaultOffReason: "serve")
      try sandboxArguments.validate(enabled: sandboxed)
      if sandboxed {
        guard sandboxArguments.jail != nil else {
          throw CommandFailure(
            "serve --sandbox needs --jail DIR: the kernel, disks and snapshots the API names are paths inside it")
        }
        TerminalConsole.recordJobStateBeforePIDNamespace()
        try Sandbox.prepare()
        sandbox = try sandboxArguments.options(probePath: nil)
        if accelerator != .soft && FileManager.default.fileExists(atPath: kvmDevicePath) {
          sandbox?.devices.append(kvmDevicePath)
        }
        // TAP devices the API attaches: the unprivileged VMM opens /dev/net/tun in its jail
        // and attaches to a TAP that exists already and belongs to its user or group.
        if FileManager.default.fileExists(atPath: tunDevicePath) {
          sandbox?.devices.append(tunDevicePath)
        }
      }
    } catch let error as CommandFailure {
      ManagedProcess.exit(1, message: error.message)
    } catch {
      ManagedProcess.exit(1, message: "\(error)")
    }
    // In the VMM's process (after the sandbox's fork, which closes what it inherited), while it
    // is still root.
    openTaps()
    // The whole serving process goes into the group at once, as Firecracker's jailer puts
    // Firecracker there; the vCPU and device threads the API's boot starts then move into
    // its vcpu and io children.
    do {
      // The API's drives get `--io-max` when they are opened (`HostDiskDevices`).
      if let limits = try cgroupArguments.limits() { try cgroupArguments.apply(limits) }
    } catch let error as CommandFailure {
      ManagedProcess.exit(1, message: error.message)
    } catch {
      ManagedProcess.exit(1, message: "\(error)")
    }
    var model: GuestCPUModel?
    if let cpuModel {
      do {
        model = try GuestCPUModel.named(cpuModel)
      } catch {
        ManagedProcess.exit(1, message: error.description)
      }
    }
    ManagedProcess.serve(
      options: ManagedProcess.Options(
        socketPath: apiSocket, configFile: configFile, noAPI: noAPI, id: id, accelerator: accelerator,
        cpuModel: model, level: level, logPath: logPath, verbose: verbose, incoming: incoming, sandbox: sandbox))
  }

  /// Refuses a `--tap` name the kernel would refuse or misread, and a name given twice, with
  /// one line, before anything else happens.
  private func validateTaps() {
    var seen: Set<String> = []
    for name in taps {
      if let problem = PreopenedTaps.problem(withName: name) {
        ManagedProcess.exit(1, message: "invalid --tap '\(name)': \(problem.reason)")
      }
      guard seen.insert(name).inserted else { ManagedProcess.exit(1, message: "--tap \(name) is given twice") }
    }
  }

  /// Opens (or creates) every `--tap` TAP and keeps its descriptor (`PreopenedTaps`), so the
  /// machines the API builds attach them without privileges; exits with one line when one
  /// cannot be opened. With `--verbose`, one line per TAP says whether it stays after exit.
  private func openTaps() {
    for name in taps {
      do {
        let tap = try PreopenedTaps.open(name)
        if verbose {
          printError(
            "hostvisor: tap: \(tap.name) opened at start ("
              + (tap.isPersistent ? "persistent: it stays when serve exits)" : "created: removed when serve exits)"))
        }
      } catch {
        var message = "--tap: \(error.description)"
        if case .cannotOpenTap(_, let number) = error {
          switch number {
          case EPERM, EACCES:
            message +=
              " (creating a TAP, or opening one that belongs to another user or group, needs CAP_NET_ADMIN: start"
              + " serve as root)"
          case ENOENT: message += " (the host has no /dev/net/tun)"
          case EBUSY: message += " (another process holds it)"
          default: break
          }
        }
        ManagedProcess.exit(1, message: message)
      }
    }
  }

  /// The KVM device a machine built after entry opens (the accelerator's default path).
  private var kvmDevicePath: String { "/dev/kvm" }
  /// The TUN/TAP clone device a TAP backend opens.
  private var tunDevicePath: String { "/dev/net/tun" }
}

/// `hostvisor ctl`: drives a running Hostvisor over its API socket, in the spirit of ch-remote.
struct Ctl: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Control a Hostvisor process over its API socket.",
    discussion: """
      Commands: ping, info, boot, pause, resume, power-button, reboot, shutdown, delete, counters, \
      shutdown-vmm, snapshot DIR, restore DIR [--resume], migrate send URL [--no-auto-converge], \
      migrate receive URL (URL: unix:PATH or tcp:HOST:PORT), screenshot FILE.png, sendkey KEYS (a \
      chord such as ctrl-alt-del, or a single key) and type TEXT. Prints JSON answers; one error \
      line and status 1 on failure.
      """)

  @Option(name: .customLong("api-sock"), help: ArgumentHelp("The process's API socket.", valueName: "path"))
  var apiSocket: String

  @Argument(parsing: .allUnrecognized, help: "The command and its arguments (options such as --resume included).")
  var command: [String]

  func run() throws {
    guard let verb = command.first else { ManagedProcess.exit(1, message: "no command given", tool: "hostvisor ctl") }
    let arguments = Array(command.dropFirst())
    let request: (method: String, endpoint: String, body: String?)
    func jsonString(_ text: String) -> String {
      let data = try? JSONSerialization.data(withJSONObject: [text], options: [.withoutEscapingSlashes])
      let array = data.map { String(decoding: $0, as: UTF8.self) } ?? "[\"\"]"
      return String(array.dropFirst().dropLast())
    }
    func directoryURL(_ path: String) -> String {
      jsonString(
        path.hasPrefix("file://")
          ? path : "file://" + (path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path))
    }
    switch (verb, arguments.count) {
    case ("ping", 0): request = ("GET", "vmm.ping", nil)
    case ("info", 0): request = ("GET", "vm.info", nil)
    case ("counters", 0): request = ("GET", "vm.counters", nil)
    case ("boot", 0), ("pause", 0), ("resume", 0), ("power-button", 0), ("reboot", 0), ("shutdown", 0), ("delete", 0):
      request = ("PUT", "vm.\(verb)", nil)
    case ("shutdown-vmm", 0): request = ("PUT", "vmm.shutdown", nil)
    case ("snapshot", 1):
      request = ("PUT", "vm.snapshot", "{\"destination_url\":\(directoryURL(arguments[0]))}")
    case ("restore", 1), ("restore", 2):
      let resume = arguments.count == 2 && arguments[1] == "--resume"
      guard arguments.count == 1 || resume else {
        ManagedProcess.exit(1, message: "usage: restore DIR [--resume]", tool: "hostvisor ctl")
      }
      request = ("PUT", "vm.restore", "{\"source_url\":\(directoryURL(arguments[0])),\"resume\":\(resume)}")
    case ("migrate", 2) where arguments[0] == "send",
      ("migrate", 3) where arguments[0] == "send" && arguments[2] == "--no-auto-converge":
      let autoConverge = arguments.count == 2
      request = (
        "PUT", "vm.send-migration",
        "{\"destination_url\":\(jsonString(arguments[1])),\"auto_converge\":\(autoConverge)}"
      )
    case ("screenshot", 1):
      request = ("PUT", "vm.hostvisor-screenshot", "{\"destination_url\":\(directoryURL(arguments[0]))}")
    case ("sendkey", 1):
      request = ("PUT", "vm.hostvisor-sendkey", "{\"keys\":\(jsonString(arguments[0]))}")
    case ("type", 1):
      request = ("PUT", "vm.hostvisor-sendkey", "{\"text\":\(jsonString(arguments[0]))}")
    case ("migrate", 2) where arguments[0] == "receive":
      request = ("PUT", "vm.receive-migration", "{\"receiver_url\":\(jsonString(arguments[1]))}")
    default:
      ManagedProcess.exit(
        1, message: "unknown command or wrong arguments: \(command.joined(separator: " "))", tool: "hostvisor ctl")
    }
    let response: APIClient.Response
    do {
      response = try APIClient.send(
        socketPath: apiSocket, method: request.method, path: CloudHypervisorAPI.prefix + request.endpoint,
        body: request.body, timeoutSeconds: 3600)
    } catch {
      ManagedProcess.exit(1, message: error.description, tool: "hostvisor ctl")
    }
    guard (200..<300).contains(response.status) else {
      let line = response.body.split(whereSeparator: \.isNewline).first.map(String.init) ?? ""
      ManagedProcess.exit(
        1, message: "\(request.endpoint) failed (HTTP \(response.status)): \(line)", tool: "hostvisor ctl")
    }
    if !response.body.isEmpty { print(response.body) }
  }
}

/// `hostvisor merge-memory`: lays diff snapshots' memory files over their base, in place.
struct MergeMemory: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "merge-memory",
    abstract: "Lay diff snapshots' memory files over a base memory file, in place.",
    discussion: """
      BASE is a full snapshot's memory file; each DIFF holds the pages written since the snapshot \
      before it, oldest first. Afterwards BASE holds the memory of the newest diff's snapshot: \
      restore that snapshot with `--restore STATE,memory=BASE`.
      """)

  @Argument(help: ArgumentHelp("The base memory file (modified in place).", valueName: "base"))
  var base: String

  @Argument(help: ArgumentHelp("Diff memory files, oldest first.", valueName: "diff"))
  var diffs: [String]

  func run() throws {
    guard !diffs.isEmpty else { ManagedProcess.exit(1, message: "merge-memory needs at least one diff file") }
    do {
      try GuestMemory.mergeDiffs(into: base, diffPaths: diffs)
    } catch {
      ManagedProcess.exit(1, message: error.description)
    }
  }
}

/// A user-facing failure with its message.
struct CommandFailure: Error {
  let message: String
  init(_ message: String) { self.message = message }
}

/// Writes `message` as one line on standard error: directly while the process starts, through
/// `DiagnosticOutput`'s buffer once a machine or the API runs (so lines keep their order, and
/// the buffer is written at exit within its bounded wait).
func printError(_ message: String) {
  DiagnosticOutput.standardError.write(message)
}

// A parent may have started us with terminating signals blocked or ignored (test harnesses,
// some supervisors): SIGTERM and SIGINT must end a VMM.
var unblockedSignals = sigset_t()
sigemptyset(&unblockedSignals)
for terminating in [SIGTERM, SIGINT, SIGHUP, SIGQUIT] {
  sigaddset(&unblockedSignals, terminating)
  signal(terminating, SIG_DFL)
}
sigprocmask(SIG_UNBLOCK, &unblockedSignals, nil)

switch URL(fileURLWithPath: CommandLine.arguments.first ?? "hostvisor").lastPathComponent {
case "firecracker": FirecrackerMode.main()
case "cloud-hypervisor": CloudHypervisorMode.main()
default: Hostvisor.main()
}
