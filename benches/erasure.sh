#!/usr/bin/env bash
# What erasure keys rooted in the HSM cost on PostgreSQL (issue 10): key creation with and
# without them, reading one erasure key (a cache miss), and a destruction sweep's rotation
# at 1 000 and 10 000 keys; one run, one table. A throwaway SoftHSM token stands in for
# the HSM (a network HSM adds its round trips to the HSM calls: one per epoch and node,
# and one per rotation). PostgreSQL: Debian's, started by tests/pg/setup.sh.
#
# Usage: bash benches/erasure.sh [creates] [populations]
#   e.g. bash benches/erasure.sh 300 1000,10000
set -euo pipefail
creates=${1:-300}
populations=${2:-1000,10000}
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/softhsm2.conf" <<CONF
directories.tokendir = $work/tokens
objectstore.backend = file
log.level = ERROR
CONF
mkdir -p "$work/tokens"
export SOFTHSM2_CONF="$work/softhsm2.conf"
softhsm2-util --init-token --free --label keyhold-bench --pin 1234-bench --so-pin 5678-bench >/dev/null
export KEYHOLD_PKCS11_PIN=1234-bench
conn=$(bash tests/pg/setup.sh)
db="keyhold_erasure_$(date +%s)"
psql "$conn" -qtAc "CREATE DATABASE $db"
url=$(sed "s/dbname=[^ ]*/dbname=$db/" <<<"$conn")
cargo build --release -q -p keyhold-benches --bin erasure
echo "machine: $(nproc) cores, $(uname -r); $(date -u +%F)"
./target/release/erasure --url "$url" --token keyhold-bench --creates "$creates" --populations "$populations"
psql "$conn" -qtAc "DROP DATABASE $db"
