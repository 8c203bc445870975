import Foundation
import InterruptControllers
import SoftCPU
import Testing
import VMCore

/// Hostile-input fuzzing of the software CPU: random bytes as code.
///
/// Environment: `HOSTVISOR_FUZZ_CASES` (default 200000 hostile runs of 64-bit code, 100000 of
/// 32-bit code, 50000 decoder comparisons), `HOSTVISOR_DIFF_SEED`.
@Suite("FuzzTests")
struct FuzzTests {
  static var seed: UInt64 { DifferentialTests.seed }
  static var cases: Int { Int(ProcessInfo.processInfo.environment["HOSTVISOR_FUZZ_CASES"] ?? "") ?? 200_000 }

  /// Random 1-15 byte sequences with random registers and a small instruction budget: the CPU
  /// must return a defined StopCause every time (no crash, no hang), never touch host memory
  /// outside guest RAM (PROT_NONE guards around it would kill the test), stop with a RIP the
  /// mode allows (canonical in 64-bit code, within 32 bits in 32-bit code), and run a
  /// known-answer sequence correctly afterwards (every 1000 runs and at the end). Under the
  /// interpreter and under the translating tier (every block translated on its first
  /// execution), as 64-bit code and as 32-bit protected-mode code.
  @Test(arguments: [SoftCPUTier.interpreter, .translator], HostileCodeSize.allCases)
  func hostileBytesNeverCrashOrHang(tier: SoftCPUTier, size: HostileCodeSize) throws {
    let memory = try GuestMemory(size: 2 << 20)
    let guards = HostileRunChecks.HostGuards(around: memory)
    defer { guards.remove() }
    let bus = IOBus()
    let cpu = CPU(memory: memory, bus: bus)
    cpu.setExecutionTier(tier, threshold: 0)
    let codeBase: UInt64 = 0x1000
    var rng = DiffRNG(seed: DiffRNG.mix(Self.seed, size.salt))
    // Counted by index (fault vectors, then the other stops) and named once at the end.
    let stopNames = (0..<32).map { Fault.mnemonic($0) } + ["INT n", "halted", "instruction limit", "stop requested"]
    var stopCounts = [Int](repeating: 0, count: stopNames.count)
    let cases = size.cases
    var ripOutOfMode = 0
    var knownAnswerFailures: [String] = []
    let code = try memory.slice(at: codeBase, length: 32)
    let start = Date()
    for run in 0..<cases {
      let length = 1 + rng.below(15)
      for index in 0..<32 { code[index] = index < length ? UInt8(truncatingIfNeeded: rng.next()) : 0xF4 }
      cpu.noteExternalWrite(physical: codeBase, length: 32)
      size.enter(cpu, cpl: rng.chance(50) ? 3 : 0)
      for index in 0..<16 { cpu.gpr[index] = size.register(&rng) }
      cpu.gpr[4] = 0x10_0000 + UInt64(rng.below(0x1000))
      cpu.rflags = 0x202 | (rng.next() & (F.all | RFlags.df))
      cpu.rip = codeBase
      let stop = cpu.run(instructionLimit: 1 + rng.below(8))
      switch stop {
      case .halted: stopCounts[33] += 1
      case .instructionLimit: stopCounts[34] += 1
      case .stopRequested: stopCounts[35] += 1
      case .fault(let fault): stopCounts[min(Int(fault.vector), 32)] += 1
      }
      if !size.allows(rip: cpu.rip) { ripOutOfMode += 1 }
      if run % 1000 == 999 || run == cases - 1, knownAnswerFailures.count < 5,
        let failure = try HostileRunChecks.knownAnswerFails(cpu: cpu, memory: memory, at: 0x2000, seed: rng.next())
      {
        knownAnswerFailures.append("after hostile run \(run): \(failure)")
      }
    }
    let seconds = Date().timeIntervalSince(start)
    let outcomes = Dictionary(zip(stopNames, stopCounts).filter { $0.1 > 0 }, uniquingKeysWith: +)
    print(
      "FuzzTests (\(tier.rawValue), \(size.rawValue)): \(cases) hostile sequences in \(String(format: "%.1f", seconds)) s: "
        + outcomes.sorted { $0.value > $1.value }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        + "; host guards: \(guards.description)")
    #expect(ripOutOfMode == 0, "runs that stopped with a RIP \(size.rawValue) code cannot have")
    #expect(knownAnswerFailures.isEmpty, Comment(rawValue: knownAnswerFailures.joined(separator: "\n")))
    // Random bytes hit every kind of stop; a run that never faults or never reaches its
    // budget means the loop did not run what it claims.
    #expect(outcomes["#UD", default: 0] > 0 && outcomes["instruction limit", default: 0] > 0)
  }

