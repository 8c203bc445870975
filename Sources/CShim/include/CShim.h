#ifndef HOSTVISOR_CSHIM_H
#define HOSTVISOR_CSHIM_H
// What Swift cannot import from C headers on its own, nothing clever.
#include <stdint.h>
#include <termios.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#endif
