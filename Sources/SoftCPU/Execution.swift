import VMCore

/// Why `CPU.run` returned.
public enum StopCause: Equatable, Sendable {
  /// HLT executed.
  case halted
  /// An exception that was not delivered to the guest (no IDT delivery in flat test mode).
  case fault(Fault)
  /// The instruction budget ran out.
  case instructionLimit
  /// Another thread asked the CPU to stop.
  case stopRequested
}

extension CPU {
  /// Puts the CPU in flat 64-bit mode for tests and benchmarks: CS.L=1, all segment bases 0,
  /// CPL `cpl`, paging off (linear = physical: a test-only configuration), SSE enabled
  /// (CR4.OSFXSR/OSXMMEXCPT, CR0.MP, no EM/TS), x87 in its FNINIT state, exceptions not
  /// delivered but returned from `run` as `.fault`.
  public func enterFlatLongMode(cpl: UInt8 = 3) {
    fatalError("enterFlatLongMode: not implemented yet")
  }

  /// Executes at most `instructionLimit` instructions from `rip`.
  /// In flat test mode a fault stops execution with `rip` at the faulting instruction and
  /// architectural state as the hardware leaves it at the fault.
  public func run(instructionLimit: Int) -> StopCause {
    fatalError("run: not implemented yet")
  }
}
