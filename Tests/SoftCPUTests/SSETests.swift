import SoftCPU
import Testing
import VMCore

/// Builders for SSE unit tests: instructions are constructed by hand and run through
/// `CPU.executeSIMDForTesting`, so these tests need neither the decoder nor the run loop.
enum SSETestSupport {
  static let dataAddress: UInt64 = 0x1000

  static func makeCPU() throws -> CPU {
    let memory = try GuestMemory(size: 1 << 20)
    let cpu = CPU(memory: memory, bus: IOBus())
    cpu.cr0 = X86.cr0PE | X86.cr0MP | X86.cr0ET | X86.cr0NE
    cpu.cr4 = X86.cr4OSFXSR | X86.cr4OSXMMEXCPT
    cpu.rip = 0x100
    return cpu
  }

  /// Register-register SSE instruction (`opcode` = map << 8 | byte).
  static func registerForm(
    _ opcode: UInt16, prefix: UInt8 = 0, reg: UInt8, rm: UInt8, immediate: UInt64 = 0, rexW: Bool = false
  ) -> Instruction {
    var instruction = Instruction()
    instruction.op = .sse
    instruction.length = 4
    instruction.opcode = opcode
    instruction.mandatoryPrefix = prefix
    instruction.reg = reg
    instruction.rm = rm
    instruction.modrm = 0xC0 | (reg & 7) << 3 | (rm & 7)
    instruction.immediate = immediate
    instruction.rexW = rexW
    return instruction
  }

  /// SSE instruction with an absolute memory operand `[address]`.
  static func memoryForm(
    _ opcode: UInt16, prefix: UInt8 = 0, reg: UInt8, address: UInt64 = dataAddress, immediate: UInt64 = 0,
    rexW: Bool = false
  ) -> Instruction {
    var instruction = registerForm(opcode, prefix: prefix, reg: reg, rm: 0, immediate: immediate, rexW: rexW)
    instruction.hasMemoryOperand = true
    instruction.modrm = (reg & 7) << 3 | 4
    instruction.displacement = Int64(bitPattern: address)
    return instruction
  }

  static func floats(_ values: Float...) -> XMMValue {
    var lanes = SIMD4<Float>(repeating: 0)
    for (index, value) in values.enumerated() { lanes[index] = value }
    return unsafeBitCast(lanes, to: XMMValue.self)
  }

  static func doubles(_ low: Double, _ high: Double = 0) -> XMMValue {
    unsafeBitCast(SIMD2<Double>(low, high), to: XMMValue.self)
  }

  static func lane(_ value: XMMValue, _ index: Int) -> Float {
    unsafeBitCast(value, to: SIMD4<Float>.self)[index]
  }

  static func bytes(_ value: XMMValue) -> [UInt8] {
    let lanes = unsafeBitCast(value, to: SIMD16<UInt8>.self)
    return (0..<16).map { lanes[$0] }
  }

  static func fromBytes(_ bytes: [UInt8]) -> XMMValue {
    var lanes = SIMD16<UInt8>(repeating: 0)
    for (index, byte) in bytes.enumerated() { lanes[index] = byte }
    return unsafeBitCast(lanes, to: XMMValue.self)
  }
}

@Suite struct SSEArithmeticTests {
  typealias T = SSETestSupport

  @Test func addssRoundsPerMXCSRRoundingControl() throws {
    let cpu = try T.makeCPU()
    let tiny = Float(sign: .plus, exponent: -24, significand: 1)
    // Round to nearest: 1 + 2^-24 is a tie, rounds to even (1.0); inexact.
    cpu.xmm[0] = T.floats(1, 7, 7, 7)
    cpu.xmm[1] = T.floats(tiny)
    try cpu.executeSIMDForTesting(T.registerForm(0x158, prefix: 2, reg: 0, rm: 1))
    #expect(T.lane(cpu.xmm[0], 0) == 1)
    #expect(T.lane(cpu.xmm[0], 1) == 7)  // upper lanes preserved
    #expect(cpu.mxcsr == 0x1F80 | 0x20)
    // Round up: the next float above 1.
    cpu.mxcsr = 0x1F80 | 2 << 13
    cpu.xmm[0] = T.floats(1)
    try cpu.executeSIMDForTesting(T.registerForm(0x158, prefix: 2, reg: 0, rm: 1))
    #expect(T.lane(cpu.xmm[0], 0).bitPattern == 0x3F80_0001)
  }

