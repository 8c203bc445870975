import FuzzSupport
import SoftCPU
import VMCore

/// The x86 decoder and executor on guest bytes the fuzzer chooses.
///
/// Input: a configuration byte (bit 0: translating tier with every block translated on its
/// first run, else the interpreter; bit 1: a paged long-mode machine with an IDT, a TSS and
/// exceptions delivered to a HLT handler, else flat test mode with faults returned; bit 2:
/// CPL 3), the instruction budget (1-64), RFLAGS' low 16 bits, the page-table flags of eight
/// data pages and of the code page (paged machine), the 16 general registers (a selector byte
/// each: a random 64-bit value or an address inside guest RAM) and then the code, at most one
/// page, followed by HLTs. Guest RAM is 2 MiB; nothing the code does may touch host memory
/// outside it, crash or hang.
@main
enum FuzzSoftCPU {
  static let ramSize: UInt64 = 2 << 20
  static let codeAddress: UInt64 = 0x1_0000
  static let stackTop: UInt64 = 0x8_0000
  static let dataPages: UInt64 = 0x2_0000
  static let gdtBase: UInt64 = 0x500
  static let tssBase: UInt64 = 0x800
  static let idtBase: UInt64 = 0x3000
  static let handlerAddress: UInt64 = 0x5000
  static let pageTableRoot: UInt64 = 0x1F_0000

  /// One machine per (tier, paging, CPL), entered once; each input starts from that state.
  final class Machine {
    let memory: GuestMemory
    let cpu: CPU
    let paged: Bool
    let cpl: UInt8
    var baseline: [UInt64] = []

    init(tier: SoftCPUTier, paged: Bool, cpl: UInt8) {
      memory = try! GuestMemory(size: FuzzSoftCPU.ramSize)
      cpu = CPU(memory: memory, bus: IOBus())
      cpu.setExecutionTier(tier, threshold: 0)
      self.paged = paged
      self.cpl = cpl
    }

    /// Everything outside the general registers, RIP, RFLAGS and the x87/SSE/AVX state that
    /// an input may change: control registers, descriptor tables, segments, system MSRs.
    var systemState: [UInt64] {
      var state: [UInt64] = [
        UInt64(cpu.cpl), UInt64(cpu.codeSize), cpu.stackMask, cpu.flatTestMode ? 1 : 0, cpu.cr0, cpu.cr3, cpu.cr4,
        cpu.cr8, cpu.efer, cpu.xcr0, cpu.gdtr.base, UInt64(cpu.gdtr.limit), cpu.idtr.base, UInt64(cpu.idtr.limit),
        cpu.kernelGSBase, cpu.star, cpu.lstar, cpu.cstar, cpu.sfmask, cpu.sysenterCS, cpu.sysenterESP,
        cpu.sysenterEIP, cpu.pat, cpu.tscAux, cpu.apicBase,
      ]
      for segment in (0..<6).map({ cpu.segments[$0] }) + [cpu.tr, cpu.ldtr] {
        state += [UInt64(segment.selector), segment.base, UInt64(segment.limit), UInt64(segment.access)]
      }
      for index in 0..<6 { state.append(cpu.segmentBase[index]) }
      return state
    }

    /// Enters the machine's mode from scratch (drops every decoded block and the TLB).
    func enter() {
      if paged {
        cpu.load(FuzzSoftCPU.longModeState(cpl: cpl))
      } else {
        cpu.enterFlatLongMode(cpl: cpl)
      }
      baseline = systemState
    }

    /// Puts the CPU back in its entry state, fully only when an input changed the system state.
    func reset() {
      if baseline.isEmpty || systemState != baseline {
        enter()
        FuzzDriver.count("full resets")
      }
      cpu.cr2 = 0
      cpu.mxcsr = 0x1F80
      cpu.fpuControl = 0x037F
      cpu.fpuStatus = 0
      cpu.fpuTop = 0
      cpu.fpuTags = 0xFFFF
      cpu.fpuLastIP = 0
      cpu.fpuLastDP = 0
      cpu.fpuLastOpcode = 0
      cpu.xsaveInUse = 0x7
      for index in 0..<8 { cpu.fpuRegisters[index] = 0 }
      for index in 0..<16 {
        cpu.xmm[index] = XMMValue()
        cpu.ymmHigh[index] = XMMValue()
      }
      cpu.flushTLB()
    }
  }
  nonisolated(unsafe) static var machines: [Int: Machine] = [:]

