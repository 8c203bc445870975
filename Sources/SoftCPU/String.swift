import Glibc

// String instructions MOVS/CMPS/STOS/LODS/SCAS/INS/OUTS with REP/REPE/REPNE and DF.
// RSI/RDI/RCX are used at the address size (16/32-bit forms update SI/ESI... as hardware does,
// 32-bit writes zero-extending). The source segment is DS or the override; the destination is
// ES. REP MOVS/STOS copy page-sized chunks directly in host memory when both sides are RAM
// (element by element forward, so overlapping copies replicate exactly as hardware does).
// A REP instruction runs at most `stringIterationBudget` elements per execution; then `rip`
// is set back to it and the block ends, so stop requests (and interrupts, part 2) are seen.

let stringIterationBudget: UInt64 = 1 << 20

extension CPU {
  func stringInstruction(_ ins: Instruction) throws(Fault) {
    let size = ins.operandSize
    let step = UInt64(size)
    let down = storedFlags & RFlags.df != 0
    let delta = down ? 0 &- step : step
    let addressSize = ins.addressSize
    let mask = sizeMask(addressSize)
    let sourceBase = segmentBase[Int(ins.segment)]
    let destinationBase = segmentBase[Int(SegmentIndex.es)]
    let repeated = ins.prefixes & (Instruction.Prefix.rep | Instruction.Prefix.repne) != 0
    let op = ins.op
    if op == .ins || op == .outs {
      try checkIOPermission(port: UInt16(truncatingIfNeeded: gpr[2]), size: Int(min(size, 4)))
    }

    var count = repeated ? gpr[1] & mask : 1
    if count == 0 { return }
    var source = gpr[6] & mask
    var destination = gpr[7] & mask
    var budget = stringIterationBudget
    let conditional = op == .cmps || op == .scas
    let whileEqual = ins.prefixes & Instruction.Prefix.rep != 0

    while count != 0 && budget != 0 {
      // Bulk path for forward REP MOVS/STOS within one page on each side.
      if repeated && !down && (op == .stos || op == .movs) && count > 1 {
        let destinationLinear = destinationBase &+ destination
        var elements = min(count, (0x1000 - (destinationLinear & 0xFFF)) / step)
        if addressSize != 8 { elements = min(elements, ((mask &- destination) / step) &+ 1) }
        var sourceHost: UnsafeMutableRawPointer? = nil
        if op == .movs && elements > 0 {
          let sourceLinear = sourceBase &+ source
          elements = min(elements, (0x1000 - (sourceLinear & 0xFFF)) / step)
          if addressSize != 8 { elements = min(elements, ((mask &- source) / step) &+ 1) }
          if elements > 0 { sourceHost = try readableHost(sourceLinear, elements * step) }
          if sourceHost == nil { elements = 0 }
        }
        elements = min(elements, budget)
        if elements > 1, let destinationHost = try modifyHost(destinationLinear, elements * step) {
          if op == .stos {
            fillHost(destinationHost, value: gpr[0], size: size, count: Int(elements))
          } else {
            copyHost(destinationHost, sourceHost.unsafelyUnwrapped, size: size, count: Int(elements))
            source = (source &+ elements &* step) & mask
            writeRegister(6, size: addressSize, source)
          }
          destination = (destination &+ elements &* step) & mask
          writeRegister(7, size: addressSize, destination)
          count -= elements
          budget -= elements
          writeRegister(1, size: addressSize, count)
          continue
        }
      }

      switch op {
      case .movs:
        let value = try readMemory(sourceBase &+ source, size: size)
        try writeMemory(destinationBase &+ destination, size: size, value)
        source = (source &+ delta) & mask
        destination = (destination &+ delta) & mask
        writeRegister(6, size: addressSize, source)
        writeRegister(7, size: addressSize, destination)
      case .stos:
        try writeMemory(destinationBase &+ destination, size: size, gpr[0])
        destination = (destination &+ delta) & mask
        writeRegister(7, size: addressSize, destination)
      case .lods:
        writeRegister(0, size: size, try readMemory(sourceBase &+ source, size: size))
        source = (source &+ delta) & mask
        writeRegister(6, size: addressSize, source)
      case .cmps:
        let left = try readMemory(sourceBase &+ source, size: size)
        let right = try readMemory(destinationBase &+ destination, size: size)
        recordFlags(.sub, size: size, dst: left, src: right, result: (left &- right) & sizeMask(size))
        source = (source &+ delta) & mask
        destination = (destination &+ delta) & mask
        writeRegister(6, size: addressSize, source)
        writeRegister(7, size: addressSize, destination)
      case .scas:
        let left = readRegister(0, size: size)
        let right = try readMemory(destinationBase &+ destination, size: size)
        recordFlags(.sub, size: size, dst: left, src: right, result: (left &- right) & sizeMask(size))
        destination = (destination &+ delta) & mask
        writeRegister(7, size: addressSize, destination)
      case .ins:
        let value = UInt64(bus.portRead(UInt16(truncatingIfNeeded: gpr[2]), size: Int(size)))
        try writeMemory(destinationBase &+ destination, size: size, value)
        destination = (destination &+ delta) & mask
        writeRegister(7, size: addressSize, destination)
      default:  // outs
        let value = try readMemory(sourceBase &+ source, size: size)
        bus.portWrite(UInt16(truncatingIfNeeded: gpr[2]), size: Int(size), value: UInt32(truncatingIfNeeded: value))
        source = (source &+ delta) & mask
        writeRegister(6, size: addressSize, source)
      }
      if !repeated { return }
      count -= 1
      budget -= 1
      writeRegister(1, size: addressSize, count)
      if conditional && zeroFlag != whileEqual { return }
    }
    if count != 0 {
      // Budget exhausted: resume this instruction after the block ends.
      rip = rip &- UInt64(ins.length)
      blockInvalidated = true
    }
  }