  @Test func minAndMaxReturnTheSecondOperandForNaNAndZeros() throws {
    let cpu = try T.makeCPU()
    cpu.xmm[0] = T.floats(.nan, 1, 0, -0.0)
    cpu.xmm[1] = T.floats(2, .nan, -0.0, 0)
    try cpu.executeSIMDForTesting(T.registerForm(0x15D, reg: 0, rm: 1))  // MINPS
    let result = unsafeBitCast(cpu.xmm[0], to: SIMD4<Float>.self)
    #expect(result[0] == 2)
    #expect(result[1].isNaN)
    #expect(result[2].bitPattern == 0x8000_0000)  // -0, the second operand
    #expect(result[3].bitPattern == 0)
    cpu.xmm[2] = T.doubles(.nan, 3)
    cpu.xmm[3] = T.doubles(5, 4)
    try cpu.executeSIMDForTesting(T.registerForm(0x15F, prefix: 1, reg: 2, rm: 3))  // MAXPD
    #expect(cpu.xmm[2] == T.doubles(5, 4))
  }

  @Test func conversionOverflowGivesIntegerIndefinite() throws {
    let cpu = try T.makeCPU()
    cpu.xmm[1] = T.doubles(1e10)
    cpu.gpr[3] = 0xFFFF_FFFF_FFFF_FFFF
    try cpu.executeSIMDForTesting(T.registerForm(0x12C, prefix: 3, reg: 3, rm: 1))  // CVTTSD2SI r32
    #expect(cpu.gpr[3] == 0x8000_0000)
    #expect(cpu.mxcsr & 1 == 1)
    cpu.xmm[1] = T.doubles(.nan)
    try cpu.executeSIMDForTesting(T.registerForm(0x12C, prefix: 3, reg: 3, rm: 1, rexW: true))
    #expect(cpu.gpr[3] == 0x8000_0000_0000_0000)
    cpu.xmm[1] = T.doubles(-2.5)
    try cpu.executeSIMDForTesting(T.registerForm(0x12D, prefix: 3, reg: 3, rm: 1, rexW: true))  // CVTSD2SI
    #expect(cpu.gpr[3] == UInt64(bitPattern: -2))  // round to nearest even
    try cpu.executeSIMDForTesting(T.registerForm(0x12C, prefix: 3, reg: 3, rm: 1))  // truncates
    #expect(cpu.gpr[3] == 0xFFFF_FFFE)  // zero-extended 32-bit destination
  }

  @Test func convertIntegerToDoubleFromMemory() throws {
    let cpu = try T.makeCPU()
    try cpu.memory.write(UInt64(bitPattern: -(1 << 53) - 1), at: T.dataAddress)
    cpu.xmm[4] = XMMValue(0, 0xDEAD)
    try cpu.executeSIMDForTesting(T.memoryForm(0x12A, prefix: 3, reg: 4, rexW: true))  // CVTSI2SD xmm4, m64
    #expect(cpu.xmm[4] == XMMValue(Double(-(1 << 53)).bitPattern, 0xDEAD))
    #expect(cpu.mxcsr & 0x20 != 0)  // inexact
  }

