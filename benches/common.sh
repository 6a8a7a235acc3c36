# Shared set-up for the load scripts (sourced, not run): release build, a scratch dir
# cleaned up on exit, free loopback ports, a dev-mode server, an unwrap request body.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=target/release
cargo build --release -q -p kms-server -p keyhold-benches
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_ready OPS_PORT
wait_ready() {
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$1/readyz" >/dev/null && return 0; sleep 0.1; done
  echo "server on ops port $1 did not become ready" >&2; return 1
}

# start_dev DATA_DIR API_PORT OPS_PORT [BINARY]: a background `kms-server dev` (BINARY, by
# default this build's), ready on return; its public listener (Microsoft DKE) on a free
# port, left in $dev_public.
start_dev() {
  dev_public=$(free_port)
  RUST_LOG=warn "${4:-$bin/kms-server}" dev --data-dir "$1" --listen "127.0.0.1:$2" --ops-listen "127.0.0.1:$3" \
    --public-listen "127.0.0.1:$dev_public" 2>"$1.log" &
  pids+=($!)
  wait_ready "$3"
}

# serve_dir NAME: a background `kms-server serve` of $work/NAME/kms-server.toml, its log in
# $work/NAME.log (not waited for: `wait_ready` its ops port).
serve_dir() {
  RUST_LOG=warn "$bin/kms-server" serve --config "$work/$1/kms-server.toml" 2>"$work/$1.log" &
  pids+=($!)
}

# start_bench_dev: `start_dev` in $work/dev on two free ports, which it leaves in $api and
# $ops, with the dev PKI's directory in $pki (and the public port in $dev_public).
start_bench_dev() {
  api=$(free_port); ops=$(free_port)
  start_dev "$work/dev" "$api" "$ops"
  pki="$work/dev/pki"
}

# strip_public CONFIG: drops the end-user protocols (the public listener and what it serves,
# the last part of a dev config) from CONFIG, for servers started from copies of it.
strip_public() {
  python3 - "$1" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
open(path, "w").write(text.split("\n# The end-user protocols")[0] + "\n")
PY
}

# twin_dev_dirs FIRST SECOND API OPS API2 OPS2 [BINARY]: a dev data dir (PKI, store, demo
# key) made in FIRST by a dev server (BINARY, by default this build's) that is then stopped,
# and its copy in SECOND listening on the second pair of ports: two servers over the same
# keys, started by the caller with `kms-server serve --config DIR/kms-server.toml`.
twin_dev_dirs() {
  start_dev "$1" "$3" "$4" "${7:-}"
  kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
  pids=()
  strip_public "$1/kms-server.toml"
  cp -r "$1" "$2"
  sed -i "s/^listen = .*/listen = \"127.0.0.1:$5\"/; s/^ops_listen = .*/ops_listen = \"127.0.0.1:$6\"/" "$2/kms-server.toml"
}

# unwrap_body PKI_DIR API_PORT CONTEXT_JSON OUT_FILE [KEY]: a datakey from KEY (default the
# demo key), as the body of an unwrap request with that context.
unwrap_body() {
  local wrapped
  wrapped=$(curl -sS --cacert "$1/ca.pem" --cert "$1/app.pem" --key "$1/app-key.pem" -H 'content-type: application/json' \
    -d "{\"context\":$3}" "https://127.0.0.1:$2/v1/keys/${5:-demo}/datakey" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["wrapped"])')
  printf '{"wrapped":"%s","context":%s}' "$wrapped" "$3" > "$4"
}

# xks_sign PATH BODY_FILE: prints the SigV4 headers (one per line, for loadgen's --header)
# of a POST of the body to https://localhost/PATH, signed with $access, $secret and
# $region over host and x-amz-date, as AWS KMS signs (benches/xks.sh, xks-sample.sh).
xks_sign() {
  python3 - "$access" "$secret" "$region" "$1" "$2" <<'PY'
import datetime, hashlib, hmac, sys
ak, sk, region, path, body_file = sys.argv[1:]
body = open(body_file, "rb").read()
now = datetime.datetime.now(datetime.timezone.utc)
amz = now.strftime("%Y%m%dT%H%M%SZ"); day = amz[:8]
canonical = "\n".join(["POST", path, "", "host:localhost", f"x-amz-date:{amz}", "",
                       "host;x-amz-date", hashlib.sha256(body).hexdigest()])
scope = f"{day}/{region}/kms-xks-proxy/aws4_request"
to_sign = "\n".join(["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(canonical.encode()).hexdigest()])
k = ("AWS4" + sk).encode()
for part in (day, region, "kms-xks-proxy", "aws4_request"):
    k = hmac.new(k, part.encode(), hashlib.sha256).digest()
sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
print(f"x-amz-date: {amz}")
print(f"authorization: AWS4-HMAC-SHA256 Credential={ak}/{scope}, SignedHeaders=host;x-amz-date, Signature={sig}")
PY
}

# xks_encrypt_body FILE: a KMS-like XKS Encrypt body: a 32-byte data key, 64 bytes of AAD
# (the KMS encryption context digest is smaller; this is on the heavy side), CDIV requested.
xks_encrypt_body() {
  python3 - "$1" <<'PY'
import base64, json, os, sys
meta = {"awsPrincipalArn": "arn:aws:iam::111122223333:role/bench", "kmsKeyArn":
        "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "kmsOperation": "GenerateDataKey", "kmsRequestId": "8c6b4f4e-0f1c-4d1e-9f3a-3b1f2e8a9d10",
        "kmsViaService": "s3"}
json.dump({"requestMetadata": meta, "plaintext": base64.b64encode(os.urandom(32)).decode(),
           "additionalAuthenticatedData": base64.b64encode(os.urandom(64)).decode(),
           "encryptionAlgorithm": "AES_GCM", "ciphertextDataIntegrityValueAlgorithm": "SHA_256"},
          open(sys.argv[1], "w"))
PY
}
