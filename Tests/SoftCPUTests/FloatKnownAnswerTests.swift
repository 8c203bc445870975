import SoftCPU
import Testing
import VMCore

/// Known-answer tests for the floating-point paths. The software CPU computes SSE and x87
/// arithmetic with the host's own instructions (Sources/CSoftFloat), so the differential tests
/// (host vs software CPU) check decoding, operand routing, flags and faults, not arithmetic.
/// These tests check the arithmetic against values derived outside the code under test: IEEE
/// 754 reasoning written out next to each value, the Intel SDM's tables (NaN propagation,
/// default NaN, FTZ/DAZ), and an arbitrary-precision model (fixed point in UInt128) for the x87
/// transcendentals. They run guest code through the decoder and the SSE/x87 units.
@Suite("Floating point known answers")
struct FloatKnownAnswerTests {
  static let scratch = CoreMachine.dataBase

  /// MXCSR: exceptions masked, rounding `rc` (0 nearest, 1 down, 2 up, 3 toward zero).
  static func mxcsr(rc: UInt32, ftz: Bool = false, daz: Bool = false) -> UInt32 {
    0x1F80 | rc << 13 | (ftz ? 1 << 15 : 0) | (daz ? 1 << 6 : 0)
  }

  /// Runs `op xmm0, xmm1` (single precision scalar) with xmm0 = a, xmm1 = b under `control`;
  /// returns xmm0's low lane and the MXCSR exception flags.
  static func scalar(_ op: String, _ a: UInt32, _ b: UInt32, control: UInt32) throws -> (UInt32, UInt32) {
    let machine = try CoreMachine()
    try machine.memory.write(control, at: scratch)
    try machine.load(
      assembly: """
        mov rbx, \(scratch)
        ldmxcsr [rbx]
        mov eax, 0x\(String(a, radix: 16))
        movd xmm0, eax
        mov eax, 0x\(String(b, radix: 16))
        movd xmm1, eax
        \(op) xmm0, xmm1
        movd eax, xmm0
        stmxcsr [rbx + 4]
        hlt
        """)
    #expect(machine.run() == .halted)
    return (UInt32(truncatingIfNeeded: machine[R.rax]), try machine.memory.read(UInt32.self, at: scratch + 4) & 0x3F)
  }

  /// The same in double precision (`op xmm0, xmm1` on the low quadword).
  static func scalar64(_ op: String, _ a: UInt64, _ b: UInt64, control: UInt32) throws -> (UInt64, UInt32) {
    let machine = try CoreMachine()
    try machine.memory.write(control, at: scratch)
    try machine.load(
      assembly: """
        mov rbx, \(scratch)
        ldmxcsr [rbx]
        mov rax, 0x\(String(a, radix: 16))
        movq xmm0, rax
        mov rax, 0x\(String(b, radix: 16))
        movq xmm1, rax
        \(op) xmm0, xmm1
        movq rax, xmm0
        stmxcsr [rbx + 4]
        hlt
        """)
    #expect(machine.run() == .halted)
    return (machine[R.rax], try machine.memory.read(UInt32.self, at: scratch + 4) & 0x3F)
  }

  static let ie: UInt32 = 0x01, de: UInt32 = 0x02, ze: UInt32 = 0x04, oe: UInt32 = 0x08, ue: UInt32 = 0x10
  static let pe: UInt32 = 0x20

  // 1/3 = 1.0101...b × 2^-2. Single: biased exponent 125 (0x3E8xxxxx), fraction bits 1-23 are
  // 0101...010 = 0x2AAAAA, and the rest (1010...) is more than half an ulp: nearest and up
  // round to 0x3EAAAAAB, down and toward zero truncate to 0x3EAAAAAA. Inexact in every mode.
  // Double: fraction bits 1-52 are 0101...01 = 0x5555555555555 and the rest (0101...) is less
  // than half: only rounding up gives ...556.
  static let one32: UInt32 = 0x3F80_0000, three32: UInt32 = 0x4040_0000
  static let one64: UInt64 = 0x3FF0_0000_0000_0000, three64: UInt64 = 0x4008_0000_0000_0000

