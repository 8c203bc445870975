import Devices
import Foundation
import Glibc
import SoftCPU
import Synchronization
import Testing
import VMCore

@testable import Virtio

/// Gives fixed bytes instead of random ones (cycling through `pattern` across calls), so a
/// virtio-rng request can write known code.
final class FixedEntropySource: EntropySource {
  let pattern: [UInt8]
  private let position = Mutex(0)
  init(_ pattern: [UInt8]) { self.pattern = pattern }
  func fill(_ buffer: UnsafeMutableRawBufferPointer) -> Bool {
    position.withLock { position in
      for index in 0..<buffer.count {
        buffer[index] = pattern[position % pattern.count]
        position += 1
      }
    }
    return true
  }
}

/// Device DMA into guest RAM must drop the software CPU's decoded code for the written pages:
/// code runs, a device overwrites it, and the next execution runs the new bytes.
@Suite struct DMACodeInvalidationTests {
  /// Where the flat-mode tests put their code (outside the test driver's rings and buffers).
  static let codeAddress: UInt64 = 0x20_0000

  /// `mov eax, value; hlt`.
  static func program(_ value: UInt32) -> [UInt8] {
    [0xB8] + withUnsafeBytes(of: value.littleEndian) { Array($0) } + [0xF4]
  }

  /// A test machine with a software accelerator (which observes the machine's RAM writes) and
  /// its vCPU 0 in flat 64-bit mode.
  static func softMachine() throws -> (TestMachine, SoftAccelerator, CPU) {
    let machine = try TestMachine()
    let parts = MachineParts(
      memory: machine.memory, bus: machine.bus, control: MachineControl(), interrupts: InterruptRouter())
    let accelerator = try SoftAccelerator(parts: parts)
    let cpu = accelerator.processors[0]
    cpu.enterFlatLongMode(cpl: 0)
    return (machine, accelerator, cpu)
  }

  /// Runs from `codeAddress` until HLT; returns EAX (nil on anything but a halt).
  static func runToHalt(_ cpu: CPU) -> UInt64? {
    cpu.rip = codeAddress
    // Posted device writes are applied at a block boundary and end `run` with `.stopRequested`.
    for _ in 0..<4 {
      switch cpu.run(instructionLimit: 100) {
      case .halted: return cpu.gpr[0]
      case .stopRequested: continue
      default: return nil
      }
    }
    return nil
  }

  @Test func unreportedWritesRunStaleCodeAndReportedOnesDoNot() throws {
    let (machine, accelerator, cpu) = try Self.softMachine()
    try machine.memory.writeBytes(Self.program(1), at: Self.codeAddress)
    #expect(Self.runToHalt(cpu) == 1)
    // A write behind the CPU's back (raw host pointer, not reported): the decoded block stays.
    let raw = try machine.memory.slice(at: Self.codeAddress, length: 6)
    Self.program(2).withUnsafeBytes { raw.copyMemory(from: $0) }
    #expect(Self.runToHalt(cpu) == 1)
    // Reported through GuestMemory's hook: the CPU re-decodes.
    machine.memory.noteWrite(at: Self.codeAddress + 1, length: 1)
    #expect(Self.runToHalt(cpu) == 2)
    // The typed writers report by themselves.
    try machine.memory.writeBytes(Self.program(3), at: Self.codeAddress)
    #expect(Self.runToHalt(cpu) == 3)
    withExtendedLifetime(accelerator) {}
  }

  @Test func virtioBlockReadReplacesDecodedCode() throws {
    let (machine, accelerator, cpu) = try Self.softMachine()
    let file = TemporaryFile(size: 4096)
    let sector = Self.program(0xB10C) + [UInt8](repeating: 0xF4, count: 506)
    let fd = open(file.path, O_WRONLY)
    _ = sector.withUnsafeBytes { pwrite(fd, $0.baseAddress, 512, 512) }
    close(fd)
    let backend = try RawFileBlockBackend(path: file.path, readOnly: true)
    let driver = try VirtioDriver(machine: machine, model: VirtioBlock(backend: backend))
    driver.start(queueCount: 1)
    defer { driver.device.model.shutdown() }
    try machine.memory.writeBytes(Self.program(1), at: Self.codeAddress)
    #expect(Self.runToHalt(cpu) == 1)
    // The guest reads sector 1 straight over the code it just ran.
    let requests = BlockRequests(queue: driver.queues[0])
    requests.writeHeader(type: VirtioBlock.RequestType.read, sector: 1)
    driver.queues[0].submit([
      (BlockRequests.header, 16, false), (Self.codeAddress, 512, true), (BlockRequests.status, 1, true),
    ])
    #expect(driver.queues[0].waitForUsed(1))
    #expect(try machine.memory.read(UInt8.self, at: BlockRequests.status) == VirtioBlock.Status.ok)
    #expect(Self.runToHalt(cpu) == 0xB10C)
    withExtendedLifetime(accelerator) {}
  }

