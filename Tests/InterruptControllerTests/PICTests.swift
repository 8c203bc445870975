import Testing
import VMCore

@testable import InterruptControllers

@Suite struct PICTests {
  @Test func initSequenceMaskAndVectorOffset() throws {
    let machine = try Machine()
    let pic = machine.platform.pic
    machine.initializePICs(masterMask: 0xFF, slaveMask: 0xFF)
    #expect(machine.inb(0x21) == 0xFF)
    machine.platform.routing.setInterruptLevel(line: 3, level: true)
    #expect(!pic.hasPendingInterrupt, "masked IRQ 3 must not reach INTR")
    // OCW3 0x0A selects the IRR on the command port: the request is latched even while masked.
    machine.outb(0x20, 0x0A)
    #expect(machine.inb(0x20) == 0x08)
    machine.outb(0x21, 0xF7)  // unmask IRQ 3
    #expect(pic.hasPendingInterrupt)
    #expect(pic.acknowledge() == 0x23)
    machine.outb(0x20, 0x0B)  // read ISR
    #expect(machine.inb(0x20) == 0x08)
    #expect(!pic.hasPendingInterrupt)
    machine.outb(0x20, 0x20)  // non-specific EOI
    #expect(machine.inb(0x20) == 0x00)
  }

  @Test func irq0HasPriorityOverIrq1AndNestingWaitsForEOI() throws {
    let machine = try Machine()
    let pic = machine.platform.pic
    machine.initializePICs()
    machine.platform.routing.setInterruptLevel(line: 1, level: true)
    machine.platform.routing.setInterruptLevel(line: 0, level: true)
    #expect(pic.acknowledge() == 0x20)
    #expect(!pic.hasPendingInterrupt, "IRQ 1 must wait while IRQ 0 is in service")
    machine.outb(0x20, 0x60)  // specific EOI for IRQ 0
    #expect(pic.hasPendingInterrupt)
    #expect(pic.acknowledge() == 0x21)
    machine.outb(0x20, 0x61)
    #expect(!pic.hasPendingInterrupt)
  }

  @Test func higherPriorityNestsOverLowerInService() throws {
    let machine = try Machine()
    let pic = machine.platform.pic
    machine.initializePICs()
    machine.platform.routing.setInterruptLevel(line: 4, level: true)
    #expect(pic.acknowledge() == 0x24)
    machine.platform.routing.setInterruptLevel(line: 1, level: true)
    #expect(pic.hasPendingInterrupt, "IRQ 1 outranks in-service IRQ 4")
    #expect(pic.acknowledge() == 0x21)
    machine.outb(0x20, 0x0B)
    #expect(machine.inb(0x20) == 0x12)
  }

  @Test func cascadedSlaveIRQ() throws {
    let machine = try Machine()
    let pic = machine.platform.pic
    machine.initializePICs()
    machine.platform.routing.setInterruptLevel(line: 10, level: true)
    #expect(pic.hasPendingInterrupt)
    #expect(pic.acknowledge() == 0x2A)
    machine.outb(0x20, 0x0B)
    machine.outb(0xA0, 0x0B)
    #expect(machine.inb(0x20) == 0x04, "cascade IRQ 2 in service on the master")
    #expect(machine.inb(0xA0) == 0x04, "IRQ 10 is slave input 2")
    // A second slave IRQ waits until both chips get their EOI.
    machine.platform.routing.setInterruptLevel(line: 12, level: true)
    #expect(!pic.hasPendingInterrupt)
    machine.outb(0xA0, 0x20)
    #expect(!pic.hasPendingInterrupt, "master still has IRQ 2 in service")
    machine.outb(0x20, 0x20)
    #expect(pic.acknowledge() == 0x2C)
  }

  @Test func slaveMaskedCascadeHidesRequest() throws {
    let machine = try Machine()
    machine.initializePICs(slaveMask: 0xFF)
    machine.platform.routing.setInterruptLevel(line: 9, level: true)
    #expect(!machine.platform.pic.hasPendingInterrupt)
    machine.outb(0xA1, 0xFD)
    #expect(machine.platform.pic.acknowledge() == 0x29)
  }

