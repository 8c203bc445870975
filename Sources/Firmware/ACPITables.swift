import VMCore

/// Why the ACPI tables could not be built.
public enum ACPIError: Error, Equatable, Sendable, CustomStringConvertible {
  /// The MADT can describe 1-255 xAPIC processors.
  case unsupportedCPUCount(Int)
  /// The tables do not fit in the reserved window.
  case tablesTooLarge(size: Int, limit: Int)

  public var description: String {
    switch self {
    case .unsupportedCPUCount(let count): return "ACPI tables support 1-255 vCPUs, not \(count)"
    case .tablesTooLarge(let size, let limit):
      return "ACPI tables need \(size) bytes but only \(limit) are reserved for them"
    }
  }
}

/// What the ACPI tables describe. The defaults match Hostvisor's software-CPU PC:
/// IOAPIC at 0xFEC00000, xAPICs at 0xFEE00000, PM registers at 0x600, SCI on IRQ 9.
public struct ACPIConfiguration: Sendable {
  /// Number of vCPUs (APIC IDs and ACPI processor UIDs 0..<cpuCount).
  public var cpuCount: Int
  /// Guest-physical address where the tables start (the RSDP is here, 16-byte aligned).
  public var baseAddress: UInt64 = ACPITables.defaultBase
  /// Bytes reserved for all tables from `baseAddress`.
  public var windowSize: Int = ACPITables.defaultWindowSize
  /// The IOAPIC's ID and MMIO base.
  public var ioapicID: UInt8 = 0
  public var ioapicAddress: UInt32 = 0xFEC0_0000
  /// SCI interrupt (an ISA IRQ, level-triggered active-high per the MADT override).
  public var sciInterrupt: UInt8 = ACPIPowerManagement.sciInterrupt
  /// Fixed-hardware register ports.
  public var pmEventBlock: UInt16 = ACPIPowerManagement.eventBlockPort
  public var pmControlBlock: UInt16 = ACPIPowerManagement.controlBlockPort
  public var pmTimerBlock: UInt16 = ACPIPowerManagement.timerPort
  /// The FADT RESET_REG port and value.
  public var resetPort: UInt16 = ACPIResetRegister.port
  public var resetValue: UInt8 = ACPIResetRegister.resetValue
  /// IA-PC boot architecture flags: legacy ISA devices, an i8042, VGA, a CMOS RTC.
  public var hasLegacyDevices = true
  public var hasI8042 = false
  public var hasVGA = false
  public var hasCMOSRTC = true
  /// Extra AML terms appended to the DSDT (e.g. `\_SB.PCI0`).
  public var dsdtTerms: [[UInt8]] = []
  /// Extra complete tables (header and checksum included, e.g. MCFG) listed in the RSDT/XSDT.
  public var additionalTables: [[UInt8]] = []

  public init(cpuCount: Int) { self.cpuCount = cpuCount }
}

/// The ACPI tables for one machine, laid out at fixed guest-physical addresses:
/// RSDP (revision 2), RSDT, XSDT, FADT (revision 6, classic PC: PM1a event/control blocks, PM
/// timer, SCI IRQ 9, reset register), FACS, MADT and DSDT (with `\_S5_`).
///
/// Linux finds the RSDP by scanning 0xE0000-0xFFFFF or from `boot_params.acpi_rsdp_addr`
/// (offset 0x070 of the zero page); both work with `rsdpAddress`. The window
/// `[baseAddress, baseAddress + windowSize)` must be reserved in the e820 map.
public struct ACPITables: Sendable {
  /// Default start of the tables: the 0xE0000-0xEFFFF BIOS-extension area.
  public static let defaultBase: UInt64 = 0xE_0000
  /// Default size of the reserved window (64 KiB).
  public static let defaultWindowSize = 0x1_0000

  /// OEM fields of every table header.
  public static let oemID: [UInt8] = Array("HVISOR".utf8)
  public static let oemTableID: [UInt8] = Array("HOSTVISR".utf8)
  public static let creatorID: [UInt8] = Array("HVSR".utf8)

