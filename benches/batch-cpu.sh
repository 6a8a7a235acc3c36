#!/usr/bin/env bash
# Batch unwrap per server core: POST /v1/batch of 100 unwraps at concurrency C over mTLS
# keep-alive, and the server process's own CPU time (user + system, from /proc) over the
# measured window. DEKs per server CPU-second is the per-core rate, independent of the
# load generator sharing the machine.
#
# Usage: bash benches/batch-cpu.sh [duration-seconds] [concurrency]
duration=${1:-10}
conc=${2:-64}
source "$(dirname "$0")/common.sh"
start_bench_dev
spid=${pids[0]}
unwrap_body "$pki" "$api" '{"tenant":"acme","object":"invoices/42"}' "$work/unwrap.json"
python3 - "$work/unwrap.json" "$work/batch.json" <<'PY'
import json, sys
one = json.load(open(sys.argv[1]))
json.dump({"items": [dict(op="unwrap", **one) for _ in range(100)]}, open(sys.argv[2], "w"))
PY
tick=$(getconf CLK_TCK)
"$bin/loadgen" --addr "127.0.0.1:$api" --path /v1/batch --body "$work/batch.json" --ca "$pki/ca.pem" \
  --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --warmup 2 --concurrency "$conc" \
  --label batch100 > "$work/out.json" &
lg=$!
sleep 2
c0=$(awk '{print $14 + $15}' "/proc/$spid/stat")
sleep "$duration"
c1=$(awk '{print $14 + $15}' "/proc/$spid/stat")
wait $lg
python3 - "$work/out.json" "$c0" "$c1" "$tick" "$duration" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); c0, c1, tick, d = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cpu = (c1 - c0) / tick
deks = r["rps"] * 100
print(f"| {r['concurrency']} | {r['rps']:.0f} | {deks:.0f} | {cpu/d:.2f} | {deks/(cpu/d):.0f} | {r['p50_us']/1000:.2f} / {r['p99_us']/1000:.2f} | {r['errors']} |")
PY
