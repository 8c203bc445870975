import Virtio

extension VirtualMachine {
  /// The machine's virtio-balloon device, if it has one.
  public var balloon: VirtioBalloon? {
    virtioDevices.lazy.compactMap { $0.model as? VirtioBalloon }.first
  }
}
