import Glibc
import VMCore

/// The protocol state of the stub (all-stop): which vCPU gdb looks at, whether the machine
/// runs, and the answer to every packet. Pure logic over a `GDBTarget`; the server does I/O.
final class Session: @unchecked Sendable {  // used by the server thread only
  /// What handling one packet produced.
  struct Outcome {
    /// The reply payload; nil when the packet resumed the machine (the stop reply comes later).
    var reply: [UInt8]?
    var resumed = false
    var closeConnection = false
  }

  /// The longest memory transfer answered at once (gdb splits larger reads).
  static let maximumMemoryTransfer = 0x1000
  /// PacketSize advertised to gdb (hex digits in qSupported).
  static let packetSize = GDBWire.maximumPayload

  private let target: any GDBTarget
  private(set) var isRunning: Bool
  private(set) var noAcknowledgements = false
  private var lastStop: GDBStopEvent = .interrupted(cpu: 0)
  /// vCPU index for register and memory packets (Hg).
  private var generalCPU = 0
  /// vCPU index for step/continue packets (Hc; -1 = any).
  private var continueCPU = -1
  /// `monitor phys on`: m/M/X address guest-physical memory.
  private var physicalMemory = false
  private var softwareBreakpointAddresses = Set<UInt64>()

  init(target: any GDBTarget, startStopped: Bool) {
    self.target = target
    isRunning = !startStopped
  }

  // MARK: Connection and stops

  /// A client connected: the machine stops, as gdb expects a stopped target.
  func connected() {
    noAcknowledgements = false
    // Registers are only meaningful once the accelerator loaded the boot state.
    for _ in 0..<10_000 where !target.hasStarted { usleep(1000) }
    if isRunning {
      stopMachine()
      lastStop = .interrupted(cpu: 0)
    }
  }

  /// Stops every vCPU (a vCPU stuck in a device for more than the pause timeout gets three
  /// chances; the stub then answers anyway).
  private func stopMachine() {
    for _ in 0..<3 {
      if target.stop() { break }
    }
    isRunning = false
  }

  /// A vCPU reported `event`: every vCPU stops; returns the stop reply.
  func stopped(by event: GDBStopEvent) -> [UInt8] {
    stopMachine()
    lastStop = event
    generalCPU = event.cpu
    return stopReply(event)
  }

  /// Ctrl-C: stops the machine; a vCPU event that raced with it is reported instead.
  func interrupt(pending: GDBStopEvent?) -> [UInt8] {
    stopMachine()
    let event = pending ?? .interrupted(cpu: generalCPU)
    lastStop = event
    generalCPU = event.cpu
    return stopReply(event)
  }

  /// The machine ended with `status`.
  func machineExited(status: Int32) -> [UInt8] {
    isRunning = false
    return bytes("W" + twoDigitHex(UInt8(truncatingIfNeeded: status)))
  }

  /// gdb went away: breakpoints are removed and the machine continues.
  func detach() {
    // Breakpoints change only while the machine is stopped.
    if isRunning { stopMachine() }
    target.removeAllBreakpoints()
    softwareBreakpointAddresses.removeAll()
    target.resume(step: nil)
    isRunning = true
  }

  private func stopReply(_ event: GDBStopEvent) -> [UInt8] {
    let thread = "thread:\(String(event.cpu + 1, radix: 16));"
    switch event {
    case .interrupted: return bytes("T02" + thread)
    case .step: return bytes("T05" + thread)
    case .breakpoint(let cpu):
      let registers = target.registers(cpu: cpu)
      let kind = softwareBreakpointAddresses.contains(registers?.rip ?? 0) ? "swbreak:;" : "hwbreak:;"
      return bytes("T05" + thread + kind)
    case .watchpoint(_, let kind, let address):
      let name = kind == .read ? "rwatch" : kind == .access ? "awatch" : "watch"
      return bytes("T05" + thread + "\(name):\(String(address, radix: 16));")
    }
  }

