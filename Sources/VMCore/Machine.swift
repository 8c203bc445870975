import CShim
import Glibc
import Synchronization

/// Why a machine stopped running.
public enum MachineStopReason: Sendable, Equatable, CustomStringConvertible {
  /// The guest wrote `value` to the isa-debug-exit port; the process exits with `(value << 1) | 1`.
  case debugExit(value: UInt32)
  /// The guest powered the machine off (ACPI, or a halted CPU with interrupts disabled).
  case powerOff
  /// The guest reset the machine (i8042 reset line, triple fault, KVM shutdown).
  case reset(reason: String)
  /// The host asked the machine to stop (Ctrl-A x, a signal, the API).
  case stopRequested
  /// An unrecoverable accelerator or device failure.
  case failure(String)
  /// The CPU shut down after a triple fault: `vector` is the exception that could not be
  /// delivered (nil when the accelerator does not say), `rip` where it was raised.
  case tripleFault(vector: UInt8?, rip: UInt64)

  /// Exit status of a triple fault (even, so it never collides with a debug-exit status).
  public static let tripleFaultExitStatus: Int32 = 2

  /// The host process exit status that this stop maps to.
  public var exitStatus: Int32 {
    switch self {
    case .debugExit(let value): return Int32(truncatingIfNeeded: (value << 1) | 1) & 0xFF
    case .powerOff, .reset, .stopRequested: return 0
    case .failure: return 1
    case .tripleFault: return Self.tripleFaultExitStatus
    }
  }

  public var description: String {
    switch self {
    case .debugExit(let value): return "guest wrote \(value) to the debug-exit port"
    case .powerOff: return "guest powered off"
    case .reset(let reason): return "guest reset (\(reason))"
    case .stopRequested: return "stopped by request"
    case .failure(let message): return message
    case .tripleFault(let vector, let rip):
      let ripText = "0x" + String(rip, radix: 16)
      guard let vector else { return "triple fault at RIP \(ripText)" }
      return "triple fault: \(Self.exceptionName(vector)) (vector \(vector)) at RIP \(ripText)"
    }
  }

  /// The mnemonic of exception `vector` ("#GP"), or "exception" for vectors without one.
  static func exceptionName(_ vector: UInt8) -> String {
    let names = [
      "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "exception", "#TS", "#NP", "#SS", "#GP",
      "#PF", "exception", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
    ]
    return Int(vector) < names.count ? names[Int(vector)] : "exception"
  }
}

/// Shared, thread-safe control of a running machine: any device or host thread may ask the
/// machine to stop; accelerators register a kick to wake their vCPU threads.
public final class MachineControl: Sendable {
  private let state = Mutex<(reason: MachineStopReason?, kicks: [@Sendable () -> Void])>((nil, []))

  /// Where vCPU threads park while the host pauses the machine.
  public let pauseGate = PauseGate()

  /// Slows the vCPUs down while set (live migration's auto-converge); see `setThrottle`.
  public let throttle = VCPUThrottle()

  public init() {}

  /// The first stop request, if any.
  public var stopReason: MachineStopReason? { state.withLock { $0.reason } }

  /// Whether a stop has been requested.
  public var isStopping: Bool { state.withLock { $0.reason != nil } }

  /// Requests a stop; only the first reason is kept. Wakes every registered vCPU.
  public func requestStop(_ reason: MachineStopReason) {
    let kicks = state.withLock { state -> [@Sendable () -> Void] in
      if state.reason == nil { state.reason = reason }
      return state.kicks
    }
    pauseGate.release()
    throttle.wakeSleepers()
    for kick in kicks { kick() }
  }

  /// Interrupts every registered vCPU (without asking the machine to stop), so each reaches a
  /// safe point and rechecks its requests, e.g. a pause; wakes vCPUs sleeping in the throttle.
  public func kickAll() {
    throttle.wakeSleepers()
    kickVCPUs()
  }

  private func kickVCPUs() {
    let kicks = state.withLock { $0.kicks }
    for kick in kicks { kick() }
  }

  /// Makes the vCPUs sleep `percent` % of the time (0 lifts the throttle; at most
  /// `VCPUThrottle.maximumPercent`); the guest's clocks keep running.
  public func setThrottle(percent: Int) {
    throttle.set(percent: percent) { [weak self] in
      guard let self, !self.isStopping else { return false }
      self.kickVCPUs()
      return true
    }
  }

