#!/usr/bin/env python3
"""VNC update cost: full-screen updates (Raw and ZRLE) and the no-change incremental answer.

Usage: scripts/bench-vnc.py HOST::PORT [HOST::PORT ...] [--rounds N]
Connect it to Hostvisor (--display vnc=...) and, side by side, QEMU (-vnc) booted to a text
console. For each server and encoding it requests N full (non-incremental) updates of the whole
screen and prints the median time per update and the bytes per update (the wire size, after
ZRLE's zlib), then the median time of an incremental request for an unchanged screen
(answered by the server once something changes: measured with a 1 s cap, so a server that
answers at once, with an empty update, shows ~0 ms).
"""
import socket, statistics, struct, sys, time, zlib


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


def main():
    rounds = 20
    args = sys.argv[1:]
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
