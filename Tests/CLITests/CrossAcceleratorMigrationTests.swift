import Foundation
import Synchronization
import Testing
import VMCore

@testable import VMM

/// Live migration between KVM and the software CPU: the 64-bit test guest of
/// `CrossAcceleratorTests` (paging, ring 3, local APIC timer and PIT interrupts, a numbered line
/// on COM1 every few million rounds) moves while it runs from a machine on one accelerator to a
/// receiving controller configured for the other; its printed sequence continues without a gap
/// or a repeat and both timers keep interrupting it.
@Suite(
  "Live migration between KVM and the software CPU", .serialized,
  .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct CrossAcceleratorMigrationTests {
  let scratch: ScratchDirectory
  let kernel: String
  let helper: CrossAcceleratorTests

  init() throws {
    helper = try CrossAcceleratorTests()
    scratch = helper.scratch
    kernel = helper.kernel
  }

  final class ReceiveOutcome: Sendable {
    let error = Mutex<ControlError?>(nil)
    let finished = Atomic<Bool>(false)
  }

  @Test(arguments: [("kvm", "soft"), ("soft", "kvm")])
  func runningGuestMovesToTheOtherAccelerator(source: String, target: String) throws {
    let beforeSerial = scratch.path("\(source)-migration-before.out")
    let original = VMController(id: "migration-source")
    try original.configure { spec throws(ControlError) in
      spec.kernelPath = kernel
      spec.memoryMiB = 32
      spec.accelerator = AcceleratorChoice(rawValue: source)!
      spec.cpuModel = .x86_64  // a model both accelerators present (also on nested KVM)
      spec.serial = .file(beforeSerial)
    }
    try original.start()
    defer { try? original.shutdown() }
    let sourceMemory = original.machine!.parts.memory
    try helper.waitFor("both timers' first ticks on \(source)") {
      try sourceMemory.read(UInt64.self, at: 0x6008) > 0 && sourceMemory.read(UInt64.self, at: 0x6010) > 0
    }
    let printedAtTicks = try sourceMemory.read(UInt64.self, at: 0x6000)
    try helper.waitFor("the guest's third line on \(source)") {
      try sourceMemory.read(UInt64.self, at: 0x6000) >= max(3, printedAtTicks + 1)
    }

    let afterSerial = scratch.path("\(target)-migration-after.out")
    let destination = VMController(id: "migration-target")
    try destination.configure { spec throws(ControlError) in
      spec.serial = .file(afterSerial)
      spec.accelerator = AcceleratorChoice(rawValue: target)!
    }
    defer { try? destination.shutdown() }
    let socket = scratch.path("\(source)-to-\(target).sock")
    let outcome = ReceiveOutcome()
    Thread {
      do throws(ControlError) {
        try destination.receiveMigration(from: "unix:" + socket)
      } catch {
        outcome.error.withLock { $0 = error }
      }
      outcome.finished.store(true, ordering: .releasing)
    }.start()
    try helper.waitFor("the destination's socket") { FileManager.default.fileExists(atPath: socket) }
    let statistics = try original.sendMigration(to: "unix:" + socket)
    try helper.waitFor("the destination to confirm") { outcome.finished.load(ordering: .acquiring) }
    if let error = outcome.error.withLock({ $0 }) { throw error }
    #expect(statistics.rounds >= 2)
    #expect(original.lifecycle == .shutDown)
    #expect(destination.machine?.accelerator.name == target)

    let printedBefore = UInt64(helper.lines(helper.serialOutput(beforeSerial)).count)
    try helper.waitFor("four more lines on \(target)") {
      if let reason = destination.machine?.parts.control.stopReason {
        throw ControlError(.failed, "the migrated guest stopped: \(reason)")
      }
      return try destination.machine!.parts.memory.read(UInt64.self, at: 0x6000) >= printedBefore + 4
    }
    // Native ring 3 on KVM prints lines faster than the PIT's 10 ms period: wait for a PIT tick
    // on the destination, then for a line printed after it.
    let destinationMemory = destination.machine!.parts.memory
    let pitAtMove = try destinationMemory.read(UInt64.self, at: 0x6010)
    try helper.waitFor("a PIT tick on \(target)") { try destinationMemory.read(UInt64.self, at: 0x6010) > pitAtMove }
    let printedAtTick = try destinationMemory.read(UInt64.self, at: 0x6000)
    try helper.waitFor("a line after the PIT tick on \(target)") {
      try destinationMemory.read(UInt64.self, at: 0x6000) > printedAtTick
    }
    try destination.pause()
    // A line cut by the switch-over ends in the destination's output.
    let all = helper.lines(helper.serialOutput(beforeSerial) + helper.serialOutput(afterSerial))
    #expect(all.map { $0.first ?? 0 } == Array(1...UInt64(all.count)), "the sequence has a gap or a repeat: \(all)")
    #expect(all.allSatisfy { $0.count == 3 }, "garbled lines: \(all)")
    let after = all.dropFirst(Int(printedBefore))
    if let first = after.first, let last = after.last, after.count >= 3 {
      #expect(last[1] > first[1], "no APIC timer interrupts on \(target): \(Array(after))")
      #expect(last[2] > first[2], "no PIT interrupts on \(target): \(Array(after))")
    } else {
      Issue.record("too few lines after the move: \(all)")
    }
  }
}
