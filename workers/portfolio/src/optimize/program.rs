//! A small builder over clarabel's standard form
//!
//! ```text
//!   minimise ½ xᵀPx + qᵀx   subject to   b − Ax ∈ K
//! ```
//!
//! so each optimiser can state its constraints row by row (`a·x = rhs`,
//! `a·x ≤ rhs`, exponential-cone triples) instead of hand-assembling sparse
//! matrices and cone lists.

use clarabel::algebra::CscMatrix;
use clarabel::solver::{DefaultSettings, DefaultSolver, IPSolver, SolverStatus, SupportedConeT};

use super::OptimizeError;

/// Sparse linear expression: `(variable index, coefficient)` pairs.
pub(crate) type Expr = Vec<(usize, f64)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConeKind {
    Zero,
    Nonneg,
}

/// Result of one clarabel solve.
#[derive(Debug, Clone)]
pub(crate) struct ConeSolution {
    /// Primal solution.
    pub x: Vec<f64>,
    /// Final status.
    pub status: SolverStatus,
    /// Interior-point iterations.
    pub iterations: u32,
}

impl ConeSolution {
    /// `Solved` or `AlmostSolved`: the iterate is an optimum we can use.
    pub fn usable(&self) -> bool {
        matches!(
            self.status,
            SolverStatus::Solved | SolverStatus::AlmostSolved
        )
    }

    /// Turn an unusable status into an error.
    pub fn require_usable(self) -> Result<Self, OptimizeError> {
        if self.usable() {
            Ok(self)
        } else {
            Err(OptimizeError::NotSolved {
                status: self.status.to_string(),
                iterations: self.iterations,
            })
        }
    }
}

/// A conic program under construction.
#[derive(Debug, Clone)]
pub(crate) struct ConeProgram {
    n: usize,
    p_i: Vec<usize>,
    p_j: Vec<usize>,
    p_v: Vec<f64>,
    q: Vec<f64>,
    a_i: Vec<usize>,
    a_j: Vec<usize>,
    a_v: Vec<f64>,
    b: Vec<f64>,
    cones: Vec<SupportedConeT<f64>>,
    last: Option<ConeKind>,
}

impl ConeProgram {
    /// Empty program in `n` variables.
    pub fn new(n: usize) -> Self {
        Self {
            n,
            p_i: Vec::new(),
            p_j: Vec::new(),
            p_v: Vec::new(),
            q: vec![0.0; n],
            a_i: Vec::new(),
            a_j: Vec::new(),
            a_v: Vec::new(),
            b: Vec::new(),
            cones: Vec::new(),
            last: None,
        }
    }

    /// Add `v` to entry (i, j) of P (objective ½xᵀPx). Only the upper
    /// triangle is stored, so pass `i ≤ j`; entries with i > j are mirrored.
    pub fn add_quadratic(&mut self, i: usize, j: usize, v: f64) {
        let (i, j) = if i <= j { (i, j) } else { (j, i) };
        self.p_i.push(i);
        self.p_j.push(j);
        self.p_v.push(v);
    }

    /// Set the linear objective coefficient of variable `j`.
    pub fn set_linear(&mut self, j: usize, v: f64) {
        self.q[j] = v;
    }

    fn push_row(&mut self, expr: &[(usize, f64)], rhs: f64) {
        let row = self.b.len();
        for &(j, v) in expr {
            if v != 0.0 {
                self.a_i.push(row);
                self.a_j.push(j);
                self.a_v.push(v);
            }
        }
        self.b.push(rhs);
    }

    fn push_scalar_cone(&mut self, kind: ConeKind) {
        if self.last == Some(kind) {
            if let Some(SupportedConeT::ZeroConeT(d) | SupportedConeT::NonnegativeConeT(d)) =
                self.cones.last_mut()
            {
                *d += 1;
                return;
            }
        }
        self.cones.push(match kind {
            ConeKind::Zero => SupportedConeT::ZeroConeT(1),
            ConeKind::Nonneg => SupportedConeT::NonnegativeConeT(1),
        });
        self.last = Some(kind);
    }

    /// Constraint `expr · x = rhs`.
    pub fn eq(&mut self, expr: &[(usize, f64)], rhs: f64) {
        self.push_row(expr, rhs);
        self.push_scalar_cone(ConeKind::Zero);
    }

    /// Constraint `expr · x ≤ rhs`.
    pub fn le(&mut self, expr: &[(usize, f64)], rhs: f64) {
        self.push_row(expr, rhs);
        self.push_scalar_cone(ConeKind::Nonneg);
    }

    /// Constraint `(u, v, w) ∈ K_exp = cl{(u, v, w) : v > 0, v·e^{u/v} ≤ w}`
    /// where each component is `constant + expr · x`.
    pub fn exp_cone(&mut self, comps: [(f64, &[(usize, f64)]); 3]) {
        for (c, expr) in comps {
            // s = b − Ax must equal c + expr·x  ⇒  A row = −expr, b = c.
            let neg: Expr = expr.iter().map(|&(j, v)| (j, -v)).collect();
            self.push_row(&neg, c);
        }
        self.cones.push(SupportedConeT::ExponentialConeT());
        self.last = None;
    }

    /// Solve with clarabel's default interior-point settings (tolerances
    /// 1e-8), silently.
    pub fn solve(&self) -> Result<ConeSolution, OptimizeError> {
        let m = self.b.len();
        let p = CscMatrix::new_from_triplets(
            self.n,
            self.n,
            self.p_i.clone(),
            self.p_j.clone(),
            self.p_v.clone(),
        );
        let a = CscMatrix::new_from_triplets(
            m,
            self.n,
            self.a_i.clone(),
            self.a_j.clone(),
            self.a_v.clone(),
        );
        let settings = DefaultSettings {
            verbose: false,
            max_iter: 200,
            ..DefaultSettings::default()
        };
        let mut solver = DefaultSolver::new(&p, &self.q, &a, &self.b, &self.cones, settings)
            .map_err(|e| OptimizeError::SolverSetup(e.to_string()))?;
        solver.solve();
        Ok(ConeSolution {
            x: solver.solution.x.clone(),
            status: solver.solution.status,
            iterations: solver.solution.iterations,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_qp() {
        // min x² + y² s.t. x + y = 1, x ≤ 0.3  →  (0.3, 0.7)
        let mut p = ConeProgram::new(2);
        p.add_quadratic(0, 0, 2.0);
        p.add_quadratic(1, 1, 2.0);
        p.eq(&[(0, 1.0), (1, 1.0)], 1.0);
        p.le(&[(0, 1.0)], 0.3);
        let s = p.solve().expect("solve").require_usable().expect("usable");
        assert!((s.x[0] - 0.3).abs() < 1e-7);
        assert!((s.x[1] - 0.7).abs() < 1e-7);
    }

    #[test]
    fn tiny_exp_cone() {
        // max g s.t. g ≤ ln(2)  →  g = ln 2
        let mut p = ConeProgram::new(1);
        p.set_linear(0, -1.0);
        p.exp_cone([(0.0, &[(0, 1.0)]), (1.0, &[]), (2.0, &[])]);
        let s = p.solve().expect("solve").require_usable().expect("usable");
        assert!((s.x[0] - 2f64.ln()).abs() < 1e-7);
    }
}
