import CVirtioShim
import Glibc
import Synchronization
import VMCore

/// Why a block backend operation failed; the guest sees VIRTIO_BLK_S_IOERR.
public enum BlockBackendError: Error, Equatable, Sendable, CustomStringConvertible {
  /// The image could not be opened or inspected.
  case cannotOpen(path: String, errno: Int32)
  /// A host I/O call failed with `errno`.
  case io(errno: Int32)
  /// The VM's I/O limits could not be put on the image's host device.
  case cannotLimit(path: String, reason: String)

  public var description: String {
    switch self {
    case .cannotOpen(let path, let err): return "cannot open disk image '\(path)': \(String(cString: strerror(err)))"
    case .io(let err): return "disk I/O error: \(String(cString: strerror(err)))"
    case .cannotLimit(let path, let reason): return "cannot limit the I/O of disk image '\(path)': \(reason)"
    }
  }
}

/// Storage behind a virtio-blk device. Calls come from the device's worker thread, one at a time.
public protocol BlockBackend: AnyObject, Sendable {
  /// Size of the disk in bytes (a multiple of 512).
  var capacity: UInt64 { get }
  /// Whether the disk refuses writes.
  var isReadOnly: Bool { get }
  /// The serial the guest reads with VIRTIO_BLK_T_GET_ID (at most 20 bytes are used).
  var identifier: [UInt8] { get }
  /// Fills `buffer` from byte `offset` (reads past the end of the data return zeros).
  func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlockBackendError)
  /// Writes `buffer` at byte `offset`.
  func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlockBackendError)
  /// Fills `buffers` in order from byte `offset`, as one read of their total length (reads
  /// past the end of the data return zeros). A request's scattered guest pages arrive here.
  func read(into buffers: [UnsafeMutableRawBufferPointer], at offset: UInt64) throws(BlockBackendError)
  /// Writes `buffers` in order at byte `offset`, as one write of their total length.
  func write(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws(BlockBackendError)
  /// Makes every completed write durable (fdatasync).
  func flush() throws(BlockBackendError)
  /// Forgets the data of a range (may punch a hole); reads may return old data or zeros.
  func discard(offset: UInt64, length: UInt64) throws(BlockBackendError)
  /// Makes a range read as zeros; with `unmap` it may deallocate it.
  func writeZeroes(offset: UInt64, length: UInt64, unmap: Bool) throws(BlockBackendError)
}

extension BlockBackend {
  /// One buffer after another through `read(into:at:)`.
  public func read(into buffers: [UnsafeMutableRawBufferPointer], at offset: UInt64) throws(BlockBackendError) {
    var position = offset
    for buffer in buffers {
      try read(into: buffer, at: position)
      position += UInt64(buffer.count)
    }
  }

  /// One buffer after another through `write(_:at:)`.
  public func write(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws(BlockBackendError) {
    var position = offset
    for buffer in buffers {
      try write(buffer, at: position)
      position += UInt64(buffer.count)
    }
  }
}

/// A raw disk image file: preadv/pwritev (a request's scattered buffers in one system call as
/// long as the host transfers them whole), fdatasync for flushes, fallocate for discard and
/// write-zeroes (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE).
public final class RawFileBlockBackend: BlockBackend {
  /// The image path.
  public let path: String
  public let capacity: UInt64
  public let isReadOnly: Bool
  public let identifier: [UInt8]
  private let fd: Int32

  /// Opens `path` (read-only when `readOnly`); the capacity is the file size rounded down to
  /// 512-byte sectors. `serial` defaults to the file name.
  public init(path: String, readOnly: Bool = false, serial: String? = nil) throws(BlockBackendError) {
    let fd = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
    guard fd >= 0 else { throw .cannotOpen(path: path, errno: errno) }
    var info = stat()
    guard fstat(fd, &info) == 0 else {
      let err = errno
      close(fd)
      throw .cannotOpen(path: path, errno: err)
    }
    guard info.st_mode & S_IFMT == S_IFREG || info.st_mode & S_IFMT == S_IFBLK else {
      close(fd)
      throw .cannotOpen(path: path, errno: EINVAL)
    }
    let device = info.st_mode & S_IFMT == S_IFBLK ? info.st_rdev : info.st_dev
    if let refusal = HostDiskDevices.opened(device: UInt64(device)) {
      close(fd)
      throw .cannotLimit(path: path, reason: refusal)
    }
    var size = UInt64(info.st_size)
    if info.st_mode & S_IFMT == S_IFBLK {
      let end = lseek(fd, 0, SEEK_END)
      size = end > 0 ? UInt64(end) : 0
    }
    self.fd = fd
    self.path = path
    self.isReadOnly = readOnly
    capacity = size & ~511
    let name = serial ?? String(path.split(separator: "/").last ?? "disk")
    identifier = Array(name.utf8.prefix(20))
  }

