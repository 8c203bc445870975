import CNativeExec
import Foundation
import SoftCPU
import Synchronization
import TestSupport
import VMCore

// Differential testing: run the same bytes on the host CPU (CNativeExec) and on the software
// CPU, from the same architectural state, and compare everything observable.

/// Guest-physical (= host virtual on the native side) layout shared by both runs.
enum DiffLayout {
  static let codeBase: UInt64 = CNX_CODE_BASE
  static let dataBase: UInt64 = CNX_DATA_BASE
  static let dataSize: Int = Int(CNX_DATA_SIZE)
  /// Initial RSP: the middle of the data buffer, so pushes and pops stay inside it.
  static let stackTop: UInt64 = CNX_DATA_BASE + 0x8000
  /// Guest RAM size for the emulated side: covers the data buffer plus its guard page.
  static let guestRAMSize: UInt64 = (CNX_DATA_BASE + CNX_DATA_SIZE + 0x1000 + 0xFFFF) & ~0xFFFF
}

/// One x87 data register as stored by FXSAVE: 64-bit significand and 16-bit sign/exponent.
struct X87Register: Equatable, CustomStringConvertible {
  var significand: UInt64
  var signExponent: UInt16

  var description: String {
    String(format: "%04x:%016llx", signExponent, significand)
  }

  var isZero: Bool { signExponent & 0x7FFF == 0 && significand == 0 }
  /// Tag class as the full tag word encodes it: 0 valid, 1 zero, 2 special.
  var tagClass: UInt16 {
    let exponent = signExponent & 0x7FFF
    if exponent == 0 { return significand == 0 ? 1 : 2 }
    if exponent == 0x7FFF { return 2 }
    return significand >> 63 == 1 ? 0 : 2
  }

  init(significand: UInt64, signExponent: UInt16) {
    self.significand = significand
    self.signExponent = signExponent
  }

  init(_ value: Float80) {
    var copy = value
    var significand: UInt64 = 0
    var signExponent: UInt16 = 0
    withUnsafeBytes(of: &copy) { raw in
      significand = raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self)
      signExponent = raw.loadUnaligned(fromByteOffset: 8, as: UInt16.self)
    }
    self.init(significand: significand, signExponent: signExponent)
  }

  var float80: Float80 {
    var value: Float80 = 0
    withUnsafeMutableBytes(of: &value) { raw in
      raw.storeBytes(of: significand, toByteOffset: 0, as: UInt64.self)
      raw.storeBytes(of: signExponent, toByteOffset: 8, as: UInt16.self)
    }
    return value
  }
}

/// Everything the differential test compares (plus the data buffer, kept separately).
struct MachineState: Equatable {
  var gpr = [UInt64](repeating: 0, count: 16)
  var rip: UInt64 = DiffLayout.codeBase
  var rflags: UInt64 = 0x202
  var xmm = [SIMD2<UInt64>](repeating: .zero, count: 16)
  /// Bits 255:128 of YMM0-15.
  var ymmHigh = [SIMD2<UInt64>](repeating: .zero, count: 16)
  var mxcsr: UInt32 = 0x1F80
  var fcw: UInt16 = 0x037F
  /// Status word including TOP (bits 11-13).
  var fsw: UInt16 = 0
  /// Abridged tag: bit i set when physical register R(i) is not empty.
  var ftw: UInt8 = 0
  /// ST(0)..ST(7) (FXSAVE order: relative to TOP).
  var st = [X87Register](repeating: X87Register(significand: 0, signExponent: 0), count: 8)

  var top: Int { Int(fsw >> 11) & 7 }

  /// True when ST(i) holds a value.
  func stValid(_ index: Int) -> Bool { ftw & (1 << UInt8((top + index) & 7)) != 0 }

  // MARK: FXSAVE image conversion

