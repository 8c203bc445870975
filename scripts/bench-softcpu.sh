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
#   - on the software CPU through `hostvisor run --accel soft --kernel` (whole VMM: Multiboot
#     loader, 32-bit entry, the guest's own page tables, long mode, debug-exit), once with the
#     interpreter only (`--softcpu-tier interp`) and once with the translator (`--softcpu-tier jit`),
#   - on QEMU TCG (`qemu-system-x86_64 -accel tcg -kernel ... isa-debug-exit`), the same image,
#   - on the software CPU through hostvisor-softbench (the interpreter alone: flat long mode,
#     CPL 0, paging off; exact retired instruction count). Not the same work as the two VMM
#     runs, so it is reported for the instruction rate only.
# The headline ratio is `hostvisor run` / QEMU in CPU time (user+sys: the machine is shared,
# wall time includes waiting for a core); program 0 (boot + exit only) gives each side's
# start-up for the "net" ratio. The three runs must print the same result: the script fails on
# a mismatch, and on any run that fails, times out or prints no result.
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
  swift build -c release --scratch-path "$scratch" --product hostvisor >&2
fi
[ -n "$bin" ] || bin=$(swift build -c release --scratch-path "$scratch" --show-bin-path)
[ -n "$hostvisor" ] || hostvisor="$bin/hostvisor"
[ -x "$hostvisor" ] || { echo "missing $hostvisor" >&2; exit 1; }

for p in 0 $programs; do
  # Each program runs `repeat` times (memcpy-rep once: QEMU needs a minute for it already).
  r=$repeat; [ $p = 2 ] && r=1; [ $p = 0 ] && r=1
  as --64 --defsym PROGRAM=$p --defsym REPEAT=$r -o "$work/b$p.o" Tests/GuestPrograms/bench/bench.S
  ld -m elf_x86_64 -Ttext=0x100000 -e 0x100000 -o "$work/b$p.elf" "$work/b$p.o"
  objcopy -O binary "$work/b$p.elf" "$work/b$p.bin"
done

