#!/usr/bin/env bash
# Runs the Swift test suite (optimized build) under a watchdog.
#
#   scripts/run-tests.sh [swift test arguments...]
#
# If the run has not finished after HOSTVISOR_TEST_TIME_LIMIT seconds (default 2400), the
# watchdog prints what is needed to find the hang and fails with status 124:
#   - the tests that started and did not finish (from Swift Testing's event lines),
#   - the process tree below the test runner (guests, helpers, servers it started),
#   - every thread's stack of the test runner, from gdb.
# Without a watchdog a hung test would only show as a CI run over its time, with the last
# lines of output lost in a pipe buffer.
set -uo pipefail
cd "$(dirname "$0")/.."
limit=${HOSTVISOR_TEST_TIME_LIMIT:-2400}
SWIFT=${SWIFT:-swift}
work=$(mktemp -d /tmp/hv-tests.XXXXXX)
log=$work/test.log
trap 'rm -rf "$work"' EXIT

# The log exists before its follower starts (the runner's redirection may come later).
: >"$log"
# stdbuf keeps the runner's lines flowing into the log as they are written.
setsid stdbuf -oL -eL "$SWIFT" test -c release -Xswiftc -enable-testing "$@" >"$log" 2>&1 &
runner=$!
tail -n +1 -f --pid=$runner "$log" &
follower=$!

unfinished_tests() {
  # "◇ Test NAME started." / "◇ Test case passing ... to NAME started." against the lines that
  # end a test ("✔ Test NAME passed", "✘ Test NAME failed", "➜ Test NAME skipped").
  python3 - "$log" <<'EOF'
import re, sys
started, ended = {}, set()
name = r'("[^"]*"|\S+)'
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    m = re.search(r"◇ Test " + name + r" started", line)
    if m:
        started.setdefault(m.group(1), line.strip())
    m = re.search(r"[✔✘➜] Test " + name + r" (?:with \d+ test cases? )?(?:passed|failed|skipped)", line)
    if m:
        ended.add(m.group(1))
for test, line in started.items():
    if test not in ended:
        print("  " + line)
EOF
}

diagnose() {
  echo
  echo "=== watchdog: the test run did not finish in ${limit} s ==="
  echo "--- tests started and not finished:"
  unfinished_tests
  echo "--- processes below the test run:"
  ps -o pid,ppid,etimes,stat,args --forest -g "$runner" 2>/dev/null | cut -c1-200
  for pid in $(pgrep -s "$runner" -f 'PackageTests|xctest|swiftpm-testing-helper'); do
    echo "--- threads of $pid ($(tr '\0' ' ' </proc/$pid/cmdline | cut -c1-120)):"
    timeout 120 gdb -p "$pid" -batch -nx -ex 'set pagination off' -ex 'thread apply all bt 12' \
      2>/dev/null | grep -E '^(Thread|#)' | cut -c1-220 | head -600
  done
}

start=$SECONDS
while kill -0 $runner 2>/dev/null; do
  if (( SECONDS - start > limit )); then
    diagnose
    kill -KILL -- -"$runner" 2>/dev/null
    wait $runner 2>/dev/null
    kill $follower 2>/dev/null
    exit 124
  fi
  sleep 5
done
wait $runner
status=$?
wait $follower 2>/dev/null
exit $status
