//! The [`Tally`] and [`Diagnostics`] that [`evaluate`](cppo::evaluate) returns, against
//! a recount done here in plain scalar Rust, one token at a time, from the inputs and the
//! per-token outputs (`reason`, `keep`, `divergence`, `threshold`, `token_loss`).
//!
//! Why: the kernel adds each 64-column block to the tally with vectorized passes (every
//! count in one pass of comparisons, sums in 8 interleaved lanes, min/max of D_t and ρ
//! folded in 8 lanes, and a fast path that books a whole block to one position decile
//! when its response tokens lie in one). The per-token outputs are checked against the
//! spec elsewhere (`tests/properties.rs`); this file checks that the numbers a trainer
//! logs agree with those outputs, so a slip in the block bookkeeping (a lane dropped, a
//! padding column counted, a decile boundary off by one, a block booked to the wrong
//! decile) fails here.
//!
//! What is compared, over the response tokens (mask on) of every row:
//!
//! - **exactly**: `tokens`, `seqs`, `by_reason` (index 0 stays 0), `pos_adv`, `neg_adv`
//!   and their masked counts (masked = reason 3 or 4), `threshold_count` (finite
//!   thresholds), `decile_tokens` and `decile_masked` (token t of a row of T response
//!   tokens, t from 1, is in decile ⌊10 (t − 1)/T⌋), `divergence_max` (the max of the
//!   `divergence` output; for f32 the tally's max rounded to f32, rounding being
//!   monotonic); `clipped` is 0 for objectives without a clip and at most `tokens`;
//! - **to 1e-12 relative** of the sum of the terms' magnitudes (the engine adds in
//!   another order): `divergence_sum`, `threshold_sum`, `ratio_sum`, `k1_sum` = Σ −r, and
//!   the loss = Σ_rows a_row Σ_t token_loss with a_row the aggregation weight of the
//!   row (every mode, count overrides included); for f32 the outputs are rounded, so the
//!   tolerance grows by the f32 rounding of each term;
//! - **to 1e-9 relative**, plus a few ulp of each term: `k3_sum` = Σ (ρ − 1 − r), where
//!   r = clamp(min(logp, 0) − min(logp_old, 0), ±20) and ρ = eʳ (std's `exp` here, the
//!   engine's own SIMD exp, or p/q, there: few ulp apart, and ρ − 1 − r cancels);
//! - **to 1e-12 relative**: `ratio_min`, `ratio_max`;
//! - [`Diagnostics`]: every field equal to its formula (from the module docs of
//!   `stats`, written out here) applied to the checked tally; `Evaluation::loss` equal to
//!   the tally's loss;
//! - f32 inputs give a tally and diagnostics equal (`==`) to those of the same values
//!   widened to f64 (the crate computes in f64).
//!
//! The generator makes rows up to 1100 columns (several 64-column blocks, and rows of
//! more than 640 response tokens, where whole blocks fall in one decile) with laid-out
//! masks: empty rows, full rows, a prompt then a response then padding, responses with
//! runs of holes (tool outputs), scattered masks and rows of a few tokens; garbage in the
//! padding; per-row or per-token advantages with zeros; every divergence (top-K arrays
//! with K from 1 to 5); rules cppo (with and without δ_b, shuffled weights), dppo, ratio,
//! trm_max and the rest; every objective and aggregation, KL penalties, count
//! overrides; `Par::Seq` and `Par::Rayon`. Two fixed batches add a hand-counted decile
//! example and a batch of several of the engine's leaf blocks of rows; a coverage test
//! checks that the generator reaches whole blocks in one decile, partial ones, blocks
//! that cross a decile boundary, empty rows and every reason code.

mod common;

use std::fmt::Debug;

use common::{
    Adv, Case, ConfigDraw, config_with, cppo_strategy, delta_strategy, finish_drawn, mix,
    objective_mix, proptest_config, rule_strategy, unit,
};
use cppo::ndarray::{Array1, Array2, Array3};
use cppo::stats::{BudgetStats, UnirlMetrics, VerlMetrics};
use cppo::{
    Aggregation, Config, CppoParams, Diagnostics, Divergence, Evaluation, Float, Objective,
    Outputs, Par, Rule, Tally,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{RngAlgorithm, TestCaseResult, TestRng, TestRunner};

const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/proptest-regressions/diagnostics.txt"
);

/// The engine's column block (the kernel's `BLK`), for the coverage test only.
const BLOCK: usize = 64;

/// Relative tolerance of sums the engine adds in another order.
const REL: f64 = 1e-12;

// ---------------------------------------------------------------------------------------
// Batches
// ---------------------------------------------------------------------------------------

