#!/usr/bin/env bash
# Host instructions per guest instruction of the software CPU, per bench.S program and tier.
#
#   scripts/bench-host-instructions.sh [--programs "1 2 3 4 5"] [--bin-path DIR] [--repeat N]
#
# Counts every host instruction the process executes with Valgrind's exp-bbv tool (the virtual
# machines these benchmarks run on have no hardware performance counters, so `perf stat -e
# instructions` is not available), running hostvisor-softbench (flat long mode, CPL 0, paging
# off; exact retired guest-instruction count) under the interpreter and under the translator at
# its default threshold. Program 0 (an empty program) gives the start-up's host instructions,
# which are subtracted: the figure is (host(P) - host(0)) / (guest(P) - guest(0)).
# Needs valgrind (apt-get install valgrind). Valgrind cannot read the Swift release binary's
# debug information, so a stripped copy runs; --smc-check=all because the translator writes code.
set -euo pipefail
cd "$(dirname "$0")/.."
programs="1 2 3 4 5"
repeat=1
bin=""
while [ $# -gt 0 ]; do
  case "$1" in
    --programs) programs="$2"; shift 2 ;;
    --bin-path) bin="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    *) echo "usage: $0 [--programs \"1 2 3 4 5\"] [--bin-path DIR] [--repeat N]" >&2; exit 2 ;;
  esac
done
command -v valgrind >/dev/null || { echo "valgrind missing: apt-get install valgrind" >&2; exit 1; }
[ -n "$bin" ] || bin=$(swift build -c release --show-bin-path)
[ -x "$bin/hostvisor-softbench" ] || { echo "missing $bin/hostvisor-softbench: run 'swift build -c release' first" >&2; exit 1; }
names=(empty checksum memcpy-rep memcpy-sse2 sieve sse2-float)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
strip -o "$work/softbench" "$bin/hostvisor-softbench"

# count IMAGE TIER: prints "<guest instructions> <host instructions> <result>".
count() {
  local out guest host result
  out=$(valgrind --tool=exp-bbv --bb-out-file=/dev/null --pc-out-file=/dev/null --smc-check=all \
    "$work/softbench" "$1" --tier "$2" 2>&1) || { echo "bench-host-instructions: run failed: $1 $2" >&2; echo "$out" | tail -5 >&2; return 1; }
  guest=$(echo "$out" | sed -n 's/.*instructions=\([0-9]*\).*/\1/p' | head -1)
  host=$(echo "$out" | sed -n 's/.*Total instructions: \([0-9]*\).*/\1/p' | head -1)
  result=$(echo "$out" | sed -n 's/.*result=\([0-9a-f]*\).*/\1/p' | head -1)
  [ -n "$guest" ] && [ -n "$host" ] || { echo "bench-host-instructions: no counts for $1 $2" >&2; return 1; }
  echo "$guest $host $result"
}

for p in 0 $programs; do
  r=$repeat; [ $p = 0 ] && r=1
  as --64 --defsym PROGRAM=$p --defsym REPEAT=$r -o "$work/b$p.o" Tests/GuestPrograms/bench/bench.S
  ld -m elf_x86_64 -Ttext=0x100000 -e 0x100000 -o "$work/b$p.elf" "$work/b$p.o"
  objcopy -O binary "$work/b$p.elf" "$work/b$p.bin"
done
read -r guest0i host0i _ < <(count "$work/b0.bin" interp)
read -r guest0j host0j _ < <(count "$work/b0.bin" jit)
printf "%-12s %12s | %14s %9s | %14s %9s | %s\n" program guest-instr interp-host host/guest jit-host host/guest "results interp/jit"
status=0
for p in $programs; do
  read -r guest hosti resulti < <(count "$work/b$p.bin" interp)
  read -r _ hostj resultj < <(count "$work/b$p.bin" jit)
  ri=$(echo "($hosti - $host0i) / ($guest - $guest0i)" | bc -l)
  rj=$(echo "($hostj - $host0j) / ($guest - $guest0j)" | bc -l)
  mark=""
  if [ "$resulti" != "$resultj" ]; then mark="  MISMATCH"; status=1; fi
  printf "%-12s %12s | %14s %9.2f | %14s %9.2f | %s/%s%s\n" "${names[$p]}" "$guest" "$hosti" "$ri" "$hostj" "$rj" "$resulti" "$resultj" "$mark"
done
echo "host/guest = (host instructions - program 0's) / (guest instructions - program 0's), counted by valgrind exp-bbv."
exit $status
