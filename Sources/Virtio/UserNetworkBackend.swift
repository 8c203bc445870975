import CShim
import Glibc
import Synchronization
import VMCore

/// A port forward from the host into the guest: connections to `hostAddress:hostPort` on the
/// host reach `guestPort` in the guest.
public struct PortForward: Sendable, Equatable {
  /// TCP or UDP.
  public enum Proto: String, Sendable { case tcp, udp }
  public var proto: Proto
  /// The host address to bind (nil: every address).
  public var hostAddress: String?
  public var hostPort: UInt16
  public var guestPort: UInt16

  public init(proto: Proto, hostAddress: String? = nil, hostPort: UInt16, guestPort: UInt16) {
    self.proto = proto
    self.hostAddress = hostAddress
    self.hostPort = hostPort
    self.guestPort = guestPort
  }

  /// Parses QEMU's `tcp:[HOST]:PORT-:GUESTPORT` (or `udp:`; the guest address, if given before
  /// the second colon, must be empty).
  public init?(parsing text: String) {
    let halves = text.split(separator: "-", maxSplits: 1, omittingEmptySubsequences: false)
    guard halves.count == 2 else { return nil }
    let host = halves[0].split(separator: ":", omittingEmptySubsequences: false)
    let guest = halves[1].split(separator: ":", omittingEmptySubsequences: false)
    guard host.count == 3, let proto = Proto(rawValue: String(host[0])),
      let hostPort = UInt16(host[2]), hostPort != 0,
      guest.count == 2, guest[0].isEmpty, let guestPort = UInt16(guest[1]), guestPort != 0
    else { return nil }
    let address = String(host[1])
    if !address.isEmpty {
      var probe = in_addr()
      guard inet_pton(AF_INET, address, &probe) == 1 else { return nil }
    }
    self.init(proto: proto, hostAddress: address.isEmpty ? nil : address, hostPort: hostPort, guestPort: guestPort)
  }

  /// passt's port specification for this forward (`[ADDR/]PORT:GUESTPORT`).
  var passtSpecification: String {
    (hostAddress.map { "\($0)/" } ?? "") + "\(hostPort):\(guestPort)"
  }
}

/// The addresses user-mode networking gives the guest (QEMU's user-network defaults).
public enum UserNetworkAddresses {
  /// The guest's address, handed out by DHCP.
  public static let guest = "10.0.2.15"
  /// The gateway; connections to it reach the host's loopback.
  public static let gateway = "10.0.2.2"
  /// The prefix length of the guest network.
  public static let prefixLength = 24
}

/// Why user-mode networking could not start.
public struct UserNetworkError: Error, Equatable, Sendable, CustomStringConvertible {
  public let description: String
  init(_ description: String) { self.description = description }
}

/// User-mode networking for unprivileged users on passt (Debian package `passt`): a child
/// process connected by a stream socket pair, frames exchanged with QEMU's stream framing (a
/// 4-byte big-endian length, then the Ethernet frame). passt answers DHCP, ARP and DNS for the
/// guest, carries its TCP, UDP and ICMP echo through ordinary host sockets, maps the gateway
/// address to the host's loopback, and forwards host ports into the guest. It exits when the
/// socket closes, so it never outlives the VM.
public final class UserNetworkBackend: NetworkBackend {
  /// The largest frame passt sends (its MTU of 65520 plus the Ethernet header, rounded up).
  static let maximumFrame = 65_536 + 14
  private static let headerSize = 12

  private let socket: Int32
  private let child: pid_t
  private let input = Mutex<ReassemblyBuffer>(ReassemblyBuffer(capacity: 4 * (maximumFrame + 4)))
  private let output = Mutex(PasstOutputQueue())
  /// The handshakes of forwarded connections that passt leaves half-open (see
  /// `PasstHandshakeCompletion`), and the ACKs that complete them, waiting for the guest.
  private let handshakes = Mutex(PasstHandshakeCompletion())
  /// The write end of the pipe that replaces a dead passt stream (kept open so the read end
  /// never polls readable); -1 while passt runs. Written once, under `input`'s lock.
  nonisolated(unsafe) private var quietPipeWriter: Int32 = -1
  public var pollDescriptor: Int32 { socket }
  /// passt's log file while it is still to be removed (with the backend).
  private let logPath: String?
  /// A descriptor of passt's log (-1 without one): read for the reason when passt ends, after
  /// the file's name is gone.
  private let logDescriptor: Int32
  /// passt was reaped when its stream ended (`stopPolling`); the backend's end must not wait for
  /// it again. Written under `input`'s lock.
  nonisolated(unsafe) private var childReaped = false

