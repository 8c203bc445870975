import Foundation
import Testing
import VMCore

@testable import Firmware

/// Little-endian field readers over a table's bytes.
extension Array where Element == UInt8 {
  func u8(_ offset: Int) -> UInt8 { self[offset] }
  func u16(_ offset: Int) -> UInt16 { UInt16(self[offset]) | UInt16(self[offset + 1]) << 8 }
  func u32(_ offset: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(self[offset + $1]) << (8 * UInt32($1)) } }
  func u64(_ offset: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(self[offset + $1]) << (8 * UInt64($1)) } }
  func text(_ offset: Int, _ count: Int) -> String { String(decoding: self[offset..<(offset + count)], as: UTF8.self) }
  var byteSum: UInt8 { reduce(0, &+) }
}

/// Reads the tables back from guest memory the way an OS does.
struct TableReader {
  let memory: GuestMemory

  func table(at address: UInt64) throws -> [UInt8] {
    let length = try memory.read(UInt32.self, at: address + 4)
    return try memory.readBytes(at: address, count: Int(length))
  }

  /// Scans 0xE0000-0xFFFFF on 16-byte boundaries for "RSD PTR " with a valid checksum.
  func findRSDP() throws -> UInt64? {
    for address in stride(from: UInt64(0xE_0000), to: 0x10_0000, by: 16) {
      let candidate = try memory.readBytes(at: address, count: 20)
      if candidate.text(0, 8) == "RSD PTR " && candidate.byteSum == 0 { return address }
    }
    return nil
  }

  /// Every table the XSDT lists, by signature.
  func tablesFromXSDT(_ xsdt: [UInt8]) throws -> [String: [UInt8]] {
    var result: [String: [UInt8]] = [:]
    for offset in stride(from: 36, to: xsdt.count, by: 8) {
      let bytes = try table(at: xsdt.u64(offset))
      result[bytes.text(0, 4)] = bytes
    }
    return result
  }
}

struct MADTEntry: Equatable {
  var type: UInt8
  var bytes: [UInt8]
}

func parseMADT(_ madt: [UInt8]) -> [MADTEntry] {
  var entries: [MADTEntry] = []
  var offset = 44
  while offset + 2 <= madt.count {
    let length = Int(madt[offset + 1])
    guard length >= 2, offset + length <= madt.count else {
      Issue.record("malformed MADT entry at \(offset)")
      break
    }
    entries.append(MADTEntry(type: madt[offset], bytes: Array(madt[offset..<(offset + length)])))
    offset += length
  }
  #expect(offset == madt.count, "MADT entries fill the table exactly")
  return entries
}

@Suite struct ACPITableTests {
  func installed(cpus: Int) throws -> (GuestMemory, ACPITables) {
    let memory = try GuestMemory(size: 16 << 20)
    let tables = try ACPITables.build(cpuCount: cpus)
    try tables.install(into: memory)
    return (memory, tables)
  }

