import KVMBackend
import Synchronization
import VMCore

/// KVM as a gdb target: KVM_SET_GUEST_DEBUG with single step (interrupts blocked while
/// stepping when the kernel offers KVM_GUESTDBG_BLOCKIRQ) and the four debug registers for
/// breakpoints of both kinds and watchpoints; KVM_EXIT_DEBUG reports the hits. Guest memory is
/// never patched with INT3. During a single step the other vCPUs run too.
final class KVMGDBTarget: GDBTarget, KVMDebugger, @unchecked Sendable {
  private let accelerator: KVMAccelerator
  let memory: GuestMemory

  private struct State {
    /// DR0-DR3 assignments.
    var slots: [GDBBreakpoint?] = [nil, nil, nil, nil]
    var stepping: Int?
    var stopReported = false
    var handler: (@Sendable (GDBStopEvent) -> Void)?
  }
  private let state = Mutex(State())

  init(accelerator: KVMAccelerator, memory: GuestMemory) {
    self.accelerator = accelerator
    self.memory = memory
    accelerator.attachDebugger(self)
  }

  var cpuCount: Int { accelerator.cpuCount }
  var hasStarted: Bool { accelerator.vcpusStarted }

  func setStopHandler(_ handler: @escaping @Sendable (GDBStopEvent) -> Void) {
    state.withLock { $0.handler = handler }
  }

  func stop() -> Bool {
    do {
      try accelerator.pause()
      return true
    } catch {
      return false
    }
  }

  /// DR7 for the assigned slots: global enable, R/W and LEN fields.
  private static func dr7(_ slots: [GDBBreakpoint?]) -> UInt64 {
    var value: UInt64 = 0
    for (slot, breakpoint) in slots.enumerated() {
      guard let breakpoint else { continue }
      let readWrite: UInt64
      switch breakpoint.kind {
      case .software, .hardware: readWrite = 0
      case .write: readWrite = 1
      case .read, .access: readWrite = 3
      }
      let length: UInt64 =
        breakpoint.kind.isWatchpoint ? [1: 0, 2: 1, 4: 3, 8: 2][breakpoint.length] ?? 0 : 0
      value |= 1 << (2 * UInt64(slot) + 1)
      value |= (readWrite | length << 2) << (16 + 4 * UInt64(slot))
    }
    return value
  }

  func resume(step: Int?) {
    let (slots, _) = state.withLock { state -> ([GDBBreakpoint?], Void) in
      state.stepping = step
      state.stopReported = false
      return (state.slots, ())
    }
    var debugRegisters = [UInt64](repeating: 0, count: 8)
    for (slot, breakpoint) in slots.enumerated() { debugRegisters[slot] = breakpoint?.address ?? 0 }
    debugRegisters[7] = Self.dr7(slots)
    let codeAddresses = Set(slots.compactMap { $0 }.filter { !$0.kind.isWatchpoint }.map(\.address))
    for cpu in 0..<cpuCount {
      var flags: UInt32 = 0
      if debugRegisters[7] != 0 { flags |= KVMGuestDebugFlags.enable | KVMGuestDebugFlags.useHardwareBreakpoints }
      if cpu == step {
        flags |= KVMGuestDebugFlags.enable | KVMGuestDebugFlags.singleStep | KVMGuestDebugFlags.blockInterrupts
      }
      // Resuming from an instruction breakpoint: RF lets that one instruction run.
      if !codeAddresses.isEmpty, var registers = try? accelerator.debugRegisters(cpu: cpu),
        codeAddresses.contains(registers.rip)
      {
        registers.rflags |= 1 << 16
        try? accelerator.setDebugRegisters(registers, cpu: cpu)
      }
      try? accelerator.setGuestDebug(cpu: cpu, flags: flags, debugRegisters: debugRegisters)
    }
    accelerator.resume()
  }

  // MARK: KVMDebugger (vCPU threads)

  func debugExit(cpu index: Int, exception: UInt32, pc: UInt64, dr6: UInt64) -> Bool {
    return state.withLock { state -> Bool in
      if state.stopReported { return true }
      var event: GDBStopEvent?
      for slot in 0..<4 where dr6 & (1 << UInt64(slot)) != 0 {
        guard let breakpoint = state.slots[slot] else { continue }
        if breakpoint.kind.isWatchpoint {
          event = .watchpoint(cpu: index, kind: breakpoint.kind, address: breakpoint.address)
          break
        }
        if breakpoint.address == pc { event = .breakpoint(cpu: index) }
      }
      if event == nil && (dr6 & (1 << 14) != 0 || state.stepping == index) { event = .step(cpu: index) }
      guard let event else { return false }
      state.stopReported = true
      state.handler?(event)
      return true
    }
  }

  // MARK: Registers

  private static let generalOrder = [0, 3, 1, 2, 6, 7, 5, 4, 8, 9, 10, 11, 12, 13, 14, 15]
  private static let segmentOrder = [1, 2, 3, 0, 4, 5]

  private static func load16(_ bytes: [UInt8], _ offset: Int) -> UInt16 {
    UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8
  }
  private static func load64(_ bytes: [UInt8], _ offset: Int) -> UInt64 {
    (0..<8).reduce(0) { $0 | UInt64(bytes[offset + $1]) << (8 * $1) }
  }

