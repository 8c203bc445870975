import Foundation
import Testing

/// The emulated RTL8139C end to end, in the same (serialized) suite as the e1000's: Debian's
/// generic kernel (whose `guest-generic` initramfs carries 8139too.ko and mii.ko) on the
/// software CPU binds `8139too` to `--net tap=...,model=rtl8139`, reads the MAC from the
/// device's EEPROM, reports the link up at 100 Mb/s full duplex from the PHY registers, pings
/// the host side of the TAP and moves 10 MiB each way with matching SHA-256 digests.
extension LinuxE1000Tests {
  @Test(.enabled(if: getuid() == 0, "needs root to make a network namespace"), .timeLimit(.minutes(30)))
  func tcpOverRTL8139ThroughATapInANetworkNamespace() async throws {
    try await Self.tcpThroughATap(
      model: "rtl8139", module: "8139too", tap: "hv8139", linkMessage: "link up, 100Mbps, full-duplex")
  }
}
