#!/usr/bin/env bash
# KMIP Encrypt and Decrypt beside the native /v1/unwrap, one server, one load generator,
# one run (issue 27). A dev data dir served with `[kmip]` added; a KMIP key made and
# activated by the admin with KMIP (benches/kmip_bodies.py), granted to the app with the
# native API; then, per concurrency level, interleaved: KMIP Encrypt of a 32-byte DEK,
# KMIP Decrypt of it (each one TTLV request on keep-alive mutual-TLS connections),
# `POST /v1/unwrap` of a 32-byte DEK, and the bare axum+rustls baseline. The audit trail is
# on (flushed per request) for all three Keyhold rows.
#
# Usage: bash benches/kmip.sh [DURATION] [CONCURRENCY...]   (default 8 s; 1 16 64)
source "$(dirname "$0")/common.sh"
dur=${1:-8}; shift || true
if [ $# -gt 0 ]; then levels=("$@"); else levels=(1 16 64); fi

api=$(free_port); ops=$(free_port); api2=$(free_port); ops2=$(free_port)
kmip=$(free_port); base=$(free_port)
twin_dev_dirs "$work/dev" "$work/unused" "$api" "$ops" "$api2" "$ops2"
printf '\n[kmip]\nlisten = "127.0.0.1:%s"\n' "$kmip" >> "$work/dev/kms-server.toml"
RUST_LOG=warn "$bin/kms-server" serve --config "$work/dev/kms-server.toml" 2>"$work/serve.log" & pids+=($!)
pki="$work/dev/pki"
"$bin/baseline" --listen "127.0.0.1:$base" --cert "$pki/server.pem" --key "$pki/server-key.pem" --client-ca "$pki/ca.pem" & pids+=($!)
wait_ready "$ops"

python3 benches/kmip_bodies.py 127.0.0.1 "$kmip" "$pki" "$work" create
app=spiffe://keyhold.dev/app   # the dev app's identity (kms-server/src/tools/dev.rs)
curl -sf --cacert "$pki/ca.pem" --cert "$pki/admin.pem" --key "$pki/admin-key.pem" -X PUT \
  -H 'content-type: application/json' \
  -d "{\"grants\":[{\"identity\":\"$app\",\"operations\":[\"wrap\",\"unwrap\"]}]}" \
  "https://127.0.0.1:$api/v1/keys/bench-kmip/grants" >/dev/null
python3 benches/kmip_bodies.py 127.0.0.1 "$kmip" "$pki" "$work" bodies
unwrap_body "$pki" "$api" '{"tenant":"acme","object":"invoices/42"}' "$work/unwrap.json"

run() { # label port path body [loadgen flags...]
  local label=$1 port=$2 path=$3 body=$4; shift 4
  "$bin/loadgen" --addr "127.0.0.1:$port" --path "$path" --body "$body" --ca "$pki/ca.pem" \
    --cert "$pki/app.pem" --key "$pki/app-key.pem" --concurrency "$c" --duration "$dur" \
    --warmup 2 --label "$label" "$@" > "$work/out.json"
  python3 - "$work/out.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("c=%-3d %-13s rps=%8.0f p50=%6.2fms p99=%6.2fms errors=%d" % (
    r["concurrency"], r["label"], r["rps"], r["p50_us"] / 1000, r["p99_us"] / 1000, r["errors"]))
PY
}

echo "machine: $(nproc) CPUs, $(uname -r)"
for c in "${levels[@]}"; do
  run kmip-encrypt "$kmip" - "$work/encrypt.ttlv" --kmip
  run kmip-decrypt "$kmip" - "$work/decrypt.ttlv" --kmip
  run unwrap "$api" /v1/unwrap "$work/unwrap.json"
  run baseline "$base" /seal "$work/unwrap.json"
done
