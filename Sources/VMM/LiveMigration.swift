import Glibc
import VMCore

// Live migration: pre-copy over one stream socket (`unix:PATH` or `tcp:HOST:PORT`). The wire
// protocol is documented in docs/machine-state.md ("Live migration"); in short, framed
// messages with a magic number, a type, a length and a CRC-32C of the payload:
//
//   source                                   destination
//   hello (version, machine description) ->
//                                         <- accept | error (cannot build that machine)
//   pages (round 1: every non-zero page)  ->
//   pages (rounds 2...: the dirty pages)  ->
//   [pause] pages (the last dirty pages)  ->
//   state (state file, resume flag)       ->
//   with TAP interfaces:                  <- release-network (the state is restored)
//   [close the TAPs] network-released     ->
//                                            [open the TAPs by name]
//                                         <- resumed (the guest runs there) | error
//   [stop]
//
// The source stops only after "resumed"; any failure before it (an unreachable or refusing
// destination, a broken connection, a timeout, a TAP the destination cannot open) resumes the
// guest on the source, which opens its TAPs again if it had let go of them.

/// Where a migration goes or comes from: `unix:PATH` or `tcp:HOST:PORT`.
public enum MigrationAddress: Sendable, Equatable, CustomStringConvertible {
  case unix(path: String)
  case tcp(host: String, port: UInt16)

  /// Parses `unix:PATH` or `tcp:HOST:PORT` (HOST may be `[IPv6]`).
  public init(_ text: String) throws(ControlError) {
    if text.hasPrefix("unix:") {
      let path = String(text.dropFirst("unix:".count))
      guard !path.isEmpty, path.utf8.count < 108 else {
        throw ControlError(.invalidArgument, "invalid migration URL '\(text)': the socket path is empty or too long")
      }
      self = .unix(path: path)
    } else if text.hasPrefix("tcp:") {
      let rest = text.dropFirst("tcp:".count)
      guard let colon = rest.lastIndex(of: ":"), let port = UInt16(rest[rest.index(after: colon)...]), port > 0
      else {
        throw ControlError(.invalidArgument, "invalid migration URL '\(text)': use tcp:HOST:PORT")
      }
      var host = String(rest[..<colon])
      if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
      guard !host.isEmpty else { throw ControlError(.invalidArgument, "invalid migration URL '\(text)': no host") }
      self = .tcp(host: host, port: port)
    } else {
      throw ControlError(.invalidArgument, "invalid migration URL '\(text)': use unix:PATH or tcp:HOST:PORT")
    }
  }

  public var description: String {
    switch self {
    case .unix(let path): return "unix:\(path)"
    case .tcp(let host, let port): return host.contains(":") ? "tcp:[\(host)]:\(port)" : "tcp:\(host):\(port)"
    }
  }

