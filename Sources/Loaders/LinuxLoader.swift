import VMCore

/// The fields of a bzImage's real-mode setup header that the 64-bit boot protocol uses, as
/// Documentation/arch/x86/boot.rst defines them (offsets are from the start of the file, which
/// are also their offsets in `struct boot_params`).
public struct LinuxSetupHeader: Sendable, Equatable {
  /// Size of the real-mode setup code in 512-byte sectors (a stored 0 means 4).
  public var setupSectors: UInt64
  public var bootFlag: UInt16
  /// Boot protocol version, e.g. 0x020F for 2.15.
  public var version: UInt16
  public var loadFlags: UInt8
  public var initrdAddressMax: UInt32
  public var kernelAlignment: UInt32
  public var relocatable: Bool
  public var minimumAlignmentShift: UInt8
  public var extendedLoadFlags: UInt16
  /// Maximum command-line length without the terminating NUL.
  public var commandLineSize: UInt32
  public var preferredAddress: UInt64
  /// Bytes the kernel needs from its load address until it has set itself up.
  public var initSize: UInt32
  /// One past the last byte of the setup header: 0x202 + the byte at 0x201.
  public var headerEnd: UInt64

  /// Byte offset of the protected-mode kernel in the file: (setup_sects + 1) * 512.
  public var kernelOffset: UInt64 { (setupSectors + 1) * 512 }
  /// XLF_KERNEL_64: the kernel has the 64-bit entry point at load address + 0x200.
  public var has64BitEntry: Bool { extendedLoadFlags & LinuxLoader.xlfKernel64 != 0 }
  /// XLF_CAN_BE_LOADED_ABOVE_4G: the kernel, boot_params, command line and initrd may be above 4 GiB.
  public var canBeLoadedAbove4G: Bool { extendedLoadFlags & LinuxLoader.xlfCanBeLoadedAbove4G != 0 }
}

/// Loads Linux bzImages through the 64-bit boot protocol (boot.rst, "64-bit Boot Protocol"), or
/// the 32-bit one ("32-bit Boot Protocol") for kernels without a 64-bit entry (32-bit kernels).
///
/// The protected-mode kernel (file bytes from (setup_sects + 1) * 512) goes to pref_address, or,
/// when that does not fit and the kernel is relocatable, to the lowest kernel_alignment-aligned
/// address at or above 1 MiB that does. `struct boot_params` is built at 0x7000 with the setup
/// header copied from the file, type_of_loader 0xFF, the command line at 0x20000, the initrd
/// at the highest page-aligned place below min(initrd_addr_max + 1, end of low RAM) clear of
/// the kernel (above 4 GiB via ext_ramdisk_* when low RAM is too small and the kernel allows
/// it), and the e820 map. The CPU starts in long mode at load address + 0x200 with RSI = 0x7000;
/// a kernel without XLF_KERNEL_64 starts in 32-bit protected mode with paging off at the load
/// address (code32_start), with flat __BOOT_CS (0x10) and __BOOT_DS (0x18) segments, ESI =
/// 0x7000 and EBP = EDI = EBX = 0, as the 32-bit protocol asks.
/// CAN_USE_HEAP stays clear: the real-mode setup code, the only user of the heap, never runs;
/// handover_offset (the EFI handover protocol) is unused, as there is no EFI firmware.
public enum LinuxLoader {
  static let headerMagicOffset: UInt64 = 0x202
  /// "HdrS", little-endian.
  static let headerMagic: UInt32 = 0x5372_6448
  public static let minimumVersion: UInt16 = 0x020C
  /// loadflags bit 7: heap_end_ptr is valid.
  static let canUseHeap: UInt8 = 1 << 7
  static let xlfKernel64: UInt16 = 1 << 0
  static let xlfCanBeLoadedAbove4G: UInt16 = 1 << 1
  /// Offset of the 64-bit entry point from the load address.
  public static let entryOffset64: UInt64 = 0x200
  /// The boot protocol's __BOOT_CS and __BOOT_DS selectors.
  static let bootCodeSelector: UInt16 = 0x10
  static let bootDataSelector: UInt16 = 0x18
  /// type_of_loader for a boot loader without an assigned ID.
  public static let undefinedLoaderType: UInt8 = 0xFF
  /// E820_MAX_ENTRIES_ZEROPAGE.
  public static let maximumE820Entries = 128

