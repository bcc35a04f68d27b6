//! Diagnostics: the numbers a practitioner logs each step.
//!
//! The engine accumulates a [`Tally`] per row: counts and sums that merge exactly
//! (integers) or in a fixed order (floats). Tallies of row shards merge into the whole
//! batch's tally, so a data-parallel trainer can all-gather them. [`Diagnostics`] turns
//! a tally into fractions and means.
//!
//! Over the response tokens (n of them), with r = clamp(logp − logp_old, −20, 20) and
//! ρ = eʳ:
//!
//! - `masked_frac` = (masked tokens)/n, split by reason: `masked_frac_token_threshold`
//!   (reason 3) and `masked_frac_prefix_budget` (reason 4);
//! - `masked_frac_pos_adv`, `masked_frac_neg_adv`: masked fraction among tokens with A > 0,
//!   A < 0; `pg_clipfrac`: among tokens with A ≠ 0 (verl's name for this number when the
//!   mask is a clip);
//! - `bypass_frac` = (kept by the corrective bypass)/n;
//! - `divergence_mean`, `divergence_max` of D_t;
//! - `approx_kl_k1` = mean(−r), `approx_kl_k3` = mean(ρ − 1 − r): sample estimates of
//!   KL(μ ‖ π_θ) from the rollout policy's own tokens;
//! - `ratio_min`, `ratio_mean`, `ratio_max` of ρ;
//! - `clip_frac`: for `ppo_clip`, the fraction of response tokens whose value comes from
//!   a clipped (or dual-clipped) branch; for `cispo`, those with ρ > 1 + ε_high; `None`
//!   for the other objectives. Counted before the trust-region mask, as verl does;
//! - `threshold_mean`: the mean of c_t (CPPO) or δ (DPPO, TRM); `None` for rules without
//!   a threshold;
//! - `masked_frac_by_decile[k]`: the masked fraction among tokens in the k-th tenth of
//!   their row's response, by relative position ⌊10 (t − 1)/T⌋. The paper's early/late
//!   asymmetry shows up here.
//!
//! Every fraction and mean is 0 when its denominator is 0: an empty batch logs zeros,
//! never NaN.

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::rule::Reason;

/// Mergeable per-row (or per-shard) counts and sums behind [`Diagnostics`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Response tokens.
    pub tokens: u64,
    /// Rows with at least one response token.
    pub seqs: u64,
    /// Response tokens by reason code (index 0 stays 0).
    pub by_reason: [u64; 5],
    /// Response tokens with A > 0.
    pub pos_adv: u64,
    /// Masked response tokens with A > 0.
    pub pos_adv_masked: u64,
    /// Response tokens with A < 0.
    pub neg_adv: u64,
    /// Masked response tokens with A < 0.
    pub neg_adv_masked: u64,
    /// Response tokens whose objective value came from a clip.
    pub clipped: u64,
    /// Σ D_t.
    pub divergence_sum: f64,
    /// max D_t (0 when empty).
    pub divergence_max: f64,
    /// Σ −r.
    pub k1_sum: f64,
    /// Σ (ρ − 1 − r).
    pub k3_sum: f64,
    /// Σ ρ.
    pub ratio_sum: f64,
    /// min ρ (+∞ when empty).
    pub ratio_min: f64,
    /// max ρ (0 when empty).
    pub ratio_max: f64,
    /// Σ of the finite thresholds c_t.
    pub threshold_sum: f64,
    /// How many tokens had a finite threshold.
    pub threshold_count: u64,
    /// Response tokens per relative-position decile.
    pub decile_tokens: [u64; 10],
    /// Masked response tokens per relative-position decile.
    pub decile_masked: [u64; 10],
    /// This part's contribution to the loss.
    pub loss: f64,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            tokens: 0,
            seqs: 0,
            by_reason: [0; 5],
            pos_adv: 0,
            pos_adv_masked: 0,
            neg_adv: 0,
            neg_adv_masked: 0,
            clipped: 0,
            divergence_sum: 0.0,
            divergence_max: 0.0,
            k1_sum: 0.0,
            k3_sum: 0.0,
            ratio_sum: 0.0,
            ratio_min: f64::INFINITY,
            ratio_max: 0.0,
            threshold_sum: 0.0,
            threshold_count: 0,
            decile_tokens: [0; 10],
            decile_masked: [0; 10],
            loss: 0.0,
        }
    }
}

