import Devices
import Glibc
import KVMBackend
import VMCore

/// Decides whether KVM is usable for a guest's kernel on this host.
///
/// On nested hosts KVM may run guest ring-3 code natively while emulating every ring-0
/// instruction in the host kernel (about 2 million instructions per second). A guest kernel
/// would crawl (or stop on "emulation failure"), so `--accel auto` measures: it runs a short
/// ring-0 loop on a throwaway KVM machine and times it.
public enum AcceleratorProbe {
  /// What the probe found.
  public struct Finding: Sendable, CustomStringConvertible {
    /// Whether KVM runs ring-0 code at a usable speed.
    public var kvmUsable: Bool
    /// Why (for `--verbose`).
    public var reason: String
    public var description: String { reason }
  }

  /// Loop iterations of the probe (two instructions each).
  static let iterations: UInt32 = 100_000
  /// Ring-0 instructions per second below which KVM counts as emulating rather than running.
  static let minimumInstructionsPerSecond = 50_000_000.0

  /// Probes KVM at `devicePath`.
  public static func probeKVM(devicePath: String) -> Finding {
    do {
      let memory = try GuestMemory(size: 2 << 20)
      let parts = MachineParts(memory: memory, bus: IOBus(), control: MachineControl(), interrupts: InterruptRouter())
      try parts.bus.registerPorts(
        DebugExitDevice.defaultPort, count: 1, device: DebugExitDevice(control: parts.control))
      // mov ecx, N; 1: dec ecx; jnz 1b; mov al, 0; out 0xF4, al; hlt
      let n = iterations
      let code: [UInt8] =
        [0xB9, UInt8(n & 0xFF), UInt8(n >> 8 & 0xFF), UInt8(n >> 16 & 0xFF), UInt8(n >> 24)]
        + [0xFF, 0xC9, 0x75, 0xFC, 0xB0, 0x00, 0xE6, 0xF4, 0xF4]
      let entry: UInt64 = 0x1000
      try memory.writeBytes(code, at: entry)
      var state = X86CPUState()
      state.cr0 = X86.cr0PE | X86.cr0ET
      state.cs = .flatCode(selector: 0x08, long: false)
      state.ds = .flatData(selector: 0x10)
      state.es = state.ds
      state.ss = state.ds
      state.fs = state.ds
      state.gs = state.ds
      state.rip = entry
      state.rsp = 0x8000
      let accelerator = try KVMAccelerator(parts: parts, cpuCount: 1, devicePath: devicePath)
      var start = timespec()
      var end = timespec()
      clock_gettime(CLOCK_MONOTONIC, &start)
      let reason = try accelerator.run(bootState: state)
      clock_gettime(CLOCK_MONOTONIC, &end)
      guard case .debugExit = reason else {
        return Finding(kvmUsable: false, reason: "KVM probe guest did not finish (\(reason))")
      }
      let seconds = Double(end.tv_sec - start.tv_sec) + Double(end.tv_nsec - start.tv_nsec) / 1e9
      let rate = Double(2 * n) / max(seconds, 1e-9)
      let usable = rate >= minimumInstructionsPerSecond
      let millions = Int(rate / 1e6)
      return Finding(
        kvmUsable: usable,
        reason: usable
          ? "KVM runs ring-0 code at about \(millions) M instructions/s"
          : "KVM emulates ring-0 code here (about \(millions) M instructions/s)")
    } catch {
      return Finding(kvmUsable: false, reason: "KVM is not usable: \(error)")
    }
  }
}