  /// Offsets in `struct boot_params` (arch/x86/include/uapi/asm/bootparam.h, boot.rst).
  public enum Offset {
    public static let extRamdiskImage: UInt64 = 0x0C0
    public static let extRamdiskSize: UInt64 = 0x0C4
    public static let extCmdLinePtr: UInt64 = 0x0C8
    public static let e820Entries: UInt64 = 0x1E8
    public static let setupSects: UInt64 = 0x1F1
    public static let syssize: UInt64 = 0x1F4
    public static let bootFlag: UInt64 = 0x1FE
    public static let jump: UInt64 = 0x200
    public static let header: UInt64 = 0x202
    public static let version: UInt64 = 0x206
    public static let typeOfLoader: UInt64 = 0x210
    public static let loadFlags: UInt64 = 0x211
    public static let code32Start: UInt64 = 0x214
    public static let ramdiskImage: UInt64 = 0x218
    public static let ramdiskSize: UInt64 = 0x21C
    public static let heapEndPtr: UInt64 = 0x224
    public static let extLoaderVer: UInt64 = 0x226
    public static let extLoaderType: UInt64 = 0x227
    public static let cmdLinePtr: UInt64 = 0x228
    public static let initrdAddrMax: UInt64 = 0x22C
    public static let kernelAlignment: UInt64 = 0x230
    public static let relocatableKernel: UInt64 = 0x234
    public static let minAlignment: UInt64 = 0x235
    public static let xloadflags: UInt64 = 0x236
    public static let cmdlineSize: UInt64 = 0x238
    public static let hardwareSubarch: UInt64 = 0x23C
    public static let hardwareSubarchData: UInt64 = 0x240
    public static let setupData: UInt64 = 0x250
    public static let prefAddress: UInt64 = 0x258
    public static let initSize: UInt64 = 0x260
    public static let e820Table: UInt64 = 0x2D0
  }

  /// Parses and validates the setup header of a bzImage.
  public static func parseHeader(_ bytes: [UInt8], path: String = "kernel") throws(LoaderError) -> LinuxSetupHeader {
    try parseHeader(ImageBytes(bytes: bytes, path: path))
  }

  static func parseHeader(_ image: ImageBytes) throws(LoaderError) -> LinuxSetupHeader {
    func malformed(_ reason: String) -> LoaderError {
      .malformed(path: image.path, format: "Linux bzImage", reason: reason)
    }
    guard image.u32(Offset.header) == headerMagic else { throw malformed("no \"HdrS\" signature at 0x202") }
    guard let bootFlag = image.u16(Offset.bootFlag), bootFlag == 0xAA55 else {
      throw malformed("boot_flag at 0x1FE is not 0xAA55")
    }
    guard let version = image.u16(Offset.version) else {
      throw malformed("it is truncated: the setup header is cut at \(hex(image.count))")
    }
    guard version >= minimumVersion else {
      throw .unsupported(
        path: image.path,
        reason:
          "it uses Linux boot protocol \(version >> 8).\(version & 0xFF); Hostvisor needs 2.12 or later")
    }
    let headerEnd = 0x202 + UInt64(image.u8(Offset.jump + 1)!)
    // Version 2.12 defines fields up to init_size/handover_offset (ending at 0x268).
    guard headerEnd >= 0x268 else {
      throw malformed("the setup header ends at \(hex(headerEnd)); protocol 2.12 defines fields up to 0x268")
    }
    guard image.range(Offset.setupSects, headerEnd - Offset.setupSects) != nil else {
      throw malformed(
        "it is truncated: the setup header ends at \(hex(headerEnd)) but the file has \(image.count) bytes")
    }
    let storedSectors = UInt64(image.u8(Offset.setupSects)!)
    var header = LinuxSetupHeader(
      setupSectors: storedSectors == 0 ? 4 : storedSectors, bootFlag: bootFlag, version: version,
      loadFlags: image.u8(Offset.loadFlags)!, initrdAddressMax: image.u32(Offset.initrdAddrMax)!,
      kernelAlignment: image.u32(Offset.kernelAlignment)!, relocatable: image.u8(Offset.relocatableKernel)! != 0,
      minimumAlignmentShift: image.u8(Offset.minAlignment)!, extendedLoadFlags: image.u16(Offset.xloadflags)!,
      commandLineSize: image.u32(Offset.cmdlineSize)!, preferredAddress: image.u64(Offset.prefAddress)!,
      initSize: image.u32(Offset.initSize)!, headerEnd: headerEnd)
    if header.initrdAddressMax == 0 { header.initrdAddressMax = 0x37FF_FFFF }
    if header.commandLineSize == 0 { header.commandLineSize = 255 }
    guard header.kernelOffset < UInt64(image.count) else {
      throw malformed(
        "it is truncated: the protected-mode kernel starts at \(hex(header.kernelOffset)) but the file has \(image.count) bytes"
      )
    }
    return header
  }

