// SSE/SSE2 unit (owned by the SIMD/FPU engineer). Placeholder until it lands.

extension CPU {
  /// Executes an instruction the decoder classified as `.sse`.
  func executeSSE(_ instruction: Instruction) throws(Fault) {
    throw .invalidOpcode
  }
}
