/// A small builder for ACPI Machine Language (ACPI 6.x spec §20.2, "AML Grammar Definition").
/// Every function returns the encoded bytes of one term, so terms nest by value:
///
///     AML.scope("\\_SB", [AML.device("PCI0", [AML.name("_HID", AML.eisaID("PNP0A03"))])])
///
/// Names and sizes come from Hostvisor's own code, never from the guest: a malformed name is a
/// programming error and traps.
public enum AML {
  // Opcodes used below.
  static let zeroOp: UInt8 = 0x00
  static let oneOp: UInt8 = 0x01
  static let nameOp: UInt8 = 0x08
  static let bytePrefix: UInt8 = 0x0A
  static let wordPrefix: UInt8 = 0x0B
  static let dwordPrefix: UInt8 = 0x0C
  static let stringPrefix: UInt8 = 0x0D
  static let qwordPrefix: UInt8 = 0x0E
  static let scopeOp: UInt8 = 0x10
  static let bufferOp: UInt8 = 0x11
  static let packageOp: UInt8 = 0x12
  static let methodOp: UInt8 = 0x14
  static let dualNamePrefix: UInt8 = 0x2E
  static let multiNamePrefix: UInt8 = 0x2F
  static let extOpPrefix: UInt8 = 0x5B
  static let deviceOp: UInt8 = 0x82
  static let rootChar: UInt8 = 0x5C
  static let parentPrefixChar: UInt8 = 0x5E
  static let returnOp: UInt8 = 0xA4
  static let onesOp: UInt8 = 0xFF

  /// PkgLength for a payload of `payloadLength` bytes: the encoded length counts itself.
  public static func packageLength(_ payloadLength: Int) -> [UInt8] {
    if payloadLength + 1 < 0x40 { return [UInt8(payloadLength + 1)] }
    for extraBytes in 1...3 {
      let total = payloadLength + 1 + extraBytes
      guard total < 1 << (4 + 8 * extraBytes) else { continue }
      var bytes = [UInt8(extraBytes << 6) | UInt8(total & 0x0F)]
      for index in 0..<extraBytes { bytes.append(UInt8(truncatingIfNeeded: total >> (4 + 8 * index))) }
      return bytes
    }
    preconditionFailure("AML package of \(payloadLength) bytes exceeds the 2^28 PkgLength limit")
  }

  /// A NameString: optional `\` (root) or `^` (parent) prefixes, then dot-separated segments of
  /// up to four characters (padded with `_`), e.g. `\_SB.PCI0` or `_S5`.
  public static func nameString(_ path: String) -> [UInt8] {
    var bytes: [UInt8] = []
    var rest = Substring(path)
    while let first = rest.first, first == "\\" || first == "^" {
      bytes.append(first == "\\" ? rootChar : parentPrefixChar)
      rest = rest.dropFirst()
    }
    let segments = rest.isEmpty ? [] : rest.split(separator: ".", omittingEmptySubsequences: false)
    switch segments.count {
    case 0: bytes.append(zeroOp)  // NullName
    case 1: break
    case 2: bytes.append(dualNamePrefix)
    default:
      precondition(segments.count <= 255, "AML name path too long")
      bytes += [multiNamePrefix, UInt8(segments.count)]
    }
    for segment in segments { bytes += nameSegment(segment) }
    return bytes
  }

  /// One 4-byte NameSeg.
  static func nameSegment(_ segment: Substring) -> [UInt8] {
    let characters = Array(segment.utf8)
    precondition((1...4).contains(characters.count), "AML name segment '\(segment)' must be 1-4 characters")
    for (index, character) in characters.enumerated() {
      let isUpper = (0x41...0x5A).contains(character)
      let isDigit = (0x30...0x39).contains(character)
      precondition(
        isUpper || character == 0x5F || (index > 0 && isDigit), "invalid AML name segment '\(segment)'")
    }
    return characters + [UInt8](repeating: 0x5F, count: 4 - characters.count)
  }

