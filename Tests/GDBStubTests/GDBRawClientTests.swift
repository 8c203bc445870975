import Foundation
import Glibc
import TestSupport
import Testing

@testable import GDBStub

/// A minimal remote-protocol client over TCP, for what gdb's batch mode cannot do (Ctrl-C while
/// running) and for hostile input over a real connection.
final class RawGDBClient {
  let fd: Int32
  private var reader = GDBPacketReader()
  private var pending: [[UInt8]] = []

  init(port: UInt16) throws {
    fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = port.bigEndian
    address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
    var timeout = timeval(tv_sec: 20, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    for _ in 0..<100 {
      let result = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
          connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
        }
      }
      if result == 0 { return }
      usleep(50_000)
    }
    close(fd)
    throw GDBTestSupport.ToolFailure(description: "cannot connect to the gdb stub on port \(port)")
  }

  deinit { close(fd) }

  func sendRaw(_ bytes: [UInt8]) {
    _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
  }

  func send(_ packet: String) { sendRaw(GDBWire.frame(Array(packet.utf8))) }

  /// The next packet's payload (acknowledgements skipped); nil on timeout or close.
  func receive() -> String? {
    var buffer = [UInt8](repeating: 0, count: 4096)
    while pending.isEmpty {
      let count = read(fd, &buffer, buffer.count)
      guard count > 0 else { return nil }
      for event in reader.feed(buffer[0..<count]) {
        if case .packet(let payload) = event { pending.append(payload) }
      }
    }
    return String(decoding: pending.removeFirst(), as: UTF8.self)
  }

  func request(_ packet: String) -> String? {
    send(packet)
    return receive()
  }
}

@Suite("gdb stub over a raw connection", .serialized)
struct GDBRawClientTests {
  /// Ctrl-C stops a running guest (the counter it increments stands still afterwards), hostile
  /// packets on the wire get error replies, and `k` ends the machine.
  @Test(arguments: GDBStubGuestTests.accelerators)
  func interruptHostileInputAndKill(accelerator: String) throws {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("gdbraw-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: directory) }
    let image = try GDBTestSupport.buildGuest("spin64", in: directory)
    let ticks = try #require(try GDBTestSupport.symbols(image)["ticks"])
    let loop = Set(try GDBTestSupport.instructionAddresses(image))
    let port = GDBTestSupport.freePort()
    let machine = try HostProcess(
      GDBTestSupport.hostvisor,
      ["run", "--kernel", image, "--accel", accelerator, "--memory", "64M", "--serial", "none", "--gdb", "\(port)"],
      errors: { _ in }, output: { _ in })
    defer { if machine.isRunning { machine.terminate() } }

    let client = try RawGDBClient(port: port)
    #expect(client.request("qSupported:multiprocess+;swbreak+;hwbreak+")?.contains("PacketSize=4000") == true)
    // Connecting stopped the running machine.
    #expect(client.request("?")?.hasPrefix("T02") == true)
    let address = String(ticks, radix: 16)
    let before = try #require(client.request("m\(address),8"))
    // Hostile input over the wire: wrong checksums (answered '-'), junk, hostile packets.
    client.sendRaw(Array("$g#00".utf8) + [0xFF, 0x00, UInt8(ascii: "}")] + Array("#zz".utf8))
    for packet in ["m\(address),ffffffff", "Mzz", "Z1,zz,1", "Hg99", "P99=00", "qXfer:features:read:../x:0,1"] {
      let reply = try #require(client.request(packet))
      #expect(reply.hasPrefix("E") || reply.isEmpty, "\(packet) -> \(reply)")
    }
    // Registers still answer: RIP is inside the spin loop.
    let rip = try #require(client.request("p10"))
    let ripValue = UInt64(littleEndianHex: rip)
    #expect(loop.contains(ripValue), "rip \(rip)")

    client.send("c")
    usleep(300_000)
    client.sendRaw([0x03])
    let stop = try #require(client.receive())
    #expect(stop.hasPrefix("T02"), "\(stop)")
    let after = try #require(client.request("m\(address),8"))
    #expect(UInt64(littleEndianHex: after) > UInt64(littleEndianHex: before))
    usleep(200_000)
    #expect(client.request("m\(address),8") == after)

    client.send("k")
    machine.waitUntilExit()
    #expect(machine.terminationStatus == 0)
  }
}

extension UInt64 {
  /// A little-endian value from gdb's hex bytes.
  init(littleEndianHex text: String) {
    let bytes = GDBWire.bytes(fromHex: text) ?? []
    self = bytes.prefix(8).enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * $1.offset) }
  }
}
