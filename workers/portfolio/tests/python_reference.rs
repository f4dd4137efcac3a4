//! Cross-check `max_sharpe` against an independent Python reference
//! (`tests/reference_max_sharpe.py`: cvxpy homogenised QP + scipy SLSQP on
//! the raw Sharpe ratio), on the 8 full-history fixture strategies with
//! max_leverage 2.0, max_single_strategy 0.5, r_f 0.
//!
//! Runs only when `MTX_PY` names a python with numpy, scipy and cvxpy, e.g.
//!
//! ```text
//! python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install numpy scipy cvxpy
//! MTX_PY=/tmp/pyref/bin/python cargo test -p mtx-portfolio --test python_reference -- --nocapture
//! ```
//!
//! Without `MTX_PY` the test passes and prints that it was skipped. With
//! `MTX_PY` set, any failure to run the script is a test failure.

mod common;

use std::process::Command;

use common::{backtests_dir, full_history, load_all};
use mtx_portfolio::align;
use mtx_portfolio::optimize::{max_sharpe, Constraints, ReturnMoments};

const WEIGHT_TOL: f64 = 1e-4;

#[test]
fn max_sharpe_matches_python_reference() {
    let Some(py) = std::env::var_os("MTX_PY") else {
        eprintln!(
            "SKIPPED python_reference: MTX_PY is not set (point it at a python with numpy, scipy, cvxpy)"
        );
        return;
    };
    let all = load_all();
    let full = full_history(&all);
    let al = align(&full).expect("align");
    let m = ReturnMoments::from_aligned(&al).expect("moments");
    let c = Constraints {
        max_leverage: 2.0,
        max_single_strategy: 0.5,
        risk_free_rate: 0.0,
    };
    let ours = max_sharpe(&m, &c).expect("max_sharpe");

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference_max_sharpe.py");
    let out = Command::new(&py)
        .arg(script)
        .arg("--dir")
        .arg(backtests_dir())
        .arg("--strategies")
        .arg(al.strategy_ids.join(","))
        .args([
            "--max-leverage",
            "2.0",
            "--max-single",
            "0.5",
            "--rf",
            "0.0",
        ])
        .output()
        .expect("spawn MTX_PY");
    assert!(
        out.status.success(),
        "reference script failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("reference JSON");
    assert_eq!(v["n_days"].as_u64(), Some(al.n_days() as u64));
    let w = al.window();
    assert_eq!(v["first_date"].as_str(), Some(w.first.to_string().as_str()));
    assert_eq!(v["last_date"].as_str(), Some(w.last.to_string().as_str()));

    for key in ["weights", "scipy_weights"] {
        let mut max_diff: f64 = 0.0;
        for (id, ours_w) in al.strategy_ids.iter().zip(&ours.weights) {
            let theirs = v[key][id]
                .as_f64()
                .unwrap_or_else(|| panic!("{key}[{id}] missing"));
            let d = (ours_w - theirs).abs();
            max_diff = max_diff.max(d);
            eprintln!("{key:>13} {id:>14}: rust {ours_w:.10}  python {theirs:.10}  |Δ| {d:.2e}");
            assert!(
                d <= WEIGHT_TOL,
                "{key}[{id}]: rust {ours_w} vs python {theirs}"
            );
        }
        eprintln!("{key}: max |Δw| = {max_diff:.3e} (tolerance {WEIGHT_TOL:e})");
    }
    let ref_sharpe = v["sharpe_daily"].as_f64().expect("sharpe");
    eprintln!(
        "sharpe_daily: rust {:.12} python {ref_sharpe:.12}",
        ours.metrics.expected_sharpe_daily
    );
    assert!(ours.metrics.expected_sharpe_daily >= ref_sharpe - 1e-9);
}
