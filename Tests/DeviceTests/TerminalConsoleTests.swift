import Devices
import Foundation
import Glibc
import Synchronization
import TestSupport
import Testing

@Suite("Console escapes")
struct ConsoleEscapeDecoderTests {
  @Test func ctrlAXQuitsAndDataAroundItIsKept() {
    var decoder = ConsoleEscapeDecoder()
    #expect(
      decoder.decode(Array("ab\u{01}xcd".utf8)) == [.forward(Array("ab".utf8)), .quit, .forward(Array("cd".utf8))])
  }

  @Test func doubleCtrlASendsOneCtrlA() {
    var decoder = ConsoleEscapeDecoder()
    #expect(decoder.decode([0x41, 0x01, 0x01, 0x42]) == [.forward([0x41, 0x01, 0x42])])
  }

  @Test func escapeSplitAcrossReads() {
    var decoder = ConsoleEscapeDecoder()
    #expect(decoder.decode([0x61, 0x01]) == [.forward([0x61])])
    #expect(decoder.decode([UInt8(ascii: "X")]) == [.quit])
    #expect(decoder.decode([0x01]) == [])
    #expect(decoder.decode([0x01]) == [.forward([0x01])])
  }

  @Test func helpAndUnknownEscapes() {
    var decoder = ConsoleEscapeDecoder()
    #expect(decoder.decode([0x01, UInt8(ascii: "h")]) == [.help])
    #expect(decoder.decode([0x01, UInt8(ascii: "z"), 0x62]) == [.forward([0x62])], "unknown escapes are dropped")
  }
}

/// Collects what a console delivers.
private final class Delivered: Sendable {
  let bytes = Mutex<[UInt8]>([])
  let quits = Atomic<Int>(0)
}

/// Polls `condition` for up to `seconds`.
private func eventually(_ seconds: Double = 10, _ condition: () -> Bool) -> Bool {
  let deadline = Double(time(nil)) + seconds
  while Double(time(nil)) < deadline {
    if condition() { return true }
    usleep(2_000)
  }
  return condition()
}

@Suite("Terminal console", .serialized)
struct TerminalConsoleTests {
  @Test func pipeInputIsForwardedVerbatimAndEndOfInputDoesNotQuit() throws {
    var ends: [Int32] = [-1, -1]
    #expect(pipe(&ends) == 0)
    defer { close(ends[0]) }
    let delivered = Delivered()
    let console = TerminalConsole(
      inputDescriptor: ends[0], deliver: { bytes in delivered.bytes.withLock { $0 += bytes } },
      onQuit: { delivered.quits.add(1, ordering: .relaxed) })
    try console.start()
    #expect(!console.isRawModeActive, "a pipe is not a terminal")
    let input: [UInt8] = Array("hello\u{01}x\u{01}\u{01}world".utf8)
    #expect(write(ends[1], input, input.count) == input.count)
    close(ends[1])
    #expect(eventually { console.readerFinished })
    #expect(delivered.bytes.withLock { $0 } == input, "no escape processing on a pipe")
    #expect(delivered.quits.load(ordering: .relaxed) == 0)
    console.stop()
  }

  @Test func escapesCanBeForcedOnForAPipe() throws {
    var ends: [Int32] = [-1, -1]
    #expect(pipe(&ends) == 0)
    defer {
      close(ends[0])
      close(ends[1])
    }
    let delivered = Delivered()
    let console = TerminalConsole(
      inputDescriptor: ends[0], escapeHandling: true,
      deliver: { bytes in delivered.bytes.withLock { $0 += bytes } },
      onQuit: { delivered.quits.add(1, ordering: .relaxed) })
    try console.start()
    let input: [UInt8] = [0x61, 0x01, 0x01, 0x62, 0x01, UInt8(ascii: "x")]
    #expect(write(ends[1], input, input.count) == input.count)
    #expect(eventually { delivered.quits.load(ordering: .relaxed) == 1 })
    #expect(delivered.bytes.withLock { $0 } == [0x61, 0x01, 0x62])
    console.stop()
  }

