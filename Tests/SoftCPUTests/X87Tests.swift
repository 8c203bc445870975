import SoftCPU
import Testing
import VMCore

/// Builders for x87 unit tests (hand-made `Instruction`s run through `executeSIMDForTesting`).
enum X87TestSupport {
  static let dataAddress: UInt64 = 0x1000

  static func makeCPU() throws -> CPU { try SSETestSupport.makeCPU() }

  /// Register form `escape modrm` (modrm C0-FF).
  static func registerForm(_ escape: UInt8, _ modrm: UInt8) -> Instruction {
    var instruction = Instruction()
    instruction.op = .x87
    instruction.length = 2
    instruction.opcode = UInt16(escape)
    instruction.modrm = modrm
    instruction.reg = (modrm >> 3) & 7
    instruction.rm = modrm & 7
    return instruction
  }

  /// Memory form `escape /reg [address]`.
  static func memoryForm(_ escape: UInt8, reg: UInt8, address: UInt64 = dataAddress) -> Instruction {
    var instruction = registerForm(escape, reg << 3 | 4)
    instruction.length = 7
    instruction.hasMemoryOperand = true
    instruction.displacement = Int64(bitPattern: address)
    return instruction
  }

  static func run(_ cpu: CPU, _ instructions: Instruction...) throws {
    for instruction in instructions { try cpu.executeSIMDForTesting(instruction) }
  }

  static func top(_ cpu: CPU) -> Float80 { cpu.fpuRegisters[cpu.fpuTop] }

  /// Loads an 80-bit value given by its encoding through FLD m80.
  static func load80(_ cpu: CPU, significand: UInt64, signAndExponent: UInt16) throws {
    try cpu.memory.write(significand, at: dataAddress + 0x100)
    try cpu.memory.write(signAndExponent, at: dataAddress + 0x108)
    try run(cpu, memoryForm(0xDB, reg: 5, address: dataAddress + 0x100))
  }

  static func loadDouble(_ cpu: CPU, _ value: Double) throws {
    try cpu.memory.write(value.bitPattern, at: dataAddress + 0x80)
    try run(cpu, memoryForm(0xDD, reg: 0, address: dataAddress + 0x80))
  }
}

@Suite struct X87Tests {
  typealias T = X87TestSupport

  @Test func fld80AndFstp80RoundTripAnyEncoding() throws {
    let cpu = try T.makeCPU()
    let encodings: [(UInt64, UInt16)] = [
      (0x8000_0000_0000_0001, 0x3FFF),  // 1 + 2^-63
      (0xA000_0000_0000_0000, 0x7FFF),  // signalling NaN: FLD m80 does not quiet it
      (0x0000_0000_0000_0001, 0x8000),  // negative denormal
      (0x4000_0000_0000_0000, 0x1234),  // unnormal (integer bit clear)
    ]
    for (significand, signAndExponent) in encodings {
      try T.load80(cpu, significand: significand, signAndExponent: signAndExponent)
      try T.run(cpu, T.memoryForm(0xDB, reg: 7, address: 0x2000))
      #expect(try cpu.memory.read(UInt64.self, at: 0x2000) == significand)
      #expect(try cpu.memory.read(UInt16.self, at: 0x2008) == signAndExponent)
    }
    #expect(cpu.fpuStatus & 0x3F == 0)
    #expect(cpu.fpuTags == 0xFFFF)
  }

  @Test func arithmeticOnTheStack() throws {
    let cpu = try T.makeCPU()
    try T.loadDouble(cpu, 3)
    try T.loadDouble(cpu, 1)
    try T.run(cpu, T.registerForm(0xDE, 0xF9))  // FDIVP ST(1), ST(0): ST1 = ST1 / ST0 = 1/3? no: 3 / 1
    #expect(T.top(cpu) == 3)
    try T.loadDouble(cpu, 1)
    try T.run(cpu, T.registerForm(0xD8, 0xF1))  // FDIV ST(0), ST(1): 1 / 3
    #expect(T.top(cpu) == Float80(1) / 3)
    #expect(cpu.fpuStatus & 0x20 != 0)  // precision
    try T.run(cpu, T.registerForm(0xDC, 0xE9))  // FSUB ST(1), ST(0): ST1 = 3 - 1/3
    #expect(cpu.fpuRegisters[(cpu.fpuTop + 1) & 7] == 3 - Float80(1) / 3)
  }

  @Test func precisionControlRoundsToSingle() throws {
    let cpu = try T.makeCPU()
    try cpu.memory.write(UInt16(0x007F), at: 0x1800)
    try T.run(cpu, T.memoryForm(0xD9, reg: 5, address: 0x1800))  // FLDCW: PC = single
    try T.loadDouble(cpu, 1)
    try T.loadDouble(cpu, 3)
    try T.run(cpu, T.registerForm(0xDE, 0xF9))  // FDIVP: 1 / 3 in 24 bits
    #expect(T.top(cpu) == Float80(Float(1) / 3))
    try T.run(cpu, T.memoryForm(0xD9, reg: 7, address: 0x1802))  // FNSTCW
    #expect(try cpu.memory.read(UInt16.self, at: 0x1802) == 0x007F)
  }

