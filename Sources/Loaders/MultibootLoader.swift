import VMCore

/// Loads Multiboot (version 0.6.96) kernels the way QEMU's `-kernel` does.
///
/// The image is placed by the header's address fields when flag bit 16 (the "a.out kludge")
/// is set, else by the ELF32/ELF64 program headers (physical addresses). The initrd, if any,
/// becomes the single module, page-aligned right after the kernel; its string is the initrd
/// path. The information structure at 0x1000 reports mem_lower/mem_upper, the command line
/// (the kernel path, a space, then the command line, as QEMU passes it), the module list, the
/// memory map (the same ranges as the e820 map) and the boot loader name "hostvisor".
/// The CPU starts in flat 32-bit protected mode, paging off, CS 0x08, data 0x10 (GDT at 0x500),
/// interrupts off, EAX = 0x2BADB002, EBX = 0x1000, ESP = 0x8FF0; A20 is always on.
///
/// Those boot-data addresses (GDT 0x500, information 0x1000, stack 0x8000, command line
/// 0x20000) are defaults: when the kernel or its module occupies any of them, all the boot
/// data moves to the pages right after the kernel and module instead (as QEMU places its
/// Multiboot data after the kernel), so no image that fits in RAM is refused because of them.
public enum MultibootLoader {
  /// The header magic the kernel carries.
  public static let headerMagic: UInt32 = 0x1BAD_B002
  /// The value EAX holds at entry.
  public static let bootloaderMagic: UInt32 = 0x2BAD_B002
  /// The boot loader name reported to the kernel.
  public static let loaderName = "hostvisor"

  /// Header flag bits (specification §3.1.2).
  static let flagPageAlignModules: UInt32 = 1 << 0
  static let flagMemoryInfo: UInt32 = 1 << 1
  static let flagVideoMode: UInt32 = 1 << 2
  static let flagAddressFields: UInt32 = 1 << 16

  /// Information-structure flag bits and offsets (specification §3.3).
  public enum Info {
    public static let hasMemory: UInt32 = 1 << 0
    public static let hasCommandLine: UInt32 = 1 << 2
    public static let hasModules: UInt32 = 1 << 3
    public static let hasMemoryMap: UInt32 = 1 << 6
    public static let hasLoaderName: UInt32 = 1 << 9

    public static let flagsOffset: UInt64 = 0
    public static let memLowerOffset: UInt64 = 4
    public static let memUpperOffset: UInt64 = 8
    public static let cmdlineOffset: UInt64 = 16
    public static let modsCountOffset: UInt64 = 20
    public static let modsAddrOffset: UInt64 = 24
    public static let mmapLengthOffset: UInt64 = 44
    public static let mmapAddrOffset: UInt64 = 48
    public static let loaderNameOffset: UInt64 = 64
    /// Size of the structure including the framebuffer fields.
    public static let size: UInt64 = 120
  }

  static let memoryMapOffset: UInt64 = 0x100
  static let modulesOffset: UInt64 = 0x800
  static let loaderNameAreaOffset: UInt64 = 0x900
  static let memoryMapEntrySize: UInt64 = 24
  static var maximumMemoryMapEntries: Int { Int((modulesOffset - memoryMapOffset) / memoryMapEntrySize) }

  /// Where one load's boot data lives.
  struct BootDataPlacement {
    var gdt: UInt64
    var information: UInt64
    var stackTop: UInt64
    var commandLine: UInt64

    /// The default addresses when none of them overlaps `occupied` (kernel, module); else one
    /// block after the highest occupied byte: GDT and information page, stack page, command
    /// lines. Throws when that block does not fit in RAM below 4 GiB.
    static func choose(occupied: [Range<UInt64>], commandLineBytes: UInt64, memory: GuestMemory)
      throws(LoaderError) -> BootDataPlacement
    {
      let defaults: [BootLayout.Region] = [
        BootLayout.gdt, BootLayout.multibootInfo, BootLayout.bootStack,
        BootLayout.Region(name: "command line", start: BootLayout.commandLineAddress, size: commandLineBytes),
      ]
      let clash = occupied.contains { range in
        defaults.contains { range.lowerBound < $0.end && $0.start < range.upperBound }
      }
      if !clash {
        return BootDataPlacement(
          gdt: BootLayout.gdtAddress, information: BootLayout.multibootInfoAddress,
          stackTop: BootLayout.bootStackTop, commandLine: BootLayout.commandLineAddress)
      }
      let highest = occupied.map(\.upperBound).max() ?? 0
      let base = (highest + 0xFFF) & ~UInt64(0xFFF)
      // GDT at +0, the information area (structure, memory map, module list, loader name) at
      // +0x1000, the stack page at +0x2000, the command lines from +0x3000.
      let size = 0x3000 + ((commandLineBytes + 0xFFF) & ~UInt64(0xFFF))
      guard base + size <= 0x1_0000_0000, memory.contains(base, length: size) else {
        throw .segmentOverlapsBootData(
          address: occupied.first?.lowerBound ?? 0, length: (occupied.first?.count).map(UInt64.init) ?? 0,
          region: "Multiboot boot data (no room after the kernel)", regionStart: base, regionEnd: base + size)
      }
      return BootDataPlacement(
        gdt: base, information: base + 0x1000, stackTop: base + 0x2FF0, commandLine: base + 0x3000)
    }
  }

