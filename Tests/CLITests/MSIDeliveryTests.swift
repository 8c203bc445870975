import Foundation
import Testing
import VMCore

@testable import VMM

/// The start of a 32-bit Multiboot v1 guest in GNU as syntax: the header (magic, flags 3,
/// checksum) in `.text`, then `_start`, which the guest source continues.
let multibootPrologue = """
          .set MB_MAGIC, 0x1BADB002
          .set MB_FLAGS, 0x00000003
          .text
          .code32
          .align 4
          .long MB_MAGIC
          .long MB_FLAGS
          .long -(MB_MAGIC + MB_FLAGS)
          .globl _start

  """

/// A Multiboot guest that masks the 8259s, installs an IDT gate for vector 0x41, software-
/// enables its local APIC and halts with interrupts on; the handler exits through
/// isa-debug-exit with 0x41. Only an MSI for vector 0x41 can end it.
let msiWaitGuest =
  multibootPrologue + """
    _start:
            movl $stack_top, %esp
            movb $0xFF, %al
            outb %al, $0x21
            outb %al, $0xA1
            movl $handler, %eax
            movw %ax, idt + 0x41 * 8
            movw %cs, %bx
            movw %bx, idt + 0x41 * 8 + 2
            movw $0x8E00, idt + 0x41 * 8 + 4
            shrl $16, %eax
            movw %ax, idt + 0x41 * 8 + 6
            lidt idtr
            movl $0, 0xFEE00080
            movl $0x1FF, 0xFEE000F0
            sti
    wait:   hlt
            jmp wait
    handler:
            movw $0xF4, %dx
            movl $0x41, %eax
            outl %eax, %dx
            cli
            hlt
            .data
            .align 8
    idtr:   .word 256 * 8 - 1
            .long idt
            .align 8
    idt:    .fill 256 * 8, 1, 0
            .fill 4096, 1, 0
    stack_top:

    """

/// Assembles `source` (32-bit GNU as syntax) into an ELF linked at 1 MiB.
func assembleGuest(_ source: String, in scratch: ScratchDirectory) throws -> String {
  let sourcePath = scratch.path("guest-msi.S")
  try source.write(toFile: sourcePath, atomically: true, encoding: .utf8)
  let object = scratch.path("guest-msi.o")
  let image = scratch.path("guest-msi.elf")
  for (tool, arguments) in [
    ("/usr/bin/as", ["--32", "-o", object, sourcePath]),
    ("/usr/bin/ld", ["-m", "elf_i386", "-Ttext", "0x100000", "-o", image, object]),
  ] {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: tool)
    process.arguments = arguments
    try process.run()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else { throw CocoaError(.executableLoad) }
  }
  return image
}

@Suite("MSI delivery through each accelerator")
struct MSIDeliveryTests {
  /// Runs the guest on `accelerator` while a host thread sends MSIs (vector 0x41, physical
  /// destination APIC 0, fixed) through the machine's PCI MSI router, as a device would.
  func runUntilMSI(accelerator: AcceleratorChoice) throws -> MachineStopReason {
    let scratch = try ScratchDirectory()
    let kernel = try assembleGuest(msiWaitGuest, in: scratch)
    let configuration = MachineConfiguration(
      kernelPath: kernel, memorySize: 32 << 20, accelerator: accelerator, serial: .none)
    let machine = try VirtualMachine(configuration: configuration)
    let router = machine.pci.msi
    let control = machine.parts.control
    let sender = Thread {
      for _ in 0..<1000 where !control.isStopping {
        router.deliverMSI(address: 0xFEE0_0000, data: 0x41)
        usleep(10_000)
      }
      control.requestStop(.failure("no MSI arrived within 10 s"))
    }
    sender.start()
    return try machine.run()
  }

  @Test func kvmSignalMSIReachesTheGuest() throws {
    #expect(try runUntilMSI(accelerator: .kvm) == .debugExit(value: 0x41))
  }

  @Test func softwareCPUReceivesMSI() throws {
    #expect(try runUntilMSI(accelerator: .soft) == .debugExit(value: 0x41))
  }
}
