import Foundation
import SoftCPU
import Testing
import VMCore

/// Known-answer tests of the XSAVE feature set: what the differential tests cannot compare
/// because the host's XCR0 and CPUID differ from the model's (XGETBV/XSETBV values, CPUID leaf
/// 0DH), the #GP on a reserved MXCSR bit (where hardware may already have loaded some
/// components), and the vCPU state file carrying XCR0 and the YMM upper halves. Expected values
/// come from the SDM's XSAVE layout (vol. 1 §13.4): legacy region 512 bytes, header 64 bytes,
/// the AVX component (YMM_Hi128, 16 × 16 bytes) at offset 576.
@Suite("XSAVE")
struct XSAVETests {
  @Test("CPUID: XSAVE, OSXSAVE from CR4, leaf 0DH sizes and offsets for x87/SSE/AVX")
  func cpuidLeaves() throws {
    let machine = try CoreMachine(cpl: 0)
    try machine.load(
      assembly: """
        mov eax, 1
        cpuid
        mov r8, rcx
        mov eax, 0xD
        xor ecx, ecx
        cpuid
        mov r9, rax
        mov r10, rbx
        mov r11, rcx
        mov eax, 0xD
        mov ecx, 1
        cpuid
        mov r12, rax
        mov eax, 0xD
        mov ecx, 2
        cpuid
        mov r13, rax
        mov r14, rbx
        mov rax, cr4
        btr rax, 18
        mov cr4, rax
        mov eax, 1
        cpuid
        mov r15, rcx
        mov eax, 7
        xor ecx, ecx
        cpuid
        mov rsi, rbx
        hlt
        """)
    #expect(machine.run() == .halted)
    #expect(machine[R.rsi] & (1 << 5) != 0)  // AVX2
    #expect(machine[R.r8] & (1 << 26) != 0)  // XSAVE
    #expect(machine[R.r8] & (1 << 27) != 0)  // OSXSAVE while CR4.OSXSAVE = 1
    #expect(machine[R.r15] & (1 << 27) == 0)  // and 0 after clearing it
    #expect(machine[R.r8] & (1 << 28) != 0)  // AVX
    #expect(machine[R.r8] & (1 << 12) != 0)  // FMA
    #expect(machine[R.r8] & (1 << 29) != 0)  // F16C
    #expect(machine[R.r9] == 0x7)  // x87, SSE, AVX
    #expect(machine[R.r10] == 576 + 256)  // XCR0 = 7 in flat test mode: up to the end of AVX
    #expect(machine[R.r11] == 576 + 256)
    #expect(machine[R.r12] == 0x3)  // XSAVEOPT, XSAVEC; no XGETBV ECX=1, no XSAVES
    #expect(machine[R.r13] == 256)
    #expect(machine[R.r14] == 576)
  }

  @Test("XSETBV/XGETBV: CPL 0 writes, invalid values and XCR indexes raise #GP, CR4.OSXSAVE = 0 raises #UD")
  func xsetbvAndXgetbv() throws {
    let machine = try CoreMachine(cpl: 0)
    try machine.load(
      assembly: """
        xor ecx, ecx
        xor edx, edx
        mov eax, 3
        xsetbv
        xgetbv
        mov r8, rax
        mov r9, rdx
        hlt
        """)
    #expect(machine.run() == .halted)
    #expect(machine[R.r8] == 3 && machine[R.r9] == 0)
    #expect(machine.cpu.xcr0 == 3)
    // EDX:EAX values XSETBV refuses: x87 disabled, AVX without SSE, an unsupported component,
    // and ECX naming another XCR.
    for (eax, edx, ecx): (UInt64, UInt64, UInt64) in [(6, 0, 0), (5, 0, 0), (0xF, 0, 0), (3, 1, 0), (3, 0, 1)] {
      let faulting = try CoreMachine(cpl: 0)
      try faulting.load(assembly: "xsetbv\nhlt")
      faulting[R.rax] = eax
      faulting[R.rdx] = edx
      faulting[R.rcx] = ecx
      #expect(faulting.run() == .fault(.generalProtection(0)), "xsetbv eax=\(eax) edx=\(edx) ecx=\(ecx)")
      #expect(faulting.cpu.xcr0 == 7)
    }
    let user = try CoreMachine(cpl: 3)
    try user.load(assembly: "xor ecx, ecx\nmov eax, 3\nxor edx, edx\nxsetbv\nhlt")
    #expect(user.run() == .fault(.generalProtection(0)))
    let disabled = try CoreMachine(cpl: 0)
    try disabled.load(assembly: "mov rax, cr4\nbtr rax, 18\nmov cr4, rax\nxor ecx, ecx\nxgetbv\nhlt")
    #expect(disabled.run() == .fault(.invalidOpcode))
  }

