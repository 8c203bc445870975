import Synchronization
import VMCore

/// QEMU's firmware configuration interface ("fw_cfg", QEMU docs/specs/fw_cfg.rst), as on a
/// QEMU PC: the selector register at port 0x510 (16-bit, little-endian), the data register at
/// 0x511 (reads return the selected item's bytes in order, then zeros) and the DMA address
/// register at 0x514 (64-bit big-endian: 0x514 holds the high half, a write of the low half at
/// 0x518 starts the transfer; reading it returns the signature "QEMU CFG"). DMA descriptors are
/// `{be32 control; be32 length; be64 address}` in guest RAM; control bits: ERROR 1, READ 2,
/// SKIP 4, SELECT 8 (selector in bits 31:16), WRITE 0x10 (refused: every item is read-only).
/// On completion the control field is rewritten: 0, or ERROR.
///
/// Items are byte strings under 16-bit keys (bit 14, the write channel, is ignored); files get
/// keys from 0x20 and are listed in the file directory (key 0x19: be32 count, then per file
/// `{be32 size; be16 select; be16 reserved; char name[56]}`, sorted by name).
public final class FirmwareConfiguration: PortIODevice, Sendable {
  /// The selector port; the data port is +1, the DMA address register +4.
  public static let selectorPort: UInt16 = 0x510
  /// The data port.
  public static let dataPort: UInt16 = 0x511
  /// The DMA address register (high half; the low half is at +4).
  public static let dmaPort: UInt16 = 0x514
  /// Ports claimed from `selectorPort`.
  public static let portCount = 12

  /// Well-known keys (QEMU's include/standard-headers/linux/qemu_fw_cfg.h).
  public enum Key {
    public static let signature: UInt16 = 0x00
    public static let id: UInt16 = 0x01
    public static let uuid: UInt16 = 0x02
    public static let ramSize: UInt16 = 0x03
    public static let noGraphic: UInt16 = 0x04
    public static let cpuCount: UInt16 = 0x05
    public static let kernelAddress: UInt16 = 0x07
    public static let kernelSize: UInt16 = 0x08
    public static let kernelCommandLine: UInt16 = 0x09
    public static let initrdAddress: UInt16 = 0x0A
    public static let initrdSize: UInt16 = 0x0B
    public static let bootMenu: UInt16 = 0x0E
    public static let maximumCPUCount: UInt16 = 0x0F
    public static let kernelEntry: UInt16 = 0x10
    public static let commandLineAddress: UInt16 = 0x13
    public static let commandLineSize: UInt16 = 0x14
    public static let commandLineData: UInt16 = 0x15
    public static let fileDirectory: UInt16 = 0x19
    public static let firstFile: UInt16 = 0x20
  }

  /// FW_CFG_ID bits: the traditional (port) interface and DMA.
  public static let featureTraditional: UInt32 = 1
  public static let featureDMA: UInt32 = 2
  /// What reads of the DMA address register return: "QEMU CFG".
  public static let dmaSignature: [UInt8] = Array("QEMU CFG".utf8)
  /// File names hold up to 55 bytes plus the terminating NUL.
  public static let maximumFileNameLength = 55

  private struct State {
    var selector: UInt16 = 0
    var offset = 0
    var dmaAddressHigh: UInt32 = 0
  }

  private let items: [UInt16: [UInt8]]
  private let memory: GuestMemory
  private let state = Mutex(State())

  /// A device serving `items` (keys below 0x20) and `files` (name, contents), doing DMA into
  /// `memory`. The signature, ID and file directory items are added.
  public init(memory: GuestMemory, items: [UInt16: [UInt8]], files: [(name: String, contents: [UInt8])]) {
    self.memory = memory
    var all = items
    all[Key.signature] = Array("QEMU".utf8)
    all[Key.id] = Self.littleEndian(Self.featureTraditional | Self.featureDMA)
    let sorted = files.sorted { $0.name < $1.name }
    var directory = Self.bigEndian(UInt32(sorted.count))
    for (index, file) in sorted.enumerated() {
      let key = Key.firstFile + UInt16(index)
      all[key] = file.contents
      directory += Self.bigEndian(UInt32(file.contents.count))
      directory += Self.bigEndian(key) + [0, 0]
      var name = Array(file.name.utf8.prefix(Self.maximumFileNameLength))
      name += [UInt8](repeating: 0, count: 56 - name.count)
      directory += name
    }
    all[Key.fileDirectory] = directory
    self.items = all
  }

