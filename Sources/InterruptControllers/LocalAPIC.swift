import Synchronization
import VMCore

/// A 256-bit vector bitmap (ISR, TMR, IRR).
struct VectorSet: Equatable {
  var words = SIMD4<UInt64>(repeating: 0)

  func contains(_ vector: UInt8) -> Bool { words[Int(vector >> 6)] & (1 << UInt64(vector & 63)) != 0 }
  mutating func insert(_ vector: UInt8) { words[Int(vector >> 6)] |= 1 << UInt64(vector & 63) }
  mutating func remove(_ vector: UInt8) { words[Int(vector >> 6)] &= ~(1 << UInt64(vector & 63)) }
  var isEmpty: Bool { words == SIMD4(repeating: 0) }

  /// The highest vector in the set.
  var highest: UInt8? {
    for index in stride(from: 3, through: 0, by: -1) where words[index] != 0 {
      return UInt8(index * 64 + 63 - words[index].leadingZeroBitCount)
    }
    return nil
  }

  /// Bits 32*index ..< 32*index+32, as the xAPIC register at that index shows them.
  func register(_ index: Int) -> UInt32 {
    UInt32(truncatingIfNeeded: words[index >> 1] >> UInt64((index & 1) * 32))
  }
}

/// The 8259 PIC as the local APIC sees it through LINT0 in ExtINT (virtual wire) mode.
public protocol ExternalInterruptController: AnyObject, Sendable {
  /// Runs an interrupt-acknowledge cycle and returns the vector the controller supplies.
  func acknowledge() -> UInt8
}

/// What a local APIC has for its CPU, as a lock-free snapshot (see `LocalAPIC.pendingEvents`).
public struct LocalAPICEvents: OptionSet, Sendable {
  public let rawValue: UInt8
  public init(rawValue: UInt8) { self.rawValue = rawValue }
  /// A maskable interrupt (fixed above the processor priority, or ExtINT) is deliverable.
  public static let interrupt = LocalAPICEvents(rawValue: 1)
  /// An NMI is pending.
  public static let nmi = LocalAPICEvents(rawValue: 2)
  /// An INIT was received.
  public static let initialize = LocalAPICEvents(rawValue: 4)
  /// A start-up IPI was received while waiting for one.
  public static let startup = LocalAPICEvents(rawValue: 8)
}

/// One event the CPU takes from its local APIC (see `LocalAPIC.takeEvent`).
public enum LocalAPICEvent: Equatable, Sendable {
  /// INIT: the CPU resets its state; an AP then waits for a start-up IPI.
  case initialize
  /// Start-up IPI: an AP starts in real mode at CS = vector << 8, IP = 0.
  case startup(vector: UInt8)
  /// Deliver an NMI (vector 2).
  case nmi
  /// Deliver maskable interrupt `vector` (already moved to in-service).
  case interrupt(vector: UInt8)
}

/// A local APIC in xAPIC or x2APIC mode (Intel SDM vol. 3 ch. 11): one per vCPU.
///
/// In xAPIC mode the software CPU routes its accesses to the 4 KiB page at `mmioBase`
/// (0xFEE00000) to `readRegister`/`writeRegister` of *its own* APIC (the page is per CPU, so it
/// cannot live on the shared IOBus except in single-CPU setups, where `LocalAPIC` also works as
/// an MMIODevice). In x2APIC mode (IA32_APIC_BASE.EXTD) the page is not decoded and the
/// registers are MSRs 0x800-0x8FF (`readX2APICRegister`/`writeX2APICRegister`).
///
/// Timers are computed from the machine clock, never ticked: the CPU calls `poll(now:)` from
/// its run loop (cheap when nothing expired) and sleeps at most until `nextTimerDeadline`.
/// Thread-safe: devices, the IOAPIC and other APICs deliver from any thread.
public final class LocalAPIC: MMIODevice, InterruptDelivery {
  /// Default guest-physical base of the xAPIC page.
  public static let defaultBase: UInt64 = 0xFEE0_0000
  /// Size of the xAPIC register page.
  public static let mmioLength: UInt64 = 0x1000
  /// Version register: version 0x14 (integrated xAPIC), 6 LVT entries (max LVT index 5).
  public static let versionRegister: UInt32 = 0x0005_0014
  /// The APIC timer's input clock before the divide configuration (the "bus clock"): 1 GHz.
  public static let timerFrequency: UInt64 = 1_000_000_000
  /// IA32_APIC_BASE global enable bit.
  public static let baseEnableBit: UInt64 = 1 << 11
  /// IA32_APIC_BASE bootstrap-processor bit.
  public static let baseBSPBit: UInt64 = 1 << 8
  /// IA32_APIC_BASE x2APIC enable bit (EXTD).
  public static let baseExtendedBit: UInt64 = 1 << 10
  /// The MSRs of the x2APIC register interface: MSR 0x800 + (xAPIC offset >> 4).
  public static let x2APICMSRs: ClosedRange<UInt32> = 0x800...0x8FF

  /// Whether this is the bootstrap processor's APIC.
  public let isBootstrapProcessor: Bool
  private let clock: any MachineClock
  private let bus: APICBus
  private let state: Mutex<APICState>
  private let eventBits = Atomic<UInt8>(0)
  private let deadlineCache = Atomic<UInt64>(UInt64.max)
  // The wake closure lives in a class: an optional closure stored in a tuple inside a Mutex
  // gains a reabstraction thunk on every `withLock` access with Swift 6.x -O (each call then
  // walks the whole chain; after ~300 000 interrupts it overflows the stack). Reading a class
  // reference out of the Mutex touches no closure.
  private let connections = Mutex<
    (wake: InterruptPendingHandler?, external: (any ExternalInterruptController)?)
  >((nil, nil))

