#!/usr/bin/env bash
# Long differential run of the software CPU against the host CPU.
#
#   scripts/softcpu-difftest.sh [--cases N] [--seed S] [--form TEXT] [--fuzz N] [--scratch-path DIR]
#
# --cases: total random sequences over all instruction forms (default 1000000)
# --seed:  base seed (default: current time, printed so a run can be repeated)
# --form:  only forms whose name contains TEXT
# --fuzz:  also run FuzzTests with N hostile sequences (0 = skip, default)
# --xctest PATH: run an already built test bundle (e.g. .build-diff/release/HostvisorPackageTests.xctest)
#          instead of `swift test` (which builds first)
# Mismatch reports print the seed, form and case index; rerun with the same --seed and --form.
set -euo pipefail
cd "$(dirname "$0")/.."
cases=1000000
seed=$(date +%s)
form=""
fuzz=0
scratch=.build-diff
xctest=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cases) cases="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --form) form="$2"; shift 2 ;;
    --fuzz) fuzz="$2"; shift 2 ;;
    --scratch-path) scratch="$2"; shift 2 ;;
    --xctest) xctest="$2"; shift 2 ;;
    *) echo "usage: $0 [--cases N] [--seed S] [--form TEXT] [--fuzz N] [--scratch-path DIR] [--xctest PATH]" >&2; exit 2 ;;
  esac
done
echo "softcpu-difftest: cases=$cases seed=$seed form='${form}'" >&2
filter=DifferentialTests
[ "$fuzz" != 0 ] && filter='DifferentialTests|FuzzTests'
export HOSTVISOR_DIFF_CASES="$cases" HOSTVISOR_DIFF_SEED="$seed" HOSTVISOR_FUZZ_CASES="$fuzz"
[ -n "$form" ] && export HOSTVISOR_DIFF_FORM="$form"
if [ -n "$xctest" ]; then
  exec "$xctest" --testing-library swift-testing --filter "$filter"
fi
exec swift test -c release --scratch-path "$scratch" --filter "$filter"
