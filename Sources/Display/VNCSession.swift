import CZlib
import Glibc

/// One VNC client, served on its own thread: the handshake, then client messages and
/// framebuffer updates until the client leaves or the server stops.
final class VNCSession {
  static let encodingRaw: Int32 = 0
  static let encodingZRLE: Int32 = 16
  static let encodingDesktopSize: Int32 = -223
  static let tileSize = 64
  /// How often a pending incremental request looks for changes (milliseconds).
  static let pollInterval: Int32 = 20

  private let server: VNCServer
  private let socket: Int32
  private let framebuffer: Framebuffer
  private var input: [UInt8] = []
  private var format = VNCPixelFormat.native
  private var useZRLE = false
  private var desktopSize = false
  /// The client's outstanding request: whether it is incremental.
  private var pendingIncremental: Bool?
  /// The image the client has (native XRGB, rows packed), after the first full update.
  private var clientImage: [UInt8]?
  private var clientWidth: Int
  private var clientHeight: Int
  private var deflateStream: UnsafeMutablePointer<z_stream>?

  init(server: VNCServer, socket: Int32) {
    self.server = server
    self.socket = socket
    self.framebuffer = server.framebuffer
    clientWidth = framebuffer.width
    clientHeight = framebuffer.height
  }

  deinit {
    if let deflateStream {
      deflateEnd(deflateStream)
      deflateStream.deallocate()
    }
  }

  func run() {
    // Messages that came in with ClientInit are handled before waiting for more bytes: the
    // wait would otherwise last up to 500 ms, or end the session first when the client closed.
    guard handshake(), processMessages() else { return }
    while !server.isStopped {
      if let incremental = pendingIncremental {
        if sendUpdate(incremental: incremental) { pendingIncremental = nil }
        guard receive(timeout: pendingIncremental == nil ? 0 : Self.pollInterval) else { return }
      } else {
        guard receive(timeout: 500) else { return }
      }
      guard processMessages() else { return }
    }
  }

  // MARK: Socket

  private func send(_ bytes: [UInt8]) -> Bool {
    var offset = 0
    while offset < bytes.count {
      let written = bytes.withUnsafeBytes { write(socket, $0.baseAddress! + offset, bytes.count - offset) }
      if written < 0 && errno == EINTR { continue }
      guard written > 0 else { return false }
      offset += written
    }
    return true
  }

  /// Waits up to `timeout` ms (-1 forever, 0 no wait) for input and appends what arrived;
  /// false when the connection ended.
  private func receive(timeout: Int32) -> Bool {
    var descriptor = pollfd(fd: socket, events: Int16(POLLIN), revents: 0)
    let ready = poll(&descriptor, 1, timeout)
    if ready < 0 { return errno == EINTR }
    if ready == 0 { return true }
    var buffer = [UInt8](repeating: 0, count: 4096)
    let count = read(socket, &buffer, buffer.count)
    if count < 0 { return errno == EINTR || errno == EAGAIN }
    guard count > 0 else { return false }
    input += buffer[0..<count]
    return true
  }

  /// Reads exactly `count` bytes during the handshake.
  private func readExactly(_ count: Int) -> [UInt8]? {
    while input.count < count {
      guard !server.isStopped, receive(timeout: 1000) else { return nil }
    }
    let bytes = Array(input[0..<count])
    input.removeFirst(count)
    return bytes
  }

  // MARK: Handshake

  private func handshake() -> Bool {
    guard send(Array("RFB 003.008\n".utf8)), let version = readExactly(12) else { return false }
    let text = String(decoding: version, as: UTF8.self)
    guard text.hasPrefix("RFB 003.") else { return false }
    let minor = Int(text.dropFirst(8).prefix(3)) ?? 3
    if minor >= 7 {
      guard send([1, 1]), let choice = readExactly(1), choice[0] == 1 else {
        _ = send([0, 0, 0, 1])
        return false
      }
      if minor >= 8 { guard send([0, 0, 0, 0]) else { return false } }  // SecurityResult: OK
    } else {
      guard send([0, 0, 0, 1]) else { return false }  // RFB 3.3: the server picks None
    }
    guard readExactly(1) != nil else { return false }  // ClientInit (shared flag: always shared)
    var initMessage: [UInt8] = []
    initMessage.appendBigEndian(UInt16(framebuffer.width))
    initMessage.appendBigEndian(UInt16(framebuffer.height))
    initMessage += VNCPixelFormat.native.bytes
    let nameBytes = Array(server.name.utf8)
    initMessage.appendBigEndian(UInt32(nameBytes.count))
    initMessage += nameBytes
    return send(initMessage)
  }

  // MARK: Client messages

