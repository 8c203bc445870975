import Glibc
import Synchronization
import VMCore

/// Why the terminal console could not start.
public enum TerminalConsoleError: Error, Equatable, Sendable, CustomStringConvertible {
  /// A pipe or thread could not be created.
  case cannotStart(what: String, errno: Int32)

  public var description: String {
    switch self {
    case .cannotStart(let what, let err):
      return "cannot start the terminal console: \(what): \(String(cString: strerror(err)))"
    }
  }
}

/// Connects the host terminal's input to a guest serial port.
///
/// When the input is a terminal in the foreground, `start()` switches it to raw mode (no line
/// editing, no echo, no signal keys, 8-bit input; output processing is kept so "\n" still
/// renders as a new line) and the previous settings come back on every exit path:
/// `stop()` (and `run(_:)`, which stops however its body ends), process exit (an `atexit`
/// hook), and the terminating signals SIGINT, SIGTERM, SIGHUP, SIGQUIT as well as crashes
/// (SIGABRT, SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP): the handler restores the terminal,
/// puts back the signal's previous disposition and re-raises it. Signals the process ignores
/// (e.g. SIGHUP under `nohup`) are left alone. Only one console holds raw mode at a time.
///
/// A reader thread (a POSIX thread, never the Swift concurrency pool) reads the input and hands
/// it to `deliver`. On a terminal, QEMU's escapes apply (see `ConsoleEscapeDecoder`): Ctrl-A x
/// calls `onQuit`, Ctrl-A Ctrl-A sends a Ctrl-A. When the input is not a terminal (a pipe, a
/// file, /dev/null) bytes are forwarded unchanged and end of input simply ends reading; the
/// machine keeps running. A background job (another process group owns the terminal) neither
/// changes nor reads the terminal, which would stop the whole process.
///
/// Not handled: job-control stops (SIGTSTP from outside; Ctrl-Z itself goes to the guest)
/// leave the terminal raw until the process continues.
public final class TerminalConsole: Sendable {
  private struct RunningState {
    var thread: pthread_t
    var reader: ConsoleReader
    var ownsRawMode: Bool
  }

  /// The descriptor read from.
  public let inputDescriptor: Int32
  private let deliver: @Sendable ([UInt8]) -> Void
  private let onQuit: @Sendable () -> Void
  private let escapeHandling: Bool?
  private let running = Mutex<RunningState?>(nil)
  private let finished = CompletionFlag()

  /// Creates a console reading `inputDescriptor` (standard input by default).
  /// - Parameters:
  ///   - deliver: receives input bytes for the guest, on the reader thread.
  ///   - onQuit: called on the reader thread for Ctrl-A x; it should only request a stop
  ///     (e.g. `control.requestStop(.stopRequested)`).
  ///   - escapeHandling: whether Ctrl-A escapes apply; by default only when the input is a terminal.
  public init(
    inputDescriptor: Int32 = STDIN_FILENO, escapeHandling: Bool? = nil,
    deliver: @escaping @Sendable ([UInt8]) -> Void, onQuit: @escaping @Sendable () -> Void
  ) {
    self.inputDescriptor = inputDescriptor
    self.escapeHandling = escapeHandling
    self.deliver = deliver
    self.onQuit = onQuit
  }

  /// Creates a console that feeds `serialPort` from standard input.
  public convenience init(serialPort: SerialPort, onQuit: @escaping @Sendable () -> Void) {
    self.init(deliver: { serialPort.receive($0) }, onQuit: onQuit)
  }

  deinit { stop() }

  /// Whether this console currently holds the terminal in raw mode.
  public var isRawModeActive: Bool { running.withLock { $0?.ownsRawMode ?? false } }

  /// Whether the reader thread has stopped reading (end of input, an error, or `stop()`).
  public var readerFinished: Bool { finished.value.load(ordering: .acquiring) }

