// Native executor for the software CPU's differential tests. See CNativeExec.h.
//
// Entry: the callee-saved registers and the host FPU state are saved, the prepared FXSAVE
// image is loaded with FXRSTOR, the 15 non-stack GPRs are loaded from `cnx_in`, and IRETQ
// switches RSP, RFLAGS and RIP at once (so a TF set in RFLAGS single-steps exactly the first
// instruction of the sequence). Exit: the sequence falls into a `jmp [rip]` trampoline to
// `cnx_exit`, which stores every register into `cnx_out` and returns to C. A fault raises a
// signal; the handler copies the register state from the signal context and rewrites that
// context so the kernel's sigreturn resumes at `cnx_resume` on the host stack.
#define _GNU_SOURCE
#include "CNativeExec.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#define CNX_HIDDEN __attribute__((visibility("hidden")))

CNX_HIDDEN CNXState cnx_in __attribute__((aligned(64)));
CNX_HIDDEN CNXState cnx_out __attribute__((aligned(64)));
CNX_HIDDEN uint8_t cnx_host_fx[512] __attribute__((aligned(16)));
CNX_HIDDEN uint64_t cnx_host_rsp;
/// Nonzero when the input's YMM upper halves are not all zero (see CNXState.ymmHigh).
CNX_HIDDEN uint8_t cnx_load_upper;

static volatile sig_atomic_t cnx_active;
static CNXOutcome cnx_outcome;
static pthread_mutex_t cnx_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t cnx_once = PTHREAD_ONCE_INIT;
static int cnx_setup_error;

enum { CNX_WATCHDOG_SIGNAL = SIGALRM, CNX_TIMEOUT_VECTOR = -2 };
static const int cnx_signals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, CNX_WATCHDOG_SIGNAL};
#define CNX_SIGNAL_COUNT (sizeof(cnx_signals) / sizeof(cnx_signals[0]))
static struct sigaction cnx_previous[CNX_SIGNAL_COUNT];

static __thread int cnx_thread_ready;
static __thread timer_t cnx_thread_timer;

void cnx_enter(void);
void cnx_exit(void);
void cnx_resume(void);

