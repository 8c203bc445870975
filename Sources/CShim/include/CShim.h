#ifndef HOSTVISOR_CSHIM_H
#define HOSTVISOR_CSHIM_H
// What Swift cannot import from C headers on its own, nothing clever.
#include <stdint.h>
#include <termios.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <spawn.h>
#include <linux/kvm.h>

// MARK: - KVM (used by the KVMBackend module)

// KVM ioctl request numbers. The _IO/_IOR/_IOW macros that define them are not importable
// into Swift, so each one is spelled out here as a constant.
static const unsigned long HV_KVM_GET_API_VERSION = KVM_GET_API_VERSION;
static const unsigned long HV_KVM_CREATE_VM = KVM_CREATE_VM;
static const unsigned long HV_KVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
static const unsigned long HV_KVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long HV_KVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
static const unsigned long HV_KVM_CREATE_VCPU = KVM_CREATE_VCPU;
static const unsigned long HV_KVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
static const unsigned long HV_KVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
static const unsigned long HV_KVM_CREATE_PIT2 = KVM_CREATE_PIT2;
static const unsigned long HV_KVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
static const unsigned long HV_KVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
static const unsigned long HV_KVM_IRQ_LINE = KVM_IRQ_LINE;
static const unsigned long HV_KVM_GET_REGS = KVM_GET_REGS;
static const unsigned long HV_KVM_SET_REGS = KVM_SET_REGS;
static const unsigned long HV_KVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long HV_KVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long HV_KVM_GET_FPU = KVM_GET_FPU;
static const unsigned long HV_KVM_SET_FPU = KVM_SET_FPU;
static const unsigned long HV_KVM_GET_MSRS = KVM_GET_MSRS;
static const unsigned long HV_KVM_SET_MSRS = KVM_SET_MSRS;
static const unsigned long HV_KVM_SET_CPUID2 = KVM_SET_CPUID2;
static const unsigned long HV_KVM_GET_CPUID2 = KVM_GET_CPUID2;
static const unsigned long HV_KVM_SET_SIGNAL_MASK = KVM_SET_SIGNAL_MASK;
static const unsigned long HV_KVM_GET_MP_STATE = KVM_GET_MP_STATE;
static const unsigned long HV_KVM_RUN = KVM_RUN;
static const unsigned long HV_KVM_SIGNAL_MSI = KVM_SIGNAL_MSI;
static const unsigned long HV_KVM_GET_CLOCK = KVM_GET_CLOCK;
static const unsigned long HV_KVM_SET_CLOCK = KVM_SET_CLOCK;
// Machine state (snapshots and migration).
static const unsigned long HV_KVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST;
static const unsigned long HV_KVM_SET_MP_STATE = KVM_SET_MP_STATE;
static const unsigned long HV_KVM_GET_XSAVE = KVM_GET_XSAVE;
static const unsigned long HV_KVM_GET_XSAVE2 = KVM_GET_XSAVE2;
static const unsigned long HV_KVM_SET_XSAVE = KVM_SET_XSAVE;
static const unsigned long HV_KVM_GET_XCRS = KVM_GET_XCRS;
static const unsigned long HV_KVM_SET_XCRS = KVM_SET_XCRS;
static const unsigned long HV_KVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS;
static const unsigned long HV_KVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS;
static const unsigned long HV_KVM_GET_LAPIC = KVM_GET_LAPIC;
static const unsigned long HV_KVM_SET_LAPIC = KVM_SET_LAPIC;
static const unsigned long HV_KVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
static const unsigned long HV_KVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
static const unsigned long HV_KVM_GET_IRQCHIP = KVM_GET_IRQCHIP;
static const unsigned long HV_KVM_SET_IRQCHIP = KVM_SET_IRQCHIP;
static const unsigned long HV_KVM_GET_PIT2 = KVM_GET_PIT2;
static const unsigned long HV_KVM_SET_PIT2 = KVM_SET_PIT2;
static const unsigned long HV_KVM_GET_DIRTY_LOG = KVM_GET_DIRTY_LOG;

