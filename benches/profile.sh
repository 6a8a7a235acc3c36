#!/usr/bin/env bash
# A CPU profile of kms-server under load: `kms-server dev`, `loadgen` on POST /v1/unwrap
# (or /v1/batch of 100 unwraps) at concurrency C over mTLS keep-alive, and `perf record -g`
# of the server for 5 s in the middle of the run. Prints the share of each thread, the
# audit writer's top symbols and the whole server's top symbols; the profile stays in
# bench-results/ for `perf report -i`.
#
# Usage: bash benches/profile.sh [duration-seconds] [C] [unwrap|batch]
# PERF_CALLGRAPH=dwarf gives callers through code built without frame pointers (costly:
# the server then serves fewer requests while it is recorded).
# EXTRA='\n[audit]\nenabled = false\n' is appended to the server's config (then the
# server runs `serve` over a dev data dir instead of `dev`).
duration=${1:-10}; c=${2:-64}; op=${3:-unwrap}; callgraph=${PERF_CALLGRAPH:-fp}
source "$(dirname "$0")/common.sh"
mkdir -p bench-results
data="bench-results/perf-$op-$(date -u +%Y%m%dT%H%M%SZ).data"
if [ -n "${EXTRA:-}" ]; then
  api=$(free_port); ops=$(free_port); api2=$(free_port); ops2=$(free_port)
  twin_dev_dirs "$work/on" "$work/off" "$api" "$ops" "$api2" "$ops2"
  printf "$EXTRA" >> "$work/on/kms-server.toml"
  RUST_LOG=warn "$bin/kms-server" serve --config "$work/on/kms-server.toml" 2>"$work/on.log" & pids+=($!)
  pki="$work/on/pki"
  wait_ready "$ops"
else
  start_bench_dev
fi
pid=${pids[-1]}
unwrap_body "$pki" "$api" '{"tenant":"acme","object":"invoices/42"}' "$work/unwrap.json"
case "$op" in
  unwrap) path=/v1/unwrap; body="$work/unwrap.json" ;;
  batch)
    path=/v1/batch; body="$work/batch.json"
    python3 - "$work/unwrap.json" "$body" <<'PY'
import json, sys
one = json.load(open(sys.argv[1]))
json.dump({"items": [dict(op="unwrap", **one) for _ in range(100)]}, open(sys.argv[2], "w"))
PY
    ;;
  *) echo "usage: profile.sh [duration] [C] [unwrap|batch]" >&2; exit 2 ;;
esac
"$bin/loadgen" --addr "127.0.0.1:$api" --path "$path" --body "$body" --ca "$pki/ca.pem" \
  --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --warmup 2 --concurrency "$c" --label "$op" > "$work/out.json" &
lg=$!
sleep 3
perf record -F 2000 --call-graph "$callgraph" -p "$pid" -o "$data" -- sleep 5 2>/dev/null
wait $lg
cat "$work/out.json"; echo
perf report -i "$data" --no-children --sort comm -q -g none 2>/dev/null | head -5
echo "audit writer, inclusive:"
perf report -i "$data" --children --comm keyhold-audit --sort sym -q -g none 2>/dev/null | head -12
echo "whole server, self:"
perf report -i "$data" --no-children --sort sym -q -g none 2>/dev/null | head -30
echo "profile: $data"
