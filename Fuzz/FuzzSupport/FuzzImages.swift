/// Small guest images the fuzz targets build machines with.
public enum FuzzImages {
  /// An ELF64 x86-64 kernel of one loadable segment at 1 MiB whose entry point is HLT: enough
  /// for `KernelLoader` and a machine that never runs far.
  public static let haltingELFKernel: [UInt8] = {
    var elf = [UInt8](repeating: 0, count: 64 + 56 + 16)
    func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
      for index in 0..<(T.bitWidth / 8) { elf[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
    }
    elf.replaceSubrange(0..<7, with: [0x7F, 0x45, 0x4C, 0x46, 2, 1, 1])
    put(UInt16(2), at: 16)
    put(UInt16(0x3E), at: 18)
    put(UInt32(1), at: 20)
    put(UInt64(0x10_0000), at: 24)
    put(UInt64(64), at: 32)
    put(UInt16(64), at: 52)
    put(UInt16(56), at: 54)
    put(UInt16(1), at: 56)
    put(UInt32(1), at: 64)
    put(UInt32(5), at: 68)
    put(UInt64(120), at: 72)
    put(UInt64(0x10_0000), at: 80)
    put(UInt64(0x10_0000), at: 88)
    put(UInt64(16), at: 96)
    put(UInt64(0x1000), at: 104)
    elf[120] = 0xF4
    return elf
  }()
}
