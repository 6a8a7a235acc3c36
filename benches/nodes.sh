#!/usr/bin/env bash
# Unwrap over mTLS keep-alive with 1, 2 and 3 kms-server nodes on one PostgreSQL store,
# beside one node on the embedded store (redb), in one run so every number shares the
# machine state (issue 10). The load generator spreads its connections over the nodes
# (connection i to node i mod n). PostgreSQL (Debian's, started by tests/pg/setup.sh), the
# nodes and the load generator all share this machine's cores: say so with the numbers.
#
# Usage: bash benches/nodes.sh [duration-seconds] [concurrency levels...]
#   e.g. bash benches/nodes.sh 10 16 64
# Loopback only; every run is bounded in time. Prints a Markdown table; raw JSON lines go
# to bench-results/.
duration=${1:-10}
shift || true
levels=${*:-16 64}
source "$(dirname "$0")/common.sh"
out_dir=bench-results
mkdir -p "$out_dir"
out="$out_dir/nodes-$(date -u +%Y%m%dT%H%M%SZ).jsonl"

conn=$(bash tests/pg/setup.sh)
db="keyhold_bench_$(date +%s)"
psql "$conn" -qtAc "CREATE DATABASE $db"
url=$(sed "s/dbname=[^ ]*/dbname=$db/" <<<"$conn")

start_bench_dev
ctx='{"tenant":"acme","object":"invoices/42"}'
unwrap_body "$pki" "$api" "$ctx" "$work/unwrap-embedded.json"

# Three nodes: the dev PKI, identities and key file, the store in PostgreSQL.
node_api=(); node_ops=()
for n in 1 2 3; do
  d="$work/n$n"; mkdir -p "$d"
  cp -r "$pki" "$work/dev/master.key" "$d/"
  a=$(free_port); o=$(free_port); node_api+=("$a"); node_ops+=("$o")
  python3 - "$work/dev/kms-server.toml" "$d/kms-server.toml" "$a" "$o" "$url" "node-$n" <<'PY'
import re, sys
src, dst, api, ops, url, node = sys.argv[1:]
t = open(src).read().split("\n# The end-user protocols")[0] + "\n"
t = re.sub(r'^listen = .*$', f'listen = "127.0.0.1:{api}"', t, count=1, flags=re.M)
t = re.sub(r'^ops_listen = .*$', f'ops_listen = "127.0.0.1:{ops}"', t, count=1, flags=re.M)
t = t.replace('[store]\nengine = "redb"\npath = "keyhold.redb"',
              f'[store]\nengine = "postgres"\npath = "node"\nurl = "{url}"\npool_size = 4\nnode_id = "{node}"')
assert 'engine = "postgres"' in t
open(dst, "w").write(t)
PY
done
"$bin/kms-server" init --config "$work/n1/kms-server.toml" 2>/dev/null
for n in 1 2 3; do
  RUST_LOG=warn "$bin/kms-server" serve --config "$work/n$n/kms-server.toml" 2>"$work/n$n.log" &
  pids+=($!)
  wait_ready "${node_ops[$((n-1))]}"
done
curl -sSf --cacert "$pki/ca.pem" --cert "$pki/admin.pem" --key "$pki/admin-key.pem" \
  -H 'content-type: application/json' "https://127.0.0.1:${node_api[0]}/v1/keys" \
  -d '{"name":"demo","grants":[{"identity":"spiffe://keyhold.dev/app","operations":["datakey","unwrap"]}]}' >/dev/null
unwrap_body "$pki" "${node_api[0]}" "$ctx" "$work/unwrap-pg.json"

gen() { # label concurrency body port...
  local label=$1 c=$2 body=$3; shift 3
  local addrs=(); for p in "$@"; do addrs+=(--addr "127.0.0.1:$p"); done
  "$bin/loadgen" "${addrs[@]}" --path /v1/unwrap --body "$body" --ca "$pki/ca.pem" \
    --cert "$pki/app.pem" --key "$pki/app-key.pem" --duration "$duration" --warmup 2 \
    --concurrency "$c" --label "$label"
}

echo "| c | embedded req/s | p50 / p99 (ms) | 1 node on PostgreSQL | p50 / p99 (ms) | 2 nodes | p50 / p99 (ms) | 3 nodes | p50 / p99 (ms) | 3 nodes / embedded | errors |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for c in $levels; do
  e=$(gen embedded "$c" "$work/unwrap-embedded.json" "$api"); echo "$e" >> "$out"
  p1=$(gen pg-1 "$c" "$work/unwrap-pg.json" "${node_api[0]}"); echo "$p1" >> "$out"
  p2=$(gen pg-2 "$c" "$work/unwrap-pg.json" "${node_api[0]}" "${node_api[1]}"); echo "$p2" >> "$out"
  p3=$(gen pg-3 "$c" "$work/unwrap-pg.json" "${node_api[@]}"); echo "$p3" >> "$out"
  python3 - "$e" "$p1" "$p2" "$p3" <<'PY'
import json, sys
e, p1, p2, p3 = (json.loads(a) for a in sys.argv[1:])
ms = lambda x: f"{x/1000:.2f}"
pct = lambda r: f"{ms(r['p50_us'])} / {ms(r['p99_us'])}"
print(f"| {e['concurrency']} | {e['rps']:.0f} | {pct(e)} | {p1['rps']:.0f} | {pct(p1)} | {p2['rps']:.0f} | {pct(p2)} | "
      f"{p3['rps']:.0f} | {pct(p3)} | {p3['rps']/e['rps']:.2f} | {e['errors']}+{p1['errors']}+{p2['errors']}+{p3['errors']} |")
PY
done
psql "$conn" -qtAc "SELECT 1" >/dev/null
