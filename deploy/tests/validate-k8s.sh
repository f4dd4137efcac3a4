#!/usr/bin/env bash
# Offline validation of the Kubernetes manifests (no cluster needed):
#   1. `kubectl kustomize` builds every overlay (deploy/k8s/overlays/*);
#   2. `kubernetes-validate --strict` accepts every object of each build
#      (Kubernetes $K8S_VERSION schemas); the KEDA kinds, which it has no schema
#      for, are accepted only as explicit "no schema" warnings ...
#   3. ... and are validated instead against the KEDA CRD schema in
#      deploy/k8s/schemas/ (jsonschema, strict);
#   4. consistency checks against the code and the topology
#      (deploy/tests/validate_k8s.py: probes, grace period, non-root, PDBs,
#      KEDA bounds vs max_ack_pending, a ScaledObject per consume pool except
#      the singletons, which must be replicas 1 + Recreate, NATS users, setup
#      Job, R3 in prod).
# A self-test first proves the validators reject known-bad objects and broken
# copies of the dev build.
#
#   deploy/tests/validate-k8s.sh            # tools from deploy/ops/install-tools.sh
# Env: K8S_VERSION (default 1.30.0), KEEP_RENDERED=dir to keep the builds.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ops_env=${DEPLOY_LOCAL_DIR:-$repo/.local}/ops/env
[[ -f $ops_env ]] && source "$ops_env"
export K8S_VERSION=${K8S_VERSION:-1.30.0}
PY=${OPS_PYTHON:-python3}
command -v kubectl >/dev/null || { echo "kubectl not found: run deploy/ops/install-tools.sh" >&2; exit 2; }
command -v kubernetes-validate >/dev/null || { echo "kubernetes-validate not found: run deploy/ops/install-tools.sh" >&2; exit 2; }
export KUBERNETES_VALIDATE=$(command -v kubernetes-validate)

out=${KEEP_RENDERED:-$(mktemp -d "${TMPDIR:-/tmp}/mtx-k8s.XXXXXX")}
mkdir -p "$out"
[[ -n ${KEEP_RENDERED:-} ]] || trap 'rm -rf "$out"' EXIT

echo "kubectl: $(kubectl version --client 2>/dev/null | head -1)"
args=()
for dir in "$repo"/deploy/k8s/overlays/*/; do
  name=$(basename "$dir")
  # Deprecation warnings of newer kustomize (bases, patchesStrategicMerge,
  # commonLabels: kept for the kubectl 1.20 fallback) go to stderr.
  if ! kubectl kustomize "$dir" >"$out/$name.yaml" 2>"$out/$name.err"; then
    echo "FAIL  kubectl kustomize deploy/k8s/overlays/$name:" >&2
    cat "$out/$name.err" >&2
    exit 1
  fi
  echo "built overlay $name: $(grep -c '^kind:' "$out/$name.yaml") objects"
  args+=(--overlay "$name" "$out/$name.yaml")
done
"$PY" "$repo/deploy/tests/validate_k8s.py" --selftest --kubernetes-version "$K8S_VERSION" \
  --replicas dev=1 --replicas prod=3 "${args[@]}"
