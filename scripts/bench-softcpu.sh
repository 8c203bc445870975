#!/usr/bin/env bash
# Software CPU vs QEMU TCG on the same guest programs (Tests/GuestPrograms/bench/bench.S).
#
#   scripts/bench-softcpu.sh [--programs "1 2 3 4 5"] [--skip-build] [--scratch-path DIR] [--bin-path DIR] [--hostvisor PATH] [--repeat N]
#
# --repeat: run each program N times inside the guest (default 5; memcpy-rep always once) so
#           QEMU's runs are long compared with its start-up.
# --hostvisor: the hostvisor binary for the `hostvisor run --accel soft` column (default: from the build).
# --bin-path: use already built hostvisor-softbench / hostvisor binaries from DIR (implies --skip-build).
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
repeat=5
scratch=.build-bench
build=1
bin=""
hostvisor=""
while [ $# -gt 0 ]; do
  case "$1" in
    --programs) programs="$2"; shift 2 ;;
    --skip-build) build=0; shift ;;
    --scratch-path) scratch="$2"; shift 2 ;;
    --bin-path) bin="$2"; build=0; shift 2 ;;
    --hostvisor) hostvisor="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    *) echo "usage: $0 [--programs \"1 2 3 4 5\"] [--skip-build] [--scratch-path DIR] [--bin-path DIR] [--hostvisor PATH] [--repeat N]" >&2; exit 2 ;;
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
[ -n "$bin" ] || bin=$(swift build -c release --scratch-path "$scratch" --show-bin-path)
[ -n "$hostvisor" ] || { [ -x "$bin/hostvisor" ] && hostvisor="$bin/hostvisor"; } || true

for p in 0 $programs; do
  # Each program runs `repeat` times (memcpy-rep once: QEMU needs a minute for it already).
  r=$repeat; [ $p = 2 ] && r=1; [ $p = 0 ] && r=1
  as --64 --defsym PROGRAM=$p --defsym REPEAT=$r -o "$work/b$p.o" Tests/GuestPrograms/bench/bench.S
  ld -m elf_x86_64 -Ttext=0x100000 -e 0x100000 -o "$work/b$p.elf" "$work/b$p.o"
  objcopy -O binary "$work/b$p.elf" "$work/b$p.bin"
done

# Runs a command, prints "<wall seconds> <cpu seconds (user+sys)> <result>" where result is the
# guest's "result=<hex>" line (or the softbench's result= field).
measure() {
  local out
  out=$( { /usr/bin/time -f "TIME %e %U %S" timeout 900 "$@" </dev/null 2>&1 || true; } )
  local wall user sys result
  read -r wall user sys < <(echo "$out" | sed -n 's/^TIME //p' | tail -1)
  result=$(echo "$out" | tr -d '\r' | grep -o 'result=[0-9a-f]*' | head -1 | cut -d= -f2 || true)
  echo "$wall $(echo "$user + $sys" | bc -l) ${result:--}"
}

qemu_cmd() { echo qemu-system-x86_64 -accel tcg -m 128 -kernel "$1" -nographic -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=0x04; }

read -r qemu_base_wall qemu_base_cpu _ < <(measure $(qemu_cmd "$work/b0.bin"))
vmm_base_wall="-"
vmm_base_cpu="-"
if [ -n "$hostvisor" ]; then read -r vmm_base_wall vmm_base_cpu _ < <(measure "$hostvisor" run --accel soft --memory 128M --kernel "$work/b0.bin"); fi
printf "%-12s %12s %7s | %8s %8s | %8s %8s | %8s %8s | %6s %6s | %s\n" program instructions MIPS soft-wall soft-cpu hv-wall hv-cpu qemu-wall qemu-cpu r-wall r-cpu "results soft/hv/qemu"
for p in $programs; do
  line=$("$bin/hostvisor-softbench" "$work/b$p.bin")
  instructions=$(echo "$line" | sed -n 's/.*instructions=\([0-9]*\).*/\1/p')
  mips=$(echo "$line" | sed -n 's/.*mips=\([0-9.]*\).*/\1/p')
  read -r soft_wall soft_cpu soft_result < <(measure "$bin/hostvisor-softbench" "$work/b$p.bin")
  # Instructions per CPU second (robust when the machine is shared); the wall-clock rate is
  # what hostvisor-softbench itself printed.
  mips=$(echo "$instructions / $soft_cpu / 1000000" | bc -l | xargs printf "%.0f")
  read -r qemu_wall qemu_cpu qemu_result < <(measure $(qemu_cmd "$work/b$p.bin"))
  vmm_wall="-"; vmm_cpu="-"; vmm_result="-"
  if [ -n "$hostvisor" ]; then
    read -r vmm_wall vmm_cpu vmm_result < <(measure "$hostvisor" run --accel soft --memory 128M --kernel "$work/b$p.bin")
  fi
  # Ratios ours / QEMU, net of QEMU's start-up (firmware boot, measured with program 0): the
  # flat-mode run has no boot, so it is compared with QEMU's time minus its empty run.
  r_wall=$(echo "$soft_wall / ($qemu_wall - $qemu_base_wall)" | bc -l)
  r_cpu=$(echo "$soft_cpu / ($qemu_cpu - $qemu_base_cpu)" | bc -l)
  printf "%-12s %12s %7s | %8.2f %8.2f | %8s %8s | %8.2f %8.2f | %6.2f %6.2f | %s/%s/%s\n" "${names[$p]}" "$instructions" "$mips" \
    "$soft_wall" "$soft_cpu" "$vmm_wall" "$vmm_cpu" "$qemu_wall" "$qemu_cpu" "$r_wall" "$r_cpu" "$soft_result" "$vmm_result" "$qemu_result"
done
echo "start-up (program 0): QEMU wall ${qemu_base_wall}s cpu ${qemu_base_cpu}s; hostvisor run wall ${vmm_base_wall}s cpu ${vmm_base_cpu}s"
echo "MIPS = retired guest instructions per CPU second of the flat-mode run (hostvisor-softbench); r-wall / r-cpu = ours / QEMU (net of QEMU start-up)."
