import Foundation
import SoftCPU
import TestSupport
import Testing
import VMCore

/// Assembles Intel-syntax x86-64 source with GNU as and returns the flat .text bytes.
enum CoreAssembler {
  struct Failure: Error, CustomStringConvertible {
    var description: String
  }

  static func assemble(_ source: String, origin: UInt64 = 0) throws -> [UInt8] {
    let directory = FileManager.default.temporaryDirectory
      .appendingPathComponent("hostvisor-core-as-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: directory) }
    let sourceURL = directory.appendingPathComponent("program.s")
    let objectURL = directory.appendingPathComponent("program.o")
    let binaryURL = directory.appendingPathComponent("program.bin")
    let text = ".intel_syntax noprefix\n.code64\n.text\n.org 0\n" + source + "\n"
    try text.write(to: sourceURL, atomically: true, encoding: .utf8)
    try run("/usr/bin/as", ["--64", "-o", objectURL.path, sourceURL.path])
    try run("/usr/bin/objcopy", ["-O", "binary", "-j", ".text", objectURL.path, binaryURL.path])
    return [UInt8](try Data(contentsOf: binaryURL))
  }

  /// Assembles the GNU as file at `sourcePath` (`bits` 64 or 32; `assemblerArguments` such as
  /// `--defsym`), links it at `address`, which is also its entry, and returns the flat image.
  static func linkedImage(
    sourcePath: String, bits: Int, at address: UInt64, assemblerArguments: [String] = []
  ) throws -> [UInt8] {
    let work = FileManager.default.temporaryDirectory.appendingPathComponent("hostvisor-link-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: work) }
    let object = work.appendingPathComponent("image.o").path
    let elf = work.appendingPathComponent("image.elf").path
    let binary = work.appendingPathComponent("image.bin").path
    let hexAddress = "0x" + String(address, radix: 16)
    try run("/usr/bin/as", ["--\(bits)"] + assemblerArguments + ["-o", object, sourcePath])
    try run(
      "/usr/bin/ld",
      ["-m", bits == 32 ? "elf_i386" : "elf_x86_64", "-Ttext=\(hexAddress)", "-e", hexAddress, "-o", elf, object])
    try run("/usr/bin/objcopy", ["-O", "binary", elf, binary])
    return [UInt8](try Data(contentsOf: URL(fileURLWithPath: binary)))
  }

  private static func run(_ tool: String, _ arguments: [String]) throws {
    try HostCommand.check(tool, arguments)
  }
}

/// A small flat-mode machine for core tests: 16 MiB of RAM, code at 0x10000, stack below 0x80000.
final class CoreMachine {
  static let codeBase: UInt64 = 0x10000
  static let dataBase: UInt64 = 0x100000
  static let stackTop: UInt64 = 0x80000

  let memory: GuestMemory
  let bus: IOBus
  let cpu: CPU

  init(cpl: UInt8 = 3, ramSize: UInt64 = 16 << 20) throws {
    memory = try GuestMemory(size: ramSize)
    bus = IOBus()
    cpu = CPU(memory: memory, bus: bus)
    cpu.enterFlatLongMode(cpl: cpl)
    cpu.rip = Self.codeBase
    cpu.gpr[4] = Self.stackTop
  }

  /// Loads `bytes` at the code base and points RIP at them.
  func load(_ bytes: [UInt8], at address: UInt64 = codeBase) throws {
    try memory.writeBytes(bytes, at: address)
    cpu.rip = address
  }

  /// Assembles and loads `source`.
  func load(assembly source: String) throws {
    try load(try CoreAssembler.assemble(source))
  }

  /// Runs until HLT, a fault, or the limit.
  @discardableResult
  func run(limit: Int = 1_000_000) -> StopCause {
    cpu.run(instructionLimit: limit)
  }

  subscript(register: Int) -> UInt64 {
    get { cpu.gpr[register] }
    set { cpu.gpr[register] = newValue }
  }
}

/// What a `CoreMachine` program left: the comparison the translator suites make between tiers.
struct CoreRunOutcome: Equatable {
  var registers: [UInt64]
  var flags: UInt64
  var instructions: UInt64
  var stop: String
  /// FNV-1a over the instruction count after each slice: every slice must end where the
  /// interpreter's does (a chain must not run past its budget).
  var sliceEnds: UInt64
}

extension CoreMachine {
  /// Assembles `source` and runs it at CPL 0 from the start to HLT, a fault or `total`
  /// instructions, in slices of `slice` instructions, under `tier` (translating blocks after
  /// `threshold` runs); `prepare` sets the machine up first. Returns the outcome and the CPU.
  static func run(
    _ source: String, tier: SoftCPUTier, threshold: UInt32 = 0, slice: Int = 1_000_000, total: Int = 1_000_000,
    prepare: (CoreMachine) -> Void = { _ in }
  ) throws -> (CoreRunOutcome, CPU) {
    let machine = try CoreMachine(cpl: 0)
    machine.cpu.setExecutionTier(tier, threshold: threshold)
    try machine.load(assembly: source)
    prepare(machine)
    var stop = StopCause.instructionLimit
    var left = total
    var sliceEnds: UInt64 = 0xCBF2_9CE4_8422_2325
    while left > 0 && stop == .instructionLimit {
      stop = machine.run(limit: min(slice, left))
      left -= slice
      sliceEnds = (sliceEnds ^ machine.cpu.retiredInstructions) &* 0x100_0000_01B3
    }
    let outcome = CoreRunOutcome(
      registers: (0..<16).map { machine.cpu.gpr[$0] }, flags: machine.cpu.rflags,
      instructions: machine.cpu.retiredInstructions, stop: "\(stop)", sliceEnds: sliceEnds)
    return (outcome, machine.cpu)
  }
}

/// Register numbers.
enum R {
  static let rax = 0, rcx = 1, rdx = 2, rbx = 3, rsp = 4, rbp = 5, rsi = 6, rdi = 7
  static let r8 = 8, r9 = 9, r10 = 10, r11 = 11, r12 = 12, r13 = 13, r14 = 14, r15 = 15
}
