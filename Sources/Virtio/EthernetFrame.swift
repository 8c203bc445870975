/// Ethernet frame helpers: the layer-3 length of a frame (for backends whose peer takes the
/// frame's length as the packet's) and the frame check sequence the emulated NICs append.
public enum EthernetFrame {
  /// The EtherType of IPv4.
  static let ipv4: UInt16 = 0x0800
  /// The EtherType of IPv6.
  static let ipv6: UInt16 = 0x86DD
  /// The tag protocol identifier of 802.1Q (VLAN) tags.
  static let vlan: UInt16 = 0x8100
  /// The tag protocol identifier of 802.1ad (service VLAN) tags.
  static let serviceVLAN: UInt16 = 0x88A8

  /// The length of `frame` without the bytes after its IPv4 or IPv6 packet: Ethernet pads
  /// frames to 60 bytes, and the emulated NICs' drivers (8139too, e1000) do so on transmit,
  /// while the packet's own length (IPv4 total length, IPv6 payload length) says where it
  /// ends. Up to two VLAN tags are skipped. The frame's own length is returned for anything
  /// else: not IP, a header cut short, a packet length larger than the frame or smaller than
  /// its header. (An IPv6 jumbogram, payload length 0, needs more than 64 KiB and no frame
  /// here is that long.)
  public static func unpaddedLength(_ frame: UnsafeRawBufferPointer) -> Int {
    var offset = 12
    var tags = 0
    while true {
      guard frame.count >= offset + 2 else { return frame.count }
      let type = UInt16(frame[offset]) << 8 | UInt16(frame[offset + 1])
      offset += 2
      if (type == vlan || type == serviceVLAN) && tags < 2 {
        tags += 1
        offset += 2
        continue
      }
      let packetLength: Int
      switch type {
      case ipv4:
        guard frame.count >= offset + 20, frame[offset] >> 4 == 4 else { return frame.count }
        let headerLength = Int(frame[offset] & 0x0F) * 4
        packetLength = Int(frame[offset + 2]) << 8 | Int(frame[offset + 3])
        guard headerLength >= 20, packetLength >= headerLength else { return frame.count }
      case ipv6:
        guard frame.count >= offset + 40, frame[offset] >> 4 == 6 else { return frame.count }
        let payloadLength = Int(frame[offset + 4]) << 8 | Int(frame[offset + 5])
        packetLength = 40 + payloadLength
      default:
        return frame.count
      }
      return offset + packetLength <= frame.count ? offset + packetLength : frame.count
    }
  }

  private static let crcTable: [UInt32] = (0..<256).map { index in
    var value = UInt32(index)
    for _ in 0..<8 { value = value & 1 != 0 ? 0xEDB8_8320 ^ (value >> 1) : value >> 1 }
    return value
  }

  /// The Ethernet frame check sequence (CRC-32, reflected, as transmitted least significant
  /// byte first).
  static func crc32(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
    var crc: UInt32 = 0xFFFF_FFFF
    crcTable.withUnsafeBufferPointer { table in
      for byte in bytes { crc = table[Int((crc ^ UInt32(byte)) & 0xFF)] ^ (crc >> 8) }
    }
    return ~crc
  }
}