  /// Where the backend reports passt's end.
  private let diagnostics: DiagnosticOutput

  /// Starts passt with `forwards`; `passtPath` nil searches the PATH. passt's end while the
  /// machine runs is reported to `diagnostics`.
  public init(
    forwards: [PortForward], passtPath: String? = nil, diagnostics: DiagnosticOutput = .standardError
  ) throws(UserNetworkError) {
    self.diagnostics = diagnostics
    guard let executable = passtPath ?? Self.findExecutable("passt") else {
      throw UserNetworkError("user networking needs passt (Debian package 'passt'), which is not installed")
    }
    var pair: [Int32] = [-1, -1]
    guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
      throw UserNetworkError("cannot create the passt socket pair: \(String(cString: strerror(errno)))")
    }
    // passt logs to syslog unless told otherwise; its messages go to a file read on failure.
    var logTemplate = Array("/tmp/hostvisor-passt-XXXXXX.log".utf8CString)
    let logFD = logTemplate.withUnsafeMutableBufferPointer { mkstemps($0.baseAddress!, 4) }
    if logFD >= 0 { _ = fcntl(logFD, F_SETFD, FD_CLOEXEC) }
    let logPath =
      logFD >= 0
      ? String(decoding: logTemplate.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) : "/dev/null"
    var arguments = [
      executable, "--foreground", "--quiet", "--one-off", "--fd", "3", "--ipv4-only", "--log-file", logPath,
      "--address", UserNetworkAddresses.guest, "--netmask", "\(UserNetworkAddresses.prefixLength)",
      "--gateway", UserNetworkAddresses.gateway,
    ]
    // One option per forward: passt takes one address per option ("127.0.0.1/1:2,3:4"), so
    // forwards joined with commas and each with its address are refused.
    for forward in forwards {
      arguments += [forward.proto == .tcp ? "--tcp-ports" : "--udp-ports", forward.passtSpecification]
    }

