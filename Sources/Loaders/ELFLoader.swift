import VMCore

/// The parts of an ELF executable a loader needs, parsed with every field bounds-checked
/// (System V ABI, ELF-64 Object File Format).
struct ELFImage {
  static let class32: UInt8 = 1
  static let class64: UInt8 = 2
  static let machine386: UInt16 = 3
  static let machineX86_64: UInt16 = 62
  static let loadSegment: UInt32 = 1
  /// More program headers than this means the file is not a kernel we want to walk.
  static let maximumProgramHeaders = 4096

  /// One PT_LOAD segment.
  struct Segment {
    var fileOffset: UInt64
    var virtualAddress: UInt64
    var physicalAddress: UInt64
    var fileSize: UInt64
    var memorySize: UInt64
  }

  var is64: Bool
  var entry: UInt64
  var segments: [Segment]

  static func hasMagic(_ image: ImageBytes) -> Bool {
    image.u32(0) == 0x464C_457F
  }

  /// Parses the header and PT_LOAD program headers of `image`.
  static func parse(_ image: ImageBytes) throws(LoaderError) -> ELFImage {
    func malformed(_ reason: String) -> LoaderError {
      .malformed(path: image.path, format: "ELF", reason: reason)
    }
    guard hasMagic(image) else { throw malformed("missing the ELF magic") }
    guard let elfClass = image.u8(4), elfClass == class32 || elfClass == class64 else {
      throw malformed("unknown ELF class \(image.u8(4).map { String($0) } ?? "(truncated)")")
    }
    let is64 = elfClass == class64
    guard image.u8(5) == 1 else {
      throw .unsupported(path: image.path, reason: "it is a big-endian ELF file; x86 kernels are little-endian")
    }
    let headerSize: UInt64 = is64 ? 64 : 52
    guard image.range(0, headerSize) != nil else {
      throw malformed("the ELF header needs \(headerSize) bytes but the file has \(image.count)")
    }
    let machine = image.u16(18)!
    let expectedMachine = is64 ? machineX86_64 : machine386
    guard machine == expectedMachine else {
      throw .unsupported(
        path: image.path,
        reason:
          "it is an ELF\(is64 ? 64 : 32) file for machine \(machine), not \(is64 ? "x86-64 (62)" : "i386 (3)")")
    }
    let entry: UInt64
    let programHeaderOffset: UInt64
    let programHeaderSize: UInt64
    let programHeaderCount: Int
    if is64 {
      entry = image.u64(24)!
      programHeaderOffset = image.u64(32)!
      programHeaderSize = UInt64(image.u16(54)!)
      programHeaderCount = Int(image.u16(56)!)
    } else {
      entry = UInt64(image.u32(24)!)
      programHeaderOffset = UInt64(image.u32(28)!)
      programHeaderSize = UInt64(image.u16(42)!)
      programHeaderCount = Int(image.u16(44)!)
    }
    let minimumEntrySize: UInt64 = is64 ? 56 : 32
    guard programHeaderCount > 0 else { throw malformed("it has no program headers") }
    guard programHeaderCount <= maximumProgramHeaders else {
      throw malformed("it claims \(programHeaderCount) program headers")
    }
    guard programHeaderSize >= minimumEntrySize else {
      throw malformed("program header entries are \(programHeaderSize) bytes, less than \(minimumEntrySize)")
    }
    let tableSize = programHeaderSize * UInt64(programHeaderCount)
    guard image.range(programHeaderOffset, tableSize) != nil else {
      throw malformed(
        "the program header table at offset \(hex(programHeaderOffset)) (\(tableSize) bytes) lies past the end of the file (\(image.count) bytes)"
      )
    }
    var segments: [Segment] = []
    for index in 0..<UInt64(programHeaderCount) {
      let base = programHeaderOffset + index * programHeaderSize
      guard image.u32(base) == loadSegment else { continue }
      let segment: Segment
      if is64 {
        segment = Segment(
          fileOffset: image.u64(base + 8)!, virtualAddress: image.u64(base + 16)!,
          physicalAddress: image.u64(base + 24)!, fileSize: image.u64(base + 32)!, memorySize: image.u64(base + 40)!)
      } else {
        segment = Segment(
          fileOffset: UInt64(image.u32(base + 4)!), virtualAddress: UInt64(image.u32(base + 8)!),
          physicalAddress: UInt64(image.u32(base + 12)!), fileSize: UInt64(image.u32(base + 16)!),
          memorySize: UInt64(image.u32(base + 20)!))
      }
      guard segment.fileSize <= segment.memorySize else {
        throw malformed(
          "segment \(index) has p_filesz \(hex(segment.fileSize)) larger than p_memsz \(hex(segment.memorySize))")
      }
      guard image.range(segment.fileOffset, segment.fileSize) != nil else {
        throw malformed(
          "segment \(index) data at offset \(hex(segment.fileOffset)) (\(hex(segment.fileSize)) bytes) lies past the end of the file (\(image.count) bytes)"
        )
      }
      guard segment.physicalAddress <= UInt64.max - segment.memorySize else {
        throw .segmentOutsideRAM(address: segment.physicalAddress, length: segment.memorySize)
      }
      if segment.memorySize > 0 { segments.append(segment) }
    }
    guard !segments.isEmpty else { throw malformed("it has no loadable (PT_LOAD) segments") }
    return ELFImage(is64: is64, entry: entry, segments: segments)
  }

