import Synchronization
import VMCore

/// Where the PCI bus lives in the guest's address spaces, and how INTx# reaches GSIs.
///
/// The defaults fit GuestMemory's layout (RAM below 0xC000_0000, the 32-bit PCI hole above):
/// - 32-bit BARs: `0xC000_0000..<0xE000_0000` (512 MiB);
/// - ECAM (MMCONFIG): `0xE000_0000`, 1 MiB per bus, 256 buses = 256 MiB (only bus 0 is populated);
/// - 64-bit BARs: in the 32-bit window unless `mmio64` is set (the VMM places it above RAM);
/// - I/O BARs: ports `0xC000..<0xD000`;
/// - INTx#: `gsi = intxGSIBase + (slot + pin - 1) % intxGSICount` with pin 1 = INTA#,
///   i.e. GSIs 16-23 by default (IOAPIC inputs above the ISA range).
public struct PCIAddressLayout: Sendable, Equatable {
  /// Start of the ECAM window.
  public var ecamBase: UInt64 = 0xE000_0000
  /// Buses the ECAM window decodes (1 MiB each).
  public var ecamBusCount: Int = 256
  /// Window for 32-bit memory BARs.
  public var mmio32: Range<UInt64> = 0xC000_0000..<0xE000_0000
  /// Window for 64-bit memory BARs (above RAM), if any.
  public var mmio64: Range<UInt64>? = nil
  /// Window for I/O BARs.
  public var ioPorts: Range<UInt32> = 0xC000..<0xD000
  /// First GSI of the INTx# swizzle.
  public var intxGSIBase: UInt32 = 16
  /// Number of GSIs the swizzle spreads over.
  public var intxGSICount: UInt32 = 8

  public init() {}

  /// Bytes of the ECAM window.
  public var ecamSize: UInt64 { UInt64(ecamBusCount) << 20 }
}

/// Why a function could not be attached.
public enum PCIError: Error, Equatable, Sendable, CustomStringConvertible {
  case slotInUse(Int)
  case noFreeSlot
  case outOfBARSpace(slot: Int, bar: Int, size: UInt64)

  public var description: String {
    switch self {
    case .slotInUse(let slot): return "PCI slot \(slot) is already in use"
    case .noFreeSlot: return "no free PCI slot on bus 0"
    case .outOfBARSpace(let slot, let bar, let size):
      return "no room for BAR \(bar) (\(size) bytes) of PCI slot \(slot)"
    }
  }
}

/// PCI bus 0 behind a host bridge: configuration mechanism #1 (ports 0xCF8/0xCFC-0xCFF), ECAM,
/// BAR placement and decoding, INTx# routing and MSI delivery.
///
/// BAR decoding goes through dispatchers the bus registers once on the IOBus for whole windows
/// (the 32-bit hole, the 64-bit window, the I/O port window); each access looks up the BARs as
/// currently programmed, so a guest moving a BAR, or turning memory/I/O decoding off in the
/// command register, takes effect at once without touching the IOBus.
public final class PCIBus: Sendable {
  private struct Route {
    let range: Range<UInt64>
    let device: any PCIDevice
    let bar: Int
  }

  private struct State {
    var slots: [(any PCIDevice)?] = Array(repeating: nil, count: 32)
    var pins: [PCIInterruptPin?] = Array(repeating: nil, count: 32)
    var next32: UInt64
    var next64: UInt64
    var nextIO: UInt64
  }

  /// The address windows and interrupt routing.
  public let layout: PCIAddressLayout
  /// Where MSI-X messages of all functions go; attach the accelerator's delivery to it.
  public let msi: MSIRouter
  private let wire: SharedInterruptWire
  private let state: Mutex<State>
  private let memoryRoutes = Mutex<[Route]>([])
  private let ioRoutes = Mutex<[Route]>([])
  private let configAddress = Atomic<UInt32>(0)

