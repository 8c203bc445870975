// Minimal C baseline for scripts/bench-kvm-exit.sh: the same guest and the same KVM_RUN
// loop as KVMAccelerator's port-I/O path, with nothing in between.
// Usage: kvm_exit GUEST.bin ITERATIONS
// Prints: "c <exits> <wall nanoseconds> <wall ns/exit> <process CPU ns/exit>".
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
  fprintf(stderr, "kvm_exit: %s: %s\n", what, strerror(errno));
  exit(1);
}

static uint64_t clock_ns(clockid_t clock) {
  struct timespec ts;
  clock_gettime(clock, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static struct kvm_segment flat(uint16_t selector, uint8_t type) {
  struct kvm_segment s = {.base = 0, .limit = 0xffffffff, .selector = selector, .type = type, .present = 1,
                          .dpl = 3, .db = 1, .s = 1, .g = 1};
  return s;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: kvm_exit GUEST.bin ITERATIONS\n");
    return 2;
  }
  unsigned long iterations = strtoul(argv[2], NULL, 0);
  const size_t memory_size = 2 << 20;
  uint8_t *memory = mmap(NULL, memory_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) die("mmap guest memory");
  FILE *guest = fopen(argv[1], "rb");
  if (!guest) die(argv[1]);
  size_t guest_size = fread(memory + 0x8000, 1, 0x10000, guest);
  fclose(guest);
  if (guest_size == 0) die("empty guest");

  int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) die("open /dev/kvm");
  int vm = ioctl(kvm, KVM_CREATE_VM, 0);
  if (vm < 0) die("KVM_CREATE_VM");
  uint64_t identity = 0xfeffc000;
  if (ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &identity) < 0) die("KVM_SET_IDENTITY_MAP_ADDR");
  if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfeffd000UL) < 0) die("KVM_SET_TSS_ADDR");
  struct kvm_userspace_memory_region region = {
      .slot = 0, .guest_phys_addr = 0, .memory_size = memory_size, .userspace_addr = (uintptr_t)memory};
  if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
  if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
  struct kvm_pit_config pit = {.flags = KVM_PIT_SPEAKER_DUMMY};
  if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0) die("KVM_CREATE_PIT2");
  int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
  if (vcpu < 0) die("KVM_CREATE_VCPU");
  int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
  if (run == MAP_FAILED) die("mmap kvm_run");
  struct kvm_cpuid2 *cpuid = calloc(1, sizeof *cpuid + 256 * sizeof(struct kvm_cpuid_entry2));
  cpuid->nent = 256;
  if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) die("KVM_GET_SUPPORTED_CPUID");
  if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0) die("KVM_SET_CPUID2");

  struct kvm_sregs sregs;
  if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
  sregs.cr0 |= 1;  // PE
  sregs.cs = flat(0x1b, 0xb);
  sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = flat(0x23, 0x3);
  if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
  struct kvm_regs regs = {.rip = 0x8000, .rflags = 0x2 | (3 << 12), .rcx = iterations, .rsp = 0x7000};
  if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

  uint64_t writes = 0, exits = 0;
  uint64_t start = clock_ns(CLOCK_MONOTONIC);
  uint64_t cpu_start = clock_ns(CLOCK_PROCESS_CPUTIME_ID);
  for (;;) {
    if (ioctl(vcpu, KVM_RUN, 0) < 0) {
      if (errno == EINTR) continue;
      die("KVM_RUN");
    }
    exits++;
    if (run->exit_reason != KVM_EXIT_IO) {
      fprintf(stderr, "kvm_exit: unexpected exit reason %u\n", run->exit_reason);
      return 1;
    }
    if (run->io.port == 0xf4) break;
    if (run->io.direction == KVM_EXIT_IO_OUT) writes += run->io.count;
  }
  uint64_t elapsed = clock_ns(CLOCK_MONOTONIC) - start;
  uint64_t cpu = clock_ns(CLOCK_PROCESS_CPUTIME_ID) - cpu_start;
  if (writes != iterations) {
    fprintf(stderr, "kvm_exit: saw %llu port writes, expected %lu\n", (unsigned long long)writes, iterations);
    return 1;
  }
  printf("c %llu %llu %.1f %.1f\n", (unsigned long long)exits, (unsigned long long)elapsed, (double)elapsed / exits,
         (double)cpu / exits);
  return 0;
}
