#!/usr/bin/env bash
# Every offline operations check, for CI (exit non-zero on any failure):
#
#   1. Prometheus: `promtool check rules`, `promtool test rules` (every alert
#      fires and stays silent where it should), `promtool check config`;
#   2. the metrics contract: rules and dashboards only use metrics listed in
#      deploy/prometheus/METRICS.md, every alert has firing + silent tests;
#   3. Kubernetes: `kubectl kustomize` of each overlay, `kubernetes-validate
#      --strict`, the KEDA schema and the consistency checks (validate-k8s.sh);
#   4. NATS: auth config rendered and accepted by nats-server, Helm values;
#   5. Grafana: every panel's PromQL parses on a real (empty) Prometheus, and
#      returns data when Prometheus scrapes a live pipeline that processed the
#      fixture signals (grafana/tests/data-mode.sh; needs target/debug/mtx,
#      which `make test` builds first);
#   6. shell scripts parse, the Dockerfile is multi-stage and non-root.
#
# It installs its tools first (deploy/ops/install-tools.sh, idempotent).
# The live tests are Rust: `cargo test -p mtx-harness --test nats_permissions`.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
start=$(date +%s)
export PYTHONDONTWRITEBYTECODE=1   # no __pycache__ in the checkout

echo "== tools"
deploy/ops/install-tools.sh || { echo "FAILED: installing the tools"; exit 1; }
# shellcheck disable=SC1091
source "${DEPLOY_LOCAL_DIR:-$repo/.local}/ops/env"
PY=$OPS_PYTHON

failed=()
step() { # name command...
  local name=$1; shift
  echo
  echo "== $name"
  if "$@"; then echo "-- ok: $name"; else echo "-- FAILED: $name"; failed+=("$name"); fi
}

promtool_config() {
  # Debian's Prometheus is built without Kubernetes service discovery, so
  # check a copy whose kubernetes_sd_configs are replaced by static targets:
  # everything else (relabel rules, regexes, rule files) is checked as is.
  local tmp rc
  tmp=$(mktemp -d)
  cp -r deploy/prometheus/rules "$tmp/"
  "$PY" - deploy/prometheus/prometheus.yml "$tmp/prometheus.yml" <<'EOF'
import sys, yaml
d = yaml.safe_load(open(sys.argv[1]))
for sc in d["scrape_configs"]:
    if sc.pop("kubernetes_sd_configs", None) is not None:
        sc["static_configs"] = [{"targets": ["127.0.0.1:9"]}]
yaml.safe_dump(d, open(sys.argv[2], "w"))
EOF
  promtool check config "$tmp/prometheus.yml"
  rc=$?
  rm -rf "$tmp"
  return $rc
}

scripts_parse() {
  local f rc=0
  for f in deploy/ops/*.sh deploy/tests/*.sh deploy/nats/*.sh grafana/tests/*.sh; do
    bash -n "$f" || { echo "syntax error in $f"; rc=1; }
  done
  "$PY" -c 'import ast, sys; [ast.parse(open(f).read(), f) for f in sys.argv[1:]]' \
    deploy/tests/*.py grafana/tests/*.py || rc=1
  [[ $rc -eq 0 ]] && echo "all shell and Python scripts parse"
  return $rc
}

dockerfile() {
  local n
  n=$(grep -c '^FROM ' Dockerfile)
  [[ $n -ge 2 ]] || { echo "Dockerfile must be multi-stage (has $n FROM)"; return 1; }
  grep -qE '^USER (65532|nonroot)' Dockerfile || { echo "Dockerfile must end as a non-root USER"; return 1; }
  grep -q 'cargo build --release --locked -p mtx' Dockerfile || { echo "Dockerfile must build mtx with --locked"; return 1; }
  for keep in Cargo.toml Cargo.lock schemas subjects workers tests; do
    if grep -qxE "/?$keep/?" .dockerignore; then echo ".dockerignore excludes $keep, needed by the build"; return 1; fi
  done
  echo "Dockerfile: $n stages, non-root, locked release build; .dockerignore keeps the workspace"
}

step "promtool check rules" promtool check rules deploy/prometheus/rules/*.yml
step "promtool test rules" promtool test rules deploy/prometheus/tests/*.test.yml
step "promtool check config" promtool_config
step "metrics contract" "$PY" deploy/tests/check_contract.py
step "kubernetes manifests" deploy/tests/validate-k8s.sh
step "nats config" deploy/tests/check-nats-config.sh
step "grafana dashboards (PromQL syntax on a real Prometheus)" \
  grafana/tests/with-prometheus.sh -- "$PY" grafana/tests/check_dashboards.py --mode syntax --quiet
step "grafana dashboards (every panel returns data from a live pipeline)" \
  env OPS_PYTHON="$PY" grafana/tests/data-mode.sh
step "scripts" scripts_parse
step "Dockerfile" dockerfile

echo
echo "== $(( $(date +%s) - start ))s"
if [[ ${#failed[@]} -gt 0 ]]; then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "all operations checks passed"
