//! Shared by the property tests (`tests/properties.rs`) and the gradient checks
//! (`tests/gradients.rs`):
//!
//! - [`Case`]: one batch held as owned arrays, with its config;
//! - [`reference`]: a plain per-token implementation of SPEC.md sections 2 to 6, written
//!   from the spec with its own loops and formulas. It reads nothing from the crate but
//!   the parameters of [`Config`], and computes in `f64`;
//! - proptest strategies for valid cases: ragged rows, holes, empty rows, garbage in the
//!   padding, per-row or per-token advantages (zeros included), top-K arrays with K from
//!   1 to 5 (masses summing to about 1 included), and configs over every divergence,
//!   rule, objective, aggregation and KL estimator.
//!
//! Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::ops::RangeInclusive;

use cppo::ndarray::{Array1, Array2, Array3};
use cppo::{
    Aggregation, Batch, Config, Divergence, Evaluation, Float, KlEstimator, KlPenalty, Objective,
    Par, Rule, evaluate,
};
use proptest::prelude::*;
use proptest::test_runner::{FailurePersistence, FileFailurePersistence};

// ---------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------

/// The advantages of a case: one per row, or one per token.
#[derive(Clone, Debug)]
pub enum Adv<F> {
    /// (B,), broadcast along each row.
    Row(Array1<F>),
    /// (B, L).
    Token(Array2<F>),
}

/// One batch as owned arrays, with the config to evaluate it under.
#[derive(Clone, Debug)]
pub struct Case<F> {
    pub cfg: Config,
    pub logp: Array2<F>,
    pub logp_old: Array2<F>,
    pub adv: Adv<F>,
    pub mask: Array2<bool>,
    /// (topk_logp_old, topk_logp), each (B, L, K).
    pub topk: Option<(Array3<F>, Array3<F>)>,
    pub logp_ref: Option<Array2<F>>,
}

/// The input arrays of a case, by name (for tests that poke values into one array).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arr {
    Logp,
    LogpOld,
    Adv,
    TopkOld,
    TopkNew,
    LogpRef,
}

impl Arr {
    pub const ALL: [Arr; 6] = [
        Arr::Logp,
        Arr::LogpOld,
        Arr::Adv,
        Arr::TopkOld,
        Arr::TopkNew,
        Arr::LogpRef,
    ];

    /// The name the crate's errors use.
    pub fn name(self) -> &'static str {
        match self {
            Arr::Logp => "logp",
            Arr::LogpOld => "logp_old",
            Arr::Adv => "advantages",
            Arr::TopkOld => "topk_logp_old",
            Arr::TopkNew => "topk_logp",
            Arr::LogpRef => "logp_ref",
        }
    }

    pub fn is_logprob(self) -> bool {
        self != Arr::Adv
    }
}

impl<F: Float> Case<F> {
    /// (B, L).
    pub fn shape(&self) -> (usize, usize) {
        self.logp.dim()
    }

    /// K, if the case has top-K arrays.
    pub fn k(&self) -> Option<usize> {
        self.topk.as_ref().map(|(o, _)| o.dim().2)
    }

    /// The advantage at (i, j), widened.
    pub fn adv_at(&self, i: usize, j: usize) -> f64 {
        match &self.adv {
            Adv::Row(a) => a[i].to_f64(),
            Adv::Token(a) => a[[i, j]].to_f64(),
        }
    }

