//! Advantage estimators: GRPO, Dr. GRPO, RLOO, REINFORCE++ and GAE, with verl's
//! conventions, so that numbers carry over from Python trainers.
//!
//! The trust regions of this crate take the advantages as given. This module computes
//! them from what a rollout produces: one score per sequence and the prompt each sequence
//! answers (the group estimators), or rewards per token (REINFORCE++), plus a critic's
//! values (GAE), together with the response mask.
//!
//! | estimator | input | output | source |
//! |---|---|---|---|
//! | [`grpo`] with [`GroupNorm::GRPO`] | scores (B,), groups (B,) | (B,) | Shao et al. 2024 |
//! | [`grpo`] with [`GroupNorm::DR_GRPO`] | scores (B,), groups (B,) | (B,) | Liu et al. 2025 |
//! | [`rloo`] | scores (B,), groups (B,) | (B,) | Kool et al. 2019; Ahmadian et al. 2024 |
//! | [`reinforce_pp`] | token rewards (B, L), mask | (B, L) | Hu 2025 |
//! | [`gae`] ([`gae_raw`]) | token rewards, values (B, L), mask | (B, L) twice | Schulman et al. 2016 |
//! | [`whiten`] | x (B, L), mask | (B, L) | verl's `masked_whiten` |
//!
//! The per-row outputs (B,) go straight into a [`Batch`](crate::Batch), which broadcasts
//! them along each row ([`Advantages::PerRow`](crate::Advantages::PerRow)).
//!
//! ```
//! use cppo::advantage::{grpo, GroupNorm};
//! use cppo::ndarray::{array, Array1};
//! use cppo::{evaluate, Batch, Config, Par};
//!
//! // Two prompts, two samples each; pass/fail rewards.
//! let scores = [1.0, 0.0, 1.0, 1.0];
//! let groups = [0, 0, 1, 1];
//! let adv = Array1::from(grpo(&scores, &groups, GroupNorm::GRPO)?);
//! // Prompt 0: mean 0.5, σ = √0.5; prompt 1: all equal, so exactly 0.
//! assert!((adv[0] - 0.5 / (0.5f64.sqrt() + 1e-6)).abs() < 1e-15);
//! assert_eq!(adv[2], 0.0);
//!
//! let logp = array![[-0.2, -1.0], [-0.3, -0.9], [-0.5, -0.1], [-0.4, -0.4]];
//! let mask = array![[true, true], [true, false], [true, true], [true, true]];
//! let batch = Batch::new(&logp, &logp, &adv, &mask)?; // (B,) advantages, broadcast
//! let eval = evaluate(&Config::cppo(), &batch, Par::Seq)?;
//! assert_eq!(eval.outputs.grad.dim(), (4, 2));
//! # Ok::<(), cppo::Error>(())
//! ```
//!
//! ## Formulas
//!
//! A *group* is the set of rows with the same prompt id `groups[i]`; its rows need not be
//! adjacent. For a group of G scores r_1, …, r_G, with mean r̄ = (1/G) Σ_j r_j:
//!
//! - **GRPO** (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical
//!   Reasoning in Open Language Models", arXiv 2402.03300, section 4.1.2, outcome
//!   supervision):
//!
//!   A_i = (r_i − r̄) / (σ + ε), with σ = √( Σ_j (r_j − r̄)² / (G − 1) ),
//!
//!   or / G instead of / (G − 1) with `unbiased_std: false`. verl uses `torch.std`, which
//!   is the unbiased (G − 1) form, and ε = 1e-6: [`GroupNorm::GRPO`].
//! - **Dr. GRPO** (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
//!   Perspective", arXiv 2503.20783): the division by σ is dropped, as it weights
//!   questions by their difficulty:
//!
//!   A_i = r_i − r̄. ([`GroupNorm::DR_GRPO`]; verl's `norm_adv_by_std_in_grpo = False`.)
//! - **RLOO** (Kool, van Hoof and Welling 2019, "Buy 4 REINFORCE Samples, Get a Baseline
//!   for Free!", ICLR workshop; Ahmadian et al. 2024, "Back to Basics: Revisiting
//!   REINFORCE Style Optimization for Learning from Human Feedback in LLMs", ACL, arXiv
//!   2402.14740): each sample's baseline is the mean of the *other* samples:
//!
//!   A_i = r_i − (1/(G − 1)) Σ_{j≠i} r_j = G/(G − 1) · (r_i − r̄).
//! - **REINFORCE++** (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning
//!   Large Language Models", arXiv 2501.03262): the discounted return over the response
//!   tokens, whitened over the whole batch:
//!
//!   G_t = Σ_{k ≥ t} γ^(k−t) r_k (over response tokens only, see below),
//!   A = whiten(G).
//! - **GAE** (Schulman, Moritz, Levine, Jordan and Abbeel 2016, "High-Dimensional
//!   Continuous Control Using Generalized Advantage Estimation", ICLR, arXiv 1506.02438):
//!
//!   δ_t = r_t + γ V_{t+1} − V_t, A_t = δ_t + γλ A_{t+1}, R_t = A_t + V_t,
//!
//!   with V and A after the last response token taken as 0 (the response is the end of
//!   the episode). [`gae`] returns whiten(A) and R, as verl (and TRL before it) does;
//!   [`gae_raw`] returns A and R.
//! - **Whitening** (verl's `masked_whiten`), over the N response tokens of the whole
//!   batch:
//!
//!   μ = (1/N) Σ x, σ² = Σ (x − μ)² / (N − 1), x̂ = (x − μ) / √(σ² + 10⁻⁸).
//!
//! verl's REINFORCE++-baseline is a composition of the above: Dr. GRPO's group-centred
//! scores, broadcast over the mask, then [`whiten`].
//!
//! ## Decisions on edge cases
//!
//! - **A group of one.** As in verl, its mean is taken as 0 and its σ as 1: GRPO gives
//!   r / (1 + ε), Dr. GRPO gives r, RLOO gives r (verl leaves the score as is). A lone
//!   sample thus gets a REINFORCE gradient without a baseline; drop such rows before the
//!   call if that is not wanted. The same holds for `unbiased_std: false`.
//! - **All-equal scores in a group.** The mean is computed around the group's first score,
//!   r̄ = r_1 + (1/G) Σ_j (r_j − r_1), so equal scores give deviations of exactly 0, and
//!   advantages of exactly 0 with any ε, ε = 0 included (never 0/0).
//! - **σ is computed with scaling** by the largest |r_j − r̄| (as `hypot` does), so it
//!   neither overflows nor underflows to 0 while some deviation is nonzero; whitening
//!   scales the same way. Results agree with verl's to rounding (whitened values below
//!   about 10⁻¹⁵⁰, from deviations below 10⁻¹⁵⁴, may come out as 0).
//! - **Masked positions are never read**: rewards and values there may hold NaN or
//!   garbage. Every (B, L) output is 0 there (verl multiplies by the mask too; its GAE
//!   returns hold carried values there, which no loss reads).
//! - **Holes in the mask** (tool outputs or observations in multi-turn rollouts) are
//!   skipped, as verl's GAE skips them: the "next" token of a response token is the next
//!   *response* token of its row, γ is applied once per response-token step, and a reward
//!   or value at a masked position is ignored. verl's REINFORCE++ instead resets its
//!   running return at every masked position ("reset after EOS"), so a reward after a
//!   hole would not reach the tokens before it; here it does. For masks without holes
//!   (trailing padding, verl's layout) both give the same numbers.
//! - **Empty rows** (no response token) get 0 everywhere and do not enter the batch
//!   statistics of whitening.
//! - **Whitening** of zero response tokens gives all zeros; of one token, 0 (x − μ is 0;
//!   verl raises an error for both). All-equal values give exactly 0, as above.
//! - **Validation**: γ and λ must lie in [0, 1], ε must be finite and ≥ 0
//!   ([`Error::InvalidConfig`]); array lengths and shapes must agree
//!   ([`Error::ShapeMismatch`]); scores, and rewards and values at response positions,
//!   must be finite ([`Error::NonFinite`], the first bad value in row-major order,
//!   rewards before values within a token; a (B,) array reports column 0). Parameters
//!   are checked first, then shapes, then values.
//! - **Overflow**: valid inputs can only give a non-finite result when the f64
//!   arithmetic overflows (scores or returns around 10³⁰⁷); that is reported as
//!   [`Error::NonFinite`] on the output (`advantages`, `returns` or `whitened`), never
//!   returned as inf or NaN.
//!
//! ## Cost
//!
//! Each call is one or two sequential passes over its inputs, O(B·L), in a fixed order, so
//! results are deterministic. There are no `*_into` variants or a `Par` argument: an
//! advantage estimate runs once per rollout batch, not once per micro-batch, and costs
//! little next to the loss.

