import CVirtioShim
import Glibc
import Synchronization

/// A TAP interface the process opened at start, while it still had the privileges to create
/// it or to attach to it (`hostvisor serve --tap NAME`, before the sandbox drops them). Its
/// descriptor is kept for the life of the process; a `TapBackend` for the same name claims it
/// (one backend at a time) and works on a duplicate instead of opening /dev/net/tun.
///
/// A TAP that did not exist is created by the opening, not persistent: the kernel removes it
/// when the process's last descriptor on it closes, which is at exit however the process ends
/// (even by SIGKILL), so nothing is left behind. A persistent TAP that existed before stays.
public final class PreopenedTap: Sendable {
  /// The interface name.
  public let name: String
  /// Whether the interface is persistent (it existed before and stays after the process);
  /// false when the process created it (it goes away with the process).
  public let isPersistent: Bool
  /// The process's own descriptor on the interface, open until the process exits.
  private let descriptor: Int32
  /// Whether a backend holds the interface now.
  private let claimed = Atomic<Bool>(false)

  /// Opens TAP `name` as `TapBackend` does (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, a 12-byte
  /// header, offloads off), creating it when missing.
  fileprivate init(name: String) throws(NetworkBackendError) {
    descriptor = try TapBackend.open(name: name)
    self.name = TapBackend.interfaceName(of: descriptor) ?? name
    isPersistent = TapBackend.isPersistent(descriptor)
  }

  deinit { close(descriptor) }

  /// Takes the interface for one backend; `.tapInUse` while another backend holds it.
  func claim() throws(NetworkBackendError) {
    guard claimed.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged else {
      throw .tapInUse(name: name)
    }
  }

  /// Gives the interface back (the backend that claimed it stopped using its duplicate).
  func relinquish() {
    claimed.store(false, ordering: .releasing)
  }

  /// A new close-on-exec descriptor on the interface for the backend that claimed it, with the
  /// receive offloads off (the device turns on what its driver negotiates) and without the
  /// frames that waited while no machine was attached (the host's, meant for a guest that is
  /// gone or not there yet).
  func duplicate() throws(NetworkBackendError) -> Int32 {
    let copy = fcntl(descriptor, F_DUPFD_CLOEXEC, 0)
    guard copy >= 0 else { throw .cannotOpenTap(name: name, errno: errno) }
    guard hv_virtio_ioctl_int(copy, HV_TUNSETOFFLOAD, 0) == 0 else {
      let err = errno
      close(copy)
      throw .cannotOpenTap(name: name, errno: err)
    }
    Self.discardWaitingFrames(copy)
    return copy
  }

  /// Reads and drops what `fd` (non-blocking) has waiting, at most a queue's worth.
  private static func discardWaitingFrames(_ fd: Int32) {
    let buffer = UnsafeMutableRawBufferPointer.allocate(
      byteCount: VirtioNet.headerSize + VirtioNet.maxFrameSize, alignment: 16)
    defer { buffer.deallocate() }
    var frames = 0
    while frames < 4096, read(fd, buffer.baseAddress, buffer.count) > 0 { frames += 1 }
  }
}

/// The TAP interfaces the process opened at start (`PreopenedTap`), by name: the operator
/// names them up front (`hostvisor serve --tap`), as Firecracker's jailer has the operator
/// name what the jailed VMM may use, and the machines the API builds later attach them.
public enum PreopenedTaps {
  private static let table = Mutex<[String: PreopenedTap]>([:])

  /// Opens TAP `name` now (creating it when missing: needs CAP_NET_ADMIN, as attaching to a
  /// TAP that belongs to another user or group does) and keeps it for the process's life.
  /// A name that is already open is refused with EBUSY, as the kernel would.
  @discardableResult
  public static func open(_ name: String) throws(NetworkBackendError) -> PreopenedTap {
    if let problem = problem(withName: name) { throw .cannotOpenTap(name: name, errno: problem.errno) }
    guard named(name) == nil else { throw .cannotOpenTap(name: name, errno: EBUSY) }
    let tap = try PreopenedTap(name: name)
    table.withLock { $0[name] = tap }
    return tap
  }

  /// The pre-opened TAP called `name`, if there is one.
  public static func named(_ name: String) -> PreopenedTap? {
    table.withLock { $0[name] }
  }

  /// Why `name` cannot name a TAP to open (nil when it can): the kernel takes 1 to 15 bytes
  /// (IFNAMSIZ less the terminating NUL), not `.` or `..`, without `/`, `:` or white space, and
  /// reads `%` as a pattern to number (`tap%d`), which would open an interface under another
  /// name than the one the API is given.
  public static func problem(withName name: String) -> (reason: String, errno: Int32)? {
    if name.isEmpty || name.utf8.count > 15 {
      return ("a TAP name has 1 to 15 characters (IFNAMSIZ), '\(name)' has \(name.utf8.count)", EINVAL)
    }
    if name == "." || name == ".." || name.contains(where: { $0 == "/" || $0 == ":" || $0 == "%" || $0.isWhitespace }) {
      return ("a TAP name must not be '.' or '..' nor contain '/', ':', '%' or white space", EINVAL)
    }
    return nil
  }
}
