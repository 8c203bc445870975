import Synchronization
import VMCore

/// Standard offsets in a type-0 PCI configuration header (PCI Local Bus Specification 3.0, 6.1).
public enum PCIConfigOffset {
  public static let vendorID = 0x00
  public static let deviceID = 0x02
  public static let command = 0x04
  public static let status = 0x06
  public static let revisionID = 0x08
  public static let classCode = 0x09
  public static let cacheLineSize = 0x0C
  public static let latencyTimer = 0x0D
  public static let headerType = 0x0E
  public static let bar0 = 0x10
  public static let subsystemVendorID = 0x2C
  public static let subsystemID = 0x2E
  public static let expansionROM = 0x30
  public static let capabilitiesPointer = 0x34
  public static let interruptLine = 0x3C
  public static let interruptPin = 0x3D
}

/// Bits of the command register.
public enum PCICommand {
  public static let ioSpace: UInt16 = 1 << 0
  public static let memorySpace: UInt16 = 1 << 1
  public static let busMaster: UInt16 = 1 << 2
  public static let parityErrorResponse: UInt16 = 1 << 6
  public static let serrEnable: UInt16 = 1 << 8
  public static let interruptDisable: UInt16 = 1 << 10
}

/// Bits of the status register.
public enum PCIStatus {
  public static let interruptStatus: UInt16 = 1 << 3
  public static let capabilitiesList: UInt16 = 1 << 4
}

/// Capability IDs used by Hostvisor.
public enum PCICapabilityID {
  public static let vendorSpecific: UInt8 = 0x09
  public static let msix: UInt8 = 0x11
}

/// The identity registers of a PCI function.
public struct PCIIdentity: Sendable, Equatable {
  public var vendorID: UInt16
  public var deviceID: UInt16
  public var revisionID: UInt8
  /// Base class, subclass and programming interface, e.g. (0x06, 0x00, 0x00) for a host bridge.
  public var classCode: (base: UInt8, sub: UInt8, interface: UInt8)
  public var subsystemVendorID: UInt16
  public var subsystemID: UInt16

  public init(
    vendorID: UInt16, deviceID: UInt16, revisionID: UInt8 = 0,
    classCode: (base: UInt8, sub: UInt8, interface: UInt8),
    subsystemVendorID: UInt16 = 0, subsystemID: UInt16 = 0
  ) {
    self.vendorID = vendorID
    self.deviceID = deviceID
    self.revisionID = revisionID
    self.classCode = classCode
    self.subsystemVendorID = subsystemVendorID
    self.subsystemID = subsystemID
  }

  public static func == (lhs: PCIIdentity, rhs: PCIIdentity) -> Bool {
    lhs.vendorID == rhs.vendorID && lhs.deviceID == rhs.deviceID && lhs.revisionID == rhs.revisionID
      && lhs.classCode == rhs.classCode && lhs.subsystemVendorID == rhs.subsystemVendorID
      && lhs.subsystemID == rhs.subsystemID
  }
}

/// The kind of a base address register.
public enum PCIBARKind: Sendable, Equatable {
  /// A 32-bit memory BAR.
  case memory32(prefetchable: Bool)
  /// A 64-bit memory BAR; it uses two BAR slots (`index` and `index + 1`).
  case memory64(prefetchable: Bool)
  /// An I/O port BAR.
  case io
}

/// A base address register a function declares: its slot, power-of-two size and kind.
public struct PCIBARDefinition: Sendable, Equatable {
  /// BAR slot 0-5.
  public let index: Int
  /// Size in bytes; a power of two (at least 16 for memory, 4 for I/O).
  public let size: UInt64
  public let kind: PCIBARKind

  public init(index: Int, size: UInt64, kind: PCIBARKind) {
    self.index = index
    self.size = size
    self.kind = kind
  }

  /// Whether this BAR decodes memory (as opposed to I/O ports).
  public var isMemory: Bool { kind != .io }
}

/// The configuration space of one PCI function: the bytes the guest sees, which bits it may
/// write, which bits are write-1-to-clear, and the BARs decoded from it.
///
/// BAR sizing falls out of the masks: the address bits below the BAR size are read-only zero,
/// so writing all ones and reading back yields `~(size - 1) | type bits`, as the PCI
/// specification requires. Thread-safe: vCPU threads access it concurrently.
public final class PCIConfigSpace: Sendable {
  private struct Storage {
    var bytes: [UInt8]
    var writable: [UInt8]
    var writeOneToClear: [UInt8]
    var bars: [PCIBARDefinition?] = Array(repeating: nil, count: 6)
    var lastCapability = 0
    var nextCapabilityOffset = 0x40
  }

  /// 256 for conventional PCI, 4096 for extended (PCIe/ECAM) configuration space.
  public let size: Int
  private let storage: Mutex<Storage>

