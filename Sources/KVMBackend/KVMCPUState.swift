import CShim
import VMCore

/// Converts between the project's `X86CPUState` and KVM's `kvm_regs` / `kvm_sregs`.
/// Pure functions: no KVM device is needed to use or test them.
public enum KVMCPUState {
  /// The general registers, RIP and RFLAGS of `state` as KVM expects them.
  public static func registers(from state: X86CPUState) -> kvm_regs {
    var regs = kvm_regs()
    regs.rax = state.rax
    regs.rbx = state.rbx
    regs.rcx = state.rcx
    regs.rdx = state.rdx
    regs.rsi = state.rsi
    regs.rdi = state.rdi
    regs.rsp = state.rsp
    regs.rbp = state.rbp
    regs.r8 = state.r8
    regs.r9 = state.r9
    regs.r10 = state.r10
    regs.r11 = state.r11
    regs.r12 = state.r12
    regs.r13 = state.r13
    regs.r14 = state.r14
    regs.r15 = state.r15
    regs.rip = state.rip
    regs.rflags = state.rflags | 0x2
    return regs
  }

  /// Writes the segments, descriptor tables, control registers, EFER and APIC base of
  /// `state` into `sregs`. Fields `X86CPUState` does not model (the pending-interrupt
  /// bitmap) keep the values read from KVM.
  public static func apply(_ state: X86CPUState, to sregs: inout kvm_sregs) {
    sregs.cs = segment(state.cs)
    sregs.ds = segment(state.ds)
    sregs.es = segment(state.es)
    sregs.fs = segment(state.fs)
    sregs.gs = segment(state.gs)
    sregs.ss = segment(state.ss)
    sregs.tr = segment(state.tr)
    sregs.ldt = segment(state.ldt)
    sregs.gdt = descriptorTable(state.gdt)
    sregs.idt = descriptorTable(state.idt)
    sregs.cr0 = state.cr0
    sregs.cr2 = state.cr2
    sregs.cr3 = state.cr3
    sregs.cr4 = state.cr4
    sregs.cr8 = state.cr8
    sregs.efer = state.efer
    sregs.apic_base = state.apicBase
  }

  /// The special registers of `state`, starting from an all-zero `kvm_sregs`.
  public static func specialRegisters(from state: X86CPUState) -> kvm_sregs {
    var sregs = kvm_sregs()
    apply(state, to: &sregs)
    return sregs
  }

  /// The architectural state held in KVM's register structures.
  public static func cpuState(registers regs: kvm_regs, specialRegisters sregs: kvm_sregs) -> X86CPUState {
    var state = X86CPUState()
    state.rax = regs.rax
    state.rbx = regs.rbx
    state.rcx = regs.rcx
    state.rdx = regs.rdx
    state.rsi = regs.rsi
    state.rdi = regs.rdi
    state.rsp = regs.rsp
    state.rbp = regs.rbp
    state.r8 = regs.r8
    state.r9 = regs.r9
    state.r10 = regs.r10
    state.r11 = regs.r11
    state.r12 = regs.r12
    state.r13 = regs.r13
    state.r14 = regs.r14
    state.r15 = regs.r15
    state.rip = regs.rip
    state.rflags = regs.rflags
    state.cs = segmentRegister(sregs.cs)
    state.ds = segmentRegister(sregs.ds)
    state.es = segmentRegister(sregs.es)
    state.fs = segmentRegister(sregs.fs)
    state.gs = segmentRegister(sregs.gs)
    state.ss = segmentRegister(sregs.ss)
    state.tr = segmentRegister(sregs.tr)
    state.ldt = segmentRegister(sregs.ldt)
    state.gdt = DescriptorTableRegister(base: sregs.gdt.base, limit: sregs.gdt.limit)
    state.idt = DescriptorTableRegister(base: sregs.idt.base, limit: sregs.idt.limit)
    state.cr0 = sregs.cr0
    state.cr2 = sregs.cr2
    state.cr3 = sregs.cr3
    state.cr4 = sregs.cr4
    state.cr8 = sregs.cr8
    state.efer = sregs.efer
    state.apicBase = sregs.apic_base
    return state
  }

  /// A segment register in KVM's layout (limit in bytes, one byte per attribute flag).
  public static func segment(_ register: SegmentRegister) -> kvm_segment {
    var segment = kvm_segment()
    segment.base = register.base
    segment.limit = register.limit
    segment.selector = register.selector
    segment.type = register.type & 0xF
    segment.present = register.present ? 1 : 0
    segment.dpl = register.dpl & 3
    segment.db = register.db ? 1 : 0
    segment.s = register.s ? 1 : 0
    segment.l = register.l ? 1 : 0
    segment.g = register.g ? 1 : 0
    segment.avl = register.avl ? 1 : 0
    segment.unusable = register.unusable ? 1 : 0
    return segment
  }

  /// A KVM segment as the project's `SegmentRegister`.
  public static func segmentRegister(_ segment: kvm_segment) -> SegmentRegister {
    SegmentRegister(
      selector: segment.selector, base: segment.base, limit: segment.limit, type: segment.type & 0xF,
      s: segment.s != 0, dpl: segment.dpl & 3, present: segment.present != 0, db: segment.db != 0,
      l: segment.l != 0, g: segment.g != 0, avl: segment.avl != 0, unusable: segment.unusable != 0)
  }

  static func descriptorTable(_ table: DescriptorTableRegister) -> kvm_dtable {
    var dtable = kvm_dtable()
    dtable.base = table.base
    dtable.limit = table.limit
    return dtable
  }
}
