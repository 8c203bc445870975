import Testing

@testable import SoftCPU

/// XINUSE, the XSAVE components that may be outside their initial state, as XSAVE's XSTATE_BV
/// shows it. The architecture lets a processor keep a bit set while its component is back in
/// the initial state (SDM vol. 1 §13.6); it only forbids a clear bit for a component that is
/// not. Processors use that freedom differently: an Intel host sets a bit when an instruction
/// writes the component, and clears it only by XRSTOR (and VZEROUPPER/VZEROALL for AVX); an
/// AMD EPYC host clears bits again when the registers return to zero by a zeroing idiom, a
/// VEX.128 write or FNINIT. The model follows the first rule on every host (docs/cpu-model.md).
@Suite("XINUSE: the model's rule and the host's")
struct XSAVEInUseTests {
  /// One sequence run from the initial state of the x87, SSE and AVX components, and the
  /// XSTATE_BV the model's rule gives after it.
  struct Case {
    var name: String
    var code: [UInt8]
    var modelInUse: UInt8
  }

  // Encodings; the sequences address the data buffer through RBX.
  static let movapsOnes: [UInt8] = [0x0F, 0x28, 0x83, 0x00, 0x20, 0x00, 0x00]  // movaps xmm0, [rbx+0x2000]
  static let pxor: [UInt8] = [0x66, 0x0F, 0xEF, 0xC0]  // pxor xmm0, xmm0
  static let vpxor: [UInt8] = [0xC5, 0xF9, 0xEF, 0xC0]  // vpxor xmm0, xmm0, xmm0
  static let vmovapsYMMZeros: [UInt8] = [0xC5, 0xFC, 0x28, 0x83, 0x40, 0x20, 0x00, 0x00]  // vmovaps ymm0, [rbx+0x2040]
  static let vmovapsYMMOnes: [UInt8] = [0xC5, 0xFC, 0x28, 0x83, 0x00, 0x20, 0x00, 0x00]  // vmovaps ymm0, [rbx+0x2000]
  static let vmovapsXMMOnes: [UInt8] = [0xC5, 0xF8, 0x28, 0x83, 0x00, 0x20, 0x00, 0x00]  // vmovaps xmm0, [rbx+0x2000]
  static let vzeroupper: [UInt8] = [0xC5, 0xF8, 0x77]
  static let vcvtpd2ps: [UInt8] = [0xC5, 0xFD, 0x5A, 0xC1]  // vcvtpd2ps xmm0, ymm1
  static let fld1AndPop: [UInt8] = [0xD9, 0xE8, 0xDD, 0xD8]  // fld1; fstp st(0)
  static let fninit: [UInt8] = [0xDB, 0xE3]
  static let fnop: [UInt8] = [0xD9, 0xD0]

  /// The model's rule: a write marks the component in use until XRSTOR initializes it, or
  /// VZEROUPPER for AVX; a VEX.256 instruction marks AVX even when it writes an XMM register.
  static let cases: [Case] = [
    Case(name: "nothing", code: [], modelInUse: 0),
    Case(name: "movaps xmm0 (non-zero)", code: movapsOnes, modelInUse: 2),
    Case(name: "movaps xmm0 (non-zero); pxor xmm0, xmm0", code: movapsOnes + pxor, modelInUse: 2),
    Case(name: "pxor xmm0, xmm0", code: pxor, modelInUse: 2),
    Case(name: "vpxor xmm0, xmm0, xmm0", code: vpxor, modelInUse: 2),
    Case(name: "vmovaps ymm0 (zeros)", code: vmovapsYMMZeros, modelInUse: 6),
    Case(name: "vmovaps ymm0 (non-zero); vmovaps xmm0", code: vmovapsYMMOnes + vmovapsXMMOnes, modelInUse: 6),
    Case(name: "vmovaps ymm0 (non-zero); vzeroupper", code: vmovapsYMMOnes + vzeroupper, modelInUse: 2),
    Case(name: "vcvtpd2ps xmm0, ymm1", code: vcvtpd2ps, modelInUse: 6),
    Case(name: "fld1; fstp st(0)", code: fld1AndPop, modelInUse: 1),
    Case(name: "fninit", code: fninit, modelInUse: 1),
    Case(name: "fnop", code: fnop, modelInUse: 1),
  ]

  /// Offsets in the data buffer: the XRSTOR source (initial state), the XSAVE area, operands.
  static let initialArea = 0
  static let savedArea = 0x1000
  static let savedAreaBytes = 832