/// ioctl(2) with a pointer argument (ioctl itself is variadic and cannot be called from Swift).
int hv_ioctl_ptr(int fd, unsigned long request, void *argument);
/// Takes every pending instance of `signo` (blocked in the calling thread) off the thread's
/// queue without waiting, so the next KVM_RUN is not interrupted by an old kick.
void hv_consume_pending_signal(int signo);
/// ioctl(2) with an integer argument.
int hv_ioctl_int(int fd, unsigned long request, unsigned long argument);

/// Drives interrupt line `irq` of the in-kernel irqchip to `level` (KVM_IRQ_LINE).
int hv_kvm_irq_line(int vm_fd, uint32_t irq, uint32_t level);

/// Installs a handler that does nothing for `signo`, without SA_RESTART, so the signal only
/// interrupts blocking system calls (KVM_RUN returns EINTR).
int hv_install_wakeup_signal_handler(int signo);
/// Blocks `signo` in the calling thread and tells KVM to unblock it only while `vcpu_fd` is
/// inside KVM_RUN (KVM_SET_SIGNAL_MASK): a kick then interrupts the guest but never a
/// system call a device makes on the vCPU thread.
int hv_kvm_unblock_signal_only_in_run(int vcpu_fd, int signo);

/// Names the calling thread (shown by ps/top/gdb; at most 15 characters are kept).
int hv_set_current_thread_name(const char *name);

// Accessors for the kvm_run exit data (anonymous unions in the C header).
static inline uint32_t hv_kvm_run_exit_reason(const struct kvm_run *run) { return run->exit_reason; }
static inline void hv_kvm_run_set_immediate_exit(struct kvm_run *run, uint8_t value) {
  *(volatile uint8_t *)&run->immediate_exit = value;
}
static inline uint8_t hv_kvm_run_io_direction(const struct kvm_run *run) { return run->io.direction; }
static inline uint8_t hv_kvm_run_io_size(const struct kvm_run *run) { return run->io.size; }
static inline uint16_t hv_kvm_run_io_port(const struct kvm_run *run) { return run->io.port; }
static inline uint32_t hv_kvm_run_io_count(const struct kvm_run *run) { return run->io.count; }
static inline uint64_t hv_kvm_run_io_data_offset(const struct kvm_run *run) { return run->io.data_offset; }
static inline uint64_t hv_kvm_run_mmio_phys_addr(const struct kvm_run *run) { return run->mmio.phys_addr; }
static inline uint8_t *hv_kvm_run_mmio_data(struct kvm_run *run) { return run->mmio.data; }
static inline uint32_t hv_kvm_run_mmio_len(const struct kvm_run *run) { return run->mmio.len; }
static inline uint8_t hv_kvm_run_mmio_is_write(const struct kvm_run *run) { return run->mmio.is_write; }
static inline uint64_t hv_kvm_run_fail_entry_reason(const struct kvm_run *run) {
  return run->fail_entry.hardware_entry_failure_reason;
}
static inline uint32_t hv_kvm_run_internal_suberror(const struct kvm_run *run) { return run->internal.suberror; }
static inline uint32_t hv_kvm_run_internal_ndata(const struct kvm_run *run) { return run->internal.ndata; }
static inline uint64_t hv_kvm_run_internal_data(const struct kvm_run *run, uint32_t index) {
  return index < 16 ? run->internal.data[index] : 0;
}
static inline uint32_t hv_kvm_run_system_event_type(const struct kvm_run *run) { return run->system_event.type; }

