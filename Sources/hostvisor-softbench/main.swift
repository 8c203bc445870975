// hostvisor-softbench: runs a flat 64-bit guest program on the software CPU in flat long mode
// and reports retired instructions, wall time and instructions per second.
//
//   hostvisor-softbench <flat-binary> [--load <address>] [--ram <MiB>] [--tier interp|jit|lockstep] [--threshold N]
//
// The binary is copied to `--load` (default 0x100000) and entered there at CPL 0 with
// RSP = 0x90000; the run ends at HLT. `--tier` selects the software CPU's execution tier
// (default interp), `--threshold` the executions of a block before it is translated. Used by
// scripts/bench-softcpu.sh.

import Glibc
import SoftCPU
import VMCore

struct UsageError: Error { var message: String }

func parseNumber(_ text: String) -> UInt64? {
  if text.hasPrefix("0x") { return UInt64(text.dropFirst(2), radix: 16) }
  return UInt64(text)
}

func now() -> Double {
  var spec = timespec()
  clock_gettime(CLOCK_MONOTONIC, &spec)
  return Double(spec.tv_sec) + Double(spec.tv_nsec) / 1e9
}

func readFile(_ path: String) -> [UInt8]? {
  guard let file = fopen(path, "rb") else { return nil }
  defer { fclose(file) }
  var bytes: [UInt8] = []
  var chunk = [UInt8](repeating: 0, count: 65536)
  while true {
    let count = fread(&chunk, 1, chunk.count, file)
    if count <= 0 { break }
    bytes += chunk[0..<count]
  }
  return bytes
}

/// `value` with `digits` decimals (no Foundation).
func fixed(_ value: Double, _ digits: Int) -> String {
  var scale = 1.0
  for _ in 0..<digits { scale *= 10 }
  let scaled = Int((value * scale).rounded())
  let whole = scaled / Int(scale)
  var fraction = String(scaled % Int(scale))
  while fraction.count < digits { fraction = "0" + fraction }
  return digits == 0 ? String(whole) : "\(whole).\(fraction)"
}

func fail(_ message: String) -> Never {
  let line = "hostvisor-softbench: \(message)\n"
  _ = line.withCString { write(2, $0, strlen($0)) }
  exit(2)
}

var arguments = Array(CommandLine.arguments.dropFirst())
var loadAddress: UInt64 = 0x10_0000
var ramMiB: UInt64 = 64
var path: String?
var tier = SoftCPUTier.interpreter
var threshold = SoftCPUTier.defaultThreshold
let usage =
  "usage: hostvisor-softbench <flat-binary> [--load addr] [--ram MiB] [--tier interp|jit|lockstep] [--threshold N]"
while !arguments.isEmpty {
  let argument = arguments.removeFirst()
  switch argument {
  case "--load":
    guard let value = arguments.first.flatMap(parseNumber) else { fail("--load needs an address") }
    loadAddress = value
    arguments.removeFirst()
  case "--ram":
    guard let value = arguments.first.flatMap(parseNumber), value >= 4, value <= 4096 else {
      fail("--ram needs a size in MiB (4-4096)")
    }
    ramMiB = value
    arguments.removeFirst()
  case "--tier":
    guard let value = arguments.first.flatMap(SoftCPUTier.init(rawValue:)) else {
      fail("--tier needs interp, jit or lockstep")
    }
    tier = value
    arguments.removeFirst()
  case "--threshold":
    guard let value = arguments.first.flatMap(parseNumber), value <= 1_000_000 else {
      fail("--threshold needs a count (0-1000000)")
    }
    threshold = UInt32(value)
    arguments.removeFirst()
  default:
    if argument.hasPrefix("-") || path != nil { fail(usage) }
    path = argument
  }
}
guard let path else { fail(usage) }
guard let image = readFile(path) else { fail("cannot read \(path)") }

let memory: GuestMemory
do {
  memory = try GuestMemory(size: ramMiB << 20)
} catch {
  fail("\(error)")
}
guard let target = try? memory.slice(at: loadAddress, length: UInt64(image.count)) else {
  fail("the image (\(image.count) bytes at 0x\(String(loadAddress, radix: 16))) does not fit in \(ramMiB) MiB")
}
image.withUnsafeBytes { target.copyMemory(from: $0) }

let cpu = CPU(memory: memory, bus: IOBus())
cpu.enterFlatLongMode(cpl: 0)
cpu.setExecutionTier(tier, threshold: threshold)
cpu.rip = loadAddress
cpu.gpr[4] = 0x9_0000
let start = now()
var outcome = "halted"
runLoop: while true {
  switch cpu.run(instructionLimit: 50_000_000) {
  case .halted: break runLoop
  case .instructionLimit: continue
  case .stopRequested:
    if let report = cpu.lockstepFailure { fail(report) }
    continue
  case .fault(let fault):
    outcome = "fault vector \(fault.vector) at rip 0x\(String(cpu.rip, radix: 16))"
    break runLoop
  }
}
let seconds = now() - start
let instructions = cpu.retiredInstructions
let mips = Double(instructions) / seconds / 1e6
print(
  "instructions=\(instructions) seconds=\(fixed(seconds, 3)) mips=\(fixed(mips, 1)) "
    + "result=\(String(cpu.gpr[0], radix: 16)) outcome=\(outcome) translated-blocks=\(cpu.translatedBlockCount)")
exit(outcome == "halted" ? 0 : 1)