  /// Connects to a waiting destination.
  func connect() throws(MigrationError) -> MigrationChannel {
    switch self {
    case .unix(let path):
      let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
      guard descriptor >= 0 else { throw .system("socket", errno) }
      var address = Self.unixAddress(path)
      let result = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
          Glibc.connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
        }
      }
      guard result == 0 else {
        let error = errno
        close(descriptor)
        throw .system("connect to \(self)", error)
      }
      return MigrationChannel(descriptor: descriptor)
    case .tcp(let host, let port):
      var lastError: Int32 = ECONNREFUSED
      for (family, address, length) in try Self.resolve(host: host, port: port, passive: false) {
        let descriptor = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else { continue }
        let result = address.withUnsafeBytes {
          Glibc.connect(descriptor, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), length)
        }
        if result == 0 {
          var on: Int32 = 1
          setsockopt(descriptor, Int32(IPPROTO_TCP), TCP_NODELAY, &on, socklen_t(MemoryLayout<Int32>.size))
          return MigrationChannel(descriptor: descriptor)
        }
        lastError = errno
        close(descriptor)
      }
      throw .system("connect to \(self)", lastError)
    }
  }

  /// Listens for one source and accepts it (blocking).
  func acceptOne() throws(MigrationError) -> MigrationChannel {
    let listener: Int32
    switch self {
    case .unix(let path):
      listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
      guard listener >= 0 else { throw .system("socket", errno) }
      var info = stat()
      if lstat(path, &info) == 0 && info.st_mode & S_IFMT == S_IFSOCK { unlink(path) }
      var address = Self.unixAddress(path)
      let result = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
          bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
        }
      }
      guard result == 0 else {
        let error = errno
        close(listener)
        throw .system("bind \(self)", error)
      }
    case .tcp(let host, let port):
      guard let (family, address, length) = try Self.resolve(host: host, port: port, passive: true).first else {
        throw .protocolError("cannot resolve \(host)")
      }
      listener = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
      guard listener >= 0 else { throw .system("socket", errno) }
      var on: Int32 = 1
      setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &on, socklen_t(MemoryLayout<Int32>.size))
      let result = address.withUnsafeBytes {
        bind(listener, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), length)
      }
      guard result == 0 else {
        let error = errno
        close(listener)
        throw .system("bind \(self)", error)
      }
    }
    defer {
      close(listener)
      if case .unix(let path) = self { unlink(path) }
    }
    guard listen(listener, 1) == 0 else { throw .system("listen on \(self)", errno) }
    while true {
      let descriptor = accept(listener, nil, nil)
      if descriptor < 0 && errno == EINTR { continue }
      guard descriptor >= 0 else { throw .system("accept on \(self)", errno) }
      _ = fcntl(descriptor, F_SETFD, FD_CLOEXEC)
      return MigrationChannel(descriptor: descriptor)
    }
  }

  private static func unixAddress(_ path: String) -> sockaddr_un {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { buffer in
      for (index, byte) in path.utf8.enumerated() where index < buffer.count - 1 { buffer[index] = byte }
    }
    return address
  }

  private static func resolve(host: String, port: UInt16, passive: Bool) throws(MigrationError) -> [(
    Int32, [UInt8], socklen_t
  )] {
    var hints = addrinfo()
    hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
    hints.ai_flags = passive ? AI_PASSIVE : 0
    var list: UnsafeMutablePointer<addrinfo>?
    let status = getaddrinfo(host, String(port), &hints, &list)
    guard status == 0, let first = list else {
      throw .protocolError("cannot resolve \(host): \(String(cString: gai_strerror(status)))")
    }
    defer { freeaddrinfo(first) }
    var results: [(Int32, [UInt8], socklen_t)] = []
    var entry: UnsafeMutablePointer<addrinfo>? = first
    while let current = entry {
      let info = current.pointee
      if let address = info.ai_addr {
        let bytes = [UInt8](UnsafeRawBufferPointer(start: address, count: Int(info.ai_addrlen)))
        results.append((info.ai_family, bytes, info.ai_addrlen))
      }
      entry = info.ai_next
    }
    return results
  }
}

/// A migration that failed, as one line.
enum MigrationError: Error, CustomStringConvertible {
  case system(String, Int32)
  case protocolError(String)
  case refused(String)

  var description: String {
    switch self {
    case .system(let operation, let error): return "\(operation): \(String(cString: strerror(error)))"
    case .protocolError(let message): return message
    case .refused(let message): return "the other side refused the migration: \(message)"
    }
  }
}

/// The message types of the migration protocol.
enum MigrationMessage: UInt32 {
  case hello = 1
  case accept = 2
  case error = 3
  case pages = 4
  case state = 5
  case resumed = 6
  case releaseNetwork = 7
  case networkReleased = 8
}

/// One migration connection: framed messages with checksums.
final class MigrationChannel {
  /// "HVMG" as a little-endian integer.
  static let magic: UInt32 = 0x474D_5648
  /// The protocol version this Hostvisor speaks (and the only one it accepts). Version 2 added
  /// the TAP hand-over (`release-network`, `network-released`).
  static let version: UInt32 = 2
  /// Frame header: magic, type, payload length (u64), CRC-32C of the payload, reserved.
  static let headerSize = 24
  /// The largest payload accepted.
  static let maximumPayload = 64 << 20
  /// Guest pages per `pages` message.
  static let pagesPerMessage = 256
  /// Bytes of one page entry with data: the page number and the page.
  static let pageEntrySize = 8 + 4096
  /// Bit 63 of a page number: the page is all zeros and no data follows.
  static let zeroPageFlag: UInt64 = 1 << 63

  let descriptor: Int32
  private var receiveBuffer: [UInt8] = []

  init(descriptor: Int32) {
    self.descriptor = descriptor
  }

  deinit { close(descriptor) }