  @Test func edgeVersusLevelTriggeringThroughELCR() throws {
    let machine = try Machine()
    let pic = machine.platform.pic
    machine.initializePICs()
    // Edge (default): one interrupt per rising edge even though the line stays high.
    machine.platform.routing.setInterruptLevel(line: 5, level: true)
    #expect(pic.acknowledge() == 0x25)
    machine.outb(0x20, 0x20)
    #expect(!pic.hasPendingInterrupt)
    machine.platform.routing.setInterruptLevel(line: 5, level: false)

    // Level: IRQ 11 via ELCR2 bit 3 re-requests after EOI while the line is high.
    machine.outb(0x4D1, 0x08)
    #expect(machine.inb(0x4D1) == 0x08)
    machine.platform.routing.setInterruptLevel(line: 11, level: true)
    #expect(pic.acknowledge() == 0x2B)
    machine.outb(0xA0, 0x20)
    machine.outb(0x20, 0x20)
    #expect(pic.hasPendingInterrupt, "level-triggered IRQ 11 is still asserted")
    machine.platform.routing.setInterruptLevel(line: 11, level: false)
    #expect(!pic.hasPendingInterrupt)
    // ELCR bits of IRQ 0-2 cannot be set.
    machine.outb(0x4D0, 0xFF)
    #expect(machine.inb(0x4D0) == 0xF8)
  }

  @Test func vanishedLevelRequestGivesSpuriousIRQ7() throws {
    let machine = try Machine()
    let pic = machine.platform.pic
    machine.initializePICs()
    machine.outb(0x4D0, 0x20)  // IRQ 5 level
    machine.platform.routing.setInterruptLevel(line: 5, level: true)
    #expect(pic.hasPendingInterrupt)
    machine.platform.routing.setInterruptLevel(line: 5, level: false)
    #expect(pic.acknowledge() == 0x27)
    machine.outb(0x20, 0x0B)
    #expect(machine.inb(0x20) == 0, "a spurious IRQ 7 sets no in-service bit")
  }

  @Test func autoEOILeavesNothingInService() throws {
    let machine = try Machine()
    machine.initializePICs(icw4: 0x03)
    machine.platform.routing.setInterruptLevel(line: 6, level: true)
    #expect(machine.platform.pic.acknowledge() == 0x26)
    machine.outb(0x20, 0x0B)
    #expect(machine.inb(0x20) == 0)
  }

  @Test func pollCommandReturnsHighestRequest() throws {
    let machine = try Machine()
    machine.initializePICs()
    machine.platform.routing.setInterruptLevel(line: 7, level: true)
    machine.outb(0x20, 0x0C)
    #expect(machine.inb(0x20) == 0x87)
    machine.outb(0x20, 0x0C)
    #expect(machine.inb(0x20) == 0x00, "IRQ 7 is now in service")
  }

  @Test func outputReachesBSPThroughVirtualWire() throws {
    let machine = try Machine()
    let wakes = Counter()
    machine.bsp.setInterruptPendingHandler { wakes.increment() }
    machine.initializePICs()
    #expect(machine.bsp.pendingEvents.isEmpty)
    machine.platform.routing.setInterruptLevel(line: 4, level: true)
    #expect(machine.bsp.pendingEvents.contains(.interrupt))
    #expect(wakes.count == 1)
    #expect(machine.bsp.takeEvent(interruptsEnabled: false) == nil)
    #expect(machine.bsp.takeEvent(interruptsEnabled: true) == .interrupt(vector: 0x24))
    #expect(machine.bsp.pendingEvents.isEmpty)
    machine.outb(0x20, 0x20)
  }
}

@Suite struct PICResetStateTests {
  @Test func startsAsBIOSLeavesIt() throws {
    let machine = try Machine()
    #expect(machine.inb(0x21) == 0xFF && machine.inb(0xA1) == 0xFF)
    machine.platform.routing.setInterruptLevel(line: 1, level: true)
    #expect(!machine.platform.pic.hasPendingInterrupt)
    machine.outb(0x21, 0xFD)
    #expect(machine.platform.pic.acknowledge() == 0x09)
  }
}
