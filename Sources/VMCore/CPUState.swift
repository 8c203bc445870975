/// A segment register as both accelerators see it: the visible selector plus the hidden
/// descriptor cache. Field meanings follow the Intel SDM segment descriptor.
public struct SegmentRegister: Sendable, Equatable {
  public var selector: UInt16
  public var base: UInt64
  public var limit: UInt32
  /// Descriptor type (4 bits).
  public var type: UInt8
  /// 1 for code/data segments, 0 for system segments.
  public var s: Bool
  public var dpl: UInt8
  public var present: Bool
  /// Default operation size (D/B bit).
  public var db: Bool
  /// 64-bit code segment (L bit).
  public var l: Bool
  /// Granularity (limit in 4 KiB units when set; `limit` here is always in bytes).
  public var g: Bool
  public var avl: Bool
  /// Set for a null/unusable segment.
  public var unusable: Bool

  public init(
    selector: UInt16 = 0, base: UInt64 = 0, limit: UInt32 = 0xFFFF, type: UInt8 = 3, s: Bool = true,
    dpl: UInt8 = 0, present: Bool = true, db: Bool = false, l: Bool = false, g: Bool = false,
    avl: Bool = false, unusable: Bool = false
  ) {
    self.selector = selector
    self.base = base
    self.limit = limit
    self.type = type
    self.s = s
    self.dpl = dpl
    self.present = present
    self.db = db
    self.l = l
    self.g = g
    self.avl = avl
    self.unusable = unusable
  }

  /// A flat 4 GiB ring-0 code segment; `long` selects a 64-bit code segment.
  public static func flatCode(selector: UInt16, long: Bool) -> SegmentRegister {
    SegmentRegister(
      selector: selector, base: 0, limit: 0xFFFF_FFFF, type: 0xB, s: true, dpl: 0, present: true,
      db: !long, l: long, g: true)
  }

  /// A flat 4 GiB ring-0 read/write data segment.
  public static func flatData(selector: UInt16) -> SegmentRegister {
    SegmentRegister(
      selector: selector, base: 0, limit: 0xFFFF_FFFF, type: 0x3, s: true, dpl: 0, present: true,
      db: true, l: false, g: true)
  }

  /// A real-mode segment whose base is `selector << 4`.
  public static func realMode(selector: UInt16, code: Bool = false) -> SegmentRegister {
    SegmentRegister(
      selector: selector, base: UInt64(selector) << 4, limit: 0xFFFF, type: code ? 0xB : 0x3, s: true)
  }
}

/// GDTR or IDTR.
public struct DescriptorTableRegister: Sendable, Equatable {
  public var base: UInt64
  public var limit: UInt16
  public init(base: UInt64 = 0, limit: UInt16 = 0xFFFF) {
    self.base = base
    self.limit = limit
  }
}

/// The architectural state of one x86-64 CPU that loaders set up and both accelerators
/// accept: general registers, segments, control registers and the MSRs a boot needs.
public struct X86CPUState: Sendable, Equatable {
  public var rax: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0
  public var rsi: UInt64 = 0, rdi: UInt64 = 0, rsp: UInt64 = 0, rbp: UInt64 = 0
  public var r8: UInt64 = 0, r9: UInt64 = 0, r10: UInt64 = 0, r11: UInt64 = 0
  public var r12: UInt64 = 0, r13: UInt64 = 0, r14: UInt64 = 0, r15: UInt64 = 0
  public var rip: UInt64 = 0xFFF0
  /// RFLAGS; bit 1 always reads as one.
  public var rflags: UInt64 = 0x2

  public var cs = SegmentRegister.realMode(selector: 0, code: true)
  public var ds = SegmentRegister.realMode(selector: 0)
  public var es = SegmentRegister.realMode(selector: 0)
  public var fs = SegmentRegister.realMode(selector: 0)
  public var gs = SegmentRegister.realMode(selector: 0)
  public var ss = SegmentRegister.realMode(selector: 0)
  public var tr = SegmentRegister(type: 0xB, s: false)
  public var ldt = SegmentRegister(type: 0x2, s: false)
  public var gdt = DescriptorTableRegister()
  public var idt = DescriptorTableRegister()

  public var cr0: UInt64 = 0x6000_0010
  public var cr2: UInt64 = 0
  public var cr3: UInt64 = 0
  public var cr4: UInt64 = 0
  public var cr8: UInt64 = 0
  public var efer: UInt64 = 0
  /// IA32_APIC_BASE: default base, enabled, bootstrap processor.
  public var apicBase: UInt64 = 0xFEE0_0900

  public init() {}

  /// General registers in encoding order (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15).
  public var gprs: [UInt64] {
    get { [rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15] }
    set {
      precondition(newValue.count == 16)
      rax = newValue[0]; rcx = newValue[1]; rdx = newValue[2]; rbx = newValue[3]
      rsp = newValue[4]; rbp = newValue[5]; rsi = newValue[6]; rdi = newValue[7]
      r8 = newValue[8]; r9 = newValue[9]; r10 = newValue[10]; r11 = newValue[11]
      r12 = newValue[12]; r13 = newValue[13]; r14 = newValue[14]; r15 = newValue[15]
    }
  }
}

/// Control-register and EFER bits used across the project.
public enum X86 {
  public static let cr0PE: UInt64 = 1 << 0
  public static let cr0MP: UInt64 = 1 << 1
  public static let cr0EM: UInt64 = 1 << 2
  public static let cr0TS: UInt64 = 1 << 3
  public static let cr0ET: UInt64 = 1 << 4
  public static let cr0NE: UInt64 = 1 << 5
  public static let cr0WP: UInt64 = 1 << 16
  public static let cr0AM: UInt64 = 1 << 18
  public static let cr0NW: UInt64 = 1 << 29
  public static let cr0CD: UInt64 = 1 << 30
  public static let cr0PG: UInt64 = 1 << 31
  public static let cr4PSE: UInt64 = 1 << 4
  public static let cr4PAE: UInt64 = 1 << 5
  public static let cr4PGE: UInt64 = 1 << 7
  public static let cr4OSFXSR: UInt64 = 1 << 9
  public static let cr4OSXMMEXCPT: UInt64 = 1 << 10
  public static let cr4OSXSAVE: UInt64 = 1 << 18
  public static let eferSCE: UInt64 = 1 << 0
  public static let eferLME: UInt64 = 1 << 8
  public static let eferLMA: UInt64 = 1 << 10
  public static let eferNXE: UInt64 = 1 << 11
}
