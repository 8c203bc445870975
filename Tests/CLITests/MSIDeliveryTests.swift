import Foundation
import Testing
import VMCore

@testable import VMM

/// A Multiboot guest that masks the 8259s, installs an IDT gate for vector 0x41, software-
/// enables its local APIC and halts with interrupts on; the handler exits through
/// isa-debug-exit with 0x41. Only an MSI for vector 0x41 can end it.
let msiWaitGuest =
  interruptGuestStart(vector: 0x41) + """
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

    """ + interruptGuestTables

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
