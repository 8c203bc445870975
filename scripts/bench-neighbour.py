#!/usr/bin/env python3
"""Neighbour benchmark: how much of its cgroup share a VM keeps beside a hostile one.

A neighbour guest (Tests/GuestPrograms/cli/busy-loop.S: a countdown loop that prints "tick" after
every 2^16 iterations) runs on the software CPU in its own cgroup (`--cgroup`, `--cpu-weight`),
first alone and then beside a hostile guest in a cgroup of its own:

- serial-flood.S: writes to the UART's transmit register forever (its output goes to /dev/null);
- interrupt-storm.S: the PIT at about 600 kHz, the local APIC timer with a count of 1 and
  self-IPIs, all at once;
- busy-loop.S again: a plain CPU hog, the control.

Each pair runs twice: with both VMMs pinned to host CPU 0 (`taskset`), where the neighbour's
expected share of the core is its weight over the sum of both weights, and free on every CPU
of the host. For each run the script prints the neighbour's ticks per wall second against its
run alone ("kept"), that over its expected share ("of share": 1.00 means the hostile guest
took nothing beyond its cgroup share), the neighbour's ticks per CPU second of its VMM
against alone (what the hostile guest costs it in cache and memory bandwidth), and the
hostile VMM's CPU use. Rounds alternate alone and paired runs so slow drifts of a shared host
hit both; the figures are medians over the rounds.

Usage: scripts/bench-neighbour.py [--seconds S] [--rounds N] [--weights N:H] [--hostvisor PATH]
                                  [--hostile serial-flood,interrupt-storm,busy-loop]
Needs root (cgroups).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, ".build/release/hostvisor")
GUESTS = os.path.join(ROOT, "Tests/GuestPrograms")
HOSTILE = ["serial-flood", "interrupt-storm", "busy-loop"]


def assemble(name, directory):
    """Assembles Tests/GuestPrograms/cli/NAME.S into a Multiboot ELF kernel in `directory`."""
    source = os.path.join(GUESTS, "cli", name + ".S")
    obj = os.path.join(directory, name + ".o")
    kernel = os.path.join(directory, name + ".elf")
    include = os.path.join(GUESTS, "include")
    subprocess.run(["as", "--32", "-I", include, "-o", obj, source], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x100000", "-o", kernel, obj], check=True)
    return kernel


def cpu_seconds(pid):
    """User plus system CPU seconds of process `pid` and its threads."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class VMM:
    """A `hostvisor run --accel soft` of `kernel` in cgroup `group` with `weight`, its serial
    output in `output` (pinned to CPU 0 when `pinned`)."""

    def __init__(self, hostvisor, kernel, group, weight, output, pinned):
        command = [
            hostvisor, "run", "--accel", "soft", "--no-sandbox", "--memory", "32M", "--kernel", kernel,
            "--serial", "file:" + output, "--cgroup", group, "--cpu-weight", str(weight),
        ]
        if pinned:
            command = ["taskset", "-c", "0"] + command
        self.output = output
        # The VMM's own messages go to a file, never to a pipe nobody reads while it runs.
        self.errors = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=self.errors)

    def error_text(self):
        self.errors.seek(0)
        return self.errors.read().decode(errors="replace")

    def wait_for(self, text, seconds=30):
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"bench-neighbour: the VMM ended early: {self.error_text()}")
            try:
                with open(self.output, "rb") as handle:
                    if text in handle.read():
                        return
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        sys.exit(f"bench-neighbour: no '{text.decode()}' within {seconds} s")

    def ticks(self):
        with open(self.output, "rb") as handle:
            return handle.read().count(b"tick\n")

    def stop(self):
        self.process.kill()
        self.process.wait()
        self.errors.close()


def remove_group(name):
    """Removes cgroup `name` and its children from every hierarchy that has it."""
    for hierarchy in ["/sys/fs/cgroup"] + [
        os.path.join("/sys/fs/cgroup", entry) for entry in os.listdir("/sys/fs/cgroup")
    ]:
        path = os.path.join(hierarchy, name)
        if not os.path.isdir(path):
            continue
        for child in ("vcpu", "io"):
            if os.path.isdir(os.path.join(path, child)):
                try:
                    os.rmdir(os.path.join(path, child))
                except OSError:
                    pass
        try:
            os.rmdir(path)
        except OSError:
            pass


