import Foundation
import Glibc
import Synchronization
import TestSupport
import Testing

/// The test suite's way of running host programs: exit statuses and streams, deadlines, and
/// the descriptor hygiene that keeps one test's child from holding another test's pipes.
@Suite struct HostCommandTests {
  @Test func statusOutputAndErrorsAreKeptApart() throws {
    let result = try HostCommand.run("/bin/sh", ["-c", "echo out; echo err >&2; exit 3"])
    #expect(result.status == 3)
    #expect(result.text == "out\n")
    #expect(result.errorText == "err\n")
    #expect(!result.timedOut)
  }

  @Test func inputReachesTheChild() throws {
    let result = try HostCommand.run("cat", [], input: Data("hello".utf8))
    #expect(result.text == "hello")
  }

  @Test func aSignalIsReportedAsAShellWould() throws {
    let result = try HostCommand.run("/bin/sh", ["-c", "kill -KILL $$"])
    #expect(result.status == 128 + SIGKILL)
  }

  @Test func aChildPastItsDeadlineIsKilled() throws {
    let started = Date()
    let result = try HostCommand.run("/bin/sleep", ["30"], timeout: 0.5)
    #expect(result.timedOut)
    #expect(Date().timeIntervalSince(started) < 10)
  }

  /// A daemon the command leaves behind keeps its output pipe open; the command still ends when
  /// the command itself exits, with what it printed.
  @Test func aGrandchildHoldingTheOutputDoesNotHoldTheCaller() throws {
    let started = Date()
    let result = try HostCommand.run("/bin/sh", ["-c", "(sleep 20 &); echo done"])
    #expect(result.text == "done\n")
    #expect(Date().timeIntervalSince(started) < 10)
  }

  /// Descriptors the runner holds without close-on-exec (as Foundation's pipes are) do not
  /// reach the child: it has 0-2 and the one `ls` opens for the directory.
  @Test func theChildGetsOnlyTheStandardDescriptors() throws {
    let leaked = open("/dev/null", O_RDONLY)
    defer { close(leaked) }
    #expect(leaked > 2)
    let result = try HostCommand.run("/bin/ls", ["/proc/self/fd"])
    let descriptors = result.text.split(separator: "\n").compactMap { Int($0) }
    #expect(descriptors.count <= 4, "\(descriptors)")
    #expect(descriptors.contains(0) && descriptors.contains(1) && descriptors.contains(2))
  }

  @Test func aLongRunningProcessIsAskedOfTheKernel() throws {
    let output = CollectedOutput()
    let process = try HostProcess("/bin/sh", ["-c", "read line; echo got $line; exit 5"]) { output.append($0) }
    #expect(process.isRunning)
    process.write(Data("ping\n".utf8))
    #expect(process.waitUntilExit(timeout: 10))
    #expect(process.terminationStatus == 5)
    #expect(!process.wasSignaled)
    var waited = 0
    while !output.text.contains("got ping") && waited < 100 {
      usleep(20_000)
      waited += 1
    }
    #expect(output.text == "got ping\n")
  }

  /// The output of a child ends when every holder of its pipe closed it: here a process the
  /// child left behind writes a second later, and `waitForOutputEnd` waits for that.
  @Test func outputEndsWhenTheLastHolderOfThePipeClosesIt() throws {
    let output = CollectedOutput()
    let errors = CollectedOutput()
    let process = try HostProcess(
      "/bin/sh", ["-c", "(sleep 1; echo late; echo late-error >&2) & echo early"], errors: { errors.append($0) }
    ) { output.append($0) }
    #expect(process.waitUntilExit(timeout: 10))
    #expect(!process.waitForOutputEnd(timeout: 0.2), "the background process still holds the pipes")
    #expect(process.waitForOutputEnd(timeout: 10))
    #expect(output.text == "early\nlate\n")
    #expect(errors.text == "late-error\n")
    #expect(output.nextLine(timeout: 0) == "early")
    #expect(output.nextLine(timeout: 0) == "late")
    #expect(output.nextLine(timeout: 0) == nil)
  }
}
