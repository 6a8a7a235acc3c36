#!/usr/bin/env python3
"""Checks what goes into the container image and what it is built from (no Docker engine
runs in CI):

1. The build context. `.dockerignore` is read with Docker's own rules (patterns relative
   to the context root, `**` for any number of directories, a pattern that matches a
   directory excludes everything under it, `!` re-includes, the last match wins). Key
   material, the compose example's PKI, build output and the git directory must be left
   out; every file the build reads (the workspace manifests and the members' tracked
   files) must stay in. With `--pki DIR` (a directory made by deploy/compose/make-certs.sh),
   every file it made must be left out at its place, deploy/compose/pki/.

2. Image pins. Every image the Dockerfile builds from, and every image the compose
   example and the Kubernetes manifests run, is pinned by digest (`name:tag@sha256:<64
   hex>`: the tag says what it is, the digest fixes the bytes). The one exception is
   Keyhold's own image (`keyhold/kms-server`): it has no published digest, it is built
   and pushed by the operator, who must reference it by the digest of that push
   (deploy/README.md, "Image pins"). `--strict` refuses that exception too: run it on
   your own rendered manifests before you apply them.

Usage: python3 deploy/docker/check.py [--pki DIR] [--strict] [MANIFEST.yaml ...]
(run from the repository root; without manifests, the repository's own are checked)."""

import argparse
import glob
import os
import re
import subprocess
import sys

import yaml

OWN_IMAGE = "keyhold/kms-server"
PINNED = re.compile(r"^[a-z0-9][a-z0-9._/:-]*@sha256:[0-9a-f]{64}$")


# ---- 1. the build context ------------------------------------------------------------

def read_dockerignore(path):
    """(exclusion?, compiled pattern) in file order, as Docker's builder reads them."""
    rules = []
    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\n")
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        invert = line.startswith("!")
        if invert:
            line = line[1:].strip()
        if not line:
            continue
        line = os.path.normpath(line).replace(os.sep, "/")
        if len(line) > 1 and line.startswith("/"):
            line = line.lstrip("/")
        rules.append((invert, compile_pattern(line)))
    return rules


def compile_pattern(pattern):
    """Docker's pattern syntax (moby/patternmatcher) as a regular expression."""
    out, i, n = "^", 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if i < n and pattern[i] == "*":
                i += 1
                if i < n and pattern[i] == "/":
                    i += 1
                out += ".*" if i == n else "(.*/)?"
            else:
                out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "\\" and i < n:
            out += re.escape(pattern[i])
            i += 1
        elif c == "[":
            j = pattern.find("]", i)
            if j < 0:
                out += re.escape(c)
            else:
                body = pattern[i:j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out += "[" + body + "]"
                i = j + 1
        else:
            out += re.escape(c)
    return re.compile(out + "$")


def excluded(rules, path):
    """Whether Docker leaves `path` (relative, with /) out of the build context."""
    parents = path.split("/")[:-1]
    verdict = False
    for invert, rx in rules:
        hit = rx.match(path) is not None
        if not hit:
            hit = any(rx.match("/".join(parents[: k + 1])) for k in range(len(parents)))
        if hit:
            verdict = not invert
    return verdict


# Paths that must never reach the build context (the file need not exist: these are
# where such files are made or kept).
MUST_EXCLUDE = [
    ".git/HEAD",
    ".git/objects/pack/pack-0.pack",
    "target/release/kms-server",
    "target/debug/kms-server",
    "kms-server/fuzz/target/x86_64-unknown-linux-gnu/release/fuzz_pem",
    "deploy/compose/pki/ca-key.pem",
    "deploy/compose/pki/ca.pem",
    "deploy/compose/pki/db-password",
    "deploy/compose/pki/node/server-key.pem",
    "deploy/compose/pki/admin-key.pem",
    "deploy/compose/.env",
    "keyhold-dev/master.key",
    "bench-results/run-1/results.json",
    "keyhold.redb",
    "data/keyhold.redb",
    "master.key",
    "seal/master.key",
    "etc/keyhold/tls/server-key.pem",
    "tls/tls.key",
    "client-ca-key.pem",
    "certs/client.p12",
    "certs/client.pfx",
    "db-password",
    ".env",
]


def check_context(root, pki):
    rules = read_dockerignore(os.path.join(root, ".dockerignore"))
    leaks = [p for p in MUST_EXCLUDE if not excluded(rules, p)]
    if pki:
        for d, _, files in os.walk(pki):
            for f in files:
                rel = os.path.relpath(os.path.join(d, f), pki).replace(os.sep, "/")
                p = "deploy/compose/pki/" + rel
                if not excluded(rules, p):
                    leaks.append(p + " (made by make-certs.sh)")
    assert not leaks, f".dockerignore lets these into the build context: {leaks}"

    # Everything the build reads: the workspace manifests and each member's tracked files.
    tracked = subprocess.run(["git", "ls-files"], cwd=root, check=True, capture_output=True,
                             text=True).stdout.split("\n")
    members = ["kms-server", "kms-client", "kmsctl", "envelope", "tests", "benches"]
    needed = [f for f in tracked if f in ("Cargo.toml", "Cargo.lock")
              or any(f.startswith(m + "/") for m in members)]
    assert "Cargo.lock" in needed and any(f.startswith("kms-server/src/") for f in needed)
    dropped = [f for f in needed if excluded(rules, f)]
    assert not dropped, f".dockerignore drops files the build needs: {dropped[:20]}"
    return len(needed)


# ---- 2. image pins -------------------------------------------------------------------

def dockerfile_images(path):
    """The images the Dockerfile's stages start from (stage names and scratch aside),
    with ARG defaults declared before the first FROM substituted."""
    args, stages, images = {}, set(), []
    text = open(path, encoding="utf-8").read().replace("\\\n", " ")
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        op = words[0].upper()
        if op == "ARG" and not images and not stages and len(words) > 1:
            name, _, default = words[1].partition("=")
            args[name] = default
        elif op == "FROM":
            rest = [w for w in words[1:] if not w.startswith("--")]
            ref = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), rest[0])
            if len(rest) >= 3 and rest[1].upper() == "AS":
                stages.add(rest[2])
            if ref in stages or ref == "scratch":
                continue
            images.append(ref)
    return images


