import Glibc
import VMCore

/// A file's bytes with bounds-checked little-endian reads. Every offset or length that comes
/// from the file goes through `range(_:_:)` or a reader here, so a hostile header can only
/// produce `nil`, never an out-of-bounds access.
struct ImageBytes {
  let bytes: [UInt8]
  /// The file name used in error messages.
  let path: String

  var count: Int { bytes.count }

  /// `[offset, offset + length)` as array indices when it lies entirely inside the file.
  func range(_ offset: UInt64, _ length: UInt64) -> Range<Int>? {
    let size = UInt64(bytes.count)
    guard offset <= size, length <= size - offset else { return nil }
    return Int(offset)..<Int(offset + length)
  }

  /// A little-endian unsigned integer at `offset`, or `nil` when it would read past the end.
  func read<T: FixedWidthInteger & UnsignedInteger>(_: T.Type, at offset: UInt64) -> T? {
    guard let range = range(offset, UInt64(MemoryLayout<T>.size)) else { return nil }
    var value: T = 0
    for index in range.reversed() { value = (value << 8) | T(bytes[index]) }
    return value
  }

  func u8(_ offset: UInt64) -> UInt8? { read(UInt8.self, at: offset) }
  func u16(_ offset: UInt64) -> UInt16? { read(UInt16.self, at: offset) }
  func u32(_ offset: UInt64) -> UInt32? { read(UInt32.self, at: offset) }
  func u64(_ offset: UInt64) -> UInt64? { read(UInt64.self, at: offset) }
}

/// Reads whole files with plain system calls (no Foundation in the loaders).
enum HostFile {
  enum Failure: Error {
    /// `open` or `read` failed with this errno.
    case system(Int32)
    /// The file holds more than the allowed number of bytes (`size` is what was seen so far).
    case tooLarge(size: UInt64)
  }

  /// The contents of `path`, refusing files larger than `limit` bytes.
  static func read(path: String, limit: UInt64) -> Result<[UInt8], Failure> {
    let descriptor = open(path, O_RDONLY | O_CLOEXEC)
    guard descriptor >= 0 else { return .failure(.system(errno)) }
    defer { close(descriptor) }
    var info = stat()
    guard fstat(descriptor, &info) == 0 else { return .failure(.system(errno)) }
    if (info.st_mode & S_IFMT) == S_IFDIR { return .failure(.system(EISDIR)) }
    if (info.st_mode & S_IFMT) == S_IFREG, UInt64(info.st_size) > limit {
      return .failure(.tooLarge(size: UInt64(info.st_size)))
    }
    var contents: [UInt8] = []
    if (info.st_mode & S_IFMT) == S_IFREG { contents.reserveCapacity(Int(info.st_size)) }
    let chunkSize = 1 << 20
    var chunk = [UInt8](repeating: 0, count: chunkSize)
    while true {
      let count = chunk.withUnsafeMutableBytes { Glibc.read(descriptor, $0.baseAddress, chunkSize) }
      if count < 0 {
        if errno == EINTR { continue }
        return .failure(.system(errno))
      }
      if count == 0 { break }
      contents.append(contentsOf: chunk[0..<count])
      if UInt64(contents.count) > limit { return .failure(.tooLarge(size: UInt64(contents.count))) }
    }
    return .success(contents)
  }

  /// The system's text for `code`, e.g. "No such file or directory".
  static func message(for code: Int32) -> String {
    String(cString: strerror(code))
  }
}

/// Bounds-checked copies into guest memory that report failures as loader errors.
extension GuestMemory {
  /// Whether `[address, address + length)` lies inside one RAM region.
  func contains(_ address: UInt64, length: UInt64) -> Bool {
    if length == 0 { return region(containing: address) != nil }
    return hostPointer(address, length: length) != nil
  }

  /// Copies `bytes[range]` to `address`.
  func load(_ bytes: [UInt8], _ range: Range<Int>, at address: UInt64) throws(LoaderError) {
    guard !range.isEmpty else { return }
    guard let destination = hostPointer(address, length: UInt64(range.count)) else {
      throw .segmentOutsideRAM(address: address, length: UInt64(range.count))
    }
    bytes.withUnsafeBytes { source in
      destination.copyMemory(from: source.baseAddress! + range.lowerBound, byteCount: range.count)
    }
  }

  /// Zeroes `[address, address + length)`.
  func zero(at address: UInt64, length: UInt64) throws(LoaderError) {
    do {
      try fill(0, at: address, length: length)
    } catch {
      throw .segmentOutsideRAM(address: address, length: length)
    }
  }

  /// Writes a little-endian integer that the loader itself placed (its range was checked when
  /// the layout was chosen, so a failure here means the guest RAM is too small for it).
  func put<T: FixedWidthInteger>(_ value: T, at address: UInt64) throws(LoaderError) {
    do {
      try write(value, at: address)
    } catch {
      throw .segmentOutsideRAM(address: address, length: UInt64(MemoryLayout<T>.size))
    }
  }
}
