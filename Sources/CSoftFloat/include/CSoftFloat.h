#ifndef HOSTVISOR_CSOFTFLOAT_H
#define HOSTVISOR_CSOFTFLOAT_H
// Host-executed floating-point primitives for the software CPU's SSE and x87 units.
//
// Every floating-point result of the guest is produced by the very same host instruction,
// executed with the guest's MXCSR (SSE) or x87 control word loaded, so rounding, NaN
// propagation, denormal handling (DAZ/FTZ), precision control and the exception flags are
// bit-exact with the host CPU. The caller (Swift) decides about unmasked exceptions.
#include <stdint.h>

/// Lane shapes for `csf_sse_float`'s `operation` argument: `prefix << 8 | opcode byte` of the
/// 0F map (prefix 0 none, 1 = 66, 2 = F3, 3 = F2), plus these flags:
#define CSF_SSE_REXW 0x10000u  /* 64-bit integer operand (CVTSI2SS/SD, CVT(T)SS/SD2SI) */
#define CSF_SSE_MAP38 0x20000u /* 0F38 map */
#define CSF_SSE_MAP3A 0x40000u /* 0F3A map */
/// Returned when the operation is not one of the supported forms.
#define CSF_UNSUPPORTED 0xFFFFFFFFu

/// Executes one SSE floating-point instruction on the host under `mxcsr` with all exceptions
/// masked and the flags cleared. `destination` (16 bytes) holds the destination XMM register and
/// receives the result (for forms with a general-register destination: the integer in the low
/// 8 bytes; for (U)COMIS*: ZF/PF/CF in RFLAGS layout in the low 8 bytes). `source` (16 bytes)
/// holds the source XMM register or memory value (or general register for CVTSI2S*).
/// Returns the exception flags raised (MXCSR bits 0-5) or CSF_UNSUPPORTED.
uint32_t csf_sse_float(uint32_t operation, uint32_t immediate, uint32_t mxcsr, void *destination,
                       const void *source);

/// VCMPPS/PD/SS/SD (`operation` as for `csf_sse_float`, opcode C2) on one 128-bit half with the
/// VEX forms' five-bit predicate in `immediate`. Returns the exception flags or CSF_UNSUPPORTED.
uint32_t csf_avx_compare(uint32_t operation, uint32_t immediate, uint32_t mxcsr, void *destination,
                         const void *source);

/// FMA3 on the host under `mxcsr` (exceptions masked, flags cleared): `operation` is the 0F 38
/// opcode byte (96-9F, A6-AF, B6-BF) | VEX.W << 8 | VEX.L << 9 (L only for the packed forms).
/// `destination`, `middle` (VEX.vvvv) and `source` (r/m) are 32 bytes each; the result replaces
/// `destination` (upper 128 bits zero for 128-bit and scalar forms). Returns the exception flags
/// or CSF_UNSUPPORTED.
uint32_t csf_fma(uint32_t operation, uint32_t mxcsr, void *destination, const void *middle, const void *source);

/// F16C on the host under `mxcsr`: `operation` 0/1 = VCVTPH2PS to xmm/ymm (from the low 8/16 bytes
/// of `source`), 2/3 = VCVTPS2PH from xmm/ymm with `immediate` (bits 2:0) into the low 8/16 bytes
/// of `destination` (the rest zero). Buffers are 32 bytes. Returns the exception flags or
/// CSF_UNSUPPORTED.
uint32_t csf_f16c(uint32_t operation, uint32_t immediate, uint32_t mxcsr, void *destination, const void *source);

/// Executes one SSE integer instruction (no MXCSR involvement) on `destination` with `source`.
/// `operation` as for `csf_sse_float`. Returns 0, or CSF_UNSUPPORTED. For PTEST the RFLAGS
/// bits are returned in the low 8 bytes of `destination` instead.
uint32_t csf_sse_integer(uint32_t operation, uint32_t immediate, void *destination, const void *source);

/// Executes one MMX instruction (the no-prefix 0F xx and 0F 38 xx integer forms; `operation`
/// is the opcode byte, with CSF_SSE_MAP38 for the 0F 38 map) on the 64-bit `destination` with
/// `source`, leaving the host's x87 state empty (EMMS). Returns 0, or CSF_UNSUPPORTED.
uint32_t csf_mmx(uint32_t operation, uint64_t *destination, const uint64_t *source);

