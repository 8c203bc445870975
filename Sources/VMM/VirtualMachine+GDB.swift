import GDBStub
import Glibc
import VMCore

extension VirtualMachine {
  /// Starts the gdb stub on `[HOST:]PORT` (host 127.0.0.1 by default) before `run`. With
  /// `waitForDebugger`, the machine stays stopped before its first instruction until gdb
  /// continues it (QEMU's -S). Prints the address on standard error.
  public func startGDBServer(listen address: String, waitForDebugger: Bool) throws(MachineError) {
    let server: GDBServer
    do {
      let target = try GDBServer.makeTarget(for: accelerator, memory: parts.memory)
      let control = parts.control
      server = try GDBServer(
        target: target, listenAddress: address, startStopped: waitForDebugger,
        kill: { control.requestStop(.stopRequested) })
    } catch {
      throw MachineError(error.description)
    }
    gdbServer.withLock { $0 = server }
    DiagnosticOutput.standardError.write(
      "hostvisor: gdb stub listening on \(server.address)\(waitForDebugger ? "; waiting for gdb to continue" : "")")
  }
}
