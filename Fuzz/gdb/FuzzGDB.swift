import FuzzSupport
import Glibc
import VMCore

@testable import GDBStub
@testable import SoftCPU

/// The gdb remote-protocol stub: the packet reader (framing, checksums, escapes, run-length
/// encoding, Ctrl-C, acknowledgements) and the session's handling of every packet (registers,
/// memory through the guest's page tables or guest-physical, breakpoints and watchpoints,
/// threads, queries, monitor commands, continue and step) against a software-CPU machine of
/// two vCPUs and 2 MiB of RAM fenced by `PROT_NONE` guards, so an address or length the client
/// picks that reached outside guest RAM would kill the target.
///
/// Input: a mode byte (bit 0: the stream is raw bytes, or packets the target frames with
/// valid checksums; bits 1-2: paging off, 32-bit, PAE or 4-level paging; bits 3-5: how many
/// page-table entries the input overwrites), the overwritten entries (a slot in the four
/// page-table pages and a 64-bit value each), then the client's stream: raw (even mode) or a
/// list of packets (odd mode: a length byte and the payload each). The stream is fed to a
/// `GDBPacketReader` and its events handled as the server's client loop handles them; since no
/// vCPU thread runs, a packet that resumes the machine is answered by a stop at once (a step,
/// or a breakpoint on the first vCPU), as if the vCPU had reported it. Guest RAM, the page
/// tables and both vCPUs' registers are reset for each input; the stream ending detaches.
@main
enum FuzzGDB {
  static let ramSize: UInt64 = 2 << 20
  /// The four page-table pages: the top-level table first.
  static let tableBase: UInt64 = 0x1000

  /// The machine, made once: its RAM, its guards and the stub's view of it.
  final class Rig {
    let memory: GuestMemory
    let guards: GuestMemoryGuards
    let accelerator: SoftAccelerator
    let target: SoftGDBTarget

    init() {
      memory = try! GuestMemory(size: FuzzGDB.ramSize)
      guards = GuestMemoryGuards(around: memory)
      let parts = MachineParts(memory: memory, bus: IOBus(), control: MachineControl(), interrupts: InterruptRouter())
      accelerator = try! SoftAccelerator(parts: parts, cpuCount: 2)
      // The stub waits for the vCPU threads' boot state before it answers; none run here.
      accelerator.debugHook.noteVCPUStarted()
      target = SoftGDBTarget(accelerator: accelerator, memory: memory)
    }
  }

  nonisolated(unsafe) static var rig: Rig?

  static func main() {
    FuzzDriver.run(name: "gdb", seeds: seeds) { input in runOne(&input) }
  }

  enum Paging: Int { case off, bits32, pae, level4 }

  /// Page tables mapping the first 2 MiB at linear 0 (and, for 4-level paging, again high in
  /// the address space), and the vCPU state that uses them.
  static func prepare(_ memory: GuestMemory, paging: Paging) -> X86CPUState {
    var state = X86CPUState()
    state.cs = .flatCode(selector: 0x8, long: paging == .level4)
    for keyPath in [\X86CPUState.ds, \.es, \.ss, \.fs, \.gs] { state[keyPath: keyPath] = .flatData(selector: 0x10) }
    state.rip = 0x10_0000
    state.rsp = 0x8_0000
    state.cr3 = tableBase
    switch paging {
    case .off:
      state.cr0 = 0x11
    case .bits32:
      state.cr0 = 0x8000_0011
      state.cr4 = 0x10  // PSE: a 4 MiB page
      try! memory.write(UInt32(0x83), at: tableBase)
      try! memory.write(UInt32(tableBase + 0x1000) | 3, at: tableBase + 4)
      try! memory.write(UInt32(0x5000) | 3, at: tableBase + 0x1000)
    case .pae:
      state.cr0 = 0x8000_0011
      state.cr4 = 0x20
      try! memory.write(UInt64(tableBase + 0x1000) | 1, at: tableBase)
      try! memory.write(UInt64(0x83), at: tableBase + 0x1000)
      try! memory.write(UInt64(tableBase + 0x2000) | 3, at: tableBase + 0x1008)
      try! memory.write(UInt64(0x5000) | 3, at: tableBase + 0x2000)
    case .level4:
      state.cr0 = 0x8000_0011
      state.cr4 = 0x20
      state.efer = 0x500
      try! memory.write(UInt64(tableBase + 0x1000) | 3, at: tableBase)
      try! memory.write(UInt64(tableBase + 0x1000) | 3, at: tableBase + 511 * 8)
      try! memory.write(UInt64(tableBase + 0x2000) | 3, at: tableBase + 0x1000)
      try! memory.write(UInt64(0x83), at: tableBase + 0x1000 + 511 * 8)
      try! memory.write(UInt64(0x83), at: tableBase + 0x2000)
      try! memory.write(UInt64(tableBase + 0x3000) | 3, at: tableBase + 0x2008)
      try! memory.write(UInt64(0x5000) | 3, at: tableBase + 0x3000)
    }
    return state
  }

