import CShim
import Foundation
import Glibc

/// Starts `executable` (searched on the PATH when it has no slash) the way every child of the
/// test suite starts: with the descriptors `actions` sets up and no others (descriptors 3 and
/// up are closed), default signal dispositions, an empty signal mask (the runner's threads
/// block some signals, SIGTERM among them) and, with `ownProcessGroup`, a process group of its
/// own (so a deadline can kill what it started too).
public func spawnChild(
  _ executable: String, _ arguments: [String], environment: [String: String]?,
  ownProcessGroup: Bool = true, actions: inout posix_spawn_file_actions_t
) throws -> pid_t {
  hv_spawn_add_close_from(&actions, 3)
  var attributes = posix_spawnattr_t()
  posix_spawnattr_init(&attributes)
  defer { posix_spawnattr_destroy(&attributes) }
  var everySignal = sigset_t()
  sigfillset(&everySignal)
  posix_spawnattr_setsigdefault(&attributes, &everySignal)
  var noSignals = sigset_t()
  sigemptyset(&noSignals)
  posix_spawnattr_setsigmask(&attributes, &noSignals)
  posix_spawnattr_setpgroup(&attributes, 0)
  let group = ownProcessGroup ? POSIX_SPAWN_SETPGROUP : 0
  posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK | group))
  let argv = ([executable] + arguments).map { strdup($0) } + [nil]
  defer { argv.forEach { free($0) } }
  let envp = (environment ?? ProcessInfo.processInfo.environment).map { strdup("\($0.key)=\($0.value)") } + [nil]
  defer { envp.forEach { free($0) } }
  var pid: pid_t = 0
  let spawned = posix_spawnp(&pid, executable, &actions, &attributes, argv, envp)
  guard spawned == 0 else {
    throw HostCommandError("cannot start \(executable): \(String(cString: strerror(spawned)))")
  }
  return pid
}
