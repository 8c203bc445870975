import Foundation
import Testing
import VMCore

@testable import VMM

/// `VirtualMachine.restoreMemory(layers:size:eager:)`, the memory part of a snapshot restore
/// (what the `memfiles` fuzz target drives with hostile layouts): a base memory file and diff
/// layers in tmpfs (which reports holes page by page), restored lazily and eagerly, and the
/// files it must refuse.
@Suite("Snapshot memory file layers")
struct MemoryFileLayerTests {
  static let size: UInt64 = 16 * 4096

  /// A scratch folder in /dev/shm (tmpfs), removed with the value.
  final class SharedMemoryFolder {
    let path = "/dev/shm/hostvisor-layers-\(UUID().uuidString)"
    init() throws { try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) }
    deinit { try? FileManager.default.removeItem(atPath: path) }

    /// A file of `size` bytes holding `writes` (offset, bytes); the rest is holes.
    func file(_ name: String, size: UInt64 = MemoryFileLayerTests.size, _ writes: [(Int, [UInt8])]) throws -> String {
      let file = "\(path)/\(name)"
      let descriptor = open(file, O_RDWR | O_CREAT | O_TRUNC, 0o600)
      #expect(descriptor >= 0)
      defer { close(descriptor) }
      #expect(ftruncate(descriptor, off_t(size)) == 0)
      for (offset, bytes) in writes {
        #expect(bytes.withUnsafeBytes { pwrite(descriptor, $0.baseAddress, $0.count, off_t(offset)) } == bytes.count)
      }
      return file
    }
  }

  func page(_ byte: UInt8) -> [UInt8] { [UInt8](repeating: byte, count: 4096) }

  @Test(arguments: [false, true])
  func diffsLayOverTheBaseInOrder(eager: Bool) throws {
    let folder = try SharedMemoryFolder()
    let base = try folder.file("base", [(0, page(0xB0) + page(0xB1) + page(0xB2)), (15 * 4096, page(0xBF))])
    // The first diff rewrites page 1 and page 2 (page 2 with zeros: data, not a hole).
    let first = try folder.file("diff-1", [(4096, page(0xD1) + page(0))])
    // The second writes one byte of page 2 (the whole page is data) and one of page 9.
    let second = try folder.file("diff-2", [(2 * 4096 + 7, [0xEE]), (9 * 4096, [0x99])])
    let memory = try VirtualMachine.restoreMemory(layers: [base, first, second], size: Self.size, eager: eager)
    #expect(try memory.readBytes(at: 0, count: 4096) == page(0xB0))
    #expect(try memory.readBytes(at: 4096, count: 4096) == page(0xD1))
    var twice = page(0)
    twice[7] = 0xEE
    #expect(try memory.readBytes(at: 2 * 4096, count: 4096) == twice)
    var nine = page(0)
    nine[0] = 0x99
    #expect(try memory.readBytes(at: 9 * 4096, count: 4096) == nine)
    #expect(try memory.readBytes(at: 15 * 4096, count: 4096) == page(0xBF))
    #expect(try memory.readBytes(at: 3 * 4096, count: 4096) == page(0))
  }

  @Test(arguments: [false, true])
  func layersThatAreNotRegularFilesOfTheRAMSizeAreRefused(eager: Bool) throws {
    let folder = try SharedMemoryFolder()
    let base = try folder.file("base", [(0, page(1))])
    let short = try folder.file("short", size: Self.size - 1, [(0, page(2))])
    let long = try folder.file("long", size: Self.size + 4096, [(0, page(3))])
    let refused: [[String]] = [
      [short], [long], [base, short], [base, long], [base, "/dev/null"], ["/"], [base, folder.path], [],
    ]
    for layers in refused {
      #expect(throws: MachineStateError.self, "layers \(layers)") {
        _ = try VirtualMachine.restoreMemory(layers: layers, size: Self.size, eager: eager)
      }
    }
    #expect(throws: MachineStateError.self) {
      _ = try VirtualMachine.restoreMemory(layers: ["\(folder.path)/missing"], size: Self.size, eager: eager)
    }
  }
}