/// SSE4.2 PCMPESTRM (0x60), PCMPESTRI (0x61), PCMPISTRM (0x62), PCMPISTRI (0x63) with the
/// explicit lengths in `lengthA`/`lengthD` (already saturated by the caller). The mask forms
/// write XMM0's new value to `destination`; the index forms store ECX in `*result`.
/// Returns CF, ZF, SF, OF in RFLAGS layout, or CSF_UNSUPPORTED.
uint32_t csf_sse_string_compare(uint32_t operation, uint32_t immediate, int32_t lengthA, int32_t lengthD,
                                void *destination, const void *source, uint64_t *result);

/// CRC32 (SSE4.2, Castagnoli polynomial) of the low `size` bytes (1, 2, 4, 8) of `value`.
uint32_t csf_crc32(uint32_t crc, uint64_t value, uint32_t size);

/// Whether an SSE operation on one element is inexact when the exponent range is unbounded
/// (what the PE flag reports next to an unmasked overflow or underflow). `kind`: 0 add, 1 sub,
/// 2 mul, 3 div (left op right), 4 sqrt (of right), 5 double-to-single conversion (of right).
/// Operands are the raw element bits (float in the low 32 bits unless `isDouble`).
/// Computed on the host x87 with the precision control set to the destination format.
uint32_t csf_unbounded_inexact(uint32_t kind, uint32_t isDouble, uint64_t left, uint64_t right, uint32_t mxcsr);

/// Whether one FMA3 element is inexact when the exponent range is unbounded (what PE reports
/// next to an unmasked overflow or underflow of that element). `operation` as for `csf_fma`;
/// `element` is the element's index (VFMADDSUB/VFMSUBADD alternate by it); `destination`,
/// `middle` (VEX.vvvv) and `source` (r/m) are the element's raw bits (float in the low 32 bits
/// unless VEX.W). Computed exactly with integers; DAZ from `mxcsr` applies to the inputs.
uint32_t csf_fma_unbounded_inexact(uint32_t operation, uint32_t element, uint64_t destination, uint64_t middle,
                                   uint64_t source, uint32_t mxcsr);

/// Whether converting the single-precision `single` to half precision (VCVTPS2PH) is inexact when
/// the exponent range is unbounded (more than 11 significant bits); a denormal input (DAZ clear)
/// always is, as the host reports it. DAZ from `mxcsr` applies.
uint32_t csf_single_to_half_unbounded_inexact(uint32_t single, uint32_t mxcsr);

/// Host x87 execution frame (see csf_x87).
typedef struct {
  /// ST(0) and ST(1) before (the first `inputs` are loaded) and after (the first `outputs`).
  long double stack[3];
  /// Memory operand: read and/or written by the instruction (m16..m80).
  uint8_t memory[16];
  /// Guest control word, loaded for the instruction.
  uint16_t control;
  /// Host status word right after the instruction (TOP field meaningless).
  uint16_t status;
  /// How many stack values to load (0-2).
  uint8_t inputs;
  /// Stack depth after the instruction (0-3).
  uint8_t outputs;
  /// AH after the instruction (LAHF: SF ZF - AF - PF - CF), for FCOMI/FUCOMI.
  uint8_t flags;
  /// Nonzero: load the guest's condition codes (from `guestStatus`) before the instruction
  /// (FNSTENV/FLDENV, slow), so codes it leaves unchanged come back exactly as the hardware
  /// has them. Zero: the host's condition codes before the instruction are unspecified.
  uint8_t preloadConditionCodes;
  /// Guest status word (see `preloadConditionCodes`).
  uint16_t guestStatus;
} csf_x87_frame;

/// Executes the x87 instruction `escape << 8 | modrm` on the host: register forms must use
/// ST(1) as their register operand (modrm low bits 001 for C0-DF/E0-FF rows), memory forms
/// must use mod 00 r/m 111 (the memory operand is `frame->memory`). The guest's control word
/// (and optionally its condition codes) is loaded; unmasked exceptions only set ES in the returned
/// status (they are cleared on the host before anything can trap). Returns 0, or -1 when the
/// encoding is not supported.
int csf_x87(uint32_t code, csf_x87_frame *frame);

#endif
