import Testing
import VMCore

@testable import InterruptControllers

/// The x2APIC mode of `LocalAPIC` (Intel SDM vol. 3 11.12).
@Suite struct X2APICTests {
  static let enabled: UInt64 = 0xFEE0_0800
  static let x2APIC: UInt64 = 0xFEE0_0C00

  /// Puts every APIC of `machine` in x2APIC mode, software-enabled.
  static func enterX2APICMode(_ machine: Machine) {
    for apic in machine.platform.localAPICs {
      #expect(apic.writeAPICBaseMSR(x2APIC))
      #expect(apic.writeX2APICRegister(0x80F, value: 0x1FF))
    }
  }

  @Test func baseTransitions() throws {
    let machine = try Machine()
    let apic = machine.bsp
    #expect(!apic.writeAPICBaseMSR(0xFEE0_0400), "EXTD without EN")
    #expect(!apic.isX2APICMode)
    #expect(apic.writeAPICBaseMSR(Self.x2APIC), "xAPIC -> x2APIC")
    #expect(apic.isX2APICMode)
    #expect(apic.apicBaseMSR == Self.x2APIC | LocalAPIC.baseBSPBit)
    #expect(!apic.decodesDefaultPage)
    #expect(!apic.writeAPICBaseMSR(Self.enabled), "x2APIC -> xAPIC")
    #expect(!apic.writeAPICBaseMSR(0xFEE0_0400), "x2APIC -> EXTD without EN")
    #expect(apic.writeAPICBaseMSR(Self.x2APIC), "staying in x2APIC mode")
    apic.deliver(InterruptMessage(vector: 0x55))
    #expect(apic.writeAPICBaseMSR(0xFEE0_0000), "x2APIC -> disabled")
    #expect(!apic.isX2APICMode)
    #expect(apic.highestPendingVector() == nil, "disabling resets the APIC")
    #expect(!apic.writeAPICBaseMSR(Self.x2APIC), "disabled -> x2APIC")
    #expect(apic.writeAPICBaseMSR(Self.enabled), "disabled -> xAPIC")
    #expect(apic.decodesDefaultPage)
  }

  @Test func registerInterfaceAndItsFaults() throws {
    let machine = try Machine(cpus: 20)
    let apic = machine.platform.localAPICs[19]
    #expect(apic.readX2APICRegister(0x802) == nil, "no MSR interface in xAPIC mode")
    #expect(!apic.writeX2APICRegister(0x808, value: 0))
    #expect(apic.writeAPICBaseMSR(Self.x2APIC))
    #expect(apic.readX2APICRegister(0x802) == 19, "the x2APIC ID is the initial APIC ID")
    #expect(apic.readX2APICRegister(0x803) == UInt64(LocalAPIC.versionRegister))
    // ID 19 = cluster 1, member 3.
    #expect(apic.readX2APICRegister(0x80D) == 0x0001_0008)
    for readOnly: UInt32 in [0x802, 0x803, 0x80A, 0x80D, 0x810, 0x818, 0x820, 0x839] {
      #expect(!apic.writeX2APICRegister(readOnly, value: 0), "write of read-only \(readOnly)")
    }
    for writeOnly: UInt32 in [0x80B, 0x83F] {
      #expect(apic.readX2APICRegister(writeOnly) == nil, "read of write-only \(writeOnly)")
    }
    for reserved: UInt32 in [0x800, 0x801, 0x804, 0x809, 0x80C, 0x80E, 0x829, 0x82F, 0x831, 0x83A, 0x840, 0x8FF] {
      #expect(apic.readX2APICRegister(reserved) == nil, "read of reserved \(reserved)")
      #expect(!apic.writeX2APICRegister(reserved, value: 0), "write of reserved \(reserved)")
    }
    #expect(!apic.writeX2APICRegister(0x80B, value: 1), "non-zero EOI")
    #expect(apic.writeX2APICRegister(0x80B, value: 0))
    #expect(!apic.writeX2APICRegister(0x828, value: 1), "non-zero ESR write")
    #expect(!apic.writeX2APICRegister(0x808, value: 1 << 32), "bits 63:32 outside the ICR")
    #expect(apic.writeX2APICRegister(0x808, value: 0x40))
    #expect(apic.readX2APICRegister(0x808) == 0x40)
    #expect(apic.taskPriority == 0x40, "the TPR is the one CR8 reaches")
    // The MMIO view reads nothing of the registers any more.
    #expect(!apic.decodesDefaultPage)
  }

