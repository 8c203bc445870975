#ifndef HOSTVISOR_CVIRTIOSHIM_H
#define HOSTVISOR_CVIRTIOSHIM_H
// Host interfaces the Virtio module needs that Swift cannot import by itself (variadic calls,
// GNU-only declarations, macros): eventfd, getrandom, fallocate modes, TAP ioctls, AF_PACKET.
#include <stdint.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <net/if.h>
#include <linux/if_tun.h>
#include <linux/if_packet.h>
#include <linux/if_ether.h>
#include <linux/falloc.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/timerfd.h>

static const unsigned long HV_TUNSETIFF = TUNSETIFF;
static const unsigned long HV_TUNGETIFF = TUNGETIFF;
static const unsigned long HV_TUNSETVNETHDRSZ = TUNSETVNETHDRSZ;
static const unsigned long HV_TUNSETOFFLOAD = TUNSETOFFLOAD;
static const short HV_IFF_TAP = IFF_TAP;
static const short HV_IFF_NO_PI = IFF_NO_PI;
static const short HV_IFF_VNET_HDR = IFF_VNET_HDR;
static const short HV_IFF_PERSIST = IFF_PERSIST;
static const unsigned int HV_TUN_F_CSUM = TUN_F_CSUM;
static const unsigned int HV_TUN_F_TSO4 = TUN_F_TSO4;
static const unsigned int HV_TUN_F_TSO6 = TUN_F_TSO6;
static const unsigned int HV_TUN_F_TSO_ECN = TUN_F_TSO_ECN;
static const int HV_FALLOC_FL_KEEP_SIZE = FALLOC_FL_KEEP_SIZE;
static const int HV_FALLOC_FL_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE;
static const int HV_FALLOC_FL_ZERO_RANGE = FALLOC_FL_ZERO_RANGE;
static const int HV_ETH_P_ALL = ETH_P_ALL;
static const int HV_CLONE_NEWNET = 0x40000000;  // CLONE_NEWNET (needs _GNU_SOURCE in <sched.h>)

/// eventfd(2), close-on-exec and non-blocking.
static inline int hv_eventfd(void) { return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); }
/// getrandom(2) from the urandom pool; returns the byte count or -1 with errno.
static inline long hv_getrandom(void *buffer, unsigned long length) { return getrandom(buffer, length, 0); }
/// fallocate(2); returns 0 or -1 with errno.
static inline int hv_fallocate(int fd, int mode, int64_t offset, int64_t length) {
  return (int)syscall(SYS_fallocate, fd, mode, offset, length);
}
/// dup3(2) with O_CLOEXEC (GNU-only in <unistd.h>): `newfd` then refers to what `oldfd` does,
/// and stays close-on-exec; returns `newfd` or -1 with errno.
static inline int hv_dup3_cloexec(int oldfd, int newfd) { return (int)syscall(SYS_dup3, oldfd, newfd, O_CLOEXEC); }
/// setns(2); returns 0 or -1 with errno.
static inline int hv_setns(int fd, int nstype) { return (int)syscall(SYS_setns, fd, nstype); }
/// ioctl(2) with a pointer argument.
static inline int hv_virtio_ioctl_ptr(int fd, unsigned long request, void *argument) {
  return ioctl(fd, request, argument);
}
/// ioctl(2) with an integer argument.
static inline int hv_virtio_ioctl_int(int fd, unsigned long request, unsigned long argument) {
  return ioctl(fd, request, argument);
}
/// Size of struct ifreq and offset of ifr_flags / ifr_ifindex in it.
static const int HV_IFREQ_SIZE = sizeof(struct ifreq);
static const int HV_IFREQ_FLAGS_OFFSET = __builtin_offsetof(struct ifreq, ifr_flags);
static const int HV_IFREQ_IFINDEX_OFFSET = __builtin_offsetof(struct ifreq, ifr_ifindex);

/// A monotonic timerfd(2), close-on-exec and non-blocking; -1 with errno on failure.
static inline int hv_timerfd(void) { return timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK); }
/// Arms `fd` to fire every `seconds` seconds (0 disarms); returns 0 or -1 with errno.
static inline int hv_timerfd_every(int fd, unsigned int seconds) {
  struct itimerspec spec = {{seconds, 0}, {seconds, 0}};
  return timerfd_settime(fd, 0, &spec, 0);
}
/// Names the calling thread (at most 15 characters are kept).
static inline void hv_virtio_set_thread_name(const char *name) { prctl(PR_SET_NAME, name, 0, 0, 0); }

#endif