use std::collections::HashMap;

use ndarray::{Array2, ArrayView2, Zip};

use crate::error::{At, Error, Result};

/// The 10⁻⁸ added to the variance by [`whiten`], as verl's `masked_whiten`.
///
/// ```
/// use cppo::advantage::{whiten, WHITEN_EPS};
/// use cppo::ndarray::array;
/// // Two values 1 apart: σ² = 0.5, so each sits at ±0.5 / √(0.5 + ε).
/// let w = whiten(array![[0.0, 1.0]].view(), array![[true, true]].view())?;
/// assert!((w[[0, 1]] - 0.5 / (0.5 + WHITEN_EPS).sqrt()).abs() < 1e-15);
/// # Ok::<(), cppo::Error>(())
/// ```
pub const WHITEN_EPS: f64 = 1e-8;

/// Options of the group-normalized estimators ([`grpo`]).
///
/// A plain config: build it from a preset, or with a struct literal, or deserialize it
/// (unknown fields are an error); [`grpo`] calls [`validate`](Self::validate).
///
/// ```
/// use cppo::advantage::GroupNorm;
/// let norm = GroupNorm { eps: 1e-4, ..GroupNorm::GRPO }; // TRL's ε
/// norm.validate()?;
/// assert_eq!(GroupNorm::default(), GroupNorm::GRPO);
/// assert!(GroupNorm { eps: -1.0, ..norm }.validate().is_err());
/// # Ok::<(), cppo::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupNorm {
    /// Divide the centred scores by the group's standard deviation plus `eps` (GRPO); if
    /// false, only centre them (Dr. GRPO).
    pub scale_by_std: bool,
    /// The standard deviation with Bessel's correction, √(Σ (r − r̄)² / (G − 1)), as
    /// `torch.std` and verl; if false, / G. Unused without `scale_by_std`.
    pub unbiased_std: bool,
    /// Added to the standard deviation before dividing; finite and ≥ 0. Unused without
    /// `scale_by_std`.
    pub eps: f64,
}

