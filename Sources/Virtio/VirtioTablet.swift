import Synchronization
import VMCore

/// One Linux input event as virtio-input carries it (virtio 1.2, 5.8.6: `le16 type`,
/// `le16 code`, `le32 value`).
public struct VirtioInputEvent: Sendable, Equatable {
  /// The event type (`EV_SYN`, `EV_KEY`, `EV_ABS`, ...).
  public var type: UInt16
  /// The code within the type (`ABS_X`, `BTN_LEFT`, `SYN_REPORT`, ...).
  public var code: UInt16
  /// The value (a coordinate, 1/0 for a button press/release).
  public var value: UInt32

  /// An event of `type` and `code` carrying `value`.
  public init(type: UInt16, code: UInt16, value: UInt32) {
    self.type = type
    self.code = code
    self.value = value
  }

  /// The 8 bytes the device writes into an eventq buffer.
  public var bytes: [UInt8] {
    [
      UInt8(truncatingIfNeeded: type), UInt8(truncatingIfNeeded: type >> 8),
      UInt8(truncatingIfNeeded: code), UInt8(truncatingIfNeeded: code >> 8),
      UInt8(truncatingIfNeeded: value), UInt8(truncatingIfNeeded: value >> 8),
      UInt8(truncatingIfNeeded: value >> 16), UInt8(truncatingIfNeeded: value >> 24),
    ]
  }
}

/// Linux input event types and codes the tablet uses (linux/input-event-codes.h, part of the
/// kernel's user-space ABI).
public enum LinuxInputCode {
  /// Event type: report separator.
  public static let eventSync: UInt16 = 0x00
  /// Event type: keys and buttons.
  public static let eventKey: UInt16 = 0x01
  /// Event type: absolute axes.
  public static let eventAbsolute: UInt16 = 0x03
  /// `SYN_REPORT`: the end of one report.
  public static let syncReport: UInt16 = 0x00
  /// `BTN_LEFT`.
  public static let buttonLeft: UInt16 = 0x110
  /// `BTN_RIGHT`.
  public static let buttonRight: UInt16 = 0x111
  /// `BTN_MIDDLE`.
  public static let buttonMiddle: UInt16 = 0x112
  /// `ABS_X`.
  public static let absoluteX: UInt16 = 0x00
  /// `ABS_Y`.
  public static let absoluteY: UInt16 = 0x01
  /// `BUS_VIRTUAL`, the bus type in the device IDs.
  public static let busVirtual: UInt16 = 0x06
}

/// virtio-input (virtio 1.2, 5.8; device ID 18) as an absolute pointer: a tablet with the
/// left, right and middle buttons and two axes from 0 to `axisMaximum`, which the VNC server's
/// pointer events drive (`pointer(x:y:buttons:width:height:)`).
///
/// - Configuration space: `select`/`subsel` choose what the 128-byte union shows: the name
///   ("Hostvisor Tablet"), the serial, the device IDs, the property bits (none), the event-type
///   bits of EV_SYN, EV_KEY and EV_ABS, and ABS_INFO for ABS_X and ABS_Y.
/// - eventq (0): the driver posts device-writable buffers; each receives one 8-byte event.
///   Events that find no buffer wait in a bounded queue (`pendingLimit`); when it is full the
///   oldest whole reports are dropped. Events are only queued while the driver runs the device.
/// - statusq (1): LED and force-feedback writes from the driver are consumed and ignored.
///
/// A buffer in the wrong direction or shorter than an event is a protocol violation
/// (DEVICE_NEEDS_RESET); descriptors are checked by the virtqueue code, which never touches
/// memory outside guest RAM.
public final class VirtioTablet: VirtioDeviceModel {
  /// The name in the ID_NAME configuration.
  public static let name = "Hostvisor Tablet"
  /// The serial in the ID_SERIAL configuration.
  public static let serial = "hostvisor-tablet-0"
  /// The largest value of either axis (the smallest is 0).
  public static let axisMaximum: UInt32 = 0x7FFF
  /// Most events waiting for eventq buffers.
  public static let pendingLimit = 1024
  /// The device IDs: bus type BUS_VIRTUAL, vendor, product, version.
  public static let deviceIDs: (bus: UInt16, vendor: UInt16, product: UInt16, version: UInt16) = (
    LinuxInputCode.busVirtual, 0x1AF4, 0x0012, 1
  )

