#!/usr/bin/env python3
"""Evaluate every PromQL expression of every Grafana dashboard panel on a real Prometheus.

    check_dashboards.py --prometheus http://127.0.0.1:9090 --mode syntax
    check_dashboards.py --prometheus http://127.0.0.1:9090 --mode data [--lookback 10m]
    check_dashboards.py --list
    grafana/tests/with-prometheus.sh -- check_dashboards.py --mode syntax   # PROM_URL is set

Modes
  syntax  Every expression must be accepted by Prometheus' query API
          (`/api/v1/query`): a parse error comes back as `bad_data` and fails
          the check. Works against an empty Prometheus (no data needed).
  data    Like syntax, and every target of every panel that is not marked as
          needing the NATS exporter must return data: at least one series with
          a finite value over the last `--lookback` (a `/api/v1/query_range`
          evaluation, i.e. what the dashboard would draw). Panels marked with
          `options.mtx_requires` (or `[requires: ...]` at the start of the
          description) are checked for syntax only, unless their requirement is
          named with `--have nats-exporter`.

Grafana variables are substituted before evaluation: `$__rate_interval`,
`$__interval` (`--rate-interval`), `$__range` (`--range`), and every dashboard
template variable (`$namespace`, `${account}`, `[[var]]`): its `allValue`
(or `.*`) when the current value is All, else the current value; override with
`--var name=value`.

Exit status: 0 when every check passes, 1 when any fails, 2 on usage errors.
Standard library only (Python 3.8+).
"""

import argparse
import glob
import json
import math
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DASHBOARDS = os.path.normpath(os.path.join(HERE, "..", "dashboards"))


def walk_panels(panels):
    """Every panel, including the ones nested in (collapsed) rows."""
    for p in panels or []:
        yield p
        yield from walk_panels(p.get("panels"))


def panel_requires(panel):
    req = (panel.get("options") or {}).get("mtx_requires")
    if req:
        return req
    m = re.match(r"\s*\[requires:\s*([\w.-]+)\]", panel.get("description") or "")
    return m.group(1) if m else None


def variables(dash, overrides, rate_interval, range_):
    values = {
        "__rate_interval": rate_interval,
        "__interval": rate_interval,
        "__range": range_,
        "__range_s": str(int(parse_duration(range_))),
        "__range_ms": str(int(parse_duration(range_) * 1000)),
    }
    for v in (dash.get("templating") or {}).get("list", []):
        name = v.get("name")
        if not name or v.get("type") in ("datasource", "interval", "adhoc"):
            continue
        cur = (v.get("current") or {}).get("value")
        if isinstance(cur, list):
            cur = cur[0] if len(cur) == 1 else "|".join(cur)
        if cur in (None, "", "$__all") and v.get("includeAll"):
            values[name] = v.get("allValue") or ".*"
        elif cur not in (None, ""):
            values[name] = str(cur)
        elif v.get("options"):
            values[name] = str(v["options"][0].get("value", ""))
        else:
            values[name] = ".*"
    values.update(overrides)
    return values


VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)(?::\w+)?\]\]|\$(\w+)")


