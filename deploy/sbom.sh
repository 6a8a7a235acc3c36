#!/usr/bin/env bash
# The CycloneDX SBOM (JSON, spec 1.5) of what ships: the kms-server binary's crate and every
# crate it depends on, build-time ones included (aws-lc-sys's build, for one), each with
# its version, license and package URL. Written to target/sbom/kms-server.cdx.json (or the
# directory given); CI runs it on every build (`.ci/run`).
#
# Usage: bash deploy/sbom.sh [output-dir]      (needs `cargo install --locked cargo-cyclonedx`)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/sbom}
mkdir -p "$out"
# cargo-cyclonedx describes every workspace member; only the server's SBOM is kept.
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s) \
  cargo cyclonedx --format json --spec-version 1.5 -q
mv kms-server/kms-server.cdx.json "$out/kms-server.cdx.json"
find . -path ./target -prune -o -name '*.cdx.json' -print0 | xargs -0 rm -f
python3 - "$out/kms-server.cdx.json" <<'PY'
import json, sys
bom = json.load(open(sys.argv[1]))
assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.5", bom.get("specVersion")
assert bom["metadata"]["component"]["name"] == "kms-server"
comps = bom["components"]
names = {c["name"] for c in comps}
missing = {"rustls", "aws-lc-rs", "ring", "axum", "zeroize", "redb", "tokio"} - names
assert not missing, missing
no_purl = [c["name"] for c in comps if not c.get("purl", "").startswith("pkg:cargo/")]
assert not no_purl, no_purl
print(f"{sys.argv[1]}: CycloneDX {bom['specVersion']}, {len(comps)} components, every one with a pkg:cargo purl")
PY