impl GroupNorm {
    /// GRPO as in verl (`norm_adv_by_std_in_grpo = True`): scaled by the unbiased standard
    /// deviation plus ε = 1e-6.
    ///
    /// ```
    /// use cppo::advantage::{grpo, GroupNorm};
    /// // mean 2, σ = √((1 + 0 + 1) / 2) = 1
    /// let a = grpo(&[1.0, 2.0, 3.0], &[0, 0, 0], GroupNorm::GRPO)?;
    /// assert_eq!(a, [-1.0 / (1.0 + 1e-6), 0.0, 1.0 / (1.0 + 1e-6)]);
    /// # Ok::<(), cppo::Error>(())
    /// ```
    pub const GRPO: Self = Self {
        scale_by_std: true,
        unbiased_std: true,
        eps: 1e-6,
    };

    /// Dr. GRPO (verl's `norm_adv_by_std_in_grpo = False`): centred, not scaled. The other
    /// fields are GRPO's, so that flipping `scale_by_std` alone gives [`GRPO`](Self::GRPO).
    ///
    /// ```
    /// use cppo::advantage::{grpo, GroupNorm};
    /// let a = grpo(&[1.0, 2.0, 6.0], &[0, 0, 0], GroupNorm::DR_GRPO)?;
    /// assert_eq!(a, [-2.0, -1.0, 3.0]);
    /// # Ok::<(), cppo::Error>(())
    /// ```
    pub const DR_GRPO: Self = Self {
        scale_by_std: false,
        ..Self::GRPO
    };

