import Synchronization
import Testing
import VMCore

/// Records interrupt line changes in order.
final class RecordingSink: InterruptSink {
  private let log = Mutex<[String]>([])
  func setInterruptLevel(line: UInt32, level: Bool) { log.withLock { $0.append("\(line)=\(level ? 1 : 0)") } }
  var changes: [String] { log.withLock { $0 } }
}

@Suite struct MachineStopReasonTests {
  @Test func exitStatusFollowsTheDebugExitConvention() {
    #expect(MachineStopReason.debugExit(value: 0).exitStatus == 1)
    #expect(MachineStopReason.debugExit(value: 1).exitStatus == 3)
    #expect(MachineStopReason.debugExit(value: 0x7F).exitStatus == 0xFF)
    #expect(MachineStopReason.debugExit(value: 0x80).exitStatus == 1)  // (0x80 << 1 | 1) & 0xFF
    #expect(MachineStopReason.debugExit(value: 0xFFFF_FFFF).exitStatus == 0xFF)
    #expect(MachineStopReason.powerOff.exitStatus == 0)
    #expect(MachineStopReason.reset(reason: "triple fault").exitStatus == 0)
    #expect(MachineStopReason.stopRequested.exitStatus == 0)
    #expect(MachineStopReason.failure("boom").exitStatus == 1)
    // Even: no debug-exit status ((value << 1) | 1) can be mistaken for a triple fault.
    #expect(MachineStopReason.tripleFault(vector: 13, rip: 0x1000).exitStatus == 2)
    #expect(MachineStopReason.tripleFault(vector: nil, rip: 0).exitStatus == 2)
  }

  @Test func aTripleFaultNamesItsExceptionAndRIP() {
    #expect(
      MachineStopReason.tripleFault(vector: 13, rip: 0x10_2345).description
        == "triple fault: #GP (vector 13) at RIP 0x102345")
    #expect(MachineStopReason.tripleFault(vector: nil, rip: 0x8006).description == "triple fault at RIP 0x8006")
  }

  @Test func descriptionsSayWhatHappened() {
    #expect(MachineStopReason.debugExit(value: 5).description == "guest wrote 5 to the debug-exit port")
    #expect(MachineStopReason.reset(reason: "i8042").description == "guest reset (i8042)")
    #expect(MachineStopReason.failure("KVM_RUN failed").description == "KVM_RUN failed")
    #expect(MachineStopReason.powerOff.description == "guest powered off")
  }
}

@Suite struct MachineControlTests {
  @Test func theFirstStopReasonWinsAndEveryRequestKicks() {
    let control = MachineControl()
    let kicks = Atomic<Int>(0)
    control.addKick { kicks.add(1, ordering: .relaxed) }
    control.addKick { kicks.add(10, ordering: .relaxed) }
    #expect(!control.isStopping && control.stopReason == nil)
    control.requestStop(.powerOff)
    #expect(control.isStopping && control.stopReason == .powerOff)
    #expect(kicks.load(ordering: .relaxed) == 11)
    control.requestStop(.failure("later"))
    #expect(control.stopReason == .powerOff)
    #expect(kicks.load(ordering: .relaxed) == 22)
  }

  @Test func concurrentRequestsKeepExactlyOneReason() async {
    let control = MachineControl()
    await withTaskGroup(of: Void.self) { group in
      for value in 0..<16 { group.addTask { control.requestStop(.debugExit(value: UInt32(value))) } }
    }
    guard case .debugExit(let value) = control.stopReason else {
      Issue.record("no debug-exit reason recorded")
      return
    }
    #expect(value < 16)
  }
}

@Suite struct InterruptRoutingTests {
  @Test func theRouterDropsChangesUntilASinkIsAttached() {
    let router = InterruptRouter()
    router.setInterruptLevel(line: 4, level: true)
    let sink = RecordingSink()
    router.attach(sink)
    router.setInterruptLevel(line: 4, level: false)
    router.setInterruptLevel(line: 20, level: true)
    #expect(sink.changes == ["4=0", "20=1"])
  }

  @Test func aLineSetsAndPulsesItsGSI() {
    let sink = RecordingSink()
    let line = InterruptLine(router: sink, line: 9)
    line.set(true)
    line.set(false)
    line.pulse()
    #expect(sink.changes == ["9=1", "9=0", "9=1", "9=0"])
  }
}

@Suite struct CPUStateTests {
  @Test func theDefaultStateIsTheResetVectorInRealMode() {
    let state = X86CPUState()
    #expect(state.rip == 0xFFF0 && state.rflags == 0x2)
    #expect(state.cr0 & X86.cr0PE == 0)
    #expect(state.cs.base == 0 && state.cs.limit == 0xFFFF && state.cs.type == 0xB)
    #expect(state.apicBase == 0xFEE0_0900)
  }

  @Test func realModeSegmentsBaseIsTheSelectorTimesSixteen() {
    let segment = SegmentRegister.realMode(selector: 0xF000, code: true)
    #expect(segment.base == 0xF_0000 && segment.limit == 0xFFFF && segment.type == 0xB)
    #expect(SegmentRegister.realMode(selector: 0x1234).base == 0x1_2340)
    #expect(SegmentRegister.realMode(selector: 0x1234).type == 0x3)
  }

  @Test func flatSegments() {
    let code64 = SegmentRegister.flatCode(selector: 0x10, long: true)
    #expect(code64.l && !code64.db && code64.g && code64.limit == 0xFFFF_FFFF && code64.type == 0xB)
    let code32 = SegmentRegister.flatCode(selector: 0x08, long: false)
    #expect(!code32.l && code32.db)
    let data = SegmentRegister.flatData(selector: 0x18)
    #expect(data.selector == 0x18 && data.db && data.type == 0x3 && data.base == 0)
  }

  @Test func gprsUseTheEncodingOrder() {
    var state = X86CPUState()
    state.gprs = (0..<16).map { UInt64($0) }
    #expect([state.rax, state.rcx, state.rdx, state.rbx, state.rsp, state.rbp, state.rsi, state.rdi] == Array(0..<8))
    #expect([state.r8, state.r9, state.r10, state.r11, state.r12, state.r13, state.r14, state.r15] == Array(8..<16))
    state.rbx = 99
    #expect(state.gprs[3] == 99)
  }
}

@Suite struct MachinePartsTests {
  @Test func partsKeepTheObjectsTheyWereGiven() throws {
    let memory = try GuestMemory(size: 1 << 20)
    let bus = IOBus()
    let control = MachineControl()
    let interrupts = InterruptRouter()
    let parts = MachineParts(memory: memory, bus: bus, control: control, interrupts: interrupts)
    #expect(parts.memory === memory && parts.bus === bus)
    #expect(parts.control === control && parts.interrupts === interrupts)
  }
}