  /// Creates the APIC of CPU `id` and attaches it to `bus`.
  /// - Parameter virtualWire: leave the APIC as a PC BIOS does for the BSP: software-enabled,
  ///   LINT0 = ExtINT (the 8259 reaches the CPU), LINT1 = NMI. Defaults to `isBootstrapProcessor`.
  public init(
    id: UInt8, isBootstrapProcessor: Bool, clock: any MachineClock, bus: APICBus, virtualWire: Bool? = nil
  ) {
    self.isBootstrapProcessor = isBootstrapProcessor
    self.clock = clock
    self.bus = bus
    var initial = APICState(id: id, isBSP: isBootstrapProcessor)
    if virtualWire ?? isBootstrapProcessor {
      initial.svr = 0x1FF
      initial.lvt[LVT.lint0] = UInt32(APICDeliveryMode.externalInterrupt.rawValue) << 8
      initial.lvt[LVT.lint1] = UInt32(APICDeliveryMode.nonMaskable.rawValue) << 8
    }
    state = Mutex(initial)
    bus.attach(self)
  }

  // MARK: Wiring

  /// Sets the closure called (from any thread, possibly with another controller's lock held)
  /// when a new event becomes pending, to wake the halted vCPU. It must only signal.
  public func setInterruptPendingHandler(_ handler: @escaping @Sendable () -> Void) {
    let wrapped = InterruptPendingHandler(handler)
    connections.withLock { $0.wake = wrapped }
  }

  /// Connects the 8259 whose INTR output drives LINT0 (see `setLocalInterruptLine`).
  public func connectExternalInterruptController(_ controller: any ExternalInterruptController) {
    connections.withLock { $0.external = controller }
  }

  /// Drives the LINT0 (`pin` 0) or LINT1 (`pin` 1) input. LINT0 carries the 8259's INTR in
  /// virtual-wire mode; the PIC calls this in order, so levels never arrive reordered.
  public func setLocalInterruptLine(_ pin: Int, level: Bool) {
    guard pin == 0 || pin == 1 else { return }
    update { $0.setLocalInterruptLine(pin, level: level) }
  }

  // MARK: CPU-facing API

  /// Lock-free snapshot of what is pending. The CPU checks this at instruction boundaries:
  /// when it intersects what the CPU can accept now, call `takeEvent`.
  public var pendingEvents: LocalAPICEvents { LocalAPICEvents(rawValue: eventBits.load(ordering: .acquiring)) }

  /// Takes the highest-priority event the CPU can accept: INIT, then start-up, then NMI (when
  /// `nmiEnabled`), then a maskable interrupt (when `interruptsEnabled`, i.e. RFLAGS.IF=1 and no
  /// interrupt shadow). A maskable interrupt is acknowledged (IRR→ISR, or an 8259 INTA cycle for
  /// ExtINT) and its vector returned; the CPU delivers it through the IDT.
  public func takeEvent(interruptsEnabled: Bool, nmiEnabled: Bool = true) -> LocalAPICEvent? {
    let decision = update { state -> Acknowledgement in
      if state.initPending {
        state.initPending = false
        return .event(.initialize)
      }
      if let vector = state.startupVector {
        state.startupVector = nil
        return .event(.startup(vector: vector))
      }
      if state.waitingForStartup { return .none }
      if nmiEnabled && state.nmiPending {
        state.nmiPending = false
        return .event(.nmi)
      }
      guard interruptsEnabled else { return .none }
      return state.acknowledge()
    }
    return finish(decision)
  }

  /// The highest vector in the IRR; with `respectingPriority`, only one the CPU would take now
  /// (its priority class above the PPR). Does not include ExtINT from the 8259.
  public func highestPendingVector(respectingPriority: Bool = true) -> UInt8? {
    state.withLock { respectingPriority ? $0.highestDeliverable : $0.irr.highest }
  }

  /// INTA: acknowledges the deliverable maskable interrupt (ExtINT first, else the highest IRR
  /// vector above the PPR moves to the ISR) and returns its vector; nil when none is deliverable.
  public func acknowledgeInterrupt() -> UInt8? {
    if case .interrupt(let vector) = finish(update { $0.acknowledge() }) { return vector }
    return nil
  }

  /// Whether `vector` waits in the IRR (requested, not yet taken by the CPU).
  public func isRequested(vector: UInt8) -> Bool { state.withLock { $0.irr.contains(vector) } }

  /// Whether an NMI is pending.
  public var hasPendingNMI: Bool { state.withLock { $0.nmiPending } }

  /// Takes the pending NMI, if any.
  public func acknowledgeNMI() -> Bool {
    update { state in
      defer { state.nmiPending = false }
      return state.nmiPending
    }
  }

  /// Whether this APIC (an AP, or any CPU after INIT) waits for a start-up IPI.
  public var isWaitingForStartup: Bool { state.withLock { $0.waitingForStartup } }

  /// The task-priority register (CR8 is `taskPriority >> 4`).
  public var taskPriority: UInt8 { state.withLock { UInt8(truncatingIfNeeded: $0.tpr) } }

  /// Writes the TPR (MOV to CR8 writes `value << 4`).
  public func setTaskPriority(_ value: UInt8) { update { $0.tpr = UInt32(value) } }

  /// The processor-priority register.
  public var processorPriority: UInt8 { state.withLock { UInt8(truncatingIfNeeded: $0.ppr) } }

  /// Signals end of interrupt (same as writing the EOI register).
  public func endOfInterrupt() { writeRegister(offset: APICRegister.eoi, value: 0) }

