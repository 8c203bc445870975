import Foundation
import Testing
import VMCore

@testable import Loaders

/// Bad files become one clear `LoaderError` line, never a crash.
@Suite struct MalformedInputTests {
  func error(
    _ kernel: [UInt8], name: String = "bad.img", initrd: [UInt8]? = nil, memorySize: UInt64 = 64 << 20
  ) throws -> LoaderError? {
    let memory = try GuestMemory(size: memorySize)
    return TestSupport.loaderError { () throws(LoaderError) in
      try KernelLoader.load(kernel: kernel, kernelName: name, initrd: initrd, commandLine: "", memory: memory)
    }
  }

  func realKernel() throws -> [UInt8] {
    try TestSupport.bytes(atPath: try TestSupport.defaultGuest.get().kernel)
  }

  @Test func missingFile() throws {
    let memory = try GuestMemory(size: 16 << 20)
    let error = TestSupport.loaderError { () throws(LoaderError) in
      try KernelLoader.load(kernelPath: "/nonexistent/vmlinuz", initrdPath: nil, commandLine: "", memory: memory)
    }
    #expect(error?.description == "cannot read kernel '/nonexistent/vmlinuz': No such file or directory")
  }

  @Test func directoryInsteadOfAFile() throws {
    let memory = try GuestMemory(size: 16 << 20)
    let error = TestSupport.loaderError { () throws(LoaderError) in
      try KernelLoader.load(kernelPath: "/tmp", initrdPath: nil, commandLine: "", memory: memory)
    }
    #expect(error?.description == "cannot read kernel '/tmp': Is a directory")
  }

  @Test func missingInitrd() throws {
    let guest = try TestSupport.defaultGuest.get()
    let memory = try GuestMemory(size: 256 << 20)
    let error = TestSupport.loaderError { () throws(LoaderError) in
      try KernelLoader.load(
        kernelPath: guest.kernel, initrdPath: "/nonexistent/initrd", commandLine: "", memory: memory)
    }
    #expect(error?.description == "cannot read initrd '/nonexistent/initrd': No such file or directory")
  }

  @Test func emptyFile() throws {
    let directory = try TestSupport.temporaryDirectory()
    defer { try? FileManager.default.removeItem(at: directory) }
    let path = directory.appendingPathComponent("empty").path
    #expect(FileManager.default.createFile(atPath: path, contents: Data()))
    let memory = try GuestMemory(size: 16 << 20)
    let error = TestSupport.loaderError { () throws(LoaderError) in
      try KernelLoader.load(kernelPath: path, initrdPath: nil, commandLine: "", memory: memory)
    }
    #expect(error?.description == "'\(path)' is empty, not a kernel image")
  }

