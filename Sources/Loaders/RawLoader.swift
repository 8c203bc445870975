import VMCore

/// Loads a flat binary, byte for byte, at a caller-chosen guest-physical address: the format
/// for test programs and firmware-less experiments.
///
/// The CPU starts in 64-bit long mode with the boot identity map of the first 4 GiB (CR3 =
/// 0x9000, 2 MiB pages), CS 0x10 (64-bit code), DS/ES/FS/GS/SS 0x18 (GDT at 0x500), interrupts
/// off, RIP = the load address and RSP = the load address rounded down to 16, so the stack grows
/// down just below the code. The image may not overlap the GDT (0x500-0x520) or the page tables
/// (0x9000-0xF000), and must start below 4 GiB. There is no protocol for a command line
/// (ignored with a warning) or an initrd (refused).
public enum RawLoader {
  static func load(
    _ image: ImageBytes, initrd: ImageBytes?, commandLine: String, at address: UInt64, memory: GuestMemory,
    memoryMap: [E820Entry]
  ) throws(LoaderError) -> BootImage {
    if initrd != nil {
      throw .unsupported(path: image.path, reason: "a raw binary has no boot protocol to receive an initrd")
    }
    let size = UInt64(image.count)
    guard address <= UInt64.max - size, memory.contains(address, length: size) else {
      throw .segmentOutsideRAM(address: address, length: size)
    }
    guard address < BootLayout.identityMapSize else {
      throw .unsupported(
        path: image.path, reason: "its load address \(hex(address)) lies above the 4 GiB the boot page tables map")
    }
    try BootLayout.checkNoOverlap(address: address, length: size, with: [BootLayout.gdt, BootLayout.pageTables])
    try memory.load(image.bytes, 0..<image.count, at: address)
    let state = try BootCPUSetup.longMode64(memory: memory, entry: address, stackPointer: address & ~0xF)
    var warnings: [String] = []
    if !commandLine.isEmpty {
      warnings.append("the command line is ignored: a raw binary has no boot protocol to receive it")
    }
    return BootImage(
      state: state, format: .raw, entry: address, kernelRange: address..<(address + size), initrdRange: nil,
      commandLineAddress: nil, bootParamsAddress: nil, multibootInfoAddress: nil, memoryMap: memoryMap,
      warnings: warnings)
  }
}
