import Foundation
import Glibc
import Testing

import VMCore

@testable import Virtio

/// Frames built byte by byte, as a driver or passt would put them on the wire.
enum FrameBuilder {
  static let destination: [UInt8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
  static let source: [UInt8] = [0x9A, 0x55, 0x9A, 0x55, 0x9A, 0x55]

  /// An IPv4 header (no options) with `totalLength` and `protocolNumber`, addresses 10.0.2.15
  /// to 10.0.2.2; the checksum is left zero (nothing here reads it).
  static func ipv4Header(totalLength: Int, protocolNumber: UInt8 = 6, headerWords: UInt8 = 5) -> [UInt8] {
    var header: [UInt8] = [
      0x40 | headerWords, 0, UInt8(totalLength >> 8), UInt8(totalLength & 0xFF), 0x12, 0x34, 0x40, 0,
    ]
    header += [64, protocolNumber, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2]
    header += [UInt8](repeating: 0, count: max(0, Int(headerWords) * 4 - 20))
    return header
  }

  /// A 20-byte TCP header with the ACK flag and `payload` behind it.
  static func tcp(payload: [UInt8] = []) -> [UInt8] {
    [0x1F, 0x90, 0xC3, 0x50, 0, 0, 0, 1, 0, 0, 0, 2, 0x50, 0x10, 0xFF, 0xFF, 0, 0, 0, 0] + payload
  }

  /// An Ethernet frame: the addresses, `tags` 802.1Q/802.1ad tags, `etherType` and `payload`,
  /// then `padding` zero bytes.
  static func frame(etherType: UInt16, payload: [UInt8], tags: [UInt16] = [], padding: Int = 0) -> [UInt8] {
    var bytes = destination + source
    for tag in tags { bytes += [UInt8(tag >> 8), UInt8(tag & 0xFF), 0x00, 0x05] }
    bytes += [UInt8(etherType >> 8), UInt8(etherType & 0xFF)] + payload
    return bytes + [UInt8](repeating: 0, count: padding)
  }

  /// A TCP ACK without data in IPv4 (54 bytes), padded to the 60-byte Ethernet minimum as
  /// 8139too and e1000 send it.
  static func paddedIPv4Acknowledgement(tags: [UInt16] = []) -> [UInt8] {
    let segment = tcp()
    let packet = ipv4Header(totalLength: 20 + segment.count) + segment
    let frame = frame(etherType: 0x0800, payload: packet, tags: tags)
    return frame + [UInt8](repeating: 0, count: max(0, 60 - frame.count))
  }

  /// An IPv6 packet (40-byte header) carrying `payload` as ICMPv6.
  static func ipv6(payload: [UInt8]) -> [UInt8] {
    var header: [UInt8] = [0x60, 0, 0, 0, UInt8(payload.count >> 8), UInt8(payload.count & 0xFF), 58, 255]
    header += [0xFE, 0x80] + [UInt8](repeating: 0, count: 13) + [1]
    header += [0xFE, 0x80] + [UInt8](repeating: 0, count: 13) + [2]
    return header + payload
  }
}

@Suite struct EthernetFrameTests {
  func unpadded(_ frame: [UInt8]) -> Int { frame.withUnsafeBytes { EthernetFrame.unpaddedLength($0) } }

  @Test func aPaddedIPv4AcknowledgementLosesItsPadding() {
    let frame = FrameBuilder.paddedIPv4Acknowledgement()
    #expect(frame.count == 60)
    #expect(unpadded(frame) == 54)
  }

  @Test func anUnpaddedIPv4FrameKeepsItsLength() {
    let packet =
      FrameBuilder.ipv4Header(totalLength: 20 + 20 + 1460)
      + FrameBuilder.tcp(payload: Array(repeating: 0xA5, count: 1460))
    let frame = FrameBuilder.frame(etherType: 0x0800, payload: packet)
    #expect(frame.count == 1514)
    #expect(unpadded(frame) == 1514)
  }

  @Test func ipv4OptionsAndTrailingCRC() {
    // A 24-byte header (one option word) and four bytes of CRC behind the packet.
    let segment = FrameBuilder.tcp(payload: [1, 2, 3])
    let packet = FrameBuilder.ipv4Header(totalLength: 24 + segment.count, headerWords: 6) + segment
    let frame = FrameBuilder.frame(etherType: 0x0800, payload: packet, padding: 4)
    #expect(unpadded(frame) == 14 + 24 + 23)
  }

