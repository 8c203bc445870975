/// Execution handler selector for a decoded instruction. The core owns this list; `.sse`
/// and `.x87` hand the instruction to the SIMD and FPU units.
public enum Op: UInt16, Sendable {
  case invalid
  /// SSE/SSE2 (and later) instruction: see `CPU.executeSSE`.
  case sse
  /// x87 escape D8-DF: see `CPU.executeX87`.
  case x87
}