    /// The batch, with the bool mask. Panics on a shape error (cases are well formed).
    pub fn batch(&self) -> Batch<'_, F> {
        self.batch_with_mask(&self.mask)
    }

    /// The batch with another mask array (of any mask element type).
    pub fn batch_with_mask<'a>(&'a self, mask: impl Into<cppo::Mask<'a>>) -> Batch<'a, F> {
        let b = match &self.adv {
            Adv::Row(a) => Batch::new(&self.logp, &self.logp_old, a, mask),
            Adv::Token(a) => Batch::new(&self.logp, &self.logp_old, a, mask),
        }
        .expect("case shapes are consistent");
        let b = match &self.topk {
            Some((old, new)) => b.with_topk(old, new).expect("top-K shapes"),
            None => b,
        };
        match &self.logp_ref {
            Some(r) => b.with_logp_ref(r).expect("logp_ref shape"),
            None => b,
        }
    }

    /// `evaluate` under the case's own config.
    pub fn eval(&self, par: Par) -> cppo::Result<Evaluation<F>> {
        evaluate(&self.cfg, &self.batch(), par)
    }

    /// The same case in another float type (each value rounded once).
    pub fn cast<G: Float>(&self) -> Case<G> {
        let c2 = |a: &Array2<F>| a.mapv(|x| G::from_f64(x.to_f64()));
        let c3 = |a: &Array3<F>| a.mapv(|x| G::from_f64(x.to_f64()));
        Case {
            cfg: self.cfg,
            logp: c2(&self.logp),
            logp_old: c2(&self.logp_old),
            adv: match &self.adv {
                Adv::Row(a) => Adv::Row(a.mapv(|x| G::from_f64(x.to_f64()))),
                Adv::Token(a) => Adv::Token(c2(a)),
            },
            mask: self.mask.clone(),
            topk: self.topk.as_ref().map(|(o, n)| (c3(o), c3(n))),
            logp_ref: self.logp_ref.as_ref().map(c2),
        }
    }

    /// Sets one value of one input array; `k` is used by the top-K arrays only, and the
    /// column by per-token advantages only. Returns false when the case lacks the array.
    pub fn set(&mut self, arr: Arr, i: usize, j: usize, k: usize, v: F) -> bool {
        match arr {
            Arr::Logp => self.logp[[i, j]] = v,
            Arr::LogpOld => self.logp_old[[i, j]] = v,
            Arr::Adv => match &mut self.adv {
                Adv::Row(a) => a[i] = v,
                Adv::Token(a) => a[[i, j]] = v,
            },
            Arr::TopkOld | Arr::TopkNew => match &mut self.topk {
                Some((o, n)) => {
                    let a = if arr == Arr::TopkOld { o } else { n };
                    a[[i, j, k]] = v;
                }
                None => return false,
            },
            Arr::LogpRef => match &mut self.logp_ref {
                Some(r) => r[[i, j]] = v,
                None => return false,
            },
        }
        true
    }

    /// Overwrites every value that sits at a non-response position (and, for per-row
    /// advantages, the advantage of every row without response tokens) with `f(arr, i,
    /// j, k)`.
    pub fn fill_padding(&mut self, f: impl Fn(Arr, usize, usize, usize) -> F) {
        let (b, l) = self.shape();
        let kk = self.k().unwrap_or(0);
        for i in 0..b {
            let empty = (0..l).all(|j| !self.mask[[i, j]]);
            if empty && let Adv::Row(a) = &mut self.adv {
                a[i] = f(Arr::Adv, i, 0, 0);
            }
            for j in 0..l {
                if self.mask[[i, j]] {
                    continue;
                }
                for arr in Arr::ALL {
                    match arr {
                        Arr::TopkOld | Arr::TopkNew => {
                            for k in 0..kk {
                                self.set(arr, i, j, k, f(arr, i, j, k));
                            }
                        }
                        Arr::Adv if matches!(self.adv, Adv::Row(_)) => {}
                        _ => {
                            self.set(arr, i, j, 0, f(arr, i, j, 0));
                        }
                    }
                }
            }
        }
    }

    /// The same case with its rows in the order `perm` (row r of the result is row
    /// `perm[r]` of this one).
    pub fn permute_rows(&self, perm: &[usize]) -> Case<F> {
        let p2 = |a: &Array2<F>| Array2::from_shape_fn(a.dim(), |(i, j)| a[[perm[i], j]]);
        let p3 = |a: &Array3<F>| Array3::from_shape_fn(a.dim(), |(i, j, k)| a[[perm[i], j, k]]);
        Case {
            cfg: self.cfg,
            logp: p2(&self.logp),
            logp_old: p2(&self.logp_old),
            adv: match &self.adv {
                Adv::Row(a) => Adv::Row(Array1::from_shape_fn(a.len(), |i| a[perm[i]])),
                Adv::Token(a) => Adv::Token(p2(a)),
            },
            mask: Array2::from_shape_fn(self.mask.dim(), |(i, j)| self.mask[[perm[i], j]]),
            topk: self.topk.as_ref().map(|(o, n)| (p3(o), p3(n))),
            logp_ref: self.logp_ref.as_ref().map(p2),
        }
    }

    /// Response tokens per row.
    pub fn row_lengths(&self) -> Vec<usize> {
        self.mask
            .rows()
            .into_iter()
            .map(|r| r.iter().filter(|&&m| m).count())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// The reference
// ---------------------------------------------------------------------------------------

/// Everything the reference computes. Arrays are (B, L), 0 at non-response positions.
#[derive(Clone, Debug)]
pub struct Reference {
    pub divergence: Array2<f64>,
    pub weight: Array2<f64>,
    pub threshold: Array2<f64>,
    pub keep: Array2<bool>,
    pub reason: Array2<u8>,
    pub token_loss: Array2<f64>,
    pub grad: Array2<f64>,
    pub loss: f64,
    /// Σ |a_t l_t|: the size of the terms summed into the loss, for tolerances.
    pub loss_scale: f64,
    /// The aggregation weight a_t of each token.
    pub agg: Array2<f64>,
    /// The smallest relative gap |x − y| / max(|x|, |y|) between a quantity the token's
    /// discrete choices depend on (its rule test, TRM's row statistic, the corrective
    /// bypass, `ppo_clip`'s branch) and the value it is compared with. Infinite at
    /// non-response positions and where nothing is compared.
    pub margin: Array2<f64>,
    /// The objective's branch: 0 unclipped (or no branch), 1 clipped, 2 dual-clip cap.
    pub branch: Array2<u8>,
    /// ρ_t.
    pub rho: Array2<f64>,
}

/// A log-prob as SPEC section 2 reads it: (0, 1e-4] is 0.
pub fn read_logprob(x: f64) -> f64 {
    assert!(
        x.is_finite() && x <= 1e-4,
        "the reference was given an invalid log-prob {x}"
    );
    if x > 0.0 { 0.0 } else { x }
}

/// Relative gap between two compared quantities.
fn gap(x: f64, y: f64) -> f64 {
    let s = x.abs().max(y.abs());
    if s == 0.0 { 0.0 } else { (x - y).abs() / s }
}

pub fn ref_binary_tv(lp: f64, lq: f64) -> f64 {
    let p = lp.exp();
    let q = lq.exp();
    (p - q).abs()
}

/// KL(Bernoulli(q) ‖ Bernoulli(p)) with the 1e-8 guard; log q is logp_old itself.
pub fn ref_binary_kl(lp: f64, lq: f64) -> f64 {
    let p = lp.exp();
    let q = lq.exp();
    let head = q * (lq - lp);
    let tail = (1.0 - q) * ((1.0 - q + 1e-8) / (1.0 - p + 1e-8)).ln();
    let d = head + tail;
    if d > 0.0 { d } else { 0.0 }
}

/// (Σ_k |P_k − Q_k| + |P_rest − Q_rest|) / 2.
pub fn ref_topk_tv(old: &[f64], new: &[f64]) -> f64 {
    let mut l1 = 0.0;
    let mut sp = 0.0;
    let mut sq = 0.0;
    for k in 0..old.len() {
        let pk = old[k].exp();
        let qk = new[k].exp();
        l1 += (pk - qk).abs();
        sp += pk;
        sq += qk;
    }
    let p_rest = if 1.0 - sp > 0.0 { 1.0 - sp } else { 0.0 };
    let q_rest = if 1.0 - sq > 0.0 { 1.0 - sq } else { 0.0 };
    (l1 + (p_rest - q_rest).abs()) / 2.0
}

/// Σ_k P_k (log P_k − log Q_k) + P_rest (log P_rest − log max(Q_rest, 1e-12)), at least 0;
/// the rest term is 0 when P_rest = 0.
pub fn ref_topk_kl(old: &[f64], new: &[f64]) -> f64 {
    let mut head = 0.0;
    let mut sp = 0.0;
    let mut sq = 0.0;
    for k in 0..old.len() {
        let pk = old[k].exp();
        head += pk * (old[k] - new[k]);
        sp += pk;
        sq += new[k].exp();
    }
    let p_rest = if 1.0 - sp > 0.0 { 1.0 - sp } else { 0.0 };
    let q_rest = if 1.0 - sq > 0.0 { 1.0 - sq } else { 0.0 };
    let rest = if p_rest == 0.0 {
        0.0
    } else {
        let q_floor = if q_rest < 1e-12 { 1e-12 } else { q_rest };
        p_rest * (p_rest.ln() - q_floor.ln())
    };
    let d = head + rest;
    if d > 0.0 { d } else { 0.0 }
}

/// w_t of the t-th response token (t from 1) of a row of T response tokens.
pub fn ref_weight(rule: &Rule, t: usize, row_len: usize) -> f64 {
    let (w_min, horizon) = match *rule {
        Rule::Cppo {
            w_min,
            horizon,
            shuffle_seed,
            ..
        }
        | Rule::CppoSoft {
            w_min,
            horizon,
            shuffle_seed,
            ..
        } => {
            assert!(
                shuffle_seed.is_none(),
                "the reference has no weight shuffle"
            );
            (w_min, horizon)
        }
        _ => return 1.0,
    };
    let h = horizon.unwrap_or(row_len);
    if h <= 1 {
        return 1.0;
    }
    let frac = (t as f64 - 1.0) / (h as f64 - 1.0);
    let w = 1.0 - (1.0 - w_min) * frac;
    if horizon.is_some() && w < w_min {
        w_min
    } else {
        w
    }
}

/// ρ = exp(clamp(logp − logp_old, −20, 20)).
pub fn ref_ratio(lp: f64, lq: f64) -> f64 {
    (lp - lq).clamp(-20.0, 20.0).exp()
}

/// One kept token's objective: (l, g, branch, branch margin).
fn ref_objective(obj: &Objective, rho: f64, a: f64, lp: f64) -> (f64, f64, u8, f64) {
    match *obj {
        Objective::Surrogate => (-rho * a, -rho * a, 0, f64::INFINITY),
        Objective::DetachedIs { ratio_cap } => {
            let wt = if rho < ratio_cap { rho } else { ratio_cap };
            (-wt * a * lp, -wt * a, 0, f64::INFINITY)
        }
        Objective::PpoClip {
            eps_low,
            eps_high,
            dual_clip,
        } => {
            let lo = 1.0 - eps_low;
            let hi = 1.0 + eps_high;
            let clipped_rho = if rho < lo {
                lo
            } else if rho > hi {
                hi
            } else {
                rho
            };
            let unclipped = -rho * a;
            let clipped = -clipped_rho * a;
            // The max of the two; the unclipped branch (with its gradient) unless the
            // clipped one is strictly larger.
            let (mut l, mut g, mut br) = if clipped > unclipped {
                (clipped, 0.0, 1)
            } else {
                (unclipped, unclipped, 0)
            };
            let mut margin = gap(rho, lo).min(gap(rho, hi));
            if let Some(c) = dual_clip
                && a < 0.0
            {
                let cap = -c * a;
                margin = margin.min(gap(cap, l));
                if cap < l {
                    l = cap;
                    g = 0.0;
                    br = 2;
                }
            }
            (l, g, br, margin)
        }
        Objective::Cispo { eps_high } => {
            let cap = 1.0 + eps_high;
            let wt = if rho < cap { rho } else { cap };
            (-wt * a * lp, -wt * a, u8::from(rho > cap), f64::INFINITY)
        }
        Objective::Gspo { .. } | Objective::Gmpo { .. } | Objective::Minpro { .. } => {
            unreachable!("row-dependent objectives are evaluated in the row loop")
        }
        Objective::Sapo { tau_pos, tau_neg } => {
            // f(ρ) = (4/τ) σ(τ(ρ − 1)), f'(ρ) = 4 σ (1 − σ); l = −A f(ρ), dl/dlogp = −A f'(ρ) ρ.
            let tau = if a > 0.0 { tau_pos } else { tau_neg };
            let sig = 1.0 / (1.0 + (-tau * (rho - 1.0)).exp());
            (
                -a * 4.0 / tau * sig,
                -a * 4.0 * sig * (1.0 - sig) * rho,
                0,
                f64::INFINITY,
            )
        }
    }
}

/// The KL penalty's (l, g) with x = logp_ref − logp.
pub fn ref_kl(kl: &KlPenalty, lp: f64, lr: f64) -> (f64, f64) {
    let beta = kl.coef;
    let x = lr - lp;
    match kl.estimator {
        KlEstimator::K1 => (-beta * x, beta),
        KlEstimator::K2 => (beta * x * x / 2.0, -beta * x),
        // e^x − x − 1 and 1 − e^x through exp_m1: both vanish to second and first order
        // at x = 0, where exp(x) − 1 would lose all digits.
        KlEstimator::K3 => (beta * (x.exp_m1() - x), -beta * x.exp_m1()),
    }
}

/// The reference: SPEC.md sections 2 to 6, token by token.
///
/// # Panics
///
/// On invalid input (the reference is only given valid cases).
pub fn reference(case: &Case<f64>) -> Reference {
    let cfg = &case.cfg;
    let (b, l) = case.shape();
    let zeros = || Array2::<f64>::zeros((b, l));
    let mut r = Reference {
        divergence: zeros(),
        weight: zeros(),
        threshold: zeros(),
        keep: Array2::from_elem((b, l), false),
        reason: Array2::zeros((b, l)),
        token_loss: zeros(),
        grad: zeros(),
        loss: 0.0,
        loss_scale: 0.0,
        agg: zeros(),
        margin: Array2::from_elem((b, l), f64::INFINITY),
        branch: Array2::zeros((b, l)),
        rho: zeros(),
    };

    // Counts, and the denominators of SPEC section 6.
    let lens = case.row_lengths();
    let n_tok: usize = lens.iter().sum();
    let n_seq = lens.iter().filter(|&&t| t > 0).count();
    let n_tok = cfg.num_tokens.map_or(n_tok as f64, |n| n as f64);
    let n_seq = cfg.num_seqs.map_or(n_seq as f64, |n| n as f64);
    let z = cfg.norm_length.unwrap_or(l) as f64;
    let inv = |d: f64| if d > 0.0 { 1.0 / d } else { 0.0 };

    let is_trm = matches!(cfg.rule, Rule::TrmMax { .. } | Rule::TrmAvg { .. });
    let mut sum_all = 0.0; // Σ m l over the batch
    let mut sum_row_means = 0.0; // Σ_rows (Σ_t m l / T_row)

    for i in 0..b {
        let cols: Vec<usize> = (0..l).filter(|&j| case.mask[[i, j]]).collect();
        let t_row = cols.len();
        if t_row == 0 {
            continue;
        }
        // Divergences first (TRM needs the whole row's).
        let mut d = Vec::with_capacity(t_row);
        for &j in &cols {
            let lp = read_logprob(case.logp[[i, j]]);
            let lq = read_logprob(case.logp_old[[i, j]]);
            let dj = match cfg.divergence {
                Divergence::K2 => {
                    let r = (lp - lq).clamp(-20.0, 20.0);
                    r * r / 2.0
                }
                Divergence::K3 => {
                    let r = (lp - lq).clamp(-20.0, 20.0);
                    r.exp() - 1.0 - r
                }
                Divergence::BinaryTv => ref_binary_tv(lp, lq),
                Divergence::BinaryKl => ref_binary_kl(lp, lq),
                Divergence::TopkTv | Divergence::TopkKl => {
                    let (o, n) = case.topk.as_ref().expect("top-K arrays");
                    let kk = o.dim().2;
                    let old: Vec<f64> = (0..kk).map(|k| read_logprob(o[[i, j, k]])).collect();
                    let new: Vec<f64> = (0..kk).map(|k| read_logprob(n[[i, j, k]])).collect();
                    if cfg.divergence == Divergence::TopkTv {
                        ref_topk_tv(&old, &new)
                    } else {
                        ref_topk_kl(&old, &new)
                    }
                }
            };
            d.push(dj);
        }
        let trm_stat = match cfg.rule {
            Rule::TrmMax { .. } => d.iter().fold(0.0f64, |m, &x| if x > m { x } else { m }),
            Rule::TrmAvg { .. } => d.iter().sum::<f64>() / t_row as f64,
            _ => f64::NAN,
        };
        // GSPO's s and GMPO's R and mean advantage, over the row's response tokens.
        let r_of = |j: usize| {
            (read_logprob(case.logp[[i, j]]) - read_logprob(case.logp_old[[i, j]]))
                .clamp(-20.0, 20.0)
        };
        let gmpo_tilde = |r: f64, a: f64, lo: f64, hi: f64| -> (f64, bool) {
            // sgn(A) · min(sgn(A) r, sgn(A) clamp(r, −lo, hi)); unclipped when the min is r.
            let c = r.max(-lo).min(hi);
            let sg = if a > 0.0 {
                1.0
            } else if a < 0.0 {
                -1.0
            } else {
                0.0
            };
            if sg == 0.0 {
                (0.0, true)
            } else if sg * r <= sg * c {
                (r, true)
            } else {
                (c, false)
            }
        };
        let seq_ratio = match cfg.objective {
            Objective::Gspo { .. } => {
                let mean = cols.iter().map(|&j| r_of(j)).sum::<f64>() / t_row as f64;
                mean.min(10.0).exp()
            }
            Objective::Gmpo { eps_low, eps_high } => {
                let sum: f64 = cols
                    .iter()
                    .map(|&j| gmpo_tilde(r_of(j), case.adv_at(i, j), eps_low, eps_high).0)
                    .sum();
                (sum / t_row as f64).exp()
            }
            _ => f64::NAN,
        };
        let adv_mean = cols.iter().map(|&j| case.adv_at(i, j)).sum::<f64>() / t_row as f64;
        let a_t = match cfg.aggregation {
            Aggregation::TokenMean => inv(n_tok),
            Aggregation::SeqMeanTokenMean => inv(n_seq) / t_row as f64,
            Aggregation::SeqMeanTokenSum => inv(n_seq),
            Aggregation::SeqMeanTokenSumNorm => inv(n_seq * z),
        };

        let mut min_run = f64::INFINITY; // MinPRO: min ρ over the response tokens so far
        let mut s_prev = 0.0f64; // S_{t−1}
        let mut w_prev = 0.0f64; // W_{t−1}
        let mut row_sum = 0.0;
        for (idx, &j) in cols.iter().enumerate() {
            let t = idx + 1;
            let lp = read_logprob(case.logp[[i, j]]);
            let lq = read_logprob(case.logp_old[[i, j]]);
            let a = case.adv_at(i, j);
            assert!(a.is_finite(), "the reference was given advantage {a}");
            let rho = ref_ratio(lp, lq);
            let away = a * (rho - 1.0) > 0.0;
            let w = ref_weight(&cfg.rule, t, t_row);
            let dj = d[idx];

            // (feasible, failure code, threshold output, decision margin)
            let (feasible, fail, threshold, mut margin) = match cfg.rule {
                Rule::None => (true, 3u8, f64::NAN, f64::INFINITY),
                Rule::Ratio { eps_low, eps_high } => {
                    let lo = 1.0 - eps_low;
                    let hi = 1.0 + eps_high;
                    (
                        lo <= rho && rho <= hi,
                        3,
                        f64::NAN,
                        gap(rho, lo).min(gap(rho, hi)),
                    )
                }
                Rule::Dppo { delta } => (dj <= delta, 3, delta, gap(dj, delta)),
                Rule::Cppo { delta, delta_b, .. } | Rule::CppoSoft { delta, delta_b, .. } => {
                    let wd = w * dj;
                    let token_ok = wd <= delta;
                    match delta_b {
                        None => (token_ok, 3, delta, gap(wd, delta)),
                        Some(db) => {
                            let s_t = s_prev + wd;
                            let budget = delta + db * w_prev;
                            let budget_ok = s_t <= budget;
                            let c = if delta < budget - s_prev {
                                delta
                            } else {
                                budget - s_prev
                            };
                            (
                                token_ok && budget_ok,
                                if token_ok { 4 } else { 3 },
                                c,
                                gap(wd, delta).min(gap(s_t, budget)),
                            )
                        }
                    }
                }
                Rule::TrmMax { delta } | Rule::TrmAvg { delta } => {
                    (trm_stat <= delta, 3, delta, gap(trm_stat, delta))
                }
            };
            s_prev += w * dj;
            w_prev += w;

            let reason = if feasible {
                1
            } else if !away && !is_trm {
                2
            } else {
                fail
            };
            if !feasible && !is_trm && a != 0.0 && lp != lq {
                margin = margin.min(gap(rho, 1.0));
            }
            let keep = reason == 1 || reason == 2;

            let (lo, go, branch, obj_margin) = match cfg.objective {
                Objective::Gspo { eps_low, eps_high } => ref_objective(
                    &Objective::PpoClip {
                        eps_low,
                        eps_high,
                        dual_clip: None,
                    },
                    seq_ratio,
                    a,
                    lp,
                ),
                Objective::Gmpo { eps_low, eps_high } => {
                    let (_, unclipped) = gmpo_tilde(r_of(j), a, eps_low, eps_high);
                    let g = if unclipped {
                        -adv_mean * seq_ratio
                    } else {
                        0.0
                    };
                    (-a * seq_ratio, g, u8::from(!unclipped), f64::INFINITY)
                }
                Objective::Minpro {
                    include_current,
                    clip,
                    ..
                } => {
                    let with_t = if rho < min_run { rho } else { min_run };
                    let m = if include_current { with_t } else { min_run };
                    let m = if m.is_infinite() { 1.0 } else { m };
                    let cap = clip.map_or(f64::INFINITY, |c| 1.0 + c);
                    let omega = if m > cap { cap } else { m };
                    min_run = with_t;
                    (
                        -omega * a * lp,
                        -omega * a,
                        u8::from(m > cap),
                        f64::INFINITY,
                    )
                }
                _ => ref_objective(&cfg.objective, rho, a, lp),
            };
            // The share of its term a token keeps: all or nothing, except under cppo_soft,
            // where an away-moving token keeps σ((c_t − w_t D_t)/τ).
            let share = match cfg.rule {
                Rule::CppoSoft { tau, .. } if away => {
                    1.0 / (1.0 + (-(threshold - w * dj) / tau).exp())
                }
                _ => f64::from(u8::from(keep)),
            };
            let (mut tl, mut g) = if share > 0.0 {
                (share * lo, share * go)
            } else {
                (0.0, 0.0)
            };
            if keep {
                margin = margin.min(obj_margin);
            }
            if let Some(kl) = &cfg.kl {
                let lr = read_logprob(case.logp_ref.as_ref().expect("logp_ref")[[i, j]]);
                let (kl_l, kl_g) = ref_kl(kl, lp, lr);
                tl += kl_l;
                g += kl_g;
            }

            r.divergence[[i, j]] = dj;
            r.weight[[i, j]] = w;
            r.threshold[[i, j]] = threshold;
            r.keep[[i, j]] = keep;
            r.reason[[i, j]] = reason;
            r.token_loss[[i, j]] = tl;
            r.grad[[i, j]] = g * a_t;
            r.agg[[i, j]] = a_t;
            r.margin[[i, j]] = margin;
            r.branch[[i, j]] = if keep { branch } else { 0 };
            r.rho[[i, j]] = rho;
            r.loss_scale += (a_t * tl).abs();
            row_sum += tl;
        }
        sum_all += row_sum;
        sum_row_means += row_sum / t_row as f64;
    }

    r.loss = match cfg.aggregation {
        Aggregation::TokenMean => sum_all * inv(n_tok),
        Aggregation::SeqMeanTokenMean => sum_row_means * inv(n_seq),
        Aggregation::SeqMeanTokenSum => sum_all * inv(n_seq),
        Aggregation::SeqMeanTokenSumNorm => sum_all * inv(n_seq * z),
    };
    r
}

// ---------------------------------------------------------------------------------------
// Comparisons
// ---------------------------------------------------------------------------------------

/// |a − b| ≤ rel · max(|a|, |b|) + abs, with NaN equal to NaN only.
pub fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    a == b || (a - b).abs() <= rel * a.abs().max(b.abs()) + abs
}

