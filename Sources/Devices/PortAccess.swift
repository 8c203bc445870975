import VMCore

/// Helpers shared by the 8-bit ISA devices: normalising guest-chosen access sizes and
/// splitting wide accesses into byte accesses, as the ISA bus does.
enum PortAccess {
  /// The access width actually performed for a guest-chosen `size`: 1 to 4 bytes.
  /// Any other value (0, negative, 8...) is clamped so a hostile size never misbehaves.
  @inline(__always)
  static func width(_ size: Int) -> Int { size <= 1 ? 1 : min(size, 4) }

  /// The mask of the low `size` bytes of a 32-bit value.
  @inline(__always)
  static func mask(_ size: Int) -> UInt32 {
    let bytes = width(size)
    return bytes >= 4 ? 0xFFFF_FFFF : (UInt32(1) << (bytes * 8)) - 1
  }

  /// Reads `size` bytes at consecutive ports starting at `port`; `readByte` returns `nil` for
  /// ports the device does not decode, which read as all ones (nothing drives the bus).
  @inline(__always)
  static func readBytes(port: UInt16, size: Int, _ readByte: (UInt16) -> UInt8?) -> UInt32 {
    var result: UInt32 = 0
    for index in 0..<width(size) {
      let byte = readByte(port &+ UInt16(index)) ?? 0xFF
      result |= UInt32(byte) << (index * 8)
    }
    return result
  }

  /// Writes the low `size` bytes of `value` to consecutive ports starting at `port`, lowest first.
  @inline(__always)
  static func writeBytes(port: UInt16, size: Int, value: UInt32, _ writeByte: (UInt16, UInt8) -> Void) {
    for index in 0..<width(size) {
      writeByte(port &+ UInt16(index), UInt8(truncatingIfNeeded: value >> (index * 8)))
    }
  }
}

/// Drives an interrupt line and remembers its level, so the sink only hears about changes.
/// Not thread-safe on its own: a device keeps it inside its locked state.
struct TrackedInterruptLine {
  let line: InterruptLine
  private(set) var level = false

  init(_ line: InterruptLine) { self.line = line }

  /// Drives the line to `newLevel` if it differs from the current level.
  mutating func set(_ newLevel: Bool) {
    guard newLevel != level else { return }
    level = newLevel
    line.set(newLevel)
  }

  /// Records `restoredLevel` as the line's level without driving it (a machine-state restore:
  /// the interrupt controllers restore their own view of the line).
  mutating func restoreLevel(_ restoredLevel: Bool) { level = restoredLevel }
}
