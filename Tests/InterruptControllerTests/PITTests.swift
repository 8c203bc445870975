import Glibc
import Synchronization
import Testing
import VMCore

@testable import InterruptControllers

/// A PIT on a bus with a manual clock and a recording sink on IRQ 0.
struct PITBench {
  let clock = ManualClock()
  let bus = IOBus()
  let sink = RecordingSink()
  let pit: ProgrammableIntervalTimer
  let port61: SystemControlPort

  init() throws {
    pit = ProgrammableIntervalTimer(clock: clock, irq0: InterruptLine(router: sink, line: 0))
    port61 = SystemControlPort(pit: pit, clock: clock)
    try pit.register(on: bus)
    try port61.register(on: bus)
  }

  func outb(_ port: UInt16, _ value: UInt8) { bus.portWrite(port, size: 1, value: UInt32(value)) }
  func inb(_ port: UInt16) -> UInt8 { UInt8(truncatingIfNeeded: bus.portRead(port, size: 1)) }

  /// Nanoseconds for `ticks` PIT input clocks.
  static func ns(_ ticks: UInt64) -> UInt64 {
    TimeBase.nanoseconds(ticks: ticks, frequency: ProgrammableIntervalTimer.frequency)
  }

  /// Reads a lobyte/hibyte counter after a latch command.
  func latchedCount(_ channel: UInt8) -> UInt16 {
    outb(0x43, channel << 6)
    let low = UInt16(inb(0x40 + UInt16(channel)))
    return low | UInt16(inb(0x40 + UInt16(channel))) << 8
  }
}

@Suite struct PITTests {
  @Test func mode2PeriodFollowsDivisor() throws {
    let bench = try PITBench()
    bench.outb(0x43, 0x34)  // channel 0, lobyte/hibyte, mode 2
    bench.outb(0x40, 0xA9)
    bench.outb(0x40, 0x04)  // 1193 = ~1 ms
    let period = PITBench.ns(1193)
    #expect(period == 999_848)
    #expect(bench.pit.nextDeadline == period)
    bench.clock.set(nanoseconds: period - 1)
    bench.pit.poll()
    #expect(bench.sink.risingEdges(0) == 0)
    for tick in 1...5 {
      bench.clock.set(nanoseconds: PITBench.ns(1193 * UInt64(tick)))
      bench.pit.poll()
      #expect(bench.sink.risingEdges(0) == tick)
      #expect(bench.sink.events.last?.level == false, "IRQ 0 is pulsed")
    }
    #expect(bench.pit.nextDeadline == PITBench.ns(1193 * 6))
    // Missed periods are owed: one interrupt per poll (no pending check here), none lost.
    bench.clock.set(nanoseconds: PITBench.ns(1193 * 20 + 5))
    bench.pit.poll()
    #expect(bench.sink.risingEdges(0) == 6)
    #expect(bench.pit.owedTicks == 14)
    #expect(bench.pit.nextDeadline == PITBench.ns(1193 * 21))
    for _ in 0..<20 { bench.pit.poll() }
    #expect(bench.sink.risingEdges(0) == 20)
    #expect(bench.pit.owedTicks == 0)
  }

  /// Lost-tick reinjection: after a jump over several periods, each owed interrupt is raised
  /// only once the previous one was taken; the backlog holds at most one second of periods
  /// and reprogramming the counter drops it.
  @Test func missedPeriodsAreReinjectedOneAtATime() throws {
    let clock = ManualClock()
    let bus = IOBus()
    let sink = RecordingSink()
    /// IRQ 0 is pending from its rising edge until the test takes it.
    final class PendingLine: InterruptSink {
      let sink: RecordingSink
      let pending = Mutex(false)
      init(sink: RecordingSink) { self.sink = sink }
      func setInterruptLevel(line: UInt32, level: Bool) {
        if level { pending.withLock { $0 = true } }
        sink.setInterruptLevel(line: line, level: level)
      }
    }
    let line = PendingLine(sink: sink)
    let pit = ProgrammableIntervalTimer(clock: clock, irq0: InterruptLine(router: line, line: 0)) {
      line.pending.withLock { $0 }
    }
    try pit.register(on: bus)
    bus.portWrite(0x43, size: 1, value: 0x34)
    bus.portWrite(0x40, size: 1, value: 0xA9)
    bus.portWrite(0x40, size: 1, value: 0x04)  // 1193: 1000 periods per second
    // The vCPU comes back after ten periods.
    clock.set(nanoseconds: PITBench.ns(1193 * 10))
    var delivered = 0
    for _ in 0..<30 {
      pit.poll()
      pit.poll()  // still pending: nothing more
      if line.pending.withLock({ $0 }) {
        delivered += 1
        line.pending.withLock { $0 = false }  // the CPU takes the interrupt
      }
      #expect(sink.risingEdges(0) == delivered)
    }
    #expect(delivered == 10)
    #expect(pit.owedTicks == 0)
    // Five seconds away: at most one second of periods is owed.
    clock.set(nanoseconds: PITBench.ns(1193 * 5010))
    pit.poll()
    #expect(pit.owedTicks == 999)
    #expect(sink.risingEdges(0) == 11)
    // A new count starts over: nothing owed.
    bus.portWrite(0x40, size: 1, value: 0xA9)
    bus.portWrite(0x40, size: 1, value: 0x04)
    #expect(pit.owedTicks == 0)
  }

