import Display
import Foundation
import Synchronization
import TestSupport
import Testing
import VMCore

/// The VNC server against an RFB client written in Python from RFC 6143 (handshake, pixel
/// format, Raw and ZRLE decoding, incremental updates, key events), two clients at a time.
@Suite(.serialized) struct VNCServerTests {
  static let client = """
    import socket, struct, sys, zlib
    port, mode, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    s = socket.create_connection(('127.0.0.1', port))
    def recv(n):
        b = b''
        while len(b) < n:
            c = s.recv(n - len(b))
            if not c: raise SystemExit('connection closed')
            b += c
        return b
    assert recv(12) == b'RFB 003.008\\n'
    s.sendall(b'RFB 003.008\\n')
    types = recv(recv(1)[0])
    assert 1 in types, 'no security type None'
    s.sendall(b'\\x01')
    assert struct.unpack('>I', recv(4))[0] == 0, 'security result'
    s.sendall(b'\\x01')
    w, h = struct.unpack('>HH', recv(4))
    recv(16)
    recv(struct.unpack('>I', recv(4))[0])
    # vncdotool's pixel format: 32 bits, little-endian, red in the lowest byte.
    s.sendall(struct.pack('>B3xBBBBHHHBBB3x', 0, 32, 24, 0, 1, 255, 255, 255, 0, 8, 16))
    encodings = [16, 0, -223] if mode == 'zrle' else [0, -223]
    s.sendall(struct.pack('>BxH', 2, len(encodings)) + b''.join(struct.pack('>i', e) for e in encodings))
    image = bytearray(w * h * 3)
    inflater = zlib.decompressobj()
    def update(incremental):
        s.sendall(struct.pack('>BBHHHH', 3, incremental, 0, 0, w, h))
        assert recv(1)[0] == 0, 'message type'
        recv(1)
        rects = []
        for _ in range(struct.unpack('>H', recv(2))[0]):
            x, y, rw, rh, e = struct.unpack('>HHHHi', recv(12))
            rects.append((x, y, rw, rh, e))
            if e == 0:
                data = recv(rw * rh * 4)
                for j in range(rh):
                    for i in range(rw):
                        o, p = ((y + j) * w + x + i) * 3, (j * rw + i) * 4
                        image[o:o + 3] = data[p:p + 3]
            elif e == 16:
                data = inflater.decompress(recv(struct.unpack('>I', recv(4))[0]))
                pos = 0
                for ty in range(y, y + rh, 64):
                    for tx in range(x, x + rw, 64):
                        tw, th = min(64, x + rw - tx), min(64, y + rh - ty)
                        sub = data[pos]
                        pos += 1
                        for j in range(th):
                            for i in range(tw):
                                o = ((ty + j) * w + tx + i) * 3
                                image[o:o + 3] = data[pos:pos + 3]
                                if sub == 0: pos += 3
                        if sub == 1: pos += 3
                        assert sub in (0, 1), 'subencoding %d' % sub
                assert pos == len(data), 'ZRLE length'
            else:
                raise SystemExit('unexpected encoding %d' % e)
        return rects
    update(0)
    open(out + '.full', 'wb').write(image)
    print('READY', flush=True)
    sys.stdin.readline()
    rects = update(1)
    open(out + '.after', 'wb').write(image)
    s.sendall(struct.pack('>BBxxI', 4, 1, 0x41) + struct.pack('>BBxxI', 4, 0, 0x41))
    print('RECTS ' + ' '.join('%d,%d,%d,%d' % r[:4] for r in rects), flush=True)
    """

  /// The framebuffer as packed RGB, what the client should hold.
  static func rgb(_ framebuffer: Framebuffer) -> [UInt8] {
    var result: [UInt8] = []
    let image = framebuffer.copyImage()
    for index in stride(from: 0, to: image.count, by: 4) {
      result += [image[index + 2], image[index + 1], image[index]]
    }
    return result
  }

  @Test func rawAndZRLEClientsSeeFullAndIncrementalUpdates() throws {
    let memory = try GuestMemory(size: 2 << 20)
    let (width, height) = (320, 200)
    let framebuffer = try Framebuffer(
      memory: memory, guestAddress: 0xC000_0000, width: width, height: height,
      size: Framebuffer.memorySize(width: width, height: height))
    let pixels = memory.deviceRegions[0].host.assumingMemoryBound(to: UInt32.self)
    for y in 0..<height {
      for x in 0..<width {
        // A few flat tiles (ZRLE solid tiles) and a gradient elsewhere.
        pixels[y * width + x] =
          x < 128 && y < 64 ? 0x0012_3456 : UInt32(x & 0xFF) << 16 | UInt32(y & 0xFF) << 8 | UInt32((x ^ y) & 0xFF)
      }
    }
    let keys = Mutex<[String]>([])
    let server = try VNCServer(
      framebuffer: framebuffer, listenAddress: "127.0.0.1:0",
      input: VNCInputHandlers(key: { keysym, down in keys.withLock { $0.append("\(keysym)\(down ? "+" : "-")") } }))
    defer { server.stop() }
    let port = String(server.address.split(separator: ":").last!)
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("hv-vnc-\(getpid())")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: directory) }

    var clients: [(process: HostProcess, output: CollectedOutput, path: String)] = []
    for mode in ["zrle", "raw"] {
      let path = directory.appendingPathComponent(mode).path
      let output = CollectedOutput()
      let process = try HostProcess(
        "/usr/bin/python3", ["-c", Self.client, port, mode, path], errors: { _ in }, output: { output.append($0) })
      clients.append((process, output, path))
    }
    defer { for client in clients where client.process.isRunning { client.process.signal(SIGKILL) } }
    let before = Self.rgb(framebuffer)
    for client in clients { #expect(client.output.nextLine() == "READY") }
    #expect(server.clientCount == 2)
    for client in clients {
      #expect(try Data(contentsOf: URL(fileURLWithPath: client.path + ".full")) == Data(before))
    }
    // Change a 10x10 block inside the tile at (64, 64).
    for y in 70..<80 { for x in 100..<110 { pixels[y * width + x] = 0x00FF_00FF } }
    let after = Self.rgb(framebuffer)
    for client in clients { client.process.write(Data("GO\n".utf8)) }
    for client in clients {
      #expect(client.output.nextLine() == "RECTS 64,64,64,64", "only the changed tile")
      #expect(client.process.waitUntilExit(timeout: 60))
      #expect(client.process.terminationStatus == 0)
      #expect(try Data(contentsOf: URL(fileURLWithPath: client.path + ".after")) == Data(after))
    }
    let deadline = ContinuousClock.now + .seconds(10)
    while keys.withLock({ $0.count }) < 4 && ContinuousClock.now < deadline { usleep(10_000) }
    #expect(keys.withLock { $0 } == ["65+", "65-", "65+", "65-"])
  }

  @Test func badAddressIsOneClearError() {
    #expect(throws: VNCServerError.self) {
      let memory = try GuestMemory(size: 2 << 20)
      let framebuffer = try Framebuffer(memory: memory, guestAddress: 0xC000_0000, width: 64, height: 64, size: 1 << 16)
      _ = try VNCServer(framebuffer: framebuffer, listenAddress: "nohost:99999")
    }
  }
}
