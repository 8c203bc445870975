#define _GNU_SOURCE
#include "CSandbox.h"

#include <errno.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/sysmacros.h>
#include <sys/resource.h>
#include <linux/kvm.h>
#include <linux/if_tun.h>
#include <termios.h>
#include <sys/ioctl.h>
#include <unistd.h>

const uint32_t HV_SECCOMP_RET_ALLOW = SECCOMP_RET_ALLOW;
const uint32_t HV_SECCOMP_RET_TRAP = SECCOMP_RET_TRAP;
const uint32_t HV_SECCOMP_RET_KILL_PROCESS = SECCOMP_RET_KILL_PROCESS;
const uint32_t HV_SECCOMP_RET_ERRNO = SECCOMP_RET_ERRNO;
const uint32_t HV_AUDIT_ARCH_X86_64 = AUDIT_ARCH_X86_64;

int hv_seccomp_install(const struct sock_filter *program, unsigned short count, int tsync) {
  struct sock_fprog fprog = {.len = count, .filter = (struct sock_filter *)program};
  long result = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, tsync ? SECCOMP_FILTER_FLAG_TSYNC : 0, &fprog);
  if (result == 0) return 0;
  return result < 0 ? errno : ESRCH;  // a positive result is the thread that could not sync
}

static __thread char thread_kind[32] = "main";

void hv_sandbox_set_thread_kind(const char *kind) {
  strncpy(thread_kind, kind, sizeof thread_kind - 1);
  thread_kind[sizeof thread_kind - 1] = 0;
}

// Async-signal-safe: formats with no library call and writes with the raw system call.
static void sigsys_report(int signo, siginfo_t *info, void *context) {
  (void)signo;
  (void)context;
  char line[160];
  size_t length = 0;
  const char *prefix = "hostvisor: sandbox: seccomp stopped the VMM: forbidden system call ";
  for (const char *p = prefix; *p && length < 100; p++) line[length++] = *p;
  char digits[12];
  int count = 0;
  unsigned int number = (unsigned int)info->si_syscall;
  do {
    digits[count++] = (char)('0' + number % 10);
    number /= 10;
  } while (number && count < 11);
  while (count) line[length++] = digits[--count];
  const char *middle = " on a ";
  for (const char *p = middle; *p; p++) line[length++] = *p;
  for (const char *p = thread_kind; *p && length < 150; p++) line[length++] = *p;
  const char *suffix = " thread\n";
  for (const char *p = suffix; *p && length < sizeof line; p++) line[length++] = *p;
  syscall(SYS_write, 2, line, length);
  syscall(SYS_exit_group, 128 + SIGSYS);
}

int hv_sandbox_install_sigsys_reporter(void) {
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_sigaction = sigsys_report;
  action.sa_flags = SA_SIGINFO;
  sigfillset(&action.sa_mask);
  return sigaction(SIGSYS, &action, NULL) == 0 ? 0 : errno;
}

int hv_sandbox_drop_bounding_set(void) {
  for (int capability = 0; capability <= 63; capability++) {
    if (prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0 && errno != EINVAL) return errno;
  }
  if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL) return errno;
  return 0;
}

int hv_sandbox_clear_capabilities(void) {
  struct __user_cap_header_struct header = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
  struct __user_cap_data_struct data[2];
  memset(data, 0, sizeof data);
  return syscall(SYS_capset, &header, data) == 0 ? 0 : errno;
}

int hv_sandbox_pivot_root(const char *new_root, const char *put_old) {
  return syscall(SYS_pivot_root, new_root, put_old) == 0 ? 0 : errno;
}

int hv_sandbox_close_from(unsigned int first) {
  return syscall(SYS_close_range, first, ~0U, 0) == 0 ? 0 : errno;
}

int hv_sandbox_set_no_new_privs(void) { return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 ? 0 : errno; }

// The supervisor's terminal settings before the VMM could change them (stdin a terminal).
static struct termios supervisor_terminal;
static int supervisor_terminal_saved;

/// The supervisor's descriptor of the host's /proc (-1 when it could not be opened).
static int host_proc_directory = -1;

