import Foundation
import Testing
import VMCore

@testable import Loaders

/// The Linux loader on the real Debian bzImage, checked against the definitions in the x86
/// boot protocol document (Documentation/arch/x86/boot.rst).
@Suite struct LinuxBootTests {
  static let commandLine = "console=ttyS0 panic=-1 hostvisor.test=1"

  struct Loaded {
    let memory: GuestMemory
    let image: BootImage
    let kernelFile: [UInt8]
    let initrdFile: [UInt8]
  }

  func loadDefaultGuest(memorySize: UInt64 = 512 << 20, commandLine: String = Self.commandLine) throws -> Loaded {
    let guest = try TestSupport.defaultGuest.get()
    let memory = try GuestMemory(size: memorySize)
    let image = try KernelLoader.load(
      kernelPath: guest.kernel, initrdPath: guest.initrd, commandLine: commandLine, memory: memory)
    return Loaded(
      memory: memory, image: image, kernelFile: try TestSupport.bytes(atPath: guest.kernel),
      initrdFile: try TestSupport.bytes(atPath: guest.initrd))
  }

  @Test func theFileIsABzImageByTheProtocolsDefinitions() throws {
    let guest = try TestSupport.defaultGuest.get()
    let file = try TestSupport.bytes(atPath: guest.kernel)
    #expect(file.le(UInt16.self, at: 0x1FE) == 0xAA55)
    #expect(Array(file[0x202..<0x206]) == Array("HdrS".utf8))
    #expect(file.le(UInt16.self, at: 0x206) >= 0x020C)
    #expect(KernelLoader.detectFormat(file) == .linuxBzImage)

    let header = try LinuxLoader.parseHeader(file)
    let storedSectors = UInt64(file[0x1F1])
    #expect(header.setupSectors == (storedSectors == 0 ? 4 : storedSectors))
    #expect(header.kernelOffset == (header.setupSectors + 1) * 512)
    #expect(header.version == file.le(UInt16.self, at: 0x206))
    #expect(header.loadFlags == file[0x211])
    #expect(header.initrdAddressMax == file.le(UInt32.self, at: 0x22C))
    #expect(header.kernelAlignment == file.le(UInt32.self, at: 0x230))
    #expect(header.relocatable == (file[0x234] != 0))
    #expect(header.extendedLoadFlags == file.le(UInt16.self, at: 0x236))
    #expect(header.has64BitEntry)
    #expect(header.commandLineSize == file.le(UInt32.self, at: 0x238))
    #expect(header.preferredAddress == file.le(UInt64.self, at: 0x258))
    #expect(header.initSize == file.le(UInt32.self, at: 0x260))
    #expect(header.headerEnd == 0x202 + UInt64(file[0x201]))
  }

  @Test func kernelBytesLandAtThePreferredAddress() throws {
    let loaded = try loadDefaultGuest()
    let file = loaded.kernelFile
    let header = try LinuxLoader.parseHeader(file)
    let loadAddress = file.le(UInt64.self, at: 0x258)
    #expect(loaded.image.format == .linuxBzImage)
    #expect(loaded.image.kernelRange.lowerBound == loadAddress)
    let kernelBytes = Array(file[Int(header.kernelOffset)...])
    let inGuest = try loaded.memory.readBytes(at: loadAddress, count: kernelBytes.count)
    #expect(inGuest == kernelBytes)
    #expect(loaded.image.entry == loadAddress + 0x200)
    #expect(loaded.image.kernelRange.count >= Int(header.initSize))
  }