  static func load(
    _ image: ImageBytes, headerOffset: UInt64, initrd: ImageBytes?, commandLine: String, memory: GuestMemory,
    memoryMap: [E820Entry]
  ) throws(LoaderError) -> BootImage {
    func malformed(_ reason: String) -> LoaderError {
      .malformed(path: image.path, format: "Multiboot", reason: reason)
    }
    let flags = image.u32(headerOffset + 4)!
    let unknownRequired = flags & 0xFFFF & ~(flagPageAlignModules | flagMemoryInfo | flagVideoMode)
    guard unknownRequired == 0 else {
      throw .unsupported(
        path: image.path, reason: "its Multiboot header requires features Hostvisor lacks (flags \(hex(flags)))")
    }
    var warnings: [String] = []
    if flags & flagVideoMode != 0 {
      warnings.append("the kernel asks for a video mode; Hostvisor has no graphics and passes none")
    }

    // Place the kernel.
    let entry: UInt64
    let kernelRange: Range<UInt64>
    if flags & flagAddressFields != 0 {
      guard let headerAddress = image.u32(headerOffset + 12), let loadAddress = image.u32(headerOffset + 16),
        let loadEndAddress = image.u32(headerOffset + 20), let bssEndAddress = image.u32(headerOffset + 24),
        let entryAddress = image.u32(headerOffset + 28)
      else { throw malformed("the header's address fields lie past the end of the file") }
      guard loadAddress <= headerAddress, UInt64(headerAddress - loadAddress) <= headerOffset else {
        throw malformed(
          "header_addr \(hex(headerAddress)) and load_addr \(hex(loadAddress)) do not match the header's file offset \(hex(headerOffset))"
        )
      }
      let fileStart = headerOffset - UInt64(headerAddress - loadAddress)
      let loadSize: UInt64
      if loadEndAddress == 0 {
        loadSize = UInt64(image.count) - fileStart
      } else {
        guard loadEndAddress >= loadAddress else {
          throw malformed("load_end_addr \(hex(loadEndAddress)) is below load_addr \(hex(loadAddress))")
        }
        loadSize = UInt64(loadEndAddress - loadAddress)
      }
      guard let fileRange = image.range(fileStart, loadSize) else {
        throw malformed(
          "load_addr..load_end_addr needs \(hex(loadSize)) bytes from offset \(hex(fileStart)) but the file has \(image.count)"
        )
      }
      let loadEnd = UInt64(loadAddress) + loadSize
      let bssEnd = bssEndAddress == 0 ? loadEnd : UInt64(bssEndAddress)
      guard bssEnd >= loadEnd else {
        throw malformed("bss_end_addr \(hex(bssEnd)) is below the end of the loaded image \(hex(loadEnd))")
      }
      let start = UInt64(loadAddress)
      guard memory.contains(start, length: bssEnd - start) else {
        throw .segmentOutsideRAM(address: start, length: bssEnd - start)
      }
      try memory.load(image.bytes, fileRange, at: start)
      try memory.zero(at: loadEnd, length: bssEnd - loadEnd)
      entry = UInt64(entryAddress)
      kernelRange = start..<bssEnd
    } else {
      guard ELFImage.hasMagic(image) else {
        throw malformed("the header has no address fields (flag 16) and the file is not ELF")
      }
      let elf = try ELFImage.parse(image)
      entry = elf.physicalEntry
      guard entry <= 0xFFFF_FFFF else {
        throw malformed("the entry point \(hex(entry)) is not reachable from 32-bit protected mode")
      }
      kernelRange = try elf.loadSegments(from: image, into: memory, avoiding: [])
    }

    let kernelLine = KernelLoader.commandLineBytes(commandLine.isEmpty ? image.path : image.path + " " + commandLine)
    let moduleLine = KernelLoader.commandLineBytes(initrd?.path ?? "")
    let limit = Int(BootLayout.commandLineAreaSize)
    guard kernelLine.count + 1 + moduleLine.count + 1 <= limit else {
      throw .commandLineTooLong(length: kernelLine.count + moduleLine.count, limit: limit - 2)
    }

    // The module, page-aligned after the kernel, below 4 GiB.
    var initrdRange: Range<UInt64>? = nil
    if let initrd {
      let size = UInt64(initrd.count)
      let start = max((kernelRange.upperBound + 0xFFF) & ~UInt64(0xFFF), BootLayout.kernelMinimumAddress)
      guard start <= 0xFFFF_FFFF, size <= 0x1_0000_0000 - start, memory.contains(start, length: size) else {
        throw .initrdTooBig(path: initrd.path, size: size, limit: memory.regions.first?.guestEnd ?? 0)
      }
      try memory.load(initrd.bytes, 0..<initrd.count, at: start)
      initrdRange = start..<(start + size)
    }

    // Where the boot data goes: the default addresses, or after the kernel and module.
    let place = try BootDataPlacement.choose(
      occupied: [kernelRange] + (initrdRange.map { [$0] } ?? []),
      commandLineBytes: UInt64(kernelLine.count + 1 + moduleLine.count + 1), memory: memory)

    // Command line, then the module string, in the command-line area.
    let commandLineAddress = place.commandLine
    let moduleLineAddress = commandLineAddress + UInt64(kernelLine.count) + 1
    try memory.load(kernelLine + [0], 0..<(kernelLine.count + 1), at: commandLineAddress)
    try memory.load(moduleLine + [0], 0..<(moduleLine.count + 1), at: moduleLineAddress)

    // The information structure.
    let info = place.information
    try memory.zero(at: info, length: BootLayout.multibootInfoAreaSize)
    var infoFlags = Info.hasMemory | Info.hasCommandLine | Info.hasModules | Info.hasMemoryMap | Info.hasLoaderName
    if initrd == nil { infoFlags &= ~Info.hasModules }
    let lowEnd = memory.regions.first.map { $0.guestBase == 0 ? $0.guestEnd : 0 } ?? 0
    let memLower = min(lowEnd, E820Map.conventionalMemoryEnd) / 1024
    let memUpper = lowEnd > E820Map.oneMiB ? (lowEnd - E820Map.oneMiB) / 1024 : 0
    try memory.put(infoFlags, at: info + Info.flagsOffset)
    try memory.put(UInt32(memLower), at: info + Info.memLowerOffset)
    try memory.put(UInt32(truncatingIfNeeded: memUpper), at: info + Info.memUpperOffset)
    try memory.put(UInt32(commandLineAddress), at: info + Info.cmdlineOffset)
    if let initrdRange {
      let module = info + modulesOffset
      try memory.put(UInt32(1), at: info + Info.modsCountOffset)
      try memory.put(UInt32(module), at: info + Info.modsAddrOffset)
      try memory.put(UInt32(initrdRange.lowerBound), at: module)
      try memory.put(UInt32(initrdRange.upperBound), at: module + 4)
      try memory.put(UInt32(moduleLineAddress), at: module + 8)
    }
    guard memoryMap.count <= maximumMemoryMapEntries else {
      throw .tooManyMemoryMapEntries(count: memoryMap.count, limit: maximumMemoryMapEntries)
    }
    for (index, entry) in memoryMap.enumerated() {
      let slot = info + memoryMapOffset + UInt64(index) * memoryMapEntrySize
      try memory.put(UInt32(memoryMapEntrySize - 4), at: slot)
      try memory.put(entry.address, at: slot + 4)
      try memory.put(entry.size, at: slot + 12)
      try memory.put(entry.type.rawValue, at: slot + 20)
    }
    try memory.put(UInt32(UInt64(memoryMap.count) * memoryMapEntrySize), at: info + Info.mmapLengthOffset)
    try memory.put(UInt32(info + memoryMapOffset), at: info + Info.mmapAddrOffset)
    let name = Array(loaderName.utf8) + [0]
    try memory.load(name, 0..<name.count, at: info + loaderNameAreaOffset)
    try memory.put(UInt32(info + loaderNameAreaOffset), at: info + Info.loaderNameOffset)

    var state = try BootCPUSetup.protectedMode32(
      memory: memory, entry: entry, stackPointer: place.stackTop, gdtAddress: place.gdt)
    state.rax = UInt64(bootloaderMagic)
    state.rbx = info
    return BootImage(
      state: state, format: .multiboot, entry: entry, kernelRange: kernelRange, initrdRange: initrdRange,
      commandLineAddress: commandLineAddress, bootParamsAddress: nil, multibootInfoAddress: info,
      memoryMap: memoryMap, warnings: warnings)
  }
}
