import VMCore

// Memory access contract for instruction handlers (the core engineer owns and optimizes the
// implementation: software TLB, paging, code-page write tracking). Signatures stay stable.
//
// During a handler, `rip` already holds the address of the next instruction.

extension CPU {
  /// Linear address of the instruction's memory operand: segment base + base + index << scale
  /// + displacement, truncated to the address size (RIP-relative uses the next instruction's address).
  @inline(__always)
  public func linearAddress(_ instruction: Instruction) -> UInt64 {
    var offset = UInt64(bitPattern: instruction.displacement)
    if instruction.base == Instruction.ripRelative {
      offset &+= rip
    } else if instruction.base != Instruction.noRegister {
      offset &+= gpr[Int(instruction.base)]
    }
    if instruction.index != Instruction.noRegister {
      offset &+= gpr[Int(instruction.index)] << UInt64(instruction.scaleShift)
    }
    switch instruction.addressSize {
    case 4: offset &= 0xFFFF_FFFF
    case 2: offset &= 0xFFFF
    default: break
    }
    return segmentBase[Int(instruction.segment)] &+ offset
  }

  /// Translates a linear address for a data access; paging is the core engineer's to add.
  @inline(__always)
  func translate(_ linear: UInt64, write: Bool) throws(Fault) -> UInt64 {
    linear
  }

  @inline(__always)
  func readPhysical<T: FixedWidthInteger>(_ physical: UInt64, as: T.Type) -> T {
    if let pointer = memory.hostPointer(physical, length: UInt64(MemoryLayout<T>.size)) {
      return T(littleEndian: pointer.loadUnaligned(as: T.self))
    }
    var value: T = 0
    for byteIndex in 0..<MemoryLayout<T>.size {
      let address = physical &+ UInt64(byteIndex)
      let byte: UInt64
      if let pointer = memory.hostPointer(address) {
        byte = UInt64(pointer.load(as: UInt8.self))
      } else {
        byte = bus.mmioRead(address, size: 1) & 0xFF
      }
      value |= T(truncatingIfNeeded: byte << (8 * UInt64(byteIndex)))
    }
    return value
  }

  @inline(__always)
  func writePhysical<T: FixedWidthInteger>(_ physical: UInt64, _ value: T) {
    if let pointer = memory.hostPointer(physical, length: UInt64(MemoryLayout<T>.size)) {
      pointer.storeBytes(of: value.littleEndian, as: T.self)
      return
    }
    for byteIndex in 0..<MemoryLayout<T>.size {
      let address = physical &+ UInt64(byteIndex)
      let byte = UInt8(truncatingIfNeeded: UInt64(value) >> (8 * UInt64(byteIndex)))
      if let pointer = memory.hostPointer(address) {
        pointer.storeBytes(of: byte, as: UInt8.self)
      } else {
        bus.mmioWrite(address, size: 1, value: UInt64(byte))
      }
    }
  }

  /// Reads a byte at a linear address.
  @inline(__always) public func read8(_ linear: UInt64) throws(Fault) -> UInt8 {
    readPhysical(try translate(linear, write: false), as: UInt8.self)
  }
  /// Reads a word at a linear address.
  @inline(__always) public func read16(_ linear: UInt64) throws(Fault) -> UInt16 {
    readPhysical(try translate(linear, write: false), as: UInt16.self)
  }
  /// Reads a doubleword at a linear address.
  @inline(__always) public func read32(_ linear: UInt64) throws(Fault) -> UInt32 {
    readPhysical(try translate(linear, write: false), as: UInt32.self)
  }
  /// Reads a quadword at a linear address.
  @inline(__always) public func read64(_ linear: UInt64) throws(Fault) -> UInt64 {
    readPhysical(try translate(linear, write: false), as: UInt64.self)
  }
  /// Writes a byte at a linear address.
  @inline(__always) public func write8(_ linear: UInt64, _ value: UInt8) throws(Fault) {
    writePhysical(try translate(linear, write: true), value)
  }
  /// Writes a word at a linear address.
  @inline(__always) public func write16(_ linear: UInt64, _ value: UInt16) throws(Fault) {
    writePhysical(try translate(linear, write: true), value)
  }
  /// Writes a doubleword at a linear address.
  @inline(__always) public func write32(_ linear: UInt64, _ value: UInt32) throws(Fault) {
    writePhysical(try translate(linear, write: true), value)
  }
  /// Writes a quadword at a linear address.
  @inline(__always) public func write64(_ linear: UInt64, _ value: UInt64) throws(Fault) {
    writePhysical(try translate(linear, write: true), value)
  }
  /// Reads 16 bytes; when `aligned`, a misaligned address raises #GP(0) as MOVAPS/MOVDQA do.
  @inline(__always) public func read128(_ linear: UInt64, aligned: Bool) throws(Fault) -> XMMValue {
    if aligned && linear & 15 != 0 { throw .generalProtection(0) }
    let low = try read64(linear)
    let high = try read64(linear &+ 8)
    return XMMValue(low, high)
  }
  /// Writes 16 bytes; when `aligned`, a misaligned address raises #GP(0).
  @inline(__always) public func write128(_ linear: UInt64, _ value: XMMValue, aligned: Bool) throws(Fault) {
    if aligned && linear & 15 != 0 { throw .generalProtection(0) }
    try write64(linear, value[0])
    try write64(linear &+ 8, value[1])
  }
}
