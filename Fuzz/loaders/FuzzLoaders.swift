import FuzzSupport
import Loaders
import VMCore

/// The kernel loaders (Linux bzImage, ELF64/ELF32, Multiboot v1, raw) on images the fuzzer
/// chooses: every outcome is a boot image inside guest RAM or a `LoaderError`.
///
/// Input: a flags byte (bit 0: an initrd, bit 1: a raw image at a fuzzer-chosen address, bit 2:
/// a reserved range in the memory map), the command line's length and bytes, the initrd's
/// length and bytes, the raw load address (with bit 1), then the kernel image.
@main
enum FuzzLoaders {
  static let ramSize: UInt64 = 32 << 20
  nonisolated(unsafe) static var memory: GuestMemory?

  static func main() {
    FuzzDriver.run(name: "loaders", seeds: seeds) { input in runOne(&input) }
  }

  static func runOne(_ input: inout FuzzInput) {
    let memory = Self.memory ?? (try! GuestMemory(size: ramSize))
    Self.memory = memory
    let flags = input.byte()
    let commandLine = String(decoding: input.bytes(Int(input.byte())), as: UTF8.self)
    let initrd = flags & 1 != 0 ? input.bytes(Int(input.integer(UInt16.self) % 4096)) : nil
    let rawAddress = flags & 2 != 0 ? UInt64(input.integer(UInt32.self)) : nil
    let reserved =
      flags & 4 != 0
      ? [
        E820Entry(
          address: UInt64(input.integer(UInt32.self)), size: UInt64(input.integer(UInt32.self)), type: .reserved)
      ] : []
    let kernel = input.rest()
    _ = KernelLoader.detectFormat(kernel)
    do {
      let image = try KernelLoader.load(
        kernel: kernel, kernelName: "fuzz", initrd: initrd, commandLine: commandLine, memory: memory,
        rawLoadAddress: rawAddress, reservedMemory: reserved)
      // What the loader reports lies in guest RAM.
      precondition(image.kernelRange.isEmpty || memory.hostPointer(image.kernelRange.lowerBound) != nil)
      if let range = image.initrdRange, !range.isEmpty {
        precondition(memory.hostPointer(range.lowerBound, length: UInt64(range.count)) != nil)
      }
      FuzzDriver.count("images loaded")
    } catch {
      _ = error.description
      FuzzDriver.count("images refused")
    }
  }

  static func put<T: FixedWidthInteger>(_ value: T, at offset: Int, in bytes: inout [UInt8]) {
    for index in 0..<(T.bitWidth / 8) { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
  }

  /// One small valid image per format (ELF64, ELF32, Multiboot a.out kludge, Multiboot ELF,
  /// bzImage), each behind the input prefix: initrd, command line "console=ttyS0".
  static func seeds() -> [[UInt8]] {
    var elf64 = [UInt8](repeating: 0, count: 64 + 56 + 16)
    elf64.replaceSubrange(0..<7, with: [0x7F, 0x45, 0x4C, 0x46, 2, 1, 1])
    put(UInt16(2), at: 16, in: &elf64)
    put(UInt16(0x3E), at: 18, in: &elf64)
    put(UInt32(1), at: 20, in: &elf64)
    put(UInt64(0x10_0000), at: 24, in: &elf64)
    put(UInt64(64), at: 32, in: &elf64)
    put(UInt16(64), at: 52, in: &elf64)
    put(UInt16(56), at: 54, in: &elf64)
    put(UInt16(1), at: 56, in: &elf64)
    put(UInt32(1), at: 64, in: &elf64)
    put(UInt32(5), at: 68, in: &elf64)
    put(UInt64(120), at: 72, in: &elf64)
    put(UInt64(0x10_0000), at: 80, in: &elf64)
    put(UInt64(0x10_0000), at: 88, in: &elf64)
    put(UInt64(16), at: 96, in: &elf64)
    put(UInt64(0x2000), at: 104, in: &elf64)
    elf64[120] = 0xF4

    var elf32 = [UInt8](repeating: 0, count: 52 + 32 + 16)
    elf32.replaceSubrange(0..<7, with: [0x7F, 0x45, 0x4C, 0x46, 1, 1, 1])
    put(UInt16(2), at: 16, in: &elf32)
    put(UInt16(3), at: 18, in: &elf32)
    put(UInt32(1), at: 20, in: &elf32)
    put(UInt32(0x10_0000), at: 24, in: &elf32)
    put(UInt32(52), at: 28, in: &elf32)
    put(UInt16(52), at: 40, in: &elf32)
    put(UInt16(32), at: 42, in: &elf32)
    put(UInt16(1), at: 44, in: &elf32)
    put(UInt32(1), at: 52, in: &elf32)
    put(UInt32(84), at: 56, in: &elf32)
    put(UInt32(0x10_0000), at: 60, in: &elf32)
    put(UInt32(0x10_0000), at: 64, in: &elf32)
    put(UInt32(16), at: 68, in: &elf32)
    put(UInt32(0x100), at: 72, in: &elf32)
    put(UInt32(5), at: 76, in: &elf32)

    var aout = [UInt8](repeating: 0x90, count: 512)
    let aoutFlags: UInt32 = 0x0001_0003
    put(UInt32(0x1BAD_B002), at: 0, in: &aout)
    put(aoutFlags, at: 4, in: &aout)
    put(UInt32(0) &- (0x1BAD_B002 &+ aoutFlags), at: 8, in: &aout)
    put(UInt32(0x10_0000), at: 12, in: &aout)
    put(UInt32(0x10_0000), at: 16, in: &aout)
    put(UInt32(0x10_0200), at: 20, in: &aout)
    put(UInt32(0x10_4000), at: 24, in: &aout)
    put(UInt32(0x10_0020), at: 28, in: &aout)

    var elfMultiboot = elf32
    let elfFlags: UInt32 = 0x0000_0003
    var header = [UInt8](repeating: 0, count: 12)
    put(UInt32(0x1BAD_B002), at: 0, in: &header)
    put(elfFlags, at: 4, in: &header)
    put(UInt32(0) &- (0x1BAD_B002 &+ elfFlags), at: 8, in: &header)
    elfMultiboot += header

    // bzImage: one setup sector after the boot sector, protocol 2.15, 64-bit entry, a
    // protected-mode kernel of 4 KiB.
    var bzImage = [UInt8](repeating: 0, count: 1024 + 4096)
    bzImage[0x1F1] = 1
    put(UInt16(0xAA55), at: 0x1FE, in: &bzImage)
    put(UInt32(0x5372_6448), at: 0x202, in: &bzImage)
    put(UInt16(0x020F), at: 0x206, in: &bzImage)
    bzImage[0x211] = 0x01
    put(UInt32(0x10_0000), at: 0x214, in: &bzImage)
    put(UInt32(0x20_0000), at: 0x230, in: &bzImage)
    bzImage[0x234] = 1
    put(UInt16(0x0003), at: 0x236, in: &bzImage)
    put(UInt32(2048), at: 0x238, in: &bzImage)
    put(UInt64(0x100_0000), at: 0x258, in: &bzImage)
    put(UInt32(0x10_0000), at: 0x260, in: &bzImage)

    let commandLine = Array("console=ttyS0".utf8)
    let prefix: [UInt8] = [1, UInt8(commandLine.count)] + commandLine + [4, 0, 1, 2, 3, 4]
    return [elf64, elf32, aout, elfMultiboot, bzImage].map { prefix + $0 }
  }
}