  @Test func selfIPIAndEOI() throws {
    let machine = try Machine()
    Self.enterX2APICMode(machine)
    let apic = machine.bsp
    #expect(apic.writeX2APICRegister(0x83F, value: 0x66))
    #expect(apic.takeEvent(interruptsEnabled: true) == .interrupt(vector: 0x66))
    #expect(apic.readX2APICRegister(0x810 + 0x66 / 32)! & (1 << (0x66 % 32)) != 0, "in service")
    #expect(apic.writeX2APICRegister(0x80B, value: 0))
    #expect(apic.readX2APICRegister(0x810 + 0x66 / 32) == 0)
    #expect(apic.writeX2APICRegister(0x83F, value: 0x05), "an illegal vector is an APIC error")
    #expect(apic.highestPendingVector() == nil)
    #expect(apic.writeX2APICRegister(0x828, value: 0))
    #expect(apic.readX2APICRegister(0x828)! & 0x20 != 0, "send illegal vector")
  }

  @Test func interprocessorDestinations() throws {
    let machine = try Machine(cpus: 20)
    Self.enterX2APICMode(machine)
    let apics = machine.platform.localAPICs
    func pending(_ vector: UInt8) -> [Int] {
      apics.indices.filter { apics[$0].highestPendingVector(respectingPriority: false) == vector }
    }
    // Physical: the 32-bit destination names one x2APIC ID; it reads back whole.
    #expect(apics[0].writeX2APICRegister(0x830, value: 17 << 32 | 0x41))
    #expect(pending(0x41) == [17])
    #expect(apics[0].readX2APICRegister(0x830) == 17 << 32 | 0x41)
    // A destination above 255 reaches nobody here (IDs 0-19), not ID (destination & 0xFF).
    #expect(apics[0].writeX2APICRegister(0x830, value: 0x111 << 32 | 0x42))
    #expect(pending(0x42) == [])
    // Logical: cluster 1 (IDs 16-19), members 0 and 2 (IDs 16 and 18).
    #expect(apics[0].writeX2APICRegister(0x830, value: 0x0001_0005 << 32 | 0x800 | 0x43))
    #expect(pending(0x43) == [16, 18])
    // Logical in cluster 0, members 1 and 15.
    #expect(apics[0].writeX2APICRegister(0x830, value: 0x0000_8002 << 32 | 0x800 | 0x44))
    #expect(pending(0x44) == [1, 15])
    // Broadcast.
    #expect(apics[3].writeX2APICRegister(0x830, value: 0xFFFF_FFFF << 32 | 0x45))
    #expect(pending(0x45) == Array(0..<20))
    // An 8-bit destination from the IOAPIC or an MSI reaches the x2APIC with that ID.
    machine.platform.apicBus.send(InterruptMessage(vector: 0x46), destination: 7, logical: false)
    #expect(pending(0x46) == [7])
  }

  @Test func initKeepsTheModeAndStartsAnAP() throws {
    let machine = try Machine(cpus: 2)
    Self.enterX2APICMode(machine)
    let ap = machine.platform.localAPICs[1]
    #expect(machine.bsp.writeX2APICRegister(0x830, value: 1 << 32 | 0x4500))
    #expect(ap.takeEvent(interruptsEnabled: true) == .initialize)
    #expect(ap.isX2APICMode, "INIT keeps x2APIC mode")
    #expect(machine.bsp.writeX2APICRegister(0x830, value: 1 << 32 | 0x4612))
    #expect(ap.takeEvent(interruptsEnabled: true) == .startup(vector: 0x12))
  }

  @Test func timerThroughMSRs() throws {
    let machine = try Machine()
    Self.enterX2APICMode(machine)
    let apic = machine.bsp
    #expect(apic.writeX2APICRegister(0x83E, value: 0xB))
    #expect(apic.writeX2APICRegister(0x832, value: 0x30))
    #expect(apic.writeX2APICRegister(0x838, value: 1000))
    machine.clock.advance(by: 400)
    #expect(apic.readX2APICRegister(0x839) == 600)
    machine.clock.advance(by: 600)
    apic.poll()
    #expect(apic.takeEvent(interruptsEnabled: true) == .interrupt(vector: 0x30))
  }

  @Test func modeSurvivesSaveAndRestore() throws {
    let machine = try Machine()
    Self.enterX2APICMode(machine)
    var writer = StateWriter()
    machine.bsp.saveState(into: &writer)
    let other = try Machine()
    var reader = StateReader(bytes: writer.bytes)
    try other.bsp.restoreState(from: &reader)
    #expect(other.bsp.isX2APICMode)
    #expect(other.bsp.readX2APICRegister(0x80F) == 0x1FF)
    #expect(!other.bsp.decodesDefaultPage)
  }
}
