import CShim
import Glibc
import Synchronization
import VMCore

/// One KVM vCPU: its file descriptor, its mmap'd `kvm_run` area, and the loop its host
/// thread runs.
///
/// Thread rules: `runLoop` runs on the vCPU's own host thread; `kick` may be called from any
/// thread; the register accessors are used while the vCPU thread is not running (before
/// `run` starts it, after it has been joined, or by the vCPU thread itself).
final class KVMVCPU: @unchecked Sendable {
  let index: Int
  let fd: Int32
  /// The shared `kvm_run` page(s). Valid until deinit.
  let run: UnsafeMutablePointer<kvm_run>
  let runSize: Int
  let counters = KVMExitCounters()
  /// The debugger attached to this vCPU (KVMGuestDebug.swift).
  let debugSlot = KVMDebugSlot()
  /// The host thread inside `runLoop`, so a kick can signal it.
  private let thread = Mutex<pthread_t?>(nil)

  init(machine: KVMVirtualMachine, index: Int, runSize: Int, cpuid: [CPUIDEntry]) throws(KVMError) {
    let fd = hv_ioctl_int(machine.fd, HV_KVM_CREATE_VCPU, UInt(index))
    guard fd >= 0 else { throw .systemCallFailed(operation: "KVM_CREATE_VCPU \(index)", errno: errno) }
    let mapping = mmap(nil, runSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    guard let mapping, mapping != MAP_FAILED else {
      let err = errno
      close(fd)
      throw .systemCallFailed(operation: "mmap of the kvm_run area of vCPU \(index)", errno: err)
    }
    self.index = index
    self.fd = fd
    self.runSize = runSize
    self.run = mapping.bindMemory(to: kvm_run.self, capacity: 1)
    try setCPUID(cpuid)
  }

  deinit {
    munmap(UnsafeMutableRawPointer(run), runSize)
    close(fd)
  }

  // MARK: Registers

  private func call(_ operation: String, _ request: UInt, _ argument: UnsafeMutableRawPointer) throws(KVMError) {
    if hv_ioctl_ptr(fd, request, argument) < 0 {
      throw .systemCallFailed(operation: "\(operation) on vCPU \(index)", errno: errno)
    }
  }

  func setCPUID(_ entries: [CPUIDEntry]) throws(KVMError) {
    let headerSize = MemoryLayout<kvm_cpuid2>.size
    let byteCount = headerSize + entries.count * MemoryLayout<kvm_cpuid_entry2>.stride
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: byteCount, alignment: MemoryLayout<kvm_cpuid2>.alignment)
    defer { buffer.deallocate() }
    memset(buffer, 0, byteCount)
    let cpuid = buffer.bindMemory(to: kvm_cpuid2.self, capacity: 1)
    cpuid.pointee.nent = UInt32(entries.count)
    let table = hv_kvm_cpuid2_entries(cpuid)!
    for (slot, entry) in entries.enumerated() { table[slot] = entry.kvmEntry }
    try call("KVM_SET_CPUID2", HV_KVM_SET_CPUID2, cpuid)
  }

  func cpuid() throws(KVMError) -> [CPUIDEntry] {
    var capacity = 256
    while true {
      let headerSize = MemoryLayout<kvm_cpuid2>.size
      let byteCount = headerSize + capacity * MemoryLayout<kvm_cpuid_entry2>.stride
      let buffer = UnsafeMutableRawPointer.allocate(
        byteCount: byteCount, alignment: MemoryLayout<kvm_cpuid2>.alignment)
      defer { buffer.deallocate() }
      memset(buffer, 0, byteCount)
      let cpuid = buffer.bindMemory(to: kvm_cpuid2.self, capacity: 1)
      cpuid.pointee.nent = UInt32(capacity)
      if hv_ioctl_ptr(fd, HV_KVM_GET_CPUID2, cpuid) < 0 {
        let err = errno
        if err == E2BIG && capacity < 65536 {
          capacity *= 2
          continue
        }
        throw .systemCallFailed(operation: "KVM_GET_CPUID2 on vCPU \(index)", errno: err)
      }
      let entries = hv_kvm_cpuid2_entries(cpuid)!
      return (0..<Int(cpuid.pointee.nent)).map { CPUIDEntry(entries[$0]) }
    }
  }