def manifest_images(path):
    """(where, image) for every container image a compose file or Kubernetes manifest runs,
    and whether it is built from this repository (compose `build:`)."""
    out = []
    for doc in yaml.safe_load_all(open(path, encoding="utf-8")):
        if not isinstance(doc, dict):
            continue
        if "services" in doc:
            for name, s in doc["services"].items():
                if "image" in s:
                    out.append((f"{path}: service {name}", s["image"], "build" in s))
            continue
        pod = doc
        for key in ("spec", "jobTemplate", "spec", "template", "spec"):
            if isinstance(pod, dict) and "containers" not in pod and key in pod:
                pod = pod[key]
        if not isinstance(pod, dict):
            continue
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            out.append((f"{path}: {doc.get('kind')} {doc['metadata']['name']} container {c['name']}",
                        c["image"], False))
    return out


def is_own(image):
    return image.split("@")[0].rsplit(":", 1)[0].endswith(OWN_IMAGE)


def check_pins(root, manifests, strict):
    unpinned, own = [], []
    dockerfile = os.path.join(root, "deploy/docker/Dockerfile")
    for image in dockerfile_images(dockerfile):
        if not PINNED.match(image):
            unpinned.append(f"deploy/docker/Dockerfile: FROM {image}")
    for path in manifests:
        for where, image, built_here in manifest_images(path):
            if PINNED.match(image):
                continue
            if is_own(image) and built_here:
                continue  # compose builds it from this checkout (the Dockerfile's pins apply)
            if is_own(image) and not strict:
                own.append(f"{where}: {image}")
                continue
            unpinned.append(f"{where}: {image}")
    assert not unpinned, "images not pinned by digest (name:tag@sha256:...):\n  " + "\n  ".join(unpinned)
    return own


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pki", help="a directory made by deploy/compose/make-certs.sh")
    ap.add_argument("--strict", action="store_true", help="Keyhold's own image must be pinned too")
    ap.add_argument("manifests", nargs="*")
    args = ap.parse_args()
    root = os.getcwd()
    n = check_context(root, args.pki)
    print(f"deploy/docker: .dockerignore keeps key material, the compose PKI, target/ and .git/ out "
          f"of the build context and the {n} files the build reads in")
    manifests = args.manifests or (
        sorted(glob.glob("deploy/kubernetes/*.yaml") + glob.glob("deploy/kubernetes/shared-store/*.yaml"))
        + ["deploy/compose/compose.yaml"])
    own = check_pins(root, manifests, args.strict)
    print("deploy/docker: every base and third-party image is pinned by digest")
    for o in own:
        print(f"deploy/docker: note: Keyhold's own image, pin it to your pushed digest at deploy time: {o}")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"deploy/docker/check.py: {e}", file=sys.stderr)
        sys.exit(1)
