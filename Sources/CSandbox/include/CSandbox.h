#ifndef HOSTVISOR_CSANDBOX_H
#define HOSTVISOR_CSANDBOX_H
// System calls and kernel structures the sandbox needs that Swift cannot reach through Glibc:
// seccomp, capabilities, pivot_root, close_range, fork and the supervising parent.
#include <stdint.h>
#include <sys/types.h>
#include <linux/filter.h>

// MARK: - System call numbers (x86-64) used by the seccomp policies

#include <asm/unistd.h>
static const int HV_SYS_accept = __NR_accept;
static const int HV_SYS_accept4 = __NR_accept4;
static const int HV_SYS_access = __NR_access;
static const int HV_SYS_bind = __NR_bind;
static const int HV_SYS_brk = __NR_brk;
static const int HV_SYS_clock_gettime = __NR_clock_gettime;
static const int HV_SYS_clock_nanosleep = __NR_clock_nanosleep;
static const int HV_SYS_clone = __NR_clone;
static const int HV_SYS_clone3 = __NR_clone3;
static const int HV_SYS_close = __NR_close;
static const int HV_SYS_connect = __NR_connect;
static const int HV_SYS_dup = __NR_dup;
static const int HV_SYS_dup3 = __NR_dup3;
static const int HV_SYS_epoll_create1 = __NR_epoll_create1;
static const int HV_SYS_epoll_ctl = __NR_epoll_ctl;
static const int HV_SYS_epoll_pwait = __NR_epoll_pwait;
static const int HV_SYS_epoll_wait = __NR_epoll_wait;
static const int HV_SYS_eventfd2 = __NR_eventfd2;
static const int HV_SYS_exit = __NR_exit;
static const int HV_SYS_exit_group = __NR_exit_group;
static const int HV_SYS_faccessat = __NR_faccessat;
static const int HV_SYS_faccessat2 = __NR_faccessat2;
static const int HV_SYS_fallocate = __NR_fallocate;
static const int HV_SYS_fchmod = __NR_fchmod;
static const int HV_SYS_fcntl = __NR_fcntl;
static const int HV_SYS_fdatasync = __NR_fdatasync;
static const int HV_SYS_flock = __NR_flock;
static const int HV_SYS_fstat = __NR_fstat;
static const int HV_SYS_fsync = __NR_fsync;
static const int HV_SYS_ftruncate = __NR_ftruncate;
static const int HV_SYS_futex = __NR_futex;
static const int HV_SYS_getcwd = __NR_getcwd;
static const int HV_SYS_getdents64 = __NR_getdents64;
static const int HV_SYS_getegid = __NR_getegid;
static const int HV_SYS_geteuid = __NR_geteuid;
static const int HV_SYS_getgid = __NR_getgid;
static const int HV_SYS_getpeername = __NR_getpeername;
static const int HV_SYS_getpgrp = __NR_getpgrp;
static const int HV_SYS_getpid = __NR_getpid;
static const int HV_SYS_getppid = __NR_getppid;
static const int HV_SYS_getrandom = __NR_getrandom;
static const int HV_SYS_getrusage = __NR_getrusage;
static const int HV_SYS_getsockname = __NR_getsockname;
static const int HV_SYS_getsockopt = __NR_getsockopt;
static const int HV_SYS_gettid = __NR_gettid;
static const int HV_SYS_gettimeofday = __NR_gettimeofday;
static const int HV_SYS_getuid = __NR_getuid;
static const int HV_SYS_ioctl = __NR_ioctl;
static const int HV_SYS_kill = __NR_kill;
static const int HV_SYS_listen = __NR_listen;
static const int HV_SYS_lseek = __NR_lseek;
static const int HV_SYS_madvise = __NR_madvise;
static const int HV_SYS_membarrier = __NR_membarrier;
static const int HV_SYS_mkdir = __NR_mkdir;
static const int HV_SYS_mkdirat = __NR_mkdirat;
static const int HV_SYS_mmap = __NR_mmap;
static const int HV_SYS_mprotect = __NR_mprotect;
static const int HV_SYS_mremap = __NR_mremap;
static const int HV_SYS_munmap = __NR_munmap;
static const int HV_SYS_nanosleep = __NR_nanosleep;
static const int HV_SYS_newfstatat = __NR_newfstatat;
static const int HV_SYS_openat = __NR_openat;
static const int HV_SYS_pipe2 = __NR_pipe2;
static const int HV_SYS_poll = __NR_poll;
static const int HV_SYS_ppoll = __NR_ppoll;
static const int HV_SYS_prctl = __NR_prctl;
static const int HV_SYS_pread64 = __NR_pread64;
static const int HV_SYS_preadv = __NR_preadv;
static const int HV_SYS_preadv2 = __NR_preadv2;
static const int HV_SYS_pwrite64 = __NR_pwrite64;
static const int HV_SYS_pwritev = __NR_pwritev;
static const int HV_SYS_pwritev2 = __NR_pwritev2;
static const int HV_SYS_read = __NR_read;
static const int HV_SYS_readlink = __NR_readlink;
static const int HV_SYS_readv = __NR_readv;
static const int HV_SYS_recvfrom = __NR_recvfrom;
static const int HV_SYS_recvmsg = __NR_recvmsg;
static const int HV_SYS_rename = __NR_rename;
static const int HV_SYS_renameat = __NR_renameat;
static const int HV_SYS_restart_syscall = __NR_restart_syscall;
static const int HV_SYS_rseq = __NR_rseq;
static const int HV_SYS_rt_sigaction = __NR_rt_sigaction;
static const int HV_SYS_rt_sigprocmask = __NR_rt_sigprocmask;
static const int HV_SYS_rt_sigreturn = __NR_rt_sigreturn;
static const int HV_SYS_rt_sigtimedwait = __NR_rt_sigtimedwait;
static const int HV_SYS_sched_getaffinity = __NR_sched_getaffinity;
static const int HV_SYS_sched_setaffinity = __NR_sched_setaffinity;
static const int HV_SYS_seccomp = __NR_seccomp;
static const int HV_SYS_sched_yield = __NR_sched_yield;
static const int HV_SYS_sendmsg = __NR_sendmsg;
static const int HV_SYS_sendto = __NR_sendto;
static const int HV_SYS_set_robust_list = __NR_set_robust_list;
static const int HV_SYS_setsockopt = __NR_setsockopt;
static const int HV_SYS_shutdown = __NR_shutdown;
static const int HV_SYS_sigaltstack = __NR_sigaltstack;
static const int HV_SYS_socket = __NR_socket;
static const int HV_SYS_socketpair = __NR_socketpair;
static const int HV_SYS_statx = __NR_statx;
static const int HV_SYS_sync_file_range = __NR_sync_file_range;
static const int HV_SYS_sysinfo = __NR_sysinfo;
static const int HV_SYS_tgkill = __NR_tgkill;
static const int HV_SYS_timerfd_create = __NR_timerfd_create;
static const int HV_SYS_timerfd_settime = __NR_timerfd_settime;
static const int HV_SYS_times = __NR_times;
static const int HV_SYS_uname = __NR_uname;
static const int HV_SYS_unlink = __NR_unlink;
static const int HV_SYS_unlinkat = __NR_unlinkat;
static const int HV_SYS_wait4 = __NR_wait4;
static const int HV_SYS_write = __NR_write;
static const int HV_SYS_writev = __NR_writev;

