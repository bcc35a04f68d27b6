//! Measurements by response position, accumulated over a run: where the divergence
//! sits, where and why the rule masks or bypasses, how far the prefix has drifted, and
//! whether the prefix budget fires after a spike or after a creep of small deviations.
//!
//! Every optimizer step adds its minibatch ([`Probe::add_step`]): the crate's per-token
//! `divergence`, `weight`, `reason` and `grad` outputs, and the log-probs it was given.
//! Every rollout adds the position of its failed samples' first error
//! ([`Probe::add_failure`]). [`Probe::csv`] writes one line per position.
//!
//! Definitions (t is the 0-based response position):
//! - `d_mean`: the mean of D_t over response tokens at t.
//! - `masked_token`, `masked_budget`, `bypassed`: the fractions of response tokens at t
//!   whose reason is 3 (token threshold), 4 (prefix budget) or 2 (kept by the corrective
//!   bypass).
//! - `prefix_log_ratio`: the mean over rows of Σ_{s ≤ t} (log π_s − log μ_s), the row's
//!   sequence-level log-ratio up to t.
//! - For each row with a budget-masked token, its first one is classed as a **spike** if
//!   an earlier response token of the row failed CPPO's token test, w_s D_s > δ (masked,
//!   or kept by the bypass), else as a **creep** (every earlier token passed the token
//!   test, and the budget acted on the sum of their small deviations).
//! - `bypass_grad_share`: Σ |∂L/∂logp| over bypassed tokens over Σ |∂L/∂logp| over all:
//!   the share of the gradient that comes from tokens the test would have masked.
//! - `first_error`: over the rollouts' failed samples, the fraction whose first wrong
//!   token is at t.

use std::fmt::Write as _;

use cppo::Reason;
use cppo::ndarray::{Array2, ArrayView2};

/// The per-position sums of one run.
#[derive(Clone, Debug)]
pub struct Probe {
    tokens: Vec<f64>,
    d_sum: Vec<f64>,
    masked_token: Vec<f64>,
    masked_budget: Vec<f64>,
    bypassed: Vec<f64>,
    rows_at: Vec<f64>,
    prefix_sum: Vec<f64>,
    first_error: Vec<f64>,
    failures: f64,
    /// Rows with a budget-masked token, by what preceded it.
    pub spike_rows: f64,
    pub creep_rows: f64,
    grad_bypassed: f64,
    grad_total: f64,
    /// Every response token's D, for the quantiles that calibrate δ and δ_b.
    d_values: Vec<f32>,
    /// CPPO's δ: a token with w_t D_t above it failed the token test.
    delta: f64,
}

/// The crate's per-token outputs of one step that the probe reads.
pub struct StepOutputs<'a> {
    pub divergence: ArrayView2<'a, f32>,
    pub weight: ArrayView2<'a, f32>,
    pub reason: ArrayView2<'a, u8>,
    pub grad: ArrayView2<'a, f32>,
}

impl Probe {
    /// Sums for responses of at most `len` tokens, under a rule whose token test is
    /// w_t D_t ≤ `delta` (CPPO's δ; +∞ for the rules without a prefix budget).
    pub fn new(len: usize, delta: f64) -> Self {
        let z = vec![0.0; len];
        Self {
            tokens: z.clone(),
            d_sum: z.clone(),
            masked_token: z.clone(),
            masked_budget: z.clone(),
            bypassed: z.clone(),
            rows_at: z.clone(),
            prefix_sum: z.clone(),
            first_error: z,
            failures: 0.0,
            spike_rows: 0.0,
            creep_rows: 0.0,
            grad_bypassed: 0.0,
            grad_total: 0.0,
            d_values: Vec::new(),
            delta,
        }
    }

    /// Adds one optimizer step: the log-probs the crate was given and its outputs.
    pub fn add_step(
        &mut self,
        logp: &Array2<f32>,
        logp_old: &Array2<f32>,
        mask: &Array2<bool>,
        out: &StepOutputs<'_>,
    ) {
        let fail = Reason::TokenThreshold.code();
        let budget = Reason::PrefixBudget.code();
        let bypass = Reason::Corrective.code();
        for i in 0..mask.nrows() {
            let mut prefix = 0.0f64;
            let mut failed_before = false;
            let mut classed = false;
            for t in 0..mask.ncols() {
                if !mask[(i, t)] {
                    continue;
                }
                let (d, w, r) = (
                    out.divergence[(i, t)],
                    out.weight[(i, t)],
                    out.reason[(i, t)],
                );
                let g = f64::from(out.grad[(i, t)].abs());
                self.tokens[t] += 1.0;
                self.d_sum[t] += f64::from(d);
                self.d_values.push(d);
                self.masked_token[t] += f64::from(u8::from(r == fail));
                self.masked_budget[t] += f64::from(u8::from(r == budget));
                self.bypassed[t] += f64::from(u8::from(r == bypass));
                prefix += f64::from(logp[(i, t)]) - f64::from(logp_old[(i, t)]);
                self.prefix_sum[t] += prefix;
                self.rows_at[t] += 1.0;
                self.grad_total += g;
                if r == bypass {
                    self.grad_bypassed += g;
                }
                if r == budget && !classed {
                    classed = true;
                    if failed_before {
                        self.spike_rows += 1.0;
                    } else {
                        self.creep_rows += 1.0;
                    }
                }
                failed_before |= f64::from(w) * f64::from(d) > self.delta;
            }
        }
    }

    /// Adds a failed sample whose first wrong token is at response position `t`.
    pub fn add_failure(&mut self, t: usize) {
        if let Some(slot) = self.first_error.get_mut(t) {
            *slot += 1.0;
            self.failures += 1.0;
        }
    }