  @Test func bootParamsCarryTheSetupHeaderAndTheLoadersFields() throws {
    let loaded = try loadDefaultGuest()
    let memory = loaded.memory
    let file = loaded.kernelFile
    let base = try #require(loaded.image.bootParamsAddress)
    #expect(base == BootLayout.bootParamsAddress)
    let headerEnd = 0x202 + Int(file[0x201])
    let params = try memory.readBytes(at: base, count: 4096)

    // The setup header is copied from the file; only fields the loader writes may differ.
    // type_of_loader, loadflags, code32_start, ramdisk_image/size, heap_end_ptr, ext_loader_*,
    // cmd_line_ptr, hardware_subarch(_data), setup_data.
    let writtenByLoader: Set<Int> = Set(0x210..<0x212).union(0x214..<0x220).union(0x224..<0x22C)
      .union(0x23C..<0x248).union(0x250..<0x258)
    for offset in 0x1F1..<headerEnd where !writtenByLoader.contains(offset) {
      #expect(params[offset] == file[offset], "boot_params byte \(String(offset, radix: 16))")
    }
    #expect(params.le(UInt16.self, at: 0x1FE) == 0xAA55)
    #expect(Array(params[0x202..<0x206]) == Array("HdrS".utf8))
    // Everything outside the header that the loader does not set is zero.
    #expect(params[0..<0xC0].allSatisfy { $0 == 0 })
    #expect(params[headerEnd..<0x2D0].allSatisfy { $0 == 0 })

    #expect(params[0x210] == 0xFF, "type_of_loader")
    #expect(params[0x211] == file[0x211] & 0x7F, "loadflags without CAN_USE_HEAP")
    #expect(params.le(UInt32.self, at: 0x214) == UInt32(file.le(UInt64.self, at: 0x258)), "code32_start = load address")
    #expect(params.le(UInt64.self, at: 0x250) == 0, "setup_data")

    // cmd_line_ptr → the NUL-terminated command line.
    let commandLinePointer = UInt64(params.le(UInt32.self, at: 0x228))
    #expect(commandLinePointer == loaded.image.commandLineAddress)
    let line = try memory.readBytes(at: commandLinePointer, count: Self.commandLine.utf8.count + 1)
    #expect(Array(line.dropLast()) == Array(Self.commandLine.utf8))
    #expect(line.last == 0)
    #expect(UInt64(params.le(UInt32.self, at: 0x238)) >= UInt64(Self.commandLine.utf8.count))

    // The state enters the 64-bit entry point with RSI = boot_params.
    #expect(loaded.image.state.rsi == base)
  }

  /// A kernel without XLF_KERNEL_64 (a 32-bit kernel; here the Debian kernel with the flag
  /// cleared) is entered as the 32-bit boot protocol says: protected mode, paging off, at
  /// code32_start, flat __BOOT_CS/__BOOT_DS from a GDT in RAM, ESI = boot_params, EBP = EDI =
  /// EBX = 0.
  @Test func kernelWithout64BitEntryStartsAtThe32BitEntry() throws {
    let guest = try TestSupport.defaultGuest.get()
    var file = try TestSupport.bytes(atPath: guest.kernel)
    file.setLE(file.le(UInt16.self, at: 0x236) & ~1, at: 0x236)
    let memory = try GuestMemory(size: 512 << 20)
    let image = try KernelLoader.load(
      kernel: file, kernelName: "k32", initrd: nil, commandLine: Self.commandLine, memory: memory)
    let state = image.state
    let params = try memory.readBytes(at: BootLayout.bootParamsAddress, count: 4096)
    let code32Start = UInt64(params.le(UInt32.self, at: 0x214))
    #expect(code32Start == image.kernelRange.lowerBound)
    #expect(state.rip == code32Start && image.entry == code32Start)
    #expect(state.cr0 & 1 == 1 && state.cr0 & (1 << 31) == 0, "protected mode, paging off")
    #expect(state.efer == 0)
    #expect(state.cs.selector == 0x10 && state.cs.db && !state.cs.l && state.cs.base == 0)
    #expect(state.cs.limit == 0xFFFF_FFFF && state.cs.type & 0xA == 0xA, "flat execute/read code")
    for data in [state.ds, state.es, state.ss] {
      #expect(data.selector == 0x18 && data.base == 0 && data.limit == 0xFFFF_FFFF && data.type & 2 == 2)
    }
    // The selectors name descriptors in the GDT that match the hidden segment state.
    let gdt = try memory.readBytes(at: state.gdt.base, count: Int(state.gdt.limit) + 1)
    #expect(gdt.le(UInt64.self, at: 0x10) == BootCPUSetup.descriptor(for: state.cs))
    #expect(gdt.le(UInt64.self, at: 0x18) == BootCPUSetup.descriptor(for: state.ds))
    #expect(state.rsi == BootLayout.bootParamsAddress)
    #expect(state.rbp == 0 && state.rdi == 0 && state.rbx == 0)
    #expect(state.rflags & (1 << 9) == 0, "interrupts off")
  }

