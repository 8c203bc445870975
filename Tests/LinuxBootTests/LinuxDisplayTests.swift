import Foundation
import TestSupport
import Testing

/// Debian's kernels (cloud and generic) on the display: efifb binds to the framebuffer announced in screen_info, a
/// real VNC client (vncdotool) sees the boot text and types on tty1 through the PS/2
/// keyboard, and a pattern the guest writes to /dev/fb0 comes back byte for byte in
/// `hostvisor ctl screenshot`'s PNG.
@Suite(.serialized) struct LinuxDisplayTests {
  static var hostvisor: String {
    URL(
      fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
        ?? CommandLine.arguments[0]
    ).deletingLastPathComponent().appendingPathComponent("hostvisor").path
  }

  /// Pixel `index` of the pattern the guest writes (B, G, R, X), never 0 so awk prints it.
  static func patternPixel(_ index: Int) -> [UInt8] {
    [UInt8(1 + index * 7 % 255), UInt8(1 + index * 13 % 255), UInt8(1 + index * 29 % 255), 255]
  }

  @Test(.timeLimit(.minutes(15)), arguments: ["guest", "guest-generic"])
  func efifbVNCKeyboardAndScreenshot(guest: String) async throws {
    guard (try? hostCommand("vncdo", ["--version"]))?.status == 0 else {
      Issue.record("vncdo is missing: scripts/install-deps.sh installs vncdotool")
      return
    }
    let images = try GuestImages.images(guest)
    let directory = NSTemporaryDirectory() + "hv-display-\(guest)-\(getpid())"
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let socket = directory + "/api.sock"
    // The last console= is /dev/console: the initramfs shell runs on tty1 (the framebuffer);
    // the kernel's messages also go to the serial port, which the test reads.
    let session = try GuestSession(arguments: [
      "run", "--accel", "soft", "--memory", "256M", "--kernel", images.kernel, "--initrd", images.initrd,
      "--cmdline", "console=ttyS0 console=tty0", "--display", "vnc=127.0.0.1:0", "--api-sock", socket,
    ])
    defer { session.kill() }
    do {
      _ = try await session.waitFor("fb0: EFI VGA frame buffer device", timeout: .seconds(400))
      let listening = try await session.waitFor(
        "\n", after: session.text.range(of: "VNC server listening on ")?.upperBound, timeout: .seconds(5))
      let port = try #require(
        listening.split(separator: ":").last.map { String($0).trimmingCharacters(in: .whitespaces) })
      let server = "127.0.0.1::\(port)"
      _ = try await session.waitFor("Run /init as init process", timeout: .seconds(300))
      try await Task.sleep(for: .seconds(5))

      // vncdotool's capture shows the boot text: many lit pixels.
      let capture = directory + "/capture.png"
      #expect(try hostCommand("vncdo", ["--timeout", "120", "-s", server, "capture", capture]).status == 0)
      let lit = try host(
        "python3",
        [
          "-c",
          "import sys; from PIL import Image; im = Image.open(sys.argv[1]).convert('RGB'); print(sum(1 for p in im.getdata() if p != (0, 0, 0)))",
          capture,
        ])
      #expect((Int(lit.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0) > 2000, "the capture shows text")

      // Typing on tty1 through VNC key events and the PS/2 keyboard.
      let typed = try hostCommand(
        "vncdo", ["--timeout", "120", "-s", server, "type", "echo KBD_OK > /dev/ttyS0", "key", "enter"])
      #expect(typed.status == 0)
      _ = try await session.waitFor("KBD_OK", timeout: .seconds(180))

      // A pattern in the top 16 rows of /dev/fb0, typed through the API's sendkey.
      let pixels = 1024 * 16
      let command =
        "echo 0 > /sys/class/graphics/fbcon/cursor_blink; awk 'BEGIN{for(i=0;i<\(pixels);i++) printf \"%c%c%c%c\", 1+(i*7)%255, 1+(i*13)%255, 1+(i*29)%255, 255}' > /dev/fb0; echo FB_DONE > /dev/ttyS0; sleep 60\n"
      let sent = try hostCommand(Self.hostvisor, ["ctl", "--api-sock", socket, "type", command])
      #expect(sent.status == 0)
      _ = try await session.waitFor("FB_DONE", timeout: .seconds(180))
      let screenshot = directory + "/screen.png"
      #expect(try hostCommand(Self.hostvisor, ["ctl", "--api-sock", socket, "screenshot", screenshot]).status == 0)
      let decoded = try PNGDecoder.decodeRGB(screenshot)
      #expect(decoded.width == 1024 && decoded.height == 768)
      var expected: [UInt8] = []
      for index in 0..<pixels {
        let pixel = Self.patternPixel(index)
        expected += [pixel[2], pixel[1], pixel[0]]
      }
      let firstRows = Array(decoded.rgb.prefix(pixels * 3))
      #expect(firstRows == expected, "the guest's /dev/fb0 pattern, byte for byte")
    } catch {
      session.saveTranscript(name: "display-\(guest)")
      throw error
    }
  }

  /// A pointer move and a click from vncdotool reach the guest's event device for the virtio
  /// tablet: ABS_X/ABS_Y scaled from the client's coordinates (c * 0x7FFF / (size - 1)), then
  /// BTN_LEFT pressed and released, read back as raw input_event records.
  @Test(.timeLimit(.minutes(15)))
  func vncPointerReachesTheVirtioTablet() async throws {
    guard (try? hostCommand("vncdo", ["--version"]))?.status == 0 else {
      Issue.record("vncdo is missing: scripts/install-deps.sh installs vncdotool")
      return
    }
    let images = try GuestImages.images("guest")
    // The shell stays on the serial port (the last console=), where the test types.
    let session = try GuestSession(arguments: [
      "run", "--accel", "soft", "--memory", "256M", "--kernel", images.kernel, "--initrd", images.initrd,
      "--cmdline", "console=tty0 console=ttyS0 panic=-1 hostvisor.modules=virtio_pci,virtio_input,evdev",
      "--display", "vnc=127.0.0.1:0",
    ])
    defer { session.kill() }
    do {
      let listening = try await session.waitFor(
        "\n", after: try await Self.waitForVNCLine(session), timeout: .seconds(5))
      let port = try #require(
        listening.split(separator: ":").last.map { String($0).trimmingCharacters(in: .whitespaces) })
      let server = "127.0.0.1::\(port)"
      try await session.waitForShell()
      let device = try await session.run(
        "for d in /sys/class/input/event*; do grep -q 'Hostvisor Tablet' $d/device/name && echo ${d##*/}; done")
      try #require(device.hasPrefix("event"), "no event device named Hostvisor Tablet: '\(device)'")
      _ = try await session.run("cat /dev/input/\(device) > /tmp/events & sleep 1")

      let (x, y) = (300, 200)
      #expect(
        try hostCommand("vncdo", ["--timeout", "120", "-s", server, "move", "\(x)", "\(y)", "click", "1"]).status == 0)
      // Four reports: the move, the press, the release (each with its SYN_REPORT); the
      // repeated position is filtered by the guest's input core.
      var size = 0
      for _ in 0..<60 where size < 6 * 24 {
        try await Task.sleep(for: .seconds(2))
        size = Int(try await session.run("wc -c < /tmp/events")) ?? 0
      }
      let dump = try await session.run("od -An -tx1 -v /tmp/events")
      let bytes = dump.split(whereSeparator: { $0 == " " || $0.isNewline }).compactMap { UInt8($0, radix: 16) }
      #expect(bytes.count % 24 == 0 && bytes.count >= 6 * 24, "\(bytes.count) bytes of events")
      // struct input_event on x86-64: 16 bytes of time, u16 type, u16 code, s32 value.
      let events = stride(from: 0, to: bytes.count - bytes.count % 24, by: 24).map { start -> [Int] in
        let field = { (offset: Int, count: Int) in
          (0..<count).reduce(0) { $0 | Int(bytes[start + offset + $1]) << ($1 * 8) }
        }
        return [field(16, 2), field(18, 2), field(20, 4)]
      }
      let (evAbs, evKey, absX, absY, buttonLeft) = (3, 1, 0, 1, 0x110)
      #expect(events.contains([evAbs, absX, x * 0x7FFF / 1023]), "\(events)")
      #expect(events.contains([evAbs, absY, y * 0x7FFF / 767]), "\(events)")
      let press = events.firstIndex(of: [evKey, buttonLeft, 1])
      let release = events.firstIndex(of: [evKey, buttonLeft, 0])
      #expect(press != nil && release != nil && press! < release!, "\(events)")
    } catch {
      session.saveTranscript(name: "display-tablet")
      throw error
    }
  }

  /// Waits for the VNC server's address line; returns where the address starts.
  static func waitForVNCLine(_ session: GuestSession) async throws -> String.Index? {
    let marker = "VNC server listening on "
    _ = try await session.waitFor(marker, timeout: .seconds(60))
    return session.text.range(of: marker)?.upperBound
  }
}