/// Every element close, or a message naming the first that is not.
pub fn check_close<F: Float>(
    what: &str,
    got: &Array2<F>,
    want: &Array2<f64>,
    rel: f64,
    abs: f64,
) -> Result<(), String> {
    if got.dim() != want.dim() {
        return Err(format!("{what}: shape {:?} vs {:?}", got.dim(), want.dim()));
    }
    for ((ij, g), &w) in got.indexed_iter().zip(want.iter()) {
        if !close(g.to_f64(), w, rel, abs) {
            return Err(format!("{what}{ij:?}: got {:e}, want {w:e}", g.to_f64()));
        }
    }
    Ok(())
}

/// Bit-for-bit equality of two float arrays (NaN payloads included).
pub fn same_bits<F: Float>(what: &str, a: &Array2<F>, b: &Array2<F>) -> Result<(), String> {
    if a.dim() != b.dim() {
        return Err(format!("{what}: shape {:?} vs {:?}", a.dim(), b.dim()));
    }
    for ((ij, x), y) in a.indexed_iter().zip(b.iter()) {
        if x.to_f64().to_bits() != y.to_f64().to_bits() {
            return Err(format!("{what}{ij:?}: {x:?} vs {y:?}"));
        }
    }
    Ok(())
}

/// Every output of two evaluations bit for bit, the loss included.
pub fn same_eval<F: Float>(a: &Evaluation<F>, b: &Evaluation<F>) -> Result<(), String> {
    if a.loss.to_bits() != b.loss.to_bits() {
        return Err(format!("loss: {:e} vs {:e}", a.loss, b.loss));
    }
    let (x, y) = (&a.outputs, &b.outputs);
    same_bits("divergence", &x.divergence, &y.divergence)?;
    same_bits("weight", &x.weight, &y.weight)?;
    same_bits("threshold", &x.threshold, &y.threshold)?;
    same_bits("token_loss", &x.token_loss, &y.token_loss)?;
    same_bits("grad", &x.grad, &y.grad)?;
    if x.keep != y.keep {
        return Err("keep differs".into());
    }
    if x.reason != y.reason {
        return Err("reason differs".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A tiny deterministic generator, for large batches and garbage
// ---------------------------------------------------------------------------------------

/// splitmix64.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform in [0, 1) from a hash.
pub fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The values trainers leave in padding.
pub const GARBAGE: [f64; 12] = [
    f64::NAN,
    f64::NEG_INFINITY,
    f64::INFINITY,
    1e30,
    -1e30,
    5.0,
    -0.0,
    0.0,
    5e-5,
    -3.0,
    -f64::NAN,
    f64::MIN_POSITIVE,
];

/// A garbage value chosen by a hash of (seed, array, i, j, k).
pub fn garbage(seed: u64, arr: Arr, i: usize, j: usize, k: usize) -> f64 {
    let h = mix(seed ^ mix((arr as u64) << 48 ^ (i as u64) << 24 ^ (j as u64) << 8 ^ k as u64));
    GARBAGE[(h % GARBAGE.len() as u64) as usize]
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// Failures persist in `proptest-regressions/<name>.txt` at the crate root (committed).
pub fn persistence(name: &'static str) -> Option<Box<dyn FailurePersistence>> {
    Some(Box::new(FileFailurePersistence::Direct(name)))
}

/// A proptest config with `cases` cases and the crate's regression files.
pub fn proptest_config(cases: u32, regressions: &'static str) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: persistence(regressions),
        ..ProptestConfig::default()
    }
}

/// A config, and how much to add to the batch's own counts for the `num_tokens` and
/// `num_seqs` overrides (which must not be smaller than the batch's own counts).
#[derive(Clone, Copy, Debug)]
pub struct ConfigDraw {
    pub cfg: Config,
    pub extra_tokens: Option<u64>,
    pub extra_seqs: Option<u64>,
}

pub fn divergence_strategy() -> BoxedStrategy<Divergence> {
    prop_oneof![
        Just(Divergence::BinaryTv),
        Just(Divergence::BinaryKl),
        Just(Divergence::TopkTv),
        Just(Divergence::TopkKl),
        Just(Divergence::K2),
        Just(Divergence::K3),
    ]
    .boxed()
}

/// δ: mostly in [0.01, 0.6], sometimes tiny so that most tokens fail the test.
pub fn delta_strategy() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => 0.01f64..0.6,
        1 => 1e-4f64..0.01,
    ]
}

pub fn delta_b_strategy() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        2 => Just(None),
        1 => Just(Some(0.0)),
        5 => (0.0f64..0.3).prop_map(Some),
    ]
}