  @Test func consoleFeedsTheUART() throws {
    var ends: [Int32] = [-1, -1]
    #expect(pipe(&ends) == 0)
    defer { close(ends[0]) }
    let machine = try LegacyMachine()
    let console = TerminalConsole(
      inputDescriptor: ends[0], deliver: { machine.devices.serialPort.receive($0) }, onQuit: {})
    try console.run {
      machine.outb(0x3F9, 0x01)
      #expect(write(ends[1], "ls\r", 3) == 3)
      #expect(eventually { machine.sink.level(4) })
      var received: [UInt8] = []
      #expect(
        eventually {
          while machine.inb(0x3FD) & 0x01 != 0 { received.append(machine.inb(0x3F8)) }
          return received.count == 3
        })
      #expect(received == Array("ls\r".utf8))
    }
    close(ends[1])
  }

  @Test func stopFromTheQuitCallbackDoesNotDeadlock() throws {
    var ends: [Int32] = [-1, -1]
    #expect(pipe(&ends) == 0)
    defer {
      close(ends[0])
      close(ends[1])
    }
    final class ConsoleSlot: Sendable {
      let console = Mutex<TerminalConsole?>(nil)
    }
    let slot = ConsoleSlot()
    let delivered = Delivered()
    let console = TerminalConsole(
      inputDescriptor: ends[0], escapeHandling: true,
      deliver: { bytes in delivered.bytes.withLock { $0 += bytes } },
      onQuit: {
        delivered.quits.add(1, ordering: .relaxed)
        slot.console.withLock { $0 }?.stop()
      })
    slot.console.withLock { $0 = console }
    try console.start()
    let input: [UInt8] = [0x61, 0x01, UInt8(ascii: "x"), 0x62]
    #expect(write(ends[1], input, input.count) == input.count)
    #expect(eventually { console.readerFinished })
    #expect(delivered.quits.load(ordering: .relaxed) == 1)
    #expect(delivered.bytes.withLock { $0 } == [0x61], "nothing is read after the console stopped")
    slot.console.withLock { $0 = nil }
    console.stop()
  }

  @Test func stopReturnsWhileTheReaderIsWaiting() throws {
    var ends: [Int32] = [-1, -1]
    #expect(pipe(&ends) == 0)
    defer {
      close(ends[0])
      close(ends[1])
    }
    let console = TerminalConsole(inputDescriptor: ends[0], deliver: { _ in }, onQuit: {})
    try console.start()
    usleep(20_000)
    #expect(!console.readerFinished)
    console.stop()
    #expect(console.readerFinished)
    console.stop()  // twice is fine
  }

  @Test func inProcessRawModeAndSignalChaining() throws {
    let terminal = try PseudoTerminal()
    let before = try terminal.settings()
    var saved = sigaction()
    sigaction(SIGTERM, nil, &saved)
    defer { sigaction(SIGTERM, &saved, nil) }

    // A handler installed before the console (a VMM's graceful stop) still gets the signal,
    // after the terminal has been restored.
    installCountingHandler(SIGTERM)
    let console = TerminalConsole(inputDescriptor: terminal.slave, deliver: { _ in }, onQuit: {})
    try console.start()
    #expect(console.isRawModeActive)
    #expect(try terminal.settings().c_lflag & tcflag_t(ICANON | ECHO) == 0)
    let countBefore = signalCount.load(ordering: .relaxed)
    raiseUnblocked(SIGTERM)
    #expect(signalCount.load(ordering: .relaxed) == countBefore + 1)
    #expect(try terminal.settings().c_lflag == before.c_lflag, "restored before the old handler ran")
    console.stop()

    // A handler installed while the console runs survives stop().
    try console.start()
    #expect(try terminal.settings().c_lflag & tcflag_t(ICANON) == 0)
    installCountingHandler(SIGTERM)
    console.stop()
    #expect(try terminal.settings().c_lflag == before.c_lflag)
    #expect(!console.isRawModeActive)
    raiseUnblocked(SIGTERM)
    #expect(signalCount.load(ordering: .relaxed) == countBefore + 2)
  }

  // MARK: Raw mode and its restoration, in a child process on a pseudo-terminal.

  enum ExitPath: String, CaseIterable, Sendable {
    case stop, `throw`, exit, crash
  }

  @Test(arguments: ExitPath.allCases)
  func terminalIsRestoredWhenTheProcessLeaves(path: ExitPath) throws {
    let terminal = try PseudoTerminal()
    let before = try terminal.settings()
    #expect(before.c_lflag & tcflag_t(ICANON | ECHO) == tcflag_t(ICANON | ECHO))
    let child = try terminal.spawnHelper(mode: path.rawValue)
    let ready = terminal.readOutput(until: "READY")
    #expect(ready.contains("READY"), "helper output: \(ready)")
    let during = try terminal.settings()
    #expect(during.c_lflag & tcflag_t(ICANON | ECHO | ISIG) == 0, "raw mode while attached")
    #expect(during.c_oflag & tcflag_t(OPOST) != 0, "output processing kept")

    terminal.type([0x68, 0x69, 0x01, 0x01, 0x01, UInt8(ascii: "x")])  // "hi", Ctrl-A Ctrl-A, Ctrl-A x
    let output = ready + terminal.readOutput(until: "QUIT")
    let status = child.wait()
    let after = try terminal.settings()

    #expect(output.contains("QUIT"), "helper output: \(output)")
    let received = output.split(whereSeparator: \.isNewline).filter { $0.hasPrefix("RX ") }
      .flatMap { $0.dropFirst(3).split(separator: " ") }
    #expect(received == ["68", "69", "1"], "typed bytes reach the guest, Ctrl-A doubled becomes one")
    switch path {
    case .stop: #expect(status == .exited(0))
    case .throw: #expect(status == .exited(2))
    case .exit: #expect(status == .exited(3))
    case .crash: #expect(status == .signaled(SIGILL) || status == .signaled(SIGTRAP), "\(status)")
    }
    #expect(after.c_lflag == before.c_lflag)
    #expect(after.c_iflag == before.c_iflag)
    #expect(after.c_oflag == before.c_oflag)
    #expect(after.c_cflag == before.c_cflag)
  }

  @Test(arguments: [SIGTERM, SIGHUP, SIGINT, SIGQUIT])
  func terminalIsRestoredWhenASignalKillsTheProcess(signal: Int32) throws {
    let terminal = try PseudoTerminal()
    let before = try terminal.settings()
    let child = try terminal.spawnHelper(mode: "signal")
    let ready = terminal.readOutput(until: "READY")
    #expect(ready.contains("READY"), "helper output: \(ready)")
    #expect(try terminal.settings().c_lflag & tcflag_t(ICANON | ECHO) == 0)
    kill(child.pid, signal)
    #expect(child.wait() == .signaled(signal), "the signal still ends the process")
    let after = try terminal.settings()
    #expect(after.c_lflag == before.c_lflag)
    #expect(after.c_iflag == before.c_iflag)
  }
}

