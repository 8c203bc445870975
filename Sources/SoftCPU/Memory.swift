import CShim
import Synchronization
import VMCore

// Memory access for instruction handlers. Signatures are the contract shared with the SIMD/FPU
// units; the implementation is the software TLB fast path (TLB.swift) with slow paths below.
//
// During a handler, `rip` already holds the address of the next instruction.

extension CPU {
  /// Linear address of the instruction's memory operand: segment base + base + index << scale
  /// + displacement, truncated to the address size (RIP-relative uses the next instruction's address).
  @inline(__always)
  public func linearAddress(_ instruction: Instruction) -> UInt64 {
    operandAddress(instruction)
  }

  /// `linearAddress`, always inlined (the core's handlers use this one).
  @_transparent
  func operandAddress(_ instruction: Instruction) -> UInt64 {
    segmentBase[Int(instruction.segment)] &+ effectiveAddress(instruction)
  }

  /// Offset part of the memory operand (what LEA computes), truncated to the address size.
  @_transparent
  func effectiveAddress(_ instruction: Instruction) -> UInt64 {
    var offset = UInt64(bitPattern: instruction.displacement)
    if instruction.base < 16 {
      offset &+= gpr[Int(instruction.base)]
    } else if instruction.base == Instruction.ripRelative {
      offset &+= rip
    }
    if instruction.index != Instruction.noRegister {
      offset &+= gpr[Int(instruction.index)] << UInt64(instruction.scaleShift)
    }
    if instruction.addressSize != 8 {
      offset &= instruction.addressSize == 4 ? 0xFFFF_FFFF : 0xFFFF
    }
    return offset
  }

  // MARK: Fast paths

  /// Host address for reading `size` bytes at `linear` when the read TLB hits.
  @_transparent
  func readHost(_ linear: UInt64, _ size: UInt64) -> UnsafeMutableRawPointer? {
    let entry = readTLB[tlbIndex(linear)]
    if entry.tag == (linear & ~0xFFF) | tlbTagExtra && linear & 0xFFF <= 0x1000 - size {
      return UnsafeMutableRawPointer(bitPattern: UInt(linear &+ entry.delta))
    }
    return nil
  }

  /// Host address for writing `size` bytes at `linear` when the write TLB hits.
  @_transparent
  func writeHost(_ linear: UInt64, _ size: UInt64) -> UnsafeMutableRawPointer? {
    let entry = writeTLB[tlbIndex(linear)]
    if entry.tag == (linear & ~0xFFF) | tlbTagExtra && linear & 0xFFF <= 0x1000 - size {
      return UnsafeMutableRawPointer(bitPattern: UInt(linear &+ entry.delta))
    }
    return nil
  }

  /// Host address for a read-modify-write of `size` bytes at `linear`, filling the write TLB
  /// on a miss (which also invalidates code on the page). Nil for MMIO and page-crossing
  /// accesses: the caller then uses separate reads and writes.
  @_transparent
  func modifyHost(_ linear: UInt64, _ size: UInt64) throws(Fault) -> UnsafeMutableRawPointer? {
    if let host = writeHost(linear, size) { return host }
    return try modifyHostSlow(linear, size)
  }