  /// Makes every later send and receive fail after `seconds` without progress.
  func setTimeout(seconds: Int) {
    var time = timeval(tv_sec: seconds, tv_usec: 0)
    setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &time, socklen_t(MemoryLayout<timeval>.size))
    setsockopt(descriptor, SOL_SOCKET, SO_SNDTIMEO, &time, socklen_t(MemoryLayout<timeval>.size))
  }

  /// Sends one message.
  func send(_ type: MigrationMessage, _ payload: UnsafeRawBufferPointer) throws {
    var header = StateWriter()
    header.write(Self.magic)
    header.write(type.rawValue)
    header.write(UInt64(payload.count))
    header.write(FastCRC32C.checksum(payload))
    header.write(UInt32(0))
    try header.bytes.withUnsafeBytes { (bytes) throws in try writeAll(bytes) }
    try writeAll(payload)
  }

  /// Sends one message.
  func send(_ type: MigrationMessage, _ payload: [UInt8] = []) throws {
    try payload.withUnsafeBytes { (bytes) throws in try send(type, bytes) }
  }

  /// Receives one message (checked against its checksum); an `error` message is thrown.
  func receive() throws -> (MigrationMessage, [UInt8]) {
    var header = [UInt8](repeating: 0, count: Self.headerSize)
    try header.withUnsafeMutableBytes { (bytes) throws in try readAll(bytes) }
    var reader = StateReader(bytes: header)
    let magic: UInt32
    let typeValue: UInt32
    let length: UInt64
    let checksum: UInt32
    do {
      magic = try reader.read()
      typeValue = try reader.read()
      length = try reader.read()
      checksum = try reader.read()
    } catch {
      throw MigrationError.protocolError("bad migration frame")
    }
    guard magic == Self.magic else {
      throw MigrationError.protocolError("the peer does not speak Hostvisor's migration protocol")
    }
    guard let type = MigrationMessage(rawValue: typeValue) else {
      throw MigrationError.protocolError("unknown migration message type \(typeValue)")
    }
    guard length <= UInt64(Self.maximumPayload) else {
      throw MigrationError.protocolError("migration message of \(length) bytes is too large")
    }
    var payload = [UInt8](repeating: 0, count: Int(length))
    try payload.withUnsafeMutableBytes { (bytes) throws in try readAll(bytes) }
    let actual = payload.withUnsafeBytes { FastCRC32C.checksum($0) }
    guard actual == checksum else {
      throw MigrationError.protocolError("a migration message is corrupted (checksum mismatch)")
    }
    if type == .error {
      throw MigrationError.refused(String(decoding: payload, as: UTF8.self))
    }
    return (type, payload)
  }

  /// Receives one message of type `expected`.
  func receive(_ expected: MigrationMessage) throws -> [UInt8] {
    let (type, payload) = try receive()
    guard type == expected else {
      throw MigrationError.protocolError("expected a migration message of type \(expected), got \(type)")
    }
    return payload
  }

  /// Tells the peer why this side gives up (best effort).
  func sendError(_ message: String) {
    try? send(.error, Array(message.utf8))
  }

  private func writeAll(_ bytes: UnsafeRawBufferPointer) throws {
    var done = 0
    while done < bytes.count {
      let result = Glibc.send(descriptor, bytes.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL))
      if result < 0 && errno == EINTR { continue }
      guard result > 0 else {
        throw MigrationError.system("the migration connection failed while sending", result == 0 ? EPIPE : errno)
      }
      done += result
    }
  }

  private func readAll(_ bytes: UnsafeMutableRawBufferPointer) throws {
    var done = 0
    while done < bytes.count {
      let result = recv(descriptor, bytes.baseAddress! + done, bytes.count - done, 0)
      if result < 0 && errno == EINTR { continue }
      guard result > 0 else {
        if result == 0 { throw MigrationError.protocolError("the migration peer closed the connection") }
        throw MigrationError.system("the migration connection failed while receiving", errno)
      }
      done += result
    }
  }
}

/// CRC-32C (the same function as `CRC32C`) computed eight bytes at a time ("slicing by 8"),
/// for the megabytes a migration checksums: several times faster than a byte at a time.
enum FastCRC32C {
  /// Eight tables of 256 entries: table k maps a byte to its CRC contribution k bytes later.
  /// Written once when first used, read-only afterwards.
  nonisolated(unsafe) private static let tables: UnsafeMutablePointer<UInt32> = {
    let tables = UnsafeMutablePointer<UInt32>.allocate(capacity: 8 * 256)
    for index in 0..<256 {
      var crc = UInt32(index)
      for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
      tables[index] = crc
    }
    for table in 1..<8 {
      for index in 0..<256 {
        let previous = tables[(table - 1) * 256 + index]
        tables[table * 256 + index] = (previous >> 8) ^ tables[Int(previous & 0xFF)]
      }
    }
    return tables
  }()

