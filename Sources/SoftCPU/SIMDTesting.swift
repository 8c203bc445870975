// Direct entry into the SIMD/FPU units for unit tests (release-mode tests cannot use
// @testable import).

extension CPU {
  /// Executes one `.sse`, `.mmx` or `.x87` instruction without the decoder or run loop: the caller
  /// sets `rip` to the next instruction's address first, as the run loop does.
  public func executeSIMDForTesting(_ instruction: Instruction) throws(Fault) {
    switch instruction.op {
    case .sse: try executeSSE(instruction)
    case .mmx: try executeMMX(instruction)
    case .x87: try executeX87(instruction)
    default: throw .invalidOpcode
    }
  }
}
