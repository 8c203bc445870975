// A child process for DeviceTests: runs a TerminalConsole on its standard input (a pseudo-
// terminal the test owns) and leaves by the exit path named on the command line, so the test
// can check that the terminal settings come back every time.
//
// Output protocol (standard output): "READY" once raw mode is on, "RX <hex bytes>" per
// delivery, "QUIT" when Ctrl-A x arrives.
import Devices
import Glibc
import Synchronization

func say(_ line: String) {
  var text = line + "\n"
  text.withUTF8 { buffer in
    var offset = 0
    while offset < buffer.count {
      let written = write(STDOUT_FILENO, buffer.baseAddress! + offset, buffer.count - offset)
      if written <= 0 { return }
      offset += written
    }
  }
}

let quitRequested = Atomic<Bool>(false)

func waitForQuit() {
  while !quitRequested.load(ordering: .acquiring) { usleep(5_000) }
  say("QUIT")
}

struct HelperFailure: Error {}

let console = TerminalConsole(
  deliver: { bytes in
    say("RX " + bytes.map { String($0, radix: 16) }.joined(separator: " "))
  },
  onQuit: { quitRequested.store(true, ordering: .releasing) })

let mode = CommandLine.arguments.count > 1 ? CommandLine.arguments[1] : ""
switch mode {
case "stop":
  // Normal return: start, wait for Ctrl-A x, stop.
  try console.start()
  say(console.isRawModeActive ? "READY" : "NOT-RAW")
  waitForQuit()
  console.stop()
  exit(0)
case "throw":
  // A thrown error leaves `run`.
  do {
    try console.run {
      say(console.isRawModeActive ? "READY" : "NOT-RAW")
      waitForQuit()
      throw HelperFailure()
    }
  } catch {
    exit(2)
  }
case "exit":
  // exit() without stopping: the atexit hook restores.
  try console.start()
  say(console.isRawModeActive ? "READY" : "NOT-RAW")
  waitForQuit()
  exit(3)
case "signal":
  // Killed by a signal from the test.
  try console.start()
  say(console.isRawModeActive ? "READY" : "NOT-RAW")
  while true { pause() }
case "crash":
  // A Swift runtime trap.
  try console.start()
  say(console.isRawModeActive ? "READY" : "NOT-RAW")
  waitForQuit()
  let values: [Int] = []
  say("\(values[Int(getpid()) % 7 + 1])")
  exit(0)
default:
  say("usage: DeviceTestHelper stop|throw|exit|signal|crash")
  exit(64)
}