  /// Entering flat long mode gives the stack its 64-bit width back after a run that left
  /// 64-bit code (found by 5×10^7 hostile sequences under each tier: a far return into a 32-bit
  /// code segment left the stack pointer masked to 32 bits in the runs after it, so interpreted
  /// stack instructions disagreed with translated ones).
  @Test func flatModeEntryRestoresTheStackWidth() throws {
    let memory = try GuestMemory(size: 2 << 20)
    let cpu = CPU(memory: memory, bus: IOBus())
    // lgdt [0x3000]; push 0x08; push 0x2000; retfq (into a 32-bit code segment), then HLT there.
    try memory.writeBytes(
      [0x0F, 0x01, 0x14, 0x25, 0x00, 0x30, 0x00, 0x00, 0x6A, 0x08, 0x68, 0x00, 0x20, 0x00, 0x00, 0x48, 0xCB], at: 0x1000
    )
    try memory.writeBytes([0xF4], at: 0x2000)
    try memory.writeBytes([0x0F, 0x00, 0x10, 0x30, 0, 0, 0, 0, 0, 0], at: 0x3000)
    try memory.write(UInt64(0x00CF_9A00_0000_FFFF), at: 0x3018)
    cpu.enterFlatLongMode(cpl: 0)
    cpu.gpr[4] = 0x10_0000
    cpu.rip = 0x1000
    #expect(cpu.run(instructionLimit: 10) == .halted)
    #expect(cpu.rip == 0x2001, "did not reach the 32-bit code")
    // Back in 64-bit mode, PUSH with a stack pointer above 4 GiB must use all 64 bits: the
    // address lies outside guest RAM, so the push faults (with 32 bits it would land in RAM).
    try memory.writeBytes([0x50, 0xF4], at: 0x1000)
    cpu.noteExternalWrite(physical: 0x1000, length: 2)
    cpu.enterFlatLongMode(cpl: 0)
    cpu.gpr[4] = 0x1_0010_0000
    cpu.rip = 0x1000
    let stop = cpu.run(instructionLimit: 10)
    #expect(stop != .halted && cpu.rip == 0x1000, "PUSH at RSP 0x100100000 ended \(stop)")
  }

  // MARK: Decoder vs host

  /// Skips legacy prefixes and REX; returns the index of the opcode and whether FS/GS
  /// segment overrides appeared (never executed natively: they address the host's TLS).
  static func scanPrefixes(_ bytes: [UInt8]) -> (opcodeIndex: Int, hasFSGS: Bool, hasF3: Bool) {
    var index = 0
    var fsgs = false
    var f3 = false
    while index < bytes.count {
      let byte = bytes[index]
      if byte == 0x64 || byte == 0x65 { fsgs = true }
      if byte == 0xF3 { f3 = true }
      if [0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67].contains(byte)
        || (0x40...0x4F).contains(byte)
      {
        index += 1
        continue
      }
      break
    }
    return (index, fsgs, f3)
  }

