import PCI
import Synchronization
import VMCore

/// The virtio-pci modern transport (virtio 1.2, 4.1) around a device model: PCI identity
/// 0x1AF4:0x1040+ID revision 1, one 32 KiB memory BAR (BAR 0) holding, at fixed offsets,
///
/// | offset   | structure                                                   |
/// |----------|-------------------------------------------------------------|
/// | `0x0000` | common configuration (`VIRTIO_PCI_CAP_COMMON_CFG`)          |
/// | `0x1000` | ISR status, read-to-clear (`VIRTIO_PCI_CAP_ISR_CFG`)        |
/// | `0x2000` | device-specific configuration (`VIRTIO_PCI_CAP_DEVICE_CFG`) |
/// | `0x3000` | notifications, 4 bytes per queue (`notify_off_multiplier` 4) |
/// | `0x4000` | MSI-X table (queues + 1 vectors)                            |
/// | `0x6000` | MSI-X pending-bit array                                      |
///
/// Interrupts: with MSI-X enabled, each queue's `queue_msix_vector` and `msix_config`;
/// otherwise INTx# with the ISR (bit 0 used buffers, bit 1 configuration change).
public final class VirtioPCIDevice: PCIDevice, VirtioTransportEvents {
  /// BAR layout constants.
  public enum Layout {
    public static let bar = 0
    public static let barSize: UInt64 = 0x8000
    public static let commonOffset: UInt64 = 0x0000
    public static let commonLength: UInt64 = 0x40
    public static let isrOffset: UInt64 = 0x1000
    public static let deviceOffset: UInt64 = 0x2000
    public static let deviceLength: UInt64 = 0x1000
    public static let notifyOffset: UInt64 = 0x3000
    public static let notifyMultiplier: UInt32 = 4
    public static let msixTableOffset: UInt64 = 0x4000
    public static let msixPBAOffset: UInt64 = 0x6000
  }

  private struct State {
    var deviceFeatureSelect: UInt32 = 0
    var driverFeatureSelect: UInt32 = 0
    var driverFeatures: UInt64 = 0
    var status: UInt8 = 0
    var configGeneration: UInt8 = 0
    var queueSelect: UInt16 = 0
    var configVector: UInt16 = virtioNoVector
    var isr: UInt8 = 0
  }

  public let config: PCIConfigSpace
  /// The device model behind the transport.
  public let model: any VirtioDeviceModel
  /// The device's queues.
  public let queues: VirtioQueueSet
  /// The MSI-X capability (queues + 1 vectors).
  public let msix: MSIXController
  /// Feature bits offered to the driver.
  public let offeredFeatures: UInt64
  private let state = Mutex(State())
  private let interruptPin = Mutex<PCIInterruptPin?>(nil)
  private let queueCount: Int

