import Foundation
import KVMBackend
import Synchronization
import Testing
import VMCore

/// KVM machine state: captured from a paused machine and applied to a new one.
@Suite(.serialized, .enabled(if: kvmAvailable, "needs /dev/kvm"))
struct KVMStateTests {
  /// A machine whose run loop is on its own thread; `finish` waits for the stop reason.
  final class RunningMachine: Sendable {
    let machine: TestMachine
    private let outcome = Outcome()

    final class Outcome: Sendable {
      let done = DispatchSemaphore(value: 0)
      let reason = Mutex<MachineStopReason?>(nil)
    }

    init(_ machine: TestMachine, boot: X86CPUState) {
      self.machine = machine
      let accelerator = machine.accelerator
      let outcome = self.outcome
      let thread = Thread {
        let stop = try? accelerator.run(bootState: boot)
        outcome.reason.withLock { $0 = stop }
        outcome.done.signal()
      }
      thread.start()
    }

    func finish(timeout: TimeInterval = 120) -> MachineStopReason? {
      guard outcome.done.wait(timeout: .now() + timeout) == .success else {
        machine.control.requestStop(.failure("test timed out"))
        _ = outcome.done.wait(timeout: .now() + 5)
        return nil
      }
      return outcome.reason.withLock { $0 }
    }

    /// Waits until the guest has made `reports` reports, pauses the machine, takes its KVM
    /// state, RAM and counter position, and stops it.
    func snapshot(after reports: Int) throws -> (state: KVMMachineState, memory: [UInt8], counterReads: UInt32) {
      let deadline = Date().addingTimeInterval(60)
      while machine.report.values.count < reports {
        guard Date() < deadline else { throw KVMError.machineRunning }
        usleep(500)
      }
      try machine.accelerator.pause()
      let state = try machine.accelerator.captureState()
      let memory = try machine.memory.readBytes(at: 0, count: Int(machine.memory.totalSize))
      let next = machine.counter.portRead(port: 0x518, size: 4) / 0x0101
      machine.control.requestStop(.stopRequested)
      _ = finish()
      return (state, memory, next - 1)
    }
  }

  /// A new machine holding a snapshot: RAM, KVM state, and its counter device advanced to
  /// where the old one was.
  func restoredMachine(_ snapshot: (state: KVMMachineState, memory: [UInt8], counterReads: UInt32)) throws
    -> TestMachine
  {
    let machine = try TestMachine()
    try machine.memory.writeBytes(snapshot.memory, at: 0)
    try machine.accelerator.applyState(snapshot.state)
    for _ in 0..<snapshot.counterReads { _ = machine.counter.portRead(port: 0x518, size: 4) }
    return machine
  }

  /// A guest paused and moved to a new KVM machine three times in a row (each time wherever
  /// it was: often just after a port read KVM had not completed yet) reports exactly what an
  /// uninterrupted run reports, and exits the same way.
  @Test func guestMovedThroughSnapshotsReportsLikeAnUninterruptedRun() throws {
    let reference = try TestMachine()
    try reference.load("state_counter32", at: 0x8000)
    let expectedReason = try reference.run(BootStates.protectedMode32(entry: 0x8000), timeout: 120)
    let expected = reference.report.values
    #expect(expected.count == 30000)

    var reports: [UInt32] = []
    let first = try TestMachine()
    try first.load("state_counter32", at: 0x8000)
    // The boot state only matters for the first machine; restored ones ignore it.
    let boot = BootStates.protectedMode32(entry: 0x8000)
    var running = RunningMachine(first, boot: boot)
    for threshold in [3000, 9000, 15000] {
      let snapshot = try running.snapshot(after: threshold)
      reports += running.machine.report.values
      #expect(snapshot.state.vcpus.count == 1)
      running = RunningMachine(try restoredMachine(snapshot), boot: BootStates.realMode(segment: 0))
    }
    let reason = running.finish()
    reports += running.machine.report.values
    #expect(reason == expectedReason)
    #expect(reports.count == expected.count)
    let firstDifference = zip(reports, expected).enumerated().first { $0.element.0 != $0.element.1 }?.offset
    #expect(firstDifference == nil, "the reports differ from report \(firstDifference ?? 0) on")
  }

  /// A state with the wrong vCPU count is refused before anything is applied.
  @Test func stateForAnotherMachineShapeIsRefused() throws {
    let source = try TestMachine()
    let state = try source.accelerator.captureState()
    let target = try TestMachine(cpuCount: 2)
    #expect(throws: MachineStateError.self) { try target.accelerator.applyState(state) }
    var writer = StateWriter()
    state.save(into: &writer)
    var truncated = StateReader(bytes: Array(writer.bytes.dropLast(10)))
    let fresh = try TestMachine()
    #expect(throws: MachineStateError.self) { try fresh.accelerator.restoreState(from: &truncated) }
  }
}

/// Dirty-page logging on KVM: the guest's stores and the host's writes.
@Suite(.serialized, .enabled(if: kvmAvailable, "needs /dev/kvm"))
struct KVMDirtyLogTests {
  @Test func guestAndHostWritesAreLoggedOnceEach() throws {
    let machine = try TestMachine()
    try machine.load("dirty_pages32", at: 0x8000)
    try machine.accelerator.startDirtyLogging()
    #expect(try machine.accelerator.takeDirtyPages().isEmpty)

    #expect(try machine.run(BootStates.protectedMode32(entry: 0x8000)) == .debugExit(value: 0))
    let guestPages = try machine.accelerator.takeDirtyPages()
    #expect(guestPages.contains(0x20))
    #expect(guestPages.contains(0x35))
    #expect(!guestPages.contains(0x40), "a page the guest only read is logged")
    #expect(guestPages.count < 8, "unexpected pages \(guestPages)")

    try machine.memory.write(UInt32(0xABCD), at: 0x5_0FFE)
    #expect(try machine.accelerator.takeDirtyPages() == [0x50, 0x51])
    #expect(try machine.accelerator.takeDirtyPages().isEmpty)
  }
}