private let signalCount = Atomic<Int>(0)

private func installCountingHandler(_ signalNumber: Int32) {
  var action = sigaction()
  action.__sigaction_handler.sa_handler = { _ in signalCount.add(1, ordering: .relaxed) }
  sigemptyset(&action.sa_mask)
  sigaction(signalNumber, &action, nil)
}

/// Raises `signalNumber` on this thread with it unblocked (test-runner threads may block it),
/// so it is handled before this returns.
private func raiseUnblocked(_ signalNumber: Int32) {
  var unblock = sigset_t()
  var previous = sigset_t()
  sigemptyset(&unblock)
  sigaddset(&unblock, signalNumber)
  pthread_sigmask(SIG_UNBLOCK, &unblock, &previous)
  raise(signalNumber)
  pthread_sigmask(SIG_SETMASK, &previous, nil)
}

/// How a child process ended.
enum ChildStatus: Equatable, CustomStringConvertible {
  case exited(Int32)
  case signaled(Int32)
  case unknown(Int32)

  var description: String {
    switch self {
    case .exited(let code): return "exited(\(code))"
    case .signaled(let signal): return "signaled(\(signal))"
    case .unknown(let raw): return "status \(raw)"
    }
  }
}

struct ChildProcess {
  let pid: pid_t

  /// Waits for the child to end; one that is still running after `seconds` is killed with
  /// SIGKILL (so a stuck helper fails its test instead of hanging the run).
  func wait(seconds: Int = 30) -> ChildStatus {
    var status: Int32 = 0
    let deadline = ContinuousClock.now + .seconds(seconds)
    while true {
      let result = waitpid(pid, &status, WNOHANG)
      if result == pid { break }
      if result < 0 && errno != EINTR { return .unknown(-1) }
      if ContinuousClock.now > deadline {
        Issue.record("helper \(pid) still running after \(seconds) s: killed")
        kill(pid, SIGKILL)
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        break
      }
      usleep(10_000)
    }
    if status & 0x7F == 0 { return .exited((status >> 8) & 0xFF) }
    if (status & 0x7F) != 0x7F { return .signaled(status & 0x7F) }
    return .unknown(status)
  }
}