# measure EXPECTED_STATUS CMD...: runs CMD, prints "<wall seconds> <cpu seconds (user+sys)> <result>"
# where result is the guest's "result=<hex>" line (or the softbench's result= field). A run that
# exits with another status, times out or prints no result makes the whole script fail: a
# failed run must never show up as a time.
measure() {
  local expected=$1 out status=0
  shift
  out=$(/usr/bin/time -f "TIME %e %U %S" timeout 900 "$@" </dev/null 2>&1) || status=$?
  local wall user sys result
  read -r wall user sys < <(echo "$out" | sed -n 's/^TIME //p' | tail -1)
  result=$(echo "$out" | tr -d '\r' | grep -o 'result=[0-9a-f]*' | head -1 | cut -d= -f2) || result=""
  if [ "$status" != "$expected" ] || [ -z "$result" ] || [ -z "$wall" ]; then
    echo "bench-softcpu: run failed (exit status $status, expected $expected; result '${result}'): $*" >&2
    echo "$out" | tail -5 >&2
    return 1
  fi
  # Normalized to 16 hex digits (the guest prints them zero-padded, hostvisor-softbench does not).
  echo "$wall $(echo "$user + $sys" | bc -l) $(printf '%016x' "$((16#$result))")"
}

# The guest exits through isa-debug-exit with value 0: status (0 << 1) | 1 = 1 on both VMMs.
qemu_cmd() { echo qemu-system-x86_64 -accel tcg -m 128 -kernel "$1" -nographic -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=0x04; }

base=$(measure 1 $(qemu_cmd "$work/b0.bin")) || exit 1
read -r qemu_base_wall qemu_base_cpu _ <<<"$base"
base=$(measure 1 "$hostvisor" run --no-sandbox --accel soft --softcpu-tier interp --memory 128M --kernel "$work/b0.bin") || exit 1
read -r vmm_base_wall vmm_base_cpu _ <<<"$base"
mismatches=0
printf "%-12s %12s %7s | %8s %8s | %8s | %8s %8s | %8s %8s | %6s %6s %6s %6s | %s\n" program instructions MIPS hv-wall hv-cpu jit-cpu qemu-wall qemu-cpu flat-wall flat-cpu hv/q hv/q-net jit/q jit/hv "results hv/jit/qemu/flat"
for p in $programs; do
  line=$(measure 0 "$bin/hostvisor-softbench" "$work/b$p.bin") || exit 1
  read -r soft_wall soft_cpu soft_result <<<"$line"
  # The instruction count comes from a separate untimed run (its output line is not kept by measure).
  info=$("$bin/hostvisor-softbench" "$work/b$p.bin")
  instructions=$(echo "$info" | sed -n 's/.*instructions=\([0-9]*\).*/\1/p')
  # Instructions per CPU second of the flat-mode run (robust when the machine is shared).
  mips=$(echo "$instructions / $soft_cpu / 1000000" | bc -l | xargs printf "%.0f")
  line=$(measure 1 $(qemu_cmd "$work/b$p.bin")) || exit 1
  read -r qemu_wall qemu_cpu qemu_result <<<"$line"
  line=$(measure 1 "$hostvisor" run --no-sandbox --accel soft --softcpu-tier interp --memory 128M --kernel "$work/b$p.bin") || exit 1
  read -r vmm_wall vmm_cpu vmm_result <<<"$line"
  line=$(measure 1 "$hostvisor" run --no-sandbox --accel soft --softcpu-tier jit --memory 128M --kernel "$work/b$p.bin") || exit 1
  read -r _ jit_cpu jit_result <<<"$line"
  # Headline: `hostvisor run` against QEMU, the same image booted the same way (Multiboot
  # loader, 32-bit entry, guest page tables, long mode, debug-exit), CPU time; and the same
  # ratio net of each VMM's own start-up (program 0 on each side).
  r_cpu=$(echo "$vmm_cpu / $qemu_cpu" | bc -l)
  r_net=$(echo "($vmm_cpu - $vmm_base_cpu) / ($qemu_cpu - $qemu_base_cpu)" | bc -l)
  r_jit=$(echo "$jit_cpu / $qemu_cpu" | bc -l)
  r_jit_hv=$(echo "$jit_cpu / $vmm_cpu" | bc -l)
  verdict=""
  if [ "$vmm_result" != "$qemu_result" ] || [ "$jit_result" != "$qemu_result" ] || [ "$soft_result" != "$qemu_result" ]; then
    verdict="  MISMATCH"
    mismatches=$((mismatches + 1))
  fi
  printf "%-12s %12s %7s | %8.2f %8.2f | %8.2f | %8.2f %8.2f | %8.2f %8.2f | %6.2f %6.2f %6.2f %6.2f | %s/%s/%s/%s%s\n" "${names[$p]}" "$instructions" "$mips" \
    "$vmm_wall" "$vmm_cpu" "$jit_cpu" "$qemu_wall" "$qemu_cpu" "$soft_wall" "$soft_cpu" "$r_cpu" "$r_net" "$r_jit" "$r_jit_hv" "$vmm_result" "$jit_result" "$qemu_result" "$soft_result" "$verdict"
done
echo "start-up (program 0): hostvisor run wall ${vmm_base_wall}s cpu ${vmm_base_cpu}s; QEMU wall ${qemu_base_wall}s cpu ${qemu_base_cpu}s"
echo "hv/q = hostvisor run (interpreter) CPU time / QEMU CPU time; hv/q-net = the same net of each side's program-0 start-up."
echo "jit-cpu = hostvisor run --softcpu-tier jit CPU time; jit/q = it / QEMU CPU time; jit/hv = it / the interpreter's."
echo "flat = hostvisor-softbench: the interpreter alone in flat long mode at CPL 0 with paging off (not the same work as"
echo "       the two VMM columns); MIPS = its retired guest instructions per CPU second."
if [ $mismatches -gt 0 ]; then
  echo "bench-softcpu: $mismatches program(s) printed different results in the three runs" >&2
  exit 1
fi