    /// Σ |∂L/∂logp| over the bypassed tokens so far.
    pub fn grad_bypassed(&self) -> f64 {
        self.grad_bypassed
    }

    /// Σ |∂L/∂logp| over all response tokens so far.
    pub fn grad_total(&self) -> f64 {
        self.grad_total
    }

    /// The share of |∂L/∂logp| that bypassed tokens carry (NaN before any step).
    pub fn bypass_grad_share(&self) -> f64 {
        self.grad_bypassed / self.grad_total
    }

    /// The q-quantiles of D over every response token seen (nearest rank; NaN before
    /// any step).
    pub fn d_quantiles(&self, qs: &[f64]) -> Vec<f64> {
        let mut v = self.d_values.clone();
        v.sort_unstable_by(f32::total_cmp);
        qs.iter()
            .map(|&q| {
                if v.is_empty() {
                    return f64::NAN;
                }
                let k = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
                f64::from(v[k])
            })
            .collect()
    }

    /// Mean D_t at each position (NaN where no token was seen).
    pub fn d_mean(&self) -> Vec<f64> {
        ratio(&self.d_sum, &self.tokens)
    }

    /// The fraction of tokens at each position masked by the prefix budget.
    pub fn masked_budget(&self) -> Vec<f64> {
        ratio(&self.masked_budget, &self.tokens)
    }

    /// The fraction of tokens at each position masked by the token threshold.
    pub fn masked_token(&self) -> Vec<f64> {
        ratio(&self.masked_token, &self.tokens)
    }

    /// The fraction of failed samples whose first error is at each position.
    pub fn first_error(&self) -> Vec<f64> {
        self.first_error.iter().map(|c| c / self.failures).collect()
    }

    pub const CSV_HEADER: &'static str =
        "t,tokens,d_mean,masked_token,masked_budget,bypassed,prefix_log_ratio,first_error";

    /// One line per response position.
    pub fn csv(&self) -> String {
        let mut s = format!("{}\n", Self::CSV_HEADER);
        let (d, mt, mb) = (self.d_mean(), self.masked_token(), self.masked_budget());
        let by = ratio(&self.bypassed, &self.tokens);
        let pre = ratio(&self.prefix_sum, &self.rows_at);
        let fe = self.first_error();
        for t in 0..self.tokens.len() {
            let _ = writeln!(
                s,
                "{t},{},{:.6e},{:.6},{:.6},{:.6},{:.6e},{:.6}",
                self.tokens[t], d[t], mt[t], mb[t], by[t], pre[t], fe[t]
            );
        }
        s
    }
}

fn ratio(num: &[f64], den: &[f64]) -> Vec<f64> {
    num.iter().zip(den).map(|(n, d)| n / d).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cppo::ndarray::array;

    #[test]
    fn classes_spike_and_creep_rows_and_sums_by_position() {
        // δ = 0.25. Row 0: token 0 fails the token test (w D = 0.5 > 0.25, reason 3),
        // token 2 is budget-masked: a spike. Row 1: no token has w D > 0.25 (token 1's
        // D = 0.5 has w = 0.25), token 2 is budget-masked: a creep. Row 1's token 1 is
        // bypassed with |grad| 3 of the total 2 + 1 + 3 = 6.
        let logp = array![[-1.0f32, -1.0, -1.0], [-0.5, -0.5, -0.5]];
        let old = array![[-1.5f32, -1.0, -2.0], [-1.0, -1.0, -1.0]];
        let mask = array![[true, true, true], [true, true, true]];
        let divergence = array![[0.5f32, 0.0, 0.125], [0.125, 0.5, 0.125]];
        let weight = array![[1.0f32, 1.0, 1.0], [1.0, 0.25, 1.0]];
        let reason = array![[3u8, 1, 4], [1, 2, 4]];
        let grad = array![[0.0f32, 2.0, 0.0], [1.0, -3.0, 0.0]];
        let mut p = Probe::new(3, 0.25);
        p.add_step(
            &logp,
            &old,
            &mask,
            &StepOutputs {
                divergence: divergence.view(),
                weight: weight.view(),
                reason: reason.view(),
                grad: grad.view(),
            },
        );
        assert_eq!((p.spike_rows, p.creep_rows), (1.0, 1.0));
        assert_eq!(p.bypass_grad_share(), 3.0 / 6.0);
        assert_eq!(p.d_mean(), vec![0.3125, 0.25, 0.125]);
        // Six D values: 0, 0.125 (x3), 0.5 (x2); nearest rank.
        assert_eq!(
            p.d_quantiles(&[0.1, 0.5, 0.9, 1.0]),
            vec![0.0, 0.125, 0.5, 0.5]
        );
        assert_eq!(p.masked_token(), vec![0.5, 0.0, 0.0]);
        assert_eq!(p.masked_budget(), vec![0.0, 0.0, 1.0]);
        // Prefix log-ratios: row 0 is 0.5, 0.5, 1.5; row 1 is 0.5, 1.0, 1.5.
        let csv = p.csv();
        let last: Vec<&str> = csv.lines().nth(3).unwrap().split(',').collect();
        assert_eq!(last[6].parse::<f64>().unwrap(), 1.5);
        let mid: Vec<&str> = csv.lines().nth(2).unwrap().split(',').collect();
        assert_eq!(mid[6].parse::<f64>().unwrap(), 0.75);
    }

    #[test]
    fn first_error_fractions() {
        let mut p = Probe::new(4, f64::INFINITY);
        for t in [0, 2, 2, 3, 9] {
            p.add_failure(t); // 9 is past the response: ignored
        }
        assert_eq!(p.first_error(), vec![0.25, 0.0, 0.5, 0.25]);
    }
}
