import Synchronization

/// How often the vCPUs left KVM_RUN, by reason. A snapshot: counters keep moving while the
/// machine runs.
public struct KVMExitStatistics: Sendable, Equatable, CustomStringConvertible {
  /// Every return from KVM_RUN, whatever the reason.
  public var total: UInt64 = 0
  /// KVM_EXIT_IO exits (one per exit, even when a string instruction moved several items).
  public var portIO: UInt64 = 0
  /// KVM_EXIT_MMIO exits.
  public var mmio: UInt64 = 0
  /// KVM_EXIT_HLT exits (rare: the in-kernel irqchip handles HLT itself).
  public var halt: UInt64 = 0
  /// KVM_RUN returned EINTR (a kick or another signal) or KVM_EXIT_INTR.
  public var interrupted: UInt64 = 0
  /// Any other exit reason.
  public var other: UInt64 = 0

  public init() {}

  public var description: String {
    "\(total) exits (port I/O \(portIO), MMIO \(mmio), HLT \(halt), interrupted \(interrupted), other \(other))"
  }

  static func + (lhs: Self, rhs: Self) -> Self {
    var sum = lhs
    sum.total += rhs.total
    sum.portIO += rhs.portIO
    sum.mmio += rhs.mmio
    sum.halt += rhs.halt
    sum.interrupted += rhs.interrupted
    sum.other += rhs.other
    return sum
  }
}

/// Per-vCPU exit counters: written by the vCPU thread, readable from any thread.
final class KVMExitCounters: Sendable {
  let total = Atomic<UInt64>(0)
  let portIO = Atomic<UInt64>(0)
  let mmio = Atomic<UInt64>(0)
  let halt = Atomic<UInt64>(0)
  let interrupted = Atomic<UInt64>(0)
  let other = Atomic<UInt64>(0)

  @inline(__always)
  func count(_ counter: borrowing Atomic<UInt64>) {
    counter.wrappingAdd(1, ordering: .relaxed)
  }

  var snapshot: KVMExitStatistics {
    var statistics = KVMExitStatistics()
    statistics.total = total.load(ordering: .relaxed)
    statistics.portIO = portIO.load(ordering: .relaxed)
    statistics.mmio = mmio.load(ordering: .relaxed)
    statistics.halt = halt.load(ordering: .relaxed)
    statistics.interrupted = interrupted.load(ordering: .relaxed)
    statistics.other = other.load(ordering: .relaxed)
    return statistics
  }
}
