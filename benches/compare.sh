#!/usr/bin/env bash
# Two kms-server builds side by side in one run, with the bare axum+rustls baseline:
# `POST /v1/unwrap` and `POST /v1/batch` (100 unwraps) at concurrency C over mTLS
# keep-alive, alternating builds for ROUNDS rounds, reporting requests/s, the ratio to the
# baseline, and each server process's own CPU time per request (user + system from /proc,
# over the measured window) — the number that does not depend on the load generator
# sharing the cores.
#
# Usage: bash benches/compare.sh OTHER_KMS_SERVER_BINARY [duration-seconds] [C] [rounds]
#   THIS_EXTRA='TOML' appends TOML to this build's config only: the same binary with and
#   without a feature, e.g. the exfiltration brake (BENCHMARKS.md):
#   THIS_EXTRA="$(cat benches/brake-overhead.toml)" bash benches/compare.sh target/release/kms-server 8 64 3
#   e.g. git worktree add /tmp/old <commit> && (cd /tmp/old && CARGO_TARGET_DIR=/tmp/oldt \
#        cargo build --release -p kms-server) && bash benches/compare.sh /tmp/oldt/release/kms-server 8 64 2
other=${1:?usage: compare.sh OTHER_KMS_SERVER_BINARY [duration] [C] [rounds]}
duration=${2:-8}
conc=${3:-64}
rounds=${4:-2}
source "$(dirname "$0")/common.sh"
api=$(free_port); ops=$(free_port); api2=$(free_port); ops2=$(free_port); base=$(free_port)
# The store is made by the other build: a build reads the stores of the builds before it,
# not always those of later ones (the records of issue 21 carry fields older builds refuse).
twin_dev_dirs "$work/this" "$work/other" "$api" "$ops" "$api2" "$ops2" "$other"
# Builds from before the [process] table (commit cde1de5) refuse it: drop it for them.
if ! "$other" check-config --config "$work/other/kms-server.toml" >/dev/null 2>&1; then
  python3 - "$work/other/kms-server.toml" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
open(sys.argv[1], "w").write(re.sub(r"(?ms)^\[process\]\n.*?(?=^\[)", "", text))
PY
  "$other" check-config --config "$work/other/kms-server.toml" >/dev/null
fi
if [ -n "${THIS_EXTRA:-}" ]; then printf '\n%s\n' "$THIS_EXTRA" >> "$work/this/kms-server.toml"; fi
RUST_LOG=warn "$bin/kms-server" serve --config "$work/this/kms-server.toml" 2>"$work/this.log" &
pids+=($!); this_pid=$!
RUST_LOG=warn "$other" serve --config "$work/other/kms-server.toml" 2>"$work/other.log" &
pids+=($!); other_pid=$!
pki="$work/this/pki"
"$bin/baseline" --listen "127.0.0.1:$base" --cert "$pki/server.pem" --key "$pki/server-key.pem" --client-ca "$pki/ca.pem" &
pids+=($!); base_pid=$!
wait_ready "$ops"; wait_ready "$ops2"
unwrap_body "$pki" "$api" '{"tenant":"acme","object":"invoices/42"}' "$work/unwrap.json"
python3 - "$work/unwrap.json" "$work/batch.json" <<'PY'
import json, sys
one = json.load(open(sys.argv[1]))
json.dump({"items": [dict(op="unwrap", **one) for _ in range(100)]}, open(sys.argv[2], "w"))
PY
tick=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# run PORT PATH BODY PID LABEL: one loadgen run; prints "label rps p99_ms server_cpu_us_per_req".
run() {
  "$bin/loadgen" --addr "127.0.0.1:$1" --path "$2" --body "$3" --ca "$pki/ca.pem" --cert "$pki/app.pem" \
    --key "$pki/app-key.pem" --duration "$duration" --warmup 2 --concurrency "$conc" --label "$5" > "$work/out.json" &
  local lg=$! s0 s1
  # Measure inside the loadgen's window (it starts counting after its warm-up).
  sleep 2.3; s0=$(cpu "$4"); sleep $((duration - 1)); s1=$(cpu "$4")
  wait $lg
  python3 - "$work/out.json" "$s0" "$s1" "$tick" "$duration" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); s0, s1, tick, d = map(int, sys.argv[2:])
print(r["label"], r["rps"], r["p99_us"] / 1000, (s1 - s0) / tick / (r["rps"] * (d - 1)) * 1e6, r["errors"])
PY
}
echo "| round | baseline req/s | unwrap req/s: this / other | ratio to baseline: this / other | server CPU µs per unwrap: this / other | batch(100) DEKs per server CPU-second: this / other | p99 unwrap (ms): this / other | errors |"
echo "|---|---|---|---|---|---|---|---|"
for r in $(seq 1 "$rounds"); do
  b=$(run "$base" /seal "$work/unwrap.json" "$base_pid" baseline)
  ut=$(run "$api" /v1/unwrap "$work/unwrap.json" "$this_pid" unwrap-this)
  uo=$(run "$api2" /v1/unwrap "$work/unwrap.json" "$other_pid" unwrap-other)
  bt=$(run "$api" /v1/batch "$work/batch.json" "$this_pid" batch-this)
  bo=$(run "$api2" /v1/batch "$work/batch.json" "$other_pid" batch-other)
  python3 - "$r" "$b" "$ut" "$uo" "$bt" "$bo" <<'PY'
import sys
r = sys.argv[1]
b, ut, uo, bt, bo = (a.split() for a in sys.argv[2:])
f = float
print(f"| {r} | {f(b[1]):.0f} | {f(ut[1]):.0f} / {f(uo[1]):.0f} | {f(ut[1])/f(b[1]):.2f} / {f(uo[1])/f(b[1]):.2f} | "
      f"{f(ut[3]):.1f} / {f(uo[3]):.1f} | {100e6/f(bt[3]):.0f} / {100e6/f(bo[3]):.0f} | {f(ut[2]):.2f} / {f(uo[2]):.2f} | "
      f"{int(b[4])+int(ut[4])+int(uo[4])+int(bt[4])+int(bo[4])} |")
PY
done
