import CShim
import Glibc
import Synchronization
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
  /// Bits 255:128 of YMM0-YMM15 (the AVX state component; XMM is the lower half).
  public let ymmHigh: UnsafeMutablePointer<XMMValue>
  /// Set while the AVX unit runs a VEX form through the SSE operations (no alignment rule for
  /// arithmetic memory operands).
  var vexOperationActive = false
  /// XCR0, the XSAVE feature-enable register (XSETBV): x87 (bit 0) is always enabled.
  public var xcr0: UInt64 = 1
  /// XINUSE (SDM vol. 1 §13.6): the XSAVE components that may be outside their initial
  /// configuration. Set when an instruction of the component executes; cleared only where the
  /// SDM clears it (XRSTOR initializing the component; VZEROUPPER/VZEROALL for AVX).
  public var xsaveInUse: UInt64 = 0x7

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
  /// System-architecture state of part 2 (System.swift): interrupt source, NMI/shadow state, MSRs.
  public let system = SystemState()

  // MARK: Core execution state (owned by the core; see the files named in each comment)

  /// Default code size of the current CS in bytes: 2 (16-bit), 4 (32-bit) or 8 (64-bit mode).
  /// Part of the decoded-block key. Part 2 updates it on every CS load and mode change.
  public internal(set) var codeSize: UInt8 = 2 {
    didSet {
      // Part 2 stores it on every CS load; only a real change invalidates block links.
      if codeSize != oldValue { chainGeneration &+= 1 }
    }
  }
  /// Current privilege level (CS.RPL in protected mode).
  public internal(set) var cpl: UInt8 = 0
  /// Flat test mode (see `enterFlatLongMode`): faults are returned, linear = physical, and
  /// accesses to addresses without RAM or a device fault as if not present.
  public internal(set) var flatTestMode = false
  /// Stack-pointer width as a mask: ~0 in 64-bit mode, 0xFFFF_FFFF for a 32-bit stack (SS.B),
  /// 0xFFFF for a 16-bit one. Part 2 sets it on SS loads and mode changes.
  public internal(set) var stackMask: UInt64 = ~0
  /// Instructions retired by `run` since creation (counted per block).
  public internal(set) var retiredInstructions: UInt64 = 0

  // Lazy flags (Flags.swift): the last flag-setting operation, its size and operands.
  var flagOp: FlagOp = .none
  var flagSize: UInt8 = 8
  var flagDst: UInt64 = 0
  var flagSrc: UInt64 = 0
  var flagResult: UInt64 = 0
  /// Carry-in for ADC/SBB, the preserved CF for INC/DEC.
  var flagCarry: UInt64 = 0

  // Software TLB (TLB.swift): direct-mapped, one table per access kind.
  let readTLB: UnsafeMutablePointer<TLBEntry>
  let writeTLB: UnsafeMutablePointer<TLBEntry>
  let fetchTLB: UnsafeMutablePointer<TLBEntry>
  /// Per TLB index, which of the three entries came from a global translation and so survive
  /// a CR3 write (`TLBGlobalMark`).
  let tlbGlobalMarks: UnsafeMutablePointer<UInt8>
  /// Translations of system accesses (`systemPhysicalAddress`: descriptor tables, TSS, IDT,
  /// interrupt stack frames), which bypass the TLB; emptied with it.
  let systemTranslations: UnsafeMutablePointer<TLBEntry>
  /// The TLB indices filled since the last `flushTLB` (the first `tlbFillRecordCapacity`), and
  /// how many fills there were: a flush after a few fills clears only those indices.
  let tlbFilledIndices: UnsafeMutablePointer<UInt16>
  var tlbFills = 0
  /// Whether the last `translate` found a global translation (the TLB fill that follows marks
  /// its entry).
  var lastTranslationGlobal = false
  /// OR-ed into the page tag of every TLB lookup: `tlbUserTagBits` in user mode (CPL 3), 0
  /// otherwise, so user and supervisor translations never alias.
  var tlbTagExtra: UInt64 = 0
  /// Guest RAM regions, copied once so the hot path never touches Swift arrays.
  let ramRegions: UnsafeMutablePointer<RAMRegion>
  let ramRegionCount: Int

  // Decoded-block cache (BlockCache.swift).
  let blockArena: UnsafeMutablePointer<Instruction>
  var arenaUsed = 0
  let blocks: UnsafeMutablePointer<DecodedBlock>
  var blockCount = 0
  let blockTable: UnsafeMutablePointer<BlockTableEntry>
  /// Head of the list of blocks decoded from each physical RAM page (block index + 1, 0 = no
  /// code on that page). A page with a nonzero head is a code page: it never gets a write-TLB
  /// entry, so every store to it takes the slow path, which invalidates its blocks.
  let codePageHead: UnsafeMutablePointer<Int32>
  let codePageCount: UInt64
  /// Set when a store invalidated decoded code, or a conditional branch was taken (Jcc does
  /// not end its block): the current block stops after that instruction.
  var blockInvalidated = false
  /// Bumped whenever decoded blocks, translations or the code size change: block-to-block
  /// links (`DecodedBlock.links`) and jump-cache entries made under an older generation are
  /// ignored. Never 0, the generation of an empty (zero-filled) jump-cache entry.
  var chainGeneration: UInt64 = 1
  /// Bumped by every CR3 write (never 0): links and jump-cache entries to code fetched through
  /// a non-global translation are valid only in the address space they were made in, while
  /// those to global code (the kernel's) survive the switch, as the TLB entries they rest on do.
  var addressSpaceGeneration: UInt32 = 1
  /// Counters of the block cache and the translating tier.
  public internal(set) var statistics = SoftCPUStatistics()

  /// Guest RAM ranges other threads wrote (device DMA) that may hold decoded code; `run`
  /// applies them at its next block boundary (`postExternalWrite`, BlockCache.swift).
  let postedExternalWrites = Mutex(PostedExternalWrites())
  /// The machine's other vCPUs and what they share, for cross-vCPU code coherence
  /// (CodeCoherence.swift); empty / nil with one vCPU.
  var siblings: [SiblingCPU] = []
  var sharedCode: SharedCodeState?
  /// The shared code epoch this CPU last synchronized with.
  var seenCodeEpoch: UInt64 = 0
  /// Pages holding siblings' code that this CPU stored to since its last block boundary.
  var deferredSiblingPages: [UInt64] = []

  /// Set by another thread to make `run` return `.stopRequested` at the next block boundary.
  /// Part 2 also raises it for pending interrupts.
  let stopFlag = Atomic<Bool>(false)
  /// A copy of `stopFlag` that translated code reads before chaining into the next block
  /// (nonzero: return to `run`). Written with C atomics, possibly from other threads.
  let translationStopSignal: UnsafeMutablePointer<UInt8> = {
    let signal = UnsafeMutablePointer<UInt8>.allocate(capacity: 1)
    signal.initialize(to: 0)
    return signal
  }()
  /// Set by instructions that end `run` after their block (HLT, traps in flat test mode).
  var exitRequested = false
  /// With `exitRequested`: HLT executed.
  var haltRequested = false
  /// Set by SYSCALL and SYSRET, whose single-step trap depends on TF at their end.
  var singleStepOverride = SingleStepOverride.none
  /// Linear page numbers holding debugger breakpoints (SoftDebugHook.swift); `run` leaves a
  /// slice before a block on one of them when `debugStopPagesActive`.
  var debugStopPages = Set<UInt64>()
  var debugStopPagesActive = false
  /// The translating tier (Translator/), nil when only the interpreter runs. The run loop
  /// reads the plain fields below instead (no reference counting on the hot path).
  var translator: Translator?
  /// A translating tier is active; lockstep checking is on; executions before translation;
  /// the context generated code runs on.
  var translationEnabled = false
  var translationLockstep = false
  var translationThreshold: UInt32 = 0
  var translationContext: UnsafeMutablePointer<hv_jit_context>?
  /// Some translation has SSE floating-point arithmetic: translated code then runs with the
  /// guest's MXCSR loaded in the host (when it masks every exception).
  var translationUsesFloatingPoint = false
  /// With `exitRequested` and not halted: the trap to report.
  var pendingTrap = Fault(vector: 0)

  /// Creates a CPU in the reset state, attached to `memory` and `bus`.
  public init(memory: GuestMemory, bus: IOBus) {
    self.memory = memory
    self.bus = bus
    gpr = .allocate(capacity: 16)
    gpr.initialize(repeating: 0, count: 16)
    // XMM0-15, and two scratch registers (16, 17) the AVX unit uses for the halves of a VEX form.
    xmm = .allocate(capacity: 18)
    xmm.initialize(repeating: XMMValue(0, 0), count: 18)
    ymmHigh = .allocate(capacity: 16)
    ymmHigh.initialize(repeating: XMMValue(0, 0), count: 16)
    fpuRegisters = .allocate(capacity: 8)
    fpuRegisters.initialize(repeating: 0, count: 8)
    segments = .allocate(capacity: 6)
    segments.initialize(repeating: SegmentCache(), count: 6)
    segmentBase = .allocate(capacity: 6)
    segmentBase.initialize(repeating: 0, count: 6)

    readTLB = .allocate(capacity: tlbSlots)
    readTLB.initialize(repeating: TLBEntry(), count: tlbSlots)
    writeTLB = .allocate(capacity: tlbSlots)
    writeTLB.initialize(repeating: TLBEntry(), count: tlbSlots)
    fetchTLB = .allocate(capacity: tlbSlots)
    fetchTLB.initialize(repeating: TLBEntry(), count: tlbSlots)
    tlbGlobalMarks = .allocate(capacity: tlbSlots)
    tlbGlobalMarks.initialize(repeating: 0, count: tlbSlots)
    systemTranslations = .allocate(capacity: systemTranslationEntries)
    systemTranslations.initialize(repeating: TLBEntry(), count: systemTranslationEntries)
    tlbFilledIndices = .allocate(capacity: tlbFillRecordCapacity)
    // RAM, then device memory the guest maps like RAM (a framebuffer).
    let regionList = memory.regions + memory.deviceRegions
    ramRegionCount = regionList.count
    ramRegions = .allocate(capacity: max(regionList.count, 1))
    var lastPage: UInt64 = 0
    for (index, region) in regionList.enumerated() {
      (ramRegions + index).initialize(
        to: RAMRegion(guestBase: region.guestBase, size: region.size, host: region.host))
      lastPage = max(lastPage, region.guestEnd >> 12)
    }

    blockArena = .allocate(capacity: blockArenaCapacity)
    blocks = .allocate(capacity: maximumBlocks)
    blockTable = allocateZeroedPages(BlockTableEntry.self, count: blockTableSize)
    codePageCount = lastPage
    // One Int32 per guest page, zero-filled and reserved lazily by the kernel.
    codePageHead = allocateZeroedPages(Int32.self, count: Int(max(lastPage, 1)))
  }

  deinit {
    translationStopSignal.deallocate()
    gpr.deallocate()
    xmm.deallocate()
    ymmHigh.deallocate()
    fpuRegisters.deallocate()
    segments.deallocate()
    segmentBase.deallocate()
    readTLB.deallocate()
    writeTLB.deallocate()
    fetchTLB.deallocate()
    tlbGlobalMarks.deallocate()
    systemTranslations.deallocate()
    tlbFilledIndices.deallocate()
    ramRegions.deallocate()
    blockArena.deallocate()
    blocks.deallocate()
    freeZeroedPages(blockTable, count: blockTableSize)
    freeZeroedPages(codePageHead, count: Int(max(codePageCount, 1)))
  }

  /// Asks `run` (on the vCPU thread) to return `.stopRequested` at the next block boundary.
  /// Safe to call from any thread.
  public func requestStop() {
    hv_atomic_store8(translationStopSignal, 1)
    stopFlag.store(true, ordering: .releasing)
  }
}

/// How the instruction that just ran decides its single-step trap.
enum SingleStepOverride: UInt8 {
  /// TF at the start of the instruction decides.
  case none
  /// Trap after the instruction (TF set at its end).
  case trap
  /// No trap (TF clear at its end).
  case noTrap
}
