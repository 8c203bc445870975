// libFuzzer's entry for programs with their own main (compiler-rt's FuzzerInterface), and
// what the fuzz targets need from libc beyond Glibc's Swift overlay.
#ifndef HOSTVISOR_FUZZER_DRIVER_H
#define HOSTVISOR_FUZZER_DRIVER_H

#include <stddef.h>
#include <stdint.h>

/// Parses libFuzzer's command line in argc/argv and runs `callback` on each input.
int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*callback)(const uint8_t *data, size_t size));

/// memfd_create(name, 0): an anonymous file in memory, or -1.
int hv_fuzz_memfd(const char *name);

#endif
