import PCI
import Testing
import VMCore

@testable import Virtio

@Suite struct PCITests {
  @Test func enumerationThroughConfigMechanism1FindsHostBridgeAndVirtioDevice() throws {
    let machine = try TestMachine()
    let driver = try VirtioDriver(machine: machine, model: VirtioEntropy())
    var found: [Int: (UInt16, UInt16)] = [:]
    for slot in 0..<32 {
      let id = machine.configRead(slot: slot, offset: 0, size: 4)
      if id != 0xFFFF_FFFF { found[slot] = (UInt16(id & 0xFFFF), UInt16(id >> 16)) }
    }
    #expect(found.count == 2)
    #expect(found[0]! == (0x8086, 0x29C0))
    #expect(found[driver.slot]! == (0x1AF4, 0x1044))
    #expect(machine.configRead(slot: 0, offset: 0x0B, size: 1) == 0x06)  // bridge class
    #expect(machine.configRead(slot: driver.slot, offset: 8, size: 1) == 1)  // revision 1
    #expect(machine.configRead(slot: driver.slot, offset: 0x2C, size: 2) == 0x1AF4)
    // Byte and word accesses at every CONFIG_DATA port.
    #expect(machine.configRead(slot: driver.slot, offset: 1, size: 1) == 0x1A)
    #expect(machine.configRead(slot: driver.slot, offset: 2, size: 2) == 0x1044)
    #expect(machine.configRead(slot: driver.slot, offset: 3, size: 1) == 0x10)
    // Function 1 and bus 1 are empty.
    machine.bus.portWrite(0xCF8, size: 4, value: 0x8000_0100 | UInt32(driver.slot) << 11)
    #expect(machine.bus.portRead(0xCFC, size: 4) == 0xFFFF_FFFF)
    machine.bus.portWrite(0xCF8, size: 4, value: 0x8001_0000)
    #expect(machine.bus.portRead(0xCFC, size: 2) == 0xFFFF)
    // CONFIG_ADDRESS reads back; without the enable bit, data reads float.
    machine.bus.portWrite(0xCF8, size: 4, value: 0x1234_5678)
    #expect(machine.bus.portRead(0xCF8, size: 4) == 0x0034_5678)
    #expect(machine.bus.portRead(0xCFC, size: 4) == 0xFFFF_FFFF)
    // Capabilities: status bit 4, virtio vendor caps (common, notify, isr, device) and MSI-X.
    #expect(machine.configRead(slot: driver.slot, offset: 6, size: 2) & 0x10 != 0)
    let capabilities = machine.capabilities(slot: driver.slot)
    #expect(capabilities.map(\.id) == [0x09, 0x09, 0x09, 0x09, 0x11])
    #expect(driver.notifyMultiplier == 4)
  }

  @Test func barSizingReportsSizeMaskAndTypeBits() throws {
    let machine = try TestMachine()
    let driver = try VirtioDriver(machine: machine, model: VirtioEntropy())
    let original = machine.configRead(slot: driver.slot, offset: 0x10, size: 4)
    #expect(original >= 0xC000_0000 && original < 0xE000_0000)
    #expect(original % 0x8000 == 0)
    machine.configWrite(slot: driver.slot, offset: 0x10, size: 4, value: 0xFFFF_FFFF)
    #expect(machine.configRead(slot: driver.slot, offset: 0x10, size: 4) == ~UInt32(0x8000 - 1))
    // Unimplemented BARs read 0 after all-ones.
    machine.configWrite(slot: driver.slot, offset: 0x14, size: 4, value: 0xFFFF_FFFF)
    #expect(machine.configRead(slot: driver.slot, offset: 0x14, size: 4) == 0)
    machine.configWrite(slot: driver.slot, offset: 0x10, size: 4, value: original)
    #expect(machine.configRead(slot: driver.slot, offset: 0x10, size: 4) == original)
    // Read-only identity.
    machine.configWrite(slot: driver.slot, offset: 0, size: 4, value: 0)
    #expect(machine.configRead(slot: driver.slot, offset: 0, size: 2) == 0x1AF4)
  }

