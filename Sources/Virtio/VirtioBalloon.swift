import CVirtioShim
import Glibc
import Synchronization
import VMCore

/// What a balloon device offers the guest.
public struct BalloonOptions: Sendable, Equatable {
  /// VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest deflates instead of running out of memory.
  public var deflateOnOOM: Bool
  /// Seconds between statistics requests; 0 leaves the statistics queue out.
  public var statisticsInterval: UInt32
  /// VIRTIO_BALLOON_F_REPORTING: the guest reports free pages, which the host discards.
  public var freePageReporting: Bool

  public init(deflateOnOOM: Bool = false, statisticsInterval: UInt32 = 0, freePageReporting: Bool = false) {
    self.deflateOnOOM = deflateOnOOM
    self.statisticsInterval = statisticsInterval
    self.freePageReporting = freePageReporting
  }
}

/// The guest's latest memory statistics (virtio 1.2, 5.5.6.3), by tag.
public struct BalloonStatistics: Sendable, Equatable {
  /// Statistic tags (VIRTIO_BALLOON_S_*) and the JSON names the control APIs use.
  public static let names: [UInt16: String] = [
    0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults", 4: "free_memory", 5: "total_memory",
    6: "available_memory", 7: "disk_caches", 8: "hugetlb_allocations", 9: "hugetlb_failures", 10: "oom_kill",
    11: "alloc_stall", 12: "async_scan", 13: "direct_scan", 14: "async_reclaim", 15: "direct_reclaim",
  ]
  /// Values the guest reported, by tag (unknown tags are kept too).
  public var values: [UInt16: UInt64] = [:]
  /// How many statistics buffers the guest has filled.
  public var updates: UInt64 = 0

  public init() {}
}

/// virtio-balloon (virtio 1.2, 5.5): the host sets a target (`num_pages`, 4 KiB pages) and the
/// guest inflates towards it, handing the page frame numbers over on the inflate queue; the host
/// gives those pages back to the kernel (`GuestMemory.discard`), and they are backed again
/// only when touched. Deflating needs nothing from the host (MUST_TELL_HOST is not offered).
/// With statistics, the guest's buffer is held and returned every interval to ask for fresh
/// numbers; with free page reporting, reported ranges are discarded as inflated pages are.
///
/// Queue numbering: inflate 0, deflate 1, statistics 2 (when negotiated), and the reporting
/// queue where the driver puts it: Linux numbers only the queues it uses (3 after the
/// statistics queue, 2 without it), the specification reserves 4. Both are served.
public final class VirtioBalloon: VirtioDeviceModel {
  /// Device feature bits (virtio 1.2, 5.5.3).
  public enum Feature {
    public static let statisticsQueue: UInt64 = 1 << 1
    public static let deflateOnOOM: UInt64 = 1 << 2
    public static let freePageReporting: UInt64 = 1 << 5
  }
  /// Bytes per balloon page (VIRTIO_BALLOON_PFN_SHIFT 12).
  public static let pageSize: UInt64 = 4096
  static let inflateQueue = 0
  static let deflateQueue = 1
  static let statisticsQueue = 2
  static let specificationReportingQueue = 4

  public let deviceType = VirtioDeviceID.balloon
  public let deviceFeatures: UInt64
  public let queueMaxSizes: [UInt16]
  public let configSize = 16
  /// What the device was created with.
  public let options: BalloonOptions

  private struct State {
    var queues: VirtioQueueSet?
    var targetPages: UInt32 = 0
    var actualPages: UInt32 = 0
    var statistics = BalloonStatistics()
    /// The statistics buffer held until the next request.
    var heldStatisticsHead: UInt16?
    var statisticsInterval: UInt32
    var discardedPages: UInt64 = 0
    var ignoredPages: UInt64 = 0
    /// Set by `restoreState`: the next `activate` keeps the held statistics buffer.
    var restored = false
  }
  private let state: Mutex<State>
  private let chainBox = Mutex(DescriptorChain())
  private let timerFD: Int32
  private let worker: DeviceWorker

