import Testing
import VMCore

@testable import InterruptControllers

@Suite struct IOAPICTests {
  @Test func identificationRegisters() throws {
    let machine = try Machine()
    #expect(machine.ioapicRead(0x01) == 0x0017_0011)
    machine.ioapicWrite(0x00, 0x0500_0000)
    #expect(machine.ioapicRead(0x00) == 0x0500_0000)
    #expect(machine.ioapicRead(0x02) == 0x0500_0000, "arbitration ID follows the ID")
    #expect(machine.ioapicRead(0x10) & (1 << 16) != 0, "entries reset masked")
    // IOREGSEL reads back.
    machine.bus.mmioWrite(IOAPIC.defaultBase, size: 4, value: 0x13)
    #expect(machine.bus.mmioRead(IOAPIC.defaultBase, size: 4) == 0x13)
  }

  @Test func edgeRedirectionReachesLocalAPICIRR() throws {
    let machine = try Machine()
    machine.redirect(pin: 4, vector: 0x31)
    #expect(machine.ioapicRead(0x18) == 0x31)
    machine.platform.routing.setInterruptLevel(line: 4, level: true)
    #expect(machine.apicBit(0x200, 0x31), "IRR bit 0x31")
    #expect(!machine.apicBit(0x180, 0x31), "edge: TMR clear")
    #expect(machine.bsp.takeEvent(interruptsEnabled: true) == .interrupt(vector: 0x31))
    #expect(machine.apicBit(0x100, 0x31), "ISR bit 0x31 after acknowledge")
    machine.apicWrite(0xB0, 0)
    #expect(!machine.apicBit(0x100, 0x31))
    // The line is still high: an edge entry does not deliver again.
    #expect(machine.bsp.pendingEvents.isEmpty)
  }

  @Test func pitLineZeroGoesToPinTwo() throws {
    let machine = try Machine()
    machine.redirect(pin: 2, vector: 0x30)
    machine.platform.routing.setInterruptLevel(line: 0, level: true)
    #expect(machine.bsp.highestPendingVector() == 0x30)
  }

  @Test func maskedEdgeIsLost() throws {
    let machine = try Machine()
    machine.redirect(pin: 5, vector: 0x35, masked: true)
    machine.platform.routing.setInterruptLevel(line: 5, level: true)
    #expect(machine.bsp.highestPendingVector() == nil)
    machine.redirect(pin: 5, vector: 0x35)
    #expect(machine.bsp.highestPendingVector() == nil)
  }

  @Test func levelTriggeredRemoteIRRAndRedelivery() throws {
    let machine = try Machine()
    machine.redirect(pin: 10, vector: 0x41, level: true)
    machine.platform.routing.setInterruptLevel(line: 10, level: true)
    #expect(machine.ioapicRead(0x10 + 20) & (1 << 14) != 0, "remote IRR set on delivery")
    #expect(machine.apicBit(0x180, 0x41), "level: TMR set")
    #expect(machine.bsp.takeEvent(interruptsEnabled: true) == .interrupt(vector: 0x41))
    // Still asserted at EOI: remote IRR clears and the interrupt comes again.
    machine.apicWrite(0xB0, 0)
    #expect(machine.ioapicRead(0x10 + 20) & (1 << 14) != 0)
    #expect(machine.bsp.takeEvent(interruptsEnabled: true) == .interrupt(vector: 0x41))
    // Deasserted before EOI: no redelivery.
    machine.platform.routing.setInterruptLevel(line: 10, level: false)
    machine.apicWrite(0xB0, 0)
    #expect(machine.ioapicRead(0x10 + 20) & (1 << 14) == 0)
    #expect(machine.bsp.pendingEvents.isEmpty)
  }

  @Test func unmaskingAssertedLevelPinDelivers() throws {
    let machine = try Machine()
    machine.redirect(pin: 11, vector: 0x42, level: true, masked: true)
    machine.platform.routing.setInterruptLevel(line: 11, level: true)
    #expect(machine.bsp.highestPendingVector() == nil)
    machine.redirect(pin: 11, vector: 0x42, level: true)
    #expect(machine.bsp.highestPendingVector() == 0x42)
  }

