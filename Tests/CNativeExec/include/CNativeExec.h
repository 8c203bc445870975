// Native executor for differential testing of the software CPU.
//
// Runs a short machine-code sequence on the host CPU between a fully prepared and a fully
// captured architectural state (GPRs, RFLAGS, FXSAVE image = x87 + MXCSR + XMM0-15, and the
// upper halves of YMM0-15). Code and
// data live at fixed low addresses so the emulated run can place the same bytes at the same
// guest-physical addresses. Faults raised by the sequence are captured from the signal context
// (vector from the kernel's trap number, error code, faulting RIP, full register state).
//
// Only one sequence runs at a time (a process-wide lock serializes callers).
#ifndef CNATIVEEXEC_H
#define CNATIVEEXEC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Address of the code buffer (read/write/execute).
#define CNX_CODE_BASE 0x10000000ULL
/// Size of the code buffer. The sequence starts at CNX_CODE_BASE; the exit trampoline follows it.
#define CNX_CODE_SIZE 0x10000ULL
/// Address of the data buffer (read/write); a PROT_NONE guard page follows it.
#define CNX_DATA_BASE 0x20000000ULL
/// Size of the data buffer.
#define CNX_DATA_SIZE 0x10000ULL
/// Largest sequence accepted by cnx_run (the trampoline needs 14 bytes after it).
#define CNX_MAX_CODE (CNX_CODE_SIZE - 64)

/// Architectural state in and out of a native run.
typedef struct CNXState {
  /// RAX..R15 in encoding order.
  uint64_t gpr[16];
  /// On input ignored (the sequence starts at CNX_CODE_BASE); on output the RIP at exit
  /// (end of the sequence) or of the faulting instruction.
  uint64_t rip;
  /// RFLAGS. On input only CF, PF, AF, ZF, SF, DF, OF and (for single-step) TF are used.
  uint64_t rflags;
  /// FXSAVE (legacy 512-byte) image: FCW, FSW, abridged FTW, MXCSR, ST0-7, XMM0-15.
  uint8_t fxsave[512] __attribute__((aligned(16)));
  /// Bits 255:128 of YMM0-15, 16 bytes each. On input all zero means the AVX state starts in
  /// its initial configuration (VZEROUPPER), otherwise it is loaded (VINSERTF128).
  uint8_t ymmHigh[256] __attribute__((aligned(16)));
} CNXState;

/// How a native run ended.
typedef struct CNXOutcome {
  /// -1 when the sequence ran to its end, otherwise the exception vector (0 #DE, 1 #DB, 3 #BP,
  /// 6 #UD, 12 #SS, 13 #GP, 14 #PF, 16 #MF, 17 #AC, 19 #XM).
  int32_t vector;
  /// The host signal that reported the fault (0 when none).
  int32_t signal;
  /// siginfo si_code.
  int32_t signalCode;
  int32_t reserved;
  /// Hardware error code from the kernel (REG_ERR).
  uint64_t errorCode;
  /// CR2 / si_addr for memory faults.
  uint64_t faultAddress;
} CNXOutcome;

/// Maps the code and data buffers and installs the fault handlers. Idempotent and thread-safe.
/// Returns 0 on success, otherwise an errno value (e.g. EEXIST when the fixed addresses are taken).
int cnx_setup(void);

/// Runs `codeLength` bytes of machine code natively.
///
/// - `data` (CNX_DATA_SIZE bytes) is copied into the data buffer before and back out after.
/// - `state` provides the initial registers and receives the final ones.
/// - `singleStep`: when non-zero, TF is set on entry so exactly one instruction executes and
///   the run ends with vector 1 (#DB) unless that instruction faults.
///
/// Returns 0 on success (including a captured guest fault), otherwise an errno value.
int cnx_run(
  const uint8_t *code, size_t codeLength, uint8_t *data, CNXState *state, int singleStep,
  CNXOutcome *outcome);

/// The host's MXCSR_MASK (FXSAVE bytes 28-31; 0xFFBF when the processor stores 0).
uint32_t cnx_host_mxcsr_mask(void);

/// The host's CPUID vendor string (leaf 0: EBX, EDX, ECX) into `vendor` (13 bytes, NUL-terminated).
void cnx_host_vendor(char vendor[13]);

#ifdef __cplusplus
}
#endif

#endif
