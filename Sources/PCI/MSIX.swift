import Synchronization
import VMCore

/// Delivers a message-signalled interrupt. Each accelerator implements it: KVM with
/// KVM_SIGNAL_MSI, the software CPU through its local APICs.
public protocol MSIDelivery: AnyObject, Sendable {
  /// Writes `data` to the message `address` (0xFEExxxxx on x86) on behalf of a device.
  func deliverMSI(address: UInt64, data: UInt32)
}

/// A late-bound MSI target: devices hold it from construction; the accelerator attaches once
/// the machine is built. Messages sent before then are dropped.
public final class MSIRouter: MSIDelivery, Sendable {
  private let target = Mutex<(any MSIDelivery)?>(nil)
  public init() {}
  /// Attaches the accelerator's delivery.
  public func attach(_ delivery: any MSIDelivery) { target.withLock { $0 = delivery } }
  public func deliverMSI(address: UInt64, data: UInt32) {
    let delivery = target.withLock { $0 }
    delivery?.deliverMSI(address: address, data: data)
  }
}

/// The MSI-X capability of a function: the message control register in configuration space,
/// and the vector table and pending-bit array that live in one of the function's memory BARs.
///
/// Vectors start masked. A message for a masked vector (or while the function mask is set)
/// sets its pending bit; it is sent when the vector is unmasked. Messages are delivered only
/// when MSI-X is enabled in the message control register.
public final class MSIXController: Sendable {
  private struct Table {
    /// Four dwords per vector: address low, address high, data, vector control.
    var entries: [UInt32]
    var pending: [Bool]
  }

  /// Number of vectors (1-2048).
  public let vectorCount: Int
  /// The BAR holding the table and the PBA.
  public let bar: Int
  /// Offset of the table in the BAR (8-byte aligned).
  public let tableOffset: UInt64
  /// Offset of the pending-bit array in the BAR (8-byte aligned).
  public let pbaOffset: UInt64
  private let config: PCIConfigSpace
  private let capabilityOffset: Int
  private let table: Mutex<Table>
  private let delivery: Mutex<(any MSIDelivery)?>

  /// Bytes the table occupies in the BAR.
  public var tableSize: UInt64 { UInt64(vectorCount) * 16 }
  /// Bytes the PBA occupies in the BAR.
  public var pbaSize: UInt64 { UInt64((vectorCount + 63) / 64) * 8 }

  /// Adds the MSI-X capability to `config`.
  public init(config: PCIConfigSpace, vectorCount: Int, bar: Int, tableOffset: UInt64, pbaOffset: UInt64) {
    precondition(vectorCount >= 1 && vectorCount <= 2048)
    self.vectorCount = vectorCount
    self.bar = bar
    self.tableOffset = tableOffset
    self.pbaOffset = pbaOffset
    self.config = config
    var body: [UInt8] = []
    let control = UInt16(vectorCount - 1)
    body += [UInt8(control & 0xFF), UInt8(control >> 8)]
    let tableField = UInt32(tableOffset) | UInt32(bar)
    let pbaField = UInt32(pbaOffset) | UInt32(bar)
    for shift in stride(from: 0, to: 32, by: 8) { body.append(UInt8(truncatingIfNeeded: tableField >> shift)) }
    for shift in stride(from: 0, to: 32, by: 8) { body.append(UInt8(truncatingIfNeeded: pbaField >> shift)) }
    var writable = [UInt8](repeating: 0, count: body.count)
    writable[1] = 0xC0  // enable (bit 15) and function mask (bit 14)
    capabilityOffset = config.addCapability(id: PCICapabilityID.msix, body: body, writableBody: writable)
    var entries = [UInt32](repeating: 0, count: vectorCount * 4)
    for vector in 0..<vectorCount { entries[vector * 4 + 3] = 1 }
    table = Mutex(Table(entries: entries, pending: Array(repeating: false, count: vectorCount)))
    delivery = Mutex(nil)
  }

  /// Connects the controller to the machine's MSI delivery (done by the bus on attach).
  public func connect(_ target: any MSIDelivery) { delivery.withLock { $0 = target } }

  private var messageControl: UInt16 { UInt16(config.read(offset: capabilityOffset + 2, size: 2)) }

  /// Whether the driver enabled MSI-X.
  public var isEnabled: Bool { messageControl & 0x8000 != 0 }
  /// Whether the function mask is set.
  public var isFunctionMasked: Bool { messageControl & 0x4000 != 0 }

  /// Whether `offset` in the BAR falls in the table or the PBA.
  public func claims(offset: UInt64) -> Bool {
    (offset >= tableOffset && offset - tableOffset < tableSize) || (offset >= pbaOffset && offset - pbaOffset < pbaSize)
  }

  /// A guest read of the table or PBA at BAR offset `offset`.
  public func read(offset: UInt64, size: Int) -> UInt64 {
    table.withLock { table -> UInt64 in
      var value: UInt64 = 0
      for index in 0..<size {
        value |= UInt64(byte(at: offset + UInt64(index), table)) << (8 * index)
      }
      return value
    }
  }

