import ArgumentParser
import Sandbox
import VMCore

/// The cgroup options of `run` and `serve` (cgroup v2 syntax, translated on a cgroup v1 host;
/// docs/isolation.md).
struct CgroupArguments: ParsableArguments {
  @Option(
    name: .long,
    help: ArgumentHelp(
      "Run the VM in its own cgroup NAME (under the host's cgroup2 mount, or in each cgroup v1 controller hierarchy; created if missing), with children vcpu and io for the vCPU and device threads.",
      valueName: "name"))
  var cgroup: String?

  @Option(
    name: .customLong("cpu-max"),
    help: ArgumentHelp(
      "With --cgroup: cpu.max, 'QUOTA PERIOD' in microseconds or a percentage of one CPU (20%).", valueName: "limit"))
  var cpuMax: String?

  @Option(name: .customLong("cpu-weight"), help: ArgumentHelp("With --cgroup: cpu.weight (1-10000).", valueName: "n"))
  var cpuWeight: Int?

  @Option(
    name: .customLong("memory-max"),
    help: ArgumentHelp("With --cgroup: memory.max (bytes, K/M/G, or max).", valueName: "size"))
  var memoryMax: String?

  @Option(
    name: .customLong("memory-high"),
    help: ArgumentHelp("With --cgroup: memory.high (bytes, K/M/G, or max).", valueName: "size"))
  var memoryHigh: String?

  @Option(
    name: .customLong("pids-max"),
    help: ArgumentHelp("With --cgroup: pids.max (threads and processes).", valueName: "n"))
  var pidsMax: Int?

  @Option(
    name: .customLong("io-max"),
    help: ArgumentHelp(
      "With --cgroup: io.max for the device under every disk (given at start or through the API), e.g. rbps=1048576,wiops=100.",
      valueName: "keys"))
  var ioMax: String?

  /// The limits, or a one-line error for malformed values or limits without --cgroup.
  func limits() throws -> CgroupLimits? {
    let anyLimit =
      cpuMax != nil || cpuWeight != nil || memoryMax != nil || memoryHigh != nil || pidsMax != nil
      || ioMax != nil
    guard cgroup != nil else {
      if anyLimit { throw CommandFailure("--cpu-max, --cpu-weight, --memory-*, --pids-max and --io-max need --cgroup") }
      return nil
    }
    var limits = CgroupLimits()
    if let cpuMax {
      if cpuMax.hasSuffix("%"), let percent = Double(cpuMax.dropLast()), percent > 0, percent <= 100_000 {
        limits.cpuMax = "\(Int(percent * 1000)) 100000"
      } else {
        let parts = cpuMax.split(separator: " ")
        guard (1...2).contains(parts.count), parts[0] == "max" || Int(parts[0]) != nil,
          parts.count == 1 || Int(parts[1]) != nil
        else { throw CommandFailure("invalid --cpu-max '\(cpuMax)': use PERCENT%, 'QUOTA PERIOD' or max") }
        limits.cpuMax = cpuMax
      }
    }
    if let cpuWeight {
      guard (1...10_000).contains(cpuWeight) else {
        throw CommandFailure("invalid --cpu-weight \(cpuWeight): use 1 to 10000")
      }
      limits.cpuWeight = "\(cpuWeight)"
    }
    for (option, value) in [("--memory-max", memoryMax), ("--memory-high", memoryHigh)] {
      guard let value else { continue }
      let digits = value.last.map { "KMGkmg".contains($0) } == true ? value.dropLast() : Substring(value)
      guard value == "max" || UInt64(digits) != nil else {
        throw CommandFailure("invalid \(option) '\(value)': use bytes with an optional K/M/G suffix, or max")
      }
    }
    limits.memoryMax = memoryMax
    limits.memoryHigh = memoryHigh
    if let pidsMax {
      guard pidsMax > 0 else { throw CommandFailure("invalid --pids-max \(pidsMax): use a positive count") }
      limits.pidsMax = "\(pidsMax)"
    }
    if let ioMax {
      let keys = ioMax.split(separator: ",")
      guard !keys.isEmpty,
        keys.allSatisfy({ key in
          let pair = key.split(separator: "=")
          return pair.count == 2 && ["rbps", "wbps", "riops", "wiops"].contains(pair[0])
            && (pair[1] == "max" || UInt64(pair[1]) != nil)
        })
      else { throw CommandFailure("invalid --io-max '\(ioMax)': use rbps=,wbps=,riops=,wiops= with numbers or max") }
      limits.ioMax = keys.joined(separator: " ")
    }
    return limits
  }

  /// Creates the group and moves this process into it; new vCPU and device threads then move
  /// themselves into `vcpu` and `io`. With I/O limits, every disk image opened from now on
  /// (`--disk` and the API's drives) gets them on its host device, or is refused.
  func apply(_ limits: CgroupLimits) throws {
    guard let cgroup else { return }
    do {
      let slice = try CgroupSlice(name: cgroup, limits: limits)
      ThreadStartActions.add { slice.placeCurrentThread($0) }
      if limits.ioMax != nil {
        HostDiskDevices.setOpenHook { device in
          do {
            try slice.limitDevice(CgroupSlice.deviceName(device))
            return nil
          } catch {
            return "\(error)"
          }
        }
      }
    } catch {
      throw CommandFailure(error.description)
    }
  }
}