  /// True when the bytes must not run natively at CPL 3 in this process: system calls, far
  /// transfers and IRET/RETF (could switch to compatibility mode), segment loads, FS/GS
  /// accesses and base writes (host TLS), POPF (could clear TF and run on), WRPKRU/XRSTOR
  /// (protection keys), and the whole 0F 01 group.
  static func isUnsafeNatively(_ bytes: [UInt8]) -> Bool {
    let scan = scanPrefixes(bytes)
    if scan.hasFSGS { return true }
    guard scan.opcodeIndex < bytes.count else { return true }
    let opcode = bytes[scan.opcodeIndex]
    let next = scan.opcodeIndex + 1 < bytes.count ? bytes[scan.opcodeIndex + 1] : 0
    let reg = (next >> 3) & 7
    switch opcode {
    case 0xCD, 0xCA, 0xCB, 0xCF, 0x8E, 0x9A, 0xEA, 0x07, 0x17, 0x1F, 0x9D: return true
    case 0xFF: return reg == 3 || reg == 5
    case 0x0F:
      let after = scan.opcodeIndex + 2 < bytes.count ? bytes[scan.opcodeIndex + 2] : 0
      switch next {
      case 0x05, 0x34, 0x35, 0x07, 0x01, 0xA1, 0xA9, 0xB2, 0xB4, 0xB5: return true
      case 0xAE:
        let afterReg = (after >> 3) & 7
        if scan.hasF3 { return true }
        return afterReg == 5 || afterReg == 1 || afterReg == 4 || afterReg == 6
      case 0xC7: return (after >> 3) & 7 == 3 || (after >> 3) & 7 == 4 || (after >> 3) & 7 == 5
      default: return false
      }
    default: return false
    }
  }

  /// A coarse class of the encoding for reporting: VEX/EVEX, or the opcode map and byte.
  static func encodingClass(_ bytes: [UInt8]) -> String {
    let scan = scanPrefixes(bytes)
    guard scan.opcodeIndex < bytes.count else { return "prefixes only" }
    let opcode = bytes[scan.opcodeIndex]
    func byte(_ offset: Int) -> UInt8 {
      scan.opcodeIndex + offset < bytes.count ? bytes[scan.opcodeIndex + offset] : 0
    }
    switch opcode {
    case 0xC4, 0xC5: return "VEX"
    case 0x62: return "EVEX"
    case 0x8F where (byte(1) >> 3) & 7 != 0: return "XOP"
    case 0x0F:
      switch byte(1) {
      case 0x38, 0x3A: return String(format: "0F %02X %02X", byte(1), byte(2))
      default: return String(format: "0F %02X", byte(1))
      }
    case 0xD8...0xDF: return String(format: "%02X /%d%@", opcode, (byte(1) >> 3) & 7, byte(1) >= 0xC0 ? " reg" : "")
    default: return String(format: "%02X", opcode)
    }
  }

  /// Encoding classes where the host raises #UD and the software CPU executes something,
  /// reviewed as acceptable. Empty: every such disagreement fails the test.
  static let reviewedAcceptsInvalid: Set<String> = []

