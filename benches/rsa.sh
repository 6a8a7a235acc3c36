#!/usr/bin/env bash
# RSA KEK unwrap over mTLS keep-alive: POST /v1/unwrap of an RSA-OAEP-3072 wrapped DEK
# (server-side aws-lc-rs decryption on the blocking pool) beside an AES-256-GCM wrapped DEK,
# in the same run, alternating per concurrency level.
#
# Usage: bash benches/rsa.sh [duration-seconds] [concurrency levels...]
# Loopback only; bounded in time.
duration=${1:-10}
shift || true
levels=${*:-1 2 16}
source "$(dirname "$0")/common.sh"
start_bench_dev
curl -sS --cacert "$pki/ca.pem" --cert "$pki/admin.pem" --key "$pki/admin-key.pem" -H 'content-type: application/json' \
  -d '{"name":"rsa3072","algorithm":"rsa-oaep-3072-sha256","grants":[{"identity":"spiffe://keyhold.dev/app","operations":["datakey","unwrap"]}]}' \
  "https://127.0.0.1:$api/v1/keys" >/dev/null
ctx='{"tenant":"acme","object":"scans/42"}'
unwrap_body "$pki" "$api" "$ctx" "$work/aes.json"
unwrap_body "$pki" "$api" "$ctx" "$work/rsa.json" rsa3072

gen() { "$bin/loadgen" --addr "127.0.0.1:$api" --path /v1/unwrap --body "$1" --ca "$pki/ca.pem" \
  --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --warmup 2 --concurrency "$2" --label "$3"; }

echo "| concurrency | AES unwrap req/s | p50 / p99 (ms) | RSA-3072 unwrap req/s | p50 / p99 (ms) | RSA/AES | errors |"
echo "|---|---|---|---|---|---|---|"
for c in $levels; do
  a=$(gen "$work/aes.json" "$c" aes)
  r=$(gen "$work/rsa.json" "$c" rsa)
  python3 - "$a" "$r" <<'PY'
import json, sys
a, r = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ms = lambda x: f"{x/1000:.2f}"
print(f"| {r['concurrency']} | {a['rps']:.0f} | {ms(a['p50_us'])} / {ms(a['p99_us'])} | {r['rps']:.0f} | "
      f"{ms(r['p50_us'])} / {ms(r['p99_us'])} | {r['rps']/a['rps']:.3f} | {a['errors']} / {r['errors']} |")
PY
done