  @Test func unmaskedExceptionRaisesXMAndLeavesDestination() throws {
    let cpu = try T.makeCPU()
    cpu.mxcsr = 0x1F80 & ~(1 << 9)  // unmask divide-by-zero
    cpu.xmm[0] = T.floats(1, 2, 3, 4)
    cpu.xmm[1] = T.floats(0, 1, 1, 1)
    #expect(throws: Fault.simdError) {
      try cpu.executeSIMDForTesting(T.registerForm(0x15E, reg: 0, rm: 1))  // DIVPS
    }
    #expect(cpu.xmm[0] == T.floats(1, 2, 3, 4))
    #expect(cpu.mxcsr & 0x3F == 0x4)
    cpu.cr4 &= ~X86.cr4OSXMMEXCPT
    #expect(throws: Fault.invalidOpcode) {
      try cpu.executeSIMDForTesting(T.registerForm(0x15E, reg: 0, rm: 1))
    }
  }

  @Test func unmaskedUnderflowFiresForExactTinyResults() throws {
    let cpu = try T.makeCPU()
    cpu.mxcsr = 0x1F80 & ~(1 << 11)  // unmask underflow
    // 1.5 * 2^-126 - 2^-126 = 2^-127: normal inputs, a tiny result exactly representable.
    let left = Float(sign: .plus, exponent: -126, significand: 1.5)
    cpu.xmm[0] = T.floats(left)
    cpu.xmm[1] = T.floats(-Float.leastNormalMagnitude)
    #expect(throws: Fault.simdError) {
      try cpu.executeSIMDForTesting(T.registerForm(0x158, prefix: 2, reg: 0, rm: 1))
    }
    #expect(cpu.mxcsr & 0x3F == 0x10)  // UE only: exact, so no PE
    #expect(T.lane(cpu.xmm[0], 0) == left)
    // Masked, the same addition raises nothing.
    cpu.mxcsr = 0x1F80
    try cpu.executeSIMDForTesting(T.registerForm(0x158, prefix: 2, reg: 0, rm: 1))
    #expect(cpu.mxcsr == 0x1F80)
    #expect(T.lane(cpu.xmm[0], 0) == Float(sign: .plus, exponent: -127, significand: 1))
  }

  @Test func comissSetsFlags() throws {
    let cpu = try T.makeCPU()
    cpu.rflags = 0x2 | RFlags.of | RFlags.sf | RFlags.af
    cpu.xmm[0] = T.floats(1)
    cpu.xmm[1] = T.floats(2)
    try cpu.executeSIMDForTesting(T.registerForm(0x12F, reg: 0, rm: 1))
    #expect(cpu.rflags & RFlags.status == RFlags.cf)
    cpu.xmm[1] = T.floats(.nan)
    try cpu.executeSIMDForTesting(T.registerForm(0x12E, reg: 0, rm: 1))  // UCOMISS: QNaN, no IE
    #expect(cpu.rflags & RFlags.status == RFlags.zf | RFlags.pf | RFlags.cf)
    #expect(cpu.mxcsr & 1 == 0)
    try cpu.executeSIMDForTesting(T.registerForm(0x12F, reg: 0, rm: 1))  // COMISS: QNaN signals IE
    #expect(cpu.mxcsr & 1 == 1)
  }

  @Test func compareProducesMasks() throws {
    let cpu = try T.makeCPU()
    cpu.xmm[0] = T.doubles(1, .nan)
    cpu.xmm[1] = T.doubles(2, 2)
    try cpu.executeSIMDForTesting(T.registerForm(0x1C2, prefix: 1, reg: 0, rm: 1, immediate: 1))  // CMPLTPD
    #expect(cpu.xmm[0] == XMMValue(~0, 0))
    cpu.xmm[2] = T.floats(1, 5, 5, 5)
    cpu.xmm[3] = T.floats(.nan)
    try cpu.executeSIMDForTesting(T.registerForm(0x1C2, prefix: 2, reg: 2, rm: 3, immediate: 3))  // CMPUNORDSS
    #expect(unsafeBitCast(cpu.xmm[2], to: SIMD4<UInt32>.self)[0] == 0xFFFF_FFFF)
    #expect(T.lane(cpu.xmm[2], 1) == 5)
  }

  @Test func sqrtAndConversionsBetweenFormats() throws {
    let cpu = try T.makeCPU()
    cpu.xmm[0] = T.doubles(0, 0)
    cpu.xmm[1] = T.floats(2, 16, 0.25, -1)
    try cpu.executeSIMDForTesting(T.registerForm(0x151, reg: 0, rm: 1))  // SQRTPS
    let roots = unsafeBitCast(cpu.xmm[0], to: SIMD4<Float>.self)
    #expect(roots[0] == Float(2).squareRoot())
    #expect(roots[1] == 4)
    #expect(roots[3].isNaN)
    #expect(cpu.mxcsr & 0x21 == 0x21)
    cpu.xmm[2] = T.floats(1.5, -3)
    try cpu.executeSIMDForTesting(T.registerForm(0x15A, reg: 3, rm: 2))  // CVTPS2PD
    #expect(cpu.xmm[3] == T.doubles(1.5, -3))
    cpu.xmm[4] = unsafeBitCast(SIMD4<Int32>(1, -7, 1 << 30, 3), to: XMMValue.self)
    try cpu.executeSIMDForTesting(T.registerForm(0x15B, reg: 5, rm: 4))  // CVTDQ2PS
    #expect(cpu.xmm[5] == T.floats(1, -7, 1_073_741_824, 3))
  }
}