  /// Virtual time (ns) at which the APIC timer next fires, if armed.
  public var nextTimerDeadline: UInt64? {
    let deadline = deadlineCache.load(ordering: .acquiring)
    return deadline == UInt64.max ? nil : deadline
  }

  /// Fires the timer if it expired at or before `now` (virtual ns). Lock-free when it did not.
  public func poll(now: UInt64) {
    guard now >= deadlineCache.load(ordering: .acquiring) else { return }
    update { $0.fireTimer(now: now) }
  }

  /// Fires the timer if it expired by the clock's current time.
  public func poll() { poll(now: clock.nanoseconds) }

  /// IA32_TSC_DEADLINE (MSR 0x6E0) as written; 0 when disarmed or not in TSC-deadline mode.
  public func readTSCDeadline() -> UInt64 { state.withLock { $0.tscDeadline } }

  /// Writes IA32_TSC_DEADLINE: `value` is in guest TSC units, the guest TSC being the clock's
  /// TSC plus `tscOffset`. Ignored unless the LVT timer is in TSC-deadline mode; 0 disarms.
  public func writeTSCDeadline(_ value: UInt64, tscOffset: UInt64 = 0) {
    update { $0.writeTSCDeadline(value, tscOffset: tscOffset) }
  }

  /// IA32_APIC_BASE (MSR 0x1B).
  public var apicBaseMSR: UInt64 { state.withLock { $0.apicBase } }

  /// The guest-physical base of the xAPIC page from IA32_APIC_BASE.
  public var mmioBase: UInt64 { apicBaseMSR & 0x000F_FFFF_FFFF_F000 }

  /// Whether the APIC is enabled in IA32_APIC_BASE (bit 11). A disabled APIC decodes no MMIO,
  /// accepts no interrupts, and CPUID.1:EDX.APIC reads 0.
  public var isGloballyEnabled: Bool { state.withLock { $0.globallyEnabled } }

  /// Whether the APIC is in x2APIC mode (IA32_APIC_BASE.EN and EXTD): its registers are MSRs
  /// 0x800-0x8FF and its page is not decoded.
  public var isX2APICMode: Bool { state.withLock { $0.x2APICMode } }

  /// Whether accesses to the default page (0xFEE00000) reach this APIC: it is enabled in xAPIC
  /// mode and not relocated.
  public var decodesDefaultPage: Bool {
    state.withLock {
      $0.globallyEnabled && !$0.x2APICMode && $0.apicBase & 0x000F_FFFF_FFFF_F000 == Self.defaultBase
    }
  }

  /// Writes IA32_APIC_BASE. Returns false (the CPU raises #GP) for reserved bits (0-7, 9, base
  /// bits at or above `physicalAddressBits`, the CPU's MAXPHYADDR) and for the transitions SDM
  /// vol. 3 11.12.5 forbids: EXTD without EN, x2APIC to xAPIC mode, and disabled to x2APIC
  /// mode. Clearing the enable bit resets the APIC (the x2APIC then leaves x2APIC mode too).
  public func writeAPICBaseMSR(_ value: UInt64, physicalAddressBits: Int = 52) -> Bool {
    let baseMask: UInt64 = ((1 << UInt64(min(physicalAddressBits, 52))) - 1) & ~0xFFF
    let writable: UInt64 = baseMask | Self.baseEnableBit | Self.baseBSPBit | Self.baseExtendedBit
    guard value & ~writable == 0 else { return false }
    let enable = value & Self.baseEnableBit != 0
    let extended = value & Self.baseExtendedBit != 0
    if extended && !enable { return false }
    return update { state in
      let wasEnabled = state.globallyEnabled
      let wasX2APIC = state.x2APICMode
      if wasX2APIC && enable && !extended { return false }
      if !wasEnabled && extended { return false }
      state.apicBase = (value & ~Self.baseBSPBit) | (state.isBSP ? Self.baseBSPBit : 0)
      if wasEnabled && !state.globallyEnabled { state.resetRegisters() }
      return true
    }
  }

  /// The APIC ID (bits 31:24 of the xAPIC ID register).
  public var id: UInt8 { state.withLock { $0.id } }

  /// The x2APIC ID: the initial APIC ID, read-only, what register 0x802 and CPUID leaf 0xB
  /// report.
  public var x2APICID: UInt32 { state.withLock { $0.x2APICID } }

  // MARK: x2APIC registers

  /// RDMSR of x2APIC register `msr` (0x800-0x8FF). Nil (the CPU raises #GP) outside x2APIC
  /// mode and for reserved and write-only registers (EOI, SELF IPI).
  public func readX2APICRegister(_ msr: UInt32) -> UInt64? {
    guard Self.x2APICMSRs.contains(msr) else { return nil }
    let offset = (msr - Self.x2APICMSRs.lowerBound) << 4
    let now = clock.nanoseconds
    return state.withLock { state -> UInt64? in
      guard state.x2APICMode else { return nil }
      switch offset {
      case APICRegister.id: return UInt64(state.x2APICID)
      case APICRegister.ldr: return UInt64(state.x2APICLogicalID)
      case APICRegister.icrLow: return UInt64(state.icrHigh) << 32 | UInt64(state.icrLow)
      case APICRegister.version, APICRegister.tpr, APICRegister.ppr, APICRegister.svr,
        APICRegister.isr..<APICRegister.esr, APICRegister.esr, APICRegister.lvtTimer...APICRegister.lvtError,
        APICRegister.initialCount, APICRegister.currentCount, APICRegister.divideConfiguration:
        return UInt64(state.read(offset, now: now))
      default: return nil
      }
    }
  }