  deinit { close(fd) }

  public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlockBackendError) {
    try read(into: [buffer], at: offset)
  }

  public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlockBackendError) {
    try write([buffer], at: offset)
  }

  public func read(into buffers: [UnsafeMutableRawBufferPointer], at offset: UInt64) throws(BlockBackendError) {
    var vectors = buffers.map { iovec(iov_base: $0.baseAddress, iov_len: $0.count) }
    try transfer(&vectors, at: offset, writing: false)
  }

  public func write(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws(BlockBackendError) {
    guard !isReadOnly else { throw .io(errno: EROFS) }
    var vectors = buffers.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
    try transfer(&vectors, at: offset, writing: true)
  }

  /// preadv/pwritev over `vectors` (at most IOV_MAX per call), resumed after a short transfer
  /// from the first byte not moved; a read that reaches the end of the file zero-fills the rest.
  private func transfer(_ vectors: inout [iovec], at offset: UInt64, writing: Bool) throws(BlockBackendError) {
    let vectorLimit = 1024
    var first = 0
    var position = off_t(offset)
    while first < vectors.count {
      if vectors[first].iov_len == 0 {
        first += 1
        continue
      }
      let batch = Int32(min(vectors.count - first, vectorLimit))
      let count = vectors.withUnsafeBufferPointer { all in
        writing
          ? pwritev(fd, all.baseAddress! + first, batch, position)
          : preadv(fd, all.baseAddress! + first, batch, position)
      }
      if count < 0 {
        if errno == EINTR { continue }
        throw .io(errno: errno)
      }
      if count == 0 {
        guard !writing else { throw .io(errno: EIO) }
        for index in first..<vectors.count where vectors[index].iov_len > 0 {
          memset(vectors[index].iov_base, 0, vectors[index].iov_len)
        }
        return
      }
      position += off_t(count)
      var moved = count
      while moved > 0 {
        let length = vectors[first].iov_len
        if moved >= length {
          moved -= length
          first += 1
        } else {
          vectors[first].iov_base = vectors[first].iov_base! + moved
          vectors[first].iov_len -= moved
          moved = 0
        }
      }
    }
  }

  public func flush() throws(BlockBackendError) {
    guard !isReadOnly else { return }
    while fdatasync(fd) != 0 {
      if errno != EINTR { throw .io(errno: errno) }
    }
  }

  public func discard(offset: UInt64, length: UInt64) throws(BlockBackendError) {
    guard !isReadOnly else { throw .io(errno: EROFS) }
    if hv_fallocate(fd, HV_FALLOC_FL_PUNCH_HOLE | HV_FALLOC_FL_KEEP_SIZE, Int64(offset), Int64(length)) != 0 {
      // Discard is advisory: a file system without hole punching simply keeps the data.
      if errno != EOPNOTSUPP { throw .io(errno: errno) }
    }
  }

  public func writeZeroes(offset: UInt64, length: UInt64, unmap: Bool) throws(BlockBackendError) {
    guard !isReadOnly else { throw .io(errno: EROFS) }
    let mode =
      unmap ? HV_FALLOC_FL_PUNCH_HOLE | HV_FALLOC_FL_KEEP_SIZE : HV_FALLOC_FL_ZERO_RANGE | HV_FALLOC_FL_KEEP_SIZE
    if hv_fallocate(fd, mode, Int64(offset), Int64(length)) == 0 { return }
    guard errno == EOPNOTSUPP else { throw .io(errno: errno) }
    let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 4096)
    defer { zeros.deallocate() }
    memset(zeros.baseAddress!, 0, zeros.count)
    var done: UInt64 = 0
    while done < length {
      let chunk = Int(min(UInt64(zeros.count), length - done))
      try write(UnsafeRawBufferPointer(rebasing: zeros[0..<chunk]), at: offset + done)
      done += UInt64(chunk)
    }
  }
}