  /// The alignment the kernel accepts: kernel_alignment, else 2^min_alignment, else 2 MiB.
  static func alignment(of header: LinuxSetupHeader) -> UInt64 {
    let preferred = UInt64(header.kernelAlignment)
    if preferred >= 0x1000, preferred.nonzeroBitCount == 1 { return preferred }
    if header.minimumAlignmentShift >= 12, header.minimumAlignmentShift < 32 {
      return 1 << UInt64(header.minimumAlignmentShift)
    }
    return 0x20_0000
  }

  static func load(
    _ image: ImageBytes, initrd: ImageBytes?, commandLine: String, memory: GuestMemory, memoryMap: [E820Entry]
  ) throws(LoaderError) -> BootImage {
    let header = try parseHeader(image)
    var warnings: [String] = []
    let kernelFileRange = Int(header.kernelOffset)..<image.count
    let kernelFileSize = UInt64(kernelFileRange.count)
    let footprint = max(UInt64(header.initSize), kernelFileSize)

    // Where the protected-mode kernel goes.
    let lowRAMEnd = memory.regions.first.map { $0.guestBase == 0 ? $0.guestEnd : 0 } ?? 0
    func fits(_ address: UInt64) -> Bool {
      address >= BootLayout.kernelMinimumAddress && address <= UInt64.max - footprint
        && address + footprint <= lowRAMEnd
    }
    var loadAddress = header.preferredAddress
    if !fits(loadAddress) {
      let alignment = alignment(of: header)
      let relocated = (BootLayout.kernelMinimumAddress + alignment - 1) & ~(alignment - 1)
      guard header.relocatable, fits(relocated) else {
        throw .segmentOutsideRAM(address: header.preferredAddress, length: footprint)
      }
      loadAddress = relocated
      warnings.append(
        "the kernel does not fit at its preferred address \(hex(header.preferredAddress)); loaded at \(hex(loadAddress))"
      )
    }
    try memory.load(image.bytes, kernelFileRange, at: loadAddress)
    // The decompressor works at max(load address, pref_address) for init_size bytes (a
    // relocatable kernel moves up to its LOAD_PHYSICAL_ADDR); keep the initrd clear of it all.
    let kernelRange = loadAddress..<(max(loadAddress, header.preferredAddress) + footprint)

    // boot_params: zeroed, then the setup header copied from the file as the protocol says.
    let bootParams = BootLayout.bootParamsAddress
    try memory.zero(at: bootParams, length: BootLayout.bootParamsSize)
    let headerRange = image.range(Offset.setupSects, header.headerEnd - Offset.setupSects)!
    try memory.load(image.bytes, headerRange, at: bootParams + Offset.setupSects)
    try memory.put(undefinedLoaderType, at: bootParams + Offset.typeOfLoader)
    // Fields the protocol marks "write" (the loader's to fill) start clean, whatever the file
    // holds: no heap (the setup code does not run), no extended loader type, a PC subarchitecture
    // and no setup_data list.
    try memory.put(UInt16(0), at: bootParams + Offset.heapEndPtr)
    try memory.put(UInt16(0), at: bootParams + Offset.extLoaderVer)
    try memory.put(UInt32(0), at: bootParams + Offset.hardwareSubarch)
    try memory.put(UInt64(0), at: bootParams + Offset.hardwareSubarchData)
    try memory.put(UInt64(0), at: bootParams + Offset.setupData)
    try memory.put(header.loadFlags & ~canUseHeap, at: bootParams + Offset.loadFlags)
    try memory.put(UInt32(truncatingIfNeeded: loadAddress), at: bootParams + Offset.code32Start)

    // Command line, truncated to cmdline_size bytes and NUL-terminated.
    var line = KernelLoader.commandLineBytes(commandLine)
    let limit = Int(min(UInt64(header.commandLineSize), BootLayout.commandLineAreaSize - 1))
    if line.count > limit {
      warnings.append("the command line is \(line.count) bytes; the kernel accepts \(limit), the rest is dropped")
      line = Array(line.prefix(limit))
    }
    line.append(0)
    try memory.load(line, 0..<line.count, at: BootLayout.commandLineAddress)
    try memory.put(UInt32(BootLayout.commandLineAddress), at: bootParams + Offset.cmdLinePtr)

    // Initrd.
    var initrdRange: Range<UInt64>? = nil
    if let initrd {
      let placed = try placeInitrd(
        size: UInt64(initrd.count), name: initrd.path, header: header, kernel: kernelRange, memory: memory)
      try memory.load(initrd.bytes, 0..<initrd.count, at: placed.lowerBound)
      try memory.put(UInt32(truncatingIfNeeded: placed.lowerBound), at: bootParams + Offset.ramdiskImage)
      try memory.put(UInt32(truncatingIfNeeded: placed.count), at: bootParams + Offset.ramdiskSize)
      try memory.put(UInt32(truncatingIfNeeded: placed.lowerBound >> 32), at: bootParams + Offset.extRamdiskImage)
      try memory.put(UInt32(truncatingIfNeeded: UInt64(placed.count) >> 32), at: bootParams + Offset.extRamdiskSize)
      initrdRange = placed
    }

    // e820 table.
    guard memoryMap.count <= maximumE820Entries else {
      throw .tooManyMemoryMapEntries(count: memoryMap.count, limit: maximumE820Entries)
    }
    try memory.put(UInt8(memoryMap.count), at: bootParams + Offset.e820Entries)
    for (index, entry) in memoryMap.enumerated() {
      let slot = bootParams + Offset.e820Table + UInt64(index) * 20
      try memory.put(entry.address, at: slot)
      try memory.put(entry.size, at: slot + 8)
      try memory.put(entry.type.rawValue, at: slot + 16)
    }

    let entry: UInt64
    var state: X86CPUState
    if header.has64BitEntry {
      entry = loadAddress + entryOffset64
      state = try BootCPUSetup.longMode64(memory: memory, entry: entry, stackPointer: BootLayout.bootStackTop)
    } else {
      guard loadAddress + footprint <= 1 << 32 else {
        throw .segmentOutsideRAM(address: loadAddress, length: footprint)
      }
      entry = loadAddress
      state = try BootCPUSetup.protectedMode32(
        memory: memory, entry: entry, stackPointer: BootLayout.bootStackTop, codeSelector: bootCodeSelector,
        dataSelector: bootDataSelector)
    }
    state.rsi = bootParams
    return BootImage(
      state: state, format: .linuxBzImage, entry: entry, kernelRange: kernelRange, initrdRange: initrdRange,
      commandLineAddress: BootLayout.commandLineAddress, bootParamsAddress: bootParams, multibootInfoAddress: nil,
      memoryMap: memoryMap, warnings: warnings)
  }

