import Synchronization

/// What a device has done since it was created, for the management API (Cloud Hypervisor's
/// `vm.counters`, Firecracker's metrics). Keys are Cloud Hypervisor's counter names where it
/// has one (`read_bytes`, `rx_frames`, ...).
public final class DeviceCounters: Sendable {
  private let counts: Mutex<[String: UInt64]>

  /// Counters named `names`, all zero.
  init(_ names: [String]) {
    counts = Mutex(Dictionary(uniqueKeysWithValues: names.map { ($0, 0) }))
  }

  /// Adds to several counters at once (one lock).
  func add(_ increments: KeyValuePairs<String, UInt64>) {
    counts.withLock { counts in
      for (name, amount) in increments { counts[name, default: 0] &+= amount }
    }
  }

  /// The current values.
  public var values: [String: UInt64] { counts.withLock { $0 } }
}

/// A device model that counts its work.
public protocol CountingDevice {
  /// The device's counters.
  var counters: DeviceCounters { get }
}
