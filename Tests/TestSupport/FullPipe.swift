import Foundation
import Glibc

/// A pipe of one page (4096 bytes) whose write end is completely full and blocking again, as a
/// standard error nobody reads is: the tests of writers that must not block behind one.
public struct FullPipe {
  /// fcntl's F_SETPIPE_SZ (F_LINUX_SPECIFIC_BASE + 7), which Glibc's module does not export.
  static let setPipeSize: Int32 = 1031

  /// The read end (not read from yet).
  public let read: Int32
  /// The full write end.
  public let write: Int32
  /// Bytes queued in the pipe when it was made.
  public let filled: Int

  /// Makes the pipe (both ends close-on-exec; the caller closes them).
  public init() throws {
    var ends: [Int32] = [-1, -1]
    guard Glibc.pipe(&ends) == 0 else { throw FullPipeError("pipe: \(String(cString: strerror(errno)))") }
    for end in ends { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
    guard fcntl(ends[1], Self.setPipeSize, 4096) >= 4096 else {
      let reason = String(cString: strerror(errno))
      for end in ends { close(end) }
      throw FullPipeError("F_SETPIPE_SZ: \(reason)")
    }
    let flags = fcntl(ends[1], F_GETFL)
    _ = fcntl(ends[1], F_SETFL, flags | O_NONBLOCK)
    let filler = [UInt8](repeating: UInt8(ascii: "p"), count: 4096)
    var filled = 0
    while true {
      let written = Glibc.write(ends[1], filler, filler.count)
      guard written > 0 else { break }
      filled += written
    }
    _ = fcntl(ends[1], F_SETFL, flags)
    var queued: Int32 = 0
    guard ioctl(ends[0], UInt(FIONREAD), &queued) == 0, Int(queued) == filled, filled >= 4096 else {
      for end in ends { close(end) }
      throw FullPipeError("the pipe holds \(queued) bytes after writing \(filled)")
    }
    (read, write, self.filled) = (ends[0], ends[1], filled)
  }
}

/// Why `FullPipe` could not be made.
public struct FullPipeError: Error, CustomStringConvertible {
  public let description: String
  init(_ description: String) { self.description = description }
}

/// A named pipe at `path` shrunk to one page and filled, whose reader holds it open without
/// reading: a log or metrics destination nobody reads, for the tests of writers that open it
/// by name and must not block behind it.
public struct FullNamedPipe {
  /// The read end (non-blocking, close-on-exec; not read from yet; the caller closes it).
  public let reader: Int32
  /// Bytes of filler ("p") queued in the pipe when it was made.
  public let filled: Int

  /// Makes the named pipe at `path` (which must not exist).
  public init(path: String) throws {
    guard mkfifo(path, 0o600) == 0 else { throw FullPipeError("mkfifo: \(String(cString: strerror(errno)))") }
    // Open for reading first, so that the writers' opens do not wait (or fail) for a reader.
    let reader = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
    guard reader >= 0 else { throw FullPipeError("open: \(String(cString: strerror(errno)))") }
    guard fcntl(reader, FullPipe.setPipeSize, 4096) >= 4096 else {
      close(reader)
      throw FullPipeError("F_SETPIPE_SZ: \(String(cString: strerror(errno)))")
    }
    let filler = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC)
    guard filler >= 0 else {
      close(reader)
      throw FullPipeError("open: \(String(cString: strerror(errno)))")
    }
    let page = [UInt8](repeating: UInt8(ascii: "p"), count: 4096)
    var filled = 0
    while true {
      let written = Glibc.write(filler, page, page.count)
      guard written > 0 else { break }
      filled += written
    }
    close(filler)
    guard filled >= 4096 else {
      close(reader)
      throw FullPipeError("the pipe took \(filled) bytes")
    }
    (self.reader, self.filled) = (reader, filled)
  }
}
