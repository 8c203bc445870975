import Foundation
import Testing
import VMCore

@testable import VMM

/// A Multiboot guest whose result depends on every kind of CPU state: an LCG and a carry chain
/// in the general registers, a rotate/xor mix through the stack, SSE lanes (PADDD, PSHUFD,
/// PXOR), an x87 running sum, while the local APIC timer interrupts it every millisecond. After
/// `iterations` rounds it stores the registers at 0x7000, waits for three more timer ticks (the
/// timer must still run) and exits through isa-debug-exit with 0x31. Progress is at 0x6000.
let stateGuestIterations = 4_000_000
let stateGuest =
  interruptGuestStart(vector: 0x40) + """
            movl $0x1FF, 0xFEE000F0
            movl $0xB, 0xFEE003E0
            movl $0x20040, 0xFEE00320
            movl $1000000, 0xFEE00380
            movl %cr0, %eax
            andl $~4, %eax
            orl $2, %eax
            movl %eax, %cr0
            movl %cr4, %eax
            orl $0x600, %eax
            movl %eax, %cr4
            fninit
            fld1
            fldz
            pxor %xmm0, %xmm0
            movdqu seed, %xmm1
            movl $0x12345678, %eax
            movl $0x9ABCDEF0, %ebx
            xorl %ecx, %ecx
            movl $0x0F0F0F0F, %edx
            xorl %esi, %esi
            movl $0x13579BDF, %edi
            sti
    round:  imull $1664525, %eax, %eax
            addl $1013904223, %eax
            addl %eax, %ebx
            adcl $0, %esi
            roll $5, %edx
            xorl %ebx, %edx
            pushl %edx
            popl %ebp
            addl %ebp, %edi
            movd %eax, %xmm2
            paddd %xmm2, %xmm0
            pshufd $0x39, %xmm0, %xmm0
            pxor %xmm0, %xmm1
            fadd %st(1), %st
            incl %ecx
            movl %ecx, 0x6000
            cmpl $\(stateGuestIterations), %ecx
            jne round
            movl %eax, 0x7000
            movl %ebx, 0x7004
            movl %edx, 0x7008
            movl %esi, 0x700C
            movl %edi, 0x7010
            movl %ebp, 0x7014
            movdqu %xmm0, 0x7020
            movdqu %xmm1, 0x7030
            fistpl 0x7040
            movl 0x6100, %eax
            addl $3, %eax
    ticks:  hlt
            cmpl %eax, 0x6100
            jb ticks
            movw $0xF4, %dx
            movl $0x31, %eax
            outl %eax, %dx
            cli
            hlt
    handler:
            incl 0x6100
            movl $0, 0xFEE000B0
            iret
            .data
            .align 16
    seed:   .long 0xDEADBEEF, 0x01234567, 0x89ABCDEF, 0xCAFEF00D

    """ + interruptGuestTables

/// A Multiboot guest that moves its local APIC's page to 1 GiB, above its RAM (IA32_APIC_BASE),
/// and then reads the APIC version register there in a loop: the value at 0x6004, a pass count
/// at 0x6000.
let relocatedAPICGuest =
  multibootPrologue + """
    _start:
            movl $0x1B, %ecx
            rdmsr
            andl $0xFFF, %eax
            orl $0x40000000, %eax
            wrmsr
    again:  movl 0x40000030, %eax
            movl %eax, 0x6004
            incl 0x6000
            jmp again

    """

@Suite("Snapshot and restore on the software CPU", .serialized)
struct SnapshotTests {
  let scratch: ScratchDirectory
  let kernel: String

  init() throws {
    scratch = try ScratchDirectory()
    kernel = try assembleGuest(stateGuest, in: scratch)
  }

  func startController(memoryMiB: Int = 32, kernel: String? = nil) throws -> VMController {
    let controller = VMController(id: "snapshot-test")
    let kernel = kernel ?? self.kernel
    try controller.configure { spec throws(ControlError) in
      spec.kernelPath = kernel
      spec.memoryMiB = memoryMiB
      spec.accelerator = .soft
      spec.serial = .none
    }
    try controller.start()
    return controller
  }

