import Foundation
import Testing
import VMCore

@testable import VMM

/// A Multiboot guest that finds the display function on PCI bus 0 through configuration
/// mechanism #1, reads its BAR 0 and writes pixel `i` = `i * 0x01030507` for the first 4096
/// pixels, then exits through isa-debug-exit with 0x42 (0x01 if there is no display).
let framebufferGuest =
  multibootPrologue + """
    _start:
            movl $stack_top, %esp
            xorl %ebx, %ebx
    find:   movl %ebx, %eax
            shll $11, %eax
            orl $0x80000000, %eax
            movw $0xCF8, %dx
            outl %eax, %dx
            movw $0xCFC, %dx
            inl %dx, %eax
            cmpl $0x48561234, %eax
            je found
            incl %ebx
            cmpl $32, %ebx
            jne find
            movw $0xF4, %dx
            movl $0x01, %eax
            outl %eax, %dx
    found:  movl %ebx, %eax
            shll $11, %eax
            orl $0x80000010, %eax
            movw $0xCF8, %dx
            outl %eax, %dx
            movw $0xCFC, %dx
            inl %dx, %eax
            andl $0xFFFFFFF0, %eax
            movl %eax, %edi
            xorl %ecx, %ecx
    fill:   movl %ecx, %eax
            imull $0x01030507, %eax
            movl %eax, (%edi,%ecx,4)
            incl %ecx
            cmpl $4096, %ecx
            jne fill
            movw $0xF4, %dx
            movl $0x42, %eax
            outl %eax, %dx
            cli
            hlt
            .data
            .fill 4096, 1, 0
    stack_top:

    """

/// The framebuffer is guest memory on both accelerators: what the guest stores at its BAR is
/// what the display shows.
@Suite("Framebuffer on each accelerator")
struct FramebufferAcceleratorTests {
  func pixelsWritten(accelerator: AcceleratorChoice) throws -> (MachineStopReason, [UInt32]) {
    let scratch = try ScratchDirectory()
    let kernel = try assembleGuest(framebufferGuest, in: scratch)
    var configuration = MachineConfiguration(
      kernelPath: kernel, memorySize: 32 << 20, accelerator: accelerator, serial: .none)
    configuration.display = .vnc(address: "127.0.0.1:0")
    let machine = try VirtualMachine(configuration: configuration)
    let reason = try machine.run()
    let display = try #require(machine.display)
    let image = display.framebuffer.copyImage()
    let pixels = image.withUnsafeBytes { bytes in
      (0..<4096).map { index -> UInt32 in
        UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: index * 4, as: UInt32.self))
      }
    }
    return (reason, pixels)
  }

  static let expected = (0..<4096).map { UInt32($0) &* 0x0103_0507 }

  @Test func kvmGuestStoresReachTheFramebuffer() throws {
    let (reason, pixels) = try pixelsWritten(accelerator: .kvm)
    #expect(reason == .debugExit(value: 0x42))
    #expect(pixels == Self.expected)
  }

  @Test func softwareCPUGuestStoresReachTheFramebuffer() throws {
    let (reason, pixels) = try pixelsWritten(accelerator: .soft)
    #expect(reason == .debugExit(value: 0x42))
    #expect(pixels == Self.expected)
  }
}

/// `--display vnc=...` adds a virtio tablet unless `tablet=off` says otherwise.
@Suite struct DisplayOptionTests {
  @Test func parsesTheTabletOption() throws {
    #expect(try DisplayChoice(parsing: "none") == .none)
    #expect(try DisplayChoice(parsing: "vnc=5900") == .vnc(address: "5900", tablet: true))
    #expect(try DisplayChoice(parsing: "vnc=127.0.0.1:0,tablet=off") == .vnc(address: "127.0.0.1:0", tablet: false))
    #expect(try DisplayChoice(parsing: "vnc=127.0.0.1:0,tablet=on").hasTablet)
    for bad in ["vnc=", "vnc=5900,", "vnc=5900,tablet=maybe", "vnc=5900,mouse=off", "tablet=off", "vnc=,tablet=off"] {
      #expect(throws: ConfigurationError.self, "\(bad)") { try DisplayChoice(parsing: bad) }
    }
  }

  @Test(arguments: [true, false])
  func machineHasATabletWhenAskedFor(tablet: Bool) throws {
    let scratch = try ScratchDirectory()
    let kernel = try assembleGuest(framebufferGuest, in: scratch)
    var configuration = MachineConfiguration(
      kernelPath: kernel, memorySize: 32 << 20, accelerator: .soft, serial: .none)
    configuration.display = .vnc(address: "127.0.0.1:0", tablet: tablet)
    let machine = try VirtualMachine(configuration: configuration)
    defer { machine.shutdownDevices() }
    let tablets = machine.virtioDevices.filter { $0.model.deviceType == 18 }
    #expect(tablets.count == (tablet ? 1 : 0))
  }
}