  /// Wraps `model`; its queues live in `memory`. Attach the result to a `PCIBus`.
  public init(model: any VirtioDeviceModel, memory: GuestMemory) {
    self.model = model
    queueCount = model.queueMaxSizes.count
    offeredFeatures =
      model.deviceFeatures | VirtioFeature.version1 | VirtioFeature.ringIndirectDescriptors
      | VirtioFeature.ringEventIndex
    let classCode: (UInt8, UInt8, UInt8)
    switch model.deviceType {
    case VirtioDeviceID.network: classCode = (0x02, 0x00, 0x00)
    case VirtioDeviceID.block: classCode = (0x01, 0x80, 0x00)
    case VirtioDeviceID.console: classCode = (0x07, 0x80, 0x00)
    case VirtioDeviceID.input: classCode = (0x09, 0x80, 0x00)
    default: classCode = (0x00, 0xFF, 0x00)
    }
    let config = PCIConfigSpace(
      identity: PCIIdentity(
        vendorID: 0x1AF4, deviceID: 0x1040 + model.deviceType, revisionID: 1, classCode: classCode,
        subsystemVendorID: 0x1AF4, subsystemID: 0x1100),
      interruptPin: 1)
    config.addBAR(PCIBARDefinition(index: Layout.bar, size: Layout.barSize, kind: .memory32(prefetchable: false)))
    func addVirtioCapability(type: UInt8, offset: UInt64, length: UInt64, extra: UInt32? = nil) {
      var body: [UInt8] = [extra == nil ? 16 : 20, type, UInt8(Layout.bar), 0, 0, 0]
      for shift in stride(from: 0, to: 32, by: 8) { body.append(UInt8(truncatingIfNeeded: offset >> UInt64(shift))) }
      for shift in stride(from: 0, to: 32, by: 8) { body.append(UInt8(truncatingIfNeeded: length >> UInt64(shift))) }
      if let extra {
        for shift in stride(from: 0, to: 32, by: 8) { body.append(UInt8(truncatingIfNeeded: extra >> UInt32(shift))) }
      }
      config.addCapability(id: PCICapabilityID.vendorSpecific, body: body)
    }
    addVirtioCapability(type: 1, offset: Layout.commonOffset, length: Layout.commonLength)
    addVirtioCapability(
      type: 2, offset: Layout.notifyOffset, length: UInt64(max(queueCount, 1)) * UInt64(Layout.notifyMultiplier),
      extra: Layout.notifyMultiplier)
    addVirtioCapability(type: 3, offset: Layout.isrOffset, length: 4)
    addVirtioCapability(type: 4, offset: Layout.deviceOffset, length: UInt64(max(model.configSize, 4)))
    self.config = config
    msix = MSIXController(
      config: config, vectorCount: queueCount + 1, bar: Layout.bar, tableOffset: Layout.msixTableOffset,
      pbaOffset: Layout.msixPBAOffset)
    queues = VirtioQueueSet(memory: memory, maxSizes: model.queueMaxSizes)
    queues.connect(self)
  }

  /// Stops the device model's host threads.
  public func shutdown() { model.shutdown() }

  /// The device status register.
  public var deviceStatus: UInt8 { state.withLock { $0.status } }

  /// The ISR status as it stands (without the read-to-clear of a guest read).
  public var pendingISR: UInt8 { state.withLock { $0.isr } }

  // MARK: PCIDevice

  public func attached(_ attachment: PCIAttachment) {
    interruptPin.withLock { $0 = attachment.interruptPin }
    msix.connect(attachment.msi)
  }

  public func configDidWrite(offset: Int, size: Int) { msix.deliverPendingUnmasked() }

  public func barRead(bar: Int, offset: UInt64, size: Int) -> UInt64 {
    guard bar == Layout.bar else { return 0 }
    switch offset {
    case Layout.commonOffset..<(Layout.commonOffset + Layout.commonLength):
      return commonRead(Int(offset - Layout.commonOffset), size: size)
    case Layout.isrOffset..<(Layout.isrOffset + 4):
      return offset == Layout.isrOffset ? UInt64(readAndClearISR()) : 0
    case Layout.deviceOffset..<(Layout.deviceOffset + Layout.deviceLength):
      let relative = Int(offset - Layout.deviceOffset)
      guard relative + size <= model.configSize else { return 0 }
      return model.readConfig(offset: relative, size: size)
    case Layout.msixTableOffset..<Layout.barSize:
      return msix.read(offset: offset, size: size)
    default:
      return 0
    }
  }

  public func barWrite(bar: Int, offset: UInt64, size: Int, value: UInt64) {
    guard bar == Layout.bar else { return }
    switch offset {
    case Layout.commonOffset..<(Layout.commonOffset + Layout.commonLength):
      commonWrite(Int(offset - Layout.commonOffset), size: size, value: value)
    case Layout.deviceOffset..<(Layout.deviceOffset + Layout.deviceLength):
      let relative = Int(offset - Layout.deviceOffset)
      guard relative + size <= model.configSize else { return }
      model.writeConfig(offset: relative, size: size, value: value)
    case Layout.notifyOffset..<(Layout.notifyOffset + 4 * UInt64(max(queueCount, 1))):
      let queue = Int((offset - Layout.notifyOffset) / UInt64(Layout.notifyMultiplier))
      if state.withLock({ $0.status & VirtioStatus.driverOK != 0 }) { model.notify(queue: queue) }
    case Layout.msixTableOffset..<Layout.barSize:
      msix.write(offset: offset, size: size, value: value)
    default:
      break
    }
  }

