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
//! - `masked_frac_pos_adv`, `masked_frac_neg_adv`, `masked_frac_nonzero_adv`: masked
//!   fraction among tokens with A > 0, A < 0, A ≠ 0;
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
//!   asymmetry shows up here;
//! - `delta_b_row`: CPPO's per-row budget δ_b^row over the rows with response tokens
//!   (the paper's Fig. 7 plots it): mean, min, max, and the fractions of rows at the
//!   floor (δ_b^row = δ_b, which every row of a fixed budget is) and at the ceiling
//!   (δ_b^row = c δ_b); `None` for rules without a budget.
//!
//! Every fraction and mean is 0 when its denominator is 0: an empty batch logs zeros,
//! never NaN.
//!
//! **The official trainers' names.** So that a dashboard lines up with a verl or UniRL
//! run, [`Diagnostics::verl`] and [`Diagnostics::unirl`] hold the metrics those trainers
//! log for CPPO, each defined as that code defines it:
//!
//! | name | definition | source |
//! |---|---|---|
//! | `verl.pg_clipfrac` | masked response tokens / (N + 1e-8) | verl PR #6731 (`actor/pg_clipfrac`) |
//! | `verl.pg_clipfrac_lower` | tokens whose weight a cap truncates / (N + 1e-8): kept tokens with ρ > C under `detached_is` (verl PR #6731), tokens whose dual clip binds under `ppo_clip` (verl's PPO); 0 for the other objectives | verl (`actor/pg_clipfrac_lower`) |
//! | `verl.ppo_kl` | Σ (logp_old − logp) / (N + 1e-8), the log-ratio clamped at ±20 | verl (`actor/ppo_kl`) |
//! | `unirl.masked_fraction` | masked response tokens / N | UniRL `cppo.py` |
//! | `unirl.approx_kl` | mean of ρ − 1 − r | UniRL `cppo.py` |
//! | `unirl.ratio_mean`, `unirl.ratio_max` | mean and max of ρ | UniRL `cppo.py` |
//!
//! verl's `masked_mean` adds 1e-8 to its denominator; the crate's own fractions divide
//! exactly. UniRL averages over every packed token of its sequences, holes in the loss
//! mask included; the crate never reads values at holes, so its UniRL-named metrics
//! average over response tokens (equal for rows without holes).

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::rule::Reason;

/// Mergeable per-row (or per-shard) counts and sums behind [`Diagnostics`].
///
/// ```
/// use cppo::{Config, Diagnostics, Tally};
/// let a = Tally { tokens: 3, seqs: 1, by_reason: [0, 2, 0, 1, 0], ..Tally::default() };
/// let b = Tally { tokens: 2, seqs: 1, by_reason: [0, 1, 0, 0, 1], ..Tally::default() };
/// let d = Diagnostics::new(&a.merge(&b), &Config::cppo());
/// assert_eq!((d.response_tokens, d.kept_tokens), (5, 3));
/// assert_eq!(d.masked_frac, 0.4);
/// ```
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
    /// Response tokens whose weight a cap truncates (verl's `pg_clipfrac_lower`).
    pub lower_clipped: u64,
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
    /// Rows with a budget δ_b^row (rows with response tokens, under a budget).
    pub budget_rows: u64,
    /// Σ δ_b^row.
    pub budget_sum: f64,
    /// min δ_b^row (+∞ when empty).
    pub budget_min: f64,
    /// max δ_b^row (0 when empty).
    pub budget_max: f64,
    /// Rows whose δ_b^row is the floor δ_b.
    pub budget_at_floor: u64,
    /// Rows whose δ_b^row is the ceiling c δ_b.
    pub budget_at_ceiling: u64,
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
            lower_clipped: 0,
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
            budget_rows: 0,
            budget_sum: 0.0,
            budget_min: f64::INFINITY,
            budget_max: 0.0,
            budget_at_floor: 0,
            budget_at_ceiling: 0,
            loss: 0.0,
        }
    }
}