  /// The highest page-aligned range of `size` bytes that lies in RAM, ends at or below
  /// min(initrd_addr_max + 1, end of low RAM) and stays clear of the kernel; above 4 GiB (at the
  /// top of high RAM) only when that fails and the kernel sets XLF_CAN_BE_LOADED_ABOVE_4G.
  static func placeInitrd(
    size: UInt64, name: String, header: LinuxSetupHeader, kernel: Range<UInt64>, memory: GuestMemory
  ) throws(LoaderError) -> Range<UInt64> {
    let ceiling = UInt64(header.initrdAddressMax) + 1
    let floor = BootLayout.kernelMinimumAddress
    func highestFit(in region: GuestMemory.Region, below top: UInt64, above bottom: UInt64) -> Range<UInt64>? {
      let end = min(top, region.guestEnd)
      let start = max(bottom, region.guestBase)
      guard end > start, size <= end - start else { return nil }
      let address = (end - size) & ~UInt64(0xFFF)
      guard address >= start else { return nil }
      return address..<(address + size)
    }
    for region in memory.regions.reversed() where region.guestBase < ceiling {
      // Above the kernel first (the usual place), then between 1 MiB and the kernel.
      if let range = highestFit(in: region, below: ceiling, above: max(floor, kernel.upperBound)) { return range }
      if let range = highestFit(in: region, below: min(ceiling, kernel.lowerBound), above: floor) { return range }
    }
    if header.canBeLoadedAbove4G {
      for region in memory.regions.reversed() where region.guestBase >= GuestMemory.highMemoryBase {
        if let range = highestFit(in: region, below: UInt64.max, above: region.guestBase) { return range }
      }
    }
    throw .initrdTooBig(path: name, size: size, limit: min(ceiling, memory.regions.first?.guestEnd ?? 0))
  }
}
