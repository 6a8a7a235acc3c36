#!/usr/bin/env python3
"""Checks the Kubernetes manifests beyond their schema (kubernetes-validate --strict does
that): every pod template meets the Pod Security "restricted" profile, probes use the ops
listener, certificates and the seal secret are read-only Secret mounts, the root file
system is read-only, the API Service carries no ops port (only the metrics ClusterIP
Service does, and the NetworkPolicy admits it from monitoring alone), every manifest that
mounts the seal Secret points at what a key in a Secret means (deploy/README.md), and the
embedded server configs are ones `kms-server check-config`
accepts (written to the paths given as the first and second arguments: the StatefulSet's,
then the shared-store Deployment's)."""

import sys
import glob
import yaml

files = sorted(glob.glob("deploy/kubernetes/*.yaml") + glob.glob("deploy/kubernetes/shared-store/*.yaml"))
docs = [d for f in files for d in yaml.safe_load_all(open(f)) if d]
kinds = {d["kind"] for d in docs}
assert {"Namespace", "StatefulSet", "Deployment", "Service", "NetworkPolicy", "ConfigMap",
        "PodDisruptionBudget"} <= kinds, kinds

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

np = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "kms-server")
assert set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}

# The ops listener is plain HTTP (/healthz, /readyz, /metrics): it is not on the Service
# clients use. Kubelet probes reach the pod directly; Prometheus scrapes through the
# separate ClusterIP Service `kms-server-metrics`, and the NetworkPolicy admits the ops
# port from the monitoring namespace only.
OPS = {"ops", 9443}
services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
api = services["kms-server"]["spec"]
assert [(p["port"], p.get("targetPort")) for p in api["ports"]] == [(8443, "api")], api["ports"]
for name, s in services.items():
    targets = {p.get("targetPort", p["port"]) for p in s["spec"]["ports"]} | {p["port"] for p in s["spec"]["ports"]}
    if targets & OPS:
        assert name == "kms-server-metrics", f"Service {name} exposes the ops port"
metrics = services["kms-server-metrics"]["spec"]
assert metrics.get("type", "ClusterIP") == "ClusterIP" and metrics.get("clusterIP") != "None", metrics
assert [p.get("targetPort") for p in metrics["ports"]] == ["ops"], metrics["ports"]
assert metrics["selector"] == services["kms-server"]["spec"]["selector"]
for rule in np["spec"]["ingress"]:
    ports = {p["port"] for p in rule.get("ports", [])}
    assert ports and rule.get("from"), f"an ingress rule admits every port or every peer: {rule}"
    if ports & OPS:
        assert ports <= OPS and rule["from"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}], rule

# A key file in a Secret is as safe as the cluster's Secrets: every manifest that mounts
# the seal Secret points at what that means (deploy/README.md).
readme = open("deploy/README.md").read()
assert "\n### The master key in a Kubernetes Secret\n" in readme
for f in files:
    text = open(f).read()
    if "kms-server-seal" in text:
        assert "deploy/README.md#the-master-key-in-a-kubernetes-secret" in text, f

# The shared-store Deployment: stateless (no PVC), several replicas that the disruption
# budget keeps serving, each named by its pod, spread over hosts, allowed out to the
# database only by the extra policy.
dep = next(d for d in docs if d["kind"] == "Deployment")
pod = dep["spec"]["template"]["spec"]
assert dep["spec"]["replicas"] >= 3
assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
env = {e["name"]: e for e in pod["containers"][0]["env"]}
assert env["KEYHOLD_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
assert 2 <= pdb["spec"]["minAvailable"] < dep["spec"]["replicas"]
db_np = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "kms-server-database")
assert db_np["spec"]["egress"][0]["ports"] == [{"port": 5432, "protocol": "TCP"}]
maps = {d["metadata"]["name"]: d["data"]["kms-server.toml"] for d in docs if d["kind"] == "ConfigMap"}
used = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
assert used == {"kms-server-shared-config"}, used
assert 'engine = "postgres"' in maps["kms-server-shared-config"]
assert "tls_ca" in maps["kms-server-shared-config"] and "password_file" in maps["kms-server-shared-config"]

open(sys.argv[1], "w").write(maps["kms-server-config"])
open(sys.argv[2], "w").write(maps["kms-server-shared-config"])
print(f"deploy/kubernetes: {len(docs)} manifests meet the restricted profile and the checks above")