pub fn w_min_strategy() -> impl Strategy<Value = f64> {
    prop_oneof![1 => Just(1.0), 4 => 0.05f64..=1.0]
}

pub fn horizon_strategy() -> impl Strategy<Value = Option<usize>> {
    prop_oneof![3 => Just(None), 2 => (1usize..15).prop_map(Some)]
}

pub fn cppo_strategy() -> BoxedStrategy<Rule> {
    (
        delta_strategy(),
        delta_b_strategy(),
        w_min_strategy(),
        horizon_strategy(),
    )
        .prop_map(|(delta, delta_b, w_min, horizon)| Rule::Cppo {
            delta,
            delta_b,
            w_min,
            horizon,
            shuffle_seed: None,
        })
        .boxed()
}

pub fn rule_strategy() -> BoxedStrategy<Rule> {
    prop_oneof![
        1 => Just(Rule::None),
        2 => (0.0f64..0.5, 0.0f64..0.5)
            .prop_map(|(eps_low, eps_high)| Rule::Ratio { eps_low, eps_high }),
        2 => delta_strategy().prop_map(|delta| Rule::Dppo { delta }),
        5 => cppo_strategy(),
        2 => (cppo_strategy(), 0.001f64..0.5).prop_map(|(r, tau)| {
            let Rule::Cppo { delta, delta_b, w_min, horizon, .. } = r else { unreachable!() };
            Rule::CppoSoft { delta, delta_b, w_min, horizon, shuffle_seed: None, tau }
        }),
        1 => delta_strategy().prop_map(|delta| Rule::TrmMax { delta }),
        1 => delta_strategy().prop_map(|delta| Rule::TrmAvg { delta }),
    ]
    .boxed()
}