pid_t hv_sandbox_fork(int *liveness) {
  supervisor_terminal_saved = isatty(STDIN_FILENO) && tcgetattr(STDIN_FILENO, &supervisor_terminal) == 0;
  // Only the supervisor holds the write end: the read end reports a hang-up once it is gone.
  int pipe_ends[2];
  if (pipe2(pipe_ends, O_CLOEXEC) != 0) return -errno;
  // The host's /proc, for the supervisor to read the VMM's status after the VMM's pivot into
  // its jail (which changes the root of every process of the mount namespace, the supervisor's
  // too). Opened before the fork, so no pivot can come first; the VMM closes its copy at once.
  int proc = open("/proc", O_PATH | O_DIRECTORY | O_CLOEXEC);
  pid_t child = fork();
  if (child < 0) {
    int error = errno;
    close(pipe_ends[0]);
    close(pipe_ends[1]);
    if (proc >= 0) close(proc);
    return -error;
  }
  if (child > 0) {
    close(pipe_ends[0]);
    host_proc_directory = proc;
    return child;
  }
  if (proc >= 0) close(proc);
  close(pipe_ends[1]);
  *liveness = pipe_ends[0];
  prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  // The parent may have died before the request: its death would never be reported (getppid
  // cannot tell: the parent lies outside this PID namespace, so it reads 0 either way).
  if (!hv_sandbox_supervisor_alive(pipe_ends[0])) _exit(1);
  return 0;
}

int hv_sandbox_supervisor_alive(int liveness) {
  struct pollfd entry = {.fd = liveness, .events = POLLIN};
  int ready;
  do {
    ready = poll(&entry, 1, 0);
  } while (ready < 0 && errno == EINTR);
  return ready == 0;
}

/// Puts the terminal back as it was before the VMM started when the VMM could not (it was
/// killed) and this process is in the foreground (a background job would be stopped by it).
static void restore_supervisor_terminal(void) {
  if (!supervisor_terminal_saved || tcgetpgrp(STDIN_FILENO) != getpgrp()) return;
  struct termios now;
  if (tcgetattr(STDIN_FILENO, &now) != 0) return;
  if (now.c_iflag == supervisor_terminal.c_iflag && now.c_oflag == supervisor_terminal.c_oflag &&
      now.c_cflag == supervisor_terminal.c_cflag && now.c_lflag == supervisor_terminal.c_lflag &&
      memcmp(now.c_cc, supervisor_terminal.c_cc, sizeof now.c_cc) == 0)
    return;
  tcsetattr(STDIN_FILENO, TCSANOW, &supervisor_terminal);
}

static volatile pid_t supervised_child;
static volatile sig_atomic_t forwarded_signal;

static void forward_as_kill(int signo) {
  int saved = errno;
  forwarded_signal = signo;
  if (supervised_child > 0) kill(supervised_child, SIGKILL);
  errno = saved;
}

/// Parses the hexadecimal signal set that follows `field` in a /proc/PID/status text.
static int status_signal_set(const char *text, const char *field, unsigned long long *set) {
  const char *found = strstr(text, field);
  if (!found) return 0;
  found += strlen(field);
  while (*found == '\t' || *found == ' ') found++;
  unsigned long long value = 0;
  int digits = 0;
  for (;; found++, digits++) {
    char c = *found;
    int nibble = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (nibble < 0) break;
    value = value << 4 | (unsigned long long)nibble;
  }
  *set = value;
  return digits > 0;
}

/// Whether `child` would end by `signo`'s default action: it neither catches, ignores nor
/// blocks it (its main thread's mask: a blocked signal waits for a thread that takes it, as the
/// snapshot signal's). Read from /proc/PID/status with calls that are safe in a signal handler.
/// As its PID namespace's init, the VMM would instead never see such a signal from outside.
static int takes_default_action(pid_t child, int signo) {
  if (host_proc_directory < 0) return 0;
  char path[32];
  char digits[16];
  int count = 0;
  for (unsigned value = (unsigned)child; value > 0 || count == 0; value /= 10) digits[count++] = (char)('0' + value % 10);
  size_t length = 0;
  while (count > 0) path[length++] = digits[--count];
  memcpy(path + length, "/status", sizeof "/status");
  int descriptor = openat(host_proc_directory, path, O_RDONLY | O_CLOEXEC);
  if (descriptor < 0) return 0;
  char text[4096];
  ssize_t size = read(descriptor, text, sizeof text - 1);
  close(descriptor);
  if (size <= 0) return 0;
  text[size] = 0;
  unsigned long long blocked = 0, ignored = 0, caught = 0;
  if (!status_signal_set(text, "SigBlk:", &blocked) || !status_signal_set(text, "SigIgn:", &ignored) ||
      !status_signal_set(text, "SigCgt:", &caught))
    return 0;
  return !((blocked | ignored | caught) & 1ULL << (signo - 1));
}

