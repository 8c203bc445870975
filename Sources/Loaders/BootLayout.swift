import VMCore

/// The fixed guest-physical addresses where the loaders put their boot data. All of it lives
/// in conventional memory below 0x9FC00, which the e820 map reports as usable RAM, so a kernel
/// may reuse it once it has read what it needs.
///
/// ```
/// 0x00500-0x0051F  GDT (4 descriptors)                      every format
/// 0x01000-0x01FFF  Multiboot information, mmap, modules     Multiboot
/// 0x07000-0x07FFF  boot_params ("zero page")                Linux
/// 0x08000-0x08FFF  boot stack, RSP/ESP = 0x8FF0             Linux, ELF, Multiboot
/// 0x09000          PML4                                     64-bit entries
/// 0x0A000          PDPT                                     64-bit entries
/// 0x0B000-0x0EFFF  4 page directories, 2 MiB pages, 0-4 GiB 64-bit entries
/// 0x20000-0x2FFFF  kernel command line (+ Multiboot module string)
/// 0x100000+        kernel (bzImage: pref_address, usually 16 MiB); initrd at the top of low RAM
/// ```
public enum BootLayout {
  /// The GDT: null, 0x08, 0x10, 0x18.
  public static let gdtAddress: UInt64 = 0x500
  /// Number of 8-byte descriptors in the GDT.
  public static let gdtEntries = 4
  /// The Multiboot information structure; its memory map and module list follow it.
  public static let multibootInfoAddress: UInt64 = 0x1000
  /// Size of the area reserved for Multiboot information.
  public static let multibootInfoAreaSize: UInt64 = 0x1000
  /// Linux `struct boot_params`.
  public static let bootParamsAddress: UInt64 = 0x7000
  /// Size of `struct boot_params`.
  public static let bootParamsSize: UInt64 = 0x1000
  /// Bottom of the 4 KiB boot stack.
  public static let bootStackBase: UInt64 = 0x8000
  /// Initial stack pointer for entries that get a stack.
  public static let bootStackTop: UInt64 = 0x8FF0
  /// The PML4 of the identity map (CR3).
  public static let pml4Address: UInt64 = 0x9000
  /// The page-directory-pointer table of the identity map.
  public static let pdptAddress: UInt64 = 0xA000
  /// The first of the page directories (one per GiB) of the identity map.
  public static let pageDirectoryAddress: UInt64 = 0xB000
  /// How much of the address space the boot page tables map one-to-one.
  public static let identityMapSize: UInt64 = 4 << 30
  /// Where the kernel command line is written (NUL-terminated).
  public static let commandLineAddress: UInt64 = 0x20000
  /// Bytes reserved for the command line, terminator included.
  public static let commandLineAreaSize: UInt64 = 0x10000
  /// Lowest address a bzImage's protected-mode kernel is loaded at.
  public static let kernelMinimumAddress: UInt64 = 0x10_0000

  /// Number of page directories in the identity map.
  static var pageDirectoryCount: UInt64 { identityMapSize >> 30 }

  /// A named piece of boot data, for overlap checks and error messages.
  struct Region {
    let name: String
    let start: UInt64
    let size: UInt64
    var end: UInt64 { start + size }
  }

  static let gdt = Region(name: "GDT", start: gdtAddress, size: UInt64(gdtEntries * 8))
  static let multibootInfo = Region(
    name: "Multiboot information", start: multibootInfoAddress, size: multibootInfoAreaSize)
  static let bootParams = Region(name: "boot_params", start: bootParamsAddress, size: bootParamsSize)
  static let bootStack = Region(name: "boot stack", start: bootStackBase, size: 0x1000)
  static let pageTables = Region(
    name: "boot page tables", start: pml4Address, size: pageDirectoryAddress + pageDirectoryCount * 0x1000 - pml4Address
  )
  static let commandLine = Region(name: "command line", start: commandLineAddress, size: commandLineAreaSize)