    /// Checks that `eps` is finite and ≥ 0.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] with field `eps`.
    ///
    /// ```
    /// use cppo::advantage::GroupNorm;
    /// use cppo::Error;
    /// let bad = GroupNorm { eps: f64::NAN, ..GroupNorm::GRPO };
    /// assert!(matches!(bad.validate(), Err(Error::InvalidConfig { field: "eps", .. })));
    /// ```
    pub fn validate(&self) -> Result<()> {
        if self.eps.is_finite() && self.eps >= 0.0 {
            Ok(())
        } else {
            Err(Error::InvalidConfig {
                field: "eps",
                reason: format!("must be finite and >= 0, got {}", self.eps),
            })
        }
    }
}

impl Default for GroupNorm {
    /// [`GroupNorm::GRPO`].
    fn default() -> Self {
        Self::GRPO
    }
}

/// GRPO or Dr. GRPO advantages: one per row, from one score per row and its group id.
///
/// `groups[i]` is the prompt id of row i; rows of a group need not be adjacent. A group of
/// one gets mean 0 and σ 1, as in verl. See the [module docs](self) for the formulas and
/// the edge cases. verl's `scores` are its token-level rewards summed over each row.
///
/// # Errors
///
/// - [`Error::InvalidConfig`]: `norm.eps` is negative or not finite.
/// - [`Error::ShapeMismatch`]: `groups` and `scores` differ in length.
/// - [`Error::NonFinite`]: a score is NaN or infinite (array `scores`, at column 0), or an
///   advantage overflows (array `advantages`).
///
/// ```
/// use cppo::advantage::{grpo, GroupNorm};
/// // Two prompts, interleaved: prompt 7 has scores 1, 2, 3 (mean 2, σ 1),
/// // prompt 9 has scores 5, 3 (mean 4, σ √2).
/// let scores = [1.0, 5.0, 2.0, 3.0, 3.0];
/// let groups = [7, 9, 7, 9, 7];
/// let a = grpo(&scores, &groups, GroupNorm { eps: 0.0, ..GroupNorm::GRPO })?;
/// let s2 = 2f64.sqrt();
/// assert_eq!(a, [-1.0, 1.0 / s2, 0.0, -1.0 / s2, 1.0]);
/// # Ok::<(), cppo::Error>(())
/// ```
pub fn grpo(scores: &[f64], groups: &[u64], norm: GroupNorm) -> Result<Vec<f64>> {
    norm.validate()?;
    let ddof = usize::from(norm.unbiased_std);
    per_group(scores, groups, |xs| {
        if xs.len() == 1 {
            // verl: mean 0, std 1.
            if norm.scale_by_std {
                xs[0] /= 1.0 + norm.eps;
            }
            return;
        }
        centre(xs);
        if norm.scale_by_std {
            scale_by_std(xs, ddof, norm.eps);
        }
    })
}

/// RLOO advantages: each row's score minus the mean of the other scores of its group.
///
/// A_i = r_i − (1/(G − 1)) Σ_{j≠i} r_j = G/(G − 1) · (r_i − r̄). A group of one keeps its
/// score, as in verl. See the [module docs](self).
///
/// # Errors
///
/// - [`Error::ShapeMismatch`]: `groups` and `scores` differ in length.
/// - [`Error::NonFinite`]: a score is NaN or infinite (array `scores`, at column 0), or an
///   advantage overflows (array `advantages`).
///
/// ```
/// use cppo::advantage::rloo;
/// // Scores 1, 2, 3, 6: the leave-one-out baselines are 11/3, 10/3, 3 and 2.
/// let a = rloo(&[1.0, 2.0, 3.0, 6.0, 0.5], &[0, 0, 0, 0, 1])?;
/// let want = [1.0 - 11.0 / 3.0, 2.0 - 10.0 / 3.0, 0.0, 4.0, 0.5];
/// assert!(a.iter().zip(want).all(|(a, w)| (a - w).abs() < 1e-15));
/// # Ok::<(), cppo::Error>(())
/// ```
pub fn rloo(scores: &[f64], groups: &[u64]) -> Result<Vec<f64>> {
    per_group(scores, groups, |xs| {
        let g = xs.len();
        if g == 1 {
            return;
        }
        centre(xs);
        let k = g as f64 / (g - 1) as f64;
        xs.iter_mut().for_each(|x| *x *= k);
    })
}

