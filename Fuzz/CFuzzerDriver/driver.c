// libFuzzer itself comes with -sanitize=fuzzer; this file holds the libc wrappers.
#define _GNU_SOURCE
#include <sys/mman.h>

#include "fuzzer_driver.h"

int hv_fuzz_memfd(const char *name) { return memfd_create(name, 0); }
