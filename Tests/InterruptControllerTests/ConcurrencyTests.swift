import Foundation
import Synchronization
import Testing
import VMCore

@testable import InterruptControllers

@Suite struct ConcurrencyTests {
  /// Device threads toggle PIC and IOAPIC lines while two vCPU threads take and complete
  /// interrupts: no deadlock, and once the lines are low and every interrupt is completed,
  /// no remote IRR or request is left behind.
  @Test func linesAndAcknowledgementsFromManyThreads() throws {
    let machine = try Machine(cpus: 2)
    let platform = machine.platform
    machine.initializePICs(masterMask: 0xE7)  // IRQ 3 and 4 through the virtual wire
    // Start the AP (INIT, SIPI) so it takes interrupts.
    machine.bsp.sendIPI(icrLow: 0x0000_C500, destination: 1)
    machine.bsp.sendIPI(icrLow: 0x0000_0610, destination: 1)
    #expect(platform.localAPICs[1].takeEvent(interruptsEnabled: true) == .initialize)
    #expect(platform.localAPICs[1].takeEvent(interruptsEnabled: true) == .startup(vector: 0x10))
    for apic in platform.localAPICs { apic.writeRegister(offset: 0xF0, value: 0x1FF) }
    for pin in 16..<20 {
      machine.redirect(pin: pin, vector: UInt8(0x40 + pin), level: true, destination: UInt8(pin % 2))
    }
    let deviceThreads = 3
    let finishedDevices = Atomic<Int>(0)
    let finishedCPUs = Atomic<Int>(0)
    let delivered = Atomic<Int>(0)
    let bus = machine.bus

    for device in 0..<deviceThreads {
      Thread.detachNewThread {
        for step in 0..<3000 {
          let line = UInt32(16 + (step + device) % 4)
          platform.routing.setInterruptLevel(line: line, level: true)
          if step % 7 == 0 { platform.routing.setInterruptLevel(line: UInt32(3 + device % 2), level: step % 14 == 0) }
          platform.routing.setInterruptLevel(line: line, level: false)
        }
        platform.routing.setInterruptLevel(line: 3, level: false)
        platform.routing.setInterruptLevel(line: 4, level: false)
        finishedDevices.add(1, ordering: .sequentiallyConsistent)
      }
    }
    for cpu in 0..<2 {
      let apic = platform.localAPICs[cpu]
      Thread.detachNewThread {
        var idleRounds = 0
        while idleRounds < 1000 {
          if case .interrupt(let vector) = apic.takeEvent(interruptsEnabled: true) {
            delivered.add(1, ordering: .relaxed)
            if (0x08...0x0F).contains(vector) || (0x20...0x27).contains(vector) {
              bus.portWrite(0x20, size: 1, value: 0x20)  // 8259 EOI (ExtINT)
            } else {
              apic.endOfInterrupt()
            }
            idleRounds = 0
          } else if finishedDevices.load(ordering: .sequentiallyConsistent) == deviceThreads {
            idleRounds += 1
          }
        }
        finishedCPUs.add(1, ordering: .sequentiallyConsistent)
      }
    }
    let deadline = Date().addingTimeInterval(60)
    while finishedCPUs.load(ordering: .sequentiallyConsistent) < 2 {
      guard Date() < deadline else {
        Issue.record("vCPU threads did not finish: deadlock or lost wake-up")
        return
      }
      usleep(1000)
    }
    #expect(delivered.load(ordering: .relaxed) > 0)
    for pin in 16..<20 {
      #expect(platform.ioapic.redirectionEntry(pin) & (1 << 14) == 0, "remote IRR of pin \(pin) cleared")
    }
    for apic in platform.localAPICs {
      #expect(apic.highestPendingVector(respectingPriority: false) == nil)
      #expect(apic.pendingEvents.isEmpty)
    }
  }
}

@Suite struct SleeperTests {
  @Test func wakeTokenIsNotLostAndDeadlinesExpire() throws {
    let sleeper = VCPUSleeper()
    let clock = VirtualClock()
    sleeper.wake()
    #expect(sleeper.sleep(untilVirtual: nil, clock: clock), "a wake before sleeping returns at once")
    let start = clock.nanoseconds
    #expect(!sleeper.sleep(untilVirtual: start + 20_000_000, clock: clock))
    #expect(clock.nanoseconds >= start + 20_000_000, "slept until the virtual deadline")
    #expect(!sleeper.sleep(untilVirtual: 0, clock: clock), "a past deadline returns at once")
  }

  @Test func interruptWakesHaltedCPUThread() throws {
    let machine = try Machine()
    let sleeper = VCPUSleeper()
    let clock = VirtualClock()
    machine.bsp.setInterruptPendingHandler { sleeper.wake() }
    let bsp = machine.bsp
    Thread.detachNewThread {
      usleep(20_000)
      bsp.deliver(InterruptMessage(vector: 0x99))
    }
    let start = VirtualClock.hostMonotonic()
    while bsp.pendingEvents.isEmpty {
      sleeper.sleep(untilVirtual: clock.nanoseconds + 10_000_000_000, clock: clock)
    }
    #expect(VirtualClock.hostMonotonic() - start < 5_000_000_000, "woken by the interrupt, not the deadline")
    #expect(bsp.takeEvent(interruptsEnabled: true) == .interrupt(vector: 0x99))
  }
}
