import Foundation
import TestSupport
import Testing
import VMCore

@testable import Loaders

/// Paths and helpers shared by the loader tests.
enum TestSupport {
  /// The package root, found from this file's location (Tests/LoaderTests/TestSupport.swift).
  static let packageRoot: URL = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .deletingLastPathComponent().deletingLastPathComponent()

  /// The default guest (Debian cloud kernel + busybox initramfs), built by
  /// scripts/make-default-guest.sh when missing (`make test` builds it first).
  static let defaultGuest: Result<(kernel: String, initrd: String), TestFailure> = {
    let directory = packageRoot.appendingPathComponent(".cache/guest")
    let kernel = directory.appendingPathComponent("vmlinuz").path
    let initrd = directory.appendingPathComponent("initramfs.cpio.gz").path
    if !FileManager.default.fileExists(atPath: kernel) || !FileManager.default.fileExists(atPath: initrd) {
      let script = packageRoot.appendingPathComponent("scripts/make-default-guest.sh").path
      let result = run(script, [directory.path])
      guard result.status == 0 else {
        return .failure(TestFailure("scripts/make-default-guest.sh failed: \(result.output)"))
      }
    }
    return .success((kernel, initrd))
  }()

  struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
  }

  /// Runs a program, returning its exit status and combined output.
  @discardableResult
  static func run(_ executable: String, _ arguments: [String], in directory: URL? = nil) -> (
    status: Int32, output: String
  ) {
    do {
      let result = try HostCommand.run(executable, arguments, errors: .merged, directory: directory?.path)
      return (result.timedOut ? -1 : result.status, result.text)
    } catch {
      return (-1, "cannot run \(executable): \(error)")
    }
  }

  /// A fresh temporary directory.
  static func temporaryDirectory() throws -> URL {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent(
      "hostvisor-loader-tests-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    return url
  }

  /// Assembles `source` with GNU as and links it with `ld` and `linkerScript`; returns the output
  /// path. `bits` is 32 or 64.
  static func assembleAndLink(source: String, linkerScript: String, bits: Int, in directory: URL) throws -> URL {
    let sourceURL = directory.appendingPathComponent("kernel.S")
    let scriptURL = directory.appendingPathComponent("kernel.ld")
    let objectURL = directory.appendingPathComponent("kernel.o")
    let outputURL = directory.appendingPathComponent("kernel.elf")
    try source.write(to: sourceURL, atomically: true, encoding: .utf8)
    try linkerScript.write(to: scriptURL, atomically: true, encoding: .utf8)
    let assembled = run("/usr/bin/as", [bits == 32 ? "--32" : "--64", "-o", objectURL.path, sourceURL.path])
    guard assembled.status == 0 else { throw TestFailure("as failed: \(assembled.output)") }
    let linked = run(
      "/usr/bin/ld",
      [
        "-m", bits == 32 ? "elf_i386" : "elf_x86_64", "-z", "max-page-size=0x1000", "--build-id=none", "-T",
        scriptURL.path, "-o", outputURL.path, objectURL.path,
      ])
    guard linked.status == 0 else { throw TestFailure("ld failed: \(linked.output)") }
    return outputURL
  }

  /// The address of `symbol` in an ELF file, read with nm.
  static func symbolAddress(_ symbol: String, in file: URL) throws -> UInt64 {
    let result = run("/usr/bin/nm", [file.path])
    for line in result.output.split(separator: "\n") {
      let fields = line.split(separator: " ")
      if fields.count == 3, fields[2] == symbol, let value = UInt64(fields[0], radix: 16) { return value }
    }
    throw TestFailure("symbol \(symbol) not found in \(file.path): \(result.output)")
  }

  static func bytes(of url: URL) throws -> [UInt8] {
    [UInt8](try Data(contentsOf: url))
  }

  static func bytes(atPath path: String) throws -> [UInt8] {
    [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
  }

  /// The error a loader call threw, or nil when it succeeded.
  static func loaderError(_ body: () throws(LoaderError) -> BootImage) -> LoaderError? {
    do {
      _ = try body()
      return nil
    } catch {
      return error
    }
  }
}

/// Little-endian field access on file bytes, for checking loader output against the files.
extension Array where Element == UInt8 {
  func le<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
    var value: T = 0
    for index in (offset..<(offset + MemoryLayout<T>.size)).reversed() { value = (value << 8) | T(self[index]) }
    return value
  }

  mutating func setLE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
    for index in 0..<MemoryLayout<T>.size { self[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
  }
}

/// A four-level page-table walk over guest memory, independent of the loader's code.
enum PageWalk {
  enum Failure: Error, Equatable { case notPresent(level: Int), memory }

  /// Translates `address` through the tables rooted at `cr3` (4 KiB, 2 MiB and 1 GiB pages).
  static func translate(_ address: UInt64, cr3: UInt64, memory: GuestMemory) throws(Failure) -> UInt64 {
    let frameMask: UInt64 = 0x000F_FFFF_FFFF_F000
    var table = cr3 & frameMask
    for level in stride(from: 4, through: 1, by: -1) {
      let shift = UInt64(12 + 9 * (level - 1))
      let index = (address >> shift) & 0x1FF
      let entry: UInt64
      do {
        entry = try memory.read(UInt64.self, at: table + index * 8)
      } catch {
        throw .memory
      }
      guard entry & 1 != 0 else { throw .notPresent(level: level) }
      if level == 1 || (level <= 3 && entry & 0x80 != 0) {
        let pageMask: UInt64 = (1 << shift) - 1
        return (entry & frameMask & ~pageMask) | (address & pageMask)
      }
      table = entry & frameMask
    }
    throw .notPresent(level: 0)
  }
}

/// A deterministic pseudo-random generator (SplitMix64) so fuzz failures reproduce.
struct SplitMix64: RandomNumberGenerator {
  var state: UInt64
  mutating func next() -> UInt64 {
    state &+= 0x9E37_79B9_7F4A_7C15
    var z = state
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }
}

/// Builds small ELF files byte by byte, for malformed-input tests.
enum ELFBuilder {
  struct Segment {
    var physicalAddress: UInt64
    var virtualAddress: UInt64
    var data: [UInt8]
    var memorySize: UInt64
  }

  /// An executable with one PT_LOAD per segment; data follows the headers.
  static func make(is64: Bool, entry: UInt64, segments: [Segment]) -> [UInt8] {
    let headerSize = is64 ? 64 : 52
    let phSize = is64 ? 56 : 32
    var dataOffset = headerSize + phSize * segments.count
    var file = [UInt8](repeating: 0, count: dataOffset)
    file[0] = 0x7F
    file[1] = 0x45
    file[2] = 0x4C
    file[3] = 0x46
    file[4] = is64 ? 2 : 1
    file[5] = 1
    file[6] = 1
    file.setLE(UInt16(2), at: 16)
    file.setLE(UInt16(is64 ? 62 : 3), at: 18)
    file.setLE(UInt32(1), at: 20)
    if is64 {
      file.setLE(entry, at: 24)
      file.setLE(UInt64(headerSize), at: 32)
      file.setLE(UInt16(headerSize), at: 52)
      file.setLE(UInt16(phSize), at: 54)
      file.setLE(UInt16(segments.count), at: 56)
    } else {
      file.setLE(UInt32(entry), at: 24)
      file.setLE(UInt32(headerSize), at: 28)
      file.setLE(UInt16(headerSize), at: 40)
      file.setLE(UInt16(phSize), at: 42)
      file.setLE(UInt16(segments.count), at: 44)
    }
    for (index, segment) in segments.enumerated() {
      let base = headerSize + index * phSize
      if is64 {
        file.setLE(UInt32(1), at: base)
        file.setLE(UInt32(7), at: base + 4)
        file.setLE(UInt64(dataOffset), at: base + 8)
        file.setLE(segment.virtualAddress, at: base + 16)
        file.setLE(segment.physicalAddress, at: base + 24)
        file.setLE(UInt64(segment.data.count), at: base + 32)
        file.setLE(segment.memorySize, at: base + 40)
        file.setLE(UInt64(0x1000), at: base + 48)
      } else {
        file.setLE(UInt32(1), at: base)
        file.setLE(UInt32(dataOffset), at: base + 4)
        file.setLE(UInt32(segment.virtualAddress), at: base + 8)
        file.setLE(UInt32(segment.physicalAddress), at: base + 12)
        file.setLE(UInt32(segment.data.count), at: base + 16)
        file.setLE(UInt32(segment.memorySize), at: base + 20)
        file.setLE(UInt32(7), at: base + 24)
        file.setLE(UInt32(0x1000), at: base + 28)
      }
      dataOffset += segment.data.count
    }
    for segment in segments { file += segment.data }
    return file
  }
}
