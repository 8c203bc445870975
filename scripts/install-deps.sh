#!/usr/bin/env bash
# Installs the Debian packages Hostvisor's build, tests, default guest and benchmarks need.
# Idempotent; does nothing when everything is present.
set -euo pipefail
need=()
for pair in as:binutils ld:binutils busybox:busybox-static cpio:cpio xz:xz-utils zstd:zstd \
            qemu-system-x86_64:qemu-system-x86 gcc:gcc make:make iasl:acpica-tools ip:iproute2 \
            objdump:binutils bc:bc debugfs:e2fsprogs e2fsck:e2fsprogs passt:passt setpriv:util-linux \
            curl:curl gdb:gdb; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  if [ "$cmd" = busybox ]; then [ -x /bin/busybox ] && continue; fi
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  # A mirror in the middle of a sync fails the update ("File has unexpected size"): try again,
  # then go on with the lists there are.
  for attempt in 1 2 3; do
    $SUDO apt-get update -qq && break
    [ "$attempt" = 3 ] || { echo "install-deps: apt-get update failed, trying again in 20 s" >&2; sleep 20; }
  done
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Python clients for the control-plane tests: firecracker-python (a real Firecracker client)
# and schemathesis (spec conformance, scripts/api-conformance.sh).
if ! python3 -c "import firecracker.api, schemathesis" >/dev/null 2>&1; then
  python3 -m pip install -q --root-user-action=ignore firecracker-python==0.0.5 schemathesis >/dev/null
fi
# vncdotool: a real VNC client for the display tests (captures, typing).
if ! command -v vncdo >/dev/null 2>&1; then
  python3 -m pip install -q --root-user-action=ignore vncdotool==1.4.2 >/dev/null
fi