  /// The standard items of a PC machine: signature, ID, UUID (zero), RAM size, CPU count (the
  /// number of processors the ACPI MADT lists), no graphics, no boot menu, the loaded kernel's
  /// address, size and entry, the initrd's address and size, the command line (address, size
  /// with its NUL, bytes) and the file "etc/e820" (the memory map the loader gave the kernel,
  /// entries `{le64 address; le64 length; le32 type}`).
  public static func standard(
    memory: GuestMemory, cpuCount: Int, kernel: Range<UInt64>, entry: UInt64, initrd: Range<UInt64>?,
    commandLine: String, commandLineAddress: UInt64, memoryMap: [(address: UInt64, length: UInt64, type: UInt32)]
  ) -> FirmwareConfiguration {
    let commandLineBytes = Array(commandLine.utf8) + [0]
    let items: [UInt16: [UInt8]] = [
      Key.uuid: [UInt8](repeating: 0, count: 16),
      Key.ramSize: littleEndian(memory.ramRanges.reduce(UInt64(0)) { $0 + $1.length }),
      Key.noGraphic: littleEndian(UInt16(1)),
      Key.cpuCount: littleEndian(UInt16(clamping: cpuCount)),
      Key.maximumCPUCount: littleEndian(UInt16(clamping: cpuCount)),
      Key.bootMenu: littleEndian(UInt16(0)),
      Key.kernelAddress: littleEndian(UInt32(truncatingIfNeeded: kernel.lowerBound)),
      Key.kernelSize: littleEndian(UInt32(truncatingIfNeeded: kernel.count)),
      Key.kernelEntry: littleEndian(UInt32(truncatingIfNeeded: entry)),
      Key.initrdAddress: littleEndian(UInt32(truncatingIfNeeded: initrd?.lowerBound ?? 0)),
      Key.initrdSize: littleEndian(UInt32(truncatingIfNeeded: initrd?.count ?? 0)),
      Key.kernelCommandLine: littleEndian(UInt32(truncatingIfNeeded: commandLineAddress)),
      Key.commandLineAddress: littleEndian(UInt32(truncatingIfNeeded: commandLineAddress)),
      Key.commandLineSize: littleEndian(UInt32(commandLineBytes.count)),
      Key.commandLineData: commandLineBytes,
    ]
    var e820: [UInt8] = []
    for entry in memoryMap {
      e820 += littleEndian(entry.address) + littleEndian(entry.length) + littleEndian(entry.type)
    }
    return FirmwareConfiguration(memory: memory, items: items, files: [("etc/e820", e820)])
  }

  /// Registers the device's ports on `bus`.
  public func register(on bus: IOBus) throws {
    try bus.registerPorts(Self.selectorPort, count: Self.portCount, device: self)
  }

  /// The bytes of item `key` (nil when there is none).
  public func item(_ key: UInt16) -> [UInt8]? { items[key & ~0x4000] }

  public func portRead(port: UInt16, size: Int) -> UInt32 {
    switch port {
    case Self.dataPort:
      return state.withLock { state in
        let bytes = items[state.selector] ?? []
        var value: UInt32 = 0
        for index in 0..<min(size, 4) {
          let byte = state.offset < bytes.count ? bytes[state.offset] : 0
          if state.offset < bytes.count { state.offset += 1 }
          value |= UInt32(byte) << UInt32(8 * index)
        }
        return value
      }
    case Self.dmaPort..<(Self.dmaPort + 8):
      var value: UInt32 = 0
      for index in 0..<min(size, 4) {
        let position = Int(port - Self.dmaPort) + index
        if position < 8 { value |= UInt32(Self.dmaSignature[position]) << UInt32(8 * index) }
      }
      return value
    default:
      return 0
    }
  }

  public func portWrite(port: UInt16, size: Int, value: UInt32) {
    switch port {
    case Self.selectorPort:
      state.withLock { state in
        state.selector = UInt16(truncatingIfNeeded: size == 1 ? value & 0xFF : value) & ~0x4000
        state.offset = 0
      }
    case Self.dmaPort where size == 4:
      state.withLock { $0.dmaAddressHigh = UInt32(bigEndian: value) }
    case Self.dmaPort + 4 where size == 4:
      let high = state.withLock { state in
        defer { state.dmaAddressHigh = 0 }
        return state.dmaAddressHigh
      }
      transfer(descriptor: UInt64(high) << 32 | UInt64(UInt32(bigEndian: value)))
    default:
      break
    }
  }

  /// Runs the DMA request whose descriptor is at `address`; a descriptor outside RAM is ignored.
  private func transfer(descriptor address: UInt64) {
    guard let control = try? UInt32(bigEndian: memory.read(UInt32.self, at: address)),
      let length = try? UInt32(bigEndian: memory.read(UInt32.self, at: address + 4)),
      let target = try? UInt64(bigEndian: memory.read(UInt64.self, at: address + 8))
    else { return }
    var failed = false
    state.withLock { state in
      if control & 0x08 != 0 {
        state.selector = UInt16(truncatingIfNeeded: control >> 16) & ~0x4000
        state.offset = 0
      }
      if control & 0x10 != 0 {
        failed = true  // nothing is writable
        return
      }
      guard control & 0x06 != 0 else { return }
      let bytes = items[state.selector] ?? []
      let available = max(0, bytes.count - state.offset)
      let count = min(Int(length), available)
      if control & 0x02 != 0 {
        // Into guest RAM only (checked before anything is copied); zeros past the item's end.
        guard let destination = try? memory.slice(at: target, length: UInt64(length)) else {
          failed = true
          return
        }
        for index in 0..<count { destination[index] = bytes[state.offset + index] }
        if Int(length) > count {
          _ = UnsafeMutableRawBufferPointer(rebasing: destination[count...]).initializeMemory(
            as: UInt8.self, repeating: 0)
        }
        memory.noteWrite(at: target, length: UInt64(length))
      }
      state.offset += count
    }
    try? memory.write(UInt32(failed ? 1 : 0).bigEndian, at: address)
  }

  static func littleEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value.littleEndian) { Array($0) }
  }

  static func bigEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value.bigEndian) { Array($0) }
  }
}
