/// An RFB pixel format (RFC 6143 7.4): how the client wants pixel values laid out.
struct VNCPixelFormat: Equatable, Sendable {
  var bitsPerPixel: UInt8
  var depth: UInt8
  var bigEndian: Bool
  var trueColour: Bool
  var redMax: UInt16
  var greenMax: UInt16
  var blueMax: UInt16
  var redShift: UInt8
  var greenShift: UInt8
  var blueShift: UInt8

  /// The server's native format: 32-bit little-endian XRGB, the framebuffer's own layout.
  static let native = VNCPixelFormat(
    bitsPerPixel: 32, depth: 24, bigEndian: false, trueColour: true, redMax: 255, greenMax: 255, blueMax: 255,
    redShift: 16, greenShift: 8, blueShift: 0)

  /// The 16 bytes of the PIXEL_FORMAT structure.
  var bytes: [UInt8] {
    var result: [UInt8] = [bitsPerPixel, depth, bigEndian ? 1 : 0, trueColour ? 1 : 0]
    result.appendBigEndian(redMax)
    result.appendBigEndian(greenMax)
    result.appendBigEndian(blueMax)
    result += [redShift, greenShift, blueShift, 0, 0, 0]
    return result
  }

  /// Parses a PIXEL_FORMAT; nil for formats this server cannot produce (colour maps, sizes
  /// other than 8, 16 or 32 bits, shifts outside the pixel).
  init?(bytes: ArraySlice<UInt8>) {
    let b = Array(bytes)
    guard b.count >= 16 else { return nil }
    func u16(_ offset: Int) -> UInt16 { UInt16(b[offset]) << 8 | UInt16(b[offset + 1]) }
    self.init(
      bitsPerPixel: b[0], depth: b[1], bigEndian: b[2] != 0, trueColour: b[3] != 0, redMax: u16(4), greenMax: u16(6),
      blueMax: u16(8), redShift: b[10], greenShift: b[11], blueShift: b[12])
    guard trueColour, [8, 16, 32].contains(bitsPerPixel), redShift < bitsPerPixel, greenShift < bitsPerPixel,
      blueShift < bitsPerPixel
    else { return nil }
  }

  init(
    bitsPerPixel: UInt8, depth: UInt8, bigEndian: Bool, trueColour: Bool, redMax: UInt16, greenMax: UInt16,
    blueMax: UInt16, redShift: UInt8, greenShift: UInt8, blueShift: UInt8
  ) {
    self.bitsPerPixel = bitsPerPixel
    self.depth = depth
    self.bigEndian = bigEndian
    self.trueColour = trueColour
    self.redMax = redMax
    self.greenMax = greenMax
    self.blueMax = blueMax
    self.redShift = redShift
    self.greenShift = greenShift
    self.blueShift = blueShift
  }

  var bytesPerPixel: Int { Int(bitsPerPixel) / 8 }

  /// The client's value for an XRGB8888 framebuffer pixel.
  @inline(__always)
  func value(ofNative pixel: UInt32) -> UInt32 {
    let red = (pixel >> 16) & 0xFF
    let green = (pixel >> 8) & 0xFF
    let blue = pixel & 0xFF
    if redMax == 255 && greenMax == 255 && blueMax == 255 {
      return red << UInt32(redShift) | green << UInt32(greenShift) | blue << UInt32(blueShift)
    }
    return (red * UInt32(redMax) / 255) << UInt32(redShift) | (green * UInt32(greenMax) / 255) << UInt32(greenShift)
      | (blue * UInt32(blueMax) / 255) << UInt32(blueShift)
  }

  /// Appends `value` as one pixel in this format's size and byte order.
  @inline(__always)
  func append(_ value: UInt32, to output: inout [UInt8]) {
    switch bitsPerPixel {
    case 8: output.append(UInt8(truncatingIfNeeded: value))
    case 16:
      appendBytes(of: value, from: bigEndian ? 1 : 0, through: bigEndian ? 0 : 1, to: &output)
    default:
      appendBytes(of: value, from: bigEndian ? 3 : 0, through: bigEndian ? 0 : 3, to: &output)
    }
  }

  /// Appends bytes `first` through `last` (byte 0 the least significant; either direction)
  /// of `value`, one by one, without building temporary arrays.
  @inline(__always)
  private func appendBytes(of value: UInt32, from first: Int, through last: Int, to output: inout [UInt8]) {
    var index = first
    while true {
      output.append(UInt8(truncatingIfNeeded: value >> (8 * UInt32(index))))
      if index == last { break }
      index += first < last ? 1 : -1
    }
  }

  /// ZRLE's compressed pixel (RFC 6143 7.7.6): three bytes when a 32-bit true-colour pixel's
  /// colours all fit in its low (or high) three bytes; else the whole pixel.
  @inline(__always)
  func appendCompressed(_ value: UInt32, to output: inout [UInt8]) {
    guard bitsPerPixel == 32, depth <= 24 else { return append(value, to: &output) }
    switch compressedLayout {
    case .lowBytes: appendBytes(of: value, from: bigEndian ? 2 : 0, through: bigEndian ? 0 : 2, to: &output)
    case .highBytes: appendBytes(of: value, from: bigEndian ? 3 : 1, through: bigEndian ? 1 : 3, to: &output)
    case .wholePixel: append(value, to: &output)
    }
  }

  enum CompressedLayout { case lowBytes, highBytes, wholePixel }

  /// Which bytes of a 32-bit pixel hold the colours (ZRLE's CPIXEL).
  var compressedLayout: CompressedLayout {
    let used =
      UInt32(redMax) << UInt32(redShift) | UInt32(greenMax) << UInt32(greenShift) | UInt32(blueMax)
      << UInt32(blueShift)
    if used & 0xFF00_0000 == 0 { return .lowBytes }
    if used & 0xFF == 0 { return .highBytes }
    return .wholePixel
  }
}
