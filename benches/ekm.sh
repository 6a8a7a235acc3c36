#!/usr/bin/env bash
# Google Cloud EKM unwrap over TLS keep-alive with the OIDC token verified on every call
# (the JWK set cached), at each concurrency level. Issue 12's target: p99 under 20 ms.
# Runs `kms-server dev`, whose public listener serves EKM with an AES-256 demo key and a
# local token issuer (`kms-server dev token --protocol ekm`).
#
# Usage: bash benches/ekm.sh [duration-seconds] [concurrency levels...]
#   e.g. bash benches/ekm.sh 10 16
# Loopback only; bounded in time. The load generator and the server share the cores.
duration=${1:-10}
shift || true
levels=${*:-16}
source "$(dirname "$0")/common.sh"
start_bench_dev
pub=$dev_public
token=$("$bin/kms-server" dev token --data-dir "$work/dev" --protocol ekm --email service-0@gcp-sa-ekms.iam.gserviceaccount.com)
ctx='"additionalContext":{"fullResourceName":"//cloudkms.googleapis.com/projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1","accessReasonContext":{"reason":"CUSTOMER_INITIATED_ACCESS"}}'
curl -sSf --cacert "$pki/ca.pem" --resolve "localhost:$pub:127.0.0.1" -H "authorization: Bearer $token" -H 'content-type: application/json' \
  -d "{\"plaintext\":\"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\",\"additionalAuthenticatedData\":\"YWFk\",$ctx}" \
  "https://localhost:$pub/ekm/v0/demo-ekm:wrap" > "$work/wrapped.json"
python3 - "$work" "$ctx" <<'PY'
import json, sys
work, ctx = sys.argv[1], sys.argv[2]
w = json.load(open(f"{work}/wrapped.json"))["wrappedBlob"]
body = json.loads("{" + f'"wrappedBlob":"{w}","additionalAuthenticatedData":"YWFk",' + ctx + "}")
json.dump(body, open(f"{work}/unwrap.json", "w"))
PY
curl -sSf --cacert "$pki/ca.pem" --resolve "localhost:$pub:127.0.0.1" -H "authorization: Bearer $token" -H 'content-type: application/json' \
  -d @"$work/unwrap.json" "https://localhost:$pub/ekm/v0/demo-ekm:unwrap" | grep -q plaintext

echo "| c | EKM unwrap req/s | p50 / p99 / p99.9 (ms) | errors |"
echo "|---|---|---|---|"
for c in $levels; do
  r=$("$bin/loadgen" --addr "127.0.0.1:$pub" --path /ekm/v0/demo-ekm:unwrap --body "$work/unwrap.json" --ca "$pki/ca.pem" \
    --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --warmup 2 --concurrency "$c" --label "ekm-$c" \
    --header "authorization: Bearer $token")
  python3 - "$r" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
ms = lambda x: f"{x/1000:.2f}"
print(f"| {r['concurrency']} | {r['rps']:.0f} | {ms(r['p50_us'])} / {ms(r['p99_us'])} / {ms(r['p999_us'])} | {r['errors']} |")
PY
done
