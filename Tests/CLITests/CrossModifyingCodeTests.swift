import Foundation
import Testing
import VMCore

@testable import VMM

/// A two-CPU Multiboot guest for cross-modifying code. The bootstrap processor copies a
/// real-mode loop to 0x9000 and starts the application processor there (INIT + SIPI). The AP
/// calls a tiny function, `mov ax, imm16; ret`, over and over and stores what it returns at
/// 0x6000. The BSP patches the immediate 200 times (1, 2, ...), each time waiting until the AP
/// reports the new value; it exits with 0x11 when every patch was seen, or 0x07 when the AP kept
/// running old code for about a second of guest time (stale decoded code on the other vCPU).
let crossModifyingCodeGuest =
  multibootPrologue + """
            .set SEEN, 0x6000
            .set TRAMPOLINE, 0x9000
            .set IMMEDIATE, TRAMPOLINE + (patched - trampoline) + 1
    _start:
            movl $stack_top, %esp
            movl $trampoline, %esi
            movl $TRAMPOLINE, %edi
            movl $(trampoline_end - trampoline), %ecx
            cld
            rep movsb
            movw $0xFFFF, SEEN
            movl $0x000001FF, 0xFEE000F0
            movl $0x01000000, 0xFEE00310
            movl $0x00004500, 0xFEE00300
            movl $0x01000000, 0xFEE00310
            movl $0x00004609, 0xFEE00300
            xorl %ebx, %ebx
    await:  movl $100000000, %ecx
    poll:   cmpw %bx, SEEN
            je seen
            decl %ecx
            jnz poll
            movw $0xF4, %dx
            movl $0x07, %eax
            outl %eax, %dx
            hlt
    seen:   incl %ebx
            cmpl $200, %ebx
            ja done
            movw %bx, IMMEDIATE
            jmp await
    done:   movw $0xF4, %dx
            movl $0x11, %eax
            outl %eax, %dx
            hlt

            .code16
    trampoline:
            xorw %ax, %ax
            movw %ax, %ds
    again:  call patched
            movw %ax, SEEN
            jmp again
    patched:
            movw $0, %ax
            ret
    trampoline_end:
            .code32

            .data
            .fill 4096, 1, 0
    stack_top:

    """

@Suite("Cross-modifying code between vCPUs")
struct CrossModifyingCodeTests {
  func run(_ accelerator: AcceleratorChoice) throws -> MachineStopReason {
    let scratch = try ScratchDirectory()
    let kernel = try assembleGuest(crossModifyingCodeGuest, in: scratch)
    let configuration = MachineConfiguration(
      kernelPath: kernel, memorySize: 32 << 20, cpuCount: 2, accelerator: accelerator, serial: .none)
    return try VirtualMachine(configuration: configuration).run()
  }

  /// Each vCPU is a host thread with its own decoded-block cache: the BSP's stores must reach
  /// the code the AP decoded.
  @Test func softwareCPUsSeeEachOthersCodePatches() throws {
    #expect(try run(.soft) == .debugExit(value: 0x11))
  }
}