  @Test func fcomiSetsFlags() throws {
    let cpu = try T.makeCPU()
    try T.loadDouble(cpu, 2)
    try T.loadDouble(cpu, 1)
    try T.run(cpu, T.registerForm(0xDB, 0xF1))  // FCOMI ST0=1, ST1=2
    #expect(cpu.rflags & (RFlags.zf | RFlags.pf | RFlags.cf) == RFlags.cf)
    try T.loadDouble(cpu, 2)
    try T.run(cpu, T.registerForm(0xDF, 0xEA))  // FUCOMIP ST0=2 vs ST2=2, pops
    #expect(cpu.rflags & (RFlags.zf | RFlags.pf | RFlags.cf) == RFlags.zf)
    #expect(T.top(cpu) == 1)
    try T.loadDouble(cpu, .nan)
    try T.run(cpu, T.registerForm(0xDB, 0xE9))  // FUCOMI with a QNaN: unordered, no IE
    #expect(cpu.rflags & (RFlags.zf | RFlags.pf | RFlags.cf) == RFlags.zf | RFlags.pf | RFlags.cf)
    #expect(cpu.fpuStatus & 1 == 0)
    try T.run(cpu, T.registerForm(0xDB, 0xF1))  // FCOMI with a QNaN: IE
    #expect(cpu.fpuStatus & 1 == 1)
  }

  @Test func controlWordReservedBitsAndUnmaskedCompare() throws {
    let cpu = try T.makeCPU()
    try cpu.memory.write(UInt16(0xFFFE), at: 0x1800)  // everything but IM... and reserved bits
    try T.run(cpu, T.memoryForm(0xD9, reg: 5, address: 0x1800))
    #expect(cpu.fpuControl == 0x1F7E)
    // FCOMI with an empty ST(1) and IE unmasked: unordered flags, #MF pending, no pop.
    try T.loadDouble(cpu, 1)
    cpu.rflags = 0x2 | RFlags.of | RFlags.sf
    try T.run(cpu, T.registerForm(0xDF, 0xF1))  // FCOMIP ST0, ST1
    #expect(cpu.rflags & RFlags.status == RFlags.zf | RFlags.pf | RFlags.cf)
    #expect(cpu.fpuStatus & 0x80C1 == 0x80C1)  // B, ES, SF, IE
    #expect(cpu.fpuTop == 7)
    #expect(throws: Fault.x87Error) { try cpu.fwait() }
  }

  @Test func fcomSetsConditionCodesAndFnstswAX() throws {
    let cpu = try T.makeCPU()
    try T.loadDouble(cpu, 5)
    try cpu.memory.write(Float(7).bitPattern, at: 0x1800)
    try T.run(cpu, T.memoryForm(0xD8, reg: 2, address: 0x1800))  // FCOM m32: 5 < 7 -> C0
    cpu.gpr[0] = 0xFFFF_FFFF_FFFF_FFFF
    try T.run(cpu, T.registerForm(0xDF, 0xE0))  // FNSTSW AX
    #expect(cpu.gpr[0] == UInt64(0xFFFF_FFFF_FFFF_3900))  // TOP 7, C0
  }

  @Test func stackUnderflowGivesIndefiniteAndStackFault() throws {
    let cpu = try T.makeCPU()
    try T.loadDouble(cpu, 1)
    try T.run(cpu, T.registerForm(0xD8, 0xC1))  // FADD ST0, ST1 (empty)
    #expect(cpu.fpuStatus & 0x41 == 0x41)
    #expect(cpu.fpuStatus & 0x200 == 0)  // C1 = 0: underflow
    #expect(T.top(cpu).isNaN)
    #expect(T.top(cpu).sign == .minus)
    // FXAM on an empty register: C3 and C0.
    try T.run(cpu, T.registerForm(0xDD, 0xD8))  // FSTP ST0
    try T.run(cpu, T.registerForm(0xD9, 0xE5))
    #expect(cpu.fpuStatus & 0x4700 == 0x4100 | (cpu.fpuStatus & 0x200))
  }

  /// The WAIT opcode (9B) through the decoder: #MF while an unmasked exception is pending
  /// (status ES), otherwise nothing.
  @Test func waitOpcodeRaisesPendingX87Error() throws {
    let machine = try CoreMachine(cpl: 0)
    try machine.load([0x9B, 0xF4])  // wait; hlt
    #expect(machine.run(limit: 10) == .halted)
    machine.cpu.fpuStatus |= 0x80  // ES: an unmasked exception is pending
    machine.cpu.rip = CoreMachine.codeBase
    #expect(machine.run(limit: 10) == .fault(.x87Error))
    #expect(machine.cpu.rip == CoreMachine.codeBase)
  }

