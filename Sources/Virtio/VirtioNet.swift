import CVirtioShim
import Glibc
import Synchronization
import VMCore

/// Why a network backend could not be opened.
public enum NetworkBackendError: Error, Equatable, Sendable, CustomStringConvertible {
  /// The TAP device could not be opened or configured.
  case cannotOpenTap(name: String, errno: Int32)
  /// The TAP device is one the process opened at start (`PreopenedTaps`, `serve --tap`) and
  /// another network interface holds it.
  case tapInUse(name: String)
  /// The MAC address text is not six hex bytes separated by colons.
  case invalidMAC(String)

  public var description: String {
    switch self {
    case .cannotOpenTap(let name, let err): return "cannot open TAP '\(name)': \(String(cString: strerror(err)))"
    case .tapInUse(let name):
      return "TAP '\(name)' is in use by another network interface (a TAP opened at start with serve --tap is"
        + " attached to one interface at a time)"
    case .invalidMAC(let text): return "invalid MAC address '\(text)' (expected xx:xx:xx:xx:xx:xx)"
    }
  }
}

/// A host network endpoint exchanging Ethernet frames, each preceded by a 12-byte
/// `virtio_net_hdr` (with `num_buffers`, as VIRTIO_F_VERSION_1 defines it).
public protocol NetworkBackend: AnyObject, Sendable {
  /// A descriptor that polls readable when a frame is waiting.
  var pollDescriptor: Int32 { get }
  /// Sends one frame given as header + frame bytes in `vectors`; false when it was dropped.
  func transmit(_ vectors: UnsafeBufferPointer<iovec>) -> Bool
  /// Reads one waiting frame (header + frame) into `buffer`: its length, 0 if none is waiting.
  func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int
  /// Whether the backend understands the offload fields of the header (checksum, GSO) on
  /// transmit, and can produce them on receive when `setReceiveOffloads` allows it.
  var supportsOffloads: Bool { get }
  /// Which offloads received frames may carry (`NetworkOffloads`); false when refused.
  func setReceiveOffloads(_ offloads: NetworkOffloads) -> Bool
  /// Whether transmitted bytes wait for the descriptor to become writable (a stream backend);
  /// the device's worker then also polls for writability and calls `flushPendingOutput`.
  var hasPendingOutput: Bool { get }
  /// Sends what `transmit` had to leave queued, as far as the descriptor takes it.
  func flushPendingOutput()
  /// Whether the backend takes another frame now: false while its queue towards the host is
  /// full, when a device leaves further frames in its transmit ring (as a real NIC does when
  /// the wire is busy) until the worker's flush has made room. A frame transmitted anyway may
  /// be dropped.
  var canTransmit: Bool { get }
  /// Whether `receive` has a frame that the descriptor does not show (one the backend made
  /// itself): a device that transmitted outside its worker wakes the worker to take it.
  var hasPendingInput: Bool { get }
}

extension NetworkBackend {
  public var supportsOffloads: Bool { false }
  public func setReceiveOffloads(_ offloads: NetworkOffloads) -> Bool { offloads.isEmpty }
  public var hasPendingOutput: Bool { false }
  public func flushPendingOutput() {}
  public var canTransmit: Bool { true }
  public var hasPendingInput: Bool { false }
}

/// Offloads a receiver accepts in frames' `virtio_net_hdr`: partial checksums and TCP
/// segmentation (the TAP's TUN_F_* flags).
public struct NetworkOffloads: OptionSet, Sendable {
  public let rawValue: UInt32
  public init(rawValue: UInt32) { self.rawValue = rawValue }
  /// Frames may carry a partial checksum (NEEDS_CSUM with csum_start/csum_offset).
  public static let checksum = NetworkOffloads(rawValue: HV_TUN_F_CSUM)
  /// TCPv4 segments larger than the MTU (GSO_TCPV4).
  public static let tcp4Segmentation = NetworkOffloads(rawValue: HV_TUN_F_TSO4)
  /// TCPv6 segments larger than the MTU (GSO_TCPV6).
  public static let tcp6Segmentation = NetworkOffloads(rawValue: HV_TUN_F_TSO6)
  /// Segments with ECN (GSO_ECN).
  public static let ecnSegmentation = NetworkOffloads(rawValue: HV_TUN_F_TSO_ECN)
}