  @Test func vlanTagsAreSkipped() {
    let tagged = FrameBuilder.paddedIPv4Acknowledgement(tags: [0x8100])
    #expect(tagged.count == 60)
    #expect(unpadded(tagged) == 58)
    let doubly = FrameBuilder.frame(
      etherType: 0x0800, payload: FrameBuilder.ipv4Header(totalLength: 40) + FrameBuilder.tcp(),
      tags: [0x88A8, 0x8100],
      padding: 10)
    #expect(unpadded(doubly) == 14 + 8 + 40)
    // A third tag is not followed: the frame keeps its length.
    let triply = FrameBuilder.frame(
      etherType: 0x0800, payload: FrameBuilder.ipv4Header(totalLength: 40) + FrameBuilder.tcp(),
      tags: [0x88A8, 0x8100, 0x8100], padding: 10)
    #expect(unpadded(triply) == triply.count)
  }

  @Test func ipv6UsesItsPayloadLength() {
    let echo: [UInt8] = [128, 0, 0, 0, 0, 1, 0, 1]
    let frame = FrameBuilder.frame(etherType: 0x86DD, payload: FrameBuilder.ipv6(payload: echo), padding: 6)
    #expect(unpadded(frame) == 14 + 40 + 8)
    let empty = FrameBuilder.frame(etherType: 0x86DD, payload: FrameBuilder.ipv6(payload: []), padding: 6)
    #expect(unpadded(empty) == 54)
    let tagged = FrameBuilder.frame(
      etherType: 0x86DD, payload: FrameBuilder.ipv6(payload: echo), tags: [0x8100], padding: 3)
    #expect(unpadded(tagged) == 18 + 48)
  }

  @Test func nonIPFramesKeepTheirLength() {
    // An ARP request (28 bytes) padded to 60.
    let arp: [UInt8] =
      [0, 1, 8, 0, 6, 4, 0, 1] + FrameBuilder.source + [10, 0, 2, 15] + [0, 0, 0, 0, 0, 0] + [10, 0, 2, 2]
    let frame = FrameBuilder.frame(etherType: 0x0806, payload: arp, padding: 18)
    #expect(frame.count == 60)
    #expect(unpadded(frame) == 60)
  }