  /// Where the RSDP is (for boot_params.acpi_rsdp_addr).
  public let rsdpAddress: UInt64
  /// Every table and its guest-physical address.
  public let tables: [(address: UInt64, bytes: [UInt8])]
  /// The window to mark reserved in the e820 map.
  public let reservedRange: (base: UInt64, length: UInt64)

  /// Addresses of individual tables (for tests and logs).
  public let addresses: [String: UInt64]

  /// Builds the tables for `cpuCount` vCPUs with default settings.
  public static func build(cpuCount: Int) throws(ACPIError) -> ACPITables {
    try build(ACPIConfiguration(cpuCount: cpuCount))
  }

  /// Builds the tables for `configuration`.
  public static func build(_ configuration: ACPIConfiguration) throws(ACPIError) -> ACPITables {
    guard (1...255).contains(configuration.cpuCount) else {
      throw .unsupportedCPUCount(configuration.cpuCount)
    }
    let madt = makeMADT(configuration)
    let dsdt = makeDSDT(configuration)
    let facs = makeFACS()
    let pointedTables = 2 + configuration.additionalTables.count  // FADT, MADT, extras
    let rsdtSize = 36 + 4 * pointedTables
    let xsdtSize = 36 + 8 * pointedTables

    // Lay out: RSDP, RSDT, XSDT, FADT, FACS (64-byte aligned), MADT, DSDT, extras.
    var cursor = configuration.baseAddress
    func place(_ size: Int, alignment: UInt64 = 16) -> UInt64 {
      cursor = (cursor + alignment - 1) & ~(alignment - 1)
      defer { cursor += UInt64(size) }
      return cursor
    }
    let rsdpAddress = place(36)
    let rsdtAddress = place(rsdtSize)
    let xsdtAddress = place(xsdtSize)
    let fadtAddress = place(fadtLength)
    let facsAddress = place(facs.count, alignment: 64)
    let madtAddress = place(madt.count)
    let dsdtAddress = place(dsdt.count)
    let extraAddresses = configuration.additionalTables.map { place($0.count) }
    let used = Int(cursor - configuration.baseAddress)
    guard used <= configuration.windowSize else {
      throw .tablesTooLarge(size: used, limit: configuration.windowSize)
    }

    let fadt = makeFADT(configuration, facs: facsAddress, dsdt: dsdtAddress)
    let listed = [fadtAddress, madtAddress] + extraAddresses
    let rsdt = table("RSDT", revision: 1, body: listed.flatMap { littleEndian($0, count: 4) })
    let xsdt = table("XSDT", revision: 1, body: listed.flatMap { littleEndian($0, count: 8) })
    let rsdp = makeRSDP(rsdt: rsdtAddress, xsdt: xsdtAddress)

    var tables: [(address: UInt64, bytes: [UInt8])] = [
      (rsdpAddress, rsdp), (rsdtAddress, rsdt), (xsdtAddress, xsdt), (fadtAddress, fadt),
      (facsAddress, facs), (madtAddress, madt), (dsdtAddress, dsdt),
    ]
    for (address, bytes) in zip(extraAddresses, configuration.additionalTables) { tables.append((address, bytes)) }
    return ACPITables(
      rsdpAddress: rsdpAddress, tables: tables,
      reservedRange: (configuration.baseAddress, UInt64(configuration.windowSize)),
      addresses: [
        "RSDP": rsdpAddress, "RSDT": rsdtAddress, "XSDT": xsdtAddress, "FACP": fadtAddress,
        "FACS": facsAddress, "APIC": madtAddress, "DSDT": dsdtAddress,
      ])
  }

  /// Copies every table into guest RAM (the window is zeroed first).
  public func install(into memory: GuestMemory) throws(GuestMemoryError) {
    try memory.fill(0, at: reservedRange.base, length: reservedRange.length)
    for (address, bytes) in tables { try memory.writeBytes(bytes, at: address) }
  }