  /// Creates bus 0 with a host bridge in slot 0. INTx# levels go to `interrupts`.
  public init(
    layout: PCIAddressLayout = PCIAddressLayout(), interrupts: any InterruptSink, msi: MSIRouter = MSIRouter()
  ) {
    self.layout = layout
    self.msi = msi
    wire = SharedInterruptWire(sink: interrupts)
    state = Mutex(
      State(
        next32: layout.mmio32.lowerBound, next64: layout.mmio64?.lowerBound ?? 0,
        nextIO: UInt64(layout.ioPorts.lowerBound)))
    state.withLock { $0.slots[0] = PCIHostBridge() }
  }

  /// The GSI that INTx# pin `pin` (1 = INTA# ... 4 = INTD#) of device `slot` is routed to.
  /// The ACPI _PRT (or MP table) the VMM generates must use the same function.
  public func gsi(forSlot slot: Int, pin: UInt8) -> UInt32 {
    layout.intxGSIBase + (UInt32(slot) + UInt32(max(pin, 1)) - 1) % layout.intxGSICount
  }

  /// The functions on the bus, by slot (slot 0 is the host bridge).
  public var devices: [(slot: Int, device: any PCIDevice)] {
    state.withLock { state in state.slots.enumerated().compactMap { slot, device in device.map { (slot, $0) } } }
  }

  /// Attaches `device` as function 0 of `slot` (or the first free slot), places its BARs in
  /// the layout's windows (naturally aligned, decoding left off until the driver enables it
  /// in the command register, as firmware would), sets its Interrupt Line register to its GSI,
  /// and hands it its interrupt pin and the MSI router. Returns the slot.
  @discardableResult
  public func attach(_ device: any PCIDevice, slot requested: Int? = nil) throws(PCIError) -> Int {
    let (slot, pin) = try state.withLock { (state: inout State) throws(PCIError) -> (Int, PCIInterruptPin) in
      let slot: Int
      if let requested {
        guard requested >= 0 && requested < 32, state.slots[requested] == nil else { throw .slotInUse(requested) }
        slot = requested
      } else {
        guard let free = state.slots.firstIndex(where: { $0 == nil }) else { throw .noFreeSlot }
        slot = free
      }
      var placements: [(Int, UInt64)] = []
      var next32 = state.next32
      var next64 = state.next64
      var nextIO = state.nextIO
      for bar in device.config.barDefinitions {
        func place(_ cursor: inout UInt64, limit: UInt64) throws(PCIError) -> UInt64 {
          let base = (cursor + bar.size - 1) & ~(bar.size - 1)
          guard base >= cursor, base + bar.size <= limit else {
            throw .outOfBARSpace(slot: slot, bar: bar.index, size: bar.size)
          }
          cursor = base + bar.size
          return base
        }
        switch bar.kind {
        case .io: placements.append((bar.index, try place(&nextIO, limit: UInt64(layout.ioPorts.upperBound))))
        case .memory32: placements.append((bar.index, try place(&next32, limit: layout.mmio32.upperBound)))
        case .memory64:
          if let window = layout.mmio64 {
            placements.append((bar.index, try place(&next64, limit: window.upperBound)))
          } else {
            placements.append((bar.index, try place(&next32, limit: layout.mmio32.upperBound)))
          }
        }
      }
      state.next32 = next32
      state.next64 = next64
      state.nextIO = nextIO
      for (index, address) in placements { device.config.setBARAddress(index, address) }
      let pinNumber = UInt8(device.config.read(offset: PCIConfigOffset.interruptPin, size: 1))
      let gsi = gsi(forSlot: slot, pin: pinNumber)
      if pinNumber != 0 {
        device.config.setRaw(offset: PCIConfigOffset.interruptLine, size: 1, value: UInt64(gsi & 0xFF))
      }
      let pin = PCIInterruptPin(gsi: gsi, config: device.config, wire: wire, source: slot)
      state.slots[slot] = device
      state.pins[slot] = pin
      return (slot, pin)
    }
    device.attached(PCIAttachment(slot: slot, interruptPin: pin, msi: msi))
    rebuildRoutes()
    return slot
  }