pub fn objective_strategy() -> BoxedStrategy<Objective> {
    prop_oneof![
        Just(Objective::Surrogate),
        (0.1f64..12.0).prop_map(|ratio_cap| Objective::DetachedIs { ratio_cap }),
        (
            0.0f64..0.5,
            0.0f64..0.5,
            prop_oneof![Just(None), (1.01f64..5.0).prop_map(Some)]
        )
            .prop_map(|(eps_low, eps_high, dual_clip)| Objective::PpoClip {
                eps_low,
                eps_high,
                dual_clip
            }),
        (0.0f64..0.5).prop_map(|eps_high| Objective::Cispo { eps_high }),
        (0.1f64..3.0, 0.1f64..3.0)
            .prop_map(|(tau_pos, tau_neg)| Objective::Sapo { tau_pos, tau_neg }),
    ]
    .boxed()
}

/// Every objective, the whole-row ones (GSPO, GMPO, MinPRO) included: the token-level
/// ones of [`objective_strategy`] most of the time.
pub fn objective_mix() -> BoxedStrategy<Objective> {
    prop_oneof![
        5 => objective_strategy(),
        1 => (0.0f64..0.01, 0.0f64..0.01)
            .prop_map(|(eps_low, eps_high)| Objective::Gspo { eps_low, eps_high }),
        1 => (0.0f64..1.0, 0.0f64..1.0)
            .prop_map(|(eps_low, eps_high)| Objective::Gmpo { eps_low, eps_high }),
        1 => (
            any::<bool>(),
            prop_oneof![Just(None), (0.0f64..0.5).prop_map(Some)],
            any::<bool>(),
        )
            .prop_map(|(include_current, clip, stop_gradient)| Objective::Minpro {
                include_current,
                clip,
                stop_gradient,
            }),
    ]
    .boxed()
}

