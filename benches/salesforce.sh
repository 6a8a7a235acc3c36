#!/usr/bin/env bash
# Salesforce cache-only key callouts over TLS keep-alive: `GET /salesforce/{kid}?requestId=...`
# with the Named Credential's secret; each answer unwraps the data key through the keyring,
# wraps a fresh content key with RSA-OAEP under Salesforce's 4096-bit certificate, seals
# the data key with AES-256-GCM into the JWE, and syncs the audit record. Issue 12's
# target: well under Salesforce's 3-second budget. Runs `kms-server dev` (its test
# certificate, credential and demo key).
#
# Usage: bash benches/salesforce.sh [duration-seconds] [concurrency levels...]
#   e.g. bash benches/salesforce.sh 10 16
# Loopback only; bounded in time. The load generator and the server share the cores.
duration=${1:-10}
shift || true
levels=${*:-16}
source "$(dirname "$0")/common.sh"
start_bench_dev
pub=$dev_public
secret=$(cat "$work/dev/dev-salesforce-credential")
echo '{}' > "$work/empty.json"
curl -sSf --cacert "$pki/ca.pem" --resolve "localhost:$pub:127.0.0.1" -H "authorization: Bearer $secret" \
  "https://localhost:$pub/salesforce/dev-sf-1?requestId=e5ab58fd2ced013f2a46d5c8144dd439" | grep -q '"jwe"'
echo "| c | callouts/s | p50 / p99 / p99.9 (ms) | errors |"
echo "|---|---|---|---|"
for c in $levels; do
  r=$("$bin/loadgen" --addr "127.0.0.1:$pub" --path "/salesforce/dev-sf-1?requestId=0123456789abcdef0123456789abcdef" --get --body "$work/empty.json" \
    --ca "$pki/ca.pem" --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --warmup 2 \
    --concurrency "$c" --label "salesforce-$c" --header "authorization: Bearer $secret")
  python3 - "$r" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
ms = lambda x: f"{x/1000:.2f}"
print(f"| {r['concurrency']} | {r['rps']:.0f} | {ms(r['p50_us'])} / {ms(r['p99_us'])} / {ms(r['p999_us'])} | {r['errors']} |")
PY
done
