import Foundation
import Synchronization
import Testing
import VMCore

@testable import VMM

/// The receiver's seam: `VMController.receiveMigration(over:networkOverrides:buildingWith:)` runs
/// the receive loop on a connected channel with the machine its builder makes from the hello's
/// description (what the migration fuzz target uses). A software-CPU source running the clock
/// guest migrates in-process to a destination controller whose builder wraps the production
/// one, or refuses.
@Suite("Live migration receiver's machine builder", .serialized)
struct MigrationReceiverBuilderTests {
  let scratch: ScratchDirectory
  let kernel: String

  init() throws {
    scratch = try ScratchDirectory()
    kernel = try assembleGuest(clockGuest, in: scratch)
  }

  /// A destination controller that accepts one source at `path` on its own thread and runs the
  /// receive loop with a builder that records what it was asked for.
  final class Destination: Sendable {
    let controller: VMController
    /// The RAM sizes and vCPU counts of the descriptions the builder got.
    let requests = Mutex<[(memorySize: UInt64, cpuCount: Int)]>([])
    /// The machine the builder returned.
    let built = Mutex<ObjectIdentifier?>(nil)
    /// What the loop returned; nil while it runs.
    let outcome = Mutex<Result<Void, ControlError>?>(nil)

    init(path: String, refusal: String?) {
      var spec = VMSpec()
      spec.accelerator = .soft
      spec.serial = .none
      controller = VMController(id: "builder-destination", spec: spec)
      let address = MigrationAddress.unix(path: path)
      Thread { [self] in serve(address, refusal: refusal) }.start()
      let deadline = Date().addingTimeInterval(10)
      while !FileManager.default.fileExists(atPath: path) && Date() < deadline { usleep(1000) }
    }

    private func serve(_ address: MigrationAddress, refusal: String?) {
      let result: Result<Void, ControlError>
      do throws(ControlError) {
        let channel: MigrationChannel
        do {
          channel = try address.acceptOne()
        } catch {
          throw ControlError(.failed, "\(error)")
        }
        channel.setTimeout(seconds: 30)
        try controller.receiveMigration(over: channel, networkOverrides: [:]) { description, overrides in
          requests.withLock { $0.append((description.memorySize, description.cpuCount)) }
          if let refusal { throw ControlError(.failed, refusal) }
          let machine = try VMController.buildMigratingMachine(description, overrides: overrides)
          built.withLock { $0 = ObjectIdentifier(machine) }
          return machine
        }
        result = .success(())
      } catch {
        result = .failure(error)
      }
      outcome.withLock { $0 = result }
    }

    func waitForOutcome() -> Result<Void, ControlError>? {
      let deadline = Date().addingTimeInterval(60)
      while Date() < deadline {
        if let result = outcome.withLock({ $0 }) { return result }
        usleep(1000)
      }
      return nil
    }
  }

  func startSource() throws -> VMController {
    let controller = VMController(id: "builder-source")
    try controller.configure { spec throws(ControlError) in
      spec.kernelPath = kernel
      spec.memoryMiB = 32
      spec.accelerator = .soft
      spec.serial = .none
    }
    try controller.start()
    return controller
  }

  func loopCount(_ controller: VMController) throws -> UInt32 {
    try controller.machine!.parts.memory.read(UInt32.self, at: 0x6020)
  }

  @Test func theLoopRunsTheMachineItsBuilderMade() throws {
    let source = try startSource()
    defer { try? source.shutdown() }
    let marker: [UInt8] = Array("migrated through the builder".utf8)
    try source.machine!.parts.memory.writeBytes(marker, at: 0x30_0000)
    let destination = Destination(path: scratch.path("built.sock"), refusal: nil)
    defer { try? destination.controller.shutdown() }

    try source.sendMigration(to: "unix:" + scratch.path("built.sock"))
    let outcome = try #require(destination.waitForOutcome())
    if case .failure(let error) = outcome { Issue.record("the destination failed: \(error)") }
    let requests = destination.requests.withLock { $0 }
    #expect(requests.count == 1)
    #expect(requests.first?.memorySize == 32 << 20)
    #expect(requests.first?.cpuCount == 1)
    let adopted = try #require(destination.controller.machine)
    #expect(destination.built.withLock { $0 } == ObjectIdentifier(adopted))
    #expect(destination.controller.lifecycle == .running)
    #expect(try adopted.parts.memory.readBytes(at: 0x30_0000, count: marker.count) == marker)
    // The guest goes on counting on the destination.
    let before = try loopCount(destination.controller)
    let deadline = Date().addingTimeInterval(30)
    while try loopCount(destination.controller) == before && Date() < deadline { usleep(1000) }
    #expect(try loopCount(destination.controller) != before)
    #expect(source.waitUntilStopped(timeoutNanoseconds: 10_000_000_000) != nil)
  }

  @Test func aBuilderThatRefusesFailsTheMigrationAndTheSourceKeepsRunning() throws {
    let source = try startSource()
    defer { try? source.shutdown() }
    let destination = Destination(path: scratch.path("refused.sock"), refusal: "the test's builder refuses")

    var sourceError: ControlError?
    do {
      try source.sendMigration(to: "unix:" + scratch.path("refused.sock"))
    } catch {
      sourceError = error
    }
    let error = try #require(sourceError)
    #expect(error.description.contains("the test's builder refuses"))
    #expect(source.lifecycle == .running)
    let outcome = try #require(destination.waitForOutcome())
    guard case .failure(let destinationError) = outcome else {
      Issue.record("the destination's loop succeeded")
      return
    }
    #expect(destinationError.description.contains("the test's builder refuses"))
    #expect(destination.requests.withLock { $0.count } == 1)
    #expect(destination.controller.lifecycle == .notStarted)
    #expect(destination.controller.machine == nil)
  }
}