  @Test func unmaskedExceptionIsDeliveredOnTheNextWaitingInstruction() throws {
    let cpu = try T.makeCPU()
    try cpu.memory.write(UInt16(0x037B), at: 0x1800)  // unmask zero-divide
    try T.run(cpu, T.memoryForm(0xD9, reg: 5, address: 0x1800))
    try T.loadDouble(cpu, 1)
    try T.loadDouble(cpu, 0)
    try T.run(cpu, T.registerForm(0xDE, 0xF9))  // FDIVP: 1 / 0, no trap yet
    #expect(cpu.fpuStatus & 0x8084 == 0x8084)  // B, ES, ZE
    #expect(throws: Fault.x87Error) { try T.loadDouble(cpu, 2) }
    #expect(throws: Fault.x87Error) { try cpu.fwait() }
    #expect(cpu.fpuLastOpcode == 0x6F9)
    try T.run(cpu, T.registerForm(0xDB, 0xE2))  // FNCLEX is non-waiting
    try cpu.fwait()
    try T.loadDouble(cpu, 2)
  }

  @Test func integerStoresAndLoads() throws {
    let cpu = try T.makeCPU()
    try T.loadDouble(cpu, 3e9)
    try T.run(cpu, T.memoryForm(0xDB, reg: 2, address: 0x1800))  // FIST m32: overflow
    #expect(try cpu.memory.read(UInt32.self, at: 0x1800) == 0x8000_0000)
    #expect(cpu.fpuStatus & 1 == 1)
    try T.loadDouble(cpu, -2.5)
    try T.run(cpu, T.memoryForm(0xDF, reg: 7, address: 0x1808))  // FISTP m64: round to even
    #expect(try cpu.memory.read(UInt64.self, at: 0x1808) == UInt64(bitPattern: -2))
    try T.loadDouble(cpu, -2.5)
    try T.run(cpu, T.memoryForm(0xDD, reg: 1, address: 0x1808))  // FISTTP m64: truncate
    #expect(try cpu.memory.read(UInt64.self, at: 0x1808) == UInt64(bitPattern: -2))
    try cpu.memory.write(UInt16(bitPattern: -1234), at: 0x1810)
    try T.run(cpu, T.memoryForm(0xDF, reg: 0, address: 0x1810))  // FILD m16
    #expect(T.top(cpu) == -1234)
  }

  @Test func transcendentalsAndConstants() throws {
    let cpu = try T.makeCPU()
    try T.run(cpu, T.registerForm(0xD9, 0xEB))  // FLDPI
    try T.run(cpu, T.registerForm(0xD9, 0xFB))  // FSINCOS: ST0 = cos, ST1 = sin
    #expect(T.top(cpu) == -1)
    #expect(abs(cpu.fpuRegisters[(cpu.fpuTop + 1) & 7]) < 1e-18)
    try T.run(cpu, T.registerForm(0xD9, 0xE8), T.registerForm(0xD9, 0xE8))  // FLD1 x2
    try T.run(cpu, T.registerForm(0xD9, 0xF3))  // FPATAN(1, 1) = pi/4
    #expect(abs(T.top(cpu) - Float80.pi / 4) < 1e-18)
    try T.loadDouble(cpu, 10)
    try T.loadDouble(cpu, 7)
    try T.run(cpu, T.registerForm(0xD9, 0xF8))  // FPREM: 7 mod 10 = 7, complete (C2 = 0)
    #expect(T.top(cpu) == 7)
    #expect(cpu.fpuStatus & 0x400 == 0)
  }

  @Test func environmentRoundTrip() throws {
    let cpu = try T.makeCPU()
    try T.loadDouble(cpu, 42)
    try T.run(cpu, T.memoryForm(0xDD, reg: 6, address: 0x1800))  // FNSAVE (then FNINIT)
    #expect(cpu.fpuTags == 0xFFFF)
    #expect(try cpu.memory.read(UInt16.self, at: 0x1808) == 0x3FFF)  // FTW: R7 valid
    try T.run(cpu, T.memoryForm(0xDD, reg: 4, address: 0x1800))  // FRSTOR
    #expect(T.top(cpu) == 42)
    #expect(cpu.fpuTop == 7)
    try T.run(cpu, T.memoryForm(0xD9, reg: 6, address: 0x1900))  // FNSTENV masks everything
    #expect(try cpu.memory.read(UInt32.self, at: 0x1900) == 0xFFFF_037F)
    #expect(try cpu.memory.read(UInt32.self, at: 0x190C) == 0x100 - 7)  // FIP of the last FLD
  }
}