  /// Creates a type-0 header with `identity`, interrupt pin `interruptPin` (0 none, 1 INTA#...4 INTD#).
  public init(identity: PCIIdentity, interruptPin: UInt8 = 1, extended: Bool = false) {
    size = extended ? 4096 : 256
    var storage = Storage(
      bytes: Array(repeating: 0, count: size), writable: Array(repeating: 0, count: size),
      writeOneToClear: Array(repeating: 0, count: size))
    func put(_ offset: Int, _ value: UInt64, _ count: Int) {
      for index in 0..<count { storage.bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
    }
    put(PCIConfigOffset.vendorID, UInt64(identity.vendorID), 2)
    put(PCIConfigOffset.deviceID, UInt64(identity.deviceID), 2)
    put(PCIConfigOffset.revisionID, UInt64(identity.revisionID), 1)
    put(PCIConfigOffset.classCode, UInt64(identity.classCode.interface), 1)
    put(PCIConfigOffset.classCode + 1, UInt64(identity.classCode.sub), 1)
    put(PCIConfigOffset.classCode + 2, UInt64(identity.classCode.base), 1)
    put(PCIConfigOffset.subsystemVendorID, UInt64(identity.subsystemVendorID), 2)
    put(PCIConfigOffset.subsystemID, UInt64(identity.subsystemID), 2)
    put(PCIConfigOffset.interruptPin, UInt64(interruptPin), 1)
    let command =
      PCICommand.ioSpace | PCICommand.memorySpace | PCICommand.busMaster | PCICommand.parityErrorResponse
      | PCICommand.serrEnable | PCICommand.interruptDisable
    storage.writable[PCIConfigOffset.command] = UInt8(command & 0xFF)
    storage.writable[PCIConfigOffset.command + 1] = UInt8(command >> 8)
    // Status: the error bits 8 and 11-15 are write-1-to-clear.
    storage.writeOneToClear[PCIConfigOffset.status] = 0
    storage.writeOneToClear[PCIConfigOffset.status + 1] = 0xF9
    storage.writable[PCIConfigOffset.cacheLineSize] = 0xFF
    storage.writable[PCIConfigOffset.latencyTimer] = 0xFF
    storage.writable[PCIConfigOffset.interruptLine] = 0xFF
    self.storage = Mutex(storage)
  }

  /// Declares a BAR. Call before the function is attached to a bus.
  public func addBAR(_ bar: PCIBARDefinition) {
    precondition(bar.index >= 0 && bar.index < 6, "BAR index out of range")
    precondition(bar.size.nonzeroBitCount == 1, "BAR size must be a power of two")
    storage.withLock { storage in
      let offset = PCIConfigOffset.bar0 + 4 * bar.index
      var low: UInt32
      var mask: UInt32
      switch bar.kind {
      case .io:
        precondition(bar.size >= 4 && bar.size <= 256, "I/O BAR size must be 4-256")
        low = 1
        mask = ~UInt32(bar.size - 1) & 0xFFFF_FFFC
      case .memory32(let prefetchable):
        precondition(bar.size >= 16 && bar.size <= 1 << 31, "32-bit BAR size must be 16 bytes-2 GiB")
        low = prefetchable ? 0x8 : 0
        mask = ~UInt32(bar.size - 1) & 0xFFFF_FFF0
      case .memory64(let prefetchable):
        precondition(bar.index < 5 && bar.size >= 16, "64-bit BAR needs two slots")
        low = (prefetchable ? 0x8 : 0) | 0x4
        mask = bar.size >= 1 << 32 ? 0 : ~UInt32(bar.size - 1) & 0xFFFF_FFF0
        let highMask: UInt32 = bar.size > 1 << 32 ? ~UInt32((bar.size >> 32) - 1) : 0xFFFF_FFFF
        for index in 0..<4 { storage.writable[offset + 4 + index] = UInt8(truncatingIfNeeded: highMask >> (8 * index)) }
      }
      for index in 0..<4 {
        storage.bytes[offset + index] = UInt8(truncatingIfNeeded: low >> (8 * index))
        storage.writable[offset + index] = UInt8(truncatingIfNeeded: mask >> (8 * index))
      }
      storage.bars[bar.index] = bar
    }
  }

  /// Appends a capability with `id` and `body` (the bytes after the ID and next pointer) to the
  /// capability list; `writableBody` marks the guest-writable bits of `body`. Returns the
  /// capability's offset in configuration space.
  @discardableResult
  public func addCapability(id: UInt8, body: [UInt8], writableBody: [UInt8]? = nil) -> Int {
    storage.withLock { storage in
      let offset = storage.nextCapabilityOffset
      let length = 2 + body.count
      precondition(offset + length <= 256, "capabilities do not fit in configuration space")
      storage.bytes[offset] = id
      storage.bytes[offset + 1] = 0
      for (index, byte) in body.enumerated() { storage.bytes[offset + 2 + index] = byte }
      if let writableBody {
        for (index, byte) in writableBody.enumerated() { storage.writable[offset + 2 + index] = byte }
      }
      if storage.lastCapability == 0 {
        storage.bytes[PCIConfigOffset.capabilitiesPointer] = UInt8(offset)
      } else {
        storage.bytes[storage.lastCapability + 1] = UInt8(offset)
      }
      storage.bytes[PCIConfigOffset.status] |= UInt8(PCIStatus.capabilitiesList)
      storage.lastCapability = offset
      storage.nextCapabilityOffset = (offset + length + 3) & ~3
      return offset
    }
  }

  /// Reads `size` (1, 2 or 4) bytes at `offset`; bytes past the end of the space read as zero.
  public func read(offset: Int, size: Int) -> UInt32 {
    storage.withLock { storage in
      var value: UInt32 = 0
      for index in 0..<size where offset + index >= 0 && offset + index < self.size {
        value |= UInt32(storage.bytes[offset + index]) << (8 * index)
      }
      return value
    }
  }

  /// A guest write of `size` bytes at `offset`, honouring the writable and write-1-to-clear masks.
  public func write(offset: Int, size: Int, value: UInt32) {
    storage.withLock { storage in
      for index in 0..<size where offset + index >= 0 && offset + index < self.size {
        let position = offset + index
        let byte = UInt8(truncatingIfNeeded: value >> (8 * index))
        let writable = storage.writable[position]
        var current = (storage.bytes[position] & ~writable) | (byte & writable)
        current &= ~(byte & storage.writeOneToClear[position])
        storage.bytes[position] = current
      }
    }
  }

  /// Sets bytes directly, bypassing the masks (for the device model and the firmware role of the VMM).
  public func setRaw(offset: Int, size: Int, value: UInt64) {
    storage.withLock { storage in
      for index in 0..<size where offset + index < self.size {
        storage.bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index))
      }
    }
  }

  /// Sets or clears bits of the status register (e.g. the interrupt status bit).
  public func setStatusBits(_ bits: UInt16, _ on: Bool) {
    storage.withLock { storage in
      var status =
        UInt16(storage.bytes[PCIConfigOffset.status]) | UInt16(storage.bytes[PCIConfigOffset.status + 1]) << 8
      status = on ? status | bits : status & ~bits
      storage.bytes[PCIConfigOffset.status] = UInt8(status & 0xFF)
      storage.bytes[PCIConfigOffset.status + 1] = UInt8(status >> 8)
    }
  }

  /// The command register.
  public var command: UInt16 { UInt16(read(offset: PCIConfigOffset.command, size: 2)) }

  /// The declared BARs.
  public var barDefinitions: [PCIBARDefinition] { storage.withLock { $0.bars.compactMap { $0 } } }

  /// The address a BAR currently holds (whether or not decoding is enabled).
  public func barAddress(_ index: Int) -> UInt64? {
    storage.withLock { storage -> UInt64? in
      guard index >= 0 && index < 6, let bar = storage.bars[index] else { return nil }
      func dword(_ offset: Int) -> UInt64 {
        var value: UInt64 = 0
        for byte in 0..<4 { value |= UInt64(storage.bytes[offset + byte]) << (8 * byte) }
        return value
      }
      let offset = PCIConfigOffset.bar0 + 4 * index
      switch bar.kind {
      case .io: return dword(offset) & 0xFFFF_FFFC
      case .memory32: return dword(offset) & 0xFFFF_FFF0
      case .memory64: return (dword(offset) & 0xFFFF_FFF0) | dword(offset + 4) << 32
      }
    }
  }

  /// Programs a BAR's address as firmware would (the low type bits are kept).
  public func setBARAddress(_ index: Int, _ address: UInt64) {
    guard let bar = storage.withLock({ $0.bars[index] }) else { return }
    let offset = PCIConfigOffset.bar0 + 4 * index
    let low = UInt32(read(offset: offset, size: 4))
    switch bar.kind {
    case .io: setRaw(offset: offset, size: 4, value: (address & 0xFFFF_FFFC) | UInt64(low & 0x3))
    case .memory32: setRaw(offset: offset, size: 4, value: (address & 0xFFFF_FFF0) | UInt64(low & 0xF))
    case .memory64:
      setRaw(offset: offset, size: 4, value: (address & 0xFFFF_FFF0) | UInt64(low & 0xF))
      setRaw(offset: offset + 4, size: 4, value: address >> 32)
    }
  }
}

// MARK: Machine state

/// The function's whole configuration space (header, BAR addresses, capabilities with their
/// guest-written bits). The identity bytes must match the function being restored.
extension PCIConfigSpace: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    writer.write(bytes: storage.withLock { $0.bytes })
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    let restored = try reader.readBytes(exactly: size, "PCI configuration space")
    let identityRanges = [0..<4, 8..<12, 0x2C..<0x30]
    try storage.withLock { (storage) throws(MachineStateError) in
      for range in identityRanges where storage.bytes[range] != restored[range] {
        throw MachineStateError("the state file does not match this machine: a PCI function's identity differs")
      }
      storage.bytes = restored
    }
  }
}