  /// A balloon device with `options`, its target initially `targetPages`.
  public init(options: BalloonOptions = BalloonOptions(), targetPages: UInt32 = 0, queueSize: UInt16 = 256) {
    self.options = options
    var features: UInt64 = 0
    if options.deflateOnOOM { features |= Feature.deflateOnOOM }
    if options.statisticsInterval > 0 { features |= Feature.statisticsQueue }
    if options.freePageReporting { features |= Feature.freePageReporting }
    deviceFeatures = features
    let queueCount = options.freePageReporting ? 5 : (options.statisticsInterval > 0 ? 3 : 2)
    queueMaxSizes = Array(repeating: queueSize, count: queueCount)
    var initial = State(statisticsInterval: options.statisticsInterval)
    initial.targetPages = targetPages
    state = Mutex(initial)
    timerFD = options.statisticsInterval > 0 ? hv_timerfd() : -1
    let link = WeakLink<VirtioBalloon>()
    worker = DeviceWorker(name: "virtio-balloon", backendFD: timerFD, wantsBackend: { true }) { timerFired in
      link.target?.process(timerFired: timerFired)
    }
    link.target = self
  }

  deinit { if timerFD >= 0 { close(timerFD) } }

  // MARK: Host side

  /// The target in 4 KiB pages (num_pages).
  public var targetPages: UInt32 { state.withLock { $0.targetPages } }
  /// Pages the guest says the balloon holds (actual).
  public var actualPages: UInt32 { state.withLock { $0.actualPages } }
  /// Pages given back to the host so far (inflated or reported).
  public var discardedPages: UInt64 { state.withLock { $0.discardedPages } }
  /// Page numbers outside guest RAM the guest handed over (ignored).
  public var ignoredPages: UInt64 { state.withLock { $0.ignoredPages } }
  /// The latest statistics.
  public var statistics: BalloonStatistics { state.withLock { $0.statistics } }
  /// The statistics interval in seconds (0: off).
  public var statisticsInterval: UInt32 { state.withLock { $0.statisticsInterval } }

  /// Sets the target and tells the guest (a configuration-change interrupt once it runs).
  public func setTarget(pages: UInt32) {
    let queues = state.withLock { state -> VirtioQueueSet? in
      guard state.targetPages != pages else { return nil }
      state.targetPages = pages
      return state.queues
    }
    queues?.configurationChanged()
  }

  /// Changes the statistics interval (statistics must have been enabled at creation; 0 stops
  /// the requests) and asks for fresh statistics now. Returns false when statistics are off.
  @discardableResult
  public func setStatisticsInterval(seconds: UInt32) -> Bool {
    guard timerFD >= 0 else { return false }
    state.withLock { $0.statisticsInterval = seconds }
    _ = hv_timerfd_every(timerFD, seconds)
    requestStatistics()
    return true
  }

  /// Returns the held statistics buffer so the guest refills it.
  private func requestStatistics() {
    guard let queues = state.withLock({ $0.queues }) else { return }
    _ = queues.withQueue(Self.statisticsQueue) { queue throws(VirtqueueError) in
      guard let head = state.withLock({ $0.heldStatisticsHead }) else { return }
      try queue.pushUsed(head: head, length: 0)
      state.withLock { $0.heldStatisticsHead = nil }
    }
  }

  // MARK: VirtioDeviceModel

  public func readConfig(offset: Int, size: Int) -> UInt64 {
    let (target, actual) = state.withLock { ($0.targetPages, $0.actualPages) }
    var bytes = [UInt8](repeating: 0, count: configSize)
    for index in 0..<4 {
      bytes[index] = UInt8(truncatingIfNeeded: target >> (8 * index))
      bytes[4 + index] = UInt8(truncatingIfNeeded: actual >> (8 * index))
    }
    var value: UInt64 = 0
    for index in 0..<size where offset + index < bytes.count {
      value |= UInt64(bytes[offset + index]) << (8 * index)
    }
    return value
  }

  public func writeConfig(offset: Int, size: Int, value: UInt64) {
    // Only `actual` (bytes 4..<8) is driver-writable; partial writes update their bytes.
    state.withLock { state in
      var actual = state.actualPages
      for index in 0..<size where (4..<8).contains(offset + index) {
        let shift = UInt32(8 * (offset + index - 4))
        let byte = UInt32(truncatingIfNeeded: value >> (8 * index)) & 0xFF
        actual = (actual & ~(0xFF << shift)) | (byte << shift)
      }
      state.actualPages = actual
    }
  }

