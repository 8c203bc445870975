import Synchronization
import VMCore

/// A PCI function as the bus sees it: a configuration space and the registers behind its BARs.
///
/// The bus calls in from vCPU threads concurrently; implementations lock their own state.
public protocol PCIDevice: AnyObject, Sendable {
  /// The function's configuration space.
  var config: PCIConfigSpace { get }
  /// A guest read of `size` bytes at `offset` inside BAR `bar` (memory or I/O decoding enabled).
  func barRead(bar: Int, offset: UInt64, size: Int) -> UInt64
  /// A guest write of the low `size` bytes of `value` at `offset` inside BAR `bar`.
  func barWrite(bar: Int, offset: UInt64, size: Int, value: UInt64)
  /// Called after the guest wrote configuration space (already applied to `config`).
  func configDidWrite(offset: Int, size: Int)
  /// Called once when the bus attaches the function, with its interrupt pin and MSI delivery.
  func attached(_ attachment: PCIAttachment)
}

extension PCIDevice {
  public func configDidWrite(offset: Int, size: Int) {}
  public func attached(_ attachment: PCIAttachment) {}
}

/// What a function receives when the bus attaches it.
public struct PCIAttachment: Sendable {
  /// Device number on bus 0.
  public let slot: Int
  /// The function's INTx# line (routed to a GSI by the bus).
  public let interruptPin: PCIInterruptPin
  /// Where MSI/MSI-X messages go.
  public let msi: any MSIDelivery
}

/// The INTx# output of one function. Level-triggered and shared: the bus ORs all functions
/// routed to one GSI. The command register's Interrupt Disable bit gates the output; the
/// status register's Interrupt Status bit shows the function's own level either way.
public final class PCIInterruptPin: Sendable {
  /// The GSI this pin is routed to.
  public let gsi: UInt32
  private let config: PCIConfigSpace
  private let wire: SharedInterruptWire
  private let source: Int
  private let level = Mutex(false)

  init(gsi: UInt32, config: PCIConfigSpace, wire: SharedInterruptWire, source: Int) {
    self.gsi = gsi
    self.config = config
    self.wire = wire
    self.source = source
  }

  /// Drives the function's INTx# to `asserted`.
  public func set(_ asserted: Bool) {
    level.withLock { level in
      level = asserted
      config.setStatusBits(PCIStatus.interruptStatus, asserted)
      wire.set(gsi: gsi, source: source, asserted: asserted && config.command & PCICommand.interruptDisable == 0)
    }
  }

  /// Whether the function currently asserts INTx# (before the Interrupt Disable gate).
  public var isAsserted: Bool { level.withLock { $0 } }

  /// Records the saved INTx# level without driving the interrupt line (a machine-state
  /// restore: the interrupt controllers restore their own view of the line).
  func restoreLevel(_ asserted: Bool) {
    level.withLock { level in
      level = asserted
      wire.restore(gsi: gsi, source: source, asserted: asserted && config.command & PCICommand.interruptDisable == 0)
    }
  }

  /// Re-applies the Interrupt Disable bit after a command register write.
  func commandChanged() {
    level.withLock { level in
      wire.set(gsi: gsi, source: source, asserted: level && config.command & PCICommand.interruptDisable == 0)
    }
  }
}

/// Wired-OR of level-triggered INTx# lines sharing GSIs.
final class SharedInterruptWire: Sendable {
  private let sink: any InterruptSink
  private let asserted = Mutex<[UInt32: Set<Int>]>([:])

  init(sink: any InterruptSink) { self.sink = sink }

  func set(gsi: UInt32, source: Int, asserted isAsserted: Bool) {
    asserted.withLock { asserted in
      var sources = asserted[gsi, default: []]
      let wasHigh = !sources.isEmpty
      if isAsserted { sources.insert(source) } else { sources.remove(source) }
      asserted[gsi] = sources
      let isHigh = !sources.isEmpty
      if isHigh != wasHigh { InterruptLine(router: sink, line: gsi).set(isHigh) }
    }
  }

  /// Records a source's level without driving the line (machine-state restore).
  func restore(gsi: UInt32, source: Int, asserted isAsserted: Bool) {
    asserted.withLock { asserted in
      if isAsserted { asserted[gsi, default: []].insert(source) } else { asserted[gsi]?.remove(source) }
    }
  }
}

/// The host bridge at 00:00.0 (Intel vendor 0x8086, device 0x29C0, class 06/00/00). It has no
/// BARs and no interrupt; it exists so that enumeration finds a bridge, as on a PC.
public final class PCIHostBridge: PCIDevice {
  public static let identity = PCIIdentity(
    vendorID: 0x8086, deviceID: 0x29C0, revisionID: 0, classCode: (0x06, 0x00, 0x00),
    subsystemVendorID: 0x1AF4, subsystemID: 0x1100)
  public let config = PCIConfigSpace(identity: PCIHostBridge.identity, interruptPin: 0)
  public init() {}
  public func barRead(bar: Int, offset: UInt64, size: Int) -> UInt64 { ~0 }
  public func barWrite(bar: Int, offset: UInt64, size: Int, value: UInt64) {}
}
