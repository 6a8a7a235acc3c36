#!/usr/bin/env bash
# Checks the deploy assets that can be checked here (no service manager or container
# engine needed): the systemd unit's syntax (`systemd-analyze verify`, on a copy whose
# ExecStart names the binary just built) and its sandbox (`systemd-analyze security
# --offline=yes`: exposure must be at most 2.0, "OK"), and the install script staged into
# a scratch root (files, modes); the AppArmor profile parses (`apparmor_parser -Q -K`), and
# the denial forwarder turns denials into alerts on a local webhook, from every place the
# kernel's lines land (kernel log without auditd, /var/log/audit/audit.log with it); the
# Dockerfile passes hadolint, the build context leaves key material out and every base
# image is pinned by digest (deploy/docker/check.py), and `kms-server health` (its
# HEALTHCHECK) works against a running dev server; the Kubernetes manifests pass
# `kubernetes-validate --strict` and deploy/kubernetes/check.py (the ops port on no public
# Service), and their embedded config passes `kms-server check-config`; make-certs.sh
# makes owner-only keys and the compose services see none but the server's; deny.toml
# reports duplicate crate versions, as deploy/README.md says.
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
# The Kubernetes KMS drop-in: the unit with it applied verifies and stays at most 2.0.
dropin=deploy/systemd/kubernetes-kms.conf
python3 - "$tmp/keyhold.service" "$dropin" "$tmp/with-dropin.service" <<'PY'
import sys
unit = open(sys.argv[1]).read().split("\n")
extra = [l for l in open(sys.argv[2]).read().split("\n") if l and not l.startswith("#") and l != "[Service]"]
keys = {l.split("=", 1)[0] for l in extra}
unit = [l for l in unit if l.split("=", 1)[0] not in keys]
at = unit.index("[Service]") + 1
open(sys.argv[3], "w").write("\n".join(unit[:at] + extra + unit[at:]))
PY
out=$(systemd-analyze verify "$tmp/with-dropin.service" 2>&1) || { echo "$out" >&2; exit 1; }
[ -z "$out" ] || { echo "deploy/check.sh: $dropin applied: $out" >&2; exit 1; }
exposure=$(systemd-analyze security --offline=yes "$tmp/with-dropin.service" | awk '/Overall exposure level/ {print $(NF-2)}')
python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) <= 2.0 else 1)" "$exposure" \
  || { echo "deploy/check.sh: with $dropin the exposure is $exposure, above 2.0" >&2; exit 1; }
echo "deploy/check.sh: with $dropin it verifies; exposure $exposure (OK)"

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
watcher=deploy/apparmor/denials-to-alert.py
alerts() { [ -f "$tmp/alerts.jsonl" ] && wc -l < "$tmp/alerts.jsonl" || echo 0; }
wait_alerts() { # wait until the webhook has received $1 alerts in all
  for _ in $(seq 100); do [ "$(alerts)" -ge "$1" ] && return 0; sleep 0.1; done
  echo "deploy/check.sh: the webhook got $(alerts) alerts, want $1" >&2; cat "$tmp/watcher.err" >&2 2>/dev/null; exit 1
}
# Without auditd: the kernel log's lines, piped in.
printf '%s\n' \
  'audit: type=1400 audit(1700000000.1:45): apparmor="DENIED" operation="open" class="file" profile="kms-server" name="/home/alice/.ssh/id_rsa" pid=4242 comm="tokio-rt-worker" requested_mask="r" denied_mask="r"' \
  'audit: type=1400 audit(1700000000.2:46): apparmor="DENIED" operation="exec" profile="another" name="/bin/sh" pid=1' \
  'audit: type=1400 audit(1700000000.3:47): apparmor="ALLOWED" operation="open" profile="kms-server" name="/etc/keyhold/x"' \
  | python3 "$watcher" --webhook "http://127.0.0.1:$port/alerts"
