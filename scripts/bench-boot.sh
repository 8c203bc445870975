#!/usr/bin/env bash
# Boot-time benchmark: the default guest (Debian cloud kernel + busybox initramfs) booted to
# the init script's marker line on Hostvisor (--accel soft) and on QEMU TCG, side by side,
# several runs each, alternating; prints each time and the median wall-time ratio.
#
#   scripts/bench-boot.sh [--runs N] [--hostvisor PATH]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=3
hostvisor=.build/release/hostvisor
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --hostvisor) hostvisor="$2"; shift 2 ;;
    *) echo "usage: $0 [--runs N] [--hostvisor PATH]" >&2; exit 2 ;;
  esac
done
guest=.cache/guest
marker=HOSTVISOR-GUEST-READY
cmdline="console=ttyS0 panic=-1"
limit=300
[ -x "$hostvisor" ] || { echo "missing $hostvisor: run 'make build' first" >&2; exit 1; }
[ -f $guest/vmlinuz ] || scripts/make-default-guest.sh $guest
command -v qemu-system-x86_64 >/dev/null || { echo "missing qemu-system-x86_64: apt-get install qemu-system-x86" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/hostvisor-bench-boot.XXXXXX")
trap 'rm -rf "$work"' EXIT

# time_to_marker LOG CMD...: seconds until the marker appears in LOG (where CMD writes the guest's
# serial console), or "fail". CMD is stopped once the marker is seen. Both VMMs write the console
# to a file: QEMU's stdio serial behaves differently when its standard input is not a terminal.
time_to_marker() {
  local log=$1 start end pid waited=0
  shift
  : >"$log"
  start=$(date +%s.%N)
  "$@" </dev/null >/dev/null 2>&1 &
  pid=$!
  while ! grep -q "$marker" "$log" 2>/dev/null; do
    if ! kill -0 $pid 2>/dev/null || [ $waited -ge $((limit * 100)) ]; then
      kill $pid 2>/dev/null || true
      wait $pid 2>/dev/null || true
      echo fail
      return
    fi
    sleep 0.01
    waited=$((waited + 1))
  done
  end=$(date +%s.%N)
  kill $pid 2>/dev/null || true
  wait $pid 2>/dev/null || true
  echo "$end - $start" | bc
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

ours=(); theirs=()
for ((i = 1; i <= runs; i++)); do
  t=$(time_to_marker "$work/hostvisor.log" "$hostvisor" run --accel soft --serial "file:$work/hostvisor.log" --memory 512M \
      --kernel $guest/vmlinuz --initrd $guest/initramfs.cpio.gz --cmdline "$cmdline")
  ours+=("$t")
  q=$(time_to_marker "$work/qemu.log" qemu-system-x86_64 -accel tcg -m 512M -display none -serial "file:$work/qemu.log" -monitor none -no-reboot \
      -kernel $guest/vmlinuz -initrd $guest/initramfs.cpio.gz -append "$cmdline")
  theirs+=("$q")
  echo "run $i: hostvisor(soft) ${t}s  qemu(tcg) ${q}s"
done
if printf '%s\n' "${ours[@]}" "${theirs[@]}" | grep -q fail; then
  echo "boot benchmark: at least one run did not reach '$marker' within ${limit}s"
  exit 1
fi
mo=$(printf '%s\n' "${ours[@]}" | median)
mq=$(printf '%s\n' "${theirs[@]}" | median)
printf 'median: hostvisor(soft) %.2fs  qemu(tcg) %.2fs  ratio %.2f (target <= 5)\n' "$mo" "$mq" "$(echo "$mo / $mq" | bc -l)"
