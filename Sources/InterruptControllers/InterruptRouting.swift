import Synchronization
import VMCore

/// GSI routing for the software-CPU machine, like KVM's default irqchip routing: GSIs 0-15 are
/// ISA IRQs and reach both the 8259 pair and the IOAPIC; GSIs 16-23 reach the IOAPIC only.
/// ISA IRQ 0 (the PIT) is wired to IOAPIC pin 2, as the MADT's interrupt source override says;
/// pin 2 is the OR of GSI 0 and GSI 2, and GSI 2 (the cascade) never reaches the PIC.
public final class InterruptRouting: InterruptSink {
  private let pic: DualPIC
  private let ioapic: IOAPIC
  /// Line levels, so IOAPIC pin 2 can combine GSI 0 and GSI 2. Held while forwarding so the
  /// controllers see a line's changes in order (lock order: routing, PIC/IOAPIC, local APIC).
  private let levels = Mutex<[Bool]>([Bool](repeating: false, count: IOAPIC.pinCount))

  /// Routes lines to `pic` and `ioapic`.
  public init(pic: DualPIC, ioapic: IOAPIC) {
    self.pic = pic
    self.ioapic = ioapic
  }

  /// The IOAPIC pin that GSI `line` reaches.
  public static func ioapicPin(forLine line: UInt32) -> Int { line == 0 ? 2 : Int(line) }

  public func setInterruptLevel(line: UInt32, level: Bool) {
    guard line < UInt32(IOAPIC.pinCount) else { return }
    levels.withLock { levels in
      levels[Int(line)] = level
      if line < 16 && line != 2 { pic.setIRQ(Int(line), level: level) }
      let pin = Self.ioapicPin(forLine: line)
      ioapic.setPinLevel(pin, asserted: pin == 2 ? levels[0] || levels[2] : level)
    }
  }
}

/// Every interrupt controller and timer a software-CPU PC needs, built and wired together:
/// the APIC bus, one local APIC per vCPU (APIC ID = CPU index, CPU 0 the BSP in virtual-wire
/// mode), the IOAPIC, the 8259 pair (INTR to the BSP's LINT0), the PIT (channel 0 on GSI 0),
/// port 0x61, and the GSI routing.
public final class PlatformInterruptControllers: Sendable {
  public let clock: any MachineClock
  public let apicBus: APICBus
  /// Local APICs indexed by CPU number.
  public let localAPICs: [LocalAPIC]
  public let ioapic: IOAPIC
  public let pic: DualPIC
  public let pit: ProgrammableIntervalTimer
  public let systemControlPort: SystemControlPort
  /// The `InterruptSink` devices' lines reach: attach it to the machine's `InterruptRouter`.
  public let routing: InterruptRouting

  /// Builds the controllers for `cpuCount` vCPUs (1-255).
  public init(cpuCount: Int, clock: any MachineClock) {
    precondition((1...255).contains(cpuCount), "cpuCount must be 1-255")
    self.clock = clock
    let apicBus = APICBus()
    self.apicBus = apicBus
    localAPICs = (0..<cpuCount).map {
      LocalAPIC(id: UInt8($0), isBootstrapProcessor: $0 == 0, clock: clock, bus: apicBus)
    }
    ioapic = IOAPIC(bus: apicBus)
    pic = DualPIC()
    let routing = InterruptRouting(pic: pic, ioapic: ioapic)
    self.routing = routing
    // The PIT raises an owed tick once the last one left the 8259's IRR (IRQ 0) or, through
    // IOAPIC pin 2, the local APICs' IRRs.
    let (localAPICs, ioapic, pic) = (localAPICs, ioapic, pic)
    let pin = InterruptRouting.ioapicPin(forLine: 0)
    pit = ProgrammableIntervalTimer(clock: clock, irq0: InterruptLine(router: routing, line: 0)) {
      if pic.isRequestPending(0) { return true }
      guard let vector = ioapic.unmaskedVector(pin: pin) else { return false }
      return localAPICs.contains { $0.isRequested(vector: vector) }
    }
    systemControlPort = SystemControlPort(pit: pit, clock: clock)
    let bsp = localAPICs[0]
    bsp.connectExternalInterruptController(pic)
    // Weakly: the BSP holds the PIC (its ExtINT source), so a strong capture would be a cycle.
    pic.setOutputHandler { [weak bsp] level in bsp?.setLocalInterruptLine(0, level: level) }
  }

  /// Registers the PIC (0x20-0x21, 0xA0-0xA1), ELCR (0x4D0-0x4D1), PIT (0x40-0x43), port 0x61 and
  /// the IOAPIC (MMIO 0xFEC00000) on `bus`. The local APIC page is per CPU: the CPU routes it.
  public func register(on bus: IOBus) throws(IOBusError) {
    try pic.register(on: bus)
    try pit.register(on: bus)
    try systemControlPort.register(on: bus)
    try bus.registerMMIO(IOAPIC.defaultBase, length: IOAPIC.mmioLength, device: ioapic)
  }

  /// The earliest timer deadline (virtual ns) among the PIT and the given CPU's APIC timer:
  /// how long a halted vCPU may sleep (the BSP also owns the PIT's deadline).
  public func nextDeadline(cpu: Int) -> UInt64? {
    let apic = localAPICs[cpu].nextTimerDeadline
    guard cpu == 0, let pit = pit.nextDeadline else { return apic }
    return min(apic ?? UInt64.max, pit)
  }

  /// Fires whatever expired by `now` for `cpu` (its APIC timer; the PIT on the BSP).
  public func poll(cpu: Int, now: UInt64) {
    if cpu == 0 { pit.poll(now: now) }
    localAPICs[cpu].poll(now: now)
  }
}

// MARK: Machine state

/// The GSI line levels (IOAPIC pin 2 combines GSI 0 and 2).
extension InterruptRouting: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    let saved = levels.withLock { $0 }
    writer.write(UInt32(saved.count))
    for level in saved { writer.write(level) }
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    guard Int(try reader.read(UInt32.self)) == IOAPIC.pinCount else { throw .invalid("GSI count") }
    var restored: [Bool] = []
    for _ in 0..<IOAPIC.pinCount { restored.append(try reader.readBool()) }
    levels.withLock { $0 = restored }
  }
}

/// Every controller and timer, in a fixed order: local APICs by CPU index, IOAPIC, PICs, PIT,
/// port 0x61, GSI levels.
extension PlatformInterruptControllers: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    writer.write(UInt32(localAPICs.count))
    for apic in localAPICs { writer.section("lapic", apic) }
    writer.section("ioapic", ioapic)
    writer.section("pic", pic)
    writer.section("pit", pit)
    writer.section("port61", systemControlPort)
    writer.section("gsi", routing)
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    let count = Int(try reader.read(UInt32.self))
    guard count == localAPICs.count else {
      throw MachineStateError(
        "the state file does not match this machine: \(count) local APICs, this machine has \(localAPICs.count)")
    }
    for apic in localAPICs { try reader.section("lapic", apic) }
    try reader.section("ioapic", ioapic)
    try reader.section("pic", pic)
    try reader.section("pit", pit)
    try reader.section("port61", systemControlPort)
    try reader.section("gsi", routing)
  }
}