  /// Registers configuration mechanism #1 (port 0xCF8, ports 0xCFC-0xCFF), the ECAM window and
  /// the BAR windows on `bus`. Port 0xCF9 (the reset control register) is left to its owner.
  public func register(on bus: IOBus) throws(IOBusError) {
    let ports = PCIConfigPorts(bus: self)
    try bus.registerPorts(0xCF8, count: 1, device: ports)
    try bus.registerPorts(0xCFC, count: 4, device: ports)
    try bus.registerMMIO(layout.ecamBase, length: layout.ecamSize, device: PCIECAMWindow(bus: self))
    try bus.registerMMIO(
      layout.mmio32.lowerBound, length: UInt64(layout.mmio32.count),
      device: PCIMemoryWindow(bus: self, base: layout.mmio32.lowerBound))
    if let window = layout.mmio64 {
      try bus.registerMMIO(
        window.lowerBound, length: UInt64(window.count), device: PCIMemoryWindow(bus: self, base: window.lowerBound))
    }
    try bus.registerPorts(
      UInt16(layout.ioPorts.lowerBound), count: layout.ioPorts.count,
      device: PCIIOWindow(bus: self, base: UInt16(layout.ioPorts.lowerBound)))
  }

  // MARK: Configuration space access

  private func function(bus: Int, device: Int, function: Int) -> (any PCIDevice)? {
    guard bus == 0, function == 0, device >= 0 && device < 32 else { return nil }
    return state.withLock { $0.slots[device] }
  }

  /// Reads configuration space of bus/device/function; absent functions read as all ones.
  public func configRead(bus: Int, device: Int, function: Int, offset: Int, size: Int) -> UInt32 {
    guard let target = self.function(bus: bus, device: device, function: function) else {
      return size >= 4 ? 0xFFFF_FFFF : (UInt32(1) << (size * 8)) - 1
    }
    return target.config.read(offset: offset, size: size)
  }

  /// Writes configuration space of bus/device/function; writes to absent functions are dropped.
  public func configWrite(bus: Int, device: Int, function: Int, offset: Int, size: Int, value: UInt32) {
    guard let target = self.function(bus: bus, device: device, function: function) else { return }
    target.config.write(offset: offset, size: size, value: value)
    let end = offset + size
    if offset < PCIConfigOffset.command + 2 && end > PCIConfigOffset.command {
      let pin = state.withLock { $0.pins[device] }
      pin?.commandChanged()
      rebuildRoutes()
    } else if offset < PCIConfigOffset.bar0 + 24 && end > PCIConfigOffset.bar0 {
      rebuildRoutes()
    }
    target.configDidWrite(offset: offset, size: size)
  }

  /// The latched CONFIG_ADDRESS (port 0xCF8).
  var configAddressLatch: UInt32 {
    get { configAddress.load(ordering: .acquiring) }
    set { configAddress.store(newValue, ordering: .releasing) }
  }

  // MARK: BAR decoding

  /// Recomputes the decoded BAR ranges from every function's BARs and command register.
  public func rebuildRoutes() {
    let functions = devices
    var memory: [Route] = []
    var io: [Route] = []
    for (_, device) in functions {
      let command = device.config.command
      for bar in device.config.barDefinitions {
        guard let address = device.config.barAddress(bar.index), address != 0 else { continue }
        let (end, overflow) = address.addingReportingOverflow(bar.size)
        guard !overflow else { continue }
        let route = Route(range: address..<end, device: device, bar: bar.index)
        if bar.isMemory {
          if command & PCICommand.memorySpace != 0 { memory.append(route) }
        } else if command & PCICommand.ioSpace != 0 {
          io.append(route)
        }
      }
    }
    memoryRoutes.withLock { $0 = memory }
    ioRoutes.withLock { $0 = io }
  }