  /// Reads a byte at a linear address.
  @inline(__always) public func read8(_ linear: UInt64) throws(Fault) -> UInt8 { try load8(linear) }
  /// Reads a word at a linear address.
  @inline(__always) public func read16(_ linear: UInt64) throws(Fault) -> UInt16 { try load16(linear) }
  /// Reads a doubleword at a linear address.
  @inline(__always) public func read32(_ linear: UInt64) throws(Fault) -> UInt32 { try load32(linear) }
  /// Reads a quadword at a linear address.
  @inline(__always) public func read64(_ linear: UInt64) throws(Fault) -> UInt64 { try load64(linear) }
  /// Writes a byte at a linear address.
  @inline(__always) public func write8(_ linear: UInt64, _ value: UInt8) throws(Fault) { try store8(linear, value) }
  /// Writes a word at a linear address.
  @inline(__always) public func write16(_ linear: UInt64, _ value: UInt16) throws(Fault) { try store16(linear, value) }
  /// Writes a doubleword at a linear address.
  @inline(__always) public func write32(_ linear: UInt64, _ value: UInt32) throws(Fault) { try store32(linear, value) }
  /// Writes a quadword at a linear address.
  @inline(__always) public func write64(_ linear: UInt64, _ value: UInt64) throws(Fault) { try store64(linear, value) }
  // Internal fast paths (always inlined into the interpreter).
  @_transparent func load8(_ linear: UInt64) throws(Fault) -> UInt8 {
    if let host = readHost(linear, 1) { return hv_load8(host) }
    return UInt8(truncatingIfNeeded: try readSlow(linear, 1))
  }
  @_transparent func load16(_ linear: UInt64) throws(Fault) -> UInt16 {
    if let host = readHost(linear, 2) { return hv_load16(host) }
    return UInt16(truncatingIfNeeded: try readSlow(linear, 2))
  }
  @_transparent func load32(_ linear: UInt64) throws(Fault) -> UInt32 {
    if let host = readHost(linear, 4) { return hv_load32(host) }
    return UInt32(truncatingIfNeeded: try readSlow(linear, 4))
  }
  @_transparent func load64(_ linear: UInt64) throws(Fault) -> UInt64 {
    if let host = readHost(linear, 8) { return hv_load64(host) }
    return try readSlow(linear, 8)
  }
  @_transparent func store8(_ linear: UInt64, _ value: UInt8) throws(Fault) {
    if let host = writeHost(linear, 1) { return hv_store8(host, value) }
    try writeSlow(linear, 1, UInt64(value))
  }
  @_transparent func store16(_ linear: UInt64, _ value: UInt16) throws(Fault) {
    if let host = writeHost(linear, 2) { return hv_store16(host, value) }
    try writeSlow(linear, 2, UInt64(value))
  }
  @_transparent func store32(_ linear: UInt64, _ value: UInt32) throws(Fault) {
    if let host = writeHost(linear, 4) { return hv_store32(host, value) }
    try writeSlow(linear, 4, UInt64(value))
  }
  @_transparent func store64(_ linear: UInt64, _ value: UInt64) throws(Fault) {
    if let host = writeHost(linear, 8) { return hv_store64(host, value) }
    try writeSlow(linear, 8, value)
  }
  /// Reads 16 bytes; when `aligned`, a misaligned address raises #GP(0) as MOVAPS/MOVDQA do.
  @inline(__always) public func read128(_ linear: UInt64, aligned: Bool) throws(Fault) -> XMMValue {
    if aligned && linear & 15 != 0 { throw .generalProtection(0) }
    if let host = readHost(linear, 16) {
      return XMMValue(hv_load64(host), hv_load64(host + 8))
    }
    let low = try read64(linear)
    let high = try read64(linear &+ 8)
    return XMMValue(low, high)
  }
  /// Writes 16 bytes; when `aligned`, a misaligned address raises #GP(0).
  @inline(__always) public func write128(_ linear: UInt64, _ value: XMMValue, aligned: Bool) throws(Fault) {
    if aligned && linear & 15 != 0 { throw .generalProtection(0) }
    if let host = writeHost(linear, 16) {
      hv_store64(host, value[0])
      hv_store64(host + 8, value[1])
      return
    }
    // Probe both halves before storing so a fault leaves memory unchanged.
    try probeWrite(linear, 16)
    try write64(linear, value[0])
    try write64(linear &+ 8, value[1])
  }

  /// Reads `size` (1, 2, 4, 8) bytes, zero-extended.
  @_transparent
  func readMemory(_ linear: UInt64, size: UInt8) throws(Fault) -> UInt64 {
    switch size {
    case 8: return try load64(linear)
    case 4: return UInt64(try load32(linear))
    case 2: return UInt64(try load16(linear))
    default: return UInt64(try load8(linear))
    }
  }