  /// Throws when `[address, address + length)` overlaps one of `regions`.
  static func checkNoOverlap(address: UInt64, length: UInt64, with regions: [Region]) throws(LoaderError) {
    guard length > 0 else { return }
    for region in regions where address < region.end && region.start < address &+ length {
      throw .segmentOverlapsBootData(
        address: address, length: length, region: region.name, regionStart: region.start, regionEnd: region.end)
    }
  }
}

/// Types of e820 memory-map entries (ACPI "Address Range Types").
public enum E820Type: UInt32, Sendable {
  case ram = 1
  case reserved = 2
  case acpiReclaimable = 3
  case acpiNVS = 4
  case unusable = 5
}

/// One entry of the BIOS e820 memory map, as Linux's boot_params and Multiboot's mmap pass it.
public struct E820Entry: Sendable, Equatable, CustomStringConvertible {
  public var address: UInt64
  public var size: UInt64
  public var type: E820Type
  /// One past the last byte (saturating at the top of the address space).
  public var end: UInt64 {
    let (sum, overflow) = address.addingReportingOverflow(size)
    return overflow ? .max : sum
  }

  public init(address: UInt64, size: UInt64, type: E820Type) {
    self.address = address
    self.size = size
    self.type = type
  }

  public var description: String { "\(hex(address))-\(hex(end)) \(type)" }
}

/// The memory map every loader reports: what a PC BIOS would say about Hostvisor's RAM.
public enum E820Map {
  /// End of usable conventional memory; the last KiB below 640 KiB is reserved (EBDA).
  public static let conventionalMemoryEnd: UInt64 = 0x9FC00
  /// The BIOS area below 1 MiB reported as reserved.
  public static let biosAreaStart: UInt64 = 0xF0000
  public static let oneMiB: UInt64 = 0x10_0000

  /// The map for `memory`: 0-0x9FC00 usable, 0x9FC00-0xA0000 and 0xF0000-0x100000 reserved,
  /// the rest of each RAM region usable; then each of `reserved` (e.g. ACPI tables the machine
  /// places) replaces whatever it overlaps, later ones winning. Sorted and non-overlapping.
  public static func build(for memory: GuestMemory, reserved: [E820Entry] = []) -> [E820Entry] {
    var entries: [E820Entry] = []
    for range in memory.ramRanges {
      let end = range.base + range.length
      guard range.base < oneMiB else {
        entries.append(E820Entry(address: range.base, size: range.length, type: .ram))
        continue
      }
      // A region that starts in the first MiB: split around the legacy holes.
      let lowEnd = min(end, conventionalMemoryEnd)
      if range.base < lowEnd {
        entries.append(E820Entry(address: range.base, size: lowEnd - range.base, type: .ram))
      }
      if end > conventionalMemoryEnd {
        let ebdaStart = max(range.base, conventionalMemoryEnd)
        entries.append(E820Entry(address: ebdaStart, size: 0xA0000 - ebdaStart, type: .reserved))
      }
      if end > biosAreaStart {
        entries.append(E820Entry(address: biosAreaStart, size: oneMiB - biosAreaStart, type: .reserved))
      }
      if end > oneMiB {
        entries.append(E820Entry(address: oneMiB, size: end - oneMiB, type: .ram))
      }
    }
    for hole in reserved where hole.size > 0 {
      var carved: [E820Entry] = []
      for entry in entries {
        guard hole.address < entry.end, entry.address < hole.end else {
          carved.append(entry)
          continue
        }
        if entry.address < hole.address {
          carved.append(E820Entry(address: entry.address, size: hole.address - entry.address, type: entry.type))
        }
        if hole.end < entry.end {
          carved.append(E820Entry(address: hole.end, size: entry.end - hole.end, type: entry.type))
        }
      }
      carved.append(hole)
      entries = carved
    }
    return entries.sorted { $0.address < $1.address }
  }
}