  /// Handles every complete message in the input; false on a protocol error.
  private func processMessages() -> Bool {
    while let type = input.first {
      let needed: Int
      switch type {
      case 0: needed = 20
      case 2:
        guard input.count >= 4 else { return true }
        needed = 4 + 4 * (Int(input[2]) << 8 | Int(input[3]))
      case 3: needed = 10
      case 4: needed = 8
      case 5: needed = 6
      case 6:
        guard input.count >= 8 else { return true }
        let length = Int(input[4]) << 24 | Int(input[5]) << 16 | Int(input[6]) << 8 | Int(input[7])
        guard length <= 1 << 20 else { return false }
        needed = 8 + length
      default: return false
      }
      guard input.count >= needed else { return true }
      let message = Array(input[0..<needed])
      input.removeFirst(needed)
      guard handle(message) else { return false }
    }
    return true
  }

  private func handle(_ message: [UInt8]) -> Bool {
    func u16(_ offset: Int) -> Int { Int(message[offset]) << 8 | Int(message[offset + 1]) }
    func u32(_ offset: Int) -> UInt32 {
      UInt32(message[offset]) << 24 | UInt32(message[offset + 1]) << 16 | UInt32(message[offset + 2]) << 8
        | UInt32(message[offset + 3])
    }
    switch message[0] {
    case 0:
      guard let requested = VNCPixelFormat(bytes: message[4..<20]) else { return false }
      format = requested
      clientImage = nil  // everything goes again in the new format
    case 2:
      var chosen = false
      useZRLE = false
      desktopSize = false
      for index in 0..<u16(2) {
        let encoding = Int32(bitPattern: u32(4 + 4 * index))
        if encoding == Self.encodingDesktopSize { desktopSize = true }
        if !chosen && (encoding == Self.encodingRaw || encoding == Self.encodingZRLE) {
          chosen = true
          useZRLE = encoding == Self.encodingZRLE
        }
      }
    case 3:
      let incremental = message[1] != 0
      pendingIncremental = (pendingIncremental ?? true) && incremental
    case 4:
      server.input.key(u32(4), message[1] != 0)
    case 5:
      server.input.pointer(u16(2), u16(4), message[1])
    default:
      break  // ClientCutText: ignored
    }
    return true
  }

  // MARK: Updates

  /// Sends what changed (everything for a non-incremental request); false when an
  /// incremental request found nothing new.
  private func sendUpdate(incremental: Bool) -> Bool {
    let width = framebuffer.width
    let height = framebuffer.height
    var rectangles: [(x: Int, y: Int, width: Int, height: Int)] = []
    let resized = width != clientWidth || height != clientHeight
    if let previous = clientImage, incremental, !resized {
      // Compare the live framebuffer with what the client has, without copying it first.
      let rowBytes = width * 4
      for tileY in stride(from: 0, to: height, by: Self.tileSize) {
        let tileHeight = min(Self.tileSize, height - tileY)
        var runStart: Int?
        for tileX in stride(from: 0, through: width, by: Self.tileSize) {
          var changed = false
          if tileX < width {
            let bytes = min(Self.tileSize, width - tileX) * 4
            previous.withUnsafeBytes { before in
              for y in tileY..<(tileY + tileHeight) where !changed {
                let now = framebuffer.row(y).baseAddress! + tileX * 4
                changed = memcmp(now, before.baseAddress! + y * rowBytes + tileX * 4, bytes) != 0
              }
            }
          }
          if changed {
            if runStart == nil { runStart = tileX }
          } else if let start = runStart {
            rectangles.append((start, tileY, min(tileX, width) - start, tileHeight))
            runStart = nil
          }
        }
      }
      if rectangles.isEmpty { return false }
    } else {
      rectangles = [(0, 0, width, height)]
    }
    let image = framebuffer.copyImage()
    // The client's copy changes only where it is sent something: a tile the guest changed
    // after the comparison above is found (and sent) next time.
    var known = clientImage ?? image
    if clientImage != nil {
      let rowBytes = width * 4
      known.withUnsafeMutableBytes { target in
        image.withUnsafeBytes { source in
          for rectangle in rectangles {
            for y in rectangle.y..<(rectangle.y + rectangle.height) {
              let offset = y * rowBytes + rectangle.x * 4
              memcpy(target.baseAddress! + offset, source.baseAddress! + offset, rectangle.width * 4)
            }
          }
        }
      }
    }
    var message: [UInt8] = [0, 0]
    let sendSize = resized && desktopSize
    message.appendBigEndian(UInt16(rectangles.count + (sendSize ? 1 : 0)))
    if sendSize {
      message += [0, 0, 0, 0]
      message.appendBigEndian(UInt16(width))
      message.appendBigEndian(UInt16(height))
      message.appendBigEndian(UInt32(bitPattern: Self.encodingDesktopSize))
    }
    clientWidth = width
    clientHeight = height
    for rectangle in rectangles {
      message.appendBigEndian(UInt16(rectangle.x))
      message.appendBigEndian(UInt16(rectangle.y))
      message.appendBigEndian(UInt16(rectangle.width))
      message.appendBigEndian(UInt16(rectangle.height))
      if useZRLE {
        message.appendBigEndian(UInt32(bitPattern: Self.encodingZRLE))
        guard let compressed = zrle(image, width: width, rectangle) else { return true }
        message.appendBigEndian(UInt32(compressed.count))
        message += compressed
      } else {
        message.appendBigEndian(UInt32(bitPattern: Self.encodingRaw))
        message.reserveCapacity(message.count + rectangle.width * rectangle.height * format.bytesPerPixel)
        for y in rectangle.y..<(rectangle.y + rectangle.height) {
          appendPixels(image, offset: (y * width + rectangle.x) * 4, count: rectangle.width, to: &message)
        }
      }
    }
    clientImage = known
    _ = send(message)
    return true
  }

