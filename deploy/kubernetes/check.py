#!/usr/bin/env python3
"""Checks the Kubernetes manifests beyond their schema (kubernetes-validate --strict does
that): every pod template meets the Pod Security "restricted" profile, probes use the ops
listener, certificates and the seal secret are read-only Secret mounts, the root file
system is read-only, and the embedded server config is the one `kms-server check-config`
accepts (written to the path given as the first argument)."""

import sys
import glob
import yaml

docs = [d for f in sorted(glob.glob("deploy/kubernetes/*.yaml")) for d in yaml.safe_load_all(open(f)) if d]
kinds = {d["kind"] for d in docs}
assert {"Namespace", "StatefulSet", "Service", "NetworkPolicy", "ConfigMap"} <= kinds, kinds

ns = next(d for d in docs if d["kind"] == "Namespace")
assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"

for d in docs:
    if d["kind"] not in ("StatefulSet", "Deployment"):
        continue
    name = d["metadata"]["name"]
    pod = d["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, name
    assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
    assert pod.get("automountServiceAccountToken") is False, name
    mounts_ro = {v["name"] for c in pod["containers"] for v in c["volumeMounts"] if v.get("readOnly")}
    secrets = {v["name"] for v in pod["volumes"] if "secret" in v}
    assert secrets and secrets <= mounts_ro, (name, secrets, mounts_ro)
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert not sc.get("privileged"), name
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"]["port"] == "ops", (name, probe)
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", name

np = next(d for d in docs if d["kind"] == "NetworkPolicy")
assert set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}

config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["kms-server.toml"]
open(sys.argv[1], "w").write(config)
print(f"deploy/kubernetes: {len(docs)} manifests meet the restricted profile and the checks above")
