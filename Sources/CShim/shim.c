// glibc declares the posix_spawn *_np file actions only for _GNU_SOURCE.
#define _GNU_SOURCE
#include "CShim.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>

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
struct hv_bound_spawn {
  const char *path;
  char *const *argv;
  char *const *envp;
  int descriptor;
  pid_t result;
};

static pthread_mutex_t bound_spawn_callers = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t bound_spawn_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t bound_spawn_changed = PTHREAD_COND_INITIALIZER;
static struct hv_bound_spawn *bound_spawn_request;
static int bound_spawn_thread_error = -1;

static pid_t hv_bound_spawn_fork(const struct hv_bound_spawn *request) {
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid != 0) return pid < 0 ? -errno : pid;
  // The child: only system calls until execve.
  if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0 || getppid() != parent) _exit(127);
  if (request->descriptor == 3) {
    if (fcntl(3, F_SETFD, 0) != 0) _exit(127);
  } else if (dup2(request->descriptor, 3) != 3) {
    _exit(127);
  }
  int null = open("/dev/null", O_RDWR);
  if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(null, 2) < 0) _exit(127);
  closefrom(4);
  execve(request->path, request->argv, request->envp);
  _exit(127);
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
  struct hv_bound_spawn request = {path, argv, envp, descriptor, 0};
  pthread_mutex_lock(&bound_spawn_callers);
  pthread_mutex_lock(&bound_spawn_lock);
  bound_spawn_request = &request;
  pthread_cond_broadcast(&bound_spawn_changed);
  while (request.result == 0) pthread_cond_wait(&bound_spawn_changed, &bound_spawn_lock);
  bound_spawn_request = NULL;
  pthread_mutex_unlock(&bound_spawn_lock);
  pthread_mutex_unlock(&bound_spawn_callers);
  return request.result;
}