/// Decodes an 8-bit RGB PNG with python3's zlib and struct (checking every chunk's CRC).
enum PNGDecoder {
  struct Image {
    var width: Int
    var height: Int
    var rgb: [UInt8]
  }

  static let script = """
    import sys, struct, zlib, binascii
    data = open(sys.argv[1], 'rb').read()
    assert data[:8] == b'\\x89PNG\\r\\n\\x1a\\n'
    pos, idat = 8, b''
    while pos < len(data):
        length, kind = struct.unpack('>I4s', data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert binascii.crc32(kind + body) & 0xffffffff == struct.unpack('>I', data[pos + 8 + length:pos + 12 + length])[0]
        if kind == b'IHDR':
            width, height, depth, colour = struct.unpack('>IIBB', body[:10])
            assert depth == 8 and colour == 2
        elif kind == b'IDAT':
            idat += body
        pos += 12 + length
    raw, row = zlib.decompress(idat), 1 + width * 3
    sys.stdout.write('%d %d\\n' % (width, height))
    sys.stdout.flush()
    sys.stdout.buffer.write(b''.join(raw[y * row + 1:(y + 1) * row] for y in range(height) if raw[y * row] == 0))
    """

  static func decodeRGB(_ path: String) throws -> Image {
    let result = try HostCommand.run("/usr/bin/python3", ["-c", script, path], errors: .discarded)
    let output = result.output
    let newline = try #require(output.firstIndex(of: 0x0A), "python3 could not decode \(path)")
    let header = String(decoding: output[..<newline], as: UTF8.self).split(separator: " ").compactMap { Int($0) }
    try #require(result.status == 0 && header.count == 2)
    return Image(width: header[0], height: header[1], rgb: Array(output[(newline + 1)...]))
  }
}
