/// Why a machine state could not be written or restored, as one line for the user.
public struct MachineStateError: Error, Equatable, Sendable, CustomStringConvertible {
  public let description: String
  public init(_ description: String) { self.description = description }

  /// The payload ended before a value that should be there.
  public static func truncated(_ what: String) -> MachineStateError {
    MachineStateError("the state file is truncated (while reading \(what))")
  }

  /// A value is outside what the part it belongs to accepts.
  public static func invalid(_ what: String) -> MachineStateError {
    MachineStateError("the state file holds an invalid \(what)")
  }
}

/// A part of the machine whose state goes into a snapshot: a vCPU, an interrupt controller, a
/// device. `saveState` runs while the machine is paused and its devices are quiescent;
/// `restoreState` runs on a freshly built machine of the same shape before it starts, and
/// validates every value it reads (a bad value is a `MachineStateError`, never a crash).
public protocol StateSavable {
  /// Appends this part's state.
  func saveState(into writer: inout StateWriter)
  /// Replaces this part's state with the one `reader` holds.
  func restoreState(from reader: inout StateReader) throws(MachineStateError)
}

/// Builds a state payload: little-endian fixed-width values, length-prefixed byte strings and
/// named sections (see docs/machine-state.md).
public struct StateWriter: Sendable {
  /// The bytes written so far.
  public private(set) var bytes: [UInt8] = []

  public init() {}

  /// Appends a little-endian integer.
  public mutating func write<T: FixedWidthInteger>(_ value: T) {
    withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
  }

  /// Appends a boolean as one byte (0 or 1).
  public mutating func write(_ value: Bool) { bytes.append(value ? 1 : 0) }

  /// Appends an optional integer: a presence byte, then the value when present.
  public mutating func write<T: FixedWidthInteger>(optional value: T?) {
    write(value != nil)
    if let value { write(value) }
  }

  /// Appends a byte string with a 32-bit length prefix.
  public mutating func write<C: Collection>(bytes value: C) where C.Element == UInt8 {
    write(UInt32(value.count))
    bytes.append(contentsOf: value)
  }

  /// Appends a UTF-8 string with a 32-bit length prefix.
  public mutating func write(_ value: String) { write(bytes: Array(value.utf8)) }

  /// Appends an array of integers with a 32-bit count prefix.
  public mutating func write<T: FixedWidthInteger>(array: [T]) {
    write(UInt32(array.count))
    for value in array { write(value) }
  }

  /// Appends a named section: its tag, its length, then what `body` writes.
  public mutating func section(_ tag: String, _ body: (inout StateWriter) -> Void) {
    write(tag)
    let lengthPosition = bytes.count
    write(UInt32(0))
    let start = bytes.count
    body(&self)
    let length = UInt32(bytes.count - start).littleEndian
    withUnsafeBytes(of: length) { raw in
      for index in 0..<4 { bytes[lengthPosition + index] = raw[index] }
    }
  }

  /// Appends `part`'s state as a named section.
  public mutating func section(_ tag: String, _ part: some StateSavable) {
    section(tag) { part.saveState(into: &$0) }
  }
}

/// Reads a state payload written by `StateWriter`. Every read is bounds-checked: running past
/// the end is `MachineStateError.truncated`.
public struct StateReader: Sendable {
  private let bytes: [UInt8]
  private var position: Int
  private let end: Int

  public init(bytes: [UInt8]) {
    self.bytes = bytes
    position = 0
    end = bytes.count
  }

  private init(bytes: [UInt8], position: Int, end: Int) {
    self.bytes = bytes
    self.position = position
    self.end = end
  }

  /// Whether every byte has been read.
  public var isAtEnd: Bool { position == end }

  /// Bytes left to read.
  public var remaining: Int { end - position }

  /// Reads a little-endian integer.
  public mutating func read<T: FixedWidthInteger>(_: T.Type = T.self) throws(MachineStateError) -> T {
    let size = MemoryLayout<T>.size
    guard end - position >= size else { throw .truncated("a \(size)-byte value") }
    var value: T = 0
    for index in 0..<size { value |= T(truncatingIfNeeded: bytes[position + index]) << (8 * index) }
    position += size
    return value
  }

