#!/usr/bin/env bash
# Installs kms-server as a confined systemd service under its own account.
#
# Usage (as root): bash deploy/systemd/install.sh path/to/kms-server [config.toml]
#   DESTDIR=/some/root ...   stage the files under another root (packaging, tests); the
#                            account is then not created and systemd is not reloaded.
#
# What it does: a `keyhold` system account (no login shell, no home), the binary at
# /usr/local/bin/kms-server (root-owned, 0755), /etc/keyhold (root:keyhold 0750: config,
# certificates and key file readable by the service, writable only by root),
# /var/lib/keyhold (keyhold 0700: store, audit trail, erasure file), and the unit at
# /etc/systemd/system/keyhold.service, the AppArmor profile in /etc/apparmor.d (not
# loaded) and its denial forwarder in /usr/local/lib/keyhold. It does not start the service: put the config,
# certificates and seal secret in /etc/keyhold, run
#   sudo -u keyhold /usr/local/bin/kms-server init --config /etc/keyhold/kms-server.toml
# then `systemctl enable --now keyhold`. A new service appearing is itself an event
# worth an alert: see docs/operations.md.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:?usage: install.sh path/to/kms-server [config.toml]}
config=${2:-$here/../kms-server.toml}
root=${DESTDIR:-}

if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (or set DESTDIR to stage the files)" >&2
  exit 1
fi
if [ -z "$root" ] && ! id keyhold >/dev/null 2>&1; then
  useradd --system --user-group --no-create-home --home-dir /var/lib/keyhold \
    --shell /usr/sbin/nologin --comment "Keyhold kms-server" keyhold
fi
owner() { [ -z "$root" ] && chown "$@" || true; }

install -d -m 0755 "$root/usr/local/bin" "$root/etc/systemd/system"
install -m 0755 "$bin" "$root/usr/local/bin/kms-server"
install -d -m 0750 "$root/etc/keyhold"
owner root:keyhold "$root/etc/keyhold"
if [ ! -e "$root/etc/keyhold/kms-server.toml" ]; then
  install -m 0640 "$config" "$root/etc/keyhold/kms-server.toml"
  owner root:keyhold "$root/etc/keyhold/kms-server.toml"
fi
install -d -m 0700 "$root/var/lib/keyhold"
owner keyhold:keyhold "$root/var/lib/keyhold"
install -m 0644 "$here/keyhold.service" "$root/etc/systemd/system/keyhold.service"
# The AppArmor profile is installed, not loaded: load it in complain mode first
# (deploy/README.md).
install -d -m 0755 "$root/etc/apparmor.d" "$root/usr/local/lib/keyhold"
install -m 0644 "$here/../apparmor/usr.local.bin.kms-server" "$root/etc/apparmor.d/usr.local.bin.kms-server"
install -m 0755 "$here/../apparmor/denials-to-alert.py" "$root/usr/local/lib/keyhold/denials-to-alert.py"
if [ -z "$root" ]; then
  systemctl daemon-reload 2>/dev/null || echo "install.sh: systemd not running here; reload it yourself"
fi
echo "installed under ${root:-/}: now configure /etc/keyhold, run init as keyhold, then systemctl enable --now keyhold"