  @Test func switchingToEdgeClearsRemoteIRR() throws {
    let machine = try Machine()
    machine.redirect(pin: 9, vector: 0x43, level: true)
    machine.platform.routing.setInterruptLevel(line: 9, level: true)
    #expect(machine.ioapicRead(0x10 + 18) & (1 << 14) != 0)
    machine.redirect(pin: 9, vector: 0x43, level: false, masked: true)
    #expect(machine.ioapicRead(0x10 + 18) & (1 << 14) == 0)
  }

  @Test func destinationsPhysicalLogicalAndLowestPriority() throws {
    let machine = try Machine(cpus: 3)
    let apics = machine.platform.localAPICs
    for apic in apics { apic.writeRegister(offset: 0xF0, value: 0x1FF) }
    // Physical destination 2.
    machine.redirect(pin: 16, vector: 0x50, destination: 2)
    machine.platform.routing.setInterruptLevel(line: 16, level: true)
    #expect(apics[2].highestPendingVector() == 0x50)
    #expect(apics[0].highestPendingVector() == nil)
    #expect(apics[1].highestPendingVector() == nil)
    // Flat logical: CPU n has logical ID 1 << n.
    for (index, apic) in apics.enumerated() {
      apic.writeRegister(offset: 0xD0, value: UInt32(1 << index) << 24)
    }
    machine.redirect(pin: 17, vector: 0x51, destination: 0x06, logical: true)
    machine.platform.routing.setInterruptLevel(line: 17, level: true)
    #expect(apics[0].highestPendingVector() == nil)
    #expect(apics[1].highestPendingVector() == 0x51)
    #expect(apics[2].highestPendingVector() == 0x51)
    // Lowest priority among {1, 2} goes to APIC 1 only.
    machine.redirect(pin: 18, vector: 0x52, destination: 0x06, logical: true, mode: 1)
    machine.platform.routing.setInterruptLevel(line: 18, level: true)
    #expect(apics[1].highestPendingVector(respectingPriority: false) == 0x52)
    #expect(apics[2].highestPendingVector(respectingPriority: false) == 0x51)
  }

  @Test func nmiDeliveryMode() throws {
    let machine = try Machine()
    machine.redirect(pin: 7, vector: 0, mode: 4)
    machine.platform.routing.setInterruptLevel(line: 7, level: true)
    #expect(machine.bsp.pendingEvents == .nmi)
    #expect(machine.bsp.takeEvent(interruptsEnabled: false, nmiEnabled: false) == nil)
    #expect(machine.bsp.takeEvent(interruptsEnabled: false) == .nmi)
  }

  @Test func extINTDeliveryModeFetchesVectorFromPIC() throws {
    let machine = try Machine()
    machine.initializePICs()
    machine.bsp.writeRegister(offset: 0x350, value: 0x1_0700)  // mask LINT0's virtual wire
    machine.redirect(pin: 3, vector: 0, mode: 7)
    machine.platform.routing.setInterruptLevel(line: 3, level: true)
    #expect(machine.bsp.takeEvent(interruptsEnabled: true) == .interrupt(vector: 0x23))
  }
}

@Suite struct LocalAPICTests {
  @Test func identificationAndReset() throws {
    let machine = try Machine(cpus: 2)
    #expect(machine.apicRead(0x30) == 0x0005_0014)
    #expect(machine.apicRead(0x20) == 0)
    let ap = machine.platform.localAPICs[1]
    #expect(ap.readRegister(offset: 0x20) == 0x0100_0000)
    #expect(ap.readRegister(offset: 0xF0) == 0xFF, "APs start software-disabled")
    #expect(ap.readRegister(offset: 0x350) == 0x1_0000, "LVTs start masked")
    #expect(machine.apicRead(0x350) == 0x700, "BSP LINT0 in ExtINT virtual-wire mode")
    #expect(machine.apicRead(0x360) == 0x400, "BSP LINT1 = NMI")
    #expect(machine.bsp.apicBaseMSR == 0xFEE0_0900)
    #expect(ap.apicBaseMSR == 0xFEE0_0800)
    #expect(ap.isWaitingForStartup)
    #expect(!machine.bsp.isWaitingForStartup)
  }