  // MARK: Packets

  func handle(_ payload: [UInt8]) -> Outcome {
    guard let first = payload.first else { return Outcome(reply: []) }
    let text = String(decoding: payload, as: UTF8.self)
    let body = text.dropFirst()
    switch first {
    case UInt8(ascii: "?"): return reply(stopReply(lastStop))
    case UInt8(ascii: "g"): return reply(readAllRegisters())
    case UInt8(ascii: "G"): return reply(writeAllRegisters(body))
    case UInt8(ascii: "p"): return reply(readRegister(body))
    case UInt8(ascii: "P"): return reply(writeRegister(body))
    case UInt8(ascii: "m"): return reply(readMemory(body))
    case UInt8(ascii: "M"): return reply(writeMemoryHex(body))
    case UInt8(ascii: "X"): return reply(writeMemoryBinary(payload))
    case UInt8(ascii: "Z"), UInt8(ascii: "z"): return reply(breakpoint(body, insert: first == UInt8(ascii: "Z")))
    case UInt8(ascii: "H"): return reply(selectThread(body))
    case UInt8(ascii: "T"): return reply(threadAlive(body))
    case UInt8(ascii: "c"), UInt8(ascii: "C"): return resume(step: nil, body: body)
    case UInt8(ascii: "s"), UInt8(ascii: "S"):
      return resume(step: continueCPU >= 0 ? continueCPU : generalCPU, body: body)
    case UInt8(ascii: "D"):
      detach()
      return Outcome(reply: bytes("OK"), closeConnection: true)
    case UInt8(ascii: "k"):
      target.removeAllBreakpoints()
      killMachine?()
      return Outcome(reply: nil, closeConnection: true)
    case UInt8(ascii: "q"), UInt8(ascii: "Q"): return reply(query(text))
    case UInt8(ascii: "v"): return verbose(text)
    default: return reply([])
    }
  }

  /// Called for `k`: stops the machine for good.
  var killMachine: (() -> Void)?

