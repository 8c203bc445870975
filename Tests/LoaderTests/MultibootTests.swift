import Foundation
import Testing
import VMCore

@testable import Loaders

/// Multiboot v1 kernels built with GNU as/ld at test time.
@Suite struct MultibootTests {
  /// A tiny Multiboot kernel: header, code, data and a bss; `addressFields` selects the a.out
  /// kludge (flag 16) with header_addr/load_addr/load_end_addr/bss_end_addr/entry_addr.
  static func source(addressFields: Bool) -> String {
    let flags = addressFields ? "0x00010003" : "0x00000003"
    let addressFieldLines =
      addressFields
      ? ".long multiboot_header\n  .long _load_start\n  .long _load_end\n  .long _bss_end\n  .long _start" : ""
    return """
      .section .multiboot, "a"
      .align 4
      multiboot_header:
        .long 0x1BADB002
        .long \(flags)
        .long -(0x1BADB002 + \(flags))
        \(addressFieldLines)
      .text
      .code32
      .globl _start
      _start:
        cmpl $0x2BADB002, %eax
        jne 1f
        movl $message, %esi
      1:
        hlt
        jmp 1b
      .data
      message:
        .ascii "hello from multiboot"
      .bss
      .globl scratch
      scratch:
        .skip 20000
      """
  }

  static let linkerScript = """
    ENTRY(_start)
    SECTIONS {
      . = 0x100000;
      _load_start = .;
      .text : { *(.multiboot) *(.text) }
      .data : { *(.data) }
      _load_end = .;
      .bss : { _bss_start = .; *(.bss) *(COMMON) _bss_end = .; }
    }
    """

  struct Built {
    let directory: URL
    let elf: URL
    let flat: [UInt8]
    let bssStart: UInt64
    let bssEnd: UInt64
    let entry: UInt64
  }

  func build(addressFields: Bool) throws -> Built {
    let directory = try TestSupport.temporaryDirectory()
    let elf = try TestSupport.assembleAndLink(
      source: Self.source(addressFields: addressFields), linkerScript: Self.linkerScript, bits: 32, in: directory)
    let flatURL = directory.appendingPathComponent("kernel.bin")
    let copied = TestSupport.run("/usr/bin/objcopy", ["-O", "binary", elf.path, flatURL.path])
    guard copied.status == 0 else { throw TestSupport.TestFailure("objcopy failed: \(copied.output)") }
    return Built(
      directory: directory, elf: elf, flat: try TestSupport.bytes(of: flatURL),
      bssStart: try TestSupport.symbolAddress("_bss_start", in: elf),
      bssEnd: try TestSupport.symbolAddress("_bss_end", in: elf),
      entry: try TestSupport.symbolAddress("_start", in: elf))
  }

  /// A memory whose every byte is 0xAA, so loads and zeroed bss are visible.
  func dirtyMemory(size: UInt64 = 64 << 20) throws -> GuestMemory {
    let memory = try GuestMemory(size: size)
    try memory.fill(0xAA, at: 0, length: size)
    return memory
  }

  func check(_ built: Built, kernelPath: String, addressFields: Bool) throws {
    defer { try? FileManager.default.removeItem(at: built.directory) }
    let initrdURL = built.directory.appendingPathComponent("module.bin")
    let module = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
    try Data(module).write(to: initrdURL)
    let memory = try dirtyMemory()
    let commandLine = "console=ttyS0 verbose"
    let image = try KernelLoader.load(
      kernelPath: kernelPath, initrdPath: initrdURL.path, commandLine: commandLine, memory: memory)

    #expect(image.format == .multiboot)
    #expect(image.entry == built.entry)
    // Code and data at their load addresses, bss zeroed.
    #expect(try memory.readBytes(at: 0x10_0000, count: built.flat.count) == built.flat)
    let bss = try memory.readBytes(at: built.bssStart, count: Int(built.bssEnd - built.bssStart))
    #expect(bss.allSatisfy { $0 == 0 })
    #expect(image.kernelRange == 0x10_0000..<built.bssEnd)

    // Machine state the specification requires.
    let state = image.state
    #expect(state.rax == 0x2BAD_B002)
    #expect(state.rip == built.entry)
    #expect(state.cr0 & X86.cr0PE != 0 && state.cr0 & X86.cr0PG == 0)
    #expect(state.efer == 0)
    #expect(state.rflags & (1 << 9) == 0 && state.rflags & (1 << 17) == 0)
    #expect(
      state.cs.selector == 0x08 && state.cs.db && !state.cs.l && state.cs.base == 0 && state.cs.limit == 0xFFFF_FFFF)
    for segment in [state.ds, state.es, state.fs, state.gs, state.ss] {
      #expect(segment.selector == 0x10 && segment.base == 0 && segment.limit == 0xFFFF_FFFF)
    }
    #expect(try memory.read(UInt64.self, at: state.gdt.base + 0x08) == 0x00CF_9B00_0000_FFFF)
    #expect(try memory.read(UInt64.self, at: state.gdt.base + 0x10) == 0x00CF_9300_0000_FFFF)