  @Test func taskPriorityMasksLowerClasses() throws {
    let machine = try Machine()
    let apic = machine.bsp
    apic.deliver(InterruptMessage(vector: 0x45))
    apic.deliver(InterruptMessage(vector: 0x65))
    machine.apicWrite(0x80, 0x50)
    #expect(machine.apicRead(0xA0) == 0x50, "PPR = TPR")
    #expect(apic.takeEvent(interruptsEnabled: true) == .interrupt(vector: 0x65))
    #expect(machine.apicRead(0xA0) == 0x60, "PPR = ISR class")
    #expect(apic.takeEvent(interruptsEnabled: true) == nil, "0x45 is below the PPR")
    #expect(apic.highestPendingVector(respectingPriority: false) == 0x45)
    machine.apicWrite(0xB0, 0)
    #expect(apic.pendingEvents.isEmpty, "0x45 is still below TPR 0x50")
    apic.setTaskPriority(0x40)
    #expect(apic.pendingEvents.isEmpty, "same class as the TPR is not enough")
    apic.setTaskPriority(0x30)
    #expect(apic.takeEvent(interruptsEnabled: true) == .interrupt(vector: 0x45))
  }

  @Test func inServiceNestingAndEOIOrder() throws {
    let machine = try Machine()
    let apic = machine.bsp
    apic.deliver(InterruptMessage(vector: 0x40))
    #expect(apic.acknowledgeInterrupt() == 0x40)
    apic.deliver(InterruptMessage(vector: 0x80))
    apic.deliver(InterruptMessage(vector: 0x30))
    #expect(apic.acknowledgeInterrupt() == 0x80, "higher class nests")
    #expect(apic.acknowledgeInterrupt() == nil, "0x30 waits behind both")
    #expect(machine.apicBit(0x100, 0x40) && machine.apicBit(0x100, 0x80))
    machine.apicWrite(0xB0, 0)
    #expect(!machine.apicBit(0x100, 0x80), "EOI retires the highest in-service vector")
    #expect(machine.apicBit(0x100, 0x40))
    #expect(apic.acknowledgeInterrupt() == nil)
    machine.apicWrite(0xB0, 0)
    #expect(apic.acknowledgeInterrupt() == 0x30)
  }

  @Test func selfIPIAndIllegalVector() throws {
    let machine = try Machine()
    let wakes = Counter()
    machine.bsp.setInterruptPendingHandler { wakes.increment() }
    machine.apicWrite(0x300, 0x0004_0077)  // shorthand self, fixed, vector 0x77
    #expect(machine.bsp.highestPendingVector() == 0x77)
    #expect(wakes.count == 1)
    #expect(machine.apicRead(0x300) & (1 << 12) == 0, "delivery status idle")
    machine.apicWrite(0x300, 0x0004_0005)  // illegal vector
    machine.apicWrite(0x280, 0)
    #expect(machine.apicRead(0x280) & 0x20 != 0, "send illegal vector in ESR")
    machine.apicWrite(0x280, 0)
    #expect(machine.apicRead(0x280) == 0)
  }

  @Test func fixedIPIToAnotherAPICAndBroadcasts() throws {
    let machine = try Machine(cpus: 3)
    let apics = machine.platform.localAPICs
    for apic in apics { apic.writeRegister(offset: 0xF0, value: 0x1FF) }
    apics[0].sendIPI(icrLow: 0x0000_0061, destination: 2)
    #expect(apics[2].highestPendingVector() == 0x61)
    #expect(apics[1].highestPendingVector() == nil)
    apics[1].sendIPI(icrLow: 0x000C_0062)  // all excluding self
    #expect(apics[0].highestPendingVector() == 0x62)
    #expect(apics[1].highestPendingVector() == nil)
    #expect(apics[2].highestPendingVector() == 0x62)
    apics[1].sendIPI(icrLow: 0x0008_0063)  // all including self
    #expect(apics.allSatisfy { $0.highestPendingVector() == 0x63 })
  }

  @Test func initAndStartupBringUpAnAP() throws {
    let machine = try Machine(cpus: 2)
    let ap = machine.platform.localAPICs[1]
    let wakes = Counter()
    ap.setInterruptPendingHandler { wakes.increment() }
    ap.deliver(InterruptMessage(vector: 0x20))
    #expect(ap.pendingEvents.isEmpty, "a software-disabled AP accepts no fixed interrupts")
    // INIT assert (level, assert), INIT de-assert (ignored), then SIPI twice, as Linux does.
    machine.apicWrite(0x310, 0x0100_0000)
    machine.apicWrite(0x300, 0x0000_C500)
    machine.apicWrite(0x300, 0x0000_8500)
    #expect(ap.takeEvent(interruptsEnabled: true) == .initialize)
    #expect(ap.isWaitingForStartup)
    #expect(ap.takeEvent(interruptsEnabled: true) == nil)
    machine.apicWrite(0x300, 0x0000_069A)
    machine.apicWrite(0x300, 0x0000_069B)
    #expect(ap.pendingEvents == .startup)
    #expect(ap.takeEvent(interruptsEnabled: false) == .startup(vector: 0x9A))
    #expect(!ap.isWaitingForStartup)
    #expect(ap.takeEvent(interruptsEnabled: true) == nil, "the second SIPI is ignored once started")
    #expect(wakes.count >= 2)
  }

