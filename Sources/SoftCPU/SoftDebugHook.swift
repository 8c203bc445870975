import Synchronization
import VMCore

/// A debugger attached to the software CPU (the gdb stub). Its methods run on the vCPU
/// threads, one instruction at a time, and only while it reports itself active.
///
/// Contract: when `shouldStop(before:index:)` or `shouldStop(after:index:)` returns true, the
/// debugger requests a pause of the machine (through the pause gate) soon after; the vCPU
/// waits at the instruction boundary until the pause is requested, then parks.
public protocol SoftCPUDebugger: AnyObject, Sendable {
  /// Called before the instruction at `cpu.rip` executes; true stops the vCPU before it.
  func shouldStop(before cpu: CPU, index: Int) -> Bool
  /// Called after one instruction (or exception delivery) ran; true stops the vCPU there.
  func shouldStop(after cpu: CPU, index: Int) -> Bool
  /// Whether vCPU `index` must run one instruction at a time (a step or watchpoints); with
  /// breakpoints only, it runs slices that leave before blocks on breakpoint pages.
  func needsEveryInstruction(_ index: Int) -> Bool
  /// Whether vCPU `index` is being single-stepped (pending interrupts are then held back, so
  /// a step does not land in an interrupt handler).
  func isStepping(_ index: Int) -> Bool
}

/// Where a debugger attaches to a `SoftAccelerator`. The vCPU loops test `isActive` once per
/// slice: without an active debugger the loop runs exactly as before.
public final class SoftDebugHook: Sendable {
  private let active = Atomic<Bool>(false)
  private let attached = Mutex<(any SoftCPUDebugger)?>(nil)
  private let started = Atomic<Bool>(false)

  init() {}

  /// Attaches (or with nil detaches) the debugger.
  public func attach(_ debugger: (any SoftCPUDebugger)?) {
    attached.withLock { $0 = debugger }
    if debugger == nil { active.store(false, ordering: .sequentiallyConsistent) }
  }

  /// Whether the vCPU threads have started (every vCPU's initial state is loaded).
  public var vcpusStarted: Bool { started.load(ordering: .acquiring) }

  /// A vCPU thread started (called once per thread).
  func noteVCPUStarted() { started.store(true, ordering: .releasing) }

  /// Switches the per-instruction path on (breakpoints, watchpoints or a step exist) or off.
  /// Change it while the machine is paused, or kick the vCPUs afterwards.
  public func setActive(_ isActive: Bool) {
    active.store(isActive, ordering: .sequentiallyConsistent)
  }

  /// The debugger when it is active (one relaxed atomic load otherwise).
  @inline(__always)
  var activeDebugger: (any SoftCPUDebugger)? {
    guard active.load(ordering: .relaxed) else { return nil }
    return attached.withLock { $0 }
  }
}

extension CPU {
  /// The x87 tag word as FSTENV stores it (for debuggers).
  public var fullTagWord: UInt16 { fpuFullTags }

  /// Sets the linear addresses of the debugger's breakpoints (change it while the vCPU is
  /// parked): `run` then leaves a slice before entering a block on one of their pages.
  public func setDebugBreakpoints(_ addresses: Set<UInt64>) {
    debugStopPages = Set(addresses.map { $0 >> 12 })
    debugStopPagesActive = !addresses.isEmpty
  }

  /// Whether RIP lies on a page holding a debugger breakpoint.
  var isOnDebugStopPage: Bool {
    guard debugStopPagesActive else { return false }
    var linear = rip &+ segmentBase[Int(SegmentIndex.cs)]
    if codeSize != 8 { linear &= 0xFFFF_FFFF }
    return debugStopPages.contains(linear >> 12)
  }
}