  func fillFXSAVE(_ image: UnsafeMutableRawBufferPointer) {
    for index in 0..<512 { image[index] = 0 }
    image.storeBytes(of: fcw, toByteOffset: 0, as: UInt16.self)
    image.storeBytes(of: fsw, toByteOffset: 2, as: UInt16.self)
    image.storeBytes(of: ftw, toByteOffset: 4, as: UInt8.self)
    image.storeBytes(of: mxcsr, toByteOffset: 24, as: UInt32.self)
    image.storeBytes(of: UInt32(0xFFFF), toByteOffset: 28, as: UInt32.self)
    for index in 0..<8 {
      image.storeBytes(of: st[index].significand, toByteOffset: 32 + 16 * index, as: UInt64.self)
      image.storeBytes(of: st[index].signExponent, toByteOffset: 40 + 16 * index, as: UInt16.self)
    }
    for index in 0..<16 {
      image.storeBytes(of: xmm[index][0], toByteOffset: 160 + 16 * index, as: UInt64.self)
      image.storeBytes(of: xmm[index][1], toByteOffset: 168 + 16 * index, as: UInt64.self)
    }
  }

  mutating func loadFXSAVE(_ image: UnsafeRawBufferPointer) {
    fcw = image.loadUnaligned(fromByteOffset: 0, as: UInt16.self)
    fsw = image.loadUnaligned(fromByteOffset: 2, as: UInt16.self)
    ftw = image.loadUnaligned(fromByteOffset: 4, as: UInt8.self)
    mxcsr = image.loadUnaligned(fromByteOffset: 24, as: UInt32.self)
    for index in 0..<8 {
      st[index] = X87Register(
        significand: image.loadUnaligned(fromByteOffset: 32 + 16 * index, as: UInt64.self),
        signExponent: image.loadUnaligned(fromByteOffset: 40 + 16 * index, as: UInt16.self))
    }
    for index in 0..<16 {
      xmm[index] = SIMD2(
        image.loadUnaligned(fromByteOffset: 160 + 16 * index, as: UInt64.self),
        image.loadUnaligned(fromByteOffset: 168 + 16 * index, as: UInt64.self))
    }
  }

  // MARK: Software CPU conversion

  func apply(to cpu: CPU) {
    for index in 0..<16 { cpu.gpr[index] = gpr[index] }
    cpu.rip = rip
    cpu.rflags = rflags
    for index in 0..<16 { cpu.xmm[index] = xmm[index] }
    for index in 0..<16 { cpu.ymmHigh[index] = ymmHigh[index] }
    // As on the native side after FXRSTOR and VZEROUPPER or VINSERTF128.
    cpu.xsaveInUse = ymmHigh.allSatisfy { $0 == .zero } ? 0x3 : 0x7
    cpu.mxcsr = mxcsr
    cpu.fpuControl = fcw
    cpu.fpuTop = top
    cpu.fpuStatus = fsw & ~0x3800
    var tags: UInt16 = 0
    for physical in 0..<8 {
      let stIndex = (physical - top) & 7
      cpu.fpuRegisters[physical] = st[stIndex].float80
      let tag: UInt16 = ftw & (1 << UInt8(physical)) == 0 ? 3 : st[stIndex].tagClass
      tags |= tag << UInt16(2 * physical)
    }
    cpu.fpuTags = tags
  }

  init() {}

  init(cpu: CPU) {
    for index in 0..<16 { gpr[index] = cpu.gpr[index] }
    rip = cpu.rip
    rflags = cpu.rflags
    for index in 0..<16 { xmm[index] = cpu.xmm[index] }
    for index in 0..<16 { ymmHigh[index] = cpu.ymmHigh[index] }
    mxcsr = cpu.mxcsr
    fcw = cpu.fpuControl
    let top = cpu.fpuTop & 7
    fsw = (cpu.fpuStatus & ~0x3800) | UInt16(top) << 11
    ftw = 0
    for physical in 0..<8 {
      if (cpu.fpuTags >> UInt16(2 * physical)) & 3 != 3 { ftw |= 1 << UInt8(physical) }
      st[(physical - top) & 7] = X87Register(cpu.fpuRegisters[physical])
    }
  }
}

/// How a run ended, in terms both sides can express.
enum RunEnd: Equatable, CustomStringConvertible {
  /// Reached the end of the sequence.
  case completed
  /// Raised exception `vector` (error code where the vector has a meaningful one).
  case fault(vector: Int, errorCode: UInt64?)
  /// The native run hit the watchdog / the emulator its instruction limit.
  case hang
  /// Something the comparison cannot judge (e.g. a native #PF: the generator left the buffer).
  case notComparable(String)

  var description: String {
    switch self {
    case .completed: return "completed"
    case .fault(let vector, let code):
      return "fault \(Fault.mnemonic(vector))" + (code.map { "(0x\(String($0, radix: 16)))" } ?? "")
    case .hang: return "hang"
    case .notComparable(let why): return "not comparable: \(why)"
    }
  }
}

