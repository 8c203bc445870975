import Foundation
import TestSupport
import Testing
import VMCore

@testable import GDBStub

@Suite("guest page walks for the debugger")
struct GuestPageWalkerTests {
  /// 4-level tables built by hand: a 4 KiB page, a 2 MiB page, a 1 GiB page, an unmapped hole.
  @Test func fourLevelPagingWithLargePages() throws {
    let memory = try GuestMemory(size: 4 << 20)
    let pml4: UInt64 = 0x1000
    let pdpt: UInt64 = 0x2000
    let directory: UInt64 = 0x3000
    let table: UInt64 = 0x4000
    // Linear 0xFFFF_8000_0000_0000 + ...: PML4 index 256.
    try memory.write(pdpt | 3, at: pml4 + 256 * 8)
    try memory.write(directory | 3, at: pdpt + 0 * 8)
    try memory.write(UInt64(0x4000_0000) | 0x83, at: pdpt + 1 * 8)  // 1 GiB page -> 1 GiB
    try memory.write(table | 3, at: directory + 0 * 8)
    try memory.write(UInt64(0x20_0000) | 0x83, at: directory + 1 * 8)  // 2 MiB page -> 2 MiB
    try memory.write(UInt64(0x5000) | 3, at: table + 7 * 8)  // page 7 -> 0x5000
    let walker = GuestPageWalker(cr0: 0x8000_0011, cr3: pml4, cr4: 0x20, efer: 0x500)
    let base: UInt64 = 0xFFFF_8000_0000_0000
    #expect(walker.translate(base + 0x7123, memory: memory) == 0x5123)
    #expect(walker.translate(base + 0x20_0000 + 0x1_2345, memory: memory) == 0x21_2345)
    #expect(walker.translate(base + 0x4000_0000 + 0x9876, memory: memory) == 0x4000_9876)
    #expect(walker.translate(base + 0x8000, memory: memory) == nil)
    #expect(walker.translate(0x1000, memory: memory) == nil)
    // Reads cross from a mapped page into an unmapped one and stop there.
    try memory.writeBytes([1, 2, 3, 4], at: 0x5FFC)
    #expect(walker.read(base + 0x7FFC, count: 8, memory: memory) == [1, 2, 3, 4])
    #expect(walker.write([9, 9], at: base + 0x7FFE, memory: memory))
    #expect(try memory.readBytes(at: 0x5FFE, count: 2) == [9, 9])
    #expect(!walker.write([1, 1, 1, 1], at: base + 0x7FFE, memory: memory))
  }

  @Test func thirtyTwoBitPagingWithFourMegabytePages() throws {
    let memory = try GuestMemory(size: 16 << 20)
    let directory: UInt64 = 0x1000
    try memory.write(UInt32(0x40_0000 | 0x83), at: directory + 3 * 4)  // 12 MiB linear -> 4 MiB
    try memory.write(UInt32(0x2000 | 3), at: directory + 0)
    try memory.write(UInt32(0x7000 | 3), at: 0x2000 + 5 * 4)
    let walker = GuestPageWalker(cr0: 0x8000_0011, cr3: directory, cr4: 0x10, efer: 0)
    #expect(walker.translate(0xC0_1234, memory: memory) == 0x40_1234)
    #expect(walker.translate(0x5ABC, memory: memory) == 0x7ABC)
    #expect(walker.translate(0x6000, memory: memory) == nil)
    // Paging off: linear is physical (32 bits outside long mode).
    let flat = GuestPageWalker(cr0: 0x11, cr3: 0, cr4: 0, efer: 0)
    #expect(flat.translate(0x1_0000_1234, memory: memory) == 0x1234)
  }

  @Test func badGDBAddressesAreOneLineErrors() throws {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("gdbargs-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: directory) }
    let image = try GDBTestSupport.buildGuest("spin64", in: directory)
    for argument in ["1.2.3:99999", "foo:1", "127.0.0.1:", "::1"] {
      let result = try HostCommand.run(
        GDBTestSupport.hostvisor, ["run", "--kernel", image, "--accel", "soft", "--gdb", argument], timeout: 60)
      let text = result.errorText
      #expect(result.status == 1)
      #expect(text.hasPrefix("hostvisor: error: invalid --gdb") && text.split(separator: "\n").count == 1, "\(text)")
    }
    #expect(throws: GDBServerError.self) { try GDBServer.parseAddress("foo:1") }
    #expect(try GDBServer.parseAddress("1234") == ("127.0.0.1", 1234))
    #expect(try GDBServer.parseAddress("localhost:0") == ("127.0.0.1", 0))
  }
}
