import Devices
import Glibc
import KVMBackend
import SoftCPU
import VMCore
import Virtio

/// What a restore may change about the snapshot's machine: where its console goes and which
/// host resources back its devices (as Firecracker's `network_overrides`).
public struct RestoreOverrides: Sendable {
  /// Where COM1 goes in the restored machine.
  public var serial: SerialChoice = .stdio
  /// Replacement disk image paths, by disk index (0 = the first disk).
  public var diskPaths: [Int: String] = [:]
  /// Replacement host TAP devices, by interface ID (`net0`, `net1`, ... or the ID given when
  /// the snapshot was created).
  public var networkTaps: [String: String] = [:]
  /// The memory file; nil uses the path recorded in the state file.
  public var memoryPath: String?
  /// Leave the restored machine paused (its clock frozen) until `resume`.
  public var paused = false
  /// Report choices on standard error.
  public var verbose = false
  /// Read the whole memory file into anonymous RAM before the machine runs (eager), instead of
  /// mapping it copy-on-write (lazy, the default).
  public var eagerMemory = false
  /// The accelerator to restore on; nil (or `.auto`) uses the one the snapshot was taken on.
  /// The other one converts the vCPU and interrupt-controller state (docs/machine-state.md).
  public var accelerator: AcceleratorChoice?

  public init() {}
}

/// The machine a state file belongs to (its section `machine`): enough to rebuild it and to
/// refuse a state that does not fit.
struct MachineDescription: Equatable {
  /// The accelerator-independent CPU model the vCPU state is expressed in.
  static let cpuModel = "hostvisor-x86-64-v1"

  var cpuModel = MachineDescription.cpuModel
  var accelerator = "soft"
  var memorySize: UInt64 = 0
  var regions: [UInt64] = []
  var cpuCount = 1
  var kernelPath = ""
  var initrdPath: String?
  var commandLine = ""
  var virtioConsole = false
  var disks: [DiskConfiguration] = []
  var networkIDs: [String] = []
  var networks: [NetworkConfiguration] = []
  /// Device types of the PCI functions in slot order (0 for the host bridge).
  var pciFunctions: [UInt16] = []
  var memoryPath = ""

  func save(into writer: inout StateWriter) {
    writer.write(cpuModel)
    writer.write(accelerator)
    writer.write(memorySize)
    writer.write(array: regions)
    writer.write(UInt32(cpuCount))
    writer.write(kernelPath)
    writer.write(initrdPath != nil)
    writer.write(initrdPath ?? "")
    writer.write(commandLine)
    writer.write(virtioConsole)
    writer.write(UInt32(disks.count))
    for disk in disks {
      writer.write(disk.path)
      writer.write(disk.readOnly)
    }
    writer.write(UInt32(networks.count))
    for (index, network) in networks.enumerated() {
      writer.write(networkIDs[index])
      writer.write(network.tapName)
      writer.write(bytes: network.mac?.array ?? [])
    }
    writer.write(array: pciFunctions)
    writer.write(memoryPath)
  }

  static func restore(from reader: inout StateReader) throws(MachineStateError) -> MachineDescription {
    var description = MachineDescription()
    description.cpuModel = try reader.readString()
    guard description.cpuModel == cpuModel else {
      throw MachineStateError(
        "the state file's CPU model '\(description.cpuModel)' is not one this Hostvisor provides (\(cpuModel))")
    }
    description.accelerator = try reader.readString()
    description.memorySize = try reader.read()
    let regionCount = Int(try reader.read(UInt32.self))
    guard regionCount <= 8 else { throw .invalid("RAM layout") }
    for _ in 0..<regionCount { description.regions.append(try reader.read()) }
    description.cpuCount = Int(try reader.read(UInt32.self))
    description.kernelPath = try reader.readString()
    let hasInitrd = try reader.readBool()
    let initrd = try reader.readString()
    description.initrdPath = hasInitrd ? initrd : nil
    description.commandLine = try reader.readString()
    description.virtioConsole = try reader.readBool()
    let diskCount = Int(try reader.read(UInt32.self))
    guard diskCount <= 32 else { throw .invalid("disk count") }
    for _ in 0..<diskCount {
      description.disks.append(DiskConfiguration(path: try reader.readString(), readOnly: try reader.readBool()))
    }
    let networkCount = Int(try reader.read(UInt32.self))
    guard networkCount <= 32 else { throw .invalid("network interface count") }
    for _ in 0..<networkCount {
      description.networkIDs.append(try reader.readString())
      let tap = try reader.readString()
      let mac = try reader.readBytes(maximumCount: 6)
      guard mac.isEmpty || mac.count == 6 else { throw .invalid("MAC address") }
      description.networks.append(
        NetworkConfiguration(
          tapName: tap, mac: mac.isEmpty ? nil : MACAddress(mac[0], mac[1], mac[2], mac[3], mac[4], mac[5])))
    }
    let functionCount = Int(try reader.read(UInt32.self))
    guard functionCount <= 32 else { throw .invalid("PCI function count") }
    for _ in 0..<functionCount { description.pciFunctions.append(try reader.read()) }
    description.memoryPath = try reader.readString()
    return description
  }
}

