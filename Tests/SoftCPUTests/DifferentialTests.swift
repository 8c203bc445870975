import Foundation
import SoftCPU
import Testing

/// Differential tests: random instruction sequences run natively (CNativeExec) and on the
/// software CPU must end in the same state (registers, defined flags, XMM, MXCSR, x87, memory)
/// and raise the same faults.
///
/// Environment:
/// - `HOSTVISOR_DIFF_CASES`: total cases over all forms (default: 64 per form).
/// - `HOSTVISOR_DIFF_SEED`: base seed (default 1).
/// - `HOSTVISOR_DIFF_FORM`: only forms whose name contains this text.
/// - `HOSTVISOR_DIFF_REPORTS`: mismatch reports printed per form (default 2).
@Suite("DifferentialTests")
struct DifferentialTests {
  /// Forms the software CPU does not implement yet (#UD there, fine natively), reviewed. The
  /// goal is an empty list; a form listed here that passes is reported so it can be removed.
  static let knownGaps: Set<String> = []

  /// Forms with a reviewed, documented difference from this host (docs/softcpu-testing.md), and
  /// the MXCSR bits not compared in cases built around them; everything else is compared
  /// strictly. They are never used as fillers around other forms. The goal is an empty list.
  static let knownMismatches: [String: (mxcsrIgnored: UInt32, reason: String)] = [:]

  static let environment = ProcessInfo.processInfo.environment
  static var seed: UInt64 { UInt64(environment["HOSTVISOR_DIFF_SEED"] ?? "") ?? 1 }
  static var formFilter: String? { environment["HOSTVISOR_DIFF_FORM"] }
  static var reportsPerForm: Int { Int(environment["HOSTVISOR_DIFF_REPORTS"] ?? "") ?? 2 }
  /// Every form must reach this many compared cases (cases the host ran to a comparable end),
  /// or the test fails: a form whose cases are all skipped checks nothing.
  static var minimumComparedPerForm: Int { max(1, casesPerForm / 2) }
  static var casesPerForm: Int {
    if let total = Int(environment["HOSTVISOR_DIFF_CASES"] ?? "") {
      return max(1, total / max(1, FormTable.all.count))
    }
    return 64
  }

  /// Forms that end a sequence early or never complete: not used as filler around other forms.
  static let terminalForms: Set<String> = [
    "ud2", "int3", "cli", "sti", "in al, dx", "out dx, al", "in al, imm8", "mov cr0, r", "rdmsr", "wbinvd", "clts",
    "xgetbv (ecx > 1)", "xsetbv (cpl 3)",
  ]

  struct FormResult {
    var cases = 0
    var passed = 0
    var mismatches = 0
    var notComparable = 0
    var unimplemented = 0
    var reports: [String] = []
  }

