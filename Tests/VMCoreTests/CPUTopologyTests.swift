import Testing
import VMCore

/// The topology both accelerators present: one package of single-thread cores, APIC ID = vCPU
/// index. Expected values from the SDM's leaf 0BH layout and the APM's 8000_0008 ECX fields.
@Suite struct CPUTopologyTests {
  @Test func oneVCPUNeedsNoCoreBitsAndNoHTT() {
    let topology = CPUTopology(cpuCount: 1)
    #expect(topology.coreIDBits == 0)
    #expect(topology.logicalProcessorsPerPackage == 1)
    #expect(!topology.hyperThreadingFlag)
    #expect(topology.extendedSizeECX == 0)
    #expect(topology.extendedTopology(subleaf: 1, x2APICID: 0) == (0, 1, 0x201, 0))
  }

  @Test func threeVCPUsUseTwoCoreBits() {
    let topology = CPUTopology(cpuCount: 3)
    #expect(topology.coreIDBits == 2)
    #expect(topology.hyperThreadingFlag)
    #expect(topology.extendedSizeECX == 0x2002)  // ApicIdSize 2, NC 3 - 1
    // SMT level: one thread per core; core level: 3 cores, shift 2; then the invalid level.
    #expect(topology.extendedTopology(subleaf: 0, x2APICID: 2) == (0, 1, 0x100, 2))
    #expect(topology.extendedTopology(subleaf: 1, x2APICID: 2) == (2, 3, 0x201, 2))
    #expect(topology.extendedTopology(subleaf: 2, x2APICID: 2) == (0, 0, 2, 2))
    #expect(topology.extendedTopology(subleaf: 0x1_0007, x2APICID: 1) == (0, 0, 7, 1))
  }

  @Test func countsArePowersOfTwoAtTheBoundary() {
    #expect(CPUTopology(cpuCount: 4).coreIDBits == 2)
    #expect(CPUTopology(cpuCount: 5).coreIDBits == 3)
    #expect(CPUTopology(cpuCount: 255).coreIDBits == 8)
    #expect(CPUTopology(cpuCount: 255).extendedSizeECX == 0x80FE)
    #expect(CPUTopology(cpuCount: 0).cpuCount == 1)
    #expect(CPUTopology(cpuCount: 1000).cpuCount == 255)
  }
}
