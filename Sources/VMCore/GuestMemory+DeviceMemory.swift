import Glibc

extension GuestMemory {
  /// Host memory that sits in the guest-physical address space like RAM but is not RAM: a
  /// device's memory (a display's framebuffer BAR). Accelerators map these regions as they
  /// map RAM (KVM memory slots after the RAM slots; the software CPU's RAM lookup), so guest
  /// accesses run at RAM speed. They are not in the e820 map, not in snapshots and not
  /// reachable through this object's RAM accessors.
  public var deviceRegions: [Region] { deviceRegionList.withLock { $0 } }

  /// Maps `size` bytes of zeroed host memory at guest-physical `guestBase` as device memory.
  /// Call before the accelerator is created (accelerators read the list once). The range
  /// must be page aligned and overlap neither RAM nor another device region.
  public func mapDeviceMemory(at guestBase: UInt64, size: UInt64) throws(GuestMemoryError) -> Region {
    guard size > 0, size % 4096 == 0, guestBase % 4096 == 0, guestBase <= UInt64.max - size else {
      throw .invalidSize(size)
    }
    let end = guestBase + size
    let overlaps = (regions + deviceRegions).contains { guestBase < $0.guestEnd && $0.guestBase < end }
    guard !overlaps else { throw .outOfRange(address: guestBase, length: size) }
    let pointer = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    guard let pointer, pointer != MAP_FAILED else { throw .cannotMap(size: size, errno: errno) }
    let region = Region(guestBase: guestBase, size: size, host: pointer)
    deviceRegionList.withLock { $0.append(region) }
    return region
  }
}
