/// An x86 exception raised while executing an instruction. Thrown with typed throws (no
/// allocation) from memory accesses and instruction handlers up to the execution loop,
/// which delivers it to the guest (part 2) or reports it (part 1 tests).
public struct Fault: Error, Equatable, Sendable {
  /// Exception vector (0 = #DE, 6 = #UD, 13 = #GP, 14 = #PF, ...).
  public var vector: UInt8
  /// Error code pushed by the exception, when the vector has one.
  public var errorCode: UInt32?
  /// Faulting linear address for #PF (becomes CR2).
  public var address: UInt64

  public init(vector: UInt8, errorCode: UInt32? = nil, address: UInt64 = 0) {
    self.vector = vector
    self.errorCode = errorCode
    self.address = address
  }

  /// #DE: divide error.
  public static let divideError = Fault(vector: 0)
  /// #DB: debug exception.
  public static let debug = Fault(vector: 1)
  /// #BP: breakpoint (INT3).
  public static let breakpoint = Fault(vector: 3)
  /// #OF: overflow (INTO).
  public static let overflow = Fault(vector: 4)
  /// #BR: bound range exceeded.
  public static let boundRange = Fault(vector: 5)
  /// #UD: invalid opcode.
  public static let invalidOpcode = Fault(vector: 6)
  /// #NM: device not available.
  public static let deviceNotAvailable = Fault(vector: 7)
  /// #MF: x87 floating-point error.
  public static let x87Error = Fault(vector: 16)
  /// #AC: alignment check.
  public static let alignmentCheck = Fault(vector: 17)
  /// #XM: SIMD floating-point exception.
  public static let simdError = Fault(vector: 19)

  /// #GP(0) for a non-canonical linear address, as the page walk raises it. `address` keeps the
  /// address, so the execution loop can tell a reference through SS, which raises #SS(0)
  /// instead (`CPU.faultForNonCanonicalAccess`); the fault delivered has no address.
  public static func nonCanonical(_ linear: UInt64) -> Fault { Fault(vector: 13, errorCode: 0, address: linear) }

  /// Whether this is `nonCanonical` (a non-canonical address is never 0).
  public var isNonCanonicalAccess: Bool { vector == 13 && address != 0 }

  /// #GP with an error code (usually a selector, or 0).
  public static func generalProtection(_ code: UInt32 = 0) -> Fault { Fault(vector: 13, errorCode: code) }
  /// #SS with an error code.
  public static func stackFault(_ code: UInt32 = 0) -> Fault { Fault(vector: 12, errorCode: code) }
  /// #NP: segment not present.
  public static func segmentNotPresent(_ code: UInt32) -> Fault { Fault(vector: 11, errorCode: code) }
  /// #TS: invalid TSS.
  public static func invalidTSS(_ code: UInt32) -> Fault { Fault(vector: 10, errorCode: code) }
  /// #PF with its error code and faulting linear address.
  public static func pageFault(_ code: UInt32, address: UInt64) -> Fault {
    Fault(vector: 14, errorCode: code, address: address)
  }
}
