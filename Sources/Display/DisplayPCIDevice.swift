import PCI
import Synchronization
import VMCore

/// The display function: a PCI display controller (class 03/80/00, vendor 0x1234, device
/// 0x4856, an ID no Linux driver claims) whose prefetchable 32-bit BAR 0 is the framebuffer.
///
/// The BAR exists so that the guest's PCI code sees the framebuffer's address range as taken
/// (Linux never places another BAR over it, and efifb ties itself to this BAR). The pixels are
/// device memory mapped like RAM at the address the bus assigned; if the guest moves the BAR,
/// accesses at the new address reach the same pixels through `barRead`/`barWrite`.
public final class DisplayPCIDevice: PCIDevice {
  /// The function's identity.
  public static let identity = PCIIdentity(
    vendorID: 0x1234, deviceID: 0x4856, revisionID: 1, classCode: (0x03, 0x80, 0x00),
    subsystemVendorID: 0x1AF4, subsystemID: 0x1100)

  public let config = PCIConfigSpace(identity: DisplayPCIDevice.identity, interruptPin: 0)
  /// The framebuffer, once `attach(framebuffer:)` mapped it.
  private let framebuffer = Mutex<Framebuffer?>(nil)

  /// A display function whose BAR 0 is `framebufferSize` bytes (a power of two).
  public init(framebufferSize: Int) {
    config.addBAR(PCIBARDefinition(index: 0, size: UInt64(framebufferSize), kind: .memory32(prefetchable: true)))
    // Memory decoding on, as firmware leaves the display it booted with: Linux's efifb
    // fixup refuses a framebuffer BAR whose function is disabled.
    config.setRaw(offset: PCIConfigOffset.command, size: 2, value: UInt64(PCICommand.memorySpace))
  }

  /// Where the bus placed BAR 0 (valid once the function is attached).
  public var framebufferAddress: UInt64 { config.barAddress(0) ?? 0 }

  /// Connects the pixels mapped at the BAR's address.
  public func attach(framebuffer: Framebuffer) { self.framebuffer.withLock { $0 = framebuffer } }

  public func barRead(bar: Int, offset: UInt64, size: Int) -> UInt64 {
    guard bar == 0, let framebuffer = framebuffer.withLock({ $0 }) else { return ~0 }
    return framebuffer.read(offset: offset, size: size)
  }

  public func barWrite(bar: Int, offset: UInt64, size: Int, value: UInt64) {
    guard bar == 0, let framebuffer = framebuffer.withLock({ $0 }) else { return }
    framebuffer.write(offset: offset, size: size, value: value)
  }
}
