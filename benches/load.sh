#!/usr/bin/env bash
# Load run over mTLS keep-alive, in one run so every number shares the machine state:
# the bare axum+rustls baseline (one AES-256-GCM seal of 32 bytes per request), kms-server
# `POST /v1/unwrap`, `POST /v1/keys/demo/datakey` and `POST /v1/batch` of 100 unwraps, at
# each concurrency level in turn; then the new-connection rate (one full mTLS handshake +
# one request per connection) with and without TLS session resumption, server and baseline.
#
# Usage: bash benches/load.sh [duration-seconds] [concurrency levels...]
#   e.g. bash benches/load.sh 10 1 16 64 256
# Loopback only; every run is bounded in time. The load generator and the server share
# the machine's cores. Prints Markdown tables; raw JSON lines go to bench-results/.
duration=${1:-10}
shift || true
levels=${*:-1 16 64 256}
source "$(dirname "$0")/common.sh"
out_dir=bench-results
mkdir -p "$out_dir"
out="$out_dir/load-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
start_bench_dev
base=$(free_port)
"$bin/baseline" --listen "127.0.0.1:$base" --cert "$pki/server.pem" --key "$pki/server-key.pem" --client-ca "$pki/ca.pem" &
pids+=($!)
sleep 0.5
# One wrapped DEK with a context, as a provider would send it.
ctx='{"tenant":"acme","object":"invoices/42"}'
unwrap_body "$pki" "$api" "$ctx" "$work/unwrap.json"
# The baseline reads a body of the same size and ignores it.
cp "$work/unwrap.json" "$work/baseline.json"
printf '{"context":%s}' "$ctx" > "$work/datakey.json"
python3 - "$work/unwrap.json" "$work/batch.json" <<'PY'
import json, sys
one = json.load(open(sys.argv[1]))
json.dump({"items": [dict(op="unwrap", **one) for _ in range(100)]}, open(sys.argv[2], "w"))
PY

gen() { "$bin/loadgen" --addr "127.0.0.1:$1" --path "$2" --body "$3" --ca "$pki/ca.pem" \
  --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --warmup 2 --concurrency "$4" --label "$5" "${@:6}"; }

echo "| c | baseline req/s | unwrap req/s | p50 / p99 / p99.9 (ms) | unwrap / baseline | datakey req/s | p50 / p99 / p99.9 (ms) | batch(100) req/s | DEKs/s | p50 / p99 / p99.9 (ms) | errors |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for c in $levels; do
  b=$(gen "$base" /seal "$work/baseline.json" "$c" baseline); echo "$b" >> "$out"
  u=$(gen "$api" /v1/unwrap "$work/unwrap.json" "$c" unwrap); echo "$u" >> "$out"
  d=$(gen "$api" /v1/keys/demo/datakey "$work/datakey.json" "$c" datakey); echo "$d" >> "$out"
  t=$(gen "$api" /v1/batch "$work/batch.json" "$c" batch100); echo "$t" >> "$out"
  python3 - "$b" "$u" "$d" "$t" <<'PY'
import json, sys
b, u, d, t = (json.loads(a) for a in sys.argv[1:])
ms = lambda x: f"{x/1000:.2f}"
pct = lambda r: f"{ms(r['p50_us'])} / {ms(r['p99_us'])} / {ms(r['p999_us'])}"
print(f"| {u['concurrency']} | {b['rps']:.0f} | {u['rps']:.0f} | {pct(u)} | {u['rps']/b['rps']:.2f} | "
      f"{d['rps']:.0f} | {pct(d)} | {t['rps']:.0f} | {t['rps']*100:.0f} | {pct(t)} | "
      f"{b['errors']}+{u['errors']}+{d['errors']}+{t['errors']} |")
PY
done

echo
echo "New connections (c=16, one mTLS handshake + one request each):"
echo
echo "| target | resumption | connections/s | p50 / p99 (ms) | errors |"
echo "|---|---|---|---|---|"
for target in baseline kms-server; do
  for resume in off on; do
    if [ "$target" = baseline ]; then port=$base; path=/seal; body="$work/baseline.json"; else port=$api; path=/v1/unwrap; body="$work/unwrap.json"; fi
    flags=(--reconnect); [ "$resume" = off ] && flags+=(--no-resume)
    r=$(gen "$port" "$path" "$body" 16 "connect-$target-resume-$resume" "${flags[@]}"); echo "$r" >> "$out"
    python3 - "$target" "$resume" "$r" <<'PY'
import json, sys
t, res, r = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
print(f"| {t} | {res} | {r['rps']:.0f} | {r['p50_us']/1000:.2f} / {r['p99_us']/1000:.2f} | {r['errors']} |")
PY
  done
done
echo
echo "raw results: $out"