/// REINFORCE++ advantages: the discounted returns over the response tokens
/// ([`discounted_returns`]), whitened over the whole batch ([`whiten`]).
///
/// Outcome rewards sit at each row's last response token (verl's `token_level_rewards`);
/// per-token KL penalties, if any, are already subtracted. The output is 0 at masked
/// positions. See the [module docs](self) for holes and empty rows.
///
/// # Errors
///
/// - [`Error::InvalidConfig`]: `gamma` not in [0, 1].
/// - [`Error::ShapeMismatch`]: `mask` is not the shape of `token_rewards`.
/// - [`Error::NonFinite`]: a reward at a response position is NaN or infinite (array
///   `token_rewards`), or the arithmetic overflows (`returns`, `advantages`).
///
/// ```
/// use cppo::advantage::{reinforce_pp, WHITEN_EPS};
/// use cppo::ndarray::array;
/// // γ = 1: returns 1, 1, 1 and -1, -1 (the third slot of row 1 is padding).
/// // Over the 5 tokens: mean 0.2, deviations 0.8 (×3) and -1.2 (×2),
/// // σ² = (3 · 0.64 + 2 · 1.44) / 4 = 1.2.
/// let rewards = array![[0.0, 0.0, 1.0], [0.0, -1.0, f64::NAN]];
/// let mask = array![[true, true, true], [true, true, false]];
/// let a = reinforce_pp(rewards.view(), mask.view(), 1.0)?;
/// let s = (1.2 + WHITEN_EPS).sqrt();
/// assert!((a[[0, 0]] - 0.8 / s).abs() < 1e-12);
/// assert!((a[[1, 1]] + 1.2 / s).abs() < 1e-12);
/// assert_eq!(a[[1, 2]], 0.0);
/// # Ok::<(), cppo::Error>(())
/// ```
pub fn reinforce_pp(
    token_rewards: ArrayView2<f64>,
    mask: ArrayView2<bool>,
    gamma: f64,
) -> Result<Array2<f64>> {
    let returns = discounted_returns(token_rewards, mask, gamma)?;
    whiten_as(returns.view(), mask, "advantages")
}

/// Discounted returns over the response tokens, REINFORCE++ before whitening:
/// G_t = r_t + γ G_{t'}, with t' the row's next response token (G = 0 after the last).
///
/// Masked positions are skipped (their rewards are ignored, γ is not applied across them)
/// and are 0 in the output.
///
/// # Errors
///
/// As [`reinforce_pp`], without the whitening.
///
/// ```
/// use cppo::advantage::discounted_returns;
/// use cppo::ndarray::array;
/// // γ = 0.5; column 1 is a hole (a tool output), skipped: G_3 = 1, G_2 = 0.5, G_0 = 0.25.
/// let rewards = array![[0.0, 9.0, 0.0, 1.0]];
/// let mask = array![[true, false, true, true]];
/// let g = discounted_returns(rewards.view(), mask.view(), 0.5)?;
/// assert_eq!(g, array![[0.25, 0.0, 0.5, 1.0]]);
/// # Ok::<(), cppo::Error>(())
/// ```
pub fn discounted_returns(
    token_rewards: ArrayView2<f64>,
    mask: ArrayView2<bool>,
    gamma: f64,
) -> Result<Array2<f64>> {
    check_unit("gamma", gamma)?;
    check_shape("mask", "token_rewards", token_rewards.dim(), mask.dim())?;
    check_values(mask, &[("token_rewards", token_rewards)])?;
    let mut out = Array2::zeros(token_rewards.dim());
    Zip::from(out.rows_mut())
        .and(token_rewards.rows())
        .and(mask.rows())
        .for_each(|mut o, r, m| {
            let mut running = 0.0;
            for ((o, &r), &m) in o.iter_mut().rev().zip(r.iter().rev()).zip(m.iter().rev()) {
                if m {
                    running = r + gamma * running;
                    *o = running;
                }
            }
        });
    check_output(out.view(), "returns")?;
    Ok(out)
}

