#!/usr/bin/env bash
# Starts the machine's PostgreSQL (Debian's packages: installed when missing), makes a
# superuser role for the calling OS user and an empty database `keyhold_test`, and prints
# the connection string the tests read from KEYHOLD_TEST_PG (Unix socket, peer auth: no
# password anywhere). Used by .ci/run; safe to run again.
set -euo pipefail
if ! command -v pg_lsclusters >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
  else
    echo "PostgreSQL is not installed: apt-get install postgresql" >&2; exit 1
  fi
fi
read -r version cluster _ < <(pg_lsclusters -h | head -1) || true
if [ -z "${version:-}" ]; then
  version=$(ls /usr/lib/postgresql | sort -n | tail -1)
  pg_createcluster "$version" main >&2
  cluster=main
fi
pg_ctlcluster "$version" "$cluster" start >&2 2>/dev/null || true
for _ in $(seq 1 50); do
  runuser -u postgres -- pg_isready -q -h /var/run/postgresql && break
  sleep 0.2
done
me=$(id -un)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
as_pg psql -h /var/run/postgresql -qtAc "SELECT 1 FROM pg_roles WHERE rolname = '$me'" | grep -q 1 \
  || as_pg createuser -h /var/run/postgresql -s "$me" >&2
psql -h /var/run/postgresql -d postgres -qtAc "SELECT 1 FROM pg_database WHERE datname = 'keyhold_test'" | grep -q 1 \
  || createdb -h /var/run/postgresql keyhold_test >&2
echo "host=/var/run/postgresql user=$me dbname=keyhold_test"
