// x87 FPU unit (owned by the SIMD/FPU engineer). Placeholder until it lands.

extension CPU {
  /// Executes an x87 escape instruction (D8-DF).
  func executeX87(_ instruction: Instruction) throws(Fault) {
    throw .invalidOpcode
  }
}