  public func activate(_ queues: VirtioQueueSet) {
    let interval = state.withLock { state -> UInt32 in
      state.queues = queues
      // A restored device still holds the buffer the driver gave it before the snapshot.
      if !state.restored { state.heldStatisticsHead = nil }
      state.restored = false
      return state.statisticsInterval
    }
    if timerFD >= 0 { _ = hv_timerfd_every(timerFD, interval) }
    worker.start()
    worker.wake()
  }

  public func notify(queue: Int) { worker.wake() }

  public func reset() {
    state.withLock { state in
      state.queues = nil
      state.heldStatisticsHead = nil
      state.actualPages = 0
    }
    if timerFD >= 0 { _ = hv_timerfd_every(timerFD, 0) }
  }

  public func shutdown() { worker.stop() }

  // MARK: Worker

  func process(timerFired: Bool) {
    if timerFired {
      var expirations: UInt64 = 0
      _ = read(timerFD, &expirations, 8)
      requestStatistics()
    }
    guard let queues = state.withLock({ $0.queues }) else { return }
    let features = queues.negotiatedFeatures
    servePageNumbers(queues, index: Self.inflateQueue, discard: true)
    servePageNumbers(queues, index: Self.deflateQueue, discard: false)
    let statistics = features & Feature.statisticsQueue != 0
    if statistics { serveStatistics(queues) }
    if features & Feature.freePageReporting != 0 {
      let packed = statistics ? Self.statisticsQueue + 1 : Self.statisticsQueue
      serveReports(queues, index: packed)
      serveReports(queues, index: Self.specificationReportingQueue)
    }
  }

  /// Inflate or deflate: each chain holds little-endian 32-bit page frame numbers.
  private func servePageNumbers(_ queues: VirtioQueueSet, index: Int, discard: Bool) {
    let memory = queues.memory
    var discarded: UInt64 = 0
    var ignored: UInt64 = 0
    chainBox.withLock { chain in
      _ = queues.withQueue(index) { queue throws(VirtqueueError) in
        while try queue.popAvailable(into: &chain) {
          guard chain.readableCount == chain.buffers.count else {
            throw VirtqueueError("virtio-balloon page number buffer is device-writable")
          }
          if discard {
            var run: (start: UInt64, count: UInt64)?
            func flush() {
              guard let current = run else { return }
              let ok = memory.discard(at: current.start * Self.pageSize, length: current.count * Self.pageSize)
              if ok { discarded += current.count } else { ignored += current.count }
              run = nil
            }
            var carry: [UInt8] = []
            _ = chain.readSpans(memory: memory, offset: 0, count: Int(chain.readableLength)) { pointer, _, length in
              let bytes = carry + Array(UnsafeRawBufferPointer(start: pointer, count: length))
              let whole = bytes.count / 4 * 4
              for offset in stride(from: 0, to: whole, by: 4) {
                let number = UInt64(
                  UInt32(bytes[offset]) | UInt32(bytes[offset + 1]) << 8 | UInt32(bytes[offset + 2]) << 16
                    | UInt32(bytes[offset + 3]) << 24)
                // A page outside RAM is ignored; runs of pages inside RAM are discarded together.
                if memory.hostPointer(number * Self.pageSize, length: Self.pageSize) == nil {
                  ignored += 1
                } else if let current = run, current.start + current.count == number {
                  run = (current.start, current.count + 1)
                } else {
                  flush()
                  run = (number, 1)
                }
              }
              carry = Array(bytes[whole...])
            }
            flush()
          }
          try queue.pushUsed(head: chain.head, length: 0)
        }
      }
    }
    if discarded > 0 || ignored > 0 {
      state.withLock {
        $0.discardedPages += discarded
        $0.ignoredPages += ignored
      }
    }
  }