  /// The guest's results (registers, SSE lanes, x87 sum) once it has exited.
  func results(_ controller: VMController) throws -> [UInt8] {
    let reason = controller.waitUntilStopped(timeoutNanoseconds: 120_000_000_000)
    #expect(reason == .debugExit(value: 0x31), "the guest stopped with \(String(describing: reason))")
    return try controller.machine!.parts.memory.readBytes(at: 0x7000, count: 0x44)
  }

  func progress(_ controller: VMController) throws -> UInt32 {
    try controller.machine!.parts.memory.read(UInt32.self, at: 0x6000)
  }

  /// Runs the guest until it has done `rounds` rounds, pauses it and snapshots it into
  /// `name`.state / `name`.mem; returns the paths and the progress at the snapshot.
  func snapshot(named name: String, after rounds: UInt32, memoryMiB: Int = 32, kernel: String? = nil) throws -> (
    state: String, memory: String, progress: UInt32
  ) {
    let controller = try startController(memoryMiB: memoryMiB, kernel: kernel)
    defer { try? controller.shutdown() }
    let deadline = Date().addingTimeInterval(60)
    while try progress(controller) < rounds {
      guard Date() < deadline else { throw ControlError(.failed, "the guest made no progress") }
      usleep(1000)
    }
    try controller.pause()
    let state = scratch.path("\(name).state")
    let memory = scratch.path("\(name).mem")
    let atSnapshot = try progress(controller)
    try controller.createSnapshot(statePath: state, memoryPath: memory)
    try controller.shutdown()
    return (state, memory, atSnapshot)
  }

  func restore(_ state: String, memory: String) throws -> VMController {
    let controller = VMController(id: "restored")
    try controller.configure { spec throws(ControlError) in spec.serial = .none }
    try controller.loadSnapshot(statePath: state, memoryPath: memory, resume: true)
    return controller
  }

  @Test func restoredGuestFinishesWithTheSameResultsAsAnUninterruptedRun() throws {
    let reference = try startController()
    let expected = try results(reference)
    #expect(expected.contains { $0 != 0 })

    let (state, memory, atSnapshot) = try snapshot(named: "mid", after: 200_000)
    #expect(atSnapshot < UInt32(stateGuestIterations), "the guest finished before the snapshot")

    // The memory file is sparse: far less is allocated than the 32 MiB of RAM.
    var info = stat()
    #expect(stat(memory, &info) == 0)
    #expect(info.st_size == 32 << 20)
    #expect(Int(info.st_blocks) * 512 < 8 << 20, "memory file allocates \(info.st_blocks * 512) bytes")

    // Restored twice, side by side, from the same files: both finish like the reference.
    let first = try restore(state, memory: memory)
    let second = try restore(state, memory: memory)
    defer {
      try? first.shutdown()
      try? second.shutdown()
    }
    #expect(try results(first) == expected)
    #expect(try results(second) == expected)
  }

  @Test func restoredGuestPausedStaysPausedUntilResumed() throws {
    let (state, memory, atSnapshot) = try snapshot(named: "paused", after: 100_000)
    let controller = VMController(id: "restored-paused")
    try controller.configure { spec throws(ControlError) in spec.serial = .none }
    try controller.loadSnapshot(statePath: state, memoryPath: memory, resume: false)
    defer { try? controller.shutdown() }
    #expect(controller.lifecycle == .paused)
    usleep(200_000)
    #expect(try progress(controller) == atSnapshot)
    try controller.resume()
    #expect(controller.waitUntilStopped(timeoutNanoseconds: 120_000_000_000) == .debugExit(value: 0x31))
  }

