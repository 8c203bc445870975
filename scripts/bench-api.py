#!/usr/bin/env python3
"""Control-plane benchmark: API latency (p50/p99 of GET / and of PATCH /vm pause+resume pairs),
exec to API socket and exec to first serial byte (wall and CPU time), and the VMM's resident
memory. Uses a tiny Multiboot guest assembled here that prints one byte and halts with
interrupts masked. Usage: scripts/bench-api.py [HOSTVISOR_BINARY]"""
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time

from benchsupport import UnixHTTPConnection, assemble_multiboot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, ".build/release/hostvisor")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

GUEST = """
        movb $0xFF, %al
        outb %al, $0x21
        outb %al, $0xA1
        movw $0x3F8, %dx
        movb $0x21, %al
        outb %al, %dx
        sti
idle:   hlt
        jmp idle
"""


def request(connection, method, path, body=None):
    headers = {"Content-Type": "application/json"} if body else {}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    if response.status >= 300:
        raise SystemExit(f"{method} {path}: {response.status} {data!r}")
    return data


def cpu_ms(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000.0 / CLOCK_TICKS


def rss_kib(pid):
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                values[key] = int(value.split()[0])
    return values


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def wait_for_socket(path, process):
    while not os.path.exists(path):
        if process.poll() is not None:
            raise SystemExit("the server exited")
        time.sleep(0.0005)


def main():
    work = tempfile.mkdtemp(prefix="hv-bench-api-")
    kernel = assemble_multiboot(GUEST, work)
    sock = os.path.join(work, "api.sock")

    # Exec to API socket: wall and CPU time, 20 runs.
    walls, cpus = [], []
    for _ in range(20):
        if os.path.exists(sock):
            os.unlink(sock)
        start = time.perf_counter()
        server = subprocess.Popen([BINARY, "serve", "--api-sock", sock, "--accel", "soft"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_socket(sock, server)
        walls.append((time.perf_counter() - start) * 1000)
        cpus.append(cpu_ms(server.pid))
        server.terminate()
        server.wait()
    print(f"exec to API socket: wall median {statistics.median(walls):.1f} ms, CPU median {statistics.median(cpus):.1f} ms")

    # A served, booted machine: RSS and API latency.
    os.unlink(sock)
    server = subprocess.Popen([BINARY, "serve", "--api-sock", sock, "--accel", "soft"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    wait_for_socket(sock, server)
    time.sleep(0.2)
    idle_rss = rss_kib(server.pid)
    connection = UnixHTTPConnection(sock)
    request(connection, "PUT", "/boot-source", f'{{"kernel_image_path": "{kernel}", "boot_args": ""}}')
    request(connection, "PUT", "/machine-config", '{"vcpu_count": 1, "mem_size_mib": 128}')
    request(connection, "PUT", "/actions", '{"action_type": "InstanceStart"}')
    select.select([server.stdout], [], [], 10)
    time.sleep(0.5)
    booted_rss = rss_kib(server.pid)
    for _ in range(50):
        request(connection, "GET", "/")
    gets = []
    for _ in range(2000):
        start = time.perf_counter()
        request(connection, "GET", "/")
        gets.append((time.perf_counter() - start) * 1e6)
    pairs = []
    for _ in range(300):
        start = time.perf_counter()
        request(connection, "PATCH", "/vm", '{"state": "Paused"}')
        request(connection, "PATCH", "/vm", '{"state": "Resumed"}')
        pairs.append((time.perf_counter() - start) * 1e6)
    print(f"GET /: p50 {percentile(gets, 0.5):.0f} us, p99 {percentile(gets, 0.99):.0f} us (2000 requests, one keep-alive connection)")
    print(f"PATCH /vm Paused + Resumed pair: p50 {percentile(pairs, 0.5):.0f} us, p99 {percentile(pairs, 0.99):.0f} us (300 pairs)")
    print(f"RSS serving, not booted: {idle_rss}")
    print(f"RSS booted (128 MiB guest that touches a few pages): {booted_rss}")
    server.terminate()
    server.wait()

    # Exec to the first serial byte of `run`, per accelerator.
    for accel in ("soft", "kvm"):
        walls, cpus = [], []
        for _ in range(10):
            start = time.perf_counter()
            run = subprocess.Popen([BINARY, "run", "--no-sandbox", "--kernel", kernel, "--accel", accel, "--memory", "128M",
                                    "--serial", "stdio"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL)
            ready, _, _ = select.select([run.stdout], [], [], 10)
            if not ready or not os.read(run.stdout.fileno(), 1):
                run.kill()
                run.wait()
                walls = []
                break
            walls.append((time.perf_counter() - start) * 1000)
            cpus.append(cpu_ms(run.pid))
            if not rss_kib(run.pid):
                pass
            rss = rss_kib(run.pid)
            run.terminate()
            run.wait()
        if walls:
            print(f"exec to first serial byte ({accel}): wall median {statistics.median(walls):.1f} ms, "
                  f"CPU median {statistics.median(cpus):.1f} ms, RSS then {rss}")
        else:
            print(f"exec to first serial byte ({accel}): not available on this host")


if __name__ == "__main__":
    main()