  /// Enters raw mode when the input is a foreground terminal and starts the reader thread.
  /// Does nothing if the console is already running.
  public func start() throws(TerminalConsoleError) {
    try running.withLock { (state: inout RunningState?) throws(TerminalConsoleError) in
      guard state == nil else { return }
      let isTerminal = isatty(inputDescriptor) == 1
      if isTerminal && TerminalModeGuard.isBackgroundJob(inputDescriptor) {
        // Reading our terminal from the background would stop the whole process (SIGTTIN).
        finished.value.store(true, ordering: .releasing)
        return
      }
      var pipeEnds: [Int32] = [-1, -1]
      guard pipe(&pipeEnds) == 0 else { throw .cannotStart(what: "pipe", errno: errno) }
      for end in pipeEnds {
        _ = fcntl(end, F_SETFD, FD_CLOEXEC)
        _ = fcntl(end, F_SETFL, O_NONBLOCK)
      }
      let ownsRawMode = isTerminal && TerminalModeGuard.enterRawMode(inputDescriptor)
      let reader = ConsoleReader(
        input: inputDescriptor, wakeReadEnd: pipeEnds[0], wakeWriteEnd: pipeEnds[1],
        escapes: escapeHandling ?? isTerminal,
        deliver: deliver, onQuit: onQuit, finished: finished)
      finished.value.store(false, ordering: .releasing)
      let context = Unmanaged.passRetained(reader).toOpaque()
      var thread = pthread_t()
      let result = pthread_create(
        &thread, nil,
        { argument in
          Unmanaged<ConsoleReader>.fromOpaque(argument!).takeRetainedValue().run()
          return nil
        }, context)
      guard result == 0 else {
        Unmanaged<ConsoleReader>.fromOpaque(context).release()
        reader.closeWakePipe()
        if ownsRawMode { TerminalModeGuard.leaveRawMode() }
        throw .cannotStart(what: "thread", errno: result)
      }
      state = RunningState(
        thread: thread, reader: reader, ownsRawMode: ownsRawMode)
    }
  }

  /// Stops the reader thread and restores the terminal. Safe to call more than once and from
  /// `onQuit` (then the reader thread is left to finish by itself).
  public func stop() {
    guard
      let state = running.withLock({ state -> RunningState? in
        defer { state = nil }
        return state
      })
    else { return }
    if pthread_equal(pthread_self(), state.thread) != 0 {
      // Called from onQuit on the reader thread: it ends after this call returns and closes
      // its wake-up pipe itself.
      state.reader.exitWhenCallbackReturns.store(true, ordering: .releasing)
      pthread_detach(state.thread)
    } else {
      var wake: UInt8 = 1
      _ = write(state.reader.wakeWriteEnd, &wake, 1)
      pthread_join(state.thread, nil)
      state.reader.closeWakePipe()
    }
    if state.ownsRawMode { TerminalModeGuard.leaveRawMode() }
  }

  /// Records whether standard input is a terminal this process is a background job of, for a
  /// process about to become PID 1 of a PID namespace of its own (the sandboxed VMM): inside,
  /// its process group and the terminal's foreground group both lie outside the namespace and
  /// read as 0, so `start()` could no longer tell a background job (which must not touch the
  /// terminal) from the foreground. Call before the namespace is entered.
  public static func recordJobStateBeforePIDNamespace() {
    let background = isatty(STDIN_FILENO) == 1 && TerminalModeGuard.isBackgroundJob(STDIN_FILENO)
    backgroundJobOutsidePIDNamespace.store(background, ordering: .releasing)
  }

  /// Runs `body` with the console started, and stops it however `body` ends.
  public func run<Result>(_ body: () throws -> Result) throws -> Result {
    try start()
    defer { stop() }
    return try body()
  }
}

/// A flag the reader thread sets when it ends.
private final class CompletionFlag: Sendable {
  let value = Atomic<Bool>(false)
}

/// The reader thread's work: wait for input or a wake-up, decode, deliver.
private final class ConsoleReader: Sendable {
  let input: Int32
  let wakeReadEnd: Int32
  let wakeWriteEnd: Int32
  let escapes: Bool
  /// Set by `stop()` when it runs on the reader thread (from `onQuit`).
  let exitWhenCallbackReturns = Atomic<Bool>(false)
  let deliver: @Sendable ([UInt8]) -> Void
  let onQuit: @Sendable () -> Void
  let finished: CompletionFlag

