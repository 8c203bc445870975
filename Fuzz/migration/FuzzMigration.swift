import FuzzSupport
import Glibc
import VMCore
import Virtio

@testable import VMM

/// The live-migration receiver: the byte stream an incoming migration reads from its socket.
///
/// Input: a mode byte, then either the raw stream (even mode: frame headers, checksums and
/// payloads all from the fuzzer) or a list of messages (odd mode: a type byte, a 16-bit length
/// and the payload each) that the target frames with the right magic number and CRC-32C, so
/// the fuzzer reaches the message handlers without solving the checksum. The stream is written
/// into one end of a Unix stream socket pair, which is then closed for writing; the other end
/// is the receiver's `MigrationChannel`, read as `VMController.receiveMigration` reads it:
/// the `hello` (protocol version, page size, machine description, nothing after it), then
/// `pages` messages stored into guest RAM (`GuestMemory.receivePages`), then the `state`
/// (resume flag, state file: header and checksum, the machine section compared with the
/// hello's description, every section restored into the machine).
///
/// The machine: a hello describing the fuzz machine (a tiny ELF kernel, a disk and a balloon
/// in memfds, 16 MiB of RAM on the software CPU, as in its seeds) is built by
/// `VirtualMachine.build`, as the receiver builds it. Any other description names host files
/// (kernel, initrd, disks) and TAP devices the receiver would open: it is not built; its RAM
/// is mapped alone (`GuestMemory(size:)`, up to 64 MiB) to take the pages, and its state is
/// decoded and compared but not restored. RAM is fenced by `PROT_NONE` guards, so a page number
/// that reached outside it would kill the target. A restored machine is not adopted or run.
@main
enum FuzzMigration {
  /// The largest RAM mapped for a description that is not the fuzz machine's.
  static let largestForeignMemory: UInt64 = 64 << 20

  nonisolated(unsafe) static var configuration: MachineConfiguration?
  nonisolated(unsafe) static var fuzzDescription: MachineDescription?

  static func main() {
    FuzzDriver.run(name: "migration", seeds: seeds) { input in runOne(&input) }
  }

  /// The machine a hello may describe: a tiny ELF kernel and a 64 KiB disk, both in memfds,
  /// 16 MiB of RAM on the software CPU, a virtio console and a balloon.
  static func machineConfiguration() -> MachineConfiguration {
    if let configuration { return configuration }
    let elf = FuzzImages.haltingELFKernel
    var configuration = MachineConfiguration(
      kernelPath: fixedPath(FuzzDriver.memoryFile(name: "fuzz-kernel", bytes: elf, size: elf.count), descriptor: 900),
      memorySize: 16 << 20, accelerator: .soft, serial: .none)
    configuration.disks = [
      DiskConfiguration(path: fixedPath(FuzzDriver.memoryFile(name: "fuzz-disk", size: 64 << 10), descriptor: 901))
    ]
    configuration.console = .virtio
    configuration.balloon = BalloonConfiguration(
      targetMiB: 1, options: BalloonOptions(deflateOnOOM: true, statisticsInterval: 5, freePageReporting: true))
    Self.configuration = configuration
    return configuration
  }

  /// The memfd at `path` (/proc/self/fd/N) moved to `descriptor`, so that the paths in the
  /// machine's description are the same in every process (the seeds are written by another).
  static func fixedPath(_ path: String, descriptor: Int32) -> String {
    let current = Int32(path.split(separator: "/").last!)!
    precondition(dup2(current, descriptor) == descriptor, "cannot move a memfd")
    close(current)
    return "/proc/self/fd/\(descriptor)"
  }

  /// The fuzz machine's description as a source sends it in its hello.
  static func machineDescription() -> MachineDescription {
    if let fuzzDescription { return fuzzDescription }
    let machine = try! VirtualMachine(configuration: machineConfiguration())
    defer { machine.shutdownDevices() }
    let description = machine.machineDescription(memoryPath: "", networkIDs: nil)
    fuzzDescription = description
    return description
  }

  /// One framed message as `MigrationChannel.send` writes it.
  static func frame(type: UInt32, _ payload: [UInt8]) -> [UInt8] {
    var header = StateWriter()
    header.write(MigrationChannel.magic)
    header.write(type)
    header.write(UInt64(payload.count))
    header.write(payload.withUnsafeBytes { FastCRC32C.checksum($0) })
    header.write(UInt32(0))
    return header.bytes + payload
  }

