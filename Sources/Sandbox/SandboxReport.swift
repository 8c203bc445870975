import CSandbox
import Glibc
import VMCore

/// The `report` probe's lines on standard error, each starting with `sandbox-probe:`.
enum SandboxReport {
  static func print(_ options: SandboxOptions) {
    let opened = open(options.probeHostPath, O_RDONLY)
    let openResult = opened >= 0 ? "opened" : String(cString: strerror(errno))
    if opened >= 0 { close(opened) }
    line("sandbox-probe: open \(options.probeHostPath): \(openResult)")
    let signalled = kill(options.probeHostPID, 0)
    line(
      "sandbox-probe: kill \(options.probeHostPID) 0: \(signalled == 0 ? "delivered" : String(cString: strerror(errno)))"
    )
    line("sandbox-probe: pid \(getpid()) uid \(getuid()) gid \(getgid())")
    var root = [CChar](repeating: 0, count: 256)
    let cwd = getcwd(&root, root.count).map { String(cString: $0) } ?? "?"
    let proc = access("/proc/self", F_OK) == 0 ? "present" : "absent"
    line("sandbox-probe: cwd \(cwd) /proc \(proc)")
  }

  /// The `open-vcpu` and `open-worker` probes' line: what `openat` of the jail's root gives
  /// this thread (`opened`, or the error's text).
  static func openOnThread(kind: String) {
    let result = hv_sandbox_open_call("/")
    if result >= 0 { close(Int32(result)) }
    line(
      "sandbox-probe: open / on a \(kind) thread: \(result >= 0 ? "opened" : String(cString: strerror(Int32(-result))))"
    )
  }

  static func line(_ text: String) {
    DiagnosticOutput.standardError.write(text)
  }
}