  @Test func sixtyFourBitAndIOBarsSizeAndRoute() throws {
    final class Probe: PCIDevice {
      let config = PCIConfigSpace(identity: PCIIdentity(vendorID: 0x1234, deviceID: 0x5678, classCode: (0xFF, 0, 0)))
      init() {
        config.addBAR(PCIBARDefinition(index: 0, size: 0x1000, kind: .memory64(prefetchable: true)))
        config.addBAR(PCIBARDefinition(index: 2, size: 0x20, kind: .io))
      }
      func barRead(bar: Int, offset: UInt64, size: Int) -> UInt64 { UInt64(bar) << 32 | offset }
      func barWrite(bar: Int, offset: UInt64, size: Int, value: UInt64) {}
    }
    let machine = try TestMachine()
    let slot = try machine.pci.attach(Probe())
    #expect(machine.configRead(slot: slot, offset: 0x10, size: 4) & 0xF == 0xC)
    machine.configWrite(slot: slot, offset: 0x10, size: 4, value: 0xFFFF_FFFF)
    machine.configWrite(slot: slot, offset: 0x14, size: 4, value: 0xFFFF_FFFF)
    #expect(machine.configRead(slot: slot, offset: 0x10, size: 4) == 0xFFFF_F00C)
    #expect(machine.configRead(slot: slot, offset: 0x14, size: 4) == 0xFFFF_FFFF)
    // Move it above 4 GiB, enable decoding.
    machine.configWrite(slot: slot, offset: 0x10, size: 4, value: 0xC000_0000)
    machine.configWrite(slot: slot, offset: 0x14, size: 4, value: 0x0000_0010)
    let io = machine.configRead(slot: slot, offset: 0x18, size: 4)
    #expect(io & 1 == 1)
    machine.configWrite(slot: slot, offset: 0x18, size: 4, value: 0xFFFF_FFFF)
    #expect(machine.configRead(slot: slot, offset: 0x18, size: 4) == 0xFFFF_FFE1)
    machine.configWrite(slot: slot, offset: 0x18, size: 4, value: io)
    machine.configWrite(slot: slot, offset: 4, size: 2, value: 0x3)
    #expect(machine.pci.memoryRead(0x10_C000_0010, size: 4) == 0x10)
    #expect(machine.bus.portRead(UInt16(io & ~3) + 4, size: 4) == 4)
    // I/O decoding off: the port floats.
    machine.configWrite(slot: slot, offset: 4, size: 2, value: 0x2)
    #expect(machine.bus.portRead(UInt16(io & ~3) + 4, size: 4) == 0xFFFF_FFFF)
  }

  @Test func movingABarReroutesMMIOAndCommandGatesDecoding() throws {
    let machine = try TestMachine()
    let driver = try VirtioDriver(machine: machine, model: VirtioEntropy())
    let old = driver.bar0
    #expect(driver.common(0x12, size: 2) == 1)  // num_queues through the old address
    let new: UInt64 = 0xD000_0000
    machine.configWrite(slot: driver.slot, offset: 0x10, size: 4, value: UInt32(new))
    #expect(machine.bus.mmioRead(new + 0x12, size: 2) == 1)
    #expect(machine.bus.mmioRead(old + 0x12, size: 2) == 0xFFFF)
    machine.configWrite(slot: driver.slot, offset: 4, size: 2, value: 0)  // memory decoding off
    #expect(machine.bus.mmioRead(new + 0x12, size: 2) == 0xFFFF)
    machine.configWrite(slot: driver.slot, offset: 4, size: 2, value: 2)
    #expect(machine.bus.mmioRead(new + 0x12, size: 2) == 1)
  }