/// A Linux TAP interface opened through /dev/net/tun with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
/// and a 12-byte vnet header (TUNSETVNETHDRSZ); receive offloads start disabled and follow the
/// features the guest negotiates (TUNSETOFFLOAD). The interface is created if missing (needs
/// CAP_NET_ADMIN) and is not brought up.
///
/// The backend can let go of the interface and take it again (`release`, `attach`) while its
/// descriptor number stays the same, so a device worker polling it needs no change: a live
/// migration on one host hands the interface from the source process to the destination this
/// way. While released, the descriptor is an eventfd that never polls readable, transmitted
/// frames are dropped and nothing is received.
///
/// A TAP the process opened at start (`PreopenedTaps`, `hostvisor serve --tap`) is not opened
/// again: the backend claims it (one backend at a time) and works on a duplicate of the kept
/// descriptor, so an unprivileged, sandboxed VMM attaches a TAP it could neither create nor
/// open. The claim ends with `relinquishPreopened` (the machine stopped) or with the backend.
public final class TapBackend: NetworkBackend {
  /// The interface name the kernel reports (the requested name while never attached).
  public let name: String
  /// The descriptor number; it refers to the TAP while attached, else to an idle eventfd.
  private let fd: Int32
  public var pollDescriptor: Int32 { fd }
  /// Whether `fd` refers to the TAP now; the receive offloads last asked for, applied again
  /// when the interface is taken back; and whether the backend still holds its claim on the
  /// pre-opened TAP (always false without one).
  private let attachment: Mutex<(attached: Bool, offloads: NetworkOffloads, holdsClaim: Bool)>
  /// The TAP the process opened at start under this name, when there is one.
  private let preopened: PreopenedTap?

  /// Whether the device may offer the checksum and segmentation offloads (`supportsOffloads`).
  private let offersOffloads: Bool

  /// Opens (or creates) TAP interface `name`, or claims it when the process opened it at start
  /// (`PreopenedTaps`; `.tapInUse` while another backend holds it); `offloads: false` makes the
  /// device offer no checksum or segmentation offloads (plain 1500-byte frames with full
  /// checksums only). With `attached: false` the interface is not opened yet (see `attach`),
  /// though a pre-opened one is claimed already.
  public init(name: String, offloads: Bool = true, attached: Bool = true) throws(NetworkBackendError) {
    guard !name.isEmpty, name.utf8.count < 16 else { throw .cannotOpenTap(name: name, errno: EINVAL) }
    let preopened = PreopenedTaps.named(name)
    try preopened?.claim()
    let fd: Int32
    do throws(NetworkBackendError) {
      if !attached {
        fd = hv_eventfd()
      } else if let preopened {
        fd = try preopened.duplicate()
      } else {
        fd = try Self.open(name: name)
      }
      guard fd >= 0 else { throw .cannotOpenTap(name: name, errno: errno) }
    } catch {
      preopened?.relinquish()
      throw error
    }
    self.fd = fd
    self.offersOffloads = offloads
    self.preopened = preopened
    self.name = attached ? Self.interfaceName(of: fd) ?? name : name
    attachment = Mutex((attached, [], preopened != nil))
  }

  deinit {
    close(fd)
    if attachment.withLock({ $0.holdsClaim }) { preopened?.relinquish() }
  }

