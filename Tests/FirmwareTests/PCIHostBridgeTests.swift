import Foundation
import Testing

@testable import Firmware

/// The bridge the VMM describes by default: ECAM at 0xE0000000 for buses 0-255, BARs in
/// 0xC0000000-0xDFFFFFFF, INTx# swizzled onto GSIs 16-23.
func defaultBridge() -> ACPIPCIHostBridge {
  var routes: [ACPIPCIHostBridge.Route] = []
  for slot in 0..<32 {
    for pin in 0..<4 { routes.append(.init(slot: slot, pin: pin, gsi: 16 + UInt32(slot + pin) % 8)) }
  }
  return ACPIPCIHostBridge(
    ecamBase: 0xE000_0000, busNumbers: 0...255, mmio32: 0xC000_0000..<0xE000_0000, routes: routes)
}

/// A minimal AML reader for the data objects `_PRT` uses: integers and nested packages.
struct AMLDataReader {
  enum Object: Equatable {
    case integer(UInt64)
    case package([Object])
  }
  let bytes: [UInt8]
  var position: Int

  mutating func packageLength() -> Int {
    let lead = bytes[position]
    let extra = Int(lead >> 6)
    var length = extra == 0 ? Int(lead & 0x3F) : Int(lead & 0x0F)
    for index in 0..<extra { length |= Int(bytes[position + 1 + index]) << (4 + 8 * index) }
    return length
  }

  mutating func object() throws -> Object {
    let opcode = bytes[position]
    func little(_ count: Int) -> UInt64 {
      (0..<count).reduce(0) { $0 | UInt64(bytes[position + 1 + $1]) << (8 * UInt64($1)) }
    }
    switch opcode {
    case 0x00: position += 1; return .integer(0)
    case 0x01: position += 1; return .integer(1)
    case 0xFF: position += 1; return .integer(.max)
    case 0x0A: defer { position += 2 }; return .integer(little(1))
    case 0x0B: defer { position += 3 }; return .integer(little(2))
    case 0x0C: defer { position += 5 }; return .integer(little(4))
    case 0x0E: defer { position += 9 }; return .integer(little(8))
    case 0x12:
      position += 1
      let start = position
      let length = packageLength()
      position += Int(bytes[position] >> 6) + 1
      let count = Int(bytes[position])
      position += 1
      var elements: [Object] = []
      for _ in 0..<count { elements.append(try object()) }
      #expect(position == start + length, "package length does not match its contents")
      return .package(elements)
    default:
      throw AMLReadError(opcode: opcode, offset: position)
    }
  }
}

struct AMLReadError: Error {
  let opcode: UInt8
  let offset: Int
}

struct PCIHostBridgeTests {
  @Test func mcfgDescribesTheECAMWindow() {
    let mcfg = defaultBridge().mcfgTable()
    #expect(Array(mcfg[0..<4]) == Array("MCFG".utf8))
    #expect(mcfg.count == 60)
    #expect(mcfg.reduce(0, &+) == 0)
    let base = (0..<8).reduce(UInt64(0)) { $0 | UInt64(mcfg[44 + $1]) << (8 * UInt64($1)) }
    #expect(base == 0xE000_0000)
    #expect(mcfg[52] == 0 && mcfg[53] == 0)  // segment 0
    #expect(mcfg[54] == 0 && mcfg[55] == 255)  // buses 0-255
  }