  @Test func everyInstructionForm() throws {
    let group = "all"
    let forms = FormTable.all.filter { form in Self.formFilter.map { form.name.contains($0) } ?? true }
    if forms.isEmpty {
      Issue.record("HOSTVISOR_DIFF_FORM=\(Self.formFilter ?? "") matches no instruction form")
      return
    }
    let fillers = FormTable.all.filter {
      !Self.knownGaps.contains($0.name) && !Self.terminalForms.contains($0.name) && Self.knownMismatches[$0.name] == nil
        && HostModel.mxcsrIgnored(form: $0.name) == 0
    }
    let runner = EmulatedRunner()
    let pagedRunner = EmulatedRunner(paging: true)
    // Every case also runs through the translating tier (flat and paged), so each form is
    // checked against the host on both the interpreter and the translator.
    let translatorRunners = [EmulatedRunner(tier: .translator), EmulatedRunner(paging: true, tier: .translator)]
    var results: [String: FormResult] = [:]
    // Phase 1: each form alone (sequences of that form only). Phase 2: each form among
    // fillers drawn from the forms that passed phase 1, so one bug does not spread its
    // mismatches over every other form.
    var failedAlone: Set<String> = []
    for phase in 0..<2 {
      let phaseFillers = phase == 0 ? [] : fillers.filter { !failedAlone.contains($0.name) }
      if phase == 1 && !failedAlone.isEmpty {
        print(
          "DifferentialTests: forms failing on their own (not used as fillers): "
            + failedAlone.sorted().joined(separator: ", "))
      }
      let phaseCases = phase == 0 ? max(1, Self.casesPerForm / 3) : Self.casesPerForm - max(1, Self.casesPerForm / 3)
      for form in forms {
        var result = results[form.name] ?? FormResult()
        for caseIndex in 0..<phaseCases {
          let caseSeed = DiffRNG.mix(Self.seed, form.name.hashValueStable, UInt64(caseIndex), UInt64(phase))
          let testCase = CaseGenerator.makeCase(focus: form, fillers: phaseFillers, seed: caseSeed)
          // The translator runs every fourth case (the first of each phase included), so every
          // form goes through it while the test stays within the suite's time budget.
          let outcome = Self.runCase(
            testCase, runner: runner, pagedRunner: pagedRunner,
            otherRunners: caseIndex % 4 == 0 ? translatorRunners : [],
            mxcsrIgnored: Self.knownMismatches[form.name]?.mxcsrIgnored ?? HostModel.mxcsrIgnored(form: form.name))
          result.cases += 1
          switch outcome {
          case .passed: result.passed += 1
          case .notComparable: result.notComparable += 1
          case .unimplemented(let name, _) where name == form.name || name == nil:
            result.unimplemented += 1
            if phase == 0 { failedAlone.insert(form.name) }
          case .unimplemented(let name, let report):
            // #UD on a filler the host executes: the filler passed phase 1, so this is a
            // mismatch of the sequence (a decoder state or mode bug), never a pass.
            result.mismatches += 1
            if result.reports.count < Self.reportsPerForm {
              result.reports.append(
                "HOSTVISOR_DIFF_SEED=\(Self.seed) form \"\(form.name)\" phase \(phase) case \(caseIndex): "
                  + "#UD on filler \"\(name ?? "?")\" where the host does not fault\n" + report)
            }
          case .mismatch(let report):
            result.mismatches += 1
            if phase == 0 { failedAlone.insert(form.name) }
            if result.reports.count < Self.reportsPerForm {
              result.reports.append(
                "HOSTVISOR_DIFF_SEED=\(Self.seed) form \"\(form.name)\" phase \(phase) case \(caseIndex)\n" + report)
            }
          }
        }
        results[form.name] = result
      }
    }
    Self.summarize(group: group, forms: forms, results: results)
  }

  enum CaseOutcome {
    case passed
    case notComparable
    /// Our CPU raised #UD where the host did not; the form at the faulting RIP, and the report.
    case unimplemented(String?, report: String)
    case mismatch(String)
  }

  /// Runs one case natively and on each emulated runner (paging off, and paging on when
  /// `pagedRunner` is given) and compares; `mxcsrIgnored` are MXCSR bits left out of the
  /// comparison (a reviewed known difference).
  static func runCase(
    _ testCase: DiffCase, runner: EmulatedRunner, pagedRunner: EmulatedRunner? = nil,
    otherRunners: [EmulatedRunner] = [], mxcsrIgnored: UInt32 = 0
  ) -> CaseOutcome {
    let native = NativeRunner.run(code: testCase.code, initial: testCase.initial, data: testCase.data)
    if case .notComparable = native.end { return .notComparable }
    for emulator in [runner] + (pagedRunner.map { [$0] } ?? []) + otherRunners {
      let outcome = compare(testCase, native: native, emulator: emulator, mxcsrIgnored: mxcsrIgnored)
      if case .passed = outcome { continue }
      return outcome
    }
    return .passed
  }