  func registers() throws(KVMError) -> kvm_regs {
    var regs = kvm_regs()
    try call("KVM_GET_REGS", HV_KVM_GET_REGS, &regs)
    return regs
  }

  func specialRegisters() throws(KVMError) -> kvm_sregs {
    var sregs = kvm_sregs()
    try call("KVM_GET_SREGS", HV_KVM_GET_SREGS, &sregs)
    return sregs
  }

  /// The architectural state of this vCPU.
  func state() throws(KVMError) -> X86CPUState {
    KVMCPUState.cpuState(registers: try registers(), specialRegisters: try specialRegisters())
  }

  /// Loads `state` into this vCPU (special registers first, so RFLAGS/RIP land in the final mode).
  func setState(_ state: X86CPUState) throws(KVMError) {
    var sregs = try specialRegisters()
    KVMCPUState.apply(state, to: &sregs)
    try call("KVM_SET_SREGS", HV_KVM_SET_SREGS, &sregs)
    var regs = KVMCPUState.registers(from: state)
    try call("KVM_SET_REGS", HV_KVM_SET_REGS, &regs)
  }

  /// One line describing where the vCPU is, for failure reports.
  func registerDump() -> String {
    guard let regs = try? registers(), let sregs = try? specialRegisters() else {
      return "vCPU \(index) registers unavailable"
    }
    let cs = sregs.cs
    return "vCPU \(index): rip=\(hex(regs.rip)) rsp=\(hex(regs.rsp)) rflags=\(hex(regs.rflags)) "
      + "cr0=\(hex(sregs.cr0)) cr3=\(hex(sregs.cr3)) cr4=\(hex(sregs.cr4)) efer=\(hex(sregs.efer)) "
      + "cs=\(hex(cs.selector)) (base \(hex(cs.base)) l=\(cs.l) db=\(cs.db) dpl=\(cs.dpl))"
  }

  // MARK: Stopping

  /// Makes the vCPU leave KVM_RUN soon: `immediate_exit` covers a thread about to enter
  /// KVM_RUN; the signal interrupts one already inside it.
  func kick() {
    hv_kvm_run_set_immediate_exit(run, 1)
    thread.withLock { thread in
      if let thread { pthread_kill(thread, KVMAccelerator.kickSignal) }
    }
  }

  // MARK: Run loop

  /// Runs the guest on the calling (dedicated) thread until the machine is asked to stop.
  /// Every way out goes through `control.requestStop`, so all vCPUs stop together.
  func runLoop(parts: MachineParts) {
    let control = parts.control
    _ = hv_set_current_thread_name("vcpu\(index)")
    if hv_kvm_unblock_signal_only_in_run(fd, KVMAccelerator.kickSignal) != 0 {
      control.requestStop(.failure("KVM_SET_SIGNAL_MASK on vCPU \(index) failed: \(KVMError.message(errno))"))
      return
    }
    thread.withLock { $0 = pthread_self() }
    defer { thread.withLock { $0 = nil } }

    control.pauseGate.enter()
    defer { control.pauseGate.leave() }
    debugSlot.started.store(true, ordering: .releasing)
    // Where this vCPU is in the throttle's timeslices (while a throttle is set).
    var throttleTimeslice = VCPUThrottle.Timeslice()
    while !control.isStopping {
      if control.pauseGate.isPauseRequested {
        // Out of KVM_RUN: a safe point once the last exit is complete in KVM.
        control.pauseGate.parkIfRequested { completePendingExit(parts: parts) }
        continue
      }
      if control.throttle.isActive {
        // The throttle's ticker kicks the vCPU out of KVM_RUN once per timeslice; the pending
        // exit needs no completion before a sleep (the thread stays out of KVM_RUN).
        if control.throttle.throttleIfDue(&throttleTimeslice) { continue }
      } else {
        throttleTimeslice.reset()
      }
      // Clear an earlier kick. A kick that lands after the checks above still interrupts
      // KVM_RUN: its signal stays pending until KVM_RUN unblocks it.
      hv_kvm_run_set_immediate_exit(run, 0)
      if hv_ioctl_int(fd, HV_KVM_RUN, 0) < 0 {
        let err = errno
        counters.count(counters.total)
        if err == EINTR || err == EAGAIN {
          // A kick (its request is checked at the loop's top) or a stray signal: not an
          // error. The kick signal is blocked outside KVM_RUN, so it stays pending and would
          // interrupt every later KVM_RUN: take it now.
          hv_consume_pending_signal(KVMAccelerator.kickSignal)
          counters.count(counters.interrupted)
          continue
        }
        control.requestStop(.failure("KVM_RUN failed: \(KVMError.message(err)); \(registerDump())"))
        return
      }
      counters.count(counters.total)
      handleExit(parts: parts)
    }
  }