  /// The physical entry point: `e_entry` translated from virtual to physical when it lies in a
  /// segment whose p_vaddr differs from its p_paddr (kernels linked high, loaded low).
  var physicalEntry: UInt64 {
    for segment in segments
    where segment.virtualAddress != segment.physicalAddress && entry >= segment.virtualAddress
      && entry - segment.virtualAddress < segment.memorySize
    {
      return segment.physicalAddress + (entry - segment.virtualAddress)
    }
    return entry
  }

  /// Copies every PT_LOAD segment to its physical address and zeroes its bss, after checking
  /// all of them against RAM and `bootData`. Returns the lowest and highest addresses used.
  func loadSegments(
    from image: ImageBytes, into memory: GuestMemory, avoiding bootData: [BootLayout.Region]
  ) throws(LoaderError) -> Range<UInt64> {
    for segment in segments {
      guard memory.contains(segment.physicalAddress, length: segment.memorySize) else {
        throw .segmentOutsideRAM(address: segment.physicalAddress, length: segment.memorySize)
      }
      try BootLayout.checkNoOverlap(address: segment.physicalAddress, length: segment.memorySize, with: bootData)
    }
    var low = UInt64.max
    var high: UInt64 = 0
    for segment in segments {
      let fileRange = image.range(segment.fileOffset, segment.fileSize)!
      try memory.load(image.bytes, fileRange, at: segment.physicalAddress)
      try memory.zero(
        at: segment.physicalAddress + segment.fileSize, length: segment.memorySize - segment.fileSize)
      low = min(low, segment.physicalAddress)
      high = max(high, segment.physicalAddress + segment.memorySize)
    }
    return low..<high
  }
}

/// Loads plain (non-Multiboot) ELF executables: PT_LOAD segments at their physical addresses
/// (p_paddr), bss zeroed up to p_memsz. The entry point is e_entry, translated to physical when
/// it falls in a segment linked at a different virtual address.
///
/// - ELF64 (x86-64): 64-bit long mode with the boot identity map of the first 4 GiB, CS 0x10,
///   DS/ES/FS/GS/SS 0x18, RSP 0x8FF0; the entry must be below 4 GiB.
/// - ELF32 (i386): 32-bit flat protected mode, paging off, CS 0x08, data 0x10, ESP 0x8FF0.
///
/// There is no protocol to pass a command line or initrd; a command line is ignored with a
/// warning and an initrd is refused.
public enum ELFLoader {
  static func load(
    _ image: ImageBytes, initrd: ImageBytes?, commandLine: String, memory: GuestMemory, memoryMap: [E820Entry]
  ) throws(LoaderError) -> BootImage {
    let elf = try ELFImage.parse(image)
    if initrd != nil {
      throw .unsupported(
        path: image.path, reason: "it is a plain ELF kernel, which has no boot protocol to receive an initrd")
    }
    let entry = elf.physicalEntry
    let bootData: [BootLayout.Region] =
      elf.is64
      ? [BootLayout.gdt, BootLayout.bootStack, BootLayout.pageTables] : [BootLayout.gdt, BootLayout.bootStack]
    if elf.is64, entry >= BootLayout.identityMapSize {
      throw .unsupported(
        path: image.path, reason: "its entry point \(hex(entry)) lies above the 4 GiB the boot page tables map")
    }
    if !elf.is64, entry > 0xFFFF_FFFF {
      throw .malformed(path: image.path, format: "ELF", reason: "its entry point \(hex(entry)) is not a 32-bit address")
    }
    let used = try elf.loadSegments(from: image, into: memory, avoiding: bootData)
    let state =
      elf.is64
      ? try BootCPUSetup.longMode64(memory: memory, entry: entry, stackPointer: BootLayout.bootStackTop)
      : try BootCPUSetup.protectedMode32(memory: memory, entry: entry, stackPointer: BootLayout.bootStackTop)
    var warnings: [String] = []
    if !commandLine.isEmpty {
      warnings.append("the command line is ignored: a plain ELF kernel has no boot protocol to receive it")
    }
    return BootImage(
      state: state, format: elf.is64 ? .elf64 : .elf32, entry: entry, kernelRange: used, initrdRange: nil,
      commandLineAddress: nil, bootParamsAddress: nil, multibootInfoAddress: nil, memoryMap: memoryMap,
      warnings: warnings)
  }
}