  /// The CRC-32C of `buffer` (initial value and final XOR 0xFFFFFFFF).
  static func checksum(_ buffer: UnsafeRawBufferPointer) -> UInt32 {
    guard let base = buffer.baseAddress else { return 0 }
    let t = tables
    var crc: UInt32 = 0xFFFF_FFFF
    var offset = 0
    let count = buffer.count
    while count - offset >= 8 {
      let word = UInt64(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
      let low = crc ^ UInt32(truncatingIfNeeded: word)
      let high = UInt32(truncatingIfNeeded: word >> 32)
      crc =
        t[7 * 256 + Int(low & 0xFF)] ^ t[6 * 256 + Int((low >> 8) & 0xFF)]
        ^ t[5 * 256 + Int((low >> 16) & 0xFF)] ^ t[4 * 256 + Int(low >> 24)]
        ^ t[3 * 256 + Int(high & 0xFF)] ^ t[2 * 256 + Int((high >> 8) & 0xFF)]
        ^ t[1 * 256 + Int((high >> 16) & 0xFF)] ^ t[Int(high >> 24)]
      offset += 8
    }
    while offset < count {
      crc = t[Int((crc ^ UInt32(base.load(fromByteOffset: offset, as: UInt8.self))) & 0xFF)] ^ (crc >> 8)
      offset += 1
    }
    return crc ^ 0xFFFF_FFFF
  }
}

/// What a finished migration measured (on the source).
public struct MigrationStatistics: Sendable, CustomStringConvertible {
  /// Rounds of pages sent while the guest ran, plus the final round while it was paused.
  public var rounds = 0
  /// Guest pages sent with data.
  public var pagesSent = 0
  /// Bytes sent in `pages` messages.
  public var bytesSent: UInt64 = 0
  /// From the connection to the destination's confirmation.
  public var totalNanoseconds: UInt64 = 0
  /// From pausing the guest on the source to the destination's confirmation that it runs it.
  public var downtimeNanoseconds: UInt64 = 0
  /// The highest vCPU throttle auto-converge set, in percent (0: the guest ran at full speed).
  public var throttlePercent = 0

  public var description: String {
    "\(rounds) rounds, \(pagesSent) pages (\(bytesSent >> 20) MiB), total \(totalNanoseconds / 1_000_000) ms, "
      + "downtime \(downtimeNanoseconds / 1_000_000) ms, vCPU throttle \(throttlePercent) %"
  }
}

/// Sends guest pages, batched into `pages` messages.
struct PageSender {
  let channel: MigrationChannel
  let memory: GuestMemory
  private var buffer: UnsafeMutableRawPointer
  private var used = 0
  private var entries = 0
  var pagesSent = 0
  var bytesSent: UInt64 = 0

  init(channel: MigrationChannel, memory: GuestMemory) {
    self.channel = channel
    self.memory = memory
    buffer = UnsafeMutableRawPointer.allocate(
      byteCount: MigrationChannel.pagesPerMessage * MigrationChannel.pageEntrySize, alignment: 16)
  }

  func deallocate() { buffer.deallocate() }

  /// Queues guest-physical page `page`: with its data, or as a zero page when `skipZero` is
  /// false and it is all zeros, or not at all when `skipZero` is true and it is all zeros (the
  /// destination's RAM starts zeroed).
  mutating func add(page: UInt64, skipZero: Bool) throws {
    guard let host = memory.hostPointer(page << 12, length: 4096) else { return }
    let zero = Self.isZero(host)
    if zero && skipZero { return }
    (buffer + used).storeBytes(of: (zero ? page | MigrationChannel.zeroPageFlag : page).littleEndian, as: UInt64.self)
    used += 8
    if !zero {
      (buffer + used).copyMemory(from: host, byteCount: 4096)
      used += 4096
      pagesSent += 1
    }
    entries += 1
    if entries == MigrationChannel.pagesPerMessage { try flush() }
  }

  /// Sends the queued pages.
  mutating func flush() throws {
    guard entries > 0 else { return }
    try channel.send(.pages, UnsafeRawBufferPointer(start: buffer, count: used))
    bytesSent += UInt64(used)
    used = 0
    entries = 0
  }

