import VMCore

/// Translates guest-virtual (linear) addresses to guest-physical ones through the guest's own
/// page tables, for the debugger: it reads the tables without setting accessed or dirty bits
/// and never faults (nil for an unmapped address). Covers paging off, 32-bit paging (with
/// 4 MiB pages), PAE and 4-level paging (2 MiB and 1 GiB pages).
public struct GuestPageWalker: Sendable {
  public let cr0: UInt64
  public let cr3: UInt64
  public let cr4: UInt64
  public let efer: UInt64

  public init(cr0: UInt64, cr3: UInt64, cr4: UInt64, efer: UInt64) {
    self.cr0 = cr0
    self.cr3 = cr3
    self.cr4 = cr4
    self.efer = efer
  }

  private static let addressMask: UInt64 = 0x000F_FFFF_FFFF_F000

  /// The physical address of `linear`, or nil when it is not mapped.
  public func translate(_ linear: UInt64, memory: GuestMemory) -> UInt64? {
    let longMode = efer & (1 << 10) != 0
    if cr0 & (1 << 31) == 0 { return longMode ? linear : linear & 0xFFFF_FFFF }
    func entry64(_ address: UInt64) -> UInt64? { try? memory.read(UInt64.self, at: address) }
    if longMode || cr4 & (1 << 5) != 0 {
      // 4-level (long mode) or PAE (3-level, 32-bit linear addresses).
      let levels = longMode ? 4 : 3
      var linear = linear
      if !longMode { linear &= 0xFFFF_FFFF }
      var table = longMode ? cr3 & Self.addressMask : cr3 & 0xFFFF_FFE0
      var shift: UInt64 = longMode ? 39 : 30
      for level in stride(from: levels, through: 1, by: -1) {
        let indexBits: UInt64 = (level == 3 && !longMode) ? 0x3 : 0x1FF
        let index = (linear >> shift) & indexBits
        guard let entry = entry64(table &+ index &* 8), entry & 1 != 0 else { return nil }
        // A large page: PS at the PDPT (1 GiB, long mode) or directory (2 MiB) level.
        if (level == 2 || (level == 3 && longMode)) && entry & 0x80 != 0 {
          let pageMask = (UInt64(1) << shift) - 1
          return (entry & Self.addressMask & ~pageMask) | (linear & pageMask)
        }
        table = entry & Self.addressMask
        shift -= 9
      }
      return table | (linear & 0xFFF)
    }
    // 32-bit paging.
    let linear32 = linear & 0xFFFF_FFFF
    guard let directory = try? memory.read(UInt32.self, at: (cr3 & 0xFFFF_F000) &+ (linear32 >> 22) &* 4),
      directory & 1 != 0
    else { return nil }
    if directory & 0x80 != 0 && cr4 & (1 << 4) != 0 {
      let high = UInt64((directory >> 13) & 0xFF) << 32
      return high | UInt64(directory & 0xFFC0_0000) | (linear32 & 0x3F_FFFF)
    }
    guard
      let table = try? memory.read(
        UInt32.self, at: UInt64(directory & 0xFFFF_F000) &+ ((linear32 >> 12) & 0x3FF) &* 4),
      table & 1 != 0
    else { return nil }
    return UInt64(table & 0xFFFF_F000) | (linear32 & 0xFFF)
  }

  /// Reads `count` bytes at `linear` page by page; stops at the first unmapped or non-RAM
  /// byte (the result may be shorter).
  public func read(_ linear: UInt64, count: Int, memory: GuestMemory, physical: Bool = false) -> [UInt8] {
    var result: [UInt8] = []
    result.reserveCapacity(count)
    var address = linear
    while result.count < count {
      let inPage = Int(0x1000 - (address & 0xFFF))
      let chunk = min(inPage, count - result.count)
      guard let target = physical ? address : translate(address, memory: memory),
        let bytes = try? memory.readBytes(at: target, count: chunk)
      else { break }
      result += bytes
      address &+= UInt64(chunk)
    }
    return result
  }

  /// Writes `bytes` at `linear`; false (with a prefix possibly written) when some page is not
  /// mapped or not RAM. `GuestMemory.writeBytes` reports writes to the accelerator (decoded code
  /// on those pages is dropped).
  public func write(_ bytes: [UInt8], at linear: UInt64, memory: GuestMemory, physical: Bool = false) -> Bool {
    var offset = 0
    var address = linear
    while offset < bytes.count {
      let inPage = Int(0x1000 - (address & 0xFFF))
      let chunk = min(inPage, bytes.count - offset)
      guard let target = physical ? address : translate(address, memory: memory),
        (try? memory.writeBytes(bytes[offset..<offset + chunk], at: target)) != nil
      else { return false }
      offset += chunk
      address &+= UInt64(chunk)
    }
    return true
  }
}