  /// A new descriptor on TAP `name` (IFF_VNET_HDR, 12-byte header, offloads off), creating the
  /// interface when it is missing (needs CAP_NET_ADMIN, as attaching to a TAP that belongs to
  /// another user or group does).
  static func open(name: String) throws(NetworkBackendError) -> Int32 {
    let fd = Glibc.open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK)
    guard fd >= 0 else { throw .cannotOpenTap(name: name, errno: errno) }
    var request = [UInt8](repeating: 0, count: Int(HV_IFREQ_SIZE))
    for (index, byte) in name.utf8.enumerated() { request[index] = byte }
    let flags = UInt16(bitPattern: HV_IFF_TAP | HV_IFF_NO_PI | HV_IFF_VNET_HDR)
    request[Int(HV_IFREQ_FLAGS_OFFSET)] = UInt8(flags & 0xFF)
    request[Int(HV_IFREQ_FLAGS_OFFSET) + 1] = UInt8(flags >> 8)
    var headerSize: Int32 = 12
    guard request.withUnsafeMutableBytes({ hv_virtio_ioctl_ptr(fd, HV_TUNSETIFF, $0.baseAddress) }) == 0,
      hv_virtio_ioctl_ptr(fd, HV_TUNSETVNETHDRSZ, &headerSize) == 0,
      hv_virtio_ioctl_int(fd, HV_TUNSETOFFLOAD, 0) == 0
    else {
      let err = errno
      close(fd)
      throw .cannotOpenTap(name: name, errno: err)
    }
    return fd
  }

  /// The name of the interface `fd` is attached to (TUNGETIFF).
  static func interfaceName(of fd: Int32) -> String? {
    interfaceRequest(of: fd).map { String(decoding: $0.prefix(16).prefix { $0 != 0 }, as: UTF8.self) }
  }

  /// Whether the interface `fd` is attached to is persistent (TUNGETIFF reports IFF_PERSIST):
  /// it outlives its last descriptor.
  static func isPersistent(_ fd: Int32) -> Bool {
    guard let request = interfaceRequest(of: fd) else { return false }
    let flags = UInt16(request[Int(HV_IFREQ_FLAGS_OFFSET)]) | UInt16(request[Int(HV_IFREQ_FLAGS_OFFSET) + 1]) << 8
    return flags & UInt16(bitPattern: HV_IFF_PERSIST) != 0
  }

  /// The `struct ifreq` TUNGETIFF fills in for `fd` (name and flags).
  private static func interfaceRequest(of fd: Int32) -> [UInt8]? {
    var request = [UInt8](repeating: 0, count: Int(HV_IFREQ_SIZE))
    guard request.withUnsafeMutableBytes({ hv_virtio_ioctl_ptr(fd, HV_TUNGETIFF, $0.baseAddress) }) == 0 else {
      return nil
    }
    return request
  }

  /// Whether the backend holds the interface now.
  public var isAttached: Bool { attachment.withLock { $0.attached } }

  /// Lets go of the interface: its descriptor is replaced by an idle eventfd, so the kernel
  /// detaches this process from the TAP once no poll holds the old descriptor any more (a
  /// persistent TAP stays, with its addresses; one this process created disappears). Frames
  /// sent meanwhile are dropped. A pre-opened TAP stays attached to the process, which keeps
  /// its own descriptor on it (`PreopenedTap`).
  public func release() {
    attachment.withLock { state in
      guard state.attached else { return }
      let idle = hv_eventfd()
      guard idle >= 0 else { return }
      _ = hv_dup3_cloexec(idle, fd)
      close(idle)
      state.attached = false
    }
  }

  /// Ends this backend's claim on a pre-opened TAP (`PreopenedTaps`) once its device has
  /// stopped: the backend lets go of the interface (`release`) and the next machine's backend
  /// may claim it. Nothing for other TAPs, whose descriptor closes with the backend.
  public func relinquishPreopened() {
    guard let preopened else { return }
    release()
    let held = attachment.withLock { state in
      defer { state.holdsClaim = false }
      return state.holdsClaim
    }
    if held { preopened.relinquish() }
  }

  /// Opens the interface by name again (after `release`, or for a backend made with
  /// `attached: false`; a pre-opened TAP is duplicated from the process's descriptor instead)
  /// and restores the receive offloads the device asked for. Retries for up to
  /// `timeoutMilliseconds` while the kernel reports it busy (another process still holds it).
  public func attach(timeoutMilliseconds: Int = 5000) throws(NetworkBackendError) {
    var waited = 0
    while true {
      let result = attachment.withLock { state -> Result<Void, NetworkBackendError> in
        guard !state.attached else { return .success(()) }
        do throws(NetworkBackendError) {
          let tap: Int32
          if let preopened {
            guard state.holdsClaim else { throw .tapInUse(name: name) }
            tap = try preopened.duplicate()
          } else {
            tap = try Self.open(name: name)
          }
          if !state.offloads.isEmpty { _ = hv_virtio_ioctl_int(tap, HV_TUNSETOFFLOAD, UInt(state.offloads.rawValue)) }
          _ = hv_dup3_cloexec(tap, fd)
          close(tap)
          state.attached = true
          return .success(())
        } catch {
          return .failure(error)
        }
      }
      switch result {
      case .success: return
      case .failure(let error):
        guard case .cannotOpenTap(_, let err) = error, err == EBUSY, waited < timeoutMilliseconds else { throw error }
        usleep(20_000)
        waited += 20
      }
    }
  }

  public var supportsOffloads: Bool { offersOffloads }

  public func setReceiveOffloads(_ offloads: NetworkOffloads) -> Bool {
    attachment.withLock { state in
      state.offloads = offloads
      // While released, the offloads apply when the interface is taken back.
      return !state.attached || hv_virtio_ioctl_int(fd, HV_TUNSETOFFLOAD, UInt(offloads.rawValue)) == 0
    }
  }

  // Both hold the lock through the system call (uncontended: the device's one worker thread
  // calls them), so `release` never swaps the descriptor under a frame in flight.
  public func transmit(_ vectors: UnsafeBufferPointer<iovec>) -> Bool {
    attachment.withLock { state in
      guard state.attached else { return false }
      while true {
        let result = writev(fd, vectors.baseAddress, Int32(vectors.count))
        if result >= 0 { return true }
        if errno != EINTR { return false }
      }
    }
  }

  public func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int {
    attachment.withLock { state in
      guard state.attached else { return 0 }
      while true {
        let result = read(fd, buffer.baseAddress, buffer.count)
        if result >= 0 { return result }
        if errno != EINTR { return 0 }
      }
    }
  }
}