  @Test func randomBytes() throws {
    var generator = SplitMix64(state: 42)
    let bytes = (0..<65536).map { _ in UInt8.random(in: 0...255, using: &generator) }
    #expect(
      try error(bytes, name: "/x")?.description
        == "'/x' is not a kernel image Hostvisor can boot (not bzImage, ELF or Multiboot)")
  }

  @Test func truncatedBzImage() throws {
    let truncated = Array(try realKernel().prefix(600))
    let message = try error(truncated, name: "short")?.description
    #expect(
      message?.hasPrefix("'short' is a malformed Linux bzImage image: it is truncated") == true, "\(message ?? "")")
    // Cut inside the setup header itself.
    let tiny = Array(try realKernel().prefix(0x210))
    let tinyMessage = try error(tiny, name: "tiny")?.description
    #expect(tinyMessage?.hasPrefix("'tiny' is a malformed Linux bzImage image:") == true, "\(tinyMessage ?? "")")
  }

  @Test func oldBootProtocolIsRefused() throws {
    var kernel = Array(try realKernel().prefix(1 << 20))
    kernel.setLE(UInt16(0x020A), at: 0x206)
    #expect(
      try error(kernel, name: "old")?.description
        == "cannot boot 'old': it uses Linux boot protocol 2.10; Hostvisor needs 2.12 or later")
  }

  @Test func badBootFlag() throws {
    var kernel = Array(try realKernel().prefix(1 << 20))
    kernel.setLE(UInt16(0x1234), at: 0x1FE)
    #expect(
      try error(kernel, name: "k")?.description
        == "'k' is a malformed Linux bzImage image: boot_flag at 0x1FE is not 0xAA55")
  }

  @Test func initrdTooBig() throws {
    let kernel = Array(try realKernel().prefix(1 << 20))
    // 128 MiB of RAM: the kernel reserves 16 MiB + init_size, leaving less than 96 MiB anywhere.
    let message = try error(kernel, name: "k", initrd: [UInt8](repeating: 0, count: 96 << 20), memorySize: 128 << 20)?
      .description
    #expect(
      message?.hasPrefix("initrd 'initrd' (100663296 bytes) does not fit in guest RAM below 0x") == true,
      "\(message ?? "")")
  }

  @Test func elfSegmentOutsideRAM() throws {
    let elf = ELFBuilder.make(
      is64: true, entry: 0x10_0000,
      segments: [.init(physicalAddress: 0x2_0000_0000, virtualAddress: 0x2_0000_0000, data: [0xF4], memorySize: 0x1000)]
    )
    #expect(try error(elf)?.description == "kernel segment at 0x200000000 (0x1000 bytes) does not fit in guest RAM")
    // Straddling the end of RAM is no better.
    let straddling = ELFBuilder.make(
      is64: false, entry: 0x10_0000,
      segments: [.init(physicalAddress: 0x3FF_F000, virtualAddress: 0x3FF_F000, data: [0xF4], memorySize: 0x2000)])
    #expect(
      try error(straddling)?.description == "kernel segment at 0x3fff000 (0x2000 bytes) does not fit in guest RAM")
  }

  @Test func elfSegmentOverBootData() throws {
    let elf = ELFBuilder.make(
      is64: true, entry: 0x7000,
      segments: [.init(physicalAddress: 0x7000, virtualAddress: 0x7000, data: [0xF4], memorySize: 0x4000)])
    #expect(
      try error(elf)?.description
        == "kernel segment at 0x7000 (0x4000 bytes) overlaps the boot stack Hostvisor places at 0x8000-0x9000")
  }

  @Test func elfProgramHeadersPastEndOfFile() throws {
    var elf = ELFBuilder.make(
      is64: true, entry: 0x10_0000,
      segments: [.init(physicalAddress: 0x10_0000, virtualAddress: 0x10_0000, data: [0xF4], memorySize: 1)])
    elf.setLE(UInt64(0x10_0000), at: 32)  // e_phoff
    #expect(
      try error(elf, name: "e")?.description
        == "'e' is a malformed ELF image: the program header table at offset 0x100000 (56 bytes) lies past the end of the file (121 bytes)"
    )
    // An offset so large that offset + size overflows.
    elf.setLE(UInt64.max - 8, at: 32)
    #expect(
      try error(elf, name: "e")?.description.hasPrefix("'e' is a malformed ELF image: the program header table") == true
    )
  }

  @Test func elfSegmentDataPastEndOfFile() throws {
    var elf = ELFBuilder.make(
      is64: false, entry: 0x10_0000,
      segments: [.init(physicalAddress: 0x10_0000, virtualAddress: 0x10_0000, data: [0xF4], memorySize: 1)])
    elf.setLE(UInt32(0xFFFF_FFF0), at: 52 + 4)  // p_offset
    #expect(try error(elf, name: "e")?.description.contains("segment 0 data at offset 0xfffffff0") == true)
    elf = ELFBuilder.make(
      is64: false, entry: 0x10_0000,
      segments: [.init(physicalAddress: 0x10_0000, virtualAddress: 0x10_0000, data: [0xF4], memorySize: 1)])
    elf.setLE(UInt32(2), at: 52 + 16)  // p_filesz > p_memsz
    #expect(try error(elf, name: "e")?.description.contains("larger than p_memsz") == true)
  }

  @Test func elfForAnotherMachine() throws {
    var elf = ELFBuilder.make(
      is64: true, entry: 0x10_0000,
      segments: [.init(physicalAddress: 0x10_0000, virtualAddress: 0x10_0000, data: [0xF4], memorySize: 1)])
    elf.setLE(UInt16(183), at: 18)  // EM_AARCH64
    #expect(
      try error(elf, name: "arm")?.description
        == "cannot boot 'arm': it is an ELF64 file for machine 183, not x86-64 (62)")
  }

  @Test func multibootHeaderWithBadChecksum() throws {
    var blob = [UInt8](repeating: 0, count: 4096)
    blob.setLE(UInt32(0x1BAD_B002), at: 64)
    blob.setLE(UInt32(0x0001_0003), at: 68)
    blob.setLE(UInt32(0x1234_5678), at: 72)
    #expect(
      try error(blob, name: "mb")?.description
        == "'mb' is a malformed Multiboot image: the header at offset 0x40 has a bad checksum (magic + flags + checksum must be 0)"
    )
  }

  @Test func multibootAddressFieldsPastEndOfFile() throws {
    var blob = [UInt8](repeating: 0, count: 256)
    let flags: UInt32 = 0x0001_0000
    blob.setLE(UInt32(0x1BAD_B002), at: 0)
    blob.setLE(flags, at: 4)
    blob.setLE(UInt32(0) &- (0x1BAD_B002 &+ flags), at: 8)
    blob.setLE(UInt32(0x10_0000), at: 12)  // header_addr
    blob.setLE(UInt32(0x10_0000), at: 16)  // load_addr
    blob.setLE(UInt32(0x20_0000), at: 20)  // load_end_addr: 1 MiB, but the file has 256 bytes
    blob.setLE(UInt32(0), at: 24)
    blob.setLE(UInt32(0x10_0000), at: 28)
    #expect(
      try error(blob, name: "mb")?.description.hasPrefix(
        "'mb' is a malformed Multiboot image: load_addr..load_end_addr") == true)
    // A bss reaching beyond RAM.
    blob.setLE(UInt32(0), at: 20)
    blob.setLE(UInt32(0xFFFF_0000), at: 24)
    #expect(
      try error(blob, name: "mb")?.description
        == "kernel segment at 0x100000 (0xffef0000 bytes) does not fit in guest RAM")
  }

  @Test func multibootUnknownRequiredFlag() throws {
    var blob = [UInt8](repeating: 0, count: 256)
    let flags: UInt32 = 0x0001_0008
    blob.setLE(UInt32(0x1BAD_B002), at: 0)
    blob.setLE(flags, at: 4)
    blob.setLE(UInt32(0) &- (0x1BAD_B002 &+ flags), at: 8)
    #expect(
      try error(blob, name: "mb")?.description.contains("requires features Hostvisor lacks (flags 0x10008)") == true)
  }

  @Test func rawBinaryOutsideRAM() throws {
    let memory = try GuestMemory(size: 16 << 20)
    let error = TestSupport.loaderError { () throws(LoaderError) in
      try KernelLoader.load(
        kernel: [0xF4, 0xF4], kernelName: "raw", initrd: nil, commandLine: "", memory: memory,
        rawLoadAddress: UInt64.max - 1)
    }
    #expect(error?.description == "kernel segment at 0xfffffffffffffffe (0x2 bytes) does not fit in guest RAM")
  }
}
