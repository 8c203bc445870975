import PCI

/// A network device that emulates real hardware (the e1000, the RTL8139) on a
/// `NetworkBackend`, for guests without virtio drivers.
public protocol EmulatedNetworkDevice: PCIDevice, CountingDevice {
  /// The model as logs and messages name it, e.g. "e1000 (82540EM)".
  var modelDescription: String { get }
  /// The device's MAC address.
  var mac: MACAddress { get }
  /// The host side.
  var backend: any NetworkBackend { get }
  /// Stops the device's worker thread.
  func shutdown()
}

extension E1000: EmulatedNetworkDevice {
  public var modelDescription: String { "e1000 (82540EM)" }
}
