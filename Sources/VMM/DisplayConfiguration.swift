import Display

/// Whether the machine has a screen, and how it is shown.
public enum DisplayChoice: Sendable, Equatable {
  /// No display device (the default): nothing is added to the machine.
  case none
  /// A framebuffer served by a VNC server listening on `[HOST:]PORT`; with `tablet`, a
  /// virtio-input tablet that the VNC clients' pointer drives.
  case vnc(address: String, tablet: Bool = true)

  /// Parses `none` or `vnc=[HOST:]PORT[,tablet=on|off]`.
  public init(parsing text: String) throws(ConfigurationError) {
    if text == "none" {
      self = .none
      return
    }
    guard text.hasPrefix("vnc=") else { throw .invalidDisplay(text) }
    let parts = text.dropFirst(4).split(separator: ",", omittingEmptySubsequences: false)
    guard let address = parts.first.map(String.init), VNCServer.parseAddress(address) != nil else {
      throw .invalidDisplay(text)
    }
    var tablet = true
    for option in parts.dropFirst() {
      switch option {
      case "tablet=on": tablet = true
      case "tablet=off": tablet = false
      default: throw .invalidDisplay(text)
      }
    }
    self = .vnc(address: address, tablet: tablet)
  }

  /// Whether the machine gets a virtio tablet.
  public var hasTablet: Bool {
    if case .vnc(_, let tablet) = self { return tablet }
    return false
  }
}

/// The display's geometry: 1024x768 pixels of 32 bits.
public enum DisplayGeometry {
  public static let width = 1024
  public static let height = 768
}
