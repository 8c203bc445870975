import CVirtioShim
import Glibc
import Synchronization
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
public final class VirtioEntropy: VirtioDeviceModel {
  /// Most bytes supplied per request.
  public static let maxBytesPerRequest = 65536
  public let deviceType = VirtioDeviceID.entropy
  public let deviceFeatures: UInt64 = 0
  public let queueMaxSizes: [UInt16]
  public let configSize = 0
  /// The byte source.
  public let source: any EntropySource
  private let queueSet = Mutex<VirtioQueueSet?>(nil)
  private let worker: DeviceWorker
  private let chainBox = Mutex(DescriptorChain())

  /// An entropy device fed by `source` (the host's getrandom by default).
  public init(source: any EntropySource = HostEntropySource(), queueSize: UInt16 = 64) {
    self.source = source
    queueMaxSizes = [queueSize]
    let link = WeakLink<VirtioEntropy>()
    worker = DeviceWorker(name: "virtio-rng") { _ in link.target?.process() }
    link.target = self
  }

  public func readConfig(offset: Int, size: Int) -> UInt64 { 0 }
  public func writeConfig(offset: Int, size: Int, value: UInt64) {}
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
      _ = queues.withQueue(0) { queue throws(VirtqueueError) in
        while try queue.popAvailable(into: &chain) {
          guard chain.readableCount == 0 else { throw VirtqueueError("virtio-rng buffer is not device-writable") }
          let count = Int(min(chain.writableLength, UInt64(Self.maxBytesPerRequest)))
          var ok = true
          let filled = chain.fillSpans(memory: memory, offset: 0, count: count) {
            pointer, _, length in
            if ok { ok = source.fill(UnsafeMutableRawBufferPointer(start: pointer, count: length)) }
          }
          try queue.pushUsed(head: chain.head, length: ok ? UInt32(filled) : 0)
        }
      }
    }
  }
}
