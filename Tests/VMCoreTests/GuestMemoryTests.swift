import Synchronization
import Testing
import VMCore

/// Records every range reported to a `GuestMemoryWriteObserver`.
final class RecordingWriteObserver: GuestMemoryWriteObserver {
  private let recorded = Mutex<[Range<UInt64>]>([])
  func guestMemoryWritten(at address: UInt64, length: UInt64) {
    recorded.withLock { $0.append(address..<(address + length)) }
  }
  var ranges: [Range<UInt64>] { recorded.withLock { $0 } }
}

@Suite struct GuestMemoryLayoutTests {
  @Test(arguments: [UInt64(0), 4095, 4097, GuestMemory.maximumSize + 4096, UInt64.max & ~0xFFF])
  func unsupportedSizesAreRefused(size: UInt64) {
    #expect(throws: GuestMemoryError.invalidSize(size)) { try GuestMemory(size: size) }
  }

  @Test func smallMemoryIsOneRegionFromZero() throws {
    let memory = try GuestMemory(size: 1 << 20)
    #expect(memory.totalSize == 1 << 20)
    #expect(memory.regions.count == 1)
    #expect(memory.regions[0].guestBase == 0 && memory.regions[0].size == 1 << 20)
    #expect(memory.ramRanges.map { [$0.base, $0.length] } == [[0, 1 << 20]])
    #expect(memory.region(containing: (1 << 20) - 1)?.guestBase == 0)
    #expect(memory.region(containing: 1 << 20) == nil)
  }

  @Test func memoryAboveThePCIHoleMovesToFourGiB() throws {
    // MAP_NORESERVE: a 3 GiB + 8 KiB machine costs only the pages touched here.
    let size = GuestMemory.pciHoleStart + 8192
    let memory = try GuestMemory(size: size)
    #expect(memory.totalSize == size)
    #expect(
      memory.ramRanges.map { [$0.base, $0.length] } == [
        [0, GuestMemory.pciHoleStart], [GuestMemory.highMemoryBase, 8192],
      ])
    #expect(memory.region(containing: GuestMemory.pciHoleStart) == nil)
    #expect(memory.region(containing: GuestMemory.highMemoryBase - 1) == nil)
    #expect(memory.region(containing: GuestMemory.highMemoryBase + 8191)?.guestBase == GuestMemory.highMemoryBase)
    #expect(memory.region(containing: GuestMemory.highMemoryBase + 8192) == nil)

    // Both sides of the hole work; nothing crosses or lands in it.
    try memory.write(UInt64(0x1122_3344_5566_7788), at: GuestMemory.pciHoleStart - 8)
    try memory.write(UInt64(0x99AA_BBCC_DDEE_FF00), at: GuestMemory.highMemoryBase)
    #expect(try memory.read(UInt64.self, at: GuestMemory.pciHoleStart - 8) == 0x1122_3344_5566_7788)
    #expect(try memory.read(UInt64.self, at: GuestMemory.highMemoryBase) == 0x99AA_BBCC_DDEE_FF00)
    #expect(throws: GuestMemoryError.outOfRange(address: GuestMemory.pciHoleStart - 4, length: 8)) {
      try memory.read(UInt64.self, at: GuestMemory.pciHoleStart - 4)
    }
    #expect(throws: GuestMemoryError.outOfRange(address: GuestMemory.pciHoleStart, length: 1)) {
      try memory.write(UInt8(1), at: GuestMemory.pciHoleStart)
    }
    #expect(throws: GuestMemoryError.outOfRange(address: GuestMemory.highMemoryBase - 1, length: 2)) {
      try memory.slice(at: GuestMemory.highMemoryBase - 1, length: 2)
    }
    #expect(throws: GuestMemoryError.self) { try memory.readBytes(at: GuestMemory.highMemoryBase + 8190, count: 3) }
    // A range spanning both regions is refused even though both ends are RAM.
    #expect(memory.hostPointer(GuestMemory.pciHoleStart - 4096, length: GuestMemory.highMemoryBase) == nil)
  }

  @Test func errorsDescribeThemselvesOnOneLine() {
    let errors: [GuestMemoryError] = [
      .outOfRange(address: 0x1000, length: 0x20), .cannotMap(size: 1 << 30, errno: 12), .invalidSize(0),
      .invalidSize(123),
    ]
    for error in errors {
      #expect(!error.description.isEmpty && !error.description.contains("\n"))
    }
    #expect(GuestMemoryError.outOfRange(address: 0x1000, length: 0x20).description.contains("0x1000+0x20"))
    #expect(GuestMemoryError.invalidSize(0).description == "memory size must be greater than zero")
  }
}

@Suite struct GuestMemoryBoundsTests {
  static let size: UInt64 = 64 << 10
  let memory: GuestMemory