  /// Writes the low `size` (1, 2, 4, 8) bytes of `value`.
  @_transparent
  func writeMemory(_ linear: UInt64, size: UInt8, _ value: UInt64) throws(Fault) {
    switch size {
    case 8: try store64(linear, value)
    case 4: try store32(linear, UInt32(truncatingIfNeeded: value))
    case 2: try store16(linear, UInt16(truncatingIfNeeded: value))
    default: try store8(linear, UInt8(truncatingIfNeeded: value))
    }
  }

  // MARK: Slow paths

  /// Fills the read TLB for the page of `linear` (physical `physical`, RAM at `host`).
  /// The entry it replaces in the primary way moves to the victim way (`tlbSlots`).
  @_transparent
  func fillTLB(_ table: UnsafeMutablePointer<TLBEntry>, linear: UInt64, target: UInt64) {
    let page = linear & ~0xFFF
    let index = tlbIndex(linear)
    let victim = index + tlbEntries
    let tag = page | tlbTagExtra
    let mark = globalMark(of: table)
    let displaced = table[index]
    if displaced.tag != tlbInvalidTag && displaced.tag != tag {
      table[victim] = displaced
      tlbGlobalMarks[victim] = tlbGlobalMarks[victim] & ~mark | tlbGlobalMarks[index] & mark
    } else if table[victim].tag == tag {
      table[victim] = TLBEntry()
    }
    table[index] = TLBEntry(tag: tag, delta: target &- page)
    if tlbFills < tlbFillRecordCapacity { tlbFilledIndices[tlbFills] = UInt16(truncatingIfNeeded: index) }
    tlbFills &+= 1
    if lastTranslationGlobal {
      tlbGlobalMarks[index] |= mark
    } else {
      tlbGlobalMarks[index] &= ~mark
    }
  }

  /// The `TLBGlobalMark` bit of `table`.
  @_transparent
  func globalMark(of table: UnsafeMutablePointer<TLBEntry>) -> UInt8 {
    table == readTLB ? TLBGlobalMark.read : table == writeTLB ? TLBGlobalMark.write : TLBGlobalMark.fetch
  }

  /// After a primary-way miss for `linear`: when the victim way holds its page, swaps the two
  /// ways (entries and global marks) so the fast path hits, and returns true.
  @inline(__always)
  func promoteVictim(_ table: UnsafeMutablePointer<TLBEntry>, _ linear: UInt64) -> Bool {
    let index = tlbIndex(linear)
    let victim = index + tlbEntries
    guard table[victim].tag == (linear & ~0xFFF) | tlbTagExtra else { return false }
    let primary = table[index]
    table[index] = table[victim]
    table[victim] = primary
    let mark = globalMark(of: table)
    let marks = tlbGlobalMarks[index]
    tlbGlobalMarks[index] = marks & ~mark | tlbGlobalMarks[victim] & mark
    tlbGlobalMarks[victim] = tlbGlobalMarks[victim] & ~mark | marks & mark
    return true
  }

  @inline(never)
  func readSlow(_ linear: UInt64, _ size: UInt64) throws(Fault) -> UInt64 {
    if linear & 0xFFF <= 0x1000 - size {
      var host = promoteVictim(readTLB, linear) ? readHost(linear, size) : nil
      if host == nil {
        let physical = try translate(linear, access: .read)
        guard let ram = ramPointer(physical) else {
          if physical & ~0xFFF == system.relocatedAPICPage, let apic = system.localAPIC {
            return apic.mmioRead(offset: physical & 0xFFF, size: Int(size))
          }
          try checkBacked(physical, linear: linear, access: .read)
          return bus.mmioRead(physical, size: Int(size))
        }
        fillTLB(readTLB, linear: linear, target: UInt64(UInt(bitPattern: ram)) & ~0xFFF)
        host = ram
      }
      let pointer = host.unsafelyUnwrapped
      switch size {
      case 1: return UInt64(hv_load8(pointer))
      case 2: return UInt64(hv_load16(pointer))
      case 4: return UInt64(hv_load32(pointer))
      default: return hv_load64(pointer)
      }
    }
    // Crossing a page boundary: byte by byte.
    var value: UInt64 = 0
    for byteIndex in 0..<size {
      value |= UInt64(try read8(linear &+ byteIndex)) << (8 * byteIndex)
    }
    return value
  }

