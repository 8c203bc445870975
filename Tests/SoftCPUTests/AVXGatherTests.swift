import SoftCPU
import Testing
import VMCore

/// The AVX2 gathers against the host CPU (the generator's memory operands have no VSIB form):
/// every gather with dword and qword indices, VEX.128 and VEX.256, random masks, negative
/// indices and every scale, base and displacement, and the #UD when destination, index and mask
/// are not three different registers. Faults inside the gather are not compared: the host run
/// ends in a native #PF, which the harness does not compare.
@Suite("AVXGatherTests")
struct AVXGatherTests {
  static let forms = [
    "vpgatherdd", "vpgatherdq", "vpgatherqd", "vpgatherqq", "vgatherdps", "vgatherdpd", "vgatherqps", "vgatherqpd",
  ]

  /// Registers of a gather at `length` (VEX.L), with the index/destination/mask shapes of the form.
  static func operands(_ form: String, wide: Bool) -> (destination: String, index: String, mask: String) {
    let qwordIndex = form.contains("gatherq")
    let qwordElement = form.hasSuffix("q") && form.hasPrefix("vp") || form.hasSuffix("pd")
    // The register holding the narrower side of a 256-bit gather is an xmm register.
    let destinationWide = wide && !(qwordIndex && !qwordElement)
    let indexWide = wide && !(!qwordIndex && qwordElement)
    return (destinationWide ? "ymm" : "xmm", indexWide ? "ymm" : "xmm", destinationWide ? "ymm" : "xmm")
  }

  @Test func gathersMatchTheHost() throws {
    var rng = DiffRNG(seed: 11)
    for form in Self.forms {
      for wide in [false, true] {
        for round in 0..<40 {
          let shape = Self.operands(form, wide: wide)
          let scale = [1, 2, 4, 8][rng.below(4)]
          let displacement = rng.below(64) * 4
          let source =
            "\(form) \(shape.destination)3, [rbx + \(shape.index)7*\(scale) + \(displacement)], \(shape.mask)12"
          let code = try CoreAssembler.assemble(source)
          let qwordIndex = form.contains("gatherq")
          let result = DifferentialFixedCases.check(code) { state in
            // RBX in the middle of the buffer; indices keep every element inside it.
            state.gpr[3] = DiffLayout.dataBase + UInt64(DiffLayout.dataSize / 2)
            var lanes: [UInt64] = []
            for _ in 0..<(qwordIndex ? 4 : 8) {
              lanes.append(UInt64(bitPattern: Int64(rng.below(2048) - 1024)))
            }
            if qwordIndex {
              state.xmm[7] = SIMD2(lanes[0], lanes[1])
              state.ymmHigh[7] = SIMD2(lanes[2], lanes[3])
            } else {
              func pair(_ index: Int) -> UInt64 { lanes[index] & 0xFFFF_FFFF | lanes[index + 1] << 32 }
              state.xmm[7] = SIMD2(pair(0), pair(2))
              state.ymmHigh[7] = SIMD2(pair(4), pair(6))
            }
            // Masks: sign bits at random (all set, none set, mixed).
            let kind = round % 3
            var mask: [UInt64] = []
            for _ in 0..<4 {
              switch kind {
              case 0: mask.append(~0)
              case 1: mask.append(rng.next() & 0x7FFF_FFFF_7FFF_FFFF)
              default: mask.append(rng.next())
              }
            }
            state.xmm[12] = SIMD2(mask[0], mask[1])
            state.ymmHigh[12] = SIMD2(mask[2], mask[3])
          }
          #expect(result == nil, "\(source)\n\(result ?? "")")
        }
      }
    }
  }

  @Test func gathersWithRepeatedRegistersAreInvalid() throws {
    for source in [
      "vpgatherdd ymm3, [rbx + ymm3*4], ymm12", "vpgatherdd ymm3, [rbx + ymm7*4], ymm3",
      "vgatherqpd xmm3, [rbx + xmm7*8], xmm7",
    ] {
      let code = try CoreAssembler.assemble(source)
      let result = DifferentialFixedCases.check(code) { state in
        state.gpr[3] = DiffLayout.dataBase + UInt64(DiffLayout.dataSize / 2)
        state.xmm[7] = .zero
        state.ymmHigh[7] = .zero
      }
      #expect(result == nil, "\(source)\n\(result ?? "")")
    }
  }
}

/// When the VEX vector forms are available: CR4.OSXSAVE and XCR0.SSE/AVX (else #UD), CR0.TS
/// (#NM). The differential tests cannot change these on the host.
@Suite("AVXAvailability")
struct AVXAvailabilityTests {
  @Test("VEX vector forms: #UD without CR4.OSXSAVE or without XCR0.AVX, #NM with CR0.TS; BMI unaffected")
  func availability() throws {
    let programs: [(String, String, Fault?)] = [
      ("mov rax, cr4\nbtr rax, 18\nmov cr4, rax", "vaddps ymm0, ymm1, ymm2", .invalidOpcode),
      ("mov rax, cr4\nbtr rax, 18\nmov cr4, rax", "vpbroadcastd xmm0, xmm1", .invalidOpcode),
      ("xor ecx, ecx\nxor edx, edx\nmov eax, 3\nxsetbv", "vfmadd231ps xmm0, xmm1, xmm2", .invalidOpcode),
      ("xor ecx, ecx\nxor edx, edx\nmov eax, 3\nxsetbv", "vcvtph2ps ymm0, xmm1", .invalidOpcode),
      ("mov rax, cr0\nbts rax, 3\nmov cr0, rax", "vpermq ymm0, ymm1, 0x1b", .deviceNotAvailable),
      ("mov rax, cr4\nbtr rax, 18\nmov cr4, rax", "andn eax, ebx, ecx", nil),
      ("", "vpermq ymm0, ymm1, 0x1b", nil),
    ]
    for (setup, instruction, expected) in programs {
      let machine = try CoreMachine(cpl: 0)
      try machine.load(assembly: "\(setup)\n\(instruction)\nhlt")
      let outcome = machine.run()
      if let expected {
        #expect(outcome == .fault(expected), "\(setup) / \(instruction)")
      } else {
        #expect(outcome == .halted, "\(setup) / \(instruction)")
      }
    }
  }
}