  /// Serves an exit KVM reports while `completePendingExit` finishes an instruction.
  func handleExitForCompletion(parts: MachineParts) { handleExit(parts: parts) }

  /// Handles the exit described in `run`; asks the machine to stop when the guest is done.
  private func handleExit(parts: MachineParts) {
    let control = parts.control
    let reason = Int32(bitPattern: hv_kvm_run_exit_reason(run))
    switch reason {
    case KVM_EXIT_IO:
      counters.count(counters.portIO)
      handlePortIO(bus: parts.bus, control: control)
    case KVM_EXIT_MMIO:
      counters.count(counters.mmio)
      handleMMIO(bus: parts.bus, control: control)
    case KVM_EXIT_INTR:
      counters.count(counters.interrupted)
    case KVM_EXIT_DEBUG:
      counters.count(counters.other)
      handleDebugExit(control: control)
    case KVM_EXIT_HLT:
      counters.count(counters.halt)
      // Only seen without an in-kernel irqchip halt handler: with interrupts disabled
      // nothing can wake the CPU, so the guest is done.
      let interruptsEnabled = ((try? registers())?.rflags ?? 0) & (1 << 9) != 0
      if !interruptsEnabled { control.requestStop(.powerOff) }
    case KVM_EXIT_SHUTDOWN:
      counters.count(counters.other)
      // KVM reports a shutdown (triple fault) without the exception that caused it.
      control.requestStop(.tripleFault(vector: nil, rip: (try? registers())?.rip ?? 0))
    case KVM_EXIT_SYSTEM_EVENT:
      counters.count(counters.other)
      switch Int32(bitPattern: hv_kvm_run_system_event_type(run)) {
      case KVM_SYSTEM_EVENT_SHUTDOWN: control.requestStop(.powerOff)
      case KVM_SYSTEM_EVENT_RESET: control.requestStop(.reset(reason: "system reset event"))
      default:
        control.requestStop(
          .failure("KVM system event \(hv_kvm_run_system_event_type(run)) (guest crash); \(registerDump())"))
      }
    case KVM_EXIT_FAIL_ENTRY:
      counters.count(counters.other)
      control.requestStop(
        .failure(
          "KVM could not enter the guest (hardware entry failure reason \(hex(hv_kvm_run_fail_entry_reason(run)))); "
            + registerDump()))
    case KVM_EXIT_INTERNAL_ERROR:
      counters.count(counters.other)
      control.requestStop(.failure("KVM internal error (\(internalErrorDescription())); \(registerDump())"))
    default:
      counters.count(counters.other)
      control.requestStop(.failure("unexpected KVM exit reason \(reason); \(registerDump())"))
    }
  }