def measure(args, kernels, scratch, hostile, pinned, round_index):
    """One run of the neighbour (beside `hostile`, or alone when None): its ticks per wall
    second, its ticks per CPU second, and the hostile VMM's CPU seconds per wall second."""
    weight_n, weight_h = args.weights
    suffix = f"{hostile or 'alone'}-{'pinned' if pinned else 'free'}-{round_index}"
    others = []
    try:
        if hostile:
            other = VMM(args.hostvisor, kernels[hostile], "hvnb-hostile", weight_h,
                        os.path.join(scratch, "hostile-" + suffix) if hostile != "serial-flood" else "/dev/null",
                        pinned)
            others.append(other)
            time.sleep(1.0)
            if other.process.poll() is not None:
                sys.exit(f"bench-neighbour: the {hostile} VMM ended early: {other.error_text()}")
        neighbour = VMM(args.hostvisor, kernels["busy-loop"], "hvnb-neighbour", weight_n,
                        os.path.join(scratch, "neighbour-" + suffix), pinned)
        others.append(neighbour)
        neighbour.wait_for(b"busy loop running")
        time.sleep(1.0)
        start_ticks, start_time = neighbour.ticks(), time.time()
        start_cpu = cpu_seconds(neighbour.process.pid)
        hostile_cpu = cpu_seconds(others[0].process.pid) if hostile else 0
        time.sleep(args.seconds)
        ticks, elapsed = neighbour.ticks() - start_ticks, time.time() - start_time
        used = cpu_seconds(neighbour.process.pid) - start_cpu
        hostile_share = (cpu_seconds(others[0].process.pid) - hostile_cpu) / elapsed if hostile else 0
        return ticks / elapsed, ticks / used if used > 0 else 0, hostile_share
    finally:
        for vmm in others:
            vmm.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--weights", default="100:100", help="the neighbour's and the hostile VM's cpu.weight")
    parser.add_argument("--hostile", default=",".join(HOSTILE))
    parser.add_argument("--hostvisor", default=BINARY)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench-neighbour: needs root (cgroups)")
    try:
        args.weights = tuple(int(part) for part in args.weights.split(":"))
        assert len(args.weights) == 2 and all(1 <= weight <= 10000 for weight in args.weights)
    except (ValueError, AssertionError):
        sys.exit("bench-neighbour: --weights takes N:H, two weights from 1 to 10000")
    hostiles = [name for name in args.hostile.split(",") if name]
    for name in hostiles:
        if name not in HOSTILE:
            sys.exit(f"bench-neighbour: unknown hostile guest '{name}' (one of {', '.join(HOSTILE)})")
    if not os.access(args.hostvisor, os.X_OK):
        sys.exit(f"bench-neighbour: no hostvisor binary at {args.hostvisor} (swift build -c release)")
    weight_n, weight_h = args.weights
    expected_pinned = weight_n / (weight_n + weight_h)
    with tempfile.TemporaryDirectory(prefix="hv-neighbour.") as scratch:
        kernels = {name: assemble(name, scratch) for name in set(HOSTILE)}
        results = {}
        try:
            for round_index in range(args.rounds):
                for pinned in (True, False):
                    alone = measure(args, kernels, scratch, None, pinned, round_index)
                    results.setdefault((None, pinned), []).append(alone)
                    for hostile in hostiles:
                        pair = measure(args, kernels, scratch, hostile, pinned, round_index)
                        results.setdefault((hostile, pinned), []).append((pair, alone))
                print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            remove_group("hvnb-neighbour")
            remove_group("hvnb-hostile")
    print(f"neighbour: busy-loop.S on the software CPU, cpu.weight {weight_n}; hostile VM cpu.weight {weight_h};"
          f" {args.seconds:g} s per run, median of {args.rounds} rounds")
    print(f"{'hostile guest':<16} {'cores':<7} {'ticks/s':>9} {'kept':>6} {'of share':>9} {'ticks/CPU s':>12}"
          f" {'vs alone':>9} {'hostile CPU':>12}")
    for pinned in (True, False):
        cores = "CPU 0" if pinned else "all"
        alone = results[(None, pinned)]
        rate = statistics.median(run[0] for run in alone)
        per_cpu = statistics.median(run[1] for run in alone)
        print(f"{'(alone)':<16} {cores:<7} {rate:9.0f} {'1.00':>6} {'':>9} {per_cpu:12.0f} {'1.00':>9} {'':>12}")
        for hostile in hostiles:
            runs = results[(hostile, pinned)]
            kept = statistics.median(pair[0] / alone[0] for pair, alone in runs)
            efficiency = statistics.median(pair[1] / alone[1] for pair, alone in runs)
            hostile_cpu = statistics.median(pair[2] for pair, _ in runs)
            share = kept / expected_pinned if pinned else kept
            print(f"{hostile:<16} {cores:<7} {statistics.median(pair[0] for pair, _ in runs):9.0f} {kept:6.2f}"
                  f" {share:9.2f} {statistics.median(pair[1] for pair, _ in runs):12.0f} {efficiency:9.2f}"
                  f" {hostile_cpu:10.2f} s/s")
    print(f"kept = ticks/s beside the hostile VM / alone; of share = kept / the neighbour's share of CPU 0"
          f" ({expected_pinned:.2f}; on all cores its share is a whole core, 1.00)")


if __name__ == "__main__":
    main()