@Suite struct SSEIntegerTests {
  typealias T = SSETestSupport

  @Test func packsswbSaturates() throws {
    let cpu = try T.makeCPU()
    cpu.xmm[0] = unsafeBitCast(SIMD8<Int16>(300, -300, 127, -128, 0, 1, -1, 32767), to: XMMValue.self)
    cpu.xmm[1] = unsafeBitCast(SIMD8<Int16>(-32768, 128, -129, 5, 6, 7, 8, 9), to: XMMValue.self)
    try cpu.executeSIMDForTesting(T.registerForm(0x163, prefix: 1, reg: 0, rm: 1))
    let result = unsafeBitCast(cpu.xmm[0], to: SIMD16<Int8>.self)
    let expected: [Int8] = [127, -128, 127, -128, 0, 1, -1, 127, -128, 127, -128, 5, 6, 7, 8, 9]
    #expect((0..<16).map { result[$0] } == expected)
  }

  @Test func stringSearchIdiom() throws {
    // PCMPEQB against zero, then PMOVMSKB: glibc strlen's inner loop.
    let cpu = try T.makeCPU()
    let text = Array("hello, world\0abc".utf8)
    try cpu.memory.writeBytes(text, at: T.dataAddress)
    try cpu.executeSIMDForTesting(T.registerForm(0x1EF, prefix: 1, reg: 1, rm: 1))  // PXOR xmm1, xmm1
    try cpu.executeSIMDForTesting(T.memoryForm(0x16F, prefix: 1, reg: 2))  // MOVDQA xmm2, [data]
    try cpu.executeSIMDForTesting(T.registerForm(0x174, prefix: 1, reg: 2, rm: 1))  // PCMPEQB
    try cpu.executeSIMDForTesting(T.registerForm(0x1D7, prefix: 1, reg: 0, rm: 2))  // PMOVMSKB eax
    #expect(cpu.gpr[0] == 1 << 12)
  }

