/// Framing of the GDB remote serial protocol: `$payload#cs` packets, `+`/`-` acknowledgements,
/// the 0x03 interrupt byte, and the hex encodings the packets use. Every input is bounded and
/// validated; malformed input yields nil, never a trap.
enum GDBWire {
  /// The largest payload accepted from the client (gdb never sends more than PacketSize).
  static let maximumPayload = 0x4000

  /// The modulo-256 sum of the payload bytes.
  static func checksum<C: Collection>(_ bytes: C) -> UInt8 where C.Element == UInt8 {
    bytes.reduce(UInt8(0)) { $0 &+ $1 }
  }

  /// Frames `payload` for sending, escaping the bytes the protocol reserves.
  static func frame(_ payload: [UInt8]) -> [UInt8] {
    var body: [UInt8] = []
    body.reserveCapacity(payload.count + 4)
    for byte in payload {
      if byte == UInt8(ascii: "$") || byte == UInt8(ascii: "#") || byte == UInt8(ascii: "}")
        || byte == UInt8(ascii: "*")
      {
        body.append(UInt8(ascii: "}"))
        body.append(byte ^ 0x20)
      } else {
        body.append(byte)
      }
    }
    let sum = checksum(body)
    return [UInt8(ascii: "$")] + body + [UInt8(ascii: "#"), hexDigit(sum >> 4), hexDigit(sum & 0xF)]
  }

  static func hexDigit(_ value: UInt8) -> UInt8 {
    value < 10 ? UInt8(ascii: "0") + value : UInt8(ascii: "a") + value - 10
  }

  static func hexValue(_ character: UInt8) -> UInt8? {
    switch character {
    case UInt8(ascii: "0")...UInt8(ascii: "9"): return character - UInt8(ascii: "0")
    case UInt8(ascii: "a")...UInt8(ascii: "f"): return character - UInt8(ascii: "a") + 10
    case UInt8(ascii: "A")...UInt8(ascii: "F"): return character - UInt8(ascii: "A") + 10
    default: return nil
    }
  }

  /// Bytes as lower-case hex pairs.
  static func hex<C: Collection>(_ bytes: C) -> String where C.Element == UInt8 {
    var text: [UInt8] = []
    text.reserveCapacity(bytes.count * 2)
    for byte in bytes {
      text.append(hexDigit(byte >> 4))
      text.append(hexDigit(byte & 0xF))
    }
    return String(decoding: text, as: UTF8.self)
  }

  /// Hex pairs as bytes; nil for an odd length or a non-hex character.
  static func bytes<S: StringProtocol>(fromHex text: S) -> [UInt8]? {
    let utf8 = Array(text.utf8)
    guard utf8.count % 2 == 0 else { return nil }
    var result: [UInt8] = []
    result.reserveCapacity(utf8.count / 2)
    var index = 0
    while index < utf8.count {
      guard let high = hexValue(utf8[index]), let low = hexValue(utf8[index + 1]) else { return nil }
      result.append(high << 4 | low)
      index += 2
    }
    return result
  }

  /// A big-endian hex number as gdb writes addresses and lengths (1-16 digits); nil otherwise.
  static func number<S: StringProtocol>(_ text: S) -> UInt64? {
    guard !text.isEmpty, text.utf8.count <= 16 else { return nil }
    var value: UInt64 = 0
    for character in text.utf8 {
      guard let digit = hexValue(character) else { return nil }
      value = value << 4 | UInt64(digit)
    }
    return value
  }

  /// A thread id as in `Hg`/`T`: hex, or -1 (all) and 0 (any). Returns nil when malformed.
  static func threadID<S: StringProtocol>(_ text: S) -> Int? {
    if text == "-1" { return -1 }
    var text = Substring(text)
    if text.hasPrefix("p") {
      // Multiprocess form pPID.TID: only the thread part matters.
      guard let dot = text.firstIndex(of: ".") else { return nil }
      text = text[text.index(after: dot)...]
      if text == "-1" { return -1 }
    }
    guard let value = number(text), value <= 0x10000 else { return nil }
    return Int(value)
  }
}

/// Reassembles packets from the byte stream of one connection.
struct GDBPacketReader {
  /// What the stream produced.
  enum Event: Equatable {
    /// A packet with a valid checksum (payload unescaped).
    case packet([UInt8])
    /// A packet whose checksum did not match (answer `-`).
    case corrupt
    /// The interrupt byte (Ctrl-C).
    case interrupt
    /// An acknowledgement from the client.
    case acknowledgement
  }

  private enum State {
    case idle
    case payload
    case checksum1
    case checksum2(UInt8)
  }

  private var state = State.idle
  private var payload: [UInt8] = []
  private var overflowed = false

  /// Feeds received bytes; returns the events they complete, in order.
  mutating func feed<C: Collection>(_ bytes: C) -> [Event] where C.Element == UInt8 {
    var events: [Event] = []
    for byte in bytes {
      switch state {
      case .idle:
        switch byte {
        case UInt8(ascii: "$"):
          state = .payload
          payload.removeAll(keepingCapacity: true)
          overflowed = false
        case 0x03: events.append(.interrupt)
        case UInt8(ascii: "+"), UInt8(ascii: "-"): events.append(.acknowledgement)
        default: break  // noise between packets
        }
      case .payload:
        if byte == UInt8(ascii: "#") {
          state = .checksum1
        } else if byte == UInt8(ascii: "$") {
          // A new start inside a packet: the previous one was cut; start over.
          payload.removeAll(keepingCapacity: true)
          overflowed = false
        } else if payload.count < GDBWire.maximumPayload * 2 {
          payload.append(byte)
        } else {
          overflowed = true
        }
      case .checksum1:
        if let high = GDBWire.hexValue(byte) {
          state = .checksum2(high)
        } else {
          state = .idle
          events.append(.corrupt)
        }
      case .checksum2(let high):
        state = .idle
        guard let low = GDBWire.hexValue(byte), !overflowed, GDBWire.checksum(payload) == high << 4 | low,
          let unescaped = Self.unescape(payload)
        else {
          events.append(.corrupt)
          continue
        }
        events.append(.packet(unescaped))
      }
    }
    return events
  }

  /// Removes `}` escapes and expands run-length encoding (`X*n`).
  static func unescape(_ raw: [UInt8]) -> [UInt8]? {
    var result: [UInt8] = []
    result.reserveCapacity(raw.count)
    var index = 0
    while index < raw.count {
      let byte = raw[index]
      if byte == UInt8(ascii: "}") {
        guard index + 1 < raw.count else { return nil }
        result.append(raw[index + 1] ^ 0x20)
        index += 2
      } else if byte == UInt8(ascii: "*") {
        guard index + 1 < raw.count, let last = result.last, raw[index + 1] >= 29 else { return nil }
        let repeats = Int(raw[index + 1]) - 29
        guard result.count + repeats <= GDBWire.maximumPayload * 2 else { return nil }
        result.append(contentsOf: repeatElement(last, count: repeats))
        index += 2
      } else {
        result.append(byte)
        index += 1
      }
    }
    return result
  }
}