  /// WRMSR of x2APIC register `msr` (0x800-0x8FF). Returns false (the CPU raises #GP) outside
  /// x2APIC mode, for reserved and read-only registers, for bits 63:32 set (but in the ICR),
  /// and for a non-zero write to EOI or the ESR. The ICR is one 64-bit register with a 32-bit
  /// destination in bits 63:32; SELF IPI (0x83F) sends a fixed interrupt to this APIC.
  public func writeX2APICRegister(_ msr: UInt32, value: UInt64) -> Bool {
    guard Self.x2APICMSRs.contains(msr) else { return false }
    let offset = (msr - Self.x2APICMSRs.lowerBound) << 4
    let low = UInt32(truncatingIfNeeded: value)
    if offset != APICRegister.icrLow && value >> 32 != 0 { return false }
    let now = clock.nanoseconds
    let effect = update { state -> RegisterWriteEffect? in
      guard state.x2APICMode else { return nil }
      switch offset {
      case APICRegister.eoi, APICRegister.esr:
        guard low == 0 else { return nil }
        return state.write(offset, value: 0, now: now)
      case APICRegister.tpr, APICRegister.svr, APICRegister.lvtTimer...APICRegister.lvtError,
        APICRegister.initialCount, APICRegister.divideConfiguration:
        return state.write(offset, value: low, now: now)
      case APICRegister.icrLow:
        state.icrHigh = UInt32(truncatingIfNeeded: value >> 32)
        state.icrLow = low & 0x000C_CFFF
        return state.interprocessorInterrupt()
      case APICRegister.selfIPI:
        let vector = UInt8(truncatingIfNeeded: low)
        if vector < 16 {
          state.raiseError(APICError.sendIllegalVector)
        } else {
          state.acceptVector(vector, levelTriggered: false)
        }
        return RegisterWriteEffect.none
      default:
        return nil
      }
    }
    guard let effect else { return false }
    perform(effect)
    return true
  }

  // MARK: Registers

  /// Reads the 32-bit register at `offset` (16-byte aligned offsets 0x20-0x3E0).
  public func readRegister(offset: UInt32) -> UInt32 {
    let now = clock.nanoseconds
    return state.withLock { $0.read(offset & 0xFF0, now: now) }
  }

  /// Writes the 32-bit register at `offset`, with the side effects a guest write has
  /// (EOI, IPIs through the ICR, timer programming).
  public func writeRegister(offset: UInt32, value: UInt32) {
    let now = clock.nanoseconds
    perform(update { $0.write(offset & 0xFF0, value: value, now: now) })
  }

  private func perform(_ effect: RegisterWriteEffect) {
    switch effect {
    case .none: break
    case .endOfInterrupt(let vector): bus.broadcastEndOfInterrupt(vector: vector)
    case .interprocessor(let message, let target): send(message, to: target)
    }
  }

  public func mmioRead(offset: UInt64, size: Int) -> UInt64 {
    let byte = Int(offset & 0xF)
    guard offset < Self.mmioLength, byte < 4 else { return 0 }
    let value = UInt64(readRegister(offset: UInt32(offset))) >> UInt64(byte * 8)
    return size >= 8 ? value : value & ((1 << UInt64(size * 8)) - 1)
  }

  public func mmioWrite(offset: UInt64, size: Int, value: UInt64) {
    // Registers take 32-bit writes at their aligned offset; anything else is dropped.
    guard offset < Self.mmioLength, offset & 0xF == 0, size >= 4 else { return }
    writeRegister(offset: UInt32(offset), value: UInt32(truncatingIfNeeded: value))
  }

  // MARK: InterruptDelivery

  public var arbitrationID: UInt8 { id }

  public func isDestination(_ destination: UInt8, logical: Bool) -> Bool {
    state.withLock { $0.isDestination(destination, logical: logical) }
  }

  public func isDestination(extended destination: UInt32, logical: Bool) -> Bool {
    state.withLock { $0.isDestination(extended: destination, logical: logical) }
  }

  public func deliver(_ message: InterruptMessage) {
    update { $0.accept(message) }
  }

  // MARK: Internals

  /// Runs `body` on the state, then republishes the event snapshot and timer deadline and wakes
  /// the CPU if new events appeared. Callbacks run after the lock is released.
  private func update<Result>(_ body: (inout APICState) -> Result) -> Result {
    let (result, wake) = state.withLock { state -> (Result, Bool) in
      let before = state.events
      let result = body(&state)
      let after = state.events
      eventBits.store(after.rawValue, ordering: .releasing)
      deadlineCache.store(state.timerNextFire ?? UInt64.max, ordering: .releasing)
      return (result, !after.subtracting(before).isEmpty)
    }
    if wake, let handler = connections.withLock({ $0.wake }) { handler.call() }
    return result
  }

  private func finish(_ decision: Acknowledgement) -> LocalAPICEvent? {
    switch decision {
    case .none: return nil
    case .event(let event): return event
    case .external:
      guard let controller = connections.withLock({ $0.external }) else { return nil }
      return .interrupt(vector: controller.acknowledge())
    }
  }

  private func send(_ message: InterruptMessage, to target: IPITarget) {
    switch target {
    case .destination(let destination, let logical): bus.send(message, destination: destination, logical: logical)
    case .extendedDestination(let destination, let logical):
      bus.send(message, extendedDestination: destination, logical: logical)
    case .selfOnly: deliver(message)
    case .all: bus.broadcast(message)
    case .allExcludingSelf: bus.broadcast(message, excluding: self)
    }
  }
}

