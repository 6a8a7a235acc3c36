#!/usr/bin/env bash
# What a hostile network costs the server (issue 22): RSS after junk-method requests and a
# scrape; a legitimate client's wait while idle connections and stalled bodies are held on
# each listener; threads and child processes after. Usage: benches/hostile.sh [N=10000]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
start_bench_dev
python3 benches/hostile.py "$pki" "$api" "$dev_public" "$ops" "${pids[0]}" "${1:-10000}"
