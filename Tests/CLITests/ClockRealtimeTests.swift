import Foundation
import KVMBackend
import SoftCPU
import Testing
import VMCore

@testable import VMM

/// A Multiboot guest that keeps reading the clocks: in a loop it stores the TSC at 0x6000, the
/// RTC's seconds, minutes and hours (CMOS registers 0, 2, 4) at 0x6010-0x6012 and a loop count
/// at 0x6020.
let clockGuest =
  multibootPrologue + """
    _start:
            movl $stack_top, %esp
            xorl %ecx, %ecx
    again:  rdtsc
            movl %eax, 0x6000
            movl %edx, 0x6004
            movb $0, %al
            outb %al, $0x70
            inb $0x71, %al
            movb %al, 0x6010
            movb $2, %al
            outb %al, $0x70
            inb $0x71, %al
            movb %al, 0x6011
            movb $4, %al
            outb %al, $0x70
            inb $0x71, %al
            movb %al, 0x6012
            incl %ecx
            movl %ecx, 0x6020
            jmp again
            .data
            .fill 4096, 1, 0
    stack_top:

    """

/// Firecracker's `clock_realtime` on snapshot load: a guest restored N seconds after its
/// snapshot has its clocks stepped forward by N seconds with the option, and continues from the
/// snapshot's time without it; its RTC follows the host's wall clock either way.
@Suite("Stepping the guest clock on restore", .serialized)
struct ClockRealtimeTests {
  let scratch: ScratchDirectory
  let kernel: String
  /// How long the snapshot waits on disk before it is restored.
  static let gapSeconds: UInt32 = 3

  init() throws {
    scratch = try ScratchDirectory()
    kernel = try assembleGuest(clockGuest, in: scratch)
  }

  struct Reading {
    var tsc: UInt64
    /// Seconds since midnight from the RTC's BCD fields.
    var rtcSeconds: Int
    var loops: UInt32
  }

  static func read(_ controller: VMController) throws -> Reading {
    let memory = controller.machine!.parts.memory
    func bcd(_ byte: UInt8) -> Int { Int(byte >> 4) * 10 + Int(byte & 0xF) }
    let rtc = try memory.readBytes(at: 0x6010, count: 3)
    return Reading(
      tsc: try memory.read(UInt64.self, at: 0x6000),
      rtcSeconds: bcd(rtc[2]) * 3600 + bcd(rtc[1]) * 60 + bcd(rtc[0]),
      loops: try memory.read(UInt32.self, at: 0x6020))
  }

  /// Runs the guest on `accelerator` for a while, pauses it and snapshots it; returns the files,
  /// the guest's last reading and the machine's clock (virtual clock or kvmclock) at the pause.
  func snapshot(on accelerator: AcceleratorChoice, name: String) throws -> (
    state: String, memory: String, reading: Reading, clock: UInt64
  ) {
    let controller = VMController(id: "clock-source")
    try controller.configure { spec throws(ControlError) in
      spec.kernelPath = kernel
      spec.memoryMiB = 32
      spec.accelerator = accelerator
      spec.serial = .none
    }
    try controller.start()
    defer { try? controller.shutdown() }
    let deadline = Date().addingTimeInterval(60)
    while try Self.read(controller).loops < 1000 {
      guard Date() < deadline else { throw ControlError(.failed, "the guest made no progress") }
      usleep(1000)
    }
    try controller.pause()
    let state = scratch.path("\(name).state")
    let memory = scratch.path("\(name).mem")
    try controller.createSnapshot(statePath: state, memoryPath: memory)
    return (state, memory, try Self.read(controller), try #require(Self.machineClock(controller)))
  }

  static func machineClock(_ controller: VMController) -> UInt64? {
    let accelerator = controller.machine!.accelerator
    if let kvm = accelerator as? KVMAccelerator { return kvm.clockNanoseconds }
    return (accelerator as? SoftAccelerator)?.clock.nanoseconds
  }

  func restore(_ state: String, _ memory: String, clockRealtime: Bool, resume: Bool) throws -> VMController {
    let controller = VMController(id: "clock-restored")
    try controller.configure { spec throws(ControlError) in spec.serial = .none }
    try controller.loadSnapshot(statePath: state, memoryPath: memory, resume: resume, clockRealtime: clockRealtime)
    return controller
  }

  /// Waits until the restored guest has gone `loops` more rounds round its loop.
  static func readingAfterProgress(_ controller: VMController, beyond loops: UInt32) throws -> Reading {
    let deadline = Date().addingTimeInterval(60)
    while true {
      let reading = try read(controller)
      if reading.loops > loops + 1000 { return reading }
      guard Date() < deadline else { throw ControlError(.failed, "the restored guest made no progress") }
      usleep(1000)
    }
  }

  @Test func softCPUGuestRestoredLaterSeesItsClocksStepped() throws {
    let (state, memory, before, _) = try snapshot(on: .soft, name: "soft")
    sleep(Self.gapSeconds)
    let stepped = try restore(state, memory, clockRealtime: true, resume: true)
    defer { try? stepped.shutdown() }
    let continued = try restore(state, memory, clockRealtime: false, resume: true)
    defer { try? continued.shutdown() }
    let afterStep = try Self.readingAfterProgress(stepped, beyond: before.loops)
    let afterContinue = try Self.readingAfterProgress(continued, beyond: before.loops)
    // The software CPU's TSC counts at 1 GHz.
    let gap = UInt64(Self.gapSeconds) * 1_000_000_000
    #expect(afterStep.tsc >= before.tsc + gap, "TSC \(before.tsc) -> \(afterStep.tsc)")
    #expect(
      afterContinue.tsc > before.tsc && afterContinue.tsc < before.tsc + gap / 2,
      "TSC \(before.tsc) -> \(afterContinue.tsc)")
    // The RTC shows the host's time in both (modulo midnight).
    for reading in [afterStep, afterContinue] {
      let advanced = (reading.rtcSeconds - before.rtcSeconds + 86_400) % 86_400
      #expect(advanced >= Int(Self.gapSeconds) - 1 && advanced < 60, "RTC advanced by \(advanced) s")
    }
  }

  @Test(.enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
  func kvmGuestRestoredLaterHasItsKvmclockStepped() throws {
    let (state, memory, before, clockAtSnapshot) = try snapshot(on: .kvm, name: "kvm")
    sleep(Self.gapSeconds)
    let gap = UInt64(Self.gapSeconds) * 1_000_000_000
    // Left paused, the kvmclock stays where the restore put it.
    let stepped = try restore(state, memory, clockRealtime: true, resume: false)
    let steppedClock = try #require(Self.machineClock(stepped))
    try stepped.resume()
    let afterStep = try Self.readingAfterProgress(stepped, beyond: before.loops)
    try stepped.shutdown()
    let continued = try restore(state, memory, clockRealtime: false, resume: false)
    let continuedClock = try #require(Self.machineClock(continued))
    try continued.shutdown()
    #expect(steppedClock >= clockAtSnapshot + gap, "kvmclock \(clockAtSnapshot) -> \(steppedClock)")
    #expect(continuedClock < clockAtSnapshot + gap / 2, "kvmclock \(clockAtSnapshot) -> \(continuedClock)")
    let advanced = (afterStep.rtcSeconds - before.rtcSeconds + 86_400) % 86_400
    #expect(advanced >= Int(Self.gapSeconds) - 1 && advanced < 60, "RTC advanced by \(advanced) s")
  }
}
