import CVirtioShim
import Foundation
import Glibc
import PCI
import TestSupport
import Testing
import VMCore

@testable import Virtio

/// Runs a command, returns its exit status.
@discardableResult
func runCommand(_ path: String, _ arguments: [String]) -> Int32 {
  guard let result = try? HostCommand.run(path, arguments, errors: .discarded, timeout: 60), !result.timedOut else {
    return -1
  }
  return result.status
}

/// A network namespace for one test, deleted on deinit.
final class NetworkNamespace {
  let name: String
  init?(name: String) {
    self.name = name
    runCommand("/usr/sbin/ip", ["netns", "del", name])
    guard runCommand("/usr/sbin/ip", ["netns", "add", name]) == 0 else { return nil }
  }
  deinit { runCommand("/usr/sbin/ip", ["netns", "del", name]) }

  /// Runs `body` on the calling thread switched into the namespace, then switches back.
  func inside<Result>(_ body: () throws -> Result) throws -> Result {
    let original = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC)
    let target = open("/var/run/netns/\(name)", O_RDONLY | O_CLOEXEC)
    defer {
      close(original)
      close(target)
    }
    guard original >= 0, target >= 0, hv_setns(target, HV_CLONE_NEWNET) == 0 else {
      throw NetworkBackendError.cannotOpenTap(name: "setns", errno: errno)
    }
    defer { _ = hv_setns(original, HV_CLONE_NEWNET) }
    return try body()
  }
}

@Suite(.serialized) struct NetTests {
  static let guestMAC = MACAddress(0x52, 0x54, 0x00, 0x12, 0x34, 0x56)

  @Test func tapOpenFailureIsAClearError() {
    do {
      _ = try TapBackend(name: "this-name-is-far-too-long")
      Issue.record("opened a TAP with an invalid name")
    } catch {
      #expect(error.description.hasPrefix("cannot open TAP 'this-name-is-far-too-long': "))
    }
  }

  @Test func macParsingAndGeneration() throws {
    #expect(try MACAddress(parsing: "52:54:00:ab:cd:ef") == MACAddress(0x52, 0x54, 0, 0xAB, 0xCD, 0xEF))
    #expect(throws: NetworkBackendError.self) { try MACAddress(parsing: "52:54:00:ab:cd") }
    let random = MACAddress.random()
    #expect(random.array.prefix(3) == [0x52, 0x54, 0x00])
  }

