// glibc declares the posix_spawn *_np file actions only for _GNU_SOURCE.
#define _GNU_SOURCE
#include "CShim.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>

// MARK: - KVM

int hv_ioctl_ptr(int fd, unsigned long request, void *argument) { return ioctl(fd, request, argument); }

int hv_ioctl_int(int fd, unsigned long request, unsigned long argument) { return ioctl(fd, request, argument); }

int hv_kvm_irq_line(int vm_fd, uint32_t irq, uint32_t level) {
  struct kvm_irq_level line;
  memset(&line, 0, sizeof line);
  line.irq = irq;
  line.level = level;
  return ioctl(vm_fd, KVM_IRQ_LINE, &line);
}

static void hv_wakeup_signal_handler(int signo) { (void)signo; }

int hv_install_wakeup_signal_handler(int signo) {
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_handler = hv_wakeup_signal_handler;
  sigemptyset(&action.sa_mask);
  action.sa_flags = 0;  // no SA_RESTART: the signal must interrupt KVM_RUN
  return sigaction(signo, &action, NULL);
}

int hv_kvm_unblock_signal_only_in_run(int vcpu_fd, int signo) {
  sigset_t block, current;
  sigemptyset(&block);
  sigaddset(&block, signo);
  int rc = pthread_sigmask(SIG_BLOCK, &block, &current);
  if (rc != 0) {
    errno = rc;
    return -1;
  }
  sigdelset(&current, signo);
  // The kernel's sigset is 64 bits on x86-64: the first 8 bytes of glibc's sigset_t.
  struct kvm_signal_mask *mask = calloc(1, sizeof(struct kvm_signal_mask) + 8);
  if (mask == NULL) {
    errno = ENOMEM;
    return -1;
  }
  mask->len = 8;
  memcpy(mask->sigset, &current, 8);
  rc = ioctl(vcpu_fd, KVM_SET_SIGNAL_MASK, mask);
  int saved = errno;
  free(mask);
  errno = saved;
  return rc;
}

int hv_set_current_thread_name(const char *name) { return prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0); }

void hv_consume_pending_signal(int signo) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, signo);
  struct timespec zero = {0, 0};
  while (sigtimedwait(&set, NULL, &zero) == signo) {
  }
}

// MARK: - Spawning children

int hv_spawn_add_close_from(posix_spawn_file_actions_t *actions, int lowest) {
  return posix_spawn_file_actions_addclosefrom_np(actions, lowest);
}

int hv_pipe_cloexec(int ends[2]) { return pipe2(ends, O_CLOEXEC); }

int hv_spawn_add_chdir(posix_spawn_file_actions_t *actions, const char *path) {
  return posix_spawn_file_actions_addchdir_np(actions, path);
}

// MARK: - Children that die with the VMM

// Linux sends a child's parent-death signal when the thread that forked it ends, not the
// process: children are forked from one thread that lives as long as the process, so a
// caller on a short-lived thread (a Dispatch worker, an API request) cannot end them early.
//
// A change of credentials clears the parent-death signal, and a child started by root may
// well change them (passt switches to nobody). As root, a child therefore runs in a PID
// namespace of its own under a small init (this binary again, `hv_bound_init`), which keeps
// the signal: the VMM's end kills the init, and the init's end kills everything in its
// namespace, whatever its credentials.
//
// The init also gets a mount namespace of its own, a copy of the VMM's taken at the spawn: a
// sandboxed VMM pivots into an empty jail in its mount namespace right after, and a passt that
// shared it would find no /tmp to mount its own tmpfs on if it set up its namespaces later than
// that (as it does on a loaded host), and exit.
struct hv_bound_spawn {
  const char *path;
  char *const *argv;
  char *const *init_argv;
  char *const *envp;
  int descriptor;
  pid_t result;
};

static pthread_mutex_t bound_spawn_callers = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t bound_spawn_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t bound_spawn_changed = PTHREAD_COND_INITIALIZER;
static struct hv_bound_spawn *bound_spawn_request;
static int bound_spawn_thread_error = -1;

/// argv[0] of this binary run as the init of a bound child's PID namespace.
static const char bound_init_name[] = "hostvisor-bound-init";

// The child of `hv_bound_spawn_fork`: only system calls until execve. `liveness` is the read
// end of a pipe whose write end only the VMM holds until the child has execed (-1 without a
// namespace, where getppid tells).
static void hv_bound_spawn_child(const struct hv_bound_spawn *request, pid_t parent, int liveness) {
  if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) _exit(127);
  if (liveness < 0) {
    if (getppid() != parent) _exit(127);
  } else {
    // A parent outside the child's PID namespace reads as 0 through getppid: a VMM that died
    // before the signal was set shows as a hang-up on the pipe instead.
    struct pollfd entry = {.fd = liveness, .events = POLLIN};
    int ready;
    do {
      ready = poll(&entry, 1, 0);
    } while (ready < 0 && errno == EINTR);
    if (ready != 0) _exit(127);
  }
  if (request->descriptor == 3) {
    if (fcntl(3, F_SETFD, 0) != 0) _exit(127);
  } else if (dup2(request->descriptor, 3) != 3) {
    _exit(127);
  }
  int null = open("/dev/null", O_RDWR);
  if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(null, 2) < 0) _exit(127);
  closefrom(4);
  // Without /proc (a jail) the child itself is the namespace's init: it still dies with the
  // VMM unless it changes its credentials.
  if (liveness >= 0) execve("/proc/self/exe", request->init_argv, request->envp);
  execve(request->path, request->argv, request->envp);
  _exit(127);
}

