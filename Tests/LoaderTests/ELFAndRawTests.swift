import Foundation
import Testing
import VMCore

@testable import Loaders

/// Plain ELF64/ELF32 kernels (assembled at test time) and raw binaries.
@Suite struct ELFAndRawTests {
  /// A kernel linked at a high virtual address and loaded at 1 MiB physical (AT()), as Linux's
  /// vmlinux is, so the entry point must be translated.
  static let highLinkedScript = """
    ENTRY(_start)
    SECTIONS {
      . = 0xFFFFFFFF80100000;
      .text : AT(0x100000) { *(.text) }
      .data : AT(0x100000 + (ADDR(.data) - ADDR(.text))) { *(.data) }
      .bss : AT(0x100000 + (ADDR(.bss) - ADDR(.text))) { _bss_start = .; *(.bss) _bss_end = .; }
    }
    """

  static let lowLinkedScript = """
    ENTRY(_start)
    SECTIONS {
      . = 0x200000;
      .text : { *(.text) }
      .data : { *(.data) }
      .bss : { _bss_start = .; *(.bss) _bss_end = .; }
    }
    """

  static func source(bits: Int) -> String {
    """
    .text
    .code\(bits)
    .globl _start
    _start:
      nop
      nop
      hlt
    .data
      .ascii "ELF test data"
    .bss
      .skip 12345
    """
  }

  func dirtyMemory(size: UInt64 = 64 << 20) throws -> GuestMemory {
    let memory = try GuestMemory(size: size)
    try memory.fill(0xAA, at: 0, length: size)
    return memory
  }

  @Test func elf64IsEnteredInLongModeAtItsPhysicalEntry() throws {
    let directory = try TestSupport.temporaryDirectory()
    defer { try? FileManager.default.removeItem(at: directory) }
    let elf = try TestSupport.assembleAndLink(
      source: Self.source(bits: 64), linkerScript: Self.highLinkedScript, bits: 64, in: directory)
    let flat = directory.appendingPathComponent("flat.bin")
    #expect(TestSupport.run("/usr/bin/objcopy", ["-O", "binary", elf.path, flat.path]).status == 0)
    let flatBytes = try TestSupport.bytes(of: flat)
    #expect(KernelLoader.detectFormat(try TestSupport.bytes(of: elf)) == .elf64)

    let memory = try dirtyMemory()
    let image = try KernelLoader.load(kernelPath: elf.path, initrdPath: nil, commandLine: "ignored", memory: memory)
    #expect(image.format == .elf64)
    #expect(image.entry == 0x10_0000)
    #expect(try memory.readBytes(at: 0x10_0000, count: flatBytes.count) == flatBytes)
    let bssStart = try TestSupport.symbolAddress("_bss_start", in: elf) - 0xFFFF_FFFF_8000_0000
    let bssEnd = try TestSupport.symbolAddress("_bss_end", in: elf) - 0xFFFF_FFFF_8000_0000
    #expect(try memory.readBytes(at: bssStart, count: Int(bssEnd - bssStart)).allSatisfy { $0 == 0 })
    #expect(image.warnings.contains { $0.contains("command line") })

    let state = image.state
    #expect(state.rip == 0x10_0000)
    #expect(state.cs.l && state.cs.selector == 0x10)
    #expect(state.efer & X86.eferLMA != 0)
    #expect(state.cr0 & X86.cr0PG != 0)
    #expect(try PageWalk.translate(state.rip, cr3: state.cr3, memory: memory) == state.rip)
    #expect(try PageWalk.translate(state.rsp - 8, cr3: state.cr3, memory: memory) == state.rsp - 8)
  }

