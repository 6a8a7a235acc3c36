#!/usr/bin/env bash
# Bulk rewrap throughput: `kmsctl rewrap --in` over a file of N wrapped DEKs (each with its
# own context) against a dev-mode server, at several batch sizes, after a rotation.
# Usage: bash benches/rewrap.sh [items] [batch sizes...]
items=${1:-20000}
shift || true
sizes=${*:-10 100 1000}
source "$(dirname "$0")/common.sh"
cargo build --release -q -p kmsctl
start_bench_dev
kmsctl() { "$bin/kmsctl" --endpoint "https://127.0.0.1:$api" --tls-ca "$pki/ca.pem" "$@"; }
as_app=(--tls-cert "$pki/app.pem" --tls-key "$pki/app-key.pem")
as_admin=(--tls-cert "$pki/admin.pem" --tls-key "$pki/admin-key.pem")
# N data keys from the demo key, 1000 per batch request, each with its own context.
python3 - "$items" "$work" <<'PY'
import json, sys
n, work = int(sys.argv[1]), sys.argv[2]
for b in range(0, n, 1000):
    items = [{"op": "datakey", "key": "demo", "context": {"row": str(i)}} for i in range(b, min(n, b + 1000))]
    json.dump({"items": items}, open(f"{work}/batch-{b // 1000:05d}.json", "w"))
PY
for f in "$work"/batch-*.json; do kmsctl "${as_app[@]}" --output json batch --in "$f" > "$f.out"; done
python3 - "$work" <<'PY'
import glob, json, sys
work = sys.argv[1]
with open(f"{work}/deks.jsonl", "w") as out:
    for f in sorted(glob.glob(f"{work}/batch-*.json")):
        items = json.load(open(f))["items"]
        results = json.load(open(f + ".out"))["results"]
        for item, res in zip(items, results):
            out.write(json.dumps({"id": item["context"]["row"], "wrapped": res["datakey"]["wrapped"], "context": item["context"]}) + "\n")
PY
kmsctl "${as_admin[@]}" keys rotate demo > /dev/null
echo "| batch size | items | seconds | items/s |"
echo "|---|---|---|---|"
for b in $sizes; do
  start=$(date +%s.%N)
  kmsctl "${as_app[@]}" rewrap --in "$work/deks.jsonl" --out "$work/out-$b.jsonl" --batch-size "$b" 2>/dev/null
  end=$(date +%s.%N)
  python3 -c "import sys; n=int(sys.argv[1]); s=float(sys.argv[3])-float(sys.argv[2]); print(f'| {sys.argv[4]} | {n} | {s:.2f} | {n/s:.0f} |')" "$items" "$start" "$end" "$b"
done
