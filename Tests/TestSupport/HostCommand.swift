import CShim
import Foundation
import Glibc

/// What a host command left behind: its exit status and what it wrote.
public struct HostCommandResult: Sendable {
  /// The exit status; 128 + the signal number when a signal ended it (as a shell reports it).
  public let status: Int32
  /// Everything it wrote on standard output.
  public let output: Data
  /// Everything it wrote on standard error (empty when standard error went with the output).
  public let errorOutput: Data
  /// Whether it was still running at its deadline and was killed.
  public let timedOut: Bool

  /// Standard output as UTF-8 text.
  public var text: String { String(decoding: output, as: UTF8.self) }
  /// Standard error as UTF-8 text.
  public var errorText: String { String(decoding: errorOutput, as: UTF8.self) }
}

/// Where a host command's standard error goes.
public enum HostCommandErrorStream: Sendable {
  /// Collected on its own (`errorOutput`).
  case separate
  /// Into the same pipe as standard output.
  case merged
  /// Discarded.
  case discarded
}

/// Runs host programs (assemblers, clients, shell commands) from tests without the ways a
/// Foundation `Process` can hang a parallel test run:
///
/// - the child gets exactly descriptors 0-2 (`posix_spawn` with `addclosefrom_np(3)`), so it
///   never holds another test's pipe or Foundation's process-exit socket open, and its own pipes
///   are close-on-exec, so no other child inherits them;
/// - the command ends when the child exits, not when every holder of its output pipe has closed
///   it (a daemon it started may keep the pipe; what is in the pipe by then is still read);
/// - a child still running at its deadline is killed with SIGKILL, with its process group;
/// - the child starts with default signal dispositions and an empty signal mask (the test
///   runner's threads block some signals, SIGTERM among them).
public enum HostCommand {
  /// Runs `executable` (searched on the PATH when it has no slash) with `arguments`, writes
  /// `input` to its standard input (or gives it /dev/null), and waits at most `timeout` seconds.
  public static func run(
    _ executable: String, _ arguments: [String], input: Data? = nil, errors: HostCommandErrorStream = .separate,
    environment: [String: String]? = nil, directory: String? = nil, timeout: Double = 300
  ) throws -> HostCommandResult {
    let stdout = try Pipe2()
    let stderr = errors == .separate ? try Pipe2() : nil
    let stdin = input != nil ? try Pipe2(nonBlockingRead: false) : nil
    defer {
      stdout.closeBoth()
      stderr?.closeBoth()
      stdin?.closeBoth()
    }

    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    if let stdin {
      posix_spawn_file_actions_adddup2(&actions, stdin.readEnd, 0)
    } else {
      posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    }
    posix_spawn_file_actions_adddup2(&actions, stdout.writeEnd, 1)
    switch errors {
    case .separate: posix_spawn_file_actions_adddup2(&actions, stderr!.writeEnd, 2)
    case .merged: posix_spawn_file_actions_adddup2(&actions, stdout.writeEnd, 2)
    case .discarded: posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
    }
    if let directory { hv_spawn_add_chdir(&actions, directory) }
    let pid = try spawnChild(executable, arguments, environment: environment, actions: &actions)
    // The child's ends belong to the child now.
    stdout.closeWriteEnd()
    stderr?.closeWriteEnd()
    stdin?.closeReadEnd()
    if let stdin, let input {
      // A writer thread, so a child that writes a lot before it reads cannot deadlock with us.
      let descriptor = stdin.takeWriteEnd()
      Thread.detachNewThread {
        input.withUnsafeBytes { bytes in
          var offset = 0
          while offset < bytes.count {
            let written = write(descriptor, bytes.baseAddress! + offset, bytes.count - offset)
            if written < 0 && errno == EINTR { continue }
            if written <= 0 { break }
            offset += written
          }
        }
        close(descriptor)
      }
    }

    var output = Data()
    var errorOutput = Data()
    let deadline = ContinuousClock.now + .milliseconds(Int(timeout * 1000))
    var status: Int32 = 0
    var timedOut = false
    var exited = false
    while !exited {
      let result = waitpid(pid, &status, WNOHANG)
      if result == pid || (result < 0 && errno == ECHILD) {
        exited = true
      } else if ContinuousClock.now >= deadline {
        timedOut = true
        kill(-pid, SIGKILL)
        kill(pid, SIGKILL)
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        exited = true
      }
      // Read what is there (waiting up to 50 ms for more while the child runs).
      var streams = [pollfd(fd: stdout.readEnd, events: Int16(POLLIN), revents: 0)]
      if let stderr { streams.append(pollfd(fd: stderr.readEnd, events: Int16(POLLIN), revents: 0)) }
      _ = poll(&streams, nfds_t(streams.count), exited ? 0 : 50)
      drain(stdout.readEnd, into: &output)
      if let stderr { drain(stderr.readEnd, into: &errorOutput) }
    }
    let code: Int32 =
      status & 0x7F == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
    return HostCommandResult(status: code, output: output, errorOutput: errorOutput, timedOut: timedOut)
  }

  /// Runs a tool that must succeed (an assembler, a linker): standard error goes with the
  /// output, and a non-zero status or a timeout throws with what it printed.
  @discardableResult
  public static func check(_ executable: String, _ arguments: [String], timeout: Double = 300) throws
    -> HostCommandResult
  {
    let result = try run(executable, arguments, errors: .merged, timeout: timeout)
    guard result.status == 0, !result.timedOut else {
      let how = result.timedOut ? "ran longer than \(Int(timeout)) s" : "failed with status \(result.status)"
      throw HostCommandError("\(executable) \(arguments.joined(separator: " ")) \(how): \(result.text)")
    }
    return result
  }

  /// Reads whatever `descriptor` (non-blocking) holds now.
  private static func drain(_ descriptor: Int32, into data: inout Data) {
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
      let count = read(descriptor, &buffer, buffer.count)
      if count > 0 {
        data.append(contentsOf: buffer[0..<count])
      } else if count < 0 && errno == EINTR {
        continue
      } else {
        return
      }
    }
  }
}

/// A host command that could not be started.
public struct HostCommandError: Error, CustomStringConvertible {
  public let description: String
  public init(_ description: String) { self.description = description }
}

/// A close-on-exec pipe (whose read end does not block unless asked).
private final class Pipe2 {
  private(set) var readEnd: Int32
  private(set) var writeEnd: Int32

  init(nonBlockingRead: Bool = true) throws {
    var ends: [Int32] = [-1, -1]
    guard hv_pipe_cloexec(&ends) == 0 else {
      throw HostCommandError("cannot create a pipe: \(String(cString: strerror(errno)))")
    }
    readEnd = ends[0]
    writeEnd = ends[1]
    if nonBlockingRead { _ = fcntl(readEnd, F_SETFL, fcntl(readEnd, F_GETFL) | O_NONBLOCK) }
  }

  func closeReadEnd() {
    if readEnd >= 0 { close(readEnd) }
    readEnd = -1
  }

  func closeWriteEnd() {
    if writeEnd >= 0 { close(writeEnd) }
    writeEnd = -1
  }

  /// Hands the write end to the caller, who closes it.
  func takeWriteEnd() -> Int32 {
    let descriptor = writeEnd
    writeEnd = -1
    return descriptor
  }

  func closeBoth() {
    closeReadEnd()
    closeWriteEnd()
  }
}
