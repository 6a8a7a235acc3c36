#!/usr/bin/env bash
# Checks the deploy assets that can be checked here (no service manager or container
# engine needed): the systemd unit's syntax (`systemd-analyze verify`, on a copy whose
# ExecStart names the binary just built) and its sandbox (`systemd-analyze security
# --offline=yes`: exposure must be at most 2.0, "OK"), and the install script staged into
# a scratch root (files, modes); the AppArmor profile parses (`apparmor_parser -Q -K`), and
# the denial forwarder turns a kernel denial line into an alert on a local webhook; the
# Dockerfile passes hadolint and `kms-server health` (its HEALTHCHECK) works against a
# running dev server; the Kubernetes manifests pass `kubernetes-validate --strict` and
# deploy/kubernetes/check.py, and their embedded config passes `kms-server check-config`.
#
# Usage: bash deploy/check.sh [path/to/kms-server]   (default target/debug/kms-server)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/debug/kms-server}")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

unit=deploy/systemd/keyhold.service
grep -q '^ExecStart="/usr/local/bin/kms-server" ' "$unit"
sed "s#^ExecStart=\"/usr/local/bin/kms-server\"#ExecStart=\"$bin\"#" "$unit" > "$tmp/keyhold.service"
# verify exits 0 on unknown keys and bad values (it only warns): any output fails here.
out=$(systemd-analyze verify "$tmp/keyhold.service" 2>&1) || { echo "$out" >&2; exit 1; }
if [ -n "$out" ]; then
  echo "deploy/check.sh: systemd-analyze verify complained:" >&2
  echo "$out" >&2
  exit 1
fi
exposure=$(systemd-analyze security --offline=yes "$unit" | awk '/Overall exposure level/ {print $(NF-2)}')
if ! python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) <= 2.0 else 1)" "$exposure"; then
  echo "deploy/check.sh: $unit exposure $exposure is above 2.0" >&2
  exit 1
fi
echo "deploy/check.sh: $unit verifies; exposure $exposure (OK)"