/// xAPIC register offsets.
enum APICRegister {
  static let id: UInt32 = 0x020
  static let version: UInt32 = 0x030
  static let tpr: UInt32 = 0x080
  static let apr: UInt32 = 0x090
  static let ppr: UInt32 = 0x0A0
  static let eoi: UInt32 = 0x0B0
  static let rrd: UInt32 = 0x0C0
  static let ldr: UInt32 = 0x0D0
  static let dfr: UInt32 = 0x0E0
  static let svr: UInt32 = 0x0F0
  static let isr: UInt32 = 0x100
  static let tmr: UInt32 = 0x180
  static let irr: UInt32 = 0x200
  static let esr: UInt32 = 0x280
  static let icrLow: UInt32 = 0x300
  static let icrHigh: UInt32 = 0x310
  static let lvtTimer: UInt32 = 0x320
  static let lvtError: UInt32 = 0x370
  static let initialCount: UInt32 = 0x380
  static let currentCount: UInt32 = 0x390
  static let divideConfiguration: UInt32 = 0x3E0
  /// SELF IPI: x2APIC mode only (MSR 0x83F).
  static let selfIPI: UInt32 = 0x3F0
}

/// Indices into `APICState.lvt` (register offset 0x320 + 0x10 * index).
enum LVT {
  static let timer = 0
  static let thermal = 1
  static let performance = 2
  static let lint0 = 3
  static let lint1 = 4
  static let error = 5
  static let masked: UInt32 = 1 << 16
  /// Writable bits per entry.
  static let writable: [UInt32] = [0x700FF, 0x107FF, 0x107FF, 0x1A7FF, 0x1A7FF, 0x100FF]
}

enum Acknowledgement {
  case none
  case event(LocalAPICEvent)
  /// ExtINT: the vector comes from the 8259's INTA cycle, done outside the lock.
  case external
}

enum IPITarget {
  case destination(UInt8, logical: Bool)
  /// An x2APIC ICR's 32-bit destination.
  case extendedDestination(UInt32, logical: Bool)
  case selfOnly
  case all
  case allExcludingSelf
}

enum RegisterWriteEffect {
  case none
  case endOfInterrupt(vector: UInt8)
  case interprocessor(InterruptMessage, IPITarget)
}

/// ESR bits.
enum APICError {
  static let sendIllegalVector: UInt32 = 1 << 5
  static let receiveIllegalVector: UInt32 = 1 << 6
  static let illegalRegisterAddress: UInt32 = 1 << 7
}

struct APICState {
  var id: UInt8
  /// The initial APIC ID, the x2APIC ID (read-only).
  let x2APICID: UInt32
  let isBSP: Bool
  var apicBase: UInt64
  var tpr: UInt32 = 0
  var ldr: UInt32 = 0
  var dfr: UInt32 = 0xFFFF_FFFF
  var svr: UInt32 = 0xFF
  var isr = VectorSet()
  var tmr = VectorSet()
  var irr = VectorSet()
  var errorsPending: UInt32 = 0
  var errorStatus: UInt32 = 0
  var icrLow: UInt32 = 0
  var icrHigh: UInt32 = 0
  var lvt = [UInt32](repeating: LVT.masked, count: 6)
  var divideConfiguration: UInt32 = 0
  var initialCount: UInt32 = 0
  var timerStart: UInt64 = 0
  /// The current count at `timerStart` (the initial count, or the count a mode or divider
  /// change found).
  var timerCountAtStart: UInt64 = 0
  /// When the count next reaches zero; nil when the timer is stopped (its count reads 0).
  var timerNextFire: UInt64?
  var tscDeadline: UInt64 = 0
  var nmiPending = false
  var initPending = false
  var startupVector: UInt8?
  var waitingForStartup: Bool
  var lintLevels = [false, false]
  var externalInterruptLatched = false

  init(id: UInt8, isBSP: Bool, x2APICID: UInt32? = nil) {
    self.id = id
    self.x2APICID = x2APICID ?? UInt32(id)
    self.isBSP = isBSP
    apicBase = LocalAPIC.defaultBase | LocalAPIC.baseEnableBit | (isBSP ? LocalAPIC.baseBSPBit : 0)
    waitingForStartup = !isBSP
  }

  /// The power-up register state (INIT, or clearing the global enable); the ID is kept.
  mutating func resetRegisters() {
    tpr = 0
    ldr = 0
    dfr = 0xFFFF_FFFF
    svr = 0xFF
    isr = VectorSet()
    tmr = VectorSet()
    irr = VectorSet()
    errorsPending = 0
    errorStatus = 0
    icrLow = 0
    icrHigh = 0
    lvt = [UInt32](repeating: LVT.masked, count: 6)
    divideConfiguration = 0
    initialCount = 0
    timerNextFire = nil
    tscDeadline = 0
    externalInterruptLatched = false
  }

  var globallyEnabled: Bool { apicBase & LocalAPIC.baseEnableBit != 0 }
  var x2APICMode: Bool {
    apicBase & (LocalAPIC.baseEnableBit | LocalAPIC.baseExtendedBit)
      == LocalAPIC.baseEnableBit | LocalAPIC.baseExtendedBit
  }
  /// The x2APIC logical ID (LDR in x2APIC mode, SDM vol. 3 11.12.10.2): the cluster (x2APIC
  /// ID bits 19:4) in bits 31:16, one bit for the member (ID bits 3:0) in bits 15:0.
  var x2APICLogicalID: UInt32 { (x2APICID >> 4) << 16 | 1 << (x2APICID & 0xF) }
  var softwareEnabled: Bool { svr & 0x100 != 0 }
  var spuriousVector: UInt8 { UInt8(truncatingIfNeeded: svr) }

