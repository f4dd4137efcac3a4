#!/usr/bin/env bash
# Render deploy/nats/auth.conf.tmpl for a topology prefix (topology.prefix /
# MTX_TOPOLOGY__PREFIX). No argument or "" = production (no prefix).
#
#   deploy/nats/render-auth.sh            > auth.conf    # what deploy/nats/auth.conf holds
#   deploy/nats/render-auth.sh t123x0     > auth.conf    # a test topology prefix
#
# The Rust permission test (tests/tests/nats_permissions.rs) renders the same
# template the same way for its fresh per-test prefix.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prefix=${1:-}
if [[ -n $prefix && ! $prefix =~ ^[A-Za-z0-9_-]+$ ]]; then
  echo "render-auth.sh: prefix \`$prefix\` must be one subject token of letters, digits, _ or -" >&2
  exit 2
fi
if [[ -z $prefix ]]; then
  P="" S="" B=""
else
  P="$prefix." S="$(printf '%s' "$prefix" | tr '[:lower:]' '[:upper:]')_" B="${prefix}_"
fi
sed -e "/^[[:space:]]*#/!{s/{{P}}/$P/g; s/{{S}}/$S/g; s/{{B}}/$B/g;}" "$here/auth.conf.tmpl"
