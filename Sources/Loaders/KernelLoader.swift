import VMCore

/// The kernel image formats Hostvisor boots.
public enum KernelFormat: String, Sendable, Equatable, CustomStringConvertible {
  /// A Linux bzImage, entered through the 64-bit boot protocol (version 2.12 or later).
  case linuxBzImage
  /// An x86-64 ELF executable, entered in long mode.
  case elf64
  /// An i386 ELF executable, entered in 32-bit protected mode.
  case elf32
  /// A Multiboot (version 1) kernel, ELF or a.out-kludge, entered as the specification says.
  case multiboot
  /// A flat binary loaded at a caller-chosen address.
  case raw

  public var description: String {
    switch self {
    case .linuxBzImage: return "Linux bzImage"
    case .elf64: return "ELF64"
    case .elf32: return "ELF32"
    case .multiboot: return "Multiboot"
    case .raw: return "raw binary"
    }
  }
}

/// A kernel placed in guest memory, with the CPU state to start the bootstrap processor in.
public struct BootImage: Sendable {
  /// The bootstrap processor's initial state.
  public var state: X86CPUState
  /// The format that was detected (or `.raw` when a raw load address was given).
  public var format: KernelFormat
  /// The guest-physical entry point (also `state.rip`).
  public var entry: UInt64
  /// Guest-physical memory the kernel occupies, bss and (for Linux) init_size included.
  public var kernelRange: Range<UInt64>
  /// Where the initrd (Linux) or first module (Multiboot) was placed.
  public var initrdRange: Range<UInt64>?
  /// Where the NUL-terminated command line was written, when the format takes one.
  public var commandLineAddress: UInt64?
  /// Linux: the address of `struct boot_params` (also in RSI).
  public var bootParamsAddress: UInt64?
  /// Multiboot: the address of the Multiboot information structure (also in EBX).
  public var multibootInfoAddress: UInt64?
  /// The memory map reported to the kernel (Linux e820 table, Multiboot mmap).
  public var memoryMap: [E820Entry]
  /// Things the user may want to know (e.g. a truncated or ignored command line).
  public var warnings: [String]
}

/// Detects a kernel's format and loads it into guest memory.
public enum KernelLoader {
  /// How far into the file a Multiboot header may start (specification §3.1.1).
  public static let multibootSearchLength = 8192

  /// Loads the kernel at `kernelPath` (and `initrdPath`, if any) into `memory`.
  ///
  /// Detection, in order: a `rawLoadAddress` forces a raw binary; a valid Multiboot v1 header in
  /// the first 8 KiB (taking precedence over ELF, as QEMU's `-kernel` does); a Linux bzImage
  /// ("HdrS" at 0x202); an ELF64 or ELF32 executable. Anything else is `LoaderError.notAKernel`.
  ///
  /// - Parameters:
  ///   - commandLine: the kernel command line (Linux, Multiboot); ignored with a warning by
  ///     formats without one.
  ///   - rawLoadAddress: load the file as a flat binary here; see `RawLoader`.
  ///   - reservedMemory: ranges the machine uses itself (e.g. ACPI tables), reported in the
  ///     memory map instead of the RAM they overlap.
  public static func load(
    kernelPath: String, initrdPath: String?, commandLine: String, memory: GuestMemory,
    rawLoadAddress: UInt64? = nil, reservedMemory: [E820Entry] = []
  ) throws(LoaderError) -> BootImage {
    let kernel: [UInt8]
    switch HostFile.read(path: kernelPath, limit: memory.totalSize) {
    case .success(let bytes): kernel = bytes
    case .failure(.system(let code)):
      throw .cannotReadKernel(path: kernelPath, reason: HostFile.message(for: code))
    case .failure(.tooLarge(let size)):
      throw .fileTooLarge(kind: "kernel", path: kernelPath, size: size, ramSize: memory.totalSize)
    }
    var initrd: [UInt8]? = nil
    if let initrdPath {
      switch HostFile.read(path: initrdPath, limit: memory.totalSize) {
      case .success(let bytes): initrd = bytes
      case .failure(.system(let code)):
        throw .cannotReadInitrd(path: initrdPath, reason: HostFile.message(for: code))
      case .failure(.tooLarge(let size)):
        throw .fileTooLarge(kind: "initrd", path: initrdPath, size: size, ramSize: memory.totalSize)
      }
    }
    return try load(
      kernel: kernel, kernelName: kernelPath, initrd: initrd, initrdName: initrdPath ?? "", commandLine: commandLine,
      memory: memory, rawLoadAddress: rawLoadAddress, reservedMemory: reservedMemory)
  }

