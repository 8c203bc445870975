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
/// is the channel of `VMController`'s own receive loop (`receiveMigration(over:...)`, what
/// `receiveMigration(from:)` runs once a source has connected), on a fresh controller set to
/// the software CPU: the `hello` (protocol version, page size, machine description, nothing
/// after it), the machine built from it, `pages` messages stored into its RAM
/// (`GuestMemory.receivePages`), the `state` (resume flag, state file: header and checksum, the
/// machine section compared with the hello's description, every section restored), then the
/// adoption of the machine by the controller (paused, or resumed when the flag says so), which
/// the target then shuts down.
///
/// The machine is built through the loop's seam (`buildingWith:`): a hello describing the fuzz
/// machine (a tiny ELF kernel, a disk and a balloon in memfds, 16 MiB of RAM on the software
/// CPU, as in its seeds) gets that machine, built by `VirtualMachine.build` as the receiver
/// builds it, on RAM fenced by `PROT_NONE` guards (a page number that reached outside it would
/// kill the target). Any other description names host files (kernel, initrd, disks) and TAP
/// devices the receiver would open: the builder refuses it, as a receiver that cannot build
/// the machine does.
@main
enum FuzzMigration {
  nonisolated(unsafe) static var configuration: MachineConfiguration?
  nonisolated(unsafe) static var fuzzDescription: MachineDescription?
  /// The guards around the RAM of the machine the current input built.
  nonisolated(unsafe) static var guards: GuestMemoryGuards?

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
    defer { guards = nil }
    var spec = VMSpec()
    spec.accelerator = .soft
    spec.serial = .none
    let controller = VMController(spec: spec)
    do {
      try controller.receiveMigration(over: channel, networkOverrides: [:], buildingWith: build)
      FuzzDriver.count("machines adopted")
    } catch {
      _ = error.description
      FuzzDriver.count("streams refused")
      // Refused after the adoption (the resume failed): the machine still has to stop.
      guard controller.lifecycle != .notStarted else { return }
      FuzzDriver.count("streams refused after the adoption")
    }
    if controller.lifecycle == .running { FuzzDriver.count("machines running after the loop") }
    do {
      try controller.shutdown(timeoutNanoseconds: 10_000_000_000)
    } catch {
      preconditionFailure("an adopted machine did not stop: \(error)")
    }
  }

  /// The receive loop's builder: the fuzz machine on guarded RAM; any other description is
  /// refused (it names host files and TAP devices).
  static func build(_ description: MachineDescription, overrides: RestoreOverrides) throws -> VirtualMachine {
    FuzzDriver.count("hellos accepted")
    guard description == machineDescription() else {
      FuzzDriver.count("hellos describing another machine")
      throw MigrationError.protocolError("the fuzz target builds only its own machine")
    }
    precondition(overrides.accelerator == .soft && overrides.serial == .none && overrides.openTapsLater)
    let memory = try GuestMemory(size: description.memorySize)
    guards = GuestMemoryGuards(around: memory)
    let machine = try VirtualMachine.build(description: description, overrides: overrides, memory: memory)
    FuzzDriver.count("machines built")
    return machine
  }

  /// Migrations of the fuzz machine as its source sends them, each framed (the raw stream)
  /// and as messages for the target to frame: the hello and a pages message with a data page
  /// and a zero page; the hello, a pages message of zero pages and the state of a paused
  /// source; the same with the state of a running source (resumed here). Each stays under
  /// `scripts/fuzz.sh`'s `-max_len` of 8192 bytes, or libFuzzer would cut it short.
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
    let file = MachineStateFile.encode(payload: try! machine.encodeState(memoryPath: "", networkIDs: nil))
    let migrations: [[(MigrationMessage, [UInt8])]] = [
      [(.hello, hello.bytes), (.pages, dataPages)],
      [(.hello, hello.bytes), (.pages, zeroPages), (.state, [0] + file)],
      [(.hello, hello.bytes), (.pages, zeroPages), (.state, [1] + file)],
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