  private func reply(_ payload: [UInt8]) -> Outcome { Outcome(reply: payload) }
  private func reply(_ text: String) -> Outcome { Outcome(reply: bytes(text)) }
  private func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }
  private func error(_ code: UInt8) -> [UInt8] { bytes("E" + twoDigitHex(code)) }
  private func twoDigitHex(_ value: UInt8) -> String {
    String(decoding: [GDBWire.hexDigit(value >> 4), GDBWire.hexDigit(value & 0xF)], as: UTF8.self)
  }

  private func resume(step: Int?, body: Substring) -> Outcome {
    // `c ADDR` / `s ADDR` resume at ADDR; `C sig;ADDR` likewise (the signal is ignored).
    var addressText = body
    if let semicolon = body.firstIndex(of: ";") {
      addressText = body[body.index(after: semicolon)...]
    } else if payloadHasSignal(body) {
      addressText = ""
    }
    if !addressText.isEmpty {
      guard let address = GDBWire.number(addressText), var registers = target.registers(cpu: step ?? generalCPU)
      else { return reply(error(1)) }
      registers.rip = address
      _ = target.setRegisters(registers, cpu: step ?? generalCPU)
    }
    return start(step: step)
  }

  /// `C`/`S` carry a signal number first; `c`/`s` only an optional address.
  private func payloadHasSignal(_ body: Substring) -> Bool { body.count == 2 && GDBWire.number(body) != nil }

  private func start(step: Int?) -> Outcome {
    if let step, !(0..<target.cpuCount).contains(step) { return reply(error(1)) }
    isRunning = true
    target.resume(step: step)
    return Outcome(reply: nil, resumed: true)
  }

  private func verbose(_ text: String) -> Outcome {
    if text == "vCont?" { return reply("vCont;c;C;s;S") }
    if text == "vMustReplyEmpty" { return reply("") }
    if text.hasPrefix("vKill") {
      killMachine?()
      return Outcome(reply: bytes("OK"), closeConnection: true)
    }
    guard text.hasPrefix("vCont;") else { return reply("") }
    // All-stop: the first action that steps a thread decides; otherwise everything continues.
    var stepCPU: Int?
    for action in text.dropFirst("vCont;".count).split(separator: ";") {
      let parts = action.split(separator: ":", maxSplits: 1)
      guard let kind = parts.first?.first else { return reply(error(1)) }
      var thread = -1
      if parts.count == 2 {
        guard let parsed = GDBWire.threadID(parts[1]) else { return reply(error(1)) }
        thread = parsed
      }
      switch kind {
      case "s", "S":
        if stepCPU == nil { stepCPU = thread > 0 ? thread - 1 : generalCPU }
      case "c", "C", "t", "r": break
      default: return reply(error(1))
      }
    }
    return start(step: stepCPU)
  }

  // MARK: Threads

  private func selectThread(_ body: Substring) -> [UInt8] {
    guard let operation = body.first, let thread = GDBWire.threadID(body.dropFirst()) else { return error(1) }
    guard thread <= target.cpuCount else { return error(2) }
    switch operation {
    case "g": generalCPU = thread > 0 ? thread - 1 : generalCPU
    case "c": continueCPU = thread > 0 ? thread - 1 : -1
    default: return error(1)
    }
    return bytes("OK")
  }

  private func threadAlive(_ body: Substring) -> [UInt8] {
    guard let thread = GDBWire.threadID(body), (1...target.cpuCount).contains(thread) else { return error(1) }
    return bytes("OK")
  }

  // MARK: Registers

  private func readAllRegisters() -> [UInt8] {
    guard let registers = target.registers(cpu: generalCPU) else { return error(1) }
    return bytes(GDBWire.hex(GDBTargetDescription.encode(registers)))
  }

  private func writeAllRegisters(_ body: Substring) -> [UInt8] {
    guard let data = GDBWire.bytes(fromHex: body), var registers = target.registers(cpu: generalCPU),
      GDBTargetDescription.decode(data, into: &registers), target.setRegisters(registers, cpu: generalCPU)
    else { return error(1) }
    return bytes("OK")
  }

  private func readRegister(_ body: Substring) -> [UInt8] {
    guard let number = GDBWire.number(body), number < UInt64(GDBTargetDescription.registers.count),
      let registers = target.registers(cpu: generalCPU)
    else { return error(1) }
    let start = GDBTargetDescription.offsets[Int(number)]
    let size = GDBTargetDescription.registers[Int(number)].size
    return bytes(GDBWire.hex(GDBTargetDescription.encode(registers)[start..<start + size]))
  }

  private func writeRegister(_ body: Substring) -> [UInt8] {
    let parts = body.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
    guard parts.count == 2, let number = GDBWire.number(parts[0]),
      number < UInt64(GDBTargetDescription.registers.count), let data = GDBWire.bytes(fromHex: parts[1]),
      var registers = target.registers(cpu: generalCPU),
      GDBTargetDescription.set(Int(number), to: data[...], in: &registers),
      target.setRegisters(registers, cpu: generalCPU)
    else { return error(1) }
    return bytes("OK")
  }

  // MARK: Memory

  private func walker() -> GuestPageWalker? {
    guard let registers = target.registers(cpu: generalCPU) else { return nil }
    return GuestPageWalker(cr0: registers.cr0, cr3: registers.cr3, cr4: registers.cr4, efer: registers.efer)
  }

  /// `ADDR,LENGTH` with the length bounded.
  private func addressAndLength(_ text: Substring) -> (UInt64, Int)? {
    let parts = text.split(separator: ",", maxSplits: 1, omittingEmptySubsequences: false)
    guard parts.count == 2, let address = GDBWire.number(parts[0]), let length = GDBWire.number(parts[1]),
      length <= UInt64(Self.maximumMemoryTransfer)
    else { return nil }
    return (address, Int(length))
  }

  private func readMemory(_ body: Substring) -> [UInt8] {
    guard let (address, length) = addressAndLength(body), let walker = walker() else { return error(1) }
    let data = walker.read(address, count: length, memory: target.memory, physical: physicalMemory)
    if data.isEmpty && length > 0 { return error(14) }
    return bytes(GDBWire.hex(data))
  }

  private func write(_ data: [UInt8], at address: UInt64) -> [UInt8] {
    guard let walker = walker() else { return error(1) }
    return walker.write(data, at: address, memory: target.memory, physical: physicalMemory)
      ? bytes("OK") : error(14)
  }

  private func writeMemoryHex(_ body: Substring) -> [UInt8] {
    let parts = body.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
    guard parts.count == 2, let (address, length) = addressAndLength(parts[0]),
      let data = GDBWire.bytes(fromHex: parts[1]), data.count == length
    else { return error(1) }
    return write(data, at: address)
  }

  private func writeMemoryBinary(_ payload: [UInt8]) -> [UInt8] {
    guard let colon = payload.firstIndex(of: UInt8(ascii: ":")) else { return error(1) }
    let header = String(decoding: payload[1..<colon], as: UTF8.self)
    guard let (address, length) = addressAndLength(header[...]) else { return error(1) }
    let data = Array(payload[(colon + 1)...])
    guard data.count == length else { return error(1) }
    if length == 0 { return bytes("OK") }
    return write(data, at: address)
  }

  // MARK: Breakpoints

  private func breakpoint(_ body: Substring, insert: Bool) -> [UInt8] {
    // TYPE,ADDR,KIND (KIND: the length; for software breakpoints gdb's instruction size);
    // conditions after ';' are not supported and ignored.
    let main = body.split(separator: ";", maxSplits: 1).first ?? ""
    let parts = main.split(separator: ",", omittingEmptySubsequences: false)
    guard parts.count == 3, let type = GDBWire.number(parts[0]), let address = GDBWire.number(parts[1]),
      let length = GDBWire.number(parts[2]), length <= 8
    else { return error(1) }
    guard let kind = Int(exactly: type).flatMap(GDBBreakpointKind.init(rawValue:)) else { return [] }
    let breakpoint = GDBBreakpoint(kind: kind, address: address, length: kind.isWatchpoint ? length : 1)
    if kind.isWatchpoint && length == 0 { return error(1) }
    guard target.setBreakpoint(breakpoint, inserted: insert) else {
      // Unsupported kinds answer empty (gdb then says so); exhausted resources an error.
      return kind == .read || kind == .access ? [] : error(28)
    }
    if kind == .software {
      if insert { softwareBreakpointAddresses.insert(address) } else { softwareBreakpointAddresses.remove(address) }
    }
    return bytes("OK")
  }

  // MARK: Queries

  private func query(_ text: String) -> [UInt8] {
    if text.hasPrefix("qSupported") {
      return bytes(
        "PacketSize=\(String(Self.packetSize, radix: 16));qXfer:features:read+;vContSupported+;QStartNoAckMode+;swbreak+;hwbreak+"
      )
    }
    if text == "QStartNoAckMode" {
      noAcknowledgements = true
      return bytes("OK")
    }
    if text == "qAttached" { return bytes("1") }
    if text == "qC" { return bytes("QC" + String(generalCPU + 1, radix: 16)) }
    if text == "qfThreadInfo" {
      return bytes("m" + (1...target.cpuCount).map { String($0, radix: 16) }.joined(separator: ","))
    }
    if text == "qsThreadInfo" { return bytes("l") }
    if text.hasPrefix("qThreadExtraInfo,") {
      guard let thread = GDBWire.threadID(text.dropFirst("qThreadExtraInfo,".count)),
        (1...target.cpuCount).contains(thread)
      else { return error(1) }
      return bytes(GDBWire.hex(Array("vCPU \(thread - 1)".utf8)))
    }
    if text.hasPrefix("qXfer:features:read:") { return features(text.dropFirst("qXfer:features:read:".count)) }
    if text.hasPrefix("qRcmd,") {
      guard let command = GDBWire.bytes(fromHex: text.dropFirst("qRcmd,".count)) else { return error(1) }
      return bytes(GDBWire.hex(Array(monitor(String(decoding: command, as: UTF8.self)).utf8)))
    }
    return []
  }

  private func features(_ request: Substring) -> [UInt8] {
    // ANNEX:OFFSET,LENGTH
    guard let colon = request.firstIndex(of: ":") else { return error(0) }
    guard request[..<colon] == "target.xml" else { return error(0) }
    let range = request[request.index(after: colon)...].split(separator: ",", omittingEmptySubsequences: false)
    guard range.count == 2, let offset = GDBWire.number(range[0]), let length = GDBWire.number(range[1]) else {
      return error(0)
    }
    let document = Array(GDBTargetDescription.xml.utf8)
    guard offset <= UInt64(document.count) else { return error(0) }
    let start = Int(offset)
    let end = start + Int(min(length, UInt64(Self.packetSize / 2), UInt64(document.count - start)))
    return [UInt8(ascii: end >= document.count ? "l" : "m")] + document[start..<end]
  }

  // MARK: Monitor commands

  static let monitorHelp = """
    monitor commands:
      phys on|off        m/M (x, set var) address guest-physical instead of guest-virtual memory
      xp ADDR [LENGTH]   hex dump of guest-physical memory (LENGTH bytes, default 64, at most 4096)
      translate ADDR     the guest-physical address of guest-virtual ADDR (current vCPU's page tables)

    """

  private func monitor(_ command: String) -> String {
    let words = command.split(separator: " ")
    guard let name = words.first else { return Self.monitorHelp }
    switch name {
    case "help": return Self.monitorHelp
    case "phys":
      guard words.count == 2, words[1] == "on" || words[1] == "off" else { return "usage: phys on|off\n" }
      physicalMemory = words[1] == "on"
      return "memory accesses are now guest-\(physicalMemory ? "physical" : "virtual")\n"
    case "xp":
      guard words.count >= 2, words.count <= 3, let address = Self.parseNumber(words[1]) else {
        return "usage: xp ADDR [LENGTH]\n"
      }
      let length = words.count == 3 ? Self.parseNumber(words[2]) : 64
      guard let length, length <= 4096 else { return "usage: xp ADDR [LENGTH] with LENGTH at most 4096\n" }
      let data = GuestPageWalker(cr0: 0, cr3: 0, cr4: 0, efer: 0).read(
        address, count: Int(length), memory: target.memory, physical: true)
      if data.count < Int(length) && data.isEmpty {
        return "cannot read guest-physical memory at 0x\(String(address, radix: 16))\n"
      }
      var output = ""
      for line in stride(from: 0, to: data.count, by: 16) {
        output += "0x" + String(address &+ UInt64(line), radix: 16) + ":"
        for byte in data[line..<min(line + 16, data.count)] { output += " " + twoDigitHex(byte) }
        output += "\n"
      }
      return output
    case "translate":
      guard words.count == 2, let address = Self.parseNumber(words[1]), let walker = walker() else {
        return "usage: translate ADDR\n"
      }
      guard let physical = walker.translate(address, memory: target.memory) else {
        return "0x\(String(address, radix: 16)) is not mapped\n"
      }
      return "0x\(String(address, radix: 16)) -> 0x\(String(physical, radix: 16))\n"
    default: return "unknown monitor command '\(name)'\n" + Self.monitorHelp
    }
  }

  /// A number as typed at the gdb prompt: 0x-prefixed hex or decimal.
  static func parseNumber(_ text: Substring) -> UInt64? {
    if text.hasPrefix("0x") || text.hasPrefix("0X") { return GDBWire.number(text.dropFirst(2)) }
    return UInt64(text)
  }
}
