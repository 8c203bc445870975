import Glibc
import VMCore

/// `PROT_NONE` mappings right below and above each region of a `GuestMemory`, where the
/// address space is free: a host access just outside guest RAM (a device or stub that trusted
/// a guest-chosen address or length) then kills the fuzz target with SIGSEGV instead of
/// reading or corrupting a neighbouring mapping, which the address sanitizer does not watch.
public final class GuestMemoryGuards {
  /// Size of each guard mapping.
  public static let guardSize = 1 << 20
  private var mappings: [UnsafeMutableRawPointer] = []

  /// Maps the guards around every region of `memory`; sides already mapped stay unguarded.
  public init(around memory: GuestMemory) {
    for region in memory.regions {
      for start in [region.host - Self.guardSize, region.host + Int(region.size)] {
        let result = mmap(start, Self.guardSize, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        guard let result, result != MAP_FAILED else { continue }
        if result == start { mappings.append(result) } else { munmap(result, Self.guardSize) }
      }
    }
  }

  deinit { for mapping in mappings { munmap(mapping, Self.guardSize) } }

  /// How many sides of guest RAM are guarded.
  public var count: Int { mappings.count }
}