  @Test func initrdIsPlacedHighPageAlignedAndClearOfTheKernel() throws {
    let loaded = try loadDefaultGuest()
    let params = try loaded.memory.readBytes(at: BootLayout.bootParamsAddress, count: 4096)
    let header = try LinuxLoader.parseHeader(loaded.kernelFile)
    let image = UInt64(params.le(UInt32.self, at: 0x218)) | UInt64(params.le(UInt32.self, at: 0xC0)) << 32
    let size = UInt64(params.le(UInt32.self, at: 0x21C)) | UInt64(params.le(UInt32.self, at: 0xC4)) << 32
    #expect(size == UInt64(loaded.initrdFile.count))
    #expect(loaded.image.initrdRange == image..<(image + size))
    #expect(image % 4096 == 0)
    #expect(image + size - 1 <= UInt64(header.initrdAddressMax))
    #expect(image + size <= 512 << 20)
    // As high as allowed: less than a page below the top of RAM.
    #expect((512 << 20) - (image + size) < 4096)
    let kernelEnd = header.preferredAddress + UInt64(header.initSize)
    #expect(image >= kernelEnd || image + size <= header.preferredAddress)
    #expect(try loaded.memory.readBytes(at: image, count: Int(size)) == loaded.initrdFile)
  }

  /// Reads the e820 table out of boot_params.
  func e820Table(_ memory: GuestMemory) throws -> [E820Entry] {
    let params = try memory.readBytes(at: BootLayout.bootParamsAddress, count: 4096)
    let count = Int(params[0x1E8])
    return (0..<count).map { index in
      let slot = 0x2D0 + index * 20
      return E820Entry(
        address: params.le(UInt64.self, at: slot), size: params.le(UInt64.self, at: slot + 8),
        type: E820Type(rawValue: params.le(UInt32.self, at: slot + 16)) ?? .unusable)
    }
  }

  func checkMemoryMap(_ table: [E820Entry], memory: GuestMemory) {
    #expect(!table.isEmpty)
    for (previous, next) in zip(table, table.dropFirst()) {
      #expect(previous.end <= next.address, "e820 entries \(previous) and \(next) overlap or are unsorted")
    }
    let usable = table.filter { $0.type == .ram }
    // Every byte of guest RAM is usable except the EBDA and BIOS holes below 1 MiB.
    for range in memory.ramRanges {
      var cursor = range.base
      let end = range.base + range.length
      while cursor < end {
        if cursor >= 0x9FC00 && cursor < 0x10_0000 {
          cursor = 0x10_0000
          continue
        }
        guard let entry = usable.first(where: { $0.address <= cursor && cursor < $0.end }) else {
          Issue.record("RAM at 0x\(String(cursor, radix: 16)) is not in the e820 map")
          return
        }
        cursor = entry.end
      }
    }
    // And nothing usable lies outside RAM.
    for entry in usable {
      #expect(memory.contains(entry.address, length: entry.size), "e820 RAM entry \(entry) is not guest RAM")
    }
    #expect(table.contains(E820Entry(address: 0x9FC00, size: 0x400, type: .reserved)))
    #expect(table.contains(E820Entry(address: 0xF0000, size: 0x10000, type: .reserved)))
  }

  @Test func e820CoversRAMSortedWithoutOverlap() throws {
    let loaded = try loadDefaultGuest()
    let table = try e820Table(loaded.memory)
    #expect(table == loaded.image.memoryMap)
    checkMemoryMap(table, memory: loaded.memory)
    #expect(table.first == E820Entry(address: 0, size: 0x9FC00, type: .ram))
    #expect(table.last == E820Entry(address: 0x10_0000, size: (512 << 20) - 0x10_0000, type: .ram))
  }

  @Test func e820ReportsHighMemoryAbove4GiB() throws {
    let loaded = try loadDefaultGuest(memorySize: 5 << 30)
    let table = try e820Table(loaded.memory)
    checkMemoryMap(table, memory: loaded.memory)
    #expect(table.contains(E820Entry(address: 1 << 32, size: (5 << 30) - 0xC000_0000, type: .ram)))
    #expect(table.contains(E820Entry(address: 0x10_0000, size: 0xC000_0000 - 0x10_0000, type: .ram)))
    // initrd_addr_max (0x7fffffff) keeps the initrd below 2 GiB even with more RAM.
    let initrd = try #require(loaded.image.initrdRange)
    #expect(initrd.upperBound <= 0x8000_0000)
    #expect(0x8000_0000 - initrd.upperBound < 4096)
  }

