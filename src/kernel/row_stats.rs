//! What a row's sweep needs to know about the whole row before it starts, and the first
//! sweep that finds it.
//!
//! - T, the row's response tokens (for the weights, the per-sequence aggregation, the
//!   position deciles);
//! - for TRM, the row's max or mean divergence; for GSPO and GMPO, the mean (clipped)
//!   log-ratio and, with per-token advantages, the mean advantage. These are
//!   [`RowStats`]: mergeable sums over a row's response tokens, exact fixed-point sums
//!   ([`FixedSum`]), so a row split into column chunks gets exactly the whole row's
//!   values;
//! - for CPPO with a calibrated budget, δ_b^row, from a quantile of the row's
//!   divergences ([`crate::budget`]). The first sweep gathers the row's divergences in a
//!   per-thread buffer (one buffer of 8 L bytes per thread that runs rows, grown once
//!   and reused: [`evaluate_into`](crate::evaluate_into) allocates only when a thread
//!   first meets a row longer than any before). On a binary divergence it also keeps
//!   the row's p and q (16 L bytes per thread, [`Probs`]), which the main sweep then
//!   reads instead of computing its two exponentials per token again.
//!
//! The first sweep runs the same block passes and checks as the main one, so its errors
//! come at the same place, in the same order.

// The sums index staged arrays in lockstep over one block.
#![allow(clippy::needless_range_loop)]

use std::cell::RefCell;

use serde::{Deserialize, Serialize};

use super::checks::ordered_block;
use super::divergence::block_divergences;
use super::lanes::{InStage, Probs, RowIn};
use super::sums::{lane_fold, max};
use super::{BLK, Work, block_values};
use crate::config::Config;
use crate::error::Result;
use crate::float::Float;
use crate::objective::{GSPO_LOG_RATIO_MAX, Objective, gmpo_log_ratio};
use crate::rule::Rule;
use crate::simd::{Isa, isa};

/// 2^64: the unit of [`FixedSum`].
const FIXED_ONE: f64 = 18_446_744_073_709_551_616.0;

/// A sum in fixed point, units of 2^−64: integer addition is exact and associative, so
/// a row's sum is the same however its columns are chunked, and a decision on it (TRM-avg)
/// or a value from it (GSPO's and GMPO's sequence ratios) is the same chunked and whole.
/// Each term is rounded to the nearest multiple of 2^−64 (an absolute error of at most
/// 2.7e−20); the sum saturates beyond ±9.2e18.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub(crate) struct FixedSum(i128);

impl FixedSum {
    /// Adds `x`.
    #[inline(always)]
    pub(crate) fn add(&mut self, x: f64) {
        self.0 = self.0.saturating_add(to_fixed(x));
    }

    /// The sum of two parts.
    #[must_use]
    pub(crate) const fn merge(self, other: Self) -> Self {
        Self(self.0.saturating_add(other.0))
    }

    /// Whether the sum is below 0.
    pub(crate) fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// The sum as a float.
    pub(crate) fn to_f64(self) -> f64 {
        self.0 as f64 / FIXED_ONE
    }
}

/// round(x 2^64) (half away from zero) as an integer, saturating; NaN gives 0.
///
/// `as i128` alone would do, but compiles to a library call; for |x| < 2^31 (every
/// term in practice) the same integer comes from 64-bit conversions the CPU has: with
/// y = |x| 2^32 (exact), ⌊y⌋ and the fraction (y − ⌊y⌋) 2^32 are exact, and rounding
/// the fraction half up is ⌊fraction + 1/2⌋ (the addition is exact below 2^52).
#[inline(always)]
pub(crate) fn to_fixed(x: f64) -> i128 {
    const TWO_32: f64 = 4_294_967_296.0;
    let a = x.abs();
    if a < 2_147_483_648.0 {
        let y = a * TWO_32;
        let hi = y as i64;
        let lo = ((y - hi as f64) * TWO_32 + 0.5) as i64;
        let v = (i128::from(hi) << 32) + i128::from(lo);
        if x < 0.0 { -v } else { v }
    } else {
        (x * FIXED_ONE).round() as i128
    }
}

/// The whole-row statistics some rules and objectives need before a row's sweep, as
/// mergeable sums over a row's (or a chunk's) response tokens. Only the sums the config
/// needs are filled; the others stay 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct RowStats {
    /// max D_t (TRM-max).
    pub d_max: f64,
    /// Σ D_t (TRM-avg).
    pub d_sum: FixedSum,
    /// Σ r_t, r the clamped log-ratio (GSPO).
    pub r_sum: FixedSum,
    /// Σ r̃_t, GMPO's sign-dependent clipped log-ratio.
    pub r_clip_sum: FixedSum,
    /// Σ A_t (GMPO with per-token advantages).
    pub adv_sum: FixedSum,
}

impl RowStats {
    /// The statistics of two pieces of a row.
    pub(crate) fn merge(&self, o: &Self) -> Self {
        Self {
            d_max: self.d_max.max(o.d_max),
            d_sum: self.d_sum.merge(o.d_sum),
            r_sum: self.r_sum.merge(o.r_sum),
            r_clip_sum: self.r_clip_sum.merge(o.r_clip_sum),
            adv_sum: self.adv_sum.merge(o.adv_sum),
        }
    }
}