/// Job-control stops reach the VMM as SIGSTOP (the only stop signal a PID namespace's init
/// cannot ignore when it comes from outside); SIGCONT as it is. SIGUSR1 and SIGUSR2 reach it
/// as they are where it handles or ignores them; where it does not, they end it as they would
/// end a VMM outside the sandbox (through SIGKILL, and this process then ends by the signal).
static void forward_job_control(int signo) {
  int saved = errno;
  if ((signo == SIGUSR1 || signo == SIGUSR2) && supervised_child > 0 &&
      takes_default_action(supervised_child, signo)) {
    forward_as_kill(signo);
    errno = saved;
    return;
  }
  int sent = (signo == SIGTSTP || signo == SIGTTIN || signo == SIGTTOU) ? SIGSTOP : signo;
  if (supervised_child > 0) kill(supervised_child, sent);
  errno = saved;
}

static void install_handler(int signo, void (*handler)(int)) {
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_handler = handler;
  sigemptyset(&action.sa_mask);
  sigaction(signo, &action, NULL);
}

/// The VMM stopped (a forwarded SIGTSTP, or a SIGSTOP sent to it or to the process group):
/// this process stops too, so that whoever waits for it (a shell's job control) sees the job
/// stopped; the SIGCONT that continues it is forwarded to the VMM. SIGCONT is held back
/// meanwhile: one that arrived before this process stopped would continue the VMM and leave
/// this process stopped. Held, it is either cancelled by this stop (both stay stopped until the
/// next SIGCONT) or forwarded once this process runs again.
static void follow_stop(pid_t child) {
  sigset_t hold, previous;
  sigemptyset(&hold);
  sigaddset(&hold, SIGCONT);
  sigprocmask(SIG_BLOCK, &hold, &previous);
  // Without WEXITED only a continue is reported (none: si_pid stays 0); an exit stays for the
  // caller's waitpid.
  siginfo_t info;
  memset(&info, 0, sizeof info);
  if (waitid(P_PID, (id_t)child, &info, WCONTINUED | WNOHANG) == 0 && info.si_pid == 0) kill(getpid(), SIGSTOP);
  sigprocmask(SIG_SETMASK, &previous, NULL);
}

void hv_sandbox_supervise(pid_t child) {
  supervised_child = child;
  int killing[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT};
  for (size_t i = 0; i < sizeof killing / sizeof killing[0]; i++) install_handler(killing[i], forward_as_kill);
  // Relaying these is this process's job: a parent that started it with them blocked (test
  // harnesses: their threads block most signals) would otherwise keep them from the VMM. The
  // VMM keeps the signal mask it inherited.
  int forwarded[] = {SIGTSTP, SIGTTIN, SIGTTOU, SIGCONT, SIGUSR1, SIGUSR2};
  sigset_t relayed;
  sigemptyset(&relayed);
  for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++) {
    install_handler(forwarded[i], forward_job_control);
    sigaddset(&relayed, forwarded[i]);
  }
  sigprocmask(SIG_UNBLOCK, &relayed, NULL);
  int status = 0;
  for (;;) {
    pid_t result = waitpid(child, &status, WUNTRACED | WCONTINUED);
    if (result == child) {
      if (WIFSTOPPED(status)) {
        follow_stop(child);
        continue;
      }
      if (WIFCONTINUED(status)) continue;
      break;
    }
    if (result < 0 && errno != EINTR) _exit(1);
  }
  restore_supervisor_terminal();
  if (WIFEXITED(status)) _exit(WEXITSTATUS(status));
  int signo = WIFSIGNALED(status) ? WTERMSIG(status) : SIGKILL;
  if (signo == SIGKILL && forwarded_signal) signo = forwarded_signal;
  signal(signo, SIG_DFL);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, signo);
  sigprocmask(SIG_UNBLOCK, &set, NULL);
  raise(signo);
  _exit(128 + signo);
}