/// How one row's response mask is laid out (fractions are of the row's width).
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// No response token.
    Empty,
    /// Every column.
    Full,
    /// A prompt, a contiguous response of `len` of the rest, then padding.
    Span { start: f64, len: f64 },
    /// A prompt, then a response to the end with `runs` runs of holes (tool outputs),
    /// each up to `hole` of the width.
    Tool { start: f64, runs: u8, hole: f64 },
    /// Each column on with probability `density`.
    Scatter { density: f64 },
    /// At most `n` response tokens anywhere.
    Few { n: u8 },
}

fn layout_strategy() -> impl Strategy<Value = Layout> {
    prop_oneof![
        1 => Just(Layout::Empty),
        2 => Just(Layout::Full),
        2 => (0.0f64..0.6, 0.3f64..=1.0).prop_map(|(start, len)| Layout::Span { start, len }),
        2 => (0.0f64..0.4, 1u8..6, 0.0f64..0.1)
            .prop_map(|(start, runs, hole)| Layout::Tool { start, runs, hole }),
        2 => (0.2f64..1.0).prop_map(|density| Layout::Scatter { density }),
        1 => (1u8..=12).prop_map(|n| Layout::Few { n }),
    ]
}

/// A hash of (seed, row, column, channel).
fn hash(seed: u64, i: usize, j: usize, c: u64) -> u64 {
    mix(seed ^ mix(((i as u64) << 40) ^ ((j as u64) << 8) ^ c))
}

/// A uniform in [0, 1) from (seed, row, column, channel).
fn uni(seed: u64, i: usize, j: usize, c: u64) -> f64 {
    unit(hash(seed, i, j, c))
}

/// A log-prob in (0, 0.9e-4] is read as 0; larger positive values are not valid.
fn reflect(x: f64) -> f64 {
    if x > 0.9e-4 { -x } else { x }
}

/// Row `i`'s mask under `layout`, `l` columns wide.
fn mask_row(layout: Layout, seed: u64, i: usize, l: usize) -> Vec<bool> {
    let mut m = vec![false; l];
    let at = |f: f64| ((f * l as f64) as usize).min(l);
    match layout {
        Layout::Empty => {}
        Layout::Full => m.fill(true),
        Layout::Span { start, len } => {
            let s = at(start);
            let n = ((len * (l - s) as f64).ceil() as usize).min(l - s);
            m[s..s + n].fill(true);
        }
        Layout::Tool { start, runs, hole } => {
            let s = at(start);
            m[s..].fill(true);
            for r in 0..usize::from(runs) {
                let a = s + ((l - s) as f64 * uni(seed, i, r, 100)) as usize;
                let n = 1 + (hole * l as f64 * uni(seed, i, r, 101)) as usize;
                let b = (a + n).min(l);
                m[a.min(l)..b].fill(false);
            }
        }
        Layout::Scatter { density } => {
            for (j, x) in m.iter_mut().enumerate() {
                *x = uni(seed, i, j, 102) < density;
            }
        }
        Layout::Few { n } => {
            if l > 0 {
                for r in 0..usize::from(n) {
                    m[(hash(seed, i, r, 103) % l as u64) as usize] = true;
                }
            }
        }
    }
    m
}

