import FuzzSupport
import Glibc

@testable import VMCore
@testable import VMM

/// The snapshot memory files: a full memory file and the diff layers laid over it
/// (docs/machine-state.md, "The memory file" and "Diff snapshots"), read back into guest RAM.
///
/// Input: a flags byte (eager or lazy restore, RAM below 3 GiB only or also above the PCI hole,
/// the operation), the RAM size in pages, the number of layers (a base and up to three diffs),
/// then each layer's layout: its kind (a file of the RAM's size; one cut short or extended by
/// a fuzzer-chosen number of bytes; a directory, a character device or a missing file), and up
/// to seven data extents (page, offset in the page, length up to three pages, fill pattern),
/// written into a memfd that is then cut to the layer's size, so extents beyond it are lost and
/// the rest are holes. With RAM above the PCI hole the extents fall in a window around the end
/// of the low region and the start of the high one (the file is 3 GiB long, almost all hole).
///
/// Operations, each on the same layers:
/// - the restore path itself: `VirtualMachine.restoreMemory(layers:size:eager:)`, which a
///   snapshot restore calls (the base mapped copy-on-write or read eagerly, each diff laid over
///   it with `applyDiff`); guards are placed around the RAM it returns, for the checks;
/// - the same steps on guarded RAM (`PROT_NONE` mappings right below and above each region):
///   eager, fresh RAM is guarded before the base is read into it (`readSnapshotData`); lazy,
///   the mapping of the base is guarded before the diffs are laid over it;
/// - `hostvisor merge-memory`: `GuestMemory.mergeDiffs` lays the diffs over the base file in
///   place, then the merged base alone is mapped (guarded) as a full memory file.
///
/// A set of layers with any file that is not a regular file of the RAM's size must be refused
/// with an error; any other must restore, and then every page of the window must equal the
/// target's own model (the base's bytes, then each diff's written pages over them in order).
/// A mismatch, an accepted bad file or a refused good one stops the target.
@main
enum FuzzMemoryFiles {
  static let page = 4096
  /// Pages of the window at the end of the low region when RAM goes above the PCI hole.
  static let lowWindowPages = 32

  static func main() {
    FuzzDriver.run(name: "memfiles", seeds: seeds) { input in runOne(&input) }
  }

  /// One layer as the fuzzer laid it out, with the target's model of its pages.
  struct Layer {
    enum Kind {
      case file(size: Int64)
      case directory
      case characterDevice
      case missing
    }
    var kind: Kind
    /// The written pages below the file's size (file page index: content).
    var pages: [Int: [UInt8]] = [:]
    /// Open memfd (file kinds only).
    var descriptor: Int32 = -1

    var path: String {
      switch kind {
      case .file: return "/proc/self/fd/\(descriptor)"
      case .directory: return "/"
      case .characterDevice: return "/dev/null"
      case .missing: return "/proc/self/fd/2147483000"
      }
    }
  }

  /// The RAM's layout: total size and the file pages the extents may touch.
  struct Layout {
    let size: UInt64
    let windowStart: Int
    let windowPages: Int

    /// Guest-physical address of file page `index` (regions back to back in the file).
    func guestAddress(ofFilePage index: Int) -> UInt64 {
      let offset = UInt64(index * FuzzMemoryFiles.page)
      return offset < GuestMemory.pciHoleStart ? offset : GuestMemory.highMemoryBase + offset - GuestMemory.pciHoleStart
    }
  }

