import ArgumentParser
import Glibc
import VMCore
import VMM

/// `hostvisor`: a hosted virtual machine monitor for x86-64 guests.
struct Hostvisor: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "hostvisor",
    abstract: "A hosted virtual machine monitor: runs an x86-64 PC guest as an ordinary process.",
    subcommands: [Run.self],
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
    help: ArgumentHelp("Guest RAM: a number with an optional K/M/G/T suffix (a bare number is MiB).", valueName: "size")
  )
  var memory: String = "512M"

  @Option(name: .long, help: ArgumentHelp("Number of virtual CPUs (1-64).", valueName: "n"))
  var cpus: Int = 1

  @Option(
    name: .long,
    help: ArgumentHelp(
      "CPU accelerator: auto (KVM when usable, else the software CPU), kvm, or soft.", valueName: "auto|kvm|soft"))
  var accel: String = "auto"

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
      "A virtio-net interface on host TAP device NAME (created if missing; not brought up), or on user-mode networking through passt (no privileges; guest 10.0.2.15/24 by DHCP, gateway 10.0.2.2 reaches the host's loopback; hostfwd forwards a host port into the guest). Optional MAC (default: random 52:54:00:xx:xx:xx). Repeatable.",
      valueName: "tap=NAME|user[,hostfwd=tcp:[HOST]:PORT-:GUESTPORT...][,mac=xx:xx:xx:xx:xx:xx]"))
  var net: [String] = []

  @Option(
    name: .long,
    help: ArgumentHelp(
      "Guest console: serial (COM1, ttyS0) or virtio (hvc0 on a virtio-console wired to this terminal).",
      valueName: "serial|virtio"))
  var console: String = "serial"

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

  @Flag(name: .long, help: "Report the chosen accelerator and machine layout on standard error.")
  var verbose = false

  @Option(
    name: .long,
    help: ArgumentHelp(
      "Restore a snapshot instead of booting: its state file (the memory file recorded in it, or STATE,memory=PATH).",
      valueName: "state"))
  var restore: String?

  @Option(
    name: .customLong("snapshot-on-signal"),
    help: ArgumentHelp("On SIGUSR2, snapshot to STATE and STATE.mem.", valueName: "state", visibility: .hidden))
  var snapshotOnSignal: String?

  func run() throws {
    do {
      guard let acceleratorChoice = AcceleratorChoice(rawValue: accel) else {
        throw CommandFailure("invalid accelerator '\(accel)': use auto, kvm or soft")
      }
      let consoleChoice = try ConsoleChoice(parsing: console)
      let serialChoice = try serial.map { text throws(ConfigurationError) in try SerialChoice(parsing: text) }
      if snapshotOnSignal != nil { VirtualMachine.blockSnapshotSignal() }
      if let restore {
        let machine = try VirtualMachine.restore(
          commandLineArgument: restore, serial: serialChoice ?? .stdio, verbose: verbose)
        if let snapshotOnSignal { try machine.snapshotOnSignal(statePath: snapshotOnSignal) }
        finish(try machine.run())
      }
      guard let kernel else { throw CommandFailure("missing --kernel (or --restore)") }
      var configuration = MachineConfiguration(
        kernelPath: kernel, initrdPath: initrd,
        commandLine: cmdline ?? (consoleChoice == .virtio ? "console=hvc0" : "console=ttyS0"),
        memorySize: try MemorySize.parse(memory), cpuCount: cpus, accelerator: acceleratorChoice,
        serial: serialChoice ?? (consoleChoice == .virtio ? .none : .stdio), kvmDevicePath: kvmDevice,
        verbose: verbose)
      configuration.console = consoleChoice
      configuration.disks = try disk.map { text throws(ConfigurationError) in try DiskConfiguration(parsing: text) }
      configuration.networks = try net.map { text throws(ConfigurationError) in
        try NetworkConfiguration(parsing: text)
      }
      guard tripleFault == "error" || tripleFault == "reset" else {
        throw CommandFailure("invalid --triple-fault '\(tripleFault)': use error or reset")
      }
      let machine = try VirtualMachine(configuration: configuration)
      if let gdb { try machine.startGDBServer(listen: gdb, waitForDebugger: gdbWait) }
      if let snapshotOnSignal { try machine.snapshotOnSignal(statePath: snapshotOnSignal) }
      finish(try machine.run())
    } catch let error as CommandFailure {
      fail(error.message)
    } catch {
      fail("\(error)")
    }
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
}

/// A user-facing failure with its message.
struct CommandFailure: Error {
  let message: String
  init(_ message: String) { self.message = message }
}

func printError(_ message: String) {
  var line = message + "\n"
  line.withUTF8 { buffer in _ = write(STDERR_FILENO, buffer.baseAddress, buffer.count) }
}

Hostvisor.main()
