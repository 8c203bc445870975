import CShim
import Glibc
import PCI

extension KVMAccelerator: MSIDelivery {
  /// Injects a device's MSI/MSI-X write into the in-kernel local APICs with KVM_SIGNAL_MSI
  /// (the kernel decodes the x86 address/data format). A message the kernel refuses (no
  /// matching APIC, or an address outside the interrupt window) is dropped, as on hardware.
  public func deliverMSI(address: UInt64, data: UInt32) {
    _ = machine.signalMSI(address: address, data: data)
  }
}

extension KVMVirtualMachine {
  /// KVM_SIGNAL_MSI: returns the ioctl's result (> 0 delivered, 0 blocked by the guest, < 0 error).
  func signalMSI(address: UInt64, data: UInt32) -> Int32 {
    var message = kvm_msi()
    message.address_lo = UInt32(truncatingIfNeeded: address)
    message.address_hi = UInt32(truncatingIfNeeded: address >> 32)
    message.data = data
    return hv_ioctl_ptr(fd, HV_KVM_SIGNAL_MSI, &message)
  }
}
