#!/usr/bin/env bash
# Makes deploy/compose/pki/ for the compose example: a CA, the nodes' server certificate
# (names node-a/b/c and localhost), client certificates for an admin, an app and an
# auditor (URI SANs matching kms-server.toml), and a random database password. For trying
# the example only: production certificates come from your PKI (docs/operations.md).
#
# Every file is made under umask 077: private keys and the password are readable by their
# owner alone (0600), certificates are then opened to 0644. Two directories, so that no
# container ever sees the CA key or a client's key:
#   pki/        0700  the host's side: ca-key.pem (the CA key: mounted nowhere), ca.pem,
#                     the clients' certificates and keys (admin, app, auditor: for kmsctl
#                     on this host), db-password (the database's copy: a compose secret)
#   pki/node/   0755  what the nodes mount at /etc/keyhold/tls, and nothing more: ca.pem
#                     (the client CA), server.pem, server-key.pem, db-password
# The containers read their files as their own accounts: the nodes as uid 65532 (the
# image's "nonroot"), PostgreSQL as uid 999. Run as root, this script gives pki/node/ to
# 65532 and the database's password to 999; run as yourself, it prints the two chown
# commands a Linux Docker engine needs (Docker Desktop maps file ownership itself).
set -euo pipefail
umask 077
cd "$(dirname "$0")"
[ -f pki/ca.pem ] && { echo "pki/ exists: remove it to make new certificates" >&2; exit 1; }
mkdir -p pki/node
chmod 0700 pki
chmod 0755 pki/node
cd pki
ec() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ec ca-key.pem
openssl req -x509 -new -key ca-key.pem -sha256 -days 365 -subj "/CN=keyhold compose CA" -out ca.pem
issue() { # directory name subject-alt-name extended-key-usage
  local dir=$1 name=$2
  ec "$dir/$name-key.pem"
  openssl req -new -key "$dir/$name-key.pem" -subj "/CN=$name" -out "$name.csr"
  printf 'subjectAltName=%s\nextendedKeyUsage=%s\n' "$3" "$4" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -sha256 \
    -days 90 -extfile "$name.ext" -out "$dir/$name.pem" 2>/dev/null
  rm "$name.csr" "$name.ext"
  chmod 0644 "$dir/$name.pem"
}
issue node server "DNS:node-a,DNS:node-b,DNS:node-c,DNS:localhost,IP:127.0.0.1" serverAuth
for who in admin app auditor sys; do
  issue . "$who" "URI:spiffe://keyhold.example/$who" clientAuth
done
rm -f ca.srl
chmod 0644 ca.pem
cp -p ca.pem node/ca.pem
openssl rand -hex 24 > db-password
cp -p db-password node/db-password
if [ "$(id -u)" -eq 0 ]; then
  chown -R 65532:65532 node
  chown 999:999 db-password
  echo "deploy/compose/pki: CA, server and client certificates, database password (node/ owned by 65532, db-password by 999)"
else
  echo "deploy/compose/pki: CA, server and client certificates, database password"
  echo "With a Linux Docker engine the containers read these as their own uids (the keys are 0600):"
  echo "  sudo chown -R 65532:65532 $PWD/node && sudo chown 999:999 $PWD/db-password"
fi
