import Foundation
import KVMBackend
import Testing
import VMCore

/// Real guests on real KVM. Serialized: the host has two cores and ring-0 guest code is
/// emulated, so running these one at a time keeps each one's timing predictable.
@Suite(.serialized, .enabled(if: kvmAvailable, "needs /dev/kvm"))
struct KVMGuestTests {
  @Test func realModeGuestTextReachesTheHost() throws {
    let machine = try TestMachine()
    // Linked at 0 (offsets within CS); loaded at linear 0x8000 = segment 0x0800.
    try machine.memory.writeBytes(try GuestAssembler.assemble("real_mode_serial", linkAddress: 0), at: 0x8000)

    let reason = try machine.run(BootStates.realMode(segment: 0x0800))

    #expect(reason == .debugExit(value: 7))
    let greeting = "Hello from a real-mode KVM guest\n"
    let line = "rep outsb moves a whole string per exit\n"
    #expect(machine.serial.text == greeting + line)
    // Every byte arrived, each exactly once, in order, whatever the batching of REP OUTSB.
    #expect(machine.serial.captured.count == greeting.utf8.count + line.utf8.count)
    let statistics = machine.accelerator.exitStatistics
    #expect(statistics.portIO >= UInt64(greeting.utf8.count) + 2)
    #expect(statistics.total >= statistics.portIO)
  }