  @Test func truncatedAndInconsistentFramesKeepTheirLength() {
    // Shorter than an Ethernet header, or cut inside it.
    #expect(unpadded([]) == 0)
    #expect(unpadded(Array(FrameBuilder.paddedIPv4Acknowledgement().prefix(13))) == 13)
    // An IPv4 header cut short.
    #expect(unpadded(Array(FrameBuilder.paddedIPv4Acknowledgement().prefix(30))) == 30)
    // A VLAN tag with nothing behind it.
    #expect(unpadded(Array(FrameBuilder.paddedIPv4Acknowledgement(tags: [0x8100]).prefix(16))) == 16)
    // A total length beyond the frame (a truncated packet).
    let long = FrameBuilder.frame(
      etherType: 0x0800, payload: FrameBuilder.ipv4Header(totalLength: 1500) + FrameBuilder.tcp())
    #expect(unpadded(long) == long.count)
    // A total length shorter than the IPv4 header, an IHL below 5, a version that is not 4.
    let short = FrameBuilder.frame(
      etherType: 0x0800, payload: FrameBuilder.ipv4Header(totalLength: 12) + FrameBuilder.tcp(), padding: 6)
    #expect(unpadded(short) == short.count)
    var badHeaderLength = FrameBuilder.paddedIPv4Acknowledgement()
    badHeaderLength[14] = 0x44
    #expect(unpadded(badHeaderLength) == 60)
    var notVersion4 = FrameBuilder.paddedIPv4Acknowledgement()
    notVersion4[14] = 0x65
    #expect(unpadded(notVersion4) == 60)
    // An IPv6 header cut short, and a payload length beyond the frame.
    let ipv6 = FrameBuilder.frame(etherType: 0x86DD, payload: FrameBuilder.ipv6(payload: [1, 2, 3, 4]))
    #expect(unpadded(Array(ipv6.prefix(50))) == 50)
    #expect(unpadded(Array(ipv6.prefix(56))) == 56)
  }
}

@Suite struct PasstSearchTests {
  @Test func theFirstExecutableFileOnThePathIsFound() throws {
    let root = FileManager.default.temporaryDirectory.appendingPathComponent("hostvisor-path-\(UUID().uuidString)").path
    defer { try? FileManager.default.removeItem(atPath: root) }
    let name = "hostvisor-test-\(UUID().uuidString.prefix(8))"
    // A directory of that name, a file that is not executable, then the program.
    for folder in ["a", "b", "c", "d"] {
      try FileManager.default.createDirectory(atPath: "\(root)/\(folder)", withIntermediateDirectories: true)
    }
    try FileManager.default.createDirectory(atPath: "\(root)/a/\(name)", withIntermediateDirectories: true)
    #expect(
      FileManager.default.createFile(
        atPath: "\(root)/b/\(name)", contents: Data("x".utf8), attributes: [.posixPermissions: 0o644]))
    #expect(
      FileManager.default.createFile(
        atPath: "\(root)/c/\(name)", contents: Data("#!/bin/sh\n".utf8), attributes: [.posixPermissions: 0o755]))
    #expect(
      FileManager.default.createFile(
        atPath: "\(root)/d/\(name)", contents: Data("#!/bin/sh\n".utf8), attributes: [.posixPermissions: 0o755]))
    let path = "::relative/c:\(root)/a:\(root)/b/:\(root)/c:\(root)/d"
    #expect(UserNetworkBackend.findExecutable(name, path: path) == "\(root)/c/\(name)")
    #expect(UserNetworkBackend.findExecutable(name, path: "\(root)/d/") == "\(root)/d/\(name)")
    #expect(UserNetworkBackend.findExecutable(name, path: "\(root)/a:\(root)/b") == nil)
    // /usr/bin comes after the PATH.
    #expect(UserNetworkBackend.findExecutable("sh", path: "") == "/usr/bin/sh")
  }
}

/// TCP segments in IPv4 frames between passt (02:fc:00:00:00:01, 10.0.2.2) and the guest.
enum Segments {
  static let passtMAC: [UInt8] = [0x02, 0xFC, 0, 0, 0, 1]
  static let guestMAC: [UInt8] = [0x52, 0x54, 0, 0xAB, 0xCD, 0xEF]
  static let passtAddress: [UInt8] = [10, 0, 2, 2]
  static let guestAddress: [UInt8] = [10, 0, 2, 15]

  static func be32(_ value: UInt32) -> [UInt8] { [24, 16, 8, 0].map { UInt8(truncatingIfNeeded: value >> $0) } }

  /// A segment from passt to the guest (`fromPasst`) or back, ports 48322 (passt) and 8080.
  static func segment(
    fromPasst: Bool, sequence: UInt32, acknowledgement: UInt32, flags: UInt8, options: [UInt8] = [], padding: Int = 0
  ) -> [UInt8] {
    let ports: [UInt8] = fromPasst ? [0xBC, 0xC2, 0x1F, 0x90] : [0x1F, 0x90, 0xBC, 0xC2]
    let tcp =
      ports + be32(sequence) + be32(acknowledgement) + [
        UInt8((20 + options.count) / 4) << 4, flags, 0xFF, 0xFF, 0, 0, 0, 0,
      ]
      + options
    var ip = FrameBuilder.ipv4Header(totalLength: 20 + tcp.count)
    ip.replaceSubrange(12..<20, with: fromPasst ? passtAddress + guestAddress : guestAddress + passtAddress)
    let addresses = fromPasst ? guestMAC + passtMAC : passtMAC + guestMAC
    return addresses + [0x08, 0x00] + ip + tcp + [UInt8](repeating: 0, count: padding)
  }

  /// The ones' complement sum of 16-bit big-endian words, folded.
  static func sum(_ bytes: [UInt8]) -> UInt16 {
    var total = 0
    for index in stride(from: 0, to: bytes.count, by: 2) {
      total += Int(bytes[index]) << 8 + (index + 1 < bytes.count ? Int(bytes[index + 1]) : 0)
    }
    while total > 0xFFFF { total = (total & 0xFFFF) + (total >> 16) }
    return UInt16(total)
  }
}

