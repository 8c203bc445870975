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
