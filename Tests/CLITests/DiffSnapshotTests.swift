import Foundation
import Testing
import VMCore

@testable import VMM

/// Diff snapshots on the software CPU, with the state guest of `SnapshotTests`: a full snapshot,
/// more rounds, a diff snapshot; the diff holds only the pages the guest wrote in between, and
/// base + diff restore (laid over on restore, or merged) to the state a full snapshot of the
/// same moment has.
@Suite("Diff snapshots on the software CPU", .serialized)
struct DiffSnapshotTests {
  let scratch: ScratchDirectory
  let kernel: String

  init() throws {
    scratch = try ScratchDirectory()
    kernel = try assembleGuest(stateGuest, in: scratch)
  }

  func startController(trackDirtyPages: Bool) throws -> VMController {
    let controller = VMController(id: "diff-test")
    try controller.configure { spec throws(ControlError) in
      spec.kernelPath = kernel
      spec.memoryMiB = 32
      spec.accelerator = .soft
      spec.serial = .none
      spec.trackDirtyPages = trackDirtyPages
    }
    try controller.start()
    return controller
  }

  func progress(_ controller: VMController) throws -> UInt32 {
    try controller.machine!.parts.memory.read(UInt32.self, at: 0x6000)
  }

  func runUntil(_ controller: VMController, progress target: UInt32) throws {
    let deadline = Date().addingTimeInterval(60)
    while try progress(controller) < target {
      guard Date() < deadline else { throw ControlError(.failed, "the guest made no progress") }
      usleep(1000)
    }
  }

  func results(_ controller: VMController) throws -> [UInt8] {
    let reason = controller.waitUntilStopped(timeoutNanoseconds: 120_000_000_000)
    #expect(reason == .debugExit(value: 0x31), "the guest stopped with \(String(describing: reason))")
    return try controller.machine!.parts.memory.readBytes(at: 0x7000, count: 0x44)
  }

  func dataExtents(_ path: String) throws -> [(offset: UInt64, length: UInt64)] {
    let descriptor = open(path, O_RDONLY)
    #expect(descriptor >= 0)
    defer { close(descriptor) }
    return try GuestMemory.dataExtents(descriptor, size: 32 << 20)
  }

  @Test func baseAndDiffRestoreToTheStateOfAFullSnapshot() throws {
    let reference = try startController(trackDirtyPages: false)
    let expected = try results(reference)

    let controller = try startController(trackDirtyPages: true)
    defer { try? controller.shutdown() }
    try runUntil(controller, progress: 100_000)
    try controller.pause()
    try controller.createSnapshot(statePath: scratch.path("base.state"), memoryPath: scratch.path("base.mem"))
    let atBase = try progress(controller)
    try controller.resume()
    try runUntil(controller, progress: atBase + 200_000)
    try controller.pause()
    let atDiff = try progress(controller)
    #expect(atDiff < UInt32(stateGuestIterations), "the guest finished before the diff snapshot")
    try controller.createSnapshot(
      statePath: scratch.path("diff.state"), memoryPath: scratch.path("diff.mem"), diff: true)
    // A full snapshot of the same paused moment, to compare with.
    try controller.createSnapshot(statePath: scratch.path("full.state"), memoryPath: scratch.path("full.mem"))
    try controller.shutdown()

    // The diff holds the progress page (0x6000) and the stack, not the program or the IDT.
    let extents = try dataExtents(scratch.path("diff.mem"))
    let diffBytes = extents.reduce(0) { $0 + $1.length }
    let baseBytes = try dataExtents(scratch.path("base.mem")).reduce(0) { $0 + $1.length }
    #expect(diffBytes > 0 && diffBytes <= 8 * 4096, "the diff holds \(diffBytes) bytes")
    #expect(diffBytes < baseBytes)
    #expect(extents.contains { $0.offset <= 0x6000 && 0x6000 < $0.offset + $0.length })

    // Merged: base + diff is byte for byte the full snapshot's memory.
    let merged = scratch.path("merged.mem")
    try FileManager.default.copyItem(atPath: scratch.path("base.mem"), toPath: merged)
    try GuestMemory.mergeDiffs(into: merged, diffPaths: [scratch.path("diff.mem")])
    #expect(
      try Data(contentsOf: URL(fileURLWithPath: merged))
        == Data(contentsOf: URL(fileURLWithPath: scratch.path("full.mem"))))

    // A diff state without its base is refused with one line.
    #expect(throws: MachineStateError.self) {
      _ = try VirtualMachine.restore(statePath: scratch.path("diff.state"))
    }

    // Restored from base + diff (the diff recorded in the state is laid over the base): the
    // guest continues from the diff snapshot's progress and finishes like the reference.
    let restored = VMController(id: "restored-diff")
    try restored.configure { spec throws(ControlError) in spec.serial = .none }
    try restored.loadSnapshot(
      statePath: scratch.path("diff.state"), memoryPath: scratch.path("base.mem"), resume: false)
    defer { try? restored.shutdown() }
    #expect(try progress(restored) == atDiff)
    try restored.resume()
    #expect(try results(restored) == expected)
  }

  @Test func diffSnapshotsNeedDirtyPageTracking() throws {
    let controller = try startController(trackDirtyPages: false)
    defer { try? controller.shutdown() }
    try runUntil(controller, progress: 1000)
    try controller.pause()
    #expect(throws: ControlError.self) {
      try controller.createSnapshot(
        statePath: scratch.path("nodiff.state"), memoryPath: scratch.path("nodiff.mem"), diff: true)
    }
  }
}
