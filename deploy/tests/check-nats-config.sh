#!/usr/bin/env bash
# Offline checks of deploy/nats (the live permission test is the Rust test
# tests/tests/nats_permissions.rs, which runs a real nats-server with it):
#   - deploy/nats/auth.conf is exactly `render-auth.sh ""` (production, no prefix);
#   - nats-server accepts (-t) the rendered auth config, for no prefix and a
#     test prefix, inside a server config like the Helm chart's (JetStream
#     with sync_interval: always, monitoring port), with every password variable
#     set, and refuses it when one is missing (nothing silently empty);
#   - deploy/nats/helm-values.yaml: JetStream file storage, 3-node cluster,
#     sync_interval always, the auth include, and one env var from the Secret
#     for every $MTX_NATS_PW_* the auth config references, and a raised GOGC
#     only with a GOMEMLIMIT below the container's memory limit.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ops_env=${DEPLOY_LOCAL_DIR:-$repo/.local}/ops/env
[[ -f $ops_env ]] && source "$ops_env"
PY=${OPS_PYTHON:-python3}
NATS_SERVER=${NATS_SERVER_BIN:-$(command -v nats-server || true)}
[[ -x $NATS_SERVER ]] || { echo "nats-server not found: run deploy/ops/install-tools.sh" >&2; exit 2; }
nats=$repo/deploy/nats
tmp=$(mktemp -d "${TMPDIR:-/tmp}/mtx-nats.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
fail=0

if diff -u "$nats/auth.conf" <("$nats/render-auth.sh") >"$tmp/diff"; then
  echo "ok    deploy/nats/auth.conf == render-auth.sh \"\""
else
  echo "FAIL  deploy/nats/auth.conf is stale; run: deploy/nats/render-auth.sh > deploy/nats/auth.conf"
  cat "$tmp/diff"
  fail=1
fi

vars=$(grep -o '\$MTX_NATS_PW_[A-Z]*' "$nats/auth.conf.tmpl" | sort -u | tr -d '$')
for v in $vars; do export "$v=test-$v"; done
for prefix in "" "t123x0"; do
  mkdir -p "$tmp/p$prefix"
  "$nats/render-auth.sh" $prefix >"$tmp/p$prefix/mtx-auth.conf"
  cat >"$tmp/p$prefix/nats.conf" <<EOF
listen: 127.0.0.1:-1
http: 127.0.0.1:-1
server_name: check
jetstream {
  store_dir: "$tmp/p$prefix/js"
  sync_interval: always
}
include ./mtx-auth.conf
EOF
  if out=$("$NATS_SERVER" -c "$tmp/p$prefix/nats.conf" -t 2>&1); then
    echo "ok    nats-server -t accepts the auth config (prefix '${prefix}')"
  else
    echo "FAIL  nats-server -t (prefix '${prefix}'): $out"; fail=1
  fi
done
first=$(echo "$vars" | head -1)
if env -u "$first" "$NATS_SERVER" -c "$tmp/p/nats.conf" -t >/dev/null 2>&1; then
  echo "FAIL  nats-server accepted the config without \$$first"; fail=1
else
  echo "ok    a missing password variable (\$$first) stops nats-server"
fi

"$PY" - "$nats/helm-values.yaml" $vars <<'EOF' || fail=1
import sys, yaml
path, want = sys.argv[1], sys.argv[2:]
v = yaml.safe_load(open(path))
c, problems = v["config"], []
if not (c["cluster"]["enabled"] and c["cluster"]["replicas"] == 3):
    problems.append("config.cluster must be enabled with 3 replicas")
js = c["jetstream"]
if not (js["enabled"] and js["fileStore"]["enabled"] and js["fileStore"]["pvc"]["enabled"]):
    problems.append("JetStream file storage on a PVC must be enabled")
if js.get("memoryStore", {}).get("enabled"):
    problems.append("memory storage should stay off")
if js.get("merge", {}).get("sync_interval") != "always":
    problems.append("config.jetstream.merge.sync_interval must be `always`")
if "mtx-auth.conf" not in [x for k, x in c.get("merge", {}).items() if k.endswith("$include")]:
    problems.append("config.merge must $include mtx-auth.conf")
if not c.get("monitor", {}).get("enabled"):
    problems.append("the monitoring port (KEDA, exporter) must be enabled")
env = v["container"]["env"]
for name in want:
    ref = (env.get(name) or {}).get("valueFrom", {}).get("secretKeyRef", {}) if isinstance(env.get(name), dict) else {}
    if ref.get("name") != "mtx-nats-auth":
        problems.append(f"container.env.{name} must come from Secret mtx-nats-auth")
import re
def size(x):
    # Bytes of a Kubernetes quantity (4Gi, 512Mi, 4G, 4000000000) or of Go's
    # GOMEMLIMIT (3GiB, 512MiB, 1073741824B); None when it is neither.
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)(B?)\s*", str(x))
    if not m or (m.group(4) and m.group(2) and not m.group(3)):
        return None
    n, unit, binary = float(m.group(1)), m.group(2), m.group(3)
    return int(n * ((1024 if binary else 1000) ** " KMGT".index(unit or " ")))
gogc = str(env.get("GOGC", "100"))
limit = v["container"].get("merge", {}).get("resources", {}).get("limits", {}).get("memory")
if gogc != "100":
    mem = size(env["GOMEMLIMIT"]) if "GOMEMLIMIT" in env else None
    if "GOMEMLIMIT" not in env:
        problems.append(f"container.env.GOGC={gogc} needs GOMEMLIMIT, or the heap may outgrow the container")
    elif mem is None or size(limit) is None or mem >= size(limit):
        problems.append(f"container.env.GOMEMLIMIT ({env['GOMEMLIMIT']}) must be a size below the memory limit ({limit})")
if not v.get("promExporter", {}).get("enabled"):
    problems.append("promExporter must be enabled (Grafana mtx-nats dashboard)")
for p in problems:
    print("FAIL  helm-values.yaml:", p)
if not problems:
    print(f"ok    helm-values.yaml: R3 cluster, file storage, sync_interval always, auth include, {len(want)} password env vars, GOGC={gogc} under GOMEMLIMIT")
sys.exit(1 if problems else 0)
EOF
exit $fail