  @Test func framesCrossARealTapDevice() throws {
    guard access("/dev/net/tun", F_OK) == 0 else {
      Issue.record("/dev/net/tun is missing: the virtio-net TAP test cannot run on this host")
      return
    }
    let namespaceName = "hvvirtio\(getpid())"
    guard let namespace = NetworkNamespace(name: namespaceName) else {
      Issue.record("cannot create network namespace \(namespaceName) (ip netns add failed)")
      return
    }
    let (tap, packetSocket) = try namespace.inside { () throws -> (TapBackend, Int32) in
      let tap = try TapBackend(name: "hvtap0")
      // Bring the link up (SIOCGIFFLAGS/SIOCSIFFLAGS on any socket in the namespace).
      let control = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
      defer { close(control) }
      var request = [UInt8](repeating: 0, count: Int(HV_IFREQ_SIZE))
      for (index, byte) in "hvtap0".utf8.enumerated() { request[index] = byte }
      _ = request.withUnsafeMutableBytes { hv_virtio_ioctl_ptr(control, UInt(SIOCGIFFLAGS), $0.baseAddress) }
      request[Int(HV_IFREQ_FLAGS_OFFSET)] |= UInt8(IFF_UP)
      let up = request.withUnsafeMutableBytes { hv_virtio_ioctl_ptr(control, UInt(SIOCSIFFLAGS), $0.baseAddress) }
      #expect(up == 0)
      let packet = socket(AF_PACKET, Int32(SOCK_RAW.rawValue), Int32(UInt16(HV_ETH_P_ALL).bigEndian))
      #expect(packet >= 0)
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
      return (tap, packet)
    }
    defer { close(packetSocket) }
    let machine = try TestMachine()
    let net = VirtioNet(backend: tap, mac: Self.guestMAC)
    let driver = try VirtioDriver(machine: machine, model: net)
    defer { driver.device.shutdown() }
    #expect(driver.deviceConfig(0, size: 4) == 0x1200_5452)  // 52:54:00:12 little-endian
    #expect(driver.deviceConfig(6, size: 2) == 1)  // link up
    driver.start(features: VirtioNet.Feature.mac | VirtioNet.Feature.mergeableReceiveBuffers, queueCount: 2)

    // Guest -> host.
    let payload = Array("frame from the guest".utf8)
    let frame: [UInt8] = [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF] + Self.guestMAC.array + [0x88, 0xB5] + payload
    try machine.memory.fill(0, at: 0x40_0000, length: 12)
    try machine.memory.writeBytes(frame, at: 0x40_1000)
    driver.queues[1].submit([(0x40_0000, 12, false), (0x40_1000, UInt32(frame.count), false)])
    #expect(driver.queues[1].waitForUsed(1))
    var received: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 2048)
    for _ in 0..<50 {
      var waiter = pollfd(fd: packetSocket, events: Int16(POLLIN), revents: 0)
      guard poll(&waiter, 1, 100) > 0 else { continue }
      let count = buffer.withUnsafeMutableBytes { recv(packetSocket, $0.baseAddress, 2048, 0) }
      if count >= 14 && buffer[12] == 0x88 && buffer[13] == 0xB5 {
        received = Array(buffer[0..<count])
        break
      }
    }
    #expect(received.prefix(frame.count) == frame[...])
    #expect(net.counters.values["tx_frames"] == 1)
    #expect(net.counters.values["tx_bytes"] == UInt64(frame.count))

    // Host -> guest, spread over 64-byte mergeable buffers.
    let rx = driver.queues[0]
    for index in 0..<8 { rx.submit([(0x48_0000 + UInt64(index) * 0x100, 64, true)], notify: index == 7) }
    let injected: [UInt8] =
      Self.guestMAC.array + [0x02, 0, 0, 0, 0, 1] + [0x88, 0xB6] + (0..<186).map { UInt8($0) }
    let sent = injected.withUnsafeBytes { send(packetSocket, $0.baseAddress, injected.count, 0) }
    #expect(sent == injected.count)
    var frameBytes: [UInt8] = []
    let deadline = 5000
    var waited = 0
    while waited < deadline {
      let used = rx.usedIndex
      if used > 0 {
        // Skip unrelated frames (IPv6 neighbour discovery and the like) until ours arrives.
        frameBytes = []
        var position: UInt16 = 0
        var found = false
        while position < used {
          let first = rx.usedElement(position)
          let base = 0x48_0000 + UInt64(first.id) * 0x100
          let count = Int(try machine.memory.read(UInt16.self, at: base + 10))
          var bytes: [UInt8] = []
          for part in 0..<UInt16(count) {
            let element = rx.usedElement(position + part)
            bytes += try machine.memory.readBytes(
              at: 0x48_0000 + UInt64(element.id) * 0x100, count: Int(element.length))
          }
          if bytes.count > 12 + 13 && bytes[12 + 12] == 0x88 && bytes[12 + 13] == 0xB6 {
            #expect(count == 4)  // 12 + 200 bytes in 64-byte buffers
            #expect(try machine.memory.readBytes(at: base, count: 10) == [UInt8](repeating: 0, count: 10))
            frameBytes = Array(bytes[12...])
            found = true
            break
          }
          position += UInt16(max(count, 1))
        }
        if found { break }
      }
      usleep(1000)
      waited += 1
    }
    #expect(frameBytes == injected)
    // Other frames (IPv6 neighbour discovery) may have arrived too.
    #expect(net.counters.values["rx_frames", default: 0] >= 1)
    #expect(net.counters.values["rx_bytes", default: 0] >= UInt64(injected.count))
  }
}