  init() throws { memory = try GuestMemory(size: Self.size) }

  /// (address, length) pairs that must all be refused: past the end, straddling the end, and
  /// sums that wrap around 2^64.
  static let outsideRanges: [(UInt64, UInt64)] = [
    (size, 1), (size - 1, 2), (size - 8, 9), (0, size + 1), (1, size), (size + 4096, 1), (UInt64.max, 1),
    (UInt64.max - 7, 8), (UInt64.max, UInt64.max), (1, UInt64.max), (0, UInt64.max), (size - 1, UInt64.max),
    (4096, UInt64.max - 4095), (UInt64(1) << 63, UInt64(1) << 63),
  ]

  @Test func everyRangeOutsideRAMIsRefusedBySliceAndHostPointer() {
    for (address, length) in Self.outsideRanges {
      #expect(memory.hostPointer(address, length: length) == nil, "0x\(String(address, radix: 16))+\(length)")
      #expect(throws: GuestMemoryError.outOfRange(address: address, length: length)) {
        try memory.slice(at: address, length: length)
      }
    }
  }

  @Test func typedAccessesOutsideRAMAreRefusedWithoutSideEffects() throws {
    try memory.fill(0xA5, at: 0, length: Self.size)
    let before = try memory.readBytes(at: 0, count: Int(Self.size))
    let addresses: [UInt64] = [Self.size - 7, Self.size - 1, Self.size, UInt64.max, UInt64.max - 6, 1 << 40]
    for address in addresses {
      #expect(throws: GuestMemoryError.outOfRange(address: address, length: 8)) {
        try memory.read(UInt64.self, at: address)
      }
      #expect(throws: GuestMemoryError.outOfRange(address: address, length: 8)) {
        try memory.write(UInt64.max, at: address)
      }
      #expect(throws: GuestMemoryError.self) { try memory.writeBytes([1, 2, 3, 4, 5, 6, 7, 8], at: address) }
      #expect(throws: GuestMemoryError.self) { try memory.readBytes(at: address, count: 8) }
      #expect(throws: GuestMemoryError.self) { try memory.fill(0, at: address, length: 8) }
    }
    #expect(throws: GuestMemoryError.outOfRange(address: 16, length: UInt64.max)) {
      try memory.fill(0, at: 16, length: UInt64.max)
    }
    // Nothing inside RAM changed, not even the in-range part of a straddling write.
    #expect(try memory.readBytes(at: 0, count: Int(Self.size)) == before)
  }

  @Test func theLastBytesOfRAMAreReachable() throws {
    try memory.write(UInt8(0x42), at: Self.size - 1)
    try memory.write(UInt64(0x0102_0304_0506_0708), at: Self.size - 8)
    #expect(try memory.read(UInt64.self, at: Self.size - 8) == 0x0102_0304_0506_0708)
    #expect(try memory.slice(at: 0, length: Self.size).count == Int(Self.size))
    #expect(try memory.slice(at: Self.size - 1, length: 1).count == 1)
    #expect(memory.hostPointer(Self.size - 1) != nil)
  }
}

@Suite struct GuestMemoryAccessTests {
  @Test func integersAreLittleEndianAndRoundTrip() throws {
    let memory = try GuestMemory(size: 1 << 16)
    try memory.write(UInt32(0xDEAD_BEEF), at: 0x101)  // unaligned
    #expect(try memory.readBytes(at: 0x101, count: 4) == [0xEF, 0xBE, 0xAD, 0xDE])
    #expect(try memory.read(UInt16.self, at: 0x102) == 0xADBE)
    try memory.write(Int64(-2), at: 0x200)
    #expect(try memory.read(Int64.self, at: 0x200) == -2)
    #expect(try memory.read(UInt64.self, at: 0x200) == 0xFFFF_FFFF_FFFF_FFFE)
    try memory.write(UInt8(0x7F), at: 0x300)
    #expect(try memory.read(Int8.self, at: 0x300) == 0x7F)
  }

  @Test func byteCopiesFillsAndSlicesSeeTheSameRAM() throws {
    let memory = try GuestMemory(size: 1 << 16)
    let pattern = (0..<300).map { UInt8(truncatingIfNeeded: $0 * 7) }
    try memory.writeBytes(pattern, at: 0x1F80)  // crosses a page boundary
    #expect(try memory.readBytes(at: 0x1F80, count: 300) == pattern)
    try memory.writeBytes(pattern[10..<20], at: 0x4000)  // any collection of bytes
    #expect(try memory.readBytes(at: 0x4000, count: 10) == Array(pattern[10..<20]))
    try memory.fill(0xCC, at: 0x5000, length: 16)
    #expect(try memory.readBytes(at: 0x4FFF, count: 18) == [0] + [UInt8](repeating: 0xCC, count: 16) + [0])
    try memory.fill(0xEE, at: 0x5000, length: 0)
    #expect(try memory.read(UInt8.self, at: 0x5000) == 0xCC)

    let slice = try memory.slice(at: 0x6000, length: 8)
    slice.storeBytes(of: UInt64(0x1122_3344_5566_7788).littleEndian, as: UInt64.self)
    #expect(try memory.read(UInt64.self, at: 0x6000) == 0x1122_3344_5566_7788)
    try memory.write(UInt8(0x99), at: 0x6007)
    #expect(slice[7] == 0x99)
    #expect(memory.hostPointer(0x6000) == slice.baseAddress)
    #expect(try memory.readBytes(at: 0x7000, count: 0) == [])
  }

