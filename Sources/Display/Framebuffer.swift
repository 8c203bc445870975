import VMCore

/// A linear framebuffer: 32-bit pixels (XRGB8888, blue in the lowest byte, as Linux's efifb is
/// told through screen_info), rows `stride` bytes apart, in host memory the guest maps like RAM
/// (a `GuestMemory` device region) so that its stores cost what stores to RAM cost.
///
/// Readers (screenshots, the VNC server) copy pixels without locking: the guest may be writing
/// at the same time, and a frame caught half-drawn is repaired by the next update.
public final class Framebuffer: @unchecked Sendable {
  /// Bytes per pixel.
  public static let bytesPerPixel = 4

  /// Visible width in pixels.
  public let width: Int
  /// Visible height in pixels.
  public let height: Int
  /// Bytes from one row to the next.
  public let stride: Int
  /// Guest-physical address of the first pixel.
  public let guestAddress: UInt64
  /// Bytes of device memory (a power of two, at least `stride * height`).
  public let size: Int
  private let pixels: UnsafeMutableRawPointer
  /// Keeps the mapping alive: `GuestMemory` owns it.
  private let memory: GuestMemory

  /// Maps a `width` x `height` framebuffer at guest-physical `guestAddress` in `memory` (call
  /// before the accelerator is created). `size` must be a power of two holding every row.
  public init(memory: GuestMemory, guestAddress: UInt64, width: Int, height: Int, size: Int) throws(GuestMemoryError) {
    precondition(width > 0 && height > 0 && size.nonzeroBitCount == 1 && size >= width * height * Self.bytesPerPixel)
    let region = try memory.mapDeviceMemory(at: guestAddress, size: UInt64(size))
    self.width = width
    self.height = height
    self.stride = width * Self.bytesPerPixel
    self.guestAddress = guestAddress
    self.size = size
    self.pixels = region.host
    self.memory = memory
  }

  /// The smallest power-of-two size that holds a `width` x `height` framebuffer.
  public static func memorySize(width: Int, height: Int) -> Int {
    var size = 1 << 16
    while size < width * height * bytesPerPixel { size <<= 1 }
    return size
  }

  /// Row `y` (0-based) of the visible image: `width * 4` bytes.
  public func row(_ y: Int) -> UnsafeRawBufferPointer {
    precondition(y >= 0 && y < height)
    return UnsafeRawBufferPointer(start: pixels + y * stride, count: width * Self.bytesPerPixel)
  }

  /// A copy of the visible image, rows packed (`width * 4` bytes each).
  public func copyImage() -> [UInt8] {
    let rowBytes = width * Self.bytesPerPixel
    return [UInt8](unsafeUninitializedCapacity: rowBytes * height) { buffer, count in
      for y in 0..<height {
        (buffer.baseAddress! + y * rowBytes).initialize(
          from: (pixels + y * stride).assumingMemoryBound(to: UInt8.self), count: rowBytes)
      }
      count = rowBytes * height
    }
  }

  /// Reads `size` (1-8) bytes at `offset` (0 outside the memory): the BAR's MMIO path, used
  /// only when the guest moved the BAR away from where the memory is mapped.
  func read(offset: UInt64, size: Int) -> UInt64 {
    guard size >= 1 && size <= 8, offset <= UInt64(self.size - size) else { return 0 }
    var value: UInt64 = 0
    for index in 0..<size {
      value |= UInt64(pixels.load(fromByteOffset: Int(offset) + index, as: UInt8.self)) << (8 * index)
    }
    return value
  }

  /// Writes the low `size` (1-8) bytes of `value` at `offset` (ignored outside the memory).
  func write(offset: UInt64, size: Int, value: UInt64) {
    guard size >= 1 && size <= 8, offset <= UInt64(self.size - size) else { return }
    for index in 0..<size {
      pixels.storeBytes(
        of: UInt8(truncatingIfNeeded: value >> (8 * index)), toByteOffset: Int(offset) + index, as: UInt8.self)
    }
  }
}