// Offsets into CNXState: gpr 0..127, rip 128, rflags 136, fxsave 144, ymmHigh 656.
_Static_assert(offsetof(CNXState, ymmHigh) == 656, "CNXState layout");
__asm__(
  ".text\n"
  ".globl cnx_enter\n"
  ".hidden cnx_enter\n"
  ".type cnx_enter,@function\n"
  "cnx_enter:\n"
  "  push %rbx\n  push %rbp\n  push %r12\n  push %r13\n  push %r14\n  push %r15\n"
  "  fxsave64 cnx_host_fx(%rip)\n"
  "  mov %rsp, cnx_host_rsp(%rip)\n"
  // IRETQ frame: SS, RSP, RFLAGS, CS, RIP.
  "  xor %eax, %eax\n  mov %ss, %ax\n  push %rax\n"
  "  pushq cnx_in+32(%rip)\n"
  "  pushq cnx_in+136(%rip)\n"
  "  mov %cs, %ax\n  push %rax\n"
  "  pushq cnx_in+128(%rip)\n"
  "  vzeroupper\n"
  "  fxrstor64 cnx_in+144(%rip)\n"
  "  cmpb $0, cnx_load_upper(%rip)\n"
  "  je 1f\n"
  "  vinsertf128 $1, cnx_in+656(%rip), %ymm0, %ymm0\n"
  "  vinsertf128 $1, cnx_in+672(%rip), %ymm1, %ymm1\n"
  "  vinsertf128 $1, cnx_in+688(%rip), %ymm2, %ymm2\n"
  "  vinsertf128 $1, cnx_in+704(%rip), %ymm3, %ymm3\n"
  "  vinsertf128 $1, cnx_in+720(%rip), %ymm4, %ymm4\n"
  "  vinsertf128 $1, cnx_in+736(%rip), %ymm5, %ymm5\n"
  "  vinsertf128 $1, cnx_in+752(%rip), %ymm6, %ymm6\n"
  "  vinsertf128 $1, cnx_in+768(%rip), %ymm7, %ymm7\n"
  "  vinsertf128 $1, cnx_in+784(%rip), %ymm8, %ymm8\n"
  "  vinsertf128 $1, cnx_in+800(%rip), %ymm9, %ymm9\n"
  "  vinsertf128 $1, cnx_in+816(%rip), %ymm10, %ymm10\n"
  "  vinsertf128 $1, cnx_in+832(%rip), %ymm11, %ymm11\n"
  "  vinsertf128 $1, cnx_in+848(%rip), %ymm12, %ymm12\n"
  "  vinsertf128 $1, cnx_in+864(%rip), %ymm13, %ymm13\n"
  "  vinsertf128 $1, cnx_in+880(%rip), %ymm14, %ymm14\n"
  "  vinsertf128 $1, cnx_in+896(%rip), %ymm15, %ymm15\n"
  "1:\n"
  "  mov cnx_in+0(%rip), %rax\n"
  "  mov cnx_in+8(%rip), %rcx\n"
  "  mov cnx_in+16(%rip), %rdx\n"
  "  mov cnx_in+24(%rip), %rbx\n"
  "  mov cnx_in+40(%rip), %rbp\n"
  "  mov cnx_in+48(%rip), %rsi\n"
  "  mov cnx_in+56(%rip), %rdi\n"
  "  mov cnx_in+64(%rip), %r8\n"
  "  mov cnx_in+72(%rip), %r9\n"
  "  mov cnx_in+80(%rip), %r10\n"
  "  mov cnx_in+88(%rip), %r11\n"
  "  mov cnx_in+96(%rip), %r12\n"
  "  mov cnx_in+104(%rip), %r13\n"
  "  mov cnx_in+112(%rip), %r14\n"
  "  mov cnx_in+120(%rip), %r15\n"
  "  iretq\n"
  ".size cnx_enter, .-cnx_enter\n"
  "\n"
  ".globl cnx_exit\n"
  ".hidden cnx_exit\n"
  ".type cnx_exit,@function\n"
  "cnx_exit:\n"
  "  mov %rax, cnx_out+0(%rip)\n"
  "  mov %rcx, cnx_out+8(%rip)\n"
  "  mov %rdx, cnx_out+16(%rip)\n"
  "  mov %rbx, cnx_out+24(%rip)\n"
  "  mov %rsp, cnx_out+32(%rip)\n"
  "  mov %rbp, cnx_out+40(%rip)\n"
  "  mov %rsi, cnx_out+48(%rip)\n"
  "  mov %rdi, cnx_out+56(%rip)\n"
  "  mov %r8, cnx_out+64(%rip)\n"
  "  mov %r9, cnx_out+72(%rip)\n"
  "  mov %r10, cnx_out+80(%rip)\n"
  "  mov %r11, cnx_out+88(%rip)\n"
  "  mov %r12, cnx_out+96(%rip)\n"
  "  mov %r13, cnx_out+104(%rip)\n"
  "  mov %r14, cnx_out+112(%rip)\n"
  "  mov %r15, cnx_out+120(%rip)\n"
  "  mov cnx_host_rsp(%rip), %rsp\n"
  "  pushfq\n"
  "  popq cnx_out+136(%rip)\n"
  "  pushq $0x202\n"
  "  popfq\n"
  "  fxsave64 cnx_out+144(%rip)\n"
  "  vextractf128 $1, %ymm0, cnx_out+656(%rip)\n"
  "  vextractf128 $1, %ymm1, cnx_out+672(%rip)\n"
  "  vextractf128 $1, %ymm2, cnx_out+688(%rip)\n"
  "  vextractf128 $1, %ymm3, cnx_out+704(%rip)\n"
  "  vextractf128 $1, %ymm4, cnx_out+720(%rip)\n"
  "  vextractf128 $1, %ymm5, cnx_out+736(%rip)\n"
  "  vextractf128 $1, %ymm6, cnx_out+752(%rip)\n"
  "  vextractf128 $1, %ymm7, cnx_out+768(%rip)\n"
  "  vextractf128 $1, %ymm8, cnx_out+784(%rip)\n"
  "  vextractf128 $1, %ymm9, cnx_out+800(%rip)\n"
  "  vextractf128 $1, %ymm10, cnx_out+816(%rip)\n"
  "  vextractf128 $1, %ymm11, cnx_out+832(%rip)\n"
  "  vextractf128 $1, %ymm12, cnx_out+848(%rip)\n"
  "  vextractf128 $1, %ymm13, cnx_out+864(%rip)\n"
  "  vextractf128 $1, %ymm14, cnx_out+880(%rip)\n"
  "  vextractf128 $1, %ymm15, cnx_out+896(%rip)\n"
  "  fxrstor64 cnx_host_fx(%rip)\n"
  "  vzeroupper\n"
  "  pop %r15\n  pop %r14\n  pop %r13\n  pop %r12\n  pop %rbp\n  pop %rbx\n"
  "  ret\n"
  ".size cnx_exit, .-cnx_exit\n"
  "\n"
  ".globl cnx_resume\n"
  ".hidden cnx_resume\n"
  ".type cnx_resume,@function\n"
  "cnx_resume:\n"
  "  cld\n"
  "  fxrstor64 cnx_host_fx(%rip)\n"
  "  vzeroupper\n"
  "  pop %r15\n  pop %r14\n  pop %r13\n  pop %r12\n  pop %rbp\n  pop %rbx\n"
  "  ret\n"
  ".size cnx_resume, .-cnx_resume\n");