  // MARK: Tables

  /// A complete table: the 36-byte system description header, `body`, and a valid checksum.
  public static func table(_ signature: String, revision: UInt8, body: [UInt8]) -> [UInt8] {
    let signatureBytes = Array(signature.utf8)
    precondition(signatureBytes.count == 4, "ACPI signatures are four characters")
    var bytes = signatureBytes
    bytes += littleEndian(UInt64(36 + body.count), count: 4)
    bytes += [revision, 0]
    bytes += oemID
    bytes += oemTableID
    bytes += littleEndian(1, count: 4)  // OEM revision
    bytes += creatorID
    bytes += littleEndian(1, count: 4)  // creator revision
    bytes += body
    bytes[9] = checksum(bytes)
    return bytes
  }

  /// The byte that makes `bytes` sum to zero (with the checksum byte itself counted as zero).
  public static func checksum<C: Collection>(_ bytes: C) -> UInt8 where C.Element == UInt8 {
    0 &- bytes.reduce(0, &+)
  }

  static func makeRSDP(rsdt: UInt64, xsdt: UInt64) -> [UInt8] {
    var bytes = Array("RSD PTR ".utf8) + [0] + oemID + [2]
    bytes += littleEndian(rsdt, count: 4)
    bytes += littleEndian(36, count: 4)
    bytes += littleEndian(xsdt, count: 8)
    bytes += [0, 0, 0, 0]
    bytes[8] = checksum(bytes[0..<20])
    bytes[32] = checksum(bytes)
    return bytes
  }

  static let fadtLength = 276

  /// Generic Address Structure for a System I/O register.
  static func ioAddress(_ port: UInt16, bitWidth: UInt8, accessSize: UInt8) -> [UInt8] {
    [1, bitWidth, 0, accessSize] + littleEndian(UInt64(port), count: 8)
  }

  static func makeFADT(_ configuration: ACPIConfiguration, facs: UInt64, dsdt: UInt64) -> [UInt8] {
    var body = [UInt8](repeating: 0, count: fadtLength - 36)
    func put(_ offset: Int, _ value: UInt64, _ count: Int) {
      for (index, byte) in littleEndian(value, count: count).enumerated() { body[offset - 36 + index] = byte }
    }
    func put(_ offset: Int, _ bytes: [UInt8]) {
      for (index, byte) in bytes.enumerated() { body[offset - 36 + index] = byte }
    }
    put(36, facs, 4)  // FIRMWARE_CTRL
    put(40, dsdt, 4)  // DSDT
    put(45, 0, 1)  // Preferred_PM_Profile: unspecified
    put(46, UInt64(configuration.sciInterrupt), 2)  // SCI_INT
    // SMI_CMD = 0: ACPI mode only, no SMM handshake; SCI_EN reads as 1.
    put(56, UInt64(configuration.pmEventBlock), 4)  // PM1a_EVT_BLK
    put(64, UInt64(configuration.pmControlBlock), 4)  // PM1a_CNT_BLK
    put(76, UInt64(configuration.pmTimerBlock), 4)  // PM_TMR_BLK
    put(88, 4, 1)  // PM1_EVT_LEN
    put(89, 2, 1)  // PM1_CNT_LEN
    put(91, 4, 1)  // PM_TMR_LEN
    put(96, 0x0FFF, 2)  // P_LVL2_LAT > 100: C2 not supported
    put(98, 0x0FFF, 2)  // P_LVL3_LAT > 1000: C3 not supported
    var bootFlags: UInt64 = 0
    if configuration.hasLegacyDevices { bootFlags |= 1 << 0 }
    if configuration.hasI8042 { bootFlags |= 1 << 1 }
    if !configuration.hasVGA { bootFlags |= 1 << 2 }
    if !configuration.hasCMOSRTC { bootFlags |= 1 << 5 }
    put(109, bootFlags, 2)  // IAPC_BOOT_ARCH
    // Flags: WBINVD, PROC_C1, SLP_BUTTON (no fixed sleep button), TMR_VAL_EXT (32-bit PM timer),
    // RESET_REG_SUP. Not HW_REDUCED_ACPI.
    let flags: UInt64 = (1 << 0) | (1 << 2) | (1 << 5) | (1 << 8) | (1 << 10)
    put(112, flags, 4)
    put(116, ioAddress(configuration.resetPort, bitWidth: 8, accessSize: 1))  // RESET_REG
    put(128, UInt64(configuration.resetValue), 1)  // RESET_VALUE
    put(131, 3, 1)  // FADT minor version (6.3)
    put(132, facs, 8)  // X_FIRMWARE_CTRL
    put(140, dsdt, 8)  // X_DSDT
    put(148, ioAddress(configuration.pmEventBlock, bitWidth: 32, accessSize: 2))  // X_PM1a_EVT_BLK
    put(172, ioAddress(configuration.pmControlBlock, bitWidth: 16, accessSize: 2))  // X_PM1a_CNT_BLK
    put(208, ioAddress(configuration.pmTimerBlock, bitWidth: 32, accessSize: 3))  // X_PM_TMR_BLK
    put(268, Array("HOSTVISR".utf8))  // hypervisor vendor identity
    return table("FACP", revision: 6, body: body)
  }

