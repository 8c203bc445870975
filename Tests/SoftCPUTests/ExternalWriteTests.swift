import SoftCPU
import Testing
import VMCore

/// `CPU.postExternalWrite`: the thread-safe path by which device DMA (through the accelerator's
/// `GuestMemoryWriteObserver`) drops decoded code.
@Suite struct ExternalWriteTests {
  /// `mov eax, value; hlt`.
  static func program(_ value: UInt32) -> [UInt8] {
    [0xB8] + withUnsafeBytes(of: value.littleEndian) { Array($0) } + [0xF4]
  }

  /// Replaces code behind the CPU's back (a raw host pointer, nothing reported).
  static func overwrite(_ machine: CoreMachine, _ bytes: [UInt8], at address: UInt64) throws {
    let raw = try machine.memory.slice(at: address, length: UInt64(bytes.count))
    bytes.withUnsafeBytes { raw.copyMemory(from: $0) }
  }

  static func runFrom(_ machine: CoreMachine, _ address: UInt64) -> StopCause {
    machine.cpu.rip = address
    return machine.run(limit: 100)
  }

  /// A flat ring-0 machine that has decoded and run `mov eax, value; hlt` at the code base.
  static func machineThatRan(_ value: UInt32) throws -> CoreMachine {
    let machine = try CoreMachine(cpl: 0)
    try machine.load(program(value))
    #expect(machine.run(limit: 100) == .halted && machine[R.rax] == UInt64(value))
    return machine
  }

  /// The next run applies the posted writes and stops; the one after runs code that sets `value`.
  static func expectRedecoded(_ machine: CoreMachine, _ value: UInt64, at address: UInt64 = CoreMachine.codeBase) {
    #expect(runFrom(machine, address) == .stopRequested)
    #expect(runFrom(machine, address) == .halted && machine[R.rax] == value)
  }

  @Test func writesToPagesWithoutCodeDoNotInterruptTheCPU() async throws {
    let machine = try Self.machineThatRan(1)
    let cpu = machine.cpu
    await Task.detached { cpu.postExternalWrite(physical: CoreMachine.dataBase, length: 1 << 16) }.value
    #expect(Self.runFrom(machine, CoreMachine.codeBase) == .halted && machine[R.rax] == 1)
  }

  @Test func aWriteToACodePageIsAppliedAtTheNextBlockBoundary() async throws {
    let machine = try Self.machineThatRan(1)
    try Self.overwrite(machine, Self.program(2), at: CoreMachine.codeBase)
    #expect(Self.runFrom(machine, CoreMachine.codeBase) == .halted && machine[R.rax] == 1)  // stale without a report
    let cpu = machine.cpu
    await Task.detached { cpu.postExternalWrite(physical: CoreMachine.codeBase + 5, length: 1) }.value
    Self.expectRedecoded(machine, 2)
  }

  @Test func aRangeEndingOnACodePageCounts() throws {
    let machine = try Self.machineThatRan(1)
    try Self.overwrite(machine, Self.program(3), at: CoreMachine.codeBase)
    // Starts two pages below the code and ends on its first byte.
    machine.cpu.postExternalWrite(physical: CoreMachine.codeBase - 0x2000, length: 0x2001)
    Self.expectRedecoded(machine, 3)
  }

  @Test func tooManyPostedWritesDropEveryDecodedBlock() async throws {
    let machine = try Self.machineThatRan(1)
    let other = CoreMachine.codeBase + 0x3000
    try machine.memory.writeBytes(Self.program(10), at: other)
    #expect(Self.runFrom(machine, other) == .halted && machine[R.rax] == 10)
    try Self.overwrite(machine, Self.program(2), at: CoreMachine.codeBase)
    try Self.overwrite(machine, Self.program(20), at: other)
    // Far more ranges than the queue keeps, all on the first page: the CPU flushes everything,
    // so the other page (never reported) is decoded afresh too.
    let cpu = machine.cpu
    await Task.detached {
      for index in 0..<1000 { cpu.postExternalWrite(physical: CoreMachine.codeBase + UInt64(index % 4096), length: 1) }
    }.value
    Self.expectRedecoded(machine, 2)
    #expect(Self.runFrom(machine, other) == .halted && machine[R.rax] == 20)
  }
}

/// Cross-vCPU code coherence (CodeCoherence.swift): two CPUs on one RAM, run in turns on the
/// test's thread as two vCPU threads would interleave.
@Suite struct CrossVCPUCodeTests {
  /// `mov dword [target], value; hlt` in 64-bit mode (absolute address via a 32-bit displacement).
  static func storer(_ target: UInt32, _ value: UInt32) -> [UInt8] {
    [0xC7, 0x04, 0x25] + withUnsafeBytes(of: target.littleEndian) { Array($0) }
      + withUnsafeBytes(of: value.littleEndian) { Array($0) } + [0xF4]
  }

  /// Runs until HLT, resuming after stop requests (block boundaries where posts are applied).
  static func runToHalt(_ cpu: CPU) -> Bool {
    for _ in 0..<10 {
      switch cpu.run(instructionLimit: 100) {
      case .halted: return true
      case .stopRequested: continue
      default: return false
      }
    }
    return false
  }

  @Test(arguments: [false, true])
  func aStoreByOneVCPUReachesCodeAnotherDecoded(writerWarmedUp: Bool) throws {
    let memory = try GuestMemory(size: 16 << 20)
    let bus = IOBus()
    let runner = CPU(memory: memory, bus: bus)
    let writer = CPU(memory: memory, bus: bus)
    CPU.connectSiblings([runner, writer])
    for cpu in [runner, writer] {
      cpu.enterFlatLongMode(cpl: 0)
      cpu.gpr[4] = CoreMachine.stackTop
    }
    let code = CoreMachine.codeBase
    let writerCode = CoreMachine.codeBase + 0x4000
    try memory.writeBytes(ExternalWriteTests.program(1), at: code)
    try memory.writeBytes(Self.storer(UInt32(code + 0x800), 7), at: writerCode)
    // The writer's patch: the immediate of the runner's `mov eax, 1` becomes 2.
    try memory.writeBytes(Self.storer(UInt32(code + 1), 2), at: writerCode + 0x100)
    if writerWarmedUp {
      // The writer gets a write-TLB entry for the page before the runner decodes code there:
      // the runner's new code page must make it drop the entry.
      writer.rip = writerCode
      #expect(Self.runToHalt(writer))
    }
    // The runner decodes and runs `mov eax, 1; hlt`.
    runner.rip = code
    #expect(Self.runToHalt(runner) && runner.gpr[0] == 1)
    // The writer stores (after applying the runner's news at its first boundary, if any).
    writer.rip = writerCode + 0x100
    #expect(Self.runToHalt(writer))
    #expect(try memory.readBytes(at: code + 1, count: 4) == [2, 0, 0, 0])
    // The runner's next boundary applies the writer's report; then it runs the new code.
    runner.rip = code
    #expect(Self.runToHalt(runner) && runner.gpr[0] == 2)
  }
}