@Suite struct PasstHandshakeCompletionTests {
  let passtSYN = Segments.segment(
    fromPasst: true, sequence: 0x1000_0000, acknowledgement: 0, flags: 0x02,
    options: [2, 4, 0xF0, 0x00, 1, 3, 3, 8])
  func guestSYNACK(acknowledging: UInt32 = 0x1000_0001, scale: Bool = true) -> [UInt8] {
    Segments.segment(
      fromPasst: false, sequence: 0xEC2A_0000, acknowledgement: acknowledging, flags: 0x12,
      options: scale ? [2, 4, 0x05, 0xB4, 1, 3, 3, 6] : [2, 4, 0x05, 0xB4], padding: 2)
  }

  func note(_ completion: inout PasstHandshakeCompletion, fromPasst frame: [UInt8]) {
    frame.withUnsafeBytes { completion.noteFromPasst($0) }
  }
  func note(_ completion: inout PasstHandshakeCompletion, fromGuest frame: [UInt8]) -> Bool {
    frame.withUnsafeBytes { completion.noteFromGuest($0) }
  }

  @Test func theGuestsSYNACKToPasstsSYNGetsTheLastACK() throws {
    var completion = PasstHandshakeCompletion()
    note(&completion, fromPasst: passtSYN)
    #expect(!completion.hasWaitingFrame)
    #expect(note(&completion, fromGuest: guestSYNACK()))
    let next = completion.nextFrame()
    let ack = try #require(next)
    #expect(!completion.hasWaitingFrame)
    #expect(ack.count == 54)
    #expect(Array(ack[0..<6]) == Segments.guestMAC)
    #expect(Array(ack[6..<12]) == Segments.passtMAC)
    #expect(Array(ack[12..<14]) == [0x08, 0x00])
    #expect(ack[14] == 0x45)
    #expect(Int(ack[16]) << 8 | Int(ack[17]) == 40)
    #expect(ack[23] == 6)
    #expect(Array(ack[26..<30]) == Segments.passtAddress)
    #expect(Array(ack[30..<34]) == Segments.guestAddress)
    #expect(Segments.sum(Array(ack[14..<34])) == 0xFFFF, "IPv4 header checksum")
    #expect(Array(ack[34..<38]) == [0xBC, 0xC2, 0x1F, 0x90])
    #expect(Array(ack[38..<42]) == Segments.be32(0x1000_0001), "passt's SYN + 1")
    #expect(Array(ack[42..<46]) == Segments.be32(0xEC2A_0001), "the guest's SYN + 1")
    #expect(ack[46] == 0x50)
    #expect(ack[47] == 0x10, "ACK only")
    #expect(Int(ack[48]) << 8 | Int(ack[49]) == 255, "64 KiB at passt's scale of 8")
    let pseudo = Segments.passtAddress + Segments.guestAddress + [0, 6, 0, 20]
    #expect(Segments.sum(pseudo + Array(ack[34..<54])) == 0xFFFF, "TCP checksum")
  }

  @Test func withoutScalingTheWindowIsUnscaled() throws {
    var completion = PasstHandshakeCompletion()
    note(&completion, fromPasst: passtSYN)
    #expect(note(&completion, fromGuest: guestSYNACK(scale: false)))
    let next = completion.nextFrame()
    let ack = try #require(next)
    #expect(Int(ack[48]) << 8 | Int(ack[49]) == 65535)
  }

  @Test func retransmittedSYNACKsAreAnsweredUntilPasstSpeaks() {
    var completion = PasstHandshakeCompletion()
    note(&completion, fromPasst: passtSYN)
    #expect(note(&completion, fromGuest: guestSYNACK()))
    #expect(note(&completion, fromGuest: guestSYNACK()))
    let first = completion.nextFrame()
    let second = completion.nextFrame()
    let third = completion.nextFrame()
    #expect(first != nil && second != nil && third == nil)
    // passt's own ACK (or data): the connection is forgotten.
    note(
      &completion,
      fromPasst: Segments.segment(fromPasst: true, sequence: 0x1000_0001, acknowledgement: 0xEC2A_0001, flags: 0x10))
    #expect(!note(&completion, fromGuest: guestSYNACK()))
    #expect(!completion.hasWaitingFrame)
  }