  static func runOne(_ input: inout FuzzInput) {
    let flags = input.byte()
    let eager = flags & 1 != 0
    let aboveTheHole = flags & 2 != 0
    let operation = Int(flags >> 2) % 3
    let pages = 1 + Int(input.byte() % 64)
    let layout =
      aboveTheHole
      ? Layout(
        size: GuestMemory.pciHoleStart + UInt64(pages * page),
        windowStart: Int(GuestMemory.pciHoleStart) / page - lowWindowPages, windowPages: lowWindowPages + pages)
      : Layout(size: UInt64(pages * page), windowStart: 0, windowPages: pages)
    var layers: [Layer] = []
    defer { for layer in layers where layer.descriptor >= 0 { close(layer.descriptor) } }
    let layerCount = 1 + Int(input.byte() % 4)
    for _ in 0..<layerCount {
      guard let layer = makeLayer(&input, layout: layout) else {
        FuzzDriver.count("layouts the file system kept otherwise")
        return
      }
      layers.append(layer)
    }
    let valid = layers.allSatisfy {
      if case .file(let size) = $0.kind { return size == Int64(layout.size) }
      return false
    }
    let paths = layers.map(\.path)
    var guards: GuestMemoryGuards?
    defer { withExtendedLifetime(guards) {} }
    let memory: GuestMemory
    do {
      switch operation {
      case 0:
        memory = try VirtualMachine.restoreMemory(layers: paths, size: layout.size, eager: eager)
        guards = GuestMemoryGuards(around: memory)
      case 1:
        if eager {
          memory = try GuestMemory(size: layout.size)
          guards = GuestMemoryGuards(around: memory)
          let descriptor = try GuestMemory.openSnapshotFile(paths[0], size: layout.size)
          defer { close(descriptor) }
          try memory.readSnapshotData(from: descriptor, path: paths[0])
        } else {
          memory = try GuestMemory.mapping(snapshotFile: paths[0], size: layout.size)
          guards = GuestMemoryGuards(around: memory)
        }
        for path in paths.dropFirst() { try memory.applyDiff(path: path) }
      default:
        try GuestMemory.mergeDiffs(into: paths[0], diffPaths: Array(paths.dropFirst()))
        memory = try GuestMemory.mapping(snapshotFile: paths[0], size: layout.size)
        guards = GuestMemoryGuards(around: memory)
      }
    } catch {
      _ = "\(error)"
      precondition(!valid, "layers of the RAM's size were refused: \(error)")
      FuzzDriver.count("layer sets refused")
      return
    }
    precondition(valid, "a layer that is not a regular file of the RAM's size was accepted")
    FuzzDriver.count(["restored (restore path)", "restored (guarded steps)", "restored (merged)"][operation])
    check(memory, against: layers, layout: layout)
  }

  /// Reads one layer's kind and extents and makes its file; nil when the file system does not
  /// report exactly the written pages as data (the model would not hold).
  static func makeLayer(_ input: inout FuzzInput, layout: Layout) -> Layer? {
    let kindByte = input.byte()
    var layer: Layer
    switch kindByte % 16 {
    case 0..<10: layer = Layer(kind: .file(size: Int64(layout.size)))
    case 10..<12: layer = Layer(kind: .file(size: max(0, Int64(layout.size) - 1 - Int64(input.integer(UInt16.self)))))
    case 12..<14: layer = Layer(kind: .file(size: Int64(layout.size) + 1 + Int64(input.integer(UInt16.self))))
    case 14: layer = Layer(kind: kindByte & 16 == 0 ? .directory : .characterDevice)
    default: layer = Layer(kind: .missing)
    }
    let extents = Int(input.byte() % 8)
    guard case .file(let size) = layer.kind else {
      for _ in 0..<extents { _ = input.bytes(11) }
      return layer
    }
    layer.descriptor = Int32(FuzzDriver.memoryFile(name: "fuzz-layer", size: 0).split(separator: "/").last!)!
    precondition(ftruncate(layer.descriptor, off_t(size)) == 0)
    for _ in 0..<extents {
      let start = (layout.windowStart + input.below(layout.windowPages)) * page + Int(input.integer(UInt16.self)) % page
      let length = 1 + input.below(3 * page)
      let fill = input.byte()
      let bytes = (0..<length).map { UInt8(truncatingIfNeeded: Int(fill) &+ $0 &* Int(fill | 1)) }
      let written = bytes.withUnsafeBytes { pwrite(layer.descriptor, $0.baseAddress, length, off_t(start)) }
      precondition(written == length, "cannot write a memfd")
      var done = 0
      while done < length {
        let offset = start + done
        let count = min(length - done, page - offset % page)
        layer.pages[offset / page, default: [UInt8](repeating: 0, count: page)]
          .replaceSubrange((offset % page)..<(offset % page + count), with: bytes[done..<(done + count)])
        done += count
      }
    }
    // Cut to the layer's size: what lay beyond is gone, a partial last page keeps its start.
    precondition(ftruncate(layer.descriptor, off_t(size)) == 0)
    let kept = (Int(size) + page - 1) / page
    layer.pages = layer.pages.filter { $0.key < kept }
    for (index, _) in layer.pages where (index + 1) * page > Int(size) {
      for offset in (Int(size) - index * page)..<page { layer.pages[index]![offset] = 0 }
    }
    guard dataPages(of: layer.descriptor, size: size) == Set(layer.pages.keys) else {
      close(layer.descriptor)
      return nil
    }
    return layer
  }

