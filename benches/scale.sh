#!/usr/bin/env bash
# Scale run: 1 000, 100 000 and 1 000 000 KEKs in the store. For each size: server start-up
# time to ready (open the store, unseal from the key file, bind; measured from spawn to the
# first 200 from /readyz), resident memory after start and after the load, and unwrap at
# concurrency 16 over mTLS cycling through wrapped DEKs of 1 000 keys spread over the whole
# key space (cold keys: each first use loads the key from the store).
#
# Usage: bash benches/scale.sh [duration-seconds] [sizes...]
#   e.g. bash benches/scale.sh 10 1000 100000 1000000
# Stores are filled once on tmpfs (populate; ~1 min per million keys), cached in
# /dev/shm/keyhold-scale-N, and copied to disk for every run. Loopback only, bounded.
duration=${1:-10}
shift || true
sizes=${*:-1000 100000 1000000}
# How many different keys the load touches (SAMPLE=100000 goes past the keyring's cache of
# 100 000 keys by default at 1M KEKs: cold loads and evictions).
sample=${SAMPLE:-1000}
source "$(dirname "$0")/common.sh"

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

echo "keys touched by the load: $sample"
echo "| KEKs | store size | start-up to ready (s) | RSS after start (MiB) | unwrap req/s (c=16) | p50 / p99 (ms) | RSS after load (MiB) | errors |"
echo "|---|---|---|---|---|---|---|---|"
for n in $sizes; do
  api=$(free_port); ops=$(free_port)
  cache="/dev/shm/keyhold-scale-$n-$sample"
  if [ ! -f "$cache/unwrap-bodies.jsonl" ]; then
    rm -rf "$cache"
    "$bin/populate" --dir "$cache" --keys "$n" --sample "$sample" --listen 127.0.0.1:1 --ops-listen 127.0.0.1:2 >&2
  fi
  d="$work/scale-$n"
  rm -rf "$d"; cp -r "$cache" "$d"
  sed -i "s/^listen = .*/listen = \"127.0.0.1:$api\"/; s/^ops_listen = .*/ops_listen = \"127.0.0.1:$ops\"/" "$d/kms-server.toml"
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  t0=$(date +%s.%N)
  RUST_LOG=warn "$bin/kms-server" serve --config "$d/kms-server.toml" 2>"$d.log" &
  pid=$!; pids+=($pid)
  until curl -sf "http://127.0.0.1:$ops/readyz" >/dev/null; do sleep 0.02; done
  t1=$(date +%s.%N)
  rss0=$(rss_kib "$pid")
  r=$("$bin/loadgen" --addr "127.0.0.1:$api" --path /v1/unwrap --body "$d/unwrap-bodies.jsonl" --lines \
      --ca "$d/pki/ca.pem" --cert "$d/pki/app.pem" --key "$d/pki/app-key.pem" \
      --duration "$duration" --warmup 0 --concurrency 16 --label "scale-$n")
  rss1=$(rss_kib "$pid")
  size=$(du -sh "$d/keyhold.redb" | cut -f1)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  python3 - "$n" "$size" "$t0" "$t1" "$rss0" "$rss1" "$r" <<'PY'
import json, sys
n, size, t0, t1, rss0, rss1, r = sys.argv[1:]
r = json.loads(r)
ms = lambda x: f"{x/1000:.2f}"
print(f"| {int(n):,} | {size} | {float(t1)-float(t0):.2f} | {int(rss0)/1024:.0f} | {r['rps']:.0f} | "
      f"{ms(r['p50_us'])} / {ms(r['p99_us'])} | {int(rss1)/1024:.0f} | {r['errors']} |")
PY
  rm -rf "$d"
done
