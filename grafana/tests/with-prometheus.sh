#!/usr/bin/env bash
# Run a command next to a throwaway Prometheus (the Debian `prometheus`
# binary: deploy/ops/install-tools.sh) on a free loopback port with a temp
# storage dir, optionally scraping some targets every second.
#
#   with-prometheus.sh [--scrape host:port]... [--rules file]... [--wait-scrapes N] -- command [args]
#
# The command gets PROM_URL=http://127.0.0.1:<port>. With --wait-scrapes N it
# starts only after every target was scraped successfully N times (so rate()
# over 1m windows has samples). Prometheus is stopped and its data removed
# afterwards; the exit status is the command's.
#
# Examples:
#   with-prometheus.sh -- grafana/tests/check_dashboards.py --mode syntax
#   with-prometheus.sh --scrape 127.0.0.1:9464 --wait-scrapes 5 -- \
#       grafana/tests/check_dashboards.py --mode data --rate-interval 30s
# (check_dashboards.py reads PROM_URL when --prometheus is not given)
set -euo pipefail

targets=()
rules=()
wait_scrapes=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --scrape) targets+=("$2"); shift 2 ;;
    --rules) rules+=("$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"); shift 2 ;;
    --wait-scrapes) wait_scrapes=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "with-prometheus.sh: unknown option $1 (forgot --?)" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "usage: with-prometheus.sh [--scrape host:port]... -- command" >&2; exit 2; }

PROMETHEUS=${PROMETHEUS:-$(command -v prometheus || true)}
[[ -x $PROMETHEUS ]] || { echo "prometheus not found: run deploy/ops/install-tools.sh" >&2; exit 2; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/mtx-prom.XXXXXX")
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
{
  echo "global:"
  echo "  scrape_interval: 1s"
  echo "  evaluation_interval: 1s"
  if [[ ${#rules[@]} -gt 0 ]]; then
    echo "rule_files:"
    for r in "${rules[@]}"; do echo "  - '$r'"; done
  fi
  echo "scrape_configs:"
  echo "  - job_name: mtx-workers"
  echo "    static_configs:"
  echo "      - targets: [$(IFS=,; echo "${targets[*]:-}" | sed 's/[^,][^,]*/"&"/g')]"
} >"$dir/prometheus.yml"

"$PROMETHEUS" --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
  --web.listen-address="127.0.0.1:$port" --log.level=warn >"$dir/prometheus.log" 2>&1 &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

export PROM_URL="http://127.0.0.1:$port"
for _ in $(seq 1 100); do
  if curl -sf "$PROM_URL/-/ready" >/dev/null 2>&1; then break; fi
  kill -0 "$pid" 2>/dev/null || { cat "$dir/prometheus.log" >&2; exit 2; }
  sleep 0.1
done
curl -sf "$PROM_URL/-/ready" >/dev/null || { echo "prometheus did not become ready" >&2; cat "$dir/prometheus.log" >&2; exit 2; }

if [[ $wait_scrapes -gt 0 && ${#targets[@]} -gt 0 ]]; then
  # count_over_time(up[..]) per target >= N and all up.
  for _ in $(seq 1 $((wait_scrapes * 10 + 100))); do
    n=$(curl -sf "$PROM_URL/api/v1/query" --data-urlencode "query=min(sum_over_time(up{job=\"mtx-workers\"}[5m])) >= $wait_scrapes and count(up{job=\"mtx-workers\"} == 1) == ${#targets[@]}" |
      python3 -c 'import json,sys; print(len(json.load(sys.stdin)["data"]["result"]))' || echo 0)
    [[ $n -gt 0 ]] && break
    sleep 0.5
  done
  [[ $n -gt 0 ]] || { echo "targets ${targets[*]} were not scraped $wait_scrapes times" >&2; exit 1; }
fi

set +e
"$@"
rc=$?
set -e
exit $rc