  static func compare(_ testCase: DiffCase, native: RunResult, emulator: EmulatedRunner, mxcsrIgnored: UInt32)
    -> CaseOutcome
  {
    let emulated = emulator.run(code: testCase.code, initial: testCase.initial, data: testCase.data)
    var mask = testCase.mask
    if case .fault(let vector, _) = native.end {
      // Traps report the RIP after the instruction, faults the RIP of the instruction.
      mask =
        [1, 3, 4].contains(vector)
        ? testCase.mask(trapBefore: native.state.rip) : testCase.mask(faultAt: native.state.rip)
    }
    mask.mxcsrIgnored = mxcsrIgnored
    let differences = DiffCompare.compare(native: native, emulated: emulated, mask: mask)
    if differences.isEmpty { return .passed }
    let text =
      "  emulated side: paging \(emulator.paging ? "on (IDT delivery)" : "off (flat)"), tier \(emulator.tier.rawValue)\n"
      + report(testCase, native: native, emulated: emulated, differences: differences)
    if case .fault(6, _) = emulated.end, native.end != emulated.end || native.state.rip != emulated.state.rip {
      return .unimplemented(testCase.form(at: emulated.state.rip), report: text)
    }
    return .mismatch(text)
  }

  static func report(_ testCase: DiffCase, native: RunResult, emulated: RunResult, differences: [Difference]) -> String
  {
    var lines: [String] = []
    lines.append("  forms: " + testCase.forms.joined(separator: " | "))
    lines.append("  bytes: " + testCase.code.map { String(format: "%02x", $0) }.joined(separator: " "))
    let disassembly = DiffCompare.disassemble(testCase.code)
    if !disassembly.isEmpty { lines.append("  disassembly:\n" + disassembly) }
    lines.append("  differences:")
    for difference in differences { lines.append("    " + difference.description) }
    lines.append("  initial state:\n" + DiffCompare.stateString(testCase.initial))
    lines.append("  native (\(native.end)):\n" + DiffCompare.stateString(native.state))
    lines.append("  emulated (\(emulated.end)):\n" + DiffCompare.stateString(emulated.state))
    return lines.joined(separator: "\n")
  }

  static func summarize(group: String, forms: [InstructionForm], results: [String: FormResult]) {
    var gaps: [String] = []
    var fixedGaps: [String] = []
    var totalCases = 0
    var totalSkipped = 0
    var belowMinimum: [String] = []
    var perForm: [String] = []
    for form in forms {
      guard let result = results[form.name] else { continue }
      totalCases += result.cases
      totalSkipped += result.notComparable
      let compared = result.cases - result.notComparable
      perForm.append("\(form.name): \(compared) compared, \(result.notComparable) skipped")
      if compared < minimumComparedPerForm {
        belowMinimum.append("\(form.name) (\(compared) of \(result.cases))")
      }
      if result.unimplemented > 0 {
        if !knownGaps.contains(form.name) { gaps.append(form.name) }
      } else if knownGaps.contains(form.name) && result.mismatches == 0 {
        fixedGaps.append(form.name)
      }
      if result.mismatches > 0 {
        let comment = Comment(
          rawValue:
            "\(result.mismatches)/\(result.cases) mismatches for \"\(form.name)\"\n"
            + result.reports.joined(separator: "\n\n"))
        Issue.record(comment)
      }
    }
    print("DifferentialTests[\(group)]: compared/skipped per form:\n  " + perForm.joined(separator: "\n  "))
    if !belowMinimum.isEmpty {
      Issue.record(
        Comment(
          rawValue:
            "Forms with fewer than \(minimumComparedPerForm) compared cases (the rest not comparable):\n  "
            + belowMinimum.joined(separator: "\n  ")))
    }
    print(
      "DifferentialTests[\(group)]: \(forms.count) forms, \(totalCases) cases, \(totalSkipped) not comparable, "
        + "\(results.values.filter { $0.mismatches > 0 }.count) forms with mismatches")
    if !gaps.isEmpty {
      Issue.record(
        Comment(
          rawValue:
            "Forms not implemented by the software CPU (#UD, fine natively) and not in knownGaps:\n  "
            + gaps.joined(separator: "\n  ")))
    }
    let knownInGroup = knownGaps.filter { name in forms.contains { $0.name == name } }
    if !knownInGroup.isEmpty {
      print(
        "DifferentialTests[\(group)]: known gaps (\(knownInGroup.count)): "
          + knownInGroup.sorted().joined(separator: ", "))
    }
    if !fixedGaps.isEmpty {
      print("DifferentialTests[\(group)]: known gaps that now pass (remove them): " + fixedGaps.joined(separator: ", "))
    }
  }
}

