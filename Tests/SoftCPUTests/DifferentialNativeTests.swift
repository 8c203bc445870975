import CNativeExec
import Testing

/// Checks of the native executor itself: the reference side of the differential tests must be right.
@Suite("DifferentialNativeExecutor")
struct DifferentialNativeTests {
  func initialState() -> MachineState {
    var state = MachineState()
    for index in 0..<16 { state.gpr[index] = UInt64(index) &* 0x1111_1111_1111 }
    state.gpr[4] = DiffLayout.stackTop
    return state
  }

  @Test func addComputesTheSumAndFlags() {
    var state = initialState()
    state.gpr[0] = 0xFFFF_FFFF_FFFF_FFFF
    state.gpr[3] = 1
    let result = NativeRunner.run(
      code: [0x48, 0x01, 0xD8], initial: state, data: .init(repeating: 0, count: DiffLayout.dataSize))
    #expect(result.end == .completed)
    #expect(result.state.gpr[0] == 0)
    #expect(result.state.rflags & 0x41 == 0x41)  // ZF, CF
    #expect(result.state.rip == DiffLayout.codeBase + 3)
    #expect(result.state.gpr[4] == DiffLayout.stackTop)
    #expect(result.state.gpr[15] == 15 &* 0x1111_1111_1111)
  }

  @Test func memoryAndStackWritesReachTheDataBuffer() {
    var state = initialState()
    state.gpr[3] = DiffLayout.dataBase + 0x100
    state.gpr[0] = 0x1122_3344_5566_7788
    // mov [rbx], rax; push rax
    let result = NativeRunner.run(
      code: [0x48, 0x89, 0x03, 0x50], initial: state, data: .init(repeating: 0, count: DiffLayout.dataSize))
    #expect(result.end == .completed)
    #expect(result.data[0x100] == 0x88 && result.data[0x107] == 0x11)
    #expect(result.data[0x7FF8] == 0x88)
    #expect(result.state.gpr[4] == DiffLayout.stackTop - 8)
  }

  @Test func faultsAreCapturedWithVectorAndRIP() {
    let data = [UInt8](repeating: 0, count: DiffLayout.dataSize)
    var state = initialState()
    // nop; ud2
    var result = NativeRunner.run(code: [0x90, 0x0F, 0x0B], initial: state, data: data)
    #expect(result.end == .fault(vector: 6, errorCode: nil))
    #expect(result.state.rip == DiffLayout.codeBase + 1)
    // xor edx, edx; xor ecx, ecx; div ecx
    result = NativeRunner.run(code: [0x31, 0xD2, 0x31, 0xC9, 0xF7, 0xF1], initial: state, data: data)
    #expect(result.end == .fault(vector: 0, errorCode: nil))
    #expect(result.state.rip == DiffLayout.codeBase + 4)
    // movaps xmm0, [rbx] with rbx misaligned: #GP(0)
    state.gpr[3] = DiffLayout.dataBase + 8
    result = NativeRunner.run(code: [0x0F, 0x28, 0x03], initial: state, data: data)
    #expect(result.end == .fault(vector: 13, errorCode: 0))
    // hlt at CPL 3: #GP(0)
    result = NativeRunner.run(code: [0xF4], initial: state, data: data)
    #expect(result.end == .fault(vector: 13, errorCode: 0))
    // Unmasked SSE divide by zero: #XM
    state.mxcsr = 0x1F80 & ~0x200
    state.xmm[0] = SIMD2(0x3F80_0000, 0)
    state.xmm[1] = SIMD2(0, 0)
    result = NativeRunner.run(code: [0xF3, 0x0F, 0x5E, 0xC1], initial: state, data: data)
    #expect(result.end == .fault(vector: 19, errorCode: nil))
    #expect(result.state.mxcsr & 4 == 4)
  }

  @Test func fpuStateRoundTrips() {
    var state = initialState()
    state.fsw = 5 << 11
    state.ftw = 1 << 5
    state.st[0] = X87Register(Float80(1.5))
    state.xmm[7] = SIMD2(0x1234, 0x5678)
    state.mxcsr = 0x7F80 | 0x3
    // fld st(0): pushes a copy
    let result = NativeRunner.run(
      code: [0xD9, 0xC0], initial: state, data: .init(repeating: 0, count: DiffLayout.dataSize))
    #expect(result.end == .completed)
    #expect(result.state.top == 4)
    #expect(result.state.st[0].float80 == 1.5 && result.state.st[1].float80 == 1.5)
    #expect(result.state.ftw == 0x30)
    #expect(result.state.xmm[7] == SIMD2(0x1234, 0x5678))
    #expect(result.state.mxcsr == 0x7F83)
  }

