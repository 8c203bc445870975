import CShim
import Foundation
import KVMBackend
import Testing
import VMCore

@Suite struct KVMErrorTests {
  private func makeParts() throws -> MachineParts {
    MachineParts(
      memory: try GuestMemory(size: 1 << 20), bus: IOBus(), control: MachineControl(), interrupts: InterruptRouter())
  }

  @Test func missingDevicePathIsOneLineNamingThePath() throws {
    let parts = try makeParts()
    do {
      _ = try KVMAccelerator(parts: parts, cpuCount: 1, devicePath: "/nonexistent/kvm")
      Issue.record("opening /nonexistent/kvm succeeded")
    } catch {
      #expect(error == .cannotOpenDevice(path: "/nonexistent/kvm", errno: ENOENT))
      #expect(error.description == "cannot open /nonexistent/kvm: No such file or directory (is KVM available?)")
      #expect(!error.description.contains("\n"))
    }
  }

  @Test func fileThatIsNotKVMIsRejected() throws {
    let parts = try makeParts()
    #expect(throws: KVMError.notAKVMDevice(path: "/dev/null", errno: ENOTTY)) {
      try KVMAccelerator(parts: parts, cpuCount: 1, devicePath: "/dev/null")
    }
  }

  @Test func permissionDeniedSuggestsTheKVMGroup() {
    let error = KVMError.cannotOpenDevice(path: "/dev/kvm", errno: EACCES)
    #expect(error.description == "permission denied on /dev/kvm (add yourself to the kvm group)")
  }

  @Test(.enabled(if: kvmAvailable, "needs /dev/kvm"))
  func cpuCountOutsideTheHostLimitIsRejected() throws {
    let parts = try makeParts()
    do {
      _ = try KVMAccelerator(parts: parts, cpuCount: 0)
      Issue.record("a machine with 0 vCPUs was created")
    } catch {
      guard case .invalidCPUCount(let requested, let maximum) = error else {
        Issue.record("unexpected error \(error)")
        return
      }
      #expect(requested == 0)
      #expect(maximum >= 1)
    }
    let accelerator = try KVMAccelerator(parts: try makeParts(), cpuCount: 1)
    #expect(throws: KVMError.noSuchCPU(index: 3, cpuCount: 1)) { try accelerator.cpuState(cpu: 3) }
  }

  @Test(.enabled(if: kvmAvailable, "needs /dev/kvm"))
  func resetStateOfAFreshVCPUIsTheArchitecturalOne() throws {
    let accelerator = try KVMAccelerator(parts: try makeParts(), cpuCount: 1)
    let state = try accelerator.cpuState(cpu: 0)
    #expect(state.rip == 0xFFF0)
    #expect(state.cs.selector == 0xF000)
    #expect(state.cs.base == 0xFFFF_0000)
    #expect(state.cr0 & X86.cr0PE == 0)
    #expect(accelerator.name == "kvm")
  }
}

@Suite struct KVMCPUStateTests {
  @Test func longModeStateSurvivesTheRoundTrip() {
    var state = X86CPUState()
    state.gprs = (0..<16).map { UInt64($0) * 0x1111_1111_0000 + 7 }
    state.rip = 0xFFFF_FFFF_8100_0000
    state.rflags = 0x246
    state.cs = .flatCode(selector: 0x10, long: true)
    state.ds = .flatData(selector: 0x18)
    state.ss = .flatData(selector: 0x18)
    state.fs = SegmentRegister(selector: 0, base: 0x7FFF_0000, limit: 0xFFFF, type: 3, unusable: true)
    state.gdt = DescriptorTableRegister(base: 0x500, limit: 0x1F)
    state.idt = DescriptorTableRegister(base: 0x1000, limit: 0xFFF)
    state.cr0 = X86.cr0PE | X86.cr0PG | X86.cr0ET
    state.cr3 = 0x9000
    state.cr4 = X86.cr4PAE
    state.cr8 = 3
    state.efer = X86.eferLME | X86.eferLMA | X86.eferNXE

    let regs = KVMCPUState.registers(from: state)
    let sregs = KVMCPUState.specialRegisters(from: state)
    #expect(regs.rdi == state.rdi)
    #expect(regs.r15 == state.r15)
    #expect(sregs.cs.l == 1)
    #expect(sregs.cs.db == 0)
    #expect(sregs.fs.unusable == 1)
    #expect(sregs.efer == state.efer)
    #expect(sregs.apic_base == 0xFEE0_0900)
    #expect(KVMCPUState.cpuState(registers: regs, specialRegisters: sregs) == state)
  }

