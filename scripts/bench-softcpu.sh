#!/usr/bin/env bash
# Software CPU vs QEMU TCG on the same guest programs (Tests/GuestPrograms/bench/bench.S).
#
#   scripts/bench-softcpu.sh [--programs "1 2 3 4 5"] [--skip-build] [--scratch-path DIR]
#
# For each program: one flat image (multiboot a.out-kludge header + 64-bit flat entry), run
#   - on the software CPU through hostvisor-softbench (flat long mode: exact retired
#     instruction count, instructions per second),
#   - on the software CPU through `hostvisor run --accel soft --kernel` (whole VMM, wall time),
#     when that command works,
#   - on QEMU TCG (`qemu-system-x86_64 -accel tcg -kernel ... isa-debug-exit`), wall time.
# Program 0 (boot + exit only) is the start-up baseline subtracted for the "net" ratio.
# The printed results must agree between all runs (same guest bytes, same answer).
set -euo pipefail
cd "$(dirname "$0")/.."
programs="1 2 3 4 5"
scratch=.build-bench
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --programs) programs="$2"; shift 2 ;;
    --skip-build) build=0; shift ;;
    --scratch-path) scratch="$2"; shift 2 ;;
    *) echo "usage: $0 [--programs \"1 2 3 4 5\"] [--skip-build] [--scratch-path DIR]" >&2; exit 2 ;;
  esac
done
names=(empty checksum memcpy-rep memcpy-sse2 sieve sse2-float)
command -v qemu-system-x86_64 >/dev/null || { echo "qemu-system-x86_64 missing: apt-get install qemu-system-x86" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ $build = 1 ]; then
  swift build -c release --scratch-path "$scratch" --product hostvisor-softbench >&2
  swift build -c release --scratch-path "$scratch" --product hostvisor >&2 || echo "note: hostvisor did not build; skipping the VMM column" >&2
fi
bin=$(swift build -c release --scratch-path "$scratch" --show-bin-path)

for p in 0 $programs; do
  as --64 --defsym PROGRAM=$p -o "$work/b$p.o" Tests/GuestPrograms/bench/bench.S
  ld -m elf_x86_64 -Ttext=0x100000 -e 0x100000 -o "$work/b$p.elf" "$work/b$p.o"
  objcopy -O binary "$work/b$p.elf" "$work/b$p.bin"
done

now() { date +%s.%N; }
elapsed() { echo "$2 - $1" | bc -l; }

qemu_run() {  # image -> "seconds result"
  local start end out
  start=$(now)
  out=$(timeout 600 qemu-system-x86_64 -accel tcg -m 128 -kernel "$1" -nographic -no-reboot \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04 </dev/null 2>/dev/null || true)
  end=$(now)
  echo "$(elapsed "$start" "$end") $(echo "$out" | tr -d '\r' | grep -o 'result=[0-9a-f]*' | head -1 | cut -d= -f2)"
}

vmm_run() {  # image -> "seconds result" or "- -"
  [ -x "$bin/hostvisor" ] || { echo "- -"; return; }
  local start end out
  start=$(now)
  out=$(timeout 600 "$bin/hostvisor" run --accel soft --memory 128M --kernel "$1" </dev/null 2>/dev/null || true)
  end=$(now)
  local result
  result=$(echo "$out" | tr -d '\r' | grep -o 'result=[0-9a-f]*' | head -1 | cut -d= -f2 || true)
  if [ -z "$result" ]; then echo "- -"; else echo "$(elapsed "$start" "$end") $result"; fi
}

read -r qemu_base _ < <(qemu_run "$work/b0.bin")
read -r vmm_base _ < <(vmm_run "$work/b0.bin")
printf "%-12s %14s %9s %9s %10s %9s %9s %9s %s\n" program instructions soft-s MIPS hv-run-s qemu-s "ratio" "net-ratio" "results (soft/hv/qemu)"
for p in $programs; do
  line=$("$bin/hostvisor-softbench" "$work/b$p.bin")
  instructions=$(echo "$line" | sed -n 's/.*instructions=\([0-9]*\).*/\1/p')
  soft_seconds=$(echo "$line" | sed -n 's/.*seconds=\([0-9.]*\).*/\1/p')
  mips=$(echo "$line" | sed -n 's/.*mips=\([0-9.]*\).*/\1/p')
  soft_result=$(echo "$line" | sed -n 's/.*result=\([0-9a-f]*\).*/\1/p')
  read -r qemu_seconds qemu_result < <(qemu_run "$work/b$p.bin")
  read -r vmm_seconds vmm_result < <(vmm_run "$work/b$p.bin")
  # Wall-time ratio ours / QEMU: flat-mode run vs QEMU's whole run, and net of start-up
  # (QEMU minus its empty-program time, since the flat run has no firmware/boot).
  ratio=$(echo "$soft_seconds / $qemu_seconds" | bc -l)
  net=$(echo "$soft_seconds / ($qemu_seconds - $qemu_base)" | bc -l)
  printf "%-12s %14s %9.3f %9s %10s %9.3f %9.2f %9.2f %s/%s/%s\n" "${names[$p]}" "$instructions" "$soft_seconds" "$mips" \
    "$vmm_seconds" "$qemu_seconds" "$ratio" "$net" "$soft_result" "$vmm_result" "$qemu_result"
done
echo "QEMU start-up (empty program): ${qemu_base}s; hostvisor run start-up: ${vmm_base}s"