  /// Port I/O: `count` items of `size` bytes in the data area of `kvm_run` (string I/O moves
  /// several items per exit).
  @inline(__always)
  private func handlePortIO(bus: IOBus, control: MachineControl) {
    let port = hv_kvm_run_io_port(run)
    let size = Int(hv_kvm_run_io_size(run))
    let count = Int(hv_kvm_run_io_count(run))
    let offset = hv_kvm_run_io_data_offset(run)
    guard size == 1 || size == 2 || size == 4, offset <= UInt64(runSize), count <= (runSize - Int(offset)) / size
    else {
      control.requestStop(
        .failure("malformed KVM port I/O exit (port \(hex(port)) size \(size) count \(count) offset \(offset))"))
      return
    }
    let data = UnsafeMutableRawPointer(run) + Int(offset)
    if hv_kvm_run_io_direction(run) == UInt8(KVM_EXIT_IO_OUT) {
      for item in 0..<count {
        let pointer = data + item * size
        let value: UInt32
        switch size {
        case 1: value = UInt32(pointer.load(as: UInt8.self))
        case 2: value = UInt32(UInt16(littleEndian: pointer.loadUnaligned(as: UInt16.self)))
        default: value = UInt32(littleEndian: pointer.loadUnaligned(as: UInt32.self))
        }
        bus.portWrite(port, size: size, value: value)
      }
    } else {
      for item in 0..<count {
        let pointer = data + item * size
        let value = bus.portRead(port, size: size)
        switch size {
        case 1: pointer.storeBytes(of: UInt8(truncatingIfNeeded: value), as: UInt8.self)
        case 2: pointer.storeBytes(of: UInt16(truncatingIfNeeded: value).littleEndian, toByteOffset: 0, as: UInt16.self)
        default: pointer.storeBytes(of: value.littleEndian, toByteOffset: 0, as: UInt32.self)
        }
      }
    }
  }

  /// MMIO: up to 8 little-endian bytes in `kvm_run.mmio.data`.
  private func handleMMIO(bus: IOBus, control: MachineControl) {
    let address = hv_kvm_run_mmio_phys_addr(run)
    let length = Int(hv_kvm_run_mmio_len(run))
    guard (1...8).contains(length), let data = hv_kvm_run_mmio_data(run) else {
      control.requestStop(.failure("malformed KVM MMIO exit (address \(hex(address)) length \(length))"))
      return
    }
    if hv_kvm_run_mmio_is_write(run) != 0 {
      var value: UInt64 = 0
      for byte in 0..<length { value |= UInt64(data[byte]) << (8 * byte) }
      bus.mmioWrite(address, size: length, value: value)
    } else {
      let value = bus.mmioRead(address, size: length)
      for byte in 0..<length { data[byte] = UInt8(truncatingIfNeeded: value >> (8 * byte)) }
    }
  }

  private func internalErrorDescription() -> String {
    let suberror = hv_kvm_run_internal_suberror(run)
    let name: String
    switch Int32(bitPattern: suberror) {
    case KVM_INTERNAL_ERROR_EMULATION: name = "instruction emulation failed"
    case KVM_INTERNAL_ERROR_SIMUL_EX: name = "exception while delivering an exception"
    case KVM_INTERNAL_ERROR_DELIVERY_EV: name = "exit while delivering an event"
    case KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: name = "unexpected hardware exit reason"
    default: name = "unknown"
    }
    let count = min(hv_kvm_run_internal_ndata(run), 16)
    let data = (0..<count).map { hex(hv_kvm_run_internal_data(run, $0)) }
    return "suberror \(suberror): \(name)" + (data.isEmpty ? "" : ", data \(data.joined(separator: " "))")
  }
}

/// Starts a joinable host thread running `body`: vCPUs never run on the Swift concurrency pool.
func startHostThread(_ body: @escaping @Sendable () -> Void) throws(KVMError) -> pthread_t {
  switch HostThread.start(body) {
  case .success(let thread): return thread
  case .failure(let error): throw .cannotCreateThread(errno: error.errno)
  }
}