extension VirtualMachine {
  /// The description of this machine as a state file records it.
  func machineDescription(memoryPath: String, networkIDs: [String]?) -> MachineDescription {
    var description = MachineDescription()
    description.accelerator = accelerator.name
    description.memorySize = parts.memory.totalSize
    description.regions = parts.memory.regions.flatMap { [$0.guestBase, $0.size] }
    description.cpuCount = configuration.cpuCount
    description.kernelPath = configuration.kernelPath
    description.initrdPath = configuration.initrdPath
    description.commandLine = configuration.commandLine
    description.virtioConsole = configuration.console == .virtio
    description.disks = configuration.disks
    let nets = virtioDevices.compactMap { $0.model as? VirtioNet }
    description.networks = zip(configuration.networks, nets).map {
      NetworkConfiguration(tapName: $0.tapName, mac: $1.mac)
    }
    description.networkIDs = (0..<description.networks.count).map { index in
      if let networkIDs, index < networkIDs.count { return networkIDs[index] }
      return "net\(index)"
    }
    description.pciFunctions = pci.devices.map { ($0.1 as? VirtioPCIDevice)?.model.deviceType ?? 0 }
    description.memoryPath = memoryPath
    return description
  }

  /// Writes a snapshot of this paused machine: device and vCPU state to `statePath` (written
  /// to a temporary file, fsynced and renamed into place) and guest RAM to `memoryPath` (a
  /// sparse file). Device workers are quiesced while the state is taken and the disks are
  /// flushed before it completes. Throws (one line) when the machine is not paused, or its
  /// accelerator cannot save its state yet.
  public func saveSnapshot(statePath: String, memoryPath: String, networkIDs: [String]? = nil) throws(MachineStateError)
  {
    guard parts.control.pauseGate.isPaused else {
      throw MachineStateError("the machine must be paused to take a snapshot")
    }
    let kvmState = try (accelerator as? KVMAccelerator)?.captureState()
    let soft = accelerator as? SoftAccelerator
    guard soft != nil || kvmState != nil else {
      throw MachineStateError("snapshots of machines on the \(accelerator.name) accelerator are not implemented yet")
    }
    for device in virtioDevices { device.quiesce() }
    defer { for device in virtioDevices { device.unquiesce() } }
    for device in virtioDevices {
      guard let block = device.model as? VirtioBlock else { continue }
      do {
        try block.backend.flush()
      } catch {
        throw MachineStateError("cannot flush a disk before the snapshot: \(error)")
      }
    }
    let absoluteMemoryPath = Self.absolutePath(memoryPath)
    var writer = StateWriter()
    writer.section("machine") {
      machineDescription(memoryPath: absoluteMemoryPath, networkIDs: networkIDs).save(into: &$0)
    }
    if let soft {
      writer.section("accelerator", soft)
    } else if let kvmState {
      writer.section("accelerator") { kvmState.save(into: &$0) }
    }
    writer.section("legacy-devices", devices)
    writer.section("acpi-pm", powerManagement)
    writer.section("pci", pci)
    for device in virtioDevices { writer.section("virtio", device) }
    let file = MachineStateFile.encode(payload: writer.bytes)

    // A new file renamed into place: a machine restored from the old file keeps mapping it.
    let temporaryMemoryPath = memoryPath + ".partial"
    let memoryDescriptor = open(temporaryMemoryPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard memoryDescriptor >= 0 else {
      throw MachineStateError("cannot create memory file '\(memoryPath)': \(String(cString: strerror(errno)))")
    }
    do {
      _ = try parts.memory.writeSparse(to: memoryDescriptor)
    } catch {
      close(memoryDescriptor)
      unlink(temporaryMemoryPath)
      throw error
    }
    let synced = fsync(memoryDescriptor) == 0
    close(memoryDescriptor)
    guard synced, rename(temporaryMemoryPath, memoryPath) == 0 else {
      let message = String(cString: strerror(errno))
      unlink(temporaryMemoryPath)
      throw MachineStateError("cannot write memory file '\(memoryPath)': \(message)")
    }
    try Self.writeFileAtomically(file, to: statePath)
  }

  /// Builds a machine from a snapshot: the machine the state file describes (with
  /// `overrides`), guest RAM mapped copy-on-write from the memory file, and every part's state
  /// restored. Nothing runs until `run`; any failure is one line and leaves no machine behind.
  public static func restore(statePath: String, overrides: RestoreOverrides = RestoreOverrides()) throws
    -> VirtualMachine
  {
    let bytes = try readFile(statePath)
    var reader = StateReader(bytes: try MachineStateFile.decode(bytes))
    let description = try reader.section("machine") { (reader) throws(MachineStateError) in
      try MachineDescription.restore(from: &reader)
    }
    var acceleratorChoice: AcceleratorChoice
    switch description.accelerator {
    case "soft": acceleratorChoice = .soft
    case "kvm": acceleratorChoice = .kvm
    default:
      throw MachineStateError("the snapshot was taken on an unknown accelerator '\(description.accelerator)'")
    }
    if let target = overrides.accelerator, target != .auto { acceleratorChoice = target }
    var configuration = MachineConfiguration(
      kernelPath: description.kernelPath, initrdPath: description.initrdPath, commandLine: description.commandLine,
      memorySize: description.memorySize, cpuCount: description.cpuCount, accelerator: acceleratorChoice,
      serial: overrides.serial, verbose: overrides.verbose)
    configuration.console = description.virtioConsole ? .virtio : .serial
    configuration.disks = description.disks.enumerated().map { index, disk in
      DiskConfiguration(path: overrides.diskPaths[index] ?? disk.path, readOnly: disk.readOnly)
    }
    configuration.networks = zip(description.networkIDs, description.networks).map { id, network in
      NetworkConfiguration(tapName: overrides.networkTaps[id] ?? network.tapName, mac: network.mac)
    }
    let memoryPath = overrides.memoryPath ?? description.memoryPath
    let memory =
      overrides.eagerMemory
      ? try GuestMemory.loading(snapshotFile: memoryPath, size: description.memorySize)
      : try GuestMemory.mapping(snapshotFile: memoryPath, size: description.memorySize)
    guard memory.regions.flatMap({ [$0.guestBase, $0.size] }) == description.regions else {
      throw MachineStateError("the state file does not match this machine: the RAM layout differs")
    }
    let machine = try VirtualMachine(configuration: configuration, restoringMemory: memory)
    do {
      let built = machine.machineDescription(memoryPath: description.memoryPath, networkIDs: description.networkIDs)
      guard built.pciFunctions == description.pciFunctions else {
        throw MachineStateError("the state file does not match this machine: its PCI devices differ")
      }
      if overrides.paused { try? machine.pause() }
      if machine.accelerator.name != description.accelerator {
        let acceleratorSection = try reader.section("accelerator") { (reader) throws(MachineStateError) in
          try reader.remainingBytes()
        }
        let legacyDevicesSection = try reader.section("legacy-devices") { (reader) throws(MachineStateError) in
          try reader.remainingBytes()
        }
        try CrossAcceleratorState.restore(
          acceleratorSection: acceleratorSection, legacyDevicesSection: legacyDevicesSection,
          source: description.accelerator, into: machine)
      } else if let soft = machine.accelerator as? SoftAccelerator {
        try reader.section("accelerator", soft)
      } else if let kvm = machine.accelerator as? KVMAccelerator {
        try reader.section("accelerator") { (reader) throws(MachineStateError) in try kvm.restoreState(from: &reader) }
      } else {
        throw MachineStateError("the restored machine's accelerator cannot restore a state")
      }
      if machine.accelerator.name == description.accelerator { try reader.section("legacy-devices", machine.devices) }
      try reader.section("acpi-pm", machine.powerManagement)
      try reader.section("pci", machine.pci)
      for device in machine.virtioDevices { try reader.section("virtio", device) }
      guard reader.isAtEnd else { throw MachineStateError("the state file has unexpected data after its last section") }
    } catch {
      machine.shutdownDevices()
      throw error
    }
    return machine
  }

  private static func absolutePath(_ path: String) -> String {
    guard !path.hasPrefix("/") else { return path }
    guard let directory = getcwd(nil, 0) else { return path }
    defer { free(directory) }
    return String(cString: directory) + "/" + path
  }

  private static func readFile(_ path: String) throws(MachineStateError) -> [UInt8] {
    let descriptor = open(path, O_RDONLY | O_CLOEXEC)
    guard descriptor >= 0 else {
      throw MachineStateError("cannot open state file '\(path)': \(String(cString: strerror(errno)))")
    }
    defer { close(descriptor) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
      let count = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
      if count < 0 && errno == EINTR { continue }
      guard count >= 0 else {
        throw MachineStateError("cannot read state file '\(path)': \(String(cString: strerror(errno)))")
      }
      if count == 0 { break }
      bytes.append(contentsOf: chunk[0..<count])
      guard bytes.count <= MachineStateFile.maximumPayload + MachineStateFile.headerSize else {
        throw MachineStateError("state file '\(path)' is too large")
      }
    }
    return bytes
  }

  private static func writeFileAtomically(_ bytes: [UInt8], to path: String) throws(MachineStateError) {
    let temporary = path + ".partial"
    let descriptor = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard descriptor >= 0 else {
      throw MachineStateError("cannot create state file '\(path)': \(String(cString: strerror(errno)))")
    }
    var done = 0
    while done < bytes.count {
      let count = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress! + done, bytes.count - done) }
      if count < 0 && errno == EINTR { continue }
      guard count > 0 else {
        let message = String(cString: strerror(errno))
        close(descriptor)
        unlink(temporary)
        throw MachineStateError("cannot write state file '\(path)': \(message)")
      }
      done += count
    }
    let synced = fsync(descriptor) == 0
    close(descriptor)
    guard synced, rename(temporary, path) == 0 else {
      let message = String(cString: strerror(errno))
      unlink(temporary)
      throw MachineStateError("cannot write state file '\(path)': \(message)")
    }
  }
}