  /// Loads a kernel already in host memory; `kernelName` and `initrdName` appear in messages
  /// (and, for Multiboot, in the command line and module string).
  public static func load(
    kernel: [UInt8], kernelName: String, initrd: [UInt8]?, initrdName: String = "initrd", commandLine: String,
    memory: GuestMemory, rawLoadAddress: UInt64? = nil, reservedMemory: [E820Entry] = []
  ) throws(LoaderError) -> BootImage {
    let image = ImageBytes(bytes: kernel, path: kernelName)
    let initrdImage = initrd.map { ImageBytes(bytes: $0, path: initrdName) }
    let memoryMap = E820Map.build(for: memory, reserved: reservedMemory)
    guard !kernel.isEmpty else { throw .emptyKernel(path: kernelName) }
    if let rawLoadAddress {
      return try RawLoader.load(
        image, initrd: initrdImage, commandLine: commandLine, at: rawLoadAddress, memory: memory,
        memoryMap: memoryMap)
    }
    switch detect(image) {
    case .multiboot(let headerOffset):
      return try MultibootLoader.load(
        image, headerOffset: headerOffset, initrd: initrdImage, commandLine: commandLine, memory: memory,
        memoryMap: memoryMap)
    case .linux:
      return try LinuxLoader.load(
        image, initrd: initrdImage, commandLine: commandLine, memory: memory, memoryMap: memoryMap)
    case .elf:
      return try ELFLoader.load(
        image, initrd: initrdImage, commandLine: commandLine, memory: memory, memoryMap: memoryMap)
    case .multibootBadChecksum(let offset):
      throw .malformed(
        path: kernelName, format: "Multiboot",
        reason: "the header at offset \(hex(offset)) has a bad checksum (magic + flags + checksum must be 0)")
    case .unknown:
      throw .notAKernel(path: kernelName)
    }
  }

  /// The format of `bytes` as `load` would detect it, or `nil` for an unrecognised file.
  public static func detectFormat(_ bytes: [UInt8]) -> KernelFormat? {
    let image = ImageBytes(bytes: bytes, path: "")
    switch detect(image) {
    case .multiboot: return .multiboot
    case .linux: return .linuxBzImage
    case .elf: return image.u8(4) == ELFImage.class64 ? .elf64 : .elf32
    case .multibootBadChecksum, .unknown: return nil
    }
  }

  enum Detection {
    case multiboot(headerOffset: UInt64)
    case linux
    case elf
    case multibootBadChecksum(offset: UInt64)
    case unknown
  }

  static func detect(_ image: ImageBytes) -> Detection {
    var badChecksum: UInt64? = nil
    let searchEnd = UInt64(min(image.count, multibootSearchLength))
    var offset: UInt64 = 0
    while offset + 12 <= searchEnd {
      if image.u32(offset) == MultibootLoader.headerMagic, let flags = image.u32(offset + 4),
        let checksum = image.u32(offset + 8)
      {
        if MultibootLoader.headerMagic &+ flags &+ checksum == 0 { return .multiboot(headerOffset: offset) }
        if badChecksum == nil { badChecksum = offset }
      }
      offset += 4
    }
    if image.u32(LinuxLoader.headerMagicOffset) == LinuxLoader.headerMagic { return .linux }
    if ELFImage.hasMagic(image) { return .elf }
    if let badChecksum { return .multibootBadChecksum(offset: badChecksum) }
    return .unknown
  }

  /// The command line as bytes: UTF-8, cut at the first NUL.
  static func commandLineBytes(_ commandLine: String) -> [UInt8] {
    Array(commandLine.utf8.prefix { $0 != 0 })
  }
}