/// Whether the config needs [`RowStats`] before a row's sweep.
pub(crate) fn needs_row_stats(cfg: &Config) -> bool {
    cfg.rule.is_sequence_level() || cfg.objective.is_sequence_level()
}

/// The first sweep over row `row` (a whole row or a chunk of one): its [`RowStats`]
/// and, into `sink`, the divergences of its response tokens in column order. Runs in
/// the widest build the CPU supports, as the main sweep does ([`super::run_row`]).
pub(crate) fn row_stats<F: Float>(
    cfg: &Config,
    row: &RowIn<'_, F>,
    sink: Option<&mut Vec<f64>>,
    probs: Option<&mut Probs>,
) -> Result<RowStats> {
    match isa() {
        // SAFETY: `isa` checked that the CPU has these features.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { row_stats_avx512(cfg, row, sink, probs) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { row_stats_avx2(cfg, row, sink, probs) },
        _ => row_stats_impl(cfg, row, sink, probs),
    }
}

/// [`row_stats_impl`] for AVX2 and FMA (bit-identical to the baseline build, as the
/// main sweep's builds are).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn row_stats_avx2<F: Float>(
    cfg: &Config,
    row: &RowIn<'_, F>,
    sink: Option<&mut Vec<f64>>,
    probs: Option<&mut Probs>,
) -> Result<RowStats> {
    row_stats_impl(cfg, row, sink, probs)
}

/// [`row_stats_impl`] for AVX-512 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,fma")]
fn row_stats_avx512<F: Float>(
    cfg: &Config,
    row: &RowIn<'_, F>,
    sink: Option<&mut Vec<f64>>,
    probs: Option<&mut Probs>,
) -> Result<RowStats> {
    row_stats_impl(cfg, row, sink, probs)
}

#[inline(always)]
fn row_stats_impl<F: Float>(
    cfg: &Config,
    row: &RowIn<'_, F>,
    mut sink: Option<&mut Vec<f64>>,
    mut probs: Option<&mut Probs>,
) -> Result<RowStats> {
    let mut stats = RowStats::default();
    let trm_max = matches!(cfg.rule, Rule::TrmMax { .. });
    let trm_avg = matches!(cfg.rule, Rule::TrmAvg { .. });
    let gspo = matches!(cfg.objective, Objective::Gspo { .. });
    let gmpo = match cfg.objective {
        Objective::Gmpo { eps_low, eps_high } => Some((eps_low, eps_high)),
        _ => None,
    };
    let mut scratch = None;
    let mut st = InStage::new();
    let mut wk = Work::new();
    let l = row.width();
    if let (Some(buf), false, true) = (
        sink.as_deref_mut(),
        needs_row_stats(cfg),
        row.div.needs_probs(),
    ) {
        // Only the divergences, of a binary divergence: no checks (the row's sweep
        // makes them, in order, and fails on a bad value before any output), no ratio.
        for j0 in (0..l).step_by(BLK) {
            let n = BLK.min(l - j0);
            if st.load_binary(row, j0, n) {
                block_divergences(row, &st, j0, &mut wk.d, &mut scratch);
                gather(buf, &st.on[..n], &wk.d[..n]);
                if let Some(c) = probs.as_deref_mut() {
                    c.keep(&st, j0);
                }
            }
        }
        if let Some(c) = probs {
            c.filled = true;
        }
        return Ok(stats);
    }
    for j0 in (0..l).step_by(BLK) {
        let n = BLK.min(l - j0);
        if !st.load(row, j0, n, None) {
            continue;
        }
        // Every value checked, as in the row's sweep, so errors come in column order;
        // D_t is 0 off the mask.
        if !block_values(row, &st, j0, &mut wk, &mut scratch) {
            ordered_block(row, &st, j0, &mut wk, &mut scratch)?;
        }
        let on = &st.on[..n];
        if trm_max {
            stats.d_max = lane_fold(&wk.d[..n], stats.d_max, max);
        }
        if let Some(buf) = sink.as_deref_mut() {
            gather(buf, on, &wk.d[..n]);
        }
        for k in 0..n {
            if !on[k] {
                continue;
            }
            if trm_avg {
                stats.d_sum.add(wk.d[k]);
            }
            if gspo {
                stats.r_sum.add(st.log_ratio[k]);
            }
            if let Some((lo, hi)) = gmpo {
                let r = st.log_ratio[k];
                stats.r_clip_sum.add(gmpo_log_ratio(r, st.adv[k], lo, hi).0);
                stats.adv_sum.add(st.adv[k]);
            }
        }
    }
    Ok(stats)
}

/// Appends the divergences `d` of the response tokens (`on`) to `buf`.
#[inline(always)]
fn gather(buf: &mut Vec<f64>, on: &[bool], d: &[f64]) {
    buf.extend(on.iter().zip(d).filter(|(o, _)| **o).map(|(_, d)| *d));
}

