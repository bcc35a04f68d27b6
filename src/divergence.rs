//! Per-token divergences D_t between the rollout policy μ and the current policy π_θ.
//!
//! With p = exp(logp) (current) and q = exp(logp_old) (rollout):
//!
//! | name | D_t |
//! |---|---|
//! | `binary_tv` | \|p − q\| |
//! | `binary_kl` | max(0, q (log q − log p) + (1 − q) log((1 − q + 1e-8) / (1 − p + 1e-8))) |
//! | `topk_tv` | (Σ_k \|P_k − Q_k\| + \|P_rest − Q_rest\|) / 2 |
//! | `topk_kl` | max(0, Σ_k P_k (log P_k − log Q_k) + P_rest (log P_rest − log max(Q_rest, 1e-12))) |
//! | `k2` | ½ r² |
//! | `k3` | max(0, ρ − 1 − r) |
//!
//! where, for `k2` and `k3`, r = clamp(logp − logp_old, −20, 20) is the log-ratio the
//! crate uses everywhere and ρ = eʳ. These are the log-ratio estimators of KL(μ ‖ π_θ)
//! that TRM (Trust Region Masking) thresholds: TRM-max on `k2` and TRM-avg on `k3` are
//! verl's `seq_max_k2` and `seq_mean_k3` rules.
//!
//! where, for the top-K forms, P_k = exp(topk_logp_old) are the rollout policy's K
//! largest probabilities, Q_k = exp(topk_logp) the current policy's probabilities of the
//! same K tokens, P_rest = max(0, 1 − Σ P_k), Q_rest = max(0, 1 − Σ Q_k), and the rest
//! term of `topk_kl` is 0 when P_rest = 0.
//!
//! The binary forms treat the sampled token against "everything else" as a Bernoulli
//! pair; `binary_kl` is KL(Bernoulli(q) ‖ Bernoulli(p)). Both the 1e-8 guard of
//! `binary_kl` and the 1e-12 floor of `topk_kl` are those of the DPPO reference code
//! (the sail-sg/Stable-RL fork of verl), so that thresholds tuned there carry over.
//!
//! The divergence is a constant of the loss: it is never differentiated. Every D_t is
//! ≥ 0: where rounding would take a formula a few ulp below 0 (k3 for ρ ≈ 1), it is 0.
//!
//! Log-probabilities enter the formulas directly where a log appears (log q is
//! `logp_old`, not `ln(exp(logp_old))`), which is exact and agrees with the reference to
//! rounding.
//!
//! ```
//! use cppo::divergence::{binary_tv, binary_kl};
//! let (p, q) = (0.6_f64, 0.3_f64);
//! assert!((binary_tv(p.ln(), q.ln()) - 0.3).abs() < 1e-15);
//! let kl = 0.3 * (0.3_f64 / 0.6).ln() + 0.7 * ((0.7_f64 + 1e-8) / (0.4 + 1e-8)).ln();
//! assert!((binary_kl(p.ln(), q.ln()) - kl).abs() < 1e-15);
//! ```

use serde::{Deserialize, Serialize};

/// The guard added to both Bernoulli "rest" masses in [`binary_kl`], as in the DPPO
/// reference code.
///
/// ```
/// use cppo::divergence::{binary_kl, BINARY_KL_GUARD};
/// // p = 1 leaves π no rest mass: the guard keeps the KL finite.
/// let expect = 0.5 * 0.5f64.ln() + 0.5 * ((0.5 + BINARY_KL_GUARD) / BINARY_KL_GUARD).ln();
/// assert!((binary_kl(0.0, 0.5f64.ln()) - expect).abs() < 1e-12);
/// ```
pub const BINARY_KL_GUARD: f64 = 1e-8;

/// The floor on the current policy's rest mass in [`topk_kl`], as in the DPPO
/// reference code.
///
/// ```
/// use cppo::divergence::{topk_kl, TOPK_KL_REST_FLOOR};
/// // π puts all its mass on the one listed token (Q_rest = 0): the floor keeps the KL finite.
/// let expect = 0.5 * 0.5f64.ln() + 0.5 * (0.5f64.ln() - TOPK_KL_REST_FLOOR.ln());
/// assert!((topk_kl(&[0.5f64.ln()], &[0.0]) - expect).abs() < 1e-12);
/// ```
pub const TOPK_KL_REST_FLOOR: f64 = 1e-12;

