import Display

/// Whether the machine has a screen, and how it is shown.
public enum DisplayChoice: Sendable, Equatable {
  /// No display device (the default): nothing is added to the machine.
  case none
  /// A framebuffer served by a VNC server listening on `[HOST:]PORT`.
  case vnc(address: String)

  /// Parses `none` or `vnc=[HOST:]PORT`.
  public init(parsing text: String) throws(ConfigurationError) {
    if text == "none" {
      self = .none
      return
    }
    guard text.hasPrefix("vnc="), VNCServer.parseAddress(String(text.dropFirst(4))) != nil else {
      throw .invalidDisplay(text)
    }
    self = .vnc(address: String(text.dropFirst(4)))
  }
}

/// The display's geometry: 1024x768 pixels of 32 bits.
public enum DisplayGeometry {
  public static let width = 1024
  public static let height = 768
}