struct TerminalTestError: Error, CustomStringConvertible {
  let description: String
}

/// A pseudo-terminal pair owned by the test; the helper runs with the slave as its stdio.
final class PseudoTerminal {
  let master: Int32
  let slave: Int32

  /// Linux's TIOCSPTLCK and TIOCGPTN (the C macros do not import into Swift).
  private static let unlockRequest: UInt = 0x4004_5431
  private static let numberRequest: UInt = 0x8004_5430

  init() throws {
    master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC)
    var unlock: Int32 = 0
    var number: UInt32 = 0
    guard master >= 0, ioctl(master, Self.unlockRequest, &unlock) == 0, ioctl(master, Self.numberRequest, &number) == 0
    else {
      let err = errno
      if master >= 0 { close(master) }
      throw TerminalTestError(description: "cannot open a pseudo-terminal: errno \(err)")
    }
    slave = open("/dev/pts/\(number)", O_RDWR | O_NOCTTY | O_CLOEXEC)
    guard slave >= 0 else {
      close(master)
      throw TerminalTestError(description: "cannot open /dev/pts/\(number)")
    }
  }

  deinit {
    close(master)
    close(slave)
  }

  func settings() throws -> termios {
    var settings = termios()
    guard tcgetattr(slave, &settings) == 0 else { throw TerminalTestError(description: "tcgetattr: errno \(errno)") }
    return settings
  }

  func type(_ bytes: [UInt8]) {
    _ = write(master, bytes, bytes.count)
  }

  /// Reads the child's output until `marker` appears or 20 seconds pass.
  func readOutput(until marker: String) -> String {
    var collected: [UInt8] = []
    let deadline = time(nil) + 20
    while time(nil) < deadline {
      if String(decoding: collected, as: UTF8.self).contains(marker) { break }
      var descriptor = pollfd(fd: master, events: Int16(POLLIN), revents: 0)
      guard poll(&descriptor, 1, 200) > 0 else { continue }
      var buffer = [UInt8](repeating: 0, count: 512)
      let count = read(master, &buffer, buffer.count)
      if count <= 0 { break }
      collected += buffer[0..<count]
    }
    return String(decoding: collected, as: UTF8.self)
  }

  /// Starts the DeviceTestHelper executable (built next to the test bundle) on this terminal.
  func spawnHelper(mode: String) throws -> ChildProcess {
    let path = try helperPath()
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    for target in Int32(0)...2 { posix_spawn_file_actions_adddup2(&actions, slave, target) }
    // Only the terminal: nothing else the runner holds (other tests' pipes and sockets) leaks
    // into the helper; it stays in the runner's process group, as a program started from it.
    var environment = ProcessInfo.processInfo.environment
    environment["SWIFT_BACKTRACE"] = "enable=no"
    let pid = try spawnChild(path, [mode], environment: environment, ownProcessGroup: false, actions: &actions)
    return ChildProcess(pid: pid)
  }

  private func helperPath() throws -> String {
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard length > 0 else { throw TerminalTestError(description: "cannot find the test executable") }
    let executable = String(decoding: buffer[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    // The products directory: the one holding the test binary, or the .xctest bundle if it is one.
    var components = executable.split(separator: "/", omittingEmptySubsequences: false).dropLast()
    if let bundle = components.lastIndex(where: { $0.hasSuffix(".xctest") }) {
      components = components[..<bundle]
    }
    let path = components.joined(separator: "/") + "/DeviceTestHelper"
    guard access(path, X_OK) == 0 else {
      throw TerminalTestError(description: "DeviceTestHelper is not built next to the tests (\(path))")
    }
    return path
  }
}
