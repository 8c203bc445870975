#!/usr/bin/env python3
"""VNC update cost: full-screen updates (Raw and ZRLE) and the no-change incremental answer;
with --guest-cost, what an attached client costs a CPU-bound guest.

Usage: scripts/bench-vnc.py HOST::PORT [HOST::PORT ...] [--rounds N]
       scripts/bench-vnc.py --guest-cost [--rounds N] [--megabytes M] [--hostvisor PATH]
Connect it to Hostvisor (--display vnc=...) and, side by side, QEMU (-vnc) booted to a text
console. For each server and encoding it requests N full (non-incremental) updates of the whole
screen and prints the median time per update and the bytes per update (the wire size, after
ZRLE's zlib), then the median time of an incremental request for an unchanged screen
(answered by the server once something changes: measured with a 1 s cap, so a server that
answers at once, with an empty update, shows ~0 ms).

--guest-cost boots the default guest (.cache/guest) on `hostvisor run --accel soft --display
vnc=127.0.0.1:0` with its shell on the serial port, fills /tmp/data with M MiB (default 8) and
times `sha256sum /tmp/data` in the guest (its /proc/uptime before and after) N times (default 3)
in each of four conditions, interleaved: no client; a client that always has an incremental
ZRLE request waiting (a viewer of a still screen); a client asking for full-screen Raw updates
back to back; the same with ZRLE. It prints the median guest time, the host wall time and the
VMM process's CPU time (user+sys, all threads) per run, and the updates the client received.
"""
import os, select, socket, statistics, struct, subprocess, sys, threading, time, zlib


def connect(address):
    host, port = address.split('::')
    s = socket.create_connection((host or '127.0.0.1', int(port)))
    s.settimeout(30)

    def recv(n):
        b = b''
        while len(b) < n:
            c = s.recv(n - len(b))
            if not c:
                raise SystemExit('connection closed')
            b += c
        return b

    version = recv(12)
    s.sendall(b'RFB 003.008\n')
    if version >= b'RFB 003.007':
        types = recv(recv(1)[0])
        assert 1 in types, 'needs security type None'
        s.sendall(b'\x01')
        assert struct.unpack('>I', recv(4))[0] == 0
    else:
        assert struct.unpack('>I', recv(4))[0] == 1
    s.sendall(b'\x01')
    w, h = struct.unpack('>HH', recv(4))
    recv(16)
    recv(struct.unpack('>I', recv(4))[0])
    s.sendall(struct.pack('>B3xBBBBHHHBBB3x', 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0))
    return s, recv, w, h


def read_update(recv, inflater):
    total = 4
    assert recv(1)[0] == 0
    recv(1)
    for _ in range(struct.unpack('>H', recv(2))[0]):
        x, y, rw, rh, e = struct.unpack('>HHHHi', recv(12))
        total += 12
        if e == 0:
            recv(rw * rh * 4)
            total += rw * rh * 4
        elif e == 16:
            n = struct.unpack('>I', recv(4))[0]
            inflater.decompress(recv(n))
            total += 4 + n
        elif e == -223:
            pass
        else:
            raise SystemExit('unexpected encoding %d' % e)
    return total


def measure(address, encoding, rounds):
    s, recv, w, h = connect(address)
    s.sendall(struct.pack('>BxHi', 2, 1, encoding))
    inflater = zlib.decompressobj()
    times, sizes = [], []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        s.sendall(struct.pack('>BBHHHH', 3, 0, 0, 0, w, h))
        sizes.append(read_update(recv, inflater))
        times.append(time.perf_counter() - start)
    idle = []
    s.settimeout(1)
    for _ in range(3):
        start = time.perf_counter()
        s.sendall(struct.pack('>BBHHHH', 3, 1, 0, 0, w, h))
        try:
            read_update(recv, inflater)
        except socket.timeout:
            idle.append(1.0)
            break
        idle.append(time.perf_counter() - start)
    s.close()
    return w, h, statistics.median(times[1:]), statistics.median(sizes[1:]), statistics.median(idle)


class Client(threading.Thread):
    """A VNC client that loads the server until stopped: mode 'incremental' keeps one
    incremental ZRLE request waiting; 'raw' and 'zrle' ask for full-screen updates back to back."""

    def __init__(self, address, mode):
        super().__init__(daemon=True)
        self.address, self.mode = address, mode
        self.stopping = threading.Event()
        self.updates = 0
        self.connected = threading.Event()

    def run(self):
        s, recv, w, h = connect(self.address)
        s.sendall(struct.pack('>BxHi', 2, 1, 0 if self.mode == 'raw' else 16))
        inflater = zlib.decompressobj()
        incremental = 1 if self.mode == 'incremental' else 0
        self.connected.set()
        pending = False
        while not self.stopping.is_set():
            if not pending:
                s.sendall(struct.pack('>BBHHHH', 3, incremental, 0, 0, w, h))
                pending = True
            if not select.select([s], [], [], 1)[0]:
                continue
            read_update(recv, inflater)
            pending = False
            self.updates += 1
        s.close()


