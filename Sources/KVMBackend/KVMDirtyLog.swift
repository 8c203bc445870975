import CShim
import Glibc
import Synchronization
import VMCore

extension KVMAccelerator: DirtyPageTracking {
  /// Whether dirty logging is on.
  public var isDirtyLogging: Bool { parts.memory.dirtyPages.isEnabled }

  /// Turns on dirty-page logging: every RAM slot gets KVM_MEM_LOG_DIRTY_PAGES, and host-side
  /// writes to guest RAM (device DMA, which KVM does not see) are recorded in the guest
  /// memory's dirty bitmap. `takeDirtyPages` then reports what changed.
  public func startDirtyLogging() throws(KVMError) {
    parts.memory.dirtyPages.setEnabled(true)
    try machine.registerMemorySlots(flags: UInt32(KVM_MEM_LOG_DIRTY_PAGES))
    _ = try takeDirtyPages()
  }

  /// The guest-physical page numbers (address >> 12) written by the guest or the host since
  /// logging started or since the last call (KVM_GET_DIRTY_LOG per slot, which also resets
  /// the log), in ascending order.
  public func takeDirtyPages() throws(KVMError) -> [UInt64] {
    var pages = parts.memory.dirtyPages.take()
    for (slot, region) in parts.memory.regions.enumerated() {
      let pageCount = Int(region.size >> 12)
      var bitmap = [UInt64](repeating: 0, count: (pageCount + 63) / 64)
      let result = bitmap.withUnsafeMutableBytes { buffer -> Int32 in
        var log = kvm_dirty_log()
        log.slot = UInt32(slot)
        log.dirty_bitmap = buffer.baseAddress
        return hv_ioctl_ptr(machine.fd, HV_KVM_GET_DIRTY_LOG, &log)
      }
      guard result >= 0 else {
        throw .systemCallFailed(operation: "KVM_GET_DIRTY_LOG (slot \(slot))", errno: errno)
      }
      let base = region.guestBase >> 12
      for (wordIndex, word) in bitmap.enumerated() where word != 0 {
        var bits = word
        while bits != 0 {
          pages.append(base + UInt64(wordIndex) * 64 + UInt64(bits.trailingZeroBitCount))
          bits &= bits - 1
        }
      }
    }
    pages.sort()
    var unique: [UInt64] = []
    unique.reserveCapacity(pages.count)
    for page in pages where unique.last != page { unique.append(page) }
    return unique
  }

  /// Turns dirty logging off: the slots lose KVM_MEM_LOG_DIRTY_PAGES (a failure only leaves
  /// the guest slower) and host writes are no longer recorded.
  public func stopDirtyLogging() {
    parts.memory.dirtyPages.setEnabled(false)
    _ = parts.memory.dirtyPages.take()
    try? machine.registerMemorySlots(flags: 0)
  }
}