  @Test func debugExitValueIsReturnedAndStateIsReadable() throws {
    let machine = try TestMachine()
    try machine.load("debug_exit32", at: 0x8000)

    let reason = try machine.run(BootStates.protectedMode32(entry: 0x8000))

    #expect(reason == .debugExit(value: 42))
    #expect(reason?.exitStatus == 85)
    let state = try machine.accelerator.cpuState(cpu: 0)
    #expect(state.rbx == 0xCAFE_BABE)
    #expect(state.rax == 42)
    #expect(state.cs.selector == 0x08)
    #expect(state.cr0 & X86.cr0PE != 0)
    #expect(machine.accelerator.exitCount >= 1)
    #expect(throws: KVMError.alreadyStarted) {
      try machine.accelerator.run(bootState: BootStates.protectedMode32(entry: 0x8000))
    }
  }

  @Test func portInputOutputHonoursSizeCountAndDirection() throws {
    let machine = try TestMachine()
    try machine.load("port_io32", at: 0x8000)

    let reason = try machine.run(BootStates.protectedMode32(entry: 0x8000))

    #expect(reason == .debugExit(value: 0))
    #expect(machine.report.values == [0xD4, 0xC3D4, 0xA1B2_C3D4])
    let expectedWrites: [WriteRecorder.Write] = [
      .init(size: 1, value: 0x5A), .init(size: 2, value: 0xBEEF), .init(size: 4, value: 0x0123_4567),
      // REP INSW stored the counter's words in guest memory; REP OUTSW sent them back.
      .init(size: 2, value: 0x0101), .init(size: 2, value: 0x0202), .init(size: 2, value: 0x0303),
      .init(size: 2, value: 0x0404),
    ]
    #expect(machine.recorder.recorded == expectedWrites)
  }

  @Test func mmioWriteThenReadRoundTrip() throws {
    let machine = try TestMachine()
    try machine.load("mmio32", at: 0x8000)

    let reason = try machine.run(BootStates.protectedMode32(entry: 0x8000))

    #expect(reason == .debugExit(value: 0))
    #expect(machine.report.values == [0x7856_3412, 0xAB, 0xBEEF])
    let accesses: [TransformingMMIODevice.Access] = [
      .init(write: true, offset: 0, size: 4, value: 0x1234_5678),
      .init(write: false, offset: 4, size: 4, value: 0x7856_3412),
      .init(write: true, offset: 8, size: 1, value: 0xAB),
      .init(write: false, offset: 8, size: 1, value: 0xAB),
      .init(write: false, offset: 0xA, size: 2, value: 0xBEEF),
    ]
    #expect(machine.mmio.accesses == accesses)
    #expect(machine.accelerator.exitStatistics.mmio == 5)
  }

  @Test func longModeGuestStartsAsTheLinuxBootProtocolSays() throws {
    let machine = try TestMachine()
    let bootParams: UInt64 = 0x7000
    try machine.memory.fill(0, at: bootParams, length: 0x1000)
    try machine.memory.write(UInt16(0xAA55), at: bootParams + 0x1FE)
    try machine.load("long_mode64", at: 0x10_0000)
    let state = try BootStates.linux64(
      entry: 0x10_0000, bootParams: bootParams, stack: 0x9_0000, memory: machine.memory)

    let reason = try machine.run(state)

    #expect(reason == .debugExit(value: 0x64))
    let reported = machine.report.values
    try #require(reported.count == 12, "reports: \(reported.map { String($0, radix: 16) })")
    #expect(reported[0] == 0x7000)  // RSI low
    #expect(reported[1] == 0)  // RSI high
    #expect(reported[2] == 0xAA55)  // boot_params.hdr.boot_flag
    #expect(reported[3] == 0x10)  // CS
    #expect(reported[4] == 0x18)  // DS
    #expect(reported[5] == 0x18)  // SS
    #expect(UInt64(reported[6]) & (X86.eferLME | X86.eferLMA) == X86.eferLME | X86.eferLMA)
    #expect(UInt64(reported[7]) & (X86.cr0PE | X86.cr0PG) == X86.cr0PE | X86.cr0PG)
    #expect(UInt64(reported[8]) & X86.cr4PAE != 0)
    #expect(reported[9] == 0x4433_2211)  // 8-byte MMIO read back byte-swapped: low half
    #expect(reported[10] == 0x8877_6655)  // high half
    #expect(reported[11] == 0x77)  // push/pop through the stack
    #expect(
      machine.mmio.accesses.first == .init(write: true, offset: 0x10, size: 8, value: 0x1122_3344_5566_7788))
  }

  @Test func tripleFaultStopsTheMachineWithItsRIP() throws {
    let machine = try TestMachine()
    try machine.load("triple_fault_ud2_32", at: 0x8000)

    let reason = try machine.run(BootStates.protectedMode32(entry: 0x8000))

    guard case .tripleFault(let vector, let rip) = reason else {
      Issue.record("expected a triple fault, got \(reason)")
      return
    }
    #expect(vector == nil)  // KVM does not report the exception
    #expect(rip >= 0x8000 && rip < 0x8100, "RIP \(rip) is not in the guest's code")
    #expect(reason?.exitStatus == 2)
    #expect(machine.report.values.isEmpty)
  }

  /// Empty IDT + INT3 triple-faults on a normal KVM host. The nested, PVM-based KVM of the
  /// development machine cannot emulate a ring-0 INT3 and reports KVM_INTERNAL_ERROR_EMULATION
  /// instead: then the stop reason must be a failure carrying the suberror and register dump.
  @Test func breakpointWithEmptyIDTResetsOrReportsTheEmulationFailure() throws {
    let machine = try TestMachine()
    try machine.load("triple_fault_int3_32", at: 0x8000)

    let reason = try machine.run(BootStates.protectedMode32(entry: 0x8000))

    if FileManager.default.fileExists(atPath: "/sys/module/kvm_pvm") {
      guard case .failure(let message) = reason else {
        Issue.record("expected an emulation failure on PVM, got \(String(describing: reason))")
        return
      }
      #expect(message.hasPrefix("KVM internal error (suberror 1: instruction emulation failed"))
      for field in ["rip=0x8007", "rsp=0x7000", "cr0=0x31", "cr3=0x0", "cr4=0x0", "efer=0x0", "cs=0x8"] {
        #expect(message.contains(field), "missing \(field) in: \(message)")
      }
      #expect(!message.contains("\n"))
    } else {
      guard case .tripleFault = reason else {
        Issue.record("expected a triple fault, got \(reason)")
        return
      }
    }
  }

  @Test func stopFromAnotherThreadInterruptsASpinningGuest() throws {
    let machine = try TestMachine()
    try machine.load("spin32", at: 0x8000)
    let control = machine.control
    let stopper = Thread {
      Thread.sleep(forTimeInterval: 0.3)
      control.requestStop(.stopRequested)
    }
    let start = Date()
    stopper.start()

    let reason = try machine.run(BootStates.protectedMode32(entry: 0x8000), timeout: 20)

    #expect(reason == .stopRequested)
    let elapsed = Date().timeIntervalSince(start)
    #expect(elapsed >= 0.25)
    #expect(elapsed < 10)
    let state = try machine.accelerator.cpuState(cpu: 0)
    #expect(state.rip == 0x8000)
  }

  @Test func secondCPUStartsOnSIPIWithItsOwnAPICID() throws {
    let machine = try TestMachine(cpuCount: 2)
    try machine.load("smp32", at: 0x8000)

    let reason = try machine.run(BootStates.protectedMode32(entry: 0x8000))

    #expect(reason == .debugExit(value: 0))
    // The AP reports its APIC ID first, then the BSP: APIC ID, hypervisor bit, logical
    // processor count, and the APIC ID the AP stored in memory.
    #expect(machine.report.values == [1, 0, 1, 2, 1])
    // The halted AP was kicked out of the kernel too: run() returned with both threads joined.
    let ap = try machine.accelerator.cpuState(cpu: 1)
    #expect(ap.cs.selector == 0x0900)
    #expect(try machine.accelerator.cpuidEntries(cpu: 1).contains { $0.function == 1 && $0.ebx >> 24 == 1 })
  }

  @Test func interruptLineRaisedFromAnotherThreadReachesTheGuest() throws {
    let machine = try TestMachine()
    try machine.load("interrupt32", at: 0x8000)
    let ready = machine.readyFlag.ready
    let interrupts = machine.parts.interrupts
    let injector = Thread {
      guard ready.wait(timeout: .now() + 20) == .success else { return }
      InterruptLine(router: interrupts, line: 5).pulse()
    }
    injector.start()

    let reason = try machine.run(BootStates.protectedMode32(entry: 0x8000, stack: 0x7000))

    #expect(reason == .debugExit(value: 0))
    #expect(machine.report.values == [0x25])
  }
}
