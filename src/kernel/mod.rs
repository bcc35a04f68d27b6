//! The fused per-row pass behind [`evaluate`](crate::evaluate).
//!
//! A row is swept once, left to right, in blocks of [`BLK`] columns staged in small
//! stack arrays (nothing is allocated; about 50 KB of stack, most of it the top-K
//! staging buffer). Each block goes through short passes, each in the file named after
//! its concept:
//!
//! 1. [`lanes`]: **load** the block's mask, log-probs and advantages, widened to f64,
//!    and compute ρ (and p, q for the binary divergences) as SIMD exponentials
//!    ([`crate::simd`]; in f32 under [`Numerics::F32Exp`](crate::Numerics), the only
//!    place besides the top-K probabilities where the numerics matter); the extra inputs
//!    (`logp_ref`, `is_weights`);
//! 2. [`checks`] and [`divergence`] ([`topk`] for the top-K forms): one pass of
//!    comparisons finds whether any token holds a bad value, one pass computes D_t
//!    (0 off the mask); only a block holding a bad value is walked again token by
//!    token, to report the first one in order;
//! 3. [`schedule`] and [`rule`]: positions t, the weights w_t, the rule's test (CPPO's
//!    prefix sums S and W in f64, the one sequential pass), the reasons, selected
//!    without branches, and the share of its term each token keeps (1, 0, the soft
//!    gate, times the IS weight);
//! 4. [`objective`]: the objective's and the KL penalty's terms;
//! 5. the **outputs**, written in the output type straight into the caller's arrays
//!    (only those asked for), and the block's [`tally`].
//!
//! Rules and objectives that need a whole-row quantity (TRM, GSPO, GMPO, a calibrated
//! CPPO budget) get it from a first sweep with the same passes ([`row_stats`]).
//!
//! Every pass but the prefix scan is a loop over the block that the compiler vectorizes;
//! [`sums`] holds the fixed-order reductions. [`run_row`] dispatches to a build of the
//! whole pass for AVX-512 or AVX2 (each with FMA) when the CPU has it; the operations
//! are the same IEEE operations in the same order in every build (Rust fuses a multiply
//! and an add only where the code says `mul_add`, which is exactly rounded
//! everywhere), so every build gives the same bits.
//!
//! Errors surface at the first bad token in row-major order and, within a token, in the
//! order mask, logp, logp_old, advantages, top-K pair, logp_ref, is_weights (the order of
//! [`Batch::validate`](crate::Batch::validate)).

pub(crate) mod checks;
pub(crate) mod divergence;
pub(crate) mod lanes;
pub(crate) mod objective;
pub(crate) mod row_stats;
pub(crate) mod rule;
pub(crate) mod schedule;
pub(crate) mod sums;
pub(crate) mod tally;
pub(crate) mod topk;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use crate::aggregate::Counts;
use crate::config::Config;
use crate::error::Result;
use crate::float::Float;
use crate::outputs::RowOut;
use crate::simd::{Isa, isa};
use crate::stats::Tally;
use lanes::{InStage, Probs, RowIn, load_extras};
use objective::{MinproGrad, kl_terms, objective_terms};
use row_stats::RowFacts;
use rule::{kept, reasons_and_shares, rule_test};
use sums::lane_sum;
use tally::{Decile, TallyPlan, tally_block};
use topk::TopkScratch;

/// Columns per block.
pub(crate) const BLK: usize = 64;

/// What every row of one call shares.
pub(crate) struct Plan<'c> {
    pub cfg: &'c Config,
    /// N_tok and N_seq, after the overrides.
    pub denominators: Counts,
    /// The rows' full padded width L (the default `norm_length`, the `column` horizon).
    pub width: usize,
    /// The whole-row column of the batch's first column (0 unless chunked).
    pub col0: usize,
}

/// The state a row's sweep carries from column to column, and from chunk to chunk:
/// response tokens so far, the prefix sums S and W, MinPRO's running minimum.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Prefix {
    /// Response tokens seen so far: the next one has position t + 1.
    pub t: usize,
    /// S = Σ w_s D_s over the tokens seen so far.
    pub s: f64,
    /// W = Σ w_s over the tokens seen so far.
    pub w: f64,
    /// The minimum ratio ρ over the tokens seen so far (MinPRO); +∞ before the first.
    pub min_ratio: f64,
}

impl Default for Prefix {
    fn default() -> Self {
        Self {
            t: 0,
            s: 0.0,
            w: 0.0,
            min_ratio: f64::INFINITY,
        }
    }
}