  static func main() {
    FuzzDriver.run(name: "softcpu", seeds: seeds) { input in runOne(&input) }
  }

  static func runOne(_ input: inout FuzzInput) {
    let configuration = input.byte()
    let translated = configuration & 1 != 0
    let paged = configuration & 2 != 0
    let cpl: UInt8 = configuration & 4 != 0 ? 3 : 0
    let limit = 1 + Int(input.byte() % 64)
    let flags = UInt64(input.integer(UInt16.self))
    let dataFlags = (0..<8).map { _ in UInt64(input.byte()) }
    let codeFlags = UInt64(input.byte())
    var registers = [UInt64](repeating: 0, count: 16)
    for index in 0..<16 {
      let selector = input.byte()
      registers[index] = selector & 3 == 0 ? input.integer(UInt64.self) : UInt64(input.integer(UInt32.self)) % ramSize
    }
    registers[4] = stackTop - 0x100
    let code = input.bytes(4096)
    let key = Int(configuration & 7)
    let machine = machines[key] ?? Machine(tier: translated ? .translator : .interpreter, paged: paged, cpl: cpl)
    machines[key] = machine
    let memory = machine.memory
    let cpu = machine.cpu
    // The previous input may have written anywhere in RAM: start from zeros.
    if !memory.discard(at: 0, length: ramSize) { try! memory.fill(0, at: 0, length: ramSize) }
    try! memory.writeBytes(code, at: codeAddress)
    try! memory.fill(0xF4, at: codeAddress + UInt64(code.count), length: UInt64(4096 + 16 - code.count))
    if paged { buildPagedMachine(memory, codeFlags: codeFlags, dataFlags: dataFlags) }
    cpu.noteExternalWrite(physical: 0, length: ramSize)
    machine.reset()
    for index in 0..<16 { cpu.gpr[index] = registers[index] }
    cpu.rip = codeAddress
    cpu.rflags = 0x2 | (flags & 0x0CD5) | (paged ? 0x200 : 0)
    let retiredBefore = cpu.retiredInstructions
    let stop = cpu.run(instructionLimit: limit)
    FuzzDriver.count("instructions retired", cpu.retiredInstructions &- retiredBefore)
    FuzzDriver.count("sequences")
    if case .fault = stop { FuzzDriver.count("faults returned") }
    // Stopped with a canonical RIP, whatever ran.
    let upper = cpu.rip >> 47
    precondition(upper == 0 || upper == 0x1_FFFF, "non-canonical RIP after a stop")
  }

  /// GDT, TSS, an IDT whose every gate leads to HLT, and 4 KiB identity pages over the first
  /// 2 MiB (P|RW|US), with the fuzzer's flags on the code page and on eight data pages.
  static func buildPagedMachine(_ memory: GuestMemory, codeFlags: UInt64, dataFlags: [UInt64]) {
    let descriptors: [UInt64] = [
      0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF, 0x00CF_FB00_0000_FFFF, 0x00CF_F300_0000_FFFF,
      0x00AF_FB00_0000_FFFF,
    ]
    for (index, descriptor) in descriptors.enumerated() {
      try! memory.write(descriptor, at: gdtBase + 8 * UInt64(index))
    }
    let tss = tssBase
    try! memory.write(
      0x67 | (tss & 0xFF_FFFF) << 16 | UInt64(0x89) << 40 | ((tss >> 24) & 0xFF) << 56, at: gdtBase + 0x30)
    try! memory.write(tss >> 32, at: gdtBase + 0x38)
    try! memory.write(stackTop, at: tssBase + 4)  // RSP0
    try! memory.write(UInt8(0xF4), at: handlerAddress)
    for vector in 0..<UInt64(256) {
      let gate = idtBase + 16 * vector
      let low: UInt64 =
        (handlerAddress & 0xFFFF) | UInt64(0x08) << 16 | UInt64(0xEE00) << 32 | ((handlerAddress >> 16) & 0xFFFF) << 48
      try! memory.write(low, at: gate)
      try! memory.write(handlerAddress >> 32, at: gate + 8)
    }
    let pml4 = pageTableRoot
    let pdpt = pml4 + 0x1000
    let directory = pml4 + 0x2000
    let table = pml4 + 0x3000
    try! memory.write(pdpt | 7, at: pml4)
    try! memory.write(directory | 7, at: pdpt)
    try! memory.write(table | 7, at: directory)
    for page in 0..<UInt64(512) {
      let address = page << 12
      var flags: UInt64 = 7
      if address >= dataPages && address < dataPages + 8 * 4096 {
        flags = dataFlags[Int((address - dataPages) >> 12)] | (dataFlags[Int((address - dataPages) >> 12)] & 0x80) << 56
      } else if address == codeAddress {
        flags = codeFlags | 1
      }
      // Flag byte bit 7 (PAT on a 4 KiB entry) doubles as NX for the data pages.
      try! memory.write(address | (flags & 0x7F) | (flags & (1 << 63)), at: table + 8 * page)
    }
  }