  @Test func rsdpIsFoundByScanAndChecksumsHold() throws {
    let (memory, tables) = try installed(cpus: 2)
    let reader = TableReader(memory: memory)
    let rsdpAddress = try #require(try reader.findRSDP())
    #expect(rsdpAddress == tables.rsdpAddress)
    #expect(rsdpAddress == 0xE_0000)
    let rsdp = try memory.readBytes(at: rsdpAddress, count: 36)
    #expect(rsdp.text(0, 8) == "RSD PTR ")
    #expect(rsdp[0..<20].reduce(0, &+) == 0, "ACPI 1.0 checksum over the first 20 bytes")
    #expect(rsdp.byteSum == 0, "extended checksum over all 36 bytes")
    #expect(rsdp.u8(15) == 2, "revision 2")
    #expect(rsdp.u32(20) == 36)
    let rsdt = try reader.table(at: UInt64(rsdp.u32(16)))
    let xsdt = try reader.table(at: rsdp.u64(24))
    #expect(rsdt.text(0, 4) == "RSDT" && xsdt.text(0, 4) == "XSDT")
    for (address, bytes) in tables.tables where bytes.text(0, 4) != "RSD " && bytes.text(0, 4) != "FACS" {
      #expect(bytes.byteSum == 0, "checksum of \(bytes.text(0, 4)) at 0x\(String(address, radix: 16))")
      #expect(Int(bytes.u32(4)) == bytes.count, "length field of \(bytes.text(0, 4))")
    }
    let listed = try reader.tablesFromXSDT(xsdt)
    #expect(Set(listed.keys) == ["FACP", "APIC"])
    // The RSDT lists the same tables with 32-bit pointers.
    let rsdtTargets = stride(from: 36, to: rsdt.count, by: 4).map { UInt64(rsdt.u32($0)) }
    let xsdtTargets = stride(from: 36, to: xsdt.count, by: 8).map { xsdt.u64($0) }
    #expect(rsdtTargets == xsdtTargets)
    // Everything lies in the reserved window.
    for (address, bytes) in tables.tables {
      #expect(address >= tables.reservedRange.base)
      #expect(address + UInt64(bytes.count) <= tables.reservedRange.base + tables.reservedRange.length)
    }
  }

