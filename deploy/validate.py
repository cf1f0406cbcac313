#!/usr/bin/env python3
"""Static checks of deploy/ (no container runtime or cluster needed):

* Kubernetes manifests against the Kubernetes schemas (kubernetes-validate, strict: unknown
  fields are errors);
* every service config embedded in a ConfigMap uses only sections and keys of the
  matching example in deploy/config (which a Rust test parses with the services' own types);
* docker-compose.yml: every service's config file exists and names the binary it runs, every
  named volume is declared;
* systemd units with `systemd-analyze verify` when it is available, ExecStart pointed at the
  built binaries.

Usage: deploy/validate.py [TARGET_RELEASE_DIR]
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL {msg}")


def keys(table, prefix=""):
    """Dotted key paths of a TOML table (arrays of tables: the keys of their first entry)."""
    out = set()
    for k, v in table.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= keys(v, path + ".")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            out |= keys(v[0], path + "[].")
        else:
            out.add(path)
    return out


def example(name):
    with open(os.path.join(HERE, "config", name), "rb") as f:
        return tomllib.load(f)


# 1. Kubernetes schemas.
manifests = sorted(m for m in glob.glob(os.path.join(HERE, "k8s", "**", "*.yaml"), recursive=True)
                   if os.path.basename(m) != "kustomization.yaml")
kustomizations = sorted(glob.glob(os.path.join(HERE, "k8s", "**", "kustomization.yaml"), recursive=True))
r = subprocess.run(
    [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", *manifests],
    capture_output=True,
    text=True,
)
if r.returncode != 0:
    fail("kubernetes-validate:\n" + r.stdout + r.stderr)
else:
    print(f"ok   {len(manifests)} Kubernetes manifests valid against the schemas")

# Kustomizations: every resource exists, and every manifest belongs to one.
listed = set()
for k in kustomizations:
    with open(k) as f:
        kz = yaml.safe_load(f)
    base = os.path.dirname(k)
    for res in kz.get("resources", []):
        path = os.path.normpath(os.path.join(base, res))
        if not os.path.exists(path):
            fail(f"{os.path.relpath(k, HERE)}: resource {res} does not exist")
        elif os.path.isdir(path) and not os.path.exists(os.path.join(path, "kustomization.yaml")):
            fail(f"{os.path.relpath(k, HERE)}: {res} is a directory without a kustomization")
        listed.add(path)
for m in manifests:
    if m not in listed:
        fail(f"{os.path.relpath(m, HERE)} is in no kustomization")
print(f"ok   {len(kustomizations)} kustomizations list every manifest")

# 2. ConfigMap TOML against the examples (which list every key they use and are parsed by the
# services' own types in tests/tests/deploy.rs): a ConfigMap may use only those keys. Server-specific values (host keys such as the
# head-end names) are compared by section, not by value.
service_of = {"ingest.toml": "ingest.toml", "compute.toml": "compute.toml", "keyshare.toml": "keyshare-1.toml",
              "registry.toml": "registry.toml"}
# The PostgreSQL choice's ConfigMaps follow the PostgreSQL examples.
postgres_of = {"ingest.toml": "ingest-postgres.toml", "compute.toml": "compute-postgres.toml"}
docs = []
for m in manifests:
    with open(m) as f:
        docs += [(m, d) for d in yaml.safe_load_all(f) if d]
for path, d in docs:
    if d.get("kind") != "ConfigMap":
        continue
    for fname, text in d.get("data", {}).items():
        in_postgres = os.path.basename(os.path.dirname(path)) == "postgres"
        ex = postgres_of.get(fname, service_of[fname]) if in_postgres else service_of[fname]
        want = keys(example(ex))
        got = keys(tomllib.loads(text))
        strip = lambda s: {k for k in s
                           if not k.startswith(("ingest.headends.", "keyshare.peers."))}
        if strip(got) - strip(want):
            fail(f"{os.path.relpath(path, HERE)} {fname}: keys not in deploy/config/{ex}: "
                 f"{sorted(strip(got) - strip(want))}")
        else:
            print(f"ok   {os.path.relpath(path, HERE)} {fname} matches deploy/config/{ex}")

# Probes and ports agree with the configs.
for path, d in docs:
    if d.get("kind") not in ("Deployment", "StatefulSet"):
        continue
    for c in d["spec"]["template"]["spec"]["containers"]:
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            if c[probe]["grpc"]["port"] != ports["health"]:
                fail(f"{d['metadata']['name']}: {probe} is not on the health port")
        notes = d["spec"]["template"]["metadata"].get("annotations", {})
        if notes.get("prometheus.io/port") != str(ports["health"]) or notes.get("prometheus.io/path") != "/metrics":
            fail(f"{d['metadata']['name']}: Prometheus is not told to scrape /metrics on the health port")
    if os.path.basename(os.path.dirname(path)) == "postgres" and d["spec"]["replicas"] < 2:
        fail(f"{os.path.relpath(path, HERE)}: the PostgreSQL choice runs at least 2 replicas")
print("ok   probes and Prometheus scrapes use the plaintext health ports")

# 3. docker-compose.
with open(os.path.join(HERE, "docker-compose.yml")) as f:
    compose = yaml.safe_load(f)
declared = set(compose.get("volumes", {}))
for name, svc in compose["services"].items():
    for v in svc.get("volumes", []):
        src = v.split(":")[0]
        if src.startswith("./"):
            if not os.path.exists(os.path.join(HERE, src)):
                fail(f"compose {name}: {src} does not exist")
        elif src not in declared:
            fail(f"compose {name}: volume {src} is not declared")
    cmd = svc.get("command", [])
    if "--config" in cmd:
        cfg = cmd[cmd.index("--config") + 1]
        mounted = [v for v in svc["volumes"] if v.split(":")[1] == cfg]
        if not mounted:
            fail(f"compose {name}: {cfg} is not mounted")
        elif cmd[0].split("-")[0] not in mounted[0]:
            fail(f"compose {name}: runs {cmd[0]} with {mounted[0]}")
print(f"ok   docker-compose.yml: {len(compose['services'])} services, files and volumes resolve")

# 4. systemd.
units = sorted(glob.glob(os.path.join(HERE, "systemd", "*.service")))
target = sys.argv[1] if len(sys.argv) > 1 else None
if shutil.which("systemd-analyze") and target:
    with tempfile.TemporaryDirectory() as tmp:
        for u in units:
            text = open(u).read().replace("/usr/local/bin/", os.path.abspath(target) + "/")
            name = os.path.basename(u).replace("@.service", "@keyshare-1.service")
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        for name in sorted(os.listdir(tmp)):
            r = subprocess.run(["systemd-analyze", "verify", os.path.join(tmp, name)],
                               capture_output=True, text=True)
            out = "\n".join(l for l in (r.stdout + r.stderr).splitlines()
                            if "Failed to" not in l and l.strip())
            if r.returncode != 0 or re.search(r"(?i)unknown|invalid|error", out):
                fail(f"systemd-analyze verify {name}:\n{out}")
            else:
                print(f"ok   systemd-analyze verify {name}")
else:
    print("skip systemd-analyze (not installed or no binary directory given)")

if failures:
    print(f"{len(failures)} deploy check(s) failed")
    sys.exit(1)
print("deploy/: all checks passed")