  @Test func otherSegmentsGetNothing() {
    var completion = PasstHandshakeCompletion()
    // No SYN from passt first.
    #expect(!note(&completion, fromGuest: guestSYNACK()))
    note(&completion, fromPasst: passtSYN)
    // A SYN-ACK that acknowledges another sequence number, a plain ACK, a guest RST.
    #expect(!note(&completion, fromGuest: guestSYNACK(acknowledging: 0x1000_0002)))
    #expect(
      !note(
        &completion,
        fromGuest: Segments.segment(fromPasst: false, sequence: 1, acknowledgement: 0x1000_0001, flags: 0x10)))
    #expect(
      !note(&completion, fromGuest: Segments.segment(fromPasst: false, sequence: 1, acknowledgement: 0, flags: 0x04)))
    #expect(!note(&completion, fromGuest: guestSYNACK()), "the RST forgot the connection")
    // Not TCP in IPv4, truncated, a fragment.
    note(&completion, fromPasst: passtSYN)
    #expect(!note(&completion, fromGuest: Array(guestSYNACK().prefix(40))))
    var fragment = guestSYNACK()
    fragment[20] = 0x20  // More Fragments
    #expect(!note(&completion, fromGuest: fragment))
    var udp = guestSYNACK()
    udp[23] = 17
    #expect(!note(&completion, fromGuest: udp))
    #expect(!completion.hasWaitingFrame)
  }
}

/// The backend against a stand-in for passt that sends every frame back (`cat` on its socket).
@Suite struct UserNetworkBackendEchoTests {
  @Test func paddingIsCutAndHandshakesAreCompleted() throws {
    let folder = FileManager.default.temporaryDirectory.appendingPathComponent("hostvisor-echo-\(UUID().uuidString)")
      .path
    try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: folder) }
    let script = folder + "/echo-passt"
    #expect(
      FileManager.default.createFile(
        atPath: script, contents: Data("#!/bin/sh\nexec cat <&3 >&3\n".utf8), attributes: [.posixPermissions: 0o755]))
    let backend = try UserNetworkBackend(forwards: [], passtPath: script)
    var buffer = [UInt8](repeating: 0, count: 70_000)

    func send(_ frame: [UInt8]) -> Bool {
      let bytes = [UInt8](repeating: 0, count: 12) + frame
      return bytes.withUnsafeBytes { raw in
        var vector = iovec(iov_base: UnsafeMutableRawPointer(mutating: raw.baseAddress), iov_len: raw.count)
        return withUnsafePointer(to: &vector) { backend.transmit(UnsafeBufferPointer(start: $0, count: 1)) }
      }
    }
    func receive() -> [UInt8]? {
      for _ in 0..<200 {
        let count = buffer.withUnsafeMutableBytes { backend.receive(into: $0) }
        if count > 0 { return Array(buffer[12..<count]) }
        usleep(10_000)
      }
      return nil
    }

    // A padded acknowledgement goes out as its 54 bytes.
    let padded = FrameBuilder.paddedIPv4Acknowledgement()
    #expect(send(padded))
    #expect(receive() == Array(padded.prefix(54)))
    // An ARP frame keeps its padding.
    let arp = FrameBuilder.frame(etherType: 0x0806, payload: [UInt8](repeating: 1, count: 28), padding: 18)
    #expect(send(arp))
    #expect(receive() == arp)
    // passt's SYN (echoed back, so the backend sees it arrive from passt), then the guest's
    // SYN-ACK: the backend's ACK comes first, without waiting on the socket, then the echo.
    let completions = PasstHandshakeCompletionTests()
    #expect(send(completions.passtSYN))
    #expect(receive() == completions.passtSYN)
    #expect(!backend.hasPendingInput)
    #expect(send(completions.guestSYNACK()))
    #expect(backend.hasPendingInput)
    let ack = try #require(receive())
    #expect(ack.count == 54 && ack[47] == 0x10)
    #expect(!backend.hasPendingInput)
    #expect(receive() == Array(completions.guestSYNACK().dropLast(2)), "the SYN-ACK, without its padding")
  }
}