  // MARK: Common configuration

  private func commonRead(_ offset: Int, size: Int) -> UInt64 {
    let snapshot = state.withLock { $0 }
    let select = Int(snapshot.queueSelect)
    let queue = queues.state.withLock { state in select < state.queues.count ? state.queues[select] : nil }
    var bytes = [UInt8](repeating: 0, count: Int(Layout.commonLength))
    func put(_ at: Int, _ value: UInt64, _ width: Int) {
      for index in 0..<width { bytes[at + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
    }
    put(0x00, UInt64(snapshot.deviceFeatureSelect), 4)
    let featureWord: UInt64 =
      snapshot.deviceFeatureSelect < 2
      ? (offeredFeatures >> (32 * UInt64(snapshot.deviceFeatureSelect))) & 0xFFFF_FFFF : 0
    put(0x04, featureWord, 4)
    put(0x08, UInt64(snapshot.driverFeatureSelect), 4)
    let driverWord: UInt64 =
      snapshot.driverFeatureSelect < 2
      ? (snapshot.driverFeatures >> (32 * UInt64(snapshot.driverFeatureSelect))) & 0xFFFF_FFFF : 0
    put(0x0C, driverWord, 4)
    put(0x10, UInt64(snapshot.configVector), 2)
    put(0x12, UInt64(queueCount), 2)
    put(0x14, UInt64(snapshot.status), 1)
    put(0x15, UInt64(snapshot.configGeneration), 1)
    put(0x16, UInt64(snapshot.queueSelect), 2)
    if let queue {
      put(0x18, UInt64(queue.size), 2)
      put(0x1A, UInt64(queue.msixVector), 2)
      put(0x1C, queue.isEnabled ? 1 : 0, 2)
      put(0x1E, UInt64(select), 2)
      put(0x20, queue.descriptorTable, 8)
      put(0x28, queue.availableRing, 8)
      put(0x30, queue.usedRing, 8)
    }
    var value: UInt64 = 0
    for index in 0..<size where offset + index < bytes.count { value |= UInt64(bytes[offset + index]) << (8 * index) }
    return value
  }

  private func commonWrite(_ offset: Int, size: Int, value: UInt64) {
    let value32 = UInt32(truncatingIfNeeded: value)
    switch (offset, size) {
    case (0x00, 4): state.withLock { $0.deviceFeatureSelect = value32 }
    case (0x08, 4): state.withLock { $0.driverFeatureSelect = value32 }
    case (0x0C, 4):
      state.withLock { state in
        guard state.status & VirtioStatus.featuresOK == 0, state.driverFeatureSelect < 2 else { return }
        let shift = UInt64(32 * state.driverFeatureSelect)
        state.driverFeatures = (state.driverFeatures & ~(0xFFFF_FFFF << shift)) | (UInt64(value32) << shift)
      }
    case (0x10, 2):
      let vector = validVector(UInt16(truncatingIfNeeded: value))
      state.withLock { $0.configVector = vector }
    case (0x14, 1): writeStatus(UInt8(truncatingIfNeeded: value))
    case (0x16, 2): state.withLock { $0.queueSelect = UInt16(truncatingIfNeeded: value) }
    case (0x18, 2):
      withSelectedQueue { queue in if !queue.isEnabled { queue.size = UInt16(truncatingIfNeeded: value) } }
    case (0x1A, 2):
      let vector = validVector(UInt16(truncatingIfNeeded: value))
      withSelectedQueue { queue in queue.msixVector = vector }
    case (0x1C, 2):
      guard value & 0xFFFF == 1 else { return }
      var failure: VirtqueueError?
      let select = state.withLock { $0.queueSelect }
      withSelectedQueue { queue in
        guard !queue.isEnabled else { return }
        do throws(VirtqueueError) {
          try queue.validate()
          queue.isEnabled = true
        } catch {
          failure = error
        }
      }
      if let failure { queues.fail("queue \(select): \(failure.message)") }
    case (0x20, _), (0x24, 4), (0x28, _), (0x2C, 4), (0x30, _), (0x34, 4):
      guard size == 4 || size == 8 else { return }
      let field = (offset - 0x20) / 8
      let high = (offset - 0x20) % 8 == 4
      withSelectedQueue { queue in
        guard !queue.isEnabled else { return }
        func update(_ current: UInt64) -> UInt64 {
          if size == 8 { return value }
          return high
            ? (current & 0xFFFF_FFFF) | UInt64(value32) << 32 : (current & ~0xFFFF_FFFF) | UInt64(value32)
        }
        switch field {
        case 0: queue.descriptorTable = update(queue.descriptorTable)
        case 1: queue.availableRing = update(queue.availableRing)
        default: queue.usedRing = update(queue.usedRing)
        }
      }
    default:
      break
    }
  }

  /// A vector the table has, or NO_VECTOR (what the driver then reads back as a refusal).
  private func validVector(_ vector: UInt16) -> UInt16 {
    Int(vector) < msix.vectorCount ? vector : virtioNoVector
  }

  private func withSelectedQueue(_ body: (inout SplitVirtqueue) -> Void) {
    let select = Int(state.withLock { $0.queueSelect })
    queues.state.withLock { state in
      guard select < state.queues.count, !state.active else { return }
      body(&state.queues[select])
    }
  }

  private func writeStatus(_ requested: UInt8) {
    if requested == 0 {
      reset()
      return
    }
    var activate = false
    let current = state.withLock { $0 }
    var status = (requested & ~VirtioStatus.deviceNeedsReset) | (current.status & VirtioStatus.deviceNeedsReset)
    // The driver may only add bits; clearing needs a reset.
    status |= current.status
    if status & VirtioStatus.featuresOK != 0 && current.status & VirtioStatus.featuresOK == 0 {
      let accepted = current.driverFeatures
      if accepted & ~offeredFeatures != 0 || accepted & VirtioFeature.version1 == 0 {
        status &= ~VirtioStatus.featuresOK
      }
    }
    if status & VirtioStatus.driverOK != 0 && current.status & VirtioStatus.driverOK == 0 {
      if status & VirtioStatus.featuresOK == 0 {
        status &= ~VirtioStatus.driverOK
      } else {
        activate = true
      }
    }
    if activate {
      queues.state.withLock { queueState in
        queueState.features = current.driverFeatures
        for index in queueState.queues.indices {
          queueState.queues[index].eventIndex = current.driverFeatures & VirtioFeature.ringEventIndex != 0
          queueState.queues[index].indirectDescriptors =
            current.driverFeatures & VirtioFeature.ringIndirectDescriptors != 0
        }
        queueState.active = true
      }
    }
    state.withLock { $0.status = status | ($0.status & VirtioStatus.deviceNeedsReset) }
    if activate { model.activate(queues) }
  }

  /// Device reset (status 0): queues forgotten, features cleared, interrupt lowered.
  private func reset() {
    queues.state.withLock { queueState in
      queueState.active = false
      model.reset()
      for index in queueState.queues.indices { queueState.queues[index].reset() }
      queueState.broken = false
      queueState.features = 0
    }
    state.withLock { state in
      let generation = state.configGeneration
      state = State()
      state.configGeneration = generation
    }
    interruptPin.withLock { $0 }?.set(false)
  }

  private func readAndClearISR() -> UInt8 {
    let isr = state.withLock { state -> UInt8 in
      defer { state.isr = 0 }
      return state.isr
    }
    interruptPin.withLock { $0 }?.set(false)
    return isr
  }

  // MARK: VirtioTransportEvents

  public func queueInterrupt(index: Int, vector: UInt16) {
    if msix.isEnabled {
      if vector != virtioNoVector { msix.signal(vector: Int(vector)) }
      return
    }
    state.withLock { $0.isr |= 1 }
    interruptPin.withLock { $0 }?.set(true)
  }

  public func configurationChanged() {
    let vector = state.withLock { state -> UInt16 in
      state.configGeneration &+= 1
      return state.configVector
    }
    signalConfig(vector: vector)
  }

  private func signalConfig(vector: UInt16) {
    if msix.isEnabled {
      if vector != virtioNoVector { msix.signal(vector: Int(vector)) }
      return
    }
    state.withLock { $0.isr |= 2 }
    interruptPin.withLock { $0 }?.set(true)
  }

  public func deviceNeedsReset(_ reason: String) {
    let (first, vector) = state.withLock { state -> (Bool, UInt16) in
      let first = state.status & VirtioStatus.deviceNeedsReset == 0
      state.status |= VirtioStatus.deviceNeedsReset
      return (first, state.configVector)
    }
    guard first else { return }
    logVirtio("device \(model.deviceType) needs reset: \(reason)")
    signalConfig(vector: vector)
  }
}

// MARK: Machine state

extension VirtioPCIDevice: StateSavable {
  /// Stops serving the queues once the request being served completes, so that guest RAM and
  /// the queues hold still while a snapshot is taken (no receive traffic lands in RAM).
  /// Requests the driver posted meanwhile stay in the available rings: served after `unquiesce`,
  /// or replayed by a machine restored from the snapshot.
  public func quiesce() {
    queues.state.withLock { $0.quiesced = true }
  }

  /// Serves the queues again and looks at each of them once.
  public func unquiesce() {
    let active = queues.state.withLock { state -> Bool in
      state.quiesced = false
      return state.active
    }
    if active { for index in 0..<queueCount { model.notify(queue: index) } }
  }

  /// Transport registers (feature selectors, driver features, status, configuration generation,
  /// queue select, configuration vector, ISR), every queue, the MSI-X table and, for models that
  /// keep any, the model's own state. Device type and offered features must match.
  public func saveState(into writer: inout StateWriter) {
    let saved = state.withLock { $0 }
    writer.write(model.deviceType)
    writer.write(offeredFeatures)
    writer.write(saved.deviceFeatureSelect)
    writer.write(saved.driverFeatureSelect)
    writer.write(saved.driverFeatures)
    writer.write(saved.status)
    writer.write(saved.configGeneration)
    writer.write(saved.queueSelect)
    writer.write(saved.configVector)
    writer.write(saved.isr)
    queues.state.withLock { queueState in
      writer.write(queueState.active)
      writer.write(queueState.broken)
      writer.write(queueState.features)
      writer.write(UInt32(queueState.queues.count))
      for queue in queueState.queues { queue.saveState(into: &writer) }
    }
    writer.section("msix", msix)
    if let stateful = model as? any StateSavable {
      writer.write(true)
      writer.section("model", stateful)
    } else {
      writer.write(false)
    }
  }

  /// Restores the transport and queues, then activates the model when the driver had set
  /// DRIVER_OK, so its worker starts and serves whatever the available rings hold.
  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    let deviceType: UInt16 = try reader.read()
    let features: UInt64 = try reader.read()
    guard deviceType == model.deviceType, features == offeredFeatures else {
      throw MachineStateError("the state file does not match this machine: a virtio device's type or features differ")
    }
    var restored = State()
    restored.deviceFeatureSelect = try reader.read()
    restored.driverFeatureSelect = try reader.read()
    restored.driverFeatures = try reader.read()
    restored.status = try reader.read()
    restored.configGeneration = try reader.read()
    restored.queueSelect = try reader.read()
    restored.configVector = try reader.read()
    restored.isr = try reader.read()
    let active = try reader.readBool()
    let broken = try reader.readBool()
    let negotiated: UInt64 = try reader.read()
    guard Int(try reader.read(UInt32.self)) == queueCount else {
      throw MachineStateError("the state file does not match this machine: a virtio device's queue count differs")
    }
    var restoredQueues = queues.state.withLock { $0.queues }
    for index in restoredQueues.indices { try restoredQueues[index].restoreState(from: &reader) }
    try reader.section("msix", msix)
    let hasModelState = try reader.readBool()
    let stateful = model as? any StateSavable
    guard hasModelState == (stateful != nil) else {
      throw MachineStateError("the state file does not match this machine: a virtio device model differs")
    }
    if let stateful { try reader.section("model", stateful) }
    state.withLock { $0 = restored }
    queues.state.withLock { queueState in
      queueState.queues = restoredQueues
      queueState.active = active
      queueState.broken = broken
      queueState.features = negotiated
      queueState.quiesced = false
    }
    if active { model.activate(queues) }
  }
}
