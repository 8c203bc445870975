import VMCore

/// The `screen_info` block at the start of the Linux boot_params ("zero page"), filled in as
/// EFI firmware's boot stub leaves it for a linear framebuffer (`VIDEO_TYPE_EFI`), so that the
/// kernel registers an "efi-framebuffer" device and efifb drives it (Linux boot protocol,
/// Documentation/arch/x86/zero-page.rst; include/uapi/linux/screen_info.h).
public struct LinuxScreenInfo: Sendable, Equatable {
  /// `orig_video_isVGA` for a framebuffer handed over by EFI firmware.
  public static let videoTypeEFI: UInt8 = 0x70

  /// Guest-physical address of the first pixel (below 4 GiB).
  public var base: UInt64
  /// Bytes of framebuffer memory.
  public var size: UInt64
  /// Visible width and height in pixels.
  public var width: Int
  public var height: Int
  /// Bytes per row.
  public var lineLength: Int

  public init(base: UInt64, size: UInt64, width: Int, height: Int, lineLength: Int) {
    self.base = base
    self.size = size
    self.width = width
    self.height = height
    self.lineLength = lineLength
  }

  /// The 64 bytes of `struct screen_info` for a 32-bit XRGB8888 framebuffer (8 bits each of
  /// red at bit 16, green at bit 8, blue at bit 0, the top byte reserved).
  public var bytes: [UInt8] {
    var info = [UInt8](repeating: 0, count: 0x40)
    func put(_ value: UInt64, at offset: Int, size: Int) {
      for index in 0..<size { info[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
    }
    put(UInt64(Self.videoTypeEFI), at: 0x0F, size: 1)  // orig_video_isVGA
    put(UInt64(width), at: 0x12, size: 2)  // lfb_width
    put(UInt64(height), at: 0x14, size: 2)  // lfb_height
    put(32, at: 0x16, size: 2)  // lfb_depth
    put(base & 0xFFFF_FFFF, at: 0x18, size: 4)  // lfb_base
    put(size, at: 0x1C, size: 4)  // lfb_size (bytes for EFI framebuffers)
    put(UInt64(lineLength), at: 0x24, size: 2)  // lfb_linelength
    for (offset, value) in [(0x26, 8), (0x27, 16), (0x28, 8), (0x29, 8), (0x2A, 8), (0x2B, 0), (0x2C, 8), (0x2D, 24)] {
      put(UInt64(value), at: offset, size: 1)  // red/green/blue/reserved size and position
    }
    put(1, at: 0x32, size: 2)  // pages
    if base > 0xFFFF_FFFF {
      put(2, at: 0x36, size: 4)  // capabilities: VIDEO_CAPABILITY_64BIT_BASE
      put(base >> 32, at: 0x3A, size: 4)  // ext_lfb_base
    }
    return info
  }

  /// Writes the block into the boot_params at `bootParamsAddress`.
  public func write(into memory: GuestMemory, bootParamsAddress: UInt64) throws(GuestMemoryError) {
    try memory.writeBytes(bytes, at: bootParamsAddress)
  }
}