// MARK: Command line

extension VirtualMachine {
  /// The signal that makes a machine started with `snapshotOnSignal` write a snapshot.
  public static let snapshotSignal = SIGUSR2

  /// Restores the machine named by the `--restore` argument: `STATE` (the memory file recorded
  /// in it) or `STATE,memory=PATH`, either followed by `,eager` to read the memory file into RAM
  /// instead of mapping it copy-on-write.
  public static func restore(
    commandLineArgument text: String, serial: SerialChoice, verbose: Bool, accelerator: AcceleratorChoice? = nil
  ) throws -> VirtualMachine {
    var overrides = RestoreOverrides()
    overrides.serial = serial
    overrides.verbose = verbose
    overrides.accelerator = accelerator
    var statePath = text
    if statePath.hasSuffix(",eager") {
      statePath.removeLast(",eager".count)
      overrides.eagerMemory = true
    }
    if let range = statePath.firstRange(of: ",memory=") {
      overrides.memoryPath = String(statePath[range.upperBound...])
      statePath = String(statePath[..<range.lowerBound])
      guard !overrides.memoryPath!.isEmpty else { throw MachineStateError("--restore: empty memory file path") }
    }
    guard !statePath.isEmpty else { throw MachineStateError("--restore needs a state file path") }
    return try restore(statePath: statePath, overrides: overrides)
  }

