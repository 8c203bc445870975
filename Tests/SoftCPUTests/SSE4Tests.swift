import SoftCPU
import Testing
import VMCore

@Suite struct SSE4Tests {
  typealias T = SSETestSupport

  @Test func pshufbAndPalignr() throws {
    let cpu = try T.makeCPU()
    cpu.xmm[0] = T.fromBytes(Array(10..<26))
    cpu.xmm[1] = T.fromBytes([15, 0x80, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0x8F])
    try cpu.executeSIMDForTesting(T.registerForm(0x200, prefix: 1, reg: 0, rm: 1))  // PSHUFB
    #expect(T.bytes(cpu.xmm[0]) == [25, 0, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 0])
    cpu.xmm[2] = T.fromBytes(Array(16..<32))  // destination: high half of the concatenation
    cpu.xmm[3] = T.fromBytes(Array(0..<16))
    try cpu.executeSIMDForTesting(T.registerForm(0x30F, prefix: 1, reg: 2, rm: 3, immediate: 5))  // PALIGNR 5
    #expect(T.bytes(cpu.xmm[2]) == Array(5..<21))
  }

  @Test func ptestAndStringCompare() throws {
    let cpu = try T.makeCPU()
    cpu.xmm[0] = XMMValue(0xF0, 0)
    cpu.xmm[1] = XMMValue(0x0F, 0)
    try cpu.executeSIMDForTesting(T.registerForm(0x217, prefix: 1, reg: 0, rm: 1))  // PTEST
    #expect(cpu.rflags & RFlags.status == RFlags.zf)
    // PCMPISTRI equal-each (imm 0x18: unsigned bytes, equal each, negative polarity): first mismatch.
    cpu.xmm[2] = T.fromBytes(Array("hello world".utf8))
    cpu.xmm[3] = T.fromBytes(Array("hello there".utf8))
    try cpu.executeSIMDForTesting(T.registerForm(0x363, prefix: 1, reg: 2, rm: 3, immediate: 0x18))
    #expect(cpu.gpr[1] == 6)
    #expect(cpu.rflags & RFlags.cf != 0)
  }

  @Test func roundingAndConversions() throws {
    let cpu = try T.makeCPU()
    cpu.xmm[1] = T.doubles(2.5, -2.5)
    try cpu.executeSIMDForTesting(T.registerForm(0x309, prefix: 1, reg: 0, rm: 1, immediate: 0))  // nearest
    #expect(cpu.xmm[0] == T.doubles(2, -2))
    try cpu.executeSIMDForTesting(T.registerForm(0x309, prefix: 1, reg: 0, rm: 1, immediate: 1))  // down
    #expect(cpu.xmm[0] == T.doubles(2, -3))
    #expect(cpu.mxcsr & 0x20 != 0)
    try cpu.memory.writeBytes([0x80, 1, 0xFF, 2, 9, 9, 9, 9], at: T.dataAddress)
    try cpu.executeSIMDForTesting(T.memoryForm(0x220, prefix: 1, reg: 4, address: T.dataAddress + 1))  // PMOVSXBW
    #expect(unsafeBitCast(cpu.xmm[4], to: SIMD8<Int16>.self) == SIMD8<Int16>(1, -1, 2, 9, 9, 9, 9, 0))
  }

  @Test func insertExtractAndCRC32() throws {
    let cpu = try T.makeCPU()
    cpu.xmm[0] = T.floats(1, 2, 3, 4)
    cpu.xmm[1] = T.floats(5, 6, 7, 8)
    // INSERTPS: source lane 2 -> destination lane 1, zero lane 3.
    try cpu.executeSIMDForTesting(T.registerForm(0x321, prefix: 1, reg: 0, rm: 1, immediate: 0b10_01_1000))
    #expect(cpu.xmm[0] == T.floats(1, 7, 3, 0))
    cpu.xmm[2] = T.fromBytes(Array(0x40..<0x50))
    try cpu.executeSIMDForTesting(T.registerForm(0x314, prefix: 1, reg: 2, rm: 5, immediate: 0x1B))  // PEXTRB
    #expect(cpu.gpr[5] == 0x4B)
    // CRC32C of "123456789" is 0xE3069283 (with the conventional pre/post inversion).
    cpu.gpr[0] = 0xFFFF_FFFF
    for byte in Array("123456789".utf8) {
      cpu.gpr[3] = UInt64(byte)
      var instruction = T.registerForm(0x2F0, prefix: 3, reg: 0, rm: 3)
      instruction.prefixes = Instruction.Prefix.rex
      try cpu.executeSIMDForTesting(instruction)
    }
    #expect(cpu.gpr[0] ^ 0xFFFF_FFFF == 0xE306_9283)
  }
}