  init(
    input: Int32, wakeReadEnd: Int32, wakeWriteEnd: Int32, escapes: Bool,
    deliver: @escaping @Sendable ([UInt8]) -> Void,
    onQuit: @escaping @Sendable () -> Void, finished: CompletionFlag
  ) {
    self.input = input
    self.wakeReadEnd = wakeReadEnd
    self.wakeWriteEnd = wakeWriteEnd
    self.escapes = escapes
    self.deliver = deliver
    self.onQuit = onQuit
    self.finished = finished
  }

  /// Closes both ends of the wake-up pipe; called once, by whoever outlives the other.
  func closeWakePipe() {
    close(wakeReadEnd)
    close(wakeWriteEnd)
  }

  func run() {
    defer {
      if exitWhenCallbackReturns.load(ordering: .acquiring) { closeWakePipe() }
      finished.value.store(true, ordering: .releasing)
    }
    var decoder = ConsoleEscapeDecoder()
    var buffer = [UInt8](repeating: 0, count: 1024)
    var descriptors = [
      pollfd(fd: input, events: Int16(POLLIN), revents: 0),
      pollfd(fd: wakeReadEnd, events: Int16(POLLIN), revents: 0),
    ]
    while true {
      descriptors[0].revents = 0
      descriptors[1].revents = 0
      let ready = poll(&descriptors, 2, -1)
      if ready < 0 {
        if errno == EINTR { continue }
        return
      }
      if descriptors[1].revents != 0 { return }
      let events = descriptors[0].revents
      if events & Int16(POLLNVAL) != 0 { return }
      guard events & Int16(POLLIN | POLLHUP | POLLERR) != 0 else { continue }
      let count = buffer.withUnsafeMutableBytes { read(input, $0.baseAddress, $0.count) }
      if count == 0 { return }  // end of input: stop reading, keep the machine running
      if count < 0 {
        if errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK { continue }
        return
      }
      let bytes = buffer[0..<count]
      guard escapes else {
        deliver(Array(bytes))
        continue
      }
      for action in decoder.decode(bytes) {
        switch action {
        case .forward(let data): deliver(data)
        case .quit:
          onQuit()
          if exitWhenCallbackReturns.load(ordering: .acquiring) { return }
        case .help:
          DiagnosticOutput.standardError.write(ConsoleEscapeDecoder.helpText)
        }
      }
    }
  }
}

// MARK: - Process-wide terminal restoration

// The settings to restore live in globals so signal handlers and the atexit hook can reach them
// without locks or allocation. They are written only while `terminalRestoreArmed` is false.
private nonisolated(unsafe) var savedTerminalSettings = termios()
private nonisolated(unsafe) var rawTerminalSettings = termios()
private nonisolated(unsafe) var savedTerminalDescriptor: Int32 = -1
private let terminalRestoreArmed = Atomic<Bool>(false)
private nonisolated(unsafe) let previousSignalActions = UnsafeMutablePointer<sigaction>.allocate(capacity: 65)
private nonisolated(unsafe) var installedSignalMask: UInt64 = 0
private let terminalOwnerLock = Mutex<Bool>(false)
/// See `TerminalConsole.recordJobStateBeforePIDNamespace`.
private let backgroundJobOutsidePIDNamespace = Atomic<Bool>(false)

/// Signals whose default action ends the process, after which the terminal must be sane again.
private let restoringSignals: [Int32] = [
  SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGABRT, SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP,
]

/// Restores the saved terminal settings if raw mode is armed. Async-signal-safe.
private func restoreTerminalSettings() {
  guard terminalRestoreArmed.load(ordering: .acquiring) else { return }
  _ = tcsetattr(savedTerminalDescriptor, TCSANOW, &savedTerminalSettings)
}

/// Restores the terminal, then lets the signal do what it would have done without us.
private func terminalRestoringSignalHandler(_ signalNumber: Int32) {
  let savedErrno = errno
  restoreTerminalSettings()
  if signalNumber > 0 && signalNumber < 65 {
    _ = sigaction(signalNumber, previousSignalActions + Int(signalNumber), nil)
  }
  _ = raise(signalNumber)
  errno = savedErrno
}

/// Registers the atexit hook once per process.
private let atexitHookRegistered: Bool = {
  atexit { restoreTerminalSettings() }
  return true
}()

