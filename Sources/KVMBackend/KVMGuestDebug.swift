import CShim
import Glibc
import Synchronization
import VMCore

/// A debugger attached to the KVM accelerator (the gdb stub). `debugExit` runs on the vCPU
/// thread after a KVM_EXIT_DEBUG; when it returns true, the debugger requests a pause of the
/// machine soon after and the vCPU waits outside KVM_RUN until it parks.
public protocol KVMDebugger: AnyObject, Sendable {
  /// A debug exit of vCPU `index`: `exception` 1 (#DB: single step or a debug-register hit,
  /// see `dr6`) or 3 (#BP), `pc` the guest's linear RIP.
  func debugExit(cpu index: Int, exception: UInt32, pc: UInt64, dr6: UInt64) -> Bool
}

/// Per-vCPU debugger slot: the attached debugger and whether the vCPU thread has started.
final class KVMDebugSlot: Sendable {
  let debugger = Mutex<(any KVMDebugger)?>(nil)
  let started = Atomic<Bool>(false)
}

/// The registers a debugger reads and writes, in KVM's terms.
public struct KVMDebugRegisters: Sendable, Equatable {
  /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15 (encoding order).
  public var general = [UInt64](repeating: 0, count: 16)
  public var rip: UInt64 = 0
  public var rflags: UInt64 = 0
  /// ES, CS, SS, DS, FS, GS selectors.
  public var selectors = [UInt16](repeating: 0, count: 6)
  public var fsBase: UInt64 = 0
  public var gsBase: UInt64 = 0
  /// CR0, CR2, CR3, CR4, CR8, EFER.
  public var control = [UInt64](repeating: 0, count: 6)
  /// The `struct kvm_fpu` bytes (FXSAVE-like: ST0-ST7 at 0 in 16-byte slots, FCW 128, FSW
  /// 130, abridged tags 132, FOP 134, FIP 136, FDP 144, XMM0-15 at 152, MXCSR 408).
  public var fpu = [UInt8](repeating: 0, count: MemoryLayout<kvm_fpu>.size)

  public init() {}
}

/// KVM_SET_GUEST_DEBUG flags (linux/kvm.h, asm/kvm.h).
public enum KVMGuestDebugFlags {
  public static let enable: UInt32 = 0x1
  public static let singleStep: UInt32 = 0x2
  public static let useSoftwareBreakpoints: UInt32 = 0x1_0000
  public static let useHardwareBreakpoints: UInt32 = 0x2_0000
  public static let blockInterrupts: UInt32 = 0x10_0000
}

extension KVMVCPU {
  /// `_IOW(KVMIO, 0x9b, struct kvm_guest_debug)`.
  static let setGuestDebugRequest: UInt =
    (1 << 30) | (UInt(MemoryLayout<kvm_guest_debug>.size) << 16) | (0xAE << 8) | 0x9B

  /// KVM_EXIT_DEBUG: hands the exit to the debugger; waits for its pause when it stops.
  func handleDebugExit(control: MachineControl) {
    // kvm_run.debug.arch lies at the exit union (offset 32): exception, pad, pc, dr6, dr7.
    let raw = UnsafeRawPointer(run) + 32
    let exception = raw.load(as: UInt32.self)
    let pc = raw.load(fromByteOffset: 8, as: UInt64.self)
    let dr6 = raw.load(fromByteOffset: 16, as: UInt64.self)
    guard let debugger = debugSlot.debugger.withLock({ $0 }) else { return }
    if debugger.debugExit(cpu: index, exception: exception, pc: pc, dr6: dr6) {
      while !control.pauseGate.isPauseRequested && !control.isStopping { usleep(200) }
    }
  }

  func setGuestDebug(flags: UInt32, debugRegisters: [UInt64]) throws(KVMError) {
    var request = kvm_guest_debug()
    request.control = flags
    withUnsafeMutableBytes(of: &request.arch.debugreg) { raw in
      for (slot, value) in debugRegisters.prefix(8).enumerated() {
        raw.storeBytes(of: value, toByteOffset: slot * 8, as: UInt64.self)
      }
    }
    if hv_ioctl_ptr(fd, Self.setGuestDebugRequest, &request) < 0 {
      let err = errno
      // Kernels without KVM_GUESTDBG_BLOCKIRQ refuse it: step with interrupts then.
      if err == EINVAL && flags & KVMGuestDebugFlags.blockInterrupts != 0 {
        try setGuestDebug(flags: flags & ~KVMGuestDebugFlags.blockInterrupts, debugRegisters: debugRegisters)
        return
      }
      throw .systemCallFailed(operation: "KVM_SET_GUEST_DEBUG on vCPU \(index)", errno: err)
    }
  }