  static func runOne(_ input: inout FuzzInput) {
    let stream: [UInt8]
    if input.byte() & 1 == 0 {
      stream = input.rest()
    } else {
      var messages: [UInt8] = []
      while !input.isEmpty {
        let type = UInt32(input.byte())
        let length = Int(input.integer(UInt16.self))
        messages += frame(type: type, input.bytes(length))
      }
      stream = messages
    }
    var pair: [Int32] = [-1, -1]
    precondition(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0)
    defer { close(pair[1]) }
    var size: Int32 = 1 << 20
    setsockopt(pair[1], SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    let written = stream.withUnsafeBytes { write(pair[1], $0.baseAddress, $0.count) }
    precondition(written == stream.count, "the stream does not fit the socket buffer")
    shutdown(pair[1], Int32(SHUT_WR))
    let channel = MigrationChannel(descriptor: pair[0])
    FuzzDriver.count("streams")
    do {
      try receive(over: channel)
    } catch {
      _ = "\(error)"
      FuzzDriver.count("streams refused")
    }
  }

  /// What the receiver does with the stream, up to the restored (not adopted) machine.
  static func receive(over channel: MigrationChannel) throws {
    var hello = StateReader(bytes: try channel.receive(.hello))
    let version: UInt32 = try hello.read()
    guard version == MigrationChannel.version else { throw MigrationError.protocolError("version \(version)") }
    let pageSize: UInt32 = try hello.read()
    guard pageSize == 4096 else { throw MigrationError.protocolError("page size \(pageSize)") }
    let description = try MachineDescription.restore(from: &hello)
    guard hello.isAtEnd else { throw MigrationError.protocolError("trailing bytes after the hello") }
    FuzzDriver.count("hellos accepted")

    var machine: VirtualMachine?
    defer { machine?.shutdownDevices() }
    let memory: GuestMemory
    if description == machineDescription() {
      memory = try GuestMemory(size: description.memorySize)
      var overrides = RestoreOverrides()
      overrides.serial = .none
      overrides.accelerator = .soft
      overrides.openTapsLater = true
      machine = try VirtualMachine.build(description: description, overrides: overrides, memory: memory)
      FuzzDriver.count("machines built")
    } else {
      guard description.memorySize <= largestForeignMemory else {
        FuzzDriver.count("hellos with more RAM than the target maps")
        return
      }
      memory = try GuestMemory(size: description.memorySize)
    }
    let guards = GuestMemoryGuards(around: memory)
    defer { withExtendedLifetime(guards) {} }
    try channel.send(.accept)

    while true {
      let (type, payload) = try channel.receive()
      if type == .pages {
        try memory.receivePages(payload)
        FuzzDriver.count("pages messages stored")
        continue
      }
      guard type == .state, payload.first != nil else {
        throw MigrationError.protocolError("unexpected migration message \(type)")
      }
      var reader = StateReader(bytes: try MachineStateFile.decode(Array(payload.dropFirst())))
      let stateDescription = try reader.section("machine") { (reader) throws(MachineStateError) in
        try MachineDescription.restore(from: &reader)
      }
      guard stateDescription == description else {
        throw MigrationError.protocolError("the state describes another machine")
      }
      guard let machine else {
        FuzzDriver.count("states of machines not built")
        return
      }
      try machine.restoreSections(from: &reader, description: description, paused: true)
      FuzzDriver.count("states restored")
      return
    }
  }

  /// Migrations of the fuzz machine as its source sends them, each framed (the raw stream)
  /// and as messages for the target to frame: the hello and a pages message with a data page
  /// and a zero page; the hello, a pages message of zero pages and the state.
  static func seeds() -> [[UInt8]] {
    let machine = try! VirtualMachine(configuration: machineConfiguration())
    defer { machine.shutdownDevices() }
    var hello = StateWriter()
    hello.write(MigrationChannel.version)
    hello.write(UInt32(4096))
    machine.machineDescription(memoryPath: "", networkIDs: nil).save(into: &hello)
    func entry(_ page: UInt64) -> [UInt8] { withUnsafeBytes(of: page.littleEndian) { Array($0) } }
    let dataPages = entry(0x100) + [UInt8](repeating: 0xF4, count: 4096) + entry(0x101 | MigrationChannel.zeroPageFlag)
    let zeroPages = entry(0x102 | MigrationChannel.zeroPageFlag) + entry(0xFFF | MigrationChannel.zeroPageFlag)
    let state = [0] + MachineStateFile.encode(payload: try! machine.encodeState(memoryPath: "", networkIDs: nil))
    let migrations: [[(MigrationMessage, [UInt8])]] = [
      [(.hello, hello.bytes), (.pages, dataPages)],
      [(.hello, hello.bytes), (.pages, zeroPages), (.state, state)],
    ]
    return migrations.flatMap { messages -> [[UInt8]] in
      var listed: [UInt8] = [1]
      for (type, payload) in messages {
        listed.append(UInt8(type.rawValue))
        listed += [UInt8(payload.count & 0xFF), UInt8(payload.count >> 8)]
        listed += payload
      }
      return [listed, [0] + messages.flatMap { frame(type: $0.0.rawValue, $0.1) }]
    }
  }
}
