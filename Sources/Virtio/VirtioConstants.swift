/// Device status bits (virtio 1.2, 2.1).
public enum VirtioStatus {
  public static let acknowledge: UInt8 = 1
  public static let driver: UInt8 = 2
  public static let driverOK: UInt8 = 4
  public static let featuresOK: UInt8 = 8
  public static let deviceNeedsReset: UInt8 = 64
  public static let failed: UInt8 = 128
}

/// Device-independent feature bits (virtio 1.2, 6).
public enum VirtioFeature {
  public static let ringIndirectDescriptors: UInt64 = 1 << 28
  public static let ringEventIndex: UInt64 = 1 << 29
  public static let version1: UInt64 = 1 << 32
}

/// Virtio device IDs (virtio 1.2, 5).
public enum VirtioDeviceID {
  public static let network: UInt16 = 1
  public static let block: UInt16 = 2
  public static let console: UInt16 = 3
  public static let entropy: UInt16 = 4
  public static let balloon: UInt16 = 5
  public static let input: UInt16 = 18
}

/// Split virtqueue descriptor flags (virtio 1.2, 2.7.5).
public enum VirtqDescriptorFlag {
  public static let next: UInt16 = 1
  public static let write: UInt16 = 2
  public static let indirect: UInt16 = 4
}

/// The "no MSI-X vector" value of msix_config and queue_msix_vector.
public let virtioNoVector: UInt16 = 0xFFFF