extension Fault {
  static func mnemonic(_ vector: Int) -> String {
    let names = [
      0: "#DE", 1: "#DB", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 10: "#TS", 11: "#NP",
      12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 19: "#XM",
    ]
    return names[vector] ?? "vector \(vector)"
  }
}

/// The result of one run on either side.
struct RunResult {
  var end: RunEnd
  var state: MachineState
  var data: [UInt8]
  /// Guest RAM outside the data buffer that the run changed (emulated side only: natively,
  /// nothing outside the buffer is writable and a write there is a #PF).
  var strayWrites: String? = nil
  /// Lockstep tier: the first difference between translator and interpreter, and the blocks checked.
  var lockstepFailure: String? = nil
  var lockstepChecks = 0
}

/// Runs sequences natively through CNativeExec.
enum NativeRunner {
  /// Runs `code` natively. `singleStep` executes one instruction only (TF).
  static func run(code: [UInt8], initial: MachineState, data: [UInt8], singleStep: Bool = false) -> RunResult {
    precondition(data.count == DiffLayout.dataSize)
    var nativeState = CNXState()
    withUnsafeMutableBytes(of: &nativeState.gpr) { raw in
      for index in 0..<16 { raw.storeBytes(of: initial.gpr[index], toByteOffset: 8 * index, as: UInt64.self) }
    }
    nativeState.rflags = initial.rflags
    withUnsafeMutableBytes(of: &nativeState.fxsave) { initial.fillFXSAVE($0) }
    withUnsafeMutableBytes(of: &nativeState.ymmHigh) { raw in
      for index in 0..<16 {
        raw.storeBytes(of: initial.ymmHigh[index][0], toByteOffset: 16 * index, as: UInt64.self)
        raw.storeBytes(of: initial.ymmHigh[index][1], toByteOffset: 16 * index + 8, as: UInt64.self)
      }
    }
    var buffer = data
    var outcome = CNXOutcome()
    let status = code.withUnsafeBufferPointer { codePointer in
      buffer.withUnsafeMutableBufferPointer { dataPointer in
        cnx_run(
          codePointer.baseAddress, codePointer.count, dataPointer.baseAddress, &nativeState,
          singleStep ? 1 : 0, &outcome)
      }
    }
    precondition(status == 0, "native executor failed: \(String(cString: strerror(status)))")
    var final = MachineState()
    withUnsafeBytes(of: nativeState.gpr) { raw in
      for index in 0..<16 { final.gpr[index] = raw.loadUnaligned(fromByteOffset: 8 * index, as: UInt64.self) }
    }
    final.rip = nativeState.rip
    final.rflags = nativeState.rflags
    withUnsafeBytes(of: nativeState.fxsave) { final.loadFXSAVE($0) }
    withUnsafeBytes(of: nativeState.ymmHigh) { raw in
      for index in 0..<16 {
        final.ymmHigh[index] = SIMD2(
          raw.loadUnaligned(fromByteOffset: 16 * index, as: UInt64.self),
          raw.loadUnaligned(fromByteOffset: 16 * index + 8, as: UInt64.self))
      }
    }
    let end: RunEnd
    switch outcome.vector {
    case -1: end = .completed
    case -2: end = .hang
    case 14: end = .notComparable("native #PF at 0x\(String(outcome.faultAddress, radix: 16))")
    case let vector:
      let hasCode = [10, 11, 12, 13, 14, 17].contains(vector)
      end = .fault(vector: Int(vector), errorCode: hasCode ? outcome.errorCode : nil)
    }
    return RunResult(end: end, state: final, data: buffer)
  }
}

/// Runs sequences on the software CPU at CPL 3: in flat long mode (paging off, exceptions
/// returned by `run`), or with `paging` in long mode with the page tables, descriptor tables
/// and IDT of `PagedEnvironment` (exceptions delivered through the IDT).
final class EmulatedRunner {
  let memory: GuestMemory
  let bus = IOBus()
  let paging: Bool

  /// The software CPU's execution tier; the translating tiers translate every block on its
  /// first execution (threshold 0), so each sequence runs translated.
  let tier: SoftCPUTier

