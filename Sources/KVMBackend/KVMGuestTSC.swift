import CShim
import Glibc

/// A vCPU's guest TSC when the machine paused, and the TSC offset KVM applied then.
struct FrozenGuestTSC: Sendable {
  var offset: UInt64
  var value: UInt64
}

/// ioctl numbers of the vCPU device-attribute calls: `_IOW(KVMIO, nr, struct kvm_device_attr)`,
/// that is direction write (1 << 30), the 24-byte structure size, type 0xAE and the number.
private let kvmSetDeviceAttribute: UInt = 0x4018_AEE1
private let kvmGetDeviceAttribute: UInt = 0x4018_AEE2
private let kvmHasDeviceAttribute: UInt = 0x4018_AEE3

extension KVMVCPU {
  /// Calls a KVM_VCPU_TSC_CTRL / KVM_VCPU_TSC_OFFSET attribute ioctl with `value`.
  private func tscOffsetAttribute(_ request: UInt, _ value: inout UInt64) -> Bool {
    withUnsafeMutablePointer(to: &value) { pointer in
      var attribute = kvm_device_attr()
      attribute.group = UInt32(KVM_VCPU_TSC_CTRL)
      attribute.attr = UInt64(KVM_VCPU_TSC_OFFSET)
      attribute.addr = UInt64(UInt(bitPattern: pointer))
      return hv_ioctl_ptr(fd, request, &attribute) == 0
    }
  }

  /// The guest TSC (IA32_TSC as the guest reads it now) and KVM's TSC offset, or nil when
  /// this kernel lacks the KVM_VCPU_TSC_OFFSET attribute.
  func freezeTSC() -> FrozenGuestTSC? {
    var unused: UInt64 = 0
    guard tscOffsetAttribute(kvmHasDeviceAttribute, &unused) else { return nil }
    var offset: UInt64 = 0
    guard tscOffsetAttribute(kvmGetDeviceAttribute, &offset), let value = guestTSC() else { return nil }
    return FrozenGuestTSC(offset: offset, value: value)
  }

  /// Moves the TSC offset back by what the guest TSC advanced since `frozen`, so the guest
  /// continues from the value it had when the machine paused.
  func thawTSC(_ frozen: FrozenGuestTSC) {
    guard let now = guestTSC() else { return }
    var offset = frozen.offset &- (now &- frozen.value)
    _ = tscOffsetAttribute(kvmSetDeviceAttribute, &offset)
  }

  /// IA32_TSC read with KVM_GET_MSRS.
  private func guestTSC() -> UInt64? {
    let byteCount = MemoryLayout<kvm_msrs>.size + MemoryLayout<kvm_msr_entry>.stride
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: byteCount, alignment: 8)
    defer { buffer.deallocate() }
    memset(buffer, 0, byteCount)
    let msrs = buffer.bindMemory(to: kvm_msrs.self, capacity: 1)
    msrs.pointee.nmsrs = 1
    let entry = hv_kvm_msrs_entries(msrs)!
    entry.pointee.index = 0x10
    guard hv_ioctl_ptr(fd, HV_KVM_GET_MSRS, msrs) == 1 else { return nil }
    return entry.pointee.data
  }
}

extension KVMAccelerator {
  /// Records every vCPU's guest TSC and offset (the machine is paused).
  func freezeGuestTSCs() {
    let frozen = vcpus.map { $0.freezeTSC() }
    frozenTSCs.withLock { $0 = frozen.contains { $0 == nil } ? nil : frozen.compactMap { $0 } }
  }

  /// Lets the guest TSCs continue from their values at `freezeGuestTSCs`: the time the machine
  /// spent paused does not show in the guest's TSC (before the vCPUs run again).
  func thawGuestTSCs() {
    guard
      let frozen = frozenTSCs.withLock({ value -> [FrozenGuestTSC]? in
        defer { value = nil }
        return value
      })
    else { return }
    for (vcpu, state) in zip(vcpus, frozen) { vcpu.thawTSC(state) }
  }

  /// The frozen guest TSC of vCPU `index`, if the machine is paused with its TSC frozen.
  func frozenGuestTSC(cpu index: Int) -> UInt64? {
    frozenTSCs.withLock { frozen in frozen.flatMap { index < $0.count ? $0[index].value : nil } }
  }
}

extension KVMAccelerator {
  /// Whether this host's KVM moves a guest TSC when asked to: creates a scratch VM with one
  /// vCPU, sets its KVM_VCPU_TSC_OFFSET and reads it back. False where the attribute is
  /// missing or ignored (some nested KVM implementations ignore every TSC write), which means
  /// guest TSCs keep running while a machine is paused and do not continue from a snapshot.
  public static func honoursGuestTSCOffset(devicePath: String = "/dev/kvm") -> Bool {
    let system = open(devicePath, O_RDWR | O_CLOEXEC)
    guard system >= 0 else { return false }
    defer { close(system) }
    let machine = hv_ioctl_int(system, HV_KVM_CREATE_VM, 0)
    guard machine >= 0 else { return false }
    defer { close(machine) }
    let vcpu = hv_ioctl_int(machine, HV_KVM_CREATE_VCPU, 0)
    guard vcpu >= 0 else { return false }
    defer { close(vcpu) }
    func call(_ request: UInt, _ value: inout UInt64) -> Bool {
      withUnsafeMutablePointer(to: &value) { pointer in
        var attribute = kvm_device_attr()
        attribute.group = UInt32(KVM_VCPU_TSC_CTRL)
        attribute.attr = UInt64(KVM_VCPU_TSC_OFFSET)
        attribute.addr = UInt64(UInt(bitPattern: pointer))
        return hv_ioctl_ptr(vcpu, request, &attribute) == 0
      }
    }
    var original: UInt64 = 0
    guard call(kvmGetDeviceAttribute, &original) else { return false }
    var moved = original &- (1 << 40)
    guard call(kvmSetDeviceAttribute, &moved) else { return false }
    var readBack: UInt64 = 0
    return call(kvmGetDeviceAttribute, &readBack) && readBack == moved
  }
}
