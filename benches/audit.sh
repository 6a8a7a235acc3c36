#!/usr/bin/env bash
# What the audit trail costs: POST /v1/unwrap at concurrency 64 (and 16) against two
# servers over copies of the same store, one with the audit trail (the default) and one
# with `[audit] enabled = false`, alternating in the same run.
# Usage: [LEVELS="16 64 256"] bash benches/audit.sh [duration-seconds] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
rounds=${2:-2}
cargo build --release -q -p kms-server -p keyhold-benches
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
api=$(free_port); ops=$(free_port)
# Prepare the dev data dir (PKI, store, demo key), stop, and copy it.
RUST_LOG=warn "$bin/kms-server" dev --data-dir "$work/on" --listen "127.0.0.1:$api" --ops-listen "127.0.0.1:$ops" 2>/dev/null &
p=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$ops/readyz" >/dev/null && break; sleep 0.1; done
kill "$p"; wait "$p" 2>/dev/null || true
cp -r "$work/on" "$work/off"
api2=$(free_port); ops2=$(free_port)
sed -i "s/^listen = .*/listen = \"127.0.0.1:$api2\"/; s/^ops_listen = .*/ops_listen = \"127.0.0.1:$ops2\"/" "$work/off/kms-server.toml"
printf '\n[audit]\nenabled = false\n' >> "$work/off/kms-server.toml"
RUST_LOG=warn "$bin/kms-server" serve --config "$work/on/kms-server.toml" 2>"$work/on.log" &
pids+=($!)
RUST_LOG=warn "$bin/kms-server" serve --config "$work/off/kms-server.toml" 2>"$work/off.log" &
pids+=($!)
for port in $ops $ops2; do
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
done
pki="$work/on/pki"
curl_app=(curl -sS --cacert "$pki/ca.pem" --cert "$pki/app.pem" --key "$pki/app-key.pem" -H 'content-type: application/json')
wrapped=$("${curl_app[@]}" -d '{"context":{"tenant":"acme"}}' "https://127.0.0.1:$api/v1/keys/demo/datakey" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["wrapped"])')
printf '{"wrapped":"%s","context":{"tenant":"acme"}}' "$wrapped" > "$work/unwrap.json"
gen() { "$bin/loadgen" --addr "127.0.0.1:$1" --path /v1/unwrap --body "$work/unwrap.json" --ca "$pki/ca.pem" \
  --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --warmup 2 --concurrency "$2" --label "$3"; }
echo "| concurrency | round | audit off req/s (p50 / p99 ms) | audit on req/s (p50 / p99 ms) | on / off |"
echo "|---|---|---|---|---|"
for c in ${LEVELS:-16 64}; do
  for r in $(seq 1 "$rounds"); do
    off=$(gen "$api2" "$c" off); on=$(gen "$api" "$c" on)
    python3 - "$c" "$r" "$off" "$on" <<'PY'
import json, sys
c, r, off, on = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
f = lambda x: f"{x['rps']:.0f} ({x['p50_us']/1000:.2f} / {x['p99_us']/1000:.2f})"
print(f"| {c} | {r} | {f(off)} | {f(on)} | {on['rps']/off['rps']:.2f} |")
PY
  done
done
records=$(curl -sS --cacert "$pki/ca.pem" --cert "$pki/auditor.pem" --key "$pki/auditor-key.pem" \
  "https://127.0.0.1:$api/v1/audit?after=0&limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["head"]["seq"])')
echo
echo "audit records written by the audited server: $records"
