import Synchronization
import VMCore

/// One 8259A (Intel 8259A datasheet): request, in-service and mask registers, the
/// initialization sequence and the operation command words.
struct PICChip {
  var irr: UInt8 = 0
  var isr: UInt8 = 0
  var imr: UInt8 = 0
  /// Input line levels, for edge detection.
  var lineLevels: UInt8 = 0
  /// Edge/level control register (ELCR at 0x4D0/0x4D1): a set bit makes that IRQ level-triggered.
  var elcr: UInt8 = 0
  /// ELCR bits that can be set (IRQ 0, 1, 2, 8 and 13 are always edge-triggered on a PC).
  let elcrWritable: UInt8
  /// ICW2: vector of IRQ 0 (low 3 bits zero).
  var vectorBase: UInt8 = 0
  /// 0 when operational, else the ICW (2, 3 or 4) the chip expects next on its odd port.
  var initStep = 0
  var expectsICW4 = false
  var singleMode = false
  var autoEOI = false
  var rotateOnAutoEOI = false
  var specialFullyNested = false
  var specialMask = false
  /// OCW3 read-register select: ISR instead of IRR on the even port.
  var readISR = false
  var pollPending = false
  /// The IRQ with the lowest priority; the highest is `(lowestPriority + 1) & 7`.
  var lowestPriority: UInt8 = 7

  init(elcrWritable: UInt8) { self.elcrWritable = elcrWritable }

  /// Priority rank of the highest-priority bit in `bits` (0 = highest), or 8 when empty.
  func priority(of bits: UInt8) -> Int {
    guard bits != 0 else { return 8 }
    for rank in 0..<8 where bits & (1 << ((Int(lowestPriority) + 1 + rank) & 7)) != 0 { return rank }
    return 8
  }

  func irq(atRank rank: Int) -> UInt8 { UInt8((Int(lowestPriority) + 1 + rank) & 7) }

  /// The IRQ this chip would present on INTR now, if any.
  func pendingIRQ(cascadeIRQ: UInt8?) -> UInt8? {
    let requests = irr & ~imr
    let requestRank = priority(of: requests)
    guard requestRank < 8 else { return nil }
    var inService = isr
    if specialMask { inService &= ~imr }
    // Special fully nested: the cascade input's own in-service bit does not block slave IRQs.
    if specialFullyNested, let cascade = cascadeIRQ { inService &= ~(1 << cascade) }
    return requestRank < priority(of: inService) ? irq(atRank: requestRank) : nil
  }

  mutating func setLine(_ irq: UInt8, level: Bool) {
    let bit: UInt8 = 1 << irq
    if elcr & bit != 0 {
      if level { irr |= bit } else { irr &= ~bit }
    } else if level && lineLevels & bit == 0 {
      irr |= bit
    }
    if level { lineLevels |= bit } else { lineLevels &= ~bit }
  }

  /// INTA for `irq`: clears an edge request, marks it in service (unless auto-EOI).
  mutating func acknowledge(_ irq: UInt8) {
    let bit: UInt8 = 1 << irq
    if elcr & bit == 0 { irr &= ~bit }
    if autoEOI {
      if rotateOnAutoEOI { lowestPriority = irq }
    } else {
      isr |= bit
    }
  }

  mutating func writeCommand(_ value: UInt8) {
    if value & 0x10 != 0 {
      // ICW1: restart initialization; the edge detector forgets pending edges.
      initStep = 2
      expectsICW4 = value & 0x01 != 0
      singleMode = value & 0x02 != 0
      irr = lineLevels & elcr
      isr = 0
      imr = 0
      autoEOI = false
      rotateOnAutoEOI = false
      specialFullyNested = false
      specialMask = false
      readISR = false
      pollPending = false
      lowestPriority = 7
      return
    }
    if value & 0x08 != 0 {
      // OCW3.
      if value & 0x04 != 0 { pollPending = true }
      if value & 0x02 != 0 { readISR = value & 0x01 != 0 }
      if value & 0x40 != 0 { specialMask = value & 0x20 != 0 }
      return
    }
    // OCW2.
    let level = value & 7
    switch value >> 5 {
    case 0: rotateOnAutoEOI = false
    case 4: rotateOnAutoEOI = true
    case 1, 5:
      // Non-specific EOI (with rotation for 5): the highest-priority in-service IRQ.
      let rank = priority(of: isr)
      guard rank < 8 else { return }
      let irq = irq(atRank: rank)
      isr &= ~(1 << irq)
      if value >> 5 == 5 { lowestPriority = irq }
    case 3: isr &= ~(1 << level)
    case 7:
      isr &= ~(1 << level)
      lowestPriority = level
    case 6: lowestPriority = level
    default: break
    }
  }

