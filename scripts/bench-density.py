#!/usr/bin/env python3
"""Density benchmark: how many small guests (80 MiB by default) this machine holds, booted to the default guest's
shell marker on the software CPU, and what each VMM costs beyond its guest's memory.

The guests run the default guest's kernel (Debian's cloud kernel) with, by default, a copy of its
initramfs without the kernel modules (busybox and /init only, made here from the default one):
that kernel boots in 72 MiB with it, but runs out of memory now and then (in its crypto
self-tests) when several boot at once, so the default is 80 MiB, which the default initramfs
also needs (docs/benchmarks.md says why 64 MiB cannot work). `--initramfs default` uses the
default initramfs unchanged.

Guests are started in waves of WAVE; a wave counts when every guest in it prints
HOSTVISOR-GUEST-READY within the timeout. Waves stop at the cap, when a wave fails, or when the
host's MemAvailable falls below the reserve. For every running VMM the script reads
/proc/PID/smaps_rollup and /proc/PID/smaps: RSS, the guest RAM mapping's resident part (the
pages the guest touched), and the rest, the VMM's own overhead (anonymous, and file-backed:
the binary's and libraries' pages, shared between VMMs). Also measures the start rate: VMMs of
a tiny Multiboot guest started at once, exec to their first serial byte, per core per second.

Usage: scripts/bench-density.py [--cap N] [--wave N] [--memory 72M] [--initramfs minimal|default] [--timeout S]
                               [--reserve MIB] [--deadline S]
"""
import argparse
import gzip
import os
import subprocess
import sys
import tempfile
import time

from benchsupport import assemble_multiboot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, ".build/release/hostvisor")
GUEST = os.path.join(ROOT, ".cache/guest")
MARKER = b"HOSTVISOR-GUEST-READY"

TINY_GUEST = """
        movw $0x3F8, %dx
        movb $0x21, %al
        outb %al, %dx
idle:   hlt
        jmp idle
"""


def without_modules(source, destination):
    """Copies a gzipped newc cpio archive, leaving out everything under lib/modules."""
    data = gzip.open(source).read()
    out = bytearray()
    offset = 0
    while offset + 110 <= len(data):
        header = data[offset:offset + 110]
        if header[:6] not in (b"070701", b"070702"):
            sys.exit(f"bench-density: {source} is not a newc cpio archive")
        name_size = int(header[94:102], 16)
        file_size = int(header[54:62], 16)
        name_end = offset + 110 + name_size
        data_start = (name_end + 3) & ~3
        next_entry = (data_start + file_size + 3) & ~3
        name = data[offset + 110:name_end - 1].decode()
        if not (name == "lib/modules" or name.startswith("lib/modules/")):
            out += data[offset:next_entry]
        offset = next_entry
        if name == "TRAILER!!!":
            break
    with gzip.open(destination, "wb", compresslevel=9) as f:
        f.write(out)
    return destination