  private func nativePixel(_ image: UnsafeRawBufferPointer, _ offset: Int) -> UInt32 {
    UInt32(littleEndian: image.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
  }

  private func appendPixels(_ image: [UInt8], offset: Int, count: Int, to output: inout [UInt8]) {
    image.withUnsafeBytes { pixels in
      if format == .native {
        output += pixels[offset..<(offset + count * 4)]
        return
      }
      for index in 0..<count {
        format.append(format.value(ofNative: nativePixel(pixels, offset + index * 4)), to: &output)
      }
    }
  }

  /// A rectangle as ZRLE data (64x64 tiles, solid or raw CPIXELs) deflated with the
  /// connection's zlib stream; nil if zlib fails.
  private func zrle(_ image: [UInt8], width: Int, _ rectangle: (x: Int, y: Int, width: Int, height: Int)) -> [UInt8]? {
    var tiles: [UInt8] = []
    tiles.reserveCapacity(rectangle.width * rectangle.height * 3 + 64)
    image.withUnsafeBytes { pixels in
      for tileY in stride(from: rectangle.y, to: rectangle.y + rectangle.height, by: Self.tileSize) {
        let tileHeight = min(Self.tileSize, rectangle.y + rectangle.height - tileY)
        for tileX in stride(from: rectangle.x, to: rectangle.x + rectangle.width, by: Self.tileSize) {
          let tileWidth = min(Self.tileSize, rectangle.x + rectangle.width - tileX)
          let first = nativePixel(pixels, (tileY * width + tileX) * 4)
          var solid = true
          for y in tileY..<(tileY + tileHeight) where solid {
            for x in tileX..<(tileX + tileWidth) where nativePixel(pixels, (y * width + x) * 4) != first {
              solid = false
              break
            }
          }
          if solid {
            tiles.append(1)
            format.appendCompressed(format.value(ofNative: first), to: &tiles)
            continue
          }
          tiles.append(0)
          for y in tileY..<(tileY + tileHeight) {
            for x in tileX..<(tileX + tileWidth) {
              format.appendCompressed(format.value(ofNative: nativePixel(pixels, (y * width + x) * 4)), to: &tiles)
            }
          }
        }
      }
    }
    return deflate(tiles)
  }

  /// Compresses `data` on the connection's one zlib stream, ending with a sync flush.
  private func deflate(_ data: [UInt8]) -> [UInt8]? {
    if deflateStream == nil {
      let stream = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
      stream.initialize(to: z_stream())
      guard deflateInit_(stream, 6, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
        stream.deallocate()
        return nil
      }
      deflateStream = stream
    }
    guard let stream = deflateStream else { return nil }
    var output: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    var source = data
    return source.withUnsafeMutableBufferPointer { input -> [UInt8]? in
      stream.pointee.next_in = input.baseAddress
      stream.pointee.avail_in = uInt(input.count)
      repeat {
        let produced = chunk.withUnsafeMutableBufferPointer { out -> Int? in
          stream.pointee.next_out = out.baseAddress
          stream.pointee.avail_out = uInt(out.count)
          let status = CZlib.deflate(stream, Z_SYNC_FLUSH)
          guard status == Z_OK || status == Z_BUF_ERROR else { return nil }
          return out.count - Int(stream.pointee.avail_out)
        }
        guard let produced else { return nil }
        output += chunk[0..<produced]
      } while stream.pointee.avail_out == 0
      return output
    }
  }
}
