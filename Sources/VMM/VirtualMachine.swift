import Devices
import Firmware
import GDBStub
import Glibc
import InterruptControllers
import KVMBackend
import Loaders
import PCI
import SoftCPU
import Synchronization
import VMCore
import Virtio

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
  /// The CPU model the vCPUs present (recorded in snapshots).
  public let cpuModel: GuestCPUModel
  /// PCI bus 0 (host bridge in slot 0, then the virtio devices).
  public let pci: PCIBus
  /// The virtio devices on the bus, in slot order: disks, network interfaces, the console (if
  /// asked for), the entropy device, the balloon and the tablet (if asked for).
  public let virtioDevices: [VirtioPCIDevice]
  /// The emulated network devices (`model=e1000` and `model=rtl8139` interfaces), in slot
  /// order after the virtio network interfaces' turn.
  public let emulatedNetworkDevices: [any EmulatedNetworkDevice]
  /// The virtio console wired to standard input/output, when `console` is `.virtio`.
  private let virtioConsole: VirtioConsole?
  /// COM1's buffered output (a file or standard output), drained when the machine stops.
  private let serialOutput: BufferedSerialBackend?
  /// The ACPI fixed-hardware registers (power button, sleep states).
  public let powerManagement: ACPIPowerManagement
  /// The framebuffer and VNC server (`--display vnc=...`), or nil without a display.
  public let display: MachineDisplay?
  /// Host key input to the i8042 keyboard (VNC key events, the API's sendkey).
  public let keyboardInput: PS2KeyboardInput
  /// The gdb stub, once `startGDBServer` ran; told when the machine stops.
  let gdbServer = Mutex<GDBServer?>(nil)

  /// Builds the machine: validates the configuration, maps RAM, loads the kernel, installs
  /// devices and opens the accelerator. Every failure is a one-line error.
  ///
  /// With `restoringMemory` (a snapshot's RAM), nothing is written into RAM (no kernel, no ACPI
  /// tables): the caller restores the machine state before `run` (see `restore(statePath:...)`).
  public init(configuration: MachineConfiguration, restoringMemory: GuestMemory? = nil) throws {
    self.configuration = configuration
    do {
      try configuration.validate()
    } catch {
      throw MachineError(error.description)
    }
    let memory: GuestMemory
    if let restoringMemory {
      memory = restoringMemory
    } else {
      do {
        memory = try GuestMemory(size: configuration.memorySize)
      } catch {
        throw MachineError(error.description)
      }
    }
    do {
      try memory.apply(configuration.memoryAdvice)
    } catch {
      throw MachineError(error.description)
    }
    // Messages from the machine's threads (vCPUs, device workers) must never wait for standard
    // error; the writer starts here, before the devices and before a sandbox forbids device
    // workers to start threads (a failure to start it leaves the messages written directly).
    // After RAM is mapped, as the machine's other threads: a thread's malloc arena mapped just
    // above RAM would otherwise merge with its mapping (one VMA in /proc/PID/smaps).
    try? DiagnosticOutput.standardError.start()
    parts = MachineParts(memory: memory, bus: IOBus(), control: MachineControl(), interrupts: InterruptRouter())
    pci = PCIBus(layout: PCIAddressLayout(), interrupts: parts.interrupts)
    let (virtioDevices, virtioConsole, emulatedNetworkDevices) = try Self.attachVirtioDevices(
      configuration: configuration, pci: pci, memory: memory)
    self.virtioDevices = virtioDevices
    self.emulatedNetworkDevices = emulatedNetworkDevices
    self.virtioConsole = virtioConsole
    do {
      display = try Self.attachDisplay(configuration: configuration, pci: pci, memory: memory)
    } catch {
      Self.shutdown(virtioDevices)
      throw error
    }
    // From here on a failure must stop the devices' worker threads.
    do {
      try pci.register(on: parts.bus)
    } catch {
      Self.shutdown(virtioDevices)
      throw MachineError("cannot register the PCI bus: \(error)")
    }
    let hostBridge = Self.hostBridgeDescription(pci)
    do {
      var acpi = ACPIConfiguration(cpuCount: configuration.cpuCount)
      acpi.dsdtTerms = [hostBridge.dsdtTerm()]
      acpi.additionalTables = [hostBridge.mcfgTable()]
      // With a screen, the FADT announces the i8042 so that Linux probes the keyboard.
      acpi.hasI8042 = display != nil
      let tables = try ACPITables.build(acpi)
      if restoringMemory == nil { try tables.install(into: memory) }
    } catch {
      Self.shutdown(virtioDevices)
      throw MachineError("cannot build the ACPI tables: \(error)")
    }
    do {
      boot =
        try restoringMemory != nil
        ? .restoredFromSnapshot
        : KernelLoader.load(
          kernelPath: configuration.kernelPath, initrdPath: configuration.initrdPath,
          commandLine: configuration.commandLine, memory: memory,
          reservedMemory: [
            E820Entry(address: ACPITables.defaultBase, size: UInt64(ACPITables.defaultWindowSize), type: .reserved),
            E820Entry(address: hostBridge.ecamBase, size: hostBridge.ecamSize, type: .reserved),
          ])
    } catch {
      Self.shutdown(virtioDevices)
      throw MachineError(error.description)
    }
    if let display, restoringMemory == nil, boot.format == .linuxBzImage, let bootParams = boot.bootParamsAddress {
      do {
        try display.screenInfo.write(into: memory, bootParamsAddress: bootParams)
      } catch {
        Self.shutdown(virtioDevices)
        throw MachineError("cannot describe the framebuffer to the kernel: \(error)")
      }
    }
    let backend: any SerialBackend
    switch configuration.serial {
    case .none: backend = NullSerialBackend()
    case .stdio, .file:
      do {
        if case .file(let path) = configuration.serial {
          backend = try BufferedSerialBackend(appendingTo: path)
        } else {
          backend = try BufferedSerialBackend(fileDescriptor: STDOUT_FILENO)
        }
      } catch {
        Self.shutdown(virtioDevices)
        throw MachineError(error.description)
      }
    }
    serialOutput = backend as? BufferedSerialBackend
    let accelerator: any Accelerator
    let clock: any MachineClock
    let cpuModel: GuestCPUModel
    do {
      (accelerator, clock, cpuModel) = try Self.makeAccelerator(configuration: configuration, parts: parts)
    } catch {
      Self.shutdown(virtioDevices)
      throw error
    }
    self.accelerator = accelerator
    self.cpuModel = cpuModel
    // MSI/MSI-X: KVM injects with KVM_SIGNAL_MSI, the software CPU through its local APICs.
    if let kvm = accelerator as? KVMAccelerator {
      pci.msi.attach(kvm)
    } else if let soft = accelerator as? SoftAccelerator {
      pci.msi.attach(soft.controllers)
    }
    do {
      devices = try LegacyDevices.install(
        on: parts.bus, control: parts.control, interrupts: parts.interrupts, serialBackend: backend,
        memorySize: configuration.memorySize)
      powerManagement = ACPIPowerManagement(
        control: parts.control,
        sci: InterruptLine(router: parts.interrupts, line: UInt32(ACPIPowerManagement.sciInterrupt)),
        nanoseconds: { clock.nanoseconds })
      try powerManagement.register(on: parts.bus)
      keyboardInput = PS2KeyboardInput(controller: devices.keyboardController)
      try display?.startServer(
        keyboard: keyboardInput, tablet: virtioDevices.lazy.compactMap { $0.model as? VirtioTablet }.first)
      if !parts.bus.hasPortDevice(ACPIResetRegister.port) {
        try parts.bus.registerPorts(ACPIResetRegister.port, count: 1, device: ACPIResetRegister(control: parts.control))
      }
      // QEMU's fw_cfg at 0x510: the same CPU count as the ACPI MADT, the loader's memory map.
      try FirmwareConfiguration.standard(
        memory: memory, cpuCount: configuration.cpuCount, kernel: boot.kernelRange, entry: boot.entry,
        initrd: boot.initrdRange, commandLine: configuration.commandLine,
        commandLineAddress: boot.commandLineAddress ?? 0,
        memoryMap: boot.memoryMap.map { ($0.address, $0.size, $0.type.rawValue) }
      ).register(on: parts.bus)
    } catch {
      Self.shutdown(virtioDevices)
      throw MachineError("\(error)")
    }
    if configuration.verbose {
      Self.log(
        "accelerator: \(accelerator.name); kernel format: \(boot.format); memory: \(MemorySize.format(configuration.memorySize))"
      )
      for warning in boot.warnings { Self.log("loader: \(warning)") }
      for (slot, device) in pci.devices {
        let name: String
        if let virtio = device as? VirtioPCIDevice {
          name = Self.describe(virtio)
        } else if let emulated = device as? any EmulatedNetworkDevice {
          name = emulated.modelDescription
        } else {
          continue
        }
        Self.log("pci: 00:\(slot < 16 ? "0" : "")\(String(slot, radix: 16)).0 \(name)")
      }
    }
  }

  /// Opens every backend and attaches one virtio device per disk and network interface (an
  /// emulated e1000 or RTL8139 for interfaces with `model=e1000` or `model=rtl8139`), the console when asked for, always an
  /// entropy device (so the guest's RNG seeds early), then the balloon and the display's tablet
  /// when asked for. Backend failures (missing disk file, TAP errors) are one-line errors;
  /// devices already built are shut down first.
  private static func attachVirtioDevices(
    configuration: MachineConfiguration, pci: PCIBus, memory: GuestMemory
  ) throws -> ([VirtioPCIDevice], VirtioConsole?, [any EmulatedNetworkDevice]) {
    var devices: [VirtioPCIDevice] = []
    var emulated: [any EmulatedNetworkDevice] = []
    func attach(_ model: any VirtioDeviceModel) throws {
      let device = VirtioPCIDevice(model: model, memory: memory)
      devices.append(device)
      do {
        try pci.attach(device)
      } catch {
        throw MachineError("cannot attach a PCI device: \(error)")
      }
    }
    var console: VirtioConsole?
    do {
      for disk in configuration.disks {
        let backend: RawFileBlockBackend
        do {
          backend = try RawFileBlockBackend(path: disk.path, readOnly: disk.readOnly)
        } catch {
          switch error {
          case .cannotOpen(let path, let err):
            throw MachineError("cannot open disk '\(path)': \(String(cString: strerror(err)))")
          case .io, .cannotLimit: throw MachineError(error.description)
          }
        }
        try attach(VirtioBlock(backend: backend))
      }
      for network in configuration.networks {
        let backend: any NetworkBackend
        switch network.attachment {
        case .tap(let name):
          do {
            backend = try TapBackend(
              name: name, offloads: network.offloads, attached: !configuration.openTapsLater)
          } catch {
            throw MachineError(Self.describeTapFailure(error, name: name))
          }
        case .user(let forwards):
          do {
            backend = try UserNetworkBackend(forwards: forwards)
          } catch {
            throw MachineError(error.description)
          }
        }
        let device: any EmulatedNetworkDevice
        switch network.model {
        case .virtio:
          try attach(VirtioNet(backend: backend, mac: network.mac))
          continue
        case .e1000:
          device = E1000(backend: backend, mac: network.mac, memory: memory)
        case .rtl8139:
          device = RTL8139(backend: backend, mac: network.mac, memory: memory)
        }
        emulated.append(device)
        do {
          try pci.attach(device)
        } catch {
          throw MachineError("cannot attach a PCI device: \(error)")
        }
      }
      if configuration.console == .virtio {
        let output: BufferedSerialBackend
        do {
          output = try BufferedSerialBackend(fileDescriptor: STDOUT_FILENO)
        } catch {
          throw MachineError(error.description)
        }
        let model = VirtioConsole(backend: output)
        console = model
        try attach(model)
      }
      try attach(VirtioEntropy())
      if let balloon = configuration.balloon {
        try attach(VirtioBalloon(options: balloon.options, targetPages: balloon.targetPages))
      }
      if configuration.display.hasTablet { try attach(VirtioTablet()) }
    } catch {
      shutdown(devices)
      for device in emulated { device.shutdown() }
      relinquishPreopenedTaps(emulated.map(\.backend))
      throw error
    }
    return (devices, console, emulated)
  }

  /// How the ACPI tables describe `pci`: its ECAM window, BAR windows and INTx# routing,
  /// taken from the bus itself so the tables cannot disagree with the decoding.
  static func hostBridgeDescription(_ pci: PCIBus) -> ACPIPCIHostBridge {
    let layout = pci.layout
    var routes: [ACPIPCIHostBridge.Route] = []
    for slot in 0..<32 {
      for pin in 1...4 {
        routes.append(.init(slot: slot, pin: pin - 1, gsi: pci.gsi(forSlot: slot, pin: UInt8(pin))))
      }
    }
    let lastBus = UInt8(clamping: max(layout.ecamBusCount, 1) - 1)
    return ACPIPCIHostBridge(
      ecamBase: layout.ecamBase, busNumbers: 0...lastBus, mmio32: layout.mmio32, mmio64: layout.mmio64,
      routes: routes)
  }

  private static func describe(_ device: VirtioPCIDevice) -> String {
    switch device.model {
    case let block as VirtioBlock:
      let backend = block.backend as? RawFileBlockBackend
      return "virtio-blk \(backend?.path ?? "")\(backend?.isReadOnly == true ? " (read-only)" : "")"
    case is VirtioNet: return "virtio-net"
    case is VirtioConsole: return "virtio-console"
    case is VirtioEntropy: return "virtio-rng"
    case is VirtioBalloon: return "virtio-balloon"
    case is VirtioTablet: return "virtio-input (tablet)"
    default: return "virtio"
    }
  }

  /// Stops the devices' worker threads, then gives the TAPs the process opened at start back
  /// (`relinquishPreopenedTaps`).
  private static func shutdown(_ devices: [VirtioPCIDevice]) {
    for device in devices { device.shutdown() }
    relinquishPreopenedTaps(devices.compactMap { ($0.model as? VirtioNet)?.backend })
  }

  /// Ends the claims of stopped devices' backends on TAPs the process opened at start
  /// (`serve --tap`, `PreopenedTaps`), so the next machine the API builds can attach them; a
  /// backend that never claimed one is left as it is.
  private static func relinquishPreopenedTaps(_ backends: [any NetworkBackend]) {
    for case let tap as TapBackend in backends { tap.relinquishPreopened() }
  }

  /// Stops every device's worker thread (`run` does this when the guest stops), and writes
  /// out what COM1 still buffers, so a serial file is complete once the machine has stopped.
  /// It waits at most half a second (a file takes microseconds), so a consumer that stopped
  /// reading delays the stop by that much and no more; the exit hook then waits its own bound.
  public func shutdownDevices() {
    Self.shutdown(virtioDevices)
    for device in emulatedNetworkDevices { device.shutdown() }
    Self.relinquishPreopenedTaps(emulatedNetworkDevices.map(\.backend))
    display?.stop()
    serialOutput?.drain(timeout: .milliseconds(500))
  }

  /// The virtio-net devices whose host side is a TAP (those a live migration hands over).
  var tapNetworkDevices: [VirtioNet] {
    virtioDevices.compactMap { $0.model as? VirtioNet }.filter { $0.backend is TapBackend }
  }

  /// Lets go of every TAP (a live migration's source, so the destination on the same host can
  /// open it); frames sent meanwhile are dropped.
  func releaseNetworkInterfaces() {
    for device in tapNetworkDevices { device.releaseHostInterface() }
  }

  /// Opens every TAP not held yet (a live migration's destination once the source let go, or
  /// the source again when the migration failed), retrying while another process still holds
  /// one for up to `timeoutMilliseconds`.
  func attachNetworkInterfaces(timeoutMilliseconds: Int = 5000) throws(MachineError) {
    for device in tapNetworkDevices {
      do {
        try device.attachHostInterface(timeoutMilliseconds: timeoutMilliseconds)
      } catch {
        throw MachineError(error.description)
      }
    }
  }

  deinit { shutdownDevices() }

  /// Opens the accelerator the configuration asks for; `auto` probes KVM and falls back to the
  /// software CPU when KVM is missing or would emulate the guest's kernel code. The CPU model
  /// defaults to `host` on KVM and `hostvisor` on the software CPU; one the accelerator cannot
  /// present is refused with one line.
  private static func makeAccelerator(
    configuration: MachineConfiguration, parts: MachineParts
  ) throws -> (any Accelerator, any MachineClock, GuestCPUModel) {
    var choice = configuration.accelerator
    if choice == .auto {
      let finding = AcceleratorProbe.probeKVM(devicePath: configuration.kvmDevicePath)
      choice = finding.kvmUsable ? .kvm : .soft
      if configuration.verbose { log("accelerator probe: \(finding); choosing \(choice.rawValue)") }
    }
    switch choice {
    case .kvm, .auto:
      let model = configuration.cpuModel ?? .host
      do {
        let accelerator = try KVMAccelerator(
          parts: parts, cpuCount: configuration.cpuCount, devicePath: configuration.kvmDevicePath, cpuModel: model)
        if configuration.verbose { log("CPU model: \(model.name)") }
        return (accelerator, VirtualClock(), model)
      } catch {
        throw MachineError(error.description)
      }
    case .soft:
      let model = configuration.cpuModel ?? .hostvisor
      do {
        let accelerator = try SoftAccelerator(
          parts: parts, cpuCount: configuration.cpuCount, tier: configuration.softCPUTier,
          threshold: configuration.softCPUThreshold, cpuModel: model)
        if configuration.verbose { log("CPU model: \(model.name)") }
        return (accelerator, accelerator.clock, model)
      } catch let error as SoftAcceleratorError {
        if case .cpuModelUnavailable = error { throw MachineError(error.description) }
        throw MachineError("cannot start the software CPU: \(error)")
      } catch {
        throw MachineError("cannot start the software CPU: \(error)")
      }
    }
  }

  /// Runs the guest until it stops, with the terminal attached when the serial console is stdio.
  /// Host input goes to the virtio console when there is one, else to COM1 when it is on stdio.
  /// The virtio devices are shut down when the guest stops.
  public func run() throws -> MachineStopReason {
    let reason = try runAttached()
    gdbServer.withLock { $0 }?.machineStopped(reason)
    return reason
  }

  private func runAttached() throws -> MachineStopReason {
    defer { shutdownDevices() }
    let control = parts.control
    let terminal: TerminalConsole
    if let virtioConsole {
      terminal = TerminalConsole(
        deliver: { virtioConsole.receive($0) }, onQuit: { control.requestStop(.stopRequested) })
    } else if configuration.serial == .stdio {
      terminal = TerminalConsole(serialPort: devices.serialPort) { control.requestStop(.stopRequested) }
    } else {
      return try accelerator.run(bootState: boot.state)
    }
    return try terminal.run { try accelerator.run(bootState: boot.state) }
  }

  // MARK: Control of a running machine

  /// Stops every vCPU at a safe point and freezes the machine's clocks (see
  /// `Accelerator.pause`). Device workers finish the requests they hold; the guest posts no new
  /// ones while its vCPUs are parked.
  public func pause() throws(MachinePauseError) {
    try accelerator.pause()
  }

  /// Continues a paused machine where it stopped.
  public func resume() {
    accelerator.resume()
  }

  /// Presses the ACPI power button (the guest's acpid or kernel decides what to do).
  public func pressPowerButton() {
    powerManagement.pressPowerButton()
  }

  /// Types Ctrl-Alt-Del on the i8042 keyboard, as Firecracker's SendCtrlAltDel does.
  public func sendCtrlAltDel() {
    devices.keyboardController.typeControlAltDelete()
  }

  /// Asks the machine to stop; `run` then returns `reason`.
  public func requestStop(_ reason: MachineStopReason = .stopRequested) {
    parts.control.requestStop(reason)
  }

  private static func log(_ message: String) {
    DiagnosticOutput.standardError.write("hostvisor: \(message)")
  }
}

extension VirtualMachine {
  /// The one-line error for a TAP that cannot be opened. A sandboxed VMM opening it after entry
  /// (`serve --sandbox`, whose machine comes later through the API) runs as an unprivileged
  /// user without CAP_NET_ADMIN: it can neither create a TAP nor attach to one that another
  /// user or group owns, so the line says how to provide it: `serve --tap` opens it before
  /// entry, or it is made beforehand for the sandbox's user.
  static func describeTapFailure(_ error: NetworkBackendError, name: String) -> String {
    guard let identity = HostSandboxIdentity.confined, case .cannotOpenTap(_, let number) = error else {
      return error.description
    }
    switch number {
    case EPERM, EACCES:
      return error.description
        + " (the sandboxed VMM runs as user \(identity.uid), group \(identity.gid), without CAP_NET_ADMIN: it cannot"
        + " create a TAP, and attaches only to one that belongs to that user or group, or to no one: name it at"
        + " start with serve --tap \(name), or make it beforehand with ip tuntap add dev \(name) mode tap user"
        + " \(identity.uid))"
    case ENOENT:
      return error.description + " (the sandbox's jail has no /dev/net/tun: the host has no TUN device)"
    default:
      return error.description
    }
  }
}
