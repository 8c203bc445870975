import Testing
import VMCore

@testable import InterruptControllers

/// Found by the libFuzzer `state` target's leak check (docs/fuzzing.md): the local APICs and
/// the APIC bus, the IOAPIC and the bus, and the bootstrap processor's APIC and the 8259 held
/// each other strongly, so a machine's interrupt controllers were never freed.
@Suite struct LifetimeTests {
  @Test(arguments: [1, 4])
  func droppedControllersAreFreed(cpus: Int) throws {
    weak var weakPlatform: PlatformInterruptControllers?
    weak var weakBus: APICBus?
    weak var weakBootstrapAPIC: LocalAPIC?
    weak var weakIOAPIC: IOAPIC?
    weak var weakPIC: DualPIC?
    do {
      let machine = try Machine(cpus: cpus)
      // Some traffic first: an IPI over the bus and an EOI broadcast back to the IOAPIC.
      machine.platform.apicBus.broadcast(InterruptMessage(vector: 0x40, deliveryMode: .fixed))
      machine.platform.apicBus.broadcastEndOfInterrupt(vector: 0x40)
      #expect(machine.platform.apicBus.localAPICs.count == cpus)
      weakPlatform = machine.platform
      weakBus = machine.platform.apicBus
      weakBootstrapAPIC = machine.bsp
      weakIOAPIC = machine.platform.ioapic
      weakPIC = machine.platform.pic
    }
    #expect(weakPlatform == nil, "the interrupt controllers outlived the machine")
    #expect(weakBus == nil, "the APIC bus outlived its APICs")
    #expect(weakBootstrapAPIC == nil, "the BSP's local APIC outlived the machine")
    #expect(weakIOAPIC == nil, "the IOAPIC outlived the machine")
    #expect(weakPIC == nil, "the 8259 outlived the machine")
  }
}
