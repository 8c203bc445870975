import Foundation
import Testing
import VMCore

@testable import VMM

/// A Multiboot guest that counts forever: each iteration increments the 32-bit counter at
/// 0x6000 and stores the TSC at 0x6008.
let countingGuest =
  multibootPrologue + """
    _start:
            xorl %ebx, %ebx
    again:  incl %ebx
            movl %ebx, 0x6000
            rdtsc
            movl %eax, 0x6008
            movl %edx, 0x600C
            jmp again

    """

@Suite("Pause and resume through the control interface", .serialized)
struct PauseResumeTests {
  let scratch: ScratchDirectory
  let kernel: String

  init() throws {
    scratch = try ScratchDirectory()
    kernel = try assembleGuest(countingGuest, in: scratch)
  }

  func startController(_ accelerator: AcceleratorChoice) throws -> VMController {
    let controller = VMController(id: "pause-test")
    try controller.configure { spec throws(ControlError) in
      spec.kernelPath = kernel
      spec.memoryMiB = 32
      spec.accelerator = accelerator
      spec.serial = .none
    }
    try controller.start()
    return controller
  }

  func counter(_ controller: VMController) throws -> UInt32 {
    try controller.machine!.parts.memory.read(UInt32.self, at: 0x6000)
  }

  func guestTSC(_ controller: VMController) throws -> UInt64 {
    try controller.machine!.parts.memory.read(UInt64.self, at: 0x6008)
  }

  /// Waits until the guest's counter passes `value` (the guest is running).
  func waitForProgress(_ controller: VMController, beyond value: UInt32) throws {
    let deadline = Date().addingTimeInterval(20)
    while try counter(controller) <= value {
      guard Date() < deadline else {
        Issue.record("the guest's counter did not move past \(value)")
        return
      }
      usleep(1000)
    }
  }

  func pauseStopsTheGuestAndResumeContinuesIt(_ accelerator: AcceleratorChoice) throws {
    let controller = try startController(accelerator)
    defer { try? controller.shutdown() }
    try waitForProgress(controller, beyond: 0)
    try controller.pause()
    #expect(controller.lifecycle == .paused)
    let paused = try counter(controller)
    usleep(200_000)
    #expect(try counter(controller) == paused, "the counter moved while paused")
    try controller.resume()
    #expect(controller.lifecycle == .running)
    try waitForProgress(controller, beyond: paused)
    try controller.shutdown()
    #expect(controller.lifecycle == .shutDown)
    #expect(controller.stopReason == .stopRequested)
  }

  @Test func softwareCPUPausesAndResumes() throws {
    try pauseStopsTheGuestAndResumeContinuesIt(.soft)
  }

  @Test func kvmPausesAndResumes() throws {
    try pauseStopsTheGuestAndResumeContinuesIt(.kvm)
  }

  /// The software CPU's clock stops while paused: the guest's TSC advances by about the time
  /// it ran, not by the second it spent paused.
  @Test func guestTimeDoesNotAdvanceWhilePaused() throws {
    let controller = try startController(.soft)
    defer { try? controller.shutdown() }
    try waitForProgress(controller, beyond: 0)
    try controller.pause()
    let before = try guestTSC(controller)
    usleep(1_000_000)
    #expect(try guestTSC(controller) == before)
    try controller.resume()
    let resumedAt = Date()
    try waitForProgress(controller, beyond: counter(controller) + 1000)
    try controller.pause()
    let ranFor = Date().timeIntervalSince(resumedAt)
    let advanced = try guestTSC(controller) &- before
    // The virtual TSC runs at 1 GHz: it may advance by the time the guest ran (plus slack
    // for scheduling), never by the paused second.
    #expect(Double(advanced) < (ranFor + 0.25) * 1e9, "guest TSC advanced \(advanced) ticks in \(ranFor) s of running")
    try controller.resume()
  }

  /// Many pause/resume cycles in a row neither hang nor lose the guest.
  @Test(arguments: [AcceleratorChoice.soft, .kvm])
  func manyPauseResumeCycles(_ accelerator: AcceleratorChoice) throws {
    let controller = try startController(accelerator)
    defer { try? controller.shutdown() }
    try waitForProgress(controller, beyond: 0)
    for _ in 0..<1000 {
      try controller.pause()
      try controller.resume()
    }
    let value = try counter(controller)
    try waitForProgress(controller, beyond: value)
    #expect(controller.lifecycle == .running)
  }

  @Test func illegalTransitionsAreRefused() throws {
    let controller = VMController()
    #expect(throws: ControlError.self) { try controller.pause() }
    #expect(throws: ControlError.self) { try controller.resume() }
    // No boot source yet.
    #expect(
      throws: ControlError(.invalidArgument, "cannot start the machine: no boot source (kernel image) is configured")
    ) {
      try controller.start()
    }
    let running = try startController(.soft)
    defer { try? running.shutdown() }
    #expect(throws: ControlError.self) { try running.resume() }
    #expect(throws: ControlError.self) { try running.start() }
    #expect(throws: ControlError.self) {
      try running.configure { spec throws(ControlError) in spec.vcpuCount = 2 }
    }
    try running.shutdown()
    #expect(throws: ControlError.self) { try running.pause() }
  }
}
