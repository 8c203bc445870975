#!/usr/bin/env bash
# Boot-time benchmark: the default guest (Debian cloud kernel + busybox initramfs) booted to
# the init script's marker line on Hostvisor (--accel soft) and on QEMU TCG in its two fastest
# configurations for this guest, side by side, several runs each, alternating:
#
#   - hostvisor:    `hostvisor run --accel soft` (direct Linux boot, no firmware);
#   - qemu-microvm: `-M microvm -nodefaults` (qboot firmware, no PCI, ISA serial only);
#   - qemu-pc:      `-M pc -nodefaults` (SeaBIOS + linuxboot option ROM, no default devices).
#
# Every VMM gets the same kernel, initramfs, command line and 512 MiB, the serial console in a
# file, and is timed the same way: from the fork of the VMM process until the marker appears in
# its console file (start-up included on both sides). QEMU's CPU is the named model qemu64 with
# the features our default CPU model (`hostvisor`, x86-64-v3) advertises added (SSE3/SSSE3/
# SSE4.1/SSE4.2, POPCNT, MOVBE, PCLMULQDQ, CX16, ERMS, ABM, 1 GiB pages, NX, AVX, AVX2, FMA,
# F16C, BMI1, BMI2, XSAVE, XSAVEOPT, CLFLUSHOPT, CLWB, RDTSCP) and SVM removed, so both guests
# see nearly the same instruction set and Linux picks the same code paths (`rep movsb` copies,
# AVX2 crypto and RAID routines, XSAVEOPT context switches). QEMU 7.2's TCG cannot offer x2APIC,
# the TSC-deadline timer, RDPID, FSRM or XSAVEC, which ours advertises. XSAVEOPT must come with
# XSAVE: with XSAVE alone this kernel hangs on QEMU 7.2's TCG right after the Spectre messages
# (its FPU set-up), never reaching the marker.
#
# Figures: wall time and the VMM process's CPU time (user+sys of all its threads, read from
# /proc/PID/stat when the marker appears). On a shared machine the CPU time is the stable one;
# the ratios are CPU-time ratios.
#
# With --baseline PATH a second Hostvisor binary (e.g. a build of an earlier commit) boots the
# same guest in the same rounds, alternating with the others, and a hostvisor / baseline ratio
# is printed: a change's effect on boot time, measured under the same load.
#
# --hostvisor-args 'ARGS' adds arguments to the hostvisor runs only (not the baseline's), e.g.
# '--cpu-model x86-64-v2' to compare a build with an older one at a similar CPU model;
# --baseline-args 'ARGS' does the same for the baseline's runs; with the same binary as
# baseline it compares two settings, e.g. `--baseline .build/release/hostvisor --baseline-args
# '--softcpu-tier interp'` puts the interpreter alone beside the default translating tier.
# --no-qemu leaves QEMU out (for a hostvisor / baseline comparison alone); --no-microvm leaves
# QEMU's microvm machine out (the PC machine stays).
# --marker TEXT times the boot to another line of the console (e.g. 'Linux version' with
# --cmdline-extra earlyprintk=ttyS0, the end of the bzImage decompressor), to compare one phase
# of the boot; --cmdline-extra 'ARGS' appends to the kernel command line of every VMM.
# --paired starts the configurations of a round at the same time instead of one after the other,
# so they share whatever else the host is running in the same seconds: on a host whose CPU time
# varies by a third from one run to the next, the per-round ratios of two configurations run
# side by side spread far less than those of consecutive runs. Use it with two configurations
# on a host with two free cores (e.g. --no-qemu with --baseline, or --no-microvm without it).
# --guest DIR boots another guest folder made by scripts/make-default-guest.sh, e.g.
# .cache/guest-686 (`make guest-686`: Debian's 32-bit 686 kernel and an i386 busybox; QEMU
# boots it with the same 64-bit CPU model, as a 64-bit PC boots a 32-bit kernel).
#
#   scripts/bench-boot.sh [--runs N] [--hostvisor PATH] [--baseline PATH]
#                         [--hostvisor-args 'ARGS'] [--baseline-args 'ARGS'] [--no-qemu] [--no-microvm] [--guest DIR]
#                         [--marker TEXT] [--cmdline-extra 'ARGS'] [--paired]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=3
hostvisor=.build/release/hostvisor
baseline=
hostvisor_args=()
baseline_args=()
no_qemu=
no_microvm=
paired=
guest=.cache/guest
marker=HOSTVISOR-GUEST-READY
cmdline_extra=
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --hostvisor) hostvisor="$2"; shift 2 ;;
    --baseline) baseline="$2"; shift 2 ;;
    --hostvisor-args) read -r -a hostvisor_args <<<"$2"; shift 2 ;;
    --baseline-args) read -r -a baseline_args <<<"$2"; shift 2 ;;
    --no-qemu) no_qemu=1; shift ;;
    --no-microvm) no_microvm=1; shift ;;
    --paired) paired=1; shift ;;
    --guest) guest="$2"; shift 2 ;;
    --marker) marker="$2"; shift 2 ;;
    --cmdline-extra) cmdline_extra=" $2"; shift 2 ;;
    *) echo "usage: $0 [--runs N] [--hostvisor PATH] [--baseline PATH] [--hostvisor-args 'ARGS'] [--baseline-args 'ARGS'] [--no-qemu] [--no-microvm] [--guest DIR] [--marker TEXT] [--cmdline-extra 'ARGS'] [--paired]" >&2; exit 2 ;;
  esac