DESTDIR="$tmp/root" bash deploy/systemd/install.sh "$bin" >/dev/null
for want in "755 usr/local/bin/kms-server" "750 etc/keyhold" "640 etc/keyhold/kms-server.toml" \
            "700 var/lib/keyhold" "644 etc/systemd/system/keyhold.service" \
            "644 etc/apparmor.d/usr.local.bin.kms-server" "755 usr/local/lib/keyhold/denials-to-alert.py"; do
  mode=${want%% *}; path=${want#* }
  got=$(stat -c %a "$tmp/root/$path")
  [ "$got" = "$mode" ] || { echo "deploy/check.sh: $path has mode $got, want $mode" >&2; exit 1; }
done
cmp -s "$tmp/root/usr/local/bin/kms-server" "$bin" || { echo "deploy/check.sh: binary not installed as built" >&2; exit 1; }
cmp -s "$tmp/root/etc/keyhold/kms-server.toml" deploy/kms-server.toml || { echo "deploy/check.sh: config not staged" >&2; exit 1; }
echo "deploy/check.sh: install.sh stages the files with the right modes"

profile=deploy/apparmor/usr.local.bin.kms-server
apparmor_parser -Q -K "$profile" 2> "$tmp/aa.err" || { cat "$tmp/aa.err" >&2; exit 1; }
echo "deploy/check.sh: $profile parses"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 - "$port" "$tmp/alerts.jsonl" <<'PY' &
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        open(sys.argv[2], "ab").write(body + b"\n")
        self.send_response(204); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
receiver=$!
trap 'kill $receiver 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 50); do python3 -c "import socket; socket.create_connection(('127.0.0.1', $port))" 2>/dev/null && break; sleep 0.1; done
printf '%s\n' \
  'audit: type=1400 audit(1700000000.1:45): apparmor="DENIED" operation="open" class="file" profile="kms-server" name="/home/alice/.ssh/id_rsa" pid=4242 comm="tokio-rt-worker" requested_mask="r" denied_mask="r"' \
  'audit: type=1400 audit(1700000000.2:46): apparmor="DENIED" operation="exec" profile="another" name="/bin/sh" pid=1' \
  'audit: type=1400 audit(1700000000.3:47): apparmor="ALLOWED" operation="open" profile="kms-server" name="/etc/keyhold/x"' \
  | python3 deploy/apparmor/denials-to-alert.py --webhook "http://127.0.0.1:$port/alerts"
python3 - "$tmp/alerts.jsonl" <<'PY'
import json, sys
events = [json.loads(l) for l in open(sys.argv[1])]
assert len(events) == 1, events
e = events[0]
assert e["kind"] == "apparmor_denied" and "name=/home/alice/.ssh/id_rsa" in e["detail"], e
PY
echo "deploy/check.sh: an AppArmor denial of kms-server reaches the alert webhook (others ignored)"

hadolint deploy/docker/Dockerfile
echo "deploy/check.sh: the Dockerfile passes hadolint"

kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml deploy/kubernetes/shared-store/*.yaml
python3 deploy/kubernetes/check.py "$tmp/k8s.toml" "$tmp/k8s-shared.toml"
# check-config wants the files it names to exist: the pod's mounts, under a scratch root.
mkdir -p "$tmp/k8s/etc/tls" "$tmp/k8s/etc/seal" "$tmp/k8s/etc/db" "$tmp/k8s/var"
touch "$tmp/k8s/etc/tls/tls.crt" "$tmp/k8s/etc/tls/tls.key" "$tmp/k8s/etc/tls/ca.crt" "$tmp/k8s/etc/seal/master.key" \
  "$tmp/k8s/etc/db/password" "$tmp/k8s/etc/db/ca.crt"
for c in k8s k8s-shared; do
  sed -e "s#/etc/keyhold/#$tmp/k8s/etc/#g" -e "s#/var/lib/keyhold/#$tmp/k8s/var/#g" "$tmp/$c.toml" > "$tmp/$c-local.toml"
  "$bin" check-config --config "$tmp/$c-local.toml" >/dev/null
done
echo "deploy/check.sh: the Kubernetes manifests (StatefulSet, shared-store Deployment) validate; their configs load"

# The compose example: certificates as make-certs.sh makes them (the server's names, the
# clients' identities), its structure, and its nodes' config.
cp -r deploy/compose "$tmp/compose"
bash "$tmp/compose/make-certs.sh" >/dev/null
pki="$tmp/compose/pki"
openssl verify -CAfile "$pki/ca.pem" "$pki/server.pem" "$pki/admin.pem" >/dev/null
openssl x509 -in "$pki/server.pem" -noout -ext subjectAltName | grep -q "DNS:node-b"
openssl x509 -in "$pki/app.pem" -noout -ext subjectAltName | grep -q "URI:spiffe://keyhold.example/app"
mkdir -p "$tmp/compose/seal" "$tmp/compose/scratch"
touch "$tmp/compose/seal/master.key"
python3 "$tmp/compose/check.py" "$pki" "$tmp/compose.toml"
"$bin" check-config --config "$tmp/compose.toml" >/dev/null
echo "deploy/check.sh: the compose example's certificates, services and config check out"

# The image's HEALTHCHECK command against a real server (dev mode), and against nothing.
ports=$(python3 -c 'import socket
a=socket.socket(); a.bind(("127.0.0.1",0)); b=socket.socket(); b.bind(("127.0.0.1",0))
print(a.getsockname()[1], b.getsockname()[1])')
api=${ports% *}; ops=${ports#* }
public=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" dev --data-dir "$tmp/dev" --listen "127.0.0.1:$api" --ops-listen "127.0.0.1:$ops" --public-listen "127.0.0.1:$public" > "$tmp/dev.log" 2>&1 &
dev=$!
trap 'kill $receiver $dev 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 100); do "$bin" health --ops "127.0.0.1:$ops" >/dev/null 2>&1 && break; sleep 0.1; done
"$bin" health --ops "127.0.0.1:$ops"
kill $dev; wait $dev 2>/dev/null || true
if "$bin" health --ops "127.0.0.1:$ops" 2>/dev/null; then
  echo "deploy/check.sh: health succeeded with no server" >&2; exit 1
fi
echo "deploy/check.sh: kms-server health reports a live server and fails without one"