/// GAE advantages and returns, with the advantages whitened over the batch, as verl's
/// `compute_gae_advantage_return` (and TRL's PPO): returns `(whiten(A), A + V)`.
///
/// See [`gae_raw`] for A before whitening, and the [module docs](self) for the formulas,
/// holes and empty rows. Both outputs are 0 at masked positions.
///
/// # Errors
///
/// - [`Error::InvalidConfig`]: `gamma` or `lam` not in [0, 1].
/// - [`Error::ShapeMismatch`]: `values` or `mask` is not the shape of `token_rewards`.
/// - [`Error::NonFinite`]: a reward or value at a response position is NaN or infinite
///   (array `token_rewards` or `values`), or the arithmetic overflows (`advantages`,
///   `returns`).
///
/// ```
/// use cppo::advantage::{gae, gae_raw};
/// use cppo::ndarray::array;
/// let rewards = array![[0.0, 0.0, 1.0], [0.0, 0.5, 0.0]];
/// let values = array![[0.5, 0.6, 0.8], [0.1, 0.2, f64::NAN]];
/// let mask = array![[true, true, true], [true, true, false]];
/// let (adv, ret) = gae(rewards.view(), values.view(), mask.view(), 0.9, 0.8)?;
/// let (raw, ret_raw) = gae_raw(rewards.view(), values.view(), mask.view(), 0.9, 0.8)?;
/// assert_eq!(ret, ret_raw);
/// // Whitening keeps the order of the advantages.
/// assert_eq!(adv[[0, 0]] < adv[[0, 1]], raw[[0, 0]] < raw[[0, 1]]);
/// assert_eq!((adv[[1, 2]], ret[[1, 2]]), (0.0, 0.0));
/// # Ok::<(), cppo::Error>(())
/// ```
pub fn gae(
    token_rewards: ArrayView2<f64>,
    values: ArrayView2<f64>,
    mask: ArrayView2<bool>,
    gamma: f64,
    lam: f64,
) -> Result<(Array2<f64>, Array2<f64>)> {
    let (adv, returns) = gae_raw(token_rewards, values, mask, gamma, lam)?;
    Ok((whiten_as(adv.view(), mask, "advantages")?, returns))
}

/// GAE advantages and returns, without whitening: `(A, A + V)`.
///
/// δ_t = r_t + γ V_{t'} − V_t and A_t = δ_t + γλ A_{t'}, with t' the row's next response
/// token (V and A are 0 after the last one: the response ends the episode). With λ = 1,
/// A_t is the discounted return minus V_t; with λ = 0, the TD error δ_t.
///
/// # Errors
///
/// As [`gae`].
///
/// ```
/// use cppo::advantage::gae_raw;
/// use cppo::ndarray::array;
/// // γ = 0.9, λ = 0.8, so γλ = 0.72:
/// // t = 2: δ = 1 − 0.8 = 0.2,                     A = 0.2
/// // t = 1: δ = 0.9 · 0.8 − 0.6 = 0.12,            A = 0.12 + 0.72 · 0.2 = 0.264
/// // t = 0: δ = 0.9 · 0.6 − 0.5 = 0.04,            A = 0.04 + 0.72 · 0.264 = 0.23008
/// let rewards = array![[0.0, 0.0, 1.0]];
/// let values = array![[0.5, 0.6, 0.8]];
/// let mask = array![[true, true, true]];
/// let (a, r) = gae_raw(rewards.view(), values.view(), mask.view(), 0.9, 0.8)?;
/// for (got, want) in a.iter().zip([0.23008, 0.264, 0.2]) {
///     assert!((got - want).abs() < 1e-12);
/// }
/// for (got, want) in r.iter().zip([0.73008, 0.864, 1.0]) {
///     assert!((got - want).abs() < 1e-12);
/// }
/// # Ok::<(), cppo::Error>(())
/// ```
pub fn gae_raw(
    token_rewards: ArrayView2<f64>,
    values: ArrayView2<f64>,
    mask: ArrayView2<bool>,
    gamma: f64,
    lam: f64,
) -> Result<(Array2<f64>, Array2<f64>)> {
    check_unit("gamma", gamma)?;
    check_unit("lam", lam)?;
    let dim = token_rewards.dim();
    check_shape("values", "token_rewards", dim, values.dim())?;
    check_shape("mask", "token_rewards", dim, mask.dim())?;
    check_values(
        mask,
        &[("token_rewards", token_rewards), ("values", values)],
    )?;
    let mut adv = Array2::zeros(dim);
    let mut ret = Array2::zeros(dim);
    let gl = gamma * lam;
    Zip::from(adv.rows_mut())
        .and(ret.rows_mut())
        .and(token_rewards.rows())
        .and(values.rows())
        .and(mask.rows())
        .for_each(|mut a, mut rt, r, v, m| {
            let (mut next_v, mut last) = (0.0, 0.0);
            let rev = a
                .iter_mut()
                .rev()
                .zip(rt.iter_mut().rev())
                .zip(r.iter().rev())
                .zip(v.iter().rev())
                .zip(m.iter().rev());
            for ((((a, rt), &r), &v), &m) in rev {
                if m {
                    let delta = r + gamma * next_v - v;
                    last = delta + gl * last;
                    next_v = v;
                    *a = last;
                    *rt = last + v;
                }
            }
        });
    check_output(adv.view(), "advantages")?;
    check_output(ret.view(), "returns")?;
    Ok((adv, ret))
}

