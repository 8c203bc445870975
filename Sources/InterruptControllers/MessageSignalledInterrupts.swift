import PCI

/// An x86 message-signalled interrupt decoded from the address and data a device writes
/// (Intel SDM vol. 3, §11.11 "Message Signalled Interrupts").
public struct MSIMessage: Sendable, Equatable {
  /// Destination APIC ID (address bits 19:12): physical ID, or logical mask in logical mode.
  public var destination: UInt8
  /// Address bit 2: logical destination mode.
  public var logicalDestination: Bool
  /// Address bit 3: redirection hint (a fixed message then goes to the lowest-priority destination).
  public var redirectionHint: Bool
  /// The message to put on the APIC bus (vector data 7:0, delivery mode 10:8, trigger bit 15).
  public var message: InterruptMessage

  /// Decodes `address`/`data`; nil when the address is not in the 0xFEExxxxx interrupt window
  /// or the delivery mode is reserved.
  public init?(address: UInt64, data: UInt32) {
    guard address >> 20 == 0xFEE else { return nil }
    guard let mode = APICDeliveryMode(rawValue: UInt8(data >> 8 & 0x7)) else { return nil }
    destination = UInt8(truncatingIfNeeded: address >> 12)
    redirectionHint = address & (1 << 3) != 0
    // The destination mode bit is honoured with or without the redirection hint, as KVM does:
    // Linux sets it (with RH clear) when its APIC driver uses logical flat mode.
    logicalDestination = address & (1 << 2) != 0
    var deliveryMode = mode
    if redirectionHint && mode == .fixed { deliveryMode = .lowestPriority }
    message = InterruptMessage(
      vector: UInt8(truncatingIfNeeded: data), deliveryMode: deliveryMode, levelTriggered: data & (1 << 15) != 0)
  }
}

extension PlatformInterruptControllers: MSIDelivery {
  /// Delivers a device's MSI/MSI-X write to the local APICs it addresses. Fixed and
  /// lowest-priority messages (the ones PCI devices send) go to the vector; NMI, SMI, INIT and
  /// ExtINT modes are passed through as the APIC bus defines them. Malformed messages are
  /// dropped, as a write outside the interrupt window would go nowhere on hardware.
  public func deliverMSI(address: UInt64, data: UInt32) {
    guard let decoded = MSIMessage(address: address, data: data) else { return }
    apicBus.send(decoded.message, destination: decoded.destination, logical: decoded.logicalDestination)
  }
}