/// A block's per-token intermediate results, between the vectorized passes.
pub(crate) struct Work {
    /// t of each response token (the count so far, off the mask).
    pub t: [usize; BLK],
    pub d: [f64; BLK],
    pub w: [f64; BLK],
    pub c: [f64; BLK],
    /// CPPO's S_t = S_{t−1} + w_t D_t and its room δ + δ_b^row W_{t−1} (the inverse gate).
    pub s_new: [f64; BLK],
    pub room: [f64; BLK],
    pub feasible: [bool; BLK],
    pub fail: [u8; BLK],
    pub code: [u8; BLK],
    pub loss: [f64; BLK],
    pub grad: [f64; BLK],
    pub clipped: [bool; BLK],
    /// verl's `pg_clipfrac_lower` events (a ratio cap or a dual clip that binds).
    pub lower: [bool; BLK],
    /// The share of its objective term each token keeps: 1 or 0 under the hard rules,
    /// the gate under `cppo_soft`, times the token's IS weight.
    pub m: [f64; BLK],
    /// Checked logp_ref (KL penalty only).
    pub lref: [f64; BLK],
    /// Checked IS weights (with `is_weights` only).
    pub isw: [f64; BLK],
}

impl Work {
    pub(crate) const fn new() -> Self {
        Self {
            t: [0; BLK],
            d: [0.0; BLK],
            w: [0.0; BLK],
            c: [0.0; BLK],
            s_new: [0.0; BLK],
            room: [0.0; BLK],
            feasible: [false; BLK],
            fail: [rule::TOKEN; BLK],
            code: [0; BLK],
            loss: [0.0; BLK],
            grad: [0.0; BLK],
            clipped: [false; BLK],
            lower: [false; BLK],
            m: [0.0; BLK],
            lref: [0.0; BLK],
            isw: [1.0; BLK],
        }
    }
}

/// A block's checks, divergences and extra inputs, each a vectorized pass; `false` if a
/// token fails a check (the caller then walks the block in order).
#[inline(always)]
pub(crate) fn block_values<F: Float>(
    row: &RowIn<'_, F>,
    st: &InStage,
    j0: usize,
    wk: &mut Work,
    scratch: &mut Option<TopkScratch>,
) -> bool {
    let mut ok = checks::block_ok(st);
    ok &= divergence::block_divergences(row, st, j0, &mut wk.d, scratch);
    ok &= load_extras(row, st, j0, &mut wk.lref, &mut wk.isw);
    ok
}

/// Computes row `row` (a whole row, or a chunk of one starting from `prefix`) into
/// `out`, advances `prefix`, and returns the row's tally. Dispatches to the widest build
/// the CPU supports ([`isa`]).
pub(crate) fn run_row<F: Float>(
    plan: &Plan<'_>,
    row: &RowIn<'_, F>,
    facts: &RowFacts,
    prefix: &mut Prefix,
    out: RowOut<'_, F>,
    probs: Option<&Probs>,
) -> Result<Tally> {
    match isa() {
        // SAFETY: `isa` checked that the CPU has these features.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { run_row_avx512(plan, row, facts, prefix, out, probs) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { run_row_avx2(plan, row, facts, prefix, out, probs) },
        _ => run_row_impl(plan, row, facts, prefix, out, probs),
    }
}

