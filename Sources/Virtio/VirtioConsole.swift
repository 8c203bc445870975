import Glibc
import Synchronization
import VMCore

/// Where the bytes a guest writes to its virtio console go. Called on the device's worker
/// thread, in guest order; it must not call back into the console.
public protocol VirtioConsoleBackend: AnyObject, Sendable {
  /// Sends guest output to the host side.
  func write(_ bytes: UnsafeRawBufferPointer)
}

/// Why a console backend could not be opened.
public enum VirtioConsoleBackendError: Error, Equatable, Sendable, CustomStringConvertible {
  case cannotOpen(path: String, errno: Int32)
  public var description: String {
    switch self {
    case .cannotOpen(let path, let err):
      return "cannot open console output file '\(path)': \(String(cString: strerror(err)))"
    }
  }
}

/// Writes all of `bytes` to `fd`, retrying on EINTR, short writes and EAGAIN.
func writeAll(fd: Int32, _ bytes: UnsafeRawBufferPointer) {
  guard var pointer = bytes.baseAddress else { return }
  var remaining = bytes.count
  while remaining > 0 {
    let written = Glibc.write(fd, pointer, remaining)
    if written > 0 {
      pointer += written
      remaining -= written
    } else if written < 0 && errno == EINTR {
      continue
    } else if written < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
      var waiter = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
      _ = poll(&waiter, 1, 100)
    } else {
      return
    }
  }
}

/// Guest output to a host descriptor (standard output by default); host input comes from
/// whatever calls `VirtioConsole.receive(_:)` (e.g. the terminal console's reader thread).
public final class StdioConsoleBackend: VirtioConsoleBackend {
  /// The descriptor written to (not closed).
  public let fileDescriptor: Int32
  public init(fileDescriptor: Int32 = STDOUT_FILENO) { self.fileDescriptor = fileDescriptor }
  public func write(_ bytes: UnsafeRawBufferPointer) { writeAll(fd: fileDescriptor, bytes) }
}

/// Appends guest output to a file, created if missing.
public final class FileConsoleBackend: VirtioConsoleBackend {
  public let path: String
  private let fileDescriptor: Int32
  public init(path: String) throws(VirtioConsoleBackendError) {
    let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
    guard fd >= 0 else { throw .cannotOpen(path: path, errno: errno) }
    self.path = path
    fileDescriptor = fd
  }
  deinit { close(fileDescriptor) }
  public func write(_ bytes: UnsafeRawBufferPointer) { writeAll(fd: fileDescriptor, bytes) }
}

/// Keeps guest output in memory (tests and tools).
public final class CapturingConsoleBackend: VirtioConsoleBackend {
  private let captured = Mutex<[UInt8]>([])
  public init() {}
  public func write(_ bytes: UnsafeRawBufferPointer) { captured.withLock { $0.append(contentsOf: bytes) } }
  /// Everything written so far.
  public var bytes: [UInt8] { captured.withLock { $0 } }
  /// Everything written so far as UTF-8 text.
  public var text: String { String(decoding: bytes, as: UTF8.self) }
}

/// virtio-console (virtio 1.2, 5.3) with a single port: receiveq 0 (host to guest) and
/// transmitq 1 (guest to host), plus VIRTIO_CONSOLE_F_EMERG_WRITE (a byte written to
/// `emerg_wr` goes straight to the backend). Host input waits in a bounded buffer (1 MiB; the
/// excess is dropped) until the driver posts receive buffers.
public final class VirtioConsole: VirtioDeviceModel {
  /// Bound of the host input buffer.
  public static let inputLimit = 1 << 20
  /// VIRTIO_CONSOLE_F_EMERG_WRITE.
  public static let emergencyWriteFeature: UInt64 = 1 << 2

  public let deviceType = VirtioDeviceID.console
  public let deviceFeatures: UInt64 = VirtioConsole.emergencyWriteFeature
  public let queueMaxSizes: [UInt16]
  public let configSize = 12
  /// Where guest output goes.
  public let backend: any VirtioConsoleBackend
  private let input = Mutex<[UInt8]>([])
  private let queueSet = Mutex<VirtioQueueSet?>(nil)
  private let worker: DeviceWorker
  private let chainBox = Mutex(DescriptorChain())

  public init(backend: any VirtioConsoleBackend, queueSize: UInt16 = 128) {
    self.backend = backend
    queueMaxSizes = [queueSize, queueSize]
    let link = WeakLink<VirtioConsole>()
    worker = DeviceWorker(name: "virtio-console") { _ in link.target?.process() }
    link.target = self
  }

  /// Queues host input for the guest (any thread).
  public func receive(_ bytes: [UInt8]) {
    input.withLock { input in
      let room = Self.inputLimit - input.count
      input.append(contentsOf: bytes.prefix(max(room, 0)))
    }
    worker.wake()
  }

  public func readConfig(offset: Int, size: Int) -> UInt64 {
    // cols = 0, rows = 0, max_nr_ports = 1 (only meaningful with MULTIPORT), emerg_wr reads 0.
    offset == 4 && size == 4 ? 1 : 0
  }

  public func writeConfig(offset: Int, size: Int, value: UInt64) {
    guard offset == 8 else { return }
    var byte = UInt8(truncatingIfNeeded: value)
    withUnsafeBytes(of: &byte) { backend.write($0) }
  }

  public func activate(_ queues: VirtioQueueSet) {
    queueSet.withLock { $0 = queues }
    worker.start()
    worker.wake()
  }
  public func notify(queue: Int) { worker.wake() }
  public func reset() {}
  public func shutdown() { worker.stop() }

  fileprivate func process() {
    guard let queues = queueSet.withLock({ $0 }) else { return }
    let memory = queues.memory
    chainBox.withLock { chain in
      _ = queues.withQueue(1) { queue throws(VirtqueueError) in
        while try queue.popAvailable(into: &chain) {
          guard chain.readableCount == chain.buffers.count else {
            throw VirtqueueError("virtio-console transmit buffer is device-writable")
          }
          _ = chain.readSpans(memory: memory, offset: 0, count: Int(chain.readableLength)) {
            pointer, _, count in
            backend.write(UnsafeRawBufferPointer(start: pointer, count: count))
          }
          try queue.pushUsed(head: chain.head, length: 0)
        }
      }
      _ = queues.withQueue(0) { queue throws(VirtqueueError) in
        while input.withLock({ !$0.isEmpty }), try queue.popAvailable(into: &chain) {
          guard chain.readableCount == 0 else {
            throw VirtqueueError("virtio-console receive buffer is not device-writable")
          }
          let written = input.withLock { input -> Int in
            let count = min(input.count, Int(min(chain.writableLength, UInt64(Int.max))))
            let done = input.withUnsafeBytes {
              chain.write(to: memory, offset: 0, from: UnsafeRawBufferPointer(rebasing: $0[0..<count]))
            }
            input.removeFirst(done)
            return done
          }
          try queue.pushUsed(head: chain.head, length: UInt32(written))
        }
      }
    }
  }
}
