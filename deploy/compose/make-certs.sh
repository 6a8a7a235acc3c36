#!/usr/bin/env bash
# Makes deploy/compose/pki/ for the compose example: a CA, the nodes' server certificate
# (names node-a/b/c and localhost), client certificates for an admin, an app and an
# auditor (URI SANs matching kms-server.toml), and a random database password. For trying
# the example only: production certificates come from your PKI (docs/operations.md).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p pki && cd pki
[ -f ca.pem ] && { echo "pki/ exists: remove it to make new certificates" >&2; exit 1; }
ec() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ec ca-key.pem
openssl req -x509 -new -key ca-key.pem -sha256 -days 365 -subj "/CN=keyhold compose CA" -out ca.pem
issue() { # name subject-alt-name extended-key-usage
  ec "$1-key.pem"
  openssl req -new -key "$1-key.pem" -subj "/CN=$1" -out "$1.csr"
  printf 'subjectAltName=%s\nextendedKeyUsage=%s\n' "$2" "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -sha256 \
    -days 90 -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm "$1.csr" "$1.ext"
}
issue server "DNS:node-a,DNS:node-b,DNS:node-c,DNS:localhost,IP:127.0.0.1" serverAuth
for who in admin app auditor; do
  issue "$who" "URI:spiffe://keyhold.example/$who" clientAuth
done
openssl rand -hex 24 > db-password
rm -f ca.srl
# The containers run as uid 65532: the server key and the password must be readable by it.
chmod 0644 ./*.pem db-password
chmod 0600 ca-key.pem admin-key.pem app-key.pem auditor-key.pem
echo "deploy/compose/pki: CA, server and client certificates, database password"
