/// ACPI description of a PCI Express host bridge (segment 0): the MCFG table for its ECAM
/// window and the DSDT `\_SB.PCI0` device (PNP0A08/PNP0A03) with its resource windows and
/// interrupt routing table. The values come from the PCI bus the VMM builds; this type does not
/// depend on the PCI module, so the caller passes the layout and the INTx# routing in.
public struct ACPIPCIHostBridge: Sendable {
  /// One `_PRT` entry: INTx# `pin` (0 = INTA# ... 3 = INTD#, as `_PRT` counts) of device
  /// `slot` is wired to global system interrupt `gsi` (level-triggered).
  public struct Route: Sendable, Equatable {
    public var slot: Int
    public var pin: Int
    public var gsi: UInt32
    public init(slot: Int, pin: Int, gsi: UInt32) {
      self.slot = slot
      self.pin = pin
      self.gsi = gsi
    }
  }

  /// Guest-physical base of the ECAM (MMCONFIG) window for bus `busNumbers.lowerBound`.
  public var ecamBase: UInt64
  /// The bus numbers the ECAM window decodes (and the bridge's `_CRS` bus range).
  public var busNumbers: ClosedRange<UInt8>
  /// The 32-bit memory window for BARs (producer range in `_CRS`).
  public var mmio32: Range<UInt64>
  /// An optional 64-bit memory window for BARs.
  public var mmio64: Range<UInt64>?
  /// The I/O port ranges the bridge forwards (everything except the 0xCF8-0xCFF config ports).
  public var ioWindows: [ClosedRange<UInt16>] = [0x0000...0x0CF7, 0x0D00...0xFFFF]
  /// The INTx# routes for `_PRT`.
  public var routes: [Route]

  /// Describes a bridge.
  public init(
    ecamBase: UInt64, busNumbers: ClosedRange<UInt8>, mmio32: Range<UInt64>, mmio64: Range<UInt64>? = nil,
    routes: [Route]
  ) {
    self.ecamBase = ecamBase
    self.busNumbers = busNumbers
    self.mmio32 = mmio32
    self.mmio64 = mmio64
    self.routes = routes
  }

  /// Bytes of ECAM space: 1 MiB per bus.
  public var ecamSize: UInt64 { UInt64(busNumbers.count) << 20 }

  /// The MCFG table (PCI Firmware Specification 3.x §4.1.2): one allocation for segment 0.
  public func mcfgTable() -> [UInt8] {
    var body = [UInt8](repeating: 0, count: 8)  // reserved
    body += ACPITables.littleEndian(ecamBase, count: 8)
    body += ACPITables.littleEndian(0, count: 2)  // PCI segment group
    body += [busNumbers.lowerBound, busNumbers.upperBound]
    body += [0, 0, 0, 0]  // reserved
    return ACPITables.table("MCFG", revision: 1, body: body)
  }

  /// `Scope(\_SB) { Device(PCI0) {...}; Device(MCRS) {...} }`: the host bridge and a
  /// motherboard-resource device (PNP0C02) that claims the ECAM window, as Linux expects
  /// before it trusts the MCFG.
  public func dsdtTerm() -> [UInt8] {
    let bridge = AML.device(
      "PCI0",
      [
        AML.name("_HID", AML.eisaID("PNP0A08")),
        AML.name("_CID", AML.eisaID("PNP0A03")),
        AML.name("_SEG", AML.integer(0)),
        AML.name("_BBN", AML.integer(UInt64(busNumbers.lowerBound))),
        AML.name("_UID", AML.integer(0)),
        AML.name("_CRS", AML.buffer(bridgeResources())),
        AML.name("_PRT", routingTable()),
      ])
    let reservation = AML.device(
      "MCRS",
      [
        AML.name("_HID", AML.eisaID("PNP0C02")),
        AML.name("_UID", AML.integer(1)),
        AML.name(
          "_CRS",
          AML.buffer(
            ACPIResource.memory32Fixed(base: UInt32(truncatingIfNeeded: ecamBase), length: UInt32(ecamSize))
              + ACPIResource.endTag)),
      ])
    return AML.scope("\\_SB", [bridge, reservation])
  }