static int cnx_signal_slot(int sig) {
  for (size_t i = 0; i < CNX_SIGNAL_COUNT; i++) {
    if (cnx_signals[i] == sig) return (int)i;
  }
  return -1;
}

static void cnx_handler(int sig, siginfo_t *info, void *context) {
  ucontext_t *uc = (ucontext_t *)context;
  if (!cnx_active) {
    // A late watchdog tick is harmless. Anything else is not ours: put the previous handler
    // back and let the fault happen again.
    if (sig == CNX_WATCHDOG_SIGNAL) return;
    int slot = cnx_signal_slot(sig);
    if (slot >= 0) sigaction(sig, &cnx_previous[slot], NULL);
    return;
  }
  greg_t *g = uc->uc_mcontext.gregs;
  static const int order[16] = {REG_RAX, REG_RCX, REG_RDX, REG_RBX, REG_RSP, REG_RBP,
                                REG_RSI, REG_RDI, REG_R8,  REG_R9,  REG_R10, REG_R11,
                                REG_R12, REG_R13, REG_R14, REG_R15};
  for (int i = 0; i < 16; i++) cnx_out.gpr[i] = (uint64_t)g[order[i]];
  cnx_out.rip = (uint64_t)g[REG_RIP];
  cnx_out.rflags = (uint64_t)g[REG_EFL];
  if (uc->uc_mcontext.fpregs) {
    memcpy(cnx_out.fxsave, uc->uc_mcontext.fpregs, 512);
    // The kernel's signal frame is an XSAVE area (standard format) when the software-reserved
    // bytes carry FP_XSTATE_MAGIC1; the AVX component sits at offset 576 if XSTATE_BV[2] is set.
    const uint8_t *frame = (const uint8_t *)uc->uc_mcontext.fpregs;
    uint32_t magic;
    uint64_t stateMask = 0;
    memcpy(&magic, frame + 464, 4);
    if (magic == 0x46505853u) memcpy(&stateMask, frame + 512, 8);
    if (stateMask & 4) {
      memcpy(cnx_out.ymmHigh, frame + 576, 256);
    } else {
      memset(cnx_out.ymmHigh, 0, 256);
    }
  }
  cnx_outcome.signal = sig;
  cnx_outcome.signalCode = info->si_code;
  if (sig == CNX_WATCHDOG_SIGNAL) {
    cnx_outcome.vector = CNX_TIMEOUT_VECTOR;
  } else {
    cnx_outcome.vector = (int32_t)g[REG_TRAPNO];
    cnx_outcome.errorCode = (uint64_t)g[REG_ERR];
    cnx_outcome.faultAddress = sig == SIGSEGV ? (uint64_t)g[REG_CR2] : (uint64_t)info->si_addr;
  }
  cnx_active = 0;
  // Resume on the host stack with the host FPU state (cnx_resume reloads it too).
  g[REG_RSP] = (greg_t)cnx_host_rsp;
  g[REG_RIP] = (greg_t)(uintptr_t)&cnx_resume;
  g[REG_EFL] = 0x246;
  if (uc->uc_mcontext.fpregs) {
    uint8_t *frame = (uint8_t *)uc->uc_mcontext.fpregs;
    memcpy(frame, cnx_host_fx, 512);
    uint32_t magic;
    memcpy(&magic, frame + 464, 4);
    if (magic == 0x46505853u) {
      // sigreturn loads x87 and SSE from the legacy region written above, and initializes AVX.
      uint64_t stateMask;
      memcpy(&stateMask, frame + 512, 8);
      stateMask = (stateMask | 3) & ~(uint64_t)4;
      memcpy(frame + 512, &stateMask, 8);
    }
  }
}

