import Foundation
import Testing
import VMCore

@testable import VMM

/// A Multiboot guest that dirties a 32 MiB window (8-40 MiB) in a tight loop: one 32-bit store
/// every 64 bytes, the pass number at 0x6000.
let dirtyingGuest =
  multibootPrologue + """
    _start:
            xorl %ecx, %ecx
    pass:   incl %ecx
            movl %ecx, 0x6000
            movl $0x800000, %edi
    store:  movl %ecx, (%edi)
            addl $64, %edi
            cmpl $0x2800000, %edi
            jb store
            jmp pass

    """

/// Live migration's auto-converge: the vCPU throttle itself on both accelerators, and a guest
/// that dirties its window faster than a slow link sends it, which only converges before the
/// round cap when its vCPUs are throttled.
@Suite("Live migration auto-converge", .serialized)
struct AutoConvergeTests {
  let scratch: ScratchDirectory
  let kernel: String
  /// `countingGuest` (PauseResumeTests): its count at 0x6000 measures how fast the vCPU runs.
  let countingKernel: String
  let countingScratch: ScratchDirectory

  init() throws {
    scratch = try ScratchDirectory()
    kernel = try assembleGuest(dirtyingGuest, in: scratch)
    countingScratch = try ScratchDirectory()
    countingKernel = try assembleGuest(countingGuest, in: countingScratch)
  }

  /// A destination that speaks the migration protocol and reads about 50 MiB/s (it sleeps
  /// 20 ms after each message of up to 256 pages); it confirms the state without running it.
  final class SlowDestination: Sendable {
    let address: MigrationAddress

    init(path: String) {
      address = .unix(path: path)
      Thread { [self] in serve() }.start()
    }

    private func serve() {
      guard let channel = try? address.acceptOne() else { return }
      channel.setTimeout(seconds: 60)
      do {
        _ = try channel.receive(.hello)
        try channel.send(.accept)
        while true {
          let (type, _) = try channel.receive()
          if type == .pages {
            usleep(20_000)
          } else if type == .state {
            try channel.send(.resumed)
            return
          }
        }
      } catch {
        return
      }
    }
  }

  func startController(_ accelerator: AcceleratorChoice, kernel: String? = nil) throws -> VMController {
    let controller = VMController(id: "auto-converge")
    let kernel = kernel ?? self.kernel
    try controller.configure { spec throws(ControlError) in
      spec.kernelPath = kernel
      spec.memoryMiB = 64
      spec.accelerator = accelerator
      spec.serial = .none
    }
    try controller.start()
    return controller
  }

  func passes(_ controller: VMController) throws -> UInt32 {
    try controller.machine!.parts.memory.read(UInt32.self, at: 0x6000)
  }

  /// Guest passes over the window (or counts of `countingGuest`) during `seconds`.
  func progress(_ controller: VMController, seconds: Double) throws -> UInt32 {
    let start = try passes(controller)
    usleep(UInt32(seconds * 1_000_000))
    return try passes(controller) &- start
  }

  func throttleSlowsTheGuest(_ accelerator: AcceleratorChoice) throws {
    let controller = try startController(accelerator, kernel: countingKernel)
    defer { try? controller.shutdown() }
    let deadline = Date().addingTimeInterval(20)
    while try passes(controller) < 2 && Date() < deadline { usleep(1000) }
    let control = controller.machine!.parts.control
    let fullSpeed = try progress(controller, seconds: 1)
    control.setThrottle(percent: 80)
    usleep(50_000)
    let throttled = try progress(controller, seconds: 1)
    print(
      "\(accelerator): \(fullSpeed) counts/s at full speed, \(throttled) with an 80 % throttle "
        + "(\(controller.lifecycle), \(String(describing: controller.stopReason)))")
    // A pause does not wait for the throttle's sleeps; lifting the throttle restores the speed.
    let pauseStarted = Date()
    try controller.pause()
    #expect(Date().timeIntervalSince(pauseStarted) < 0.5)
    try controller.resume()
    control.setThrottle(percent: 0)
    usleep(50_000)
    let again = try progress(controller, seconds: 1)
    #expect(Double(again) > Double(throttled) * 1.5, "\(throttled) -> \(again) after lifting the throttle")
    // Running 20 % of the time: well under half the full speed, but not stopped. The full
    // speed is the better of the seconds before and after (a loaded host's share varies).
    let reference = max(fullSpeed, again)
    #expect(reference > 1000, "the guest hardly ran (\(fullSpeed), \(again) counts)")
    #expect(throttled > 0)
    #expect(Double(throttled) < Double(reference) * 0.5, "\(fullSpeed), \(again) -> \(throttled)")
  }

  @Test func throttleSlowsTheSoftwareCPU() throws {
    try throttleSlowsTheGuest(.soft)
  }

  @Test(.enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
  func throttleSlowsKVMVCPUs() throws {
    try throttleSlowsTheGuest(.kvm)
  }

  func migrate(autoConverge: Bool, socket: String) throws -> MigrationStatistics {
    let controller = try startController(.soft)
    defer { try? controller.shutdown() }
    let deadline = Date().addingTimeInterval(20)
    while try passes(controller) < 2 && Date() < deadline { usleep(1000) }
    _ = SlowDestination(path: scratch.path(socket))
    let listening = Date().addingTimeInterval(20)
    while !FileManager.default.fileExists(atPath: scratch.path(socket)) && Date() < listening { usleep(10_000) }
    let statistics = try controller.sendMigration(
      to: "unix:" + scratch.path(socket), downtimeLimitMilliseconds: 500, autoConverge: autoConverge)
    print("auto-converge \(autoConverge ? "on" : "off"): \(statistics)")
    #expect(controller.machine?.parts.control.throttle.percent ?? 0 == 0)
    return statistics
  }

  @Test func aGuestDirtyingFasterThanTheLinkConvergesWithAutoConverge() throws {
    let throttled = try migrate(autoConverge: true, socket: "on.sock")
    // The pre-copy rounds ended because the rest fit the downtime limit, not at the cap.
    #expect(throttled.rounds <= VMController.maximumMigrationRounds, "\(throttled)")
    #expect(throttled.throttlePercent >= AutoConverge.initialPercent, "\(throttled)")
    // The same guest without auto-converge runs into the round cap (and the final round then
    // sends the whole window while paused).
    let unthrottled = try migrate(autoConverge: false, socket: "off.sock")
    #expect(unthrottled.rounds > VMController.maximumMigrationRounds, "\(unthrottled)")
    #expect(unthrottled.throttlePercent == 0)
    #expect(throttled.downtimeNanoseconds < unthrottled.downtimeNanoseconds, "\(throttled) vs \(unthrottled)")
  }
}
