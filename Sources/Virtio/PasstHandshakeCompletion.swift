/// Completes the TCP handshakes that passt opens towards the guest for port forwards.
///
/// Debian 12's passt (0.0~git20230309) opens a forwarded connection with a SYN to the guest
/// and, when the guest answers SYN-ACK, takes the connection as established without sending
/// the handshake's last ACK: that ACK only goes out with the first data or FIN from the host
/// side. Until then the guest's socket stays half-open (SYN-RECV), `accept` does not return,
/// and a server that speaks first (or waits for nothing) never runs; the guest retransmits its
/// SYN-ACK, which passt ignores. (Captured on the stream: passt's SYN, the guest's SYN-ACK and
/// its retransmissions, then nothing until the host client closed 20 s later.)
///
/// This sees every frame both ways. For a SYN from passt (IPv4, TCP, no ACK) it keeps the
/// connection's addresses, passt's next sequence number and window scale; when the guest's
/// SYN-ACK for that connection acknowledges exactly that SYN, it builds the ACK passt would
/// have sent (sequence = passt's SYN + 1, acknowledging the guest's SYN, passt's window) for
/// the backend to hand the guest. It answers retransmitted SYN-ACKs the same way and forgets
/// the connection once passt itself sends anything else on it, or the guest resets or closes
/// it. The ACK is what passt's own state already says (it counts the connection established),
/// so a later segment from passt continues it without a gap.
struct PasstHandshakeCompletion {
  /// A connection passt opened, by the guest's port and passt's address and port.
  struct Key: Hashable {
    var guestPort: UInt16
    var peerAddress: UInt32
    var peerPort: UInt16
  }

  /// What the ACK needs from passt's SYN.
  struct Opening {
    /// passt's sequence number after its SYN.
    var nextSequence: UInt32
    /// The window scale passt's SYN offered (nil: none).
    var windowScale: UInt8?
  }

  /// The most connections kept at once; a SYN beyond it forgets the oldest ones.
  static let capacity = 256

  private var openings: [Key: Opening] = [:]
  /// Frames built for the guest, oldest first.
  private var waiting: [[UInt8]] = []

  /// Whether a frame waits for the guest.
  var hasWaitingFrame: Bool { !waiting.isEmpty }

  /// The oldest frame built for the guest, if any.
  mutating func nextFrame() -> [UInt8]? { waiting.isEmpty ? nil : waiting.removeFirst() }

  /// A TCP segment in an IPv4 frame (no VLAN tag, no fragment).
  private struct Segment {
    let frame: UnsafeRawBufferPointer
    let ipOffset = 14
    let tcpOffset: Int
    let tcpLength: Int
    var flags: UInt8 { frame[tcpOffset + 13] }
    var sourceAddress: UInt32 { Self.load32(frame, ipOffset + 12) }
    var destinationAddress: UInt32 { Self.load32(frame, ipOffset + 16) }
    var sourcePort: UInt16 { Self.load16(frame, tcpOffset) }
    var destinationPort: UInt16 { Self.load16(frame, tcpOffset + 2) }
    var sequence: UInt32 { Self.load32(frame, tcpOffset + 4) }
    var acknowledgement: UInt32 { Self.load32(frame, tcpOffset + 8) }

    init?(_ frame: UnsafeRawBufferPointer) {
      guard frame.count >= 54, frame[12] == 0x08, frame[13] == 0x00, frame[14] >> 4 == 4, frame[23] == 6 else {
        return nil
      }
      let headerLength = Int(frame[14] & 0x0F) * 4
      let totalLength = Int(Self.load16(frame, 16))
      // Not a fragment: no More Fragments flag, offset zero.
      guard headerLength >= 20, Self.load16(frame, 20) & 0x3FFF == 0, totalLength <= frame.count - 14 else {
        return nil
      }
      let tcpOffset = 14 + headerLength
      let dataOffset = totalLength >= headerLength + 20 ? Int(frame[tcpOffset + 12] >> 4) * 4 : 0
      guard dataOffset >= 20, headerLength + dataOffset <= totalLength else { return nil }
      self.frame = frame
      self.tcpOffset = tcpOffset
      self.tcpLength = totalLength - headerLength
    }

    /// The window scale option's shift, if the segment carries one.
    var windowScale: UInt8? {
      let end = tcpOffset + Int(frame[tcpOffset + 12] >> 4) * 4
      var index = tcpOffset + 20
      while index < end {
        let kind = frame[index]
        if kind == 0 { return nil }
        if kind == 1 {
          index += 1
          continue
        }
        guard index + 1 < end else { return nil }
        let length = Int(frame[index + 1])
        guard length >= 2, index + length <= end else { return nil }
        if kind == 3 && length == 3 { return min(frame[index + 2], 14) }
        index += length
      }
      return nil
    }

    static func load16(_ bytes: UnsafeRawBufferPointer, _ offset: Int) -> UInt16 {
      UInt16(bytes[offset]) << 8 | UInt16(bytes[offset + 1])
    }
    static func load32(_ bytes: UnsafeRawBufferPointer, _ offset: Int) -> UInt32 {
      UInt32(load16(bytes, offset)) << 16 | UInt32(load16(bytes, offset + 2))
    }
  }

