import Testing

@testable import Firmware

/// A minimal AML reader for the parts of the grammar the DSDT uses (ACPI 6.x §20.2).
struct AMLReader {
  let bytes: [UInt8]
  var position: Int

  init(_ bytes: [UInt8], at position: Int = 0) {
    self.bytes = bytes
    self.position = position
  }

  enum Failure: Error { case truncated, unexpected(UInt8, at: Int) }

  mutating func byte() throws -> UInt8 {
    guard position < bytes.count else { throw Failure.truncated }
    defer { position += 1 }
    return bytes[position]
  }

  /// Decodes a PkgLength; returns the end offset of the package it measures.
  mutating func packageEnd() throws -> Int {
    let start = position
    let lead = try byte()
    let extra = Int(lead >> 6)
    if extra == 0 { return start + Int(lead & 0x3F) }
    #expect(lead & 0x30 == 0, "bits 5:4 of a multi-byte PkgLength lead byte are zero")
    var length = Int(lead & 0x0F)
    for index in 0..<extra { length |= Int(try byte()) << (4 + 8 * index) }
    return start + length
  }

  /// Decodes a NameString into its dotted form, with `\` and `^` prefixes.
  mutating func nameString() throws -> String {
    var prefix = ""
    var lead = try byte()
    while lead == 0x5C || lead == 0x5E {
      prefix += lead == 0x5C ? "\\" : "^"
      lead = try byte()
    }
    let count: Int
    switch lead {
    case 0x00: return prefix
    case 0x2E: count = 2
    case 0x2F: count = Int(try byte())
    default:
      count = 1
      position -= 1
    }
    var segments: [String] = []
    for _ in 0..<count {
      var segment: [UInt8] = []
      for _ in 0..<4 { segment.append(try byte()) }
      segments.append(String(decoding: segment, as: UTF8.self))
    }
    return prefix + segments.joined(separator: ".")
  }

  /// Decodes an integer constant (ZeroOp, OneOp, OnesOp, Byte/Word/DWord/QWordConst).
  mutating func integer() throws -> UInt64 {
    let op = try byte()
    let width: Int
    switch op {
    case 0x00: return 0
    case 0x01: return 1
    case 0xFF: return UInt64.max
    case 0x0A: width = 1
    case 0x0B: width = 2
    case 0x0C: width = 4
    case 0x0E: width = 8
    default: throw Failure.unexpected(op, at: position - 1)
    }
    var value: UInt64 = 0
    for index in 0..<width { value |= UInt64(try byte()) << (8 * UInt64(index)) }
    return value
  }

  /// Decodes `Package { integers }`; the elements must fill the package exactly.
  mutating func integerPackage() throws -> [UInt64] {
    let op = try byte()
    guard op == 0x12 else { throw Failure.unexpected(op, at: position - 1) }
    let end = try packageEnd()
    let count = Int(try byte())
    var elements: [UInt64] = []
    for _ in 0..<count { elements.append(try integer()) }
    #expect(position == end, "package length matches its contents")
    return elements
  }
}

@Suite struct AMLTests {
  @Test func packageLengthEncodings() throws {
    #expect(AML.packageLength(0) == [0x01])
    #expect(AML.packageLength(62) == [0x3F])
    #expect(AML.packageLength(63) == [0x41, 0x04], "64 + 1 extra byte = 65 = 0x41")
    for payload in [0, 5, 62, 63, 64, 200, 4093, 4094, 4095, 70_000, 1_048_573, 1_048_574, 3_000_000] {
      let encoded = AML.packageLength(payload)
      var reader = AMLReader(encoded + [UInt8](repeating: 0, count: payload))
      let end = try reader.packageEnd()
      #expect(end == encoded.count + payload, "PkgLength of \(payload)-byte payload covers itself and the payload")
    }
  }

  @Test func nameStrings() throws {
    #expect(AML.nameString("_S5") == Array("_S5_".utf8))
    #expect(AML.nameString("\\_SB") == [0x5C] + Array("_SB_".utf8))
    #expect(AML.nameString("\\_SB.PCI0") == [0x5C, 0x2E] + Array("_SB_PCI0".utf8))
    #expect(AML.nameString("\\_SB.PCI0.ISA") == [0x5C, 0x2F, 3] + Array("_SB_PCI0ISA_".utf8))
    #expect(AML.nameString("^FOO") == [0x5E] + Array("FOO_".utf8))
    #expect(AML.nameString("\\") == [0x5C, 0x00])
    var reader = AMLReader(AML.nameString("\\_SB.PCI0.ISA"))
    #expect(try reader.nameString() == "\\_SB_.PCI0.ISA_")
  }

  @Test func integers() throws {
    let cases: [(UInt64, [UInt8])] = [
      (0, [0x00]), (1, [0x01]), (5, [0x0A, 5]), (0x1234, [0x0B, 0x34, 0x12]),
      (0xFEC0_0000, [0x0C, 0, 0, 0xC0, 0xFE]), (0x1_0000_0000, [0x0E, 0, 0, 0, 0, 1, 0, 0, 0]),
      (UInt64.max, [0xFF]),
    ]
    for (value, encoding) in cases {
      #expect(AML.integer(value) == encoding)
      var reader = AMLReader(encoding)
      #expect(try reader.integer() == value)
    }
  }

  @Test func eisaIDAndStrings() {
    #expect(AML.eisaID("PNP0A03") == [0x0C, 0x41, 0xD0, 0x0A, 0x03])
    #expect(AML.eisaID("PNP0C0F") == [0x0C, 0x41, 0xD0, 0x0C, 0x0F])
    #expect(AML.string("ABC") == [0x0D, 0x41, 0x42, 0x43, 0x00])
  }

  @Test func nestedTerms() throws {
    let device = AML.device("PCI0", [AML.name("_HID", AML.eisaID("PNP0A03")), AML.name("_UID", AML.integer(0))])
    let scope = AML.scope("\\_SB", [device])
    #expect(scope[0] == 0x10)
    var reader = AMLReader(scope, at: 1)
    #expect(try reader.packageEnd() == scope.count)
    #expect(try reader.nameString() == "\\_SB_")
    #expect(try reader.byte() == 0x5B)
    #expect(try reader.byte() == 0x82)
    #expect(try reader.packageEnd() == scope.count)
    #expect(try reader.nameString() == "PCI0")
    let method = AML.method("_STA", arguments: 0, serialized: false, [AML.returnValue(AML.integer(0x0F))])
    #expect(method == [0x14, 0x09] + Array("_STA".utf8) + [0x00, 0xA4, 0x0A, 0x0F])
    let buffer = AML.buffer([1, 2, 3])
    #expect(buffer == [0x11, 0x06, 0x0A, 0x03, 1, 2, 3], "PkgLength counts itself")
  }
}
