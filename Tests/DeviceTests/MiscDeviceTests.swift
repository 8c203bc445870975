import Devices
import Synchronization
import Testing
import VMCore

@Suite("Debug-exit, system control ports, POST port, bus")
struct MiscDeviceTests {
  @Test(arguments: [(1, UInt32(0x31), UInt32(0x31)), (2, 0xABCD_EF01, 0xEF01), (4, 0x1234_5678, 0x1234_5678)])
  func debugExitReportsTheWrittenValue(size: Int, written: UInt32, expected: UInt32) throws {
    let machine = try LegacyMachine()
    machine.bus.portWrite(0xF4, size: size, value: written)
    #expect(machine.control.stopReason == .debugExit(value: expected))
    #expect(machine.control.stopReason?.exitStatus == Int32(truncatingIfNeeded: (expected << 1) | 1) & 0xFF)
  }

  @Test func debugExitStatusForTheUsualValues() throws {
    let machine = try LegacyMachine()
    machine.outb(0xF4, 0x10)
    #expect(machine.control.stopReason?.exitStatus == 33)
    #expect(machine.bus.portRead(0xF4, size: 1) == 0xFF)
  }

  @Test func port92ResetsOnBitZeroAndKeepsA20() throws {
    let machine = try LegacyMachine()
    #expect(machine.inb(0x92) == 0x02)
    #expect(machine.devices.systemControlA.a20Enabled)
    machine.outb(0x92, 0x00)
    #expect(!machine.devices.systemControlA.a20Enabled)
    #expect(machine.control.stopReason == nil)
    machine.outb(0x92, 0x03)
    #expect(machine.control.stopReason == .reset(reason: "port 0x92 fast reset"))
    #expect(machine.inb(0x92) == 0x02, "bit 0 reads back as 0")
  }

  @Test func port61TogglesRefreshAndMirrorsTimer2() throws {
    let machine = try LegacyMachine()
    let first = machine.inb(0x61)
    let second = machine.inb(0x61)
    #expect((first ^ second) == 0x10, "only the refresh bit changes between reads")
    #expect(first & 0x20 != 0, "no PIT: channel 2 output reads high")
    machine.outb(0x61, 0xF3)
    #expect(machine.inb(0x61) & 0x0F == 0x03)
    #expect(machine.devices.systemControlB?.timer2Gate == true)
    #expect(machine.devices.systemControlB?.speakerDataEnabled == true)

    let output = Atomic<Bool>(false)
    let portB = SystemControlPortB(timer2Output: { output.load(ordering: .relaxed) })
    #expect(portB.portRead(port: 0x61, size: 1) & 0x20 == 0)
    output.store(true, ordering: .relaxed)
    #expect(portB.portRead(port: 0x61, size: 1) & 0x20 != 0)
  }

  @Test func postCodesAreSwallowed() throws {
    let machine = try LegacyMachine()
    machine.outb(0x80, 0x42)
    #expect(machine.devices.postCode.lastCode == 0x42)
    #expect(machine.inb(0x80) == 0xFF)
  }

  @Test(arguments: [UInt16(0x2F8), 0x3E8, 0x2E8, 0x1234, 0xFFFF, 0x00])
  func unclaimedPortsReadAllOnes(port: UInt16) throws {
    let machine = try LegacyMachine()
    #expect(machine.bus.portRead(port, size: 1) == 0xFF)
    #expect(machine.bus.portRead(port, size: 2) == 0xFFFF)
    #expect(machine.bus.portRead(port, size: 4) == 0xFFFF_FFFF)
    machine.bus.portWrite(port, size: 4, value: 0)
    #expect(machine.control.stopReason == nil)
  }

  @Test func portBIsOptInAndYieldsToAnExistingDevice() throws {
    let plain = try LegacyMachine(includeSystemControlPortB: false)
    #expect(plain.devices.systemControlB == nil)
    #expect(!plain.bus.hasPortDevice(0x61), "left to the PIT model")

    let bus = IOBus()
    let pitSpeakerPort = PostCodePort()
    try bus.registerPorts(0x61, count: 1, device: pitSpeakerPort)
    let devices = try LegacyDevices.install(
      on: bus, control: MachineControl(), interrupts: InterruptRouter(), serialBackend: NullSerialBackend(),
      memorySize: 64 << 20, includeSystemControlPortB: true)
    #expect(devices.systemControlB == nil)
    #expect(throws: IOBusError.portOverlap(first: 0x3F8, count: 8)) {
      _ = try LegacyDevices.install(
        on: bus, control: MachineControl(), interrupts: InterruptRouter(), serialBackend: NullSerialBackend(),
        memorySize: 64 << 20)
    }
  }
}
