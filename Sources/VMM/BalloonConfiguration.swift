import Virtio

/// A virtio-balloon device: its initial target and what it offers the guest.
public struct BalloonConfiguration: Sendable, Equatable {
  /// The initial target: how much guest memory the balloon should hold, in MiB.
  public var targetMiB: UInt32
  /// The device's features: deflate on OOM, statistics interval, free page reporting.
  public var options: BalloonOptions

  public init(targetMiB: UInt32 = 0, options: BalloonOptions = BalloonOptions()) {
    self.targetMiB = targetMiB
    self.options = options
  }

  /// 4 KiB pages in one MiB (the balloon's page size is always 4 KiB).
  public static let pagesPerMiB: UInt32 = 256

  /// The target in 4 KiB pages.
  public var targetPages: UInt32 { targetMiB &* Self.pagesPerMiB }

  /// Parses the CLI's `--balloon` value: comma-separated `on`, `deflate-on-oom`,
  /// `stats=SECONDS`, `reporting` and `target=MIB`, e.g. `deflate-on-oom,stats=5,reporting`.
  public init(parsing text: String) throws(ConfigurationError) {
    self.init()
    guard !text.isEmpty else { throw .invalidBalloon(text, "empty value") }
    for item in text.split(separator: ",", omittingEmptySubsequences: false) {
      let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
      switch (parts.first ?? "", parts.count) {
      case ("on", 1): break
      case ("deflate-on-oom", 1): options.deflateOnOOM = true
      case ("reporting", 1): options.freePageReporting = true
      case ("stats", 2):
        guard let seconds = UInt32(parts[1]), seconds > 0 else {
          throw .invalidBalloon(text, "stats= takes a whole number of seconds greater than zero")
        }
        options.statisticsInterval = seconds
      case ("target", 2):
        guard let mib = UInt32(parts[1]), mib <= UInt32.max / Self.pagesPerMiB else {
          throw .invalidBalloon(text, "target= takes a size in MiB")
        }
        targetMiB = mib
      default:
        throw .invalidBalloon(
          text, "unknown item '\(item)' (expected on, deflate-on-oom, stats=SECONDS, reporting, target=MIB)")
      }
    }
  }
}