/// A MAC address.
public struct MACAddress: Sendable, Equatable, CustomStringConvertible {
  public var bytes: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8)

  public init(_ a: UInt8, _ b: UInt8, _ c: UInt8, _ d: UInt8, _ e: UInt8, _ f: UInt8) { bytes = (a, b, c, d, e, f) }

  /// Parses "52:54:00:12:34:56".
  public init(parsing text: String) throws(NetworkBackendError) {
    let parts = text.split(separator: ":", omittingEmptySubsequences: false)
    guard parts.count == 6 else { throw .invalidMAC(text) }
    var values: [UInt8] = []
    for part in parts {
      guard part.count == 2, let value = UInt8(part, radix: 16) else { throw .invalidMAC(text) }
      values.append(value)
    }
    self.init(values[0], values[1], values[2], values[3], values[4], values[5])
  }

  /// A random locally administered address 52:54:00:xx:xx:xx.
  public static func random() -> MACAddress {
    var tail: [UInt8] = [0, 0, 0]
    _ = tail.withUnsafeMutableBytes { HostEntropySource().fill($0) }
    return MACAddress(0x52, 0x54, 0x00, tail[0], tail[1], tail[2])
  }

  /// The six bytes in order.
  public var array: [UInt8] { [bytes.0, bytes.1, bytes.2, bytes.3, bytes.4, bytes.5] }

  public static func == (lhs: MACAddress, rhs: MACAddress) -> Bool { lhs.array == rhs.array }

  public var description: String { array.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: ":") }
}