/// How the backend starts passt, seen by stand-ins: shell scripts given as passt's path.
@Suite struct PasstArgumentTests {
  /// A fresh folder holding the executable script `body(folder)` as `name`; removed by `cleanUp`.
  static func standIn(_ name: String, _ body: (String) -> String) throws -> (folder: String, script: String) {
    let folder = FileManager.default.temporaryDirectory.appendingPathComponent("hostvisor-\(name)-\(UUID().uuidString)")
      .path
    try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
    let script = folder + "/" + name
    let created = FileManager.default.createFile(
      atPath: script, contents: Data(body(folder).utf8), attributes: [.posixPermissions: 0o755])
    try #require(created, "cannot write \(script)")
    return (folder, script)
  }

  /// A stand-in that records its arguments, writes its log as passt does and echoes the stream.
  @Test func eachForwardIsItsOwnOptionAndTheLogLeavesTmp() throws {
    let (folder, script) = try Self.standIn("record-passt") { folder in
      """
      #!/bin/sh
      printf '%s\\n' "$@" > \(folder)/arguments
      while [ $# -gt 0 ]; do [ "$1" = --log-file ] && echo "stand-in started" > "$2"; shift; done
      exec cat <&3 >&3

      """
    }
    defer { try? FileManager.default.removeItem(atPath: folder) }
    var backend: UserNetworkBackend? = try UserNetworkBackend(
      forwards: [
        PortForward(proto: .tcp, hostAddress: "127.0.0.1", hostPort: 10080, guestPort: 80),
        PortForward(proto: .tcp, hostAddress: "127.0.0.1", hostPort: 10081, guestPort: 81),
        PortForward(proto: .udp, hostPort: 10053, guestPort: 53),
      ], passtPath: script)
    #expect(backend != nil)
    var arguments: [String] = []
    for _ in 0..<200 {
      arguments = ((try? String(contentsOfFile: folder + "/arguments", encoding: .utf8)) ?? "")
        .split(separator: "\n").map(String.init)
      if arguments.count > 1 { break }
      usleep(10_000)
    }
    let pairs = stride(from: 0, to: max(0, arguments.count - 1), by: 1).map { "\(arguments[$0]) \(arguments[$0 + 1])" }
    #expect(pairs.contains("--tcp-ports 127.0.0.1/10080:80"))
    #expect(pairs.contains("--tcp-ports 127.0.0.1/10081:81"))
    #expect(pairs.contains("--udp-ports 10053:53"))
    let log = try #require(arguments.firstIndex(of: "--log-file").map { arguments[$0 + 1] })
    #expect(log.hasPrefix("/tmp/hostvisor-passt-"))
    backend = nil
    #expect(!FileManager.default.fileExists(atPath: log), "the log is gone once the backend is")
  }

  /// A passt that fails on its options at start is reported with its exit status and its log's
  /// last line, also through the init of its PID namespace (as root), which ends with the
  /// child's status.
  @Test func aPasstThatExitsAtStartIsReportedWithItsStatusAndLog() throws {
    let (folder, script) = try Self.standIn("failing-passt") { _ in
      """
      #!/bin/sh
      while [ $# -gt 0 ]; do [ "$1" = --log-file ] && echo "stand-in refused port 7" > "$2"; shift; done
      exit 3

      """
    }
    defer { try? FileManager.default.removeItem(atPath: folder) }
    do {
      _ = try UserNetworkBackend(forwards: [], passtPath: script)
      Issue.record("a passt that exited at start was not reported")
    } catch {
      #expect(error.description.contains("status 3"), "\(error.description)")
      #expect(error.description.contains("stand-in refused port 7"), "\(error.description)")
    }
  }