  /// The shortest encoding of an integer constant (Zero, One, Ones, or a Byte/Word/DWord/QWord constant).
  public static func integer(_ value: UInt64) -> [UInt8] {
    switch value {
    case 0: return [zeroOp]
    case 1: return [oneOp]
    case UInt64.max: return [onesOp]
    case ...0xFF: return [bytePrefix, UInt8(value)]
    case ...0xFFFF: return [wordPrefix] + littleEndian(value, count: 2)
    case ...0xFFFF_FFFF: return [dwordPrefix] + littleEndian(value, count: 4)
    default: return [qwordPrefix] + littleEndian(value, count: 8)
    }
  }

  /// A string constant (ASCII, NUL-terminated).
  public static func string(_ value: String) -> [UInt8] {
    let characters = Array(value.utf8)
    precondition(characters.allSatisfy { (0x01...0x7F).contains($0) }, "AML strings are ASCII without NUL")
    return [stringPrefix] + characters + [0]
  }

  /// `Name(path, object)`.
  public static func name(_ path: String, _ object: [UInt8]) -> [UInt8] {
    [nameOp] + nameString(path) + object
  }

  /// `Package(n) { elements }` (at most 255 elements).
  public static func package(_ elements: [[UInt8]]) -> [UInt8] {
    precondition(elements.count <= 255, "AML Package holds at most 255 elements")
    let payload = [UInt8(elements.count)] + elements.flatMap { $0 }
    return [packageOp] + packageLength(payload.count) + payload
  }

  /// `Buffer() { bytes }`.
  public static func buffer(_ bytes: [UInt8]) -> [UInt8] {
    let payload = integer(UInt64(bytes.count)) + bytes
    return [bufferOp] + packageLength(payload.count) + payload
  }

  /// `Scope(path) { terms }`.
  public static func scope(_ path: String, _ terms: [[UInt8]]) -> [UInt8] {
    let payload = nameString(path) + terms.flatMap { $0 }
    return [scopeOp] + packageLength(payload.count) + payload
  }

  /// `Device(path) { terms }`.
  public static func device(_ path: String, _ terms: [[UInt8]]) -> [UInt8] {
    let payload = nameString(path) + terms.flatMap { $0 }
    return [extOpPrefix, deviceOp] + packageLength(payload.count) + payload
  }

  /// `Method(path, arguments, Serialized/NotSerialized) { terms }`.
  public static func method(_ path: String, arguments: Int = 0, serialized: Bool = false, _ terms: [[UInt8]])
    -> [UInt8]
  {
    precondition((0...7).contains(arguments), "AML methods take 0-7 arguments")
    let flags = UInt8(arguments) | (serialized ? 0x08 : 0)
    let payload = nameString(path) + [flags] + terms.flatMap { $0 }
    return [methodOp] + packageLength(payload.count) + payload
  }

  /// `Return(term)`.
  public static func returnValue(_ term: [UInt8]) -> [UInt8] { [returnOp] + term }

  /// `EISAID("PNP0A03")`: the compressed 32-bit EISA ID as a DWord constant.
  public static func eisaID(_ id: String) -> [UInt8] {
    let characters = Array(id.utf8)
    precondition(characters.count == 7, "an EISA ID is three letters and four hex digits")
    func hexDigit(_ character: UInt8) -> UInt32 {
      switch character {
      case 0x30...0x39: return UInt32(character - 0x30)
      case 0x41...0x46: return UInt32(character - 0x41 + 10)
      default: preconditionFailure("invalid hex digit in EISA ID \(id)")
      }
    }
    let vendor =
      (UInt32(characters[0] - 0x40) & 0x1F) << 10 | (UInt32(characters[1] - 0x40) & 0x1F) << 5
      | (UInt32(characters[2] - 0x40) & 0x1F)
    let product = characters[3...].reduce(UInt32(0)) { $0 << 4 | hexDigit($1) }
    let bigEndian = vendor << 16 | product
    return [dwordPrefix] + littleEndian(UInt64(bigEndian.byteSwapped), count: 4)
  }

  static func littleEndian(_ value: UInt64, count: Int) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }
  }
}