  /// Reads a boolean; any byte other than 0 or 1 is invalid.
  public mutating func readBool() throws(MachineStateError) -> Bool {
    let byte: UInt8 = try read()
    guard byte <= 1 else { throw .invalid("boolean") }
    return byte == 1
  }

  /// Reads an optional integer written with `write(optional:)`.
  public mutating func readOptional<T: FixedWidthInteger>(_: T.Type = T.self) throws(MachineStateError) -> T? {
    try readBool() ? try read(T.self) : nil
  }

  /// Reads a length-prefixed byte string of at most `maximumCount` bytes.
  public mutating func readBytes(maximumCount: Int = Int.max) throws(MachineStateError) -> [UInt8] {
    let count = Int(try read(UInt32.self))
    guard count <= maximumCount else { throw .invalid("byte string length \(count)") }
    guard end - position >= count else { throw .truncated("a \(count)-byte string") }
    defer { position += count }
    return Array(bytes[position..<(position + count)])
  }

  /// Reads a byte string that must have exactly `count` bytes.
  public mutating func readBytes(exactly count: Int, _ what: String) throws(MachineStateError) -> [UInt8] {
    let value = try readBytes(maximumCount: count)
    guard value.count == count else { throw .invalid("\(what) (\(value.count) bytes, expected \(count))") }
    return value
  }

  /// Reads a length-prefixed UTF-8 string.
  public mutating func readString(maximumCount: Int = 1 << 20) throws(MachineStateError) -> String {
    let raw = try readBytes(maximumCount: maximumCount)
    guard let text = String(validating: raw, as: UTF8.self) else { throw .invalid("text") }
    return text
  }

  /// Reads an array of integers of exactly `count` elements.
  public mutating func readArray<T: FixedWidthInteger>(
    _: T.Type = T.self, count expected: Int, _ what: String
  ) throws(MachineStateError) -> [T] {
    let count = Int(try read(UInt32.self))
    guard count == expected else { throw .invalid("\(what) (\(count) entries, expected \(expected))") }
    var values: [T] = []
    values.reserveCapacity(count)
    for _ in 0..<count { values.append(try read(T.self)) }
    return values
  }

  /// Reads the section `tag`: its content must be consumed exactly by `body`.
  public mutating func section<Result>(
    _ tag: String, _ body: (inout StateReader) throws(MachineStateError) -> Result
  ) throws(MachineStateError) -> Result {
    let found = try readString(maximumCount: 256)
    guard found == tag else {
      throw MachineStateError("the state file does not match this machine: expected section '\(tag)', found '\(found)'")
    }
    let length = Int(try read(UInt32.self))
    guard end - position >= length else { throw .truncated("section '\(tag)'") }
    var inner = StateReader(bytes: bytes, position: position, end: position + length)
    let result = try body(&inner)
    guard inner.isAtEnd else {
      throw MachineStateError("the state file's section '\(tag)' has \(inner.remaining) unexpected bytes")
    }
    position += length
    return result
  }

  /// Restores `part` from the section `tag`.
  public mutating func section(_ tag: String, _ part: some StateSavable) throws(MachineStateError) {
    try section(tag) { (reader) throws(MachineStateError) in try part.restoreState(from: &reader) }
  }
}

/// The state file container: a fixed header (magic, format version, payload length, CRC32C of
/// the payload) followed by the payload. See docs/machine-state.md.
public enum MachineStateFile {
  /// "HVSTATE" followed by a NUL byte.
  public static let magic: [UInt8] = Array("HVSTATE\0".utf8)
  /// The current format version; files of any other version are refused.
  public static let formatVersion: UInt32 = 1
  /// Header size in bytes: magic (8), version (4), flags (4), payload length (8), CRC32C (4),
  /// reserved (4).
  public static let headerSize = 32
  /// The largest payload accepted (device and vCPU state; RAM lives in its own file).
  public static let maximumPayload = 256 << 20

