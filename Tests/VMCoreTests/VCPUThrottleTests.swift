import Foundation
import Synchronization
import Testing

@testable import VMCore

/// The vCPU throttle live migration's auto-converge uses: wall-clock timeslices, and a sleep
/// that a pause interrupts but does not cancel.
@Suite("vCPU throttle")
struct VCPUThrottleTests {
  /// Runs `body` on a thread of its own and waits for it (at most `seconds`).
  func onThread(seconds: Double = 30, _ body: @escaping @Sendable () -> Void) throws {
    let done = DispatchSemaphore(value: 0)
    Thread {
      body()
      done.signal()
    }.start()
    try #require(done.wait(timeout: .now() + seconds) == .success, "the throttled thread did not finish")
  }

  /// The calling thread's CPU time in nanoseconds.
  static func threadCPUTime() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now)
    return UInt64(now.tv_sec) &* 1_000_000_000 &+ UInt64(now.tv_nsec)
  }

  @Test func aTimesliceIsWallClockTimeEvenWhileTheThreadWaits() throws {
    let throttle = VCPUThrottle()
    throttle.set(percent: 90) { false }
    let slept = Atomic<Int>(0)
    try onThread {
      // A timeslice ends after 10 ms of wall time however little CPU time the thread used (a
      // loaded host's wait for a core counts as running time, as QEMU's throttle counts it).
      var slice = VCPUThrottle.Timeslice()
      let end = Date().addingTimeInterval(0.3)
      while Date() < end {
        if throttle.throttleIfDue(&slice) { slept.add(1, ordering: .relaxed) }
        usleep(1000)
      }
    }
    #expect(slept.load(ordering: .relaxed) > 0)
  }

  @Test func aBusyThreadRunsAboutItsShare() throws {
    let throttle = VCPUThrottle()
    throttle.set(percent: 80) { false }
    let cpuNanoseconds = Atomic<UInt64>(0)
    let wallNanoseconds = Atomic<UInt64>(0)
    try onThread {
      var slice = VCPUThrottle.Timeslice()
      let cpuStart = Self.threadCPUTime()
      let wallStart = HostCondition.now()
      var sink: UInt64 = 0
      while HostCondition.now() &- wallStart < 1_000_000_000 {
        for index in 0..<10_000 { sink = sink &* 31 &+ UInt64(index) }
        throttle.throttleIfDue(&slice)
      }
      cpuNanoseconds.store(Self.threadCPUTime() &- cpuStart &+ (sink & 1), ordering: .relaxed)
      wallNanoseconds.store(HostCondition.now() &- wallStart, ordering: .relaxed)
    }
    let share = Double(cpuNanoseconds.load(ordering: .relaxed)) / Double(wallNanoseconds.load(ordering: .relaxed))
    // 20 % of the time at most (less on a loaded host), with room for the last timeslice.
    #expect(share > 0.01, "the thread hardly ran: \(share)")
    #expect(share < 0.35, "an 80 % throttle left the thread \(share) of the time")
  }

  @Test func aWakeInterruptsTheSleepButTheNextCallSleepsTheRest() throws {
    let throttle = VCPUThrottle()
    throttle.set(percent: 99) { false }
    let sleeping = Atomic<Bool>(false)
    let firstSleepReturned = Atomic<Bool>(false)
    let observations = Mutex<[String]>([])
    let note: @Sendable (String) -> Void = { line in observations.withLock { $0.append(line) } }
    Thread {
      // Wake the sleeper once it owes a sleep (as a pause does), again every 20 ms until its
      // sleep returns (a wake before it started waiting is not seen).
      let deadline = Date().addingTimeInterval(20)
      while !sleeping.load(ordering: .acquiring) && Date() < deadline { usleep(1000) }
      while !firstSleepReturned.load(ordering: .acquiring) && Date() < deadline {
        usleep(20_000)
        throttle.wakeSleepers()
      }
    }.start()
    try onThread {
      var slice = VCPUThrottle.Timeslice()
      var sink: UInt64 = 0
      // Run a timeslice: the call that returns true has started the 990 ms sleep.
      // The waker starts once half of it has run (its wakes before the sleep are not seen).
      var calls = 0
      while calls < 100_000_000 {
        calls += 1
        for index in 0..<1000 { sink = sink &* 31 &+ UInt64(index) }
        if let started = slice.startedAt, slice.sleepUntil == nil {
          if HostCondition.now() &- started >= VCPUThrottle.timesliceNanoseconds / 2 {
            sleeping.store(true, ordering: .releasing)
          }
        }
        if throttle.throttleIfDue(&slice) { break }
      }
      firstSleepReturned.store(true, ordering: .releasing)
      guard let owed = slice.sleepUntil else {
        note("the first sleep was not interrupted (sink \(sink & 1))")
        return
      }
      if HostCondition.now() >= owed { note("woken only after the deadline") }
      // After the wake (a pause), the vCPU comes back and sleeps what is left; it runs again
      // (the call returns false) only once the owed deadline has passed.
      var sleeps = 0
      while throttle.throttleIfDue(&slice) && sleeps < 1000 { sleeps += 1 }
      if HostCondition.now() < owed { note("the vCPU ran again before the owed deadline") }
      if slice.sleepUntil != nil { note("the sleep is still owed after it ended") }
    }
    #expect(observations.withLock { $0 } == [])
  }
}