impl Tally {
    /// Adds `other` (the part that comes after `self` in row order) to `self`.
    ///
    /// Counts add exactly; float sums add in the order the calls are made, which the
    /// engine fixes by row, so results do not depend on the thread count.
    ///
    /// ```
    /// use cppo::Tally;
    /// let a = Tally { tokens: 3, ratio_min: 0.5, ratio_max: 1.5, ..Tally::default() };
    /// let b = Tally { tokens: 2, ratio_min: 0.8, ratio_max: 2.0, ..Tally::default() };
    /// let ab = a.merge(&b);
    /// assert_eq!((ab.tokens, ab.ratio_min, ab.ratio_max), (5, 0.5, 2.0));
    /// assert_eq!(Tally::default().merge(&a), a); // the default is the identity
    /// ```
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
        self.lower_clipped += other.lower_clipped;
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
        self.budget_rows += other.budget_rows;
        self.budget_sum += other.budget_sum;
        self.budget_min = self.budget_min.min(other.budget_min);
        self.budget_max = self.budget_max.max(other.budget_max);
        self.budget_at_floor += other.budget_at_floor;
        self.budget_at_ceiling += other.budget_at_ceiling;
        self.loss += other.loss;
        self
    }

    /// Counts one row's δ_b^row.
    pub(crate) fn book_budget(&mut self, delta_b: f64, at_floor: bool, at_ceiling: bool) {
        self.budget_rows += 1;
        self.budget_sum += delta_b;
        self.budget_min = self.budget_min.min(delta_b);
        self.budget_max = self.budget_max.max(delta_b);
        self.budget_at_floor += u64::from(at_floor);
        self.budget_at_ceiling += u64::from(at_ceiling);
    }

    /// Masked response tokens (reasons 3 and 4).
    ///
    /// ```
    /// let t = cppo::Tally { tokens: 6, by_reason: [0, 2, 1, 2, 1], ..Default::default() };
    /// assert_eq!(t.masked(), 3); // the corrective bypass (reason 2) is kept
    /// ```
    pub fn masked(&self) -> u64 {
        self.by_reason[Reason::TokenThreshold as usize]
            + self.by_reason[Reason::PrefixBudget as usize]
    }
}

/// The logged metrics of one batch (or of merged shards). See the [module docs](self).
///
/// ```
/// use cppo::{evaluate, Batch, Config, Par};
/// use cppo::ndarray::array;
/// let (logp, logp_old) = (array![[0.5f64.ln(), -0.1]], array![[0.2f64.ln(), -0.1]]);
/// let (adv, mask) = (array![1.0], array![[true, true]]);
/// let batch = Batch::new(&logp, &logp_old, &adv, &mask)?;
/// let d = evaluate(&Config::dppo(), &batch, Par::Seq)?.diagnostics;
/// // D = |0.5 − 0.2| = 0.3 > δ = 0.15, and ρ = 2.5 moves away: masked.
/// assert_eq!((d.response_tokens, d.kept_tokens), (2, 1));
/// assert_eq!(d.masked_frac_token_threshold, 0.5);
/// assert_eq!(d.threshold_mean, Some(0.15));
/// assert_eq!(d.clip_frac, None); // the surrogate has no clip
/// # Ok::<(), cppo::Error>(())
/// ```
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
    /// Masked fraction among tokens with A ≠ 0.
    pub masked_frac_nonzero_adv: f64,
    /// Mean D_t.
    pub divergence_mean: f64,
    /// Max D_t.
    pub divergence_max: f64,
    /// mean(logp_old − logp): the k1 estimate of KL(μ ‖ π_θ).
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
    /// CPPO's per-row budget over the rows with response tokens; `None` for rules
    /// without a budget.
    pub delta_b_row: Option<BudgetStats>,
    /// The metrics verl logs, under its names.
    pub verl: VerlMetrics,
    /// The metrics UniRL's CPPO logs, under its names.
    pub unirl: UnirlMetrics,
}

/// The per-row budgets δ_b^row of a batch (see the [module docs](self)).
///
/// ```
/// use cppo::{evaluate, Batch, Config, Par};
/// use cppo::ndarray::array;
/// let (lp, adv) = (array![[-0.5, -0.3], [-0.2, -0.1]], array![1.0, -1.0]);
/// let mask = array![[true, true], [true, true]];
/// let batch = Batch::new(&lp, &lp, &adv, &mask)?;
/// // No drift: every row's calibrated budget sits at the floor δ_b = 0.02.
/// let b = evaluate(&Config::cppo(), &batch, Par::Seq)?.diagnostics.delta_b_row.unwrap();
/// assert_eq!((b.min, b.max, b.frac_at_floor, b.frac_at_ceiling), (0.02, 0.02, 1.0, 0.0));
/// assert!(evaluate(&Config::dppo(), &batch, Par::Seq)?.diagnostics.delta_b_row.is_none());
/// # Ok::<(), cppo::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BudgetStats {
    /// Mean δ_b^row.
    pub mean: f64,
    /// Min δ_b^row.
    pub min: f64,
    /// Max δ_b^row.
    pub max: f64,
    /// Fraction of rows at the floor δ_b.
    pub frac_at_floor: f64,
    /// Fraction of rows at the ceiling c δ_b.
    pub frac_at_ceiling: f64,
}

