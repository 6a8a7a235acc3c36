#!/usr/bin/env bash
# Where one server's CPU goes, thread by thread: `POST /v1/unwrap` at concurrency C over
# mTLS keep-alive against one kms-server (a dev store), and each thread group's CPU
# (user + system, from /proc/<pid>/task/*/stat) per request over the measured window: the
# audit writer (`keyhold-audit`), the request workers (`tokio-rt-worker`), the rest.
#
# Usage: bash benches/threads.sh [duration-seconds] [C]
#   EXTRA='\n[audit]\ndurability = "bounded-lag"\n'  appended to the server's config
#   KS=/path/to/kms-server                            another build of the server (A/B)
duration=${1:-8}; c=${2:-64}
source "$(dirname "$0")/common.sh"
api=$(free_port); ops=$(free_port); api2=$(free_port); ops2=$(free_port)
twin_dev_dirs "$work/on" "$work/off" "$api" "$ops" "$api2" "$ops2"
[ -n "${EXTRA:-}" ] && printf "$EXTRA" >> "$work/on/kms-server.toml"
RUST_LOG=warn "${KS:-$bin/kms-server}" serve --config "$work/on/kms-server.toml" 2>"$work/on.log" & pids+=($!); on_pid=$!
pki="$work/on/pki"
wait_ready "$ops"
unwrap_body "$pki" "$api" '{"tenant":"acme","object":"invoices/42"}' "$work/unwrap.json"
"$bin/loadgen" --addr "127.0.0.1:$api" --path /v1/unwrap --body "$work/unwrap.json" --ca "$pki/ca.pem" \
  --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --warmup 2 --concurrency "$c" --label on > "$work/out.json" &
lg=$!
sleep 2.3
snap() { for t in /proc/$on_pid/task/*; do echo "$(cat $t/comm) $(awk '{print $14+$15}' $t/stat)"; done | awk '{a[$1]+=$2} END {for (k in a) print k, a[k]}' | sort; }
snap > $work/s0; sleep $((duration-1)); snap > $work/s1
wait $lg
rps=$(python3 -c "import json;print(json.load(open('$work/out.json'))['rps'])")
echo "rps=$rps"
join $work/s0 $work/s1 | awk -v rps=$rps -v d=$duration -v tick=$(getconf CLK_TCK) '{printf "%-22s %.2f us/req\n", $1, ($3-$2)/tick/(rps*(d-1))*1e6}'
