import Foundation
import KVMBackend
import SoftCPU
import Testing
import VMCore

@testable import VMM

/// A 64-bit guest (ELF64, entered in long mode) that builds its own GDT, TSS, IDT and 4-level
/// page tables (user pages for the first GiB, the IOAPIC and local APIC mapped uncached for
/// the kernel only), starts the local APIC timer (periodic, vector 0x40, every 2 ms) and PIT
/// channel 0 (rate generator, 10 ms, IOAPIC pins 0 and 2 → vector 0x41), then drops to ring 3
/// with interrupts enabled. Ring 3 counts in a loop and, every `crossAcceleratorGuestSpin`
/// rounds, prints a line "SEQ APIC PIT" on COM1 (its sequence number and both tick counts,
/// hexadecimal).
///
/// Under this host's nested KVM ring-0 code is emulated by the host kernel, whose emulator
/// cannot return from a protected-mode interrupt, so no handler uses IRET: an interrupt
/// handler counts its tick, sends EOI, restores the interrupted RFLAGS with IF clear and goes
/// back to ring 3 with STI; SYSEXIT (64-bit). SYSEXIT takes RIP from RDX and RSP from RCX, so
/// ring 3 never uses RCX and uses RDX only for the port of its OUT (the TSS's I/O permission
/// bitmap lets ring 3 reach COM1): a handler interrupting that OUT resumes at the MOV that
/// loads DX. Numbers are printed in hexadecimal (no DIV, which needs RDX). The sequence number
/// is at 0x6000, the tick counts at 0x6008 (APIC) and 0x6010 (PIT).
let crossAcceleratorGuestSpin = 4_000_000
let crossAcceleratorGuest = """
          .code64
          .text
          .globl _start
  _start:
          lgdt gdtr(%rip)
          lea tss(%rip), %rax
          movw $0x2068, gdt + 0x40
          movw %ax, gdt + 0x42
          shr $16, %rax
          movb %al, gdt + 0x44
          movb $0x89, gdt + 0x45
          movb $0, gdt + 0x46
          movb %ah, gdt + 0x47
          shr $16, %rax
          movl %eax, gdt + 0x48
          lea kernel_stack_top(%rip), %rax
          mov %rax, tss + 4(%rip)
          mov $0x40, %ax
          ltr %ax
          lea apic_handler(%rip), %rax
          lea idt + 0x40 * 16(%rip), %rdi
          call set_gate
          lea pit_handler(%rip), %rax
          lea idt + 0x41 * 16(%rip), %rdi
          call set_gate
          lea spurious_handler(%rip), %rax
          lea idt + 0xFF * 16(%rip), %rdi
          call set_gate
          lidt idtr(%rip)
          lea pdpt(%rip), %rax
          or $7, %rax
          mov %rax, pml4(%rip)
          lea pd_low(%rip), %rax
          or $7, %rax
          mov %rax, pdpt(%rip)
          lea pd_high(%rip), %rax
          or $3, %rax
          mov %rax, pdpt + 24(%rip)
          xor %ecx, %ecx
          lea pd_low(%rip), %rdi
  map:    mov %rcx, %rax
          shl $21, %rax
          or $0x87, %rax
          mov %rax, (%rdi,%rcx,8)
          inc %ecx
          cmp $512, %ecx
          jne map
          mov $0xFEC0009B, %eax
          mov %rax, pd_high + 502 * 8(%rip)
          mov $0xFEE0009B, %eax
          mov %rax, pd_high + 503 * 8(%rip)
          lea pml4(%rip), %rax
          mov %rax, %cr3
          mov $0x174, %ecx
          mov $0x10, %eax
          xor %edx, %edx
          wrmsr
          mov $0xFF, %al
          outb %al, $0x21
          outb %al, $0xA1
          mov $0xFEE00000, %esi
          movl $0x1FF, 0xF0(%rsi)
          movl $0xB, 0x3E0(%rsi)
          movl $0x20040, 0x320(%rsi)
          movl $2000000, 0x380(%rsi)
          mov $0xFEC00000, %esi
          movl $0x10, (%rsi)
          movl $0x41, 0x10(%rsi)
          movl $0x11, (%rsi)
          movl $0, 0x10(%rsi)
          movl $0x14, (%rsi)
          movl $0x41, 0x10(%rsi)
          movl $0x15, (%rsi)
          movl $0, 0x10(%rsi)
          mov $0x34, %al
          outb %al, $0x43
          mov $(11932 & 0xFF), %al
          outb %al, $0x40
          mov $(11932 >> 8), %al
          outb %al, $0x40
          lea user_stack_top(%rip), %rcx
          lea user_main(%rip), %rdx
          sti
          .byte 0x48, 0x0F, 0x35
  set_gate:
          movw %ax, (%rdi)
          movw $0x10, 2(%rdi)
          movw $0x8E00, 4(%rdi)
          shr $16, %rax
          movw %ax, 6(%rdi)
          shr $16, %rax
          movl %eax, 8(%rdi)
          movl $0, 12(%rdi)
          ret
  apic_handler:
          incq 0x6008
          mov $0xFEE00000, %edx
          movl $0, 0xB0(%rdx)
          jmp return_to_user
  pit_handler:
          incq 0x6010
          mov $0xFEE00000, %edx
          movl $0, 0xB0(%rdx)
          jmp return_to_user
  spurious_handler:
  return_to_user:
          mov (%rsp), %rdx
          lea putc_out(%rip), %rcx
          cmp %rcx, %rdx
          jne resume_user
          lea putc(%rip), %rdx
  resume_user:
          mov 24(%rsp), %rcx
          pushq 16(%rsp)
          andq $~0x200, (%rsp)
          popfq
          lea 40(%rsp), %rsp
          sti
          .byte 0x48, 0x0F, 0x35

  user_main:
          xor %r12d, %r12d
  line:   mov $\(crossAcceleratorGuestSpin), %r13d
  spin:   dec %r13
          jnz spin
          inc %r12
          mov %r12, %rax
          call print_hex
          mov $0x20, %al
          call putc
          mov 0x6008, %rax
          call print_hex
          mov $0x20, %al
          call putc
          mov 0x6010, %rax
          call print_hex
          mov $0x0A, %al
          call putc
          mov %r12, 0x6000
          jmp line
  print_hex:
          mov %rax, %rsi
          mov $16, %r8d
          xor %r9d, %r9d
  digit:  rol $4, %rsi
          mov %esi, %eax
          and $0xF, %eax
          test %r9d, %r9d
          jnz emit
          test %eax, %eax
          jnz emit
          cmp $1, %r8d
          jne next
  emit:   mov $1, %r9d
          lea hex_digits(%rip), %rdi
          mov (%rdi,%rax), %al
          call putc
  next:   dec %r8d
          jnz digit
          ret
  putc:   mov $0x3F8, %dx
  putc_out:
          outb %al, %dx
          ret

          .data
          .align 16
  gdt:    .quad 0
          .quad 0
          .quad 0x00AF9A000000FFFF
          .quad 0x00CF92000000FFFF
          .quad 0
          .quad 0
          .quad 0x00AFFA000000FFFF
          .quad 0x00CFF2000000FFFF
          .quad 0, 0
  gdt_end:
          .align 8
  gdtr:   .word gdt_end - gdt - 1
          .quad gdt
          .align 8
  idtr:   .word 256 * 16 - 1
          .quad idt
          .align 16
  hex_digits:
          .ascii "0123456789abcdef"
          .align 16
  tss:    .fill 0x66, 1, 0
          .word 0x68
          .fill 8192, 1, 0
          .byte 0xFF
          .align 4096
  pml4:   .fill 4096, 1, 0
  pdpt:   .fill 4096, 1, 0
  pd_low: .fill 4096, 1, 0
  pd_high: .fill 4096, 1, 0
  idt:    .fill 256 * 16, 1, 0
          .fill 4096, 1, 0
  kernel_stack_top:
          .fill 8192, 1, 0
  user_stack_top:

  """

