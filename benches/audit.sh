#!/usr/bin/env bash
# What the audit trail costs: POST /v1/unwrap at concurrency 64 (and 16) against two
# servers over copies of the same store, one with the audit trail (the default) and one
# with `[audit] enabled = false`, alternating in the same run.
# Usage: [LEVELS="16 64 256"] [AUDIT_DIR=/dev/shm] bash benches/audit.sh [duration-seconds] [rounds]
# AUDIT_DIR puts the audited server's chain file in another directory (e.g. a tmpfs, to
# separate the CPU cost of auditing from the disk's sync latency).
duration=${1:-10}
rounds=${2:-2}
source "$(dirname "$0")/common.sh"
api=$(free_port); ops=$(free_port); api2=$(free_port); ops2=$(free_port)
twin_dev_dirs "$work/on" "$work/off" "$api" "$ops" "$api2" "$ops2"
printf '\n[audit]\nenabled = false\n' >> "$work/off/kms-server.toml"
if [ -n "${AUDIT_DIR:-}" ]; then
  audit_file=$(mktemp -u "$AUDIT_DIR/keyhold-bench-XXXXXX.audit")
  printf '\n[audit]\npath = "%s"\n' "$audit_file" >> "$work/on/kms-server.toml"
  trap 'cleanup; rm -f "$audit_file"' EXIT
fi
serve_dir on
serve_dir off
wait_ready "$ops"; wait_ready "$ops2"
pki="$work/on/pki"
unwrap_body "$pki" "$api" '{"tenant":"acme"}' "$work/unwrap.json"
gen() { "$bin/loadgen" --addr "127.0.0.1:$1" --path /v1/unwrap --body "$work/unwrap.json" --ca "$pki/ca.pem" \
  --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --warmup 2 --concurrency "$2" --label "$3"; }
echo "| concurrency | round | audit off req/s (p50 / p99 ms) | audit on req/s (p50 / p99 ms) | on / off |"
echo "|---|---|---|---|---|"
for c in ${LEVELS:-16 64}; do
  for r in $(seq 1 "$rounds"); do
    off=$(gen "$api2" "$c" off); on=$(gen "$api" "$c" on)
    python3 - "$c" "$r" "$off" "$on" <<'PY'
import json, sys
c, r, off, on = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
f = lambda x: f"{x['rps']:.0f} ({x['p50_us']/1000:.2f} / {x['p99_us']/1000:.2f})"
print(f"| {c} | {r} | {f(off)} | {f(on)} | {on['rps']/off['rps']:.2f} |")
PY
  done
done
records=$(curl -sS --cacert "$pki/ca.pem" --cert "$pki/auditor.pem" --key "$pki/auditor-key.pem" \
  "https://127.0.0.1:$api/v1/audit?after=0&limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["head"]["seq"])')
echo
echo "audit records written by the audited server: $records"