/// virtio-blk (virtio 1.2, 5.2): one request queue served by a worker thread.
///
/// Requests: IN, OUT, FLUSH (the backend's fdatasync returns before the completion is
/// published), GET_ID, DISCARD and WRITE_ZEROES (hole punching). Read-only disks offer
/// VIRTIO_BLK_F_RO and answer writes with VIRTIO_BLK_S_IOERR, as they do requests beyond the
/// capacity. A request without a readable header or a writable status byte is a driver bug:
/// DEVICE_NEEDS_RESET.
public final class VirtioBlock: QueueWorkerDevice, CountingDevice {
  /// Request types.
  public enum RequestType {
    public static let read: UInt32 = 0
    public static let write: UInt32 = 1
    public static let flush: UInt32 = 4
    public static let getID: UInt32 = 8
    public static let discard: UInt32 = 11
    public static let writeZeroes: UInt32 = 13
  }
  /// Status byte values.
  public enum Status {
    public static let ok: UInt8 = 0
    public static let ioError: UInt8 = 1
    public static let unsupported: UInt8 = 2
  }
  /// Feature bits.
  public enum Feature {
    public static let sizeMax: UInt64 = 1 << 1
    public static let segMax: UInt64 = 1 << 2
    public static let readOnly: UInt64 = 1 << 5
    public static let blockSize: UInt64 = 1 << 6
    public static let flush: UInt64 = 1 << 9
    public static let discard: UInt64 = 1 << 13
    public static let writeZeroes: UInt64 = 1 << 14
  }

  /// Largest segment size advertised (size_max).
  public static let maxSegmentSize: UInt32 = 1 << 20
  /// Most segments per DISCARD / WRITE_ZEROES request.
  public static let maxDiscardSegments: UInt32 = 16

  public let deviceType = VirtioDeviceID.block
  public let deviceFeatures: UInt64
  public let queueMaxSizes: [UInt16]
  public let configSize = 60
  /// The storage requests go to now (`replaceBackend` swaps it while the guest runs).
  public var backend: any BlockBackend { current.withLock { $0 } }
  private let current: Mutex<any BlockBackend>
  private let configBytes: Mutex<[UInt8]>
  private let queueSize: UInt16
  /// The worker thread serving the queues.
  public let queueWorker: QueueWorker
  /// Requests and bytes served: `read_ops`, `read_bytes`, `write_ops`, `write_bytes`,
  /// `flush_ops`, `discard_ops` (discard and write-zeroes) and `errors` (requests answered
  /// with an I/O error or as unsupported).
  public let counters = DeviceCounters([
    "read_ops", "read_bytes", "write_ops", "write_bytes", "flush_ops", "discard_ops", "errors",
  ])

  /// A block device on `backend` with one queue of `queueSize` entries.
  public init(backend: any BlockBackend, queueSize: UInt16 = 256) {
    current = Mutex(backend)
    self.queueSize = queueSize
    queueMaxSizes = [queueSize]
    var features = Feature.sizeMax | Feature.segMax | Feature.blockSize | Feature.flush
    features |= backend.isReadOnly ? Feature.readOnly : Feature.discard | Feature.writeZeroes
    deviceFeatures = features
    configBytes = Mutex(Self.configuration(capacity: backend.capacity, queueSize: queueSize))
    let link = WeakLink<VirtioBlock>()
    queueWorker = QueueWorker(name: "virtio-blk") { link.target?.process() }
    link.target = self
  }