  mutating func writeData(_ value: UInt8) {
    switch initStep {
    case 2:
      vectorBase = value & 0xF8
      initStep = singleMode ? (expectsICW4 ? 4 : 0) : 3
    case 3:
      initStep = expectsICW4 ? 4 : 0
    case 4:
      autoEOI = value & 0x02 != 0
      specialFullyNested = value & 0x10 != 0
      initStep = 0
    default:
      imr = value
    }
  }
}

/// The PC's two cascaded 8259A PICs: master at ports 0x20-0x21 (IRQ 0-7), slave at 0xA0-0xA1
/// (IRQ 8-15) on the master's IRQ 2, and the ELCR at 0x4D0-0x4D1.
///
/// The master's INTR output goes to the BSP's LINT0 (see `setOutputHandler`); the CPU side
/// runs INTA cycles with `acknowledge()`. Lines are driven with `setIRQ(_:level:)`.
/// Thread-safe.
public final class DualPIC: PortIODevice, ExternalInterruptController {
  /// Master command/data ports.
  public static let masterPorts: UInt16 = 0x20
  /// Slave command/data ports.
  public static let slavePorts: UInt16 = 0xA0
  /// ELCR ports (master, slave).
  public static let elcrPorts: UInt16 = 0x4D0

  private struct Chips {
    var master = PICChip(elcrWritable: 0xF8)
    var slave = PICChip(elcrWritable: 0xDE)
    var output = false
    var outputHandler: (@Sendable (Bool) -> Void)?

    /// The master sees the slave's INTR as a level on IRQ 2.
    mutating func propagateCascade() {
      let slaveRequest = slave.pendingIRQ(cascadeIRQ: nil) != nil
      if slaveRequest { master.irr |= 0x04 } else { master.irr &= ~0x04 }
    }

    var masterOutput: Bool { master.pendingIRQ(cascadeIRQ: 2) != nil }
  }

  private let chips: Mutex<Chips>

  /// Creates both PICs as a PC BIOS leaves them: initialized with vector bases 0x08 and 0x70,
  /// cascaded on IRQ 2, every IRQ masked.
  public init() {
    var initial = Chips()
    initial.master.vectorBase = 0x08
    initial.master.imr = 0xFF
    initial.slave.vectorBase = 0x70
    initial.slave.imr = 0xFF
    chips = Mutex(initial)
  }

  /// Registers the PIC and ELCR ports on `bus`.
  public func register(on bus: IOBus) throws(IOBusError) {
    try bus.registerPorts(Self.masterPorts, count: 2, device: self)
    try bus.registerPorts(Self.slavePorts, count: 2, device: self)
    try bus.registerPorts(Self.elcrPorts, count: 2, device: self)
  }

  /// Sets the closure told about every change of the master's INTR output. It runs with the PIC
  /// locked, so changes arrive in order; it must not call back into the PIC (typically
  /// `bspLocalAPIC.setLocalInterruptLine(0, level:)`).
  public func setOutputHandler(_ handler: @escaping @Sendable (Bool) -> Void) {
    chips.withLock {
      $0.outputHandler = handler
      handler($0.output)
    }
  }

  /// Drives ISA IRQ `irq` (0-15) to `level`.
  public func setIRQ(_ irq: Int, level: Bool) {
    guard (0..<16).contains(irq), irq != 2 else { return }
    mutate { chips in
      if irq < 8 {
        chips.master.setLine(UInt8(irq), level: level)
      } else {
        chips.slave.setLine(UInt8(irq - 8), level: level)
      }
    }
  }

  /// Whether ISA IRQ `irq` (0-7, on the master) is requested and not masked: it waits for an
  /// INTA cycle.
  public func isRequestPending(_ irq: Int) -> Bool {
    guard (0..<8).contains(irq) else { return false }
    return chips.withLock { ($0.master.irr & ~$0.master.imr) & (1 << UInt8(irq)) != 0 }
  }

  /// Whether the master's INTR output is asserted.
  public var hasPendingInterrupt: Bool { chips.withLock { $0.output } }

  /// The INTA cycle: returns the vector of the highest-priority request and marks it in service.
  /// When the request went away, returns the spurious vector (IRQ 7 or, via the slave, IRQ 15)
  /// without setting an in-service bit.
  public func acknowledge() -> UInt8 {
    mutate { chips in
      guard let irq = chips.master.pendingIRQ(cascadeIRQ: 2) else {
        return chips.master.vectorBase | 7
      }
      chips.master.acknowledge(irq)
      guard irq == 2 else { return chips.master.vectorBase | irq }
      guard let slaveIRQ = chips.slave.pendingIRQ(cascadeIRQ: nil) else { return chips.slave.vectorBase | 7 }
      chips.slave.acknowledge(slaveIRQ)
      return chips.slave.vectorBase | slaveIRQ
    }
  }

