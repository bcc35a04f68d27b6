//! The soft gates of `cppo_soft`: how much of an away-moving token's term it keeps.

/// The soft gate of `cppo_soft`: the share of its objective term (and gradient) a token
/// keeps. A corrective token (one that does not move away) always keeps all of it; so
/// does a feasible token under the inverse gate.
///
/// ```
/// use cppo::rule::{inverse_gate, CppoParams, Gate, Rule};
/// assert_eq!(Gate::default(), Gate::Inverse);
/// let soft = Rule::Cppo(CppoParams { gate: Some(Gate::default()), ..CppoParams::default() });
/// assert_eq!(soft.name(), "cppo_soft");
/// assert_eq!(inverse_gate(0.1, 0.2, 0.1, f64::INFINITY), 1.0); // feasible: all of it
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Gate {
    /// The paper's gate (its Appendix C): min(1, 1/x_t) with
    /// x_t = max(w_t D_t / δ, S_t / (δ + δ_b^row W_{t−1})), S_t = S_{t−1} + w_t D_t (the
    /// second term absent without a budget). 1 for feasible tokens.
    #[default]
    Inverse,
    /// σ((c_t − w_t D_t)/τ) for every away-moving token, feasible or not (an earlier
    /// form of this crate's, kept as an option).
    Sigmoid {
        /// τ > 0, default 0.01.
        tau: f64,
    },
}

impl Gate {
    /// The name used in configs (`"inverse"`, `"sigmoid"`).
    ///
    /// ```
    /// assert_eq!(cppo::Gate::Sigmoid { tau: 0.01 }.name(), "sigmoid");
    /// ```
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Inverse => "inverse",
            Self::Sigmoid { .. } => "sigmoid",
        }
    }
}

/// The inverse gate's share min(1, 1/x) of an away-moving, infeasible token, with
/// x = max(w_t D_t / δ, S_t / room), room = δ + δ_b^row W_{t−1} (or +∞ without a budget).
///
/// ```
/// use cppo::rule::inverse_gate;
/// // w D twice the threshold: half the term.
/// assert_eq!(inverse_gate(0.4, 0.2, 0.4, f64::INFINITY), 0.5);
/// // The prefix at 4/3 of its budget: three quarters.
/// assert!((inverse_gate(0.1, 0.2, 0.4, 0.3) - 0.75).abs() < 1e-15);
/// ```
#[inline(always)]
pub fn inverse_gate(wd: f64, delta: f64, s_t: f64, room: f64) -> f64 {
    let x = (wd / delta).max(s_t / room);
    if x > 1.0 { 1.0 / x } else { 1.0 }
}

/// The sigmoid gate's share σ((c_t − w_t D_t)/τ).
///
/// ```
/// assert_eq!(cppo::rule::sigmoid_gate(0.2, 0.2, 0.01), 0.5);
/// ```
#[inline(always)]
pub fn sigmoid_gate(c: f64, wd: f64, tau: f64) -> f64 {
    1.0 / (1.0 + (-(c - wd) / tau).exp())
}