@Suite(
  "Snapshots moved between KVM and the software CPU", .serialized,
  .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct CrossAcceleratorTests {
  let scratch: ScratchDirectory
  let kernel: String

  init() throws {
    scratch = try ScratchDirectory()
    kernel = try assembleGuest64(crossAcceleratorGuest, in: scratch)
  }

  func serialOutput(_ path: String) -> String {
    (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
  }

  /// The complete lines of `text` as (sequence, APIC ticks, PIT ticks).
  func lines(_ text: String) -> [[UInt64]] {
    text.split(separator: "\n", omittingEmptySubsequences: false).dropLast().map { line in
      line.split(separator: " ").compactMap { UInt64($0, radix: 16) }
    }
  }

  func waitFor(_ description: String, seconds: Double = 240, _ condition: () throws -> Bool) throws {
    let deadline = Date().addingTimeInterval(seconds)
    while try !condition() {
      guard Date() < deadline else { throw ControlError(.failed, "timed out waiting for \(description)") }
      usleep(5000)
    }
  }

  /// The guest runs on `source` under the migratable CPU model `x86-64` (the baseline: nested
  /// KVMs lack x86-64-v2's extensions), is snapshotted
  /// mid-run and restored on `target`: its printed sequence continues without a gap or a
  /// repeat across the move, both the APIC timer's and the PIT's interrupts keep arriving after
  /// it, and the restored machine presents the same model.
  @Test(arguments: [("kvm", "soft"), ("soft", "kvm")])
  func guestContinuesOnTheOtherAccelerator(source: String, target: String) throws {
    let sourceChoice = AcceleratorChoice(rawValue: source)!
    let targetChoice = AcceleratorChoice(rawValue: target)!
    let beforeSerial = scratch.path("\(source)-before.out")
    let original = VMController(id: "cross-source")
    try original.configure { spec throws(ControlError) in
      spec.kernelPath = kernel
      spec.memoryMiB = 32
      spec.accelerator = sourceChoice
      spec.cpuModel = .x86_64
      spec.serial = .file(beforeSerial)
    }
    try original.start()
    // Native ring 3 on KVM prints lines much faster than the PIT's 10 ms period: wait for
    // both timers to have ticked, then for a line printed after that.
    let sourceMemory = original.machine!.parts.memory
    try waitFor("both timers' first ticks on \(source)") {
      try sourceMemory.read(UInt64.self, at: 0x6008) > 0 && sourceMemory.read(UInt64.self, at: 0x6010) > 0
    }
    let printedAtTicks = try sourceMemory.read(UInt64.self, at: 0x6000)
    try waitFor("the guest's third line on \(source)") {
      try sourceMemory.read(UInt64.self, at: 0x6000) >= max(3, printedAtTicks + 1)
    }
    try original.pause()
    let state = scratch.path("\(source).state")
    let memory = scratch.path("\(source).mem")
    try original.createSnapshot(statePath: state, memoryPath: memory)
    try original.shutdown()
    let before = lines(serialOutput(beforeSerial))
    #expect(before.count >= 3)
    #expect(before.last.map { $0[1] > 0 && $0[2] > 0 } == true, "no timer ticks before the move: \(before)")

    let afterSerial = scratch.path("\(target)-after.out")
    let restored = VMController(id: "cross-target")
    try restored.configure { spec throws(ControlError) in
      spec.serial = .file(afterSerial)
      spec.accelerator = targetChoice
    }
    try restored.loadSnapshot(statePath: state, memoryPath: memory, resume: true)
    defer { try? restored.shutdown() }
    #expect(restored.machine?.accelerator.name == target)
    #expect(restored.machine?.cpuModel == .x86_64)
    let printedBefore = UInt64(before.count)
    // Wait for four more lines, and (native ring 3 on KVM prints lines faster than the PIT's
    // 10 ms period) for lines printed after both timers ticked again on the target.
    try waitFor("four more lines and both timers' ticks on \(target)") {
      if let reason = restored.machine?.parts.control.stopReason {
        throw ControlError(.failed, "the restored guest stopped: \(reason)")
      }
      guard try restored.machine!.parts.memory.read(UInt64.self, at: 0x6000) >= printedBefore + 4 else { return false }
      let after = lines(serialOutput(beforeSerial) + serialOutput(afterSerial)).dropFirst(before.count)
      guard let first = after.first, let last = after.last, first.count == 3, last.count == 3 else { return false }
      return last[1] > first[1] && last[2] > first[2]
    }
    try restored.pause()
    let all = lines(serialOutput(beforeSerial) + serialOutput(afterSerial))
    #expect(all.map { $0.first ?? 0 } == Array(1...UInt64(all.count)), "the sequence has a gap or a repeat: \(all)")
    #expect(all.allSatisfy { $0.count == 3 }, "garbled lines: \(all)")
    let after = all.dropFirst(before.count)
    if let first = after.first, let last = after.last, all.count >= before.count + 3 {
      #expect(first[1] >= before.last![1], "APIC ticks went backwards")
      #expect(last[1] > first[1], "no APIC timer interrupts on \(target): \(Array(after))")
      #expect(last[2] > first[2], "no PIT interrupts on \(target): \(Array(after))")
    } else {
      Issue.record("too few lines after the move: \(all)")
    }
  }
}

extension CrossAcceleratorTests {
  /// A KVM state whose guest enabled SMEP (which the software CPU lacks) is refused with one
  /// line naming it, before anything is applied.
  @Test func stateUsingWhatTheSoftwareCPULacksIsRefused() throws {
    let kvmMachine = try VirtualMachine(
      configuration: MachineConfiguration(kernelPath: kernel, memorySize: 32 << 20, accelerator: .kvm, serial: .none))
    defer { kvmMachine.shutdownDevices() }
    var state = try #require(kvmMachine.accelerator as? KVMAccelerator).captureState()
    state.vcpus[0].specialRegisters.cr4 |= 1 << 20
    let softMachine = try VirtualMachine(
      configuration: MachineConfiguration(kernelPath: kernel, memorySize: 32 << 20, accelerator: .soft, serial: .none))
    defer { softMachine.shutdownDevices() }
    var writer = StateWriter()
    try #require(softMachine.accelerator as? SoftAccelerator).saveState(into: &writer)
    var reader = StateReader(bytes: writer.bytes)
    var image = try SoftAcceleratorImage.read(from: &reader)
    do {
      try CrossAcceleratorState.convert(state, into: &image)
      Issue.record("a guest with SMEP enabled was moved to the software CPU")
    } catch {
      #expect(error.description.contains("SMEP"), "\(error)")
      #expect(!error.description.contains("\n"))
    }
  }
}

@Suite("The software CPU's accelerator section as plain values")
struct SoftAcceleratorImageTests {
  /// Reading a software-CPU machine's `accelerator` section into `SoftAcceleratorImage` and
  /// writing it back gives the same bytes (the converter's model of the format is complete).
  @Test func roundTripsARealSection() throws {
    let scratch = try ScratchDirectory()
    let kernel = try assembleGuest64(crossAcceleratorGuest, in: scratch)
    let machine = try VirtualMachine(
      configuration: MachineConfiguration(
        kernelPath: kernel, memorySize: 32 << 20, cpuCount: 2, accelerator: .soft, serial: .none))
    defer { machine.shutdownDevices() }
    let soft = try #require(machine.accelerator as? SoftAccelerator)
    var writer = StateWriter()
    soft.saveState(into: &writer)
    var reader = StateReader(bytes: writer.bytes)
    let image = try SoftAcceleratorImage.read(from: &reader)
    #expect(reader.isAtEnd)
    #expect(image.cpus.count == 2 && image.lapics.count == 2 && image.pitChannels.count == 3)
    #expect(image.bytes == writer.bytes)
  }

  /// The full x87 tag of a non-empty register follows its value class (SDM Vol. 1 §8.1.7).
  @Test func x87TagsFollowTheValueClass() {
    #expect(CrossAcceleratorState.x87Tag((0, 0)) == 1)  // zero
    #expect(CrossAcceleratorState.x87Tag((1 << 63, 0x3FFF)) == 0)  // 1.0
    #expect(CrossAcceleratorState.x87Tag((1, 0)) == 2)  // denormal
    #expect(CrossAcceleratorState.x87Tag((1 << 63, 0x7FFF)) == 2)  // infinity
    #expect(CrossAcceleratorState.x87Tag((1, 0x3FFF)) == 2)  // unnormal
  }

  /// A KVM CPUID table without some of a model's features is refused naming exactly those;
  /// the table KVM then gets holds only the model's feature bits.
  @Test func missingModelFeaturesAreNamed() throws {
    let model = try #require(GuestCPUModel.hostvisor.features)
    func table(_ features: CPUIDFeatures) -> [CPUIDEntry] {
      [
        CPUIDEntry(function: 1, ecx: features.leaf1ECX | 1 << 25 | 1 << 30, edx: features.leaf1EDX),  // + AES, RDRAND
        CPUIDEntry(
          function: 7, flags: CPUIDEntry.significantIndex, eax: 1, ebx: features.leaf7EBX | 1 << 19,  // + ADX
          ecx: features.leaf7ECX, edx: features.leaf7EDX),
        CPUIDEntry(function: 7, index: 1, flags: CPUIDEntry.significantIndex, eax: 1 << 4),  // AVX-VNNI
        CPUIDEntry(function: 0xD, flags: CPUIDEntry.significantIndex, eax: 0xE7, ecx: 2696),
        CPUIDEntry(function: 0xD, index: 1, flags: CPUIDEntry.significantIndex, eax: 0xF),
        CPUIDEntry(function: 0xD, index: 2, flags: CPUIDEntry.significantIndex, eax: 256, ebx: 576),
        CPUIDEntry(function: 0xD, index: 5, flags: CPUIDEntry.significantIndex, eax: 64, ebx: 1088),
        CPUIDEntry(function: 0x8000_0001, ecx: features.extendedECX, edx: features.extendedEDX),
      ]
    }
    var full = model
    full.xsaveComponents = 0xE7
    full.xsaveInstructions = 0xF
    try CPUIDPolicy.check(.hostvisor, supported: table(full))
    var lacking = full
    lacking.leaf1ECX &= ~(1 << 22)  // MOVBE
    lacking.leaf7ECX = 0  // RDPID
    lacking.extendedEDX &= ~(1 << 26 | 1 << 27)  // 1 GiB pages, RDTSCP
    do {
      try CPUIDPolicy.check(.hostvisor, supported: table(lacking))
      Issue.record("a KVM without MOVBE, RDPID, RDTSCP and 1 GiB pages was accepted for 'hostvisor'")
    } catch {
      guard case .cpuModelUnavailable(let name, let missing) = error else { throw error }
      #expect(name == "hostvisor")
      #expect(missing == ["MOVBE", "RDPID", "1 GiB pages", "RDTSCP"])
    }
    // The masked table: the model's bits, leaf 7 subleaf 0 only, XSAVE up to AVX (832 bytes).
    let masked = CPUIDPolicy.entries(apicID: 0, cpuCount: 1, supported: table(full), model: .x86_64_v3)
    let v3 = try #require(GuestCPUModel.x86_64_v3.features)
    let leaf1 = try #require(masked.first { $0.function == 1 })
    #expect(leaf1.ecx == v3.leaf1ECX && leaf1.edx == v3.leaf1EDX)
    #expect(masked.filter { $0.function == 7 }.map(\.ebx) == [v3.leaf7EBX])
    let xsave = masked.filter { $0.function == 0xD }
    #expect(xsave.map(\.index) == [0, 1, 2])
    #expect(xsave.first?.eax == 7 && xsave.first?.ecx == 832)
    #expect(xsave.dropFirst().first?.eax == v3.xsaveInstructions)
  }
}

extension CrossAcceleratorTests {
  /// `--restore STATE,eager --accel soft` (the command line's path) restores a KVM snapshot on
  /// the software CPU with the memory file read up front; `--accel auto` keeps KVM.
  @Test func commandLineRestorePicksTheAccelerator() throws {
    let source = VMController(id: "cross-cli-source")
    try source.configure { spec throws(ControlError) in
      spec.kernelPath = kernel
      spec.memoryMiB = 32
      spec.accelerator = .kvm
      spec.cpuModel = .x86_64
      spec.serial = .none
    }
    try source.start()
    try waitFor("the guest's first line") { try source.machine!.parts.memory.read(UInt64.self, at: 0x6000) >= 1 }
    try source.pause()
    let state = scratch.path("cli.state")
    try source.createSnapshot(statePath: state, memoryPath: scratch.path("cli.mem"))
    try source.shutdown()

    let moved = try VirtualMachine.restore(
      commandLineArgument: state + ",eager", serial: .none, verbose: false, accelerator: .soft)
    defer { moved.shutdownDevices() }
    #expect(moved.accelerator.name == "soft")
    #expect(try moved.parts.memory.read(UInt64.self, at: 0x6000) >= 1)
    let kept = try VirtualMachine.restore(commandLineArgument: state, serial: .none, verbose: false, accelerator: .auto)
    defer { kept.shutdownDevices() }
    #expect(kept.accelerator.name == "kvm")
  }
}

extension CrossAcceleratorTests {
  /// A snapshot records its CPU model; a restore onto an accelerator that cannot present it is
  /// refused with one line: KVM's own CPUID (`host`, the default on KVM) on the software CPU,
  /// and the software CPU's full model on a KVM that lacks some of its features.
  @Test func restoreOntoAnAcceleratorThatCannotPresentTheModelIsRefused() throws {
    for (source, model) in [(AcceleratorChoice.kvm, GuestCPUModel.host), (.soft, .hostvisor)] {
      let controller = VMController(id: "cross-model-\(source.rawValue)")
      try controller.configure { spec throws(ControlError) in
        spec.kernelPath = kernel
        spec.memoryMiB = 32
        spec.accelerator = source
        spec.serial = .none
      }
      try controller.start()
      #expect(controller.machine?.cpuModel == model)
      try controller.pause()
      let state = scratch.path("model-\(source.rawValue).state")
      try controller.createSnapshot(statePath: state, memoryPath: scratch.path("model-\(source.rawValue).mem"))
      try controller.shutdown()

      let target: AcceleratorChoice = source == .kvm ? .soft : .kvm
      do {
        let moved = try VirtualMachine.restore(
          commandLineArgument: state, serial: .none, verbose: false, accelerator: target)
        moved.shutdownDevices()
        // Only a KVM that offers every feature of the software CPU's model may take it.
        #expect(source == .soft, "a '\(model.name)' machine was restored on \(target.rawValue)")
      } catch {
        let message = "\(error)"
        #expect(!message.contains("\n"), "\(message)")
        #expect(message.contains("'\(model.name)'"), "\(message)")
      }
    }
  }
}