done
cmdline="console=ttyS0 panic=-1$cmdline_extra"
limit=120
[ -x "$hostvisor" ] || { echo "missing $hostvisor: run 'make build' first" >&2; exit 1; }
[ -z "$baseline" ] || [ -x "$baseline" ] || { echo "missing baseline binary $baseline" >&2; exit 1; }
if [ ! -f "$guest/vmlinuz" ]; then
  case "$guest" in
    .cache/guest) scripts/make-default-guest.sh "$guest" ;;
    .cache/guest-686) scripts/make-default-guest.sh --i386 "$guest" ;;
    *) echo "missing $guest/vmlinuz: make the guest with scripts/make-default-guest.sh" >&2; exit 1 ;;
  esac
fi
command -v qemu-system-x86_64 >/dev/null || { echo "missing qemu-system-x86_64: apt-get install qemu-system-x86" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/hostvisor-bench-boot.XXXXXX")
trap 'rm -rf "$work"' EXIT

qemu_cpu="qemu64,-svm,+sse3,+ssse3,+sse4.1,+sse4.2,+popcnt,+movbe,+pclmulqdq,+cx16,+erms,+abm,+pdpe1gb,+nx"
qemu_cpu+=",+avx,+avx2,+fma,+f16c,+bmi1,+bmi2,+xsave,+xsaveopt,+clflushopt,+clwb,+rdtscp"
clock_ticks=$(getconf CLK_TCK)

# time_to_marker LOG CMD...: "<wall seconds> <cpu seconds>" until the marker appears in LOG (where
# CMD writes the guest's serial console), or "fail fail". CMD is stopped once the marker is seen.
# Both VMMs write the console to a file: QEMU's stdio serial behaves differently when its
# standard input is not a terminal.
time_to_marker() {
  local log=$1 start end pid ticks
  shift
  : >"$log"
  start=$(date +%s.%N)
  "$@" </dev/null >/dev/null 2>"$log.err" &
  pid=$!
  while ! grep -q "$marker" "$log" 2>/dev/null; do
    if ! kill -0 $pid 2>/dev/null || [ "$(echo "$(date +%s.%N) - $start > $limit" | bc)" = 1 ]; then
      kill $pid 2>/dev/null || true
      wait $pid 2>/dev/null || true
      echo "time_to_marker: $1 did not reach the marker; its last output:" >&2
      tail -n 3 "$log" "$log.err" >&2 || true
      echo fail fail
      return
    fi
    sleep 0.01
  done
  end=$(date +%s.%N)
  # utime + stime of the whole process (fields 14 and 15; the command name in field 2 has no spaces).
  ticks=$(awk '{print $14 + $15}' /proc/$pid/stat)
  kill $pid 2>/dev/null || true
  wait $pid 2>/dev/null || true
  echo "$(echo "$end - $start" | bc) $(echo "$ticks / $clock_ticks" | bc -l)"
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

configs=(hostvisor)
[ -z "$baseline" ] || configs+=(baseline)
[ -n "$no_qemu" ] || [ -n "$no_microvm" ] || configs+=(qemu-microvm)
[ -n "$no_qemu" ] || configs+=(qemu-pc)
run_config() {
  local log="$work/$1.log"
  case $1 in
    hostvisor | baseline)
      # The VMM itself is measured (/proc/PID/stat), so not under the sandbox's supervisor.
      local binary="$hostvisor" extra=(--no-sandbox "${hostvisor_args[@]}")
      [ "$1" = baseline ] && binary="$baseline" extra=(--no-sandbox "${baseline_args[@]}")
      time_to_marker "$log" "$binary" run --accel soft "${extra[@]}" --serial "file:$log" --memory 512M \
        --kernel $guest/vmlinuz --initrd $guest/initramfs.cpio.gz --cmdline "$cmdline" ;;
    qemu-microvm)
      time_to_marker "$log" qemu-system-x86_64 -accel tcg -M microvm -cpu "$qemu_cpu" -nodefaults -no-user-config \
        -m 512M -display none -serial "file:$log" -monitor none -no-reboot \
        -kernel $guest/vmlinuz -initrd $guest/initramfs.cpio.gz -append "$cmdline" ;;
    qemu-pc)
      time_to_marker "$log" qemu-system-x86_64 -accel tcg -M pc -cpu "$qemu_cpu" -nodefaults -no-user-config \
        -m 512M -display none -serial "file:$log" -monitor none -no-reboot \
        -kernel $guest/vmlinuz -initrd $guest/initramfs.cpio.gz -append "$cmdline" ;;
  esac
}