/// Masked batch whitening, verl's `masked_whiten`: over the N response tokens of the
/// whole batch, x̂ = (x − μ) / √(σ² + 10⁻⁸) with σ² = Σ (x − μ)² / (N − 1).
///
/// REINFORCE++'s last step, and GAE's in verl. Masked positions are not read and are 0 in
/// the output. N = 0 gives all zeros, N = 1 gives 0 (verl raises an error for both), and
/// all-equal values give exactly 0.
///
/// # Errors
///
/// - [`Error::ShapeMismatch`]: `mask` is not the shape of `x`.
/// - [`Error::NonFinite`]: a value at a response position is NaN or infinite (array `x`),
///   or the arithmetic overflows (`whitened`).
///
/// ```
/// use cppo::advantage::{whiten, WHITEN_EPS};
/// use cppo::ndarray::array;
/// // Response tokens 1, 2, 3: mean 2, σ² = (1 + 0 + 1) / 2 = 1.
/// let x = array![[1.0, 2.0], [3.0, f64::NAN]];
/// let mask = array![[true, true], [true, false]];
/// let w = whiten(x.view(), mask.view())?;
/// let s = (1.0 + WHITEN_EPS).sqrt();
/// assert_eq!(w, array![[-1.0 / s, 0.0], [1.0 / s, 0.0]]);
/// # Ok::<(), cppo::Error>(())
/// ```
pub fn whiten(x: ArrayView2<f64>, mask: ArrayView2<bool>) -> Result<Array2<f64>> {
    check_shape("mask", "x", x.dim(), mask.dim())?;
    check_values(mask, &[("x", x)])?;
    whiten_as(x, mask, "whitened")
}

/// [`whiten`] of values already checked, naming the output `name` in overflow errors.
fn whiten_as(
    x: ArrayView2<f64>,
    mask: ArrayView2<bool>,
    name: &'static str,
) -> Result<Array2<f64>> {
    let mut out = Array2::zeros(x.dim());
    let on = || {
        x.iter()
            .zip(mask.iter())
            .filter(|&(_, &m)| m)
            .map(|(&x, _)| x)
    };
    let Some(x0) = on().next() else {
        return Ok(out);
    };
    let (n, sum) = on().fold((0usize, 0.0), |(n, s), x| (n + 1, s + (x - x0)));
    let shift = sum / n as f64;
    let dev = |x: f64| (x - x0) - shift;
    let m = on().fold(0.0f64, |m, x| m.max(dev(x).abs()));
    if n < 2 || m == 0.0 {
        return Ok(out);
    }
    // σ² = m² q, and (x − μ) / √(m² q + ε) = (d/m) / √(q + ε/m²): no overflow of d², nor
    // underflow of σ to 0 while some d ≠ 0.
    let q = on().map(|x| (dev(x) / m).powi(2)).sum::<f64>() / (n - 1) as f64;
    let denom = (q + WHITEN_EPS / m / m).sqrt();
    Zip::from(&mut out).and(x).and(mask).for_each(|o, &x, &on| {
        if on {
            *o = dev(x) / m / denom;
        }
    });
    check_output(out.view(), name)?;
    Ok(out)
}

