#!/usr/bin/env bash
# The interpreter's speed against another build's: the same guest programs
# (Tests/GuestPrograms/bench/bench.S) run by hostvisor-softbench (the interpreter alone, flat long
# mode at CPL 0, paging off, exact retired-instruction count) of this build and of a baseline
# build, alternately, several times each. Both sides do the same guest work, so the ratio is
# the cost of the decoder and executor alone (e.g. of a newer ISA level's extra checks).
#
#   scripts/bench-interpreter.sh --baseline PATH [--programs "1 3 4 5"] [--runs N] [--bin-path DIR]
#
# --baseline: the other build's hostvisor-softbench, e.g. built from an older commit with
#             `git worktree add --detach /tmp/old COMMIT && cd /tmp/old &&
#              swift build -c release --product hostvisor-softbench`.
# --runs: runs of each binary per program (default 3); the median CPU time (user+sys) counts.
# The script fails when a run fails or the two builds print different results.
set -euo pipefail
cd "$(dirname "$0")/.."
programs="1 3 4 5"
runs=3
bin=.build/release
baseline=""
while [ $# -gt 0 ]; do
  case "$1" in
    --baseline) baseline="$2"; shift 2 ;;
    --programs) programs="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --bin-path) bin="$2"; shift 2 ;;
    *) echo "usage: $0 --baseline PATH [--programs \"1 3 4 5\"] [--runs N] [--bin-path DIR]" >&2; exit 2 ;;
  esac
done
current="$bin/hostvisor-softbench"
[ -x "$current" ] || swift build -c release --product hostvisor-softbench >&2
[ -n "$baseline" ] && [ -x "$baseline" ] || { echo "bench-interpreter: --baseline needs a hostvisor-softbench binary" >&2; exit 2; }
work=$(mktemp -d /tmp/hv-bench-interp.XXXXXX)
trap 'rm -rf "$work"' EXIT

for p in $programs; do
  as --64 --defsym PROGRAM=$p --defsym REPEAT=1 -o "$work/b$p.o" Tests/GuestPrograms/bench/bench.S
  ld -m elf_x86_64 -Ttext=0x100000 -e 0x100000 -o "$work/b$p.elf" "$work/b$p.o"
  objcopy -O binary "$work/b$p.elf" "$work/b$p.bin"
done

# run BINARY IMAGE: prints "<cpu seconds> <result> <instructions>"
run() {
  local out
  out=$(/usr/bin/time -f "TIME %U %S" timeout 900 "$1" "$2" 2>&1) || { echo "bench-interpreter: $1 $2 failed" >&2; echo "$out" | tail -3 >&2; return 1; }
  local user sys
  read -r user sys < <(echo "$out" | sed -n 's/^TIME //p' | tail -1)
  echo "$(echo "$user + $sys" | bc -l) $(echo "$out" | grep -o 'result=[0-9a-f]*' | head -1 | cut -d= -f2) $(echo "$out" | sed -n 's/.*instructions=\([0-9]*\).*/\1/p' | head -1)"
}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

printf "%-8s %14s %10s %10s %10s %10s %8s\n" program instructions "this MIPS" "base MIPS" "this cpu" "base cpu" "this/base"
for p in $programs; do
  : >"$work/this" ; : >"$work/base"
  for _ in $(seq "$runs"); do
    read -r cpu result instructions < <(run "$current" "$work/b$p.bin")
    echo "$cpu" >>"$work/this"; this_result=$result; count=$instructions
    read -r cpu result _ < <(run "$baseline" "$work/b$p.bin")
    echo "$cpu" >>"$work/base"; base_result=$result
    if [ "$this_result" != "$base_result" ] || [ -z "$this_result" ]; then
      echo "bench-interpreter: program $p: results differ (this $this_result, baseline $base_result)" >&2
      exit 1
    fi
  done
  this_cpu=$(median <"$work/this"); base_cpu=$(median <"$work/base")
  printf "%-8s %14s %10.0f %10.0f %10.2f %10.2f %8.3f\n" "$p" "$count" \
    "$(echo "$count / $this_cpu / 1000000" | bc -l)" "$(echo "$count / $base_cpu / 1000000" | bc -l)" \
    "$this_cpu" "$base_cpu" "$(echo "$this_cpu / $base_cpu" | bc -l)"
done
echo "MIPS = retired guest instructions per CPU second (user+sys), median of $runs runs each, run alternately."
