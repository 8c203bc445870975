#!/usr/bin/env bash
# Spec conformance of the control API: schemathesis (PyPI) against both spec files, with a
# fixed small budget (EXAMPLES per operation, fixed seed), on a `hostvisor serve` socket.
# schemathesis speaks TCP, so scripts/api/unix_forwarder.py carries its connections from a
# loopback port to the Unix socket. Checks: no 5xx, response schemas, content types, negative
# data rejected; for Firecracker also the documented status codes (every Firecracker operation
# documents `default`, Cloud Hypervisor's document only their success codes, so the 400s for
# bad bodies would count as undocumented there).
# Not fuzzed: operations that write files at paths the client names (logger, metrics,
# snapshots, migration), vmm.shutdown (it ends the server), and PATCH /machine-config, whose
# spec reuses the PUT schema with its required fields although the operation is a partial
# update (Firecracker, and Hostvisor, accept `{"smt": false}`; the curl tests cover it).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
EXAMPLES=${EXAMPLES:-8}
HOSTVISOR=${HOSTVISOR:-$root/.build/release/hostvisor}
SPECS=${SPECS:-$root/../shared/specs}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
work=$(mktemp -d /tmp/hv-conformance.XXXXXX)
socket=$work/api.sock
stop_server() {
  [ -n "${forwarder:-}" ] && kill "$forwarder" 2>/dev/null || true
  [ -n "${server:-}" ] && kill "$server" 2>/dev/null || true
  wait 2>/dev/null || true
  forwarder=; server=
}
trap 'stop_server; rm -rf "$work"' EXIT
# A fresh server for each spec; it runs in the scratch folder, so relative paths a generated
# request names land there.
start_server() {
  rm -f "$socket"
  (cd "$work" && exec "$HOSTVISOR" serve --api-sock "$socket" --accel soft </dev/null >"$work/serve.log" 2>&1) &
  server=$!
  python3 "$root/scripts/api/unix_forwarder.py" "$PORT" "$socket" &
  forwarder=$!
  for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.1; done
  [ -S "$socket" ] || { echo "api-conformance: the server did not start"; cat "$work/serve.log"; exit 1; }
  sleep 0.3
}
check_server() {
  kill -0 "$server" 2>/dev/null || { echo "api-conformance: the server died"; cat "$work/serve.log"; exit 1; }
}

common=(--max-examples "$EXAMPLES" --seed 1 --request-timeout 20 --no-color --generation-deterministic
  --suppress-health-check all --warnings off)
status=0
cd "$work"  # schemathesis keeps its example database in the current folder
echo "== Firecracker API (firecracker.yaml)"
start_server
schemathesis run "$SPECS/firecracker/firecracker.yaml" --url "http://127.0.0.1:$PORT" "${common[@]}" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection \
  --exclude-path /logger --exclude-path /metrics --exclude-path /snapshot/create --exclude-path /snapshot/load \
  --exclude-operation-id patchMachineConfiguration \
  || status=1
check_server
stop_server
echo "== Cloud Hypervisor API (cloud-hypervisor.yaml)"
start_server
schemathesis run "$SPECS/cloud-hypervisor/cloud-hypervisor.yaml" --url "http://127.0.0.1:$PORT/api/v1" "${common[@]}" \
  --checks not_a_server_error,content_type_conformance,response_schema_conformance,negative_data_rejection \
  --exclude-path /vmm.shutdown --exclude-path /vm.snapshot --exclude-path /vm.restore \
  --exclude-path /vm.send-migration --exclude-path /vm.receive-migration --exclude-path /vm.coredump \
  || status=1
check_server
exit $status
