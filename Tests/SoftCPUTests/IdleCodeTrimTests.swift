import Foundation
import Glibc
import Testing
import VMCore

@testable import SoftCPU

/// An idle vCPU gives the memory of its decoded blocks and translations back to the host
/// (`CPU.releaseDecodedCode`, `IdleCodeTrim`), and its code still runs afterwards.
@Suite struct IdleCodeTrimTests {
  /// Resident pages (mincore) among the whole pages of `byteCount` bytes at `start`.
  static func residentPages(_ start: UnsafeRawPointer, byteCount: Int) -> Int {
    let pageSize = 4096
    let first = (Int(bitPattern: start) + pageSize - 1) & ~(pageSize - 1)
    let end = (Int(bitPattern: start) + byteCount) & ~(pageSize - 1)
    guard end > first else { return 0 }
    var vector = [UInt8](repeating: 0, count: (end - first) / pageSize)
    let result = mincore(UnsafeMutableRawPointer(bitPattern: first), end - first, &vector)
    precondition(result == 0, "mincore failed: \(errno)")
    return vector.filter { $0 & 1 != 0 }.count
  }

  /// 40 000 different `add rax, imm32` (about 700 blocks, 1.9 MiB of decoded instructions),
  /// then HLT. RAX ends as the sum of the immediates.
  static let additions = 40_000
  static func program() -> (code: [UInt8], sum: UInt64) {
    var code: [UInt8] = []
    var sum: UInt64 = 0
    for index in 1...additions {
      let immediate = UInt32(index * 7 + 3)
      code += [0x48, 0x05] + withUnsafeBytes(of: immediate.littleEndian) { Array($0) }
      sum &+= UInt64(immediate)
    }
    return (code + [0xF4], sum)
  }

  @Test func releasedCodeLeavesNoResidentPagesAndRunsAgain() throws {
    let machine = try CoreMachine(cpl: 0)
    let (code, sum) = Self.program()
    try machine.load(code)
    machine.cpu.setExecutionTier(.translator, threshold: 0)
    #expect(machine.run() == .halted)
    #expect(machine[R.rax] == sum)

    let cpu = machine.cpu
    let arenaBytes = blockArenaCapacity * MemoryLayout<Instruction>.stride
    let blockBytes = maximumBlocks * MemoryLayout<DecodedBlock>.stride
    let code0 = try #require(cpu.translator?.buffer)
    #expect(cpu.decodedInstructionCount >= Self.additions)
    #expect(cpu.translatedBlockCount > 0)
    // 40 000 decoded instructions fill hundreds of the arena's pages.
    #expect(Self.residentPages(cpu.blockArena, byteCount: arenaBytes) > 300)
    #expect(Self.residentPages(cpu.blocks, byteCount: blockBytes) > 10)
    #expect(Self.residentPages(code0.base, byteCount: code0.capacity) > 10)
    let flushes = cpu.statistics.decodedBlockFlushes

    cpu.releaseDecodedCode()
    #expect(cpu.statistics.idleTrims == 1)
    #expect(cpu.statistics.decodedBlockFlushes == flushes + 1)
    #expect(cpu.decodedInstructionCount == 0)
    #expect(Self.residentPages(cpu.blockArena, byteCount: arenaBytes) == 0)
    #expect(Self.residentPages(cpu.blocks, byteCount: blockBytes) == 0)
    #expect(Self.residentPages(code0.base, byteCount: code0.capacity) == 0)

    // The same code decodes, translates and runs again to the same sum.
    machine[R.rax] = 0
    cpu.rip = CoreMachine.codeBase
    cpu.system.halted = false
    #expect(machine.run() == .halted)
    #expect(machine[R.rax] == sum)
    #expect(cpu.decodedInstructionCount >= Self.additions)
  }

  /// The policy: a window of five seconds of machine time with fewer than 20 million
  /// instructions retired is idle; it releases only with enough decoded code to be worth it.
  @Test func releasesOnlyAfterAnIdleWindowWithEnoughDecodedCode() {
    let second: UInt64 = 1_000_000_000
    let big = IdleCodeTrim.minimumDecodedInstructions
    var trim = IdleCodeTrim()
    func check(_ now: UInt64, _ retired: UInt64, _ decoded: Int) -> Bool {
      trim.shouldRelease(now: now, retired: retired, decoded: decoded)
    }
    // The first check opens a window.
    #expect(!check(10 * second, 1_000_000_000, big))
    // Inside the window: never.
    #expect(!check(14 * second, 1_000_000_100, big))
    // The window passed, idle, enough decoded code: release.
    #expect(check(15 * second, 1_000_000_200, big))
    // The next window idle too, but little code decoded since: no second release.
    #expect(!check(20 * second, 1_000_100_000, big / 4))
    // A busy window (hundreds of millions of instructions): no release, whatever is decoded.
    #expect(!check(25 * second, 1_500_000_000, big * 8))
    // Idle again: release.
    #expect(check(30 * second, 1_500_000_000 + 19_000_000, big * 8))
    // A clock that went back (a restored machine) opens a new window instead.
    #expect(!check(2 * second, 0, big * 8))
    #expect(check(7 * second, 10, big * 8))
  }
}
