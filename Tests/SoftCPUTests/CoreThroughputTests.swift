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

  static let programs: [(name: String, source: String, check: @Sendable (CPU) -> Bool)] = [
    ("dec rcx; jnz", "mov rcx, 20000000\n1: dec rcx\njnz 1b\nhlt", { $0.gpr[1] == 0 }),
    (
      "register ALU x8",
      "mov rcx, 2000000\n1:\n" + String(repeating: "add rax, rbx\nxor rdx, rax\n", count: 4) + "dec rcx\njnz 1b\nhlt",
      { $0.gpr[1] == 0 }
    ),
    (
      "checksum bytes",
      """
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
      { $0.gpr[1] == 0 }
    ),
    (
      "call/ret/push/pop",
      """
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
      { $0.gpr[1] == 0 }
    ),
  ]

  @Test("Loops run to completion; rates are printed")
  func loops() throws {
    for program in Self.programs {
      let machine = try CoreMachine(ramSize: 32 << 20)
      try machine.load(assembly: program.source)
      let start = Self.threadCPUSeconds()
      let before = machine.cpu.retiredInstructions
      let cause = machine.run(limit: Int.max)
      let seconds = Self.threadCPUSeconds() - start
      let count = machine.cpu.retiredInstructions - before
      #expect(cause == .halted, "\(program.name)")
      #expect(program.check(machine.cpu), "\(program.name)")
      print(
        "core throughput: \(program.name): \(String(format: "%.0f", Double(count) / max(seconds, 1e-9) / 1e6)) MIPS"
          + " (\(count) instructions)")
    }
  }
}
