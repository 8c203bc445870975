import Devices
import Foundation
import Glibc
import Synchronization
import Testing
import VMCore

/// `BufferedSerialBackend` behind a UART, on real pipes and files: a host consumer that stops
/// reading never blocks the transmitting (vCPU) thread; the UART reports the transmitter busy
/// while the buffer is full, and raises its THR-empty interrupt once the consumer made room.
@Suite("buffered serial output")
struct BufferedSerialBackendTests {
  static let thr: UInt32 = 0
  static let base: UInt16 = 0x3F8

  func uart(_ backend: any SerialBackend) -> SerialPort {
    SerialPort(interrupt: InterruptLine(router: InterruptRouter(), line: 4), backend: backend)
  }

  /// A pipe whose read end the test holds (not read until `drain`) behind a buffered backend
  /// of 4 KiB and a UART with the THR-empty interrupt enabled.
  final class StalledConsole {
    /// The backend's buffer, in bytes.
    static let capacity = 4096
    let readEnd: Int32
    let backend: BufferedSerialBackend
    let port: SerialPort

    init() throws {
      var ends: [Int32] = [-1, -1]
      guard pipe(&ends) == 0 else { throw SerialBackendError.cannotStartWriter(errno: errno) }
      readEnd = ends[0]
      backend = try BufferedSerialBackend(fileDescriptor: ends[1], ownsDescriptor: true, capacity: Self.capacity)
      port = SerialPort(interrupt: InterruptLine(router: InterruptRouter(), line: 4), backend: backend)
      port.portWrite(port: BufferedSerialBackendTests.base + 1, size: 1, value: 0x02)  // IER: THR empty
    }

    deinit { close(readEnd) }

    var lineStatus: UInt32 { port.portRead(port: BufferedSerialBackendTests.base + 5, size: 1) }

    /// Runs `transmit` on another thread; false if it did not return within 30 s.
    func runsToCompletion(_ transmit: @escaping @Sendable (SerialPort) -> Void) -> Bool {
      let finished = DispatchSemaphore(value: 0)
      let port = self.port
      Thread.detachNewThread {
        transmit(port)
        finished.signal()
      }
      return finished.wait(timeout: .now() + 30) == .success
    }

    /// The consumer reads again: everything that arrives until the pipe stays quiet.
    func drain() -> [UInt8] {
      _ = fcntl(readEnd, F_SETFL, O_NONBLOCK)
      var received: [UInt8] = []
      var chunk = [UInt8](repeating: 0, count: 65536)
      var quietSince = Date()
      while Date().timeIntervalSince(quietSince) < 0.5 {
        let count = read(readEnd, &chunk, chunk.count)
        if count > 0 {
          received += chunk[0..<count]
          quietSince = Date()
        } else {
          usleep(10_000)
        }
      }
      return received
    }
  }

  static let pattern = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 % 251) }

  /// A driver that waits for THRE before each byte (giving up after 100 ms, as Linux's early
  /// console does) into a console that stopped reading: it is never blocked, it sees the
  /// transmitter busy once the pipe and the buffer are full, nothing it sent is lost, and once
  /// the consumer reads again everything arrives in order and the UART raises the THR-empty
  /// interrupt.
  @Test func aDriverThatWaitsForTHRELosesNothing() throws {
    let console = try StalledConsole()
    let sent = Mutex(0)
    let bytes = Self.pattern
    try #require(
      console.runsToCompletion { port in
        for byte in bytes {
          let deadline = Date().addingTimeInterval(0.1)
          while port.portRead(port: Self.base + 5, size: 1) & 0x20 == 0 {
            guard Date() < deadline else { return }
          }
          port.portWrite(port: Self.base, size: 1, value: UInt32(byte))
          sent.withLock { $0 += 1 }
        }
      }, "a THR write blocked on the full pipe")
    let count = sent.withLock { $0 }
    #expect(count >= 32768 && count < bytes.count, "\(count) bytes sent before the transmitter stayed busy")
    #expect(console.lineStatus & 0x60 == 0, "LSR: THRE and TEMT clear while full")
    #expect(!console.port.interruptLevel, "no THR-empty interrupt while the backend is full")
    #expect(console.backend.droppedBytes == 0)
    let received = console.drain()
    #expect(received.count == count, "\(received.count) of \(count) bytes arrived")
    let firstDifference = zip(received, bytes).enumerated().first { $0.element.0 != $0.element.1 }?.offset
    #expect(firstDifference == nil, "byte \(firstDifference ?? 0) is not the one sent there")
    // Room again: the interrupt the last write waited for, and an empty transmitter.
    let deadline = Date().addingTimeInterval(5)
    while !console.port.interruptLevel && Date() < deadline { usleep(1000) }
    #expect(console.port.interruptLevel, "THR-empty interrupt once the backend had room")
    #expect(console.port.portRead(port: Self.base + 2, size: 1) & 0x0F == 0x02, "IIR: THR empty")
    #expect(console.lineStatus & 0x60 == 0x60)
  }

  /// A guest that writes THR without looking at LSR, a megabyte into a console that stopped
  /// reading: every write returns, and each byte either arrives or is counted as dropped.
  @Test func aFloodIntoAStalledConsumerIsDroppedNotBuffered() throws {
    let console = try StalledConsole()
    let bytes = Self.pattern
    #expect(
      console.runsToCompletion { port in
        for byte in bytes { port.portWrite(port: Self.base, size: 1, value: UInt32(byte)) }
      }, "a THR write blocked on the full pipe")
    #expect(console.backend.droppedBytes > 0)
    let received = console.drain()
    // At least what the buffer held arrives; how much more depends on how often the writer
    // thread ran during the flood (on a loaded host, maybe not at all).
    #expect(received.count >= StalledConsole.capacity, "\(received.count) bytes arrived")
    #expect(UInt64(received.count) + console.backend.droppedBytes == UInt64(bytes.count))
  }

  @Test func outputIsWrittenAfterTheBackendIsReleased() throws {
    let path = "/tmp/hostvisor-serial-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log"
    defer { unlink(path) }
    for text in ["first line\n", "second\n"] {
      let backend = try BufferedSerialBackend(appendingTo: path)
      let port = uart(backend)
      for byte in text.utf8 { port.portWrite(port: Self.base, size: 1, value: UInt32(byte)) }
      // Wait for the first; leave the second to the writer thread after release.
      if text == "first line\n" { #expect(backend.drain(timeout: .seconds(5))) }
    }
    let deadline = Date().addingTimeInterval(5)
    var contents = ""
    repeat {
      contents = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
      if contents == "first line\nsecond\n" { break }
      usleep(1000)
    } while Date() < deadline
    #expect(contents == "first line\nsecond\n")
  }
}