  var ppr: UInt32 {
    let inService = UInt32(isr.highest ?? 0)
    return (tpr & 0xF0) >= (inService & 0xF0) ? tpr & 0xFF : inService & 0xF0
  }

  var highestDeliverable: UInt8? {
    guard let vector = irr.highest, UInt32(vector) & 0xF0 > ppr & 0xF0 else { return nil }
    return vector
  }

  /// INTR from the 8259 reaches the CPU: through LINT0 in ExtINT mode, directly when the APIC
  /// is globally disabled, or latched from an ExtINT message.
  var externalInterruptPending: Bool {
    if externalInterruptLatched { return true }
    guard lintLevels[0] else { return false }
    if !globallyEnabled { return true }
    let entry = lvt[LVT.lint0]
    return softwareEnabled && entry & LVT.masked == 0 && (entry >> 8) & 7 == 7
  }

  var events: LocalAPICEvents {
    var events: LocalAPICEvents = []
    if initPending { events.insert(.initialize) }
    if startupVector != nil { events.insert(.startup) }
    if !waitingForStartup {
      if nmiPending { events.insert(.nmi) }
      if externalInterruptPending || highestDeliverable != nil { events.insert(.interrupt) }
    }
    return events
  }

  mutating func acknowledge() -> Acknowledgement {
    if externalInterruptPending {
      externalInterruptLatched = false
      return .external
    }
    guard let vector = highestDeliverable else { return .none }
    irr.remove(vector)
    isr.insert(vector)
    return .event(.interrupt(vector: vector))
  }

  // MARK: Acceptance

  mutating func accept(_ message: InterruptMessage) {
    switch message.deliveryMode {
    case .fixed, .lowestPriority:
      acceptVector(message.vector, levelTriggered: message.levelTriggered)
    case .nonMaskable:
      nmiPending = true
    case .initialize:
      resetRegisters()
      nmiPending = false
      startupVector = nil
      initPending = true
      waitingForStartup = !isBSP
    case .startup:
      if waitingForStartup {
        startupVector = message.vector
        waitingForStartup = false
      }
    case .externalInterrupt:
      externalInterruptLatched = true
    case .systemManagement:
      break
    }
  }

  mutating func acceptVector(_ vector: UInt8, levelTriggered: Bool) {
    guard globallyEnabled, softwareEnabled else { return }
    guard vector >= 16 else {
      raiseError(APICError.receiveIllegalVector)
      return
    }
    irr.insert(vector)
    if levelTriggered { tmr.insert(vector) } else { tmr.remove(vector) }
  }

  mutating func raiseError(_ bit: UInt32) {
    errorsPending |= bit
    let entry = lvt[LVT.error]
    let vector = UInt8(truncatingIfNeeded: entry)
    if entry & LVT.masked == 0, globallyEnabled, softwareEnabled, vector >= 16 {
      irr.insert(vector)
      tmr.remove(vector)
    }
  }

  mutating func setLocalInterruptLine(_ pin: Int, level: Bool) {
    let rising = level && !lintLevels[pin]
    lintLevels[pin] = level
    guard rising else { return }
    if !globallyEnabled {
      if pin == 1 { nmiPending = true }
      return
    }
    let entry = lvt[LVT.lint0 + pin]
    guard softwareEnabled, entry & LVT.masked == 0 else { return }
    switch (entry >> 8) & 7 {
    case 0: acceptVector(UInt8(truncatingIfNeeded: entry), levelTriggered: entry & (1 << 15) != 0)
    case 4: nmiPending = true
    default: break  // ExtINT is level-sensed through `externalInterruptPending`.
    }
  }

  // MARK: Destination

  func isDestination(_ destination: UInt8, logical: Bool) -> Bool {
    guard globallyEnabled else { return false }
    if destination == 0xFF { return true }
    // An 8-bit destination (IOAPIC, MSI) reaching an x2APIC: the same ID or cluster match.
    if x2APICMode { return isDestination(extended: UInt32(destination), logical: logical) }
    if !logical { return destination == id }
    let logicalID = UInt8(truncatingIfNeeded: ldr >> 24)
    if dfr >> 28 == 0xF { return logicalID & destination != 0 }
    // Cluster model: high nibble selects the cluster, low nibble the members.
    return destination >> 4 == logicalID >> 4 && destination & logicalID & 0x0F != 0
  }

  /// A 32-bit destination of an x2APIC ICR: 0xFFFFFFFF is every APIC; physical destinations
  /// name an x2APIC ID; logical ones a cluster (bits 31:16) and members in it (bits 15:0). An
  /// APIC still in xAPIC mode matches the 8-bit destinations it would match there.
  func isDestination(extended destination: UInt32, logical: Bool) -> Bool {
    guard globallyEnabled else { return false }
    if destination == 0xFFFF_FFFF { return true }
    guard x2APICMode else {
      return destination < 0xFF && isDestination(UInt8(destination), logical: logical)
    }
    if !logical { return destination == x2APICID }
    let logicalID = x2APICLogicalID
    return destination >> 16 == logicalID >> 16 && destination & logicalID & 0xFFFF != 0
  }

  // MARK: Timer

  var timerMode: UInt32 { (lvt[LVT.timer] >> 17) & 3 }

  var divisor: UInt64 {
    let code = ((divideConfiguration & 8) >> 1) | (divideConfiguration & 3)
    return code == 7 ? 1 : 2 << UInt64(code)
  }

  func duration(ofCounts counts: UInt64) -> UInt64 {
    TimeBase.nanoseconds(ticks: counts &* divisor, frequency: LocalAPIC.timerFrequency)
  }

  mutating func startTimer(now: UInt64) {
    restartTimer(count: UInt64(initialCount), now: now)
  }