  /// A local APIC page moved by the guest (IA32_APIC_BASE) is still the APIC after a restore,
  /// which sets the MSR without the guest's WRMSR.
  @Test func relocatedAPICPageIsDecodedAfterARestore() throws {
    let kernel = try assembleGuest(relocatedAPICGuest, in: scratch)
    let (state, memory, _) = try snapshot(named: "relocated-apic", after: 1000, kernel: kernel)
    let restored = VMController(id: "relocated-apic-restored")
    try restored.configure { spec throws(ControlError) in spec.serial = .none }
    try restored.loadSnapshot(statePath: state, memoryPath: memory, resume: false)
    defer { try? restored.shutdown() }
    let guestMemory = restored.machine!.parts.memory
    // What the relocated page read before the snapshot: the version register, 0x1X in bits
    // 0-7 (an integrated APIC).
    let version = try guestMemory.read(UInt32.self, at: 0x6004)
    #expect(version & 0xF0 == 0x10, "the relocated page read \(version) before the snapshot")
    try guestMemory.write(UInt32(0), at: 0x6004)
    let atRestore = try progress(restored)
    try restored.resume()
    let deadline = Date().addingTimeInterval(60)
    while try progress(restored) &- atRestore < 1000 {
      guard Date() < deadline else { throw ControlError(.failed, "the restored guest made no progress") }
      usleep(1000)
    }
    // Without the APIC there, the read goes to the bus, where nothing answers at 1 GiB.
    #expect(try guestMemory.read(UInt32.self, at: 0x6004) == version)
  }

  /// Each bad state file is refused with one line, and no machine runs.
  @Test func damagedOrForeignStateFilesAreRefusedWithOneClearLine() throws {
    let (state, memory, _) = try snapshot(named: "good", after: 50_000)
    let good = try [UInt8](Data(contentsOf: URL(fileURLWithPath: state)))
    let payload = Array(good[MachineStateFile.headerSize...])

    func refusal(_ bytes: [UInt8], memory memoryPath: String = memory) throws -> String {
      let path = scratch.path("bad.state")
      try Data(bytes).write(to: URL(fileURLWithPath: path))
      let controller = VMController(id: "refused")
      try controller.configure { spec throws(ControlError) in spec.serial = .none }
      do {
        try controller.loadSnapshot(statePath: path, memoryPath: memoryPath, resume: true)
      } catch {
        #expect(controller.lifecycle == .notStarted)
        #expect(!error.description.contains("\n"))
        return error.description
      }
      try? controller.shutdown()
      Issue.record("a bad state file was accepted")
      return ""
    }

    #expect(try refusal(Array(good.prefix(good.count - 100))).contains("truncated"))
    #expect(try refusal(Array(good.prefix(20))).contains("truncated"))
    var flipped = good
    flipped[MachineStateFile.headerSize + payload.count / 2] ^= 0x10
    #expect(try refusal(flipped).contains("checksum"))
    var version = good
    version[8] = 99
    #expect(try refusal(version).contains("format version 99"))
    var magic = good
    magic[0] = UInt8(ascii: "X")
    #expect(try refusal(magic).contains("not a Hostvisor state file"))

    // Wrong machine: the description claims two vCPUs (re-checksummed, so only the content is
    // wrong): the vCPU state holds one.
    // The machine section: its tag, its length, then the CPU model's name (the software CPU's
    // default, `hostvisor`).
    let modelOffset = (4 + 7) + 4
    #expect(Array(payload[(modelOffset + 4)..<(modelOffset + 4 + 9)]) == Array("hostvisor".utf8))
    var unknownModel = payload
    unknownModel.replaceSubrange((modelOffset + 4)..<(modelOffset + 4 + 9), with: Array("pentium-4".utf8))
    #expect(try refusal(MachineStateFile.encode(payload: unknownModel)).contains("CPU model 'pentium-4'"))
    var twoCPUs = payload
    let cpuCountOffset = modelOffset + (4 + "hostvisor".utf8.count) + (4 + 4) + 8 + (4 + 16)
    #expect(twoCPUs[cpuCountOffset] == 1)
    twoCPUs[cpuCountOffset] = 2
    #expect(try refusal(MachineStateFile.encode(payload: twoCPUs)).contains("does not match this machine"))

    // Wrong machine: the memory file of a machine with more RAM.
    let (_, otherMemory, _) = try snapshot(named: "bigger", after: 1000, memoryMiB: 64)
    #expect(try refusal(good, memory: otherMemory).contains("RAM"))
  }
}
