//! Cross-check `max_sharpe` against an independent Python reference
//! (`tests/reference_max_sharpe.py`: cvxpy homogenised QP + scipy SLSQP on
//! the raw Sharpe ratio), on the 8 full-history fixture strategies with
//! max_leverage 2.0, max_single_strategy 0.5, r_f 0.
//!
//! Runs when `PORTFOLIO_REF_PYTHON` names a python with numpy, scipy and
//! cvxpy. `make test` installs them into the project venv
//! (`deploy/local/pyref.sh install`) and sets the variable; by hand:
//!
//! ```text
//! PORTFOLIO_REF_PYTHON=$(deploy/local/pyref.sh install) \
//!   cargo test -p mtx-portfolio --test python_reference -- --nocapture
//! ```
//!
//! (Not an `MTX_` variable: the config loader rejects unknown `MTX_*` keys.)
//! Without the variable the test passes and prints why it was skipped. With
//! it set, any failure to run the script is a test failure.

mod common;

use std::process::Command;

use common::{backtests_dir, full_history, load_all};
use mtx_portfolio::align;
use mtx_portfolio::optimize::{max_sharpe, Constraints, ReturnMoments};

const WEIGHT_TOL: f64 = 1e-4;

/// The python to run the reference with.
const PYTHON_VAR: &str = "PORTFOLIO_REF_PYTHON";

#[test]
fn max_sharpe_matches_python_reference() {
    let Some(py) = std::env::var_os(PYTHON_VAR).filter(|p| !p.is_empty()) else {
        eprintln!(
            "SKIPPED python_reference: {PYTHON_VAR} is not set (point it at a python with numpy, \
             scipy and cvxpy, e.g. PORTFOLIO_REF_PYTHON=$(deploy/local/pyref.sh install); \
             `make test` does this)"
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
        .unwrap_or_else(|e| panic!("cannot run {PYTHON_VAR}={py:?}: {e}"));
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
