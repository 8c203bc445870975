import CVirtioShim
import Foundation
import Glibc
import Testing

@testable import Virtio

/// The TAP hand-over a live migration on one host does: a persistent TAP held by one backend
/// (the source) cannot be opened by another (the destination, built detached) until the first
/// releases it; after that the second owns it and its frames reach the host side, and the first
/// can no longer take it back.
@Suite(.serialized) struct TapHandOverTests {
  @Test(.enabled(if: getuid() == 0, "needs root for a network namespace"))
  func releasedTapIsTakenOverByAnotherBackend() throws {
    guard access("/dev/net/tun", F_OK) == 0 else {
      Issue.record("/dev/net/tun is missing")
      return
    }
    let name = "hvhand\(getpid() % 10000)"
    let namespace = try #require(NetworkNamespace(name: name))
    #expect(runCommand("/usr/sbin/ip", ["-n", name, "tuntap", "add", "dev", "hvtap0", "mode", "tap", "vnet_hdr"]) == 0)
    #expect(runCommand("/usr/sbin/ip", ["-n", name, "link", "set", "hvtap0", "up"]) == 0)
    try namespace.inside {
      let source = try TapBackend(name: "hvtap0")
      let destination = try TapBackend(name: "hvtap0", attached: false)
      #expect(source.isAttached && !destination.isAttached)
      // Detached, it drops frames and receives nothing, and remembers the offloads asked for.
      #expect(destination.setReceiveOffloads([.checksum]))
      // While the source holds it, the kernel refuses a second owner (after the retries).
      #expect(throws: NetworkBackendError.cannotOpenTap(name: "hvtap0", errno: EBUSY)) {
        try destination.attach(timeoutMilliseconds: 100)
      }
      let descriptor = source.pollDescriptor
      source.release()
      #expect(!source.isAttached)
      #expect(source.pollDescriptor == descriptor)
      try destination.attach(timeoutMilliseconds: 2000)
      #expect(destination.isAttached)
      #expect(throws: NetworkBackendError.self) { try source.attach(timeoutMilliseconds: 100) }

      // The destination's frames reach the interface: its receive counter grows.
      let packet = socket(AF_PACKET, Int32(SOCK_RAW.rawValue), Int32(UInt16(HV_ETH_P_ALL).bigEndian))
      #expect(packet >= 0)
      defer { close(packet) }
      var address = sockaddr_ll()
      address.sll_family = UInt16(AF_PACKET)
      address.sll_protocol = UInt16(HV_ETH_P_ALL).bigEndian
      address.sll_ifindex = Int32(if_nametoindex("hvtap0"))
      let bound = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
          bind(packet, $0, socklen_t(MemoryLayout<sockaddr_ll>.size))
        }
      }
      #expect(bound == 0)
      var header = [UInt8](repeating: 0, count: 12)
      var frame: [UInt8] = [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x88, 0xB5]
      frame += Array("handed over".utf8)
      let sent = header.withUnsafeMutableBytes { headerBytes in
        frame.withUnsafeMutableBytes { frameBytes in
          let vectors = [
            iovec(iov_base: headerBytes.baseAddress, iov_len: 12),
            iovec(iov_base: frameBytes.baseAddress, iov_len: frameBytes.count),
          ]
          return vectors.withUnsafeBufferPointer { destination.transmit($0) }
        }
      }
      #expect(sent)
      #expect(!source.transmit(UnsafeBufferPointer(start: nil, count: 0)))
      var received = false
      var buffer = [UInt8](repeating: 0, count: 2048)
      for _ in 0..<50 where !received {
        var waiter = pollfd(fd: packet, events: Int16(POLLIN), revents: 0)
        guard poll(&waiter, 1, 100) > 0 else { continue }
        let count = buffer.withUnsafeMutableBytes { recv(packet, $0.baseAddress, 2048, 0) }
        received = count >= 14 && buffer[12] == 0x88 && buffer[13] == 0xB5
      }
      #expect(received, "the frame the new owner sent did not reach the TAP")
    }
  }
}
