import VMCore

/// Why the machine stopped, as reported to gdb.
public enum GDBStopEvent: Sendable, Equatable {
  /// A breakpoint (software or hardware) at the vCPU's RIP, before the instruction ran.
  case breakpoint(cpu: Int)
  /// A single step finished.
  case step(cpu: Int)
  /// A watched location was written (or read, for read/access watchpoints).
  case watchpoint(cpu: Int, kind: GDBBreakpointKind, address: UInt64)
  /// gdb interrupted the machine (Ctrl-C), or the machine started stopped (`--gdb-wait`).
  case interrupted(cpu: Int)

  /// The vCPU the event belongs to.
  public var cpu: Int {
    switch self {
    case .breakpoint(let cpu), .step(let cpu), .interrupted(let cpu): return cpu
    case .watchpoint(let cpu, _, _): return cpu
    }
  }
}

/// The kinds of `Z`/`z` packets.
public enum GDBBreakpointKind: Int, Sendable, Equatable {
  case software = 0
  case hardware = 1
  case write = 2
  case read = 3
  case access = 4

  /// Whether this kind watches data rather than code.
  public var isWatchpoint: Bool { rawValue >= 2 }
}

/// One breakpoint or watchpoint at a guest-virtual address.
public struct GDBBreakpoint: Sendable, Hashable {
  public var kind: GDBBreakpointKind
  public var address: UInt64
  public var length: UInt64

  public init(kind: GDBBreakpointKind, address: UInt64, length: UInt64) {
    self.kind = kind
    self.address = address
    self.length = length
  }

  public static func == (left: Self, right: Self) -> Bool {
    left.kind == right.kind && left.address == right.address && left.length == right.length
  }

  public func hash(into hasher: inout Hasher) {
    hasher.combine(kind.rawValue)
    hasher.combine(address)
    hasher.combine(length)
  }
}

/// The architectural registers of one vCPU as gdb sees them (see `GDBTargetDescription`).
public struct GDBRegisterFile: Sendable, Equatable {
  /// RAX, RBX, RCX, RDX, RSI, RDI, RBP, RSP, R8-R15 (gdb's order).
  public var general = [UInt64](repeating: 0, count: 16)
  public var rip: UInt64 = 0
  public var rflags: UInt64 = 0x2
  /// CS, SS, DS, ES, FS, GS selectors (gdb's order).
  public var segments = [UInt16](repeating: 0, count: 6)
  /// ST(0)-ST(7) as 80-bit extended values (10 bytes each).
  public var st = [[UInt8]](repeating: [UInt8](repeating: 0, count: 10), count: 8)
  /// fctrl, fstat, ftag, fiseg, fioff, foseg, fooff, fop.
  public var x87Control = [UInt32](repeating: 0, count: 8)
  /// XMM0-XMM15, 16 bytes each.
  public var xmm = [[UInt8]](repeating: [UInt8](repeating: 0, count: 16), count: 16)
  public var mxcsr: UInt32 = 0x1F80
  public var fsBase: UInt64 = 0
  public var gsBase: UInt64 = 0
  /// CR0, CR2, CR3, CR4, CR8, EFER (read-only from gdb).
  public var control = [UInt64](repeating: 0, count: 6)

  public init() {}

  public var cr0: UInt64 { control[0] }
  public var cr3: UInt64 { control[2] }
  public var cr4: UInt64 { control[3] }
  public var efer: UInt64 { control[5] }
}

/// An accelerator as the gdb stub drives it. All-stop: `stop` parks every vCPU; registers and
/// breakpoints are only read or changed while stopped.
public protocol GDBTarget: AnyObject, Sendable {
  /// Number of vCPUs (gdb threads 1...cpuCount).
  var cpuCount: Int { get }
  /// Guest RAM.
  var memory: GuestMemory { get }
  /// Whether the machine's vCPU threads have started (their boot state is loaded).
  var hasStarted: Bool { get }
  /// Where the target reports stop events (called on a vCPU thread); set before `resume`.
  func setStopHandler(_ handler: @escaping @Sendable (GDBStopEvent) -> Void)
  /// Stops every vCPU at an instruction boundary; false when they did not stop in time.
  func stop() -> Bool
  /// Lets every vCPU run (or, with `step`, vCPU `step` execute one instruction while the
  /// others stay stopped) until a stop event.
  func resume(step: Int?)
  /// The registers of vCPU `cpu` (machine stopped).
  func registers(cpu: Int) -> GDBRegisterFile?
  /// Writes the registers of vCPU `cpu` (machine stopped); segment selectors and control
  /// registers are read-only. Returns false when the accelerator refused.
  func setRegisters(_ registers: GDBRegisterFile, cpu: Int) -> Bool
  /// Inserts (or removes) a breakpoint or watchpoint; false when this kind is not supported
  /// or no debug resource is left.
  func setBreakpoint(_ breakpoint: GDBBreakpoint, inserted: Bool) -> Bool
  /// Removes every breakpoint and watchpoint (gdb detached).
  func removeAllBreakpoints()
}