  /// Registers a closure that interrupts a running vCPU so it notices a stop request.
  public func addKick(_ kick: @escaping @Sendable () -> Void) {
    state.withLock { $0.kicks.append(kick) }
  }

  /// The CPU-time clock of each vCPU thread, by vCPU index, and the last time read from it.
  private let vcpuClocks = Mutex<[Int: (clock: clockid_t, lastNanoseconds: UInt64)]>([:])

  /// Called by vCPU `index`'s host thread when it starts: names the thread `vcpu N` (as `top
  /// -H`, `ps -L` and `taskset` show it) and registers its CPU-time clock for
  /// `vcpuRunTimeNanoseconds`.
  public func registerVCPUThread(index: Int) {
    let thread = pthread_self()
    _ = hv_set_current_thread_name("vcpu \(index)")
    HostThreadSandbox.threadStarted(.vcpu)
    var clock = clockid_t()
    guard pthread_getcpuclockid(thread, &clock) == 0 else { return }
    vcpuClocks.withLock { $0[index] = (clock, 0) }
  }

  /// The host CPU time each vCPU thread has used (user and system), by vCPU index; a thread
  /// that has exited keeps the last value read.
  public func vcpuRunTimeNanoseconds() -> [Int: UInt64] {
    vcpuClocks.withLock { clocks in
      for (index, entry) in clocks {
        var time = timespec()
        guard clock_gettime(entry.clock, &time) == 0 else { continue }
        clocks[index]?.lastNanoseconds = UInt64(time.tv_sec) &* 1_000_000_000 &+ UInt64(time.tv_nsec)
      }
      return clocks.mapValues(\.lastNanoseconds)
    }
  }
}

/// Receives interrupt line changes from devices. The KVM backend forwards to the in-kernel
/// irqchip; the software CPU to its own PIC/IOAPIC.
public protocol InterruptSink: AnyObject, Sendable {
  /// Drives global system interrupt `line` (ISA IRQs 0-15 are GSIs 0-15) to `level`.
  func setInterruptLevel(line: UInt32, level: Bool)
}

/// A late-bound interrupt router: devices hold it from construction; the accelerator
/// attaches its sink once the machine is built.
public final class InterruptRouter: InterruptSink, Sendable {
  private let sink = Mutex<(any InterruptSink)?>(nil)
  public init() {}
  /// Attaches the accelerator's sink.
  public func attach(_ target: any InterruptSink) { sink.withLock { $0 = target } }
  public func setInterruptLevel(line: UInt32, level: Bool) {
    let target = sink.withLock { $0 }
    target?.setInterruptLevel(line: line, level: level)
  }
}

/// One interrupt line of a device.
public struct InterruptLine: Sendable {
  public let router: any InterruptSink
  public let line: UInt32
  public init(router: any InterruptSink, line: UInt32) {
    self.router = router
    self.line = line
  }
  /// Raises or lowers the line.
  public func set(_ level: Bool) { router.setInterruptLevel(line: line, level: level) }
  /// Raises then lowers the line (an edge).
  public func pulse() {
    set(true)
    set(false)
  }
}

/// The parts of a machine an accelerator runs against.
public struct MachineParts: Sendable {
  public let memory: GuestMemory
  public let bus: IOBus
  public let control: MachineControl
  public let interrupts: InterruptRouter
  public init(memory: GuestMemory, bus: IOBus, control: MachineControl, interrupts: InterruptRouter) {
    self.memory = memory
    self.bus = bus
    self.control = control
    self.interrupts = interrupts
  }
}

/// A CPU accelerator: runs the vCPUs of one machine until it stops.
/// Implementations: the KVM backend and the software x86-64 CPU.
public protocol Accelerator: AnyObject, Sendable {
  /// Short name for logs ("kvm", "soft").
  var name: String { get }
  /// Runs the machine from `bootState` on the bootstrap processor until it stops;
  /// returns why it stopped.
  func run(bootState: X86CPUState) throws -> MachineStopReason
  /// Stops every vCPU at a safe point (an instruction boundary on the software CPU, outside
  /// KVM_RUN on KVM) and freezes the machine's clocks; returns once all are parked. Throws
  /// when the vCPUs do not park in time (the machine then keeps running).
  func pause() throws(MachinePauseError)
  /// Lets a paused machine continue exactly where it stopped, with its clocks continuing
  /// from the paused time.
  func resume()
}

/// A pause that could not complete.
public struct MachinePauseError: Error, CustomStringConvertible, Sendable {
  public let description: String
  public init(_ description: String) { self.description = description }
}