  @Test func nmiIPIAndLINT1() throws {
    let machine = try Machine(cpus: 2)
    let ap = machine.platform.localAPICs[1]
    machine.apicWrite(0x310, 0x0100_0000)
    machine.apicWrite(0x300, 0x0000_0400)
    ap.writeRegister(offset: 0xF0, value: 0x1FF)
    #expect(ap.hasPendingNMI)
    #expect(ap.acknowledgeNMI())
    #expect(!ap.hasPendingNMI)
    // The BSP's LINT1 is programmed as NMI.
    machine.bsp.setLocalInterruptLine(1, level: true)
    #expect(machine.bsp.takeEvent(interruptsEnabled: false) == .nmi)
  }

  @Test func logicalClusterDestination() throws {
    let machine = try Machine(cpus: 2)
    let ap = machine.platform.localAPICs[1]
    ap.writeRegister(offset: 0xF0, value: 0x1FF)
    ap.writeRegister(offset: 0xE0, value: 0x0FFF_FFFF)  // cluster model
    ap.writeRegister(offset: 0xD0, value: 0x2400_0000)  // cluster 2, member bit 2
    #expect(ap.readRegister(offset: 0xE0) == 0x0FFF_FFFF)
    #expect(ap.isDestination(0x24, logical: true))
    #expect(ap.isDestination(0x2C, logical: true))
    #expect(!ap.isDestination(0x14, logical: true))
    #expect(!ap.isDestination(0x21, logical: true))
    #expect(ap.isDestination(0xFF, logical: true))
  }

  @Test func softwareDisableMasksLVTs() throws {
    let machine = try Machine()
    machine.apicWrite(0x320, 0x30)
    #expect(machine.apicRead(0x320) == 0x30)
    machine.apicWrite(0xF0, 0xFF)
    #expect(machine.apicRead(0x320) & 0x1_0000 != 0)
    machine.apicWrite(0x320, 0x30)
    #expect(machine.apicRead(0x320) & 0x1_0000 != 0, "cannot unmask while software-disabled")
  }

  @Test func apicBaseMSR() throws {
    let machine = try Machine()
    #expect(!machine.bsp.writeAPICBaseMSR(0xFEE0_0500), "x2APIC enable without the global enable")
    #expect(!machine.bsp.writeAPICBaseMSR(0xFEE0_0901), "reserved bits")
    machine.bsp.deliver(InterruptMessage(vector: 0x55))
    #expect(machine.bsp.writeAPICBaseMSR(0xFEE0_0000))
    #expect(machine.bsp.apicBaseMSR == 0xFEE0_0100, "BSP bit is read-only")
    #expect(machine.bsp.highestPendingVector() == nil, "disabling resets the APIC")
    #expect(machine.bsp.writeAPICBaseMSR(0xFEE0_0800))
    #expect(machine.bsp.mmioBase == 0xFEE0_0000)
  }

  /// Regression: the wake closure once gained a reabstraction thunk per access (Swift 6 -O with
  /// an optional closure in a Mutex'd tuple), so each wake walked a longer chain and a
  /// long-running guest's vCPU thread overflowed its stack after ~300 000 interrupts.
  @Test func wakeHandlerSurvivesHundredsOfThousandsOfInterrupts() throws {
    let machine = try Machine()
    let wakes = Counter()
    machine.bsp.setInterruptPendingHandler { wakes.increment() }
    let rounds = 400_000
    var taken = 0
    for _ in 0..<rounds {
      machine.apicWrite(0x300, 0x0004_0077)  // self IPI, vector 0x77
      if machine.bsp.takeEvent(interruptsEnabled: true) == .interrupt(vector: 0x77) { taken += 1 }
      machine.apicWrite(0xB0, 0)  // EOI
    }
    #expect(taken == rounds)
    #expect(wakes.count == rounds)
  }

