import SoftCPU
import Testing
import VMCore

/// LZCNT and TZCNT follow the CPU model: a model without ABM (LZCNT) or BMI1 (TZCNT), as
/// x86-64 and x86-64-v2 are, runs their encodings (F3 0F BD, F3 0F BC) as BSR and BSF, which is
/// what processors without them do with the F3 prefix (Intel SDM, LZCNT and TZCNT).
@Suite struct HiddenCountFeatureTests {
  @Test(arguments: [false, true])
  func countInstructionsFollowTheCPUModel(hidden: Bool) throws {
    let machine = try CoreMachine(cpl: 0)
    if hidden {
      machine.cpu.system.cpuidFeatures.extendedECX &= ~(1 << 5)
      machine.cpu.system.cpuidFeatures.leaf7EBX &= ~(1 << 3)
    }
    try machine.load(assembly: "lzcnt ecx, eax\ntzcnt edx, ebx\nhlt")
    machine[R.rax] = 0x10
    machine[R.rbx] = 0
    machine[R.rdx] = 0x1234
    let stop = machine.run()
    #expect(stop == .halted, "\(stop)")
    // LZCNT of 0x10 in 32 bits is 27; BSR gives the index of the top set bit, 4.
    #expect(machine[R.rcx] == (hidden ? 4 : 27))
    // TZCNT of 0 is the operand width with CF set; BSF of 0 leaves its destination alone.
    #expect(machine[R.rdx] == (hidden ? 0x1234 : 32))
    #expect((machine.cpu.rflags & 1 == 1) == !hidden)
  }
}
