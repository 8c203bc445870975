// Host-executed SSE and x87 primitives; see include/CSoftFloat.h.
#include "CSoftFloat.h"

#include <string.h>

typedef long long v2di __attribute__((vector_size(16)));

// MARK: - SSE floating point

// Runs `insn src, dst` with the guest MXCSR (flags cleared, all exceptions masked) and
// restores the host MXCSR inside the same asm statement, so no compiler-generated SSE code
// ever runs under the guest's rounding mode.
#define SSE_XX(insn)                                                                         \
  __asm__ volatile("stmxcsr %[h]\n\tldmxcsr %[g]\n\t" insn " %[s], %[d]\n\t"                 \
                   "stmxcsr %[o]\n\tldmxcsr %[h]"                                             \
                   : [d] "+x"(d), [o] "=m"(out), [h] "+m"(host)                               \
                   : [s] "x"(s), [g] "m"(guest));                                             \
  break

#define SSE_CMP(insn, imm)                                                                   \
  case imm:                                                                                  \
    __asm__ volatile("stmxcsr %[h]\n\tldmxcsr %[g]\n\t" insn " $" #imm ", %[s], %[d]\n\t"    \
                     "stmxcsr %[o]\n\tldmxcsr %[h]"                                           \
                     : [d] "+x"(d), [o] "=m"(out), [h] "+m"(host)                             \
                     : [s] "x"(s), [g] "m"(guest));                                           \
    break

#define SSE_CMP_ALL(insn)                                                                    \
  switch (immediate & 7) {                                                                   \
    SSE_CMP(insn, 0);                                                                        \
    SSE_CMP(insn, 1);                                                                        \
    SSE_CMP(insn, 2);                                                                        \
    SSE_CMP(insn, 3);                                                                        \
    SSE_CMP(insn, 4);                                                                        \
    SSE_CMP(insn, 5);                                                                        \
    SSE_CMP(insn, 6);                                                                        \
    SSE_CMP(insn, 7);                                                                        \
  }                                                                                          \
  break

// Integer source (general register) into an XMM destination.
#define SSE_GX(insn, width)                                                                  \
  __asm__ volatile("stmxcsr %[h]\n\tldmxcsr %[g]\n\t" insn " %" width "[s], %[d]\n\t"        \
                   "stmxcsr %[o]\n\tldmxcsr %[h]"                                             \
                   : [d] "+x"(d), [o] "=m"(out), [h] "+m"(host)                               \
                   : [s] "r"(integer), [g] "m"(guest));                                       \
  break

// XMM source into a general-register destination.
#define SSE_XG(insn, width)                                                                  \
  __asm__ volatile("stmxcsr %[h]\n\tldmxcsr %[g]\n\t" insn " %[s], %" width "[r]\n\t"        \
                   "stmxcsr %[o]\n\tldmxcsr %[h]"                                             \
                   : [r] "=r"(integer), [o] "=m"(out), [h] "+m"(host)                         \
                   : [s] "x"(s), [g] "m"(guest));                                             \
  d[0] = (long long)integer;                                                                 \
  d[1] = 0;                                                                                  \
  break

// Ordered/unordered compares into RFLAGS (via LAHF: bit 6 ZF, bit 2 PF, bit 0 CF).
#define SSE_COMI(insn)                                                                       \
  __asm__ volatile("stmxcsr %[h]\n\tldmxcsr %[g]\n\t" insn " %[s], %[d]\n\t"                 \
                   "lahf\n\tstmxcsr %[o]\n\tldmxcsr %[h]"                                     \
                   : [o] "=m"(out), [h] "+m"(host), "=a"(flags)                              \
                   : [d] "x"(d), [s] "x"(s), [g] "m"(guest)                                   \
                   : "cc");                                                                   \
  d[0] = (long long)((flags >> 8) & 0x45);                                                   \
  d[1] = 0;                                                                                  \
  break