  /// The `_PRT` package: `Package { Address 0xSSSSFFFF, Pin, Source 0, GSI }` per route.
  public func routingTable() -> [UInt8] {
    AML.package(
      routes.map { route in
        AML.package([
          AML.integer(UInt64(route.slot) << 16 | 0xFFFF), AML.integer(UInt64(route.pin)), AML.integer(0),
          AML.integer(UInt64(route.gsi)),
        ])
      })
  }

  /// The bridge's `_CRS` resource template.
  public func bridgeResources() -> [UInt8] {
    var bytes = ACPIResource.wordAddress(
      type: .busNumber, minimum: UInt16(busNumbers.lowerBound), maximum: UInt16(busNumbers.upperBound))
    bytes += ACPIResource.ioPort(minimum: 0x0CF8, maximum: 0x0CF8, alignment: 1, length: 8)
    for window in ioWindows {
      bytes += ACPIResource.wordAddress(type: .io, minimum: window.lowerBound, maximum: window.upperBound)
    }
    bytes += ACPIResource.dwordMemory(
      minimum: UInt32(mmio32.lowerBound), maximum: UInt32(mmio32.upperBound - 1))
    if let mmio64 {
      bytes += ACPIResource.qwordMemory(minimum: mmio64.lowerBound, maximum: mmio64.upperBound - 1)
    }
    return bytes + ACPIResource.endTag
  }
}

/// ACPI resource descriptors (ACPI 6.x §6.4) used in `_CRS` buffers.
public enum ACPIResource {
  /// Address space resource types.
  public enum AddressSpace: UInt8, Sendable {
    case memory = 0
    case io = 1
    case busNumber = 2
  }

  /// Producer, minimum and maximum fixed, positive decode.
  static let producerFixedFlags: UInt8 = 0x0C

  /// End tag with a zero checksum ("treat as correct").
  public static let endTag: [UInt8] = [0x79, 0x00]

  /// Word Address Space Descriptor for a fixed range (I/O ranges: ISA and non-ISA, EntireRange).
  public static func wordAddress(type: AddressSpace, minimum: UInt16, maximum: UInt16) -> [UInt8] {
    let typeFlags: UInt8 = type == .io ? 0x03 : 0
    var bytes: [UInt8] = [0x88, 13, 0, type.rawValue, producerFixedFlags, typeFlags]
    for value in [0, minimum, maximum, 0, maximum &- minimum &+ 1] {
      bytes += ACPITables.littleEndian(UInt64(value), count: 2)
    }
    return bytes
  }

  /// I/O Port Descriptor with 16-bit decode.
  public static func ioPort(minimum: UInt16, maximum: UInt16, alignment: UInt8, length: UInt8) -> [UInt8] {
    [0x47, 0x01] + ACPITables.littleEndian(UInt64(minimum), count: 2)
      + ACPITables.littleEndian(UInt64(maximum), count: 2) + [alignment, length]
  }

  /// DWord Address Space Descriptor: a read-write, non-cacheable memory range.
  public static func dwordMemory(minimum: UInt32, maximum: UInt32) -> [UInt8] {
    var bytes: [UInt8] = [0x87, 23, 0, AddressSpace.memory.rawValue, producerFixedFlags, 0x01]
    for value in [0, minimum, maximum, 0, maximum &- minimum &+ 1] {
      bytes += ACPITables.littleEndian(UInt64(value), count: 4)
    }
    return bytes
  }

  /// QWord Address Space Descriptor: a read-write, non-cacheable memory range.
  public static func qwordMemory(minimum: UInt64, maximum: UInt64) -> [UInt8] {
    var bytes: [UInt8] = [0x8A, 43, 0, AddressSpace.memory.rawValue, producerFixedFlags, 0x01]
    for value in [0, minimum, maximum, 0, maximum &- minimum &+ 1] {
      bytes += ACPITables.littleEndian(value, count: 8)
    }
    return bytes
  }

  /// 32-Bit Fixed Memory Range Descriptor (read-write).
  public static func memory32Fixed(base: UInt32, length: UInt32) -> [UInt8] {
    [0x86, 9, 0, 0x01] + ACPITables.littleEndian(UInt64(base), count: 4)
      + ACPITables.littleEndian(UInt64(length), count: 4)
  }
}
