#!/usr/bin/env bash
# Where the CPU goes per request: the bare axum+rustls baseline, kms-server with its audit
# trail (the default, every record flushed before its answer: "on"), with the trail in
# bounded-lag mode (`[audit] durability = "bounded-lag"`: "lag") and with
# `[audit] enabled = false` ("off") (copies of one store),
# `POST /v1/unwrap` (the baseline: /seal) at concurrency C, two rounds in one run. Per
# request: the server process's CPU (user + system), the load generator's, and the whole
# machine's busy time (user, nice, system, iowait, irq, softirq from /proc/stat) over the
# measured window.
#
# Usage: bash benches/cpu.sh [duration-seconds] [C]
duration=${1:-8}; c=${2:-64}
source "$(dirname "$0")/common.sh"
api=$(free_port); ops=$(free_port); api2=$(free_port); ops2=$(free_port); base=$(free_port)
api3=$(free_port); ops3=$(free_port)
twin_dev_dirs "$work/on" "$work/off" "$api" "$ops" "$api2" "$ops2"
cp -r "$work/on" "$work/lag"
sed -i "s/^listen = .*/listen = \"127.0.0.1:$api3\"/; s/^ops_listen = .*/ops_listen = \"127.0.0.1:$ops3\"/" "$work/lag/kms-server.toml"
sed -i "s|$work/on/|$work/lag/|g" "$work/lag/kms-server.toml"
printf '\n[audit]\nenabled = false\n' >> "$work/off/kms-server.toml"
printf '\n[audit]\ndurability = "bounded-lag"\nmax_lag_ms = 10\n' >> "$work/lag/kms-server.toml"
RUST_LOG=warn "$bin/kms-server" serve --config "$work/on/kms-server.toml" 2>"$work/on.log" & pids+=($!); on_pid=$!
RUST_LOG=warn "$bin/kms-server" serve --config "$work/off/kms-server.toml" 2>"$work/off.log" & pids+=($!); off_pid=$!
RUST_LOG=warn "$bin/kms-server" serve --config "$work/lag/kms-server.toml" 2>"$work/lag.log" & pids+=($!); lag_pid=$!
pki="$work/on/pki"
"$bin/baseline" --listen "127.0.0.1:$base" --cert "$pki/server.pem" --key "$pki/server-key.pem" --client-ca "$pki/ca.pem" & pids+=($!); base_pid=$!
wait_ready "$ops"; wait_ready "$ops2"; wait_ready "$ops3"
unwrap_body "$pki" "$api" '{"tenant":"acme","object":"invoices/42"}' "$work/unwrap.json"
tick=$(getconf CLK_TCK)
run() { # port path pid label
  "$bin/loadgen" --addr "127.0.0.1:$1" --path "$2" --body "$work/unwrap.json" --ca "$pki/ca.pem" \
  --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --warmup 2 --concurrency "$c" --label "$4" > "$work/out.json" &
  local lg=$!
  sleep 2.3
  local s0=$(awk '{print $14 + $15}' /proc/$3/stat) l0=$(awk '{print $14 + $15}' /proc/$lg/stat) t0=$(awk '/^cpu /{print $2+$3+$4+$6+$7+$8}' /proc/stat)
  sleep $((duration-1))
  local s1=$(awk '{print $14 + $15}' /proc/$3/stat) l1=$(awk '{print $14 + $15}' /proc/$lg/stat) t1=$(awk '/^cpu /{print $2+$3+$4+$6+$7+$8}' /proc/stat)
  wait $lg
  python3 - "$work/out.json" $s0 $s1 $l0 $l1 $t0 $t1 $tick $duration <<'PY'
import json,sys
r=json.load(open(sys.argv[1])); s0,s1,l0,l1,t0,t1,tick,d=map(int,sys.argv[2:])
n=r["rps"]*(d-1)
f=lambda a,b:(b-a)/tick/n*1e6
print(f"{r['label']:8} rps={r['rps']:.0f} p50={r['p50_us']/1000:.3f}ms p99={r['p99_us']/1000:.2f}ms server={f(s0,s1):.1f}us/req loadgen={f(l0,l1):.1f}us/req machine={f(t0,t1):.1f}us/req")
PY
}
for i in 1 2; do
run $base /seal $base_pid baseline
run $api /v1/unwrap $on_pid on
run $api3 /v1/unwrap $lag_pid lag
run $api2 /v1/unwrap $off_pid off
done
