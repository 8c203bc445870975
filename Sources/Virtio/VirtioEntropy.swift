import CVirtioShim
import Glibc
import VMCore

/// Where a virtio-rng device gets its bytes.
public protocol EntropySource: AnyObject, Sendable {
  /// Fills `buffer` with random bytes; returns false if the source failed.
  func fill(_ buffer: UnsafeMutableRawBufferPointer) -> Bool
}

/// The host kernel's getrandom(2) pool.
public final class HostEntropySource: EntropySource {
  public init() {}
  public func fill(_ buffer: UnsafeMutableRawBufferPointer) -> Bool {
    var done = 0
    while done < buffer.count {
      let count = hv_getrandom(buffer.baseAddress! + done, UInt(buffer.count - done))
      if count < 0 {
        if errno == EINTR { continue }
        return false
      }
      done += count
    }
    return true
  }
}

/// virtio-rng (virtio 1.2, 5.4): one request queue of device-writable buffers, filled from an
/// `EntropySource` on a worker thread. At most 64 KiB are supplied per request.
public final class VirtioEntropy: QueueWorkerDevice {
  /// Most bytes supplied per request.
  public static let maxBytesPerRequest = 65536
  public let deviceType = VirtioDeviceID.entropy
  public let deviceFeatures: UInt64 = 0
  public let queueMaxSizes: [UInt16]
  public let configSize = 0
  /// The byte source.
  public let source: any EntropySource
  /// The worker thread serving the queues.
  public let queueWorker: QueueWorker

  /// An entropy device fed by `source` (the host's getrandom by default).
  public init(source: any EntropySource = HostEntropySource(), queueSize: UInt16 = 64) {
    self.source = source
    queueMaxSizes = [queueSize]
    let link = WeakLink<VirtioEntropy>()
    queueWorker = QueueWorker(name: "virtio-rng") { link.target?.process() }
    link.target = self
  }

  public func readConfig(offset: Int, size: Int) -> UInt64 { 0 }
  public func writeConfig(offset: Int, size: Int, value: UInt64) {}

  func process() {
    queueWorker.serve(queue: 0) { chain, memory throws(VirtqueueError) in
      guard chain.readableCount == 0 else { throw VirtqueueError("virtio-rng buffer is not device-writable") }
      let count = Int(min(chain.writableLength, UInt64(Self.maxBytesPerRequest)))
      var ok = true
      let filled = chain.fillSpans(memory: memory, offset: 0, count: count) { pointer, _, length in
        if ok { ok = source.fill(UnsafeMutableRawBufferPointer(start: pointer, count: length)) }
      }
      return ok ? UInt32(filled) : 0
    }
  }
}