  @Test func alignmentRules() throws {
    let cpu = try T.makeCPU()
    #expect(throws: Fault.generalProtection(0)) {
      try cpu.executeSIMDForTesting(T.memoryForm(0x128, reg: 0, address: T.dataAddress + 4))  // MOVAPS
    }
    try cpu.executeSIMDForTesting(T.memoryForm(0x110, reg: 0, address: T.dataAddress + 4))  // MOVUPS
    #expect(throws: Fault.generalProtection(0)) {
      try cpu.executeSIMDForTesting(T.memoryForm(0x1FE, prefix: 1, reg: 0, address: T.dataAddress + 4))  // PADDD
    }
  }

  @Test func shiftsShufflesAndUnpacks() throws {
    let cpu = try T.makeCPU()
    let ramp = T.fromBytes(Array(0..<16))
    cpu.xmm[0] = ramp
    try cpu.executeSIMDForTesting(T.registerForm(0x173, prefix: 1, reg: 3, rm: 0, immediate: 3))  // PSRLDQ 3
    #expect(T.bytes(cpu.xmm[0]) == Array(3..<16) + [0, 0, 0])
    cpu.xmm[0] = ramp
    try cpu.executeSIMDForTesting(T.registerForm(0x173, prefix: 1, reg: 7, rm: 0, immediate: 9))  // PSLLDQ 9
    #expect(T.bytes(cpu.xmm[0]) == [UInt8](repeating: 0, count: 9) + Array(0..<7))
    cpu.xmm[1] = unsafeBitCast(SIMD8<Int16>(-4, 8, 0, 0, 0, 0, 0, 0), to: XMMValue.self)
    try cpu.executeSIMDForTesting(T.registerForm(0x171, prefix: 1, reg: 4, rm: 1, immediate: 20))  // PSRAW 20
    #expect(unsafeBitCast(cpu.xmm[1], to: SIMD8<Int16>.self)[0] == -1)
    #expect(unsafeBitCast(cpu.xmm[1], to: SIMD8<Int16>.self)[1] == 0)
    cpu.xmm[2] = unsafeBitCast(SIMD4<UInt32>(10, 11, 12, 13), to: XMMValue.self)
    try cpu.executeSIMDForTesting(T.registerForm(0x170, prefix: 1, reg: 3, rm: 2, immediate: 0x1B))  // PSHUFD reverse
    #expect(unsafeBitCast(cpu.xmm[3], to: SIMD4<UInt32>.self) == SIMD4(13, 12, 11, 10))
    cpu.xmm[4] = T.fromBytes([1, 2, 3, 4, 5, 6, 7, 8])
    cpu.xmm[5] = T.fromBytes([0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7, 0xA8])
    try cpu.executeSIMDForTesting(T.registerForm(0x160, prefix: 1, reg: 4, rm: 5))  // PUNPCKLBW
    #expect(T.bytes(cpu.xmm[4]) == [1, 0xA1, 2, 0xA2, 3, 0xA3, 4, 0xA4, 5, 0xA5, 6, 0xA6, 7, 0xA7, 8, 0xA8])
  }

  @Test func saturatingArithmeticMultiplyAndAverage() throws {
    let cpu = try T.makeCPU()
    cpu.xmm[0] = T.fromBytes([250, 5, 0x80])
    cpu.xmm[1] = T.fromBytes([10, 10, 1])
    try cpu.executeSIMDForTesting(T.registerForm(0x1DC, prefix: 1, reg: 0, rm: 1))  // PADDUSB
    #expect(Array(T.bytes(cpu.xmm[0]).prefix(3)) == [255, 15, 0x81])
    cpu.xmm[2] = T.fromBytes([1, 2, 255])
    cpu.xmm[3] = T.fromBytes([2, 2, 255])
    try cpu.executeSIMDForTesting(T.registerForm(0x1E0, prefix: 1, reg: 2, rm: 3))  // PAVGB rounds up
    #expect(Array(T.bytes(cpu.xmm[2]).prefix(3)) == [2, 2, 255])
    cpu.xmm[4] = unsafeBitCast(SIMD8<Int16>(1000, -2, 3, 4, 0, 0, 0, 0), to: XMMValue.self)
    cpu.xmm[5] = unsafeBitCast(SIMD8<Int16>(1000, 7, 5, 6, 0, 0, 0, 0), to: XMMValue.self)
    try cpu.executeSIMDForTesting(T.registerForm(0x1F5, prefix: 1, reg: 4, rm: 5))  // PMADDWD
    #expect(unsafeBitCast(cpu.xmm[4], to: SIMD4<Int32>.self) == SIMD4<Int32>(1_000_000 - 14, 39, 0, 0))
  }

  @Test func movesBetweenGeneralAndXMMRegisters() throws {
    let cpu = try T.makeCPU()
    cpu.gpr[1] = 0x1122_3344_5566_7788
    cpu.xmm[0] = XMMValue(~0, ~0)
    try cpu.executeSIMDForTesting(T.registerForm(0x16E, prefix: 1, reg: 0, rm: 1))  // MOVD xmm0, ecx
    #expect(cpu.xmm[0] == XMMValue(0x5566_7788, 0))
    try cpu.executeSIMDForTesting(T.registerForm(0x16E, prefix: 1, reg: 0, rm: 1, rexW: true))  // MOVQ xmm0, rcx
    #expect(cpu.xmm[0] == XMMValue(0x1122_3344_5566_7788, 0))
    cpu.xmm[2] = XMMValue(0xAAAA_BBBB_CCCC_DDDD, 7)
    try cpu.executeSIMDForTesting(T.registerForm(0x17E, prefix: 1, reg: 2, rm: 3))  // MOVD ebx, xmm2
    #expect(cpu.gpr[3] == 0xCCCC_DDDD)
    try cpu.executeSIMDForTesting(T.registerForm(0x1D6, prefix: 1, reg: 2, rm: 4))  // MOVQ xmm4, xmm2
    #expect(cpu.xmm[4] == XMMValue(0xAAAA_BBBB_CCCC_DDDD, 0))
    cpu.xmm[5] = XMMValue(1, 2)
    try cpu.executeSIMDForTesting(T.registerForm(0x110, prefix: 3, reg: 5, rm: 2))  // MOVSD reg: merge
    #expect(cpu.xmm[5] == XMMValue(0xAAAA_BBBB_CCCC_DDDD, 2))
    try cpu.memory.write(UInt64(0x4040_4040), at: T.dataAddress)
    try cpu.executeSIMDForTesting(T.memoryForm(0x110, prefix: 2, reg: 5))  // MOVSS load: zero upper
    #expect(cpu.xmm[5] == XMMValue(0x4040_4040, 0))
  }
}

@Suite struct SSEStateTests {
  typealias T = SSETestSupport

