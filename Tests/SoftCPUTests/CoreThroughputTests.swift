import Foundation
import Glibc
import SoftCPU
import Testing
import VMCore

/// Interpreter throughput on small loops (release builds). Prints million instructions per
/// CPU-second of this thread (wall time is meaningless on a loaded machine); asserts results,
/// not speed. Compare builds side by side on one machine, never against absolute numbers.
@Suite("Core throughput")
struct CoreThroughputTests {
  static func threadCPUSeconds() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
  }

  /// A loop program and its expected final registers, computed by a Swift model of the loop
  /// (independent of the interpreter).
  struct Program {
    var name: String
    var source: String
    /// Fills guest memory before the run (the checksum's input bytes).
    var prepare: @Sendable (GuestMemory) throws -> Void = { _ in }
    /// (register, expected value) after the run.
    var expected: [(register: Int, value: UInt64)]
    /// Expected retired instructions, where the loop's shape fixes it.
    var expectedInstructions: UInt64? = nil
  }

  static let checksumBase: UInt64 = 0x100000
  static let checksumCount: UInt64 = 2_000_000
  /// The checksum's input: byte i of the buffer (a fixed pseudo-random pattern).
  static func checksumByte(_ index: UInt64) -> UInt8 { UInt8(truncatingIfNeeded: (index &* 0x9E37_79B9) >> 13) }

  static let programs: [Program] = [
    Program(
      name: "dec rcx; jnz", source: "mov rcx, 20000000\n1: dec rcx\njnz 1b\nhlt",
      expected: [(R.rcx, 0)],
      // mov, 20M × (dec, jnz), hlt.
      expectedInstructions: 1 + 2 * 20_000_000 + 1),
    Program(
      name: "register ALU x8",
      source: "mov rax, 1\nmov rbx, 0x9E3779B97F4A7C15\nmov rdx, 3\nmov rcx, 2000000\n1:\n"
        + String(repeating: "add rax, rbx\nxor rdx, rax\n", count: 4) + "dec rcx\njnz 1b\nhlt",
      expected: {
        var rax: UInt64 = 1
        var rdx: UInt64 = 3
        let rbx: UInt64 = 0x9E37_79B9_7F4A_7C15
        for _ in 0..<(2_000_000 * 4) {
          rax = rax &+ rbx
          rdx ^= rax
        }
        return [(R.rax, rax), (R.rdx, rdx), (R.rcx, 0)]
      }()),
    Program(
      name: "checksum bytes",
      source: """
        mov rsi, 0x100000
        mov rcx, 2000000
        xor eax, eax
        1:
        movzx edx, byte ptr [rsi + rcx]
        add eax, edx
        rol eax, 3
        xor eax, ecx
        dec rcx
        jnz 1b
        hlt
        """,
      prepare: { memory in
        let bytes = (0...checksumCount).map { checksumByte($0) }
        try memory.writeBytes(bytes, at: checksumBase)
      },
      expected: {
        var eax: UInt32 = 0
        var counter = checksumCount
        while counter != 0 {
          eax = eax &+ UInt32(checksumByte(counter))
          eax = eax << 3 | eax >> 29
          eax ^= UInt32(counter)
          counter -= 1
        }
        return [(R.rax, UInt64(eax)), (R.rcx, 0)]
      }()),
    Program(
      name: "call/ret/push/pop",
      source: """
        mov rbx, 0x1234
        xor eax, eax
        mov ecx, 1000000
        1:
        call 2f
        dec ecx
        jnz 1b
        hlt
        2:
        push rbx
        mov rbx, rcx
        and rbx, 7
        add rax, rbx
        pop rbx
        ret
        """,
      expected: [
        (R.rax, (1...1_000_000).reduce(UInt64(0)) { $0 + UInt64($1 & 7) }), (R.rbx, 0x1234), (R.rcx, 0),
        (R.rsp, CoreMachine.stackTop),
      ]),
  ]

  @Test("Loops compute the results a Swift model of them computes; rates are printed")
  func loops() throws {
    for program in Self.programs {
      let machine = try CoreMachine(ramSize: 32 << 20)
      try program.prepare(machine.memory)
      try machine.load(assembly: program.source)
      let start = Self.threadCPUSeconds()
      let before = machine.cpu.retiredInstructions
      let cause = machine.run(limit: Int.max)
      let seconds = Self.threadCPUSeconds() - start
      let count = machine.cpu.retiredInstructions - before
      #expect(cause == .halted, "\(program.name)")
      for (register, value) in program.expected {
        #expect(
          machine[register] == value,
          "\(program.name): \(DiffCompare.gprNames[register]) = 0x\(String(machine[register], radix: 16)), expected 0x\(String(value, radix: 16))"
        )
      }
      if let expectedInstructions = program.expectedInstructions {
        #expect(count == expectedInstructions, "\(program.name): retired \(count)")
      }
      print(
        "core throughput: \(program.name): \(String(format: "%.0f", Double(count) / max(seconds, 1e-9) / 1e6)) MIPS"
          + " (\(count) instructions)")
    }
  }
}