    // passt's descriptor 3 is the socket; its standard streams are /dev/null (it logs to the
    // file), and every other descriptor the VMM holds (disks, TAPs, /dev/kvm, the API socket,
    // other processes' pipes) is closed in the child. It is killed when the VMM ends, however
    // it ends: a passt caught in a spin never notices its socket closing (`PasstChildren`).
    let argv = arguments.map { strdup($0) } + [nil]
    defer { for argument in argv { free(argument) } }
    let pid = hv_spawn_bound_to_process(executable, argv, environ, pair[1])
    close(pair[1])
    guard pid > 0 else {
      close(pair[0])
      if logFD >= 0 {
        close(logFD)
        unlink(logPath)
      }
      throw UserNetworkError("cannot start passt (\(executable)): \(String(cString: strerror(-pid)))")
    }
    socket = pair[0]
    child = pid
    logDescriptor = logFD
    PasstChildren.started(pid)
    // Never block the device worker: queued output is flushed when the socket polls writable.
    _ = fcntl(socket, F_SETFL, fcntl(socket, F_GETFL) | O_NONBLOCK)
    var bufferSize: Int32 = 1 << 20
    _ = setsockopt(socket, SOL_SOCKET, SO_SNDBUF, &bufferSize, socklen_t(MemoryLayout<Int32>.size))
    _ = setsockopt(socket, SOL_SOCKET, SO_RCVBUF, &bufferSize, socklen_t(MemoryLayout<Int32>.size))
    // Give passt a moment to fail on its options (e.g. a forwarded port already in use), so
    // the user sees one clear line instead of a guest without a network: 100 ms from the
    // moment it opened its log (its first line; at most 2 s for that on a loaded host, where
    // starting passt under its init can take longer than the whole moment).
    var pollsSinceLog = 0
    for _ in 0..<420 {
      if pollsSinceLog >= 20 { break }
      var logStatus = stat()
      if logFD < 0 || (fstat(logFD, &logStatus) == 0 && logStatus.st_size > 0) { pollsSinceLog += 1 }
      var status: Int32 = 0
      if waitpid(pid, &status, WNOHANG) == pid {
        close(pair[0])
        let detail = Self.lastLine(ofLog: logFD) ?? "a forwarded port may be in use or an option refused"
        if logFD >= 0 {
          close(logFD)
          unlink(logPath)
        }
        PasstChildren.ended(pid)
        throw UserNetworkError("passt exited at start (status \(status >> 8)): \(detail)")
      }
      usleep(5_000)
    }
    // passt writes a first line when it opens its log. From then on the file can go: passt
    // keeps writing to the open file, and nothing is left in /tmp however the VMM ends. A log
    // still empty (passt slow to start) is removed with the backend instead.
    var logStatus = stat()
    if logFD >= 0, stat(logPath, &logStatus) == 0, logStatus.st_size > 0 {
      unlink(logPath)
      self.logPath = nil
    } else {
      self.logPath = logFD >= 0 ? logPath : nil
    }
  }

  deinit {
    if let logPath { unlink(logPath) }
    if logDescriptor >= 0 { close(logDescriptor) }
    close(socket)
    if quietPipeWriter >= 0 { close(quietPipeWriter) }
    var status: Int32 = 0
    // passt ends when its socket closes (--one-off); make sure, then reap it. (SIGKILL: a
    // passt that is its PID namespace's init, without the VMM's init above it, ignores SIGTERM.)
    if !childReaped && waitpid(child, &status, WNOHANG) == 0 {
      kill(child, SIGKILL)
      waitpid(child, &status, 0)
    }
    PasstChildren.ended(child)
  }

  /// Sends one frame (the 12-byte virtio-net header is dropped: passt takes plain frames).
  /// Ethernet padding behind an IPv4 or IPv6 packet is cut off (`EthernetFrame.unpaddedLength`):
  /// passt (2023-03) takes the frame's length for the packet's, so a TCP acknowledgement that a
  /// driver padded to 60 bytes (8139too and e1000 do) reads as a segment with 6 bytes of data
  /// and passt stops accepting the guest's acknowledgements.
  /// What the socket cannot take at once is queued; the device's worker polls for
  /// writability while anything is queued and flushes it. While the queue holds
  /// `transmitQueueLimit` bytes or more, `canTransmit` is false; a frame that would take it past
  /// `transmitQueueHardLimit` is dropped whole. Every frame enters the socket whole, with a
  /// send of its own (`PasstOutputQueue` says why passt needs that).
  public func transmit(_ vectors: UnsafeBufferPointer<iovec>) -> Bool {
    var length = 0
    for vector in vectors { length += vector.iov_len }
    guard length - Self.headerSize > 0, length - Self.headerSize <= Self.maximumFrame else { return false }
    var record = [UInt8](repeating: 0, count: 4)
    record.reserveCapacity(4 + length - Self.headerSize)
    var skip = Self.headerSize
    for vector in vectors {
      guard let base = vector.iov_base else { continue }
      let bytes = UnsafeRawBufferPointer(start: base, count: vector.iov_len)
      let first = min(skip, bytes.count)
      skip -= first
      record.append(contentsOf: bytes[first...])
    }
    let frameLength = record.withUnsafeBytes {
      EthernetFrame.unpaddedLength(UnsafeRawBufferPointer(rebasing: $0[4...]))
    }
    record.removeLast(record.count - (4 + frameLength))
    for index in 0..<4 { record[index] = UInt8(truncatingIfNeeded: UInt32(frameLength) >> (24 - 8 * index)) }
    return output.withLock { pending in
      // Never queue without bound behind a stalled passt: drop this frame, never one already
      // on its way.
      if pending.byteCount + record.count > Self.transmitQueueHardLimit {
        pending.flush(to: socket)
        guard pending.byteCount + record.count <= Self.transmitQueueHardLimit else { return false }
      }
      record.withUnsafeBytes { bytes in
        handshakes.withLock { _ = $0.noteFromGuest(UnsafeRawBufferPointer(rebasing: bytes[4...])) }
      }
      pending.append(record)
      pending.flush(to: socket)
      return true
    }
  }

  /// The queued bytes at which `canTransmit` turns false: two of the largest frames.
  static let transmitQueueLimit = 2 * (maximumFrame + 4)
  /// The queued bytes beyond which a frame is dropped: room for a device that sends a whole
  /// segmented packet (an e1000 TSO burst) after `canTransmit` turned false.
  static let transmitQueueHardLimit = 8 * (maximumFrame + 4)

  public var canTransmit: Bool { output.withLock { $0.byteCount < Self.transmitQueueLimit } }

  public var hasPendingOutput: Bool { output.withLock { !$0.isEmpty } }

  /// Whether a frame the backend made itself (a handshake's ACK) waits for the guest: it is not
  /// on the socket, so the device must look without waiting for the descriptor.
  public var hasPendingInput: Bool { handshakes.withLock { $0.hasWaitingFrame } }

  public func flushPendingOutput() {
    output.withLock { if !$0.isEmpty { $0.flush(to: socket) } }
  }

  /// Returns the next whole frame behind a zeroed virtio-net header, or 0 when none is
  /// complete yet. A handshake's ACK made by the backend comes before the stream's frames.
  public func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int {
    if let made = handshakes.withLock({ $0.nextFrame() }), Self.headerSize + made.count <= buffer.count {
      memset(buffer.baseAddress!, 0, Self.headerSize)
      made.withUnsafeBytes {
        (buffer.baseAddress! + Self.headerSize).copyMemory(from: $0.baseAddress!, byteCount: $0.count)
      }
      return Self.headerSize + made.count
    }
    return input.withLock { reassembly in
      while true {
        if let frame = reassembly.nextFrame(maximum: Self.maximumFrame) {
          guard Self.headerSize + frame.count <= buffer.count else {
            reassembly.consume(frame)
            continue  // larger than the receive buffer: drop it
          }
          handshakes.withLock { $0.noteFromPasst(UnsafeRawBufferPointer(start: frame.bytes, count: frame.count)) }
          memset(buffer.baseAddress!, 0, Self.headerSize)
          (buffer.baseAddress! + Self.headerSize).copyMemory(from: frame.bytes, byteCount: frame.count)
          reassembly.consume(frame)
          return Self.headerSize + frame.count
        }
        if reassembly.isCorrupt || reassembly.isAtEnd { return 0 }
        let read = reassembly.fill(from: socket)
        if reassembly.isAtEnd || reassembly.isCorrupt {
          stopPolling(reason: reassembly.isCorrupt ? "sent a malformed frame length" : endOfChild())
          return 0
        }
        if read <= 0 { return 0 }
      }
    }
  }

  /// passt is gone or its stream is unusable: the guest's link goes quiet. The socket's
  /// descriptor number is pointed at an empty pipe so the device worker's poll stops firing.
  private func stopPolling(reason: String) {
    output.withLock { $0.removeAll() }
    var pipeEnds: [Int32] = [-1, -1]
    if pipe(&pipeEnds) == 0 {
      dup2(pipeEnds[0], socket)
      close(pipeEnds[0])
      quietPipeWriter = pipeEnds[1]
    }
    diagnostics.write("hostvisor: user networking: passt \(reason); the guest's network is down")
  }

  /// Why passt's stream ended, once passt is gone: its exit status (the one its PID namespace's
  /// init passes on) and the last line of its log. passt closes its stream by ending, but its
  /// status may take a moment to arrive; reaped here, passt is not waited for again.
  private func endOfChild() -> String {
    var status: Int32 = 0
    var reaped = false
    for _ in 0..<50 {
      let result = waitpid(child, &status, WNOHANG)
      if result == child {
        reaped = true
        break
      }
      if result < 0 { break }
      usleep(2_000)
    }
    guard reaped else { return "closed its stream" }
    childReaped = true
    PasstChildren.ended(child)
    let exit = (status & 0x7f) == 0 ? "status \((status >> 8) & 0xff)" : "signal \(status & 0x7f)"
    return "exited (\(exit))" + (Self.lastLine(ofLog: logDescriptor).map { ": \($0)" } ?? "")
  }

  /// The last non-empty line of passt's log (read through `descriptor`, whose name may be gone),
  /// from its last 4 KiB; nil without one.
  static func lastLine(ofLog descriptor: Int32) -> String? {
    guard descriptor >= 0 else { return nil }
    var status = stat()
    guard fstat(descriptor, &status) == 0 else { return nil }
    let start = max(0, Int(status.st_size) - 4096)
    var bytes = [UInt8](repeating: 0, count: Int(status.st_size) - start)
    let count = bytes.withUnsafeMutableBytes { pread(descriptor, $0.baseAddress, $0.count, off_t(start)) }
    guard count > 0 else { return nil }
    let lines = String(decoding: bytes.prefix(count), as: UTF8.self).split(whereSeparator: { $0 == "\n" || $0 == "\r" })
    return lines.last(where: { !$0.allSatisfy(\.isWhitespace) }).map(String.init)
  }

  /// The first regular, executable file called `name` in the directories of `path` (the
  /// PATH's syntax; nil reads the environment's), then in /usr/bin and /usr/sbin. Relative
  /// and empty entries are skipped: the VMM's working directory is no place to find programs.
  static func findExecutable(_ name: String, path: String? = nil) -> String? {
    let search = path ?? getenv("PATH").map { String(cString: $0) } ?? ""
    let directories = search.split(separator: ":").map(String.init) + ["/usr/bin", "/usr/sbin"]
    for directory in directories where directory.hasPrefix("/") {
      let candidate = directory.hasSuffix("/") ? directory + name : directory + "/" + name
      var status = stat()
      guard stat(candidate, &status) == 0, status.st_mode & S_IFMT == S_IFREG else { continue }
      if access(candidate, X_OK) == 0 { return candidate }
    }
    return nil
  }
}