def substitute(expr, values):
    missing = []

    def rep(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name in values:
            return values[name]
        missing.append(name)
        return m.group(0)

    out = VAR_RE.sub(rep, expr)
    return out, missing


def parse_duration(s):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", s.strip())
    if not m:
        raise ValueError(f"bad duration {s!r}")
    mult = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    return float(m.group(1)) * mult


def collect(paths, rate_interval, range_, overrides):
    """[(dashboard file, dashboard title, panel title, requires, refId, raw, expr, missing vars)]"""
    items, problems = [], []
    for path in paths:
        try:
            with open(path) as f:
                dash = json.load(f)
        except (OSError, ValueError) as e:
            problems.append(f"{path}: cannot load dashboard JSON: {e}")
            continue
        values = variables(dash, overrides, rate_interval, range_)
        for p in walk_panels(dash.get("panels")):
            if p.get("type") in ("row", "text", "news", "dashlist"):
                continue
            targets = [t for t in p.get("targets") or [] if t.get("expr")]
            if not targets:
                problems.append(f"{os.path.basename(path)}: panel {p.get('title')!r} has no PromQL target")
                continue
            for t in targets:
                expr, missing = substitute(t["expr"], values)
                items.append({
                    "file": os.path.basename(path),
                    "dashboard": dash.get("title", ""),
                    "panel": p.get("title", ""),
                    "requires": panel_requires(p),
                    "ref": t.get("refId", "?"),
                    "raw": t["expr"],
                    "expr": expr,
                    "missing": missing,
                })
    return items, problems


def api(base, path, params, timeout):
    url = base.rstrip("/") + path + "?" + urllib.parse.urlencode(params)
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:  # 400 bad_data, 422 execution errors carry JSON
        try:
            return json.load(e)
        except ValueError:
            return {"status": "error", "errorType": f"http {e.code}", "error": e.reason}
    except (urllib.error.URLError, OSError, ValueError) as e:
        return {"status": "error", "errorType": "unreachable", "error": str(e)}


def has_finite_value(result_type, result):
    if result_type == "scalar":
        return math.isfinite(float(result[1]))
    for series in result:
        points = series.get("values") or ([series["value"]] if "value" in series else [])
        for _, v in points:
            try:
                if math.isfinite(float(v)):
                    return True
            except ValueError:
                pass
    return False


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` is fine
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prometheus", default=os.environ.get("PROM_URL"),
                    help="Prometheus base URL, e.g. http://127.0.0.1:9090 (default: $PROM_URL)")
    ap.add_argument("--mode", choices=["syntax", "data"], default="data")
    ap.add_argument("--dashboards", default=DEFAULT_DASHBOARDS,
                    help="dashboard JSON file or folder (default: grafana/dashboards)")
    ap.add_argument("--rate-interval", default="1m", help="value of $__rate_interval / $__interval")
    ap.add_argument("--range", default="1h", help="value of $__range")
    ap.add_argument("--lookback", default="10m", help="data mode: window that must contain data")
    ap.add_argument("--step", default="15s", help="data mode: query_range step")
    ap.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                    help="override a dashboard variable (repeatable)")
    ap.add_argument("--have", action="append", default=[], metavar="REQUIREMENT",
                    help="treat panels marked with this requirement (e.g. nats-exporter) as data-checked")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--list", action="store_true", help="print the substituted expressions and exit")
    ap.add_argument("--quiet", action="store_true", help="print failures and the summary only")
    args = ap.parse_args()

    overrides = {}
    for kv in args.var:
        if "=" not in kv:
            ap.error(f"--var {kv!r}: expected NAME=VALUE")
        k, v = kv.split("=", 1)
        overrides[k] = v
    try:
        parse_duration(args.rate_interval), parse_duration(args.range)
        lookback, step = parse_duration(args.lookback), parse_duration(args.step)
    except ValueError as e:
        ap.error(str(e))

    if os.path.isdir(args.dashboards):
        paths = sorted(glob.glob(os.path.join(args.dashboards, "*.json")))
    else:
        paths = [args.dashboards]
    if not paths:
        print(f"no dashboards found in {args.dashboards}", file=sys.stderr)
        return 2
    items, problems = collect(paths, args.rate_interval, args.range, overrides)

    if args.list:
        for it in items:
            tag = f" [{it['requires']}]" if it["requires"] else ""
            print(f"{it['file']} | {it['panel']} | {it['ref']}{tag}\n    {it['expr']}")
        for p in problems:
            print("PROBLEM", p)
        return 1 if problems else 0

    if not args.prometheus:
        ap.error("--prometheus (or PROM_URL) is required, or use --list")

    failures = list(problems)
    for it in items:
        where = f"{it['file']} / {it['panel']} / {it['ref']}"
        if it["missing"]:
            failures.append(f"{where}: unknown variable(s) {', '.join(sorted(set(it['missing'])))}")
            continue
        r = api(args.prometheus, "/api/v1/query", {"query": it["expr"]}, args.timeout)
        if r.get("status") != "success":
            failures.append(f"{where}: {r.get('errorType')}: {r.get('error')}\n      {it['expr']}")
            continue
        check_data = args.mode == "data" and (not it["requires"] or it["requires"] in args.have)
        if not check_data:
            if not args.quiet:
                why = f"syntax only, requires {it['requires']}" if it["requires"] else "syntax"
                print(f"ok    {where} ({why})")
            continue
        end = time.time()
        r = api(args.prometheus, "/api/v1/query_range",
                {"query": it["expr"], "start": f"{end - lookback:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"},
                args.timeout)
        if r.get("status") != "success":
            failures.append(f"{where}: query_range {r.get('errorType')}: {r.get('error')}\n      {it['expr']}")
            continue
        data = r.get("data") or {}
        if not has_finite_value(data.get("resultType"), data.get("result") or []):
            failures.append(f"{where}: no data in the last {args.lookback}\n      {it['expr']}")
            continue
        if not args.quiet:
            print(f"ok    {where} (data)")

    for f in failures:
        print(f"FAIL  {f}")
    n_panels = len({(i['file'], i['panel']) for i in items})
    print(f"{len(items)} expressions in {n_panels} panels of {len(paths)} dashboards, "
          f"mode={args.mode}: {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
