// AMD's legacy performance counters (AMD64 APM vol. 2 13.2, "Performance Monitoring
// Counters"): four event-select registers PerfEvtSel0-3 at MSRs C001_0000-C001_0003 and four
// 48-bit counters PerfCtr0-3 at C001_0004-C001_0007, present on every AMD64 processor
// (CPUID does not enumerate them; the core extension at C001_0200, CPUID 8000_0001 ECX[23],
// is not offered). RDPMC reads counter ECX (0-3) at CPL 0, or at any CPL with CR4.PCE.
//
// Counted events: 0xC0 retired instructions and 0x76 CPU clocks not halted (the TSC rate).
// Every other event is accepted and counts nothing. USR/OS (bits 16/17) enable counting (the
// counters count at every privilege level when either is set); edge detect, invert, counter
// mask, host/guest-only and the overflow interrupt (INT, bit 20) are kept but have no effect.

/// State of the four legacy counters.
struct PerformanceCounterState {
  /// PerfEvtSel0-3 as written.
  var eventSelect: [UInt64] = [0, 0, 0, 0]
  /// Counter value when counting (re)started.
  var baseValue: [UInt64] = [0, 0, 0, 0]
  /// Reading of the event source when counting (re)started.
  var sourceStart: [UInt64] = [0, 0, 0, 0]
}

extension CPU {
  /// First PerfEvtSel MSR (C001_0000); PerfCtr0 is at +4.
  static let performanceEventSelect0: UInt32 = 0xC001_0000
  /// First PerfCtr MSR (C001_0004).
  static let performanceCounter0: UInt32 = 0xC001_0004
  /// The counters are 48 bits wide.
  static let performanceCounterMask: UInt64 = (1 << 48) - 1
  /// PerfEvtSel bits that are reserved (63:42, 39:36, 21): writing them raises #GP.
  static let performanceEventSelectReserved: UInt64 = ~((1 << 42) - 1) | (0xF << 36) | (1 << 21)

  /// EventSelect (bits 35:32 and 7:0) of a PerfEvtSel value.
  private static func event(_ select: UInt64) -> UInt64 { ((select >> 24) & 0xF00) | (select & 0xFF) }

  /// The current reading of the event `select` counts, or nil when it counts nothing (disabled,
  /// neither USR nor OS, or an event this CPU does not model).
  private func eventSource(_ select: UInt64) -> UInt64? {
    guard select & (1 << 22) != 0, select & (3 << 16) != 0 else { return nil }
    switch Self.event(select) {
    case 0xC0: return retiredInstructions
    case 0x76: return timeStampCounter() &- tscOffset
    default: return nil
    }
  }

  /// PerfCtr `index` now.
  func performanceCounter(_ index: Int) -> UInt64 {
    let counters = system.performanceCounters
    guard let source = eventSource(counters.eventSelect[index]) else { return counters.baseValue[index] }
    return (counters.baseValue[index] &+ (source &- counters.sourceStart[index])) & Self.performanceCounterMask
  }

  /// Writes PerfCtr `index` (bits above 47 are ignored).
  func writePerformanceCounter(_ index: Int, _ value: UInt64) {
    let source = eventSource(system.performanceCounters.eventSelect[index]) ?? 0
    system.performanceCounters.baseValue[index] = value & Self.performanceCounterMask
    system.performanceCounters.sourceStart[index] = source
  }

  /// Writes PerfEvtSel `index`; reserved bits raise #GP(0).
  func writePerformanceEventSelect(_ index: Int, _ value: UInt64) throws(Fault) {
    guard value & Self.performanceEventSelectReserved == 0 else { throw .generalProtection(0) }
    let current = performanceCounter(index)
    system.performanceCounters.eventSelect[index] = value
    writePerformanceCounter(index, current)
  }

  /// Reads a legacy performance MSR (C001_0000-C001_0007), or nil for any other MSR.
  func readPerformanceMSR(_ index: UInt32) -> UInt64? {
    switch index {
    case Self.performanceEventSelect0..<Self.performanceCounter0:
      return system.performanceCounters.eventSelect[Int(index - Self.performanceEventSelect0)]
    case Self.performanceCounter0..<(Self.performanceCounter0 + 4):
      return performanceCounter(Int(index - Self.performanceCounter0))
    default:
      return nil
    }
  }

  /// Writes a legacy performance MSR; returns false for any other MSR.
  func writePerformanceMSR(_ index: UInt32, _ value: UInt64) throws(Fault) -> Bool {
    switch index {
    case Self.performanceEventSelect0..<Self.performanceCounter0:
      try writePerformanceEventSelect(Int(index - Self.performanceEventSelect0), value)
    case Self.performanceCounter0..<(Self.performanceCounter0 + 4):
      writePerformanceCounter(Int(index - Self.performanceCounter0), value)
    default:
      return false
    }
    return true
  }

  /// RDPMC: counter ECX (0-3) into EDX:EAX; #GP(0) for other counters, or at CPL > 0 without
  /// CR4.PCE.
  func readPerformanceMonitoringCounter() throws(Fault) {
    guard cpl == 0 || cr4 & (1 << 8) != 0 else { throw .generalProtection(0) }
    let index = gpr[1] & 0xFFFF_FFFF
    guard index < 4 else { throw .generalProtection(0) }
    let value = performanceCounter(Int(index))
    gpr[0] = value & 0xFFFF_FFFF
    gpr[2] = value >> 32
  }
}
