#!/usr/bin/env bash
# The Python reference the portfolio tests cross-check the Rust optimizer
# against (workers/portfolio/tests/reference_max_sharpe.py): numpy, scipy and
# cvxpy, installed into the project venv that `deploy/local/servers.sh install`
# creates (<repo>/.local/venv, or $DEPLOY_LOCAL_DIR/venv).
#
#   deploy/local/pyref.sh install   # idempotent; prints the python to use on stdout
#   deploy/local/pyref.sh python    # print the python path (exit 1 if not installed)
#
# `make test` runs `install` and exports the printed path as PORTFOLIO_REF_PYTHON
# (not an MTX_ variable: the config loader rejects unknown MTX_ keys), which
# makes the python_reference test of mtx-portfolio run instead of skipping.
# Versions: CVXPY_VERSION (1.9.3), SCIPY_VERSION (1.17.1).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dir=${DEPLOY_LOCAL_DIR:-$repo/.local}
venv=$dir/venv
py=$venv/bin/python
CVXPY_VERSION=${CVXPY_VERSION:-1.9.3}
SCIPY_VERSION=${SCIPY_VERSION:-1.17.1}
PYTHON=${PYTHON:-python3}

log() { printf '%s\n' "$*" >&2; }

have_modules() {
  [[ -x $py ]] && "$py" -c 'import numpy, scipy, cvxpy' >/dev/null 2>&1
}

install() {
  if have_modules; then
    log "python reference ready in $venv ($("$py" -c 'import cvxpy; print("cvxpy", cvxpy.__version__)'))"
    echo "$py"
    return 0
  fi
  mkdir -p "$dir"
  [[ -x $py ]] || "$PYTHON" -m venv "$venv"
  log "installing numpy, scipy $SCIPY_VERSION and cvxpy $CVXPY_VERSION into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    numpy "scipy==$SCIPY_VERSION" "cvxpy==$CVXPY_VERSION" >&2
  have_modules || { log "numpy/scipy/cvxpy still not importable from $py"; exit 1; }
  echo "$py"
}

case ${1:-} in
  install) install ;;
  python) have_modules && echo "$py" || { log "not installed: run $0 install"; exit 1; } ;;
  *) log "usage: $0 install|python"; exit 2 ;;
esac