/// Which per-token divergence to compute. Serialized as configs spell it
/// (`"binary_tv"`, `"binary_kl"`, `"topk_tv"`, `"topk_kl"`, `"k2"`, `"k3"`).
///
/// ```
/// use cppo::Divergence;
/// assert_eq!(Divergence::default(), Divergence::BinaryTv);
/// assert_eq!(cppo::Config::cppo().divergence, Divergence::BinaryTv);
/// assert!(Divergence::TopkKl.needs_topk() && !Divergence::K3.needs_probs());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Divergence {
    /// |p − q| on the sampled token: DPPO's binary total-variation estimator.
    #[default]
    BinaryTv,
    /// KL(Bernoulli(q) ‖ Bernoulli(p)) on the sampled token: DPPO's binary KL estimator.
    BinaryKl,
    /// Total variation over the rollout policy's top-K tokens plus a rest bucket.
    TopkTv,
    /// KL(μ ‖ π) over the rollout policy's top-K tokens plus a rest bucket.
    TopkKl,
    /// ½ (log ρ)²: the k2 estimator of KL on the sampled token (TRM's `seq_max_k2`).
    K2,
    /// ρ − 1 − log ρ: the k3 estimator of KL on the sampled token (TRM's `seq_mean_k3`).
    K3,
}

impl Divergence {
    /// Whether this divergence reads p = e^logp and q = e^logp_old (the binary forms).
    ///
    /// ```
    /// use cppo::Divergence;
    /// assert!(Divergence::BinaryTv.needs_probs() && Divergence::BinaryKl.needs_probs());
    /// assert!(!Divergence::K2.needs_probs() && !Divergence::TopkTv.needs_probs());
    /// ```
    pub const fn needs_probs(self) -> bool {
        matches!(self, Self::BinaryTv | Self::BinaryKl)
    }

    /// Whether this divergence needs the top-K pair `topk_logp_old`, `topk_logp`.
    ///
    /// ```
    /// use cppo::Divergence;
    /// assert!(Divergence::TopkTv.needs_topk() && Divergence::TopkKl.needs_topk());
    /// assert!(!Divergence::BinaryTv.needs_topk());
    /// ```
    pub const fn needs_topk(self) -> bool {
        matches!(self, Self::TopkTv | Self::TopkKl)
    }

    /// The name used in configs and messages.
    ///
    /// ```
    /// use cppo::Divergence;
    /// assert_eq!(Divergence::TopkKl.name(), "topk_kl");
    /// assert_eq!(Divergence::K3.name(), "k3");
    /// ```
    pub const fn name(self) -> &'static str {
        match self {
            Self::BinaryTv => "binary_tv",
            Self::BinaryKl => "binary_kl",
            Self::TopkTv => "topk_tv",
            Self::TopkKl => "topk_kl",
            Self::K2 => "k2",
            Self::K3 => "k3",
        }
    }
}

/// The k2 estimator ½ r², r = clamp(logp − logp_old, −20, 20).
///
/// ```
/// let r = 0.5f64.ln() - 0.4f64.ln();
/// assert!((cppo::divergence::k2(0.5f64.ln(), 0.4f64.ln()) - r * r / 2.0).abs() < 1e-15);
/// ```
#[inline]
pub fn k2(logp: f64, logp_old: f64) -> f64 {
    let r = crate::objective::ratio(logp, logp_old).1;
    0.5 * r * r
}

/// The k3 estimator max(0, ρ − 1 − r), r = clamp(logp − logp_old, −20, 20), ρ = eʳ.
///
/// ```
/// let k = cppo::divergence::k3(0.5f64.ln(), 0.4f64.ln());
/// let r = (0.5f64 / 0.4).ln();
/// assert!((k - (1.25 - 1.0 - r)).abs() < 1e-15);
/// ```
#[inline]
pub fn k3(logp: f64, logp_old: f64) -> f64 {
    let (rho, r) = crate::objective::ratio(logp, logp_old);
    ((rho - 1.0) - r).max(0.0)
}

/// Binary total variation |exp(logp) − exp(logp_old)|.
///
/// ```
/// assert_eq!(cppo::divergence::binary_tv(0.0, 0.0), 0.0);
/// assert!((cppo::divergence::binary_tv(0.5f64.ln(), 0.4f64.ln()) - 0.1).abs() < 1e-15);
/// ```
#[inline]
pub fn binary_tv(logp: f64, logp_old: f64) -> f64 {
    (logp.exp() - logp_old.exp()).abs()
}

/// Binary KL of Bernoulli(q) from Bernoulli(p), q = exp(logp_old), p = exp(logp), with
/// the reference code's 1e-8 guard on the rest masses, clamped at 0.
///
/// ```
/// // Both probabilities 1: the guard makes the rest term log(1e-8 / 1e-8) = 0.
/// assert_eq!(cppo::divergence::binary_kl(0.0, 0.0), 0.0);
/// ```
#[inline]
pub fn binary_kl(logp: f64, logp_old: f64) -> f64 {
    let p = logp.exp();
    let q = logp_old.exp();
    binary_kl_from_probs(logp, logp_old, p, q)
}

