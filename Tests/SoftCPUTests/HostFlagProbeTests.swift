import CShim
import Testing

/// The host-flag probes the translator uses to decide whether a host's MUL/IMUL and shifts leave
/// the architecturally undefined flags as the interpreter does: they must read the defined flags
/// right, or every host would look different and lose those translations silently.
@Suite("Host flag probes")
struct HostFlagProbeTests {
  let cf: UInt64 = 1
  let pf: UInt64 = 1 << 2
  let zf: UInt64 = 1 << 6
  let sf: UInt64 = 1 << 7
  let of: UInt64 = 1 << 11

  @Test func multiplyProbesReadCarryAndZero() {
    // 2^62 * 2 overflows a signed 64-bit product (CF), not an unsigned one.
    #expect(hv_host_imul64_flags(1 << 62, 2) & cf == cf)
    #expect(hv_host_mul64_flags(1 << 62, 2) & cf == 0)
    // 2^63 * 2 overflows the unsigned product; its low half is 0.
    #expect(hv_host_mul64_flags(1 << 63, 2) & cf == cf)
    #expect(hv_host_imul64_flags(3, 5) & cf == 0)
  }

  @Test func shiftProbesReadTheDefinedFlags() {
    // SHL 64-bit by 1 of 2^63: result 0 (ZF, PF), CF = the bit shifted out, OF = MSB ^ CF = 1.
    let shl = hv_host_shift_flags(0, 1, 1 << 63, 1)
    #expect(shl & (cf | zf | pf | of) == cf | zf | pf | of)
    // SHR 32-bit by 1 of 0x80000010: result 0x40000008, CF = bit 0 = 0, OF = the old MSB = 1
    // (OF is defined for a count of 1 only).
    let shr = hv_host_shift_flags(1, 0, 0x8000_0010, 1)
    #expect(shr & (cf | zf | sf) == 0)
    #expect(shr & of == of)
    // SAR 32-bit by 1 of -1: -1, CF = 1, SF, OF = 0.
    let sar = hv_host_shift_flags(2, 0, 0xFFFF_FFFF, 1)
    #expect(sar & (cf | sf | of) == cf | sf)
    // ROL 64-bit by 1 of 2^63: 1, CF = 1, OF = MSB ^ CF = 1.
    #expect(hv_host_shift_flags(3, 1, 1 << 63, 1) & (cf | of) == cf | of)
    // ROR 32-bit by 1 of 1: 0x80000000, CF = MSB = 1, OF = the two top bits differ = 1.
    #expect(hv_host_shift_flags(4, 0, 1, 1) & (cf | of) == cf | of)
  }
}