long hv_sandbox_forbidden_call(void) { return syscall(SYS_ptrace, PTRACE_TRACEME, 0, 0, 0); }

long hv_sandbox_socket_call(void) { return syscall(SYS_socket, AF_INET, SOCK_STREAM, 0); }

long hv_sandbox_open_call(const char *path) {
  long result = syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  return result < 0 ? -errno : result;
}

#define TERMINAL_IOCTLS TCGETS, TCSETS, TCSETSW, TCSETSF, TIOCGWINSZ, FIONREAD, FIONBIO

static const uint32_t vcpu_ioctls[] = {
    KVM_RUN, KVM_GET_REGS, KVM_SET_REGS, KVM_GET_SREGS, KVM_SET_SREGS, KVM_GET_FPU, KVM_SET_FPU,
    KVM_GET_MSRS, KVM_SET_MSRS, KVM_GET_MP_STATE, KVM_SET_MP_STATE, KVM_GET_XSAVE, KVM_GET_XSAVE2,
    KVM_SET_XSAVE, KVM_GET_XCRS, KVM_SET_XCRS, KVM_GET_DEBUGREGS, KVM_SET_DEBUGREGS, KVM_GET_LAPIC,
    KVM_SET_LAPIC, KVM_GET_VCPU_EVENTS, KVM_SET_VCPU_EVENTS, KVM_GET_CPUID2, KVM_SET_SIGNAL_MASK,
    KVM_SET_GUEST_DEBUG, KVM_TRANSLATE, KVM_KVMCLOCK_CTRL, KVM_GET_TSC_KHZ, KVM_IRQ_LINE,
    KVM_IRQ_LINE_STATUS, KVM_SIGNAL_MSI, KVM_GET_CLOCK, KVM_SET_CLOCK, KVM_GET_DIRTY_LOG,
    KVM_GET_IRQCHIP, KVM_SET_IRQCHIP, KVM_GET_PIT2, KVM_SET_PIT2, KVM_CHECK_EXTENSION,
    TUNSETOFFLOAD, TERMINAL_IOCTLS};

static const uint32_t worker_ioctls[] = {TERMINAL_IOCTLS};

const uint32_t *hv_sandbox_vcpu_ioctls(int *count) {
  *count = (int)(sizeof vcpu_ioctls / sizeof vcpu_ioctls[0]);
  return vcpu_ioctls;
}

const uint32_t *hv_sandbox_worker_ioctls(int *count) {
  *count = (int)(sizeof worker_ioctls / sizeof worker_ioctls[0]);
  return worker_ioctls;
}

int hv_sandbox_unshare_namespaces(void) {
  return unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS) == 0 ? 0 : errno;
}

int hv_sandbox_set_group(gid_t gid) { return setresgid(gid, gid, gid) == 0 ? 0 : errno; }

int hv_sandbox_set_user(uid_t uid) { return setresuid(uid, uid, uid) == 0 ? 0 : errno; }

int hv_sandbox_set_limit(int resource, uint64_t value) {
  struct rlimit limit;
  if (getrlimit(resource, &limit) == 0 && limit.rlim_max < value) value = limit.rlim_max;
  limit.rlim_cur = value;
  limit.rlim_max = value;
  return setrlimit(resource, &limit) == 0 ? 0 : errno;
}

_Static_assert(RLIMIT_CORE == 4 && RLIMIT_NOFILE == 7 && RLIMIT_NPROC == 6, "x86-64 Linux resource numbers");

unsigned int hv_sandbox_major(dev_t device) { return major(device); }
unsigned int hv_sandbox_minor(dev_t device) { return minor(device); }

int hv_sandbox_thread_id(void) { return (int)syscall(SYS_gettid); }

void hv_sandbox_renew_parent_death_signal(void) { prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0); }