/// A valid batch of `layouts.len()` rows of `l` columns under `draw`'s config, values
/// from hashes of `seed` (the value distribution of `tests/common`: log-probs at 0, in
/// the (0, 1e-4] fold, beyond the ±20 ratio clamp, underflowing to 0; top-K masses with
/// and without a rest bucket), garbage in the padding.
fn make_case(
    draw: ConfigDraw,
    layouts: &[Layout],
    l: usize,
    kk: usize,
    per_row: bool,
    seed: u64,
) -> Case<f64> {
    let b = layouts.len();
    let mut mask = Array2::from_elem((b, l), false);
    for (i, &layout) in layouts.iter().enumerate() {
        for (j, on) in mask_row(layout, seed, i, l).into_iter().enumerate() {
            mask[[i, j]] = on;
        }
    }
    let adv_value = |h: u64, u: f64| {
        if h.is_multiple_of(5) {
            0.0
        } else {
            (u - 0.5) * 4.0
        }
    };
    let mut logp = Array2::zeros((b, l));
    let mut logp_old = Array2::zeros((b, l));
    let mut logp_ref = Array2::zeros((b, l));
    let mut adv_tok = Array2::zeros((b, l));
    let adv_row = Array1::from_shape_fn(b, |i| {
        adv_value(hash(seed, i, 0, 200), uni(seed, i, 0, 201))
    });
    for i in 0..b {
        for j in 0..l {
            let u = |c| uni(seed, i, j, c);
            let lq = match hash(seed, i, j, 0) % 20 {
                0 => 0.0,
                1 => 1e-6 + u(1) * 0.89e-4,
                2 => -20.0 - u(1) * 20.0,
                3 => -700.0 - u(1) * 1000.0,
                4..=7 => -u(1) * 0.1,
                _ => -u(1) * 6.0,
            };
            let lp = match hash(seed, i, j, 2) % 10 {
                0 | 1 => lq,
                2..=5 => reflect(lq + (u(3) - 0.5) * 0.4),
                6 | 7 => reflect(lq + (u(3) - 0.5) * 4.0),
                8 => u(3) * 0.9e-4,
                _ if u(4) < 0.25 => -700.0 - u(3) * 1000.0,
                _ => -u(3) * 30.0,
            };
            logp_old[[i, j]] = lq;
            logp[[i, j]] = lp;
            logp_ref[[i, j]] = reflect(lp + (u(5) - 0.5) * 3.0);
            adv_tok[[i, j]] = adv_value(hash(seed, i, j, 6), u(7));
        }
    }
    let topk = (kk > 0).then(|| {
        let mut old = Array3::zeros((b, l, kk));
        let mut new = Array3::zeros((b, l, kk));
        for i in 0..b {
            for j in 0..l {
                let u = |c| uni(seed, i, j, c);
                let sel = hash(seed, i, j, 10);
                let wts: Vec<f64> = (0..kk)
                    .map(|k| -(1.0 - u(20 + k as u64)).ln() + 1e-3)
                    .collect();
                let rest = if sel.is_multiple_of(3) {
                    0.0
                } else {
                    -(1.0 - u(11)).ln() * 2.0
                };
                let total: f64 = wts.iter().sum::<f64>() + rest;
                for k in 0..kk {
                    let lpk = (wts[k] / total).ln();
                    let v = u(30 + k as u64);
                    let noise = match (sel >> 8) % 6 {
                        0 => 0.0,
                        1 | 2 => (v - 0.5) * 0.4,
                        3 | 4 => (v - 0.5) * 4.0,
                        _ => -700.0 * v,
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
        is_weights: None,
    };
    finish_drawn(case, &draw, logp_ref, seed)
}

/// Rules: cppo with and without a budget (and with shuffled weights), dppo, ratio,
/// trm_max, and a share of every rule.
fn rule_mix() -> BoxedStrategy<Rule> {
    let with_budget = |rule: Rule, delta_b: Option<f64>, seed: Option<u64>| match rule {
        Rule::Cppo(p) => Rule::Cppo(CppoParams {
            delta_b,
            shuffle_seed: seed,
            ..p
        }),
        other => other,
    };
    prop_oneof![
        3 => cppo_strategy(),
        2 => (cppo_strategy(), 0.0f64..0.3)
            .prop_map(move |(r, db)| with_budget(r, Some(db), None)),
        2 => cppo_strategy().prop_map(move |r| with_budget(r, None, None)),
        1 => (cppo_strategy(), 0.0f64..0.3, any::<u64>())
            .prop_map(move |(r, db, s)| with_budget(r, Some(db), Some(s))),
        2 => delta_strategy().prop_map(|delta| Rule::Dppo { delta }),
        2 => (0.0f64..0.5, 0.0f64..0.5)
            .prop_map(|(eps_low, eps_high)| Rule::Ratio { eps_low, eps_high }),
        2 => delta_strategy().prop_map(|delta| Rule::TrmMax { delta }),
        2 => rule_strategy(),
    ]
    .boxed()
}

/// A batch (0 to 4 rows, narrow, wide, or wider than ten blocks) and a scheduling.
fn case_strategy() -> impl Strategy<Value = (Case<f64>, Par)> {
    let width = prop_oneof![
        2 => 0usize..=70,
        4 => 60usize..=400,
        2 => 600usize..=1100,
    ];
    (
        config_with(rule_mix(), objective_mix()),
        width,
        prop::collection::vec(layout_strategy(), 0..=4),
        1usize..=5,
        any::<bool>(),
        any::<u64>(),
        prop_oneof![Just(Par::Seq), Just(Par::Rayon)],
    )
        .prop_map(|(draw, l, layouts, k, per_row, seed, par)| {
            let k = if draw.cfg.divergence.needs_topk() || seed.is_multiple_of(2) {
                k
            } else {
                0
            };
            (make_case(draw, &layouts, l, k, per_row, seed), par)
        })
}

// ---------------------------------------------------------------------------------------
// The recount
// ---------------------------------------------------------------------------------------

/// The tally recomputed token by token, with the magnitude of the terms behind each
/// float sum (for tolerances).
#[derive(Clone, Debug)]
struct Recount {
    tokens: u64,
    seqs: u64,
    by_reason: [u64; 5],
    pos_adv: u64,
    pos_adv_masked: u64,
    neg_adv: u64,
    neg_adv_masked: u64,
    divergence_sum: f64,
    divergence_abs: f64,
    divergence_max: f64,
    k1_sum: f64,
    k1_abs: f64,
    k3_sum: f64,
    /// A few ulp of each term ρ − 1 − r: the two exponentials differ by that much.
    k3_slack: f64,
    ratio_sum: f64,
    ratio_min: f64,
    ratio_max: f64,
    threshold_sum: f64,
    threshold_abs: f64,
    threshold_count: u64,
    decile_tokens: [u64; 10],
    decile_masked: [u64; 10],
    /// Tokens whose weight a cap truncates: kept ones with ρ > C under `detached_is`,
    /// any whose dual clip binds under `ppo_clip`.
    lower_clipped: u64,
    /// δ_b^row of each row with response tokens (the `delta_b_row` output), under a
    /// budget.
    budgets: Vec<f64>,
    loss: f64,
    loss_abs: f64,
}

/// Recounts the tally of `case` from its inputs and the per-token outputs `out`. Errs if
/// the outputs are inconsistent with the mask (a reason off the mask, a response token
/// without a reason, `keep` not matching the reason).
fn recount<F: Float>(case: &Case<F>, out: &Outputs<F>) -> Result<Recount, String> {
    let cfg = &case.cfg;
    let l = case.shape().1;
    let lens = case.row_lengths();
    let tokens: u64 = lens.iter().map(|&t| t as u64).sum();
    let seqs = lens.iter().filter(|&&t| t > 0).count() as u64;
    // The aggregation's denominators (the aggregate module's table), overrides first; 0 means no weight.
    let n_tok = cfg.num_tokens.unwrap_or(tokens) as f64;
    let n_seq = cfg.num_seqs.unwrap_or(seqs) as f64;
    let z = cfg.norm_length.unwrap_or(l) as f64;
    let inv = |d: f64| if d > 0.0 { 1.0 / d } else { 0.0 };

    let mut rc = Recount {
        tokens,
        seqs,
        by_reason: [0; 5],
        pos_adv: 0,
        pos_adv_masked: 0,
        neg_adv: 0,
        neg_adv_masked: 0,
        divergence_sum: 0.0,
        divergence_abs: 0.0,
        divergence_max: 0.0,
        k1_sum: 0.0,
        k1_abs: 0.0,
        k3_sum: 0.0,
        k3_slack: 0.0,
        ratio_sum: 0.0,
        ratio_min: f64::INFINITY,
        ratio_max: 0.0,
        threshold_sum: 0.0,
        threshold_abs: 0.0,
        threshold_count: 0,
        decile_tokens: [0; 10],
        decile_masked: [0; 10],
        lower_clipped: 0,
        budgets: Vec::new(),
        loss: 0.0,
        loss_abs: 0.0,
    };
    for (i, &row_len) in lens.iter().enumerate() {
        let a_row = match cfg.aggregation {
            Aggregation::TokenMean => inv(n_tok),
            Aggregation::SeqMeanTokenMean => inv(n_seq * row_len as f64),
            Aggregation::SeqMeanTokenSum => inv(n_seq),
            Aggregation::SeqMeanTokenSumNorm => inv(n_seq * z),
        };
        if row_len > 0 && cfg.rule.has_budget() {
            rc.budgets.push(out.delta_b_row[i].to_f64());
        }
        let mut t = 0usize;
        let mut row_loss = 0.0;
        for j in 0..l {
            let reason = out.reason[[i, j]];
            if !case.mask[[i, j]] {
                if reason != 0 || out.keep[[i, j]] {
                    return Err(format!("({i}, {j}) is padding but has reason {reason}"));
                }
                continue;
            }
            if !(1..=4).contains(&reason) {
                return Err(format!("response token ({i}, {j}) has reason {reason}"));
            }
            if out.keep[[i, j]] != (reason <= 2) {
                return Err(format!("({i}, {j}): keep does not match reason {reason}"));
            }
            t += 1;
            let masked = reason >= 3;
            rc.by_reason[usize::from(reason)] += 1;
            let decile = 10 * (t - 1) / row_len;
            rc.decile_tokens[decile] += 1;
            rc.decile_masked[decile] += u64::from(masked);

            let a = case.adv_at(i, j);
            if a > 0.0 {
                rc.pos_adv += 1;
                rc.pos_adv_masked += u64::from(masked);
            } else if a < 0.0 {
                rc.neg_adv += 1;
                rc.neg_adv_masked += u64::from(masked);
            }

            let d = out.divergence[[i, j]].to_f64();
            rc.divergence_sum += d;
            rc.divergence_abs += d.abs();
            if d > rc.divergence_max {
                rc.divergence_max = d;
            }

            let lp = case.logp[[i, j]].to_f64().min(0.0);
            let lq = case.logp_old[[i, j]].to_f64().min(0.0);
            let r = (lp - lq).clamp(-20.0, 20.0);
            let rho = r.exp();
            rc.k1_sum += -r;
            rc.k1_abs += r.abs();
            rc.k3_sum += (rho - 1.0) - r;
            rc.k3_slack += 64.0 * f64::EPSILON * (rho + 1.0 + r.abs());
            rc.ratio_sum += rho;
            rc.ratio_min = rc.ratio_min.min(rho);
            rc.ratio_max = rc.ratio_max.max(rho);
            rc.lower_clipped += u64::from(match cfg.objective {
                Objective::DetachedIs { ratio_cap } => out.keep[[i, j]] && rho > ratio_cap,
                Objective::PpoClip {
                    eps_low,
                    eps_high,
                    dual_clip: Some(c),
                } => {
                    let l = (-rho * a).max(-rho.clamp(1.0 - eps_low, 1.0 + eps_high) * a);
                    a < 0.0 && -c * a < l
                }
                _ => false,
            });

            let c = out.threshold[[i, j]].to_f64();
            if c.is_finite() {
                rc.threshold_count += 1;
                rc.threshold_sum += c;
                rc.threshold_abs += c.abs();
            }

            let tl = out.token_loss[[i, j]].to_f64();
            row_loss += tl;
            rc.loss_abs += (a_row * tl).abs();
        }
        rc.loss += a_row * row_loss;
    }
    Ok(rc)
}

// ---------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------

/// Collects every mismatch of one evaluation, so that a failure shows them all.
#[derive(Default)]
struct Mismatches(Vec<String>);

impl Mismatches {
    fn exact<T: PartialEq + Debug>(&mut self, what: &str, got: T, want: T) {
        if got != want {
            self.0
                .push(format!("{what}: tally {got:?}, recount {want:?}"));
        }
    }

    fn near(&mut self, what: &str, got: f64, want: f64, tol: f64) {
        if got == want {
            return;
        }
        let err = (got - want).abs();
        if err.is_nan() || err > tol {
            self.0.push(format!(
                "{what}: tally {got:e}, recount {want:e} (off by {err:e}, tolerance {tol:e})"
            ));
        }
    }

    fn finish(self, context: &str) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{context}:\n  {}", self.0.join("\n  ")))
        }
    }
}

/// Whether the objective reports `clip_frac` (`stats` docs: `ppo_clip`, `cispo`; and the
/// whole-row clips of `gspo` and `gmpo`, and `minpro` with a cap, per `objective`).
fn reports_clip(o: &Objective) -> bool {
    matches!(
        o,
        Objective::PpoClip { .. }
            | Objective::Cispo { .. }
            | Objective::Gspo { .. }
            | Objective::Gmpo { .. }
            | Objective::Minpro { clip: Some(_), .. }
    )
}

/// The diagnostics of a tally, from the formulas of the `stats` module docs: fractions
/// and means are 0 when their denominator is 0.
fn expected_diagnostics(t: &Tally, cfg: &Config) -> Diagnostics {
    let frac = |num: u64, den: u64| {
        if den == 0 {
            0.0
        } else {
            num as f64 / den as f64
        }
    };
    let mean = |sum: f64, den: u64| if den == 0 { 0.0 } else { sum / den as f64 };
    let n = t.tokens;
    let masked = t.by_reason[3] + t.by_reason[4];
    let mut by_decile = [0.0; 10];
    for (k, f) in by_decile.iter_mut().enumerate() {
        *f = frac(t.decile_masked[k], t.decile_tokens[k]);
    }
    Diagnostics {
        loss: t.loss,
        response_tokens: n,
        sequences: t.seqs,
        kept_tokens: n - masked,
        masked_frac: frac(masked, n),
        masked_frac_token_threshold: frac(t.by_reason[3], n),
        masked_frac_prefix_budget: frac(t.by_reason[4], n),
        bypass_frac: frac(t.by_reason[2], n),
        masked_frac_pos_adv: frac(t.pos_adv_masked, t.pos_adv),
        masked_frac_neg_adv: frac(t.neg_adv_masked, t.neg_adv),
        masked_frac_nonzero_adv: frac(t.pos_adv_masked + t.neg_adv_masked, t.pos_adv + t.neg_adv),
        divergence_mean: mean(t.divergence_sum, n),
        divergence_max: t.divergence_max,
        approx_kl_k1: mean(t.k1_sum, n),
        approx_kl_k3: mean(t.k3_sum, n),
        ratio_min: if n == 0 { 0.0 } else { t.ratio_min },
        ratio_mean: mean(t.ratio_sum, n),
        ratio_max: t.ratio_max,
        clip_frac: reports_clip(&cfg.objective).then(|| frac(t.clipped, n)),
        threshold_mean: (!matches!(cfg.rule, Rule::None | Rule::Ratio { .. }))
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
        // verl's `masked_mean`: the sum over (count + 1e-8).
        verl: VerlMetrics {
            pg_clipfrac: masked as f64 / (n as f64 + 1e-8),
            pg_clipfrac_lower: t.lower_clipped as f64 / (n as f64 + 1e-8),
            ppo_kl: t.k1_sum / (n as f64 + 1e-8),
        },
        unirl: UnirlMetrics {
            masked_fraction: frac(masked, n),
            approx_kl: mean(t.k3_sum, n),
            ratio_mean: mean(t.ratio_sum, n),
            ratio_max: t.ratio_max,
        },
    }
}

/// The lines where two pretty-printed values differ.
fn debug_diff<T: Debug>(got: &T, want: &T) -> String {
    let (g, w) = (format!("{got:#?}"), format!("{want:#?}"));
    g.lines()
        .zip(w.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("engine {}, expected {}", a.trim(), b.trim()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The tally, the diagnostics and the loss of `e` against the recount of `case`.
fn check_eval<F: Float>(case: &Case<F>, e: &Evaluation<F>) -> Result<(), String> {
    let rc = recount(case, &e.outputs)?;
    let t = &e.tally;
    // Output rounding: each f32 output term is off its f64 value by at most this
    // relative, plus a subnormal step.
    let (unit_round, floor) = if F::DTYPE == "float32" {
        (f64::from(f32::EPSILON) / 2.0, 1e-44 * rc.tokens as f64)
    } else {
        (0.0, 0.0)
    };
    let out_rel = REL + 2.0 * unit_round;
    let mut m = Mismatches::default();

    m.exact("tokens", t.tokens, rc.tokens);
    m.exact("seqs", t.seqs, rc.seqs);
    m.exact("by_reason", t.by_reason, rc.by_reason);
    m.exact("pos_adv", t.pos_adv, rc.pos_adv);
    m.exact("pos_adv_masked", t.pos_adv_masked, rc.pos_adv_masked);
    m.exact("neg_adv", t.neg_adv, rc.neg_adv);
    m.exact("neg_adv_masked", t.neg_adv_masked, rc.neg_adv_masked);
    m.exact("decile_tokens", t.decile_tokens, rc.decile_tokens);
    m.exact("decile_masked", t.decile_masked, rc.decile_masked);
    m.exact("threshold_count", t.threshold_count, rc.threshold_count);
    m.exact("lower_clipped", t.lower_clipped, rc.lower_clipped);
    m.exact("budget_rows", t.budget_rows, rc.budgets.len() as u64);
    if F::DTYPE == "float64" {
        // The outputs hold δ_b^row exactly in f64.
        let (lo, hi) = rc
            .budgets
            .iter()
            .fold((f64::INFINITY, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
        m.exact("budget_min", t.budget_min, lo);
        m.exact("budget_max", t.budget_max, hi);
        let sum: f64 = rc.budgets.iter().sum();
        m.near("budget_sum", t.budget_sum, sum, REL * sum);
        if let Some(p) = case.cfg.rule.cppo_params() {
            let floor = p.delta_b.unwrap_or(0.0);
            let at_floor = rc.budgets.iter().filter(|&&x| x == floor).count() as u64;
            m.exact("budget_at_floor", t.budget_at_floor, at_floor);
            let at_ceiling = match p.active_calibration() {
                Some(c) => rc
                    .budgets
                    .iter()
                    .filter(|&&x| x == c.ceiling * floor)
                    .count(),
                None => 0,
            } as u64;
            m.exact("budget_at_ceiling", t.budget_at_ceiling, at_ceiling);
        }
    }
    if t.clipped > t.tokens {
        m.0.push(format!("clipped {} > tokens {}", t.clipped, t.tokens));
    }
    let clips = reports_clip(&case.cfg.objective);
    if !clips && t.clipped != 0 {
        m.0.push(format!(
            "clipped {} under {:?}",
            t.clipped, case.cfg.objective
        ));
    }

    m.exact(
        "divergence_max (in the output type)",
        F::from_f64(t.divergence_max).to_f64(),
        rc.divergence_max,
    );
    m.near(
        "divergence_sum",
        t.divergence_sum,
        rc.divergence_sum,
        out_rel * rc.divergence_abs + floor,
    );
    m.near(
        "threshold_sum",
        t.threshold_sum,
        rc.threshold_sum,
        out_rel * rc.threshold_abs + floor,
    );
    m.near("k1_sum", t.k1_sum, rc.k1_sum, REL * rc.k1_abs);
    m.near(
        "k3_sum",
        t.k3_sum,
        rc.k3_sum,
        1e-9 * rc.k3_sum.abs() + rc.k3_slack,
    );
    m.near("ratio_sum", t.ratio_sum, rc.ratio_sum, REL * rc.ratio_sum);
    m.near("ratio_min", t.ratio_min, rc.ratio_min, REL * rc.ratio_min);
    m.near("ratio_max", t.ratio_max, rc.ratio_max, REL * rc.ratio_max);
    m.near("loss", t.loss, rc.loss, out_rel * rc.loss_abs + floor);

    if rc.tokens == 0 && *t != Tally::default() {
        m.0.push(format!("no response token, but the tally is {t:?}"));
    }
    if e.loss.to_bits() != t.loss.to_bits() {
        m.0.push(format!(
            "Evaluation::loss {:e} is not the tally's {:e}",
            e.loss, t.loss
        ));
    }
    let want = expected_diagnostics(t, &case.cfg);
    if e.diagnostics != want {
        m.0.push(format!(
            "diagnostics: {}",
            debug_diff(&e.diagnostics, &want)
        ));
    }
    m.finish(&format!(
        "{} batch {:?}, {:?}",
        F::DTYPE,
        case.shape(),
        case.cfg
    ))
}

/// The case in f64 and in f32 against the recount, and the f32 tally against that of the
/// same values widened to f64.
fn check_case(case: &Case<f64>, par: Par) -> Result<(), String> {
    let e64 = case.eval(par).map_err(|e| e.to_string())?;
    check_eval(case, &e64)?;

    let c32 = case.cast::<f32>();
    let e32 = c32.eval(par).map_err(|e| e.to_string())?;
    check_eval(&c32, &e32)?;

    let widened = c32.cast::<f64>();
    let ew = widened.eval(par).map_err(|e| e.to_string())?;
    if e32.tally != ew.tally {
        return Err(format!(
            "f32 tally differs from that of the widened f64 batch: {}",
            debug_diff(&e32.tally, &ew.tally)
        ));
    }
    if e32.diagnostics != ew.diagnostics {
        return Err(format!(
            "f32 diagnostics differ from those of the widened f64 batch: {}",
            debug_diff(&e32.diagnostics, &ew.diagnostics)
        ));
    }
    Ok(())
}

fn check_case_prop(case: &Case<f64>, par: Par) -> TestCaseResult {
    check_case(case, par).map_err(TestCaseError::fail)
}

proptest! {
    #![proptest_config(proptest_config(96, REGRESSIONS))]

    /// Tally and diagnostics equal the recount, f64 and f32.
    #[test]
    fn tally_and_diagnostics_match_a_recount((case, par) in case_strategy()) {
        check_case_prop(&case, par)?;
    }
}

// ---------------------------------------------------------------------------------------
// Fixed batches
// ---------------------------------------------------------------------------------------

/// Deciles counted by hand. Row 0: a 37-column prompt, then T = 1000 response tokens
/// (blocks 0 and 1 lie in decile 0, block 2 crosses into decile 1, ...), every third
/// moving away beyond δ (masked, reason 3), the others unchanged. Row 1: T = 15 tokens
/// 70 columns apart (one per block), none masked: ⌊10 (t − 1)/15⌋ for t = 1..15 gives
/// deciles 0 0 1 2 2 3 4 4 5 6 6 7 8 8 9. Row 2: empty.
#[test]
fn deciles_of_a_hand_counted_batch() {
    let (b, l) = (3, 1037);
    let mut mask = Array2::from_elem((b, l), false);
    let mut logp = Array2::from_elem((b, l), f64::NAN);
    let mut logp_old = Array2::from_elem((b, l), f64::NAN);
    for j in 37..l {
        let t = j - 36;
        mask[[0, j]] = true;
        logp_old[[0, j]] = -1.0;
        logp[[0, j]] = if t.is_multiple_of(3) { -0.5 } else { -1.0 };
    }
    for t in 0..15 {
        let j = 70 * t;
        mask[[1, j]] = true;
        logp_old[[1, j]] = -2.0;
        logp[[1, j]] = -2.0;
    }
    let cfg = Config {
        divergence: Divergence::BinaryTv,
        ..Config::with_rule(Rule::Dppo { delta: 0.1 })
    };
    let case = Case {
        cfg,
        logp,
        logp_old,
        adv: Adv::Row(Array1::from_vec(vec![1.0, -1.0, f64::NAN])),
        mask,
        topk: None,
        logp_ref: None,
        is_weights: None,
    };
    for par in [Par::Seq, Par::Rayon] {
        let e = case.eval(par).unwrap();
        assert_eq!(
            e.tally.decile_tokens,
            [102, 101, 102, 101, 102, 101, 102, 101, 102, 101]
        );
        assert_eq!(
            e.tally.decile_masked,
            [33, 33, 34, 33, 33, 34, 33, 33, 34, 33]
        );
        assert_eq!(e.tally.by_reason, [0, 682, 0, 333, 0]);
        assert_eq!((e.tally.tokens, e.tally.seqs), (1015, 2));
        assert_eq!((e.tally.pos_adv, e.tally.pos_adv_masked), (1000, 333));
        assert_eq!((e.tally.neg_adv, e.tally.neg_adv_masked), (15, 0));
        assert_eq!(e.tally.threshold_count, 1015);
        assert_eq!(e.diagnostics.masked_frac_by_decile[2], 34.0 / 102.0);
        assert_eq!(e.diagnostics.ratio_min, 1.0);
        check_case(&case, par).unwrap();
    }
}

/// Batches of several of the engine's leaf blocks of rows (about 2^14 tokens each), every
/// layout, rows of more than ten 64-column blocks: the row tallies merge across leaves.
#[test]
fn several_leaf_blocks() {
    let layouts = [
        Layout::Full,
        Layout::Span {
            start: 0.1,
            len: 0.8,
        },
        Layout::Tool {
            start: 0.2,
            runs: 4,
            hole: 0.05,
        },
        Layout::Empty,
        Layout::Scatter { density: 0.7 },
        Layout::Few { n: 9 },
    ];
    let rows: Vec<Layout> = (0..42).map(|i| layouts[i % layouts.len()]).collect();
    let configs = [
        (
            Divergence::BinaryTv,
            Rule::Cppo(CppoParams {
                delta: 0.2,
                delta_b: Some(0.05),
                calibration: None,
                ..CppoParams::default()
            }),
        ),
        (Divergence::TopkTv, Rule::Dppo { delta: 0.05 }),
        (Divergence::K3, Rule::TrmMax { delta: 0.3 }),
        (
            Divergence::BinaryKl,
            Rule::Ratio {
                eps_low: 0.2,
                eps_high: 0.28,
            },
        ),
    ];
    for (n, (divergence, rule)) in configs.into_iter().enumerate() {
        let draw = ConfigDraw {
            cfg: Config {
                divergence,
                aggregation: Aggregation::SeqMeanTokenMean,
                ..Config::with_rule(rule)
            },
            extra_tokens: None,
            extra_seqs: None,
        };
        let case = make_case(draw, &rows, 900, 3, n.is_multiple_of(2), 1000 + n as u64);
        for par in [Par::Seq, Par::Rayon] {
            check_case(&case, par).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// The generator reaches what the tally code treats separately: 64-column blocks whose
/// response tokens all lie in one decile (full blocks and partial ones) and blocks that
/// cross a decile boundary, rows of more than 64 tokens, empty rows, masked tokens of
/// both reasons, cppo with and without a budget, dppo, ratio, trm_max, binary_tv and topk_tv.
#[test]
fn generator_covers_the_tally_paths() {
    let mut runner = TestRunner::new_with_rng(
        ProptestConfig::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[11; 32]),
    );
    let strategy = case_strategy();
    let (mut full_one_decile, mut partial_one_decile, mut crossing) = (0, 0, 0);
    let (mut long_rows, mut empty_rows, mut by_reason) = (0, 0, [0u64; 5]);
    let (mut cppo_budget, mut cppo_plain, mut dppo, mut ratio, mut trm_max) = (0, 0, 0, 0, 0);
    let (mut binary_tv, mut topk_tv) = (0, 0);
    for _ in 0..200 {
        let (case, _) = strategy.new_tree(&mut runner).unwrap().current();
        let (_, l) = case.shape();
        for (row, len) in case.mask.rows().into_iter().zip(case.row_lengths()) {
            empty_rows += usize::from(len == 0);
            long_rows += usize::from(len > BLOCK);
            let mut t = 0;
            for j0 in (0..l).step_by(BLOCK) {
                let cols = j0..(j0 + BLOCK).min(l);
                let on: Vec<usize> = cols.clone().filter(|&j| row[j]).collect();
                if on.is_empty() {
                    continue;
                }
                let first = 10 * t / len;
                t += on.len();
                let last = 10 * (t - 1) / len;
                if first != last {
                    crossing += 1;
                } else if on.len() == BLOCK {
                    full_one_decile += 1;
                } else {
                    partial_one_decile += 1;
                }
            }
        }
        match case.cfg.rule {
            Rule::Cppo(CppoParams {
                delta_b: Some(_), ..
            }) => cppo_budget += 1,
            Rule::Cppo(CppoParams { delta_b: None, .. }) => cppo_plain += 1,
            Rule::Dppo { .. } => dppo += 1,
            Rule::Ratio { .. } => ratio += 1,
            Rule::TrmMax { .. } => trm_max += 1,
            _ => {}
        }
        binary_tv += usize::from(case.cfg.divergence == Divergence::BinaryTv);
        topk_tv += usize::from(case.cfg.divergence == Divergence::TopkTv);
        let e = case.eval(Par::Seq).unwrap();
        for (x, y) in by_reason.iter_mut().zip(e.tally.by_reason) {
            *x += y;
        }
    }
    let counts = format!(
        "blocks: {full_one_decile} full in one decile, {partial_one_decile} partial in one, \
         {crossing} crossing; rows: {long_rows} long, {empty_rows} empty; reasons {by_reason:?}; \
         rules: cppo {cppo_budget} with budget, {cppo_plain} without, dppo {dppo}, \
         ratio {ratio}, trm_max {trm_max}; binary_tv {binary_tv}, topk_tv {topk_tv}"
    );
    assert!(full_one_decile >= 20, "{counts}");
    assert!(partial_one_decile >= 100, "{counts}");
    assert!(crossing >= 100, "{counts}");
    assert!(long_rows >= 50 && empty_rows >= 20, "{counts}");
    assert!(by_reason[1..].iter().all(|&c| c >= 100), "{counts}");
    for c in [
        cppo_budget,
        cppo_plain,
        dppo,
        ratio,
        trm_max,
        binary_tv,
        topk_tv,
    ] {
        assert!(c >= 10, "{counts}");
    }
}