  init(paging: Bool = false, tier: SoftCPUTier = .interpreter) {
    memory = try! GuestMemory(size: DiffLayout.guestRAMSize)
    self.paging = paging
    self.tier = tier
  }

  /// The byte placed after the sequence: HLT, which faults with #GP(0) at CPL 3 (or halts).
  static let endMarker: UInt8 = 0xF4

  func run(code: [UInt8], initial: MachineState, data: [UInt8], instructionLimit: Int = 10_000) -> RunResult {
    let codeSlice = try! memory.slice(at: DiffLayout.codeBase, length: 4096)
    for index in 0..<4096 { codeSlice[index] = index < code.count ? code[index] : Self.endMarker }
    let dataSlice = try! memory.slice(at: DiffLayout.dataBase, length: UInt64(DiffLayout.dataSize))
    data.withUnsafeBytes { dataSlice.copyMemory(from: $0) }
    let cpu = CPU(memory: memory, bus: bus)
    if paging {
      try! PagedEnvironment.install(memory)
      cpu.load(PagedEnvironment.state)
      cpu.xcr0 = 0x7  // x87, SSE, AVX enabled, as in the host process
    } else {
      cpu.enterFlatLongMode(cpl: 3)
    }
    initial.apply(to: cpu)
    if tier != .interpreter { cpu.setExecutionTier(tier, threshold: 0) }
    let before = harnessPagesDigest()
    let stop = cpu.run(instructionLimit: instructionLimit)
    let after = outsideBufferDigestDroppingStrayPages()
    let codeEnd = DiffLayout.codeBase + UInt64(code.count)
    var end: RunEnd
    if paging, case .halted = stop {
      // Stopped in an exception handler (the end marker raises #GP(0) at codeEnd).
      if let (vector, errorCode) = PagedEnvironment.unwind(cpu) {
        if vector == 13 && cpu.rip == codeEnd {
          end = .completed
        } else {
          end = .fault(vector: vector, errorCode: [10, 11, 12, 13, 14, 17].contains(vector) ? errorCode ?? 0 : nil)
        }
      } else {
        end = .notComparable("emulator halted outside the exception handlers at 0x\(String(cpu.rip, radix: 16))")
      }
      return finish(end: end, cpu: cpu, codeEnd: codeEnd, dataSlice: dataSlice, before: before, after: after)
    }
    switch stop {
    case .halted where cpu.rip == codeEnd || cpu.rip == codeEnd + 1:
      end = .completed
    case .fault(let fault) where fault.vector == 13 && cpu.rip == codeEnd:
      end = .completed
    case .fault(let fault):
      let hasCode = [10, 11, 12, 13, 14, 17].contains(Int(fault.vector))
      end = .fault(vector: Int(fault.vector), errorCode: hasCode ? UInt64(fault.errorCode ?? 0) : nil)
    case .halted:
      end = .notComparable("emulator halted inside the sequence")
    case .instructionLimit:
      end = .hang
    case .stopRequested:
      end = .notComparable(paging ? "shutdown (triple fault)" : "stop requested")
    }
    return finish(end: end, cpu: cpu, codeEnd: codeEnd, dataSlice: dataSlice, before: before, after: after)
  }

  private func finish(
    end: RunEnd, cpu: CPU, codeEnd: UInt64, dataSlice: UnsafeMutableRawBufferPointer, before: [UInt64: UInt64],
    after: [UInt64: UInt64]
  ) -> RunResult {
    var finalState = MachineState(cpu: cpu)
    if end == .completed { finalState.rip = codeEnd }
    var result = RunResult(end: end, state: finalState, data: Array(dataSlice))
    result.lockstepFailure = cpu.lockstepFailure
    result.lockstepChecks = cpu.lockstepCheckCount
    if before != after {
      let changed = Set(before.keys).symmetricDifference(after.keys)
        .union(before.keys.filter { after[$0] != nil && after[$0] != before[$0] })
      result.strayWrites =
        "pages " + changed.sorted().prefix(8).map { DiffCompare.hex($0) }.joined(separator: ", ")
    }
    return result
  }