  @Test func routingTableReadsBackAsTheRoutes() throws {
    let bridge = defaultBridge()
    var reader = AMLDataReader(bytes: bridge.routingTable(), position: 0)
    guard case .package(let entries) = try reader.object() else {
      Issue.record("_PRT is not a package")
      return
    }
    #expect(reader.position == reader.bytes.count)
    let decoded = entries.map { entry -> ACPIPCIHostBridge.Route? in
      guard case .package(let fields) = entry, fields.count == 4,
        case .integer(let address) = fields[0], case .integer(let pin) = fields[1],
        case .integer(let source) = fields[2], case .integer(let gsi) = fields[3], source == 0,
        address & 0xFFFF == 0xFFFF
      else { return nil }
      return .init(slot: Int(address >> 16), pin: Int(pin), gsi: UInt32(gsi))
    }
    #expect(decoded == bridge.routes.map { Optional($0) })
    #expect(decoded.count == 128)
    // Slot 1 INTA# is GSI 17, slot 7 INTB# wraps to GSI 16.
    #expect(decoded.contains(ACPIPCIHostBridge.Route(slot: 1, pin: 0, gsi: 17)))
    #expect(decoded.contains(ACPIPCIHostBridge.Route(slot: 7, pin: 1, gsi: 16)))
  }

  @Test func resourceTemplateHasTheWindows() {
    let resources = defaultBridge().bridgeResources()
    #expect(Array(resources.suffix(2)) == [0x79, 0x00])
    // Bus numbers 0-255 (Word, type 2), then the 0xCF8 I/O port descriptor.
    #expect(Array(resources[0..<6]) == [0x88, 13, 0, 2, 0x0C, 0])
    #expect(Array(resources[16..<24]) == [0x47, 1, 0xF8, 0x0C, 0xF8, 0x0C, 1, 8])
  }

  @Test(.enabled(if: iaslPath != nil, "iasl (acpica-tools) is not installed"))
  func iaslDisassemblesTheBridgeAndMCFG() throws {
    var configuration = ACPIConfiguration(cpuCount: 1)
    let bridge = defaultBridge()
    configuration.dsdtTerms = [bridge.dsdtTerm()]
    configuration.additionalTables = [bridge.mcfgTable()]
    let tables = try ACPITables.build(configuration)
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("hostvisor-pci-iasl-\(UUID())")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: directory) }
    var sources: [String: String] = [:]
    for signature in ["DSDT", "MCFG", "XSDT"] {
      let bytes = try #require(
        tables.tables.first { String(decoding: $0.bytes.prefix(4), as: UTF8.self) == signature })
      let file = directory.appendingPathComponent("\(signature.lowercased()).dat")
      try Data(bytes.bytes).write(to: file)
      let result = try runIASL(["-d", file.lastPathComponent], in: directory)
      #expect(result.status == 0, "iasl -d \(signature) failed:\n\(result.output)")
      #expect(!result.output.localizedCaseInsensitiveContains("error"), "\(result.output)")
      let dsl = try String(
        contentsOf: directory.appendingPathComponent("\(signature.lowercased()).dsl"), encoding: .utf8)
      #expect(!dsl.contains("**** Unknown"), "\(dsl)")
      #expect(!dsl.contains("Invalid"), "\(dsl)")
      sources[signature] = dsl
    }
    let dsdt = try #require(sources["DSDT"])
    for expected in [
      "Device (PCI0)", "EisaId (\"PNP0A08\")", "EisaId (\"PNP0A03\")", "Name (_SEG, Zero)", "Name (_BBN, Zero)",
      "WordBusNumber (ResourceProducer", "0x00FF", "WordIO (ResourceProducer", "0x0CF7", "0x0D00",
      "DWordMemory (ResourceProducer", "0xC0000000", "0xDFFFFFFF", "Name (_PRT, Package (0x80)",
      "EisaId (\"PNP0C02\")", "Memory32Fixed (ReadWrite",
    ] {
      #expect(dsdt.contains(expected), "DSDT lacks \(expected):\n\(dsdt)")
    }
    let mcfg = try #require(sources["MCFG"])
    #expect(mcfg.contains("00000000E0000000"), "\(mcfg)")
    #expect(mcfg.contains("End Bus Number : FF"), "\(mcfg)")
    // The recompiled DSDT is accepted too.
    let recompile = try runIASL(["dsdt.dsl"], in: directory)
    #expect(recompile.status == 0, "iasl could not recompile the DSDT:\n\(recompile.output)")
  }
}