  @Test("Rounding modes: 1/3 and -1/3 in single and double precision", arguments: 0..<4)
  func roundingModes(rc: Int) throws {
    let control = Self.mxcsr(rc: UInt32(rc))
    let single: [UInt32] = [0x3EAA_AAAB, 0x3EAA_AAAA, 0x3EAA_AAAB, 0x3EAA_AAAA]
    #expect(try Self.scalar("divss", Self.one32, Self.three32, control: control) == (single[rc], Self.pe))
    // -1/3: rounding down moves away from zero, rounding up toward it.
    let negative: [UInt32] = [0xBEAA_AAAB, 0xBEAA_AAAB, 0xBEAA_AAAA, 0xBEAA_AAAA]
    #expect(try Self.scalar("divss", 0xBF80_0000, Self.three32, control: control) == (negative[rc], Self.pe))
    let double: [UInt64] = [0x3FD5_5555_5555_5555, 0x3FD5_5555_5555_5555, 0x3FD5_5555_5555_5556, 0x3FD5_5555_5555_5555]
    #expect(try Self.scalar64("divsd", Self.one64, Self.three64, control: control) == (double[rc], Self.pe))
  }

  @Test("Overflow: FLT_MAX × 2 gives ∞ or FLT_MAX by rounding mode, with OE and PE")
  func overflow() throws {
    let max: UInt32 = 0x7F7F_FFFF
    let two: UInt32 = 0x4000_0000
    // IEEE 754 7.4: nearest → ∞; toward zero and down (positive result) → the largest finite.
    let expected: [UInt32] = [0x7F80_0000, max, 0x7F80_0000, max]
    for rc in 0..<4 {
      #expect(
        try Self.scalar("mulss", max, two, control: Self.mxcsr(rc: UInt32(rc))) == (expected[rc], Self.oe | Self.pe))
    }
  }

  @Test("Underflow, denormals, FTZ and DAZ (SDM 10.2.3.3-4, 4.9.1.5)")
  func denormals() throws {
    let half: UInt32 = 0x3F00_0000
    let nearest = Self.mxcsr(rc: 0)
    // Smallest normal × 0.5 = 2^-127, exactly the denormal 0x00400000: tiny but exact, so with
    // UE masked neither UE nor PE is set.
    #expect(try Self.scalar("mulss", 0x0080_0000, half, control: nearest) == (0x0040_0000, 0))
    // Denormal 3 ulps × 0.5 = 1.5 ulps: a tie, to even gives 2 ulps; tiny and inexact → UE|PE,
    // and the denormal source sets DE.
    #expect(try Self.scalar("mulss", 3, half, control: nearest) == (2, Self.de | Self.ue | Self.pe))
    // FTZ: a tiny result with UE masked becomes +0 and sets UE and PE.
    #expect(
      try Self.scalar("mulss", 0x0080_0000, half, control: Self.mxcsr(rc: 0, ftz: true)) == (0, Self.ue | Self.pe))
    // Denormal source without DAZ: exact sum, DE set.
    #expect(try Self.scalar("addss", 1, 0, control: nearest) == (1, Self.de))
    // DAZ: the denormal source is +0 (sign kept), DE is not set.
    #expect(try Self.scalar("addss", 1, 0, control: Self.mxcsr(rc: 0, daz: true)) == (0, 0))
    #expect(
      try Self.scalar("addss", 0x8000_0001, 0x8000_0000, control: Self.mxcsr(rc: 0, daz: true)) == (0x8000_0000, 0))
  }

  @Test("Invalid and divide-by-zero: the default NaN (real indefinite) and ±∞ (SDM 4.8.3.7)")
  func invalidAndDivideByZero() throws {
    let nearest = Self.mxcsr(rc: 0)
    let indefinite: UInt32 = 0xFFC0_0000
    #expect(try Self.scalar("divss", 0, 0, control: nearest) == (indefinite, Self.ie))
    #expect(try Self.scalar("subss", 0x7F80_0000, 0x7F80_0000, control: nearest) == (indefinite, Self.ie))
    #expect(try Self.scalar("sqrtss", 0, 0xBF80_0000, control: nearest) == (indefinite, Self.ie))
    #expect(try Self.scalar("divss", Self.one32, 0, control: nearest) == (0x7F80_0000, Self.ze))
    #expect(try Self.scalar("divss", Self.one32, 0x8000_0000, control: nearest) == (0xFF80_0000, Self.ze))
    #expect(try Self.scalar64("divsd", 0, 0, control: nearest) == (0xFFF8_0000_0000_0000, Self.ie))
  }

  @Test("NaN propagation: the first source wins, SNaNs are quieted and raise IE (SDM table 4-7)")
  func nanPropagation() throws {
    let nearest = Self.mxcsr(rc: 0)
    let snanA: UInt32 = 0x7F80_0001, qnanA: UInt32 = 0x7FC0_0003
    let snanB: UInt32 = 0x7F80_0005, qnanB: UInt32 = 0x7FC0_0007
    // One NaN: that NaN, quieted (bit 22 set) when it was signaling.
    #expect(try Self.scalar("addss", Self.one32, qnanB, control: nearest) == (qnanB, 0))
    #expect(try Self.scalar("addss", Self.one32, snanB, control: nearest) == (0x7FC0_0005, Self.ie))
    // Two NaNs: the first source operand (the destination), quieted.
    #expect(try Self.scalar("addss", qnanA, qnanB, control: nearest) == (qnanA, 0))
    #expect(try Self.scalar("addss", snanA, qnanB, control: nearest) == (0x7FC0_0001, Self.ie))
    #expect(try Self.scalar("mulss", qnanA, snanB, control: nearest) == (qnanA, Self.ie))
    // MAXSS/MINSS return the second source when either is a NaN (SDM MAXSS pseudocode).
    #expect(try Self.scalar("maxss", qnanA, Self.one32, control: nearest) == (Self.one32, Self.ie))
  }

  // MARK: x87

  /// Runs `program` (x87 code; RBX points at the scratch area, the control word at [rbx]) and
  /// returns the 80-bit value stored at [rbx + 16] and the status word (AX, from FNSTSW).
  static func x87(_ program: String, control: UInt16) throws -> (X87Register, UInt16) {
    let machine = try CoreMachine()
    try machine.memory.write(control, at: scratch)
    try machine.memory.write(UInt32(3), at: scratch + 4)
    try machine.load(assembly: "mov rbx, \(scratch)\nfninit\nfldcw [rbx]\n" + program + "\nhlt")
    #expect(machine.run() == .halted)
    let significand = try machine.memory.read(UInt64.self, at: scratch + 16)
    let signExponent = try machine.memory.read(UInt16.self, at: scratch + 24)
    return (
      X87Register(significand: significand, signExponent: signExponent), UInt16(truncatingIfNeeded: machine[R.rax])
    )
  }

  /// 1/3 into [rbx + 16]; the status word right after the division.
  static let oneThird = "fild dword ptr [rbx + 4]\nfld1\nfdiv st, st(1)\nfnstsw ax\nfstp tbyte ptr [rbx + 16]"

  @Test("x87 rounding and precision control: 1/3 (exponent 0x3FFD)")
  func x87RoundingAndPrecision() throws {
    // 64-bit significand 1.0101...: bits 0-63 are 0xAAAAAAAAAAAAAAAA and the rest (1010...) is
    // above half an ulp: nearest/up round to ...AB (C1 = 1: rounded up), down/zero truncate.
    let cases: [(UInt16, UInt64, Bool)] = [
      (0x037F, 0xAAAA_AAAA_AAAA_AAAB, true), (0x077F, 0xAAAA_AAAA_AAAA_AAAA, false),
      (0x0B7F, 0xAAAA_AAAA_AAAA_AAAB, true), (0x0F7F, 0xAAAA_AAAA_AAAA_AAAA, false),
      // Precision control 24 bits (as single: ...AAAB) and 53 bits (as double: rounds down).
      (0x007F, 0xAAAA_AB00_0000_0000, true), (0x027F, 0xAAAA_AAAA_AAAA_A800, false),
    ]
    for (control, significand, roundedUp) in cases {
      let (value, status) = try Self.x87(Self.oneThird, control: control)
      #expect(value == X87Register(significand: significand, signExponent: 0x3FFD), "fcw \(control)")
      #expect(status & 0x20 != 0, "PE, fcw \(control)")
      #expect((status & 0x200 != 0) == roundedUp, "C1, fcw \(control)")
    }
  }

  @Test("x87 exception flags: IE with the default NaN, ZE, OE, UE, DE (FSW bits 0-5)")
  func x87Exceptions() throws {
    let masked: UInt16 = 0x037F
    // 0/0: IE, the real indefinite (sign 1, exponent 0x7FFF, significand 0xC000...).
    var (value, status) = try Self.x87(
      "fldz\nfldz\nfdiv st, st(1)\nfnstsw ax\nfstp tbyte ptr [rbx + 16]", control: masked)
    #expect(value == X87Register(significand: 0xC000_0000_0000_0000, signExponent: 0xFFFF))
    #expect(status & 0x3F == 0x01)
    // 1/0: ZE, +∞.
    (value, status) = try Self.x87("fldz\nfld1\nfdiv st, st(1)\nfnstsw ax\nfstp tbyte ptr [rbx + 16]", control: masked)
    #expect(value == X87Register(significand: 0x8000_0000_0000_0000, signExponent: 0x7FFF))
    #expect(status & 0x3F == 0x04)
    // Largest finite × itself: OE and PE, +∞ when rounding to nearest.
    (value, status) = try Self.x87(
      "mov rax, 0xFFFFFFFFFFFFFFFF\nmov [rbx + 32], rax\nmov word ptr [rbx + 40], 0x7FFE\n"
        + "fld tbyte ptr [rbx + 32]\nfmul st, st(0)\nfnstsw ax\nfstp tbyte ptr [rbx + 16]", control: masked)
    #expect(value == X87Register(significand: 0x8000_0000_0000_0000, signExponent: 0x7FFF))
    #expect(status & 0x3F == 0x28)
    // Smallest normal (exponent 1) × 0.5: the exact denormal 0x4000...; tiny and exact, so
    // with UE masked no UE (SDM 8.5.5.2).
    (value, status) = try Self.x87(
      "mov rax, 0x8000000000000000\nmov [rbx + 32], rax\nmov word ptr [rbx + 40], 1\n"
        + "fld tbyte ptr [rbx + 32]\nmov dword ptr [rbx + 48], 0x3F000000\nfmul dword ptr [rbx + 48]\n"
        + "fnstsw ax\nfstp tbyte ptr [rbx + 16]", control: masked)
    #expect(value == X87Register(significand: 0x4000_0000_0000_0000, signExponent: 0))
    #expect(status & 0x3F == 0)
    // A denormal operand sets DE: 0x0000:0000000000000003 × 0.25 → 0.75 ulp → 1 ulp, UE|PE|DE.
    (value, status) = try Self.x87(
      "mov qword ptr [rbx + 32], 3\nmov word ptr [rbx + 40], 0\n"
        + "fld tbyte ptr [rbx + 32]\nmov dword ptr [rbx + 48], 0x3E800000\nfmul dword ptr [rbx + 48]\n"
        + "fnstsw ax\nfstp tbyte ptr [rbx + 16]", control: masked)
    #expect(value == X87Register(significand: 1, signExponent: 0))
    #expect(status & 0x3F == 0x32)
  }

  // MARK: x87 transcendentals against an arbitrary-precision model

  /// sin(x) or cos(x) for x = 2^-1, as a fixed-point number with 124 fraction bits, from the
  /// Taylor series (terms below 2^-124 are dropped; the error is a few units of 2^-124).
  static func taylorHalf(cosine: Bool) -> UInt128 {
    let fraction = 124
    let x = UInt128(1) << (fraction - 1)
    var term: UInt128 = cosine ? UInt128(1) << fraction : x
    var sum = term
    var n: UInt128 = cosine ? 0 : 1
    var negative = true
    while term != 0 {
      // term × x² / ((n + 1)(n + 2)), x² = 2^-2.
      term = (term >> 2) / ((n + 1) * (n + 2))
      n += 2
      sum = negative ? sum - term : sum + term
      negative.toggle()
    }
    return sum
  }

  /// The 64-bit significand of a fixed-point value in [2^e, 2^(e+1)) (e = `exponent`, < 0),
  /// rounded to nearest.
  static func significand(_ value: UInt128, exponent: Int) -> UInt64 {
    let shift = 124 + exponent - 63
    let rounded = (value + (UInt128(1) << (shift - 1))) >> shift
    return UInt64(rounded)
  }

  @Test("FSIN/FCOS of 0.5 within 1 ulp of the exact value (SDM 8.3.10), FLDPI rounds π per RC")
  func transcendentals() throws {
    let masked: UInt16 = 0x037F
    let load = "mov dword ptr [rbx + 48], 0x3F000000\nfld dword ptr [rbx + 48]\n"
    // sin(0.5) = 0.479... = 1.917... × 2^-2; cos(0.5) = 0.877... = 1.755... × 2^-1.
    for (instruction, exponent, cosine) in [("fsin", -2, false), ("fcos", -1, true)] {
      let exact = Self.significand(Self.taylorHalf(cosine: cosine), exponent: exponent)
      let (value, _) = try Self.x87(load + instruction + "\nfstp tbyte ptr [rbx + 16]", control: masked)
      #expect(value.signExponent == UInt16(0x3FFF + exponent), "\(instruction)")
      let error = value.significand > exact ? value.significand - exact : exact - value.significand
      #expect(
        error <= 1, "\(instruction): 0x\(String(value.significand, radix: 16)), exact 0x\(String(exact, radix: 16))")
    }
    // π = 0xC90FDAA2 2168C234 C4C6628B... × 2^-62 (published hexadecimal digits): the bits after
    // the 64th start with 1100, so nearest and up give ...C235, down and zero ...C234.
    for (control, significand) in [(UInt16(0x037F), UInt64(0xC90F_DAA2_2168_C235)), (0x077F, 0xC90F_DAA2_2168_C234)] {
      let (value, _) = try Self.x87("fldpi\nfstp tbyte ptr [rbx + 16]", control: control)
      #expect(value == X87Register(significand: significand, signExponent: 0x4000))
    }
  }
}