  @Test func everyFieldLandsInItsNamesake() {
    var state = X86CPUState()
    state.gprs = (0..<16).map { 0x100 + UInt64($0) }
    state.rip = 0x200
    state.rflags = 0x202
    state.cs.selector = 0x08
    state.ds.selector = 0x10
    state.es.selector = 0x18
    state.fs.selector = 0x20
    state.gs.selector = 0x28
    state.ss.selector = 0x30
    state.tr.selector = 0x38
    state.ldt.selector = 0x40
    state.cr0 = 0x11
    state.cr2 = 0x22
    state.cr3 = 0x33
    state.cr4 = 0x44
    state.cr8 = 0x5
    state.efer = 0x66
    state.apicBase = 0xFEE0_0800
    let regs = KVMCPUState.registers(from: state)
    #expect(
      [regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi]
        == Array(state.gprs[0..<8]))
    #expect(
      [regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15] == Array(state.gprs[8..<16]))
    #expect(regs.rip == 0x200 && regs.rflags == 0x202)
    let sregs = KVMCPUState.specialRegisters(from: state)
    #expect(
      [sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss, sregs.tr, sregs.ldt].map(\.selector)
        == [0x08, 0x10, 0x18, 0x20, 0x28, 0x30, 0x38, 0x40])
    #expect(
      [sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8, sregs.efer, sregs.apic_base]
        == [0x11, 0x22, 0x33, 0x44, 0x5, 0x66, 0xFEE0_0800])
    #expect(KVMCPUState.cpuState(registers: regs, specialRegisters: sregs) == state)
  }

  @Test func applyKeepsThePendingInterruptBitmap() {
    var sregs = kvm_sregs()
    sregs.interrupt_bitmap.2 = 0x40
    KVMCPUState.apply(X86CPUState(), to: &sregs)
    #expect(sregs.interrupt_bitmap.2 == 0x40)
    #expect(sregs.cs.base == 0)
    #expect(sregs.cs.limit == 0xFFFF)
  }
}

@Suite struct CPUIDPolicyTests {
  let supported: [CPUIDEntry] = [
    CPUIDEntry(function: 0, eax: 0x1F, ebx: 0x6874_7541),
    CPUIDEntry(function: 1, eax: 0x00A0_0F11, ebx: 0x0F08_0800, ecx: 0x7EF8_320B | (1 << 5), edx: 0x178B_FBFF),
    CPUIDEntry(function: 0xB, index: 0, flags: CPUIDEntry.significantIndex, eax: 1, ebx: 2, ecx: 0x100, edx: 9),
    CPUIDEntry(function: 0xB, index: 1, flags: CPUIDEntry.significantIndex, eax: 7, ebx: 64, ecx: 0x201, edx: 9),
    CPUIDEntry(function: 0x4000_0000, eax: 0x4000_0001, ebx: 0x4B4D_564B),
    CPUIDEntry(function: 0x8000_0001, ecx: 0x75C2_37FF),
    CPUIDEntry(function: 0x8000_0008, eax: 0x3030, ecx: 0x7007),
  ]

  @Test func leafOneCarriesAPICIDCountAndHypervisorBit() throws {
    let table = CPUIDPolicy.entries(apicID: 3, cpuCount: 4, supported: supported)
    let leaf1 = try #require(table.first { $0.function == 1 })
    #expect(leaf1.ebx >> 24 == 3)
    #expect((leaf1.ebx >> 16) & 0xFF == 4)
    #expect(leaf1.ebx & 0xFFFF == 0x0800)  // brand index / CLFLUSH size kept
    #expect(leaf1.ecx & (1 << 31) != 0)  // hypervisor
    #expect(leaf1.ecx & (1 << 24) != 0)  // TSC-deadline timer (the in-kernel LAPIC has it)
    #expect(leaf1.ecx & (1 << 5) == 0)  // no VMX
    #expect(leaf1.ecx & (1 << 3) == 0)  // no MONITOR
    #expect(leaf1.edx & (1 << 28) != 0)  // HTT: the count field is valid
    #expect(leaf1.eax == 0x00A0_0F11)  // family/model untouched
  }

  @Test func topologyLeavesDescribeOnePackageOfSingleThreadCores() {
    let table = CPUIDPolicy.entries(apicID: 2, cpuCount: 3, supported: supported)
    let topology = table.filter { $0.function == 0xB }.sorted { $0.index < $1.index }
    #expect(
      topology == [
        CPUIDEntry(function: 0xB, index: 0, flags: 1, eax: 0, ebx: 1, ecx: 0x100, edx: 2),
        CPUIDEntry(function: 0xB, index: 1, flags: 1, eax: 2, ebx: 3, ecx: 0x201, edx: 2),
        CPUIDEntry(function: 0xB, index: 2, flags: 1, eax: 0, ebx: 0, ecx: 2, edx: 2),
      ])
    #expect(!table.contains { $0.function == 0x1F })  // not offered by the host: not invented
    let extended = table.first { $0.function == 0x8000_0008 }
    #expect(extended?.ecx == 0x2002)  // ApicIdSize 2, NC = 2
    #expect(table.first { $0.function == 0x8000_0001 }.map { $0.ecx & (1 << 2) } == 0)  // no SVM
    #expect(table.contains { $0.function == 0x4000_0000 && $0.ebx == 0x4B4D_564B })  // KVM leaves kept
  }

  @Test func singleCPUHasNoHyperThreadingFlag() throws {
    let table = CPUIDPolicy.entries(apicID: 0, cpuCount: 1, supported: supported)
    let leaf1 = try #require(table.first { $0.function == 1 })
    #expect(leaf1.ebx >> 24 == 0)
    #expect(leaf1.edx & (1 << 28) == 0)
  }
}
