#!/bin/sh
# Checks that a Hostvisor binary runs without a Swift toolchain: it links no Swift, Foundation
# or ICU shared library, and starts (prints its help) with a minimal environment.
# Usage: scripts/check-dist.sh BINARY
set -eu
binary=${1:?usage: scripts/check-dist.sh BINARY}
libraries=$(ldd "$binary")
if printf '%s\n' "$libraries" | grep -Ei 'swift|foundation|icu|dispatch' >/dev/null; then
  echo "check-dist: $binary still loads toolchain libraries:" >&2
  printf '%s\n' "$libraries" | grep -Ei 'swift|foundation|icu|dispatch' >&2
  exit 1
fi
env -i PATH=/usr/bin:/bin "$binary" --help >/dev/null
echo "check-dist: $binary is self-contained: $(printf '%s\n' "$libraries" | wc -l) shared objects (glibc and the C++ runtime), $(du -m "$binary" | cut -f1) MiB"
