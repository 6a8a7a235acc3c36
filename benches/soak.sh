#!/usr/bin/env bash
# Soak: a mixed workload at ~70 % of peak for MINUTES minutes against one server, in
# one-minute windows: unwrap 50 %, datakey 30 %, rewrap 20 % of the requests (paced, so
# latency counts from each request's scheduled time; peak = the same mix unpaced), the demo key rotated once a window.
# Per window: requests/s, p50 / p99 per operation, errors, and the server's resident memory.
# At the end: errors in total and memory after warm-up (window 3) against the last window.
#
# Usage: bash benches/soak.sh [minutes] [fraction-of-peak]
#   e.g. bash benches/soak.sh 30 0.7
# Loopback only; bounded in time. The load generators share the machine with the server.
minutes=${1:-30}
fraction=${2:-0.7}
source "$(dirname "$0")/common.sh"
start_bench_dev
spid=${pids[0]}
ctx='{"tenant":"acme","object":"invoices/42"}'
unwrap_body "$pki" "$api" "$ctx" "$work/unwrap.json"
printf '{"context":%s}' "$ctx" > "$work/datakey.json"
gen() { "$bin/loadgen" --addr "127.0.0.1:$api" --path "$1" --body "$2" --ca "$pki/ca.pem" \
  --cert "$pki/app.pem" --key "$pki/app-key.pem" --warmup 0 --label "$3" "${@:4}"; }
rss_mib() { awk '/^VmRSS/ {printf "%.1f", $2/1024}' "/proc/$spid/status"; }
# The mix's own peak: the three generators unpaced for 10 s, 64 connections in all
# (split as the mix: unwrap 32, datakey 19, rewrap 13), requests/s summed.
mix() { # duration [extra flags for unwrap] [datakey] [rewrap]
  gen /v1/unwrap "$work/unwrap.json" unwrap --duration "$1" --concurrency 32 ${2:-} > "$work/u.json" &
  local a=$!
  gen "/v1/keys/demo/datakey" "$work/datakey.json" datakey --duration "$1" --concurrency 19 ${3:-} > "$work/d.json" &
  local b=$!
  gen /v1/rewrap "$work/unwrap.json" rewrap --duration "$1" --concurrency 13 ${4:-} > "$work/r.json" &
  local c=$!
  wait $a $b $c
}
mix 10
peak=$(python3 -c "import json; print(sum(json.load(open('$work/' + f + '.json'))['rps'] for f in 'udr'))")
total=$(python3 -c "print($peak * $fraction)")
echo "peak of the mix $peak req/s (64 connections, 10 s, unpaced); soak at $fraction of it: $total req/s in total (unwrap 50 %, datakey 30 %, rewrap 20 %)"
echo
echo "| minute | RSS (MiB) | unwrap req/s | p50 / p99 (ms) | datakey req/s | p50 / p99 (ms) | rewrap req/s | p50 / p99 (ms) | errors |"
echo "|---|---|---|---|---|---|---|---|---|"
errors=0; rss_warm=""; rss_max=0
for w in $(seq 1 "$minutes"); do
  ( sleep 30
    curl -sf --cacert "$pki/ca.pem" --cert "$pki/admin.pem" --key "$pki/admin-key.pem" -H 'content-type: application/json' \
      -d '{}' "https://127.0.0.1:$api/v1/keys/demo/rotate" >/dev/null || touch "$work/rotate-failed" ) &
  rot=$!
  mix 60 "--rate $(python3 -c "print($total*0.5)")" "--rate $(python3 -c "print($total*0.3)")" "--rate $(python3 -c "print($total*0.2)")"
  wait $rot
  [ -e "$work/rotate-failed" ] && { errors=$((errors+1)); rm -f "$work/rotate-failed"; }
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
