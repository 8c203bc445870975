#!/usr/bin/env bash
# All benchmarks, each side by side with its peer in one run (see docs/benchmarks.md).
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
echo "== KVM port-I/O exit round trip (Hostvisor vs a minimal C KVM_RUN loop)"
scripts/bench-kvm-exit.sh || status=1
echo "== Software CPU guest programs (Hostvisor soft vs QEMU TCG)"
scripts/bench-softcpu.sh || status=1
echo "== Linux boot to the shell marker (Hostvisor soft vs QEMU TCG)"
scripts/bench-boot.sh || status=1
echo "== virtio-blk and virtio-net throughput (Hostvisor soft vs QEMU TCG)"
if [ "$(id -u)" -eq 0 ]; then
  scripts/bench-virtio.sh || status=1
else
  echo "skipped: needs root (network namespace and TAP)"
fi
exit $status