extension String {
  /// A hash that is the same in every process (String.hashValue is seeded per process).
  var hashValueStable: UInt64 {
    var hash: UInt64 = 0xCBF2_9CE4_8422_2325
    for byte in utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01B3 }
    return hash
  }
}

/// Hand-written differential cases for behavior the random generator does not reach.
@Suite("DifferentialFixedCases")
struct DifferentialFixedCases {
  static func check(_ code: [UInt8], mxcsrIgnored: UInt32 = 0, setup: (inout MachineState) -> Void) -> String? {
    var rng = DiffRNG(seed: 7)
    var state = DiffStates.random(&rng, x87: false, unmaskedSIMD: false)
    setup(&state)
    let testCase = DiffCase(
      code: code, initial: state, data: DiffStates.randomData(&rng), mask: ComparisonMask(), forms: ["fixed"],
      instructionStarts: [(offset: 0, form: "fixed")], faultMasks: [ComparisonMask()], trapMasks: [ComparisonMask()])
    switch DifferentialTests.runCase(
      testCase, runner: EmulatedRunner(), pagedRunner: EmulatedRunner(paging: true), mxcsrIgnored: mxcsrIgnored)
    {
    case .passed: return nil
    case .notComparable: return "not comparable"
    case .unimplemented(let form, let report): return "unimplemented \(form ?? "?")\n" + report
    case .mismatch(let report): return report
    }
  }

  /// DPPS with UE unmasked whose one selected product is an exact tiny (denormal) value: the
  /// multiplication step raises #XM with UE alone; the additions, which would report DE for the
  /// denormal product, never run. (The whole-instruction flags with everything masked are DE.)
  @Test func dppsStopsAtTheMultiplicationStep() {
    for mxcsr: UInt32 in [0x7700, 0x7708] {
      // dpps xmm5, xmm13, 0x2C: lane 1 only, 2^-126 × 0x3EFF0320.
      let result = Self.check([0x66, 0x41, 0x0F, 0x3A, 0x40, 0xED, 0x2C]) {
        $0.mxcsr = mxcsr
        $0.xmm[5] = SIMD2(0x0080_0000_498C_C569, 0xC7A8_1F6E_3986_AA12)
        $0.xmm[13] = SIMD2(0x3EFF_0320_6336_F8BF, 0xC188_D932_658E_5F46)
      }
      #expect(result == nil, Comment(rawValue: result ?? ""))
    }
  }

  /// DPPD and VDPPD with DE unmasked (UE, PE masked): both products are tiny and inexact (UE,
  /// PE), and their sum has denormal operands, so the addition step faults with DE. The
  /// completed multiplications keep UE and PE in MXCSR (DE, UE, PE in all); the VEX form used
  /// to lose them when it combined its one half as if it were a packed instruction.
  @Test func dotProductKeepsTheProductsFlagsWhenTheAdditionFaults() {
    // dppd xmm5, xmm13, 0x31 and vdppd xmm5, xmm5, xmm13, 0x31.
    for code: [UInt8] in [[0x66, 0x41, 0x0F, 0x3A, 0x41, 0xED, 0x31], [0xC4, 0xC3, 0x51, 0x41, 0xED, 0x31]] {
      let result = Self.check(code) {
        $0.mxcsr = 0x1E80
        // 2^-540 × 2^-500·(1 + 2^-52) in both elements: denormal and inexact.
        $0.xmm[5] = SIMD2(0x1E30_0000_0000_0000, 0x1E30_0000_0000_0000)
        $0.xmm[13] = SIMD2(0x20B0_0000_0000_0001, 0x20B0_0000_0000_0001)
      }
      #expect(result == nil, Comment(rawValue: result ?? ""))
    }
  }

