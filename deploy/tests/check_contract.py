#!/usr/bin/env python3
"""The metrics contract and the alert tests hold together (called by run-ops-tests.sh).

1. Every metric used by an alert/recording rule (deploy/prometheus/rules) or a
   dashboard panel (grafana/dashboards) is listed in
   deploy/prometheus/METRICS.md (mtx_ metrics, and the external `up`,
   kube-state-metrics and NATS exporter names), so the Rust side and the
   operations side agree on one list.
2. Every alert of the rule files has at least one unit test where it fires and
   one where it must not (deploy/prometheus/tests/*.test.yml).
3. Dashboard panels that use NATS exporter metrics are marked
   (`options.mtx_requires: nats-exporter`), and no marked panel uses mtx metrics
   only (a marked panel is checked for syntax only, so it must really need the exporter).
"""

import glob
import json
import os
import re
import sys

import yaml

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
METRICS_MD = os.path.join(ROOT, "deploy/prometheus/METRICS.md")
RULES = sorted(glob.glob(os.path.join(ROOT, "deploy/prometheus/rules/*.yml")))
TESTS = sorted(glob.glob(os.path.join(ROOT, "deploy/prometheus/tests/*.test.yml")))
DASHBOARDS = sorted(glob.glob(os.path.join(ROOT, "grafana/dashboards/*.json")))

PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "by", "without", "on", "ignoring", "group_left",
    "group_right", "and", "or", "unless", "offset", "bool", "rate", "irate", "increase",
    "deriv", "delta", "idelta", "histogram_quantile", "label_replace", "vector", "scalar",
    "max_over_time", "min_over_time", "sum_over_time", "avg_over_time", "count_over_time",
    "absent", "absent_over_time", "clamp_min", "clamp_max", "topk", "bottomk", "time", "le",
    "inf", "nan", "stddev", "quantile", "changes", "resets", "predict_linear", "abs",
}


def documented():
    text = open(METRICS_MD).read()
    names = set(re.findall(r"`((?:mtx|kube|jetstream)_[a-z0-9_]+)`", text))
    # gnatsd_varz_*, jetstream_* families are documented by prefix.
    prefixes = tuple(p.rstrip("*") for p in re.findall(r"`((?:gnatsd|jetstream|nats)_[a-z_]*\*)`", text))
    if "`up" in text:
        names.add("up")
    return names, prefixes


def metric_names(expr):
    # Drop string literals and label matchers / grouping lists, keep identifiers.
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b\d+(?:\.\d+)?(?:ms|s|m|h|d|w|y)?\b", "", expr)
    out = set()
    for tok in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        if ":" in tok or tok.lower() in PROMQL_WORDS or tok.startswith("$"):
            continue
        out.add(tok)
    return out


def base_name(name, known):
    for suf in ("_bucket", "_count", "_sum"):
        if name.endswith(suf) and name[: -len(suf)] in known:
            return name[: -len(suf)]
    return name


def main():
    failures = []
    known, prefixes = documented()

    def check_expr(expr, where):
        for m in metric_names(expr):
            b = base_name(m, known)
            if b in known or b.startswith(prefixes):
                continue
            failures.append(f"{where}: metric `{m}` is not in deploy/prometheus/METRICS.md")

    alerts = set()
    for path in RULES:
        for g in yaml.safe_load(open(path))["groups"]:
            for rule in g["rules"]:
                name = rule.get("alert") or rule.get("record")
                check_expr(rule["expr"], f"{os.path.basename(path)}: {name}")
                if "alert" in rule:
                    alerts.add(rule["alert"])

    fires, silent = set(), set()
    for path in TESTS:
        for t in yaml.safe_load(open(path))["tests"]:
            for a in t.get("alert_rule_test", []):
                (fires if a.get("exp_alerts") else silent).add(a["alertname"])
    for a in sorted(alerts):
        if a not in fires:
            failures.append(f"alert {a}: no unit test where it fires")
        if a not in silent:
            failures.append(f"alert {a}: no unit test where it must stay silent")
    for a in sorted((fires | silent) - alerts):
        failures.append(f"unit tests name alert {a}, which no rule defines")

    n_panels = 0
    for path in DASHBOARDS:
        dash = json.load(open(path))
        # Metric-name variables (the NATS exporter prefix): their current values.
        values = {}
        for v in (dash.get("templating") or {}).get("list", []):
            if v.get("type") == "custom":
                values[v["name"]] = (v.get("current") or {}).get("value", "")
        stack = list(dash.get("panels", []))
        while stack:
            p = stack.pop()
            stack.extend(p.get("panels", []) or [])
            exprs = [re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), t["expr"])
                     for t in p.get("targets", []) if t.get("expr")]
            if not exprs:
                continue
            n_panels += 1
            where = f"{os.path.basename(path)}: panel {p.get('title')!r}"
            names = set()
            for e in exprs:
                check_expr(e, where)
                names |= metric_names(e)
            needs_exporter = any(n.startswith(("gnatsd_", "jetstream_", "nats_")) for n in names)
            marked = (p.get("options") or {}).get("mtx_requires") == "nats-exporter"
            if needs_exporter and not marked:
                failures.append(f"{where}: uses NATS exporter metrics but is not marked mtx_requires: nats-exporter")
            if marked and not needs_exporter:
                failures.append(f"{where}: marked nats-exporter but uses no exporter metric (would skip its data check)")

    for f in failures:
        print(f"FAIL  {f}")
    print(f"contract: {len(known)} documented metrics; {len(alerts)} alerts each tested firing and silent; "
          f"{n_panels} panels checked: {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