// Variable-length KVM structures (flexible array members are not imported into Swift).
static inline struct kvm_cpuid_entry2 *hv_kvm_cpuid2_entries(struct kvm_cpuid2 *cpuid) { return cpuid->entries; }
static inline struct kvm_msr_entry *hv_kvm_msrs_entries(struct kvm_msrs *msrs) { return msrs->entries; }
static inline uint32_t *hv_kvm_msr_list_indices(struct kvm_msr_list *list) { return list->indices; }

// MARK: - Guest RAM access (used by the SoftCPU module's hot paths)

// Unaligned loads and stores of host memory backing guest RAM. memcpy keeps them free of
// alignment and aliasing assumptions and compiles to a single mov; unlike Swift's generic
// loadUnaligned/storeBytes they are always inlined, also into the interpreter's large
// dispatch functions.
static inline __attribute__((always_inline)) uint8_t hv_load8(const void *p) { return *(const uint8_t *)p; }
static inline __attribute__((always_inline)) uint16_t hv_load16(const void *p) {
  uint16_t v;
  __builtin_memcpy(&v, p, 2);
  return v;
}
static inline __attribute__((always_inline)) uint32_t hv_load32(const void *p) {
  uint32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}
static inline __attribute__((always_inline)) uint64_t hv_load64(const void *p) {
  uint64_t v;
  __builtin_memcpy(&v, p, 8);
  return v;
}
static inline __attribute__((always_inline)) void hv_store8(void *p, uint8_t v) { *(uint8_t *)p = v; }
static inline __attribute__((always_inline)) void hv_store16(void *p, uint16_t v) { __builtin_memcpy(p, &v, 2); }
static inline __attribute__((always_inline)) void hv_store32(void *p, uint32_t v) { __builtin_memcpy(p, &v, 4); }
static inline __attribute__((always_inline)) void hv_store64(void *p, uint64_t v) { __builtin_memcpy(p, &v, 8); }

/// Signed 64 x 64 -> 128-bit multiply: returns the low half, stores the high half.
static inline __attribute__((always_inline)) uint64_t hv_imul64(int64_t a, int64_t b, int64_t *high) {
  __int128 product = (__int128)a * (__int128)b;
  *high = (int64_t)(product >> 64);
  return (uint64_t)product;
}
/// The host's SF, ZF, AF, PF and CF (RFLAGS bits 0-7, through LAHF) after `imul a, b` (the
/// 64-bit two-operand form), for comparing the flags the architecture leaves undefined there
/// with the software CPU's.
static inline uint64_t hv_host_imul64_flags(uint64_t a, uint64_t b) {
  uint64_t ax;
  __asm__ volatile("imulq %2, %1\n\tlahf" : "=a"(ax), "+r"(a) : "r"(b) : "cc");
  return (ax >> 8) & 0xFF;
}
/// The host's RFLAGS bits 0-7 after `mul b` with RAX = a (64-bit), as `hv_host_imul64_flags`.
static inline uint64_t hv_host_mul64_flags(uint64_t a, uint64_t b) {
  uint64_t high;
  __asm__ volatile("mulq %2\n\tlahf" : "+a"(a), "=d"(high) : "r"(b) : "cc");
  return (a >> 8) & 0xFF;
}
/// The host's RFLAGS bits 0-7 and OF (bit 11) after a shift or rotate of `value` by `count`
/// in CL: `kind` 0 SHL, 1 SHR, 2 SAR, 3 ROL, 4 ROR; `wide` the 64-bit form, else the 32-bit
/// one. For comparing the flags the architecture leaves undefined (AF; OF for counts above 1)
/// with the software CPU's.
static inline uint64_t hv_host_shift_flags(int kind, int wide, uint64_t value, uint8_t count) {
  uint64_t ax = 0;
  uint8_t overflow = 0;
#define HV_SHIFT(insn) \
  __asm__ volatile(insn " %%cl, %2\n\tlahf\n\tseto %1" : "=a"(ax), "=q"(overflow), "+r"(value) : "c"(count) : "cc")
#define HV_SHIFT32(insn) \
  __asm__ volatile(insn " %%cl, %k2\n\tlahf\n\tseto %1" : "=a"(ax), "=q"(overflow), "+r"(value) : "c"(count) : "cc")
  switch (kind * 2 + (wide ? 1 : 0)) {
  case 0: HV_SHIFT32("shll"); break;
  case 1: HV_SHIFT("shlq"); break;
  case 2: HV_SHIFT32("shrl"); break;
  case 3: HV_SHIFT("shrq"); break;
  case 4: HV_SHIFT32("sarl"); break;
  case 5: HV_SHIFT("sarq"); break;
  case 6: HV_SHIFT32("roll"); break;
  case 7: HV_SHIFT("rolq"); break;
  case 8: HV_SHIFT32("rorl"); break;
  default: HV_SHIFT("rorq"); break;
  }
#undef HV_SHIFT
#undef HV_SHIFT32
  return ((ax >> 8) & 0xFF) | ((uint64_t)overflow << 11);
}
/// Unsigned 64 x 64 -> 128-bit multiply: returns the low half, stores the high half.
static inline __attribute__((always_inline)) uint64_t hv_mul64(uint64_t a, uint64_t b, uint64_t *high) {
  unsigned __int128 product = (unsigned __int128)a * (unsigned __int128)b;
  *high = (uint64_t)(product >> 64);
  return (uint64_t)product;
}