  /// The pages SEEK_DATA/SEEK_HOLE report as data.
  static func dataPages(of descriptor: Int32, size: Int64) -> Set<Int> {
    var found: Set<Int> = []
    var position: off_t = 0
    while position < size {
      let data = lseek(descriptor, position, 3)
      guard data >= 0 else { break }
      let hole = lseek(descriptor, data, 4)
      guard hole > data else { break }
      for index in (Int(data) / page)..<((Int(hole) + page - 1) / page) { found.insert(index) }
      position = hole
    }
    return found
  }

  /// Every page of the window must hold the model's bytes: the base's page (zeros for a hole),
  /// replaced by each diff's page where that diff wrote it.
  static func check(_ memory: GuestMemory, against layers: [Layer], layout: Layout) {
    let zero = [UInt8](repeating: 0, count: page)
    for index in layout.windowStart..<(layout.windowStart + layout.windowPages) {
      var expected = layers[0].pages[index] ?? zero
      for diff in layers.dropFirst() {
        if let written = diff.pages[index] { expected = written }
      }
      let address = layout.guestAddress(ofFilePage: index)
      guard let actual = try? memory.readBytes(at: address, count: page) else {
        preconditionFailure("file page \(index) is not in guest RAM at 0x\(String(address, radix: 16))")
      }
      precondition(actual == expected, "guest page at 0x\(String(address, radix: 16)) differs from the layers")
    }
    FuzzDriver.count("pages checked", UInt64(layout.windowPages))
  }

  /// A base with data and a diff over it, restored each way; a diff of the wrong size; RAM
  /// above the PCI hole with extents across the boundary; a merge.
  static func seeds() -> [[UInt8]] {
    func extent(page: UInt8, offset: UInt16, length: UInt16, fill: UInt8) -> [UInt8] {
      [page, 0, 0, 0, UInt8(offset & 0xFF), UInt8(offset >> 8), UInt8(length & 0xFF), UInt8(length >> 8), 0, 0, fill]
    }
    let base: [UInt8] =
      [0, 2] + extent(page: 0, offset: 0, length: 8192, fill: 0x41) + extent(page: 5, offset: 100, length: 10, fill: 7)
    let diff: [UInt8] =
      [0, 2] + extent(page: 1, offset: 4000, length: 200, fill: 0x90)
      + extent(page: 6, offset: 0, length: 4096, fill: 0)
    let shortDiff: [UInt8] = [10, 0x10, 0, 1] + extent(page: 1, offset: 0, length: 1, fill: 1)
    var seeds: [[UInt8]] = []
    for flags: UInt8 in [0, 1, 4, 5, 8] {
      seeds.append([flags, 15, 1] + base + diff)
    }
    seeds.append([0, 15, 1] + base + shortDiff)
    // RAM above the PCI hole: window pages 30 and 31 end the low region, 32 starts the high one.
    let acrossTheHole: [UInt8] = [0, 1] + extent(page: 30, offset: 2048, length: 8192, fill: 3)
    seeds.append([2, 3, 1] + acrossTheHole + diff)
    let lastLowByte: [UInt8] = [0, 1] + extent(page: 31, offset: 4095, length: 2, fill: 9)
    seeds.append([7, 3, 2] + lastLowByte + diff + diff)
    return seeds
  }
}