  /// Random byte strings executed for one instruction natively (single step) and on the
  /// software CPU: where the host raises #UD, the software CPU must too. The reverse
  /// (software #UD, host fine: VEX/AVX and other unimplemented extensions) is reported only.
  @Test func invalidOpcodesMatchTheHost() throws {
    let runner = EmulatedRunner()
    var rng = DiffRNG(seed: DiffRNG.mix(Self.seed, 0xDEC0DE))
    let total = max(1000, Self.cases / 4)
    var compared = 0
    var skipped = 0
    var weAccept: [String: (count: Int, example: [UInt8])] = [:]
    var weReject: [String: (count: Int, example: [UInt8])] = [:]
    let data = DiffStates.randomData(&rng)
    for _ in 0..<total {
      var bytes = (0..<15).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
      // Bias toward interesting maps: two-byte opcodes and the x87 escapes.
      switch rng.below(4) {
      case 0:
        let prefix: [UInt8] = rng.pick([[], [0x66], [0xF2], [0xF3], [0x48]])
        bytes = Array((prefix + [0x0F] + bytes).prefix(15))
      case 1:
        bytes = Array(([0x66, 0x0F, rng.pick([UInt8(0x38), 0x3A])] + bytes).prefix(15))
      default: break
      }
      if Self.isUnsafeNatively(bytes) {
        skipped += 1
        continue
      }
      var state = DiffStates.random(&rng, x87: false, unmaskedSIMD: false)
      for index in 0..<16 where index != 4 {
        state.gpr[index] = rng.chance(50) ? DiffLayout.dataBase + UInt64(rng.below(0xF000)) : DiffValues.integer(&rng)
      }
      let native = NativeRunner.run(code: bytes, initial: state, data: data, singleStep: true)
      let nativeUD = native.end == .fault(vector: 6, errorCode: nil) && native.state.rip == DiffLayout.codeBase
      let emulated = runner.run(code: bytes, initial: state, data: data, instructionLimit: 1)
      let emulatedUD = emulated.end == .fault(vector: 6, errorCode: nil) && emulated.state.rip == DiffLayout.codeBase
      compared += 1
      let encoding = Self.encodingClass(bytes)
      if nativeUD && !emulatedUD {
        weAccept[encoding, default: (0, bytes)].count += 1
      } else if emulatedUD && !nativeUD {
        weReject[encoding, default: (0, bytes)].count += 1
      }
    }
    func describe(_ table: [String: (count: Int, example: [UInt8])]) -> String {
      table.sorted { $0.value.count > $1.value.count }.prefix(40).map {
        "\($0.key) ×\($0.value.count) e.g. "
          + $0.value.example.map { String(format: "%02x", $0) }.joined(separator: " ")
      }.joined(separator: "\n  ")
    }
    print("FuzzTests: decoder vs host: \(compared) compared, \(skipped) unsafe to run natively")
    if !weReject.isEmpty {
      print("FuzzTests: host executes, software CPU #UD (not implemented; report only):\n  " + describe(weReject))
    }
    let unreviewed = weAccept.filter { !Self.reviewedAcceptsInvalid.contains($0.key) }
    if !unreviewed.isEmpty {
      Issue.record(
        Comment(rawValue: "Host #UD but the software CPU executes (encoding classes):\n  " + describe(unreviewed)))
    }
  }
}

/// The code size hostile bytes run as: 64-bit code in flat long mode, or 32-bit code in flat
/// protected mode (flat 4 GiB segments, a 32-bit stack).
enum HostileCodeSize: String, CaseIterable, Sendable, CustomTestStringConvertible {
  case bits64 = "64-bit"
  case bits32 = "32-bit"

  var testDescription: String { rawValue }

  /// Part of the seed: the 64-bit loops keep the sequences they ran before 32-bit code did.
  var salt: UInt64 { self == .bits64 ? 0xF022 : 0xF032 }

  /// The runs of a loop: `HOSTVISOR_FUZZ_CASES` for each size; by default 200000 in 64-bit
  /// code and 100000 in 32-bit code (the suite's time).
  var cases: Int {
    Int(ProcessInfo.processInfo.environment["HOSTVISOR_FUZZ_CASES"] ?? "") ?? (self == .bits64 ? 200_000 : 100_000)
  }

  /// Puts `cpu` in the flat mode of this code size at `cpl`.
  func enter(_ cpu: CPU, cpl: UInt8) {
    switch self {
    case .bits64: cpu.enterFlatLongMode(cpl: cpl)
    case .bits32: cpu.enterFlatProtectedMode(cpl: cpl)
    }
  }

  /// A random register: mostly an address inside the 2 MiB of guest RAM, sometimes anything
  /// of the code size. In 32-bit code one register in 20 also has an upper half, which 32-bit
  /// code must neither use in addresses nor lose where it does not write the register.
  func register(_ rng: inout DiffRNG) -> UInt64 {
    switch self {
    case .bits64: return rng.chance(70) ? UInt64(rng.below(2 << 20)) : DiffValues.integer(&rng)
    case .bits32:
      if rng.chance(70) { return UInt64(rng.below(2 << 20)) }
      let value = DiffValues.integer(&rng)
      return rng.chance(5) ? value : value & 0xFFFF_FFFF
    }
  }

  /// Whether a run may stop at `rip`: a canonical address in 64-bit code, one within 32 bits
  /// (the instruction pointer is EIP) in 32-bit code.
  func allows(rip: UInt64) -> Bool {
    switch self {
    case .bits64: return HostileRunChecks.isCanonical(rip)
    case .bits32: return rip >> 32 == 0
    }
  }
}

/// Checks shared by the hostile-input fuzz loops.
enum HostileRunChecks {
  static func isCanonical(_ address: UInt64) -> Bool {
    let upper = address >> 47
    return upper == 0 || upper == 0x1_FFFF
  }