  @Test func freshRAMReadsAsZero() throws {
    let memory = try GuestMemory(size: 1 << 20)
    #expect(try memory.readBytes(at: 0, count: 4096) == [UInt8](repeating: 0, count: 4096))
    #expect(try memory.read(UInt64.self, at: (1 << 20) - 8) == 0)
  }
}

@Suite struct GuestMemoryWriteObserverTests {
  @Test func typedWritesReportExactlyWhatTheyWrote() throws {
    let memory = try GuestMemory(size: 1 << 16)
    let observer = RecordingWriteObserver()
    memory.setWriteObserver(observer)
    try memory.write(UInt32(1), at: 0x100)
    try memory.writeBytes([1, 2, 3], at: 0x200)
    try memory.fill(0, at: 0x300, length: 0x40)
    try memory.fill(0, at: 0x400, length: 0)  // nothing written, nothing reported
    _ = try memory.read(UInt64.self, at: 0x100)
    _ = try memory.readBytes(at: 0, count: 16)
    _ = try memory.slice(at: 0x500, length: 4)
    memory.noteWrite(at: 0x500, length: 4)
    memory.noteWrite(at: 0x600, length: 0)
    #expect(observer.ranges == [0x100..<0x104, 0x200..<0x203, 0x300..<0x340, 0x500..<0x504])
  }

  @Test func refusedWritesReportNothing() throws {
    let memory = try GuestMemory(size: 1 << 16)
    let observer = RecordingWriteObserver()
    memory.setWriteObserver(observer)
    #expect(throws: GuestMemoryError.self) { try memory.write(UInt16(1), at: 0xFFFF) }
    #expect(throws: GuestMemoryError.self) { try memory.writeBytes([1, 2], at: UInt64.max) }
    #expect(throws: GuestMemoryError.self) { try memory.fill(1, at: 0x8000, length: UInt64.max) }
    #expect(observer.ranges.isEmpty)
  }

  @Test func theObserverIsHeldWeaklyAndCanBeRemoved() throws {
    let memory = try GuestMemory(size: 1 << 16)
    let kept = RecordingWriteObserver()
    memory.setWriteObserver(kept)
    memory.setWriteObserver(nil)
    try memory.write(UInt8(1), at: 0)
    #expect(kept.ranges.isEmpty)

    weak var dropped: RecordingWriteObserver?
    do {
      let temporary = RecordingWriteObserver()
      dropped = temporary
      memory.setWriteObserver(temporary)
    }
    #expect(dropped == nil)
    try memory.write(UInt8(2), at: 0)  // no observer left: nothing to call, no crash
    #expect(try memory.read(UInt8.self, at: 0) == 2)
  }

  @Test func writesFromManyThreadsAreAllReported() async throws {
    let memory = try GuestMemory(size: 1 << 16)
    let observer = RecordingWriteObserver()
    memory.setWriteObserver(observer)
    await withTaskGroup(of: Void.self) { group in
      for task in 0..<8 {
        group.addTask {
          for index in 0..<100 { try? memory.write(UInt8(task), at: UInt64(task * 1000 + index)) }
        }
      }
    }
    #expect(observer.ranges.count == 800)
    #expect(Set(observer.ranges.map(\.lowerBound)).count == 800)
  }
}

@Suite struct GuestDirtyBitmapTests {
  @Test func hostWritesAreRecordedOnlyWhileLoggingIsOn() throws {
    let memory = try GuestMemory(size: 16 << 20)
    try memory.write(UInt32(1), at: 0x3000)
    #expect(memory.dirtyPages.take().isEmpty)
    memory.dirtyPages.setEnabled(true)
    try memory.write(UInt64(2), at: 0x5FFC)  // crosses into page 6
    try memory.fill(0xAA, at: 0x10_0000, length: 0x2000)
    #expect(memory.dirtyPages.take() == [5, 6, 0x100, 0x101])
    #expect(memory.dirtyPages.take().isEmpty)
    memory.dirtyPages.setEnabled(false)
    try memory.write(UInt32(3), at: 0x9000)
    #expect(memory.dirtyPages.take().isEmpty)
  }
}
