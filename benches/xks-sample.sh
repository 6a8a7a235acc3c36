#!/usr/bin/env bash
# Keyhold's XKS listener beside AWS's sample XKS proxy, same machine, same load generator,
# same run (issue 25; replaces the cross-day anchor of benches/xks.sh).
#
# The sample proxy: aws-samples/aws-kms-xks-proxy (xks-axum), its release binary given in
# XKS_SAMPLE_BIN (built by the person running the bench, from their own checkout: this
# repository carries none of its code and no recipe to build it), on SoftHSM2 (a fresh
# token, AES-256 key labelled `ext-1` made with OpenSC's pkcs11-tool), TLS on with the
# dev PKI's server certificate, SigV4 on, INFO logging to a file (as shipped, its stdout
# writer off). Keyhold: `[xks]` with the same SigV4 credential, its trail flushed per
# request ("keyhold") and in bounded-lag mode ("keyhold-lag", `max_lag_ms = 10`).
#
# Load: Encrypt of a 32-byte plaintext with 64 bytes of AAD and a ciphertext integrity
# value (CDIV) requested, pre-signed as benches/xks.sh does, keep-alive, at each level.
#
# Usage: XKS_SAMPLE_BIN=/path/to/xks-proxy bash benches/xks-sample.sh [DURATION] [C...]
# Needs softhsm2 and opensc (Debian).
duration=${1:-8}; shift || true
if [ $# -gt 0 ]; then levels=("$@"); else levels=(1 16 64); fi
: "${XKS_SAMPLE_BIN:?set XKS_SAMPLE_BIN to the sample proxy's xks-proxy binary}"
[ -x "$XKS_SAMPLE_BIN" ] || { echo "$XKS_SAMPLE_BIN is not an executable" >&2; exit 1; }
command -v pkcs11-tool >/dev/null || { echo "pkcs11-tool not found: apt-get install opensc" >&2; exit 1; }
source "$(dirname "$0")/common.sh"
sample_bin=$XKS_SAMPLE_BIN

access=AKIAI2SFODNN7EXAMPLE
secret=FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE
region=eu-west-1

# Keyhold: a dev store with an XKS key, then two servers over copies of it.
api=$(free_port); ops=$(free_port); api2=$(free_port); ops2=$(free_port)
xks=$(free_port); xks2=$(free_port)
start_dev "$work/kh" "$api" "$ops"
pki="$work/kh/pki"
curl -sSf --cacert "$pki/ca.pem" --cert "$pki/admin.pem" --key "$pki/admin-key.pem" \
  -H 'content-type: application/json' \
  -d '{"name":"xks-bench","grants":[{"identity":"xks:bench","operations":["wrap","unwrap"]}]}' \
  "https://127.0.0.1:$api/v1/keys" >/dev/null
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
pids=()
strip_public "$work/kh/kms-server.toml"
printf '[[credential]]\naccess_key_id = "%s"\nsecret_access_key = "%s"\n' "$access" "$secret" > "$work/kh/xks-creds.toml"
chmod 600 "$work/kh/xks-creds.toml"
cat >> "$work/kh/kms-server.toml" <<EOF

[xks]
listen = "127.0.0.1:$xks"
cert = "pki/server.pem"
key = "pki/server-key.pem"

[[xks.stores]]
name = "bench"
prefix = ""
region = "$region"
tenant = "dev"
identity = "xks:bench"
credentials = "xks-creds.toml"
rate_limit = 1000000

[[xks.stores.keys]]
external_id = "ext-1"
key = "xks-bench"
EOF
cp -r "$work/kh" "$work/lag"
sed -i "s/^listen = \"127.0.0.1:$api\"/listen = \"127.0.0.1:$api2\"/; s/^ops_listen = .*/ops_listen = \"127.0.0.1:$ops2\"/; s/^listen = \"127.0.0.1:$xks\"/listen = \"127.0.0.1:$xks2\"/" "$work/lag/kms-server.toml"
printf '\n[audit]\ndurability = "bounded-lag"\nmax_lag_ms = 10\n' >> "$work/lag/kms-server.toml"
RUST_LOG=warn "$bin/kms-server" serve --config "$work/kh/kms-server.toml" 2>"$work/kh.log" & pids+=($!)
RUST_LOG=warn "$bin/kms-server" serve --config "$work/lag/kms-server.toml" 2>"$work/lag.log" & pids+=($!)
wait_ready "$ops"; wait_ready "$ops2"

# The sample proxy on a fresh SoftHSM2 token.
sample=$(free_port)
mkdir -p "$work/hsm/tokens" "$work/sample/logs"
export SOFTHSM2_CONF="$work/hsm/softhsm2.conf"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$work/hsm/tokens" > "$SOFTHSM2_CONF"
softhsm2-util --init-token --free --label xks --pin 1234 --so-pin 5678 >/dev/null
pkcs11-tool --module /usr/lib/softhsm/libsofthsm2.so --token-label xks --login --pin 1234 \
  --keygen --key-type AES:32 --label ext-1 >/dev/null
cat > "$work/sample/settings.toml" <<EOF
[server]
ip = "127.0.0.1"
port = $sample
region = "$region"
service = "kms-xks-proxy"

[server.tcp_keepalive]
tcp_keepalive_secs = 60
tcp_keepalive_retries = 3
tcp_keepalive_interval_secs = 1

[tracing]
is_stdout_writer_enabled = false
is_file_writer_enabled = true
level = "INFO"
directory = "$work/sample/logs"
file_prefix = "xks-proxy.log"
rotation_kind = "HOURLY"

[security]
is_sigv4_auth_enabled = true
is_tls_enabled = true
is_mtls_enabled = false

[tls]
tls_cert_pem = "$pki/server.pem"
tls_key_pem = "$pki/server-key.pem"

[[external_key_stores]]
uri_path_prefix = ""
sigv4_access_key_id = "$access"
sigv4_secret_access_key = "$secret"
xks_key_id_set = ["ext-1"]

[pkcs11]
session_pool_max_size = 30
session_pool_timeout_milli = 0
session_eager_close = false
user_pin = "1234"
PKCS11_HSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
context_read_timeout_milli = 10

[limits]
max_plaintext_in_base64 = 8192
max_aad_in_base64 = 16384

[hsm_capabilities]
can_generate_iv = false
is_zero_iv_required = false
EOF
XKS_PROXY_SETTINGS_TOML="$work/sample/settings.toml" "$sample_bin" > "$work/sample/out.log" 2>&1 & pids+=($!)

xks_encrypt_body "$work/encrypt.json"
path=/kms/xks/v1/keys/ext-1/encrypt
# Both answer one signed Encrypt before the run (the sample proxy opens its HSM sessions).
for port in "$xks" "$xks2" "$sample"; do
  mapfile -t h < <(xks_sign "$path" "$work/encrypt.json")
  for _ in $(seq 1 50); do
    curl -sf --cacert "$pki/ca.pem" -H 'content-type: application/json' -H "${h[0]}" -H "${h[1]}" \
      --data-binary @"$work/encrypt.json" --resolve "localhost:$port:127.0.0.1" \
      "https://localhost:$port$path" >/dev/null && break
    sleep 0.2
  done
done

gen() { # port label
  mapfile -t h < <(xks_sign "$path" "$work/encrypt.json")
  "$bin/loadgen" --addr "127.0.0.1:$1" --path "$path" --body "$work/encrypt.json" --ca "$pki/ca.pem" \
    --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --warmup 2 \
    --concurrency "$c" --label "$2" --header "${h[0]}" --header "${h[1]}" > "$work/out.json"
  python3 - "$work/out.json" "$c" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"c={sys.argv[2]:<3} {r['label']:12} rps={r['rps']:>8.0f} p50={r['p50_us']/1000:6.2f}ms p99={r['p99_us']/1000:6.2f}ms errors={r['errors']}")
PY
}
echo "machine: $(nproc) CPUs, $(uname -r); sample proxy: $sample_bin"
for c in "${levels[@]}"; do
  gen "$sample" aws-sample
  gen "$xks" keyhold
  gen "$xks2" keyhold-lag
done