// MARK: - Namespaces and identity (not importable without _GNU_SOURCE)

/// unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS). Returns 0 or errno.
int hv_sandbox_unshare_namespaces(void);
/// setresgid(gid, gid, gid) for every thread (glibc). Returns 0 or errno.
int hv_sandbox_set_group(gid_t gid);
/// setresuid(uid, uid, uid) for every thread (glibc). Returns 0 or errno.
int hv_sandbox_set_user(uid_t uid);

/// Sets RLIMIT_CORE, RLIMIT_NOFILE or RLIMIT_NPROC (soft and hard) to `value`, or to the
/// current hard limit when that is lower. Returns 0 or errno.
int hv_sandbox_set_limit(int resource, uint64_t value);
/// The resources `hv_sandbox_set_limit` takes.
static const int HV_RLIMIT_CORE = 4;
static const int HV_RLIMIT_NOFILE = 7;
static const int HV_RLIMIT_NPROC = 6;

/// The calling thread's ID (gettid).
int hv_sandbox_thread_id(void);
/// major(3) and minor(3) of a device number.
unsigned int hv_sandbox_major(dev_t device);
unsigned int hv_sandbox_minor(dev_t device);

// MARK: - Seccomp

/// SECCOMP_RET_ALLOW, SECCOMP_RET_TRAP, SECCOMP_RET_KILL_PROCESS and SECCOMP_RET_ERRNO.
extern const uint32_t HV_SECCOMP_RET_ALLOW;
extern const uint32_t HV_SECCOMP_RET_TRAP;
extern const uint32_t HV_SECCOMP_RET_KILL_PROCESS;
extern const uint32_t HV_SECCOMP_RET_ERRNO;
/// AUDIT_ARCH_X86_64: the only architecture the filters accept.
extern const uint32_t HV_AUDIT_ARCH_X86_64;