  @Test func oneShotTimerFiresAfterProgrammedDuration() throws {
    let machine = try Machine()
    let wakes = Counter()
    machine.bsp.setInterruptPendingHandler { wakes.increment() }
    machine.apicWrite(0x3E0, 0x3)  // divide by 16
    machine.apicWrite(0x320, 0xEC)  // one-shot, vector 0xEC
    machine.apicWrite(0x380, 1000)  // 1000 * 16 ns
    #expect(machine.bsp.nextTimerDeadline == 16_000)
    machine.clock.advance(by: 8_000)
    #expect(machine.apicRead(0x390) == 500)
    machine.bsp.poll()
    #expect(machine.bsp.pendingEvents.isEmpty)
    machine.clock.set(nanoseconds: 15_999)
    machine.bsp.poll()
    #expect(machine.bsp.pendingEvents.isEmpty)
    machine.clock.set(nanoseconds: 16_000)
    machine.bsp.poll()
    #expect(machine.bsp.highestPendingVector() == 0xEC)
    #expect(wakes.count == 1)
    #expect(machine.apicRead(0x390) == 0)
    #expect(machine.bsp.nextTimerDeadline == nil)
    _ = machine.bsp.acknowledgeInterrupt()
    machine.apicWrite(0xB0, 0)
    machine.clock.advance(by: 100_000)
    machine.bsp.poll()
    #expect(machine.bsp.pendingEvents.isEmpty, "one-shot fires once")
  }

  @Test func periodicTimerReloads() throws {
    let machine = try Machine()
    machine.apicWrite(0x3E0, 0xB)  // divide by 1
    machine.apicWrite(0x320, 0x2_00EF)  // periodic
    machine.apicWrite(0x380, 10_000)
    var fired = 0
    for step in 1...10 {
      machine.clock.set(nanoseconds: UInt64(step) * 10_000)
      machine.bsp.poll()
      if machine.bsp.acknowledgeInterrupt() == 0xEF {
        fired += 1
        machine.apicWrite(0xB0, 0)
      }
    }
    #expect(fired == 10)
    machine.clock.advance(by: 2_500)
    #expect(machine.apicRead(0x390) == 7_500, "current count reloads every period")
    // Missed periods coalesce into one interrupt and the schedule stays on the period grid.
    machine.clock.set(nanoseconds: 155_000)
    machine.bsp.poll()
    #expect(machine.bsp.acknowledgeInterrupt() == 0xEF)
    #expect(machine.bsp.nextTimerDeadline == 160_000)
    // Writing 0 stops it.
    machine.apicWrite(0x380, 0)
    #expect(machine.bsp.nextTimerDeadline == nil)
  }

  @Test func maskedTimerExpiresSilently() throws {
    let machine = try Machine()
    machine.apicWrite(0x3E0, 0xB)
    machine.apicWrite(0x320, 0x1_00EC)
    machine.apicWrite(0x380, 100)
    machine.clock.advance(by: 100)
    machine.bsp.poll()
    #expect(machine.bsp.pendingEvents.isEmpty)
    #expect(machine.bsp.nextTimerDeadline == nil)
  }

  @Test func tscDeadlineTimer() throws {
    let machine = try Machine()
    machine.bsp.writeTSCDeadline(5_000)
    #expect(machine.bsp.readTSCDeadline() == 0, "ignored outside TSC-deadline mode")
    machine.apicWrite(0x320, 0x4_00ED)
    machine.bsp.writeTSCDeadline(5_000)
    #expect(machine.bsp.readTSCDeadline() == 5_000)
    #expect(machine.bsp.nextTimerDeadline == TimeBase.nanoseconds(atTSC: 5_000))
    #expect(machine.apicRead(0x390) == 0 && machine.apicRead(0x380) == 0)
    machine.clock.set(nanoseconds: 4_999)
    machine.bsp.poll()
    #expect(machine.bsp.pendingEvents.isEmpty)
    machine.clock.set(nanoseconds: 5_000)
    #expect(machine.clock.tsc == 5_000)
    machine.bsp.poll()
    #expect(machine.bsp.highestPendingVector() == 0xED)
    #expect(machine.bsp.readTSCDeadline() == 0, "the MSR clears when it fires")
    // A guest TSC offset shifts the deadline; a deadline in the past fires at once.
    machine.bsp.writeTSCDeadline(1_000_000 + 7_000, tscOffset: 1_000_000)
    #expect(machine.bsp.nextTimerDeadline == 7_000)
    machine.bsp.writeTSCDeadline(10, tscOffset: 1_000_000)
    #expect(machine.bsp.nextTimerDeadline == 0)
    machine.bsp.writeTSCDeadline(0)
    #expect(machine.bsp.nextTimerDeadline == nil)
  }

