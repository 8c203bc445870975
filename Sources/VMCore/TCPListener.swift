import Glibc

/// A listening IPv4 TCP socket with SO_REUSEADDR and close-on-exec, as the gdb stub and the
/// VNC server open theirs.
public enum TCPListener {
  /// Why the socket could not be opened: one line naming the step and the system's reason.
  public struct Failure: Error, CustomStringConvertible {
    public let description: String
  }

  /// Binds `host` (dotted IPv4) and `port` (0: any free port) and listens with `backlog`.
  /// Returns the descriptor and the port it is bound to.
  public static func open(host: String, port: UInt16, backlog: Int32) throws(Failure) -> (
    descriptor: Int32, port: UInt16
  ) {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw Failure(description: "cannot create a socket: \(String(cString: strerror(errno)))") }
    var yes: Int32 = 1
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, socklen_t(MemoryLayout<Int32>.size))
    var socketAddress = sockaddr_in()
    socketAddress.sin_family = sa_family_t(AF_INET)
    socketAddress.sin_port = port.bigEndian
    inet_pton(AF_INET, host, &socketAddress.sin_addr)
    let bound = withUnsafePointer(to: &socketAddress) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard bound == 0, listen(fd, backlog) == 0 else {
      let reason = String(cString: strerror(errno))
      close(fd)
      throw Failure(description: "cannot listen on \(host):\(port): \(reason)")
    }
    var actual = sockaddr_in()
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &actual) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
    }
    return (fd, UInt16(bigEndian: actual.sin_port))
  }
}