  /// A passt that ends while the machine runs (after the start-up check) is reported once its
  /// stream ends, with its exit status and its log's last line, although the log's name is gone
  /// by then (the stand-in, as passt, keeps the log open).
  @Test func aPasstThatEndsLaterIsReportedWithItsStatusAndLog() throws {
    let (folder, script) = try Self.standIn("ending-passt") { _ in
      """
      #!/bin/sh
      while [ $# -gt 0 ]; do [ "$1" = --log-file ] && log="$2"; shift; done
      exec 4>"$log"
      echo "stand-in started" >&4
      sleep 1
      echo "stand-in lost its way" >&4
      exit 5

      """
    }
    defer { try? FileManager.default.removeItem(atPath: folder) }
    var pipeEnds: [Int32] = [-1, -1]
    try #require(pipe(&pipeEnds) == 0)
    defer { close(pipeEnds[0]) }
    let diagnostics = DiagnosticOutput(fileDescriptor: pipeEnds[1])
    let backend = try UserNetworkBackend(forwards: [], passtPath: script, diagnostics: diagnostics)
    var buffer = [UInt8](repeating: 0, count: 2048)
    var polled = pollfd(fd: backend.pollDescriptor, events: Int16(POLLIN), revents: 0)
    #expect(poll(&polled, 1, 20_000) == 1, "the stream did not end")
    let received = buffer.withUnsafeMutableBytes { backend.receive(into: $0) }
    #expect(received == 0)
    close(pipeEnds[1])
    var report = [UInt8](repeating: 0, count: 4096)
    let count = read(pipeEnds[0], &report, report.count)
    let line = String(decoding: report.prefix(max(0, count)), as: UTF8.self)
    #expect(line.contains("exited (status 5): stand-in lost its way"), "\(line)")
  }
}

/// The backend against a stand-in for passt that reads nothing for a while, then reads the
/// stream slowly: the frames the backend accepted arrive whole, in order, each behind its own
/// length, however full the socket got, and the socket never holds part of a frame at the
/// moment a read empties it (Debian 12's passt loses its place in the stream when it does;
/// `PasstOutputQueue`).
@Suite struct UserNetworkBackendBackpressureTests {
  /// The stand-in: sleeps a second, then reads 64 KiB at a time with a pause between reads
  /// until the stream ends, writing each whole record to `stream` and, after every read, the
  /// count of reads that emptied the socket inside a record to `cuts`.
  static func standIn(stream: String, cuts: String) -> String {
    """
    #!/usr/bin/env python3
    import socket, time
    time.sleep(1)
    peer = socket.socket(fileno=3)
    pending, cut = b"", 0
    with open("\(stream)", "wb") as out:
        while chunk := peer.recv(65536):
            pending += chunk
            while len(pending) >= 4 and len(pending) >= 4 + int.from_bytes(pending[:4], "big"):
                length = 4 + int.from_bytes(pending[:4], "big")
                out.write(pending[:length])
                pending = pending[length:]
            # A short read emptied the socket: what is left must not be part of a record.
            cut += 1 if pending and len(chunk) < 65536 else 0
            with open("\(cuts)", "w") as count:
                count.write(str(cut))
            out.flush()
            time.sleep(0.001)

    """
  }

  /// A 1,514-byte frame of a type the backend keeps whole, carrying `sequence` twice at the
  /// start of its payload.
  static func frame(_ sequence: UInt32) -> [UInt8] {
    let tag = withUnsafeBytes(of: sequence.bigEndian) { Array($0) }
    return FrameBuilder.frame(etherType: 0x88B5, payload: tag + tag + [UInt8](repeating: 0x5A, count: 1492))
  }