  @Test func elf32IsEnteredInFlatProtectedMode() throws {
    let directory = try TestSupport.temporaryDirectory()
    defer { try? FileManager.default.removeItem(at: directory) }
    let elf = try TestSupport.assembleAndLink(
      source: Self.source(bits: 32), linkerScript: Self.lowLinkedScript, bits: 32, in: directory)
    let memory = try dirtyMemory()
    let image = try KernelLoader.load(kernelPath: elf.path, initrdPath: nil, commandLine: "", memory: memory)
    #expect(image.format == .elf32)
    let entry = try TestSupport.symbolAddress("_start", in: elf)
    #expect(image.entry == entry)
    #expect(try memory.readBytes(at: entry, count: 3) == [0x90, 0x90, 0xF4])
    let bssStart = try TestSupport.symbolAddress("_bss_start", in: elf)
    let bssEnd = try TestSupport.symbolAddress("_bss_end", in: elf)
    #expect(try memory.readBytes(at: bssStart, count: Int(bssEnd - bssStart)).allSatisfy { $0 == 0 })
    let state = image.state
    #expect(state.cr0 & X86.cr0PE != 0 && state.cr0 & X86.cr0PG == 0)
    #expect(state.efer == 0)
    #expect(state.cs.selector == 0x08 && state.cs.db && !state.cs.l)
    #expect(state.ss.selector == 0x10)
  }

  @Test func plainELFRefusesAnInitrd() throws {
    let elf = ELFBuilder.make(
      is64: true, entry: 0x10_0000,
      segments: [.init(physicalAddress: 0x10_0000, virtualAddress: 0x10_0000, data: [0xF4], memorySize: 1)])
    let memory = try GuestMemory(size: 16 << 20)
    let error = TestSupport.loaderError { () throws(LoaderError) in
      try KernelLoader.load(kernel: elf, kernelName: "k.elf", initrd: [1, 2, 3], commandLine: "", memory: memory)
    }
    #expect(
      error?.description
        == "cannot boot 'k.elf': it is a plain ELF kernel, which has no boot protocol to receive an initrd")
  }

  @Test func rawBinaryRunsInLongModeAtItsLoadAddress() throws {
    let code: [UInt8] = [0x48, 0x31, 0xC0, 0xF4]  // xor rax, rax; hlt
    let memory = try GuestMemory(size: 16 << 20)
    let image = try KernelLoader.load(
      kernel: code, kernelName: "code.bin", initrd: nil, commandLine: "", memory: memory, rawLoadAddress: 0x10_0000)
    #expect(image.format == .raw)
    #expect(try memory.readBytes(at: 0x10_0000, count: code.count) == code)
    let state = image.state
    #expect(state.rip == 0x10_0000)
    #expect(state.rsp == 0x10_0000)
    #expect(state.cs.l && state.efer & X86.eferLMA != 0)
    #expect(try PageWalk.translate(0x10_0000, cr3: state.cr3, memory: memory) == 0x10_0000)
    #expect(try PageWalk.translate(0xFFFF_F000, cr3: state.cr3, memory: memory) == 0xFFFF_F000)

    // Even an ELF file is loaded byte for byte when a raw address is given.
    let elf = ELFBuilder.make(
      is64: true, entry: 0x10_0000,
      segments: [.init(physicalAddress: 0x10_0000, virtualAddress: 0x10_0000, data: [0xF4], memorySize: 1)])
    let forced = try KernelLoader.load(
      kernel: elf, kernelName: "k.elf", initrd: nil, commandLine: "", memory: memory, rawLoadAddress: 0x20_0000)
    #expect(forced.format == .raw)
    #expect(try memory.readBytes(at: 0x20_0000, count: elf.count) == elf)
  }

  @Test func rawBinaryMayNotOverwriteThePageTables() throws {
    let memory = try GuestMemory(size: 16 << 20)
    let error = TestSupport.loaderError { () throws(LoaderError) in
      try KernelLoader.load(
        kernel: [UInt8](repeating: 0x90, count: 0x2000), kernelName: "code.bin", initrd: nil, commandLine: "",
        memory: memory, rawLoadAddress: 0x8000)
    }
    #expect(
      error?.description
        == "kernel segment at 0x8000 (0x2000 bytes) overlaps the boot page tables Hostvisor places at 0x9000-0xf000")
  }
}
