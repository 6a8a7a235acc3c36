#!/usr/bin/env bash
# AWS XKS load run: Encrypt (with AAD and CDIV, so each request also test-decrypts) and
# Decrypt (with AAD) over TLS keep-alive with SigV4 on, at each concurrency level, beside
# the bare axum+rustls baseline in the same run. Requests are pre-signed (a SigV4
# signature stays valid for 5 minutes; every level is signed afresh), as the published
# anchor did with `oha`: the server verifies the full signature on every request.
#
# Usage: bash benches/xks.sh [duration-seconds] [concurrency levels...]
#   e.g. bash benches/xks.sh 10 1 16 64
# Loopback only, bounded in time. Prints a Markdown table; raw JSON lines go to
# bench-results/.
duration=${1:-10}
shift || true
levels=${*:-1 16 64}
source "$(dirname "$0")/common.sh"
out_dir=bench-results
mkdir -p "$out_dir"
out="$out_dir/xks-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
api=$(free_port); ops=$(free_port); xks=$(free_port); base=$(free_port)
dev="$work/dev"
pki="$dev/pki"
start_dev "$dev" "$api" "$ops"
curl -sSf --cacert "$pki/ca.pem" --cert "$pki/admin.pem" --key "$pki/admin-key.pem" \
  -H 'content-type: application/json' \
  -d '{"name":"xks-bench","grants":[{"identity":"xks:bench","operations":["wrap","unwrap"]}]}' \
  "https://127.0.0.1:$api/v1/keys" >/dev/null
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
pids=()

access=AKIAI2SFODNN7EXAMPLE
secret=FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE
region=eu-west-1
printf '[[credential]]\naccess_key_id = "%s"\nsecret_access_key = "%s"\n' "$access" "$secret" > "$dev/xks-creds.toml"
chmod 600 "$dev/xks-creds.toml"
cat >> "$dev/kms-server.toml" <<EOF

[xks]
listen = "127.0.0.1:$xks"
cert = "pki/server.pem"
key = "pki/server-key.pem"

[[xks.stores]]
name = "bench"
prefix = "/bench"
region = "$region"
tenant = "dev"
identity = "xks:bench"
credentials = "xks-creds.toml"
rate_limit = 1000000

[[xks.stores.keys]]
external_id = "ext-1"
key = "xks-bench"
EOF
# AUDIT=off: the cost measurement without the audit trail (never for production).
if [ "${AUDIT:-on}" = off ]; then printf '\n[audit]\nenabled = false\n' >> "$dev/kms-server.toml"; fi
RUST_LOG=warn "$bin/kms-server" serve --config "$dev/kms-server.toml" 2>"$dev.log" &
pids+=($!)
wait_ready "$ops"
"$bin/baseline" --listen "127.0.0.1:$base" --cert "$pki/server.pem" --key "$pki/server-key.pem" --client-ca "$pki/ca.pem" &
pids+=($!)
sleep 0.5


xks_encrypt_body "$work/encrypt.json"
enc_path=/bench/kms/xks/v1/keys/ext-1/encrypt
dec_path=/bench/kms/xks/v1/keys/ext-1/decrypt
mapfile -t hdrs < <(xks_sign "$enc_path" "$work/encrypt.json")
curl -sSf --cacert "$pki/ca.pem" -H 'content-type: application/json' -H "host: localhost" \
  -H "${hdrs[0]}" -H "${hdrs[1]}" --data-binary @"$work/encrypt.json" \
  --resolve "localhost:$xks:127.0.0.1" "https://localhost:$xks$enc_path" > "$work/encrypted.json"
python3 - "$work/encrypt.json" "$work/encrypted.json" "$work/decrypt.json" <<'PY'
import json, sys
req, enc = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
req["requestMetadata"]["kmsOperation"] = "Decrypt"
json.dump({"requestMetadata": req["requestMetadata"], "ciphertext": enc["ciphertext"],
           "ciphertextMetadata": enc["ciphertextMetadata"], "initializationVector": enc["initializationVector"],
           "authenticationTag": enc["authenticationTag"], "additionalAuthenticatedData": req["additionalAuthenticatedData"],
           "encryptionAlgorithm": "AES_GCM"}, open(sys.argv[3], "w"))
PY
cp "$work/encrypt.json" "$work/baseline.json"

# gen PORT PATH BODY C LABEL [HEADERS...]
gen() {
  local port=$1 path=$2 body=$3 c=$4 label=$5; shift 5
  local extra=()
  for h in "$@"; do extra+=(--header "$h"); done
  "$bin/loadgen" --addr "127.0.0.1:$port" --path "$path" --body "$body" --ca "$pki/ca.pem" \
    --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --warmup 2 \
    --concurrency "$c" --label "$label" "${extra[@]}"
}

# Against AWS's sample proxy: benches/xks-sample.sh runs it beside Keyhold in the same run
# (a number measured on another day is not a ratio).
echo "| c | baseline req/s | encrypt+CDIV req/s | p50 / p99 (ms) | decrypt req/s | p50 / p99 (ms) | encrypt / baseline | errors |"
echo "|---|---|---|---|---|---|---|---|"
for c in $levels; do
  b=$(gen "$base" /seal "$work/baseline.json" "$c" baseline); echo "$b" >> "$out"
  mapfile -t eh < <(xks_sign "$enc_path" "$work/encrypt.json")
  e=$(gen "$xks" "$enc_path" "$work/encrypt.json" "$c" xks-encrypt "${eh[@]}"); echo "$e" >> "$out"
  mapfile -t dh < <(xks_sign "$dec_path" "$work/decrypt.json")
  d=$(gen "$xks" "$dec_path" "$work/decrypt.json" "$c" xks-decrypt "${dh[@]}"); echo "$d" >> "$out"
  python3 - "$b" "$e" "$d" <<'PY'
import json, sys
b, e, d = (json.loads(a) for a in sys.argv[1:])
ms = lambda x: f"{x/1000:.2f}"
print(f"| {e['concurrency']} | {b['rps']:.0f} | {e['rps']:.0f} | {ms(e['p50_us'])} / {ms(e['p99_us'])} | "
      f"{d['rps']:.0f} | {ms(d['p50_us'])} / {ms(d['p99_us'])} | {e['rps']/b['rps']:.2f} | "
      f"{b['errors']}+{e['errors']}+{d['errors']} |")
PY
done
