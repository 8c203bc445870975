import Foundation
import Testing
import VMCore

@testable import SoftCPU

/// A flush of the translations normally reuses the code buffer's addresses; with a perf map
/// written (`Translator.keepsCodeAddressesUnique`, on with `HOSTVISOR_PERF_MAP`) it moves to a
/// fresh buffer, so that no address in the map names two different blocks over a run (perf
/// names a sample by the map's entries, which a reused address makes ambiguous).
@Suite struct CodeBufferTests {
  @Test(arguments: [false, true])
  func aFlushReusesCodeAddressesUnlessAPerfMapNeedsThemUnique(unique: Bool) throws {
    let machine = try CoreMachine(cpl: 0)
    let (code, sum) = IdleCodeTrimTests.program()
    try machine.load(code)
    let cpu = machine.cpu
    cpu.setExecutionTier(.translator, threshold: 0)
    let translator = try #require(cpu.translator)
    translator.keepsCodeAddressesUnique = unique
    #expect(machine.run() == .halted)
    #expect(machine[R.rax] == sum)
    let first = translator.buffer
    #expect(first.used > 0)

    cpu.flushDecodedBlocks()
    machine[R.rax] = 0
    cpu.rip = CoreMachine.codeBase
    cpu.system.halted = false
    #expect(machine.run() == .halted)
    #expect(machine[R.rax] == sum, "the code runs again from its new translations")
    #expect(translator.buffer.used > 0)
    if unique {
      #expect(translator.buffer !== first)
      #expect(translator.buffer.base != first.base)
      #expect(translator.retiredBuffers.count == 1 && translator.retiredBuffers[0] === first)
      #expect(IdleCodeTrimTests.residentPages(first.base, byteCount: first.capacity) == 0, "its pages given back")
    } else {
      #expect(translator.buffer === first)
      #expect(translator.retiredBuffers.isEmpty)
    }
  }
}
