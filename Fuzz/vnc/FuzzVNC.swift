import FuzzSupport
import Glibc
import Synchronization
import VMCore

@testable import Display

/// The VNC server's handling of one client: the RFB handshake (protocol version, security type,
/// ClientInit), then client messages (SetPixelFormat, SetEncodings, FramebufferUpdateRequest,
/// KeyEvent, PointerEvent, ClientCutText) and the framebuffer updates they ask for (Raw or ZRLE
/// in the client's pixel format, whole or the tiles that changed).
///
/// Input: a byte choosing the framebuffer (64x48, or 100x37 whose edge tiles are partial) and
/// how it is painted (one colour, a gradient, or both halves), a 32-bit colour, then the byte
/// stream of the client. The stream is written into one end of a Unix stream socket pair,
/// which is then closed for writing; a `VNCSession` serves the other end on the fuzzer's
/// thread, as the server's client thread does, until the stream ends or the session refuses
/// it. A pointer event paints the pixel under the pointer and a key event the pixel its keysym
/// selects, as a guest reacting to input would, so incremental updates find changed tiles. The
/// server object is real (it listens on a port of 127.0.0.1 that nobody connects to); the
/// session never touches that socket.
@main
enum FuzzVNC {
  /// A framebuffer and the server around it, made once per shape.
  final class Rig {
    let framebuffer: Framebuffer
    let server: VNCServer

    init(width: Int, height: Int) {
      let memory = try! GuestMemory(size: 1 << 20)
      let framebuffer = try! Framebuffer(
        memory: memory, guestAddress: 0xE000_0000, width: width, height: height,
        size: Framebuffer.memorySize(width: width, height: height))
      self.framebuffer = framebuffer
      let input = VNCInputHandlers(
        key: { keysym, down in
          FuzzVNC.paint(framebuffer, at: Int(keysym & 0xFFFF), colour: down ? keysym : ~keysym)
          FuzzDriver.count("key events")
        },
        pointer: { x, y, buttons in
          FuzzVNC.paint(framebuffer, at: y * framebuffer.width + x, colour: UInt32(buttons) &* 0x0101_0101)
          FuzzDriver.count("pointer events")
        })
      server = try! VNCServer(framebuffer: framebuffer, listenAddress: "127.0.0.1:0", name: "fuzz", input: input)
    }
  }

  nonisolated(unsafe) static var rigs: [Int: Rig] = [:]

  static func main() {
    FuzzDriver.run(name: "vnc", seeds: seeds) { input in runOne(&input) }
  }

  /// Paints pixel `index` (modulo the pixel count) with `colour`.
  static func paint(_ framebuffer: Framebuffer, at index: Int, colour: UInt32) {
    let pixel = index % (framebuffer.width * framebuffer.height)
    let offset = (pixel / framebuffer.width) * framebuffer.stride + (pixel % framebuffer.width) * 4
    framebuffer.write(offset: UInt64(offset), size: 4, value: UInt64(colour))
  }

  static func runOne(_ input: inout FuzzInput) {
    let shape = input.byte()
    let colour = input.integer(UInt32.self)
    let rig: Rig
    if let existing = rigs[Int(shape & 1)] {
      rig = existing
    } else {
      rig = shape & 1 == 0 ? Rig(width: 64, height: 48) : Rig(width: 100, height: 37)
      rigs[Int(shape & 1)] = rig
    }
    let framebuffer = rig.framebuffer
    for y in 0..<framebuffer.height {
      for x in 0..<framebuffer.width {
        let gradient = UInt32(truncatingIfNeeded: x &* 0x0302_01 &+ y &* 0x0001_0203)
        let value: UInt32
        switch (shape >> 1) % 3 {
        case 0: value = colour
        case 1: value = colour ^ gradient
        default: value = x < framebuffer.width / 2 ? colour : colour ^ gradient
        }
        framebuffer.write(offset: UInt64(y * framebuffer.stride + x * 4), size: 4, value: UInt64(value))
      }
    }
    let stream = input.rest()

    var pair: [Int32] = [-1, -1]
    precondition(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0)
    defer {
      close(pair[0])
      close(pair[1])
    }
    // Room for the client's stream and for every update the session sends back (the client's
    // end is read only after the session ends).
    var size: Int32 = 4 << 20
    for descriptor in pair {
      setsockopt(descriptor, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
      setsockopt(descriptor, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    }
    let written = stream.withUnsafeBytes { write(pair[1], $0.baseAddress, $0.count) }
    precondition(written == stream.count, "the stream does not fit the socket buffer")
    shutdown(pair[1], Int32(SHUT_WR))
    VNCSession(server: rig.server, socket: pair[0]).run()
    FuzzDriver.count("sessions")

    // What the server sent: the handshake and the updates.
    _ = fcntl(pair[1], F_SETFL, fcntl(pair[1], F_GETFL) | O_NONBLOCK)
    var buffer = [UInt8](repeating: 0, count: 65536)
    var sent = 0
    while true {
      let count = read(pair[1], &buffer, buffer.count)
      guard count > 0 else { break }
      sent += count
    }
    FuzzDriver.count("bytes sent to clients", UInt64(sent))
  }

  /// A big-endian 16- or 32-bit field.
  static func big<T: FixedWidthInteger>(_ value: T) -> [UInt8] { withUnsafeBytes(of: value.bigEndian) { Array($0) } }

  /// Clients as they start: RFB 3.8, 3.7 and 3.3 handshakes, then requests for Raw and ZRLE
  /// updates in the native and a 16-bit format, input events and cut text.
  static func seeds() -> [[UInt8]] {
    let handshake38 = Array("RFB 003.008\n".utf8) + [1, 1]
    let handshake37 = Array("RFB 003.007\n".utf8) + [1, 1]
    let handshake33 = Array("RFB 003.003\n".utf8) + [1]
    let rgb565: [UInt8] = [16, 16, 0, 1] + big(UInt16(31)) + big(UInt16(63)) + big(UInt16(31)) + [11, 5, 0, 0, 0, 0]
    let setPixelFormat: [UInt8] = [0, 0, 0, 0] + rgb565
    func setEncodings(_ encodings: [Int32]) -> [UInt8] {
      [2, 0] + big(UInt16(encodings.count)) + encodings.flatMap { big($0) }
    }
    func updateRequest(incremental: Bool) -> [UInt8] {
      [3, incremental ? 1 : 0] + big(UInt16(0)) + big(UInt16(0)) + big(UInt16(100)) + big(UInt16(48))
    }
    let key: [UInt8] = [4, 1, 0, 0] + big(UInt32(0xFF0D))
    let pointer: [UInt8] = [5, 1] + big(UInt16(10)) + big(UInt16(20))
    let cutText: [UInt8] = [6, 0, 0, 0] + big(UInt32(5)) + Array("hello".utf8)
    return [
      [0] + big(UInt32(0x0011_2233)) + handshake38 + setEncodings([16, 0, -223]) + updateRequest(incremental: false)
        + pointer + updateRequest(incremental: true) + key + cutText,
      [3] + big(UInt32(0x0080_4020)) + handshake37 + setPixelFormat + setEncodings([0])
        + updateRequest(incremental: false)
        + key + updateRequest(incremental: true),
      [5] + big(UInt32(0x00FF_FFFF)) + handshake33 + setPixelFormat + setEncodings([16])
        + updateRequest(incremental: false),
    ]
  }
}
