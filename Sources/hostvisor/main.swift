import ArgumentParser
import Glibc
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
      0 when the guest powers off or resets; 1 with one error line on any failure. \
      On the terminal, Ctrl-A x quits and Ctrl-A Ctrl-A sends Ctrl-A.
      """
  )

  @Option(
    name: .long,
    help: ArgumentHelp(
      "Kernel to boot: a Linux bzImage, an ELF64/ELF32 image or a Multiboot v1 image.", valueName: "path"))
  var kernel: String

  @Option(name: .long, help: ArgumentHelp("Initial ramdisk handed to a Linux or Multiboot kernel.", valueName: "path"))
  var initrd: String?

  @Option(name: .long, help: ArgumentHelp("Kernel command line.", valueName: "string"))
  var cmdline: String = "console=ttyS0"

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
      "Where COM1 goes: stdio (this terminal), file:PATH (appended), or none.", valueName: "stdio|file:PATH|none"))
  var serial: String = "stdio"

  @Option(
    name: .customLong("kvm-device"),
    help: ArgumentHelp("Path of the KVM device.", valueName: "path", visibility: .hidden))
  var kvmDevice: String = "/dev/kvm"

  @Flag(name: .long, help: "Report the chosen accelerator and machine layout on standard error.")
  var verbose = false

  func run() throws {
    do {
      guard let acceleratorChoice = AcceleratorChoice(rawValue: accel) else {
        throw CommandFailure("invalid accelerator '\(accel)': use auto, kvm or soft")
      }
      let configuration = MachineConfiguration(
        kernelPath: kernel, initrdPath: initrd, commandLine: cmdline,
        memorySize: try MemorySize.parse(memory), cpuCount: cpus, accelerator: acceleratorChoice,
        serial: try SerialChoice(parsing: serial), kvmDevicePath: kvmDevice, verbose: verbose)
      let machine = try VirtualMachine(configuration: configuration)
      let reason = try machine.run()
      if verbose { printError("hostvisor: \(reason)") }
      if case .failure(let message) = reason {
        printError("hostvisor: error: \(message)")
      }
      Glibc.exit(reason.exitStatus)
    } catch let error as CommandFailure {
      fail(error.message)
    } catch {
      fail("\(error)")
    }
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