  static func isZero(_ page: UnsafeRawPointer) -> Bool {
    let words = page.assumingMemoryBound(to: UInt64.self)
    var accumulated: UInt64 = 0
    for index in 0..<512 {
      accumulated |= words[index]
      if index & 63 == 63 && accumulated != 0 { return false }
    }
    return accumulated == 0
  }
}

extension GuestMemory {
  /// Stores the pages of one `pages` message; every page number is checked against RAM.
  func receivePages(_ payload: [UInt8]) throws {
    try payload.withUnsafeBytes { (bytes) throws in
      var offset = 0
      while offset < bytes.count {
        guard bytes.count - offset >= 8 else { throw MigrationError.protocolError("a pages message is truncated") }
        let entry = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
        offset += 8
        let page = entry & ~MigrationChannel.zeroPageFlag
        guard page < (1 << 40), let host = hostPointer(page << 12, length: 4096) else {
          throw MigrationError.protocolError(
            "a pages message names page 0x\(String(page, radix: 16)), outside guest RAM")
        }
        if entry & MigrationChannel.zeroPageFlag != 0 {
          memset(host, 0, 4096)
        } else {
          guard bytes.count - offset >= 4096 else { throw MigrationError.protocolError("a pages message is truncated") }
          host.copyMemory(from: bytes.baseAddress! + offset, byteCount: 4096)
          offset += 4096
        }
      }
    }
  }
}

/// What a live migration does when it reaches its time limit before the dirty pages left fit
/// the downtime limit (Cloud Hypervisor's `timeout_strategy`).
public enum MigrationTimeoutStrategy: Sendable {
  /// Give up: the guest keeps running on the source.
  case cancel
  /// Switch over now, whatever the downtime.
  case ignore
}

/// Auto-converge: how live migration throttles the vCPUs of a guest that dirties pages faster
/// than the link sends them (docs/machine-state.md, "Auto-converge").
struct AutoConverge {
  /// The first throttle, in percent (QEMU's `cpu-throttle-initial` default).
  static let initialPercent = 20
  /// The least a further step raises it, in percentage points (QEMU's `cpu-throttle-increment`).
  static let incrementPercent = 10
  /// A round does not converge when the guest dirtied more pages during it than this share of
  /// the pages it sent, in percent (QEMU's `throttle-trigger-threshold` default).
  static let triggerPercent = 50

  /// The current throttle in percent.
  private(set) var percent = 0
  /// Rounds in a row that did not converge before the first throttle.
  private var slowRounds = 0

  /// Looks at one pre-copy round: `sent` pages went out in `seconds` while the guest dirtied
  /// `dirtied` pages. Returns the new throttle when it should change. The first throttle comes
  /// after two rounds in a row that did not converge; every later such round raises it to what
  /// the measured rates ask for (the guest's dirty rate at full speed, from the dirtied pages and
  /// the share of time it ran, must fall below half the link's rate), at least by the increment.
  mutating func afterRound(sent: Int, dirtied: Int, seconds: Double) -> Int? {
    guard sent > 0, dirtied * 100 > sent * Self.triggerPercent else {
      slowRounds = 0
      return nil
    }
    if percent == 0 {
      slowRounds += 1
      guard slowRounds >= 2 else { return nil }
      percent = Self.initialPercent
      return percent
    }
    guard percent < VCPUThrottle.maximumPercent else { return nil }
    let runningShare = Double(100 - percent) / 100
    let seconds = max(seconds, 1e-6)
    let fullSpeedDirtyRate = Double(dirtied) / (seconds * runningShare)
    let linkRate = Double(sent) / seconds
    let neededShare = linkRate * Double(100 - Self.triggerPercent) / 100 / fullSpeedDirtyRate
    let needed = Int((100 * (1 - neededShare)).rounded(.up))
    percent = min(max(percent + Self.incrementPercent, needed), VCPUThrottle.maximumPercent)
    return percent
  }
}

extension VMController {
  /// The most pre-copy rounds before the switch-over, however much is still dirty.
  static let maximumMigrationRounds = 30

