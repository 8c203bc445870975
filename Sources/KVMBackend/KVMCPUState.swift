import CShim
import VMCore

/// Converts between the project's `X86CPUState` and KVM's `kvm_regs` / `kvm_sregs`.
/// Pure functions: no KVM device is needed to use or test them.
public enum KVMCPUState {
  /// General registers and RIP: the same 64-bit values in both layouts.
  static var generalRegisterFields: [(WritableKeyPath<X86CPUState, UInt64>, WritableKeyPath<kvm_regs, UInt64>)] {
    [
      (\.rax, \.rax), (\.rbx, \.rbx), (\.rcx, \.rcx), (\.rdx, \.rdx), (\.rsi, \.rsi), (\.rdi, \.rdi),
      (\.rsp, \.rsp), (\.rbp, \.rbp), (\.r8, \.r8), (\.r9, \.r9), (\.r10, \.r10), (\.r11, \.r11),
      (\.r12, \.r12), (\.r13, \.r13), (\.r14, \.r14), (\.r15, \.r15), (\.rip, \.rip),
    ]
  }

  /// Control registers, EFER and the APIC base: the same 64-bit values in both layouts.
  static var controlRegisterFields: [(WritableKeyPath<X86CPUState, UInt64>, WritableKeyPath<kvm_sregs, UInt64>)] {
    [
      (\.cr0, \.cr0), (\.cr2, \.cr2), (\.cr3, \.cr3), (\.cr4, \.cr4), (\.cr8, \.cr8), (\.efer, \.efer),
      (\.apicBase, \.apic_base),
    ]
  }

  /// The segment registers, converted with `segment` / `segmentRegister`.
  static var segmentFields: [(WritableKeyPath<X86CPUState, SegmentRegister>, WritableKeyPath<kvm_sregs, kvm_segment>)] {
    [(\.cs, \.cs), (\.ds, \.ds), (\.es, \.es), (\.fs, \.fs), (\.gs, \.gs), (\.ss, \.ss), (\.tr, \.tr), (\.ldt, \.ldt)]
  }

  /// The general registers, RIP and RFLAGS of `state` as KVM expects them.
  public static func registers(from state: X86CPUState) -> kvm_regs {
    var regs = kvm_regs()
    for (field, kvmField) in generalRegisterFields { regs[keyPath: kvmField] = state[keyPath: field] }
    regs.rflags = state.rflags | 0x2
    return regs
  }

  /// Writes the segments, descriptor tables, control registers, EFER and APIC base of
  /// `state` into `sregs`. Fields `X86CPUState` does not model (the pending-interrupt
  /// bitmap) keep the values read from KVM.
  public static func apply(_ state: X86CPUState, to sregs: inout kvm_sregs) {
    for (field, kvmField) in segmentFields { sregs[keyPath: kvmField] = segment(state[keyPath: field]) }
    for (field, kvmField) in controlRegisterFields { sregs[keyPath: kvmField] = state[keyPath: field] }
    sregs.gdt = descriptorTable(state.gdt)
    sregs.idt = descriptorTable(state.idt)
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
    for (field, kvmField) in generalRegisterFields { state[keyPath: field] = regs[keyPath: kvmField] }
    state.rflags = regs.rflags
    for (field, kvmField) in segmentFields { state[keyPath: field] = segmentRegister(sregs[keyPath: kvmField]) }
    for (field, kvmField) in controlRegisterFields { state[keyPath: field] = sregs[keyPath: kvmField] }
    state.gdt = DescriptorTableRegister(base: sregs.gdt.base, limit: sregs.gdt.limit)
    state.idt = DescriptorTableRegister(base: sregs.idt.base, limit: sregs.idt.limit)
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
