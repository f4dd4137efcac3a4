#!/usr/bin/env python3
"""Independent reference for mtx-portfolio's `max_sharpe`.

Reads the backtest CSVs itself (no Rust involved), inner-joins them on date,
and solves

    maximise (mu.w - rf) / sqrt(w' S w)   s.t.  sum(w) = L,  0 <= w_i <= u

with mu = mean daily decimal return and S = sample covariance (ddof 1), two
ways:

  * cvxpy (CLARABEL backend) on the homogenised QP
        min y' S y  s.t. (mu - rf/L).y = 1, sum(y) = L*k, 0 <= y <= u*k, k >= 0
    with w = y / k;
  * scipy SLSQP directly on the (non-homogenised) Sharpe ratio, as a check of
    the homogenisation itself.

Prints one JSON object on stdout:
  {"strategies": [...], "n_days": N, "first_date": ..., "last_date": ...,
   "weights": {id: w}, "sharpe_daily": s, "scipy_weights": {id: w},
   "scipy_sharpe_daily": s, "scipy_success": bool}

Only numpy, scipy and cvxpy are needed:
    deploy/local/pyref.sh install   (what `make test` runs)
Usage:
    reference_max_sharpe.py --dir <backtests dir> [--strategies A,B,...]
        [--max-leverage 2.0] [--max-single 0.5] [--rf 0.0]
Without --strategies, every strategy whose history starts on the earliest
start date is used.
"""

import argparse
import csv
import json
import math
import os
import sys

import cvxpy as cp
import numpy as np
from scipy.optimize import minimize


def read_csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header = [h.strip() for h in rows[0]]
    date_col = header.index("Date")
    ret_col = None
    scale = None
    for i, h in enumerate(header):
        low = h.lower()
        if "return" in low and ("%" in low or "pct" in low or "percent" in low):
            ret_col, scale = i, 100.0
        elif low in ("daily returns", "daily return", "returns", "return"):
            ret_col, scale = i, 1.0
    if ret_col is None:
        raise SystemExit(f"{path}: no return column in {header}")
    series = {}
    for row in rows[1:]:
        if not row:
            continue
        d = row[date_col].strip()[:10]
        v = float(row[ret_col]) / scale
        if d in series or not math.isfinite(v):
            raise SystemExit(f"{path}: bad row {row}")
        series[d] = v
    return series


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--strategies", default="")
    ap.add_argument("--max-leverage", type=float, default=2.0)
    ap.add_argument("--max-single", type=float, default=0.5)
    ap.add_argument("--rf", type=float, default=0.0)
    args = ap.parse_args()

    all_series = {}
    for name in sorted(os.listdir(args.dir)):
        if name.lower().endswith(".csv"):
            all_series[name[:-4]] = read_csv(os.path.join(args.dir, name))

    if args.strategies:
        ids = args.strategies.split(",")
    else:
        earliest = min(min(s) for s in all_series.values())  # ISO dates sort lexically
        ids = sorted(k for k, s in all_series.items() if min(s) == earliest)

    common = sorted(set.intersection(*(set(all_series[i]) for i in ids)))
    R = np.array([[all_series[i][d] for i in ids] for d in common])
    mu = R.mean(axis=0)
    S = np.cov(R, rowvar=False, ddof=1)
    n = len(ids)
    L, u, rf = args.max_leverage, args.max_single, args.rf

    # --- cvxpy: homogenised QP -------------------------------------------
    y = cp.Variable(n)
    k = cp.Variable()
    mu_ex = mu - rf / L
    cons = [mu_ex @ y == 1, cp.sum(y) == L * k, y >= 0, y <= u * k, k >= 0]
    prob = cp.Problem(cp.Minimize(cp.quad_form(y, cp.psd_wrap(S))), cons)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    if prob.status not in ("optimal", "optimal_inaccurate"):
        raise SystemExit(f"cvxpy status {prob.status}")
    w = np.asarray(y.value).ravel() / float(k.value)

    def sharpe(x):
        return (mu @ x - rf) / math.sqrt(x @ S @ x)

    # --- scipy SLSQP directly on the Sharpe ratio --------------------------
    x0 = np.full(n, L / n)
    res = minimize(
        lambda x: -sharpe(x),
        x0,
        method="SLSQP",
        bounds=[(0.0, u)] * n,
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - L}],
        options={"ftol": 1e-15, "maxiter": 1000},
    )

    out = {
        "strategies": ids,
        "n_days": len(common),
        "first_date": common[0],
        "last_date": common[-1],
        "weights": {i: float(v) for i, v in zip(ids, w)},
        "sharpe_daily": float(sharpe(w)),
        "scipy_weights": {i: float(v) for i, v in zip(ids, res.x)},
        "scipy_sharpe_daily": float(sharpe(res.x)),
        "scipy_success": bool(res.success),
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