  /// Long mode with paging at `cpl`, through the GDT, IDT and TSS `buildPagedMachine` writes.
  static func longModeState(cpl: UInt8) -> X86CPUState {
    var state = X86CPUState()
    state.cr0 = X86.cr0PE | X86.cr0PG | X86.cr0WP | X86.cr0ET | X86.cr0NE | X86.cr0MP
    state.cr4 = X86.cr4PAE | X86.cr4PGE | X86.cr4OSFXSR | X86.cr4OSXMMEXCPT
    state.cr3 = pageTableRoot
    state.efer = X86.eferLME | X86.eferLMA | X86.eferNXE | X86.eferSCE
    state.gdt = DescriptorTableRegister(base: gdtBase, limit: 0x3F)
    state.idt = DescriptorTableRegister(base: idtBase, limit: 0xFFF)
    if cpl == 3 {
      state.cs = SegmentRegister(
        selector: 0x2B, base: 0, limit: 0xFFFF_FFFF, type: 0xB, s: true, dpl: 3, present: true, db: false, l: true,
        g: true)
      state.ss = SegmentRegister(
        selector: 0x23, base: 0, limit: 0xFFFF_FFFF, type: 0x3, s: true, dpl: 3, present: true, db: true, g: true)
    } else {
      state.cs = .flatCode(selector: 0x08, long: true)
      state.ss = .flatData(selector: 0x10)
    }
    state.ds = state.ss
    state.es = state.ss
    state.tr = SegmentRegister(selector: 0x30, base: tssBase, limit: 0x67, type: 0xB, s: false, dpl: 0, present: true)
    state.rsp = stackTop - 0x100
    state.rip = codeAddress
    state.rflags = 0x202
    return state
  }

  /// Short sequences that reach the interesting parts quickly: a memory operand, a string
  /// instruction, SSE, x87, a page fault, a far return, CPUID.
  static func seeds() -> [[UInt8]] {
    let header: [[UInt8]] = [[0, 16], [1, 16], [2, 16], [3, 16], [6, 16], [7, 16]]
    let registerBytes: [UInt8] = (0..<16).flatMap { _ in [1, 0x00, 0x00, 0x02, 0x00] }
    let codes: [[UInt8]] = [
      [0x48, 0x8B, 0x03, 0x48, 0x01, 0xC8, 0xF4],  // mov rax, [rbx]; add rax, rcx
      [0xF3, 0x48, 0xA5],  // rep movsq
      [0x66, 0x0F, 0x58, 0x01, 0x0F, 0x28, 0xC8],  // addpd xmm0, [rcx]; movaps xmm1, xmm0
      [0xD9, 0x01, 0xDE, 0xC1, 0xDD, 0x1A],  // fld dword [rcx]; faddp; fstp qword [rdx]
      [0x48, 0x8B, 0x04, 0x25, 0x00, 0x00, 0x02, 0x00],  // mov rax, [0x20000]
      [0x48, 0xCB],  // retfq
      [0x0F, 0xA2, 0x0F, 0x31],  // cpuid; rdtsc
      [0xC4, 0xE2, 0x7D, 0x18, 0x01],  // vbroadcastss ymm0, [rcx]
    ]
    return header.flatMap { head in
      codes.map { head + [0x46, 0x02] + [UInt8](repeating: 7, count: 9) + registerBytes + $0 }
    }
  }
}
