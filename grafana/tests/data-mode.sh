#!/usr/bin/env bash
# The dashboards proven on real data: a real Prometheus scrapes a real
# pipeline that processed the fixture signals, and every PromQL expression of
# every panel must parse and return data (panels that need the NATS exporter:
# syntax only).
#
#   grafana/tests/data-mode.sh            # from the repository root
#
# What it runs, all on loopback with free ports and a temp dir removed at exit:
#   nats-server + the Mongo-compatible server (.local/venv, installed by
#   deploy/local/servers.sh install); `mtx db migrate`, `mtx topology apply`;
#   the portfolio workflow (strategies load, backtest ingest, optimize,
#   allocations approve); one `mtx run gateway standardizer cerebro execution
#   accounts sink` process; every fixture file through the HTTP gateway, a
#   malformed raw signal straight onto NATS (so the DLQ panels have data), a
#   mark; then grafana/tests/with-prometheus.sh scraping that process and
#   grafana/tests/check_dashboards.py --mode data.
# Needs the Debian `prometheus` binary (deploy/ops/install-tools.sh) and a
# built `mtx` (OPS_MTX_BIN, default $CARGO_TARGET_DIR or target, /debug/mtx;
# built when missing).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
venv=${DEPLOY_LOCAL_DIR:-$repo/.local}/venv/bin
mtx=${OPS_MTX_BIN:-${CARGO_TARGET_DIR:-$repo/target}/debug/mtx}
py=${OPS_PYTHON:-python3}
if [[ ! -x $mtx ]]; then cargo build -q -p mtx; fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/mtx-data-mode.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { # port what log
  for _ in $(seq 1 600); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$2 did not listen on $1:" >&2
  cat "$3" >&2
  return 1
}
nats_port=$(free_port)
mongo_port=$(free_port)
gateway_port=$(free_port)
metrics_port=$(free_port)

"$venv/nats-server" -js -sd "$dir/nats" -a 127.0.0.1 -p "$nats_port" >"$dir/nats.log" 2>&1 &
pids+=($!)
"$venv/secantusd-py" --host 127.0.0.1 --port "$mongo_port" --storage-path "$dir/mongo" \
  --log-level WARNING >"$dir/mongo.log" 2>&1 &
pids+=($!)
wait_port "$nats_port" nats-server "$dir/nats.log"
wait_port "$mongo_port" SecantusDB "$dir/mongo.log"

cat >"$dir/mtx.toml" <<EOF
[nats]
url = "nats://127.0.0.1:$nats_port"
[mongo]
uri = "mongodb://127.0.0.1:$mongo_port/?retryWrites=false&directConnection=true"
[gateway]
addr = "127.0.0.1:$gateway_port"
secrets_refresh_secs = 1
futures_front_month = true
[metrics]
addr = "127.0.0.1:$metrics_port"
[worker]
heartbeat_ms = 500
pull_expires_ms = 2000
[execution.paper.commission]
model = "bps"
rate = "1"
[accounts]
publish_interval_secs = 1
[accounts.initial_balances]
IBKR_Main = "1000000"
[accounts.instruments.GC]
multiplier = "100"
margin_per_contract = "11000"
[accounts.instruments.HG]
multiplier = "25000"
margin_per_contract = "6000"
EOF
export MTX_LOG__LEVEL=warn
m() { "$mtx" --config "$dir/mtx.toml" "$@"; }

echo "== setup: schema, topology, secrets, portfolio workflow"
m db migrate >/dev/null
m topology apply >/dev/null
for s in SPX_1-D_Opt Forex; do echo "test_password_123" | m secrets set "$s" >/dev/null; done
m strategies load tests/fixtures/strategies.json >/dev/null
m strategies set SPX_1-D_Opt --account IBKR_Main --expected-alpha 0.05 >/dev/null
m strategies set Forex --create --account IBKR_Main --include-in-optimization false \
  --expected-alpha 0.05 >/dev/null
m backtest ingest tests/fixtures/backtests >/dev/null
alloc=$(m optimize --algorithm max-sharpe --json |
  "$py" -c 'import json, sys; print(json.load(sys.stdin)["allocation_id"])')
m allocations approve "$alloc" --by data-mode-test >/dev/null
echo "approved $alloc"

echo "== pipeline"
# The binary itself in the background (not the `m` function, whose subshell
# would take the kill and leave the pipeline running after the test).
"$mtx" --config "$dir/mtx.toml" run gateway standardizer cerebro execution accounts sink \
  >"$dir/pipeline.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 300); do
  if curl -fsS "http://127.0.0.1:$metrics_port/readyz" >/dev/null 2>&1; then break; fi
  sleep 0.2
done
curl -fsS "http://127.0.0.1:$metrics_port/readyz" >/dev/null || { cat "$dir/pipeline.log"; exit 1; }

echo "== fixture signals through the gateway"
for f in tests/fixtures/signals/*.json; do
  m signal send "$f" --gateway "http://127.0.0.1:$gateway_port" --speed 100 \
    --id-prefix "$(basename "$f" .json)" >/dev/null
done
m market price AAPL 151.25 >/dev/null
# A malformed raw signal published straight onto the raw subject (core NATS
# protocol, JetStream stores it): the standardizer dead-letters it.
python3 - "$nats_port" <<'EOF'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.recv(4096)  # INFO
body = b'{"strategy_name": "SPX_1-D_Opt", "signal_legs": "not a list"'
s.sendall(b'CONNECT {"verbose":false}\r\nPUB signals.raw.staging.mathematricks '
          + str(len(body)).encode() + b'\r\n' + body + b'\r\nPING\r\n')
assert b"PONG" in s.recv(4096)
s.close()
EOF

# Keep signals flowing while Prometheus scrapes, so rates and latency
# quantiles over the dashboards' windows have data (the fixtures above went
# through before the first scrape).
(
  round=0
  while :; do
    round=$((round + 1))
    for f in tests/fixtures/signals/*.json; do
      m signal send "$f" --gateway "http://127.0.0.1:$gateway_port" --speed 1000 \
        --id-prefix "live$round-$(basename "$f" .json)" >/dev/null 2>&1 || true
    done
    sleep 1
  done
) &
pids+=($!)

echo "== dashboards on real data"
grafana/tests/with-prometheus.sh --scrape "127.0.0.1:$metrics_port" --wait-scrapes 8 -- \
  "$py" grafana/tests/check_dashboards.py --mode data --rate-interval 30s --lookback 5m --quiet
