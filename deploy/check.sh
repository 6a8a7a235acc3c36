#!/usr/bin/env bash
# Checks the deploy assets that can be checked here (no service manager or container
# engine needed): the systemd unit's syntax (`systemd-analyze verify`, on a copy whose
# ExecStart names the binary just built) and its sandbox (`systemd-analyze security
# --offline=yes`: exposure must be at most 2.0, "OK"), and the install script staged into
# a scratch root (files, modes).
#
# Usage: bash deploy/check.sh [path/to/kms-server]   (default target/debug/kms-server)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/debug/kms-server}")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

unit=deploy/systemd/keyhold.service
grep -q '^ExecStart="/usr/local/bin/kms-server" ' "$unit"
sed "s#^ExecStart=\"/usr/local/bin/kms-server\"#ExecStart=\"$bin\"#" "$unit" > "$tmp/keyhold.service"
# verify exits 0 on unknown keys and bad values (it only warns): any output fails here.
out=$(systemd-analyze verify "$tmp/keyhold.service" 2>&1) || { echo "$out" >&2; exit 1; }
if [ -n "$out" ]; then
  echo "deploy/check.sh: systemd-analyze verify complained:" >&2
  echo "$out" >&2
  exit 1
fi
exposure=$(systemd-analyze security --offline=yes "$unit" | awk '/Overall exposure level/ {print $(NF-2)}')
if ! python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) <= 2.0 else 1)" "$exposure"; then
  echo "deploy/check.sh: $unit exposure $exposure is above 2.0" >&2
  exit 1
fi
echo "deploy/check.sh: $unit verifies; exposure $exposure (OK)"

DESTDIR="$tmp/root" bash deploy/systemd/install.sh "$bin" >/dev/null
for want in "755 usr/local/bin/kms-server" "750 etc/keyhold" "640 etc/keyhold/kms-server.toml" \
            "700 var/lib/keyhold" "644 etc/systemd/system/keyhold.service"; do
  mode=${want%% *}; path=${want#* }
  got=$(stat -c %a "$tmp/root/$path")
  [ "$got" = "$mode" ] || { echo "deploy/check.sh: $path has mode $got, want $mode" >&2; exit 1; }
done
cmp -s "$tmp/root/usr/local/bin/kms-server" "$bin" || { echo "deploy/check.sh: binary not installed as built" >&2; exit 1; }
cmp -s "$tmp/root/etc/keyhold/kms-server.toml" deploy/kms-server.toml || { echo "deploy/check.sh: config not staged" >&2; exit 1; }
echo "deploy/check.sh: install.sh stages the files with the right modes"