  /// mov eax, 7; xor edx, edx; xrstor [rbx]; CODE; mov eax, 7; xor edx, edx; xsave [rbx+0x1000]
  static func sequence(_ code: [UInt8]) -> [UInt8] {
    let components: [UInt8] = [0xB8, 0x07, 0x00, 0x00, 0x00, 0x31, 0xD2]
    return components + [0x0F, 0xAE, 0x2B] + code + components + [0x0F, 0xAE, 0xA3, 0x00, 0x10, 0x00, 0x00]
  }

  static func inputs() -> (MachineState, [UInt8]) {
    var rng = DiffRNG(seed: 11)
    var state = DiffStates.random(&rng, x87: false, unmaskedSIMD: false)
    state.gpr[3] = DiffLayout.dataBase
    state.mxcsr = 0x1F80
    var data = [UInt8](repeating: 0, count: DiffLayout.dataSize)
    // The XRSTOR source: XSTATE_BV = 0 initializes all three components; XRSTOR still loads
    // MXCSR from the area (offset 24), and FCW is set for the host's own floating point after.
    data[initialArea] = 0x7F
    data[initialArea + 1] = 0x03
    data[initialArea + 24] = 0x80
    data[initialArea + 25] = 0x1F
    for offset in 0x2000..<0x2020 { data[offset] = 0x11 }
    return (state, data)
  }

  @Test("the model's XSTATE_BV after each sequence follows its rule (known answers)")
  func modelRule() {
    let (state, data) = Self.inputs()
    for testCase in Self.cases {
      for runner in [EmulatedRunner(), EmulatedRunner(paging: true)] {
        let result = runner.run(code: Self.sequence(testCase.code), initial: state, data: data)
        #expect(result.end == .completed, "\(testCase.name): \(result.end)")
        let inUse = result.data[Self.savedArea + 512] & 7
        #expect(inUse == testCase.modelInUse, "\(testCase.name), paging \(runner.paging): XSTATE_BV \(inUse)")
      }
    }
  }

  /// On any host: every component the host reports in use, the model does too (a clear bit
  /// where the model's is set would mean the model loses state); where only the model's bit is
  /// set, the model's saved component holds the initial values; the registers and every other
  /// saved byte match the host.
  @Test("the host's XSTATE_BV is within the model's; the saved state matches the host's")
  func hostWithinModel() {
    let (state, data) = Self.inputs()
    for testCase in Self.cases {
      let code = Self.sequence(testCase.code)
      let native = NativeRunner.run(code: code, initial: state, data: data)
      let emulated = EmulatedRunner().run(code: code, initial: state, data: data)
      var mask = ComparisonMask()
      mask.dataIgnored = Array(Self.savedArea..<Self.savedArea + Self.savedAreaBytes)
      let differences = DiffCompare.compare(native: native, emulated: emulated, mask: mask)
      #expect(differences.isEmpty, "\(testCase.name): \(differences.map(\.description).joined(separator: "; "))")
      let host = native.data[Self.savedArea + 512] & 7
      let model = emulated.data[Self.savedArea + 512] & 7
      #expect(host & ~model == 0, "\(testCase.name): host XSTATE_BV \(host), model \(model)")
      for offset in 0..<Self.savedAreaBytes where offset != 512 {
        let component = Self.component(at: offset)
        let hostByte = native.data[Self.savedArea + offset]
        let modelByte = emulated.data[Self.savedArea + offset]
        if let component, model & component != 0 && host & component == 0 {
          #expect(
            modelByte == Self.initialByte(at: offset),
            "\(testCase.name): model's initial-state byte at \(offset) is \(modelByte)")
        } else if !Self.notCompared(offset) {
          #expect(hostByte == modelByte, "\(testCase.name): byte \(offset): host \(hostByte), model \(modelByte)")
        }
      }
    }
  }

  /// The XSTATE_BV bit of the component a byte of the standard-format area belongs to (nil:
  /// MXCSR, MXCSR_MASK and the header, stored whatever XINUSE says).
  static func component(at offset: Int) -> UInt8? {
    switch offset {
    case 0..<24, 32..<160: return 1
    case 160..<416: return 2
    case 576..<832: return 4
    default: return nil
    }
  }

  /// A byte of a component in its initial state: FCW 0x037F, everything else zero (FTW is
  /// stored abridged, 0 = every register empty).
  static func initialByte(at offset: Int) -> UInt8 {
    switch offset {
    case 0: return 0x7F
    case 1: return 0x03
    default: return 0
    }
  }

  /// Bytes the vendors store differently whatever XINUSE says: the x87 last-instruction and
  /// operand pointers (FOP, FIP, FDP: AMD stores them only with an exception pending) and
  /// MXCSR_MASK (`HostModel`).
  static func notCompared(_ offset: Int) -> Bool {
    let pointers = HostModel.vendorsDiffer && (6..<24).contains(offset)
    return pointers || (HostModel.mxcsrMaskDifference != 0 && (28..<32).contains(offset))
  }
}
