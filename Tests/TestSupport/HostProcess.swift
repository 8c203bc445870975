import CShim
import Foundation
import Glibc
import Synchronization

/// A long-running host process a test talks to (a VMM on its serial console, a server): its
/// standard input is a pipe the test writes, its standard output (and error, unless `errors` is
/// given) goes to `output` as it arrives, on a thread of its own (or both go to files). Spawned as `HostCommand` spawns: descriptors 0-2 only,
/// default signal dispositions, an empty signal mask, its own process group; whether it runs
/// is asked of the kernel (`waitpid`), never inferred from a pipe or socket another process
/// may hold.
public final class HostProcess: Sendable {
  /// The child's process ID.
  public let processIdentifier: pid_t
  /// The raw wait status once the child has been reaped.
  private let reapedStatus = Mutex<Int32?>(nil)
  private let inputDescriptor = Mutex<Int32>(-1)
  /// Output readers (standard output, and standard error when collected apart) still running.
  private let readersRunning = Atomic<Int>(0)

  /// Starts `executable` (searched on the PATH when it has no slash) with `arguments`.
  public init(
    _ executable: String, _ arguments: [String], environment: [String: String]? = nil,
    errors: (@Sendable (Data) -> Void)? = nil, output: @escaping @Sendable (Data) -> Void
  ) throws {
    _ = ignoreBrokenPipes
    var inputEnds: [Int32] = [-1, -1]
    var outputEnds: [Int32] = [-1, -1]
    guard hv_pipe_cloexec(&inputEnds) == 0 else { throw HostCommandError("cannot create a pipe") }
    var errorEnds: [Int32] = [-1, -1]
    guard hv_pipe_cloexec(&outputEnds) == 0, errors == nil || hv_pipe_cloexec(&errorEnds) == 0 else {
      for end in inputEnds + outputEnds where end >= 0 { close(end) }
      throw HostCommandError("cannot create a pipe")
    }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_adddup2(&actions, inputEnds[0], 0)
    posix_spawn_file_actions_adddup2(&actions, outputEnds[1], 1)
    posix_spawn_file_actions_adddup2(&actions, errors == nil ? outputEnds[1] : errorEnds[1], 2)
    let pid: pid_t
    do {
      pid = try spawnChild(executable, arguments, environment: environment, actions: &actions)
    } catch {
      for end in inputEnds + outputEnds + errorEnds where end >= 0 { close(end) }
      throw error
    }
    // The child's ends belong to the child now.
    close(inputEnds[0])
    close(outputEnds[1])
    if errorEnds[1] >= 0 { close(errorEnds[1]) }
    processIdentifier = pid
    inputDescriptor.withLock { $0 = inputEnds[1] }
    readersRunning.store(errors == nil ? 1 : 2, ordering: .releasing)
    startReader(outputEnds[0], output)
    if let errors { startReader(errorEnds[0], errors) }
  }

  /// Starts `executable` with standard input from /dev/null and its standard output and error
  /// appended to the files at `outputPath` and `errorPath` (created when missing): for a child
  /// whose output a test reads back from files while it runs, so that no pipe of the runner's
  /// is involved.
  public init(
    _ executable: String, _ arguments: [String], environment: [String: String]? = nil, outputPath: String,
    errorPath: String
  ) throws {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    let appending = O_WRONLY | O_CREAT | O_APPEND
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, outputPath, appending, 0o644)
    posix_spawn_file_actions_addopen(&actions, 2, errorPath, appending, 0o644)
    processIdentifier = try spawnChild(executable, arguments, environment: environment, actions: &actions)
  }

  /// Reads `descriptor` until end of file on a thread of its own, handing each chunk on.
  private func startReader(_ descriptor: Int32, _ deliver: @escaping @Sendable (Data) -> Void) {
    Thread.detachNewThread { [self] in
      var buffer = [UInt8](repeating: 0, count: 65536)
      while true {
        let count = read(descriptor, &buffer, buffer.count)
        if count < 0 && errno == EINTR { continue }
        if count <= 0 { break }
        deliver(Data(buffer[0..<count]))
      }
      close(descriptor)
      readersRunning.subtract(1, ordering: .releasing)
    }
  }

  /// Waits until every output handler has had the child's last output (its output pipes
  /// reached end of file: the child and every process it left holding them closed them);
  /// returns false if that did not happen within `timeout` seconds.
  @discardableResult
  public func waitForOutputEnd(timeout: Double = 10) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while readersRunning.load(ordering: .acquiring) > 0 {
      if Date() >= deadline { return false }
      usleep(5_000)
    }
    return true
  }

  /// Reaps the child if it has exited (without blocking); returns its raw wait status then.
  private func reap() -> Int32? {
    reapedStatus.withLock { reaped in
      if let reaped { return reaped }
      var status: Int32 = 0
      let result = waitpid(processIdentifier, &status, WNOHANG)
      if result == processIdentifier {
        reaped = status
      } else if result < 0 && errno == ECHILD {
        reaped = 0
      }
      return reaped
    }
  }

  /// Whether the child is still running.
  public var isRunning: Bool { reap() == nil }

  /// The exit status, or the number of the signal that ended it (as Foundation's `Process`
  /// reports it); 0 while it runs.
  public var terminationStatus: Int32 {
    guard let status = reap() else { return 0 }
    return status & 0x7F == 0 ? (status >> 8) & 0xFF : status & 0x7F
  }

  /// Whether a signal ended it.
  public var wasSignaled: Bool {
    guard let status = reap() else { return false }
    return status & 0x7F != 0
  }

  /// Sends SIGTERM.
  public func terminate() { kill(processIdentifier, SIGTERM) }

  /// Sends SIGINT.
  public func interrupt() { kill(processIdentifier, SIGINT) }

  /// Sends `signal` to the child.
  public func signal(_ signal: Int32) { kill(processIdentifier, signal) }

  /// Waits until the child has exited; returns false if it still runs after `timeout` seconds.
  @discardableResult
  public func waitUntilExit(timeout: Double = .infinity) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while isRunning {
      if Date() >= deadline { return false }
      usleep(10_000)
    }
    return true
  }

  /// Writes `data` to the child's standard input (dropped once the child closed it).
  public func write(_ data: Data) {
    inputDescriptor.withLock { descriptor in
      guard descriptor >= 0 else { return }
      data.withUnsafeBytes { bytes in
        var offset = 0
        while offset < bytes.count {
          let written = Glibc.write(descriptor, bytes.baseAddress! + offset, bytes.count - offset)
          if written < 0 && errno == EINTR { continue }
          if written <= 0 { return }
          offset += written
        }
      }
    }
  }

  /// Closes the child's standard input (it reads end of file).
  public func closeInput() {
    inputDescriptor.withLock { descriptor in
      if descriptor >= 0 { close(descriptor) }
      descriptor = -1
    }
  }

  deinit {
    if reap() == nil {
      kill(processIdentifier, SIGKILL)
      var status: Int32 = 0
      while waitpid(processIdentifier, &status, 0) < 0 && errno == EINTR {}
    }
    inputDescriptor.withLock { if $0 >= 0 { close($0) } }
  }
}

/// Writing to the standard input of a child that has exited raises SIGPIPE, which would end the
/// test runner: the runner ignores it (children start with default dispositions).
private let ignoreBrokenPipes: Bool = {
  signal(SIGPIPE, SIG_IGN)
  return true
}()