def cpu_busy(seconds):
    """The host's CPU use in percent (all cores) over the next `seconds`, from /proc/stat."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 100.0 * (1 - (idle1 - idle0) / max(1, total1 - total0))


def mem_available_mib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def memory_of(pid, guest_bytes):
    """(rss, guest resident, own anonymous, own file-backed) in KiB for one VMM."""
    rss = guest = anonymous = 0
    with open(f"/proc/{pid}/smaps") as f:
        size = 0
        for line in f:
            fields = line.split()
            if not fields[0].endswith(":"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                size = end - start
                continue
            if fields[0] == "Rss:":
                rss += int(fields[1])
                if size >= guest_bytes:
                    guest += int(fields[1])
            elif fields[0] == "Anonymous:" and size < guest_bytes:
                anonymous += int(fields[1])
    return rss, guest, anonymous, rss - guest - anonymous


class Guest:
    def __init__(self, index, memory, initramfs, scratch, binary):
        self.log = os.path.join(scratch, f"guest-{index}.log")
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [binary, "run", "--accel", "soft", "--no-sandbox", "--memory", memory,
                 "--kernel", os.path.join(GUEST, "vmlinuz"),
                 "--initrd", initramfs,
                 "--cmdline", "console=ttyS0 panic=-1 quiet"],
                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)

    def ready(self):
        with open(self.log, "rb") as f:
            return MARKER in f.read()

    def stop(self):
        self.process.kill()
        self.process.wait()


def density(args, scratch):
    guest_bytes = int(args.memory[:-1]) << 20
    initramfs = os.path.join(GUEST, "initramfs.cpio.gz")
    if args.initramfs == "minimal":
        initramfs = without_modules(initramfs, os.path.join(scratch, "initramfs-minimal.cpio.gz"))
    guests = []
    held = 0
    waves = []
    run_start = time.monotonic()
    try:
        while len(guests) < args.cap:
            if args.deadline and time.monotonic() - run_start > args.deadline:
                print(f"stop: no new wave after {args.deadline:.0f} s (--deadline)", flush=True)
                break
            if mem_available_mib() < args.reserve:
                print(f"stop: MemAvailable below {args.reserve} MiB", flush=True)
                break
            wave = [Guest(len(guests) + i, args.memory, initramfs, scratch, args.hostvisor)
                    for i in range(min(args.wave, args.cap - len(guests)))]
            guests += wave
            start = time.monotonic()
            while time.monotonic() - start < args.timeout and not all(g.ready() for g in wave):
                if any(g.process.poll() is not None for g in wave):
                    break
                time.sleep(0.5)
            elapsed = time.monotonic() - start
            if not all(g.ready() for g in wave):
                ready = sum(g.ready() for g in wave)
                exited = [g for g in wave if g.process.poll() is not None]
                print(f"stop: {len(wave) - ready} guests of the wave from {held + 1} to {len(guests)} did not reach "
                      f"the marker in {args.timeout} s ({len(exited)} exited)", flush=True)
                for g in exited[:2]:
                    with open(g.log, "rb") as f:
                        tail = f.read()[-600:].decode(errors="replace")
                    print(f"  exited with status {g.process.returncode}; console tail:\n{tail}", flush=True)
                break
            held = len(guests)
            waves.append((held, elapsed))
            print(f"{held} guests at their shell (this wave of {len(wave)}: {elapsed:.1f} s); "
                  f"MemAvailable {mem_available_mib()} MiB; load average {os.getloadavg()[0]:.1f}", flush=True)
        time.sleep(2)
        print(f"host with {held} guests idle at their shell: load average {os.getloadavg()[0]:.1f} (1 min), "
              f"CPU busy {cpu_busy(10):.0f} % over 10 s", flush=True)
        figures = [memory_of(g.process.pid, guest_bytes) for g in guests[:held] if g.process.poll() is None]
    finally:
        for g in guests:
            g.stop()
    return held, waves, figures


def start_rate(count, scratch, binary):
    kernel = assemble_multiboot(TINY_GUEST, scratch, name="tiny")
    processes = []
    start = time.monotonic()
    for _ in range(count):
        processes.append(subprocess.Popen(
            [binary, "run", "--accel", "soft", "--no-sandbox", "--memory", "64M", "--kernel", kernel,
             "--serial", "stdio"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
    for p in processes:
        p.stdout.read(1)
    elapsed = time.monotonic() - start
    for p in processes:
        p.kill()
        p.wait()
    return elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cap", type=int, default=64)
    parser.add_argument("--wave", type=int, default=8)
    parser.add_argument("--memory", default="80M")
    parser.add_argument("--initramfs", choices=["minimal", "default"], default="minimal")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--reserve", type=int, default=2048, help="MiB of MemAvailable to keep")
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument("--deadline", type=float, default=0, help="start no wave after this many seconds (0: none)")
    parser.add_argument("--hostvisor", default=BINARY, help="the hostvisor binary to run")
    args = parser.parse_args()
    if not os.access(args.hostvisor, os.X_OK):
        sys.exit(f"bench-density: no {args.hostvisor}; run `make build` first")
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="hostvisor-density-") as scratch:
        held, waves, figures = density(args, scratch)
        elapsed = start_rate(args.starts, scratch, args.hostvisor)
    print()
    print(f"host: {cores} cores, {mem_available_mib()} MiB available after the run")
    print(f"density: {held} guests of {args.memory} ({args.initramfs} initramfs) held at their shell on --accel soft "
          f"(cap {args.cap}, waves of {args.wave})")
    if figures:
        def median(values):
            ordered = sorted(values)
            return ordered[len(ordered) // 2]
        rss, guest, anonymous, shared = (median([f[i] for f in figures]) for i in range(4))
        print(f"per VMM (median of {len(figures)}): RSS {rss / 1024:.1f} MiB = guest RAM touched "
              f"{guest / 1024:.1f} MiB + own anonymous {anonymous / 1024:.1f} MiB + file-backed "
              f"{shared / 1024:.1f} MiB (shared between VMMs)")
    print(f"start rate: {args.starts} VMMs exec to first guest byte in {elapsed:.2f} s = "
          f"{args.starts / elapsed / cores:.1f} VMs/core/s (Firecracker's target: 5 VMs/core/s)")


if __name__ == "__main__":
    main()