  /// Configuration selectors (virtio 1.2, 5.8.5).
  public enum ConfigSelect {
    /// Nothing selected: size 0.
    public static let unset: UInt8 = 0x00
    /// The device name (a string).
    public static let idName: UInt8 = 0x01
    /// The serial number (a string).
    public static let idSerial: UInt8 = 0x02
    /// Bus type, vendor, product and version.
    public static let idDeviceIDs: UInt8 = 0x03
    /// Input properties (`INPUT_PROP_*` bits).
    public static let propertyBits: UInt8 = 0x10
    /// The codes supported for event type `subsel`.
    public static let eventBits: UInt8 = 0x11
    /// The range of absolute axis `subsel`.
    public static let absoluteInfo: UInt8 = 0x12
  }

  public let deviceType = VirtioDeviceID.input
  public let deviceFeatures: UInt64 = 0
  public let queueMaxSizes: [UInt16]
  /// select, subsel, size, 5 reserved bytes and the 128-byte union.
  public let configSize = 136

  private struct State {
    var select: UInt8 = 0
    var subselect: UInt8 = 0
    var pending: [VirtioInputEvent] = []
    var driverRunning = false
    var buttons: UInt8 = 0
    var dropped = 0
  }

  private let state = Mutex(State())
  /// The worker thread serving the queues.
  let queueWorker: QueueWorker

  /// A tablet whose queues hold up to `queueSize` buffers.
  public init(queueSize: UInt16 = 64) {
    queueMaxSizes = [queueSize, queueSize]
    let link = WeakLink<VirtioTablet>()
    queueWorker = QueueWorker(name: "virtio-input") { link.target?.process() }
    link.target = self
  }

  /// Events dropped so far because the pending queue was full.
  public var droppedEvents: Int { state.withLock { $0.dropped } }

  /// Events waiting for eventq buffers.
  public var pendingEvents: [VirtioInputEvent] { state.withLock { $0.pending } }

  // MARK: Host input

  /// A pointer position on a `width` x `height` screen and a VNC button mask (bit 0 left,
  /// bit 1 middle, bit 2 right): ABS_X and ABS_Y scaled to 0...`axisMaximum`, the buttons that
  /// changed, SYN_REPORT. Positions outside the screen are clamped to its edge.
  public func pointer(x: Int, y: Int, buttons: UInt8, width: Int, height: Int) {
    let buttonCodes: [(mask: UInt8, code: UInt16)] = [
      (1, LinuxInputCode.buttonLeft), (2, LinuxInputCode.buttonMiddle), (4, LinuxInputCode.buttonRight),
    ]
    let report = state.withLock { state -> [VirtioInputEvent] in
      var report = [
        VirtioInputEvent(
          type: LinuxInputCode.eventAbsolute, code: LinuxInputCode.absoluteX, value: Self.scale(x, size: width)),
        VirtioInputEvent(
          type: LinuxInputCode.eventAbsolute, code: LinuxInputCode.absoluteY, value: Self.scale(y, size: height)),
      ]
      for (mask, code) in buttonCodes where (state.buttons ^ buttons) & mask != 0 {
        report.append(VirtioInputEvent(type: LinuxInputCode.eventKey, code: code, value: buttons & mask != 0 ? 1 : 0))
      }
      state.buttons = buttons
      return report
    }
    send(report)
  }

  /// Queues one report (`events` followed by SYN_REPORT) for the driver. Dropped while the
  /// driver does not run the device; when the queue is full, the oldest reports make room.
  public func send(_ events: [VirtioInputEvent]) {
    let report = events + [VirtioInputEvent(type: LinuxInputCode.eventSync, code: LinuxInputCode.syncReport, value: 0)]
    let queued = state.withLock { state -> Bool in
      guard state.driverRunning, report.count <= Self.pendingLimit else { return false }
      while state.pending.count + report.count > Self.pendingLimit {
        let end =
          state.pending.firstIndex {
            $0.type == LinuxInputCode.eventSync && $0.code == LinuxInputCode.syncReport
          }.map { $0 + 1 } ?? state.pending.count
        state.pending.removeFirst(end)
        state.dropped += end
      }
      state.pending.append(contentsOf: report)
      return true
    }
    if queued { queueWorker.wake() }
  }

  /// A coordinate on a screen of `size` pixels as an axis value from 0 to `axisMaximum`.
  public static func scale(_ coordinate: Int, size: Int) -> UInt32 {
    guard size > 1 else { return 0 }
    let clamped = UInt64(min(max(coordinate, 0), size - 1))
    return UInt32(clamped * UInt64(axisMaximum) / UInt64(size - 1))
  }

  // MARK: Configuration space