  private static let syn: UInt8 = 0x02
  private static let ack: UInt8 = 0x10
  private static let rst: UInt8 = 0x04
  private static let fin: UInt8 = 0x01

  /// A frame passt sends to the guest.
  mutating func noteFromPasst(_ frame: UnsafeRawBufferPointer) {
    guard let segment = Segment(frame) else { return }
    let key = Key(
      guestPort: segment.destinationPort, peerAddress: segment.sourceAddress, peerPort: segment.sourcePort)
    if segment.flags & (Self.syn | Self.ack | Self.rst) == Self.syn {
      if openings.count >= Self.capacity && openings[key] == nil { openings.removeAll() }
      openings[key] = Opening(nextSequence: segment.sequence &+ 1, windowScale: segment.windowScale)
    } else if !openings.isEmpty {
      // passt speaks on the connection itself (an ACK, data, FIN, RST): nothing left to do.
      openings[key] = nil
    }
  }

  /// A frame the guest sends to passt: a SYN-ACK answering one of passt's SYNs gets the
  /// handshake's last ACK queued for the guest (`nextFrame`). Returns whether it did.
  @discardableResult
  mutating func noteFromGuest(_ frame: UnsafeRawBufferPointer) -> Bool {
    guard !openings.isEmpty, let segment = Segment(frame) else { return false }
    let key = Key(
      guestPort: segment.sourcePort, peerAddress: segment.destinationAddress, peerPort: segment.destinationPort)
    guard let opening = openings[key] else { return false }
    let flags = segment.flags
    if flags & (Self.rst | Self.fin) != 0 {
      openings[key] = nil
      return false
    }
    guard flags & (Self.syn | Self.ack) == Self.syn | Self.ack, segment.acknowledgement == opening.nextSequence else {
      return false
    }
    // Scaled windows hold only if both SYNs offered a scale.
    let shift = segment.windowScale != nil ? opening.windowScale ?? 0 : 0
    let window = UInt16(truncatingIfNeeded: min(65535, 65535 >> Int(shift)))
    waiting.append(
      Self.acknowledgement(answering: segment, sequence: opening.nextSequence, window: window))
    if waiting.count > 64 { waiting.removeFirst() }
    return true
  }

  /// The ACK from passt's side for the guest's SYN-ACK `segment`.
  private static func acknowledgement(answering segment: Segment, sequence: UInt32, window: UInt16) -> [UInt8] {
    var frame = [UInt8](repeating: 0, count: 54)
    let source = segment.frame
    // Ethernet: back to the guest's address, from passt's.
    for index in 0..<6 {
      frame[index] = source[6 + index]
      frame[6 + index] = source[index]
    }
    frame[12] = 0x08
    // IPv4: 40 bytes, don't fragment, TTL 64, TCP, passt's address to the guest's.
    frame[14] = 0x45
    frame[17] = 40
    frame[20] = 0x40
    frame[22] = 64
    frame[23] = 6
    store32(&frame, 26, segment.destinationAddress)
    store32(&frame, 30, segment.sourceAddress)
    store16(&frame, 24, ~checksum(frame, from: 14, count: 20, initial: 0))
    // TCP: passt's port to the guest's, 20-byte header, ACK.
    store16(&frame, 34, segment.destinationPort)
    store16(&frame, 36, segment.sourcePort)
    store32(&frame, 38, sequence)
    store32(&frame, 42, segment.sequence &+ 1)
    frame[46] = 0x50
    frame[47] = Self.ack
    store16(&frame, 48, window)
    // The pseudo-header: both addresses, the protocol and the TCP length.
    var pseudo = UInt32(6) + 20
    for offset in stride(from: 26, to: 34, by: 2) { pseudo += UInt32(frame[offset]) << 8 | UInt32(frame[offset + 1]) }
    store16(&frame, 50, ~checksum(frame, from: 34, count: 20, initial: pseudo))
    return frame
  }

  /// The ones' complement sum (folded, not inverted) of `count` bytes of `bytes` from `start`.
  static func checksum(_ bytes: [UInt8], from start: Int, count: Int, initial: UInt32) -> UInt16 {
    var sum = initial
    var index = start
    while index + 1 < start + count {
      sum += UInt32(bytes[index]) << 8 | UInt32(bytes[index + 1])
      index += 2
    }
    if index < start + count { sum += UInt32(bytes[index]) << 8 }
    while sum >> 16 != 0 { sum = (sum & 0xFFFF) + (sum >> 16) }
    return UInt16(sum)
  }

  private static func store16(_ bytes: inout [UInt8], _ offset: Int, _ value: UInt16) {
    bytes[offset] = UInt8(value >> 8)
    bytes[offset + 1] = UInt8(value & 0xFF)
  }

  private static func store32(_ bytes: inout [UInt8], _ offset: Int, _ value: UInt32) {
    store16(&bytes, offset, UInt16(value >> 16))
    store16(&bytes, offset + 2, UInt16(value & 0xFFFF))
  }
}
