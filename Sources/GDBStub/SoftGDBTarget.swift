import Glibc
import SoftCPU
import Synchronization
import VMCore

/// The software CPU as a gdb target. Breakpoints of both kinds are compared with the linear
/// RIP before each instruction (guest memory is never patched with INT3); write watchpoints
/// compare the watched bytes before and after each instruction. While the debugger has no
/// breakpoint, watchpoint or step, the vCPUs run their normal slices.
final class SoftGDBTarget: GDBTarget, SoftCPUDebugger, @unchecked Sendable {
  private let accelerator: SoftAccelerator
  private let cpus: [CPU]
  let memory: GuestMemory

  private struct State {
    var codeBreakpoints = Set<GDBBreakpoint>()
    /// The addresses of `codeBreakpoints`.
    var breakpoints = Set<UInt64>()
    var watchpoints: [GDBBreakpoint] = []
    /// The vCPU being single-stepped, if any.
    var stepping: Int?
    /// A stop was reported since the last resume: every vCPU waits.
    var stopReported = false
    /// vCPUs that must not stop at a breakpoint at their current RIP (they resume from it).
    var resumingFrom: [Bool]
    /// The watched bytes of each vCPU before its current instruction.
    var watchedBefore: [[[UInt8]]]
    var handler: (@Sendable (GDBStopEvent) -> Void)?
  }
  private let state: Mutex<State>

  init(accelerator: SoftAccelerator, memory: GuestMemory) {
    self.accelerator = accelerator
    self.cpus = accelerator.processors
    self.memory = memory
    state = Mutex(
      State(
        resumingFrom: [Bool](repeating: false, count: accelerator.cpuCount),
        watchedBefore: [[[UInt8]]](repeating: [], count: accelerator.cpuCount)))
    accelerator.debugHook.attach(self)
  }

  var cpuCount: Int { cpus.count }
  var hasStarted: Bool { accelerator.debugHook.vcpusStarted }

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

  func resume(step: Int?) {
    let breakpoints = state.withLock { $0.breakpoints }
    // The vCPUs are parked: their breakpoint pages may change.
    for cpu in cpus { cpu.setDebugBreakpoints(breakpoints) }
    let active = state.withLock { state -> Bool in
      state.stepping = step
      state.stopReported = false
      state.resumingFrom = [Bool](repeating: true, count: cpus.count)
      state.watchedBefore = [[[UInt8]]](repeating: [], count: cpus.count)
      return step != nil || !state.breakpoints.isEmpty || !state.watchpoints.isEmpty
    }
    accelerator.debugHook.setActive(active)
    accelerator.resume()
  }

  // MARK: SoftCPUDebugger (vCPU threads)

  private func linearRIP(_ cpu: CPU) -> UInt64 {
    let linear = cpu.rip &+ cpu.segmentBase[Int(SegmentIndex.cs)]
    return cpu.codeSize == 8 ? linear : linear & 0xFFFF_FFFF
  }

  private func walker(_ cpu: CPU) -> GuestPageWalker {
    GuestPageWalker(cr0: cpu.cr0, cr3: cpu.cr3, cr4: cpu.cr4, efer: cpu.efer)
  }

  func shouldStop(before cpu: CPU, index: Int) -> Bool {
    let rip = linearRIP(cpu)
    let (stop, watchpoints) = state.withLock { state -> (Bool, [GDBBreakpoint]?) in
      if state.stopReported { return (true, nil) }
      if let stepping = state.stepping, stepping != index { return (true, nil) }
      let resuming = state.resumingFrom[index]
      state.resumingFrom[index] = false
      if !resuming && state.breakpoints.contains(rip) {
        report(.breakpoint(cpu: index), in: &state)
        return (true, nil)
      }
      return (false, state.watchpoints.isEmpty ? nil : state.watchpoints)
    }
    if let watchpoints {
      let walker = walker(cpu)
      let values = watchpoints.map { walker.read($0.address, count: Int($0.length), memory: memory) }
      state.withLock { $0.watchedBefore[index] = values }
    }
    return stop
  }

  func shouldStop(after cpu: CPU, index: Int) -> Bool {
    let (watchpoints, before) = state.withLock { ($0.watchpoints, $0.watchedBefore[index]) }
    var hit: GDBBreakpoint?
    if !watchpoints.isEmpty && before.count == watchpoints.count {
      let walker = walker(cpu)
      for (slot, watchpoint) in watchpoints.enumerated()
      where walker.read(watchpoint.address, count: Int(watchpoint.length), memory: memory) != before[slot] {
        hit = watchpoint
        break
      }
    }
    return state.withLock { state -> Bool in
      if state.stopReported { return true }
      if let hit {
        report(.watchpoint(cpu: index, kind: hit.kind, address: hit.address), in: &state)
        return true
      }
      if state.stepping == index {
        report(.step(cpu: index), in: &state)
        return true
      }
      return false
    }
  }

  func isStepping(_ index: Int) -> Bool { state.withLock { $0.stepping == index } }

  func needsEveryInstruction(_ index: Int) -> Bool {
    state.withLock { $0.stepping != nil || !$0.watchpoints.isEmpty }
  }

