import Synchronization
import Testing
import VMCore

@testable import Firmware

final class LineRecorder: InterruptSink {
  private let levels = Mutex<[UInt32: Bool]>([:])
  private let changes = Mutex(0)
  func setInterruptLevel(line: UInt32, level: Bool) {
    levels.withLock { $0[line] = level }
    changes.withLock { $0 += 1 }
  }
  func level(_ line: UInt32) -> Bool { levels.withLock { $0[line] ?? false } }
}

final class FakeTime: Sendable {
  let now = Atomic<UInt64>(0)
}

struct PMBench {
  let bus = IOBus()
  let control = MachineControl()
  let sink = LineRecorder()
  let time = FakeTime()
  let pm: ACPIPowerManagement
  let reset: ACPIResetRegister

  init() throws {
    let time = self.time
    pm = ACPIPowerManagement(
      control: control, sci: InterruptLine(router: sink, line: 9), nanoseconds: { time.now.load(ordering: .relaxed) })
    reset = ACPIResetRegister(control: control)
    try pm.register(on: bus)
    try reset.register(on: bus)
  }
}

@Suite struct PowerManagementTests {
  @Test func s5WriteToPM1aControlPowersOff() throws {
    let bench = try PMBench()
    #expect(bench.bus.portRead(0x604, size: 2) & 1 == 1, "SCI_EN reads as set")
    // Another sleep type (Linux never writes one we do not advertise) does nothing.
    bench.bus.portWrite(0x604, size: 2, value: (1 << 10) | (1 << 13) | 1)
    #expect(bench.control.stopReason == nil)
    // SLP_TYP without SLP_EN does nothing either.
    bench.bus.portWrite(0x604, size: 2, value: UInt32(ACPIPowerManagement.s5SleepType) << 10 | 1)
    #expect(bench.control.stopReason == nil)
    #expect(bench.bus.portRead(0x604, size: 2) == UInt32(ACPIPowerManagement.s5SleepType) << 10 | 1)
    bench.bus.portWrite(0x604, size: 2, value: UInt32(ACPIPowerManagement.s5SleepType) << 10 | (1 << 13) | 1)
    #expect(bench.control.stopReason == .powerOff)
  }

  @Test func s5ThroughByteWriteOfHighHalf() throws {
    let bench = try PMBench()
    bench.bus.portWrite(0x605, size: 1, value: (UInt32(ACPIPowerManagement.s5SleepType) << 2) | 0x20)
    #expect(bench.control.stopReason == .powerOff)
  }

  @Test func pmTimerRunsAt3579545Hz() throws {
    let bench = try PMBench()
    #expect(bench.bus.portRead(0x608, size: 4) == 0)
    bench.time.now.store(1_000_000_000, ordering: .relaxed)
    #expect(bench.bus.portRead(0x608, size: 4) == 3_579_545)
    #expect(bench.bus.portRead(0x608, size: 1) == 3_579_545 & 0xFF)
    bench.time.now.store(1_200_000_000_000, ordering: .relaxed)
    #expect(
      bench.bus.portRead(0x608, size: 4) == UInt32(truncatingIfNeeded: UInt64(3_579_545) * 1200), "wraps at 32 bits")
  }

  @Test func powerButtonRaisesSCIWhenEnabledAndStatusIsWriteOneToClear() throws {
    let bench = try PMBench()
    bench.pm.pressPowerButton()
    #expect(bench.bus.portRead(0x600, size: 2) & 0x100 != 0)
    #expect(!bench.sink.level(9), "not enabled yet")
    bench.bus.portWrite(0x602, size: 2, value: 0x100)
    #expect(bench.sink.level(9))
    #expect(bench.bus.portRead(0x600, size: 4) == 0x0100_0100, "status | enable << 16")
    bench.bus.portWrite(0x600, size: 2, value: 0x0001)
    #expect(bench.sink.level(9), "writing zero to PWRBTN_STS keeps it")
    bench.bus.portWrite(0x600, size: 2, value: 0x0100)
    #expect(!bench.sink.level(9))
    #expect(bench.bus.portRead(0x600, size: 2) == 0)
  }

  @Test func resetRegisterResets() throws {
    let bench = try PMBench()
    bench.bus.portWrite(0xCF9, size: 1, value: 0x02)
    #expect(bench.control.stopReason == nil)
    bench.bus.portWrite(0xCF9, size: 1, value: UInt32(ACPIResetRegister.resetValue))
    guard case .reset = bench.control.stopReason else {
      Issue.record("expected a reset, got \(String(describing: bench.control.stopReason))")
      return
    }
  }
}