/// State shared between the software CPU's translated blocks and the Swift run loop
/// (Sources/SoftCPU/Translator). Generated code addresses these fields by their offsets.
typedef struct hv_jit_context {
  /// The guest's status flags, packed as LAHF and SETO leave them: SF, ZF, AF, PF and CF (with
  /// the always-set bit 1) in bits 8-15, OF in bit 0; other bits ignored (`TranslatedFlags` in
  /// the software CPU converts; the interpreter's lazy flags are materialized first).
  uint64_t flags;
  /// RIP when the block returns (in: the block's entry RIP).
  uint64_t rip;
  /// Set by the memory helpers: 0 go on, 1 leave to the interpreter at the current
  /// instruction (it re-executes it), 2 end the block after the current instruction.
  uint64_t exit;
  /// The CPU's read and write TLB tables and the tag bits of the current privilege.
  void *read_tlb;
  void *write_tlb;
  uint64_t tag_extra;
  /// The CPU's segment bases (ES, CS, SS, DS, FS, GS).
  void *segment_base;
  /// The CPU (an unretained reference) and the slow-path helpers.
  void *cpu;
  void *load_helper;
  void *store_helper;
  /// RIP of the block's first instruction (updated when a block chains into the next).
  uint64_t entry_rip;
  /// The CPU's block-chain generation (jump cache entries of another one are stale).
  uint64_t generation;
  /// Instructions the run loop still allows; a block chains into the next only when its own
  /// instructions and the next block's all fit, and takes its own from it.
  int64_t budget;
  /// Out: instructions of the blocks completed before the last one (0 when none chained):
  /// what the budget lost, set by `runTranslated` after the call.
  uint64_t chained;
  /// Out: the decoded-block index of the last block run (when `chained` is nonzero).
  uint64_t last_block;
  /// The jump cache (`hv_jit_cache_entry` array) and the byte that requests a stop.
  void *jump_cache;
  uint8_t *stop;
  /// Offset of the chained entry of every translation.
  uint64_t chain_offset;
  /// The guest's XMM registers (16 bytes each).
  void *xmm;
  /// Bit 0: SSE instructions may run (CR0.EM and CR0.TS clear, CR4.OSFXSR set); bit 1: the
  /// guest's MXCSR (every exception masked) is loaded in the host, so SSE floating-point
  /// arithmetic may run.
  uint64_t sse_state;
  /// The host's MXCSR while the guest's is loaded (the helpers run under it).
  uint64_t host_mxcsr;
  /// Set by translated code that wrote an XMM register (XINUSE.SSE).
  uint64_t sse_written;
  /// The vector slow-path helpers (`vector` holds the operand).
  void *vector_load_helper;
  void *vector_store_helper;
  /// Runs one instruction without a translation of its own in the interpreter (`exit` as for
  /// the memory helpers; the status flags in and out through `flags`).
  void *interpret_helper;
  /// A 16-byte operand a vector helper loaded or is to store (16-byte aligned: translated
  /// code uses it as the memory operand of aligned SSE instructions).
  uint64_t vector[2] __attribute__((aligned(16)));
  /// The operand of the last shift whose flags a `FlagRecipe` computes again on a slow path
  /// (its value before the shift).
  uint64_t flag_operand;
} hv_jit_context;