/// verl's metric names (see the [module docs](self) for the definitions).
///
/// ```
/// use cppo::{Config, Diagnostics, Tally};
/// let t = Tally { tokens: 4, by_reason: [0, 3, 0, 1, 0], k1_sum: 0.2, ..Tally::default() };
/// let v = Diagnostics::new(&t, &Config::cppo()).verl;
/// assert_eq!(v.pg_clipfrac, 1.0 / (4.0 + 1e-8)); // verl's masked_mean denominator
/// assert_eq!(v.ppo_kl, 0.2 / (4.0 + 1e-8));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerlMetrics {
    /// `actor/pg_clipfrac`: masked response tokens / (N + 1e-8).
    pub pg_clipfrac: f64,
    /// `actor/pg_clipfrac_lower`: tokens whose weight a cap truncates / (N + 1e-8).
    pub pg_clipfrac_lower: f64,
    /// `actor/ppo_kl`: Σ (logp_old − logp) / (N + 1e-8).
    pub ppo_kl: f64,
}

/// UniRL's metric names (see the [module docs](self) for the definitions).
///
/// ```
/// use cppo::{Config, Diagnostics, Tally};
/// let by_reason = [0, 3, 0, 1, 0];
/// let t = Tally { tokens: 4, by_reason, ratio_sum: 4.4, ratio_max: 1.5, ..Tally::default() };
/// let u = Diagnostics::new(&t, &Config::cppo()).unirl;
/// assert_eq!(u.masked_fraction, 0.25); // an exact fraction, unlike verl's
/// assert_eq!((u.ratio_mean, u.ratio_max), (4.4 / 4.0, 1.5));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnirlMetrics {
    /// masked response tokens / N.
    pub masked_fraction: f64,
    /// mean of ρ − 1 − r (the k3 estimate).
    pub approx_kl: f64,
    /// mean of ρ.
    pub ratio_mean: f64,
    /// max of ρ.
    pub ratio_max: f64,
}

fn frac(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// verl's `masked_mean`: the sum over (count + 1e-8).
fn verl_mean(sum: f64, den: u64) -> f64 {
    sum / (den as f64 + 1e-8)
}

fn mean(sum: f64, den: u64) -> f64 {
    if den == 0 { 0.0 } else { sum / den as f64 }
}

impl Diagnostics {
    /// The metrics of a tally, for the config that produced it.
    ///
    /// ```
    /// use cppo::{Config, Diagnostics, Tally};
    /// // An empty tally logs zeros, never NaN.
    /// let d = Diagnostics::new(&Tally::default(), &Config::cppo());
    /// assert_eq!((d.masked_frac, d.ratio_min, d.divergence_mean), (0.0, 0.0, 0.0));
    /// assert!(Diagnostics::new(&Tally::default(), &Config::grpo()).delta_b_row.is_none());
    /// ```
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
            masked_frac_nonzero_adv: frac(
                t.pos_adv_masked + t.neg_adv_masked,
                t.pos_adv + t.neg_adv,
            ),
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
            delta_b_row: cfg.rule.has_budget().then(|| BudgetStats {
                mean: mean(t.budget_sum, t.budget_rows),
                min: if t.budget_rows == 0 {
                    0.0
                } else {
                    t.budget_min
                },
                max: t.budget_max,
                frac_at_floor: frac(t.budget_at_floor, t.budget_rows),
                frac_at_ceiling: frac(t.budget_at_ceiling, t.budget_rows),
            }),
            verl: VerlMetrics {
                pg_clipfrac: verl_mean(t.masked() as f64, n),
                pg_clipfrac_lower: verl_mean(t.lower_clipped as f64, n),
                ppo_kl: verl_mean(t.k1_sum, n),
            },
            unirl: UnirlMetrics {
                masked_fraction: frac(t.masked(), n),
                approx_kl: mean(t.k3_sum, n),
                ratio_mean: mean(t.ratio_sum, n),
                ratio_max: t.ratio_max,
            },
        }
    }
}
