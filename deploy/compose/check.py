#!/usr/bin/env python3
"""Checks deploy/compose/compose.yaml beyond YAML syntax (no Docker engine runs in CI):
every kms-server service runs non-root with a read-only root file system, no capabilities
and no new privileges, has the image's health check, starts only after `init` completed,
and names itself; `init` is idempotent (--if-uninitialized); the database has no TCP
listener and the API ports are bound to loopback; make-certs.sh (given the pki directory
it made as the first argument) left private keys and passwords owner-only, every file the
services mount exists, and no service sees the CA key or a client's key (the nodes mount
pki/node/ alone; run as root, its files belong to the nodes' uid). Writes the
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

# Private keys and passwords: owner-only (make-certs.sh runs under umask 077). The CA key
# and the clients' keys stay on the host: the services see only what the compose file
# mounts, and of the PKI that is pki/node/ (the CA certificate, the server's certificate
# and key, the password) and the database's own copy of the password.
secret = lambda f: f.endswith("-key.pem") or os.path.basename(f) == "db-password"
made = [os.path.relpath(os.path.join(d, f), pki) for d, _, fs in os.walk(pki) for f in fs]
for f in made:
    mode = os.stat(os.path.join(pki, f)).st_mode & 0o777
    if secret(f):
        assert mode & 0o077 == 0, f"pki/{f} has mode {mode:o}: others can read it"
assert os.stat(pki).st_mode & 0o077 == 0, "pki/ is open to others"
root_dir = os.path.dirname(pki)


def reachable(service):
    """The files of the made PKI that the service's bind mounts and secrets expose."""
    sources = [v.split(":")[0] for v in service.get("volumes", []) if v.startswith("./")]
    for sec in service.get("secrets", []):
        sources.append(doc["secrets"][sec if isinstance(sec, str) else sec["source"]]["file"])
    seen = set()
    for src in sources:
        path = os.path.normpath(os.path.join(root_dir, src))
        for f in made:
            full = os.path.join(pki, f)
            if full == path or full.startswith(path.rstrip("/") + "/"):
                seen.add(f)
    return seen


for name in nodes + ["init"]:
    assert "./pki:" not in " ".join(services[name]["volumes"]), (name, "mounts all of pki/")
    seen = reachable(services[name])
    keys = {f for f in seen if f.endswith("-key.pem")}
    assert keys == {os.path.join("node", "server-key.pem")}, (name, "sees private keys", keys)
assert not any(f.endswith("-key.pem") for f in reachable(db)), "the database sees a private key"
for f in ["ca.pem", "ca-key.pem", "db-password", "admin.pem", "admin-key.pem",
          "node/ca.pem", "node/server.pem", "node/server-key.pem", "node/db-password"]:
    assert os.path.isfile(os.path.join(pki, f)), f
if os.geteuid() == 0:
    # As root, make-certs.sh hands the files to the accounts that read them in the
    # containers: the nodes' uid 65532 and PostgreSQL's 999.
    for f in made:
        owner = os.stat(os.path.join(pki, f)).st_uid
        if f.startswith("node" + os.sep):
            assert owner == 65532, (f, owner)
        elif f == "db-password":
            assert owner == 999, (f, owner)

config = open(os.path.join(here, "kms-server.toml")).read()
assert 'engine = "postgres"' in config
root = os.path.dirname(pki)
config = config.replace("/etc/keyhold/tls/", pki + "/node/").replace("/var/lib/keyhold-seal/", root + "/seal/")
config = config.replace("/var/lib/keyhold/", root + "/scratch/")
open(sys.argv[2], "w").write(config)
print(f"deploy/compose: {len(services)} services meet the checks above")
