import Devices
import Glibc
import Synchronization
import VMCore

/// virtio-console (virtio 1.2, 5.3) with a single port: receiveq 0 (host to guest) and
/// transmitq 1 (guest to host), plus VIRTIO_CONSOLE_F_EMERG_WRITE (a byte written to
/// `emerg_wr` goes straight to the backend). Host input waits in a bounded buffer (1 MiB; the
/// excess is dropped) until the driver posts receive buffers.
///
/// Guest output goes to a `SerialBackend` (module Devices), the same backends the UART uses:
/// `StdioSerialBackend`, `BufferedSerialBackend`, `CapturingSerialBackend`, `NullSerialBackend`.
/// `write` is called on the device's worker thread (or the vCPU for EMERG_WRITE), one call at a
/// time, in guest order. The worker takes a transmit buffer only while the backend has room for
/// `wholeChainBytes` (`SerialBackend.hasRoom(for:)`): behind a consumer that stopped reading,
/// the guest's output waits in its own ring (its driver sees the queue full) instead of
/// blocking the worker or being lost, and the worker goes on when the backend's ready handler
/// wakes it. Only the part of a larger buffer beyond the backend's room can be lost.
public final class VirtioConsole: QueueWorkerDevice {
  /// Bound of the host input buffer.
  public static let inputLimit = 1 << 20
  /// VIRTIO_CONSOLE_F_EMERG_WRITE.
  public static let emergencyWriteFeature: UInt64 = 1 << 2
  /// The output a transmit buffer may carry and still be taken whole when the backend is
  /// short of room: a page, the size of Linux's hvc output buffer.
  public static let wholeChainBytes = 4096

  public let deviceType = VirtioDeviceID.console
  public let deviceFeatures: UInt64 = VirtioConsole.emergencyWriteFeature
  public let queueMaxSizes: [UInt16]
  public let configSize = 12
  /// Where guest output goes.
  public let backend: any SerialBackend
  private let input = Mutex<[UInt8]>([])
  /// The worker thread serving the queues.
  public let queueWorker: QueueWorker
  /// Serialises backend writes from the worker (transmitq) and the vCPU (`emerg_wr`).
  private let output = Mutex(())

  /// A console whose guest output goes to `backend`.
  public init(backend: any SerialBackend, queueSize: UInt16 = 128) {
    self.backend = backend
    queueMaxSizes = [queueSize, queueSize]
    let link = WeakLink<VirtioConsole>()
    queueWorker = QueueWorker(name: "virtio-console") { link.target?.process() }
    link.target = self
    backend.whenReadyToTransmit { link.target?.queueWorker.wake() }
  }

  /// Queues host input for the guest (any thread).
  public func receive(_ bytes: [UInt8]) {
    input.withLock { input in
      let room = Self.inputLimit - input.count
      input.append(contentsOf: bytes.prefix(max(room, 0)))
    }
    queueWorker.wake()
  }

  public func readConfig(offset: Int, size: Int) -> UInt64 {
    // cols = 0, rows = 0, max_nr_ports = 1 (only meaningful with MULTIPORT), emerg_wr reads 0.
    offset == 4 && size == 4 ? 1 : 0
  }

  public func writeConfig(offset: Int, size: Int, value: UInt64) {
    guard offset == 8 else { return }
    var byte = UInt8(truncatingIfNeeded: value)
    output.withLock { _ in withUnsafeBytes(of: &byte) { backend.write($0) } }
  }

  func process() {
    queueWorker.serve(queue: 1, while: { backend.hasRoom(for: Self.wholeChainBytes) }) {
      chain, memory throws(VirtqueueError) in
      guard chain.readableCount == chain.buffers.count else {
        throw VirtqueueError("virtio-console transmit buffer is device-writable")
      }
      output.withLock { _ in
        _ = chain.readSpans(memory: memory, offset: 0, count: Int(chain.readableLength)) { pointer, _, count in
          backend.write(UnsafeRawBufferPointer(start: pointer, count: count))
        }
      }
      return 0
    }
    queueWorker.serve(queue: 0, while: { input.withLock { !$0.isEmpty } }) { chain, memory throws(VirtqueueError) in
      guard chain.readableCount == 0 else {
        throw VirtqueueError("virtio-console receive buffer is not device-writable")
      }
      return input.withLock { input -> UInt32 in
        let count = min(input.count, Int(min(chain.writableLength, UInt64(Int.max))))
        let done = input.withUnsafeBytes {
          chain.write(to: memory, offset: 0, from: UnsafeRawBufferPointer(rebasing: $0[0..<count]))
        }
        input.removeFirst(done)
        return UInt32(done)
      }
    }
  }
}

// MARK: Machine state

/// Host input not yet delivered to the guest.
extension VirtioConsole: StateSavable {
  public func saveState(into writer: inout StateWriter) { writer.write(bytes: input.withLock { $0 }) }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    let pending = try reader.readBytes(maximumCount: Self.inputLimit)
    input.withLock { $0 = pending }
  }
}