  /// Runs `mov rax, imm64; xor rax, rbx; hlt` at CPL 0 at `address` on `cpu` (after whatever
  /// ran before) and returns a description of what went wrong, or nil when RAX, RIP and the
  /// stop are right: the CPU is still usable.
  static func knownAnswerFails(cpu: CPU, memory: GuestMemory, at address: UInt64, seed: UInt64) throws -> String? {
    let immediate = seed | 1
    let rbx = seed.byteSwapped
    var bytes: [UInt8] = [0x48, 0xB8]
    for shift in stride(from: 0, to: 64, by: 8) { bytes.append(UInt8(truncatingIfNeeded: immediate >> UInt64(shift))) }
    bytes += [0x48, 0x31, 0xD8, 0xF4]
    try memory.writeBytes(bytes, at: address)
    cpu.noteExternalWrite(physical: address, length: UInt64(bytes.count))
    cpu.enterFlatLongMode(cpl: 0)
    cpu.gpr[3] = rbx
    cpu.gpr[4] = 0x10_0000
    cpu.rflags = 0x2
    cpu.rip = address
    let stop = cpu.run(instructionLimit: 10)
    let expectedRIP = address + UInt64(bytes.count)
    if stop != .halted || cpu.gpr[0] != immediate ^ rbx || cpu.rip != expectedRIP {
      return "known-answer sequence: stop \(stop), rax 0x\(String(cpu.gpr[0], radix: 16)) (expected 0x"
        + "\(String(immediate ^ rbx, radix: 16))), rip 0x\(String(cpu.rip, radix: 16)) (expected 0x"
        + "\(String(expectedRIP, radix: 16)))"
    }
    return nil
  }

  /// PROT_NONE pages mapped right below and above each region of guest RAM where the address
  /// space is free, so a host access just outside guest RAM kills the test process instead of
  /// reading or corrupting a neighbouring mapping.
  final class HostGuards: CustomStringConvertible {
    static let guardSize = 1 << 20
    private var mappings: [UnsafeMutableRawPointer] = []
    private var missing = 0