static pid_t hv_bound_spawn_fork(const struct hv_bound_spawn *request) {
  pid_t parent = getpid();
  // liveness: the child's check that the VMM is alive; started: end of file once the child
  // execed (or died), after which the VMM may drop its end of `liveness`.
  int liveness[2] = {-1, -1}, started[2] = {-1, -1};
  pid_t pid = -1;
  if (geteuid() == 0 && request->init_argv != NULL && pipe2(liveness, O_CLOEXEC) == 0) {
    if (pipe2(started, O_CLOEXEC) == 0) {
      // A fork into new PID and mount namespaces; the child runs only system calls until
      // execve.
      pid = (pid_t)syscall(SYS_clone, CLONE_NEWPID | CLONE_NEWNS | SIGCHLD, NULL, NULL, NULL, 0);
    }
    if (pid < 0) {
      // No namespace (no CAP_SYS_ADMIN in a container, a namespace limit): a plain fork.
      for (int index = 0; index < 2; index++) {
        if (liveness[index] >= 0) close(liveness[index]);
        if (started[index] >= 0) close(started[index]);
        liveness[index] = started[index] = -1;
      }
    }
  }
  if (pid == 0) {
    close(liveness[1]);
    close(started[0]);
    hv_bound_spawn_child(request, parent, liveness[0]);
  }
  if (liveness[0] < 0) {
    pid = fork();
    if (pid == 0) hv_bound_spawn_child(request, parent, -1);
    return pid < 0 ? -errno : pid;
  }
  close(started[1]);
  char byte;
  while (read(started[0], &byte, 1) < 0 && errno == EINTR) {
  }
  close(started[0]);
  close(liveness[0]);
  close(liveness[1]);
  return pid;
}

// MARK: The init of a bound child's PID namespace

static volatile sig_atomic_t bound_init_child;

static void hv_bound_init_forward(int signo) {
  if (bound_init_child > 0) kill(bound_init_child, signo);
}

// PID 1 of the namespace: starts the child, passes on the signals a user may send it (as a
// namespace's init it would otherwise ignore them), reaps whatever the namespace leaves to it
// and ends with the child's status (128 + the signal's number for a child killed by one).
static void hv_bound_init(char **argv, char **envp) {
  prctl(PR_SET_NAME, (unsigned long)"hostvisor-init", 0, 0, 0);
  sigset_t all, previous;
  sigfillset(&all);
  sigprocmask(SIG_BLOCK, &all, &previous);
  pid_t child = fork();
  if (child < 0) _exit(127);
  if (child == 0) {
    sigprocmask(SIG_SETMASK, &previous, NULL);
    execve(argv[1], argv + 2, envp);
    _exit(127);
  }
  bound_init_child = child;
  // No descriptor of the child's stays open here: its socket must close when the child ends.
  syscall(SYS_close_range, 0U, ~0U, 0U);
  static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_handler = hv_bound_init_forward;
  sigemptyset(&action.sa_mask);
  for (unsigned index = 0; index < sizeof forwarded / sizeof forwarded[0]; index++) {
    sigaction(forwarded[index], &action, NULL);
  }
  sigprocmask(SIG_SETMASK, &previous, NULL);
  for (;;) {
    int status;
    pid_t ended = waitpid(-1, &status, 0);
    if (ended == child) _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    if (ended < 0 && errno == ECHILD) _exit(127);
  }
}

// Runs before main (glibc passes constructors argc, argv and envp): this binary started as a
// bound child's init never reaches the Swift code.
__attribute__((constructor)) static void hv_bound_init_entry(int argc, char **argv, char **envp) {
  if (argc >= 3 && strcmp(argv[0], bound_init_name) == 0) hv_bound_init(argv, envp);
}

static void *hv_bound_spawn_thread(void *unused) {
  (void)unused;
  pthread_mutex_lock(&bound_spawn_lock);
  for (;;) {
    while (bound_spawn_request == NULL || bound_spawn_request->result != 0) {
      pthread_cond_wait(&bound_spawn_changed, &bound_spawn_lock);
    }
    bound_spawn_request->result = hv_bound_spawn_fork(bound_spawn_request);
    pthread_cond_broadcast(&bound_spawn_changed);
  }
  return NULL;
}

static pthread_once_t bound_spawn_once = PTHREAD_ONCE_INIT;

static void hv_bound_spawn_start(void) {
  pthread_t thread;
  pthread_attr_t attributes;
  pthread_attr_init(&attributes);
  pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
  bound_spawn_thread_error = pthread_create(&thread, &attributes, hv_bound_spawn_thread, NULL);
  pthread_attr_destroy(&attributes);
}

pid_t hv_spawn_bound_to_process(const char *path, char *const argv[], char *const envp[], int descriptor) {
  pthread_once(&bound_spawn_once, hv_bound_spawn_start);
  if (bound_spawn_thread_error != 0) return -bound_spawn_thread_error;
  // The init's arguments: its name, the child's path, then the child's argv.
  size_t count = 0;
  while (argv[count] != NULL) count++;
  char **init_argv = calloc(count + 3, sizeof(char *));
  if (init_argv != NULL) {
    init_argv[0] = (char *)bound_init_name;
    init_argv[1] = (char *)path;
    memcpy(init_argv + 2, argv, count * sizeof(char *));
  }
  struct hv_bound_spawn request = {path, argv, init_argv, envp, descriptor, 0};
  pthread_mutex_lock(&bound_spawn_callers);
  pthread_mutex_lock(&bound_spawn_lock);
  bound_spawn_request = &request;
  pthread_cond_broadcast(&bound_spawn_changed);
  while (request.result == 0) pthread_cond_wait(&bound_spawn_changed, &bound_spawn_lock);
  bound_spawn_request = NULL;
  pthread_mutex_unlock(&bound_spawn_lock);
  pthread_mutex_unlock(&bound_spawn_callers);
  free(init_argv);
  return request.result;
}
