import VMM
import Virtio

/// `Balloon` (PUT /balloon, GET /balloon, `balloon` in `--config-file`).
struct BalloonBody: Codable, Equatable {
  var amount_mib: Int
  var deflate_on_oom: Bool
  var stats_polling_interval_s: Int?
  var free_page_hinting: Bool?
  var free_page_reporting: Bool?
}

/// `BalloonUpdate` (PATCH /balloon).
struct BalloonUpdateBody: Codable, Equatable {
  var amount_mib: Int
}

/// `BalloonStatsUpdate` (PATCH /balloon/statistics).
struct BalloonStatisticsUpdateBody: Codable, Equatable {
  var stats_polling_interval_s: Int
}

/// The Firecracker balloon resources over `VirtioBalloon`: the device is configured before boot
/// (`VMSpec.balloon`); afterwards the target and the statistics interval are changed on the
/// running device.
extension FirecrackerAPI {
  static let noBalloon = "No balloon device is configured; PUT /balloon before starting the microVM."
  static let noStatistics = "Balloon statistics were not enabled when the device was configured."

  /// The running machine's balloon device, or nil before boot.
  private var runningBalloon: VirtioBalloon? {
    let lifecycle = controller.lifecycle
    guard lifecycle == .running || lifecycle == .paused else { return nil }
    return controller.machine?.balloon
  }

  private func checkedTarget(_ mib: Int) throws(ControlFailure) -> UInt32 {
    let memory = controller.spec.memoryMiB
    guard mib >= 0, mib <= memory else {
      throw ControlFailure("The balloon target (\(mib) MiB) must be between 0 and the guest memory (\(memory) MiB).")
    }
    return UInt32(mib)
  }

  /// PUT /balloon (before boot).
  func putBalloon(_ body: BalloonBody) throws(ControlFailure) {
    if body.free_page_hinting == true {
      throw ControlFailure("Hostvisor does not support free page hinting; use free_page_reporting.")
    }
    guard let interval = body.stats_polling_interval_s.map({ UInt32(exactly: $0) }) ?? 0 else {
      throw ControlFailure("stats_polling_interval_s must be a non-negative number of seconds.")
    }
    let target = try checkedTarget(body.amount_mib)
    let options = BalloonOptions(
      deflateOnOOM: body.deflate_on_oom, statisticsInterval: interval,
      freePageReporting: body.free_page_reporting ?? false)
    try configure { spec throws(ControlError) in
      spec.balloon = BalloonConfiguration(targetMiB: target, options: options)
    }
  }

  /// PATCH /balloon: a new target, before or after boot.
  func patchBalloon(_ body: BalloonUpdateBody) throws(ControlFailure) {
    let target = try checkedTarget(body.amount_mib)
    if let device = runningBalloon {
      device.setTarget(pages: target * BalloonConfiguration.pagesPerMiB)
      return
    }
    guard controller.spec.balloon != nil else { throw ControlFailure(Self.noBalloon) }
    try configure { spec throws(ControlError) in spec.balloon?.targetMiB = target }
  }

  /// GET /balloon.
  func balloonConfiguration() throws(ControlFailure) -> BalloonBody {
    guard let configured = controller.spec.balloon else { throw ControlFailure(Self.noBalloon) }
    var body = Self.body(configured)
    if let device = runningBalloon {
      body.amount_mib = Int(device.targetPages / BalloonConfiguration.pagesPerMiB)
      body.stats_polling_interval_s = Int(device.statisticsInterval)
    }
    return body
  }

  /// How `configuration` appears in the API.
  static func body(_ configuration: BalloonConfiguration) -> BalloonBody {
    BalloonBody(
      amount_mib: Int(configuration.targetMiB), deflate_on_oom: configuration.options.deflateOnOOM,
      stats_polling_interval_s: Int(configuration.options.statisticsInterval), free_page_hinting: false,
      free_page_reporting: configuration.options.freePageReporting)
  }

  /// GET /balloon/statistics: `BalloonStats`, the guest's latest numbers.
  func balloonStatistics() throws(ControlFailure) -> [String: UInt64] {
    guard let configured = controller.spec.balloon else { throw ControlFailure(Self.noBalloon) }
    guard configured.options.statisticsInterval > 0 else { throw ControlFailure(Self.noStatistics) }
    guard let device = runningBalloon else { throw ControlFailure(Self.notBeforeStartMessage) }
    let target = UInt64(device.targetPages)
    let actual = UInt64(device.actualPages)
    let perMiB = UInt64(BalloonConfiguration.pagesPerMiB)
    var result: [String: UInt64] = [
      "target_pages": target, "actual_pages": actual, "target_mib": target / perMiB, "actual_mib": actual / perMiB,
    ]
    for (tag, value) in device.statistics.values {
      if let name = BalloonStatistics.names[tag] { result[name] = value }
    }
    return result
  }

  /// PATCH /balloon/statistics: a new polling interval (statistics stay on or off as configured).
  func patchBalloonStatistics(_ body: BalloonStatisticsUpdateBody) throws(ControlFailure) {
    guard let configured = controller.spec.balloon else { throw ControlFailure(Self.noBalloon) }
    guard configured.options.statisticsInterval > 0 else { throw ControlFailure(Self.noStatistics) }
    guard let seconds = UInt32(exactly: body.stats_polling_interval_s), seconds > 0 else {
      throw ControlFailure("Balloon statistics cannot be turned off: stats_polling_interval_s must be positive.")
    }
    if let device = runningBalloon {
      device.setStatisticsInterval(seconds: seconds)
      return
    }
    try configure { spec throws(ControlError) in spec.balloon?.options.statisticsInterval = seconds }
  }
}
