import Foundation
import Synchronization
import Testing
import VMCore

@testable import VMM

/// Cloud Hypervisor's `timeout_s` / `timeout_strategy` on send-migration. The destination is
/// the test itself, speaking the migration protocol and reading slowly, while the test keeps
/// writing 2048 pages of guest RAM from the host (host writes are tracked like the guest's), so
/// the dirty pages never fit the 1 ms downtime limit: only the time limit ends the pre-copy.
@Suite("Live migration time limit", .serialized)
struct MigrationTimeoutTests {
  let scratch: ScratchDirectory
  let kernel: String

  init() throws {
    scratch = try ScratchDirectory()
    kernel = try assembleGuest(clockGuest, in: scratch)
  }

  /// What the test's destination saw.
  final class SlowDestination: Sendable {
    let address: MigrationAddress
    let sawState = Atomic<Bool>(false)
    let pageMessages = Atomic<Int>(0)

    init(path: String) {
      address = .unix(path: path)
      Thread { [self] in serve() }.start()
    }

    private func serve() {
      guard let channel = try? address.acceptOne() else { return }
      channel.setTimeout(seconds: 30)
      do {
        _ = try channel.receive(.hello)
        try channel.send(.accept)
        while true {
          let (type, _) = try channel.receive()
          if type == .pages {
            pageMessages.add(1, ordering: .relaxed)
            // About 12 MiB/s: the first round alone (32 MiB) outlasts the 1 s limit. At 50 MiB/s
            // the later rounds were short, and one during which the page writer got no CPU (a
            // loaded 2-core host) converged before the limit.
            usleep(20_000)
          } else if type == .state {
            sawState.store(true, ordering: .releasing)
            try channel.send(.resumed)
            return
          }
        }
      } catch {
        return
      }
    }
  }

  func startController() throws -> VMController {
    let controller = VMController(id: "timeout-source")
    try controller.configure { spec throws(ControlError) in
      spec.kernelPath = kernel
      spec.memoryMiB = 32
      spec.accelerator = .soft
      spec.serial = .none
    }
    try controller.start()
    return controller
  }

  /// Writes 2048 pages from 8 MiB on, over and over, until `stop`.
  final class StopFlag: Sendable {
    let stopped = Atomic<Bool>(false)
  }

  static func dirtyPages(_ memory: GuestMemory, until stop: StopFlag) {
    var round: UInt32 = 0
    while !stop.stopped.load(ordering: .acquiring) {
      round &+= 1
      for page in 0..<UInt64(2048) { try? memory.write(round, at: 0x80_0000 + page * 4096) }
    }
  }

  func migrate(strategy: MigrationTimeoutStrategy, socket: String) throws -> (
    controller: VMController, result: Result<MigrationStatistics, ControlError>, seconds: Double,
    destination: SlowDestination
  ) {
    let controller = try startController()
    let destination = SlowDestination(path: scratch.path(socket))
    while !FileManager.default.fileExists(atPath: scratch.path(socket)) { usleep(10_000) }
    let memory = controller.machine!.parts.memory
    let stop = StopFlag()
    let writer = Thread { Self.dirtyPages(memory, until: stop) }
    writer.start()
    let started = Date()
    let result: Result<MigrationStatistics, ControlError>
    do {
      result = .success(
        try controller.sendMigration(
          to: "unix:" + scratch.path(socket), downtimeLimitMilliseconds: 1, timeoutSeconds: 1,
          timeoutStrategy: strategy))
    } catch {
      result = .failure(error)
    }
    let seconds = Date().timeIntervalSince(started)
    stop.stopped.store(true, ordering: .releasing)
    return (controller, result, seconds, destination)
  }

  @Test func cancelKeepsTheGuestRunningOnTheSource() throws {
    let (controller, result, seconds, destination) = try migrate(strategy: .cancel, socket: "cancel.sock")
    defer { try? controller.shutdown() }
    guard case .failure(let error) = result else {
      Issue.record("the migration finished although it could not converge")
      return
    }
    #expect(error.description.contains("time limit"), "\(error)")
    #expect(error.description.contains("the guest keeps running here"), "\(error)")
    #expect(seconds >= 1 && seconds < 10, "gave up after \(seconds) s")
    let sawState = destination.sawState.load(ordering: .acquiring)
    #expect(!sawState)
    #expect(controller.lifecycle == .running)
    let loops = try controller.machine!.parts.memory.read(UInt32.self, at: 0x6020)
    usleep(200_000)
    #expect(try controller.machine!.parts.memory.read(UInt32.self, at: 0x6020) != loops)
  }

  @Test func ignoreSwitchesOverAtTheLimit() throws {
    let (controller, result, seconds, destination) = try migrate(strategy: .ignore, socket: "ignore.sock")
    defer { try? controller.shutdown() }
    let statistics = try result.get()
    let sawState = destination.sawState.load(ordering: .acquiring)
    #expect(sawState)
    #expect(statistics.rounds < VMController.maximumMigrationRounds, "\(statistics)")
    #expect(seconds >= 1 && seconds < 10, "switched over after \(seconds) s")
    #expect(controller.lifecycle == .shutDown)
  }
}