  /// The queue on a real Unix stream socket with a small send buffer, emptied by its reader
  /// after every flush: what the reader finds always ends at a record's end, and every record
  /// arrives once, in order.
  @Test func theQueueNeverLeavesPartOfARecordInTheSocket() throws {
    var pair: [Int32] = [-1, -1]
    try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
    defer { for end in pair { close(end) } }
    _ = fcntl(pair[0], F_SETFL, fcntl(pair[0], F_GETFL) | O_NONBLOCK)
    var bufferSize: Int32 = 16 << 10
    _ = setsockopt(pair[0], SOL_SOCKET, SO_SNDBUF, &bufferSize, socklen_t(MemoryLayout<Int32>.size))
    var queue = PasstOutputQueue()
    var expected: [UInt8] = []
    for sequence in 0..<UInt32(200) {
      let record = [0, 0, 0x05, 0xEA] + Self.frame(sequence)
      queue.append(record)
      expected += record
    }
    var received: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 1 << 20)
    var cuts = 0
    for _ in 0..<10_000 {
      queue.flush(to: pair[0])
      let count = recv(pair[1], &buffer, buffer.count, Int32(MSG_DONTWAIT))
      if count > 0 { received += buffer[0..<count] }
      if received.count % (4 + 1514) != 0 { cuts += 1 }
      if queue.isEmpty && count <= 0 { break }
    }
    #expect(cuts == 0, "the socket held part of a record \(cuts) times")
    #expect(queue.isEmpty && queue.byteCount == 0)
    #expect(received.count == expected.count)
    let same = received == expected
    #expect(same, "the records arrived altered or out of order")
  }

  @Test func aStalledPeerLosesWholeFramesOnlyAndTheBackendSaysWhenItIsFull() throws {
    let folder = FileManager.default.temporaryDirectory.appendingPathComponent(
      "hostvisor-backpressure-\(UUID().uuidString)"
    ).path
    try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: folder) }
    let script = folder + "/slow-passt"
    let stream = folder + "/stream"
    let cuts = folder + "/cuts"
    #expect(
      FileManager.default.createFile(
        atPath: script, contents: Data(Self.standIn(stream: stream, cuts: cuts).utf8),
        attributes: [.posixPermissions: 0o755]))
    var backend: UserNetworkBackend? = try UserNetworkBackend(forwards: [], passtPath: script)

    func send(_ frame: [UInt8]) -> Bool {
      let bytes = [UInt8](repeating: 0, count: 12) + frame
      return bytes.withUnsafeBytes { raw in
        var vector = iovec(iov_base: UnsafeMutableRawPointer(mutating: raw.baseAddress), iov_len: raw.count)
        return withUnsafePointer(to: &vector) { backend!.transmit(UnsafeBufferPointer(start: $0, count: 1)) }
      }
    }

    // 4,000 frames (6 MB) at once, while the peer reads nothing: more than the socket and the
    // backend's queue hold, sent regardless of `canTransmit` as a careless device would.
    var accepted: [UInt32] = []
    var sawFull = false
    for sequence in 0..<UInt32(4000) {
      if !backend!.canTransmit { sawFull = true }
      if send(Self.frame(sequence)) { accepted.append(sequence) }
    }
    #expect(sawFull, "the backend never said it was full")
    #expect(accepted.count < 4000, "a stalled peer took 6 MB")
    // 4,000 more as a careful device sends them while the peer reads slowly: each waits until
    // the backend takes frames again, and none is dropped.
    for sequence in UInt32(4000)..<8000 {
      for _ in 0..<50_000 where !backend!.canTransmit {
        backend!.flushPendingOutput()
        usleep(100)
      }
      if send(Self.frame(sequence)) { accepted.append(sequence) } else { Issue.record("frame \(sequence) dropped") }
    }
    for _ in 0..<500 where backend!.hasPendingOutput {
      backend!.flushPendingOutput()
      usleep(10_000)
    }
    #expect(!backend!.hasPendingOutput)
    // The backend stops its peer when it goes: let the copy catch up first.
    func copied() -> Int { ((try? FileManager.default.attributesOfItem(atPath: stream))?[.size] as? Int) ?? 0 }
    for _ in 0..<2000 where copied() < accepted.count * (4 + 1514) { usleep(10_000) }
    #expect(
      (try? String(contentsOfFile: cuts, encoding: .utf8)) == "0", "the stream showed passt a frame cut short")
    backend = nil
    let bytes = Array((try? Data(contentsOf: URL(fileURLWithPath: stream))) ?? Data())
    var received: [UInt32] = []
    var offset = 0
    while offset + 4 <= bytes.count {
      let length = bytes[offset..<offset + 4].reduce(0) { $0 << 8 | Int($1) }
      guard length == 1514, offset + 4 + length <= bytes.count else {
        Issue.record("a frame of \(length) bytes at offset \(offset) after \(received.count) whole frames")
        break
      }
      let frame = Array(bytes[offset + 4..<offset + 4 + length])
      let sequence = frame[14..<18].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
      guard frame == Self.frame(sequence) else {
        Issue.record("frame \(received.count) is not a frame that was sent")
        break
      }
      received.append(sequence)
      offset += 4 + length
    }
    let firstDifference =
      zip(received, accepted).enumerated().first { $0.element.0 != $0.element.1 }?.offset
      ?? min(received.count, accepted.count)
    #expect(
      received.count == accepted.count && firstDifference == accepted.count,
      "\(received.count) frames arrived of \(accepted.count) accepted; they differ from frame \(firstDifference)")
  }
}
