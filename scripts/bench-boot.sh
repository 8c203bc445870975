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

# time_to_marker CMD...: seconds until the marker appears on the command's stdout, or "fail".
time_to_marker() {
  local start end
  start=$(date +%s.%N)
  # grep stops reading at the marker; the VMM then dies of SIGPIPE, which is expected here.
  # Standard input stays open but silent (QEMU's stdio serial stops at end of input).
  if (set +o pipefail; timeout $limit "$@" 2>/dev/null < <(sleep $limit) | grep -q -m1 "$marker"); then
    end=$(date +%s.%N)
    echo "$end - $start" | bc
  else
    echo fail
  fi
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

ours=(); theirs=()
for ((i = 1; i <= runs; i++)); do
  t=$(time_to_marker "$hostvisor" run --accel soft --serial stdio --memory 512M \
      --kernel $guest/vmlinuz --initrd $guest/initramfs.cpio.gz --cmdline "$cmdline")
  ours+=("$t")
  q=$(time_to_marker qemu-system-x86_64 -accel tcg -m 512M -display none -serial stdio -monitor none -no-reboot \
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
