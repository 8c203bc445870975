import Foundation
import Testing
import VMCore

@testable import VMM

/// Rounds of the KVM state guest: its code is emulated and every round exits to the host for
/// its COM1 write, so far fewer than on the software CPU.
let kvmStateGuestIterations = 20_000

/// The KVM variant of the state guest (see `stateGuest`). Under this host's nested KVM,
/// ring-0 code is emulated by the host kernel, whose emulator knows no x87 or SSE arithmetic,
/// so the loop is integer code: an LCG and a carry chain, a rotate/xor mix through the stack,
/// and each round a COM1 write of a character derived from the state (a lost or repeated port
/// write shows in the output). SSE registers and an MSR carry values from the start to the end
/// (XMM1/XMM2 loaded with MOVDQU, SYSENTER_ESP written with WRMSR). The local APIC timer runs
/// periodically with interrupts disabled (the emulator cannot return from a protected-mode
/// interrupt), so its interrupt is pending in the APIC: after the rounds the guest stores its
/// results at 0x7000, enables interrupts and the timer's handler exits through isa-debug-exit
/// with 0x31. Progress is at 0x6000.
let kvmStateGuest =
  interruptGuestStart(vector: 0x40) + """
            movl $0x1FF, 0xFEE000F0
            movl $0xB, 0xFEE003E0
            movl $0x20040, 0xFEE00320
            movl $1000000, 0xFEE00380
            movl %cr4, %eax
            orl $0x600, %eax
            movl %eax, %cr4
            movdqu seed, %xmm1
            movdqu seed + 16, %xmm2
            movl $0x175, %ecx
            movl $0x5EED1234, %eax
            xorl %edx, %edx
            wrmsr
            movl $0x12345678, %eax
            movl $0x9ABCDEF0, %ebx
            xorl %ecx, %ecx
            movl $0x0F0F0F0F, %edx
            xorl %esi, %esi
            movl $0x13579BDF, %edi
    round:  imull $1664525, %eax, %eax
            addl $1013904223, %eax
            addl %eax, %ebx
            adcl $0, %esi
            roll $5, %edx
            xorl %ebx, %edx
            pushl %edx
            popl %ebp
            pushl %eax
            pushl %edx
            movl %ebp, %eax
            andl $0x3F, %eax
            addl $0x30, %eax
            movw $0x3F8, %dx
            outb %al, %dx
            popl %edx
            popl %eax
            addl %ebp, %edi
            incl %ecx
            movl %ecx, 0x6000
            cmpl $\(kvmStateGuestIterations), %ecx
            jne round
            movl %eax, 0x7000
            movl %ebx, 0x7004
            movl %edx, 0x7008
            movl %esi, 0x700C
            movl %edi, 0x7010
            movl %ebp, 0x7014
            movdqu %xmm1, 0x7020
            movdqu %xmm2, 0x7030
            movl $0x175, %ecx
            rdmsr
            movl %eax, 0x7040
            movl 0xFEE00380, %eax
            movl %eax, 0x7044
            sti
    wait:   hlt
            jmp wait
    handler:
            movw $0xF4, %dx
            movl $0x31, %eax
            outl %eax, %dx
            cli
            hlt
            .data
            .align 16
    seed:   .long 0xDEADBEEF, 0x01234567, 0x89ABCDEF, 0xCAFEF00D
            .long 0x0BADC0DE, 0x76543210, 0xFEDCBA98, 0x600DF00D

    """ + interruptGuestTables

@Suite(
  "Snapshot and restore on KVM", .serialized,
  .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct KVMSnapshotTests {
  let scratch: ScratchDirectory
  let kernel: String

  init() throws {
    scratch = try ScratchDirectory()
    kernel = try assembleGuest(kvmStateGuest, in: scratch)
  }

  func startController(serial: String) throws -> VMController {
    let controller = VMController(id: "kvm-snapshot-test")
    try controller.configure { spec throws(ControlError) in
      spec.kernelPath = kernel
      spec.memoryMiB = 32
      spec.accelerator = .kvm
      spec.serial = .file(serial)
    }
    try controller.start()
    return controller
  }

  /// The guest's results (registers, SSE registers, the MSR) once it has exited.
  func results(_ controller: VMController) throws -> [UInt8] {
    let reason = controller.waitUntilStopped(timeoutNanoseconds: 300_000_000_000)
    #expect(reason == .debugExit(value: 0x31), "the guest stopped with \(String(describing: reason))")
    return try controller.machine!.parts.memory.readBytes(at: 0x7000, count: 0x48)
  }

  func progress(_ controller: VMController) throws -> UInt32 {
    try controller.machine!.parts.memory.read(UInt32.self, at: 0x6000)
  }

  func serialOutput(_ path: String) -> String {
    (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
  }

  /// A guest snapshotted mid-run on KVM and restored into a new KVM machine finishes with the
  /// same registers, SSE and MSR values, timer count and COM1 output (each round's port write exactly once:
  /// the write pending when the machine paused is completed before its state is read) as a
  /// run without the snapshot; the local APIC timer's interrupt still arrives after the restore.
  @Test func restoredGuestFinishesLikeAnUninterruptedRun() throws {
    let referenceSerial = scratch.path("reference.out")
    let reference = try startController(serial: referenceSerial)
    let expected = try results(reference)
    try reference.shutdown()
    let expectedOutput = serialOutput(referenceSerial)
    #expect(expected.contains { $0 != 0 })
    #expect(expectedOutput.count == kvmStateGuestIterations)

    let beforeSerial = scratch.path("before.out")
    let source = try startController(serial: beforeSerial)
    let deadline = Date().addingTimeInterval(120)
    while try progress(source) < UInt32(kvmStateGuestIterations / 4) {
      guard Date() < deadline else { throw ControlError(.failed, "the guest made no progress") }
      usleep(1000)
    }
    try source.pause()
    let atSnapshot = try progress(source)
    let state = scratch.path("kvm.state")
    let memory = scratch.path("kvm.mem")
    try source.createSnapshot(statePath: state, memoryPath: memory)
    try source.shutdown()
    #expect(atSnapshot < UInt32(kvmStateGuestIterations), "the guest finished before the snapshot")

    let afterSerial = scratch.path("after.out")
    let restored = VMController(id: "kvm-restored")
    try restored.configure { spec throws(ControlError) in spec.serial = .file(afterSerial) }
    try restored.loadSnapshot(statePath: state, memoryPath: memory, resume: true)
    defer { try? restored.shutdown() }
    #expect(restored.machine?.accelerator.name == "kvm")
    #expect(try results(restored) == expected)
    #expect(!serialOutput(afterSerial).isEmpty, "the restored guest wrote nothing")
    #expect(serialOutput(beforeSerial) + serialOutput(afterSerial) == expectedOutput)
  }
}
