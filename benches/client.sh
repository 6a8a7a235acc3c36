#!/usr/bin/env bash
# Client::unwrap latency at concurrency 1 beside the load generator's on the same endpoint,
# in the same run (alternating, `rounds` times each).
# Usage: bash benches/client.sh [duration-seconds] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
rounds=${2:-2}
cargo build --release -q -p kms-server -p keyhold-benches
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
api=$(free_port); ops=$(free_port)
RUST_LOG=warn "$bin/kms-server" dev --data-dir "$work/dev" --listen "127.0.0.1:$api" --ops-listen "127.0.0.1:$ops" 2>"$work/server.log" &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$ops/readyz" >/dev/null && break; sleep 0.1; done
pki="$work/dev/pki"
curl_app=(curl -sS --cacert "$pki/ca.pem" --cert "$pki/app.pem" --key "$pki/app-key.pem" -H 'content-type: application/json')
wrapped=$("${curl_app[@]}" -d '{"context":{"tenant":"acme","object":"invoices/42"}}' "https://127.0.0.1:$api/v1/keys/demo/datakey" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["wrapped"])')
printf '{"wrapped":"%s","context":{"tenant":"acme","object":"invoices/42"}}' "$wrapped" > "$work/unwrap.json"
echo "| protocol | round | loadgen p50 / p99 (µs) | Client::unwrap p50 / p99 (µs) | client / loadgen p50 |"
echo "|---|---|---|---|---|"
for r in $(seq 1 "$rounds"); do
  for proto in http1 http2; do
    if [ "$proto" = http1 ]; then lflag=""; cflag="--http1"; else lflag="--http2"; cflag=""; fi
    l=$("$bin/loadgen" --addr "127.0.0.1:$api" --path /v1/unwrap --body "$work/unwrap.json" --ca "$pki/ca.pem" \
        --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --concurrency 1 --label loadgen $lflag)
    c=$("$bin/client_latency" --endpoint "https://127.0.0.1:$api" --body "$work/unwrap.json" --ca "$pki/ca.pem" \
        --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" $cflag)
    python3 - "$proto" "$r" "$l" "$c" <<'PY'
import json, sys
p, r, l, c = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
print(f"| {p} | {r} | {l['p50_us']} / {l['p99_us']} | {c['p50_us']} / {c['p99_us']} | {c['p50_us']/l['p50_us']:.2f} |")
PY
  done
done