  @Test func fadtDescribesClassicPCHardware() throws {
    let (memory, _) = try installed(cpus: 1)
    let reader = TableReader(memory: memory)
    let rsdp = try memory.readBytes(at: try #require(try reader.findRSDP()), count: 36)
    let fadt = try #require(try reader.tablesFromXSDT(try reader.table(at: rsdp.u64(24)))["FACP"])
    #expect(fadt.count == 276)
    #expect(fadt.u8(8) == 6, "FADT revision 6")
    #expect(fadt.u16(46) == 9, "SCI_INT")
    #expect(fadt.u32(48) == 0, "no SMI_CMD: always in ACPI mode")
    #expect(fadt.u32(56) == 0x600 && fadt.u8(88) == 4, "PM1a_EVT_BLK")
    #expect(fadt.u32(64) == 0x604 && fadt.u8(89) == 2, "PM1a_CNT_BLK")
    #expect(fadt.u32(76) == 0x608 && fadt.u8(91) == 4, "PM_TMR_BLK")
    let flags = fadt.u32(112)
    #expect(flags & (1 << 20) == 0, "not hardware-reduced")
    #expect(flags & (1 << 8) != 0, "32-bit PM timer")
    #expect(flags & (1 << 10) != 0, "reset register supported")
    #expect(fadt.u8(116) == 1 && fadt.u64(120) == 0xCF9 && fadt.u8(128) == 6, "RESET_REG = I/O 0xCF9, value 6")
    #expect(fadt.u8(172) == 1 && fadt.u64(176) == 0x604, "X_PM1a_CNT_BLK")
    let dsdt = try reader.table(at: fadt.u64(140))
    #expect(dsdt.text(0, 4) == "DSDT")
    #expect(UInt64(fadt.u32(40)) == fadt.u64(140), "DSDT and X_DSDT agree")
    let facsAddress = fadt.u64(132)
    #expect(facsAddress % 64 == 0 && UInt64(fadt.u32(36)) == facsAddress)
    let facs = try memory.readBytes(at: facsAddress, count: 64)
    #expect(facs.text(0, 4) == "FACS" && facs.u32(4) == 64)
  }

  @Test func madtEntriesParseBack() throws {
    let (memory, tables) = try installed(cpus: 4)
    let madt = try TableReader(memory: memory).table(at: try #require(tables.addresses["APIC"]))
    #expect(madt.u32(36) == 0xFEE0_0000)
    #expect(madt.u32(40) & 1 == 1, "PCAT_COMPAT")
    let entries = parseMADT(madt)
    let processors = entries.filter { $0.type == 0 }
    #expect(processors.count == 4)
    for (index, entry) in processors.enumerated() {
      #expect(entry.bytes.count == 8)
      #expect(entry.bytes[2] == UInt8(index) && entry.bytes[3] == UInt8(index), "UID and APIC ID")
      #expect(entry.bytes.u32(4) & 1 == 1, "enabled")
    }
    let ioapics = entries.filter { $0.type == 1 }
    #expect(ioapics.count == 1)
    #expect(ioapics.first?.bytes.u32(4) == 0xFEC0_0000 && ioapics.first?.bytes.u32(8) == 0)
    let overrides = entries.filter { $0.type == 2 }.map { ($0.bytes[3], $0.bytes.u32(4), $0.bytes.u16(8)) }
    #expect(overrides.count == 2)
    #expect(overrides.contains { $0 == (0, 2, 0) }, "ISA IRQ 0 → GSI 2")
    #expect(overrides.contains { $0 == (9, 9, 0x0D) }, "ISA IRQ 9 → GSI 9, level, active high")
    let nmis = entries.filter { $0.type == 4 }
    #expect(nmis.count == 1)
    #expect(nmis.first?.bytes == [4, 6, 0xFF, 0, 0, 1], "all processors, LINT1")
  }

  @Test func dsdtHasWellFormedS5Package() throws {
    let (memory, tables) = try installed(cpus: 1)
    let dsdt = try TableReader(memory: memory).table(at: try #require(tables.addresses["DSDT"]))
    #expect(dsdt.u8(8) == 2, "revision 2: 64-bit integers")
    var reader = AMLReader(dsdt, at: 36)
    var found: [UInt64]?
    while reader.position < dsdt.count {
      let op = try reader.byte()
      guard op == 0x08 else {
        Issue.record("unexpected opcode 0x\(String(op, radix: 16)) in the DSDT")
        break
      }
      let name = try reader.nameString()
      let package = try reader.integerPackage()
      if name == "\\_S5_" { found = package }
    }
    #expect(reader.position == dsdt.count, "AML fills the DSDT exactly")
    let s5 = try #require(found)
    #expect(s5.count == 4)
    #expect(s5[0] == UInt64(ACPIPowerManagement.s5SleepType), "PM1a SLP_TYP")
    #expect(s5[0] < 8 && s5[1] < 8)
  }

  @Test func dsdtAppendsExtraTermsAndExtraTablesAreListed() throws {
    var configuration = ACPIConfiguration(cpuCount: 1)
    configuration.dsdtTerms = [AML.scope("\\_SB", [AML.device("PCI0", [AML.name("_HID", AML.eisaID("PNP0A03"))])])]
    configuration.additionalTables = [ACPITables.table("MCFG", revision: 1, body: [UInt8](repeating: 0, count: 8))]
    let tables = try ACPITables.build(configuration)
    let dsdt = try #require(tables.tables.first { $0.bytes.text(0, 4) == "DSDT" }?.bytes)
    #expect(dsdt.byteSum == 0)
    #expect(dsdt.suffix(configuration.dsdtTerms[0].count) == configuration.dsdtTerms[0][...])
    let xsdt = try #require(tables.tables.first { $0.bytes.text(0, 4) == "XSDT" }?.bytes)
    #expect(xsdt.count == 36 + 3 * 8)
  }

  @Test func rejectsUnsupportedCPUCounts() {
    #expect(throws: ACPIError.unsupportedCPUCount(0)) { try ACPITables.build(cpuCount: 0) }
    #expect(throws: ACPIError.unsupportedCPUCount(256)) { try ACPITables.build(cpuCount: 256) }
    #expect((try? ACPITables.build(cpuCount: 255)) != nil)
    var tiny = ACPIConfiguration(cpuCount: 8)
    tiny.windowSize = 256
    #expect {
      try ACPITables.build(tiny)
    } throws: { error in
      guard case .tablesTooLarge(let size, 256) = error as? ACPIError else { return false }
      return size > 256
    }
  }
}