/// Checks lengths and scores, gathers each group's scores (rows in order), lets `f`
/// rewrite them into advantages, and scatters them back.
fn per_group(scores: &[f64], groups: &[u64], mut f: impl FnMut(&mut [f64])) -> Result<Vec<f64>> {
    if groups.len() != scores.len() {
        return Err(Error::ShapeMismatch {
            array: "groups",
            expected: format!("({},), as scores", scores.len()),
            got: vec![groups.len()],
        });
    }
    if let Some((i, &x)) = scores.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(Error::NonFinite {
            array: "scores",
            at: At::new(i, 0),
            value: x,
        });
    }
    // Rows of each group, groups numbered in order of first appearance.
    let mut index: HashMap<u64, usize> = HashMap::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    for (i, &g) in groups.iter().enumerate() {
        let k = *index.entry(g).or_insert_with(|| {
            members.push(Vec::new());
            members.len() - 1
        });
        members[k].push(i);
    }
    let mut out = vec![0.0; scores.len()];
    let mut buf = Vec::new();
    for rows in &members {
        buf.clear();
        buf.extend(rows.iter().map(|&i| scores[i]));
        f(&mut buf);
        for (&i, &a) in rows.iter().zip(&buf) {
            out[i] = a;
        }
    }
    if let Some((i, &a)) = out.iter().enumerate().find(|(_, a)| !a.is_finite()) {
        return Err(Error::NonFinite {
            array: "advantages",
            at: At::new(i, 0),
            value: a,
        });
    }
    Ok(out)
}

/// Replaces `xs` (nonempty) by their deviations from their mean, computed around `xs[0]`
/// so that equal values give exactly 0.
fn centre(xs: &mut [f64]) {
    let x0 = xs[0];
    let shift = xs.iter().map(|&x| x - x0).sum::<f64>() / xs.len() as f64;
    xs.iter_mut().for_each(|x| *x = (*x - x0) - shift);
}

/// Divides deviations `d` (at least 2) by σ + eps, σ = √(Σ d² / (G − ddof)), computed as
/// (d/m) / (√q + eps/m) with m = max |d| and q = Σ (d/m)² / (G − ddof): no overflow or
/// underflow of σ. All-zero deviations stay 0, also for eps = 0.
fn scale_by_std(d: &mut [f64], ddof: usize, eps: f64) {
    let m = d.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    if m == 0.0 {
        return;
    }
    let q = d.iter().map(|x| (x / m).powi(2)).sum::<f64>() / (d.len() - ddof) as f64;
    let denom = q.sqrt() + eps / m;
    d.iter_mut().for_each(|x| *x = *x / m / denom);
}

/// γ or λ: in [0, 1] (NaN is not).
fn check_unit(field: &'static str, v: f64) -> Result<()> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            field,
            reason: format!("must be in [0, 1], got {v}"),
        })
    }
}

/// `array` has the shape `want` of the array named `of`.
fn check_shape(
    array: &'static str,
    of: &'static str,
    want: (usize, usize),
    got: (usize, usize),
) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            array,
            expected: format!("({}, {}), as {of}", want.0, want.1),
            got: vec![got.0, got.1],
        })
    }
}

/// The first non-finite value at a response position, in row-major order, and within a
/// position in the order of `arrays`.
fn check_values(mask: ArrayView2<bool>, arrays: &[(&'static str, ArrayView2<f64>)]) -> Result<()> {
    for ((i, j), &m) in mask.indexed_iter() {
        if m {
            for &(array, ref a) in arrays {
                let value = a[[i, j]];
                if !value.is_finite() {
                    return Err(Error::NonFinite {
                        array,
                        at: At::new(i, j),
                        value,
                    });
                }
            }
        }
    }
    Ok(())
}

/// The first non-finite output (overflow), in row-major order.
fn check_output(out: ArrayView2<f64>, array: &'static str) -> Result<()> {
    match out.indexed_iter().find(|(_, v)| !v.is_finite()) {
        Some(((i, j), &value)) => Err(Error::NonFinite {
            array,
            at: At::new(i, j),
            value,
        }),
        None => Ok(()),
    }
}