  private func route(_ address: UInt64, in routes: borrowing Mutex<[Route]>) -> Route? {
    routes.withLock { routes in routes.first { $0.range.contains(address) } }
  }

  /// A memory read at guest-physical `address` decoded against the current BARs.
  public func memoryRead(_ address: UInt64, size: Int) -> UInt64 {
    guard let route = route(address, in: memoryRoutes) else { return size >= 8 ? ~0 : (1 << (size * 8)) - 1 }
    return route.device.barRead(bar: route.bar, offset: address - route.range.lowerBound, size: size)
  }

  /// A memory write at guest-physical `address` decoded against the current BARs.
  public func memoryWrite(_ address: UInt64, size: Int, value: UInt64) {
    guard let route = route(address, in: memoryRoutes) else { return }
    route.device.barWrite(bar: route.bar, offset: address - route.range.lowerBound, size: size, value: value)
  }

  /// A port read decoded against the current I/O BARs.
  public func ioRead(_ port: UInt16, size: Int) -> UInt32 {
    guard let route = route(UInt64(port), in: ioRoutes) else { return size >= 4 ? ~0 : (1 << (size * 8)) - 1 }
    return UInt32(
      truncatingIfNeeded: route.device.barRead(
        bar: route.bar, offset: UInt64(port) - route.range.lowerBound, size: size))
  }

  /// A port write decoded against the current I/O BARs.
  public func ioWrite(_ port: UInt16, size: Int, value: UInt32) {
    guard let route = route(UInt64(port), in: ioRoutes) else { return }
    route.device.barWrite(
      bar: route.bar, offset: UInt64(port) - route.range.lowerBound, size: size, value: UInt64(value))
  }
}

/// Configuration mechanism #1: CONFIG_ADDRESS at 0xCF8 (32-bit), CONFIG_DATA at 0xCFC-0xCFF
/// (byte, word or dword accesses to the selected dword).
final class PCIConfigPorts: PortIODevice {
  private let bus: PCIBus
  init(bus: PCIBus) { self.bus = bus }

  func portRead(port: UInt16, size: Int) -> UInt32 {
    let latch = bus.configAddressLatch
    if port < 0xCFC {
      return size >= 4 ? latch : latch & ((1 << (size * 8)) - 1)
    }
    let byteOffset = Int(port - 0xCFC)
    let width = min(size, 4 - byteOffset)
    guard latch & 0x8000_0000 != 0 else { return size >= 4 ? ~0 : (1 << (size * 8)) - 1 }
    let value = bus.configRead(
      bus: Int((latch >> 16) & 0xFF), device: Int((latch >> 11) & 0x1F), function: Int((latch >> 8) & 7),
      offset: Int(latch & 0xFC) + byteOffset, size: width)
    return width < size ? value | ~((1 << (width * 8)) - 1) & ((size >= 4 ? ~0 : (1 << (size * 8)) - 1)) : value
  }

  func portWrite(port: UInt16, size: Int, value: UInt32) {
    if port < 0xCFC {
      if size == 4 { bus.configAddressLatch = value & 0x80FF_FFFC }
      return
    }
    let latch = bus.configAddressLatch
    guard latch & 0x8000_0000 != 0 else { return }
    let byteOffset = Int(port - 0xCFC)
    bus.configWrite(
      bus: Int((latch >> 16) & 0xFF), device: Int((latch >> 11) & 0x1F), function: Int((latch >> 8) & 7),
      offset: Int(latch & 0xFC) + byteOffset, size: min(size, 4 - byteOffset), value: value)
  }
}

/// The ECAM (enhanced configuration access mechanism) window: offset = bus << 20 | device << 15
/// | function << 12 | register.
final class PCIECAMWindow: MMIODevice {
  private let bus: PCIBus
  init(bus: PCIBus) { self.bus = bus }