  @Test func ecamMatchesConfigMechanism1() throws {
    let machine = try TestMachine()
    let driver = try VirtioDriver(machine: machine, model: VirtioEntropy())
    let ecam = machine.pci.layout.ecamBase
    for slot in [0, driver.slot, 7] {
      for offset in stride(from: 0, to: 256, by: 4) {
        let viaPorts = machine.configRead(slot: slot, offset: offset, size: 4)
        let viaECAM = machine.bus.mmioRead(ecam + UInt64(slot) << 15 + UInt64(offset), size: 4)
        #expect(UInt64(viaPorts) == viaECAM, "slot \(slot) offset \(offset)")
      }
    }
    // A write through ECAM shows through CF8/CFC.
    machine.bus.mmioWrite(ecam + UInt64(driver.slot) << 15 + 0x3C, size: 1, value: 0x42)
    #expect(machine.configRead(slot: driver.slot, offset: 0x3C, size: 1) == 0x42)
    // Extended space of a conventional function reads 0; a missing bus reads all ones.
    #expect(machine.bus.mmioRead(ecam + UInt64(driver.slot) << 15 + 0x100, size: 4) == 0)
    #expect(machine.bus.mmioRead(ecam + 1 << 20, size: 4) == 0xFFFF_FFFF)
  }

  @Test func intxRoutingSwizzleAndInterruptDisable() throws {
    let machine = try TestMachine()
    let driver = try VirtioDriver(machine: machine, model: VirtioEntropy())
    let gsi = machine.pci.gsi(forSlot: driver.slot, pin: 1)
    #expect(gsi == 16 + UInt32(driver.slot) % 8)
    #expect(machine.configRead(slot: driver.slot, offset: 0x3D, size: 1) == 1)
    #expect(machine.configRead(slot: driver.slot, offset: 0x3C, size: 1) == gsi)
    driver.device.configurationChanged()  // INTx path: ISR bit 1
    #expect(machine.sink.level(gsi))
    #expect(machine.configRead(slot: driver.slot, offset: 6, size: 2) & 0x8 != 0)
    machine.configWrite(slot: driver.slot, offset: 4, size: 2, value: 0x406)  // Interrupt Disable
    #expect(!machine.sink.level(gsi))
    machine.configWrite(slot: driver.slot, offset: 4, size: 2, value: 0x006)
    #expect(machine.sink.level(gsi))
    #expect(driver.readISR() == 2)
    #expect(!machine.sink.level(gsi))
    #expect(driver.readISR() == 0)
  }

  @Test func msixMaskingPendingAndFunctionMask() throws {
    let machine = try TestMachine()
    let driver = try VirtioDriver(machine: machine, model: VirtioEntropy())
    let msix = machine.capabilities(slot: driver.slot).first { $0.id == 0x11 }!.offset
    #expect(machine.configRead(slot: driver.slot, offset: msix + 2, size: 2) & 0x7FF == 1)  // 2 vectors
    let table = driver.bar0 + 0x4000
    let pba = driver.bar0 + 0x6000
    machine.bus.mmioWrite(table + 16, size: 4, value: 0xFEE0_0000)
    machine.bus.mmioWrite(table + 20, size: 4, value: 0)
    machine.bus.mmioWrite(table + 24, size: 4, value: 0x4041)
    #expect(machine.bus.mmioRead(table + 28, size: 4) == 1)  // masked at reset
    machine.configWrite(slot: driver.slot, offset: msix + 2, size: 2, value: 0x8000)  // enable
    driver.device.msix.signal(vector: 1)
    #expect(machine.msi.all.isEmpty)
    #expect(machine.bus.mmioRead(pba, size: 8) == 2)
    machine.bus.mmioWrite(table + 28, size: 4, value: 0)  // unmask: pending message goes out
    #expect(machine.msi.count(data: 0x4041) == 1)
    #expect(machine.bus.mmioRead(pba, size: 8) == 0)
    machine.configWrite(slot: driver.slot, offset: msix + 2, size: 2, value: 0xC000)  // function mask
    driver.device.msix.signal(vector: 1)
    #expect(machine.msi.count(data: 0x4041) == 1)
    machine.configWrite(slot: driver.slot, offset: msix + 2, size: 2, value: 0x8000)
    #expect(machine.msi.count(data: 0x4041) == 2)
    #expect(machine.msi.all.last!.address == 0xFEE0_0000)
  }
}
