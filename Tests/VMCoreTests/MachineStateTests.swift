import Glibc
import Testing
import VMCore

@Suite("Machine state encoding")
struct MachineStateTests {
  /// The check value of CRC-32C from its definition (RFC 3720, the "123456789" test vector).
  @Test func crc32cMatchesTheStandardCheckValue() {
    #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
    #expect(CRC32C.checksum([]) == 0)
  }

  @Test func sectionsRoundTripAndRefuseWrongTagsSizesAndTruncation() throws {
    var writer = StateWriter()
    writer.section("first") { section in
      section.write(UInt32(0xDEAD_BEEF))
      section.write(true)
      section.write(optional: UInt16?.none)
      section.write(optional: UInt64(7))
      section.write("text")
      section.write(array: [UInt64(1), 2, 3])
    }
    var reader = StateReader(bytes: writer.bytes)
    try reader.section("first") { (section) throws(MachineStateError) in
      #expect(try section.read(UInt32.self) == 0xDEAD_BEEF)
      #expect(try section.readBool())
      #expect(try section.readOptional(UInt16.self) == nil)
      #expect(try section.readOptional(UInt64.self) == 7)
      #expect(try section.readString() == "text")
      #expect(try section.readArray(UInt64.self, count: 3, "array") == [1, 2, 3])
    }
    #expect(reader.isAtEnd)

    var wrongTag = StateReader(bytes: writer.bytes)
    #expect(throws: MachineStateError.self) { try wrongTag.section("second") { _ throws(MachineStateError) in } }
    var leftover = StateReader(bytes: writer.bytes)
    #expect(throws: MachineStateError.self) {
      try leftover.section("first") { (section) throws(MachineStateError) in _ = try section.read(UInt32.self) }
    }
    for length in 0..<writer.bytes.count {
      var short = StateReader(bytes: Array(writer.bytes.prefix(length)))
      #expect(throws: MachineStateError.self) {
        try short.section("first") { (section) throws(MachineStateError) in
          _ = try section.read(UInt32.self)
          _ = try section.readBool()
          _ = try section.readOptional(UInt16.self)
          _ = try section.readOptional(UInt64.self)
          _ = try section.readString()
          _ = try section.readArray(UInt64.self, count: 3, "array")
        }
      }
    }
    var badBool = StateReader(bytes: [2])
    #expect(throws: MachineStateError.invalid("boolean")) { _ = try badBool.readBool() }
  }

  @Test func containerRefusesEveryDamage() throws {
    let payload = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
    let file = MachineStateFile.encode(payload: payload)
    #expect(try MachineStateFile.decode(file) == payload)
    for length in [0, 7, 20, MachineStateFile.headerSize, file.count - 1] {
      #expect(throws: MachineStateError.self) { try MachineStateFile.decode(Array(file.prefix(length))) }
    }
    for bit in stride(from: MachineStateFile.headerSize * 8, to: file.count * 8, by: 997) {
      var flipped = file
      flipped[bit / 8] ^= 1 << UInt8(bit % 8)
      #expect(throws: MachineStateError("the state file is corrupted (checksum mismatch)")) {
        try MachineStateFile.decode(flipped)
      }
    }
    #expect(throws: MachineStateError.self) { try MachineStateFile.decode(file + [0]) }
  }

  /// RAM written to the memory file and mapped back copy-on-write: same bytes, zero pages
  /// left as holes, and writes to the mapping never reach the file.
  @Test func memoryFileIsSparseAndMappedCopyOnWrite() throws {
    let memory = try GuestMemory(size: 16 << 20)
    try memory.write(UInt64(0x1122_3344_5566_7788), at: 0x1000)
    try memory.write(UInt32(0xCAFE), at: 0xF0_0004)
    var template = Array("/tmp/hostvisor-memory-XXXXXX".utf8CString)
    let descriptor = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
    try #require(descriptor >= 0)
    let path = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
    defer {
      close(descriptor)
      unlink(path)
    }
    #expect(try memory.writeSparse(to: descriptor) == 2 * 4096)
    var info = stat()
    #expect(fstat(descriptor, &info) == 0)
    #expect(info.st_size == 16 << 20)
    #expect(Int(info.st_blocks) * 512 <= 64 << 10)

    let restored = try GuestMemory.mapping(snapshotFile: path, size: 16 << 20)
    #expect(try restored.read(UInt64.self, at: 0x1000) == 0x1122_3344_5566_7788)
    #expect(try restored.read(UInt32.self, at: 0xF0_0004) == 0xCAFE)
    #expect(try restored.read(UInt64.self, at: 0x8000) == 0)
    try restored.write(UInt64(1), at: 0x1000)
    let again = try GuestMemory.mapping(snapshotFile: path, size: 16 << 20)
    #expect(try again.read(UInt64.self, at: 0x1000) == 0x1122_3344_5566_7788)
    #expect(throws: MachineStateError.self) { _ = try GuestMemory.mapping(snapshotFile: path, size: 32 << 20) }
  }
}