  /// Statistics: parse the buffer and hold it until the next request.
  private func serveStatistics(_ queues: VirtioQueueSet) {
    let memory = queues.memory
    chainBox.withLock { chain in
      _ = queues.withQueue(Self.statisticsQueue) { queue throws(VirtqueueError) in
        while try queue.popAvailable(into: &chain) {
          guard chain.readableCount == chain.buffers.count else {
            throw VirtqueueError("virtio-balloon statistics buffer is device-writable")
          }
          let length = Int(min(chain.readableLength, 4096))
          var bytes = [UInt8](repeating: 0, count: length)
          let copied = bytes.withUnsafeMutableBytes { chain.read(from: memory, offset: 0, into: $0) }
          var values: [UInt16: UInt64] = [:]
          for offset in stride(from: 0, to: copied / 10 * 10, by: 10) {
            let tag = UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8
            var value: UInt64 = 0
            for index in 0..<8 { value |= UInt64(bytes[offset + 2 + index]) << (8 * index) }
            values[tag] = value
          }
          // A driver that queues a second buffer gets the first one back at once.
          let previous = state.withLock { state -> UInt16? in
            state.statistics.values.merge(values) { $1 }
            state.statistics.updates += 1
            defer { state.heldStatisticsHead = chain.head }
            return state.heldStatisticsHead
          }
          if let previous { try queue.pushUsed(head: previous, length: 0) }
        }
      }
    }
  }

  /// Free page reporting: every buffer is a range of free guest memory to discard.
  private func serveReports(_ queues: VirtioQueueSet, index: Int) {
    let memory = queues.memory
    var discarded: UInt64 = 0
    var ignored: UInt64 = 0
    chainBox.withLock { chain in
      _ = queues.withQueue(index) { queue throws(VirtqueueError) in
        while try queue.popAvailable(into: &chain) {
          for buffer in chain.buffers {
            let start = (buffer.address &+ Self.pageSize - 1) & ~(Self.pageSize - 1)
            let end = (buffer.address &+ UInt64(buffer.length)) & ~(Self.pageSize - 1)
            guard start >= buffer.address, end > start else { continue }
            if memory.discard(at: start, length: end - start) {
              discarded += (end - start) / Self.pageSize
            } else {
              ignored += (end - start) / Self.pageSize
            }
          }
          try queue.pushUsed(head: chain.head, length: 0)
        }
      }
    }
    if discarded > 0 || ignored > 0 {
      state.withLock {
        $0.discardedPages += discarded
        $0.ignoredPages += ignored
      }
    }
  }
}

// MARK: Machine state

/// The balloon's own state: the target and the actual size, the statistics interval, the
/// statistics buffer held for the next request, the latest statistics and the page counters.
/// The options travel as the offered features (checked by the transport).
extension VirtioBalloon: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    let saved = state.withLock { $0 }
    writer.write(saved.targetPages)
    writer.write(saved.actualPages)
    writer.write(saved.statisticsInterval)
    writer.write(saved.heldStatisticsHead != nil)
    writer.write(saved.heldStatisticsHead ?? 0)
    writer.write(saved.statistics.updates)
    writer.write(UInt32(saved.statistics.values.count))
    for (tag, value) in saved.statistics.values.sorted(by: { $0.key < $1.key }) {
      writer.write(tag)
      writer.write(value)
    }
    writer.write(saved.discardedPages)
    writer.write(saved.ignoredPages)
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    let target: UInt32 = try reader.read()
    let actual: UInt32 = try reader.read()
    let interval: UInt32 = try reader.read()
    let holds = try reader.readBool()
    let held: UInt16 = try reader.read()
    var statistics = BalloonStatistics()
    statistics.updates = try reader.read()
    let count = Int(try reader.read(UInt32.self))
    guard count <= 256 else { throw .invalid("balloon statistics count") }
    for _ in 0..<count {
      let tag: UInt16 = try reader.read()
      statistics.values[tag] = try reader.read()
    }
    let discarded: UInt64 = try reader.read()
    let ignored: UInt64 = try reader.read()
    guard interval == 0 || timerFD >= 0 else { throw .invalid("balloon statistics interval without statistics") }
    guard !holds || (queueMaxSizes.count > Self.statisticsQueue && held < queueMaxSizes[Self.statisticsQueue]) else {
      throw .invalid("balloon statistics buffer")
    }
    state.withLock { state in
      state.targetPages = target
      state.actualPages = actual
      state.statisticsInterval = interval
      state.heldStatisticsHead = holds ? held : nil
      state.statistics = statistics
      state.discardedPages = discarded
      state.ignoredPages = ignored
      state.restored = true
    }
  }
}