wait_alerts 1
# With auditd the kernel log has no denial: they are in /var/log/audit/audit.log (auditd's
# format, names with spaces hex-encoded, "enriched" lines). The watcher follows that file
# across a rotation and the kernel log (journalctl, faked here: it prints one event also
# in the audit log, one of its own, exits, and must be restarted after its last cursor);
# an event seen in both is sent once.
mkdir -p "$tmp/audit" "$tmp/bin"
echo 'type=AVC msg=audit(1700000099.1:99): apparmor="DENIED" operation="open" profile="kms-server" name="/old" pid=1 comm="kms-server"' > "$tmp/audit/audit.log"
cat > "$tmp/bin/journalctl" <<'SH'
#!/bin/sh
echo "$*" >> "$JOURNALCTL_ARGS"
case "$*" in *--after-cursor=c2*) exec sleep 30 ;; esac
echo '{"__CURSOR":"c1","_TRANSPORT":"kernel","MESSAGE":"audit: type=1400 audit(1700000100.100:100): apparmor=\"DENIED\" operation=\"open\" class=\"file\" profile=\"kms-server\" name=\"/home/alice/.ssh/id_rsa\" pid=4242 comm=\"tokio-rt-worker\" requested_mask=\"r\" denied_mask=\"r\""}'
echo '{"__CURSOR":"c2","_TRANSPORT":"kernel","MESSAGE":"audit: type=1400 audit(1700000100.500:105): apparmor=\"DENIED\" operation=\"capable\" class=\"cap\" profile=\"kms-server\" pid=4242 comm=\"kms-server\" capability=19 capname=\"sys_ptrace\""}'
SH
chmod 0755 "$tmp/bin/journalctl"
JOURNALCTL_ARGS="$tmp/journalctl.args" PATH="$tmp/bin:$PATH" python3 "$watcher" --journal \
  --audit-log "$tmp/audit/audit.log" --webhook "http://127.0.0.1:$port/alerts" 2> "$tmp/watcher.err" &
watch=$!
trap 'kill $receiver $watch 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 100); do grep -q "following $tmp/audit/audit.log" "$tmp/watcher.err" 2>/dev/null && break; sleep 0.1; done
gs=$(printf '\035')
{
  echo 'type=AVC msg=audit(1700000100.100:100): apparmor="DENIED" operation="open" class="file" profile="kms-server" name="/home/alice/.ssh/id_rsa" pid=4242 comm="tokio-rt-worker" requested_mask="r" denied_mask="r" fsuid=999 ouid=1000'
  echo 'type=AVC msg=audit(1700000100.200:101): apparmor="DENIED" operation="open" class="file" profile="kms-server" name=2F746D702F6D792066696C65 pid=4242 comm="kms-server" requested_mask="r" denied_mask="r"'
  echo 'type=SYSCALL msg=audit(1700000100.200:101): arch=c000003e syscall=257 success=no exit=-13 comm="kms-server" exe="/usr/local/bin/kms-server"'
  echo 'type=AVC msg=audit(1700000100.300:102): apparmor="DENIED" operation="exec" profile="another" name="/bin/sh" pid=1'
  echo 'type=AVC msg=audit(1700000100.400:103): apparmor="ALLOWED" operation="open" profile="kms-server" name="/etc/keyhold/x"'
  echo "type=AVC msg=audit(1700000100.450:104): apparmor=\"DENIED\" operation=\"exec\" profile=\"kms-server\" name=\"/bin/sh\" pid=4243 comm=\"kms-server\"${gs}FSUID=\"keyhold\" OUID=\"root\""
} >> "$tmp/audit/audit.log"
wait_alerts 5
# Rotation as auditd does it: the old file renamed (written to until auditd reopens), a new one.
mv "$tmp/audit/audit.log" "$tmp/audit/audit.log.1"
echo 'type=AVC msg=audit(1700000100.600:106): apparmor="DENIED" operation="mknod" profile="kms-server" name="/var/tmp/x" pid=4242 comm="kms-server"' >> "$tmp/audit/audit.log.1"
echo 'type=AVC msg=audit(1700000100.700:107): apparmor="DENIED" operation="connect" profile="kms-server" name="/run/dbus/system_bus_socket" pid=4242 comm="kms-server"' > "$tmp/audit/audit.log"
wait_alerts 7
for _ in $(seq 50); do grep -q -- "--after-cursor=c2" "$tmp/journalctl.args" 2>/dev/null && break; sleep 0.1; done
sleep 0.5
kill $watch; wait $watch 2>/dev/null || true
python3 - "$tmp/alerts.jsonl" "$tmp/journalctl.args" <<'PY'
import json, sys
events = [json.loads(l) for l in open(sys.argv[1])]
assert all(e["kind"] == "apparmor_denied" for e in events), events
details = [e["detail"] for e in events]
want = ["name=/home/alice/.ssh/id_rsa", "name=/home/alice/.ssh/id_rsa", "name=/tmp/my file", "name=/bin/sh",
        "capname=sys_ptrace", "name=/var/tmp/x", "name=/run/dbus/system_bus_socket"]