  static func makeFACS() -> [UInt8] {
    var bytes = Array("FACS".utf8) + littleEndian(64, count: 4)
    bytes += [UInt8](repeating: 0, count: 56)
    bytes[32] = 2  // version
    return bytes
  }

  /// MADT interrupt-source-override flags: polarity bits 1:0, trigger mode bits 3:2.
  public enum MPSFlags {
    public static let conforming: UInt16 = 0
    public static let activeHigh: UInt16 = 1
    public static let activeLow: UInt16 = 3
    public static let edge: UInt16 = 1 << 2
    public static let level: UInt16 = 3 << 2
  }

  static func makeMADT(_ configuration: ACPIConfiguration) -> [UInt8] {
    var body = littleEndian(0xFEE0_0000, count: 4)  // local APIC address
    body += littleEndian(1, count: 4)  // PCAT_COMPAT: dual 8259s present
    for cpu in 0..<configuration.cpuCount {
      body += [0, 8, UInt8(cpu), UInt8(cpu)] + littleEndian(1, count: 4)  // processor local APIC, enabled
    }
    body += [1, 12, configuration.ioapicID, 0]
    body += littleEndian(UInt64(configuration.ioapicAddress), count: 4)
    body += littleEndian(0, count: 4)  // GSI base
    // ISA IRQ 0 (PIT) → GSI 2; the SCI's IRQ → same GSI, level-triggered active-high.
    body += [2, 10, 0, 0] + littleEndian(2, count: 4) + littleEndian(UInt64(MPSFlags.conforming), count: 2)
    let sci = UInt64(configuration.sciInterrupt)
    body += [2, 10, 0, UInt8(sci)] + littleEndian(sci, count: 4)
    body += littleEndian(UInt64(MPSFlags.activeHigh | MPSFlags.level), count: 2)
    // Local APIC NMI: every processor, LINT1.
    body += [4, 6, 0xFF] + littleEndian(UInt64(MPSFlags.conforming), count: 2) + [1]
    return table("APIC", revision: 5, body: body)
  }

  /// The SLP_TYP value the DSDT's `\_S5_` package gives for soft-off.
  public static let s5SleepType: UInt8 = ACPIPowerManagement.s5SleepType

  static func makeDSDT(_ configuration: ACPIConfiguration) -> [UInt8] {
    let s5 = AML.name(
      "\\_S5", AML.package([AML.integer(UInt64(s5SleepType)), AML.integer(0), AML.integer(0), AML.integer(0)]))
    return table("DSDT", revision: 2, body: s5 + configuration.dsdtTerms.flatMap { $0 })
  }

  static func littleEndian(_ value: UInt64, count: Int) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }
  }
}
