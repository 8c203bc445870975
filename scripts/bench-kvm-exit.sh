#!/usr/bin/env bash
# KVM port-I/O exit round trip: KVMAccelerator's run loop against a minimal C KVM_RUN loop,
# on the same guest (scripts/bench/kvm_exit_guest.S: ITERATIONS x `out` to port 0x80, then a
# debug-exit write), side by side in one run. Prints ns/exit for each and the ratio.
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

c_results=()
swift_results=()
echo "guest: $ITERATIONS port writes + 1 debug exit per run; $ROUNDS alternating rounds"
for round in $(seq 1 "$ROUNDS"); do
  # Output format of both programs: "<name> <exits> <nanoseconds> <ns/exit>".
  read -r _ c_exits _ c_ns < <("$work/kvm_exit" "$work/guest.bin" "$ITERATIONS")
  read -r _ s_exits _ s_ns < <("$bench" kvm-exit "$work/guest.bin" "$ITERATIONS")
  printf 'round %d: C %8.1f ns/exit (%d exits)   KVMAccelerator %8.1f ns/exit (%d exits)\n' \
    "$round" "$c_ns" "$c_exits" "$s_ns" "$s_exits"
  c_results+=("$c_ns")
  swift_results+=("$s_ns")
done

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
c_median=$(median "${c_results[@]}")
s_median=$(median "${swift_results[@]}")
ratio=$(awk -v s="$s_median" -v c="$c_median" 'BEGIN { printf "%.3f", s / c }')
verdict=$(awk -v r="$ratio" 'BEGIN { print (r <= 1.2) ? "within" : "ABOVE" }')
echo "median: C ${c_median} ns/exit, KVMAccelerator ${s_median} ns/exit, ratio ${ratio} (${verdict} the 1.2 target)"
