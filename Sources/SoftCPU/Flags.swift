// RFLAGS contract (the core engineer replaces the storage with lazy flags; signatures stay).

/// RFLAGS bit masks.
public enum RFlags {
  public static let cf: UInt64 = 1 << 0
  public static let pf: UInt64 = 1 << 2
  public static let af: UInt64 = 1 << 4
  public static let zf: UInt64 = 1 << 6
  public static let sf: UInt64 = 1 << 7
  public static let tf: UInt64 = 1 << 8
  public static let `if`: UInt64 = 1 << 9
  public static let df: UInt64 = 1 << 10
  public static let of: UInt64 = 1 << 11
  public static let iopl: UInt64 = 3 << 12
  public static let nt: UInt64 = 1 << 14
  public static let rf: UInt64 = 1 << 16
  public static let vm: UInt64 = 1 << 17
  public static let ac: UInt64 = 1 << 18
  public static let vif: UInt64 = 1 << 19
  public static let vip: UInt64 = 1 << 20
  public static let id: UInt64 = 1 << 21
  /// The six arithmetic status flags.
  public static let status: UInt64 = cf | pf | af | zf | sf | of
}

extension CPU {
  /// Full RFLAGS with lazily computed status flags materialized. Setting it replaces all flags.
  public var rflags: UInt64 {
    get { storedFlags | 0x2 }
    set { storedFlags = newValue | 0x2 }
  }

  /// Replaces CF, PF, AF, ZF, SF and OF with those in `bits` (RFLAGS layout); other flags unchanged.
  @inline(__always)
  public func setStatusFlags(_ bits: UInt64) {
    storedFlags = (storedFlags & ~RFlags.status) | (bits & RFlags.status)
  }
}