/// virtio-net (virtio 1.2, 5.1): receiveq 0 and transmitq 1 on a `NetworkBackend`, served by a
/// worker thread that polls the backend (only while receive buffers are available) and an
/// eventfd the notify writes kick. Offers VIRTIO_NET_F_MAC, F_STATUS (link up) and
/// F_MRG_RXBUF, and, when the backend supports them (TAP), checksum and TCP segmentation
/// offloads in both directions (F_CSUM, F_HOST_TSO4/6/ECN; F_GUEST_CSUM, F_GUEST_TSO4/6/ECN):
/// a guest that negotiates them hands 64 KiB TCP segments with partial checksums to the host
/// kernel, which finishes them, and receives them the same way, instead of computing every
/// checksum and handling every 1500-byte frame itself. Without F_CSUM, transmitted headers
/// are replaced by zeroed ones; without F_GUEST_CSUM, received headers are zeroed.
public final class VirtioNet: VirtioDeviceModel, CountingDevice {
  /// Feature bits.
  public enum Feature {
    public static let checksum: UInt64 = 1 << 0
    public static let guestChecksum: UInt64 = 1 << 1
    public static let mac: UInt64 = 1 << 5
    public static let guestTSO4: UInt64 = 1 << 7
    public static let guestTSO6: UInt64 = 1 << 8
    public static let guestECN: UInt64 = 1 << 9
    public static let hostTSO4: UInt64 = 1 << 11
    public static let hostTSO6: UInt64 = 1 << 12
    public static let hostECN: UInt64 = 1 << 13
    public static let mergeableReceiveBuffers: UInt64 = 1 << 15
    public static let status: UInt64 = 1 << 16
    /// The offloads offered when the backend supports them.
    public static let offloads: UInt64 =
      checksum | guestChecksum | guestTSO4 | guestTSO6 | guestECN | hostTSO4 | hostTSO6 | hostECN
  }
  /// Size of the virtio_net_hdr with num_buffers.
  public static let headerSize = 12
  /// Largest frame accepted (a 64 KiB GSO packet plus Ethernet and VLAN headers), header excluded.
  public static let maxFrameSize = 65536 + 18

  public let deviceType = VirtioDeviceID.network
  public let deviceFeatures: UInt64
  public let queueMaxSizes: [UInt16]
  public let configSize = 10
  /// The device's MAC address.
  public let mac: MACAddress
  /// The host side.
  public let backend: any NetworkBackend
  /// Frames and bytes moved (without the virtio-net header): `rx_frames`, `rx_bytes`,
  /// `tx_frames`, `tx_bytes`, and `tx_dropped` (frames the backend refused or that were too
  /// long), `rx_dropped` (frames too long for a receive buffer).
  public let counters = DeviceCounters(["rx_frames", "rx_bytes", "tx_frames", "tx_bytes", "tx_dropped", "rx_dropped"])

  private struct ReceiveState {
    var buffer: UnsafeMutableRawBufferPointer
    /// Bytes of the frame waiting in `buffer` (header included), 0 when none.
    var pending = 0
    /// Whether the last attempt found receive buffers (poll the backend only then).
    var buffersAvailable = true
    var chain = DescriptorChain()
    var firstChain = DescriptorChain()
    var used: [(UInt16, UInt32)] = []
    var vectors: [iovec] = []
  }

  private let queueSet = Mutex<VirtioQueueSet?>(nil)
  private let receive: Mutex<ReceiveState>
  private let wantsInput = Atomic<Bool>(false)
  /// Set by `reset`: the worker drops the frame it holds before it serves the queues again.
  private let dropPendingFrame = Atomic<Bool>(false)
  /// Whether the guest negotiated F_CSUM (its transmit headers go to the host unchanged).
  private let transmitOffloads = Atomic<Bool>(false)
  /// Whether the guest negotiated F_GUEST_CSUM (the backend's receive headers reach it).
  private let receiveOffloads = Atomic<Bool>(false)
  private let worker: DeviceWorker
  /// The link-status flap after the host interface changed (`signalHostInterfaceChange`):
  /// whether the link reads as down, and whether the driver has read it down.
  private let linkFlap = Mutex<(down: Bool, seenDown: Bool)>((false, false))
  /// How long the link stays down after the driver saw it down, and how long the device waits
  /// for the driver to look before it raises the link anyway (host nanoseconds).
  static let linkDownNanoseconds: UInt64 = 50_000_000
  static let linkFlapTimeoutNanoseconds: UInt64 = 30_000_000_000

