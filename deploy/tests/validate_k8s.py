#!/usr/bin/env python3
"""Validate rendered mtx manifests offline (called by validate-k8s.sh).

    validate_k8s.py --overlay dev rendered-dev.yaml --overlay prod rendered-prod.yaml

For every overlay:
 1. `kubernetes-validate --strict -k $K8S_VERSION` on the rendered file: every
    object must pass; the only "no schema" warnings accepted are for the KEDA
    kinds (keda.sh/v1alpha1 ScaledObject / TriggerAuthentication), which the
    tool does not know. Any other unknown kind fails.
 2. Each ScaledObject is validated against the KEDA CRD schema kept in
    deploy/k8s/schemas/keda-scaledobject-v1alpha1.schema.json (jsonschema,
    strict: no unknown fields).
 3. Consistency with the code and the topology (subjects/topology/):
    - every worker Deployment runs `mtx run <its pool>`, probes /healthz and
      /readyz on the metrics port, is non-root with a read-only root FS and no
      privilege escalation, has requests and a memory limit, is annotated for
      Prometheus, and has terminationGracePeriodSeconds > worker.shutdown_grace_secs;
    - every pool has a PodDisruptionBudget selecting its pods;
    - scaling (check_scaling): every pool that owns a topology consumer has
      exactly one KEDA ScaledObject, unless it is listed in SINGLETON_POOLS;
      every ScaledObject targets an existing Deployment whose pool owns each
      triggered consumer, covers every consumer of that pool, uses the
      nats-jetstream scaler, has a fallback, min <= fallback <= max, and
      max x worker.batch_size <= max_ack_pending / 2 of each consumer;
    - Deployments scaled by KEDA / an HPA do not set `replicas`;
    - singleton pools (SINGLETON_POOLS) run `replicas: 1` with the Recreate
      strategy, no ScaledObject or HPA targets them, and their PDB still lets
      a drain evict the one pod (maxUnavailable >= 1, no minAvailable);
    - NATS users/passwords come from the Secret, the user exists in
      deploy/nats/auth.conf, and the Secret key is the user name;
    - the setup Job runs `mtx topology apply` as `admin` then `mtx db migrate`;
    - MTX_TOPOLOGY__REPLICAS is what the overlay promises (--replicas).
With --selftest, the tools are first shown to reject known-bad objects and
check_scaling to reject broken copies of the first overlay.
Exit status 0 when all pass, 1 otherwise.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys

import jsonschema
import yaml

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
KEDA_SCHEMA = os.path.join(ROOT, "deploy/k8s/schemas/keda-scaledobject-v1alpha1.schema.json")
TOPOLOGY = os.path.join(ROOT, "subjects/topology/consumers")
AUTH_CONF = os.path.join(ROOT, "deploy/nats/auth.conf")
KEDA_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication")}
POOLS = ["gateway", "bridge", "standardizer", "cerebro", "execution", "accounts", "sink"]
# Pools that read or write MongoDB (cerebro: strategy_backtest_data for CVaR).
MONGO_POOLS = {"gateway", "bridge", "cerebro", "sink"}
# Pools that must run exactly one replica (deploy/README.md: Kubernetes, "Singletons"):
#   bridge     tails the collector's change stream: two would publish every signal
#              twice and race on one saved resume token;
#   execution  correct with several, but they only take turns on one
#              compare-and-set state record: nothing gained;
#   accounts   each replica would see only part of the executions and prices and
#              write a wrong account state over the other's in KV (Cerebro sizes
#              against it).
# They get no KEDA trigger although they own consumers.
SINGLETON_POOLS = {"bridge", "execution", "accounts"}


class Report:
    def __init__(self):
        self.failures = []
        self.checks = 0

    def check(self, ok, msg):
        self.checks += 1
        if not ok:
            self.failures.append(msg)
        return ok


def topology_consumers():
    """{(stream, durable): config} from the exported topology."""
    out = {}
    for path in glob.glob(os.path.join(TOPOLOGY, "*", "*.json")):
        with open(path) as f:
            cfg = json.load(f)
        stream = os.path.basename(os.path.dirname(path))
        out[(stream, cfg["durable_name"])] = cfg
    return out


def pool_of(consumer_cfg):
    m = re.fullmatch(r"mtx (\w+) pool", consumer_cfg.get("description", ""))
    return m.group(1) if m else None


def nats_users():
    with open(AUTH_CONF) as f:
        return set(re.findall(r"^\s*user:\s*(\w+)\s*$", f.read(), re.M))


def run_kubernetes_validate(path, version, r, label):
    exe = os.environ.get("KUBERNETES_VALIDATE", "kubernetes-validate")
    proc = subprocess.run([exe, "--strict", "-k", version, path], capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    passed = 0
    for line in out.splitlines():
        if line.startswith("INFO") and " passed " in line:
            passed += 1
        elif line.startswith("WARN"):
            m = re.search(r"schema for kind (\S+) with api version (\S+)", line)
            known_crd = m and (m.group(2), m.group(1)) in KEDA_KINDS
            r.check(known_crd, f"{label}: kubernetes-validate: {line} (only KEDA kinds may lack a schema)")
        elif line.startswith(("ERROR", "FATAL")):
            r.check(False, f"{label}: kubernetes-validate: {line}")
    r.check(proc.returncode == 0, f"{label}: kubernetes-validate exited {proc.returncode}")
    return passed


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def validate_overlay(label, path, version, replicas, r):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    passed = run_kubernetes_validate(path, version, r, label)
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    non_crd = [d for d in docs if (d["apiVersion"], d["kind"]) not in KEDA_KINDS]
    r.check(passed == len(non_crd),
            f"{label}: kubernetes-validate passed {passed} objects, expected {len(non_crd)}")

    # ---- KEDA CRD schema
    with open(KEDA_SCHEMA) as f:
        keda_schema = json.load(f)
    validator = jsonschema.Draft202012Validator(keda_schema)
    for name, so in by_kind.get("ScaledObject", {}).items():
        errs = sorted(validator.iter_errors(so), key=lambda e: list(e.path))
        for e in errs:
            r.check(False, f"{label}: ScaledObject {name}: {'.'.join(map(str, e.path))}: {e.message}")
        r.check(True, "")

    # ---- config
    cms = [d for n, d in by_kind.get("ConfigMap", {}).items() if n.startswith("mtx-config")]
    r.check(len(cms) == 1, f"{label}: expected one mtx-config ConfigMap, got {len(cms)}")
    conf = cms[0]["data"] if cms else {}
    grace = int(conf.get("MTX_WORKER__SHUTDOWN_GRACE_SECS", 20))
    batch = int(conf.get("MTX_WORKER__BATCH_SIZE", 256))
    if replicas is not None:
        r.check(conf.get("MTX_TOPOLOGY__REPLICAS") == str(replicas),
                f"{label}: MTX_TOPOLOGY__REPLICAS is {conf.get('MTX_TOPOLOGY__REPLICAS')!r}, expected {replicas}")
    users = nats_users()

    # ---- Deployments
    deps = by_kind.get("Deployment", {})
    scaled = {so["spec"]["scaleTargetRef"]["name"] for so in by_kind.get("ScaledObject", {}).values()}
    scaled |= {h["spec"]["scaleTargetRef"]["name"] for h in by_kind.get("HorizontalPodAutoscaler", {}).values()}
    for pool in POOLS:
        name = f"mtx-{pool}"
        d = deps.get(name)
        if not r.check(d is not None, f"{label}: Deployment {name} missing"):
            continue
        spec = d["spec"]
        pod = spec["template"]["spec"]
        labels = spec["template"]["metadata"].get("labels", {})
        ann = spec["template"]["metadata"].get("annotations", {})
        c = pod["containers"][0]
        where = f"{label}: {name}"
        r.check(c.get("args") == ["run", pool], f"{where}: args {c.get('args')} != ['run', '{pool}']")
        r.check(labels.get("app.kubernetes.io/component") == pool, f"{where}: component label")
        r.check(spec["selector"]["matchLabels"].get("app.kubernetes.io/component") == pool, f"{where}: selector")
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        r.check(ports.get("metrics") == 9464, f"{where}: metrics port 9464")
        for probe, path_ in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
            hg = (c.get(probe) or {}).get("httpGet") or {}
            r.check(hg.get("path") == path_ and hg.get("port") in ("metrics", 9464),
                    f"{where}: {probe} must GET {path_} on the metrics port")
        r.check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == "9464",
                f"{where}: prometheus.io annotations")
        tgp = pod.get("terminationGracePeriodSeconds", 30)
        r.check(tgp > grace + 5, f"{where}: terminationGracePeriodSeconds {tgp} must exceed shutdown grace {grace}s + 5s")
        psc = pod.get("securityContext", {})
        csc = c.get("securityContext", {})
        r.check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, f"{where}: pod must run as non-root")
        r.check(csc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation false")
        r.check(csc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem")
        r.check("ALL" in ((csc.get("capabilities") or {}).get("drop") or []), f"{where}: drop ALL capabilities")
        res = c.get("resources", {})
        r.check(res.get("requests", {}).get("cpu") and res.get("requests", {}).get("memory")
                and res.get("limits", {}).get("memory"), f"{where}: cpu/memory requests and a memory limit")
        r.check(pod.get("automountServiceAccountToken") is False, f"{where}: no service account token")
        # Service link variables (MTX_GATEWAY_PORT, ...) are MTX_ keys the
        # config refuses as unknown: the process would not start.
        r.check(pod.get("enableServiceLinks") is False, f"{where}: enableServiceLinks must be false")
        env = env_of(c)
        if pool in MONGO_POOLS:
            r.check("MTX_MONGO__URI" in env, f"{where}: uses MongoDB but has no MTX_MONGO__URI")
        user = (env.get("MTX_NATS__USER") or {}).get("value")
        r.check(user == pool, f"{where}: MTX_NATS__USER {user!r} != {pool!r}")
        r.check(user in users, f"{where}: NATS user {user!r} is not in deploy/nats/auth.conf")
        ref = ((env.get("MTX_NATS__PASSWORD") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        r.check(ref.get("name", "").startswith("mtx-nats-credentials") and ref.get("key") == pool,
                f"{where}: MTX_NATS__PASSWORD must come from Secret mtx-nats-credentials key {pool}")
        r.check(any(e.get("configMapRef", {}).get("name", "").startswith("mtx-config") for e in c.get("envFrom", [])),
                f"{where}: envFrom mtx-config")
        if name in scaled:
            r.check("replicas" not in spec, f"{where}: autoscaled, so it must not set replicas")
        # PDB
        pdbs = [p for p in by_kind.get("PodDisruptionBudget", {}).values()
                if all(labels.get(k) == v for k, v in p["spec"]["selector"].get("matchLabels", {}).items())]
        r.check(len(pdbs) == 1, f"{where}: expected one PodDisruptionBudget selecting it, got {len(pdbs)}")

    check_scaling(label, by_kind, batch, r)

    # ---- setup Job
    job = by_kind.get("Job", {}).get("mtx-setup")
    if r.check(job is not None, f"{label}: Job mtx-setup missing"):
        pod = job["spec"]["template"]["spec"]
        init = pod.get("initContainers", [])
        r.check(len(init) == 1 and init[0].get("args") == ["topology", "apply"],
                f"{label}: mtx-setup must first run `mtx topology apply`")
        if init:
            r.check((env_of(init[0]).get("MTX_NATS__USER") or {}).get("value") == "admin",
                    f"{label}: `topology apply` must use the NATS admin user")
        r.check(pod["containers"][0].get("args") == ["db", "migrate"], f"{label}: mtx-setup must run `mtx db migrate`")
        r.check(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{label}: mtx-setup non-root")
        r.check(pod.get("enableServiceLinks") is False, f"{label}: mtx-setup enableServiceLinks must be false")
    return len(docs)


def check_scaling(label, by_kind, batch, r):
    """KEDA ScaledObjects vs the topology, and the singleton pools."""
    consumers = topology_consumers()
    deps = by_kind.get("Deployment", {})
    sos = by_kind.get("ScaledObject", {})
    so_targets = {}
    for so in sos.values():
        so_targets.setdefault(so["spec"]["scaleTargetRef"]["name"], []).append(so["metadata"]["name"])
    hpa_targets = {h["spec"]["scaleTargetRef"]["name"] for h in by_kind.get("HorizontalPodAutoscaler", {}).values()}
    consume_pools = {pool_of(c) for c in consumers.values()} - {None}
    r.check(consume_pools <= set(POOLS), f"{label}: topology pools {sorted(consume_pools - set(POOLS))} are not in POOLS")

    # ---- singleton pools: one replica, Recreate, never autoscaled, drainable
    for pool in sorted(SINGLETON_POOLS):
        name = f"mtx-{pool}"
        d = deps.get(name)
        if d is None:
            continue  # reported by the Deployment checks
        where = f"{label}: {name} (singleton)"
        spec = d["spec"]
        r.check(spec.get("replicas") == 1, f"{where}: replicas must be 1, got {spec.get('replicas')!r}")
        strategy = spec.get("strategy") or {}
        r.check(strategy.get("type") == "Recreate" and "rollingUpdate" not in strategy,
                f"{where}: strategy must be Recreate (a RollingUpdate briefly runs two), got {strategy}")
        r.check(name not in so_targets, f"{where}: must not be scaled by KEDA (ScaledObject {so_targets.get(name)})")
        r.check(name not in hpa_targets, f"{where}: must not be scaled by an HPA")
        labels = spec["template"]["metadata"].get("labels", {})
        for p in by_kind.get("PodDisruptionBudget", {}).values():
            if not all(labels.get(k) == v for k, v in p["spec"]["selector"].get("matchLabels", {}).items()):
                continue
            mu = p["spec"].get("maxUnavailable")
            r.check("minAvailable" not in p["spec"] and isinstance(mu, int) and mu >= 1,
                    f"{where}: PDB {p['metadata']['name']} must allow evicting the only pod "
                    f"(maxUnavailable >= 1, no minAvailable), got {p['spec']}")

    # ---- every other consume pool is scaled by exactly one ScaledObject
    for pool in sorted(consume_pools - SINGLETON_POOLS):
        name = f"mtx-{pool}"
        n = len(so_targets.get(name, []))
        r.check(n == 1, f"{label}: consume pool {pool} must have exactly one KEDA ScaledObject "
                        f"targeting {name} (or be listed in SINGLETON_POOLS), got {n}")

    # ---- ScaledObjects vs topology
    for name, so in sos.items():
        spec = so["spec"]
        where = f"{label}: ScaledObject {name}"
        target = spec["scaleTargetRef"]["name"]
        d = deps.get(target)
        if not r.check(d is not None, f"{where}: target Deployment {target} missing"):
            continue
        pool = d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        if not r.check(pool not in SINGLETON_POOLS, f"{where}: targets the singleton pool {pool}"):
            continue
        mn, mx = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        fb = spec.get("fallback")
        r.check(mn >= 1, f"{where}: minReplicaCount {mn} must be >= 1 (consumers must keep draining)")
        if r.check(fb is not None, f"{where}: fallback missing"):
            r.check(mn <= fb["replicas"] <= mx, f"{where}: fallback {fb['replicas']} not within [{mn}, {mx}]")
        seen = set()
        for t in spec["triggers"]:
            if not r.check(t["type"] == "nats-jetstream", f"{where}: trigger type {t['type']}"):
                continue
            md = t["metadata"]
            key = (md["stream"], md["consumer"])
            seen.add(key)
            cfg = consumers.get(key)
            if not r.check(cfg is not None, f"{where}: consumer {key} is not in subjects/topology"):
                continue
            r.check(pool_of(cfg) == pool, f"{where}: consumer {key} belongs to pool {pool_of(cfg)}, not {pool}")
            mapd = cfg["max_ack_pending"]
            r.check(mx * batch <= mapd // 2,
                    f"{where}: maxReplicaCount {mx} x batch {batch} = {mx * batch} exceeds max_ack_pending {mapd} / 2 of {key}")
            r.check(int(md["lagThreshold"]) >= batch,
                    f"{where}: lagThreshold {md['lagThreshold']} below one batch ({batch}): would scale on noise")
        own = {k for k, v in consumers.items() if pool_of(v) == pool}
        r.check(own <= seen, f"{where}: consumers of pool {pool} without a trigger: {sorted(own - seen)}")


def selftest(version):
    """The validators must reject known-bad objects (guards against a silently lax setup)."""
    import tempfile
    bad_dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "bad"},
               "spec": {"selector": {"matchLabels": {"a": "b"}}, "replicass": 2,
                        "template": {"metadata": {"labels": {"a": "b"}},
                                     "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    bad_kind = {"apiVersion": "example.com/v1", "kind": "Unknown", "metadata": {"name": "x"}}
    ok = True
    with tempfile.TemporaryDirectory() as d:
        for obj, why in ((bad_dep, "unknown field `replicass`"), (bad_kind, "an unknown CRD kind")):
            path = os.path.join(d, "bad.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(obj, f)
            r = Report()
            run_kubernetes_validate(path, version, r, "selftest")
            if not r.failures:
                print(f"FAIL  selftest: kubernetes-validate --strict accepted a Deployment with {why}")
                ok = False
    with open(KEDA_SCHEMA) as f:
        v = jsonschema.Draft202012Validator(json.load(f))
    so = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
          "spec": {"scaleTargetRef": {"name": "d"}, "pollingIntervall": 5,
                   "triggers": [{"type": "nats-jetstream", "metadata": {"stream": "S"}}]}}
    errs = {e.message for e in v.iter_errors(so)}
    if not any("pollingIntervall" in e for e in errs) or not any("consumer" in e for e in errs):
        print(f"FAIL  selftest: the KEDA schema accepted a bad ScaledObject: {errs}")
        ok = False
    print("selftest: the validators reject bad objects" if ok else "selftest failed")
    return ok


def load_by_kind(path):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    return by_kind


def selftest_scaling(label, path):
    """check_scaling must pass the rendered overlay and reject broken copies of it."""
    import copy
    by_kind = load_by_kind(path)
    batch = 256
    r = Report()
    check_scaling(label, by_kind, batch, r)
    if r.failures:
        print(f"FAIL  selftest: check_scaling rejects the unmodified {label} overlay: {r.failures}")
        return False

    def dep(bk, pool):
        return bk["Deployment"][f"mtx-{pool}"]["spec"]

    def keda_on_accounts(bk):
        so = copy.deepcopy(bk["ScaledObject"]["mtx-sink"])
        so["metadata"]["name"] = "mtx-accounts"
        so["spec"]["scaleTargetRef"]["name"] = "mtx-accounts"
        bk["ScaledObject"]["mtx-accounts"] = so

    def pdb_min_available(bk):
        spec = bk["PodDisruptionBudget"]["mtx-accounts"]["spec"]
        spec.pop("maxUnavailable", None)
        spec["minAvailable"] = 1

    cases = [
        ("accounts with 2 replicas", lambda bk: dep(bk, "accounts").update(replicas=2),
         "mtx-accounts (singleton): replicas must be 1"),
        ("accounts without replicas (KEDA-style)", lambda bk: dep(bk, "accounts").pop("replicas"),
         "mtx-accounts (singleton): replicas must be 1"),
        ("execution with a RollingUpdate", lambda bk: dep(bk, "execution").update(
            strategy={"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
         "mtx-execution (singleton): strategy must be Recreate"),
        ("a ScaledObject on accounts", keda_on_accounts,
         "mtx-accounts (singleton): must not be scaled by KEDA"),
        ("a singleton PDB with minAvailable 1", pdb_min_available,
         "mtx-accounts (singleton): PDB mtx-accounts must allow evicting"),
        ("standardizer without a ScaledObject", lambda bk: bk["ScaledObject"].pop("mtx-standardizer"),
         "consume pool standardizer must have exactly one KEDA ScaledObject"),
    ]
    ok = True
    for why, mutate, expect in cases:
        bk = copy.deepcopy(by_kind)
        mutate(bk)
        r = Report()
        check_scaling(label, bk, batch, r)
        if not any(expect in f for f in r.failures):
            print(f"FAIL  selftest: check_scaling accepted {why} (expected {expect!r}; got {r.failures})")
            ok = False
    print(f"selftest: check_scaling rejects {len(cases)} broken copies of {label}" if ok
          else "selftest of check_scaling failed")
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--overlay", nargs=2, action="append", metavar=("NAME", "RENDERED_YAML"), default=[])
    ap.add_argument("--selftest", action="store_true", help="first prove the validators reject bad objects")
    ap.add_argument("--replicas", action="append", default=[], metavar="NAME=N",
                    help="expected MTX_TOPOLOGY__REPLICAS per overlay")
    ap.add_argument("--kubernetes-version", default=os.environ.get("K8S_VERSION", "1.30.0"))
    args = ap.parse_args()
    expect = dict(kv.split("=", 1) for kv in args.replicas)
    r = Report()
    if args.selftest and not selftest(args.kubernetes_version):
        return 1
    if args.selftest and args.overlay and not selftest_scaling(*args.overlay[0]):
        return 1
    for name, path in args.overlay:
        n = validate_overlay(name, path, args.kubernetes_version, expect.get(name), r)
        print(f"{name}: {n} objects checked")
    for f in r.failures:
        print(f"FAIL  {f}")
    print(f"{r.checks} checks, {len(r.failures)} failure(s)")
    return 1 if r.failures else 0


if __name__ == "__main__":
    sys.exit(main())
