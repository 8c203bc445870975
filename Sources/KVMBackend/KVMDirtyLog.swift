import CShim
import Glibc
import Synchronization
import VMCore

/// Guest-physical pages the host side (device DMA, loaders) wrote while dirty logging is on:
/// KVM's dirty log only sees the guest's own stores.
final class KVMHostWriteLog: GuestMemoryWriteObserver {
  private let pages = Mutex<Set<UInt64>>([])

  func guestMemoryWritten(at address: UInt64, length: UInt64) {
    guard length > 0 else { return }
    let first = address >> 12
    let last = (address + length - 1) >> 12
    pages.withLock { pages in
      for page in first...last { pages.insert(page) }
    }
  }

  /// The pages written since the last call.
  func take() -> Set<UInt64> {
    pages.withLock { pages in
      defer { pages = [] }
      return pages
    }
  }
}

extension KVMAccelerator {
  /// Turns on dirty-page logging: every RAM slot gets KVM_MEM_LOG_DIRTY_PAGES and host-side
  /// writes to guest RAM are recorded too. `takeDirtyPages` then reports what changed.
  public func startDirtyLogging() throws(KVMError) {
    parts.memory.setWriteObserver(hostWriteLog)
    try machine.registerMemorySlots(flags: UInt32(KVM_MEM_LOG_DIRTY_PAGES))
    _ = try takeDirtyPages()
  }

  /// The guest-physical page numbers (address >> 12) written by the guest or the host since
  /// logging started or since the last call (KVM_GET_DIRTY_LOG per slot, which also resets
  /// the log), in ascending order.
  public func takeDirtyPages() throws(KVMError) -> [UInt64] {
    var pages = hostWriteLog.take()
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
          let bit = UInt64(bits.trailingZeroBitCount)
          pages.insert(base + UInt64(wordIndex) * 64 + bit)
          bits &= bits - 1
        }
      }
    }
    return pages.sorted()
  }
}