  @Test func reservedRangesAreCarvedOutOfRAM() throws {
    let memory = try GuestMemory(size: 64 << 20)
    let acpi = E820Entry(address: 0x3F0_0000, size: 0x10_0000, type: .acpiReclaimable)
    let table = E820Map.build(for: memory, reserved: [acpi])
    checkMapIsSortedAndDisjoint(table)
    #expect(table.contains(acpi))
    #expect(table.contains(E820Entry(address: 0x10_0000, size: 0x3F0_0000 - 0x10_0000, type: .ram)))
    #expect(!table.contains { $0.type == .ram && $0.address < acpi.end && acpi.address < $0.end })
  }

  func checkMapIsSortedAndDisjoint(_ table: [E820Entry]) {
    for (previous, next) in zip(table, table.dropFirst()) { #expect(previous.end <= next.address) }
  }

  @Test func cpuStateIsTheProtocols64BitEntry() throws {
    let loaded = try loadDefaultGuest()
    let state = loaded.image.state
    let memory = loaded.memory
    #expect(state.rip == loaded.image.entry)
    #expect(state.rsi == BootLayout.bootParamsAddress)
    #expect(state.cs.selector == 0x10)
    #expect(state.cs.l && !state.cs.db)
    for segment in [state.ds, state.es, state.ss] { #expect(segment.selector == 0x18) }
    #expect(state.rflags & (1 << 9) == 0, "interrupts are off")
    #expect(state.cr0 & X86.cr0PE != 0 && state.cr0 & X86.cr0PG != 0)
    #expect(state.cr4 & X86.cr4PAE != 0)
    #expect(state.efer & X86.eferLME != 0 && state.efer & X86.eferLMA != 0)

    // The GDT in memory holds 4 GiB flat descriptors for __BOOT_CS and __BOOT_DS.
    let code = try memory.read(UInt64.self, at: state.gdt.base + 0x10)
    let data = try memory.read(UInt64.self, at: state.gdt.base + 0x18)
    #expect(state.gdt.limit >= 0x1F)
    #expect(code == 0x00AF_9B00_0000_FFFF, "present, DPL 0, execute/read, L=1, G=1, limit 0xFFFFF")
    #expect(data == 0x00CF_9300_0000_FFFF, "present, DPL 0, read/write, D/B=1, G=1, limit 0xFFFFF")
    #expect(BootCPUSetup.descriptor(for: state.cs) == code)
    #expect(BootCPUSetup.descriptor(for: state.ds) == data)
  }

  @Test func pageTablesIdentityMapWhatTheKernelTouches() throws {
    let loaded = try loadDefaultGuest()
    let state = loaded.image.state
    let memory = loaded.memory
    var addresses: [UInt64] = [
      state.rip, state.rsi, BootLayout.commandLineAddress, loaded.image.kernelRange.lowerBound,
      loaded.image.kernelRange.upperBound - 1, state.gdt.base, 0, 0xFFFF_FFFF, 0xFEE0_0000,
    ]
    if let initrd = loaded.image.initrdRange { addresses += [initrd.lowerBound, initrd.upperBound - 1] }
    for address in addresses {
      #expect(try PageWalk.translate(address, cr3: state.cr3, memory: memory) == address)
    }
    #expect(throws: PageWalk.Failure.self) { try PageWalk.translate(1 << 32, cr3: state.cr3, memory: memory) }
  }

  @Test func longCommandLinesAreTruncatedAtCmdlineSize() throws {
    let long = String(repeating: "a", count: 5000)
    let loaded = try loadDefaultGuest(commandLine: long)
    let limit = Int(loaded.kernelFile.le(UInt32.self, at: 0x238))
    let line = try loaded.memory.readBytes(at: BootLayout.commandLineAddress, count: limit + 1)
    #expect(line.dropLast().allSatisfy { $0 == UInt8(ascii: "a") })
    #expect(line.last == 0)
    #expect(loaded.image.warnings.contains { $0.contains("command line") })
  }

  @Test func aSmallGuestGetsARelocatedKernelOrAClearError() throws {
    let guest = try TestSupport.defaultGuest.get()
    // 60 MiB: below pref_address + init_size; the relocatable kernel moves down to 2 MiB
    // but the initrd no longer fits beside it.
    let memory = try GuestMemory(size: 60 << 20)
    let error = TestSupport.loaderError { () throws(LoaderError) in
      try KernelLoader.load(kernelPath: guest.kernel, initrdPath: guest.initrd, commandLine: "", memory: memory)
    }
    #expect(error?.description.hasPrefix("initrd '\(guest.initrd)'") == true, "\(String(describing: error))")
    let image = try KernelLoader.load(kernelPath: guest.kernel, initrdPath: nil, commandLine: "", memory: memory)
    #expect(image.kernelRange.lowerBound == 0x20_0000)
    #expect(image.warnings.contains { $0.contains("preferred address") })

    // 16 MiB: the kernel file fits in RAM but not at any address at or above 1 MiB.
    let small = try GuestMemory(size: 16 << 20)
    let smallError = TestSupport.loaderError { () throws(LoaderError) in
      try KernelLoader.load(kernelPath: guest.kernel, initrdPath: nil, commandLine: "", memory: small)
    }
    #expect(smallError?.description.hasSuffix("does not fit in guest RAM") == true, "\(String(describing: smallError))")

    // 2 MiB (the smallest configurable machine): the file alone is larger than RAM.
    let tiny = try GuestMemory(size: 2 << 20)
    let tinyError = TestSupport.loaderError { () throws(LoaderError) in
      try KernelLoader.load(kernelPath: guest.kernel, initrdPath: nil, commandLine: "", memory: tiny)
    }
    let fileSize = try TestSupport.bytes(atPath: guest.kernel).count
    #expect(
      tinyError?.description == "kernel '\(guest.kernel)' (\(fileSize) bytes) is larger than guest RAM (2097152 bytes)",
      "\(String(describing: tinyError))")
  }

  func syntheticHeader(initrdAddressMax: UInt32, above4G: Bool) -> LinuxSetupHeader {
    LinuxSetupHeader(
      setupSectors: 4, bootFlag: 0xAA55, version: 0x020F, loadFlags: 1, initrdAddressMax: initrdAddressMax,
      kernelAlignment: 0x20_0000, relocatable: true, minimumAlignmentShift: 21,
      extendedLoadFlags: above4G ? 0x3 : 0x1, commandLineSize: 2047, preferredAddress: 0x100_0000,
      initSize: 0x100_0000, headerEnd: 0x26C)
  }

  @Test func initrdPlacementFallsBackBelowTheKernelThenAbove4GiB() throws {
    let memory = try GuestMemory(size: 8 << 30)
    let kernel: Range<UInt64> = 0x100_0000..<0x200_0000
    let header = syntheticHeader(initrdAddressMax: 0x7FFF_FFFF, above4G: true)
    // Normal: just below initrd_addr_max + 1.
    let normal = try LinuxLoader.placeInitrd(size: 0x1234, name: "i", header: header, kernel: kernel, memory: memory)
    #expect(normal.lowerBound == 0x7FFF_E000 && normal.count == 0x1234)
    // Too big for low RAM below 2 GiB: the top of high RAM, since XLF_CAN_BE_LOADED_ABOVE_4G is set.
    let big: UInt64 = 3 << 30
    let high = try LinuxLoader.placeInitrd(size: big, name: "i", header: header, kernel: kernel, memory: memory)
    #expect(high == (9 << 30) - big..<(9 << 30))
    // Without the flag it is an error.
    let lowOnly = syntheticHeader(initrdAddressMax: 0x7FFF_FFFF, above4G: false)
    #expect(throws: LoaderError.self) {
      try LinuxLoader.placeInitrd(size: big, name: "i", header: lowOnly, kernel: kernel, memory: memory)
    }
    // A kernel reaching up to the ceiling leaves only the space between 1 MiB and the kernel.
    let tall: Range<UInt64> = 0x100_0000..<0x8000_0000
    let below = try LinuxLoader.placeInitrd(size: 0x80_0000, name: "i", header: lowOnly, kernel: tall, memory: memory)
    #expect(below == 0x80_0000..<0x100_0000)
  }
}
