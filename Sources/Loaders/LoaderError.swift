/// Why a kernel could not be loaded: always one clear line for the user, never a crash.
/// Loaders parse untrusted files; every inconsistency becomes one of these values.
public enum LoaderError: Error, Equatable, Sendable, CustomStringConvertible {
  /// The kernel file could not be opened or read; `reason` is the system's explanation.
  case cannotReadKernel(path: String, reason: String)
  /// The initrd (or Multiboot module) could not be opened or read.
  case cannotReadInitrd(path: String, reason: String)
  /// The kernel file has no bytes.
  case emptyKernel(path: String)
  /// The file is none of the formats Hostvisor boots.
  case notAKernel(path: String)
  /// The file is recognisably `format` but its headers are inconsistent or truncated.
  case malformed(path: String, format: String, reason: String)
  /// The file is valid but asks for something Hostvisor does not do.
  case unsupported(path: String, reason: String)
  /// A part of the kernel image would land outside guest RAM.
  case segmentOutsideRAM(address: UInt64, length: UInt64)
  /// A part of the kernel image would overwrite data the loader places in guest memory.
  case segmentOverlapsBootData(address: UInt64, length: UInt64, region: String, regionStart: UInt64, regionEnd: UInt64)
  /// A file is larger than the guest's RAM.
  case fileTooLarge(kind: String, path: String, size: UInt64, ramSize: UInt64)
  /// The initrd does not fit where the boot protocol allows it.
  case initrdTooBig(path: String, size: UInt64, limit: UInt64)
  /// The command line does not fit in the space reserved for it.
  case commandLineTooLong(length: Int, limit: Int)
  /// The guest memory map has more entries than the boot protocol can pass.
  case tooManyMemoryMapEntries(count: Int, limit: Int)

  public var description: String {
    switch self {
    case .cannotReadKernel(let path, let reason):
      return "cannot read kernel '\(path)': \(reason)"
    case .cannotReadInitrd(let path, let reason):
      return "cannot read initrd '\(path)': \(reason)"
    case .emptyKernel(let path):
      return "'\(path)' is empty, not a kernel image"
    case .notAKernel(let path):
      return "'\(path)' is not a kernel image Hostvisor can boot (not bzImage, ELF or Multiboot)"
    case .malformed(let path, let format, let reason):
      return "'\(path)' is a malformed \(format) image: \(reason)"
    case .unsupported(let path, let reason):
      return "cannot boot '\(path)': \(reason)"
    case .segmentOutsideRAM(let address, let length):
      return "kernel segment at \(hex(address)) (\(hex(length)) bytes) does not fit in guest RAM"
    case .segmentOverlapsBootData(let address, let length, let region, let start, let end):
      return
        "kernel segment at \(hex(address)) (\(hex(length)) bytes) overlaps the \(region) Hostvisor places at \(hex(start))-\(hex(end))"
    case .fileTooLarge(let kind, let path, let size, let ramSize):
      return "\(kind) '\(path)' (\(size) bytes) is larger than guest RAM (\(ramSize) bytes)"
    case .initrdTooBig(let path, let size, let limit):
      return
        "initrd '\(path)' (\(size) bytes) does not fit in guest RAM below \(hex(limit)) next to the kernel; give the guest more memory"
    case .commandLineTooLong(let length, let limit):
      return "kernel command line is \(length) bytes; at most \(limit) fit"
    case .tooManyMemoryMapEntries(let count, let limit):
      return "guest memory map has \(count) entries; the boot protocol passes at most \(limit)"
    }
  }
}

/// `0x`-prefixed lowercase hexadecimal, as messages and logs print addresses.
func hex<T: BinaryInteger>(_ value: T) -> String {
  "0x" + String(value, radix: 16)
}
