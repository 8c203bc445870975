import Devices
import Firmware
import Glibc
import InterruptControllers
import KVMBackend
import Loaders
import SoftCPU
import VMCore

/// A failure while building or running a machine, as one clear line.
public struct MachineError: Error, CustomStringConvertible, Sendable {
  public let description: String
  public init(_ description: String) { self.description = description }
}

/// One virtual machine: guest memory, devices, a loaded kernel and an accelerator, built
/// from a `MachineConfiguration`. The CLI and (later) the management API both drive this type.
public final class VirtualMachine: Sendable {
  /// What this machine was built from.
  public let configuration: MachineConfiguration
  /// Guest RAM, the I/O bus and the shared control block.
  public let parts: MachineParts
  /// The loaded kernel and the CPU state it starts in.
  public let boot: BootImage
  /// The legacy PC devices (UART, i8042, RTC, debug-exit, ...).
  public let devices: InstalledLegacyDevices
  /// The accelerator that runs the vCPUs.
  public let accelerator: any Accelerator

  /// Builds the machine: validates the configuration, maps RAM, loads the kernel, installs
  /// devices and opens the accelerator. Every failure is a one-line error.
  public init(configuration: MachineConfiguration) throws {
    self.configuration = configuration
    do {
      try configuration.validate()
    } catch {
      throw MachineError(error.description)
    }
    let memory: GuestMemory
    do {
      memory = try GuestMemory(size: configuration.memorySize)
    } catch {
      throw MachineError(error.description)
    }
    parts = MachineParts(memory: memory, bus: IOBus(), control: MachineControl(), interrupts: InterruptRouter())
    do {
      let tables = try ACPITables.build(cpuCount: configuration.cpuCount)
      try tables.install(into: memory)
    } catch {
      throw MachineError("cannot build the ACPI tables: \(error)")
    }
    do {
      boot = try KernelLoader.load(
        kernelPath: configuration.kernelPath, initrdPath: configuration.initrdPath,
        commandLine: configuration.commandLine, memory: memory,
        reservedMemory: [
          E820Entry(address: ACPITables.defaultBase, size: UInt64(ACPITables.defaultWindowSize), type: .reserved)
        ])
    } catch {
      throw MachineError(error.description)
    }
    let backend: any SerialBackend
    switch configuration.serial {
    case .stdio: backend = StdioSerialBackend()
    case .none: backend = NullSerialBackend()
    case .file(let path):
      do {
        backend = try FileSerialBackend(path: path)
      } catch {
        throw MachineError(error.description)
      }
    }
    let (accelerator, clock) = try Self.makeAccelerator(configuration: configuration, parts: parts)
    self.accelerator = accelerator
    do {
      devices = try LegacyDevices.install(
        on: parts.bus, control: parts.control, interrupts: parts.interrupts, serialBackend: backend,
        memorySize: configuration.memorySize)
      let powerManagement = ACPIPowerManagement(
        control: parts.control,
        sci: InterruptLine(router: parts.interrupts, line: UInt32(ACPIPowerManagement.sciInterrupt)),
        nanoseconds: { clock.nanoseconds })
      try powerManagement.register(on: parts.bus)
      if !parts.bus.hasPortDevice(ACPIResetRegister.port) {
        try parts.bus.registerPorts(ACPIResetRegister.port, count: 1, device: ACPIResetRegister(control: parts.control))
      }
    } catch {
      throw MachineError(error.description)
    }
    if configuration.verbose {
      Self.log(
        "accelerator: \(accelerator.name); kernel format: \(boot.format); memory: \(MemorySize.format(configuration.memorySize))"
      )
      for warning in boot.warnings { Self.log("loader: \(warning)") }
    }
  }

  /// Opens the accelerator the configuration asks for; `auto` probes KVM and falls back to the
  /// software CPU when KVM is missing or would emulate the guest's kernel code.
  private static func makeAccelerator(
    configuration: MachineConfiguration, parts: MachineParts
  ) throws -> (any Accelerator, any MachineClock) {
    var choice = configuration.accelerator
    if choice == .auto {
      let finding = AcceleratorProbe.probeKVM(devicePath: configuration.kvmDevicePath)
      choice = finding.kvmUsable ? .kvm : .soft
      if configuration.verbose { log("accelerator probe: \(finding); choosing \(choice.rawValue)") }
    }
    switch choice {
    case .kvm, .auto:
      do {
        let accelerator = try KVMAccelerator(
          parts: parts, cpuCount: configuration.cpuCount, devicePath: configuration.kvmDevicePath)
        return (accelerator, VirtualClock())
      } catch {
        throw MachineError(error.description)
      }
    case .soft:
      do {
        let accelerator = try SoftAccelerator(parts: parts, cpuCount: configuration.cpuCount)
        return (accelerator, accelerator.clock)
      } catch {
        throw MachineError("cannot start the software CPU: \(error)")
      }
    }
  }

  /// Runs the guest until it stops, with the terminal attached when the serial console is stdio.
  public func run() throws -> MachineStopReason {
    guard configuration.serial == .stdio else {
      return try accelerator.run(bootState: boot.state)
    }
    let control = parts.control
    let console = TerminalConsole(serialPort: devices.serialPort) { control.requestStop(.stopRequested) }
    return try console.run { try accelerator.run(bootState: boot.state) }
  }

  private static func log(_ message: String) {
    var line = "hostvisor: \(message)\n"
    line.withUTF8 { buffer in _ = write(2, buffer.baseAddress, buffer.count) }
  }
}