  func registers(cpu index: Int) -> GDBRegisterFile? {
    guard let kvm = try? accelerator.debugRegisters(cpu: index) else { return nil }
    var file = GDBRegisterFile()
    for (slot, register) in Self.generalOrder.enumerated() { file.general[slot] = kvm.general[register] }
    file.rip = kvm.rip
    file.rflags = kvm.rflags
    for (slot, segment) in Self.segmentOrder.enumerated() { file.segments[slot] = kvm.selectors[segment] }
    let fpu = kvm.fpu
    for stack in 0..<8 { file.st[stack] = Array(fpu[16 * stack..<16 * stack + 10]) }
    let status = Self.load16(fpu, 130)
    let top = Int(status >> 11) & 7
    file.x87Control = [
      UInt32(Self.load16(fpu, 128)), UInt32(status),
      UInt32(X87Tags.full(abridged: fpu[132], top: top, stack: file.st)), 0,
      UInt32(truncatingIfNeeded: Self.load64(fpu, 136)), 0, UInt32(truncatingIfNeeded: Self.load64(fpu, 144)),
      UInt32(Self.load16(fpu, 134)),
    ]
    for register in 0..<16 { file.xmm[register] = Array(fpu[152 + 16 * register..<168 + 16 * register]) }
    file.mxcsr = UInt32(fpu[408]) | UInt32(fpu[409]) << 8 | UInt32(fpu[410]) << 16 | UInt32(fpu[411]) << 24
    file.fsBase = kvm.fsBase
    file.gsBase = kvm.gsBase
    file.control = kvm.control
    return file
  }

  func setRegisters(_ file: GDBRegisterFile, cpu index: Int) -> Bool {
    guard var kvm = try? accelerator.debugRegisters(cpu: index) else { return false }
    for (slot, register) in Self.generalOrder.enumerated() { kvm.general[register] = file.general[slot] }
    kvm.rip = file.rip
    kvm.rflags = file.rflags
    func store(_ value: UInt64, at offset: Int, size: Int) {
      for byte in 0..<size { kvm.fpu[offset + byte] = UInt8(truncatingIfNeeded: value >> (8 * byte)) }
    }
    for stack in 0..<8 where file.st[stack].count == 10 {
      for byte in 0..<10 { kvm.fpu[16 * stack + byte] = file.st[stack][byte] }
    }
    store(UInt64(file.x87Control[0]), at: 128, size: 2)
    store(UInt64(file.x87Control[1]), at: 130, size: 2)
    kvm.fpu[132] = X87Tags.abridged(full: UInt16(truncatingIfNeeded: file.x87Control[2]))
    store(UInt64(file.x87Control[7] & 0x7FF), at: 134, size: 2)
    for register in 0..<16 where file.xmm[register].count == 16 {
      for byte in 0..<16 { kvm.fpu[152 + 16 * register + byte] = file.xmm[register][byte] }
    }
    store(UInt64(file.mxcsr & 0xFFFF), at: 408, size: 4)
    kvm.fsBase = file.fsBase
    kvm.gsBase = file.gsBase
    return (try? accelerator.setDebugRegisters(kvm, cpu: index)) != nil
  }

  // MARK: Breakpoints

  func setBreakpoint(_ breakpoint: GDBBreakpoint, inserted: Bool) -> Bool {
    state.withLock { state -> Bool in
      if !inserted {
        if let slot = state.slots.firstIndex(of: breakpoint) { state.slots[slot] = nil }
        return true
      }
      switch breakpoint.kind {
      case .read: return false  // debug registers watch writes or all accesses, not reads alone
      case .write, .access:
        guard [1, 2, 4, 8].contains(breakpoint.length), breakpoint.address % breakpoint.length == 0 else {
          return false
        }
      case .software, .hardware: break
      }
      if state.slots.contains(breakpoint) { return true }
      guard let free = state.slots.firstIndex(of: nil) else { return false }
      state.slots[free] = breakpoint
      return true
    }
  }

  func removeAllBreakpoints() {
    state.withLock { $0.slots = [nil, nil, nil, nil] }
    for cpu in 0..<cpuCount { try? accelerator.setGuestDebug(cpu: cpu, flags: 0, debugRegisters: []) }
  }
}

/// Conversions between the x87 full tag word (2 bits per physical register) and FXSAVE's
/// abridged one (1 bit: not empty).
enum X87Tags {
  static func abridged(full: UInt16) -> UInt8 {
    var result: UInt8 = 0
    for register in 0..<8 where (full >> (2 * register)) & 3 != 3 { result |= 1 << register }
    return result
  }

  /// The full tag word: empty from the abridged bits, else valid, zero or special from the
  /// value (`stack` holds ST(0)-ST(7); physical register R is ST((R - top) & 7)).
  static func full(abridged: UInt8, top: Int, stack: [[UInt8]]) -> UInt16 {
    var result: UInt16 = 0
    for register in 0..<8 {
      var tag: UInt16 = 3
      if abridged & (1 << register) != 0 {
        let value = stack[(register - top) & 7]
        let exponent = UInt16(value[8]) | UInt16(value[9] & 0x7F) << 8
        let mantissaZero = value[0..<8].allSatisfy { $0 == 0 }
        let integerBit = value[7] & 0x80 != 0
        if exponent == 0 && mantissaZero {
          tag = 1
        } else if exponent == 0x7FFF || exponent == 0 || !integerBit {
          tag = 2
        } else {
          tag = 0
        }
      }
      result |= tag << (2 * UInt16(register))
    }
    return result
  }
}