/// Installs a seccomp filter of `count` instructions on the calling thread (and, with `tsync`,
/// on every thread of the process). Needs no_new_privs. Returns 0 or an errno value.
int hv_seccomp_install(const struct sock_filter *program, unsigned short count, int tsync);

/// Installs the SIGSYS handler that reports a forbidden system call (number, thread kind) on
/// standard error and ends the process with status 159 (128 + SIGSYS). Returns 0 or errno.
int hv_sandbox_install_sigsys_reporter(void);

/// Names the calling thread's kind for the SIGSYS report (at most 31 bytes are kept).
void hv_sandbox_set_thread_kind(const char *kind);

// MARK: - Privileges and mounts

/// Drops every capability from the bounding set and clears the ambient set. Returns 0 or errno.
int hv_sandbox_drop_bounding_set(void);
/// Clears the calling thread's effective, permitted and inheritable capabilities.
int hv_sandbox_clear_capabilities(void);
/// pivot_root(2). Returns 0 or errno.
int hv_sandbox_pivot_root(const char *new_root, const char *put_old);
/// close_range(first, ~0, 0): closes every descriptor from `first` up. Returns 0 or errno.
int hv_sandbox_close_from(unsigned int first);
/// Sets PR_SET_NO_NEW_PRIVS. Returns 0 or errno.
int hv_sandbox_set_no_new_privs(void);

// MARK: - The PID namespace's supervising parent

/// fork(2); in the child also asks for SIGKILL when the parent dies, and stores in `liveness`
/// the read end of a pipe (close-on-exec) whose only write end the parent keeps, so that
/// `hv_sandbox_supervisor_alive` can tell whether the parent still lives. A child whose parent
/// died before the request exits at once. Also saves standard input's terminal settings for
/// the parent (see `hv_sandbox_supervise`). Returns the child's PID in the parent, 0 in the
/// child, -errno on failure.
pid_t hv_sandbox_fork(int *liveness);
/// Whether the parent that `hv_sandbox_fork` gave `liveness` still lives (1) or died (0).
int hv_sandbox_supervisor_alive(int liveness);
/// In the parent after `hv_sandbox_fork`: forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to the
/// child as SIGKILL (the child is its PID namespace's init, which ignores signals it has no
/// handler for), SIGTSTP, SIGTTIN and SIGTTOU as SIGSTOP, SIGCONT, SIGUSR1 and SIGUSR2 as they
/// are; stops itself when the child stops (job control: the SIGCONT that continues it goes on
/// to the child); waits for the child's end, puts standard input's terminal settings back when
/// they changed and this process is in the foreground (a killed VMM cannot leave raw mode),
/// and ends this process the way the child ended. Never returns.
void hv_sandbox_supervise(pid_t child) __attribute__((noreturn));

/// Asks again for SIGKILL when the supervisor dies (a change of credentials clears the request).
void hv_sandbox_renew_parent_death_signal(void);

/// A forbidden system call for the test hook: ptrace(PTRACE_TRACEME). Returns its result.
long hv_sandbox_forbidden_call(void);
/// socket(AF_INET, SOCK_STREAM, 0) made directly, for the vCPU thread's test hook.
long hv_sandbox_socket_call(void);
/// openat(AT_FDCWD, path, O_RDONLY | O_DIRECTORY | O_CLOEXEC) made directly, for the test hook
/// that shows which threads may open files. Returns the descriptor or -errno.
long hv_sandbox_open_call(const char *path);

// MARK: - ioctl numbers

/// The ioctl request numbers a vCPU thread may use (KVM vCPU and VM requests made while the
/// guest runs, the terminal's, and TUNSETOFFLOAD when a guest negotiates offloads); stores
/// their count in `count`.
const uint32_t *hv_sandbox_vcpu_ioctls(int *count);
/// The ioctl request numbers a device worker thread may use (the terminal's).
const uint32_t *hv_sandbox_worker_ioctls(int *count);

#endif
