import Display
import Foundation
import TestSupport
import Testing

/// PNG screenshots checked by Python's zlib and struct modules, an independent decoder.
@Suite struct PNGEncoderTests {
  @Test func pythonDecodesTheSamePixels() throws {
    let width = 37
    let height = 11
    var pixels = [UInt8](repeating: 0, count: width * height * 4)
    var expected: [UInt8] = []
    for y in 0..<height {
      for x in 0..<width {
        let (red, green, blue) = (UInt8(x * 7 & 0xFF), UInt8(y * 23 & 0xFF), UInt8((x ^ y) * 5 & 0xFF))
        pixels[(y * width + x) * 4] = blue
        pixels[(y * width + x) * 4 + 1] = green
        pixels[(y * width + x) * 4 + 2] = red
        pixels[(y * width + x) * 4 + 3] = 0xEE
        expected += [red, green, blue]
      }
    }
    let png = PNGEncoder.encode(xrgb: pixels, width: width, height: height, stride: width * 4)
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("hv-png-\(getpid())")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: directory) }
    let file = directory.appendingPathComponent("image.png")
    try Data(png).write(to: file)
    let decoded = try PNGCheck.decodeRGB(file.path)
    #expect(decoded.width == width && decoded.height == height)
    #expect(decoded.rgb == expected)
  }
}

/// Decodes an 8-bit RGB PNG with python3 (zlib, struct, binascii.crc32 on every chunk); fails on
/// any malformed chunk or checksum.
enum PNGCheck {
  struct Image {
    var width: Int
    var height: Int
    var rgb: [UInt8]
  }

  static let script = """
    import sys, struct, zlib, binascii
    data = open(sys.argv[1], 'rb').read()
    assert data[:8] == b'\\x89PNG\\r\\n\\x1a\\n', 'signature'
    pos, idat, width, height = 8, b'', 0, 0
    while pos < len(data):
        length, kind = struct.unpack('>I4s', data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc, = struct.unpack('>I', data[pos + 8 + length:pos + 12 + length])
        assert binascii.crc32(kind + body) & 0xffffffff == crc, 'crc of ' + kind.decode()
        if kind == b'IHDR':
            width, height, depth, colour, _, _, _ = struct.unpack('>IIBBBBB', body)
            assert depth == 8 and colour == 2, 'format'
        elif kind == b'IDAT':
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    row = 1 + width * 3
    assert len(raw) == row * height, 'size'
    out = bytearray()
    for y in range(height):
        assert raw[y * row] == 0, 'filter'
        out += raw[y * row + 1:(y + 1) * row]
    sys.stdout.write('%d %d\\n' % (width, height))
    sys.stdout.flush()
    sys.stdout.buffer.write(bytes(out))
    """

  static func decodeRGB(_ path: String) throws -> Image {
    let result = try HostCommand.run("/usr/bin/python3", ["-c", script, path], timeout: 120)
    let output = result.output
    guard result.status == 0, !result.timedOut, let newline = output.firstIndex(of: 0x0A) else {
      throw CheckFailure("python3 could not decode \(path)")
    }
    let header = String(decoding: output[..<newline], as: UTF8.self).split(separator: " ").compactMap { Int($0) }
    guard header.count == 2 else { throw CheckFailure("bad header from python3") }
    return Image(width: header[0], height: header[1], rgb: Array(output[(newline + 1)...]))
  }
}

struct CheckFailure: Error, CustomStringConvertible {
  let description: String
  init(_ description: String) { self.description = description }
}
