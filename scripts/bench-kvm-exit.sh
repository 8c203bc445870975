#!/usr/bin/env bash
# KVM port-I/O exit round trip: KVMAccelerator's run loop against a minimal C KVM_RUN loop,
# on the same guest (scripts/bench/kvm_exit_guest.S: ITERATIONS x `out` to port 0x80, then a
# debug-exit write), side by side in one run. Prints ns/exit for each and the ratio, both in
# wall-clock time and in process CPU time (the latter is less sensitive to a busy host).
#
#   scripts/bench-kvm-exit.sh            # 200000 iterations, 5 alternating rounds
#   ITERATIONS=100000 ROUNDS=3 scripts/bench-kvm-exit.sh
#
# Needs /dev/kvm, gcc, GNU as/ld and Swift. Builds `hostvisor-bench` (release) in .build-kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
ITERATIONS=${ITERATIONS:-200000}
ROUNDS=${ROUNDS:-5}
SCRATCH=${SCRATCH:-.build-kvm}
SWIFT=${SWIFT:-swift}

[ -e /dev/kvm ] || { echo "bench-kvm-exit: /dev/kvm is missing (is KVM available?)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

as --64 -o "$work/guest.o" scripts/bench/kvm_exit_guest.S
ld -m elf_x86_64 -nostdlib -N -e _start -Ttext=0x8000 --oformat binary -o "$work/guest.bin" "$work/guest.o"
gcc -O2 -Wall -Wextra -o "$work/kvm_exit" scripts/bench/kvm_exit.c
"$SWIFT" build -c release --scratch-path "$SCRATCH" --product hostvisor-bench >&2
bench="$("$SWIFT" build -c release --scratch-path "$SCRATCH" --show-bin-path)/hostvisor-bench"

c_wall=()
c_cpu=()
swift_wall=()
swift_cpu=()
echo "guest: $ITERATIONS port writes + 1 debug exit per run; $ROUNDS alternating rounds; load: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$ROUNDS"); do
  # Output of both programs: "<name> <exits> <wall ns> <wall ns/exit> <process CPU ns/exit>".
  read -r _ c_exits _ c_ns c_cpu_ns < <("$work/kvm_exit" "$work/guest.bin" "$ITERATIONS")
  read -r _ s_exits _ s_ns s_cpu_ns < <("$bench" kvm-exit "$work/guest.bin" "$ITERATIONS")
  printf 'round %d: C %8.1f ns/exit wall %8.1f cpu (%d exits)   KVMAccelerator %8.1f ns/exit wall %8.1f cpu (%d exits)\n' \
    "$round" "$c_ns" "$c_cpu_ns" "$c_exits" "$s_ns" "$s_cpu_ns" "$s_exits"
  c_wall+=("$c_ns")
  c_cpu+=("$c_cpu_ns")
  swift_wall+=("$s_ns")
  swift_cpu+=("$s_cpu_ns")
done

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
report() {
  local what=$1 c=$2 s=$3 ratio verdict
  ratio=$(awk -v s="$s" -v c="$c" 'BEGIN { printf "%.3f", s / c }')
  verdict=$(awk -v r="$ratio" 'BEGIN { print (r <= 1.2) ? "within" : "ABOVE" }')
  printf 'median %-4s: C %8.1f ns/exit   KVMAccelerator %8.1f ns/exit   ratio %s (%s the 1.2 target)\n' \
    "$what" "$c" "$s" "$ratio" "$verdict"
}
report wall "$(median "${c_wall[@]}")" "$(median "${swift_wall[@]}")"
report cpu "$(median "${c_cpu[@]}")" "$(median "${swift_cpu[@]}")"
