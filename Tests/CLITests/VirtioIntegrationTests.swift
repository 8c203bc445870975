import Foundation
import InterruptControllers
import PCI
import Testing
import VMCore

@testable import VMM

@Suite("virtio options and PCI wiring")
struct VirtioIntegrationTests {
  /// Every failure is exactly one line on stderr that starts with "hostvisor: error:".
  func expectOneLineError(_ result: HostvisorProcess.Result, containing text: String) {
    #expect(result.status == 1)
    let lines = result.stderr.split(separator: "\n", omittingEmptySubsequences: true)
    #expect(lines.count == 1, "stderr was: \(result.stderr)")
    #expect(result.stderr.hasPrefix("hostvisor: error: "), "stderr was: \(result.stderr)")
    #expect(result.stderr.contains(text), "stderr was: \(result.stderr)")
  }

  @Test func missingDiskFile() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/hello-multiboot.S", in: scratch)
    let result = try HostvisorProcess.run([
      "run", "--kernel", kernel, "--accel", "soft", "--serial", "none", "--disk", "/nonexistent/disk.img",
    ])
    expectOneLineError(result, containing: "cannot open disk '/nonexistent/disk.img': No such file or directory")
  }

  @Test func badDiskOption() throws {
    let result = try HostvisorProcess.run([
      "run", "--kernel", "/bin/true", "--serial", "none", "--disk", "/tmp/disk.img,writeback",
    ])
    expectOneLineError(result, containing: "invalid disk '/tmp/disk.img,writeback'")
  }

  @Test(arguments: [
    "usr", "user,tap=x", "user,hostfwd=tcp:1-:2", "tap", "tap=", "tap=tap0,model=e1000,model=virtio",
    "mac=52:54:00:00:00:01",
  ])
  func badNetworkSyntax(option: String) throws {
    let result = try HostvisorProcess.run(["run", "--kernel", "/bin/true", "--serial", "none", "--net", option])
    expectOneLineError(result, containing: "invalid network '\(option)'")
  }

  @Test(arguments: ["52:54:00:00:01", "zz:54:00:00:00:01", "52-54-00-00-00-01"])
  func badMAC(mac: String) throws {
    let result = try HostvisorProcess.run([
      "run", "--kernel", "/bin/true", "--serial", "none", "--net", "tap=hv0,mac=\(mac)",
    ])
    expectOneLineError(result, containing: "invalid MAC address '\(mac)'")
  }

  @Test func unopenableTAP() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/hello-multiboot.S", in: scratch)
    let result = try HostvisorProcess.run([
      "run", "--kernel", kernel, "--accel", "soft", "--serial", "none", "--net",
      "tap=this-name-is-far-too-long-for-linux",
    ])
    expectOneLineError(result, containing: "cannot open TAP 'this-name-is-far-too-long-for-linux'")
  }

  /// The whole process path with devices attached: a disk, a read-only disk and the virtio
  /// console; COM1 explicitly on stdio still carries the guest's output.
  @Test func guestRunsWithVirtioDevicesAttached() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/hello-multiboot.S", in: scratch)
    let disk = scratch.path("disk.img")
    try Data(repeating: 0, count: 1 << 20).write(to: URL(fileURLWithPath: disk))
    let result = try HostvisorProcess.run([
      "run", "--kernel", kernel, "--accel", "kvm", "--disk", disk, "--disk", "\(disk),readonly", "--console",
      "virtio", "--serial", "stdio", "--verbose",
    ])
    #expect(result.status == (0x21 << 1) | 1, "stderr: \(result.stderr)")
    #expect(result.stdout.contains("hello from the guest"), "stdout: \(result.stdout)")
    for line in [
      "pci: 00:01.0 virtio-blk", "pci: 00:02.0 virtio-blk", "(read-only)", "pci: 00:03.0 virtio-console",
      "pci: 00:04.0 virtio-rng",
    ] {
      #expect(result.stderr.contains(line), "stderr: \(result.stderr)")
    }
  }

  /// A TAP-backed virtio-net interface (the TAP is created for the run and vanishes with the
  /// process, as it is not made persistent).
  @Test(.enabled(if: FileManager.default.fileExists(atPath: "/dev/net/tun") && getuid() == 0))
  func guestRunsWithATAPInterface() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/hello-multiboot.S", in: scratch)
    let result = try HostvisorProcess.run([
      "run", "--kernel", kernel, "--accel", "kvm", "--serial", "none", "--verbose", "--net",
      "tap=hvwire\(getpid() % 10000),mac=52:54:00:12:34:56",
    ])
    #expect(result.status == (0x21 << 1) | 1, "stderr: \(result.stderr)")
    #expect(result.stderr.contains("pci: 00:01.0 virtio-net"), "stderr: \(result.stderr)")
  }

  @Test func badConsole() throws {
    let result = try HostvisorProcess.run(["run", "--kernel", "/bin/true", "--console", "vga"])
    expectOneLineError(result, containing: "invalid console 'vga'")
  }

  @Test func helpDocumentsTheVirtioOptions() throws {
    let result = try HostvisorProcess.run(["run", "--help"])
    #expect(result.status == 0)
    for text in [
      "--disk", "path[,readonly]", "--net", "tap=NAME[,offloads=off]|user[,hostfwd=", "--console", "serial|virtio",
      "virtio-rng",
    ] {
      #expect(result.stdout.contains(text), "help lacks \(text):\n\(result.stdout)")
    }
  }

  @Test func optionParsing() throws {
    #expect(throws: ConfigurationError.invalidDisk("/a,b.img")) { try DiskConfiguration(parsing: "/a,b.img") }
    #expect(throws: ConfigurationError.invalidDisk(",readonly")) { try DiskConfiguration(parsing: ",readonly") }
    #expect(try DiskConfiguration(parsing: "/x/d.img,readonly") == DiskConfiguration(path: "/x/d.img", readOnly: true))
    #expect(try DiskConfiguration(parsing: "d.img") == DiskConfiguration(path: "d.img"))
    let network = try NetworkConfiguration(parsing: "mac=02:00:00:aa:bb:cc,tap=hv1")
    #expect(network.tapName == "hv1")
    #expect(network.mac?.array == [0x02, 0, 0, 0xAA, 0xBB, 0xCC])
    #expect(try NetworkConfiguration(parsing: "tap=hv2").mac == nil)
    #expect(try NetworkConfiguration(parsing: "tap=hv2").offloads)
    #expect(try NetworkConfiguration(parsing: "offloads=off,tap=hv3").offloads == false)
    #expect(try NetworkConfiguration(parsing: "tap=hv3,offloads=on").offloads)
    #expect(throws: ConfigurationError.invalidNetwork("tap=hv4,offloads=no")) {
      try NetworkConfiguration(parsing: "tap=hv4,offloads=no")
    }
    #expect(try NetworkConfiguration(parsing: "tap=hv5").model == .virtio)
    #expect(try NetworkConfiguration(parsing: "model=e1000,tap=hv5").model == .e1000)
    #expect(try NetworkConfiguration(parsing: "user,model=e1000").model == .e1000)
    #expect(try NetworkConfiguration(parsing: "tap=hv5,model=rtl8139").model == .rtl8139)
    #expect(try NetworkConfiguration(parsing: "user,model=rtl8139").model == .rtl8139)
    #expect(try NetworkConfiguration(parsing: "tap=hv5,model=virtio").model == .virtio)
    #expect(throws: ConfigurationError.invalidNetworkModel("rtl")) {
      try NetworkConfiguration(parsing: "tap=hv5,model=rtl")
    }
    #expect(throws: ConfigurationError.invalidNetwork("tap=hv5,model=e1000,model=e1000")) {
      try NetworkConfiguration(parsing: "tap=hv5,model=e1000,model=e1000")
    }
  }

  /// Builds a real machine (software CPU, nothing run) with two disks and reads the PCI
  /// configuration space through the 0xCF8/0xCFC ports, as firmware or Linux would.
  @Test func machineEnumeratesVirtioDevicesOnThePCIBus() throws {
    let scratch = try ScratchDirectory()
    let kernel = try buildGuest("cli/hello-multiboot.S", in: scratch)
    let diskPath = scratch.path("disk.img")
    try Data(repeating: 0, count: 1 << 20).write(to: URL(fileURLWithPath: diskPath))
    var configuration = MachineConfiguration(
      kernelPath: kernel, memorySize: 64 << 20, accelerator: .soft, serial: .none)
    configuration.disks = [DiskConfiguration(path: diskPath), DiskConfiguration(path: diskPath, readOnly: true)]
    configuration.console = .virtio
    let machine = try VirtualMachine(configuration: configuration)
    defer { machine.shutdownDevices() }
    let bus = machine.parts.bus

    func configRead(slot: Int, offset: Int) -> UInt32 {
      bus.portWrite(0xCF8, size: 4, value: 0x8000_0000 | UInt32(slot) << 11 | UInt32(offset))
      return bus.portRead(0xCFC, size: 4)
    }
    #expect(configRead(slot: 0, offset: 0) == 0x29C0_8086)  // host bridge
    #expect(configRead(slot: 1, offset: 0) == 0x1042_1AF4)  // virtio-blk
    #expect(configRead(slot: 2, offset: 0) == 0x1042_1AF4)  // virtio-blk (read-only)
    #expect(configRead(slot: 3, offset: 0) == 0x1043_1AF4)  // virtio-console
    #expect(configRead(slot: 4, offset: 0) == 0x1044_1AF4)  // virtio-rng
    #expect(configRead(slot: 5, offset: 0) == 0xFFFF_FFFF)  // empty
    // Interrupt Line = the GSI of INTA#, and ECAM shows the same function.
    #expect(configRead(slot: 1, offset: 0x3C) & 0xFF == 17)
    #expect(bus.mmioRead(0xE000_0000 + (1 << 15), size: 4) == 0x1042_1AF4)

    // The ACPI _PRT routes exactly as the bus does; the ECAM window is reserved in the e820 map.
    let bridge = VirtualMachine.hostBridgeDescription(machine.pci)
    #expect(bridge.routes.count == 128)
    for route in bridge.routes {
      #expect(route.gsi == machine.pci.gsi(forSlot: route.slot, pin: UInt8(route.pin + 1)))
      #expect(route.gsi == 16 + UInt32(route.slot + route.pin) % 8)
    }
    #expect(
      machine.boot.memoryMap.contains { $0.address == 0xE000_0000 && $0.size == 256 << 20 && $0.type == .reserved })
    // The MCFG is among the installed ACPI tables (found by signature in the 0xE0000 window).
    let window = try machine.parts.memory.readBytes(at: 0xE_0000, count: 0x1_0000)
    #expect(
      window.indices.contains { index in index % 16 == 0 && Array(window[index..<index + 4]) == Array("MCFG".utf8) })
  }

  /// MSI address/data decoding (Intel SDM §11.11) and delivery to the software CPU's local APICs.
  @Test func softwareMSIReachesTheAddressedLocalAPIC() throws {
    let decoded = try #require(MSIMessage(address: 0xFEE0_1000, data: 0x0000_4031))
    #expect(decoded.destination == 1)
    #expect(!decoded.logicalDestination)
    #expect(decoded.message == InterruptMessage(vector: 0x31, deliveryMode: .fixed, levelTriggered: false))
    #expect(MSIMessage(address: 0xFEE0_0000, data: 0x0000_0331) == nil)  // reserved delivery mode 3
    #expect(MSIMessage(address: 0xFED0_0000, data: 0x31) == nil)  // outside the interrupt window
    let lowest = try #require(MSIMessage(address: 0xFEE0_300C, data: 0x0000_8141))
    #expect(lowest.logicalDestination && lowest.redirectionHint)
    #expect(lowest.message.deliveryMode == .lowestPriority && lowest.message.levelTriggered)

    let controllers = PlatformInterruptControllers(cpuCount: 2, clock: VirtualClock())
    for apic in controllers.localAPICs {
      apic.mmioWrite(offset: 0xF0, size: 4, value: 0x1FF)  // software-enable (SVR)
    }
    controllers.deliverMSI(address: 0xFEE0_1000, data: 0x0000_4031)
    #expect(controllers.localAPICs[1].highestPendingVector(respectingPriority: false) == 0x31)
    #expect(controllers.localAPICs[0].highestPendingVector(respectingPriority: false) == nil)
    let delivery: any MSIDelivery = controllers
    delivery.deliverMSI(address: 0xFEE0_0000, data: 0x0000_4042)
    #expect(controllers.localAPICs[0].highestPendingVector(respectingPriority: false) == 0x42)
  }
}
