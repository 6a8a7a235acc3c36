#!/usr/bin/env python3
"""Checks deploy/compose/compose.yaml beyond YAML syntax (no Docker engine runs in CI):
every kms-server service runs non-root with a read-only root file system, no capabilities
and no new privileges, has the image's health check, starts only after `init` completed,
and names itself; `init` is idempotent (--if-uninitialized); the database has no TCP
listener and the API ports are bound to loopback; every file the services mount exists
after make-certs.sh (given the pki directory it made as the first argument). Writes the
nodes' config with paths mapped into that scratch root to the second argument, for
`kms-server check-config`."""

import os
import sys

import yaml

here = os.path.dirname(os.path.abspath(__file__))
doc = yaml.safe_load(open(os.path.join(here, "compose.yaml")))
services = doc["services"]
assert {"db", "init", "node-a", "node-b", "node-c"} <= set(services), services
nodes = [n for n in services if n.startswith("node-")]
ids = set()
for name in nodes + ["init"]:
    s = services[name]
    assert s["image"].startswith("keyhold/kms-server"), name
    assert s["user"].split(":")[0] not in ("0", "root"), name
    assert s["read_only"] is True, name
    assert s["cap_drop"] == ["ALL"] and not s.get("cap_add"), name
    assert "no-new-privileges:true" in s["security_opt"], name
    for v in s["volumes"]:
        src = v.split(":")[0]
        if src.startswith("./"):
            assert v.endswith(":ro"), (name, v)
for name in nodes:
    s = services[name]
    assert s["command"][0] == "serve", name
    assert s["depends_on"]["init"]["condition"] == "service_completed_successfully", name
    assert s["healthcheck"]["test"][1:3] == ["/usr/local/bin/kms-server", "health"], name
    ids.add(s["environment"]["KEYHOLD_NODE_ID"])
    for p in s["ports"]:
        assert p.startswith("127.0.0.1:"), (name, p)
assert len(ids) == len(nodes), ids
init = services["init"]
assert init["command"][:2] == ["init", "--if-uninitialized"], init["command"]
assert init["depends_on"]["db"]["condition"] == "service_healthy"
db = services["db"]
assert "listen_addresses=" in db["command"] and not db.get("ports"), db
assert "synchronous_commit=on" in db["command"]

pki = sys.argv[1]
for f in ["ca.pem", "server.pem", "server-key.pem", "db-password", "admin.pem", "admin-key.pem"]:
    assert os.path.isfile(os.path.join(pki, f)), f
config = open(os.path.join(here, "kms-server.toml")).read()
assert 'engine = "postgres"' in config
root = os.path.dirname(pki)
config = config.replace("/etc/keyhold/tls/", pki + "/").replace("/var/lib/keyhold-seal/", root + "/seal/")
config = config.replace("/var/lib/keyhold/", root + "/scratch/")
open(sys.argv[2], "w").write(config)
print(f"deploy/compose: {len(services)} services meet the checks above")