  /// Moves the running (or paused) machine to a Hostvisor process waiting at `destination`
  /// (`unix:PATH` or `tcp:HOST:PORT`, see `receiveMigration`): pre-copy rounds while the guest
  /// runs until the dirty pages left would take less than `downtimeLimitMilliseconds` to send
  /// (or after 30 rounds), then a short pause for the last pages and the state. The source
  /// stops once the destination confirms that the guest runs there; on any failure before
  /// that the guest keeps running here and the error is returned. When the pre-copy rounds
  /// are still going after `timeoutSeconds` (from the start, nil for no limit), the migration
  /// is cancelled (the guest keeps running here) or switches over at once, as
  /// `timeoutStrategy` says. With `autoConverge` (the default), a guest that dirties pages
  /// faster than the link sends them is slowed down (its vCPUs sleep a growing share of the
  /// time, up to 99 %) until the rest fits the downtime limit; the throttle is lifted when the
  /// migration ends either way.
  @discardableResult
  public func sendMigration(
    to destination: String, downtimeLimitMilliseconds: Int = 300, timeoutSeconds: Int? = nil,
    timeoutStrategy: MigrationTimeoutStrategy = .cancel, autoConverge: Bool = true
  ) throws(ControlError) -> MigrationStatistics {
    let address = try MigrationAddress(destination)
    guard downtimeLimitMilliseconds >= 1 else {
      throw ControlError(.invalidArgument, "the downtime limit must be at least 1 ms")
    }
    if let timeoutSeconds, timeoutSeconds < 1 {
      throw ControlError(.invalidArgument, "the migration timeout must be at least 1 s")
    }
    return try transitions.withLock { _ throws(ControlError) -> MigrationStatistics in
      let current = lifecycle
      guard current == .running || current == .paused, let machine else {
        throw ControlError(.invalidState, "cannot migrate a microVM that is \(current.phrase)")
      }
      guard let tracker = machine.accelerator as? any DirtyPageTracking else {
        throw ControlError(.unsupported, "the \(machine.accelerator.name) accelerator cannot track dirty pages")
      }
      let migration = SourceMigration(
        machine: machine, tracker: tracker, address: address, running: current == .running,
        downtimeLimitNanoseconds: UInt64(downtimeLimitMilliseconds) * 1_000_000,
        networkIDs: spec.networkInterfaces.map(\.id),
        timeoutNanoseconds: timeoutSeconds.map { UInt64(min($0, 1 << 30)) * 1_000_000_000 },
        timeoutStrategy: timeoutStrategy, autoConverge: autoConverge)
      let statistics: MigrationStatistics
      do {
        statistics = try migration.run()
      } catch let error as MigrationError {
        throw ControlError(.failed, "migration to \(address) failed, the guest keeps running here: \(error)")
      } catch let error as ControlError {
        throw error
      } catch {
        throw ControlError(.failed, "migration to \(address) failed, the guest keeps running here: \(error)")
      }
      machine.requestStop(.stopRequested)
      _ = waitUntilStopped(timeoutNanoseconds: 10_000_000_000)
      return statistics
    }
  }

  /// Waits at `source` (`unix:PATH` or `tcp:HOST:PORT`) for one migrating machine, builds it
  /// from the description the source sends, receives its RAM and state and runs it (paused if
  /// it was paused on the source). Only before start; returns once the guest runs here. A
  /// machine this process cannot build (no KVM, a missing disk) is refused with its reason.
  /// A configured accelerator other than `auto` runs the guest on that accelerator, converting
  /// the state of a machine that ran on the other one.
  /// `networkOverrides` maps interface IDs to host TAP devices that replace the source's; the
  /// others are opened by the same name once the source has let go of them.
  public func receiveMigration(from source: String, networkOverrides: [String: String] = [:]) throws(ControlError) {
    let address = try MigrationAddress(source)
    guard lifecycle == .notStarted else {
      throw ControlError(.invalidState, "a migration can only be received before the microVM has started")
    }
    let channel: MigrationChannel
    do {
      channel = try address.acceptOne()
    } catch {
      throw ControlError(.failed, "cannot receive a migration at \(address): \(error)")
    }
    channel.setTimeout(seconds: 60)
    try receiveMigration(over: channel, networkOverrides: networkOverrides, buildingWith: Self.buildMigratingMachine)
  }

  /// Builds the machine a migration's hello describes, with the receiver's `overrides`: fresh
  /// guest RAM of the described size, then `VirtualMachine.build` (which opens the kernel,
  /// initrd and disks the description names). What `receiveMigration(from:)` uses.
  static func buildMigratingMachine(_ description: MachineDescription, overrides: RestoreOverrides) throws
    -> VirtualMachine
  {
    let memory: GuestMemory
    do {
      memory = try GuestMemory(size: description.memorySize)
    } catch {
      throw ControlError(.failed, error.description)
    }
    do {
      return try VirtualMachine.build(description: description, overrides: overrides, memory: memory)
    } catch {
      throw ControlError(.failed, "cannot build the migrating machine here: \(error)")
    }
  }

  /// The receiver's loop on a connected `channel`, as `receiveMigration(from:)` runs it once a
  /// source has connected: the hello, the machine built by `buildMachine` from the hello's
  /// description and the receiver's overrides (the seam: `receiveMigration(from:)` passes
  /// `buildMigratingMachine`; the migration fuzz target builds a software-CPU machine on
  /// guarded RAM and refuses descriptions naming other host files), the pages into that
  /// machine's RAM, the state, the hand-over of TAP devices, and the adoption of the machine
  /// (resumed if the source ran it). On failure the machine's devices are shut down, the
  /// source is told why, and the error is returned. Only before start.
  func receiveMigration(
    over channel: MigrationChannel, networkOverrides: [String: String],
    buildingWith buildMachine: (MachineDescription, RestoreOverrides) throws -> VirtualMachine
  ) throws(ControlError) {
    var machine: VirtualMachine?
    do {
      try receive(over: channel, building: &machine, networkOverrides: networkOverrides, buildMachine: buildMachine)
    } catch {
      machine?.shutdownDevices()
      let message = (error as? ControlError)?.description ?? "\(error)"
      channel.sendError(message)
      if let error = error as? ControlError { throw error }
      throw ControlError(.failed, "receiving the migration failed: \(message)")
    }
  }

