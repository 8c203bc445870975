#!/usr/bin/env python3
"""Machine-state benchmark: snapshot-create time and restore-to-running time for 512 MiB and
4 GiB guests, and live-migration total time and downtime for an idle and a busy guest, between
two hostvisor processes on this machine over a Unix socket.

The guest (Multiboot, assembled here) fills the first FILL_MIB of RAM with a non-zero pattern,
then either halts with interrupts enabled and nothing pending (idle) or loops writing one word
into each page of a 64 MiB window, printing a '.' every 65536 pages written (busy).
Snapshot create = the Cloud Hypervisor `vm.snapshot` request on the paused busy guest; restore
to running = from exec of `hostvisor run --restore` to the guest's next byte on the serial
console. Migration total = the `vm.send-migration` request; downtime = as the source measured
it (pause to the destination's confirmation), from its log.

Usage: scripts/bench-state.py [--accel soft|kvm] [--sizes 512,4096] [--fill-mib 256] [BINARY]"""
import argparse
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from benchsupport import UnixHTTPConnection, assemble_multiboot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GUEST = """
        movb $0xFF, %al
        outb %al, $0x21
        outb %al, $0xA1
        movl $0x1000000, %edi
        movl $(FILL_MIB << 18), %ecx
        movl $0x5A5A5A5A, %eax
        cld
        rep stosl
        movw $0x3F8, %dx
        movb $'R', %al
        outb %al, %dx
.if BUSY
        xorl %esi, %esi
busy:   incl %esi
        movl %esi, %ebx
        andl $0x3FFF, %ebx
        shll $12, %ebx
        movl %esi, 0x1000000(%ebx)
        testl $0xFFFF, %esi
        jnz busy
        movb $'.', %al
        outb %al, %dx
        jmp busy
.else
        sti
idle:   hlt
        jmp idle
.endif
"""


def request(sock, endpoint, body=None):
    connection = UnixHTTPConnection(sock, timeout=600)
    connection.request("PUT", "/api/v1/" + endpoint, body=json.dumps(body) if body is not None else None,
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    if response.status >= 300:
        raise RuntimeError(f"{endpoint}: HTTP {response.status}: {data!r}")


def assemble(work, busy, fill_mib):
    return assemble_multiboot(GUEST, work, name=f"guest-{busy}",
                              definitions=f".set BUSY, {int(busy)}\n.set FILL_MIB, {fill_mib}\n")


def wait_for(path, timeout=60):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.005)


def wait_for_output(path, text, timeout=600):
    deadline = time.time() + timeout
    while True:
        with open(path, "rb") as file:
            if text in file.read():
                return
        if time.time() > deadline:
            raise RuntimeError(f"the guest did not print {text!r}")
        time.sleep(0.01)


class Serve:
    """A `hostvisor serve` process booting `kernel`, its serial output in a file."""

    def __init__(self, binary, work, name, accel, kernel=None, memory_mib=512, incoming=None):
        self.sock = os.path.join(work, name + ".sock")
        self.out = os.path.join(work, name + ".out")
        self.err = os.path.join(work, name + ".err")
        arguments = [binary, "serve", "--api-sock", self.sock, "--accel", accel, "--level", "Info"]
        if kernel:
            config = os.path.join(work, name + ".json")
            with open(config, "w") as file:
                json.dump({"boot-source": {"kernel_image_path": kernel, "boot_args": "bench"},
                           "machine-config": {"vcpu_count": 1, "mem_size_mib": memory_mib}}, file)
            arguments += ["--config-file", config]
        if incoming:
            arguments += ["--incoming", "unix:" + incoming]
        self.process = subprocess.Popen(arguments, stdin=subprocess.DEVNULL, stdout=open(self.out, "wb"),
                                        stderr=open(self.err, "wb"))
        wait_for(self.sock)

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def snapshot_and_restore(binary, work, accel, kernel, memory_mib):
    source = Serve(binary, work, f"snap-{memory_mib}", accel, kernel, memory_mib)
    try:
        wait_for_output(source.out, b"R")
        request(source.sock, "vm.pause")
        directory = os.path.join(work, f"snapshot-{memory_mib}")
        os.makedirs(directory, exist_ok=True)
        start = time.perf_counter()
        request(source.sock, "vm.snapshot", {"destination_url": "file://" + directory})
        create = time.perf_counter() - start
    finally:
        source.stop()
    allocated = os.stat(os.path.join(directory, "memory")).st_blocks * 512
    start = time.perf_counter()
    restored = subprocess.Popen([binary, "run", "--no-sandbox", "--restore", os.path.join(directory, "state")],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        ready, _, _ = select.select([restored.stdout], [], [], 120)
        if not ready or not os.read(restored.stdout.fileno(), 1):
            raise RuntimeError("the restored guest printed nothing")
        restore = time.perf_counter() - start
    finally:
        restored.kill()
        restored.wait()
    shutil.rmtree(directory)
    return create, restore, allocated


def migrate(binary, work, accel, kernel, memory_mib, name):
    source = Serve(binary, work, f"{name}-source", accel, kernel, memory_mib)
    incoming = os.path.join(work, f"{name}.migrate")
    destination = None
    try:
        wait_for_output(source.out, b"R")
        time.sleep(0.5)
        destination = Serve(binary, work, f"{name}-destination", accel, incoming=incoming)
        wait_for(incoming)
        start = time.perf_counter()
        request(source.sock, "vm.send-migration", {"destination_url": "unix:" + incoming})
        total = time.perf_counter() - start
        source.process.wait(timeout=30)
        with open(source.err) as file:
            log = file.read()
        match = re.search(r"migrated to .*?: (\d+) rounds, (\d+) pages \((\d+) MiB\), total (\d+) ms, downtime (\d+) ms",
                          log)
        if not match:
            raise RuntimeError("the source logged no migration statistics: " + log)
        rounds, pages, mib, _, downtime = (int(value) for value in match.groups())
        return total, downtime / 1000, rounds, mib
    finally:
        source.stop()
        if destination:
            destination.stop()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--accel", default="soft")
    parser.add_argument("--sizes", default="512,4096")
    parser.add_argument("--fill-mib", type=int, default=256)
    parser.add_argument("binary", nargs="?", default=os.path.join(ROOT, ".build/release/hostvisor"))
    options = parser.parse_args()
    work = tempfile.mkdtemp(prefix="hostvisor-bench-state-")
    try:
        busy = assemble(work, True, options.fill_mib)
        idle = assemble(work, False, options.fill_mib)
        print(f"accelerator {options.accel}, {options.fill_mib} MiB of RAM written by the guest")
        print(f"{'RAM':>8} {'snapshot create':>16} {'memory file':>12} {'restore to running':>19}")
        for size in (int(value) for value in options.sizes.split(",")):
            create, restore, allocated = snapshot_and_restore(options.binary, work, options.accel, busy, size)
            print(f"{size:>5} MiB {create * 1000:>13.0f} ms {allocated >> 20:>8} MiB {restore * 1000:>16.0f} ms")
        print(f"{'guest':>8} {'RAM':>8} {'total':>9} {'downtime':>9} {'rounds':>7} {'sent':>9}")
        for size in (int(value) for value in options.sizes.split(",")):
            for name, kernel in (("idle", idle), ("busy", busy)):
                total, downtime, rounds, mib = migrate(options.binary, work, options.accel, kernel, size,
                                                       f"{name}-{size}")
                print(f"{name:>8} {size:>4} MiB {total * 1000:>6.0f} ms {downtime * 1000:>6.0f} ms {rounds:>7} "
                      f"{mib:>5} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