  /// Counts down from `count` starting `now` (0 stops the timer).
  mutating func restartTimer(count: UInt64, now: UInt64) {
    timerStart = now
    timerCountAtStart = count
    timerNextFire = count == 0 ? nil : now &+ duration(ofCounts: count)
  }

  /// The current-count register (SDM vol. 3 10.5.4): counts down from the initial count; in
  /// one-shot mode it stays 0 after reaching it (until the initial count is written again, even
  /// if the mode then changes to periodic); in periodic mode it reloads the initial count.
  func currentCount(now: UInt64) -> UInt32 {
    guard timerMode != 2, let due = timerNextFire, now >= timerStart else { return 0 }
    let elapsed = TimeBase.ticks(nanoseconds: now - timerStart, frequency: LocalAPIC.timerFrequency) / divisor
    if elapsed < timerCountAtStart && now < due { return UInt32(truncatingIfNeeded: timerCountAtStart - elapsed) }
    let initial = UInt64(initialCount)
    guard timerMode == 1, initial != 0 else { return 0 }
    let sinceReload = elapsed > timerCountAtStart ? elapsed - timerCountAtStart : 0
    return UInt32(truncatingIfNeeded: initial - sinceReload % initial)
  }

  /// After a change of the timer's mode or divider: keeps counting from the current count.
  mutating func rebaseTimer(now: UInt64, previousCount: UInt32) {
    guard timerNextFire != nil else { return }
    restartTimer(count: UInt64(previousCount), now: now)
  }

  mutating func fireTimer(now: UInt64) {
    guard let due = timerNextFire, now >= due else { return }
    switch timerMode {
    case 1:
      let period = duration(ofCounts: UInt64(initialCount))
      if period == 0 {
        timerNextFire = nil
      } else {
        let periods = (now - due) / period + 1
        timerNextFire = due &+ periods &* period
      }
    case 2:
      timerNextFire = nil
      tscDeadline = 0
    default:
      timerNextFire = nil
    }
    let entry = lvt[LVT.timer]
    if entry & LVT.masked == 0 { acceptVector(UInt8(truncatingIfNeeded: entry), levelTriggered: false) }
  }

  mutating func writeTSCDeadline(_ value: UInt64, tscOffset: UInt64) {
    guard timerMode == 2 else { return }
    tscDeadline = value
    if value == 0 {
      timerNextFire = nil
    } else {
      timerNextFire = value > tscOffset ? TimeBase.nanoseconds(atTSC: value - tscOffset) : 0
    }
  }

  // MARK: Register access

  func read(_ offset: UInt32, now: UInt64) -> UInt32 {
    switch offset {
    case APICRegister.id: return UInt32(id) << 24
    case APICRegister.version: return LocalAPIC.versionRegister
    case APICRegister.tpr: return tpr
    case APICRegister.ppr: return ppr
    case APICRegister.ldr: return ldr
    case APICRegister.dfr: return dfr
    case APICRegister.svr: return svr
    case APICRegister.isr..<APICRegister.tmr: return isr.register(Int((offset - APICRegister.isr) >> 4))
    case APICRegister.tmr..<APICRegister.irr: return tmr.register(Int((offset - APICRegister.tmr) >> 4))
    case APICRegister.irr..<APICRegister.esr: return irr.register(Int((offset - APICRegister.irr) >> 4))
    case APICRegister.esr: return errorStatus
    case APICRegister.icrLow: return icrLow
    case APICRegister.icrHigh: return icrHigh
    case APICRegister.lvtTimer...APICRegister.lvtError: return lvt[Int((offset - APICRegister.lvtTimer) >> 4)]
    case APICRegister.initialCount: return timerMode == 2 ? 0 : initialCount
    case APICRegister.currentCount: return currentCount(now: now)
    case APICRegister.divideConfiguration: return divideConfiguration
    default: return 0
    }
  }

  mutating func write(_ offset: UInt32, value: UInt32, now: UInt64) -> RegisterWriteEffect {
    switch offset {
    case APICRegister.id:
      id = UInt8(truncatingIfNeeded: value >> 24)
    case APICRegister.tpr:
      tpr = value & 0xFF
    case APICRegister.eoi:
      guard let vector = isr.highest else { return .none }
      isr.remove(vector)
      if tmr.contains(vector) { return .endOfInterrupt(vector: vector) }
    case APICRegister.ldr:
      ldr = value & 0xFF00_0000
    case APICRegister.dfr:
      dfr = value | 0x0FFF_FFFF
    case APICRegister.svr:
      svr = value & 0x3FF
      if !softwareEnabled {
        for index in lvt.indices { lvt[index] |= LVT.masked }
      }
    case APICRegister.esr:
      errorStatus = errorsPending
      errorsPending = 0
    case APICRegister.icrHigh:
      icrHigh = value & 0xFF00_0000
    case APICRegister.icrLow:
      icrLow = value & 0x000C_CFFF
      return interprocessorInterrupt()
    case APICRegister.lvtTimer...APICRegister.lvtError:
      writeLVT(Int((offset - APICRegister.lvtTimer) >> 4), value: value, now: now)
    case APICRegister.initialCount:
      guard timerMode != 2 else { return .none }
      initialCount = value
      startTimer(now: now)
    case APICRegister.divideConfiguration:
      let count = currentCount(now: now)
      divideConfiguration = value & 0xB
      if timerMode != 2 { rebaseTimer(now: now, previousCount: count) }
    default:
      break
    }
    return .none
  }