/// What a row's sweep needs to know about the whole row before it starts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowFacts {
    /// T: the whole row's response tokens.
    pub row_len: usize,
    /// TRM's row decision (`true` under other rules).
    pub row_ok: bool,
    /// GSPO's s = exp(min(mean r, 10)) or GMPO's R = exp(mean r̃) (1 otherwise).
    pub seq_ratio: f64,
    /// The row's mean advantage (GMPO's gradient).
    pub adv_mean: f64,
    /// δ_b^row, or `None` where the rule has no budget.
    pub delta_b: Option<f64>,
}

/// A row's facts from its length, statistics and budget.
pub(crate) fn row_facts(
    cfg: &Config,
    row_len: usize,
    stats: &RowStats,
    row_adv: Option<f64>,
    delta_b: Option<f64>,
) -> RowFacts {
    let t = row_len.max(1) as f64;
    RowFacts {
        row_len,
        row_ok: row_len == 0 || cfg.rule.keeps_row(stats.d_max, stats.d_sum.to_f64() / t),
        seq_ratio: match cfg.objective {
            Objective::Gspo { .. } => (stats.r_sum.to_f64() / t).min(GSPO_LOG_RATIO_MAX).exp(),
            Objective::Gmpo { .. } => (stats.r_clip_sum.to_f64() / t).exp(),
            _ => 1.0,
        },
        adv_mean: row_adv.unwrap_or_else(|| stats.adv_sum.to_f64() / t),
        delta_b,
    }
}

thread_local! {
    /// The divergences of the row being calibrated (see the module docs).
    static DIVERGENCES: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
    /// p and q of the row being calibrated, for its main sweep (see [`Probs`]).
    static PROBS: RefCell<Probs> = const { RefCell::new(Probs::EMPTY) };
}

/// Runs `f` with this thread's [`Probs`] buffer (one per thread, grown to the longest
/// row it has met, reused).
pub(crate) fn with_probs<R>(f: impl FnOnce(&mut Probs) -> R) -> R {
    PROBS.with(|cell| f(&mut cell.borrow_mut()))
}

/// Grows this thread's buffers (the divergences and the kept p and q) to hold rows of
/// `width` columns.
pub(crate) fn reserve_buffers(width: usize) {
    DIVERGENCES.with(|cell| {
        let mut buf = cell.borrow_mut();
        let more = width.saturating_sub(buf.len());
        buf.reserve(more);
    });
    with_probs(|probs| probs.fit(width));
}

/// The facts of a whole row `row` with `row_len` response tokens: under TRM, GSPO and
/// GMPO its statistics, under a calibrated CPPO budget its δ_b^row, each from a first
/// sweep. Under a calibrated budget on a binary divergence, that sweep also keeps the
/// row's p and q in `probs` (and sets `probs.filled`), for the main sweep to reuse.
pub(crate) fn whole_row_facts<F: Float>(
    cfg: &Config,
    row: &RowIn<'_, F>,
    row_len: usize,
    mut probs: Option<&mut Probs>,
) -> Result<RowFacts> {
    if let Some(c) = probs.as_deref_mut() {
        c.filled = false;
    }
    let params = cfg.rule.cppo_params();
    let delta_b = params.and_then(|p| p.delta_b);
    let calibration = params.and_then(|p| p.active_calibration());
    let row_adv = row.adv.as_ref().err().copied();
    if row_len == 0 {
        return Ok(row_facts(cfg, 0, &RowStats::default(), row_adv, delta_b));
    }
    let (stats, delta_b) = match (calibration, delta_b) {
        (Some(c), Some(db)) => DIVERGENCES.with(|cell| -> Result<_> {
            let mut buf = cell.borrow_mut();
            buf.clear();
            if let Some(c) = probs.as_deref_mut() {
                c.fit(row.width());
            }
            let stats = row_stats(cfg, row, Some(&mut buf), probs)?;
            Ok((stats, Some(c.row_budget(db, &mut buf))))
        })?,
        _ if needs_row_stats(cfg) => (row_stats(cfg, row, None, None)?, delta_b),
        _ => (RowStats::default(), delta_b),
    };
    Ok(row_facts(cfg, row_len, &stats, row_adv, delta_b))
}

/// The divergences of row `row` into `dst` (its width): D_t at response tokens, NaN
/// elsewhere; the first bad value of the row as an error.
pub(crate) fn divergence_row<F: Float>(
    row: &RowIn<'_, F>,
    dst: &mut ndarray::ArrayViewMut1<'_, f64>,
) -> Result<()> {
    let mut scratch = None;
    let mut st = InStage::new();
    let mut wk = Work::new();
    let l = row.width();
    for j0 in (0..l).step_by(BLK) {
        let n = BLK.min(l - j0);
        let mut block = dst.slice_mut(ndarray::s![j0..j0 + n]);
        if !st.load(row, j0, n, None) {
            block.fill(f64::NAN);
            continue;
        }
        if !block_values(row, &st, j0, &mut wk, &mut scratch) {
            ordered_block(row, &st, j0, &mut wk, &mut scratch)?;
        }
        for (k, d) in block.iter_mut().enumerate() {
            *d = if st.on[k] { wk.d[k] } else { f64::NAN };
        }
    }
    Ok(())
}