  public func portRead(port: UInt16, size: Int) -> UInt32 {
    mutate { chips -> UInt32 in
      switch port {
      case Self.masterPorts, Self.slavePorts:
        let isMaster = port == Self.masterPorts
        var chip = isMaster ? chips.master : chips.slave
        let value: UInt8
        if chip.pollPending {
          chip.pollPending = false
          if let irq = chip.pendingIRQ(cascadeIRQ: isMaster ? 2 : nil) {
            chip.acknowledge(irq)
            value = 0x80 | irq
          } else {
            value = 0
          }
        } else {
          value = chip.readISR ? chip.isr : chip.irr
        }
        if isMaster { chips.master = chip } else { chips.slave = chip }
        return UInt32(value)
      case Self.masterPorts + 1: return UInt32(chips.master.imr)
      case Self.slavePorts + 1: return UInt32(chips.slave.imr)
      case Self.elcrPorts: return UInt32(chips.master.elcr)
      case Self.elcrPorts + 1: return UInt32(chips.slave.elcr)
      default: return 0xFF
      }
    }
  }

  public func portWrite(port: UInt16, size: Int, value: UInt32) {
    let byte = UInt8(truncatingIfNeeded: value)
    mutate { chips in
      switch port {
      case Self.masterPorts: chips.master.writeCommand(byte)
      case Self.masterPorts + 1: chips.master.writeData(byte)
      case Self.slavePorts: chips.slave.writeCommand(byte)
      case Self.slavePorts + 1: chips.slave.writeData(byte)
      case Self.elcrPorts:
        chips.master.elcr = byte & chips.master.elcrWritable
        chips.master.irr = (chips.master.irr & ~chips.master.elcr) | (chips.master.lineLevels & chips.master.elcr)
      case Self.elcrPorts + 1:
        chips.slave.elcr = byte & chips.slave.elcrWritable
        chips.slave.irr = (chips.slave.irr & ~chips.slave.elcr) | (chips.slave.lineLevels & chips.slave.elcr)
      default: break
      }
    }
  }

  /// Applies `body`, re-evaluates the cascade and INTR, and reports an INTR change in order.
  private func mutate<Result>(_ body: (inout Chips) -> Result) -> Result {
    chips.withLock { chips in
      let result = body(&chips)
      chips.propagateCascade()
      let output = chips.masterOutput
      if output != chips.output {
        chips.output = output
        chips.outputHandler?(output)
      }
      return result
    }
  }
}

// MARK: Machine state

extension PICChip {
  fileprivate func save(into writer: inout StateWriter) {
    for value in [irr, isr, imr, lineLevels, elcr, vectorBase, UInt8(initStep), lowestPriority] { writer.write(value) }
    for flag in [
      expectsICW4, singleMode, autoEOI, rotateOnAutoEOI, specialFullyNested, specialMask, readISR, pollPending,
    ] {
      writer.write(flag)
    }
  }

  fileprivate mutating func restore(from reader: inout StateReader) throws(MachineStateError) {
    irr = try reader.read()
    isr = try reader.read()
    imr = try reader.read()
    lineLevels = try reader.read()
    elcr = try reader.read(UInt8.self) & elcrWritable
    vectorBase = try reader.read()
    let step: UInt8 = try reader.read()
    guard step <= 4 else { throw .invalid("8259 initialization step") }
    initStep = Int(step)
    lowestPriority = try reader.read(UInt8.self) & 7
    expectsICW4 = try reader.readBool()
    singleMode = try reader.readBool()
    autoEOI = try reader.readBool()
    rotateOnAutoEOI = try reader.readBool()
    specialFullyNested = try reader.readBool()
    specialMask = try reader.readBool()
    readISR = try reader.readBool()
    pollPending = try reader.readBool()
  }
}

/// Both 8259s (every register and the initialization sequence position) and the INTR output.
extension DualPIC: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    let saved = chips.withLock { ($0.master, $0.slave, $0.output) }
    saved.0.save(into: &writer)
    saved.1.save(into: &writer)
    writer.write(saved.2)
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    var master = PICChip(elcrWritable: 0xF8)
    var slave = PICChip(elcrWritable: 0xDE)
    try master.restore(from: &reader)
    try slave.restore(from: &reader)
    let output = try reader.readBool()
    chips.withLock {
      $0.master = master
      $0.slave = slave
      // The local APIC's LINT0 level is restored with the APIC, so no change is reported.
      $0.output = output
    }
  }
}