    // The information structure.
    let info = state.rbx
    #expect(info == image.multibootInfoAddress)
    let flags = try memory.read(UInt32.self, at: info)
    #expect(flags & (1 << 0) != 0, "mem_lower/mem_upper")
    #expect(flags & (1 << 2) != 0, "cmdline")
    #expect(flags & (1 << 3) != 0, "mods")
    #expect(flags & (1 << 6) != 0, "mmap")
    #expect(flags & (1 << 9) != 0, "boot_loader_name")
    #expect(try memory.read(UInt32.self, at: info + 4) == 639)
    #expect(try memory.read(UInt32.self, at: info + 8) == (64 << 10) - 1024)

    let commandLinePointer = UInt64(try memory.read(UInt32.self, at: info + 16))
    #expect(try cString(memory, at: commandLinePointer) == kernelPath + " " + commandLine)
    let namePointer = UInt64(try memory.read(UInt32.self, at: info + 64))
    #expect(try cString(memory, at: namePointer) == "hostvisor")

    // The module: page aligned, past the kernel, bytes equal the file, string = its path.
    #expect(try memory.read(UInt32.self, at: info + 20) == 1)
    let moduleEntry = UInt64(try memory.read(UInt32.self, at: info + 24))
    let moduleStart = UInt64(try memory.read(UInt32.self, at: moduleEntry))
    let moduleEnd = UInt64(try memory.read(UInt32.self, at: moduleEntry + 4))
    #expect(moduleStart % 4096 == 0)
    #expect(moduleStart >= built.bssEnd)
    #expect(moduleEnd - moduleStart == UInt64(module.count))
    #expect(try memory.readBytes(at: moduleStart, count: module.count) == module)
    let moduleString = UInt64(try memory.read(UInt32.self, at: moduleEntry + 8))
    #expect(try cString(memory, at: moduleString) == initrdURL.path)

    // The memory map: `size` fields of 20, the same ranges as the e820 map.
    let mmapLength = UInt64(try memory.read(UInt32.self, at: info + 44))
    let mmapAddress = UInt64(try memory.read(UInt32.self, at: info + 48))
    var entries: [E820Entry] = []
    var cursor = mmapAddress
    while cursor < mmapAddress + mmapLength {
      let size = UInt64(try memory.read(UInt32.self, at: cursor))
      #expect(size == 20)
      entries.append(
        E820Entry(
          address: try memory.read(UInt64.self, at: cursor + 4), size: try memory.read(UInt64.self, at: cursor + 12),
          type: E820Type(rawValue: try memory.read(UInt32.self, at: cursor + 20)) ?? .unusable))
      cursor += size + 4
    }
    #expect(entries == E820Map.build(for: memory))
    #expect(entries.contains(E820Entry(address: 0x10_0000, size: (64 << 20) - 0x10_0000, type: .ram)))
  }

  func cString(_ memory: GuestMemory, at address: UInt64) throws -> String {
    var bytes: [UInt8] = []
    var cursor = address
    while bytes.count < 4096 {
      let byte = try memory.read(UInt8.self, at: cursor)
      if byte == 0 { break }
      bytes.append(byte)
      cursor += 1
    }
    return String(decoding: bytes, as: UTF8.self)
  }

  @Test func elfMultibootKernelIsLoadedByProgramHeaders() throws {
    let built = try build(addressFields: false)
    #expect(KernelLoader.detectFormat(try TestSupport.bytes(of: built.elf)) == .multiboot)
    try check(built, kernelPath: built.elf.path, addressFields: false)
  }

  @Test func aoutKludgeKernelIsLoadedByHeaderAddresses() throws {
    let built = try build(addressFields: true)
    // The flat binary carries no ELF headers: only the address fields can place it.
    let flatURL = built.directory.appendingPathComponent("kernel.bin")
    #expect(KernelLoader.detectFormat(built.flat) == .multiboot)
    try check(built, kernelPath: flatURL.path, addressFields: true)
  }

  @Test func withoutInitrdThereAreNoModules() throws {
    let built = try build(addressFields: false)
    defer { try? FileManager.default.removeItem(at: built.directory) }
    let memory = try dirtyMemory()
    let image = try KernelLoader.load(kernelPath: built.elf.path, initrdPath: nil, commandLine: "", memory: memory)
    let flags = try memory.read(UInt32.self, at: image.state.rbx)
    #expect(flags & (1 << 3) == 0)
    #expect(image.initrdRange == nil)
    #expect(try cString(memory, at: UInt64(try memory.read(UInt32.self, at: image.state.rbx + 16))) == built.elf.path)
  }

  @Test func multibootTakesPrecedenceOverELF() throws {
    let built = try build(addressFields: false)
    defer { try? FileManager.default.removeItem(at: built.directory) }
    var bytes = try TestSupport.bytes(of: built.elf)
    #expect(bytes[0..<4] == [0x7F, 0x45, 0x4C, 0x46])
    #expect(KernelLoader.detectFormat(bytes) == .multiboot)
    // Without the header magic the same file is a plain ELF32 kernel.
    let offset = try #require(stride(from: 0, to: 8192, by: 4).first { bytes.le(UInt32.self, at: $0) == 0x1BAD_B002 })
    bytes.setLE(UInt32(0), at: offset)
    #expect(KernelLoader.detectFormat(bytes) == .elf32)
  }
}