  /// The same through the PC's controllers: IRQ 0 through the 8259 reaches the CPU once per
  /// missed period, each after the previous INTA.
  @Test func missedPeriodsReachTheCPUThroughThe8259() throws {
    let machine = try Machine()
    machine.initializePICs(masterMask: 0xFE, slaveMask: 0xFF)
    machine.outb(0x43, 0x34)
    machine.outb(0x40, 0xA9)
    machine.outb(0x40, 0x04)
    machine.clock.set(nanoseconds: PITBench.ns(1193 * 7))
    var vectors: [UInt8] = []
    for _ in 0..<20 {
      machine.platform.poll(cpu: 0, now: machine.clock.nanoseconds)
      machine.platform.poll(cpu: 0, now: machine.clock.nanoseconds)
      if case .interrupt(let vector) = machine.bsp.takeEvent(interruptsEnabled: true) {
        vectors.append(vector)
        machine.outb(0x20, 0x20)  // non-specific EOI
      }
    }
    #expect(vectors == [UInt8](repeating: 0x20, count: 7))
  }

  @Test func mode3SquareWave() throws {
    let bench = try PITBench()
    bench.outb(0x43, 0x36)  // channel 0, lobyte/hibyte, mode 3
    bench.outb(0x40, 100)
    bench.outb(0x40, 0)
    func out() -> Bool {
      bench.outb(0x43, 0xE2)  // read-back status of channel 0
      return bench.inb(0x40) & 0x80 != 0
    }
    bench.clock.set(nanoseconds: PITBench.ns(10))
    #expect(out())
    #expect(bench.latchedCount(0) == 80, "counts down by two")
    bench.clock.set(nanoseconds: PITBench.ns(60))
    #expect(!out())
    #expect(bench.latchedCount(0) == 80)
    bench.clock.set(nanoseconds: PITBench.ns(100))
    bench.pit.poll()
    #expect(out())
    #expect(bench.sink.risingEdges(0) == 1)
  }

  @Test func latchHoldsValueWhileTimeMoves() throws {
    let bench = try PITBench()
    bench.outb(0x43, 0x30)  // channel 0, mode 0
    bench.outb(0x40, 0x00)
    bench.outb(0x40, 0x10)  // 4096
    bench.clock.set(nanoseconds: PITBench.ns(1000))
    bench.outb(0x43, 0x00)  // latch channel 0
    bench.clock.advance(by: 500_000)
    let low = UInt16(bench.inb(0x40))
    let high = UInt16(bench.inb(0x40))
    #expect(low | high << 8 == 3096)
    #expect(bench.latchedCount(0) < 3096, "an unlatched read sees time pass")
  }

  @Test func mode0InterruptOnTerminalCountAndReadBackStatus() throws {
    let bench = try PITBench()
    bench.outb(0x43, 0x30)
    bench.outb(0x43, 0xE2)
    #expect(bench.inb(0x40) == 0x70, "OUT low, null count, lobyte/hibyte, mode 0")
    bench.outb(0x40, 50)
    bench.outb(0x40, 0)
    bench.outb(0x43, 0xE2)
    #expect(bench.inb(0x40) == 0x30, "count loaded")
    bench.clock.set(nanoseconds: PITBench.ns(50))
    bench.pit.poll()
    #expect(bench.sink.risingEdges(0) == 1)
    bench.outb(0x43, 0xE2)
    #expect(bench.inb(0x40) == 0xB0, "OUT high after terminal count")
    bench.clock.advance(by: 1_000_000_000)
    bench.pit.poll()
    #expect(bench.sink.risingEdges(0) == 1, "mode 0 interrupts once")
    #expect(bench.pit.nextDeadline == nil)
  }

  @Test func lowByteOnlyAccessAndReadBackOfCountAndStatus() throws {
    let bench = try PITBench()
    bench.outb(0x43, 0x54)  // channel 1, lobyte only, mode 2
    bench.outb(0x41, 200)
    bench.clock.set(nanoseconds: PITBench.ns(50))
    #expect(bench.inb(0x41) == 150)
    bench.outb(0x43, 0xC4)  // read-back count and status of channel 1
    #expect(bench.inb(0x41) == 0x94, "status first: OUT high, lobyte, mode 2")
    #expect(bench.inb(0x41) == 150)
  }