  private func receive(
    over channel: MigrationChannel, building machine: inout VirtualMachine?, networkOverrides: [String: String],
    buildMachine: (MachineDescription, RestoreOverrides) throws -> VirtualMachine
  ) throws {
    var hello = StateReader(bytes: try channel.receive(.hello))
    let version: UInt32 = try hello.read()
    guard version == MigrationChannel.version else {
      throw ControlError(
        .failed,
        "the source speaks migration protocol version \(version); this Hostvisor speaks \(MigrationChannel.version)")
    }
    let pageSize: UInt32 = try hello.read()
    guard pageSize == 4096 else { throw ControlError(.failed, "the source's page size \(pageSize) is not 4096") }
    let description = try MachineDescription.restore(from: &hello)
    guard hello.isAtEnd else { throw ControlError(.failed, "the source's hello message has trailing bytes") }
    var overrides = RestoreOverrides()
    let current = spec
    overrides.serial = current.serial
    overrides.verbose = current.verbose
    overrides.networkTaps = networkOverrides
    // A destination configured for the other accelerator converts the vCPU and interrupt
    // controller state, as a restore does (docs/machine-state.md, "Across accelerators").
    overrides.accelerator = current.accelerator
    // The source still holds its TAPs: they are opened after it lets go of them.
    overrides.openTapsLater = true
    let built = try buildMachine(description, overrides)
    machine = built
    let memory = built.parts.memory
    try channel.send(.accept)
    while true {
      let (type, payload) = try channel.receive()
      if type == .pages {
        try memory.receivePages(payload)
        continue
      }
      guard type == .state, let resume = payload.first else {
        throw MigrationError.protocolError("unexpected migration message \(type)")
      }
      let file = Array(payload.dropFirst())
      var reader = StateReader(bytes: try MachineStateFile.decode(file))
      let stateDescription = try reader.section("machine") { (reader) throws(MachineStateError) in
        try MachineDescription.restore(from: &reader)
      }
      guard stateDescription == description else {
        throw ControlError(.failed, "the migrated state describes another machine than the source announced")
      }
      try built.restoreSections(from: &reader, description: description, paused: true)
      if !built.tapNetworkDevices.isEmpty {
        try channel.send(.releaseNetwork)
        _ = try channel.receive(.networkReleased)
        do {
          try built.attachNetworkInterfaces()
        } catch {
          throw ControlError(.failed, "cannot take over the network interfaces: \(error)")
        }
      }
      try adopt(built, paused: true)
      if resume == 1 { try self.resume() }
      // The guest runs here now: the source may stop (if it never hears this, it resumes).
      try? channel.send(.resumed)
      return
    }
  }
}

/// The source side of one migration.
struct SourceMigration {
  let machine: VirtualMachine
  let tracker: any DirtyPageTracking
  let address: MigrationAddress
  let running: Bool
  let downtimeLimitNanoseconds: UInt64
  let networkIDs: [String]
  /// The time limit of the pre-copy phase, from the start; nil for none.
  let timeoutNanoseconds: UInt64?
  let timeoutStrategy: MigrationTimeoutStrategy
  /// Whether to throttle the vCPUs when the rounds do not converge (`AutoConverge`).
  let autoConverge: Bool