  /// VDPPS ymm with PE unmasked (IE masked) where one half's first additions are inexact
  /// (1 + 2^-30) and the other half's are invalid (∞ + -∞): the host faults with PE alone, the
  /// other half's IE of the same step is not reported; both ways round, and with IE unmasked too.
  /// (An AMD family 17h host and an Intel Emerald Rapids host do set that IE:
  /// `HostModel.vdppsOtherHalfIEIgnored`.)
  @Test func vdppsYmmReportsOnlyTheFaultingHalfOfTheFirstAdditions() {
    let inexact = (SIMD2<UInt64>(0x3F80_0000_3F80_0000, 0), SIMD2<UInt64>(0x3080_0000_3F80_0000, 0))
    let invalid = (SIMD2<UInt64>(0xFF80_0000_7F80_0000, 0), SIMD2<UInt64>(0x3F80_0000_3F80_0000, 0))
    for (low, high) in [(inexact, invalid), (invalid, inexact)] {
      for mxcsr: UInt32 in [0x0F80, 0x0F00] {
        // vdpps ymm5, ymm5, ymm13, 0x31: elements 0 and 1 of each half, the sum in element 0.
        let ignored = mxcsr & 0x80 != 0 ? HostModel.vdppsOtherHalfIEIgnored : 0
        let result = Self.check([0xC4, 0xC3, 0x55, 0x40, 0xED, 0x31], mxcsrIgnored: ignored) {
          $0.mxcsr = mxcsr
          $0.xmm[5] = low.0
          $0.xmm[13] = low.1
          $0.ymmHigh[5] = high.0
          $0.ymmHigh[13] = high.1
        }
        #expect(result == nil, Comment(rawValue: result ?? ""))
      }
    }
  }

  /// MXCSR values with overflow or underflow unmasked (PE masked and unmasked), and variants
  /// with DAZ, FTZ and other rounding modes.
  static let overflowUnderflowUnmasked: [UInt32] = [0x1780, 0x0780, 0x1B80, 0x0B80, 0x17C0, 0x9780, 0x3780, 0x7780]

  /// FMA3 elements that overflow or underflow with the exception unmasked: PE is the inexactness
  /// of the result with an unbounded exponent, masked or not, so it differs from the flags of the
  /// delivered (denormal, zero or infinite) result: exact products whose denormal result is not
  /// (2^-1100, 3·2^-1080, 2^-160 in single), inexact ones, exact overflows (2^1100), a
  /// cancellation to an exact tiny value, and VFMADDSUB's alternating subtraction.
  @Test func fmaUnboundedExponentInexactness() {
    let onePlus: UInt64 = 1
    // (name, code, xmm0, xmm1, xmm2, upper halves of ymm0-2)
    let cases: [(String, [UInt8], SIMD2<UInt64>, SIMD2<UInt64>, SIMD2<UInt64>, [SIMD2<UInt64>])] = [
      (
        "2^-600 * 2^-500", [0xC4, 0xE2, 0xF1, 0xA9, 0xC2], SIMD2(0x20B0_0000_0000_0000, 0),
        SIMD2(0x1A70_0000_0000_0000, 0), .zero, []
      ),
      (
        "(1+2^-52)^2 * 2^-1100", [0xC4, 0xE2, 0xF1, 0xA9, 0xC2], SIMD2(0x20B0_0000_0000_0000 | onePlus, 0),
        SIMD2(0x1A70_0000_0000_0000 | onePlus, 0), .zero, []
      ),
      (
        "3 * 2^-1080", [0xC4, 0xE2, 0xF1, 0xA9, 0xC2], SIMD2(0x21F0_0000_0000_0000, 0), SIMD2(0x1A88_0000_0000_0000, 0),
        .zero, []
      ),
      (
        "2^1000 * 2^100", [0xC4, 0xE2, 0xF1, 0xA9, 0xC2], SIMD2(0x4630_0000_0000_0000, 0),
        SIMD2(0x7E70_0000_0000_0000, 0), .zero, []
      ),
      (
        "(1+2^-52)^2 * 2^1100", [0xC4, 0xE2, 0xF1, 0xA9, 0xC2], SIMD2(0x4630_0000_0000_0000 | onePlus, 0),
        SIMD2(0x7E70_0000_0000_0000 | onePlus, 0), .zero, []
      ),
      (
        "((1+2^-30) * 2^-511)^2 - 2^-1022", [0xC4, 0xE2, 0xF1, 0xA9, 0xC2], SIMD2(0x2000_0000_0040_0000, 0),
        SIMD2(0x2000_0000_0040_0000, 0), SIMD2(0x8010_0000_0000_0000, 0), []
      ),
      (
        "single 2^-80 * 2^-80", [0xC4, 0xE2, 0x71, 0xA9, 0xC2], SIMD2(0x1780_0000, 0), SIMD2(0x1780_0000, 0), .zero, []
      ),
      (
        "single (1+2^-23)^2 * 2^-160", [0xC4, 0xE2, 0x71, 0xA9, 0xC2], SIMD2(0x1780_0001, 0), SIMD2(0x1780_0001, 0),
        .zero, []
      ),
      (
        "vfmaddsub231pd", [0xC4, 0xE2, 0xF1, 0xB6, 0xC2], SIMD2(0x0010_0000_0000_0000, 0),
        SIMD2(0x2000_0000_0040_0000, 0x1A70_0000_0000_0000), SIMD2(0x2000_0000_0040_0000, 0x20B0_0000_0000_0000), []
      ),
      (
        "vfnmsub132pd ymm", [0xC4, 0xE2, 0xF5, 0x9E, 0xC2], SIMD2(0x7E70_0000_0000_0000, 0x3FF0_0000_0000_0000), .zero,
        SIMD2(0x4630_0000_0000_0000, 0x3FF0_0000_0000_0000),
        [SIMD2(0x1A70_0000_0000_0000, 0), .zero, SIMD2(0x20B0_0000_0000_0000, 0)]
      ),
    ]
    for (name, code, xmm0, xmm1, xmm2, upper) in cases {
      for mxcsr in Self.overflowUnderflowUnmasked {
        let result = Self.check(code) {
          $0.mxcsr = mxcsr
          ($0.xmm[0], $0.xmm[1], $0.xmm[2]) = (xmm0, xmm1, xmm2)
          for (index, high) in upper.enumerated() { $0.ymmHigh[index] = high }
        }
        #expect(result == nil, "\(name), mxcsr \(String(mxcsr, radix: 16)): \(result ?? "")")
      }
    }
  }