  /// Checks that `size` bytes at `linear` can be written, without writing.
  func probeWrite(_ linear: UInt64, _ size: UInt64) throws(Fault) {
    let last = linear &+ size &- 1
    for address in [linear, last] {
      let physical = try translate(address, access: .write)
      if ramPointer(physical) == nil { try checkBacked(physical, linear: address, access: .write) }
    }
  }

  /// Host address of a RAM page for writing; marks it dirty, invalidates decoded code on it and
  /// fills the write TLB.
  @_transparent
  func writableRAM(_ linear: UInt64, physical: UInt64) -> UnsafeMutableRawPointer? {
    guard let host = ramPointer(physical) else { return nil }
    let page = physical >> 12
    // Dirty logging: a write entry is filled only here, and taking the dirty pages drops every
    // write entry, so marking the page at fill time records every later store through it.
    memory.dirtyPages.mark(page: page)
    if codePageHead[Int(page)] != 0 {
      invalidateCodePage(page)
    }
    if !siblings.isEmpty && siblingsHoldCode(page) {
      // Another vCPU runs code from this page: no write entry, and tell it after the store.
      noteStoreToSiblingCode(page)
      fillTLB(readTLB, linear: linear, target: UInt64(UInt(bitPattern: host)) & ~0xFFF)
      return host
    }
    fillTLB(writeTLB, linear: linear, target: UInt64(UInt(bitPattern: host)) & ~0xFFF)
    // A write entry implies the page is readable too.
    fillTLB(readTLB, linear: linear, target: UInt64(UInt(bitPattern: host)) & ~0xFFF)
    return host
  }

  @inline(never)
  func writeSlow(_ linear: UInt64, _ size: UInt64, _ value: UInt64) throws(Fault) {
    if linear & 0xFFF <= 0x1000 - size {
      // A victim-way hit is a page already writable, dirty-marked and free of code.
      let promoted = promoteVictim(writeTLB, linear) ? writeHost(linear, size) : nil
      let physical = promoted == nil ? try translate(linear, access: .write) : 0
      if let host = promoted ?? writableRAM(linear, physical: physical) {
        switch size {
        case 1: hv_store8(host, UInt8(truncatingIfNeeded: value))
        case 2: hv_store16(host, UInt16(truncatingIfNeeded: value))
        case 4: hv_store32(host, UInt32(truncatingIfNeeded: value))
        default: hv_store64(host, value)
        }
        return
      }
      if physical & ~0xFFF == system.relocatedAPICPage, let apic = system.localAPIC {
        apic.mmioWrite(offset: physical & 0xFFF, size: Int(size), value: value)
        return
      }
      try checkBacked(physical, linear: linear, access: .write)
      bus.mmioWrite(physical, size: Int(size), value: value)
      return
    }
    // Crossing a page boundary: check both pages first, then store byte by byte.
    try probeWrite(linear, size)
    for byteIndex in 0..<size {
      try write8(linear &+ byteIndex, UInt8(truncatingIfNeeded: value >> (8 * byteIndex)))
    }
  }

  @inline(never)
  func modifyHostSlow(_ linear: UInt64, _ size: UInt64) throws(Fault) -> UnsafeMutableRawPointer? {
    if linear & 0xFFF <= 0x1000 - size {
      if promoteVictim(writeTLB, linear), let host = writeHost(linear, size) { return host }
      let physical = try translate(linear, access: .write)
      if let host = writableRAM(linear, physical: physical) { return host }
      try checkBacked(physical, linear: linear, access: .write)
      return nil
    }
    try probeWrite(linear, size)
    return nil
  }
}