  /// The 136 configuration bytes for the current `select` and `subsel`.
  private static func configuration(select: UInt8, subselect: UInt8) -> [UInt8] {
    var payload: [UInt8] = []
    func bitmap(_ codes: [UInt16]) -> [UInt8] {
      var bits = [UInt8](repeating: 0, count: Int((codes.max() ?? 0) / 8 + 1))
      for code in codes { bits[Int(code / 8)] |= 1 << (code % 8) }
      return bits
    }
    func littleEndian(_ values: [UInt32]) -> [UInt8] {
      values.flatMap { value in (0..<4).map { UInt8(truncatingIfNeeded: value >> ($0 * 8)) } }
    }
    switch select {
    case ConfigSelect.idName: payload = Array(name.utf8)
    case ConfigSelect.idSerial: payload = Array(serial.utf8)
    case ConfigSelect.idDeviceIDs:
      let ids = deviceIDs
      payload = [ids.bus, ids.vendor, ids.product, ids.version].flatMap {
        [UInt8(truncatingIfNeeded: $0), UInt8(truncatingIfNeeded: $0 >> 8)]
      }
    case ConfigSelect.eventBits:
      switch UInt16(subselect) {
      case LinuxInputCode.eventSync: payload = bitmap([LinuxInputCode.syncReport])
      case LinuxInputCode.eventKey:
        payload = bitmap([LinuxInputCode.buttonLeft, LinuxInputCode.buttonRight, LinuxInputCode.buttonMiddle])
      case LinuxInputCode.eventAbsolute: payload = bitmap([LinuxInputCode.absoluteX, LinuxInputCode.absoluteY])
      default: break
      }
    case ConfigSelect.absoluteInfo:
      if UInt16(subselect) == LinuxInputCode.absoluteX || UInt16(subselect) == LinuxInputCode.absoluteY {
        // min, max, fuzz, flat, res
        payload = littleEndian([0, axisMaximum, 0, 0, 0])
      }
    default: break  // UNSET, PROP_BITS (no properties) and unknown selectors: size 0
    }
    var bytes = [UInt8](repeating: 0, count: 136)
    bytes[0] = select
    bytes[1] = subselect
    bytes[2] = UInt8(payload.count)
    bytes.replaceSubrange(8..<(8 + payload.count), with: payload)
    return bytes
  }

  public func readConfig(offset: Int, size: Int) -> UInt64 {
    let (select, subselect) = state.withLock { ($0.select, $0.subselect) }
    let bytes = Self.configuration(select: select, subselect: subselect)
    var value: UInt64 = 0
    for index in 0..<min(size, 8) where offset + index >= 0 && offset + index < bytes.count {
      value |= UInt64(bytes[offset + index]) << (index * 8)
    }
    return value
  }

  public func writeConfig(offset: Int, size: Int, value: UInt64) {
    state.withLock { state in
      for index in 0..<min(size, 8) {
        let byte = UInt8(truncatingIfNeeded: value >> (index * 8))
        switch offset + index {
        case 0: state.select = byte
        case 1: state.subselect = byte
        default: break  // size and the union are read-only
        }
      }
    }
  }

  // MARK: Lifecycle and queues

  public func activate(_ queues: VirtioQueueSet) {
    state.withLock { $0.driverRunning = true }
    queueWorker.activate(queues)
  }

  public func notify(queue: Int) { queueWorker.wake() }

  public func reset() {
    state.withLock { state in
      state.driverRunning = false
      state.pending.removeAll()
      state.select = 0
      state.subselect = 0
    }
  }

  public func shutdown() { queueWorker.stop() }

  func process() {
    // statusq: LED and feedback events are read and ignored.
    queueWorker.serve(queue: 1) { _, _ throws(VirtqueueError) in 0 }
    queueWorker.serve(queue: 0, while: { state.withLock { !$0.pending.isEmpty } }) {
      chain, memory throws(VirtqueueError) in
      guard chain.readableCount == 0 else { throw VirtqueueError("virtio-input event buffer is not device-writable") }
      guard chain.writableLength >= 8 else {
        throw VirtqueueError("virtio-input event buffer is shorter than an event")
      }
      guard let event = state.withLock({ $0.pending.isEmpty ? nil : $0.pending.removeFirst() }) else { return 0 }
      let written = event.bytes.withUnsafeBytes { chain.write(to: memory, offset: 0, from: $0) }
      guard written == 8 else { throw VirtqueueError("virtio-input event buffer is outside guest RAM") }
      return 8
    }
  }
}
