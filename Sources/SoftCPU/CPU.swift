import VMCore

/// A 128-bit XMM register value. Reinterpret with `unsafeBitCast` for other lane shapes
/// (e.g. `SIMD4<Float>`, `SIMD2<Double>`, `SIMD16<UInt8>`).
public typealias XMMValue = SIMD2<UInt64>

/// Descriptor cache of one segment register as the software CPU keeps it.
public struct SegmentCache: Sendable, Equatable {
  public var selector: UInt16 = 0
  public var base: UInt64 = 0
  public var limit: UInt32 = 0xFFFF
  /// Access rights: bits 0-3 type, 4 S, 5-6 DPL, 7 P, 12 AVL, 13 L, 14 D/B, 15 G, 16 unusable
  /// (the VMX access-rights layout).
  public var access: UInt32 = 0x93
  public init() {}
}

/// The software x86-64 CPU: architectural state plus the decoded-block cache and software
/// TLB. One instance per vCPU; it is only touched from its own thread.
///
/// Hot state lives in manually allocated buffers so the interpreter loop does no reference
/// counting, no bounds checking and no allocation per instruction.
public final class CPU: @unchecked Sendable {
  /// Guest RAM.
  public let memory: GuestMemory
  /// Port and MMIO devices.
  public let bus: IOBus

  /// General registers RAX..R15 in encoding order.
  public let gpr: UnsafeMutablePointer<UInt64>
  /// Instruction pointer.
  public var rip: UInt64 = 0
  /// RFLAGS storage (see Flags.swift for the accessors; the core may make status flags lazy).
  var storedFlags: UInt64 = 0x2
  /// XMM0-XMM15.
  public let xmm: UnsafeMutablePointer<XMMValue>
  /// SSE control/status register.
  public var mxcsr: UInt32 = 0x1F80

  /// x87 physical data registers R0-R7 (ST(i) is R[(top + i) & 7]).
  public let fpuRegisters: UnsafeMutablePointer<Float80>
  /// x87 top-of-stack field (0-7); also mirrored into `fpuStatus` bits 11-13 when read.
  public var fpuTop: Int = 0
  /// x87 status word (TOP field kept in `fpuTop`).
  public var fpuStatus: UInt16 = 0
  /// x87 control word.
  public var fpuControl: UInt16 = 0x037F
  /// x87 full tag word (2 bits per physical register; 3 = empty).
  public var fpuTags: UInt16 = 0xFFFF
  /// Last x87 instruction pointer, data pointer and opcode (for FXSAVE).
  public var fpuLastIP: UInt64 = 0
  public var fpuLastDP: UInt64 = 0
  public var fpuLastOpcode: UInt16 = 0

  /// ES, CS, SS, DS, FS, GS descriptor caches (index with `SegmentIndex`).
  public let segments: UnsafeMutablePointer<SegmentCache>
  /// Segment bases as used for address generation: in 64-bit mode ES/CS/SS/DS are 0.
  public let segmentBase: UnsafeMutablePointer<UInt64>
  public var ldtr = SegmentCache()
  public var tr = SegmentCache()
  public var gdtr = DescriptorTableRegister()
  public var idtr = DescriptorTableRegister()

  public var cr0: UInt64 = 0x6000_0010
  public var cr2: UInt64 = 0
  public var cr3: UInt64 = 0
  public var cr4: UInt64 = 0
  public var cr8: UInt64 = 0
  public var efer: UInt64 = 0
  public var apicBase: UInt64 = 0xFEE0_0900
  /// Time-stamp counter offset; RDTSC returns host-derived virtual time plus this.
  public var tscOffset: UInt64 = 0
  /// IA32_FS_BASE / IA32_GS_BASE live in `segments`; KERNEL_GS_BASE for SWAPGS:
  public var kernelGSBase: UInt64 = 0
  public var star: UInt64 = 0, lstar: UInt64 = 0, cstar: UInt64 = 0, sfmask: UInt64 = 0
  public var sysenterCS: UInt64 = 0, sysenterESP: UInt64 = 0, sysenterEIP: UInt64 = 0
  public var pat: UInt64 = 0x0007_0406_0007_0406
  public var tscAux: UInt64 = 0

  /// Creates a CPU in the reset state, attached to `memory` and `bus`.
  public init(memory: GuestMemory, bus: IOBus) {
    self.memory = memory
    self.bus = bus
    gpr = .allocate(capacity: 16)
    gpr.initialize(repeating: 0, count: 16)
    xmm = .allocate(capacity: 16)
    xmm.initialize(repeating: XMMValue(0, 0), count: 16)
    fpuRegisters = .allocate(capacity: 8)
    fpuRegisters.initialize(repeating: 0, count: 8)
    segments = .allocate(capacity: 6)
    segments.initialize(repeating: SegmentCache(), count: 6)
    segmentBase = .allocate(capacity: 6)
    segmentBase.initialize(repeating: 0, count: 6)
  }

  deinit {
    gpr.deallocate()
    xmm.deallocate()
    fpuRegisters.deallocate()
    segments.deallocate()
    segmentBase.deallocate()
  }
}
