import CZlib

/// Writes images as PNG (ISO/IEC 15948): 8-bit RGB (colour type 2), no interlacing, filter
/// type 0 on every row, the image data compressed with the system's zlib.
public enum PNGEncoder {
  /// A PNG file of a `width` x `height` image given as 32-bit XRGB pixels (blue in the lowest
  /// byte, rows `stride` bytes apart; the X byte is dropped).
  public static func encode(xrgb pixels: [UInt8], width: Int, height: Int, stride: Int) -> [UInt8] {
    precondition(width > 0 && height > 0 && pixels.count >= stride * (height - 1) + width * 4)
    var raw = [UInt8](repeating: 0, count: (1 + width * 3) * height)
    raw.withUnsafeMutableBufferPointer { output in
      pixels.withUnsafeBufferPointer { input in
        var out = 0
        for y in 0..<height {
          output[out] = 0  // filter type None
          out += 1
          var position = y * stride
          for _ in 0..<width {
            output[out] = input[position + 2]
            output[out + 1] = input[position + 1]
            output[out + 2] = input[position]
            out += 3
            position += 4
          }
        }
      }
    }
    var png: [UInt8] = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]
    var header: [UInt8] = []
    header.appendBigEndian(UInt32(width))
    header.appendBigEndian(UInt32(height))
    header += [8, 2, 0, 0, 0]  // bit depth, colour type RGB, deflate, filter method 0, no interlace
    appendChunk("IHDR", header, to: &png)
    appendChunk("IDAT", compress(raw), to: &png)
    appendChunk("IEND", [], to: &png)
    return png
  }

  /// `data` as one zlib stream (RFC 1950).
  static func compress(_ data: [UInt8]) -> [UInt8] {
    var capacity = compressBound(uLong(data.count))
    var output = [UInt8](repeating: 0, count: Int(capacity))
    let status = output.withUnsafeMutableBufferPointer { out in
      data.withUnsafeBufferPointer { input in
        compress2(out.baseAddress, &capacity, input.baseAddress, uLong(data.count), 6)
      }
    }
    precondition(status == Z_OK, "zlib compress2 failed with \(status)")
    output.removeSubrange(Int(capacity)...)
    return output
  }

  private static func appendChunk(_ type: String, _ data: [UInt8], to png: inout [UInt8]) {
    png.appendBigEndian(UInt32(data.count))
    let typeBytes = Array(type.utf8)
    var checksum = typeBytes.withUnsafeBufferPointer { crc32(0, $0.baseAddress, uInt($0.count)) }
    checksum = data.withUnsafeBufferPointer { crc32(checksum, $0.baseAddress, uInt($0.count)) }
    png += typeBytes
    png += data
    png.appendBigEndian(UInt32(truncatingIfNeeded: checksum))
  }
}

extension Array where Element == UInt8 {
  mutating func appendBigEndian(_ value: UInt32) {
    append(contentsOf: [
      UInt8(value >> 24), UInt8((value >> 16) & 0xFF), UInt8((value >> 8) & 0xFF), UInt8(value & 0xFF),
    ])
  }

  mutating func appendBigEndian(_ value: UInt16) {
    append(contentsOf: [UInt8(value >> 8), UInt8(value & 0xFF)])
  }
}
