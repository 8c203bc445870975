import VMM
import Virtio

/// `BalloonConfig` (the `balloon` of `vm.create`). `id`, `pci_segment`, `pci_device_id` and
/// `iommu` are not accepted.
struct CHBalloonConfig: Codable, Equatable {
  var size: Int64
  var deflate_on_oom: Bool?
  var free_page_reporting: Bool?
}

/// `VmResize` (`vm.resize`): only `desired_balloon` is supported.
struct CHVmResize: Codable, Equatable {
  var desired_vcpus: Int?
  var desired_ram: Int64?
  var desired_balloon: Int64?
}

/// Cloud Hypervisor's balloon over `VirtioBalloon`: sizes are bytes, rounded down to whole MiB.
extension CloudHypervisorAPI {
  /// The target in MiB for a balloon of `bytes`, checked against the guest's `memoryMiB`.
  static func balloonTarget(bytes: Int64, memoryMiB: Int, field: String) throws(Failure) -> UInt32 {
    guard bytes >= 0, bytes >> 20 <= Int64(memoryMiB) else {
      throw Failure(status: 400, message: "\(field) (\(bytes) bytes) must be between 0 and the guest memory size")
    }
    return UInt32(bytes >> 20)
  }

  /// The spec's balloon for a `vm.create` `balloon`.
  static func balloon(from config: CHBalloonConfig, memoryMiB: Int) throws(Failure) -> BalloonConfiguration {
    let target = try balloonTarget(bytes: config.size, memoryMiB: memoryMiB, field: "balloon.size")
    let options = BalloonOptions(
      deflateOnOOM: config.deflate_on_oom ?? false, freePageReporting: config.free_page_reporting ?? false)
    return BalloonConfiguration(targetMiB: target, options: options)
  }

  /// How the spec's balloon appears in `vm.info`.
  static func balloonConfig(from balloon: BalloonConfiguration?) -> CHBalloonConfig? {
    balloon.map {
      CHBalloonConfig(
        size: Int64($0.targetMiB) << 20, deflate_on_oom: $0.options.deflateOnOOM,
        free_page_reporting: $0.options.freePageReporting)
    }
  }

  /// `vm.resize` with `desired_balloon`: a new target for the running guest's balloon.
  func resize(_ request: CHVmResize) throws(Failure) {
    if request.desired_vcpus != nil || request.desired_ram != nil {
      throw Failure(
        status: 400, message: "Hostvisor does not hotplug vCPUs or memory; only desired_balloon is supported")
    }
    guard let bytes = request.desired_balloon else {
      throw Failure(status: 400, message: "vm.resize needs desired_balloon")
    }
    let lifecycle = controller.lifecycle
    guard lifecycle == .running || lifecycle == .paused, let machine = controller.machine else {
      throw Failure(status: 405, message: "the VM is not booted")
    }
    guard let device = machine.balloon else {
      throw Failure(status: 400, message: "the VM has no balloon (balloon in vm.create)")
    }
    let target = try Self.balloonTarget(
      bytes: bytes, memoryMiB: controller.spec.memoryMiB, field: "desired_balloon")
    device.setTarget(pages: target * BalloonConfiguration.pagesPerMiB)
  }
}
