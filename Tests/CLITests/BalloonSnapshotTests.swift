import Foundation
import Testing
import VMCore
import Virtio

@testable import VMM

/// A machine with a balloon snapshots and restores: the restored machine has the balloon with
/// the same options and the target set after boot, and the control API sees it configured.
@Suite("Balloon across snapshot and restore", .serialized)
struct BalloonSnapshotTests {
  @Test func restoredMachineKeepsItsBalloon() throws {
    let scratch = try ScratchDirectory()
    let kernel = try assembleGuest(clockGuest, in: scratch)
    let controller = VMController(id: "balloon-source")
    let options = BalloonOptions(deflateOnOOM: true, statisticsInterval: 5, freePageReporting: true)
    try controller.configure { spec throws(ControlError) in
      spec.kernelPath = kernel
      spec.memoryMiB = 32
      spec.accelerator = .soft
      spec.serial = .none
      spec.balloon = BalloonConfiguration(targetMiB: 4, options: options)
    }
    try controller.start()
    let balloon = try #require(controller.machine?.balloon)
    balloon.setTarget(pages: 3 * BalloonConfiguration.pagesPerMiB)
    usleep(100_000)
    try controller.pause()
    let state = scratch.path("balloon.state")
    let memory = scratch.path("balloon.mem")
    try controller.createSnapshot(statePath: state, memoryPath: memory)
    try controller.shutdown()

    let restored = VMController(id: "balloon-restored")
    try restored.configure { spec throws(ControlError) in spec.serial = .none }
    try restored.loadSnapshot(statePath: state, memoryPath: memory, resume: true)
    defer { try? restored.shutdown() }
    let restoredBalloon = try #require(restored.machine?.balloon)
    #expect(restoredBalloon.options == options)
    #expect(restoredBalloon.targetPages == 3 * BalloonConfiguration.pagesPerMiB)
    #expect(restored.spec.balloon == BalloonConfiguration(targetMiB: 3, options: options))
  }
}