  @Test func concurrentDeliveryLosesNothing() async throws {
    let machine = try Machine(cpus: 4)
    let apics = machine.platform.localAPICs
    for apic in apics { apic.writeRegister(offset: 0xF0, value: 0x1FF) }
    await withTaskGroup(of: Void.self) { group in
      for sender in 1..<4 {
        group.addTask {
          for vector in stride(from: 0x30 + sender, to: 0xF0, by: 3) {
            apics[sender].sendIPI(icrLow: UInt32(vector), destination: 0)
          }
        }
      }
    }
    var taken = Set<UInt8>()
    while case .interrupt(let vector) = apics[0].takeEvent(interruptsEnabled: true) {
      taken.insert(vector)
      apics[0].endOfInterrupt()
    }
    #expect(taken == Set((0x31..<0xF0).map { UInt8($0) }))
  }
}

@Suite("Local APIC timer across a save and restore")
struct LocalAPICTimerStateTests {
  /// Saves `source`'s CPU 0 APIC and restores it into a new machine whose clock reads the same.
  func restored(_ source: Machine, droppingTrailingBytes dropped: Int = 0) throws -> Machine {
    var writer = StateWriter()
    source.bsp.saveState(into: &writer)
    let target = try Machine()
    target.clock.set(nanoseconds: source.clock.nanoseconds)
    var reader = StateReader(bytes: Array(writer.bytes.dropLast(dropped)))
    try target.bsp.restoreState(from: &reader)
    #expect(reader.isAtEnd)
    return target
  }

  /// A one-shot count half-way down reads the same after the restore and still fires on time.
  @Test func oneShotCountContinues() throws {
    let machine = try Machine()
    machine.apicWrite(0x3E0, 0x3)  // divide by 16
    machine.apicWrite(0x320, 0xEC)  // one-shot, vector 0xEC
    machine.apicWrite(0x380, 1000)  // 16 µs
    machine.clock.advance(by: 8_000)
    let countBefore = machine.apicRead(0x390)
    #expect(countBefore == 500)
    let copy = try restored(machine)
    #expect(copy.apicRead(0x390) == countBefore)
    copy.clock.set(nanoseconds: 16_000)
    copy.bsp.poll()
    #expect(copy.bsp.highestPendingVector() == 0xEC)
    #expect(copy.apicRead(0x390) == 0)
  }

  /// After a divider change the timer counts on from the count it had (not from the initial
  /// count); the restored timer does the same.
  @Test func countAfterADividerChangeContinues() throws {
    let machine = try Machine()
    machine.apicWrite(0x3E0, 0x3)  // divide by 16
    machine.apicWrite(0x320, 0x200EC)  // periodic, vector 0xEC
    machine.apicWrite(0x380, 1000)
    machine.clock.advance(by: 8_000)  // count 500
    machine.apicWrite(0x3E0, 0xB)  // divide by 1: 500 counts left, 1 ns each
    machine.clock.advance(by: 100)
    let countBefore = machine.apicRead(0x390)
    #expect(countBefore == 400)
    let copy = try restored(machine)
    #expect(copy.apicRead(0x390) == countBefore)
    #expect(copy.bsp.nextTimerDeadline == machine.bsp.nextTimerDeadline)
  }

  /// A `lapic` section written before the count at the timer's start was saved (8 bytes
  /// shorter) restores with the timer counting from its initial count at its start.
  @Test func olderSectionCountsFromTheInitialCount() throws {
    let machine = try Machine()
    machine.apicWrite(0x3E0, 0x3)
    machine.apicWrite(0x320, 0xEC)
    machine.apicWrite(0x380, 1000)
    machine.clock.advance(by: 8_000)
    let copy = try restored(machine, droppingTrailingBytes: 8)
    #expect(copy.apicRead(0x390) == 500)
  }
}