# A run that does not reach the marker within the limit is reported as "fail" and left out of
# the medians; the script fails when Hostvisor has a failed run or a configuration has none left.
declare -A walls cpus fails
for ((i = 1; i <= runs; i++)); do
  line="run $i:"
  if [ -n "$paired" ]; then
    for c in "${configs[@]}"; do run_config "$c" >"$work/$c.result" & done
    wait
  fi
  for c in "${configs[@]}"; do
    if [ -n "$paired" ]; then
      read -r wall cpu <"$work/$c.result"
    else
      read -r wall cpu < <(run_config "$c")
    fi
    if [ "$wall" = fail ]; then
      fails[$c]=$((${fails[$c]:-0} + 1))
      line+="  $c fail"
    else
      walls[$c]+="$wall "
      cpus[$c]+="$cpu "
      line+=$(printf '  %s %.2fs wall %.2fs cpu' "$c" "$wall" "$cpu")
    fi
  done
  echo "$line"
done
# The ratio of each round (the two first configurations; run side by side with --paired).
if [ ${#configs[@]} -ge 2 ]; then
  first=${configs[0]} second=${configs[1]}
  read -r -a firsts <<<"${cpus[$first]:-}"
  read -r -a seconds <<<"${cpus[$second]:-}"
  if [ ${#firsts[@]} -eq ${#seconds[@]} ] && [ ${#firsts[@]} -gt 0 ]; then
    rounds=()
    for ((k = 0; k < ${#firsts[@]}; k++)); do rounds+=("$(echo "${firsts[$k]} / ${seconds[$k]}" | bc -l)"); done
    printf 'per-round cpu ratio %s / %s: median %.2f (%s)\n' "$first" "$second" \
      "$(printf '%s\n' "${rounds[@]}" | median)" "$(printf '%.2f ' "${rounds[@]}")"
  fi
fi
declare -A mw mc
status=0
for c in "${configs[@]}"; do
  if [ -z "${walls[$c]:-}" ]; then
    echo "median $c: no run reached '$marker' within ${limit}s"
    status=1
    continue
  fi
  mw[$c]=$(printf '%s\n' ${walls[$c]} | median)
  mc[$c]=$(printf '%s\n' ${cpus[$c]} | median)
  printf 'median %-13s wall %6.2fs  cpu %6.2fs  (%d failed runs)\n' "$c" "${mw[$c]}" "${mc[$c]}" "${fails[$c]:-0}"
done
[ -n "${fails[hostvisor]:-}" ] && status=1
for q in baseline qemu-microvm qemu-pc; do
  [ -n "${mc[$q]:-}" ] && [ -n "${mc[hostvisor]:-}" ] || continue
  printf 'ratio hostvisor / %-13s cpu %.2f  wall %.2f\n' "$q" "$(echo "${mc[hostvisor]} / ${mc[$q]}" | bc -l)" \
    "$(echo "${mw[hostvisor]} / ${mw[$q]}" | bc -l)"
done
exit $status
