import Synchronization

/// APIC delivery modes (Intel SDM vol. 3 §11.6.1 ICR, and the 82093AA redirection entry).
public enum APICDeliveryMode: UInt8, Sendable {
  case fixed = 0
  case lowestPriority = 1
  case systemManagement = 2
  case nonMaskable = 4
  case initialize = 5
  case startup = 6
  case externalInterrupt = 7
}

/// One interrupt message on the (virtual) APIC bus, from the IOAPIC or a local APIC's ICR.
public struct InterruptMessage: Sendable, Equatable {
  /// The vector (for `.startup`, the start page number).
  public var vector: UInt8
  public var deliveryMode: APICDeliveryMode
  /// Level-triggered: the accepting local APIC sets the TMR bit and broadcasts the EOI.
  public var levelTriggered: Bool

  public init(vector: UInt8, deliveryMode: APICDeliveryMode = .fixed, levelTriggered: Bool = false) {
    self.vector = vector
    self.deliveryMode = deliveryMode
    self.levelTriggered = levelTriggered
  }
}

/// What a local APIC offers to message senders: destination matching and acceptance.
/// Implementations must not call back into the sender.
public protocol InterruptDelivery: AnyObject, Sendable {
  /// The APIC ID, used for lowest-priority arbitration (lowest ID wins).
  var arbitrationID: UInt8 { get }
  /// Whether `destination` addresses this APIC: physical (APIC ID, 0xFF = all) or logical
  /// (flat or cluster model, per the APIC's DFR/LDR).
  func isDestination(_ destination: UInt8, logical: Bool) -> Bool
  /// Whether an x2APIC ICR's 32-bit `destination` addresses this APIC: physical (x2APIC ID,
  /// 0xFFFFFFFF = all) or logical (x2APIC cluster and members).
  func isDestination(extended destination: UInt32, logical: Bool) -> Bool
  /// Accepts a message addressed to this APIC.
  func deliver(_ message: InterruptMessage)
}

/// Receives end-of-interrupt broadcasts from local APICs (for level-triggered vectors): the IOAPIC.
public protocol EndOfInterruptListener: AnyObject, Sendable {
  /// A local APIC completed level-triggered `vector`.
  func endOfInterrupt(vector: UInt8)
}

/// The virtual APIC bus: connects the local APICs and the IOAPIC. Attach everything while
/// building the machine; sending is safe from any thread.
///
/// The bus holds its members weakly: each of them holds the bus, and whoever owns them (the
/// machine's interrupt controllers, the vCPUs) keeps them alive; strong references both ways
/// would keep every controller of a machine alive after the machine is gone.
public final class APICBus: Sendable {
  private struct Member: @unchecked Sendable {
    weak var apic: (any InterruptDelivery)?
    weak var listener: (any EndOfInterruptListener)?
  }
  private let members = Mutex<(apics: [Member], listeners: [Member])>(([], []))

  public init() {}

  /// Adds a local APIC.
  public func attach(_ apic: any InterruptDelivery) { members.withLock { $0.apics.append(Member(apic: apic)) } }

  /// Adds an EOI listener (an IOAPIC).
  public func addEndOfInterruptListener(_ listener: any EndOfInterruptListener) {
    members.withLock { $0.listeners.append(Member(listener: listener)) }
  }

  /// Every attached local APIC that still exists.
  public var localAPICs: [any InterruptDelivery] { members.withLock { $0.apics.compactMap(\.apic) } }

  /// Sends `message` to the APICs that `destination` addresses. Lowest-priority messages go to
  /// the matching APIC with the lowest ID. Returns how many APICs accepted it.
  @discardableResult
  public func send(_ message: InterruptMessage, destination: UInt8, logical: Bool) -> Int {
    let targets = localAPICs.filter { $0.isDestination(destination, logical: logical) }
    return deliver(message, to: targets)
  }

  /// Sends `message` to the APICs that an x2APIC ICR's 32-bit `destination` addresses.
  @discardableResult
  public func send(_ message: InterruptMessage, extendedDestination destination: UInt32, logical: Bool) -> Int {
    let targets = localAPICs.filter { $0.isDestination(extended: destination, logical: logical) }
    return deliver(message, to: targets)
  }

  /// Sends `message` to every APIC, optionally excluding the sender (ICR shorthands).
  @discardableResult
  public func broadcast(_ message: InterruptMessage, excluding sender: (any InterruptDelivery)? = nil) -> Int {
    let targets = localAPICs.filter { $0 !== sender }
    return deliver(message, to: targets)
  }

  /// Forwards a local APIC's EOI of a level-triggered vector to the IOAPICs.
  public func broadcastEndOfInterrupt(vector: UInt8) {
    let listeners = members.withLock { $0.listeners.compactMap(\.listener) }
    for listener in listeners { listener.endOfInterrupt(vector: vector) }
  }

  private func deliver(_ message: InterruptMessage, to targets: [any InterruptDelivery]) -> Int {
    if message.deliveryMode == .lowestPriority {
      guard let chosen = targets.min(by: { $0.arbitrationID < $1.arbitrationID }) else { return 0 }
      chosen.deliver(message)
      return 1
    }
    for target in targets { target.deliver(message) }
    return targets.count
  }
}
