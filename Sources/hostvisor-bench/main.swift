// hostvisor-bench: micro-benchmarks that need a Swift host. Run by scripts/bench-*.sh.
//
//   hostvisor-bench kvm-exit GUEST.bin ITERATIONS
//     Runs the port-I/O exit loop guest (scripts/bench/kvm_exit_guest.S) through
//     KVMAccelerator and prints "swift <exits> <wall ns> <wall ns/exit> <process CPU ns/exit>".
import Foundation
import KVMBackend
import Synchronization
import VMCore

/// Counts the bytes the guest writes to its loop port.
final class CountingPort: PortIODevice {
  let writes = Atomic<UInt64>(0)
  func portRead(port: UInt16, size: Int) -> UInt32 { 0 }
  func portWrite(port: UInt16, size: Int, value: UInt32) { writes.wrappingAdd(1, ordering: .relaxed) }
}

/// Stops the machine with the value written, like isa-debug-exit.
final class DebugExitPort: PortIODevice {
  let control: MachineControl
  init(control: MachineControl) { self.control = control }
  func portRead(port: UInt16, size: Int) -> UInt32 { 0 }
  func portWrite(port: UInt16, size: Int, value: UInt32) { control.requestStop(.debugExit(value: value)) }
}

/// CPU time used by all threads of this process so far.
func processCPUNanoseconds() -> UInt64 {
  var time = timespec()
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &time)
  return UInt64(time.tv_sec) * 1_000_000_000 + UInt64(time.tv_nsec)
}

func fail(_ message: String) -> Never {
  FileHandle.standardError.write(Data("hostvisor-bench: \(message)\n".utf8))
  exit(1)
}

/// Flat 32-bit protected mode at CPL 3 with IOPL 3: the guest loop runs natively and its
/// OUT instructions exit to the host. The same state as scripts/bench/kvm_exit.c.
func userModeState(entry: UInt64, iterations: UInt64) -> X86CPUState {
  var state = X86CPUState()
  state.cr0 |= X86.cr0PE
  var code = SegmentRegister.flatCode(selector: 0x1B, long: false)
  code.dpl = 3
  var data = SegmentRegister.flatData(selector: 0x23)
  data.dpl = 3
  state.cs = code
  state.ds = data
  state.es = data
  state.fs = data
  state.gs = data
  state.ss = data
  state.rip = entry
  state.rsp = 0x7000
  state.rcx = iterations
  state.rflags = 0x2 | (3 << 12)
  return state
}

func kvmExitBenchmark(guestPath: String, iterations: UInt64) {
  guard let guest = FileManager.default.contents(atPath: guestPath), !guest.isEmpty else {
    fail("cannot read guest binary \(guestPath)")
  }
  do {
    let control = MachineControl()
    let parts = MachineParts(
      memory: try GuestMemory(size: 2 << 20), bus: IOBus(), control: control, interrupts: InterruptRouter())
    let loopPort = CountingPort()
    try parts.bus.registerPorts(0x80, count: 1, device: loopPort)
    try parts.bus.registerPorts(0xF4, count: 1, device: DebugExitPort(control: control))
    try parts.memory.writeBytes(guest, at: 0x8000)
    let accelerator = try KVMAccelerator(parts: parts, cpuCount: 1)

    let start = ContinuousClock.now
    let cpuStart = processCPUNanoseconds()
    let reason = try accelerator.run(bootState: userModeState(entry: 0x8000, iterations: iterations))
    let cpu = processCPUNanoseconds() - cpuStart
    let elapsed = ContinuousClock.now - start

    guard reason == .debugExit(value: 0) else { fail("guest stopped unexpectedly: \(reason)") }
    let writes = loopPort.writes.load(ordering: .relaxed)
    guard writes == iterations else { fail("saw \(writes) port writes, expected \(iterations)") }
    let exits = accelerator.exitStatistics.portIO
    let nanoseconds = elapsed.components.seconds * 1_000_000_000 + elapsed.components.attoseconds / 1_000_000_000
    let perExit = Double(nanoseconds) / Double(exits)
    let cpuPerExit = Double(cpu) / Double(exits)
    print("swift \(exits) \(nanoseconds) \(String(format: "%.1f %.1f", perExit, cpuPerExit))")
  } catch {
    fail("\(error)")
  }
}

let arguments = CommandLine.arguments
switch arguments.dropFirst().first {
case "kvm-exit":
  guard arguments.count == 4, let iterations = UInt64(arguments[3]), iterations > 0 else {
    fail("usage: hostvisor-bench kvm-exit GUEST.bin ITERATIONS")
  }
  kvmExitBenchmark(guestPath: arguments[2], iterations: iterations)
default:
  fail("usage: hostvisor-bench kvm-exit GUEST.bin ITERATIONS")
}