  func debugRegisters() throws(KVMError) -> KVMDebugRegisters {
    let regs = try registers()
    let sregs = try specialRegisters()
    var fpu = kvm_fpu()
    if hv_ioctl_ptr(fd, HV_KVM_GET_FPU, &fpu) < 0 {
      throw .systemCallFailed(operation: "KVM_GET_FPU on vCPU \(index)", errno: errno)
    }
    var result = KVMDebugRegisters()
    result.general = [
      regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi, regs.r8, regs.r9, regs.r10,
      regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
    ]
    result.rip = regs.rip
    result.rflags = regs.rflags
    result.selectors = [sregs.es, sregs.cs, sregs.ss, sregs.ds, sregs.fs, sregs.gs].map(\.selector)
    result.fsBase = sregs.fs.base
    result.gsBase = sregs.gs.base
    result.control = [sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8, sregs.efer]
    result.fpu = withUnsafeBytes(of: &fpu) { Array($0) }
    return result
  }

  func setDebugRegisters(_ new: KVMDebugRegisters) throws(KVMError) {
    var regs = try registers()
    let g = new.general
    guard g.count == 16, new.fpu.count == MemoryLayout<kvm_fpu>.size else {
      throw .systemCallFailed(operation: "register write on vCPU \(index)", errno: EINVAL)
    }
    (regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi) =
      (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7])
    (regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15) =
      (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15])
    regs.rip = new.rip
    regs.rflags = new.rflags | 0x2
    if hv_ioctl_ptr(fd, HV_KVM_SET_REGS, &regs) < 0 {
      throw .systemCallFailed(operation: "KVM_SET_REGS on vCPU \(index)", errno: errno)
    }
    var sregs = try specialRegisters()
    if sregs.fs.base != new.fsBase || sregs.gs.base != new.gsBase {
      sregs.fs.base = new.fsBase
      sregs.gs.base = new.gsBase
      if hv_ioctl_ptr(fd, HV_KVM_SET_SREGS, &sregs) < 0 {
        throw .systemCallFailed(operation: "KVM_SET_SREGS on vCPU \(index)", errno: errno)
      }
    }
    var fpu = kvm_fpu()
    withUnsafeMutableBytes(of: &fpu) { raw in
      for (offset, byte) in new.fpu.enumerated() { raw[offset] = byte }
    }
    if hv_ioctl_ptr(fd, HV_KVM_SET_FPU, &fpu) < 0 {
      throw .systemCallFailed(operation: "KVM_SET_FPU on vCPU \(index)", errno: errno)
    }
  }
}

extension KVMAccelerator {
  /// Attaches (or with nil detaches) a debugger to every vCPU.
  public func attachDebugger(_ debugger: (any KVMDebugger)?) {
    for vcpu in vcpus { vcpu.debugSlot.debugger.withLock { $0 = debugger } }
  }

  /// Whether every vCPU thread has started (its boot state is loaded).
  public var vcpusStarted: Bool { vcpus.allSatisfy { $0.debugSlot.started.load(ordering: .acquiring) } }

  /// KVM_SET_GUEST_DEBUG on vCPU `index` (machine paused): `flags` from `KVMGuestDebugFlags`,
  /// `debugRegisters` DR0-DR3 and DR7 at index 7.
  public func setGuestDebug(cpu index: Int, flags: UInt32, debugRegisters: [UInt64]) throws(KVMError) {
    guard vcpus.indices.contains(index) else { throw .noSuchCPU(index: index, cpuCount: cpuCount) }
    try vcpus[index].setGuestDebug(flags: flags, debugRegisters: debugRegisters)
  }

  /// The registers of vCPU `index` for a debugger (machine paused or not started).
  public func debugRegisters(cpu index: Int) throws(KVMError) -> KVMDebugRegisters {
    guard vcpus.indices.contains(index) else { throw .noSuchCPU(index: index, cpuCount: cpuCount) }
    return try vcpus[index].debugRegisters()
  }

  /// Writes general registers, RIP, RFLAGS, FS/GS base and the FPU/SSE state of vCPU
  /// `index` (machine paused).
  public func setDebugRegisters(_ registers: KVMDebugRegisters, cpu index: Int) throws(KVMError) {
    guard vcpus.indices.contains(index) else { throw .noSuchCPU(index: index, cpuCount: cpuCount) }
    try vcpus[index].setDebugRegisters(registers)
  }
}