impl Tally {
    /// Adds `other` (the part that comes after `self` in row order) to `self`.
    ///
    /// Counts add exactly; float sums add in the order the calls are made, which the
    /// engine fixes by row, so results do not depend on the thread count.
    #[must_use]
    pub fn merge(mut self, other: &Self) -> Self {
        self.tokens += other.tokens;
        self.seqs += other.seqs;
        for (a, b) in self.by_reason.iter_mut().zip(other.by_reason) {
            *a += b;
        }
        self.pos_adv += other.pos_adv;
        self.pos_adv_masked += other.pos_adv_masked;
        self.neg_adv += other.neg_adv;
        self.neg_adv_masked += other.neg_adv_masked;
        self.clipped += other.clipped;
        self.divergence_sum += other.divergence_sum;
        self.divergence_max = self.divergence_max.max(other.divergence_max);
        self.k1_sum += other.k1_sum;
        self.k3_sum += other.k3_sum;
        self.ratio_sum += other.ratio_sum;
        self.ratio_min = self.ratio_min.min(other.ratio_min);
        self.ratio_max = self.ratio_max.max(other.ratio_max);
        self.threshold_sum += other.threshold_sum;
        self.threshold_count += other.threshold_count;
        for (a, b) in self.decile_tokens.iter_mut().zip(other.decile_tokens) {
            *a += b;
        }
        for (a, b) in self.decile_masked.iter_mut().zip(other.decile_masked) {
            *a += b;
        }
        self.loss += other.loss;
        self
    }

    /// Masked response tokens (reasons 3 and 4).
    pub fn masked(&self) -> u64 {
        self.by_reason[Reason::TokenThreshold as usize]
            + self.by_reason[Reason::PrefixBudget as usize]
    }
}

/// The logged metrics of one batch (or of merged shards). See the [module docs](self).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Diagnostics {
    /// The aggregated loss.
    pub loss: f64,
    /// Response tokens.
    pub response_tokens: u64,
    /// Rows with at least one response token.
    pub sequences: u64,
    /// Kept response tokens.
    pub kept_tokens: u64,
    /// Masked fraction of response tokens.
    pub masked_frac: f64,
    /// Fraction masked by the token threshold (reason 3).
    pub masked_frac_token_threshold: f64,
    /// Fraction masked by the prefix budget alone (reason 4).
    pub masked_frac_prefix_budget: f64,
    /// Fraction kept by the corrective bypass (reason 2).
    pub bypass_frac: f64,
    /// Masked fraction among tokens with A > 0.
    pub masked_frac_pos_adv: f64,
    /// Masked fraction among tokens with A < 0.
    pub masked_frac_neg_adv: f64,
    /// Masked fraction among tokens with A ≠ 0 (verl's `pg_clipfrac`).
    pub pg_clipfrac: f64,
    /// Mean D_t.
    pub divergence_mean: f64,
    /// Max D_t.
    pub divergence_max: f64,
    /// mean(logp_old − logp): the k1 estimate of KL(μ ‖ π_θ) (verl's `ppo_kl`).
    pub approx_kl_k1: f64,
    /// mean(ρ − 1 − log ρ): the k3 estimate of KL(μ ‖ π_θ).
    pub approx_kl_k3: f64,
    /// min ρ.
    pub ratio_min: f64,
    /// mean ρ.
    pub ratio_mean: f64,
    /// max ρ.
    pub ratio_max: f64,
    /// The objective's clipped fraction (`ppo_clip`, `cispo`), else `None`.
    pub clip_frac: Option<f64>,
    /// Mean effective threshold, for rules that have one, else `None`.
    pub threshold_mean: Option<f64>,
    /// Masked fraction by tenth of relative position in the row.
    pub masked_frac_by_decile: [f64; 10],
}

fn frac(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

fn mean(sum: f64, den: u64) -> f64 {
    if den == 0 { 0.0 } else { sum / den as f64 }
}

impl Diagnostics {
    /// The metrics of a tally, for the config that produced it.
    pub fn new(t: &Tally, cfg: &Config) -> Self {
        let n = t.tokens;
        let empty = n == 0;
        let mut by_decile = [0.0; 10];
        for (k, f) in by_decile.iter_mut().enumerate() {
            *f = frac(t.decile_masked[k], t.decile_tokens[k]);
        }
        Self {
            loss: t.loss,
            response_tokens: n,
            sequences: t.seqs,
            kept_tokens: n - t.masked(),
            masked_frac: frac(t.masked(), n),
            masked_frac_token_threshold: frac(t.by_reason[Reason::TokenThreshold as usize], n),
            masked_frac_prefix_budget: frac(t.by_reason[Reason::PrefixBudget as usize], n),
            bypass_frac: frac(t.by_reason[Reason::Corrective as usize], n),
            masked_frac_pos_adv: frac(t.pos_adv_masked, t.pos_adv),
            masked_frac_neg_adv: frac(t.neg_adv_masked, t.neg_adv),
            pg_clipfrac: frac(t.pos_adv_masked + t.neg_adv_masked, t.pos_adv + t.neg_adv),
            divergence_mean: mean(t.divergence_sum, n),
            divergence_max: t.divergence_max,
            approx_kl_k1: mean(t.k1_sum, n),
            approx_kl_k3: mean(t.k3_sum, n),
            ratio_min: if empty { 0.0 } else { t.ratio_min },
            ratio_mean: mean(t.ratio_sum, n),
            ratio_max: t.ratio_max,
            clip_frac: cfg.objective.has_clip().then(|| frac(t.clipped, n)),
            threshold_mean: cfg
                .rule
                .has_threshold()
                .then(|| mean(t.threshold_sum, t.threshold_count)),
            masked_frac_by_decile: by_decile,
        }
    }
}