  @Test func availabilityChecks() throws {
    let cpu = try T.makeCPU()
    cpu.cr4 = 0
    #expect(throws: Fault.invalidOpcode) {
      try cpu.executeSIMDForTesting(T.registerForm(0x158, reg: 0, rm: 1))
    }
    cpu.cr4 = X86.cr4OSFXSR
    cpu.cr0 |= X86.cr0TS
    #expect(throws: Fault.deviceNotAvailable) {
      try cpu.executeSIMDForTesting(T.registerForm(0x158, reg: 0, rm: 1))
    }
  }

  @Test func ldmxcsrRejectsReservedBits() throws {
    let cpu = try T.makeCPU()
    try cpu.memory.write(UInt32(0x1_0000), at: T.dataAddress)
    #expect(throws: Fault.generalProtection(0)) {
      try cpu.executeSIMDForTesting(T.memoryForm(0x1AE, reg: 2))
    }
    try cpu.memory.write(UInt32(0x7FC0), at: T.dataAddress)
    try cpu.executeSIMDForTesting(T.memoryForm(0x1AE, reg: 2))
    #expect(cpu.mxcsr == 0x7FC0)
    try cpu.executeSIMDForTesting(T.memoryForm(0x1AE, reg: 3, address: T.dataAddress + 8))  // STMXCSR
    #expect(try cpu.memory.read(UInt32.self, at: T.dataAddress + 8) == 0x7FC0)
  }

  @Test func fxsaveLayoutAndRoundTrip() throws {
    let cpu = try T.makeCPU()
    for index in 0..<16 { cpu.xmm[index] = XMMValue(UInt64(index) << 32 | 0x55, ~UInt64(index)) }
    cpu.mxcsr = 0x9FC0
    // FLD1 then FLDPI through the x87 unit.
    try cpu.executeSIMDForTesting(X87TestSupport.registerForm(0xD9, 0xE8))
    try cpu.executeSIMDForTesting(X87TestSupport.registerForm(0xD9, 0xEB))
    try cpu.memory.fill(0xAA, at: 0x2000, length: 512)
    try cpu.executeSIMDForTesting(T.memoryForm(0x1AE, reg: 0, address: 0x2000, rexW: true))
    let image = try cpu.memory.readBytes(at: 0x2000, count: 512)
    func word(_ offset: Int) -> UInt16 { UInt16(image[offset]) | UInt16(image[offset + 1]) << 8 }
    func dword(_ offset: Int) -> UInt32 { UInt32(word(offset)) | UInt32(word(offset + 2)) << 16 }
    #expect(word(0) == 0x037F)  // FCW
    #expect(word(2) == 0x3000)  // FSW: TOP = 6
    #expect(image[4] == 0xC0)  // abridged FTW: R6, R7 valid
    #expect(dword(24) == 0x9FC0)
    #expect(dword(28) == 0xFFFF)
    // ST0 = pi: significand C90FDAA22168C235 (round-to-nearest), exponent 0x4000.
    #expect(Array(image[32..<42]) == [0x35, 0xC2, 0x68, 0x21, 0xA2, 0xDA, 0x0F, 0xC9, 0x00, 0x40])
    #expect(Array(image[42..<48]) == [0, 0, 0, 0, 0, 0])
    #expect(Array(image[48..<58]) == [0, 0, 0, 0, 0, 0, 0, 0x80, 0xFF, 0x3F])  // ST1 = 1.0
    #expect(dword(160 + 16 * 3) == 0x55)
    #expect(dword(160 + 16 * 3 + 4) == 3)
    #expect(image[416] == 0xAA)  // bytes 416-511 untouched
    // Restore into a fresh CPU.
    let other = try T.makeCPU()
    try other.memory.writeBytes(image, at: 0x3000)
    try other.executeSIMDForTesting(T.memoryForm(0x1AE, reg: 1, address: 0x3000, rexW: true))
    #expect(other.mxcsr == 0x9FC0)
    #expect(other.fpuTop == 6)
    #expect(other.fpuTags == 0x0FFF)
    #expect(other.fpuRegisters[6].significandBitPattern == 0x490F_DAA2_2168_C235)
    #expect(other.xmm[15] == cpu.xmm[15])
    #expect(throws: Fault.generalProtection(0)) {
      try other.executeSIMDForTesting(T.memoryForm(0x1AE, reg: 0, address: 0x3008, rexW: true))
    }
  }
}