  /// The device configuration space (virtio 1.2, 5.2.4) for a disk of `capacity` bytes.
  private static func configuration(capacity: UInt64, queueSize: UInt16) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: 60)
    func put(_ offset: Int, _ value: UInt64, _ width: Int) {
      for index in 0..<width { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
    }
    let sectors = capacity / 512
    put(0, sectors, 8)
    put(8, UInt64(Self.maxSegmentSize), 4)
    put(12, UInt64(queueSize) - 2, 4)
    put(20, 512, 4)
    put(34, 1, 2)
    put(36, min(sectors, UInt64(UInt32.max)), 4)
    put(40, UInt64(Self.maxDiscardSegments), 4)
    put(44, 8, 4)
    put(48, min(sectors, UInt64(UInt32.max)), 4)
    put(52, UInt64(Self.maxDiscardSegments), 4)
    put(56, 1, 1)
    return bytes
  }

  /// Points the device at `newBackend` (Firecracker's `PATCH /drives` with a new
  /// `path_on_host`): the old backend is flushed, requests taken after the swap go to the new
  /// one and the capacity in the configuration space follows it. The caller tells the driver
  /// (a configuration-change interrupt). The new backend must have the same read-only setting,
  /// because the features were negotiated with it.
  public func replaceBackend(_ newBackend: any BlockBackend) throws(BlockBackendError) {
    let old = current.withLock { current in
      let old = current
      current = newBackend
      return old
    }
    configBytes.withLock { $0 = Self.configuration(capacity: newBackend.capacity, queueSize: queueSize) }
    try old.flush()
  }

  public func readConfig(offset: Int, size: Int) -> UInt64 {
    configBytes.withLock { configBytes in
      var value: UInt64 = 0
      for index in 0..<size where offset + index < configBytes.count {
        value |= UInt64(configBytes[offset + index]) << (8 * index)
      }
      return value
    }
  }

  public func writeConfig(offset: Int, size: Int, value: UInt64) {}

  /// Serves every available request (worker thread).
  func process() {
    queueWorker.serve(queue: 0) { chain, memory throws(VirtqueueError) in try handle(chain, memory: memory) }
  }

  private func handle(_ chain: DescriptorChain, memory: GuestMemory) throws(VirtqueueError) -> UInt32 {
    let backend = self.backend
    guard chain.readableLength >= 16 else { throw VirtqueueError("virtio-blk request without a readable header") }
    guard chain.writableLength >= 1 else { throw VirtqueueError("virtio-blk request without a writable status byte") }
    var header = (UInt32(0), UInt32(0), UInt64(0))
    _ = withUnsafeMutableBytes(of: &header) { chain.read(from: memory, offset: 0, into: $0) }
    let type = UInt32(littleEndian: header.0)
    let sector = UInt64(littleEndian: header.2)
    let dataIn = chain.writableLength - 1
    let dataOut = chain.readableLength - 16
    var written: UInt64 = 0
    var status = Status.ok
    func inBounds(_ sector: UInt64, _ bytes: UInt64) -> Bool {
      let (start, overflow) = sector.multipliedReportingOverflow(by: 512)
      return !overflow && start <= backend.capacity && bytes <= backend.capacity - start
    }
    do throws(BlockBackendError) {
      switch type {
      case RequestType.read:
        guard dataIn % 512 == 0, inBounds(sector, dataIn) else {
          status = Status.ioError
          break
        }
        _ = try chain.fillVectored(memory: memory, offset: 0, count: Int(dataIn)) {
          buffers throws(BlockBackendError) in
          try backend.read(into: buffers, at: sector * 512)
        }
        written = dataIn
      case RequestType.write:
        guard !backend.isReadOnly, dataOut % 512 == 0, inBounds(sector, dataOut) else {
          status = Status.ioError
          break
        }
        _ = try chain.readVectored(memory: memory, offset: 16, count: Int(dataOut)) {
          buffers throws(BlockBackendError) in
          try backend.write(buffers, at: sector * 512)
        }
      case RequestType.flush:
        try backend.flush()
      case RequestType.getID:
        let id = backend.identifier + [UInt8](repeating: 0, count: max(0, 20 - backend.identifier.count))
        let count = Int(min(dataIn, 20))
        written = UInt64(
          id.withUnsafeBytes {
            chain.write(to: memory, offset: 0, from: UnsafeRawBufferPointer(rebasing: $0[0..<count]))
          })
      case RequestType.discard, RequestType.writeZeroes:
        guard deviceFeatures & (type == RequestType.discard ? Feature.discard : Feature.writeZeroes) != 0 else {
          status = backend.isReadOnly ? Status.ioError : Status.unsupported
          break
        }
        let count = dataOut / 16
        guard dataOut % 16 == 0, count >= 1, count <= UInt64(Self.maxDiscardSegments) else {
          status = Status.ioError
          break
        }
        for index in 0..<count {
          var segment = (UInt64(0), UInt32(0), UInt32(0))
          _ = withUnsafeMutableBytes(of: &segment) { chain.read(from: memory, offset: 16 + index * 16, into: $0) }
          let start = UInt64(littleEndian: segment.0)
          let sectors = UInt64(UInt32(littleEndian: segment.1))
          let flags = UInt32(littleEndian: segment.2)
          let allowedFlags: UInt32 = type == RequestType.discard ? 0 : 1
          guard flags & ~allowedFlags == 0 else {
            status = Status.unsupported
            break
          }
          guard inBounds(start, sectors * 512) else {
            status = Status.ioError
            break
          }
          if type == RequestType.discard {
            try backend.discard(offset: start * 512, length: sectors * 512)
          } else {
            try backend.writeZeroes(offset: start * 512, length: sectors * 512, unmap: flags & 1 != 0)
          }
        }
      default:
        status = Status.unsupported
      }
    } catch {
      status = Status.ioError
    }
    if status != Status.ok {
      counters.add(["errors": 1])
    } else {
      switch type {
      case RequestType.read: counters.add(["read_ops": 1, "read_bytes": dataIn])
      case RequestType.write: counters.add(["write_ops": 1, "write_bytes": dataOut])
      case RequestType.flush: counters.add(["flush_ops": 1])
      case RequestType.discard, RequestType.writeZeroes: counters.add(["discard_ops": 1])
      default: break
      }
    }
    var statusByte = status
    _ = withUnsafeBytes(of: &statusByte) { chain.write(to: memory, offset: chain.writableLength - 1, from: $0) }
    return UInt32(truncatingIfNeeded: min(written + 1, UInt64(UInt32.max)))
  }
}