  /// VCVTPS2PH with overflow or underflow unmasked: every tiny half-precision result underflows,
  /// an exact one too (2^-20), but not one that rounds up to the smallest normal; PE is the
  /// inexactness with an unbounded exponent (2^-30 and 2^20 are exact); flags of the elements
  /// combine (1+2^-23 inexact beside an exact tiny 2^-30); a denormal single input.
  /// The model sets PE as an Intel host does; an AMD host leaves PE clear when an unmasked
  /// overflow or underflow stops the instruction, so there PE alone is not compared.
  @Test func halfConversionUnboundedExponentInexactness() {
    let xmmForm: [UInt8] = [0xC4, 0xE3, 0x79, 0x1D, 0xC8, 0x04]  // vcvtps2ph xmm0, xmm1, 4 (MXCSR.RC)
    let ymmForm: [UInt8] = [0xC4, 0xE3, 0x7D, 0x1D, 0xC8, 0x00]  // vcvtps2ph xmm0, ymm1, 0 (nearest)
    let cases: [([UInt8], [UInt32])] = [
      (xmmForm, [0x3580_0000]), (xmmForm, [0x3080_0000]), (xmmForm, [0x3580_0001]), (xmmForm, [0x4980_0000]),
      (xmmForm, [0x477F_F000]), (xmmForm, [0x387F_F000]), (xmmForm, [0x3F80_0001, 0x3080_0000]),
      (xmmForm, [0x0000_0001]), (xmmForm, [0x8000_0C00, 0x4980_0001]),
      (ymmForm, [0x3580_0000, 0x3F80_0000, 0x4980_0000, 0, 0x3080_0000, 0x3580_0001, 0, 0x387F_F000]),
    ]
    for (code, singles) in cases {
      var lanes = [UInt64](repeating: 0, count: 4)
      for (index, single) in singles.enumerated() { lanes[index / 2] |= UInt64(single) << UInt64(32 * (index & 1)) }
      for mxcsr in Self.overflowUnderflowUnmasked {
        let result = Self.check(code, mxcsrIgnored: HostModel.hostIsIntel ? 0 : 1 << 5) {
          $0.mxcsr = mxcsr
          $0.xmm[1] = SIMD2(lanes[0], lanes[1])
          $0.ymmHigh[1] = SIMD2(lanes[2], lanes[3])
        }
        #expect(
          result == nil, "\(singles.map { String($0, radix: 16) }), mxcsr \(String(mxcsr, radix: 16)): \(result ?? "")")
      }
    }
  }

  /// XINUSE after a VEX.256 instruction that writes only an XMM register (a narrowing
  /// conversion, VCVTPS2PH, VEXTRACTF128/I128) from the AVX initial state: XSAVE's XSTATE_BV
  /// shows whether the instruction marked the AVX component in use.
  @Test(
    .enabled(
      if: HostModel.hostIsIntel,
      "an AMD host may leave XINUSE[AVX] clear here; XSAVEInUseTests checks the architectural rule on every host"))
  func vex256WithAnXMMDestinationMarksAVXInUse() {
    let instructions: [(String, [UInt8])] = [
      ("vcvtpd2dq xmm14, ymm14", [0xC4, 0x41, 0x7F, 0xE6, 0xF6]),
      ("vcvtps2ph xmm0, ymm1, 0", [0xC4, 0xE3, 0x7D, 0x1D, 0xC8, 0x00]),
      ("vextractf128 xmm0, ymm1, 1", [0xC4, 0xE3, 0x7D, 0x19, 0xC8, 0x01]),
      ("vextracti128 xmm0, ymm1, 1", [0xC4, 0xE3, 0x7D, 0x39, 0xC8, 0x01]),
      ("vaddss (VEX.L = 1)", [0xC5, 0xEE, 0x58, 0xC1]),
    ]
    // vzeroupper; INSTRUCTION; mov eax, 6; xor edx, edx; xsave [rbx] (SSE and AVX components).
    for (name, bytes) in instructions {
      let code: [UInt8] = [0xC5, 0xF8, 0x77] + bytes + [0xB8, 0x06, 0x00, 0x00, 0x00, 0x31, 0xD2, 0x0F, 0xAE, 0x23]
      let result = Self.check(code) {
        $0.mxcsr = 0x1F80
        $0.gpr[3] = DiffLayout.dataBase + 0x1000
      }
      #expect(result == nil, "\(name): \(result ?? "")")
    }
  }

  /// A non-canonical address in a reference through SS raises #SS(0): the implicit stack
  /// accesses (PUSH, POP, RET), RSP and RBP bases, an SS override; any other, #GP(0).
  @Test func nonCanonicalStackAndDataAddresses() {
    let nonCanonical: UInt64 = 0x8000_0000_0000_0000
    let cases: [(name: String, code: [UInt8], register: Int)] = [
      ("mov rax, [rbp]", [0x48, 0x8B, 0x45, 0x00], 5),
      ("mov rax, [rsp+8]", [0x48, 0x8B, 0x44, 0x24, 0x08], 4),
      ("mov [rbp+rbx], eax", [0x89, 0x44, 0x1D, 0x00], 5),
      ("mov rax, ss:[rbx]", [0x36, 0x48, 0x8B, 0x03], 3),
      ("push rax", [0x50], 4),
      ("pop rax", [0x58], 4),
      ("ret", [0xC3], 4),
      ("call rel32", [0xE8, 0x00, 0x00, 0x00, 0x00], 4),
      ("mov rax, [rbx]", [0x48, 0x8B, 0x03], 3),
      ("push qword [rbx]", [0xFF, 0x33], 3),
      ("mov rax, fs:[rbp]", [0x64, 0x48, 0x8B, 0x45, 0x00], 5),
    ]
    for testCase in cases {
      let result = Self.check(testCase.code) { $0.gpr[testCase.register] = nonCanonical }
      #expect(result == nil, "\(testCase.name): \(result ?? "")")
    }
  }

}
