import Glibc

/// Why the KVM backend could not set up or start a machine. Every description is one line
/// a user can act on.
public enum KVMError: Error, Equatable, Sendable, CustomStringConvertible {
  /// `open(2)` on the KVM device failed.
  case cannotOpenDevice(path: String, errno: Int32)
  /// The file opened fine but does not answer KVM_GET_API_VERSION.
  case notAKVMDevice(path: String, errno: Int32)
  /// The kernel speaks a KVM API other than the stable version 12.
  case unsupportedAPIVersion(path: String, version: Int32)
  /// A KVM capability Hostvisor relies on is missing (`name` is the KVM_CAP_ constant).
  case missingCapability(name: String)
  /// The requested vCPU count is outside what the host supports.
  case invalidCPUCount(requested: Int, maximum: Int)
  /// Guest RAM needs more memory slots than KVM offers.
  case tooManyMemoryRegions(regions: Int, slots: Int)
  /// A KVM ioctl (or related system call) failed; `operation` names it.
  case systemCallFailed(operation: String, errno: Int32)
  /// The host refused to create a vCPU thread.
  case cannotCreateThread(errno: Int32)
  /// `run(bootState:)` was called a second time; a KVMAccelerator runs its machine once.
  case alreadyStarted
  /// A vCPU index outside `0..<cpuCount`.
  case noSuchCPU(index: Int, cpuCount: Int)
  /// vCPU state was requested while the vCPU threads are running.
  case machineRunning
  /// The CPU model asks for features the host's KVM does not offer.
  case cpuModelUnavailable(model: String, missing: [String])

  public var description: String {
    switch self {
    case .cannotOpenDevice(let path, let err):
      if err == EACCES || err == EPERM {
        return "permission denied on \(path) (add yourself to the kvm group)"
      }
      if err == ENOENT || err == ENODEV || err == ENXIO {
        return "cannot open \(path): \(Self.message(err)) (is KVM available?)"
      }
      return "cannot open \(path): \(Self.message(err))"
    case .notAKVMDevice(let path, let err):
      return "\(path) is not a KVM device (KVM_GET_API_VERSION failed: \(Self.message(err)))"
    case .unsupportedAPIVersion(let path, let version):
      return "\(path) speaks KVM API version \(version); Hostvisor needs version 12"
    case .missingCapability(let name):
      return "this host's KVM lacks \(name), which Hostvisor needs"
    case .invalidCPUCount(let requested, let maximum):
      return "cannot create \(requested) vCPUs: KVM on this host supports 1 to \(maximum)"
    case .tooManyMemoryRegions(let regions, let slots):
      return "guest RAM needs \(regions) KVM memory slots but the host offers \(slots)"
    case .systemCallFailed(let operation, let err):
      return "\(operation) failed: \(Self.message(err))"
    case .cannotCreateThread(let err):
      return "cannot create a vCPU thread: \(Self.message(err))"
    case .alreadyStarted:
      return "this KVM machine has already been started; create a new accelerator to run again"
    case .noSuchCPU(let index, let cpuCount):
      return "no vCPU \(index): the machine has \(cpuCount) vCPUs (0 to \(cpuCount - 1))"
    case .machineRunning:
      return "vCPU state can only be read while the machine is not running"
    case .cpuModelUnavailable(let model, let missing):
      return "this host's KVM cannot present the CPU model '\(model)': it lacks \(missing.joined(separator: ", "))"
    }
  }

  /// `strerror` text for `err`, on one line.
  static func message(_ err: Int32) -> String {
    String(cString: strerror(err))
  }
}