  @Test func channel2GateAndOutputThroughPort61() throws {
    let bench = try PITBench()
    #expect(bench.inb(0x61) & 0x21 == 0, "gate low, OUT low")
    bench.outb(0x43, 0xB0)  // channel 2, lobyte/hibyte, mode 0
    bench.outb(0x42, 0xE8)
    bench.outb(0x42, 0x03)  // 1000
    bench.clock.advance(by: PITBench.ns(2000))
    #expect(bench.latchedCount(2) == 1000, "gate low holds the count")
    bench.outb(0x61, 0x01)
    #expect(bench.inb(0x61) & 0x01 == 0x01)
    bench.clock.advance(by: PITBench.ns(400))
    #expect(bench.latchedCount(2) == 600)
    bench.outb(0x61, 0x00)
    bench.clock.advance(by: PITBench.ns(5000))
    #expect(bench.latchedCount(2) == 600, "gate low pauses mode 0")
    bench.outb(0x61, 0x01)
    bench.clock.advance(by: PITBench.ns(599))
    #expect(bench.inb(0x61) & 0x20 == 0)
    bench.clock.advance(by: PITBench.ns(1))
    #expect(bench.inb(0x61) & 0x20 == 0x20, "OUT2 high at terminal count")
    #expect(bench.sink.events.isEmpty, "channel 2 raises no interrupt")
  }

  @Test func port61RefreshBitToggles() throws {
    let bench = try PITBench()
    let first = bench.inb(0x61) & 0x10
    bench.clock.advance(by: SystemControlPort.refreshTogglePeriod)
    #expect(bench.inb(0x61) & 0x10 != first)
    bench.outb(0x61, 0x0E)
    #expect(bench.inb(0x61) & 0x0E == 0x0E)
  }

  @Test func mode1OneShotTriggeredByGate() throws {
    let bench = try PITBench()
    bench.outb(0x43, 0xB2)  // channel 2, mode 1
    bench.outb(0x42, 100)
    bench.outb(0x42, 0)
    #expect(bench.inb(0x61) & 0x20 == 0x20, "OUT high until triggered")
    bench.outb(0x61, 0x01)
    bench.clock.advance(by: PITBench.ns(50))
    #expect(bench.inb(0x61) & 0x20 == 0)
    bench.clock.advance(by: PITBench.ns(50))
    #expect(bench.inb(0x61) & 0x20 == 0x20)
  }

  @Test func mode4StrobeFiresOnce() throws {
    let bench = try PITBench()
    bench.outb(0x43, 0x38)  // channel 0, mode 4 (Linux's one-shot clockevent)
    bench.outb(0x40, 0x10)
    bench.outb(0x40, 0x00)
    #expect(bench.pit.nextDeadline == PITBench.ns(16))
    bench.clock.set(nanoseconds: 1_000_000)
    bench.pit.poll()
    bench.pit.poll()
    #expect(bench.sink.risingEdges(0) == 1)
  }

  @Test func pitInterruptReachesCPUThroughIOAPICAndPIC() throws {
    let machine = try Machine()
    machine.initializePICs(masterMask: 0xFE)
    machine.redirect(pin: 2, vector: 0x30)
    machine.outb(0x43, 0x34)
    machine.outb(0x40, 0x9C)
    machine.outb(0x40, 0x2E)  // 11932: 100 Hz
    let deadline = try #require(machine.platform.nextDeadline(cpu: 0))
    machine.clock.set(nanoseconds: deadline)
    machine.platform.poll(cpu: 0, now: machine.clock.nanoseconds)
    // Both controllers saw the edge: IOAPIC vector in the IRR, PIC INTR through LINT0.
    #expect(machine.bsp.highestPendingVector() == 0x30)
    #expect(machine.platform.pic.hasPendingInterrupt)
    #expect(machine.bsp.takeEvent(interruptsEnabled: true) == .interrupt(vector: 0x20), "ExtINT first")
    #expect(machine.bsp.takeEvent(interruptsEnabled: true) == .interrupt(vector: 0x30))
  }
}

@Suite struct ClockTests {
  @Test func conversions() {
    #expect(TimeBase.ticks(nanoseconds: 1_000_000_000, frequency: 1_193_182) == 1_193_182)
    #expect(TimeBase.nanoseconds(ticks: 1_193_182, frequency: 1_193_182) == 1_000_000_000)
    #expect(TimeBase.nanoseconds(ticks: 1, frequency: 1_193_182) == 839)
    #expect(TimeBase.ticks(nanoseconds: 838, frequency: 1_193_182) == 0)
    #expect(TimeBase.ticks(nanoseconds: 839, frequency: 1_193_182) == 1)
    #expect(TimeBase.tsc(atNanoseconds: 123_456) == 123_456)
    #expect(TimeBase.ticks(nanoseconds: UInt64.max, frequency: 3_000_000_000) == UInt64.max)
    #expect(TimeBase.nanoseconds(ticks: UInt64.max, frequency: 1_193_182) == UInt64.max)
  }

  @Test func virtualClockIsMonotonicAndPauses() throws {
    let clock = VirtualClock()
    let first = clock.nanoseconds
    usleep(2_000)
    let second = clock.nanoseconds
    #expect(second > first)
    #expect(second < 10_000_000_000, "time starts near zero")
    clock.pause()
    #expect(clock.isPaused)
    let paused = clock.nanoseconds
    usleep(5_000)
    #expect(clock.nanoseconds == paused)
    clock.resume()
    let resumed = clock.nanoseconds
    #expect(resumed >= paused && resumed < paused + 4_000_000, "no jump over the pause")
    #expect(clock.tsc >= resumed)
  }
}