/// Bytes read from a stream of length-prefixed frames, kept until whole frames can be taken.
/// Used only under its owner's lock.
final class ReassemblyBuffer: @unchecked Sendable {
  private let storage: UnsafeMutableRawBufferPointer
  private var start = 0
  private var end = 0
  /// A length prefix was out of range: the stream cannot be resynchronized.
  private(set) var isCorrupt = false

  /// A frame inside the buffer.
  struct Frame {
    let bytes: UnsafeRawPointer
    let count: Int
  }

  init(capacity: Int) {
    storage = .allocate(byteCount: capacity, alignment: 8)
  }

  deinit { storage.deallocate() }

  /// The stream ended (the peer closed its end).
  private(set) var isAtEnd = false

  /// The next complete frame, if the buffer holds one.
  func nextFrame(maximum: Int) -> Frame? {
    guard end - start >= 4 else { return nil }
    var prefix: UInt32 = 0
    withUnsafeMutableBytes(of: &prefix) {
      $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: storage[start..<start + 4]))
    }
    let length = Int(UInt32(bigEndian: prefix))
    guard length > 0, length <= maximum else {
      isCorrupt = true
      return nil
    }
    guard end - start >= 4 + length else { return nil }
    return Frame(bytes: UnsafeRawPointer(storage.baseAddress! + start + 4), count: length)
  }

  /// Drops `frame` (the one `nextFrame` returned) from the buffer.
  func consume(_ frame: Frame) {
    start += 4 + frame.count
    if start == end {
      start = 0
      end = 0
    }
  }

  /// Reads what the socket `descriptor` has waiting (without blocking) into the free space; returns the byte count
  /// (0 at end of stream or when nothing is waiting).
  func fill(from descriptor: Int32) -> Int {
    if start > 0 {
      storage.baseAddress!.copyMemory(from: storage.baseAddress! + start, byteCount: end - start)
      end -= start
      start = 0
    }
    guard end < storage.count else { return 0 }
    while true {
      let result = recv(descriptor, storage.baseAddress! + end, storage.count - end, Int32(MSG_DONTWAIT))
      if result > 0 {
        end += result
        return result
      }
      if result < 0 && errno == EINTR { continue }
      if result == 0 { isAtEnd = true }
      return 0
    }
  }
}

/// The passt children still running, killed when the VMM exits (`exit`, which the VMM's every
/// own way out takes): passt should end when its socket closes (`--one-off`), but it was seen
/// spinning at full CPU, its VMM gone, until killed. A VMM killed by a signal takes its passt
/// children with it through their parent-death signal (`hv_spawn_bound_to_process`).
enum PasstChildren {
  private static let running = Mutex<Set<pid_t>>([])
  private static let atExitRegistered: Bool = {
    atexit {
      for pid in PasstChildren.running.withLock({ $0 }) { kill(pid, SIGKILL) }
    }
    return true
  }()

  static func started(_ pid: pid_t) {
    _ = atExitRegistered
    running.withLock { _ = $0.insert(pid) }
  }

  static func ended(_ pid: pid_t) {
    running.withLock { _ = $0.remove(pid) }
  }
}
