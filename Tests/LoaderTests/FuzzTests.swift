import Foundation
import Testing
import VMCore

@testable import Loaders

/// Mutated headers of valid images: every outcome is a boot image inside guest RAM or a
/// `LoaderError`; a crash fails the whole test run.
@Suite struct FuzzTests {
  static let iterations = 2000

  /// One valid image per format, small enough to load thousands of times.
  func seeds() throws -> [(name: String, bytes: [UInt8], headerLength: Int, takesInitrd: Bool)] {
    let bzImage = Array(try TestSupport.bytes(atPath: try TestSupport.defaultGuest.get().kernel).prefix(64 << 10))
    let elf64 = ELFBuilder.make(
      is64: true, entry: 0xFFFF_FFFF_8010_0000,
      segments: [
        .init(
          physicalAddress: 0x10_0000, virtualAddress: 0xFFFF_FFFF_8010_0000, data: [0x90, 0xF4], memorySize: 0x3000),
        .init(physicalAddress: 0x20_0000, virtualAddress: 0x20_0000, data: [1, 2, 3, 4], memorySize: 4),
      ])
    let elf32 = ELFBuilder.make(
      is64: false, entry: 0x10_0000,
      segments: [.init(physicalAddress: 0x10_0000, virtualAddress: 0x10_0000, data: [0x90, 0xF4], memorySize: 0x100)])
    var aout = [UInt8](repeating: 0x90, count: 512)
    let flags: UInt32 = 0x0001_0003
    aout.setLE(UInt32(0x1BAD_B002), at: 0)
    aout.setLE(flags, at: 4)
    aout.setLE(UInt32(0) &- (0x1BAD_B002 &+ flags), at: 8)
    aout.setLE(UInt32(0x10_0000), at: 12)
    aout.setLE(UInt32(0x10_0000), at: 16)
    aout.setLE(UInt32(0x10_0200), at: 20)
    aout.setLE(UInt32(0x10_4000), at: 24)
    aout.setLE(UInt32(0x10_0020), at: 28)
    var elfMultiboot = elf32
    while elfMultiboot.count % 4 != 0 { elfMultiboot.append(0) }
    let mbFlags: UInt32 = 0x0000_0003
    var header = [UInt8](repeating: 0, count: 12)
    header.setLE(UInt32(0x1BAD_B002), at: 0)
    header.setLE(mbFlags, at: 4)
    header.setLE(UInt32(0) &- (0x1BAD_B002 &+ mbFlags), at: 8)
    elfMultiboot += header
    return [
      ("bzImage", bzImage, 0x300, true), ("elf64", elf64, elf64.count, false), ("elf32", elf32, elf32.count, false),
      ("aout-multiboot", aout, 32, true), ("elf-multiboot", elfMultiboot, elfMultiboot.count, true),
    ]
  }

  @Test func mutatedHeadersNeverCrash() throws {
    let memory = try GuestMemory(size: 128 << 20)
    var generator = SplitMix64(state: 0x5EED)
    var outcomes: [String: (loaded: Int, refused: Int)] = [:]
    for seed in try seeds() {
      // The unmutated seed loads.
      let original = try KernelLoader.load(
        kernel: seed.bytes, kernelName: seed.name, initrd: seed.takesInitrd ? [1, 2, 3] : nil, commandLine: "x",
        memory: memory)
      #expect(original.state.rip == original.entry)
      for _ in 0..<Self.iterations {
        var bytes = seed.bytes
        let mutations = Int.random(in: 1...8, using: &generator)
        for _ in 0..<mutations {
          let offset = Int.random(in: 0..<seed.headerLength, using: &generator)
          switch Int.random(in: 0..<4, using: &generator) {
          case 0: bytes[offset] = UInt8.random(in: 0...255, using: &generator)
          case 1: bytes[offset] ^= 1 << UInt8.random(in: 0..<8, using: &generator)
          case 2: bytes[offset] = [0x00, 0xFF, 0x7F, 0x80].randomElement(using: &generator)!
          default:
            // A whole 32-bit field set to an extreme value.
            let aligned = offset & ~3
            if aligned + 4 <= bytes.count {
              bytes.setLE([UInt32.max, 0, 0x8000_0000, 0xFFFF_FFF0].randomElement(using: &generator)!, at: aligned)
            }
          }
        }
        if Int.random(in: 0..<10, using: &generator) == 0 {
          bytes = Array(bytes.prefix(Int.random(in: 0...bytes.count, using: &generator)))
        }
        let initrd: [UInt8]? = Bool.random(using: &generator) ? [UInt8](repeating: 0x5A, count: 5000) : nil
        let raw: UInt64? =
          Int.random(in: 0..<20, using: &generator) == 0 ? UInt64.random(in: 0...UInt64.max, using: &generator) : nil
        do {
          let image = try KernelLoader.load(
            kernel: bytes, kernelName: seed.name, initrd: initrd, commandLine: "console=ttyS0", memory: memory,
            rawLoadAddress: raw)
          #expect(image.state.rip == image.entry)
          #expect(memory.contains(image.kernelRange.lowerBound, length: 1))
          if let initrdRange = image.initrdRange {
            #expect(memory.contains(initrdRange.lowerBound, length: UInt64(initrdRange.count)))
          }
          outcomes[seed.name, default: (0, 0)].loaded += 1
        } catch {
          #expect(!error.description.isEmpty && !error.description.contains("\n"))
          outcomes[seed.name, default: (0, 0)].refused += 1
        }
      }
    }
    // The fuzzer reaches both outcomes for every format, so it explores past the first check.
    for (name, outcome) in outcomes {
      #expect(outcome.loaded > 0 && outcome.refused > 0, "\(name): \(outcome)")
    }
  }
}