  @Test func virtioConsoleInputReplacesDecodedCode() throws {
    let (machine, accelerator, cpu) = try Self.softMachine()
    let console = VirtioConsole(backend: CapturingSerialBackend())
    let driver = try VirtioDriver(machine: machine, model: console)
    driver.start(queueCount: 2)
    defer { console.shutdown() }
    try machine.memory.writeBytes(Self.program(1), at: Self.codeAddress)
    #expect(Self.runToHalt(cpu) == 1)
    driver.queues[0].submit([(Self.codeAddress, 6, true)])
    console.receive(Self.program(0xC0DE))
    #expect(driver.queues[0].waitForUsed(1))
    #expect(Self.runToHalt(cpu) == 0xC0DE)
    withExtendedLifetime(accelerator) {}
  }

  @Test func virtioEntropyFillReplacesDecodedCode() throws {
    let (machine, accelerator, cpu) = try Self.softMachine()
    let entropy = VirtioEntropy(source: FixedEntropySource(Self.program(0xE27)))
    let driver = try VirtioDriver(machine: machine, model: entropy)
    driver.start(queueCount: 1)
    defer { entropy.shutdown() }
    try machine.memory.writeBytes(Self.program(1), at: Self.codeAddress)
    #expect(Self.runToHalt(cpu) == 1)
    // Two descriptors, so the write crosses a span boundary inside the instruction.
    driver.queues[0].submit([(Self.codeAddress, 3, true), (Self.codeAddress + 3, 3, true)])
    #expect(driver.queues[0].waitForUsed(1))
    #expect(Self.runToHalt(cpu) == 0xE27)
    withExtendedLifetime(accelerator) {}
  }

  /// The whole path with the vCPU running on its own thread: a real-mode guest marks that it
  /// started and spins in `jmp $`; a virtio-blk read replaces that page with HLT, and the
  /// bootstrap processor halting with interrupts off powers the machine off. With stale decoded
  /// code the guest spins until the watchdog stops it.
  @Test func runningGuestSeesCodeReadFromDisk() throws {
    let machine = try TestMachine()
    let control = MachineControl()
    let parts = MachineParts(memory: machine.memory, bus: machine.bus, control: control, interrupts: InterruptRouter())
    let accelerator = try SoftAccelerator(parts: parts)
    let file = TemporaryFile(size: 4096, fill: 0xF4)
    let backend = try RawFileBlockBackend(path: file.path, readOnly: true)
    let driver = try VirtioDriver(machine: machine, model: VirtioBlock(backend: backend))
    driver.start(queueCount: 1)
    defer { driver.device.model.shutdown() }

    let codeAddress: UInt64 = 0x1000
    let startedFlag: UInt64 = 0x2000
    // mov byte [0x2000], 1; jmp $
    try machine.memory.writeBytes([0xC6, 0x06, 0x00, 0x20, 0x01, 0xEB, 0xFE], at: codeAddress)
    var bootState = X86CPUState()
    bootState.rip = codeAddress
    let state = bootState

    final class Outcome: Sendable {
      let reason = Mutex<MachineStopReason?>(nil)
    }
    let outcome = Outcome()
    Thread.detachNewThread {
      let reason: MachineStopReason
      do { reason = try accelerator.run(bootState: state) } catch { reason = .failure("\(error)") }
      outcome.reason.withLock { $0 = reason }
    }
    #expect(waitUntil { (try? machine.memory.read(UInt8.self, at: startedFlag)) == 1 })
    usleep(20_000)  // let it spin in the decoded, chained `jmp $` block

    let requests = BlockRequests(queue: driver.queues[0])
    requests.writeHeader(type: VirtioBlock.RequestType.read, sector: 0)
    driver.queues[0].submit([
      (BlockRequests.header, 16, false), (codeAddress, 512, true), (BlockRequests.status, 1, true),
    ])
    #expect(driver.queues[0].waitForUsed(1))
    let stopped = waitUntil(10) { outcome.reason.withLock { $0 != nil } }
    if !stopped { control.requestStop(.stopRequested) }
    #expect(waitUntil(10) { outcome.reason.withLock { $0 != nil } })
    #expect(outcome.reason.withLock { $0 } == .powerOff)
  }
}
