#!/usr/bin/env bash
# Builds one libFuzzer target (docs/fuzzing.md) with libFuzzer and the address sanitizer and
# runs it for SECONDS (default 60) on a corpus kept in .build-fuzz/corpus/TARGET, starting
# from the target's own seed inputs. Extra arguments after SECONDS go to libFuzzer.
#
#   scripts/fuzz.sh softcpu 600
#   scripts/fuzz.sh virtio 60 -jobs=2
#   scripts/fuzz.sh all 10          # every target for 10 s each (the smoke run)
#
# Environment: HOSTVISOR_FUZZ_SANITIZERS (default "fuzzer,address"; "fuzzer" alone runs
# faster), HOSTVISOR_FUZZ_BUILD_ONLY=1 (build, do not run).
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(softcpu virtio nics loaders state memfiles migration api vnc gdb)
usage() { echo "usage: scripts/fuzz.sh ${targets[*]// /|}|all [SECONDS] [libFuzzer flags...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
target=$1
seconds=${2:-60}
shift $(($# >= 2 ? 2 : 1))
case "$target" in all) selected=("${targets[@]}") ;; softcpu|virtio|nics|loaders|state|memfiles|migration|api|vnc|gdb) selected=("$target") ;; *) usage ;; esac
[[ "$seconds" =~ ^[0-9]+$ ]] || usage

sanitizers=${HOSTVISOR_FUZZ_SANITIZERS:-fuzzer,address}
scratch=.build-fuzz
[ "$sanitizers" = "fuzzer,address" ] || scratch=".build-fuzz-${sanitizers//,/-}"
for name in "${selected[@]}"; do
  HOSTVISOR_FUZZ=1 swift build -c release --scratch-path "$scratch" --product "fuzz-$name" \
    -Xswiftc "-sanitize=$sanitizers" -Xswiftc -enable-testing 2>&1 | grep -v "Cannot export local symbol" || true
  [ -x "$scratch/release/fuzz-$name" ] || { echo "fuzz.sh: building fuzz-$name failed" >&2; exit 1; }
done
[ "${HOSTVISOR_FUZZ_BUILD_ONLY:-0}" = 1 ] && exit 0

for name in "${selected[@]}"; do
  corpus=.build-fuzz/corpus/$name
  seeds=.build-fuzz/seeds/$name
  mkdir -p "$corpus" "$seeds" .build-fuzz/crashes
  HOSTVISOR_FUZZ_SEEDS="$seeds" "$scratch/release/fuzz-$name"
  if [ "$name" = loaders ] && [ -f .cache/guest/vmlinuz ]; then
    # The default guest's kernel header and setup code: a real bzImage to mutate.
    { printf '\001\015console=ttyS0\004\000\001\002\003\004'; head -c 65536 .cache/guest/vmlinuz; } >"$seeds/loaders-bzimage"
  fi
  # The software CPU's decoded-block and translation caches grow across inputs by design:
  # libFuzzer's per-input leak check would take every growth for a leak and rescan the heap.
  leaks=()
  [ "$name" = softcpu ] && leaks=(-detect_leaks=0)
  # No allocation stacks while fuzzing (recording one per malloc costs a fifth of the time);
  # replay a crash without ASAN_OPTIONS to see them.
  export ASAN_OPTIONS=${ASAN_OPTIONS:-malloc_context_size=0}
  # A Swift runtime trap is then a plain deadly signal with libFuzzer's stack trace (Swift's
  # own backtracer reads other threads' stacks, which ASan reports as an error of its own).
  export SWIFT_BACKTRACE=${SWIFT_BACKTRACE:-enable=no}
  echo "fuzz.sh: fuzz-$name for ${seconds}s (sanitizers: $sanitizers; load: $(cut -d' ' -f1-3 /proc/loadavg))"
  # stderr of the target is closed (-close_fd_mask=2: devices log protocol violations there);
  # libFuzzer's own report and the crash report still appear.
  "$scratch/release/fuzz-$name" -max_total_time="$seconds" -print_final_stats=1 -close_fd_mask=2 \
    -artifact_prefix=.build-fuzz/crashes/"$name"- -max_len=8192 \
    "${leaks[@]}" "$@" "$corpus" "$seeds"
done