  @Test("XSAVE writes the standard layout; XRSTOR with XSTATE_BV clear initializes; reserved MXCSR bits #GP")
  func saveAndRestore() throws {
    let machine = try CoreMachine(cpl: 0)
    for index in 0..<16 {
      machine.cpu.xmm[index] = XMMValue(UInt64(index) | 0x1100, 0x2200)
      machine.cpu.ymmHigh[index] = XMMValue(UInt64(index) | 0x3300, 0x4400)
    }
    machine.cpu.mxcsr = 0x1FC0
    let area = CoreMachine.dataBase
    try machine.memory.fill(0xAA, at: area, length: 1024)
    try machine.load(
      assembly: """
        mov rbx, \(area)
        mov eax, 7
        xor edx, edx
        xsave [rbx]
        hlt
        """)
    #expect(machine.run() == .halted)
    func read64(_ offset: UInt64) throws -> UInt64 { try machine.memory.read(UInt64.self, at: area + offset) }
    #expect(try machine.memory.read(UInt32.self, at: area + 24) == 0x1FC0)  // MXCSR
    #expect(try machine.memory.read(UInt32.self, at: area + 28) == 0xFFFF)  // MXCSR_MASK
    #expect(try read64(160 + 16 * 5) == 0x1105)  // XMM5 low half
    #expect(try read64(576 + 16 * 5) == 0x3305)  // YMM5 bits 191:128
    #expect(try read64(576 + 16 * 15 + 8) == 0x4400)  // YMM15 bits 255:192
    #expect(try read64(512) & 0x7 == 0x7)  // XSTATE_BV: all three in use
    #expect(try read64(520) == 0xAAAA_AAAA_AAAA_AAAA)  // XSAVE leaves XCOMP_BV alone

    // XRSTOR of AVX only, with XSTATE_BV[2] = 0 (standard form): the upper halves become 0,
    // nothing else changes.
    try machine.memory.write(UInt64(0), at: area + 512)
    try machine.memory.write(UInt64(0), at: area + 520)
    try machine.memory.write(UInt64(0), at: area + 528)
    machine.cpu.xmm[3] = XMMValue(0x77, 0x77)
    // (Each program at its own address: the CPU keeps the blocks it decoded.)
    try machine.load(
      CoreAssembler.assemble("mov rbx, \(area)\nmov eax, 4\nxor edx, edx\nxrstor [rbx]\nhlt"),
      at: CoreMachine.codeBase + 0x1000)
    #expect(machine.run() == .halted)
    #expect((0..<16).allSatisfy { machine.cpu.ymmHigh[$0] == .zero })
    #expect(machine.cpu.xmm[3] == XMMValue(0x77, 0x77))
    #expect(machine.cpu.mxcsr == 0x1FC0)  // loaded from the area (RFBM[2] loads MXCSR)

    // A reserved MXCSR bit: #GP(0), and nothing is loaded.
    try machine.memory.write(UInt32(0x2_1F80), at: area + 24)
    try machine.memory.write(UInt64(0x7), at: area + 512)
    try machine.load(
      CoreAssembler.assemble("mov rbx, \(area)\nmov eax, 7\nxor edx, edx\nxrstor [rbx]\nhlt"),
      at: CoreMachine.codeBase + 0x2000)
    #expect(machine.run() == .fault(.generalProtection(0)))
    #expect(machine.cpu.xmm[3] == XMMValue(0x77, 0x77))
    #expect(machine.cpu.mxcsr == 0x1FC0)
  }

  @Test("The vCPU state carries XCR0 and the YMM upper halves; a state without them restores the reset values")
  func stateRoundTrip() throws {
    let source = try CoreMachine(cpl: 0)
    source.cpu.xcr0 = 0x3
    source.cpu.ymmHigh[9] = XMMValue(0x1234, 0x5678)
    var writer = StateWriter()
    source.cpu.saveState(into: &writer)
    let target = try CoreMachine(cpl: 0)
    var reader = StateReader(bytes: writer.bytes)
    try target.cpu.restoreState(from: &reader)
    #expect(reader.isAtEnd)
    #expect(target.cpu.xcr0 == 0x3)
    #expect(target.cpu.ymmHigh[9] == XMMValue(0x1234, 0x5678))
    // The same state as written before XSAVE support: it ends after the MSR list.
    let older = Array(writer.bytes.dropLast(8 + 16 * 16))
    let reset = try CoreMachine(cpl: 0)
    reset.cpu.ymmHigh[9] = XMMValue(1, 1)
    var olderReader = StateReader(bytes: older)
    try reset.cpu.restoreState(from: &olderReader)
    #expect(reset.cpu.xcr0 == 1)
    #expect(reset.cpu.ymmHigh[9] == .zero)
    // An XCR0 the model does not support is refused.
    var bad = writer.bytes
    let xcr0Offset = bad.count - 8 - 16 * 16
    bad[xcr0Offset] = 0x6
    var badReader = StateReader(bytes: bad)
    #expect(throws: MachineStateError.self) { try reset.cpu.restoreState(from: &badReader) }
  }
}
