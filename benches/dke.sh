#!/usr/bin/env bash
# Microsoft DKE decrypt over TLS keep-alive with token verification on (the JWK set
# cached), at each concurrency level, beside the raw RSA-OAEP-2048 decryption rate of the
# server's RSA implementation on one core (`rsa_rate`, measured in the same run with the
# server idle). Issue 11's target: DKE decrypt throughput at least 0.8 of that rate.
# Runs `kms-server dev`, whose public listener serves DKE with the demo RSA-2048 key and a
# local token issuer (`kms-server dev token`).
#
# Usage: bash benches/dke.sh [duration-seconds] [concurrency levels...]
#   e.g. bash benches/dke.sh 10 16
# Needs python3 with `cryptography` (the client-side encryption, as Office does it).
# Loopback only; bounded in time. The load generator and the server share the cores.
duration=${1:-10}
shift || true
levels=${*:-16}
source "$(dirname "$0")/common.sh"
cargo build --release -q -p keyhold-benches --bin rsa_rate
start_bench_dev
dke=$dev_public
token=$("$bin/kms-server" dev token --data-dir "$work/dev" --email alice@example.com)
# The public key from the DKE GET, a blob encrypted with it as Office would.
curl -sSf --cacert "$pki/ca.pem" "https://localhost:$dke/dke/demo-dke" --resolve "localhost:$dke:127.0.0.1" > "$work/key.json"
python3 - "$work" <<'PY'
import base64, json, sys
from cryptography.hazmat.primitives.asymmetric import rsa, padding
from cryptography.hazmat.primitives import hashes
work = sys.argv[1]
k = json.load(open(f"{work}/key.json"))["key"]
public = rsa.RSAPublicNumbers(k["e"], int.from_bytes(base64.b64decode(k["n"]), "big")).public_key()
ct = public.encrypt(b"\x2a" * 32, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
json.dump({"alg": "RSA-OAEP-256", "value": base64.b64encode(ct).decode()}, open(f"{work}/decrypt.json", "w"))
path = "/" + k["kid"].split("/", 3)[3]
open(f"{work}/path", "w").write(path + "/decrypt")
PY
path=$(cat "$work/path")
# Sanity: one decrypt through curl.
curl -sSf --cacert "$pki/ca.pem" --resolve "localhost:$dke:127.0.0.1" -H "authorization: Bearer $token" \
  -H 'content-type: application/json' -d @"$work/decrypt.json" "https://localhost:$dke$path" >/dev/null

raw=$("$bin/rsa_rate" 2048 5)
echo "| c | DKE decrypt req/s | p50 / p99 / p99.9 (ms) | raw RSA-2048 decrypts/s, one core | ratio | errors |"
echo "|---|---|---|---|---|---|"
for c in $levels; do
  r=$("$bin/loadgen" --addr "127.0.0.1:$dke" --path "$path" --body "$work/decrypt.json" --ca "$pki/ca.pem" \
    --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --warmup 2 --concurrency "$c" \
    --label "dke-$c" --header "authorization: Bearer $token")
  python3 - "$r" "$raw" <<'PY'
import json, sys
r, raw = (json.loads(a) for a in sys.argv[1:])
ms = lambda x: f"{x/1000:.2f}"
one = raw["per_second_one_core"]
print(f"| {r['concurrency']} | {r['rps']:.0f} | {ms(r['p50_us'])} / {ms(r['p99_us'])} / {ms(r['p999_us'])} | {one:.0f} | {r['rps']/one:.2f} | {r['errors']} |")
PY
done
