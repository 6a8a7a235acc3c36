#!/usr/bin/env bash
# Load run over mTLS keep-alive: kms-server `POST /v1/unwrap` against the bare axum+rustls
# baseline (one AES-256-GCM seal of 32 bytes per request), in the same run, alternating
# per concurrency level so both see the same machine state.
#
# Usage: bash benches/load.sh [duration-seconds] [concurrency levels...]
#   e.g. bash benches/load.sh 10 1 16 64
# Loopback only; every run is bounded in time. Prints a Markdown table and writes the raw
# JSON lines to bench-results/load-<date>.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
shift || true
levels=${*:-1 16 64}

cargo build --release -q -p kms-server -p keyhold-benches
bin=target/release
work=$(mktemp -d)
out_dir=bench-results
mkdir -p "$out_dir"
out="$out_dir/load-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
api=$(free_port); ops=$(free_port); base=$(free_port)

RUST_LOG=warn "$bin/kms-server" dev --data-dir "$work/dev" --listen "127.0.0.1:$api" --ops-listen "127.0.0.1:$ops" 2>"$work/server.log" &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$ops/readyz" >/dev/null && break; sleep 0.1; done
pki="$work/dev/pki"
"$bin/baseline" --listen "127.0.0.1:$base" --cert "$pki/server.pem" --key "$pki/server-key.pem" --client-ca "$pki/ca.pem" &
pids+=($!)
sleep 0.5

# One wrapped DEK with a context, as a provider would send it.
curl_app=(curl -sS --cacert "$pki/ca.pem" --cert "$pki/app.pem" --key "$pki/app-key.pem" -H 'content-type: application/json')
wrapped=$("${curl_app[@]}" -d '{"context":{"tenant":"acme","object":"invoices/42"}}' "https://127.0.0.1:$api/v1/keys/demo/datakey" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["wrapped"])')
printf '{"wrapped":"%s","context":{"tenant":"acme","object":"invoices/42"}}' "$wrapped" > "$work/unwrap.json"
# The baseline reads a body of the same size and ignores it.
cp "$work/unwrap.json" "$work/baseline.json"
"${curl_app[@]}" -d @"$work/unwrap.json" "https://127.0.0.1:$api/v1/unwrap" | grep -q plaintext

gen() { "$bin/loadgen" --addr "127.0.0.1:$1" --path "$2" --body "$3" --ca "$pki/ca.pem" \
  --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --warmup 2 --concurrency "$4" --label "$5"; }

echo "| concurrency | baseline req/s | baseline p50 / p99 (ms) | unwrap req/s | unwrap p50 / p99 / p99.9 (ms) | ratio | errors |"
echo "|---|---|---|---|---|---|---|"
for c in $levels; do
  b=$(gen "$base" /seal "$work/baseline.json" "$c" baseline); echo "$b" >> "$out"
  u=$(gen "$api" /v1/unwrap "$work/unwrap.json" "$c" unwrap); echo "$u" >> "$out"
  python3 - "$b" "$u" <<'PY'
import json, sys
b, u = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ms = lambda x: f"{x/1000:.2f}"
print(f"| {u['concurrency']} | {b['rps']:.0f} | {ms(b['p50_us'])} / {ms(b['p99_us'])} | {u['rps']:.0f} | "
      f"{ms(u['p50_us'])} / {ms(u['p99_us'])} / {ms(u['p999_us'])} | {u['rps']/b['rps']:.2f} | {b['errors']}+{u['errors']} |")
PY
done
echo
echo "raw results: $out"