  /// Host address for reading `length` bytes within one page (filling the read TLB), or nil.
  func readableHost(_ linear: UInt64, _ length: UInt64) throws(Fault) -> UnsafeMutableRawPointer? {
    if let host = readHost(linear, length) { return host }
    if promoteVictim(readTLB, linear), let host = readHost(linear, length) { return host }
    let physical = try translate(linear, access: .read)
    guard let host = ramPointer(physical) else { return nil }
    fillTLB(readTLB, linear: linear, target: UInt64(UInt(bitPattern: host)) & ~0xFFF)
    return host
  }

  @_transparent
  func fillHost(_ host: UnsafeMutableRawPointer, value: UInt64, size: UInt8, count: Int) {
    switch size {
    case 1: memset(host, Int32(value & 0xFF), count)
    case 2:
      let pointer = host.assumingMemoryBound(to: UInt16.self)
      for index in 0..<count { (pointer + index).pointee = UInt16(truncatingIfNeeded: value) }
    case 4:
      for index in 0..<count {
        host.storeBytes(of: UInt32(truncatingIfNeeded: value), toByteOffset: index * 4, as: UInt32.self)
      }
    default:
      for index in 0..<count { host.storeBytes(of: value, toByteOffset: index * 8, as: UInt64.self) }
    }
  }

  @_transparent
  func copyHost(_ destination: UnsafeMutableRawPointer, _ source: UnsafeMutableRawPointer, size: UInt8, count: Int) {
    let bytes = count * Int(size)
    let distance = Int(bitPattern: destination) - Int(bitPattern: source)
    if distance >= bytes || distance <= -bytes || distance < 0 {
      // No overlap, or destination below source: a forward copy equals memmove.
      memmove(destination, source, bytes)
      return
    }
    // Destination overlaps ahead of the source: element-by-element forward copy replicates.
    for index in 0..<count {
      let offset = index * Int(size)
      switch size {
      case 1:
        destination.storeBytes(
          of: source.load(fromByteOffset: offset, as: UInt8.self), toByteOffset: offset, as: UInt8.self)
      case 2:
        destination.storeBytes(
          of: source.loadUnaligned(fromByteOffset: offset, as: UInt16.self), toByteOffset: offset, as: UInt16.self)
      case 4:
        destination.storeBytes(
          of: source.loadUnaligned(fromByteOffset: offset, as: UInt32.self), toByteOffset: offset, as: UInt32.self)
      default:
        destination.storeBytes(
          of: source.loadUnaligned(fromByteOffset: offset, as: UInt64.self), toByteOffset: offset, as: UInt64.self)
      }
    }
  }
}
