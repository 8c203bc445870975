import Foundation
import KVMBackend
import Synchronization
import VMCore

/// A small machine for one KVM test: guest RAM, the test devices on their conventional
/// ports (see Tests/GuestPrograms/kvm/README.md) and a KVMAccelerator.
final class TestMachine: Sendable {
  static let mmioBase: UInt64 = 0xD000_0000

  let parts: MachineParts
  let serial = ByteSink()
  let report = WriteRecorder()
  let recorder = WriteRecorder()
  let valueSource = ValueSource(value: 0xA1B2_C3D4)
  let counter = Counter()
  let readyFlag = ReadyFlag()
  let mmio = TransformingMMIODevice()
  let accelerator: KVMAccelerator

  init(memorySize: UInt64 = 4 << 20, cpuCount: Int = 1) throws {
    let control = MachineControl()
    parts = MachineParts(
      memory: try GuestMemory(size: memorySize), bus: IOBus(), control: control, interrupts: InterruptRouter())
    try parts.bus.registerPorts(0x3F8, count: 1, device: serial)
    try parts.bus.registerPorts(0xF4, count: 1, device: DebugExitDevice(control: control))
    try parts.bus.registerPorts(0x510, count: 1, device: valueSource)
    try parts.bus.registerPorts(0x514, count: 1, device: report)
    try parts.bus.registerPorts(0x516, count: 1, device: recorder)
    try parts.bus.registerPorts(0x518, count: 1, device: counter)
    try parts.bus.registerPorts(0x520, count: 1, device: readyFlag)
    try parts.bus.registerMMIO(Self.mmioBase, length: 0x1000, device: mmio)
    accelerator = try KVMAccelerator(parts: parts, cpuCount: cpuCount)
  }

  var memory: GuestMemory { parts.memory }
  var control: MachineControl { parts.control }

  /// Assembles guest program `name` linked at `address` and copies it there.
  func load(_ name: String, at address: UInt64) throws {
    try memory.writeBytes(try GuestAssembler.assemble(name, linkAddress: address), at: address)
  }

  /// Runs the machine on a separate thread; gives up after `timeout` seconds (asking the
  /// machine to stop) and returns nil, so a broken stop path fails the test instead of hanging it.
  func run(_ state: X86CPUState, timeout: TimeInterval = 30) throws -> MachineStopReason? {
    let outcome = Outcome()
    let accelerator = self.accelerator
    let thread = Thread {
      outcome.finish(Result { () throws(KVMError) -> MachineStopReason in try accelerator.run(bootState: state) })
    }
    thread.start()
    guard outcome.done.wait(timeout: .now() + timeout) == .success else {
      control.requestStop(.failure("test timed out"))
      _ = outcome.done.wait(timeout: .now() + 5)
      return nil
    }
    return try outcome.result!.get()
  }

  private final class Outcome: Sendable {
    let done = DispatchSemaphore(value: 0)
    private let value = Mutex<Result<MachineStopReason, KVMError>?>(nil)
    var result: Result<MachineStopReason, KVMError>? { value.withLock { $0 } }
    func finish(_ result: Result<MachineStopReason, KVMError>) {
      value.withLock { $0 = result }
      done.signal()
    }
  }
}

/// Initial CPU states the tests start guests in.
enum BootStates {
  /// Real mode at `segment:0000`.
  static func realMode(segment: UInt16) -> X86CPUState {
    var state = X86CPUState()
    state.cs = .realMode(selector: segment, code: true)
    state.ds = .realMode(selector: segment)
    state.es = .realMode(selector: segment)
    state.ss = .realMode(selector: 0)
    state.rip = 0
    state.rsp = 0x7000
    return state
  }

  /// Flat 32-bit protected mode, ring 0, paging off; CS=0x08, data segments 0x10.
  static func protectedMode32(entry: UInt64, stack: UInt64 = 0x7000) -> X86CPUState {
    var state = X86CPUState()
    state.cr0 = X86.cr0PE | X86.cr0ET | X86.cr0NE
    state.cs = .flatCode(selector: 0x08, long: false)
    for keyPath: WritableKeyPath<X86CPUState, SegmentRegister> in [\.ds, \.es, \.fs, \.gs, \.ss] {
      state[keyPath: keyPath] = .flatData(selector: 0x10)
    }
    state.rip = entry
    state.rsp = stack
    return state
  }

  static let gdtAddress: UInt64 = 0x500
  static let pageTableAddress: UInt64 = 0x10000

  /// The state a Linux 64-bit boot protocol loader hands over: long mode, CS=0x10 (64-bit),
  /// DS=ES=SS=0x18, a GDT holding both, paging with an identity map of the low 4 GiB
  /// (2 MiB pages), interrupts off, RSI = `bootParams`. Writes the GDT and page tables.
  static func linux64(entry: UInt64, bootParams: UInt64, stack: UInt64, memory: GuestMemory) throws -> X86CPUState {
    // GDT: null, null, 0x10 = 64-bit code, 0x18 = data.
    let gdt: [UInt64] = [0, 0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF]
    for (slot, descriptor) in gdt.enumerated() {
      try memory.write(descriptor, at: gdtAddress + UInt64(slot * 8))
    }
    // PML4 -> PDPT -> four page directories of 2 MiB pages.
    let pml4 = pageTableAddress
    let pdpt = pml4 + 0x1000
    let directories = pml4 + 0x2000
    try memory.fill(0, at: pml4, length: 0x6000)
    try memory.write(pdpt | 0x3, at: pml4)
    for gigabyte in 0..<UInt64(4) {
      try memory.write((directories + gigabyte * 0x1000) | 0x3, at: pdpt + gigabyte * 8)
      for entry in 0..<UInt64(512) {
        let physical = (gigabyte << 30) | (entry << 21)
        try memory.write(physical | 0x83, at: directories + gigabyte * 0x1000 + entry * 8)
      }
    }

    var state = X86CPUState()
    state.cr0 = X86.cr0PE | X86.cr0ET | X86.cr0NE | X86.cr0WP | X86.cr0PG
    state.cr4 = X86.cr4PAE
    state.cr3 = pml4
    state.efer = X86.eferLME | X86.eferLMA
    state.cs = .flatCode(selector: 0x10, long: true)
    for keyPath: WritableKeyPath<X86CPUState, SegmentRegister> in [\.ds, \.es, \.fs, \.gs, \.ss] {
      state[keyPath: keyPath] = .flatData(selector: 0x18)
    }
    state.gdt = DescriptorTableRegister(base: gdtAddress, limit: UInt16(gdt.count * 8 - 1))
    state.idt = DescriptorTableRegister(base: 0, limit: 0)
    state.rip = entry
    state.rsi = bootParams
    state.rsp = stack
    return state
  }
}

/// Whether this host can run the KVM tests at all.
let kvmAvailable = FileManager.default.fileExists(atPath: "/dev/kvm")