  /// A network device on `backend` with address `mac` (random 52:54:00:xx:xx:xx by default).
  public init(backend: any NetworkBackend, mac: MACAddress? = nil, queueSize: UInt16 = 256) {
    self.backend = backend
    self.mac = mac ?? .random()
    deviceFeatures =
      Feature.mac | Feature.mergeableReceiveBuffers | Feature.status
      | (backend.supportsOffloads ? Feature.offloads : 0)
    queueMaxSizes = [queueSize, queueSize]
    var state = ReceiveState(
      buffer: .allocate(byteCount: Self.headerSize + Self.maxFrameSize, alignment: 16))
    state.vectors.reserveCapacity(Int(queueSize) + 1)
    state.used.reserveCapacity(Int(queueSize))
    receive = Mutex(state)
    let link = WeakLink<VirtioNet>()
    worker = DeviceWorker(
      name: "virtio-net", backendFD: backend.pollDescriptor, wantsBackend: { link.target?.shouldPoll ?? false },
      wantsOutput: { [backend] in backend.hasPendingOutput }
    ) { ready in link.target?.process(backendReady: ready) }
    link.target = self
  }

  deinit { receive.withLock { $0.buffer.deallocate() } }

  fileprivate var shouldPoll: Bool { wantsInput.load(ordering: .acquiring) }

  public func readConfig(offset: Int, size: Int) -> UInt64 {
    // mac, status (VIRTIO_NET_S_LINK_UP unless a flap holds the link down), max_virtqueue_pairs = 1
    let statusOffset = 6
    let linkUp = linkFlap.withLock { flap -> Bool in
      if flap.down && offset <= statusOffset && statusOffset < offset + size { flap.seenDown = true }
      return !flap.down
    }
    let bytes = mac.array + [linkUp ? 1 : 0, 0, 1, 0]
    var value: UInt64 = 0
    for index in 0..<size where offset + index < bytes.count { value |= UInt64(bytes[offset + index]) << (8 * index) }
    return value
  }

  public func writeConfig(offset: Int, size: Int, value: UInt64) {}

  public func activate(_ queues: VirtioQueueSet) {
    let features = queues.negotiatedFeatures
    var offloads: NetworkOffloads = []
    if features & Feature.guestChecksum != 0 {
      offloads.insert(.checksum)
      if features & Feature.guestTSO4 != 0 { offloads.insert(.tcp4Segmentation) }
      if features & Feature.guestTSO6 != 0 { offloads.insert(.tcp6Segmentation) }
      if features & Feature.guestECN != 0 { offloads.insert(.ecnSegmentation) }
    }
    // A backend that refuses keeps delivering plain frames, whose zeroed headers are valid.
    receiveOffloads.store(
      !offloads.isEmpty && backend.setReceiveOffloads(offloads), ordering: .releasing)
    transmitOffloads.store(features & Feature.checksum != 0, ordering: .releasing)
    queueSet.withLock { $0 = queues }
    receive.withLock {
      $0.buffersAvailable = true
      $0.pending = 0
    }
    dropPendingFrame.store(false, ordering: .releasing)
    wantsInput.store(true, ordering: .releasing)
    worker.start()
    worker.wake()
  }

  public func notify(queue: Int) {
    if queue == 0 { wantsInput.store(true, ordering: .releasing) }
    worker.wake()
  }

  /// Called with the queue set locked, so it must not take `receive`: the worker holds
  /// `receive` while it waits for the queue set (lock order receive, then queue set), and a
  /// reset taking them the other way round deadlocked with a worker delivering a frame. The
  /// pending frame is dropped by the worker (`dropPendingFrame`) or by the next `activate`.
  public func reset() {
    wantsInput.store(false, ordering: .releasing)
    if receiveOffloads.exchange(false, ordering: .acquiringAndReleasing) {
      _ = backend.setReceiveOffloads([])
    }
    transmitOffloads.store(false, ordering: .releasing)
    dropPendingFrame.store(true, ordering: .releasing)
  }

  public func shutdown() { worker.stop() }