def process_cpu_seconds(pid):
    fields = open('/proc/%d/stat' % pid).read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def guest_cost(rounds, megabytes, hostvisor):
    guest = '.cache/guest'
    vmm = subprocess.Popen(
        [hostvisor, 'run', '--no-sandbox', '--accel', 'soft', '--memory', '256M', '--kernel', guest + '/vmlinuz', '--initrd',
         guest + '/initramfs.cpio.gz', '--cmdline', 'console=tty0 console=ttyS0 panic=-1', '--display',
         'vnc=127.0.0.1:0', '--serial', 'stdio'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = bytearray()

    def reader():
        while True:
            chunk = vmm.stdout.read1(65536)
            if not chunk:
                break
            output.extend(chunk)

    threading.Thread(target=reader, daemon=True).start()

    def wait_for(marker, start=0, timeout=600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            at = output.find(marker, start)
            if at >= 0:
                return at
            if vmm.poll() is not None:
                break
            time.sleep(0.05)
        vmm.kill()
        raise SystemExit('timed out waiting for %r; console tail:\n%s' % (marker, output[-2000:].decode(errors='replace')))

    def run(command, marker):
        start = len(output)
        vmm.stdin.write(command.encode() + b'\n')
        vmm.stdin.flush()
        at = wait_for(marker.encode(), start)
        return output[at:output.find(b'\n', at)].decode()

    try:
        at = wait_for(b'VNC server listening on ')
        end = wait_for(b'\n', at)
        address = '127.0.0.1::' + output[at:end].decode().strip().rsplit(':', 1)[1]
        wait_for(b'HOSTVISOR-GUEST-READY')
        time.sleep(3)
        run('dd if=/dev/urandom of=/tmp/data bs=1M count=%d 2>/dev/null; echo SETUP""DONE' % megabytes, 'SETUPDONE')
        modes = ['none', 'incremental', 'raw', 'zrle']
        results = {mode: [] for mode in modes}
        for _ in range(rounds):
            for mode in modes:
                client = None
                if mode != 'none':
                    client = Client(address, mode)
                    client.start()
                    client.connected.wait(30)
                    time.sleep(0.5)
                cpu, wall = process_cpu_seconds(vmm.pid), time.perf_counter()
                line = run('a=$(cut -d" " -f1 /proc/uptime); sha256sum /tmp/data >/dev/null; '
                           'b=$(cut -d" " -f1 /proc/uptime); echo RESULT""S $a $b', 'RESULTS')
                wall, cpu = time.perf_counter() - wall, process_cpu_seconds(vmm.pid) - cpu
                updates = 0
                if client:
                    client.stopping.set()
                    client.join(10)
                    updates = client.updates
                begin, finish = (float(x) for x in line.split()[1:3])
                results[mode].append((finish - begin, wall, cpu, updates / wall))
        print('guest: sha256sum of %d MiB on --accel soft; median of %d runs' % (megabytes, rounds))
        print('%-12s %10s %10s %12s %12s' % ('client', 'guest s', 'wall s', 'VMM CPU s', 'updates/s'))
        for mode in modes:
            column = list(zip(*results[mode]))
            print('%-12s %10.2f %10.2f %12.2f %12.1f' % ((mode,) + tuple(statistics.median(c) for c in column)))
    finally:
        vmm.kill()
        vmm.wait()


def main():
    rounds = 20
    args = sys.argv[1:]
    if '--guest-cost' in args:
        args.remove('--guest-cost')
        options = {'--rounds': '3', '--megabytes': '8', '--hostvisor': '.build/release/hostvisor'}
        while args:
            if args[0] not in options or len(args) < 2:
                raise SystemExit('usage: scripts/bench-vnc.py --guest-cost [--rounds N] [--megabytes M] [--hostvisor PATH]')
            options[args[0]] = args[1]
            del args[:2]
        guest_cost(int(options['--rounds']), int(options['--megabytes']), options['--hostvisor'])
        return
    if '--rounds' in args:
        i = args.index('--rounds')
        rounds = int(args[i + 1])
        del args[i:i + 2]
    print('%-22s %-5s %9s %12s %11s %10s' % ('server', 'enc', 'size', 'ms/update', 'bytes', 'MB/s'))
    for address in args:
        for name, encoding in (('Raw', 0), ('ZRLE', 16)):
            w, h, seconds, size, idle = measure(address, encoding, rounds)
            print('%-22s %-5s %4dx%-4d %12.2f %11d %10.1f   idle incremental: %s' % (
                address, name, w, h, seconds * 1000, size, w * h * 4 / seconds / 1e6,
                'no answer within 1 s' if idle >= 1.0 else '%.1f ms' % (idle * 1000)))


main()
