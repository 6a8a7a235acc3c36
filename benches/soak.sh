#!/usr/bin/env bash
# Soak: a mixed workload at ~70 % of peak for MINUTES minutes against one server, in
# one-minute windows: unwrap 50 %, datakey 30 %, rewrap 20 % of the requests (paced, so
# latency counts from each request's scheduled time), the demo key rotated once a window.
# Per window: requests/s, p50 / p99 per operation, errors, and the server's resident memory.
# At the end: errors in total and memory after warm-up (window 3) against the last window.
#
# Usage: bash benches/soak.sh [minutes] [fraction-of-peak]
#   e.g. bash benches/soak.sh 30 0.7
# Loopback only; bounded in time. The load generators share the machine with the server.
minutes=${1:-30}
fraction=${2:-0.7}
source "$(dirname "$0")/common.sh"
api=$(free_port); ops=$(free_port)
start_dev "$work/dev" "$api" "$ops"
spid=${pids[0]}
pki="$work/dev/pki"
ctx='{"tenant":"acme","object":"invoices/42"}'
unwrap_body "$pki" "$api" "$ctx" "$work/unwrap.json"
printf '{"context":%s}' "$ctx" > "$work/datakey.json"
gen() { "$bin/loadgen" --addr "127.0.0.1:$api" --path "$1" --body "$2" --ca "$pki/ca.pem" \
  --cert "$pki/app.pem" --key "$pki/app-key.pem" --warmup 0 --label "$3" "${@:4}"; }
rss_mib() { awk '/^VmRSS/ {printf "%.1f", $2/1024}' "/proc/$spid/status"; }
peak=$(gen /v1/unwrap "$work/unwrap.json" peak --duration 5 --concurrency 64 | python3 -c 'import json,sys; print(json.load(sys.stdin)["rps"])')
total=$(python3 -c "print($peak * $fraction)")
echo "peak unwrap $peak req/s (c=64, 5 s); soak at $fraction of it: $total req/s in total"
echo
echo "| minute | RSS (MiB) | unwrap req/s | p50 / p99 (ms) | datakey req/s | p50 / p99 (ms) | rewrap req/s | p50 / p99 (ms) | errors |"
echo "|---|---|---|---|---|---|---|---|---|"
errors=0; rss_warm=""; rss_max=0
for w in $(seq 1 "$minutes"); do
  gen /v1/unwrap "$work/unwrap.json" unwrap --duration 60 --concurrency 16 --rate "$(python3 -c "print($total*0.5)")" > "$work/u.json" &
  a=$!
  gen "/v1/keys/demo/datakey" "$work/datakey.json" datakey --duration 60 --concurrency 8 --rate "$(python3 -c "print($total*0.3)")" > "$work/d.json" &
  b=$!
  gen /v1/rewrap "$work/unwrap.json" rewrap --duration 60 --concurrency 8 --rate "$(python3 -c "print($total*0.2)")" > "$work/r.json" &
  c=$!
  sleep 30
  curl -sf --cacert "$pki/ca.pem" --cert "$pki/admin.pem" --key "$pki/admin-key.pem" -H 'content-type: application/json' \
    -d '{}' "https://127.0.0.1:$api/v1/keys/demo/rotate" >/dev/null || errors=$((errors+1))
  wait $a $b $c
  rss=$(rss_mib)
  line=$(python3 - "$w" "$rss" "$work/u.json" "$work/d.json" "$work/r.json" <<'PY'
import json, sys
w, rss = sys.argv[1], sys.argv[2]
u, d, r = (json.load(open(p)) for p in sys.argv[3:6])
ms = lambda x: f"{x/1000:.2f}"
e = u["errors"] + d["errors"] + r["errors"]
print(f"| {w} | {rss} | {u['rps']:.0f} | {ms(u['p50_us'])} / {ms(u['p99_us'])} | {d['rps']:.0f} | {ms(d['p50_us'])} / {ms(d['p99_us'])} | "
      f"{r['rps']:.0f} | {ms(r['p50_us'])} / {ms(r['p99_us'])} | {e} |")
print(e)
PY
)
  echo "$line" | head -1
  errors=$((errors + $(echo "$line" | tail -1)))
  [ "$w" -eq 3 ] && rss_warm=$rss
  rss_max=$(python3 -c "print(max($rss_max, $rss))")
done
echo
echo "errors: $errors; RSS after warm-up (minute 3): ${rss_warm:-n/a} MiB, highest: $rss_max MiB, last: $(rss_mib) MiB"
echo "data dir at the end (store + audit trail): $(du -sm "$work/dev" | cut -f1) MiB"