  /// Header flag: the snapshot's memory file is a diff (only the pages written since the
  /// previous snapshot; holes mean "unchanged"), to be laid over its base.
  public static let diffMemoryFlag: UInt32 = 1
  /// Every flag this version knows; a file with another flag set is refused.
  public static let knownFlags: UInt32 = diffMemoryFlag

  /// The header plus `payload`.
  public static func encode(payload: [UInt8], flags: UInt32 = 0) -> [UInt8] {
    var header = StateWriter()
    header.write(UInt64(0))  // placeholder for the magic, patched below
    header.write(formatVersion)
    header.write(flags)
    header.write(UInt64(payload.count))
    header.write(CRC32C.checksum(payload))
    header.write(UInt32(0))
    var bytes = header.bytes
    bytes.replaceSubrange(0..<8, with: magic)
    bytes.append(contentsOf: payload)
    return bytes
  }

  /// The header flags of a file `decode` accepted.
  public static func flags(of bytes: [UInt8]) -> UInt32 {
    guard bytes.count >= 16 else { return 0 }
    return bytes[12..<16].reversed().reduce(0) { $0 << 8 | UInt32($1) }
  }

  /// Checks the header and the checksum; returns the payload.
  public static func decode(_ bytes: [UInt8]) throws(MachineStateError) -> [UInt8] {
    guard bytes.count >= headerSize else {
      if bytes.count >= 8 && Array(bytes[0..<8]) != magic {
        throw MachineStateError("not a Hostvisor state file (bad magic number)")
      }
      throw MachineStateError("the state file is truncated (\(bytes.count) bytes, shorter than its header)")
    }
    guard Array(bytes[0..<8]) == magic else { throw MachineStateError("not a Hostvisor state file (bad magic number)") }
    var header = StateReader(bytes: Array(bytes[8..<headerSize]))
    let version: UInt32 = try header.read()
    guard version == formatVersion else {
      throw MachineStateError(
        "the state file has format version \(version); this Hostvisor reads version \(formatVersion)")
    }
    let flags: UInt32 = try header.read()
    guard flags & ~knownFlags == 0 else {
      throw MachineStateError("the state file has unknown flags 0x\(String(flags, radix: 16))")
    }
    let length: UInt64 = try header.read()
    let checksum: UInt32 = try header.read()
    guard length <= UInt64(maximumPayload) else {
      throw MachineStateError("the state file's payload length is invalid")
    }
    let available = UInt64(bytes.count - headerSize)
    guard available >= length else {
      throw MachineStateError("the state file is truncated (\(available) of \(length) payload bytes)")
    }
    guard available == length else {
      throw MachineStateError("the state file has \(available - length) bytes of trailing garbage")
    }
    let payload = Array(bytes[headerSize...])
    guard CRC32C.checksum(payload) == checksum else {
      throw MachineStateError("the state file is corrupted (checksum mismatch)")
    }
    return payload
  }
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as iSCSI and ext4 use it.
public enum CRC32C {
  private static let table: [UInt32] = (0..<256).map { index in
    var crc = UInt32(index)
    for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
    return crc
  }

  /// The CRC-32C of the bytes of `buffer`.
  public static func checksum(_ buffer: UnsafeRawBufferPointer) -> UInt32 {
    var crc: UInt32 = 0xFFFF_FFFF
    table.withUnsafeBufferPointer { table in
      for byte in buffer { crc = table[Int((crc ^ UInt32(byte)) & 0xFF)] ^ (crc >> 8) }
    }
    return crc ^ 0xFFFF_FFFF
  }

  /// The CRC-32C of `bytes` (initial value and final XOR 0xFFFFFFFF).
  public static func checksum(_ bytes: [UInt8]) -> UInt32 {
    var crc: UInt32 = 0xFFFF_FFFF
    table.withUnsafeBufferPointer { table in
      for byte in bytes { crc = table[Int((crc ^ UInt32(byte)) & 0xFF)] ^ (crc >> 8) }
    }
    return crc ^ 0xFFFF_FFFF
  }
}