  /// The digest of one page of guest RAM: nil when it is all zeros, or (with paging) one of
  /// the pages that change by design: the page tables (accessed and dirty bits) and the ring-0
  /// stack (exception frames).
  private func pageDigest(_ region: GuestMemory.Region, page: Int) -> UInt64? {
    let address = region.guestBase + UInt64(page * Self.pageSize)
    if paging && address >= PagedEnvironment.base
      && (address < PagedEnvironment.gdt & ~0xFFF || address >= PagedEnvironment.stackTop - 0x1000)
      && address < PagedEnvironment.stackTop
    {
      return nil
    }
    let words = UnsafeRawPointer(region.host + page * Self.pageSize).assumingMemoryBound(to: UInt64.self)
    var hash: UInt64 = 0xCBF2_9CE4_8422_2325
    var nonZero = false
    for index in 0..<(Self.pageSize / 8) {
      let word = words[index]
      nonZero = nonZero || word != 0
      hash = (hash ^ word) &* 0x100_0000_01B3
    }
    return nonZero ? hash : nil
  }

  private static let pageSize = 4096

  /// Whether the harness itself writes the page at `address` before every run: the code page
  /// and, with paging, the environment's tables, descriptors, handlers and stack.
  private func isHarnessPage(_ address: UInt64) -> Bool {
    if address == DiffLayout.codeBase { return true }
    return paging && address >= PagedEnvironment.base && address < PagedEnvironment.stackTop
  }

  private func isDataPage(_ address: UInt64) -> Bool {
    address >= DiffLayout.dataBase && address < DiffLayout.dataBase + UInt64(DiffLayout.dataSize)
  }

  /// The digest of guest RAM outside the data buffer as a run starts. Every other page outside
  /// the buffer is known to be all zeros: the previous run's scan dropped the pages it found
  /// (`outsideBufferDigestDroppingStrayPages`), so only the pages the harness writes count.
  func harnessPagesDigest() -> [UInt64: UInt64] {
    var addresses = [DiffLayout.codeBase]
    if paging {
      addresses += stride(from: PagedEnvironment.base, to: PagedEnvironment.stackTop, by: Self.pageSize)
    }
    var digest: [UInt64: UInt64] = [:]
    for address in addresses {
      for region in memory.regions where address >= region.guestBase && address - region.guestBase < region.size {
        if let hash = pageDigest(region, page: Int(address - region.guestBase) / Self.pageSize) {
          digest[address] = hash
        }
      }
    }
    return digest
  }

  /// For every resident page of guest RAM outside the data buffer that is not all zeros
  /// (mincore: pages never touched are not resident), its guest-physical address and a hash
  /// of its contents. Then every resident page outside the buffer that the harness does not
  /// write itself is dropped (MADV_DONTNEED: it reads as zeros again), so the next run starts
  /// from RAM whose digest `harnessPagesDigest` knows without a scan, and the scan stays short.
  func outsideBufferDigestDroppingStrayPages() -> [UInt64: UInt64] {
    var digest: [UInt64: UInt64] = [:]
    for region in memory.regions {
      let pages = Int(region.size) / Self.pageSize
      var resident = [UInt8](repeating: 0, count: pages)
      guard mincore(region.host, Int(region.size), &resident) == 0 else { continue }
      var residentPages: [Int] = []
      resident.withUnsafeBytes { bytes in
        // Eight entries at a time: nearly all are zero (not resident).
        let words = bytes.count / 8
        for word in 0..<words where bytes.loadUnaligned(fromByteOffset: word * 8, as: UInt64.self) != 0 {
          for page in word * 8..<word * 8 + 8 where bytes[page] & 1 != 0 { residentPages.append(page) }
        }
        for page in words * 8..<bytes.count where bytes[page] & 1 != 0 { residentPages.append(page) }
      }
      for page in residentPages {
        let address = region.guestBase + UInt64(page * Self.pageSize)
        if isDataPage(address) { continue }
        if let hash = pageDigest(region, page: page) { digest[address] = hash }
        if !isHarnessPage(address) {
          madvise(region.host + page * Self.pageSize, Self.pageSize, MADV_DONTNEED)
        }
      }
    }
    return digest
  }
}

/// What a comparison may ignore for one case.
struct ComparisonMask {
  /// RFLAGS bits compared (status flags and DF by default).
  var rflags: UInt64 = RFlags.status | RFlags.df | RFlags.ac
  /// FSW bits ignored (undefined condition codes).
  var fswIgnored: UInt16 = 0
  /// Compare the x87 registers with a relative tolerance instead of bit for bit.
  var x87Tolerance: Double? = nil
  /// MXCSR bits not compared (a reviewed known difference; 0 normally).
  var mxcsrIgnored: UInt32 = 0
  /// Offsets in the data buffer not compared: the MXCSR_MASK field of the areas XSAVE and its
  /// variants store, on a host whose MXCSR_MASK is not the model's (`HostModel`).
  var dataIgnored: [Int] = []
}