static void cnx_do_setup(void) {
  void *code = mmap((void *)CNX_CODE_BASE, CNX_CODE_SIZE, PROT_READ | PROT_WRITE | PROT_EXEC,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  if (code == MAP_FAILED || code != (void *)CNX_CODE_BASE) {
    cnx_setup_error = code == MAP_FAILED ? errno : EEXIST;
    return;
  }
  void *data = mmap((void *)CNX_DATA_BASE, CNX_DATA_SIZE + 4096, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  if (data == MAP_FAILED || data != (void *)CNX_DATA_BASE) {
    cnx_setup_error = data == MAP_FAILED ? errno : EEXIST;
    return;
  }
  if (mprotect((uint8_t *)data + CNX_DATA_SIZE, 4096, PROT_NONE) != 0) {
    cnx_setup_error = errno;
    return;
  }
  for (size_t i = 0; i < CNX_SIGNAL_COUNT; i++) {
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = cnx_handler;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    if (sigaction(cnx_signals[i], &action, &cnx_previous[i]) != 0) {
      cnx_setup_error = errno;
      return;
    }
  }
}

int cnx_setup(void) {
  pthread_once(&cnx_once, cnx_do_setup);
  return cnx_setup_error;
}

static int cnx_prepare_thread(void) {
  if (cnx_thread_ready) return 0;
  size_t size = 1 << 18;
  stack_t stack;
  stack.ss_sp = malloc(size);
  if (!stack.ss_sp) return ENOMEM;
  stack.ss_size = size;
  stack.ss_flags = 0;
  if (sigaltstack(&stack, NULL) != 0) return errno;
  struct sigevent event;
  memset(&event, 0, sizeof(event));
  event.sigev_notify = SIGEV_THREAD_ID;
  event.sigev_signo = CNX_WATCHDOG_SIGNAL;
  event._sigev_un._tid = gettid();
  if (timer_create(CLOCK_MONOTONIC, &event, &cnx_thread_timer) != 0) return errno;
  cnx_thread_ready = 1;
  return 0;
}

static void cnx_arm_watchdog(int seconds) {
  struct itimerspec spec;
  memset(&spec, 0, sizeof(spec));
  spec.it_value.tv_sec = seconds;
  timer_settime(cnx_thread_timer, 0, &spec, NULL);
}

int cnx_run(
  const uint8_t *code, size_t codeLength, uint8_t *data, CNXState *state, int singleStep,
  CNXOutcome *outcome) {
  int error = cnx_setup();
  if (error) return error;
  if (codeLength > CNX_MAX_CODE) return EINVAL;
  pthread_mutex_lock(&cnx_lock);
  error = cnx_prepare_thread();
  if (error) {
    pthread_mutex_unlock(&cnx_lock);
    return error;
  }
  uint8_t *codeBuffer = (uint8_t *)CNX_CODE_BASE;
  memcpy(codeBuffer, code, codeLength);
  // jmp qword ptr [rip+0]; .quad cnx_exit
  uint8_t *trampoline = codeBuffer + codeLength;
  static const uint8_t jump[6] = {0xFF, 0x25, 0, 0, 0, 0};
  memcpy(trampoline, jump, 6);
  uint64_t exitAddress = (uint64_t)(uintptr_t)&cnx_exit;
  memcpy(trampoline + 6, &exitAddress, 8);
  memset(trampoline + 14, 0xCC, 16);
  __builtin___clear_cache((char *)codeBuffer, (char *)trampoline + 30);
  memcpy((void *)CNX_DATA_BASE, data, CNX_DATA_SIZE);

  cnx_in = *state;
  cnx_in.rip = CNX_CODE_BASE;
  const uint64_t allowed = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x400 | 0x800;
  cnx_in.rflags = (state->rflags & allowed) | 0x202 | (singleStep ? 0x100 : 0);
  uint32_t mxcsr;
  memcpy(&mxcsr, cnx_in.fxsave + 24, 4);
  mxcsr &= 0xFFFF;
  memcpy(cnx_in.fxsave + 24, &mxcsr, 4);
  cnx_load_upper = 0;
  for (size_t i = 0; i < sizeof cnx_in.ymmHigh; i++) cnx_load_upper |= cnx_in.ymmHigh[i];
  memset(&cnx_out, 0, sizeof(cnx_out));
  memset(&cnx_outcome, 0, sizeof(cnx_outcome));
  cnx_outcome.vector = -1;

  // Worker threads (libdispatch, Swift concurrency) block asynchronous signals; the
  // watchdog's SIGALRM must get through while the sequence runs.
  sigset_t unblock, previousMask;
  sigemptyset(&unblock);
  for (size_t i = 0; i < CNX_SIGNAL_COUNT; i++) sigaddset(&unblock, cnx_signals[i]);
  pthread_sigmask(SIG_UNBLOCK, &unblock, &previousMask);
  cnx_arm_watchdog(2);
  cnx_active = 1;
  cnx_enter();
  cnx_active = 0;
  cnx_arm_watchdog(0);
  pthread_sigmask(SIG_SETMASK, &previousMask, NULL);

  if (cnx_outcome.signal == 0) cnx_out.rip = CNX_CODE_BASE + codeLength;
  *state = cnx_out;
  *outcome = cnx_outcome;
  memcpy(data, (void *)CNX_DATA_BASE, CNX_DATA_SIZE);
  pthread_mutex_unlock(&cnx_lock);
  return 0;
}

uint32_t cnx_host_mxcsr_mask(void) {
  uint8_t image[512] __attribute__((aligned(16)));
  memset(image, 0, sizeof image);
  __asm__ volatile("fxsave64 %0" : "=m"(image));
  uint32_t mask;
  memcpy(&mask, image + 28, 4);
  return mask == 0 ? 0xFFBF : mask;
}

void cnx_host_vendor(char vendor[13]) {
  uint32_t a = 0, b, c, d;
  __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "=c"(c), "=d"(d));
  memcpy(vendor, &b, 4);
  memcpy(vendor + 4, &d, 4);
  memcpy(vendor + 8, &c, 4);
  vendor[12] = 0;
}
