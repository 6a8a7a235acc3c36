#!/usr/bin/env bash
# Load run over mTLS keep-alive: kms-server `POST /v1/unwrap` against the bare axum+rustls
# baseline (one AES-256-GCM seal of 32 bytes per request), in the same run, alternating
# per concurrency level so both see the same machine state.
#
# Usage: bash benches/load.sh [duration-seconds] [concurrency levels...]
#   e.g. bash benches/load.sh 10 1 16 64
# Loopback only; every run is bounded in time. Prints a Markdown table and writes the raw
# JSON lines to bench-results/load-<date>.jsonl.
duration=${1:-10}
shift || true
levels=${*:-1 16 64}
source "$(dirname "$0")/common.sh"
out_dir=bench-results
mkdir -p "$out_dir"
out="$out_dir/load-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
api=$(free_port); ops=$(free_port); base=$(free_port)
start_dev "$work/dev" "$api" "$ops"
pki="$work/dev/pki"
"$bin/baseline" --listen "127.0.0.1:$base" --cert "$pki/server.pem" --key "$pki/server-key.pem" --client-ca "$pki/ca.pem" &
pids+=($!)
sleep 0.5
# One wrapped DEK with a context, as a provider would send it.
unwrap_body "$pki" "$api" '{"tenant":"acme","object":"invoices/42"}' "$work/unwrap.json"
# The baseline reads a body of the same size and ignores it.
cp "$work/unwrap.json" "$work/baseline.json"

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