/// [`binary_kl`] with the probabilities already at hand.
#[inline(always)]
pub(crate) fn binary_kl_from_probs(logp: f64, logp_old: f64, p: f64, q: f64) -> f64 {
    binary_kl_from_parts(logp, logp_old, q, binary_kl_rest_ratio(p, q).ln())
}

/// The argument of the logarithm in binary KL's second term, (1 − q + ε)/(1 − p + ε).
#[inline(always)]
pub(crate) fn binary_kl_rest_ratio(p: f64, q: f64) -> f64 {
    (1.0 - q + BINARY_KL_GUARD) / (1.0 - p + BINARY_KL_GUARD)
}

/// Binary KL from the log-probs, q, and the logarithm of [`binary_kl_rest_ratio`] (the
/// fused kernel takes that logarithm for a block of tokens at once).
#[inline(always)]
pub(crate) fn binary_kl_from_parts(logp: f64, logp_old: f64, q: f64, ln_ratio: f64) -> f64 {
    let head = q * (logp_old - logp);
    let rest = (1.0 - q) * ln_ratio;
    (head + rest).max(0.0)
}

/// Top-K total variation from the rollout policy's top-K log-probs and the current
/// policy's log-probs of the same tokens.
///
/// # Panics
///
/// If the two slices differ in length (a bug in the caller: batches check this).
///
/// ```
/// use cppo::divergence::topk_tv;
/// // Same distribution: 0. Mass moved from one token to another: half the L1 distance.
/// let old = [0.5f64.ln(), 0.3f64.ln()];
/// assert_eq!(topk_tv(&old, &old), 0.0);
/// let new = [0.3f64.ln(), 0.5f64.ln()];
/// assert!((topk_tv(&old, &new) - 0.2).abs() < 1e-15);
/// ```
pub fn topk_tv(topk_logp_old: &[f64], topk_logp: &[f64]) -> f64 {
    assert_eq!(topk_logp_old.len(), topk_logp.len(), "top-K widths differ");
    topk_tv_pairs(
        topk_logp_old.iter().copied().zip(topk_logp.iter().copied()),
        f64::exp,
    )
}

/// Top-K KL(μ ‖ π) from the rollout policy's top-K log-probs and the current policy's
/// log-probs of the same tokens.
///
/// # Panics
///
/// If the two slices differ in length (a bug in the caller: batches check this).
///
/// ```
/// use cppo::divergence::topk_kl;
/// // The K tokens hold all the mass (P_rest = 0): the rest term vanishes.
/// let old = [0.75f64.ln(), 0.25f64.ln()];
/// let new = [0.5f64.ln(), 0.5f64.ln()];
/// let expect = 0.75 * (0.75f64 / 0.5).ln() + 0.25 * (0.25f64 / 0.5).ln();
/// assert!((topk_kl(&old, &new) - expect).abs() < 1e-15);
/// ```
pub fn topk_kl(topk_logp_old: &[f64], topk_logp: &[f64]) -> f64 {
    assert_eq!(topk_logp_old.len(), topk_logp.len(), "top-K widths differ");
    topk_kl_pairs(
        topk_logp_old.iter().copied().zip(topk_logp.iter().copied()),
        f64::exp,
    )
}

/// Top-K TV from (log P_k, log Q_k) pairs.
#[inline]
pub(crate) fn topk_tv_pairs(
    pairs: impl Iterator<Item = (f64, f64)>,
    exp: impl Fn(f64) -> f64,
) -> f64 {
    let (mut l1, mut sum_p, mut sum_q) = (0.0, 0.0, 0.0);
    for (lp_old, lp_new) in pairs {
        let pk = exp(lp_old);
        let qk = exp(lp_new);
        l1 += (pk - qk).abs();
        sum_p += pk;
        sum_q += qk;
    }
    let p_rest = (1.0 - sum_p).max(0.0);
    let q_rest = (1.0 - sum_q).max(0.0);
    (l1 + (p_rest - q_rest).abs()) / 2.0
}

/// Top-K KL from (log P_k, log Q_k) pairs.
#[inline]
pub(crate) fn topk_kl_pairs(
    pairs: impl Iterator<Item = (f64, f64)>,
    exp: impl Fn(f64) -> f64,
) -> f64 {
    let (mut head, mut sum_p, mut sum_q) = (0.0, 0.0, 0.0);
    for (lp_old, lp_new) in pairs {
        let pk = exp(lp_old);
        head += pk * (lp_old - lp_new);
        sum_p += pk;
        sum_q += exp(lp_new);
    }
    let p_rest = (1.0 - sum_p).max(0.0);
    let q_rest = (1.0 - sum_q).max(0.0);
    let rest = if p_rest > 0.0 {
        p_rest * (p_rest.ln() - q_rest.max(TOPK_KL_REST_FLOOR).ln())
    } else {
        0.0
    };
    (head + rest).max(0.0)
}