/// One jump cache entry: the translation of the block at `rip` (entered past its frame
/// set-up), valid under block-chain generation `generation`.
typedef struct hv_jit_cache_entry {
  uint64_t rip;
  uint64_t generation;
  const void *code;
  uint32_t count;
  int32_t block;
} hv_jit_cache_entry;

/// A byte store visible to other threads' loads (requests a stop of translated code).
static inline void hv_atomic_store8(uint8_t *p, uint8_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

/// Runs translated code at `code` on `context` and the guest registers `gpr`.
static inline uint64_t hv_jit_call(const void *code, hv_jit_context *context, uint64_t *gpr) {
  return ((uint64_t (*)(hv_jit_context *, uint64_t *))code)(context, gpr);
}

/// As `hv_jit_call`, with the guest's MXCSR `guest_mxcsr` (status flags clear) loaded in the
/// host while the code runs; the host's is saved in the context and restored afterwards.
/// Returns the status flags the code raised in `*raised`.
static inline uint64_t hv_jit_call_mxcsr(const void *code, hv_jit_context *context, uint64_t *gpr,
                                         uint32_t guest_mxcsr, uint32_t *raised) {
  uint32_t host, out;
  __asm__ volatile("stmxcsr %0" : "=m"(host) : : "memory");
  context->host_mxcsr = host;
  __asm__ volatile("ldmxcsr %0" : : "m"(guest_mxcsr) : "memory");
  uint64_t result = hv_jit_call(code, context, gpr);
  __asm__ volatile("stmxcsr %0\n\tldmxcsr %1" : "=m"(out) : "m"(host) : "memory");
  *raised = out & 0x3F;
  return result;
}

/// The host's MXCSR.
static inline uint32_t hv_stmxcsr(void) {
  uint32_t value;
  __asm__ volatile("stmxcsr %0" : "=m"(value) : : "memory");
  return value;
}

/// Loads the host's MXCSR.
static inline void hv_ldmxcsr(uint32_t value) { __asm__ volatile("ldmxcsr %0" : : "m"(value) : "memory"); }

// MARK: - Spawning children (glibc's *_np file actions, declared only for _GNU_SOURCE)

/// Adds "close every descriptor >= lowest" to `actions` (posix_spawn_file_actions_addclosefrom_np).
int hv_spawn_add_close_from(posix_spawn_file_actions_t *actions, int lowest);
/// Creates a pipe whose both ends are close-on-exec (pipe2 with O_CLOEXEC).
int hv_pipe_cloexec(int ends[2]);
/// Adds "change the working directory to path" to `actions` (posix_spawn_file_actions_addchdir_np).
int hv_spawn_add_chdir(posix_spawn_file_actions_t *actions, const char *path);
/// Starts `path` with `argv` and `envp`, `descriptor` as its descriptor 3, /dev/null as 0-2
/// and no other descriptor, killed (SIGKILL) when this process ends however it ends: forked
/// from a thread that lives as long as the process, with the parent-death signal set before
/// exec. Returns the child's PID, or -errno. Thread-safe.
pid_t hv_spawn_bound_to_process(const char *path, char *const argv[], char *const envp[], int descriptor);

#endif