  private func report(_ event: GDBStopEvent, in state: inout State) {
    state.stopReported = true
    state.handler?(event)
  }

  // MARK: Registers (machine stopped)

  /// gdb's general-register order as indices of the CPU's encoding order.
  private static let generalOrder = [0, 3, 1, 2, 6, 7, 5, 4, 8, 9, 10, 11, 12, 13, 14, 15]
  /// gdb's segment order (CS, SS, DS, ES, FS, GS) as `SegmentIndex` values.
  private static let segmentOrder = [1, 2, 3, 0, 4, 5]

  func registers(cpu index: Int) -> GDBRegisterFile? {
    guard cpus.indices.contains(index) else { return nil }
    let cpu = cpus[index]
    var file = GDBRegisterFile()
    for (slot, register) in Self.generalOrder.enumerated() { file.general[slot] = cpu.gpr[register] }
    file.rip = cpu.rip
    file.rflags = cpu.rflags
    for (slot, segment) in Self.segmentOrder.enumerated() { file.segments[slot] = cpu.segments[segment].selector }
    for stack in 0..<8 {
      var value = cpu.fpuRegisters[(cpu.fpuTop + stack) & 7]
      file.st[stack] = withUnsafeBytes(of: &value) { Array($0.prefix(10)) }
    }
    let status = (cpu.fpuStatus & ~0x3800) | UInt16(cpu.fpuTop & 7) << 11
    file.x87Control = [
      UInt32(cpu.fpuControl), UInt32(status), UInt32(cpu.fullTagWord), 0,
      UInt32(truncatingIfNeeded: cpu.fpuLastIP), 0, UInt32(truncatingIfNeeded: cpu.fpuLastDP),
      UInt32(cpu.fpuLastOpcode),
    ]
    for register in 0..<16 {
      var value = cpu.xmm[register]
      file.xmm[register] = withUnsafeBytes(of: &value) { Array($0.prefix(16)) }
    }
    file.mxcsr = cpu.mxcsr
    file.fsBase = cpu.segments[Int(SegmentIndex.fs)].base
    file.gsBase = cpu.segments[Int(SegmentIndex.gs)].base
    file.control = [cpu.cr0, cpu.cr2, cpu.cr3, cpu.cr4, cpu.cr8, cpu.efer]
    return file
  }

  func setRegisters(_ file: GDBRegisterFile, cpu index: Int) -> Bool {
    guard cpus.indices.contains(index) else { return false }
    let cpu = cpus[index]
    for (slot, register) in Self.generalOrder.enumerated() { cpu.gpr[register] = file.general[slot] }
    cpu.rip = file.rip
    if cpu.rflags != file.rflags { cpu.rflags = file.rflags }
    for stack in 0..<8 where file.st[stack].count == 10 {
      var value: Float80 = 0
      withUnsafeMutableBytes(of: &value) { raw in
        for byte in 0..<10 { raw[byte] = file.st[stack][byte] }
      }
      cpu.fpuRegisters[(cpu.fpuTop + stack) & 7] = value
    }
    cpu.fpuControl = UInt16(truncatingIfNeeded: file.x87Control[0])
    let status = UInt16(truncatingIfNeeded: file.x87Control[1])
    cpu.fpuTop = Int((status >> 11) & 7)
    cpu.fpuStatus = status & ~0x3800
    cpu.fpuTags = UInt16(truncatingIfNeeded: file.x87Control[2])
    cpu.fpuLastOpcode = UInt16(truncatingIfNeeded: file.x87Control[7] & 0x7FF)
    for register in 0..<16 where file.xmm[register].count == 16 {
      var value = XMMValue(0, 0)
      withUnsafeMutableBytes(of: &value) { raw in
        for byte in 0..<16 { raw[byte] = file.xmm[register][byte] }
      }
      cpu.xmm[register] = value
    }
    // Reserved MXCSR bits would make FXRSTOR fault: keep them clear.
    cpu.mxcsr = file.mxcsr & 0xFFFF
    cpu.setSegmentBase(SegmentIndex.fs, file.fsBase)
    cpu.setSegmentBase(SegmentIndex.gs, file.gsBase)
    return true
  }

  // MARK: Breakpoints (machine stopped)

  func setBreakpoint(_ breakpoint: GDBBreakpoint, inserted: Bool) -> Bool {
    state.withLock { state -> Bool in
      switch breakpoint.kind {
      case .software, .hardware:
        if inserted { state.codeBreakpoints.insert(breakpoint) } else { state.codeBreakpoints.remove(breakpoint) }
        state.breakpoints = Set(state.codeBreakpoints.map(\.address))
        return true
      case .write:
        guard (1...8).contains(breakpoint.length) else { return false }
        if inserted {
          if !state.watchpoints.contains(breakpoint) { state.watchpoints.append(breakpoint) }
        } else {
          state.watchpoints.removeAll { $0 == breakpoint }
        }
        return true
      case .read, .access:
        // Reads are not observable by comparing memory: not supported on the software CPU.
        return false
      }
    }
  }

  func removeAllBreakpoints() {
    state.withLock { state in
      state.codeBreakpoints.removeAll()
      state.breakpoints.removeAll()
      state.watchpoints.removeAll()
    }
  }
}