pub fn aggregation_strategy() -> impl Strategy<Value = Aggregation> {
    prop_oneof![
        Just(Aggregation::TokenMean),
        Just(Aggregation::SeqMeanTokenMean),
        Just(Aggregation::SeqMeanTokenSum),
        Just(Aggregation::SeqMeanTokenSumNorm),
    ]
}

pub fn kl_estimator_strategy() -> impl Strategy<Value = KlEstimator> {
    prop_oneof![
        Just(KlEstimator::K1),
        Just(KlEstimator::K2),
        Just(KlEstimator::K3)
    ]
}

pub fn kl_strategy() -> impl Strategy<Value = Option<KlPenalty>> {
    prop_oneof![
        2 => Just(None),
        3 => (kl_estimator_strategy(), 0.0f64..1.0)
            .prop_map(|(estimator, coef)| Some(KlPenalty { estimator, coef })),
    ]
}

/// Any valid config: every divergence, rule, objective, aggregation and KL estimator,
/// with and without `norm_length` and count overrides.
pub fn config_strategy() -> impl Strategy<Value = ConfigDraw> {
    config_with(rule_strategy(), objective_strategy())
}

/// A config with the given rule and objective strategies, everything else drawn.
pub fn config_with(
    rule: impl Strategy<Value = Rule>,
    objective: impl Strategy<Value = Objective>,
) -> impl Strategy<Value = ConfigDraw> {
    (
        divergence_strategy(),
        rule,
        objective,
        aggregation_strategy(),
        prop_oneof![3 => Just(None), 1 => (1usize..20).prop_map(Some)],
        prop_oneof![3 => Just(None), 1 => (0u64..50).prop_map(Some)],
        prop_oneof![3 => Just(None), 1 => (0u64..5).prop_map(Some)],
        kl_strategy(),
    )
        .prop_map(
            |(divergence, rule, objective, aggregation, norm_length, et, es, kl)| ConfigDraw {
                cfg: Config {
                    divergence,
                    rule,
                    objective,
                    aggregation,
                    norm_length,
                    num_tokens: None,
                    num_seqs: None,
                    kl,
                },
                extra_tokens: et,
                extra_seqs: es,
            },
        )
}