    init(around memory: GuestMemory) {
      for region in memory.regions {
        let low = region.host - Self.guardSize
        let high = region.host + Int(region.size)
        for start in [low, high] {
          let result = mmap(start, Self.guardSize, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
          if let result, result != MAP_FAILED, result == start {
            mappings.append(result)
          } else {
            if let result, result != MAP_FAILED { munmap(result, Self.guardSize) }
            missing += 1
          }
        }
      }
    }

    var description: String {
      "\(mappings.count) guard mappings of \(Self.guardSize >> 20) MiB"
        + (missing > 0 ? " (\(missing) sides already mapped)" : "")
    }

    func remove() {
      for mapping in mappings { munmap(mapping, Self.guardSize) }
      mappings = []
    }
  }
}

/// The hostile-bytes runs under the interpreter and under the translator side by side, run by
/// run: both must stop the same way, at the same RIP, with the same registers, instructions
/// retired and stack pages, and every 1000 runs with the same RAM. The translator
/// runs integer instructions as the host's own, so this also holds the interpreter to the
/// host's choice of flags the architecture leaves undefined where later code reads them (SHL's
/// OF for counts above 1 was the one difference in 200 000 runs). Both CPUs read one clock
/// that stands still, so a time stamp or counter read (RDTSC, RDTSCP, RDPMC, RDMSR) gives both
/// the same value, also where a run reaches it through a branch into older bytes.
@Suite("FuzzTranslatorAgreementTests")
struct FuzzTranslatorAgreementTests {
  /// As 64-bit code and as 32-bit protected-mode code.
  @Test(arguments: HostileCodeSize.allCases)
  func hostileBytesSameUnderBothTiers(size: HostileCodeSize) throws {
    let tiers = [SoftCPUTier.interpreter, .translator]
    let memories = try tiers.map { _ in try GuestMemory(size: 2 << 20) }
    let cpus = tiers.indices.map { CPU(memory: memories[$0], bus: IOBus()) }
    let clock = ManualClock(nanoseconds: 1 << 40)
    for (cpu, tier) in zip(cpus, tiers) {
      cpu.setExecutionTier(tier, threshold: 0)
      cpu.system.clock = clock
    }
    let codeBase: UInt64 = 0x1000
    var rng = DiffRNG(seed: DiffRNG.mix(FuzzTests.seed, size.salt))
    var differences: [String] = []
    // Where the runs' stacks lie (ESP/RSP 0x100000-0x100FFF), with room for pushes and pops.
    let stackPages: UInt64 = 0xF_F000
    let rams = try memories.map { try $0.slice(at: 0, length: 2 << 20) }
    // A store elsewhere that differs is caught within 1000 runs of where it happened; the
    // translator's RAM then starts again from the interpreter's.
    func compareRAM(before run: Int) {
      guard memcmp(rams[0].baseAddress!, rams[1].baseAddress!, 2 << 20) != 0 else { return }
      if differences.count < 5 {
        differences.append("\(size.rawValue) RAM differs before run \(run) (from run \(run - 1000))")
      }
      rams[1].copyMemory(from: UnsafeRawBufferPointer(rams[0]))
      cpus[1].noteExternalWrite(physical: 0, length: 2 << 20)
    }
    for run in 0..<size.cases {
      if run % 1000 == 0 { compareRAM(before: run) }
      let length = 1 + rng.below(15)
      var bytes = [UInt8](repeating: 0xF4, count: 32)
      for index in 0..<length { bytes[index] = UInt8(truncatingIfNeeded: rng.next()) }
      let cpl: UInt8 = rng.chance(50) ? 3 : 0
      let registers = (0..<16).map { _ in size.register(&rng) }
      let stack = 0x10_0000 + UInt64(rng.below(0x1000))
      let flags = 0x202 | (rng.next() & (F.all | RFlags.df))
      let limit = 1 + rng.below(8)
      var results: [(stop: StopCause, rip: UInt64, retired: UInt64, registers: [UInt64])] = []
      for (cpu, memory) in zip(cpus, memories) {
        let code = try memory.slice(at: codeBase, length: 32)
        for index in 0..<32 { code[index] = bytes[index] }
        cpu.noteExternalWrite(physical: codeBase, length: 32)
        size.enter(cpu, cpl: cpl)
        for index in 0..<16 { cpu.gpr[index] = registers[index] }
        cpu.gpr[4] = stack
        cpu.rflags = flags
        cpu.rip = codeBase
        let retired = cpu.retiredInstructions
        let stop = cpu.run(instructionLimit: limit)
        results.append((stop, cpu.rip, cpu.retiredInstructions - retired, (0..<16).map { cpu.gpr[$0] }))
      }
      let stacks = try memories.map { try $0.slice(at: stackPages, length: 0x3000) }
      let stacksDiffer = memcmp(stacks[0].baseAddress!, stacks[1].baseAddress!, 0x3000) != 0
      if results[0] != results[1] || stacksDiffer, differences.count < 5 {
        // Described only when they differ: formatting every run cost more than running it.
        let described = results.map {
          "\($0.stop) rip \(String($0.rip, radix: 16)) retired \($0.retired) regs "
            + $0.registers.map { String($0, radix: 16) }.joined(separator: " ")
        }
        differences.append(
          "\(size.rawValue) run \(run) cpl \(cpl) limit \(limit) bytes "
            + bytes[0..<length].map { String(format: "%02x", $0) }.joined(separator: " ")
            + "\n  interpreter: \(described[0])\n  translator:  \(described[1])"
            + (stacksDiffer ? "\n  the stack pages differ" : ""))
      }
    }
    compareRAM(before: size.cases)
    #expect(differences.isEmpty, Comment(rawValue: differences.joined(separator: "\n")))
    // The comparison means something only where the translator ran the code.
    let retired = cpus[1].retiredInstructions
    let translated = retired - cpus[1].statistics.interpretedInstructions
    print("FuzzTranslatorAgreementTests (\(size.rawValue)): \(translated) of \(retired) instructions ran translated")
    #expect(translated > retired / 10, "\(translated) of \(retired) instructions ran translated")
  }
}
