import Synchronization
import Testing
import VMCore

@testable import InterruptControllers

/// Records every line change a device makes.
final class RecordingSink: InterruptSink {
  private let log = Mutex<[(line: UInt32, level: Bool)]>([])
  func setInterruptLevel(line: UInt32, level: Bool) { log.withLock { $0.append((line, level)) } }
  var events: [(line: UInt32, level: Bool)] { log.withLock { $0 } }
  /// Number of rising edges on `line`.
  func risingEdges(_ line: UInt32) -> Int { events.filter { $0.line == line && $0.level }.count }
}

/// Counts calls to a wake handler.
final class Counter: Sendable {
  private let value = Mutex(0)
  func increment() { value.withLock { $0 += 1 } }
  var count: Int { value.withLock { $0 } }
}

/// A machine's interrupt hardware on an IOBus, driven as a guest would.
struct Machine {
  let clock = ManualClock()
  let bus = IOBus()
  let platform: PlatformInterruptControllers

  init(cpus: Int = 1) throws {
    platform = PlatformInterruptControllers(cpuCount: cpus, clock: clock)
    try platform.register(on: bus)
    // Single-CPU view of the xAPIC page, so tests reach CPU 0's APIC through MMIO.
    try bus.registerMMIO(LocalAPIC.defaultBase, length: LocalAPIC.mmioLength, device: platform.localAPICs[0])
  }

  var bsp: LocalAPIC { platform.localAPICs[0] }

  func outb(_ port: UInt16, _ value: UInt8) { bus.portWrite(port, size: 1, value: UInt32(value)) }
  func inb(_ port: UInt16) -> UInt8 { UInt8(truncatingIfNeeded: bus.portRead(port, size: 1)) }

  /// Writes an IOAPIC register through IOREGSEL/IOWIN.
  func ioapicWrite(_ index: UInt32, _ value: UInt32) {
    bus.mmioWrite(IOAPIC.defaultBase, size: 4, value: UInt64(index))
    bus.mmioWrite(IOAPIC.defaultBase + 0x10, size: 4, value: UInt64(value))
  }

  func ioapicRead(_ index: UInt32) -> UInt32 {
    bus.mmioWrite(IOAPIC.defaultBase, size: 4, value: UInt64(index))
    return UInt32(bus.mmioRead(IOAPIC.defaultBase + 0x10, size: 4))
  }

  /// Programs redirection entry `pin`.
  func redirect(
    pin: Int, vector: UInt8, level: Bool = false, masked: Bool = false, destination: UInt8 = 0,
    logical: Bool = false, mode: UInt32 = 0
  ) {
    var low = UInt32(vector) | (mode << 8)
    if logical { low |= 1 << 11 }
    if level { low |= 1 << 15 }
    if masked { low |= 1 << 16 }
    ioapicWrite(0x10 + 2 * UInt32(pin) + 1, UInt32(destination) << 24)
    ioapicWrite(0x10 + 2 * UInt32(pin), low)
  }

  /// Reads/writes CPU 0's APIC through the MMIO page.
  func apicRead(_ offset: UInt64) -> UInt32 { UInt32(bus.mmioRead(LocalAPIC.defaultBase + offset, size: 4)) }
  func apicWrite(_ offset: UInt64, _ value: UInt32) {
    bus.mmioWrite(LocalAPIC.defaultBase + offset, size: 4, value: UInt64(value))
  }

  /// The standard Linux/BIOS PIC initialization: vectors 0x20/0x28, cascade on IRQ 2, 8086 mode.
  func initializePICs(masterMask: UInt8 = 0x00, slaveMask: UInt8 = 0x00, icw4: UInt8 = 0x01) {
    outb(0x20, 0x11)
    outb(0x21, 0x20)
    outb(0x21, 0x04)
    outb(0x21, icw4)
    outb(0xA0, 0x11)
    outb(0xA1, 0x28)
    outb(0xA1, 0x02)
    outb(0xA1, icw4)
    outb(0x21, masterMask)
    outb(0xA1, slaveMask)
  }

  /// Whether bit `vector` is set in the APIC's 256-bit register starting at `base` (ISR/TMR/IRR).
  func apicBit(_ base: UInt64, _ vector: UInt8) -> Bool {
    apicRead(base + UInt64(vector / 32) * 0x10) & (1 << UInt32(vector % 32)) != 0
  }
}

extension LocalAPIC {
  /// Sends an IPI through this APIC's ICR registers.
  func sendIPI(icrLow: UInt32, destination: UInt8 = 0) {
    writeRegister(offset: 0x310, value: UInt32(destination) << 24)
    writeRegister(offset: 0x300, value: icrLow)
  }
}