  private func byte(at offset: UInt64, _ table: Table) -> UInt8 {
    if offset >= tableOffset && offset - tableOffset < tableSize {
      let relative = Int(offset - tableOffset)
      return UInt8(truncatingIfNeeded: table.entries[relative / 4] >> (8 * (relative % 4)))
    }
    if offset >= pbaOffset && offset - pbaOffset < pbaSize {
      let firstVector = Int(offset - pbaOffset) * 8
      var value: UInt8 = 0
      for bit in 0..<8 where firstVector + bit < vectorCount && table.pending[firstVector + bit] {
        value |= 1 << bit
      }
      return value
    }
    return 0
  }

  /// A guest write to the table at BAR offset `offset` (the PBA is read-only).
  public func write(offset: UInt64, size: Int, value: UInt64) {
    guard offset >= tableOffset && offset - tableOffset < tableSize else { return }
    table.withLock { table in
      for index in 0..<size {
        let relative = Int(offset - tableOffset) + index
        guard relative < vectorCount * 16 else { break }
        let word = relative / 4
        let shift = UInt32(8 * (relative % 4))
        var mask: UInt32 = 0xFF << shift
        if word % 4 == 0 { mask &= 0xFFFF_FFFC }  // address is dword aligned
        if word % 4 == 3 { mask &= 1 }  // only the mask bit of vector control is writable
        let byte = UInt32(truncatingIfNeeded: value >> (8 * index)) & 0xFF
        table.entries[word] = (table.entries[word] & ~mask) | ((byte << shift) & mask)
      }
    }
    deliverPendingUnmasked()
  }

  /// Whether `vector` is masked in its vector control word.
  public func isVectorMasked(_ vector: Int) -> Bool {
    guard vector >= 0 && vector < vectorCount else { return true }
    return table.withLock { $0.entries[vector * 4 + 3] & 1 != 0 }
  }

  /// Whether `vector`'s pending bit is set.
  public func isPending(_ vector: Int) -> Bool {
    guard vector >= 0 && vector < vectorCount else { return false }
    return table.withLock { $0.pending[vector] }
  }

  /// Signals `vector`: delivers its message, or sets its pending bit when masked.
  /// Does nothing when MSI-X is disabled or the vector does not exist.
  public func signal(vector: Int) {
    guard vector >= 0 && vector < vectorCount, isEnabled else { return }
    let functionMasked = isFunctionMasked
    let message = table.withLock { table -> (UInt64, UInt32)? in
      let base = vector * 4
      if functionMasked || table.entries[base + 3] & 1 != 0 {
        table.pending[vector] = true
        return nil
      }
      table.pending[vector] = false
      return (UInt64(table.entries[base]) | UInt64(table.entries[base + 1]) << 32, table.entries[base + 2])
    }
    if let (address, data) = message, let target = delivery.withLock({ $0 }) {
      target.deliverMSI(address: address, data: data)
    }
  }

  /// Sends the messages of pending vectors that are no longer masked. Called after table
  /// writes and after configuration writes that may clear the function mask.
  public func deliverPendingUnmasked() {
    guard isEnabled, !isFunctionMasked else { return }
    let messages = table.withLock { table -> [(UInt64, UInt32)] in
      var messages: [(UInt64, UInt32)] = []
      for vector in 0..<vectorCount where table.pending[vector] && table.entries[vector * 4 + 3] & 1 == 0 {
        table.pending[vector] = false
        let base = vector * 4
        messages.append((UInt64(table.entries[base]) | UInt64(table.entries[base + 1]) << 32, table.entries[base + 2]))
      }
      return messages
    }
    guard !messages.isEmpty, let target = delivery.withLock({ $0 }) else { return }
    for (address, data) in messages { target.deliverMSI(address: address, data: data) }
  }

  /// Returns the table to its reset state (all vectors masked, nothing pending).
  public func reset() {
    table.withLock { table in
      for index in table.entries.indices { table.entries[index] = index % 4 == 3 ? 1 : 0 }
      for index in table.pending.indices { table.pending[index] = false }
    }
  }
}

// MARK: Machine state

/// The MSI-X table and pending bits (the enable and function-mask bits live in config space).
extension MSIXController: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    let saved = table.withLock { $0 }
    writer.write(array: saved.entries)
    writer.write(UInt32(saved.pending.count))
    for bit in saved.pending { writer.write(bit) }
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    let entries = try reader.readArray(UInt32.self, count: vectorCount * 4, "MSI-X table")
    guard Int(try reader.read(UInt32.self)) == vectorCount else { throw .invalid("MSI-X pending-bit array") }
    var pending: [Bool] = []
    for _ in 0..<vectorCount { pending.append(try reader.readBool()) }
    table.withLock { $0 = Table(entries: entries, pending: pending) }
  }
}
