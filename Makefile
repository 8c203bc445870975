# Hostvisor: common entry points. See README.md.
SWIFT ?= swift
CACHE ?= .cache
GUEST = $(CACHE)/guest

.PHONY: all build dist deps guest guest-generic guest-686 run test fuzz-smoke lint format bench clean

all: build

deps:
	scripts/install-deps.sh

build: deps
	$(SWIFT) build -c release --product hostvisor

## A release binary with the Swift standard library, Foundation and the packages linked in:
## it needs only glibc, libstdc++ and libgcc_s, so it runs where no Swift toolchain is installed.
## The result is .build-static/hostvisor (stripped).
dist: deps
	$(SWIFT) build -c release --static-swift-stdlib --product hostvisor --scratch-path .build-static
	strip -o .build-static/hostvisor .build-static/release/hostvisor
	scripts/check-dist.sh .build-static/hostvisor

guest: deps
	scripts/make-default-guest.sh $(GUEST)

## The generic Debian kernel with the same initramfs, for the second boot test.
guest-generic: deps
	scripts/make-default-guest.sh --generic $(CACHE)/guest-generic

## The 32-bit guest: Debian's 686 kernel with an i386 busybox initramfs.
guest-686: deps
	scripts/make-default-guest.sh --i386 $(CACHE)/guest-686

## Boot the default guest (Debian cloud kernel + busybox initramfs) to a shell on this terminal.
run: build guest
	.build/release/hostvisor run --kernel $(GUEST)/vmlinuz --initrd $(GUEST)/initramfs.cpio.gz \
	  --cmdline "console=ttyS0 panic=-1" --memory 512M

## Build optimized (the interpreter is too slow in debug) and run every test, under a watchdog
## that names the unfinished tests and prints the runner's stacks if the run hangs. The suites
## on user-mode networking run in a second pass of their own: Debian 12's passt stalls bulk
## transfers when the guest's CPU is starved for seconds, as it is beside the rest of the suite
## on two cores (docs/user-networking.md).
USERNET_SUITES = LinuxBootTests\.(UserNetworkTests|EmulatedNICUserNetworkTests)
test: deps guest guest-generic guest-686
	SWIFT=$(SWIFT) scripts/run-tests.sh --skip '$(USERNET_SUITES)'
	SWIFT=$(SWIFT) scripts/run-tests.sh --filter '$(USERNET_SUITES)'
	scripts/api-conformance.sh

## Every libFuzzer target (docs/fuzzing.md) built with the address sanitizer and run for a
## fixed number of inputs from a fixed seed (at most 30 s each): the fuzzing pass CI runs.
## A crash, leak or sanitizer report fails it and leaves the input in .build-fuzz/crashes.
FUZZ_SMOKE_RUNS ?= 10000
fuzz-smoke:
	scripts/fuzz.sh all 30 -seed=1 -runs=$(FUZZ_SMOKE_RUNS)

lint:
	$(SWIFT) format lint --strict --recursive Sources Tests Package.swift

format:
	$(SWIFT) format --in-place --recursive Sources Tests Package.swift

bench: build guest
	scripts/bench.sh

clean:
	rm -rf .build .build-static $(CACHE)