  @Test func singleStepRunsExactlyOneInstruction() {
    let state = initialState()
    // inc rax; inc rax
    let result = NativeRunner.run(
      code: [0x48, 0xFF, 0xC0, 0x48, 0xFF, 0xC0], initial: state, data: .init(repeating: 0, count: DiffLayout.dataSize),
      singleStep: true)
    #expect(result.end == .fault(vector: 1, errorCode: nil))
    #expect(result.state.gpr[0] == 1)
    #expect(result.state.rip == DiffLayout.codeBase + 3)
  }

  @Test func anEndlessLoopIsStoppedByTheWatchdog() {
    let result = NativeRunner.run(
      code: [0xEB, 0xFE], initial: initialState(), data: .init(repeating: 0, count: DiffLayout.dataSize))
    #expect(result.end == .hang)
  }

  // MARK: The emulated side's own checks

  /// A write outside the data buffer (to guest RAM that exists on the emulated side only) is
  /// reported by the flat runner's RAM digest; with paging on it is a not-present #PF, as on
  /// the host.
  @Test func strayWritesAreSeenAndPagingFaultsLikeTheHost() {
    var state = initialState()
    state.gpr[0] = 0x1234_5678
    state.gpr[3] = 0x3000
    let data = [UInt8](repeating: 0, count: DiffLayout.dataSize)
    let code: [UInt8] = [0x48, 0x89, 0x03]  // mov [rbx], rax
    let flatRunner = EmulatedRunner()
    let flat = flatRunner.run(code: code, initial: state, data: data)
    #expect(flat.end == .completed)
    #expect(flat.strayWrites != nil)
    // The runner drops the pages a run wrote outside the buffer: the same write is seen again,
    // a run that writes nothing there is clean, and a write into the code page past the code
    // (a page the harness writes itself) is seen too.
    #expect(flatRunner.run(code: code, initial: state, data: data).strayWrites != nil)
    var inside = state
    inside.gpr[3] = DiffLayout.dataBase + 0x40
    #expect(flatRunner.run(code: code, initial: inside, data: data).strayWrites == nil)
    var codePage = state
    codePage.gpr[3] = DiffLayout.codeBase + 0x800
    #expect(flatRunner.run(code: code, initial: codePage, data: data).strayWrites != nil)
    #expect(flatRunner.run(code: code, initial: inside, data: data).strayWrites == nil)
    let paged = EmulatedRunner(paging: true).run(code: code, initial: state, data: data)
    // Error code: write (W) from user mode (U), page not present.
    #expect(paged.end == .fault(vector: 14, errorCode: 6), "\(paged.end)")
    #expect(paged.state.rip == DiffLayout.codeBase)
    #expect(paged.strayWrites == nil)
  }

  /// The paging-on runner ends, faults and reports state as the flat runner and the host do.
  @Test func pagedRunnerMatchesTheHost() {
    let data = [UInt8](repeating: 0, count: DiffLayout.dataSize)
    var state = initialState()
    state.gpr[3] = DiffLayout.dataBase + 0x100
    state.gpr[0] = 0x1122_3344_5566_7788
    let runner = EmulatedRunner(paging: true)
    // mov [rbx], rax; push rax; inc rcx
    let code: [UInt8] = [0x48, 0x89, 0x03, 0x50, 0x48, 0xFF, 0xC1]
    let native = NativeRunner.run(code: code, initial: state, data: data)
    let paged = runner.run(code: code, initial: state, data: data)
    #expect(paged.end == .completed)
    let differences = DiffCompare.compare(native: native, emulated: paged, mask: ComparisonMask())
    #expect(differences.isEmpty, "\(differences)")
    // nop; ud2: #UD at the UD2, RSP back at the interrupted value.
    let faulting = runner.run(code: [0x90, 0x0F, 0x0B], initial: state, data: data)
    #expect(faulting.end == .fault(vector: 6, errorCode: nil))
    #expect(faulting.state.rip == DiffLayout.codeBase + 1 && faulting.state.gpr[4] == DiffLayout.stackTop)
    // hlt at CPL 3 inside the sequence: #GP(0), not the end marker.
    let privileged = runner.run(code: [0xF4, 0x90], initial: state, data: data)
    #expect(privileged.end == .fault(vector: 13, errorCode: 0))
  }
}
