import Devices
import Glibc
import InterruptControllers
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
  /// The memory file; nil uses the path recorded in the state file. For a diff snapshot, the
  /// base memory file (a full snapshot's, or one merged from a chain).
  public var memoryPath: String?
  /// Diff memory files laid over the memory file in order (each holds the pages written since
  /// the snapshot before it). Empty: for a diff snapshot, the diff file recorded in it.
  public var diffPaths: [String] = []
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
  /// Step the guest's clocks forward by the host wall-clock time since the snapshot was taken
  /// (Firecracker's `clock_realtime`), instead of continuing from the snapshot's time.
  public var clockRealtime = false
  /// Build the TAP-backed interfaces without opening their TAPs (`MachineConfiguration.openTapsLater`).
  var openTapsLater = false

  public init() {}
}

/// The machine a state file belongs to (its section `machine`): enough to rebuild it and to
/// refuse a state that does not fit.
struct MachineDescription: Equatable {
  /// The name state files recorded before CPU models were selectable: a software-CPU machine
  /// then presented `hostvisor`, a KVM machine `host`.
  static let legacyCPUModel = "hostvisor-x86-64-v1"

  /// The CPU model the vCPUs present (`GuestCPUModel.name`).
  var cpuModel = GuestCPUModel.hostvisor.name
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
  /// The balloon device's options (its target and size travel in its device state).
  var balloon: BalloonOptions?

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
    // Written since balloons are saved; a description without it has no balloon.
    writer.write(balloon != nil)
    writer.write(balloon?.deflateOnOOM ?? false)
    writer.write(balloon?.statisticsInterval ?? 0)
    writer.write(balloon?.freePageReporting ?? false)
  }

  static func restore(from reader: inout StateReader) throws(MachineStateError) -> MachineDescription {
    var description = MachineDescription()
    description.cpuModel = try reader.readString()
    description.accelerator = try reader.readString()
    if description.cpuModel == legacyCPUModel {
      description.cpuModel = description.accelerator == "kvm" ? GuestCPUModel.host.name : GuestCPUModel.hostvisor.name
    }
    guard (try? GuestCPUModel.named(description.cpuModel)) != nil else {
      throw MachineStateError(
        "the state file's CPU model '\(description.cpuModel)' is not one this Hostvisor provides ("
          + GuestCPUModel.catalogue.map(\.name).joined(separator: ", ") + ")")
    }
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
    if !reader.isAtEnd {
      let hasBalloon = try reader.readBool()
      let options = BalloonOptions(
        deflateOnOOM: try reader.readBool(), statisticsInterval: try reader.read(),
        freePageReporting: try reader.readBool())
      description.balloon = hasBalloon ? options : nil
    }
    return description
  }
}

extension VirtualMachine {
  /// Throws when the machine has a device whose state cannot be saved yet (the emulated e1000
  /// and RTL8139).
  func refuseDevicesWithoutState() throws(MachineStateError) {
    if let device = emulatedNetworkDevices.first {
      let model = device is RTL8139 ? "an rtl8139" : "an e1000"
      throw MachineStateError(
        "snapshots and migration of machines with \(model) network device are not implemented yet")
    }
  }

  /// The description of this machine as a state file records it.
  func machineDescription(memoryPath: String, networkIDs: [String]?) -> MachineDescription {
    var description = MachineDescription()
    description.cpuModel = cpuModel.name
    description.accelerator = accelerator.name
    description.memorySize = parts.memory.totalSize
    description.regions = parts.memory.regions.flatMap { [$0.guestBase, $0.size] }
    description.cpuCount = configuration.cpuCount
    description.kernelPath = configuration.kernelPath
    description.initrdPath = configuration.initrdPath
    description.commandLine = configuration.commandLine
    description.virtioConsole = configuration.console == .virtio
    // The files the disks use now (a drive's backing file may have been swapped since boot).
    let blocks = virtioDevices.compactMap { $0.model as? VirtioBlock }
    description.disks = configuration.disks.enumerated().map { index, disk in
      guard index < blocks.count, let backend = blocks[index].backend as? RawFileBlockBackend else { return disk }
      return DiskConfiguration(path: backend.path, readOnly: disk.readOnly)
    }
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
    description.balloon = configuration.balloon?.options
    return description
  }

