import Synchronization
import VMCore

/// A virtio device model (block, network, console, entropy), independent of the transport.
///
/// The transport owns the queues; the model processes them through `VirtioQueueSet` on its own
/// host thread, never on the vCPU that wrote the notification.
public protocol VirtioDeviceModel: AnyObject, Sendable {
  /// The virtio device ID (`VirtioDeviceID`).
  var deviceType: UInt16 { get }
  /// Device-specific feature bits offered (the transport adds VERSION_1, INDIRECT_DESC, EVENT_IDX).
  var deviceFeatures: UInt64 { get }
  /// Maximum size of each queue (powers of two); the count is the number of queues.
  var queueMaxSizes: [UInt16] { get }
  /// Bytes of device-specific configuration space.
  var configSize: Int { get }
  /// Reads device-specific configuration (`offset + size <= configSize`).
  func readConfig(offset: Int, size: Int) -> UInt64
  /// Writes device-specific configuration.
  func writeConfig(offset: Int, size: Int, value: UInt64)
  /// The driver set DRIVER_OK: start processing `queues`.
  func activate(_ queues: VirtioQueueSet)
  /// The driver notified `queue` (called on a vCPU thread: only wake the device's worker).
  func notify(queue: Int)
  /// The driver reset the device. Called with the queue set locked: must not call `withQueue`.
  func reset()
  /// Stops the device's host threads (machine teardown).
  func shutdown()
}

/// Interrupt and error hooks a transport gives its queue set.
public protocol VirtioTransportEvents: AnyObject, Sendable {
  /// Used buffers were added to queue `index` and the driver wants to know.
  func queueInterrupt(index: Int, vector: UInt16)
  /// The device configuration changed.
  func configurationChanged()
  /// The driver broke the protocol: set DEVICE_NEEDS_RESET, interrupt, log `reason` once.
  func deviceNeedsReset(_ reason: String)
}

/// The queues of one device and the lock that serialises their processing against the
/// driver's register writes and resets.
public final class VirtioQueueSet: Sendable {
  struct State {
    var queues: [SplitVirtqueue]
    var active = false
    var broken = false
    var features: UInt64 = 0
    /// Set while a snapshot is taken: no queue is served (see `quiesce`).
    var quiesced = false
  }

  /// Guest RAM the queues live in.
  public let memory: GuestMemory
  let state: Mutex<State>
  /// The transport, held weakly: the transport owns this queue set, so a strong reference back
  /// would keep both (and guest RAM) alive after the machine is gone.
  private struct TransportLink: @unchecked Sendable {
    weak var transport: (any VirtioTransportEvents)?
  }
  private let events = Mutex(TransportLink())

  public init(memory: GuestMemory, maxSizes: [UInt16]) {
    self.memory = memory
    state = Mutex(State(queues: maxSizes.map { SplitVirtqueue(memory: memory, maxSize: $0) }))
  }

  /// Connects the transport's interrupt hooks.
  public func connect(_ transport: any VirtioTransportEvents) { events.withLock { $0.transport = transport } }

  /// Number of queues.
  public var count: Int { state.withLock { $0.queues.count } }

  /// Features the driver accepted (valid once the device is active).
  public var negotiatedFeatures: UInt64 { state.withLock { $0.features } }

  /// Whether the device is running (DRIVER_OK and no DEVICE_NEEDS_RESET).
  public var isActive: Bool { state.withLock { $0.active && !$0.broken && !$0.quiesced } }

  /// Runs `body` on queue `index` with the queue set locked, when the device is active and the
  /// queue enabled; returns nil otherwise. A `VirtqueueError` thrown by `body` puts the device
  /// in DEVICE_NEEDS_RESET. Afterwards, interrupts the driver if it asked for it.
  public func withQueue<Result>(
    _ index: Int, _ body: (inout SplitVirtqueue) throws(VirtqueueError) -> Result
  ) -> Result? {
    var failure: VirtqueueError?
    var vector: UInt16?
    let result = state.withLock { state -> Result? in
      guard state.active, !state.broken, !state.quiesced, index >= 0, index < state.queues.count,
        state.queues[index].isEnabled
      else {
        return nil
      }
      do throws(VirtqueueError) {
        let result = try body(&state.queues[index])
        if try state.queues[index].takeInterruptDecision() { vector = state.queues[index].msixVector }
        return result
      } catch {
        state.broken = true
        failure = error
        return nil
      }
    }
    let transport = events.withLock { $0.transport }
    if let failure { transport?.deviceNeedsReset("queue \(index): \(failure.message)") }
    if let vector { transport?.queueInterrupt(index: index, vector: vector) }
    return result
  }

  /// Reports a device-level protocol violation found outside `withQueue` (DEVICE_NEEDS_RESET).
  public func fail(_ reason: String) {
    state.withLock { $0.broken = true }
    events.withLock { $0.transport }?.deviceNeedsReset(reason)
  }

  /// Tells the driver the device configuration changed.
  public func configurationChanged() { events.withLock { $0.transport }?.configurationChanged() }
}