  func run() throws -> MigrationStatistics {
    let started = HostCondition.now()
    /// Whether the time limit has passed; with `.cancel`, throws instead.
    func timedOut() throws -> Bool {
      guard let timeoutNanoseconds, HostCondition.now() - started >= timeoutNanoseconds else { return false }
      if timeoutStrategy == .ignore { return true }
      throw MigrationError.protocolError(
        "the migration did not converge within its time limit (\(timeoutNanoseconds / 1_000_000_000) s, "
          + "timeout strategy cancel)")
    }
    var statistics = MigrationStatistics()
    try machine.refuseDevicesWithoutState()
    let channel = try address.connect()
    channel.setTimeout(seconds: 60)
    var hello = StateWriter()
    hello.write(MigrationChannel.version)
    hello.write(UInt32(4096))
    machine.machineDescription(memoryPath: "", networkIDs: networkIDs).save(into: &hello)
    try channel.send(.hello, hello.bytes)
    _ = try channel.receive(.accept)

    let memory = machine.parts.memory
    let wasLogging = tracker.isDirtyLogging
    var sender = PageSender(channel: channel, memory: memory)
    defer { sender.deallocate() }
    var paused = !running
    var quiesced = false
    var networkReleased = false
    var converge = AutoConverge()
    // The guest runs at full speed again whatever happens (on the destination, or here after a
    // failure).
    defer { machine.parts.control.setThrottle(percent: 0) }
    do {
      try tracker.startDirtyLogging()
      // Round 1: all of RAM that is not zero.
      var roundStart = HostCondition.now()
      for region in memory.regions {
        for page in stride(from: region.guestBase >> 12, to: region.guestEnd >> 12, by: 1) {
          try sender.add(page: page, skipZero: true)
          // Cancelling may cut the first round short; switching over needs all of it.
          if page & 0xFFF == 0 { _ = try timedOut() }
        }
      }
      try sender.flush()
      statistics.rounds = 1
      var bytesPerSecond = Double(sender.bytesSent) / max(Double(HostCondition.now() - roundStart) / 1e9, 1e-6)
      var pending = try tracker.takeDirtyPages()
      // More rounds while the guest runs, until the rest fits in the downtime limit.
      while running && statistics.rounds < VMController.maximumMigrationRounds {
        if try timedOut() { break }
        let estimate = Double(pending.count * MigrationChannel.pageEntrySize) / max(bytesPerSecond, 1) * 1e9
        if estimate < Double(downtimeLimitNanoseconds) / 2 { break }
        roundStart = HostCondition.now()
        let before = sender.bytesSent
        for page in pending { try sender.add(page: page, skipZero: false) }
        try sender.flush()
        statistics.rounds += 1
        let seconds = max(Double(HostCondition.now() - roundStart) / 1e9, 1e-6)
        bytesPerSecond = Double(sender.bytesSent - before) / seconds
        let sent = pending.count
        pending = try tracker.takeDirtyPages()
        if autoConverge, let percent = converge.afterRound(sent: sent, dirtied: pending.count, seconds: seconds) {
          machine.parts.control.setThrottle(percent: percent)
          statistics.throttlePercent = max(statistics.throttlePercent, percent)
        }
      }
      // The switch-over: pause, quiesce the devices, the last pages and the state.
      let pauseStart = HostCondition.now()
      if running {
        try machine.pause()
        paused = true
      }
      // Quiesced for good on success: no device may touch RAM or a disk once the destination
      // owns them.
      for device in machine.virtioDevices { device.quiesce() }
      quiesced = true
      let last = Set(pending).union(try tracker.takeDirtyPages()).sorted()
      for page in last { try sender.add(page: page, skipZero: false) }
      try sender.flush()
      statistics.rounds += 1
      let payload = try machine.encodeState(memoryPath: "", networkIDs: networkIDs)
      var state: [UInt8] = [running ? 1 : 0]
      state.append(contentsOf: MachineStateFile.encode(payload: payload))
      try channel.send(.state, state)
      if !machine.tapNetworkDevices.isEmpty {
        // The destination restored the state: hand it the TAPs (on one host it cannot open a
        // TAP this process holds), then wait for it to run the guest.
        _ = try channel.receive(.releaseNetwork)
        machine.releaseNetworkInterfaces()
        networkReleased = true
        try channel.send(.networkReleased)
      }
      _ = try channel.receive(.resumed)
      let now = HostCondition.now()
      statistics.downtimeNanoseconds = now - pauseStart
      statistics.totalNanoseconds = now - started
      statistics.pagesSent = sender.pagesSent
      statistics.bytesSent = sender.bytesSent
      return statistics
    } catch {
      channel.sendError("the source gave up: \(error)")
      if wasLogging {
        // Pages taken for the migration must stay dirty for the next diff snapshot.
        for region in memory.regions {
          for page in stride(from: region.guestBase >> 12, to: region.guestEnd >> 12, by: 1) {
            memory.dirtyPages.mark(page: page)
          }
        }
      } else {
        tracker.stopDirtyLogging()
      }
      var failure = error
      if networkReleased {
        do {
          try machine.attachNetworkInterfaces()
        } catch {
          failure = MigrationError.protocolError("\(failure); the network interfaces stay detached: \(error)")
        }
      }
      if quiesced { for device in machine.virtioDevices { device.unquiesce() } }
      if running && paused { machine.resume() }
      throw failure
    }
  }
}