/// Batch shape and content options.
#[derive(Clone, Debug)]
pub struct Shape {
    pub rows: RangeInclusive<usize>,
    pub cols: RangeInclusive<usize>,
    /// Keep |logp − logp_old| below 19 and logp below −1e-3 (for finite differences).
    pub smooth: bool,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            rows: 0..=6,
            cols: 0..=9,
            smooth: false,
        }
    }
}

/// Random draws for one token, mapped to values by `build`.
type TokenRaw = (u32, [f64; 6]);
/// Random draws for one token's top-K arrays.
type TopkRaw = (u32, [f64; 11]);
/// Random draws for one row: (mask density selector, advantage selector, advantage).
type RowRaw = (u8, u8, f64);

/// Valid cases under configs from `cfg`.
pub fn case_with(
    cfg: impl Strategy<Value = ConfigDraw>,
    shape: Shape,
) -> impl Strategy<Value = Case<f64>> {
    let smooth = shape.smooth;
    (
        cfg,
        shape.rows,
        shape.cols,
        1usize..=5,
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_flat_map(move |(draw, b, l, k, per_row, extra_topk, seed)| {
            let with_topk = draw.cfg.divergence.needs_topk() || extra_topk;
            let n = b * l;
            (
                Just(draw),
                Just((b, l, if with_topk { k } else { 0 }, per_row, seed, smooth)),
                proptest::collection::vec((any::<u32>(), prop::array::uniform6(0.0f64..1.0)), n),
                proptest::collection::vec((any::<u8>(), any::<u8>(), 0.0f64..1.0), b),
                proptest::collection::vec(
                    (any::<u32>(), prop::array::uniform11(0.0f64..1.0)),
                    if with_topk { n } else { 0 },
                ),
            )
        })
        .prop_map(|(draw, params, tokens, rows, topk)| build(draw, params, &tokens, &rows, &topk))
}

/// Wide rows: the engine works in blocks of columns, so rows must cross block
/// boundaries (at 64 and 128 columns today) with their prefix state.
pub fn wide() -> Shape {
    Shape {
        rows: 0..=3,
        cols: 56..=150,
        smooth: false,
    }
}

/// Valid cases under any config: mostly small batches, a quarter with wide rows.
pub fn any_case() -> impl Strategy<Value = Case<f64>> {
    prop_oneof![
        3 => case_with(config_strategy(), Shape::default()),
        1 => case_with(config_strategy(), wide()),
    ]
}

fn reflect(x: f64) -> f64 {
    if x > 0.9e-4 { -x } else { x }
}

fn build(
    draw: ConfigDraw,
    (b, l, kk, per_row, seed, smooth): (usize, usize, usize, bool, u64, bool),
    tokens: &[TokenRaw],
    rows: &[RowRaw],
    topk: &[TopkRaw],
) -> Case<f64> {
    let mut mask = Array2::from_elem((b, l), false);
    let mut logp = Array2::zeros((b, l));
    let mut logp_old = Array2::zeros((b, l));
    let mut adv_tok = Array2::zeros((b, l));
    let mut logp_ref = Array2::zeros((b, l));
    let mut adv_row = Array1::zeros(b);
    let adv_value = |sel: u8, u: f64| {
        if sel.is_multiple_of(5) {
            0.0
        } else {
            (u - 0.5) * 4.0
        }
    };
    for i in 0..b {
        let (dens, asel, au) = rows[i];
        let density = [0.0, 1.0, 0.6, 0.6, 0.85, 0.85][dens as usize % 6];
        adv_row[i] = adv_value(asel, au);
        for j in 0..l {
            let (sel, u) = tokens[i * l + j];
            mask[[i, j]] = u[0] < density;
            // logp_old
            let lq = match sel % 20 {
                0 => 0.0,
                1 => 1e-6 + u[1] * 0.89e-4,
                2 if !smooth => -20.0 - u[1] * 20.0,
                // Probabilities that underflow to subnormals or 0.
                19 if !smooth => -700.0 - u[1] * 1000.0,
                3..=6 => -u[1] * 0.1,
                _ => -u[1] * 6.0,
            };
            // logp, relative to it
            let lp = match (sel / 20) % 10 {
                0 | 1 => lq,
                2..=5 => reflect(lq + (u[2] - 0.5) * 0.4),
                6 | 7 => reflect(lq + (u[2] - 0.5) * 4.0),
                8 => u[2] * 0.9e-4,
                _ if !smooth && u[5] < 0.25 => -700.0 - u[2] * 1000.0,
                _ if !smooth => -u[2] * 30.0,
                _ => reflect(lq + (u[2] - 0.5) * 8.0),
            };
            let (lq, lp) = if smooth {
                // Away from the (0, 1e-4] → 0 fold, and from the ratio clamp.
                let lq = lq.min(-2e-3);
                let lp = lp.min(-2e-3);
                (lq, lp.clamp(lq - 18.0, lq + 18.0))
            } else {
                (lq, lp)
            };
            logp_old[[i, j]] = lq;
            logp[[i, j]] = lp;
            adv_tok[[i, j]] = adv_value((sel >> 10) as u8, u[3]);
            logp_ref[[i, j]] = reflect(lp + (u[4] - 0.5) * 3.0);
        }
    }

    let topk = (kk > 0).then(|| {
        let mut old = Array3::zeros((b, l, kk));
        let mut new = Array3::zeros((b, l, kk));
        for i in 0..b {
            for j in 0..l {
                let (sel, u) = topk[i * l + j];
                // Rollout masses from exponential weights; the rest bucket is empty for
                // a third of the tokens (masses summing to 1 up to rounding).
                let wts: Vec<f64> = (0..kk).map(|k| -(1.0 - u[k]).ln() + 1e-3).collect();
                let rest = if sel.is_multiple_of(3) {
                    0.0
                } else {
                    -(1.0 - u[5]).ln() * 2.0
                };
                let total: f64 = wts.iter().sum::<f64>() + rest;
                for k in 0..kk {
                    let lpk = (wts[k] / total).ln();
                    let noise = match (sel >> 4) % 6 {
                        0 => 0.0,
                        1 | 2 => (u[6 + k] - 0.5) * 0.4,
                        3 | 4 => (u[6 + k] - 0.5) * 4.0,
                        // Q_k underflows: the top-K KL head term becomes huge.
                        _ => -700.0 * u[6 + k],
                    };
                    old[[i, j, k]] = lpk.min(0.0);
                    new[[i, j, k]] = (lpk + noise).min(0.0);
                }
            }
        }
        (old, new)
    });

    let case = Case {
        cfg: draw.cfg,
        logp,
        logp_old,
        adv: if per_row {
            Adv::Row(adv_row)
        } else {
            Adv::Token(adv_tok)
        },
        mask,
        topk,
        logp_ref: None,
    };
    finish_drawn(case, &draw, logp_ref, seed)
}

/// Completes a drawn case: the draw's count overrides on top of the case's own counts,
/// `logp_ref` where the config reads it (and for one seed in three), and garbage in every
/// padding slot (trainers pad with anything).
pub fn finish_drawn(
    mut case: Case<f64>,
    draw: &ConfigDraw,
    logp_ref: Array2<f64>,
    seed: u64,
) -> Case<f64> {
    let lens: Vec<u64> = case
        .mask
        .rows()
        .into_iter()
        .map(|r| r.iter().filter(|&&m| m).count() as u64)
        .collect();
    let tokens: u64 = lens.iter().sum();
    let seqs = lens.iter().filter(|&&t| t > 0).count() as u64;
    case.cfg.num_tokens = draw.extra_tokens.map(|e| tokens + e);
    case.cfg.num_seqs = draw.extra_seqs.map(|e| seqs + e);
    case.logp_ref = (case.cfg.kl.is_some() || seed.is_multiple_of(3)).then_some(logp_ref);
    case.fill_padding(|arr, i, j, k| garbage(seed, arr, i, j, k));
    case
}

/// A large case from a seed, without proptest's per-value draws (for the thread-count
/// properties, which need batches of several leaf blocks).
pub fn big_case(cfg: ConfigDraw, b: usize, l: usize, k: usize, seed: u64) -> Case<f64> {
    let n = b * l;
    let h = |x: u64| mix(seed ^ mix(x));
    let tokens: Vec<TokenRaw> = (0..n as u64)
        .map(|t| {
            let mut u = [0.0; 6];
            for (c, v) in u.iter_mut().enumerate() {
                *v = unit(h(t * 64 + c as u64));
            }
            (h(t * 64 + 63) as u32, u)
        })
        .collect();
    let rows: Vec<RowRaw> = (0..b as u64)
        .map(|r| {
            let x = h((1 << 40) | r);
            (x as u8, (x >> 8) as u8, unit(h((2 << 40) | r)))
        })
        .collect();
    let topk: Vec<TopkRaw> = if k > 0 {
        (0..n as u64)
            .map(|t| {
                let mut u = [0.0; 11];
                for (c, v) in u.iter_mut().enumerate() {
                    *v = unit(h((3 << 40) | (t * 64 + c as u64)));
                }
                (h((4 << 40) | t) as u32, u)
            })
            .collect()
    } else {
        Vec::new()
    };
    build(
        cfg,
        (b, l, k, seed.is_multiple_of(2), seed, false),
        &tokens,
        &rows,
        &topk,
    )
}
