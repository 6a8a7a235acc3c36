#!/usr/bin/env bash
# The exfiltration brake's figures (issue 28; RELIABILITY.md "Exfiltration brake"), in one
# run on this machine:
# 1. Full speed: a thief with the app's certificate unwraps 200 000 DEKs through
#    `POST /v1/batch` (100 a request, 16 connections) from a server without the brake.
# 2. The same thief against a twin server (same keys) whose [brake] is the deployment
#    example's (deploy/kms-server.toml) in `enforce`: DEKs it gets before the hold, and
#    how many seconds of its full-speed traffic that is (goal: at most 1).
# 3. The replay (benches/src/bin/brake_replay.rs): two weeks of generated diurnal traffic
#    with bursts through the brake's code under the same settings, thieves at the speed of
#    step 1: false alarms (goal: none) and DEKs before the hold when the learned baseline
#    (not only the budgets) has to catch them.
#
# Usage: bash benches/brake.sh
source "$(dirname "$0")/common.sh"
api=$(free_port); ops=$(free_port); api2=$(free_port); ops2=$(free_port)
twin_dev_dirs "$work/off" "$work/on" "$api" "$ops" "$api2" "$ops2"
python3 - deploy/kms-server.toml "$work/on/kms-server.toml" <<'PY'
import re, sys
src = open(sys.argv[1]).read()
brake = re.search(r"(?ms)^\[brake\]\n.*?(?=^\[(?!brake))", src).group(0)
brake = re.sub(r'(?m)^mode = .*$', 'mode = "enforce"', brake)
open(sys.argv[2], "a").write("\n" + brake)
print(brake)
PY
serve_dir off
serve_dir on
wait_ready "$ops"; wait_ready "$ops2"
pki="$work/off/pki"
full=$("$bin/brake_thief" --endpoint "https://127.0.0.1:$api" --pki "$pki")
braked=$("$bin/brake_thief" --endpoint "https://127.0.0.1:$api2" --pki "$pki" --make-at "https://127.0.0.1:$api")
python3 - "$full" "$braked" <<'PY'
import json, sys
full, braked = (json.loads(a) for a in sys.argv[1:])
print(f"full speed (no brake): {full['deks']} DEKs in {full['seconds']:.2f} s = {full['rate']:.0f} DEKs/s")
print(f"with the brake: {braked['deks']} DEKs before the hold, in {braked['seconds']:.2f} s; "
      f"{braked['deks'] / full['rate']:.2f} s of full-speed traffic")
PY
rate=$(python3 -c 'import json,sys; print(round(json.loads(sys.argv[1])["rate"]))' "$full")
"$bin/brake_replay" --rate "$rate" --config deploy/kms-server.toml