// Expands M(insn, imm) for imm = 0x00...0xFF (the immediate must be an assembler literal).
#define IMM_ROW(M, insn, h)                                                                   \
  M(insn, h##0) M(insn, h##1) M(insn, h##2) M(insn, h##3) M(insn, h##4) M(insn, h##5)       \
  M(insn, h##6) M(insn, h##7) M(insn, h##8) M(insn, h##9) M(insn, h##A) M(insn, h##B)       \
  M(insn, h##C) M(insn, h##D) M(insn, h##E) M(insn, h##F)
#define IMM_ALL(M, insn)                                                                      \
  IMM_ROW(M, insn, 0x0) IMM_ROW(M, insn, 0x1) IMM_ROW(M, insn, 0x2) IMM_ROW(M, insn, 0x3)  \
  IMM_ROW(M, insn, 0x4) IMM_ROW(M, insn, 0x5) IMM_ROW(M, insn, 0x6) IMM_ROW(M, insn, 0x7)  \
  IMM_ROW(M, insn, 0x8) IMM_ROW(M, insn, 0x9) IMM_ROW(M, insn, 0xA) IMM_ROW(M, insn, 0xB)  \
  IMM_ROW(M, insn, 0xC) IMM_ROW(M, insn, 0xD) IMM_ROW(M, insn, 0xE) IMM_ROW(M, insn, 0xF)

// Float form with an immediate, under the guest MXCSR.
#define SSE_IMM_CASE(insn, imm)                                                               \
  case imm:                                                                                   \
    __asm__ volatile("stmxcsr %[h]\n\tldmxcsr %[g]\n\t" insn " $" #imm ", %[s], %[d]\n\t"     \
                     "stmxcsr %[o]\n\tldmxcsr %[h]"                                            \
                     : [d] "+x"(d), [o] "=m"(out), [h] "+m"(host)                              \
                     : [s] "x"(s), [g] "m"(guest));                                            \
    break;
#define SSE_IMM_ALL(insn)                                                                     \
  switch (immediate & 0xFF) { IMM_ALL(SSE_IMM_CASE, insn) }                                   \
  break

#define OP(prefix, byte) (((prefix) << 8) | (byte))

uint32_t csf_sse_float(uint32_t operation, uint32_t immediate, uint32_t mxcsr, void *destination,
                       const void *source) {
  v2di d, s;
  memcpy(&d, destination, 16);
  memcpy(&s, source, 16);
  uint32_t guest = (mxcsr & ~0x3Fu) | 0x1F80u;
  uint32_t out = 0, host = 0;
  uint64_t integer = (uint64_t)s[0];
  uint64_t flags = 0;
  if (!(operation & CSF_SSE_REXW)) {
    integer = (uint32_t)integer;
  }
  switch (operation) {
  // SQRT, RSQRT, RCP
  case OP(0, 0x51): SSE_XX("sqrtps");
  case OP(1, 0x51): SSE_XX("sqrtpd");
  case OP(2, 0x51): SSE_XX("sqrtss");
  case OP(3, 0x51): SSE_XX("sqrtsd");
  case OP(0, 0x52): SSE_XX("rsqrtps");
  case OP(2, 0x52): SSE_XX("rsqrtss");
  case OP(0, 0x53): SSE_XX("rcpps");
  case OP(2, 0x53): SSE_XX("rcpss");
  // Arithmetic
  case OP(0, 0x58): SSE_XX("addps");
  case OP(1, 0x58): SSE_XX("addpd");
  case OP(2, 0x58): SSE_XX("addss");
  case OP(3, 0x58): SSE_XX("addsd");
  case OP(0, 0x59): SSE_XX("mulps");
  case OP(1, 0x59): SSE_XX("mulpd");
  case OP(2, 0x59): SSE_XX("mulss");
  case OP(3, 0x59): SSE_XX("mulsd");
  case OP(0, 0x5C): SSE_XX("subps");
  case OP(1, 0x5C): SSE_XX("subpd");
  case OP(2, 0x5C): SSE_XX("subss");
  case OP(3, 0x5C): SSE_XX("subsd");
  case OP(0, 0x5D): SSE_XX("minps");
  case OP(1, 0x5D): SSE_XX("minpd");
  case OP(2, 0x5D): SSE_XX("minss");
  case OP(3, 0x5D): SSE_XX("minsd");
  case OP(0, 0x5E): SSE_XX("divps");
  case OP(1, 0x5E): SSE_XX("divpd");
  case OP(2, 0x5E): SSE_XX("divss");
  case OP(3, 0x5E): SSE_XX("divsd");
  case OP(0, 0x5F): SSE_XX("maxps");
  case OP(1, 0x5F): SSE_XX("maxpd");
  case OP(2, 0x5F): SSE_XX("maxss");
  case OP(3, 0x5F): SSE_XX("maxsd");
  // SSE3 arithmetic
  case OP(1, 0xD0): SSE_XX("addsubpd");
  case OP(3, 0xD0): SSE_XX("addsubps");
  case OP(1, 0x7C): SSE_XX("haddpd");
  case OP(3, 0x7C): SSE_XX("haddps");
  case OP(1, 0x7D): SSE_XX("hsubpd");
  case OP(3, 0x7D): SSE_XX("hsubps");
  // Conversions between float formats and packed integers
  case OP(0, 0x5A): SSE_XX("cvtps2pd");
  case OP(1, 0x5A): SSE_XX("cvtpd2ps");
  case OP(2, 0x5A): SSE_XX("cvtss2sd");
  case OP(3, 0x5A): SSE_XX("cvtsd2ss");
  case OP(0, 0x5B): SSE_XX("cvtdq2ps");
  case OP(1, 0x5B): SSE_XX("cvtps2dq");
  case OP(2, 0x5B): SSE_XX("cvttps2dq");
  case OP(1, 0xE6): SSE_XX("cvttpd2dq");
  case OP(2, 0xE6): SSE_XX("cvtdq2pd");
  case OP(3, 0xE6): SSE_XX("cvtpd2dq");
  // Scalar conversions with a general register
  case OP(2, 0x2A): SSE_GX("cvtsi2ssl", "k");
  case OP(2, 0x2A) | CSF_SSE_REXW: SSE_GX("cvtsi2ssq", "q");
  case OP(3, 0x2A): SSE_GX("cvtsi2sdl", "k");
  case OP(3, 0x2A) | CSF_SSE_REXW: SSE_GX("cvtsi2sdq", "q");
  case OP(2, 0x2C): SSE_XG("cvttss2si", "k");
  case OP(2, 0x2C) | CSF_SSE_REXW: SSE_XG("cvttss2si", "q");
  case OP(3, 0x2C): SSE_XG("cvttsd2si", "k");
  case OP(3, 0x2C) | CSF_SSE_REXW: SSE_XG("cvttsd2si", "q");
  case OP(2, 0x2D): SSE_XG("cvtss2si", "k");
  case OP(2, 0x2D) | CSF_SSE_REXW: SSE_XG("cvtss2si", "q");
  case OP(3, 0x2D): SSE_XG("cvtsd2si", "k");
  case OP(3, 0x2D) | CSF_SSE_REXW: SSE_XG("cvtsd2si", "q");
  // Compares
  case OP(0, 0x2E): SSE_COMI("ucomiss");
  case OP(1, 0x2E): SSE_COMI("ucomisd");
  case OP(0, 0x2F): SSE_COMI("comiss");
  case OP(1, 0x2F): SSE_COMI("comisd");
  case OP(0, 0xC2): SSE_CMP_ALL("cmpps");
  case OP(1, 0xC2): SSE_CMP_ALL("cmppd");
  case OP(2, 0xC2): SSE_CMP_ALL("cmpss");
  case OP(3, 0xC2): SSE_CMP_ALL("cmpsd");
  // SSE4.1 (0F 3A): rounding and dot products
  case CSF_SSE_MAP3A | OP(1, 0x08): SSE_IMM_ALL("roundps");
  case CSF_SSE_MAP3A | OP(1, 0x09): SSE_IMM_ALL("roundpd");
  case CSF_SSE_MAP3A | OP(1, 0x0A): SSE_IMM_ALL("roundss");
  case CSF_SSE_MAP3A | OP(1, 0x0B): SSE_IMM_ALL("roundsd");
  case CSF_SSE_MAP3A | OP(1, 0x40): SSE_IMM_ALL("dpps");
  case CSF_SSE_MAP3A | OP(1, 0x41): SSE_IMM_ALL("dppd");
  default:
    return CSF_UNSUPPORTED;
  }
  memcpy(destination, &d, 16);
  return out & 0x3F;
}


// MARK: - AVX compares, FMA3 and F16C

// VCMPPS/PD/SS/SD with the five-bit predicate of the VEX forms (xmm registers; the caller runs
// each 128-bit half).
#define VCMP_CASE(insn, imm)                                                                  \
  case imm:                                                                                   \
    __asm__ volatile("stmxcsr %[h]\n\tldmxcsr %[g]\n\t" insn " $" #imm ", %[s], %[d], %[d]\n\t" \
                     "stmxcsr %[o]\n\tldmxcsr %[h]"                                            \
                     : [d] "+x"(d), [o] "=m"(out), [h] "+m"(host)                              \
                     : [s] "x"(s), [g] "m"(guest));                                            \
    break;
#define VCMP_ALL(insn)                                                                        \
  switch (immediate & 0x1F) { IMM_ROW(VCMP_CASE, insn, 0x0) IMM_ROW(VCMP_CASE, insn, 0x1) }  \
  break

uint32_t csf_avx_compare(uint32_t operation, uint32_t immediate, uint32_t mxcsr, void *destination,
                         const void *source) {
  v2di d, s;
  memcpy(&d, destination, 16);
  memcpy(&s, source, 16);
  uint32_t guest = (mxcsr & ~0x3Fu) | 0x1F80u;
  uint32_t out = 0, host = 0;
  switch (operation & 0xFFFF) {
  case OP(0, 0xC2): VCMP_ALL("vcmpps");
  case OP(1, 0xC2): VCMP_ALL("vcmppd");
  case OP(2, 0xC2): VCMP_ALL("vcmpss");
  case OP(3, 0xC2): VCMP_ALL("vcmpsd");
  default:
    return CSF_UNSUPPORTED;
  }
  memcpy(destination, &d, 16);
  return out & 0x3F;
}

// FMA3 on whole registers: ymm0 = destination, ymm1 = VEX.vvvv, ymm2 = r/m, loaded from and
// stored to memory so the compiler never holds 256-bit values.
#define FMA_RUN(insn, reg0, reg1, reg2)                                                        \
  __asm__ volatile("vmovdqu (%[d]), %%ymm0\n\tvmovdqu (%[v]), %%ymm1\n\tvmovdqu (%[s]), %%ymm2\n\t" \
                   "stmxcsr %[h]\n\tldmxcsr %[g]\n\t" insn " %%" reg2 ", %%" reg1 ", %%" reg0 "\n\t" \
                   "stmxcsr %[o]\n\tldmxcsr %[h]\n\tvmovdqu %%ymm0, (%[d])\n\tvzeroupper"       \
                   : [o] "=m"(out), [h] "+m"(host)                                             \
                   : [d] "r"(destination), [v] "r"(middle), [s] "r"(source), [g] "m"(guest)   \
                   : "xmm0", "xmm1", "xmm2", "memory");                                       \
  break
#define FMA_CASE(code, insn)                                                                   \
  case code: FMA_RUN(insn, "xmm0", "xmm1", "xmm2");                                            \
  case code | 0x200: FMA_RUN(insn, "ymm0", "ymm1", "ymm2");

uint32_t csf_fma(uint32_t operation, uint32_t mxcsr, void *destination, const void *middle, const void *source) {
  uint32_t guest = (mxcsr & ~0x3Fu) | 0x1F80u;
  uint32_t out = 0, host = 0;
  switch (operation) {
  FMA_CASE(0x96, "vfmaddsub132ps")
  FMA_CASE(0x196, "vfmaddsub132pd")
  FMA_CASE(0x97, "vfmsubadd132ps")
  FMA_CASE(0x197, "vfmsubadd132pd")
  FMA_CASE(0x98, "vfmadd132ps")
  FMA_CASE(0x198, "vfmadd132pd")
  case 0x99: FMA_RUN("vfmadd132ss", "xmm0", "xmm1", "xmm2");
  case 0x199: FMA_RUN("vfmadd132sd", "xmm0", "xmm1", "xmm2");
  FMA_CASE(0x9A, "vfmsub132ps")
  FMA_CASE(0x19A, "vfmsub132pd")
  case 0x9B: FMA_RUN("vfmsub132ss", "xmm0", "xmm1", "xmm2");
  case 0x19B: FMA_RUN("vfmsub132sd", "xmm0", "xmm1", "xmm2");
  FMA_CASE(0x9C, "vfnmadd132ps")
  FMA_CASE(0x19C, "vfnmadd132pd")
  case 0x9D: FMA_RUN("vfnmadd132ss", "xmm0", "xmm1", "xmm2");
  case 0x19D: FMA_RUN("vfnmadd132sd", "xmm0", "xmm1", "xmm2");
  FMA_CASE(0x9E, "vfnmsub132ps")
  FMA_CASE(0x19E, "vfnmsub132pd")
  case 0x9F: FMA_RUN("vfnmsub132ss", "xmm0", "xmm1", "xmm2");
  case 0x19F: FMA_RUN("vfnmsub132sd", "xmm0", "xmm1", "xmm2");
  FMA_CASE(0xA6, "vfmaddsub213ps")
  FMA_CASE(0x1A6, "vfmaddsub213pd")
  FMA_CASE(0xA7, "vfmsubadd213ps")
  FMA_CASE(0x1A7, "vfmsubadd213pd")
  FMA_CASE(0xA8, "vfmadd213ps")
  FMA_CASE(0x1A8, "vfmadd213pd")
  case 0xA9: FMA_RUN("vfmadd213ss", "xmm0", "xmm1", "xmm2");
  case 0x1A9: FMA_RUN("vfmadd213sd", "xmm0", "xmm1", "xmm2");
  FMA_CASE(0xAA, "vfmsub213ps")
  FMA_CASE(0x1AA, "vfmsub213pd")
  case 0xAB: FMA_RUN("vfmsub213ss", "xmm0", "xmm1", "xmm2");
  case 0x1AB: FMA_RUN("vfmsub213sd", "xmm0", "xmm1", "xmm2");
  FMA_CASE(0xAC, "vfnmadd213ps")
  FMA_CASE(0x1AC, "vfnmadd213pd")
  case 0xAD: FMA_RUN("vfnmadd213ss", "xmm0", "xmm1", "xmm2");
  case 0x1AD: FMA_RUN("vfnmadd213sd", "xmm0", "xmm1", "xmm2");
  FMA_CASE(0xAE, "vfnmsub213ps")
  FMA_CASE(0x1AE, "vfnmsub213pd")
  case 0xAF: FMA_RUN("vfnmsub213ss", "xmm0", "xmm1", "xmm2");
  case 0x1AF: FMA_RUN("vfnmsub213sd", "xmm0", "xmm1", "xmm2");
  FMA_CASE(0xB6, "vfmaddsub231ps")
  FMA_CASE(0x1B6, "vfmaddsub231pd")
  FMA_CASE(0xB7, "vfmsubadd231ps")
  FMA_CASE(0x1B7, "vfmsubadd231pd")
  FMA_CASE(0xB8, "vfmadd231ps")
  FMA_CASE(0x1B8, "vfmadd231pd")
  case 0xB9: FMA_RUN("vfmadd231ss", "xmm0", "xmm1", "xmm2");
  case 0x1B9: FMA_RUN("vfmadd231sd", "xmm0", "xmm1", "xmm2");
  FMA_CASE(0xBA, "vfmsub231ps")
  FMA_CASE(0x1BA, "vfmsub231pd")
  case 0xBB: FMA_RUN("vfmsub231ss", "xmm0", "xmm1", "xmm2");
  case 0x1BB: FMA_RUN("vfmsub231sd", "xmm0", "xmm1", "xmm2");
  FMA_CASE(0xBC, "vfnmadd231ps")
  FMA_CASE(0x1BC, "vfnmadd231pd")
  case 0xBD: FMA_RUN("vfnmadd231ss", "xmm0", "xmm1", "xmm2");
  case 0x1BD: FMA_RUN("vfnmadd231sd", "xmm0", "xmm1", "xmm2");
  FMA_CASE(0xBE, "vfnmsub231ps")
  FMA_CASE(0x1BE, "vfnmsub231pd")
  case 0xBF: FMA_RUN("vfnmsub231ss", "xmm0", "xmm1", "xmm2");
  case 0x1BF: FMA_RUN("vfnmsub231sd", "xmm0", "xmm1", "xmm2");
  default:
    return CSF_UNSUPPORTED;
  }
  return out & 0x3F;
}

#define PS2PH_CASE(from, to, imm)                                                        \
  case imm:                                                                                    \
    __asm__ volatile("vmovdqu (%[s]), %%ymm1\n\tvpxor %%xmm0, %%xmm0, %%xmm0\n\t"               \
                     "stmxcsr %[h]\n\tldmxcsr %[g]\n\tvcvtps2ph $" #imm ", %%" from ", %%" to "\n\t" \
                     "stmxcsr %[o]\n\tldmxcsr %[h]\n\tvmovdqu %%ymm0, (%[d])\n\tvzeroupper"      \
                     : [o] "=m"(out), [h] "+m"(host)                                           \
                     : [d] "r"(destination), [s] "r"(source), [g] "m"(guest)                   \
                     : "xmm0", "xmm1", "memory");                                             \
    break;
#define PS2PH_ALL(from, to)                                                                    \
  switch (immediate & 7) {                                                                     \
    PS2PH_CASE(from, to, 0) PS2PH_CASE(from, to, 1) PS2PH_CASE(from, to, 2)                     \
    PS2PH_CASE(from, to, 3) PS2PH_CASE(from, to, 4) PS2PH_CASE(from, to, 5)                     \
    PS2PH_CASE(from, to, 6) PS2PH_CASE(from, to, 7)                                             \
  }                                                                                            \
  break

#define PH2PS_RUN(to)                                                                      \
  __asm__ volatile("vmovdqu (%[s]), %%ymm1\n\t"                                                \
                   "stmxcsr %[h]\n\tldmxcsr %[g]\n\tvcvtph2ps %%xmm1, %%" to "\n\t"          \
                   "stmxcsr %[o]\n\tldmxcsr %[h]\n\tvmovdqu %%ymm0, (%[d])\n\tvzeroupper"        \
                   : [o] "=m"(out), [h] "+m"(host)                                             \
                   : [d] "r"(destination), [s] "r"(source), [g] "m"(guest)                     \
                   : "xmm0", "xmm1", "memory");                                               \
  break

uint32_t csf_f16c(uint32_t operation, uint32_t immediate, uint32_t mxcsr, void *destination, const void *source) {
  uint32_t guest = (mxcsr & ~0x3Fu) | 0x1F80u;
  uint32_t out = 0, host = 0;
  switch (operation) {
  case 0: PH2PS_RUN("xmm0");
  case 1: PH2PS_RUN("ymm0");
  case 2: PS2PH_ALL("xmm1", "xmm0");
  case 3: PS2PH_ALL("ymm1", "xmm0");
  default:
    return CSF_UNSUPPORTED;
  }
  return out & 0x3F;
}

// MARK: - SSE integer

#define INT_IMM_CASE(insn, imm)                                                              \
  case imm:                                                                                  \
    __asm__(insn " $" #imm ", %[s], %[d]" : [d] "+x"(d) : [s] "x"(s));                        \
    break;
#define INT_IMM_ALL(insn)                                                                    \
  switch (immediate & 0xFF) { IMM_ALL(INT_IMM_CASE, insn) }                                  \
  break

#define INT_XX(insn)                                                                         \
  __asm__(insn " %[s], %[d]" : [d] "+x"(d) : [s] "x"(s));                                    \
  break

uint32_t csf_sse_integer(uint32_t operation, uint32_t immediate, void *destination, const void *source) {
  v2di d, s;
  memcpy(&d, destination, 16);
  memcpy(&s, source, 16);
  switch (operation) {
  case OP(1, 0x60): INT_XX("punpcklbw");
  case OP(1, 0x61): INT_XX("punpcklwd");
  case OP(1, 0x62): INT_XX("punpckldq");
  case OP(1, 0x63): INT_XX("packsswb");
  case OP(1, 0x64): INT_XX("pcmpgtb");
  case OP(1, 0x65): INT_XX("pcmpgtw");
  case OP(1, 0x66): INT_XX("pcmpgtd");
  case OP(1, 0x67): INT_XX("packuswb");
  case OP(1, 0x68): INT_XX("punpckhbw");
  case OP(1, 0x69): INT_XX("punpckhwd");
  case OP(1, 0x6A): INT_XX("punpckhdq");
  case OP(1, 0x6B): INT_XX("packssdw");
  case OP(1, 0x6C): INT_XX("punpcklqdq");
  case OP(1, 0x6D): INT_XX("punpckhqdq");
  case OP(1, 0x74): INT_XX("pcmpeqb");
  case OP(1, 0x75): INT_XX("pcmpeqw");
  case OP(1, 0x76): INT_XX("pcmpeqd");
  case OP(1, 0xD1): INT_XX("psrlw");
  case OP(1, 0xD2): INT_XX("psrld");
  case OP(1, 0xD3): INT_XX("psrlq");
  case OP(1, 0xD4): INT_XX("paddq");
  case OP(1, 0xD5): INT_XX("pmullw");
  case OP(1, 0xD8): INT_XX("psubusb");
  case OP(1, 0xD9): INT_XX("psubusw");
  case OP(1, 0xDA): INT_XX("pminub");
  case OP(1, 0xDB): INT_XX("pand");
  case OP(1, 0xDC): INT_XX("paddusb");
  case OP(1, 0xDD): INT_XX("paddusw");
  case OP(1, 0xDE): INT_XX("pmaxub");
  case OP(1, 0xDF): INT_XX("pandn");
  case OP(1, 0xE0): INT_XX("pavgb");
  case OP(1, 0xE1): INT_XX("psraw");
  case OP(1, 0xE2): INT_XX("psrad");
  case OP(1, 0xE3): INT_XX("pavgw");
  case OP(1, 0xE4): INT_XX("pmulhuw");
  case OP(1, 0xE5): INT_XX("pmulhw");
  case OP(1, 0xE8): INT_XX("psubsb");
  case OP(1, 0xE9): INT_XX("psubsw");
  case OP(1, 0xEA): INT_XX("pminsw");
  case OP(1, 0xEB): INT_XX("por");
  case OP(1, 0xEC): INT_XX("paddsb");
  case OP(1, 0xED): INT_XX("paddsw");
  case OP(1, 0xEE): INT_XX("pmaxsw");
  case OP(1, 0xEF): INT_XX("pxor");
  case OP(1, 0xF1): INT_XX("psllw");
  case OP(1, 0xF2): INT_XX("pslld");
  case OP(1, 0xF3): INT_XX("psllq");
  case OP(1, 0xF4): INT_XX("pmuludq");
  case OP(1, 0xF5): INT_XX("pmaddwd");
  case OP(1, 0xF6): INT_XX("psadbw");
  case OP(1, 0xF8): INT_XX("psubb");
  case OP(1, 0xF9): INT_XX("psubw");
  case OP(1, 0xFA): INT_XX("psubd");
  case OP(1, 0xFB): INT_XX("psubq");
  case OP(1, 0xFC): INT_XX("paddb");
  case OP(1, 0xFD): INT_XX("paddw");
  case OP(1, 0xFE): INT_XX("paddd");
  // Logic on packed floats is bitwise: the same as the integer forms.
  case OP(0, 0x54): case OP(1, 0x54): INT_XX("andps");
  case OP(0, 0x55): case OP(1, 0x55): INT_XX("andnps");
  case OP(0, 0x56): case OP(1, 0x56): INT_XX("orps");
  case OP(0, 0x57): case OP(1, 0x57): INT_XX("xorps");
  case OP(0, 0x14): INT_XX("unpcklps");
  case OP(1, 0x14): INT_XX("unpcklpd");
  case OP(0, 0x15): INT_XX("unpckhps");
  case OP(1, 0x15): INT_XX("unpckhpd");
  // SSSE3
  case CSF_SSE_MAP38 | OP(1, 0x00): INT_XX("pshufb");
  case CSF_SSE_MAP38 | OP(1, 0x01): INT_XX("phaddw");
  case CSF_SSE_MAP38 | OP(1, 0x02): INT_XX("phaddd");
  case CSF_SSE_MAP38 | OP(1, 0x03): INT_XX("phaddsw");
  case CSF_SSE_MAP38 | OP(1, 0x04): INT_XX("pmaddubsw");
  case CSF_SSE_MAP38 | OP(1, 0x05): INT_XX("phsubw");
  case CSF_SSE_MAP38 | OP(1, 0x06): INT_XX("phsubd");
  case CSF_SSE_MAP38 | OP(1, 0x07): INT_XX("phsubsw");
  case CSF_SSE_MAP38 | OP(1, 0x08): INT_XX("psignb");
  case CSF_SSE_MAP38 | OP(1, 0x09): INT_XX("psignw");
  case CSF_SSE_MAP38 | OP(1, 0x0A): INT_XX("psignd");
  case CSF_SSE_MAP38 | OP(1, 0x0B): INT_XX("pmulhrsw");
  case CSF_SSE_MAP38 | OP(1, 0x1C): INT_XX("pabsb");
  case CSF_SSE_MAP38 | OP(1, 0x1D): INT_XX("pabsw");
  case CSF_SSE_MAP38 | OP(1, 0x1E): INT_XX("pabsd");
  // SSE4.1 / SSE4.2 (0F 38)
  case CSF_SSE_MAP38 | OP(1, 0x20): INT_XX("pmovsxbw");
  case CSF_SSE_MAP38 | OP(1, 0x21): INT_XX("pmovsxbd");
  case CSF_SSE_MAP38 | OP(1, 0x22): INT_XX("pmovsxbq");
  case CSF_SSE_MAP38 | OP(1, 0x23): INT_XX("pmovsxwd");
  case CSF_SSE_MAP38 | OP(1, 0x24): INT_XX("pmovsxwq");
  case CSF_SSE_MAP38 | OP(1, 0x25): INT_XX("pmovsxdq");
  case CSF_SSE_MAP38 | OP(1, 0x28): INT_XX("pmuldq");
  case CSF_SSE_MAP38 | OP(1, 0x29): INT_XX("pcmpeqq");
  case CSF_SSE_MAP38 | OP(1, 0x2B): INT_XX("packusdw");
  case CSF_SSE_MAP38 | OP(1, 0x30): INT_XX("pmovzxbw");
  case CSF_SSE_MAP38 | OP(1, 0x31): INT_XX("pmovzxbd");
  case CSF_SSE_MAP38 | OP(1, 0x32): INT_XX("pmovzxbq");
  case CSF_SSE_MAP38 | OP(1, 0x33): INT_XX("pmovzxwd");
  case CSF_SSE_MAP38 | OP(1, 0x34): INT_XX("pmovzxwq");
  case CSF_SSE_MAP38 | OP(1, 0x35): INT_XX("pmovzxdq");
  case CSF_SSE_MAP38 | OP(1, 0x37): INT_XX("pcmpgtq");
  case CSF_SSE_MAP38 | OP(1, 0x38): INT_XX("pminsb");
  case CSF_SSE_MAP38 | OP(1, 0x39): INT_XX("pminsd");
  case CSF_SSE_MAP38 | OP(1, 0x3A): INT_XX("pminuw");
  case CSF_SSE_MAP38 | OP(1, 0x3B): INT_XX("pminud");
  case CSF_SSE_MAP38 | OP(1, 0x3C): INT_XX("pmaxsb");
  case CSF_SSE_MAP38 | OP(1, 0x3D): INT_XX("pmaxsd");
  case CSF_SSE_MAP38 | OP(1, 0x3E): INT_XX("pmaxuw");
  case CSF_SSE_MAP38 | OP(1, 0x3F): INT_XX("pmaxud");
  case CSF_SSE_MAP38 | OP(1, 0x40): INT_XX("pmulld");
  case CSF_SSE_MAP38 | OP(1, 0x41): INT_XX("phminposuw");
  // SSE4.1 MPSADBW and PCLMULQDQ (0F 3A, immediate)
  case CSF_SSE_MAP3A | OP(1, 0x42): INT_IMM_ALL("mpsadbw");
  case CSF_SSE_MAP3A | OP(1, 0x44): INT_IMM_ALL("pclmulqdq");
  default:
    return CSF_UNSUPPORTED;
  }
  memcpy(destination, &d, 16);
  return 0;
}

// MARK: - SSE4.2 string compares

#define STR_CASE(insn, imm)                                                                  \
  case imm:                                                                                  \
    __asm__(insn " $" #imm ", %[s], %[d]\n\tmovdqa %%xmm0, %[m]"                            \
            : "=c"(index), [m] "=x"(mask), "=@ccc"(carry), "=@ccz"(zero), "=@ccs"(sign),       \
              "=@cco"(overflow)                                                              \
            : [d] "x"(d), [s] "x"(s), "a"(lengthA), "d"(lengthD)                             \
            : "xmm0");                                                                       \
    break;

uint32_t csf_sse_string_compare(uint32_t operation, uint32_t immediate, int32_t lengthA, int32_t lengthD,
                                void *destination, const void *source, uint64_t *result) {
  v2di d, s, mask = {0, 0};
  memcpy(&d, destination, 16);
  memcpy(&s, source, 16);
  uint32_t index = 0;
  unsigned char carry = 0, zero = 0, sign = 0, overflow = 0;
  switch (operation) {
  case 0x60:
    switch (immediate & 0xFF) { IMM_ALL(STR_CASE, "pcmpestrm") }
    break;
  case 0x61:
    switch (immediate & 0xFF) { IMM_ALL(STR_CASE, "pcmpestri") }
    break;
  case 0x62:
    switch (immediate & 0xFF) { IMM_ALL(STR_CASE, "pcmpistrm") }
    break;
  case 0x63:
    switch (immediate & 0xFF) { IMM_ALL(STR_CASE, "pcmpistri") }
    break;
  default:
    return CSF_UNSUPPORTED;
  }
  if (operation == 0x60 || operation == 0x62) {
    memcpy(destination, &mask, 16);
  } else {
    *result = index;
  }
  return (uint32_t)carry | (uint32_t)zero << 6 | (uint32_t)sign << 7 | (uint32_t)overflow << 11;
}

uint32_t csf_crc32(uint32_t crc, uint64_t value, uint32_t size) {
  uint64_t wide = crc;
  switch (size) {
  case 1: __asm__("crc32b %b[v], %k[c]" : [c] "+r"(wide) : [v] "r"(value)); break;
  case 2: __asm__("crc32w %w[v], %k[c]" : [c] "+r"(wide) : [v] "r"(value)); break;
  case 4: __asm__("crc32l %k[v], %k[c]" : [c] "+r"(wide) : [v] "r"(value)); break;
  default: __asm__("crc32q %q[v], %q[c]" : [c] "+r"(wide) : [v] "r"(value)); break;
  }
  return (uint32_t)wide;
}

// MARK: - x87

// Register form: the instruction bytes, then LAHF for the compare-into-EFLAGS forms.
#define X87(escape, modrm)                                                                   \
  case ((escape) << 8 | (modrm)):                                                            \
    __asm__ volatile(".byte " #escape ", " #modrm "\n\tlahf\n\tmovb %%ah, %[f]"              \
                     : [f] "=m"(frame->flags)                                                 \
                     : "D"(frame->memory)                                                     \
                     : "memory", "rax", "cc");                                                \
    break

// All eight ModRM.reg values of one escape byte, register form with ST(1).
#define X87_REG_ROW(escape)                                                                  \
  X87(escape, 0xC1);                                                                         \
  X87(escape, 0xC9);                                                                         \
  X87(escape, 0xD1);                                                                         \
  X87(escape, 0xD9);                                                                         \
  X87(escape, 0xE1);                                                                         \
  X87(escape, 0xE9);                                                                         \
  X87(escape, 0xF1);                                                                         \
  X87(escape, 0xF9)

// All eight ModRM.reg values of one escape byte, memory form [rdi].
#define X87_MEM_ROW(escape)                                                                  \
  X87(escape, 0x07);                                                                         \
  X87(escape, 0x0F);                                                                         \
  X87(escape, 0x17);                                                                         \
  X87(escape, 0x1F);                                                                         \
  X87(escape, 0x27);                                                                         \
  X87(escape, 0x2F);                                                                         \
  X87(escape, 0x37);                                                                         \
  X87(escape, 0x3F)

int csf_x87(uint32_t code, csf_x87_frame *frame) {
  uint16_t hostControl = 0, before = 0, after = 0;
  if (frame->preloadConditionCodes) {
    __asm__ volatile("fnstcw %[h]\n\tfnclex" : [h] "=m"(hostControl)::"memory");
    if (frame->inputs >= 2) {
      __asm__ volatile("fldt %0" ::"m"(frame->stack[1]));
    }
    if (frame->inputs >= 1) {
      __asm__ volatile("fldt %0" ::"m"(frame->stack[0]));
    }
    // Loading the operands touched C1; install the guest's control word and condition codes
    // through the environment (which keeps the loaded registers and their tags).
    uint16_t environment[14];
    __asm__ volatile("fnstenv %0" : "=m"(environment)::"memory");
    environment[0] = frame->control;
    environment[2] = (uint16_t)((environment[2] & ~0xC7FFu) | (frame->guestStatus & 0x4700u));
    __asm__ volatile("fldenv %[e]\n\tfnstsw %[b]" : [b] "=m"(before) : [e] "m"(environment) : "memory");
    // TOP of the empty stack, so the depth after the instruction is relative to it.
    before = (uint16_t)(before + ((uint16_t)frame->inputs << 11));
  } else {
    // Fast path (FNSTENV/FLDENV are slow): the caller takes only the condition codes the
    // instruction defines from the result.
    __asm__ volatile("fnstcw %[h]\n\tfnclex\n\tfldcw %[g]\n\tfnstsw %[b]"
                     : [h] "=m"(hostControl), [b] "=m"(before)
                     : [g] "m"(frame->control)
                     : "memory");
    if (frame->inputs >= 2) {
      __asm__ volatile("fldt %0" ::"m"(frame->stack[1]));
    }
    if (frame->inputs >= 1) {
      __asm__ volatile("fldt %0" ::"m"(frame->stack[0]));
    }
  }
  int supported = 1;
  switch (code) {
    X87_MEM_ROW(0xD8);
    X87_MEM_ROW(0xD9);
    X87_MEM_ROW(0xDA);
    X87_MEM_ROW(0xDB);
    X87_MEM_ROW(0xDC);
    X87_MEM_ROW(0xDD);
    X87_MEM_ROW(0xDE);
    X87_MEM_ROW(0xDF);
    X87_REG_ROW(0xD8);
    X87_REG_ROW(0xDC);
    X87_REG_ROW(0xDE);
    X87(0xDD, 0xE1); // FUCOM
    X87(0xDD, 0xE9); // FUCOMP
    X87(0xDA, 0xE9); // FUCOMPP
    X87(0xDB, 0xE9); // FUCOMI
    X87(0xDB, 0xF1); // FCOMI
    X87(0xDF, 0xE9); // FUCOMIP
    X87(0xDF, 0xF1); // FCOMIP
    X87(0xD9, 0xE4); // FTST
    X87(0xD9, 0xE5); // FXAM
    X87(0xD9, 0xE8); // FLD1
    X87(0xD9, 0xE9); // FLDL2T
    X87(0xD9, 0xEA); // FLDL2E
    X87(0xD9, 0xEB); // FLDPI
    X87(0xD9, 0xEC); // FLDLG2
    X87(0xD9, 0xED); // FLDLN2
    X87(0xD9, 0xEE); // FLDZ
    X87(0xD9, 0xF0); // F2XM1
    X87(0xD9, 0xF1); // FYL2X
    X87(0xD9, 0xF2); // FPTAN
    X87(0xD9, 0xF3); // FPATAN
    X87(0xD9, 0xF4); // FXTRACT
    X87(0xD9, 0xF5); // FPREM1
    X87(0xD9, 0xF8); // FPREM
    X87(0xD9, 0xF9); // FYL2XP1
    X87(0xD9, 0xFA); // FSQRT
    X87(0xD9, 0xFB); // FSINCOS
    X87(0xD9, 0xFC); // FRNDINT
    X87(0xD9, 0xFD); // FSCALE
    X87(0xD9, 0xFE); // FSIN
    X87(0xD9, 0xFF); // FCOS
  default:
    supported = 0;
    break;
  }
  // Capture the status before anything else, then drop any pending unmasked exception so no
  // later (waiting) x87 instruction on the host can trap.
  __asm__ volatile("fnstsw %[s]\n\tfnclex" : [s] "=m"(after)::"memory");
  frame->status = after;
  unsigned depth = ((unsigned)(before >> 11) - (unsigned)(after >> 11)) & 7;
  frame->outputs = (uint8_t)depth;
  for (unsigned index = 0; index < depth; index++) {
    if (index < 3) {
      __asm__ volatile("fstpt %0" : "=m"(frame->stack[index]));
    } else {
      __asm__ volatile("fstp %%st(0)" ::: "memory");
    }
  }
  __asm__ volatile("fldcw %0" ::"m"(hostControl));
  return supported ? 0 : -1;
}

// MARK: - Unbounded-exponent inexactness (SSE unmasked overflow/underflow)

uint32_t csf_unbounded_inexact(uint32_t kind, uint32_t isDouble, uint64_t left, uint64_t right, uint32_t mxcsr) {
  if (mxcsr & 0x40) {  // DAZ: denormal inputs are zeros
    if (isDouble) {
      if ((left & 0x7FF0000000000000ull) == 0) left &= 0x8000000000000000ull;
      if ((right & 0x7FF0000000000000ull) == 0) right &= 0x8000000000000000ull;
    } else {
      if ((left & 0x7F800000u) == 0) left &= 0x80000000u;
      if ((right & 0x7F800000u) == 0) right &= 0x80000000u;
    }
  }
  uint32_t leftSingle = (uint32_t)left, rightSingle = (uint32_t)right;
  // Precision control: 24 bits for single results, 53 for double; rounding from MXCSR.RC.
  int singleResult = !isDouble || kind == 5;
  uint16_t control = (uint16_t)(0x007F | (singleResult ? 0 : 0x0200) | ((mxcsr >> 13) & 3) << 10);
  uint16_t hostControl = 0, status = 0;
  __asm__ volatile("fnstcw %0\n\tfnclex\n\tfldcw %1" : "=m"(hostControl) : "m"(control) : "memory");
  if (isDouble) {
    __asm__ volatile("fldl %0\n\tfldl %1" ::"m"(right), "m"(left));
  } else {
    __asm__ volatile("flds %0\n\tflds %1" ::"m"(rightSingle), "m"(leftSingle));
  }
  switch (kind) {
  case 0: __asm__ volatile("fadd %%st(1), %%st" ::: "memory"); break;
  case 1: __asm__ volatile("fsub %%st(1), %%st" ::: "memory"); break;
  case 2: __asm__ volatile("fmul %%st(1), %%st" ::: "memory"); break;
  case 3: __asm__ volatile("fdiv %%st(1), %%st" ::: "memory"); break;
  case 4: __asm__ volatile("fxch\n\tfsqrt" ::: "memory"); break;
  default: __asm__ volatile("fxch\n\tfldz\n\tfaddp" ::: "memory"); break;
  }
  __asm__ volatile("fnstsw %0\n\tfninit\n\tfldcw %1" : "=m"(status) : "m"(hostControl) : "memory");
  return (status >> 5) & 1;
}

// MARK: - Unbounded-exponent inexactness of FMA3 and VCVTPS2PH

// A finite value as sign, integer significand and exponent: value = (-1)^sign * significand * 2^exponent.
typedef struct {
  int sign;
  uint64_t significand;
  int exponent;
} csf_exact_value;

// Returns 0 for infinities and NaNs (which never overflow or underflow), 1 otherwise. With
// `daz`, denormal inputs are zeros.
static int csf_unpack(uint64_t bits, int isDouble, int daz, csf_exact_value *value) {
  unsigned fractionBits = isDouble ? 52 : 23;
  unsigned exponentBits = isDouble ? 11 : 8;
  int bias = isDouble ? 1023 : 127;
  uint64_t fraction = bits & ((1ull << fractionBits) - 1);
  unsigned biased = (unsigned)(bits >> fractionBits) & ((1u << exponentBits) - 1);
  value->sign = (int)(bits >> (fractionBits + exponentBits)) & 1;
  if (biased == (1u << exponentBits) - 1) return 0;
  if (biased == 0) {
    value->significand = daz ? 0 : fraction;
    value->exponent = 1 - bias - (int)fractionBits;
  } else {
    value->significand = fraction | 1ull << fractionBits;
    value->exponent = (int)biased - bias - (int)fractionBits;
  }
  return 1;
}

// Whether a nonzero integer needs more than `precision` significant bits.
static int csf_needs_more_bits(unsigned __int128 magnitude, unsigned precision) {
  while ((magnitude & 1) == 0) magnitude >>= 1;
  return magnitude >> precision != 0;
}

static unsigned csf_bit_length(unsigned __int128 value) {
  unsigned length = 0;
  while (value != 0) {
    value >>= 1;
    length++;
  }
  return length;
}

uint32_t csf_fma_unbounded_inexact(uint32_t operation, uint32_t element, uint64_t destination, uint64_t middle,
                                   uint64_t source, uint32_t mxcsr) {
  int isDouble = (operation >> 8) & 1;
  int daz = (mxcsr >> 6) & 1;
  unsigned precision = isDouble ? 53 : 24;
  uint8_t opcode = (uint8_t)operation;
  // Multiplicands and addend by operand order: 132 = dest * r/m + vvvv, 213 = vvvv * dest + r/m,
  // 231 = vvvv * r/m + dest.
  uint64_t factorA, factorB, addend;
  switch (opcode >> 4) {
  case 0x9: factorA = destination, factorB = source, addend = middle; break;
  case 0xA: factorA = middle, factorB = destination, addend = source; break;
  case 0xB: factorA = middle, factorB = source, addend = destination; break;
  default: return 0;
  }
  // Whether the addend is subtracted from the product (the overall sign of VFNM* does not change
  // the magnitude): VFMADDSUB subtracts in even elements, VFMSUBADD in odd ones.
  int subtract;
  switch (opcode & 0xF) {
  case 0x6: subtract = (element & 1) == 0; break;
  case 0x7: subtract = (element & 1) == 1; break;
  case 0x8: case 0x9: case 0xE: case 0xF: subtract = 0; break;
  default: subtract = 1; break;  // VFMSUB*, VFNMADD* (-(a*b) + c = -(a*b - c))
  }
  csf_exact_value a, b, c;
  if (!csf_unpack(factorA, isDouble, daz, &a) || !csf_unpack(factorB, isDouble, daz, &b) ||
      !csf_unpack(addend, isDouble, daz, &c)) {
    return 0;
  }
  unsigned __int128 product = (unsigned __int128)a.significand * b.significand;
  if (product == 0) return 0;  // the result is the addend, exactly
  int productExponent = a.exponent + b.exponent;
  int productSign = a.sign ^ b.sign;
  int addendSign = c.sign ^ subtract;
  if (c.significand == 0) return (uint32_t)csf_needs_more_bits(product, precision);
  // Both terms as odd integers times powers of two.
  uint64_t addendSignificand = c.significand;
  int addendExponent = c.exponent;
  while ((product & 1) == 0) product >>= 1, productExponent++;
  while ((addendSignificand & 1) == 0) addendSignificand >>= 1, addendExponent++;
  if (productExponent == addendExponent) {
    // Both below 2^106: the signed sum fits.
    __int128 sum = (productSign ? -(__int128)product : (__int128)product) +
                   (addendSign ? -(__int128)addendSignificand : (__int128)addendSignificand);
    if (sum == 0) return 0;
    return (uint32_t)csf_needs_more_bits((unsigned __int128)(sum < 0 ? -sum : sum), precision);
  }
  // Different exponents: the sum is the lower term (odd) plus an even multiple of it, so it is
  // odd in units of the lower exponent and exact only below 2^precision of those units.
  unsigned __int128 low, high;
  int lowSign, highSign, shift;
  if (productExponent < addendExponent) {
    low = product, lowSign = productSign, high = addendSignificand, highSign = addendSign;
    shift = addendExponent - productExponent;
  } else {
    low = addendSignificand, lowSign = addendSign, high = product, highSign = productSign;
    shift = productExponent - addendExponent;
  }
  // The lower term is below 2^106; a shifted higher term at or above 2^120 leaves a sum above
  // 2^119, far beyond any precision here.
  if (csf_bit_length(high) + (unsigned)shift > 120) return 1;
  high <<= shift;
  __int128 sum = (lowSign ? -(__int128)low : (__int128)low) + (highSign ? -(__int128)high : (__int128)high);
  unsigned __int128 magnitude = (unsigned __int128)(sum < 0 ? -sum : sum);
  return magnitude >> precision != 0;
}

uint32_t csf_single_to_half_unbounded_inexact(uint32_t single, uint32_t mxcsr) {
  csf_exact_value value;
  if (!csf_unpack(single, 0, (mxcsr >> 6) & 1, &value) || value.significand == 0) return 0;
  // A denormal input (DAZ clear) reports PE with its UE, as the SDM's VCVTPS2PH exceptions
  // section lists (DE, UE and PE), whatever its bits.
  if ((single & 0x7F800000u) == 0) return 1;
  return (uint32_t)csf_needs_more_bits(value.significand, 11);
}

// MARK: - MMX

// One MMX instruction on the host: both operands loaded into MM0/MM1, the result stored, then
// EMMS, so the host's x87 state is empty again before any compiler-generated code runs.
#define MMX_XX(insn)                                                                         \
  __asm__ volatile("movq (%[d]), %%mm0\n\tmovq (%[s]), %%mm1\n\t" insn " %%mm1, %%mm0\n\t"     \
                   "movq %%mm0, (%[d])\n\temms"                                               \
                   :                                                                         \
                   : [d] "r"(destination), [s] "r"(source)                                   \
                   : "mm0", "mm1", "memory");                                                \
  break

uint32_t csf_mmx(uint32_t operation, uint64_t *destination, const uint64_t *source) {
  switch (operation) {
  case 0x60: MMX_XX("punpcklbw");
  case 0x61: MMX_XX("punpcklwd");
  case 0x62: MMX_XX("punpckldq");
  case 0x63: MMX_XX("packsswb");
  case 0x64: MMX_XX("pcmpgtb");
  case 0x65: MMX_XX("pcmpgtw");
  case 0x66: MMX_XX("pcmpgtd");
  case 0x67: MMX_XX("packuswb");
  case 0x68: MMX_XX("punpckhbw");
  case 0x69: MMX_XX("punpckhwd");
  case 0x6A: MMX_XX("punpckhdq");
  case 0x6B: MMX_XX("packssdw");
  case 0x74: MMX_XX("pcmpeqb");
  case 0x75: MMX_XX("pcmpeqw");
  case 0x76: MMX_XX("pcmpeqd");
  case 0xD1: MMX_XX("psrlw");
  case 0xD2: MMX_XX("psrld");
  case 0xD3: MMX_XX("psrlq");
  case 0xD4: MMX_XX("paddq");
  case 0xD5: MMX_XX("pmullw");
  case 0xD8: MMX_XX("psubusb");
  case 0xD9: MMX_XX("psubusw");
  case 0xDA: MMX_XX("pminub");
  case 0xDB: MMX_XX("pand");
  case 0xDC: MMX_XX("paddusb");
  case 0xDD: MMX_XX("paddusw");
  case 0xDE: MMX_XX("pmaxub");
  case 0xDF: MMX_XX("pandn");
  case 0xE0: MMX_XX("pavgb");
  case 0xE1: MMX_XX("psraw");
  case 0xE2: MMX_XX("psrad");
  case 0xE3: MMX_XX("pavgw");
  case 0xE4: MMX_XX("pmulhuw");
  case 0xE5: MMX_XX("pmulhw");
  case 0xE8: MMX_XX("psubsb");
  case 0xE9: MMX_XX("psubsw");
  case 0xEA: MMX_XX("pminsw");
  case 0xEB: MMX_XX("por");
  case 0xEC: MMX_XX("paddsb");
  case 0xED: MMX_XX("paddsw");
  case 0xEE: MMX_XX("pmaxsw");
  case 0xEF: MMX_XX("pxor");
  case 0xF1: MMX_XX("psllw");
  case 0xF2: MMX_XX("pslld");
  case 0xF3: MMX_XX("psllq");
  case 0xF4: MMX_XX("pmuludq");
  case 0xF5: MMX_XX("pmaddwd");
  case 0xF6: MMX_XX("psadbw");
  case 0xF8: MMX_XX("psubb");
  case 0xF9: MMX_XX("psubw");
  case 0xFA: MMX_XX("psubd");
  case 0xFB: MMX_XX("psubq");
  case 0xFC: MMX_XX("paddb");
  case 0xFD: MMX_XX("paddw");
  case 0xFE: MMX_XX("paddd");
  case CSF_SSE_MAP38 | 0x00: MMX_XX("pshufb");
  case CSF_SSE_MAP38 | 0x01: MMX_XX("phaddw");
  case CSF_SSE_MAP38 | 0x02: MMX_XX("phaddd");
  case CSF_SSE_MAP38 | 0x03: MMX_XX("phaddsw");
  case CSF_SSE_MAP38 | 0x04: MMX_XX("pmaddubsw");
  case CSF_SSE_MAP38 | 0x05: MMX_XX("phsubw");
  case CSF_SSE_MAP38 | 0x06: MMX_XX("phsubd");
  case CSF_SSE_MAP38 | 0x07: MMX_XX("phsubsw");
  case CSF_SSE_MAP38 | 0x08: MMX_XX("psignb");
  case CSF_SSE_MAP38 | 0x09: MMX_XX("psignw");
  case CSF_SSE_MAP38 | 0x0A: MMX_XX("psignd");
  case CSF_SSE_MAP38 | 0x0B: MMX_XX("pmulhrsw");
  case CSF_SSE_MAP38 | 0x1C: MMX_XX("pabsb");
  case CSF_SSE_MAP38 | 0x1D: MMX_XX("pabsw");
  case CSF_SSE_MAP38 | 0x1E: MMX_XX("pabsd");
  default:
    return CSF_UNSUPPORTED;
  }
  return 0;
}
