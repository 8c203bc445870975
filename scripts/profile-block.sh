#!/usr/bin/env bash
# The host code of one translated block with the perf samples of each host instruction:
# boots a guest on the software CPU under `perf record` with HOSTVISOR_PERF_MAP set, stops the
# VMM at a chosen moment, reads the block's code out of the running process (/proc/PID/mem at
# the address the perf map names), disassembles it and prints each host instruction with the
# samples that fell on it (summed over every translation of the block in the run, which share
# their layout when the guest code is the same).
#
#   scripts/profile-block.sh [--guest DIR] [--at marker|SECONDS] [--hostvisor PATH] RIP
#
# RIP is the guest address of the block's first instruction in hex, as the perf map names it
# (`guest_<RIP>`; `perf report` on a run with HOSTVISOR_PERF_MAP=1 shows the hot ones). The
# guest boots with `nokaslr`. --at says when to read the code: when the guest prints its shell
# marker (default), or that many seconds after start (for code that runs early, like the
# bzImage decompressor, whose translations are gone by the time the shell comes up). A block
# whose every translation was dropped by then (a flush) cannot be read: pick another moment.
set -euo pipefail
cd "$(dirname "$0")/.."
guest=.cache/guest
at=marker
hostvisor=.build/release/hostvisor
while [ $# -gt 1 ]; do
  case "$1" in
    --guest) guest="$2"; shift 2 ;;
    --at) at="$2"; shift 2 ;;
    --hostvisor) hostvisor="$2"; shift 2 ;;
    *) echo "usage: $0 [--guest DIR] [--at marker|SECONDS] [--hostvisor PATH] RIP" >&2; exit 2 ;;
  esac
done
[ $# -eq 1 ] || { echo "usage: $0 [--guest DIR] [--at marker|SECONDS] [--hostvisor PATH] RIP" >&2; exit 2; }
rip=${1#0x}
command -v perf >/dev/null || { echo "profile-block: needs perf (Debian package linux-perf)" >&2; exit 1; }
command -v objdump >/dev/null || { echo "profile-block: needs objdump (binutils)" >&2; exit 1; }
[ -x "$hostvisor" ] || { echo "profile-block: no $hostvisor; run 'make build' first" >&2; exit 1; }
[ -f "$guest/vmlinuz" ] || { echo "profile-block: no $guest/vmlinuz" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/hostvisor-profile-block.XXXXXX")
trap 'rm -rf "$work"' EXIT

HOSTVISOR_PERF_MAP=1 perf record -q -o "$work/perf.data" -F 4000 \
  "$hostvisor" run --accel soft --serial "file:$work/console.log" --memory 512M \
  --kernel "$guest/vmlinuz" --initrd "$guest/initramfs.cpio.gz" --cmdline "console=ttyS0 panic=-1 nokaslr" \
  >/dev/null 2>"$work/vmm.err" &
recorder=$!
if [ "$at" = marker ]; then
  for _ in $(seq 1 1200); do
    grep -q HOSTVISOR-GUEST-READY "$work/console.log" 2>/dev/null && break
    sleep 0.1
  done
else
  sleep "$at"
fi
vmm=$(pgrep -P "$recorder" -f "run --accel soft --serial file:$work/console.log" || true)
[ -n "$vmm" ] || { echo "profile-block: the VMM is not running" >&2; cat "$work/vmm.err" >&2; exit 1; }
kill -STOP "$vmm"
map=/tmp/perf-$vmm.map
grep " guest_$rip\$" "$map" >"$work/entries" || true
python3 - "$vmm" "$work" <<'EOF'
import sys
pid, work = sys.argv[1], sys.argv[2]
with open(f"/proc/{pid}/mem", "rb") as memory:
    for line in open(f"{work}/entries"):
        start, size, _ = line.split()
        memory.seek(int(start, 16))
        code = memory.read(int(size, 16))
        if any(code[:64]):
            open(f"{work}/block.bin", "wb").write(code)
            break
EOF
kill -CONT "$vmm"
kill -TERM "$vmm"
wait "$recorder" 2>/dev/null || true
rm -f "$map"
[ -s "$work/entries" ] || { echo "profile-block: no translation of guest_$rip in the perf map" >&2; exit 1; }
[ -f "$work/block.bin" ] || { echo "profile-block: every translation of guest_$rip was dropped by then; try another --at" >&2; exit 1; }
objdump -D -b binary -m i386:x86-64 "$work/block.bin" | tail -n +8 >"$work/block.s"
perf script -i "$work/perf.data" -F ip 2>/dev/null | python3 -c '
import collections, sys
work = sys.argv[1]
entries = [(int(l.split()[0], 16), int(l.split()[1], 16)) for l in open(f"{work}/entries")]
samples = collections.Counter()
total = 0
for line in sys.stdin:
    try:
        address = int(line.strip(), 16)
    except ValueError:
        continue
    total += 1
    for start, size in entries:
        if start <= address < start + size:
            samples[address - start] += 1
print(f"guest_{sys.argv[2]}: {sum(samples.values())} of {total} samples, {len(entries)} translation(s)")
print("samples  offset  host instruction")
for line in open(f"{work}/block.s"):
    offset, _, rest = line.partition(":")
    try:
        offset = int(offset.strip(), 16)
    except ValueError:
        continue
    print(f"{samples.get(offset, 0):7d}  {offset:6x}  {rest.split(chr(9))[-1].strip()}")
' "$work" "$rip"