  /// Writes a snapshot of this paused machine: device and vCPU state to `statePath` (written
  /// to a temporary file, fsynced and renamed into place) and guest RAM to `memoryPath` (a
  /// sparse file; with `diffPages`, a diff memory file holding only those pages). Device
  /// workers are quiesced while the state is taken and the disks are flushed before it
  /// completes. Throws (one line) when the machine is not paused, or its accelerator cannot
  /// save its state yet.
  public func saveSnapshot(
    statePath: String, memoryPath: String, networkIDs: [String]? = nil, diffPages: [UInt64]? = nil
  ) throws(MachineStateError) {
    guard parts.control.pauseGate.isPaused else {
      throw MachineStateError("the machine must be paused to take a snapshot")
    }
    for device in virtioDevices { device.quiesce() }
    defer { for device in virtioDevices { device.unquiesce() } }
    let payload = try encodeState(memoryPath: Self.absolutePath(memoryPath), networkIDs: networkIDs)
    let file = MachineStateFile.encode(
      payload: payload, flags: diffPages == nil ? 0 : MachineStateFile.diffMemoryFlag)

    // A new file renamed into place: a machine restored from the old file keeps mapping it.
    let temporaryMemoryPath = memoryPath + ".partial"
    let memoryDescriptor = open(temporaryMemoryPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard memoryDescriptor >= 0 else {
      throw MachineStateError("cannot create memory file '\(memoryPath)': \(String(cString: strerror(errno)))")
    }
    do {
      if let diffPages {
        try parts.memory.writeDiff(pages: diffPages, to: memoryDescriptor)
      } else {
        _ = try parts.memory.writeSparse(to: memoryDescriptor)
      }
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

  /// The state payload of this paused machine (every section; RAM not included), recording
  /// `memoryPath` as its memory file. The caller keeps the virtio devices quiesced meanwhile.
  /// The disks are flushed first.
  func encodeState(memoryPath: String, networkIDs: [String]?) throws(MachineStateError) -> [UInt8] {
    try refuseDevicesWithoutState()
    let kvmState = try (accelerator as? KVMAccelerator)?.captureState()
    let soft = accelerator as? SoftAccelerator
    guard soft != nil || kvmState != nil else {
      throw MachineStateError("snapshots of machines on the \(accelerator.name) accelerator are not implemented yet")
    }
    for device in virtioDevices {
      guard let block = device.model as? VirtioBlock else { continue }
      do {
        try block.backend.flush()
      } catch {
        throw MachineStateError("cannot flush a disk before the snapshot: \(error)")
      }
    }
    var writer = StateWriter()
    writer.section("machine") {
      machineDescription(memoryPath: memoryPath, networkIDs: networkIDs).save(into: &$0)
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
    writer.section("host-time") { $0.write(Self.hostRealtimeNanoseconds()) }
    return writer.bytes
  }

  /// The host's CLOCK_REALTIME in nanoseconds since the epoch.
  static func hostRealtimeNanoseconds() -> UInt64 {
    var spec = timespec()
    clock_gettime(CLOCK_REALTIME, &spec)
    return UInt64(max(0, spec.tv_sec)) &* 1_000_000_000 &+ UInt64(max(0, spec.tv_nsec))
  }

  /// The host wall-clock time a state payload records in its `host-time` section (when it was
  /// taken), or nil for a state written before the section existed.
  static func recordedHostTime(in payload: [UInt8]) throws(MachineStateError) -> UInt64? {
    var reader = StateReader(bytes: payload)
    var found: UInt64?
    while !reader.isAtEnd {
      var peek = reader
      let tag = try peek.readString(maximumCount: 256)
      try reader.section(tag) { (section) throws(MachineStateError) in
        if tag == "host-time" {
          found = try section.read(UInt64.self)
        } else {
          _ = try section.remainingBytes()
        }
      }
    }
    return found
  }

  /// Moves every guest clock forward by `nanoseconds` after the accelerator state is restored:
  /// the software CPU's virtual clock (TSC, local APIC timers, PIT, ACPI PM timer), or KVM's
  /// kvmclock. Timers that fall due meanwhile fire when the guest runs.
  func advanceGuestClock(byNanoseconds nanoseconds: UInt64) throws(MachineStateError) {
    guard nanoseconds > 0 else { return }
    if let soft = accelerator as? SoftAccelerator {
      guard let clock = soft.clock as? VirtualClock else {
        throw MachineStateError("this machine's clock cannot be stepped")
      }
      var writer = StateWriter()
      writer.write(clock.nanoseconds &+ nanoseconds)
      var reader = StateReader(bytes: writer.bytes)
      try clock.restoreState(from: &reader)
    } else if let kvm = accelerator as? KVMAccelerator {
      kvm.advanceClock(byNanoseconds: nanoseconds)
    }
  }

  /// Builds a machine from a snapshot: the machine the state file describes (with
  /// `overrides`), guest RAM mapped copy-on-write from the memory file (with the diff layers of
  /// `overrides.diffPaths` applied over it), and every part's state restored. Nothing runs
  /// until `run`; any failure is one line and leaves no machine behind.
  public static func restore(statePath: String, overrides: RestoreOverrides = RestoreOverrides()) throws
    -> VirtualMachine
  {
    let bytes = try readFile(statePath)
    let payload = try MachineStateFile.decode(bytes)
    let isDiff = MachineStateFile.flags(of: bytes) & MachineStateFile.diffMemoryFlag != 0
    var reader = StateReader(bytes: payload)
    let description = try reader.section("machine") { (reader) throws(MachineStateError) in
      try MachineDescription.restore(from: &reader)
    }
    let layers: [String]
    if isDiff {
      guard let base = overrides.memoryPath else {
        throw MachineStateError(
          "'\(statePath)' is a diff snapshot: its memory file holds only the pages changed since the previous "
            + "snapshot; restore it with memory=BASE (and diff=PATH for each layer), or merge it into its base "
            + "with `hostvisor merge-memory`")
      }
      layers = [base] + (overrides.diffPaths.isEmpty ? [description.memoryPath] : overrides.diffPaths)
    } else {
      layers = [overrides.memoryPath ?? description.memoryPath] + overrides.diffPaths
    }
    let memory = try restoreMemory(layers: layers, size: description.memorySize, eager: overrides.eagerMemory)
    var clockStep: UInt64 = 0
    if overrides.clockRealtime {
      guard let takenAt = try recordedHostTime(in: payload) else {
        throw MachineStateError(
          "'\(statePath)' does not record when it was taken, so the guest clock cannot be stepped (clock_realtime)")
      }
      let now = hostRealtimeNanoseconds()
      clockStep = now > takenAt ? now - takenAt : 0
    }
    let machine = try build(description: description, overrides: overrides, memory: memory)
    try machine.restoreSections(
      from: &reader, description: description, paused: overrides.paused, clockStep: clockStep)
    return machine
  }

  /// Guest RAM of `size` bytes restored from memory-file layers: the first (a full memory file,
  /// or a base with diffs merged into it) mapped copy-on-write, or read into fresh RAM when
  /// `eager`; then each later layer, a diff, laid over it in order. Each file must be a regular
  /// file of exactly `size` bytes; anything else is refused with an error.
  static func restoreMemory(layers: [String], size: UInt64, eager: Bool) throws(MachineStateError) -> GuestMemory {
    guard let first = layers.first else { throw MachineStateError("no memory file to restore guest RAM from") }
    let memory =
      eager
      ? try GuestMemory.loading(snapshotFile: first, size: size)
      : try GuestMemory.mapping(snapshotFile: first, size: size)
    for diff in layers.dropFirst() { try memory.applyDiff(path: diff) }
    return memory
  }

  /// The machine `description` describes, with `overrides`, on `memory` (not yet restored).
  static func build(description: MachineDescription, overrides: RestoreOverrides, memory: GuestMemory) throws
    -> VirtualMachine
  {
    var acceleratorChoice: AcceleratorChoice
    switch description.accelerator {
    case "soft": acceleratorChoice = .soft
    case "kvm": acceleratorChoice = .kvm
    default:
      throw MachineStateError("the snapshot was taken on an unknown accelerator '\(description.accelerator)'")
    }
    if let target = overrides.accelerator, target != .auto { acceleratorChoice = target }
    let cpuModel: GuestCPUModel
    do {
      cpuModel = try GuestCPUModel.named(description.cpuModel)
    } catch {
      throw MachineStateError(error.description)
    }
    if acceleratorChoice == .soft && cpuModel.features == nil {
      throw MachineStateError(
        "cannot restore on the software CPU: the machine presents KVM's own CPUID (CPU model 'host'); "
          + "start it with --cpu-model x86-64, x86-64-v2 or x86-64-v3 to move it between accelerators")
    }
    var configuration = MachineConfiguration(
      kernelPath: description.kernelPath, initrdPath: description.initrdPath, commandLine: description.commandLine,
      memorySize: description.memorySize, cpuCount: description.cpuCount, accelerator: acceleratorChoice,
      serial: overrides.serial, verbose: overrides.verbose)
    configuration.console = description.virtioConsole ? .virtio : .serial
    configuration.cpuModel = cpuModel
    configuration.openTapsLater = overrides.openTapsLater
    configuration.balloon = description.balloon.map { BalloonConfiguration(options: $0) }
    configuration.disks = description.disks.enumerated().map { index, disk in
      DiskConfiguration(path: overrides.diskPaths[index] ?? disk.path, readOnly: disk.readOnly)
    }
    configuration.networks = zip(description.networkIDs, description.networks).map { id, network in
      NetworkConfiguration(tapName: overrides.networkTaps[id] ?? network.tapName, mac: network.mac)
    }
    guard memory.totalSize == description.memorySize,
      memory.regions.flatMap({ [$0.guestBase, $0.size] }) == description.regions
    else {
      throw MachineStateError("the state file does not match this machine: the RAM layout differs")
    }
    return try VirtualMachine(configuration: configuration, restoringMemory: memory)
  }

  /// Restores every section after `machine` from `reader` into this machine, built from
  /// `description` (paused first when `paused`), stepping the guest clocks forward by
  /// `clockStep` nanoseconds. On failure the devices are shut down and the machine must not run.
  func restoreSections(
    from reader: inout StateReader, description: MachineDescription, paused: Bool, clockStep: UInt64 = 0
  ) throws {
    do {
      let built = machineDescription(memoryPath: description.memoryPath, networkIDs: description.networkIDs)
      guard built.pciFunctions == description.pciFunctions else {
        throw MachineStateError("the state file does not match this machine: its PCI devices differ")
      }
      if paused { try? pause() }
      if accelerator.name != description.accelerator {
        let acceleratorSection = try reader.section("accelerator") { (reader) throws(MachineStateError) in
          try reader.remainingBytes()
        }
        let legacyDevicesSection = try reader.section("legacy-devices") { (reader) throws(MachineStateError) in
          try reader.remainingBytes()
        }
        try CrossAcceleratorState.restore(
          acceleratorSection: acceleratorSection, legacyDevicesSection: legacyDevicesSection,
          source: description.accelerator, into: self)
      } else if let soft = accelerator as? SoftAccelerator {
        try reader.section("accelerator", soft)
      } else if let kvm = accelerator as? KVMAccelerator {
        try reader.section("accelerator") { (reader) throws(MachineStateError) in try kvm.restoreState(from: &reader) }
      } else {
        throw MachineStateError("the restored machine's accelerator cannot restore a state")
      }
      try advanceGuestClock(byNanoseconds: clockStep)
      if accelerator.name == description.accelerator { try reader.section("legacy-devices", devices) }
      try reader.section("acpi-pm", powerManagement)
      try reader.section("pci", pci)
      for device in virtioDevices { try reader.section("virtio", device) }
      // Written since the section was added; older state files end after the virtio sections.
      if !reader.isAtEnd {
        _ = try reader.section("host-time") { (reader) throws(MachineStateError) in try reader.read(UInt64.self) }
      }
      guard reader.isAtEnd else { throw MachineStateError("the state file has unexpected data after its last section") }
      // An interface restored onto another TAP than the one it was saved on (network_overrides):
      // the guest sees its link go down and up, and resolves the new host side's address.
      let networkDevices = virtioDevices.compactMap { $0.model as? VirtioNet }
      for (index, device) in networkDevices.enumerated()
      where index < description.networks.count && index < configuration.networks.count
        && configuration.networks[index].tapName != description.networks[index].tapName
      {
        device.signalHostInterfaceChange()
      }
    } catch {
      shutdownDevices()
      throw error
    }
  }

  static func absolutePath(_ path: String) -> String {
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
  /// in it), `STATE,memory=PATH`, or for diff snapshots `STATE,memory=BASE[,diff=PATH]...`
  /// (the diff layers in order; without `diff=`, the diff recorded in the state file); `,eager`
  /// reads the memory into RAM instead of mapping it copy-on-write; `,clock-realtime` steps the
  /// guest clocks forward by the time since the snapshot. `accelerator` restores on
  /// that accelerator, converting a state taken on the other one.
  public static func restore(
    commandLineArgument text: String, serial: SerialChoice, verbose: Bool, accelerator: AcceleratorChoice? = nil
  ) throws -> VirtualMachine {
    var overrides = RestoreOverrides()
    overrides.serial = serial
    overrides.verbose = verbose
    overrides.accelerator = accelerator
    var parts = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
    let statePath = parts.removeFirst()
    guard !statePath.isEmpty else { throw MachineStateError("--restore needs a state file path") }
    for part in parts {
      if part.hasPrefix("memory="), overrides.memoryPath == nil {
        overrides.memoryPath = String(part.dropFirst("memory=".count))
        guard !overrides.memoryPath!.isEmpty else { throw MachineStateError("--restore: empty memory file path") }
      } else if part == "eager" {
        overrides.eagerMemory = true
      } else if part == "clock-realtime" {
        overrides.clockRealtime = true
      } else if part.hasPrefix("diff=") {
        let path = String(part.dropFirst("diff=".count))
        guard !path.isEmpty else { throw MachineStateError("--restore: empty diff file path") }
        overrides.diffPaths.append(path)
      } else {
        throw MachineStateError(
          "--restore: unknown option '\(part)' (use STATE[,memory=PATH][,diff=PATH]...[,eager][,clock-realtime])")
      }
    }
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
        let line: String
        do {
          try pause()
          defer { resume() }
          try saveSnapshot(statePath: statePath, memoryPath: statePath + ".mem")
          line = "hostvisor: snapshot written to \(statePath)\n"
        } catch {
          line = "hostvisor: error: snapshot failed: \(error)\n"
        }
        DiagnosticOutput.standardError.write(line)
      }
    }
  }
}