/// Process-wide raw mode: at most one console owns it.
enum TerminalModeGuard {
  /// Puts `descriptor` in raw mode and arms restoration; returns false when the terminal is not
  /// ours to change (a background job, another console owns it) or the change failed.
  static func enterRawMode(_ descriptor: Int32) -> Bool {
    terminalOwnerLock.withLock { owned in
      guard !owned else { return false }
      if isBackgroundJob(descriptor) { return false }
      var original = termios()
      guard tcgetattr(descriptor, &original) == 0 else { return false }
      var raw = original
      raw.c_iflag &= ~tcflag_t(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON)
      raw.c_lflag &= ~tcflag_t(ECHO | ECHONL | ICANON | ISIG | IEXTEN)
      raw.c_cflag &= ~tcflag_t(CSIZE | PARENB)
      raw.c_cflag |= tcflag_t(CS8)
      withUnsafeMutableBytes(of: &raw.c_cc) { controlCharacters in
        controlCharacters[Int(VMIN)] = 1
        controlCharacters[Int(VTIME)] = 0
      }
      _ = atexitHookRegistered
      savedTerminalSettings = original
      rawTerminalSettings = raw
      savedTerminalDescriptor = descriptor
      terminalRestoreArmed.store(true, ordering: .releasing)
      installSignalHandlers()
      guard tcsetattr(descriptor, TCSANOW, &raw) == 0 else {
        terminalRestoreArmed.store(false, ordering: .releasing)
        uninstallSignalHandlers()
        return false
      }
      owned = true
      return true
    }
  }

  /// Whether `descriptor` is our controlling terminal and another process group is in the
  /// foreground: touching it would stop us (SIGTTIN, SIGTTOU). When it is not our controlling
  /// terminal, tcgetpgrp fails and there is no job control to worry about.
  static func isBackgroundJob(_ descriptor: Int32) -> Bool {
    let foreground = tcgetpgrp(descriptor)
    let own = getpgrp()
    // Both outside our PID namespace: what `recordJobStateBeforePIDNamespace` saw.
    if foreground == 0 && own == 0 { return backgroundJobOutsidePIDNamespace.load(ordering: .acquiring) }
    return foreground >= 0 && foreground != own
  }

  /// Restores the saved settings and disarms restoration.
  static func leaveRawMode() {
    terminalOwnerLock.withLock { owned in
      guard owned else { return }
      restoreTerminalSettings()
      terminalRestoreArmed.store(false, ordering: .releasing)
      uninstallSignalHandlers()
      owned = false
    }
  }

  private static func installSignalHandlers() {
    for signalNumber in restoringSignals {
      var current = sigaction()
      guard sigaction(signalNumber, nil, &current) == 0 else { continue }
      // Leave ignored signals ignored (nohup, a parent's choice).
      if let handler = current.__sigaction_handler.sa_handler,
        unsafeBitCast(handler, to: Int.self) == unsafeBitCast(SIG_IGN, to: Int.self)
      {
        continue
      }
      previousSignalActions[Int(signalNumber)] = current
      var action = sigaction()
      action.__sigaction_handler.sa_handler = terminalRestoringSignalHandler
      sigemptyset(&action.sa_mask)
      action.sa_flags = SA_ONSTACK
      if sigaction(signalNumber, &action, nil) == 0 {
        installedSignalMask |= 1 << UInt64(signalNumber)
      }
    }
  }

  /// Puts back the dispositions we replaced, unless someone installed their own since.
  private static func uninstallSignalHandlers() {
    let ours = unsafeBitCast(
      terminalRestoringSignalHandler as @convention(c) (Int32) -> Void, to: Int.self)
    for signalNumber in restoringSignals where installedSignalMask & (1 << UInt64(signalNumber)) != 0 {
      var current = sigaction()
      guard sigaction(signalNumber, nil, &current) == 0, let handler = current.__sigaction_handler.sa_handler,
        unsafeBitCast(handler, to: Int.self) == ours
      else { continue }
      _ = sigaction(signalNumber, previousSignalActions + Int(signalNumber), nil)
    }
    installedSignalMask = 0
  }
}