  /// Tells the driver that the host side of the link changed (a snapshot restored onto another
  /// TAP), as a NIC whose cable moved to another switch sees it: with VIRTIO_NET_F_STATUS
  /// negotiated and the device active, the link reads down (configuration-change interrupt)
  /// until the driver has read it down plus `linkDownNanoseconds`, then up again (another
  /// interrupt). A Linux guest drops its neighbour (ARP) entries on carrier loss, so it resolves
  /// the new host side's MAC address instead of sending to the old one's. The link comes up
  /// after `linkFlapTimeoutNanoseconds` whether the driver looked or not.
  public func signalHostInterfaceChange() {
    guard let queues = queueSet.withLock({ $0 }), queues.isActive,
      queues.negotiatedFeatures & Feature.status != 0
    else { return }
    linkFlap.withLock { $0 = (true, false) }
    queues.configurationChanged()
    let started = HostCondition.now()
    let link = WeakLink<VirtioNet>()
    link.target = self
    let thread = HostThread.start(detached: true) {
      var seenAt: UInt64?
      while true {
        guard let device = link.target else { return }
        let now = HostCondition.now()
        let seen = device.linkFlap.withLock { $0.seenDown }
        if seen && seenAt == nil { seenAt = now }
        if let seenAt, now - seenAt >= Self.linkDownNanoseconds { break }
        if now - started >= Self.linkFlapTimeoutNanoseconds { break }
        usleep(10_000)
      }
      guard let device = link.target else { return }
      device.linkFlap.withLock { $0 = (false, false) }
      queues.configurationChanged()
    }
    if case .failure = thread {
      linkFlap.withLock { $0 = (false, false) }
      queues.configurationChanged()
    }
  }

  /// Lets go of the host TAP (`TapBackend.release`) and wakes the worker so that its poll
  /// stops holding the old descriptor. Other backends keep their host side.
  public func releaseHostInterface() {
    guard let tap = backend as? TapBackend else { return }
    tap.release()
    worker.wake()
  }

  /// Takes the host TAP again (`TapBackend.attach`, retrying while another process still holds
  /// it) and looks for waiting frames.
  public func attachHostInterface(timeoutMilliseconds: Int = 5000) throws(NetworkBackendError) {
    guard let tap = backend as? TapBackend else { return }
    try tap.attach(timeoutMilliseconds: timeoutMilliseconds)
    wantsInput.store(true, ordering: .releasing)
    worker.wake()
  }

  func process(backendReady: Bool) {
    backend.flushPendingOutput()
    guard let queues = queueSet.withLock({ $0 }) else { return }
    let memory = queues.memory
    receive.withLock { state in
      if dropPendingFrame.exchange(false, ordering: .acquiringAndReleasing) { state.pending = 0 }
      transmitAll(queues, memory, &state)
      receiveAll(queues, memory, &state)
    }
  }

  private func transmitAll(_ queues: VirtioQueueSet, _ memory: GuestMemory, _ state: inout ReceiveState) {
    let passHeader = transmitOffloads.load(ordering: .acquiring)
    _ = queues.withQueue(1) { queue throws(VirtqueueError) in
      var header = [UInt8](repeating: 0, count: Self.headerSize)
      // Frames the backend cannot take yet stay in the ring: the worker polls the backend for
      // writability while its queue is full and comes back here.
      while backend.canTransmit, try queue.popAvailable(into: &state.chain) {
        let chain = state.chain
        guard chain.readableCount == chain.buffers.count else {
          throw VirtqueueError("virtio-net transmit buffer is device-writable")
        }
        guard chain.readableLength >= UInt64(Self.headerSize) else {
          throw VirtqueueError("virtio-net transmit buffer shorter than the header")
        }
        if chain.readableLength - UInt64(Self.headerSize) <= UInt64(Self.maxFrameSize) {
          header.withUnsafeMutableBytes { headerBytes in
            if passHeader {
              // flags, gso_type, hdr_len, gso_size, csum_start, csum_offset as the guest set
              // them: the host kernel validates them (virtio_net_hdr_to_skb) and drops bad
              // frames. num_buffers means nothing on transmit.
              _ = chain.read(
                from: memory, offset: 0, into: UnsafeMutableRawBufferPointer(rebasing: headerBytes[0..<10]))
            }
            state.vectors.removeAll(keepingCapacity: true)
            state.vectors.append(iovec(iov_base: headerBytes.baseAddress, iov_len: Self.headerSize))
            _ = chain.readSpans(
              memory: memory, offset: UInt64(Self.headerSize), count: Int(chain.readableLength) - Self.headerSize
            ) { pointer, _, count in
              // writev only reads through iov_base.
              state.vectors.append(iovec(iov_base: UnsafeMutableRawPointer(mutating: pointer), iov_len: count))
            }
            let sent = state.vectors.withUnsafeBufferPointer { backend.transmit($0) }
            if sent {
              counters.add(["tx_frames": 1, "tx_bytes": chain.readableLength - UInt64(Self.headerSize)])
            } else {
              counters.add(["tx_dropped": 1])
            }
          }
        } else {
          counters.add(["tx_dropped": 1])
        }
        try queue.pushUsed(head: chain.head, length: 0)
      }
    }
  }