  static func runOne(_ input: inout FuzzInput) {
    let rig = self.rig ?? Rig()
    self.rig = rig
    let mode = input.byte()
    let memory = rig.memory
    if !memory.discard(at: 0, length: ramSize) { try! memory.fill(0, at: 0, length: ramSize) }
    let state = prepare(memory, paging: Paging(rawValue: Int(mode >> 1) & 3)!)
    for cpu in rig.accelerator.processors { cpu.load(state) }
    for _ in 0..<Int((mode >> 3) & 7) {
      let slot = UInt64(input.integer(UInt16.self) % 2048)
      try! memory.write(input.integer(UInt64.self), at: tableBase + slot * 8)
    }
    var stream: [UInt8] = []
    if mode & 1 == 0 {
      stream = input.rest()
    } else {
      while !input.isEmpty { stream += GDBWire.frame(input.bytes(Int(input.byte()))) }
    }

    let session = Session(target: rig.target, startStopped: true)
    session.connected()
    var reader = GDBPacketReader()
    var replies = 0
    var detached = false
    func send(_ payload: [UInt8]) {
      replies += 1
      _ = GDBWire.frame(payload)
    }
    events: for event in reader.feed(stream) {
      switch event {
      case .acknowledgement, .corrupt: break
      case .interrupt:
        if session.isRunning { send(session.interrupt(pending: nil)) }
      case .packet(let payload):
        if session.isRunning { continue }
        let outcome = session.handle(payload)
        FuzzDriver.count("packets handled")
        if let reply = outcome.reply { send(reply) }
        if outcome.resumed {
          // What a vCPU would report next: the end of the step, or a breakpoint.
          let stepped =
            payload.first == UInt8(ascii: "s") || payload.first == UInt8(ascii: "S")
            || payload.starts(with: Array("vCont;s".utf8))
          send(session.stopped(by: stepped ? .step(cpu: 0) : .breakpoint(cpu: 0)))
          FuzzDriver.count("resumes")
        }
        if outcome.closeConnection {
          detached = true
          break events
        }
      }
    }
    if !detached { session.detach() }
    // Leave the machine stopped with nothing inserted for the next input.
    rig.target.removeAllBreakpoints()
    try? rig.accelerator.pause()
    FuzzDriver.count("sessions")
    FuzzDriver.count("replies", UInt64(replies))
  }

  /// gdb's opening exchange and typical commands, framed by the target and as a raw stream:
  /// features, registers, memory through 4-level paging, breakpoints, a watchpoint, a step.
  static func seeds() -> [[UInt8]] {
    let packets = [
      "qSupported:multiprocess+;swbreak+;hwbreak+;qRelocInsn+", "vMustReplyEmpty", "QStartNoAckMode",
      "Hg0", "qXfer:features:read:target.xml:0,ffb", "qfThreadInfo", "qsThreadInfo", "qAttached", "?", "g",
      "p10", "P0=1122334455667788", "m100000,40", "M100000,4:cc90f4f4", "Xffffffffffe00000,2:ab",
      "mffffffffffe00000,10", "Z0,100000,1", "Z1,100004,1", "Z2,80000,8", "vCont?", "vCont;s:1;c", "z0,100000,1",
      "qRcmd,7068797320", "qRcmd," + GDBWire.hex(Array("xp 0x1000 32".utf8)),
      "qRcmd," + GDBWire.hex(Array("translate 0xffffffffffe01000".utf8)), "c", "D",
    ]
    var framed: [UInt8] = [1 | 3 << 1]
    var raw: [UInt8] = [3 << 1]
    for packet in packets {
      let bytes = Array(packet.utf8)
      framed += [UInt8(bytes.count)] + bytes
      raw += GDBWire.frame(bytes) + [UInt8(ascii: "+")]
    }
    let paeRead: [UInt8] = [1 | 2 << 1] + [6] + Array("m0,100".utf8)
    let thirtyTwoBit: [UInt8] =
      [1 | 1 << 1 | 1 << 3, 0x00, 0x04, 0x83, 0, 0, 0, 0, 0, 0, 0] + [9]
      + Array("m1000,100".utf8)
    return [framed, raw, paeRead, thirtyTwoBit]
  }
}