/// Builds of [`run_row_impl`] for a set of target features: the same code, which the
/// compiler vectorizes as wide as the features allow.
macro_rules! row_builds {
    ($($(#[$doc:meta])* $name:ident = $features:literal;)*) => {$(
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        pub(crate) fn $name<F: Float>(
            plan: &Plan<'_>,
            row: &RowIn<'_, F>,
            facts: &RowFacts,
            prefix: &mut Prefix,
            out: RowOut<'_, F>,
            probs: Option<&Probs>,
        ) -> Result<Tally> {
            run_row_impl(plan, row, facts, prefix, out, probs)
        }
    )*};
}

row_builds! {
    /// [`run_row_impl`] compiled for AVX2 and FMA, which vectorizes the block passes four
    /// doubles wide. The same IEEE operations in the same order as the baseline build
    /// (Rust fuses a multiply and an add only where the code asks, with `mul_add`, whose
    /// result is exactly defined), so the results are bit-identical.
    run_row_avx2 = "avx2,fma";
    /// [`run_row_impl`] compiled for AVX-512 and FMA: eight doubles wide, and mask
    /// registers for the selects. Bit-identical to the other builds, as for
    /// [`run_row_avx2`].
    run_row_avx512 = "avx512f,avx512dq,avx512bw,avx512vl,fma";
}

/// Writes `f(k)` for k < n to columns `j0..j0 + n` of an output, if it was asked for.
macro_rules! put {
    ($lane:expr, $j0:expr, $n:expr, |$k:ident| $val:expr) => {
        if let Some(lane) = $lane {
            lane.write($j0, $n, |$k| $val);
        }
    };
}

#[inline(always)]
pub(crate) fn run_row_impl<F: Float>(
    plan: &Plan<'_>,
    row: &RowIn<'_, F>,
    facts: &RowFacts,
    prefix: &mut Prefix,
    mut out: RowOut<'_, F>,
    probs: Option<&Probs>,
) -> Result<Tally> {
    let cfg = plan.cfg;
    let mut tally = Tally::default();
    if let Some(slot) = out.delta_b_row.as_deref_mut() {
        *slot = F::from_f64(facts.delta_b.unwrap_or(f64::NAN));
    }
    let row_len = facts.row_len;
    let l = row.width();
    if row_len == 0 {
        out.zero_cols(0, l);
        return Ok(tally);
    }
    let agg_w = cfg
        .aggregation
        .weight(plan.denominators, row_len, plan.width, cfg.norm_length);
    let has_isw = row.is_weights.is_some();
    let mut scratch = None;
    let t0 = prefix.t;
    let (mut t, mut s_sum, mut w_sum) = (prefix.t, prefix.s, prefix.w);
    let mut min_ratio = prefix.min_ratio;
    let mut row_loss = 0.0f64;
    let mut decile = Decile::new(row_len);
    let mut st = InStage::new();
    let mut wk = Work::new();
    let mut minpro_grad = MinproGrad::for_config(cfg, prefix.min_ratio);
    let tally_plan = TallyPlan {
        row_adv: row.adv.as_ref().err().copied(),
        clips: !matches!(cfg.objective, crate::Objective::Surrogate),
    };

    for j0 in (0..l).step_by(BLK) {
        let n = BLK.min(l - j0);
        if !st.load(row, j0, n, probs) {
            // Padding: zeros out, and the tally, the prefix and MinPRO's minimum as they
            // were (what the passes below would give, bit for bit).
            out.zero_cols(j0, n);
            continue;
        }

        // Checks, divergences and extra inputs, a vectorized pass each; a block holding a
        // bad value is walked again in column order to report the first.
        if !block_values(row, &st, j0, &mut wk, &mut scratch) {
            checks::ordered_block(row, &st, j0, &mut wk, &mut scratch)?;
        }

        // Positions t (response tokens only), the rule's test, reasons and shares.
        for k in 0..n {
            t += usize::from(st.on[k]);
            wk.t[k] = t;
        }
        rule_test(plan, facts, &st, &mut wk, j0, (&mut s_sum, &mut w_sum));
        reasons_and_shares(plan, &st, &mut wk, has_isw);

        objective_terms(cfg, facts, &st, &mut wk, n, &mut min_ratio);
        if let Some((kl, _)) = &row.kl {
            kl_terms(kl, &st, &mut wk);
        }
        if let Some(mg) = &mut minpro_grad {
            mg.block(&st, &mut wk, n, j0, agg_w, &mut out);
        }

        // Outputs, in the output type, straight into the caller's arrays; outputs not
        // asked for are not computed.
        let on = &st.on;
        put!(&mut out.divergence, j0, n, |k| F::from_f64(wk.d[k]));
        put!(&mut out.weight, j0, n, |k| F::from_f64(if on[k] {
            wk.w[k]
        } else {
            0.0
        }));
        put!(&mut out.threshold, j0, n, |k| F::from_f64(if on[k] {
            wk.c[k]
        } else {
            0.0
        }));
        put!(&mut out.keep, j0, n, |k| kept(wk.code[k]));
        put!(&mut out.reason, j0, n, |k| wk.code[k]);
        put!(&mut out.token_loss, j0, n, |k| F::from_f64(wk.loss[k]));
        put!(&mut out.grad, j0, n, |k| F::from_f64(wk.grad[k] * agg_w));

        row_loss += lane_sum(&wk.loss[..n], &wk.loss[..n], |a, _| a);
        tally_block(&mut tally, &st, &wk, n, &mut decile, tally_plan);
    }
    if let Some(mg) = &mut minpro_grad {
        mg.flush(None, &mut wk, 0, agg_w, &mut out);
    }
    tally.loss = row_loss * agg_w;
    // The row counts as a sequence, and its budget in the diagnostics, in the chunk that
    // holds its first response token.
    let first = t0 == 0 && t > 0;
    tally.seqs = u64::from(first);
    if let (true, Some(db), Some(p)) = (first, facts.delta_b, cfg.rule.cppo_params()) {
        let floor = p.delta_b.unwrap_or(db);
        let ceiling = p.active_calibration().map(|c| c.ceiling * floor);
        tally.book_budget(db, db <= floor, ceiling.is_some_and(|c| db >= c));
    }
    *prefix = Prefix {
        t,
        s: s_sum,
        w: w_sum,
        min_ratio,
    };
    Ok(tally)
}