  private func receiveAll(_ queues: VirtioQueueSet, _ memory: GuestMemory, _ state: inout ReceiveState) {
    let mergeable = queues.negotiatedFeatures & Feature.mergeableReceiveBuffers != 0
    while true {
      guard queues.isActive else {
        wantsInput.store(false, ordering: .releasing)
        return
      }
      if state.pending == 0 {
        let count = backend.receive(into: state.buffer)
        guard count > Self.headerSize else {
          if count == 0 { break } else { continue }
        }
        state.pending = count
      }
      let delivered =
        queues.withQueue(0) { queue throws(VirtqueueError) -> Bool in
          try deliver(&queue, memory, &state, mergeable: mergeable)
        } ?? false
      if !delivered {
        // No room: keep the frame, stop polling until the driver adds receive buffers.
        wantsInput.store(false, ordering: .releasing)
        return
      }
    }
    wantsInput.store(true, ordering: .releasing)
  }

  /// Places the pending frame into receive buffers; false when there are not enough of them.
  private func deliver(
    _ queue: inout SplitVirtqueue, _ memory: GuestMemory, _ state: inout ReceiveState, mergeable: Bool
  ) throws(VirtqueueError) -> Bool {
    // Without F_GUEST_CSUM the header must be all zeros; with it, the backend's header (partial
    // checksum, GSO) goes through. num_buffers is set below.
    if !receiveOffloads.load(ordering: .acquiring) {
      memset(state.buffer.baseAddress!, 0, Self.headerSize)
    }
    let frame = UnsafeRawBufferPointer(rebasing: state.buffer[0..<state.pending])
    var offset = 0
    state.used.removeAll(keepingCapacity: true)
    while offset < frame.count {
      guard try queue.popAvailable(into: &state.chain) else {
        queue.undoPop(state.used.count)
        return false
      }
      guard state.chain.readableCount == 0 else {
        throw VirtqueueError("virtio-net receive buffer is not device-writable")
      }
      guard state.used.count < Int(queue.size) else { throw VirtqueueError("virtio-net receive buffers exhausted") }
      if state.used.isEmpty {
        guard state.chain.writableLength >= UInt64(Self.headerSize) else {
          throw VirtqueueError("virtio-net receive buffer shorter than the header")
        }
        if !mergeable && state.chain.writableLength < UInt64(frame.count) {
          // Too small for the frame without mergeable buffers: drop the frame, keep the buffer.
          queue.undoPop(1)
          state.pending = 0
          counters.add(["rx_dropped": 1])
          return true
        }
        // Keep the first chain to patch num_buffers in once the count is known.
        swap(&state.chain, &state.firstChain)
      }
      let chain = state.used.isEmpty ? state.firstChain : state.chain
      let count = min(frame.count - offset, Int(min(chain.writableLength, UInt64(Int.max))))
      let written = chain.write(
        to: memory, offset: 0, from: UnsafeRawBufferPointer(rebasing: frame[offset..<(offset + count)]))
      offset += written
      state.used.append((chain.head, UInt32(written)))
      if written == 0 || !mergeable { break }
    }
    var buffers = UInt16(truncatingIfNeeded: state.used.count).littleEndian
    _ = withUnsafeBytes(of: &buffers) { state.firstChain.write(to: memory, offset: 10, from: $0) }
    for (head, length) in state.used { try queue.pushUsed(head: head, length: length) }
    counters.add(["rx_frames": 1, "rx_bytes": UInt64(max(0, offset - Self.headerSize))])
    state.pending = 0
    return true
  }
}
