import CShim
import Glibc
import VMCore

/// The open KVM device (/dev/kvm): system-wide ioctls.
final class KVMSystemDevice: Sendable {
  let fd: Int32
  let path: String

  init(path: String) throws(KVMError) {
    let fd = open(path, O_RDWR | O_CLOEXEC)
    guard fd >= 0 else { throw .cannotOpenDevice(path: path, errno: errno) }
    self.fd = fd
    self.path = path
  }

  deinit { close(fd) }

  /// KVM_CHECK_EXTENSION: 0 when absent, otherwise a capability-specific positive value.
  func extensionValue(_ capability: Int32) -> Int32 {
    max(0, hv_ioctl_int(fd, HV_KVM_CHECK_EXTENSION, UInt(capability)))
  }

  /// The host's supported CPUID table (KVM_GET_SUPPORTED_CPUID), growing the buffer as asked.
  func supportedCPUID() throws(KVMError) -> [CPUIDEntry] {
    var capacity = 128
    while true {
      let headerSize = MemoryLayout<kvm_cpuid2>.size
      let entrySize = MemoryLayout<kvm_cpuid_entry2>.stride
      let buffer = UnsafeMutableRawPointer.allocate(
        byteCount: headerSize + capacity * entrySize, alignment: MemoryLayout<kvm_cpuid2>.alignment)
      defer { buffer.deallocate() }
      memset(buffer, 0, headerSize + capacity * entrySize)
      let cpuid = buffer.bindMemory(to: kvm_cpuid2.self, capacity: 1)
      cpuid.pointee.nent = UInt32(capacity)
      if hv_ioctl_ptr(fd, HV_KVM_GET_SUPPORTED_CPUID, cpuid) < 0 {
        let err = errno
        if err == E2BIG && capacity < 65536 {
          capacity *= 2
          continue
        }
        throw .systemCallFailed(operation: "KVM_GET_SUPPORTED_CPUID", errno: err)
      }
      let entries = hv_kvm_cpuid2_entries(cpuid)!
      return (0..<Int(cpuid.pointee.nent)).map { CPUIDEntry(entries[$0]) }
    }
  }
}

/// One KVM virtual machine: its file descriptor, and the guest RAM registered with it,
/// which must stay mapped as long as the VM exists.
final class KVMVirtualMachine: Sendable {
  let fd: Int32
  /// Kept alive because KVM holds the host addresses of its regions as memory slots.
  let memory: GuestMemory

  init(system: KVMSystemDevice, memory: GuestMemory) throws(KVMError) {
    var fd: Int32 = -1
    // KVM_CREATE_VM may fail with EINTR when a signal arrives during setup: try again.
    for _ in 0..<16 {
      fd = hv_ioctl_int(system.fd, HV_KVM_CREATE_VM, 0)
      if fd >= 0 || errno != EINTR { break }
    }
    guard fd >= 0 else { throw .systemCallFailed(operation: "KVM_CREATE_VM", errno: errno) }
    self.fd = fd
    self.memory = memory
  }

  deinit { close(fd) }

  /// Calls a VM ioctl with a pointer argument, turning failure into a `KVMError`.
  func call(_ operation: String, _ request: UInt, _ argument: UnsafeMutableRawPointer) throws(KVMError) {
    if hv_ioctl_ptr(fd, request, argument) < 0 { throw .systemCallFailed(operation: operation, errno: errno) }
  }

  /// Calls a VM ioctl with an integer argument; returns its non-negative result.
  @discardableResult
  func call(_ operation: String, _ request: UInt, integer argument: UInt) throws(KVMError) -> Int32 {
    let result = hv_ioctl_int(fd, request, argument)
    if result < 0 { throw .systemCallFailed(operation: operation, errno: errno) }
    return result
  }

  /// The kvmclock (KVM_GET_CLOCK), or nil when the kernel refuses.
  func clock() -> kvm_clock_data? {
    var data = kvm_clock_data()
    return hv_ioctl_ptr(fd, HV_KVM_GET_CLOCK, &data) < 0 ? nil : data
  }

  /// Sets the kvmclock (KVM_SET_CLOCK) to a value read by `clock()`; failures are ignored
  /// (the guest then sees the host's elapsed time, as without this call).
  func setClock(_ value: kvm_clock_data) {
    var data = kvm_clock_data()
    data.clock = value.clock
    _ = hv_ioctl_ptr(fd, HV_KVM_SET_CLOCK, &data)
  }

  /// Registers every RAM region of `memory` as a KVM memory slot (slot N = region N), or
  /// changes the `flags` (KVM_MEM_LOG_DIRTY_PAGES) of slots already registered; device
  /// memory regions follow the RAM slots.
  func registerMemorySlots(flags: UInt32 = 0) throws(KVMError) {
    for (slot, region) in memory.regions.enumerated() {
      var slotRegion = kvm_userspace_memory_region()
      slotRegion.slot = UInt32(slot)
      slotRegion.flags = flags
      slotRegion.guest_phys_addr = region.guestBase
      slotRegion.memory_size = region.size
      slotRegion.userspace_addr = UInt64(UInt(bitPattern: region.host))
      try call("KVM_SET_USER_MEMORY_REGION (slot \(slot))", HV_KVM_SET_USER_MEMORY_REGION, &slotRegion)
    }
    // Device memory mapped like RAM (a framebuffer) follows in the next slots, never logged.
    for (index, region) in memory.deviceRegions.enumerated() {
      var slotRegion = kvm_userspace_memory_region()
      slotRegion.slot = UInt32(memory.regions.count + index)
      slotRegion.guest_phys_addr = region.guestBase
      slotRegion.memory_size = region.size
      slotRegion.userspace_addr = UInt64(UInt(bitPattern: region.host))
      try call(
        "KVM_SET_USER_MEMORY_REGION (device slot \(slotRegion.slot))", HV_KVM_SET_USER_MEMORY_REGION, &slotRegion)
    }
  }
}

/// Forwards device interrupt lines to the in-kernel irqchip (PIC + IOAPIC) with KVM_IRQ_LINE.
final class KVMInterruptSink: InterruptSink {
  let machine: KVMVirtualMachine

  init(machine: KVMVirtualMachine) {
    self.machine = machine
  }

  /// Lines the irqchip does not have (beyond the IOAPIC's pins) are ignored, as on hardware.
  func setInterruptLevel(line: UInt32, level: Bool) {
    _ = hv_kvm_irq_line(machine.fd, line, level ? 1 : 0)
  }
}

extension CPUIDEntry {
  init(_ entry: kvm_cpuid_entry2) {
    self.init(
      function: entry.function, index: entry.index, flags: entry.flags, eax: entry.eax, ebx: entry.ebx,
      ecx: entry.ecx, edx: entry.edx)
  }

  var kvmEntry: kvm_cpuid_entry2 {
    var entry = kvm_cpuid_entry2()
    entry.function = function
    entry.index = index
    entry.flags = flags
    entry.eax = eax
    entry.ebx = ebx
    entry.ecx = ecx
    entry.edx = edx
    return entry
  }
}

/// "0x" followed by `value` in hex.
func hex<T: BinaryInteger>(_ value: T) -> String {
  "0x" + String(value, radix: 16)
}
