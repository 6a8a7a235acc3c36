#!/usr/bin/env bash
# A CPU profile of kms-server under load: `kms-server dev`, `loadgen` on POST /v1/unwrap at
# concurrency C over mTLS keep-alive, and `perf record -g` of the server for 5 s in the
# middle of the run. Prints the share of each thread and the audit writer's top symbols;
# the profile stays in bench-results/ for `perf report -i`.
#
# Usage: bash benches/profile.sh [duration-seconds] [C]
duration=${1:-10}; c=${2:-64}
source "$(dirname "$0")/common.sh"
mkdir -p bench-results
data="bench-results/perf-$(date -u +%Y%m%dT%H%M%SZ).data"
api=$(free_port); ops=$(free_port)
start_dev "$work/d" "$api" "$ops"
pki="$work/d/pki"
unwrap_body "$pki" "$api" '{"tenant":"acme","object":"invoices/42"}' "$work/unwrap.json"
pid=$(pgrep -n -f "kms-server dev")
"$bin/loadgen" --addr "127.0.0.1:$api" --path /v1/unwrap --body "$work/unwrap.json" --ca "$pki/ca.pem" \
  --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --warmup 2 --concurrency "$c" --label unwrap > "$work/out.json" &
lg=$!
sleep 3
perf record -F 2000 -g -p "$pid" -o "$data" -- sleep 5 2>/dev/null
wait $lg
cat "$work/out.json"; echo
perf report -i "$data" --no-children --sort comm -q -g none 2>/dev/null | head -5
echo "audit writer, inclusive:"
perf report -i "$data" --children --comm keyhold-audit --sort sym -q -g none 2>/dev/null | head -12
echo "profile: $data"