/// One difference between native and emulated results.
struct Difference: CustomStringConvertible {
  var what: String
  var native: String
  var emulated: String
  var description: String { "\(what): native \(native), emulated \(emulated)" }
}

enum DiffCompare {
  static let gprNames = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
  ]

  static func hex<T: BinaryInteger>(_ value: T) -> String { "0x" + String(value, radix: 16) }

  static func compare(native: RunResult, emulated: RunResult, mask: ComparisonMask) -> [Difference] {
    var differences: [Difference] = []
    if native.end != emulated.end {
      differences.append(Difference(what: "end", native: "\(native.end)", emulated: "\(emulated.end)"))
    }
    let a = native.state
    let b = emulated.state
    if a.rip != b.rip { differences.append(Difference(what: "rip", native: hex(a.rip), emulated: hex(b.rip))) }
    for index in 0..<16 where a.gpr[index] != b.gpr[index] {
      differences.append(Difference(what: gprNames[index], native: hex(a.gpr[index]), emulated: hex(b.gpr[index])))
    }
    if a.rflags & mask.rflags != b.rflags & mask.rflags {
      differences.append(
        Difference(
          what: "rflags (mask \(hex(mask.rflags)))", native: flagString(a.rflags & mask.rflags),
          emulated: flagString(b.rflags & mask.rflags)))
    }
    for index in 0..<16 where a.xmm[index] != b.xmm[index] {
      differences.append(
        Difference(what: "xmm\(index)", native: xmmString(a.xmm[index]), emulated: xmmString(b.xmm[index])))
    }
    for index in 0..<16 where a.ymmHigh[index] != b.ymmHigh[index] {
      differences.append(
        Difference(
          what: "ymm\(index)[255:128]", native: xmmString(a.ymmHigh[index]), emulated: xmmString(b.ymmHigh[index])))
    }
    if a.mxcsr & ~mask.mxcsrIgnored != b.mxcsr & ~mask.mxcsrIgnored {
      differences.append(
        Difference(what: "mxcsr (ignoring \(hex(mask.mxcsrIgnored)))", native: hex(a.mxcsr), emulated: hex(b.mxcsr)))
    }
    if a.fcw != b.fcw { differences.append(Difference(what: "fcw", native: hex(a.fcw), emulated: hex(b.fcw))) }
    if a.fsw & ~mask.fswIgnored != b.fsw & ~mask.fswIgnored {
      differences.append(
        Difference(what: "fsw (ignoring \(hex(mask.fswIgnored)))", native: hex(a.fsw), emulated: hex(b.fsw)))
    }
    if a.ftw != b.ftw { differences.append(Difference(what: "ftw", native: hex(a.ftw), emulated: hex(b.ftw))) }
    for index in 0..<8 where a.stValid(index) && b.stValid(index) && a.top == b.top {
      if a.st[index] == b.st[index] { continue }
      if let tolerance = mask.x87Tolerance, closeEnough(a.st[index], b.st[index], tolerance) { continue }
      differences.append(
        Difference(what: "st(\(index))", native: x87String(a.st[index]), emulated: x87String(b.st[index])))
    }
    if let stray = emulated.strayWrites {
      differences.append(
        Difference(what: "guest RAM outside the data buffer", native: "unchanged", emulated: "changed: " + stray))
    }
    var nativeData = native.data
    var emulatedData = emulated.data
    for offset in mask.dataIgnored where offset < nativeData.count && offset < emulatedData.count {
      nativeData[offset] = 0
      emulatedData[offset] = 0
    }
    let dataDiffer = !sameBytes(nativeData, emulatedData)
    if dataDiffer {
      var ranges: [String] = []
      var index = 0
      while index < nativeData.count && ranges.count < 8 {
        if nativeData[index] != emulatedData[index] {
          let start = index
          while index < nativeData.count && nativeData[index] != emulatedData[index] && index - start < 32 {
            index += 1
          }
          let nativeBytes = nativeData[start..<index].map { String(format: "%02x", $0) }.joined()
          let emulatedBytes = emulatedData[start..<index].map { String(format: "%02x", $0) }.joined()
          ranges.append(
            "[\(hex(DiffLayout.dataBase + UInt64(start)))] native \(nativeBytes) emulated \(emulatedBytes)")
        }
        index += 1
      }
      differences.append(Difference(what: "memory", native: ranges.joined(separator: "; "), emulated: "(see left)"))
    }
    return differences
  }

  /// Whether two byte arrays are equal, with memcmp: Array's == compares the 64 KiB data
  /// buffers byte by byte, a tenth of a whole case's time.
  static func sameBytes(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    guard a.count == b.count else { return false }
    guard !a.isEmpty else { return true }
    return a.withUnsafeBytes { x in b.withUnsafeBytes { y in memcmp(x.baseAddress!, y.baseAddress!, x.count) == 0 } }
  }

  static func closeEnough(_ a: X87Register, _ b: X87Register, _ tolerance: Double) -> Bool {
    let x = a.float80
    let y = b.float80
    if x.isNaN && y.isNaN { return true }
    if x == y { return true }
    let scale = max(abs(x), abs(y))
    return abs(x - y) <= scale * Float80(tolerance)
  }

  static func flagString(_ flags: UInt64) -> String {
    let names: [(UInt64, String)] = [
      (RFlags.of, "OF"), (RFlags.df, "DF"), (RFlags.sf, "SF"), (RFlags.zf, "ZF"), (RFlags.af, "AF"),
      (RFlags.pf, "PF"), (RFlags.cf, "CF"), (RFlags.ac, "AC"),
    ]
    let set = names.filter { flags & $0.0 != 0 }.map(\.1)
    return hex(flags) + " [" + set.joined(separator: " ") + "]"
  }

  static func xmmString(_ value: SIMD2<UInt64>) -> String {
    String(format: "%016llx_%016llx", value[1], value[0])
  }

  static func x87String(_ value: X87Register) -> String {
    "\(value) (\(value.float80))"
  }

  static func stateString(_ state: MachineState) -> String {
    var lines: [String] = []
    for row in 0..<4 {
      lines.append(
        (0..<4).map { column in
          let index = row * 4 + column
          return gprNames[index].padding(toLength: 3, withPad: " ", startingAt: 0) + "="
            + String(format: "%016llx", state.gpr[index])
        }.joined(separator: " "))
    }
    lines.append("rip=\(hex(state.rip)) rflags=\(flagString(state.rflags)) mxcsr=\(hex(state.mxcsr))")
    for row in 0..<8 {
      lines.append(
        "xmm\(row * 2)=\(xmmString(state.xmm[row * 2])) xmm\(row * 2 + 1)=\(xmmString(state.xmm[row * 2 + 1]))")
    }
    let upper = (0..<16).filter { state.ymmHigh[$0] != .zero }
    if !upper.isEmpty {
      lines.append(upper.map { "ymm\($0)[255:128]=\(xmmString(state.ymmHigh[$0]))" }.joined(separator: " "))
    }
    lines.append("fcw=\(hex(state.fcw)) fsw=\(hex(state.fsw)) (top \(state.top)) ftw=\(hex(state.ftw))")
    let stack = (0..<8).filter { state.stValid($0) }.map { "st\($0)=\(x87String(state.st[$0]))" }
    if !stack.isEmpty { lines.append(stack.joined(separator: " ")) }
    return lines.map { "    " + $0 }.joined(separator: "\n")
  }

  /// Disassembly through objdump when available (best effort, for reports only).
  static func disassemble(_ code: [UInt8]) -> String {
    let path = NSTemporaryDirectory() + "hostvisor-diff-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).bin"
    guard FileManager.default.createFile(atPath: path, contents: Data(code)) else { return "" }
    defer { try? FileManager.default.removeItem(atPath: path) }
    let arguments = [
      "-D", "-b", "binary", "-mi386:x86-64", "--adjust-vma=0x\(String(DiffLayout.codeBase, radix: 16))", path,
    ]
    guard let result = try? HostCommand.run("/usr/bin/objdump", arguments, errors: .discarded) else { return "" }
    let text = result.text
    return text.split(separator: "\n").filter { $0.contains(":\t") }.map { "    " + $0 }.joined(separator: "\n")
  }
}