  private func decode(_ offset: UInt64) -> (bus: Int, device: Int, function: Int, register: Int) {
    (Int(offset >> 20), Int((offset >> 15) & 0x1F), Int((offset >> 12) & 7), Int(offset & 0xFFF))
  }

  func mmioRead(offset: UInt64, size: Int) -> UInt64 {
    if size == 8 {
      return mmioRead(offset: offset, size: 4) | mmioRead(offset: offset + 4, size: 4) << 32
    }
    let target = decode(offset)
    let width = min(size, 4096 - target.register)
    return UInt64(
      bus.configRead(
        bus: target.bus, device: target.device, function: target.function, offset: target.register, size: width))
  }

  func mmioWrite(offset: UInt64, size: Int, value: UInt64) {
    if size == 8 {
      mmioWrite(offset: offset, size: 4, value: value & 0xFFFF_FFFF)
      mmioWrite(offset: offset + 4, size: 4, value: value >> 32)
      return
    }
    let target = decode(offset)
    bus.configWrite(
      bus: target.bus, device: target.device, function: target.function, offset: target.register,
      size: min(size, 4096 - target.register), value: UInt32(truncatingIfNeeded: value))
  }
}

/// Routes a whole MMIO window to the BARs currently programmed inside it.
final class PCIMemoryWindow: MMIODevice {
  private let bus: PCIBus
  private let base: UInt64
  init(bus: PCIBus, base: UInt64) {
    self.bus = bus
    self.base = base
  }
  func mmioRead(offset: UInt64, size: Int) -> UInt64 { bus.memoryRead(base + offset, size: size) }
  func mmioWrite(offset: UInt64, size: Int, value: UInt64) { bus.memoryWrite(base + offset, size: size, value: value) }
}

/// Routes a port window to the I/O BARs currently programmed inside it.
final class PCIIOWindow: PortIODevice {
  private let bus: PCIBus
  private let base: UInt16
  init(bus: PCIBus, base: UInt16) {
    self.bus = bus
    self.base = base
  }
  func portRead(port: UInt16, size: Int) -> UInt32 { bus.ioRead(port, size: size) }
  func portWrite(port: UInt16, size: Int, value: UInt32) { bus.ioWrite(port, size: size, value: value) }
}

// MARK: Machine state

/// CONFIG_ADDRESS, then every function in slot order: its configuration space and INTx# level.
/// The decoded BAR ranges are rebuilt from the restored BARs. Device-specific state (MSI-X
/// tables, virtio transports) is saved by the devices.
extension PCIBus: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    writer.write(configAddressLatch)
    let functions = state.withLock { state in (0..<32).compactMap { slot in state.slots[slot].map { (slot, $0) } } }
    writer.write(UInt32(functions.count))
    for (slot, device) in functions {
      writer.write(UInt8(slot))
      writer.section("pci-config", device.config)
      writer.write(state.withLock { $0.pins[slot] }?.isAsserted ?? false)
    }
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    let latch: UInt32 = try reader.read()
    let functions = state.withLock { state in (0..<32).compactMap { slot in state.slots[slot].map { (slot, $0) } } }
    let count = Int(try reader.read(UInt32.self))
    guard count == functions.count else {
      throw MachineStateError(
        "the state file does not match this machine: \(count) PCI functions, this machine has \(functions.count)")
    }
    for (slot, device) in functions {
      let savedSlot = Int(try reader.read(UInt8.self))
      guard savedSlot == slot else {
        throw MachineStateError("the state file does not match this machine: PCI slot \(savedSlot) differs")
      }
      try reader.section("pci-config", device.config)
      let asserted = try reader.readBool()
      state.withLock { $0.pins[slot] }?.restoreLevel(asserted)
    }
    configAddressLatch = latch
    rebuildRoutes()
  }
}