  /// Blocks `snapshotSignal` in the calling thread (and the threads it starts later), so that
  /// only the thread `snapshotOnSignal` starts receives it. Call before building the machine.
  public static func blockSnapshotSignal() {
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, snapshotSignal)
    pthread_sigmask(SIG_BLOCK, &set, nil)
  }

  /// Starts a host thread that, each time the process receives `snapshotSignal` (SIGUSR2),
  /// pauses the machine, writes a snapshot to `statePath` and `statePath + ".mem"`, resumes it
  /// and reports one line on standard error.
  public func snapshotOnSignal(statePath: String) throws {
    Self.blockSnapshotSignal()
    try startDetachedThread(name: "vmm-snapshot") { [self] in
      var set = sigset_t()
      sigemptyset(&set)
      sigaddset(&set, Self.snapshotSignal)
      while true {
        var received: Int32 = 0
        guard sigwait(&set, &received) == 0 else { continue }
        var line: String
        do {
          try pause()
          defer { resume() }
          try saveSnapshot(statePath: statePath, memoryPath: statePath + ".mem")
          line = "hostvisor: snapshot written to \(statePath)\n"
        } catch {
          line = "hostvisor: error: snapshot failed: \(error)\n"
        }
        line.withUTF8 { buffer in _ = write(2, buffer.baseAddress, buffer.count) }
      }
    }
  }
}
