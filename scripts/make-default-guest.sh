#!/usr/bin/env bash
# Placeholder until the default-guest builder lands: creates the cache folder only.
set -euo pipefail
mkdir -p "${1:-.cache/guest}"