for w in want:
    assert sum(w in d for d in details) == want.count(w), (w, details)
assert len(events) == len(want), details
assert not any("name=/old" in d or "FSUID" in d for d in details), details
args = open(sys.argv[2]).read().splitlines()
assert len(args) >= 2 and "_TRANSPORT=kernel" in args[0] and "--after-cursor=c2" in args[1], args
PY
echo "deploy/check.sh: AppArmor denials of kms-server reach the alert webhook from the kernel log and from auditd's log (rotated, hex names; each event once, others ignored)"

hadolint deploy/docker/Dockerfile
echo "deploy/check.sh: the Dockerfile passes hadolint"

# Duplicate crate versions are reported, not allowed silently (deploy/README.md, "Supply chain").
python3 - <<'PY'
import tomllib
bans = tomllib.load(open("deny.toml", "rb")).get("bans", {})
assert bans.get("multiple-versions", "warn") in ("warn", "deny"), f"deny.toml: multiple-versions = {bans['multiple-versions']!r}"
PY
echo "deploy/check.sh: deny.toml reports duplicate crate versions"

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
openssl verify -CAfile "$pki/ca.pem" "$pki/node/server.pem" "$pki/admin.pem" >/dev/null
cmp -s "$pki/ca.pem" "$pki/node/ca.pem"
openssl x509 -in "$pki/node/server.pem" -noout -ext subjectAltName | grep -q "DNS:node-b"
openssl x509 -in "$pki/app.pem" -noout -ext subjectAltName | grep -q "URI:spiffe://keyhold.example/app"
openssl pkey -in "$pki/node/server-key.pem" -pubout | cmp -s - <(openssl x509 -in "$pki/node/server.pem" -noout -pubkey)
cmp -s "$pki/db-password" "$pki/node/db-password"
mkdir -p "$tmp/compose/seal" "$tmp/compose/scratch"
touch "$tmp/compose/seal/master.key"
# (keys owner-only, the CA key and client keys mounted into no service: compose/check.py)
python3 "$tmp/compose/check.py" "$pki" "$tmp/compose.toml"
"$bin" check-config --config "$tmp/compose.toml" >/dev/null
echo "deploy/check.sh: the compose example's certificates, services and config check out"
# The build context and the image pins (the PKI just made must stay out of the context);
# --strict, for operators' rendered manifests, refuses Keyhold's own unpinned image too.
python3 deploy/docker/check.py --pki "$pki"
if python3 deploy/docker/check.py --strict deploy/kubernetes/statefulset.yaml >/dev/null 2>&1; then
  echo "deploy/check.sh: docker/check.py --strict accepted an image without a digest" >&2; exit 1
fi

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