  mutating func writeLVT(_ index: Int, value: UInt32, now: UInt64) {
    var entry = (value & LVT.writable[index]) | (lvt[index] & ~LVT.writable[index] & ~LVT.masked)
    if !softwareEnabled { entry |= LVT.masked }
    if index == LVT.timer {
      let oldMode = timerMode
      let count = currentCount(now: now)
      lvt[index] = entry
      if (oldMode == 2) != (timerMode == 2) {
        timerNextFire = nil
        tscDeadline = 0
        initialCount = 0
      } else if oldMode != timerMode {
        // One-shot <-> periodic: the count goes on from where it is; a one-shot timer that
        // already reached 0 stays stopped.
        rebaseTimer(now: now, previousCount: count)
      }
      return
    }
    lvt[index] = entry
  }

  /// Decodes the ICR into a message for the bus.
  mutating func interprocessorInterrupt() -> RegisterWriteEffect {
    let vector = UInt8(truncatingIfNeeded: icrLow)
    guard let mode = APICDeliveryMode(rawValue: UInt8((icrLow >> 8) & 7)) else { return .none }
    let levelAssert = icrLow & (1 << 14) != 0
    let levelTriggered = icrLow & (1 << 15) != 0
    // INIT level de-assert only synchronises arbitration IDs on old APIC buses.
    if mode == .initialize && levelTriggered && !levelAssert { return .none }
    if mode == .externalInterrupt { return .none }
    if (mode == .fixed || mode == .lowestPriority) && vector < 16 {
      raiseError(APICError.sendIllegalVector)
      return .none
    }
    let message = InterruptMessage(vector: vector, deliveryMode: mode, levelTriggered: levelTriggered)
    let target: IPITarget
    switch (icrLow >> 18) & 3 {
    case 1: target = .selfOnly
    case 2: target = .all
    case 3: target = .allExcludingSelf
    default:
      let logical = icrLow & (1 << 11) != 0
      target =
        x2APICMode
        ? .extendedDestination(icrHigh, logical: logical)
        : .destination(UInt8(truncatingIfNeeded: icrHigh >> 24), logical: logical)
    }
    return .interprocessor(message, target)
  }
}

/// The closure `LocalAPIC` calls to wake its halted vCPU, boxed once (see `connections`).
final class InterruptPendingHandler: Sendable {
  let call: @Sendable () -> Void
  init(_ call: @escaping @Sendable () -> Void) { self.call = call }
}

// MARK: Machine state

extension VectorSet {
  fileprivate func save(into writer: inout StateWriter) {
    for index in 0..<4 { writer.write(words[index]) }
  }

  fileprivate static func restore(from reader: inout StateReader) throws(MachineStateError) -> VectorSet {
    var set = VectorSet()
    for index in 0..<4 { set.words[index] = try reader.read() }
    return set
  }
}

/// Every register, pending event and the timer (its start and next expiry are virtual-clock
/// times, so they stay right when the clock continues from the snapshot's time).
extension LocalAPIC: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    let saved = state.withLock { $0 }
    writer.write(saved.id)
    writer.write(saved.isBSP)
    writer.write(saved.apicBase)
    for value in [saved.tpr, saved.ldr, saved.dfr, saved.svr] { writer.write(value) }
    saved.isr.save(into: &writer)
    saved.tmr.save(into: &writer)
    saved.irr.save(into: &writer)
    for value in [saved.errorsPending, saved.errorStatus, saved.icrLow, saved.icrHigh] { writer.write(value) }
    writer.write(array: saved.lvt)
    writer.write(saved.divideConfiguration)
    writer.write(saved.initialCount)
    writer.write(saved.timerStart)
    writer.write(optional: saved.timerNextFire)
    writer.write(saved.tscDeadline)
    writer.write(saved.nmiPending)
    writer.write(saved.initPending)
    writer.write(optional: saved.startupVector)
    writer.write(saved.waitingForStartup)
    writer.write(saved.lintLevels[0])
    writer.write(saved.lintLevels[1])
    writer.write(saved.externalInterruptLatched)
    writer.write(saved.timerCountAtStart)
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    let id: UInt8 = try reader.read()
    let isBSP = try reader.readBool()
    guard isBSP == isBootstrapProcessor else { throw .invalid("local APIC (bootstrap flag differs)") }
    var restored = APICState(id: id, isBSP: isBSP, x2APICID: x2APICID)
    restored.apicBase = try reader.read()
    restored.tpr = try reader.read()
    restored.ldr = try reader.read()
    restored.dfr = try reader.read()
    restored.svr = try reader.read()
    restored.isr = try VectorSet.restore(from: &reader)
    restored.tmr = try VectorSet.restore(from: &reader)
    restored.irr = try VectorSet.restore(from: &reader)
    restored.errorsPending = try reader.read()
    restored.errorStatus = try reader.read()
    restored.icrLow = try reader.read()
    restored.icrHigh = try reader.read()
    restored.lvt = try reader.readArray(UInt32.self, count: 6, "local APIC LVT")
    restored.divideConfiguration = try reader.read()
    restored.initialCount = try reader.read()
    restored.timerStart = try reader.read()
    restored.timerNextFire = try reader.readOptional(UInt64.self)
    restored.tscDeadline = try reader.read()
    restored.nmiPending = try reader.readBool()
    restored.initPending = try reader.readBool()
    restored.startupVector = try reader.readOptional(UInt8.self)
    restored.waitingForStartup = try reader.readBool()
    restored.lintLevels = [try reader.readBool(), try reader.readBool()]
    restored.externalInterruptLatched = try reader.readBool()
    // Sections written before the count at the timer's start was saved end here: the timer
    // then counted from its initial count at `timerStart`.
    restored.timerCountAtStart = reader.isAtEnd ? UInt64(restored.initialCount) : try reader.read()
    update { $0 = restored }
  }
}
