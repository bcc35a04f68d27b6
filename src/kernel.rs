//! The fused per-row kernel behind [`evaluate`](crate::evaluate).
//!
//! A row is swept once, left to right, in blocks of [`BLK`] columns staged in small
//! stack arrays (nothing is allocated; about 50 KB of stack, most of it the top-K
//! staging buffer). Each block goes through short passes:
//!
//! 1. **load** the block's mask, log-probs and advantages, widened to f64, and compute ρ
//!    (and p, q for the binary divergences) as SIMD exponentials ([`crate::simd`]);
//! 2. **checks and divergences**: one pass of comparisons finds whether any token holds
//!    a bad value, one pass per divergence computes D_t (0 off the mask). Top-K
//!    divergences stage the K entries of a group of tokens and compute their 2K
//!    exponentials in one SIMD call, prefetching the next group's entries (the top-K
//!    arrays are most of the bytes read). Only a block that holds a bad value is walked
//!    again token by token, to report the first one in order;
//! 3. **positions and the rule's test**: t, the weights w_t, and CPPO's prefix sums S
//!    and W in f64, the one sequential pass;
//! 4. **reasons**, selected without branches, and the keep share (1, 0, or
//!    `cppo_soft`'s gate);
//! 5. **objective and KL terms**;
//! 6. **outputs**, written in the output type straight into the caller's arrays (those
//!    asked for only), and the block's **tally**: counts in one pass, sums, minima and
//!    maxima in 8 interleaved lanes, position deciles per block.
//!
//! Every pass but the prefix scan is a loop over the block that the compiler vectorizes.
//! [`run_row`] dispatches to a build of the whole pass for AVX-512 or AVX2 (each with
//! FMA) when the CPU has it; the operations are the same IEEE operations in the same
//! order in every build (Rust fuses a multiply and an add only where the code says
//! `mul_add`, which is exactly rounded everywhere), so every build gives the same bits.
//! Rules and objectives that need a whole-row quantity (TRM, GSPO, GMPO) get it from a
//! first sweep with the same passes ([`row_stats`]), as exact fixed-point sums that merge
//! across column chunks.
//!
//! Errors surface at the first bad token in row-major order and, within a token, in the
//! order mask, logp, logp_old, advantages, top-K pair, logp_ref (the order of
//! [`Batch::validate`](crate::Batch::validate)).

// The passes index several staged arrays in lockstep over one block (`k < n <= BLK`);
// iterator chains over five arrays would say less.
#![allow(clippy::needless_range_loop)]

use ndarray::{ArrayView1, ArrayView2, ArrayViewMut1, Axis, s};

use crate::aggregate::Counts;
use crate::batch::{Advantages, Batch, TopK, read_logprob};
use crate::config::Config;
use crate::divergence::{
    Divergence, LOGP_TOLERANCE, TOPK_KL_REST_FLOOR, binary_kl_from_parts, binary_kl_rest_ratio,
    topk_kl_pairs, topk_tv_pairs,
};
use crate::error::{At, Error, Result};
use crate::float::{Float, MaskElem};
use crate::objective::{KlEstimator, LOG_RATIO_CLAMP, Objective};
use crate::rule::{Reason, Rule};
use crate::simd::{Isa, exp as simd_exp, exp_to, expm1_to, isa, ln as simd_ln, ln_to};
use crate::stats::Tally;

/// Columns per block.
pub(crate) const BLK: usize = 64;

/// Top-K widths up to this are staged for SIMD; wider ones use a scalar loop.
const TOPK_STACK: usize = 64;

/// What every row of one call shares.
pub(crate) struct Plan<'c> {
    pub cfg: &'c Config,
    /// N_tok and N_seq, after the overrides.
    pub denominators: Counts,
    /// The rows' full padded width L (the default `norm_length`).
    pub width: usize,
    /// The whole-row column of the batch's first column (0 unless chunked).
    pub col0: usize,
}

/// A row of an input: a slice when contiguous (the common case), else a strided view.
enum Lane<'a, T> {
    Slice(&'a [T]),
    View(ArrayView1<'a, T>),
}

impl<'a, T: Copy> Lane<'a, T> {
    fn new(v: ArrayView1<'a, T>) -> Self {
        match v.to_slice() {
            Some(s) => Self::Slice(s),
            None => Self::View(v),
        }
    }

    /// The element at `j`.
    #[cold]
    fn get(&self, j: usize) -> T {
        match self {
            Self::Slice(s) => s[j],
            Self::View(v) => v[j],
        }
    }

    /// `dst[k] = f(self[j0 + k])` for k < dst.len().
    #[inline(always)]
    fn load<U>(&self, j0: usize, dst: &mut [U], f: impl Fn(T) -> U) {
        let n = dst.len();
        match self {
            Self::Slice(s) => {
                for (d, &x) in dst.iter_mut().zip(&s[j0..j0 + n]) {
                    *d = f(x);
                }
            }
            Self::View(v) => {
                for (d, &x) in dst.iter_mut().zip(v.slice(s![j0..j0 + n])) {
                    *d = f(x);
                }
            }
        }
    }
}

/// A row of an output: a slice when contiguous, else a strided view.
enum LaneMut<'a, T> {
    Slice(&'a mut [T]),
    View(ArrayViewMut1<'a, T>),
}

impl<'a, T: Copy> LaneMut<'a, T> {
    fn new(v: ArrayViewMut1<'a, T>) -> Self {
        if v.is_standard_layout() {
            if let Some(s) = v.into_slice() {
                return Self::Slice(s);
            }
            unreachable!("a standard-layout view is a slice")
        }
        Self::View(v)
    }

    /// Overwrites column `j`.
    fn set(&mut self, j: usize, x: T) {
        match self {
            Self::Slice(s) => s[j] = x,
            Self::View(v) => v[j] = x,
        }
    }

    fn fill(&mut self, x: T) {
        match self {
            Self::Slice(s) => s.fill(x),
            Self::View(v) => v.fill(x),
        }
    }
}

/// One row of every requested output, as views.
pub(crate) struct RowOut<'r, F> {
    pub divergence: Option<ArrayViewMut1<'r, F>>,
    pub weight: Option<ArrayViewMut1<'r, F>>,
    pub threshold: Option<ArrayViewMut1<'r, F>>,
    pub keep: Option<ArrayViewMut1<'r, bool>>,
    pub reason: Option<ArrayViewMut1<'r, u8>>,
    pub token_loss: Option<ArrayViewMut1<'r, F>>,
    pub grad: Option<ArrayViewMut1<'r, F>>,
}

/// One row of every requested output, as lanes.
pub(crate) struct RowLanes<'r, F> {
    divergence: Option<LaneMut<'r, F>>,
    weight: Option<LaneMut<'r, F>>,
    threshold: Option<LaneMut<'r, F>>,
    keep: Option<LaneMut<'r, bool>>,
    reason: Option<LaneMut<'r, u8>>,
    token_loss: Option<LaneMut<'r, F>>,
    grad: Option<LaneMut<'r, F>>,
}

impl<'r, F: Float> From<RowOut<'r, F>> for RowLanes<'r, F> {
    fn from(o: RowOut<'r, F>) -> Self {
        Self {
            divergence: o.divergence.map(LaneMut::new),
            weight: o.weight.map(LaneMut::new),
            threshold: o.threshold.map(LaneMut::new),
            keep: o.keep.map(LaneMut::new),
            reason: o.reason.map(LaneMut::new),
            token_loss: o.token_loss.map(LaneMut::new),
            grad: o.grad.map(LaneMut::new),
        }
    }
}

fn fill_opt<T: Copy>(lane: &mut Option<LaneMut<'_, T>>, x: T) {
    if let Some(v) = lane {
        v.fill(x);
    }
}

/// Writes `f(k)` for k < n to columns `j0..j0 + n` of `lane`, if requested: directly
/// into a contiguous lane, through `stage` into a strided one.
#[inline(always)]
fn emit<T: Copy>(
    lane: &mut Option<LaneMut<'_, T>>,
    stage: &mut [T; BLK],
    j0: usize,
    n: usize,
    f: impl Fn(usize) -> T,
) {
    match lane {
        None => {}
        Some(LaneMut::Slice(s)) => {
            for (k, d) in s[j0..j0 + n].iter_mut().enumerate() {
                *d = f(k);
            }
        }
        Some(LaneMut::View(v)) => {
            for k in 0..n {
                stage[k] = f(k);
            }
            v.slice_mut(s![j0..j0 + n])
                .assign(&ArrayView1::from(&stage[..n]));
        }
    }
}

impl<F: Float> RowLanes<'_, F> {
    /// Writes every output's zero (false for `keep`, 0 for `reason`) to columns
    /// `j0..j0 + n`.
    fn zero_block(&mut self, j0: usize, n: usize, os: &mut OutStage<F>) {
        let z = F::default();
        emit(&mut self.divergence, &mut os.divergence, j0, n, |_| z);
        emit(&mut self.weight, &mut os.weight, j0, n, |_| z);
        emit(&mut self.threshold, &mut os.threshold, j0, n, |_| z);
        emit(&mut self.keep, &mut os.keep, j0, n, |_| false);
        emit(&mut self.reason, &mut os.reason, j0, n, |_| 0);
        emit(&mut self.token_loss, &mut os.token_loss, j0, n, |_| z);
        emit(&mut self.grad, &mut os.grad, j0, n, |_| z);
    }

    fn fill_zero(&mut self) {
        let z = F::default();
        fill_opt(&mut self.divergence, z);
        fill_opt(&mut self.weight, z);
        fill_opt(&mut self.threshold, z);
        fill_opt(&mut self.keep, false);
        fill_opt(&mut self.reason, 0);
        fill_opt(&mut self.token_loss, z);
        fill_opt(&mut self.grad, z);
    }
}

/// One row of every input.
struct RowIn<'a, F, M> {
    i: usize,
    /// The column of this row's first input column in the whole row (0 unless chunked):
    /// errors name whole-row columns.
    col0: usize,
    mask: Lane<'a, M>,
    logp: Lane<'a, F>,
    logp_old: Lane<'a, F>,
    /// Per-token advantages, or the row's one advantage.
    adv: Result<Lane<'a, F>, f64>,
    logp_ref: Option<Lane<'a, F>>,
    topk: Option<TopkRow<'a, F>>,
}

impl<F, M> RowIn<'_, F, M> {
    /// Column `j`'s place.
    #[inline(always)]
    fn pos(&self, j: usize) -> Pos {
        Pos {
            i: self.i,
            j,
            col0: self.col0,
        }
    }
}

impl<'a, F: Float, M: MaskElem> RowIn<'a, F, M> {
    fn new(batch: &Batch<'a, F>, mask: ArrayView1<'a, M>, i: usize, col0: usize) -> Self {
        Self {
            i,
            col0,
            mask: Lane::new(mask),
            logp: Lane::new(batch.logp.index_axis_move(Axis(0), i)),
            logp_old: Lane::new(batch.logp_old.index_axis_move(Axis(0), i)),
            adv: match batch.advantages {
                Advantages::PerToken(a) => Ok(Lane::new(a.index_axis_move(Axis(0), i))),
                Advantages::PerRow(a) => Err(a[i].to_f64()),
            },
            logp_ref: batch
                .logp_ref
                .map(|r| Lane::new(r.index_axis_move(Axis(0), i))),
            topk: batch.topk.as_ref().map(|t| TopkRow::new(t, i)),
        }
    }
}

/// One block of a row's inputs, widened to f64, and what is computed from them in SIMD.
struct InStage {
    n: usize,
    on: [bool; BLK],
    /// Whether each mask value is allowed (finite, for float masks).
    mask_ok: [bool; BLK],
    /// Raw log-probs and advantages, for the checks.
    lp_raw: [f64; BLK],
    lq_raw: [f64; BLK],
    adv: [f64; BLK],
    /// Checked log-probs ((0, 1e-4] read as 0).
    lp: [f64; BLK],
    lq: [f64; BLK],
    /// Clamped log-ratio r and ρ = e^r.
    log_ratio: [f64; BLK],
    rho: [f64; BLK],
    /// p = e^logp and q = e^logp_old (binary divergences only).
    p: [f64; BLK],
    q: [f64; BLK],
}

/// A token's place: row `i`, column `j` of the input arrays, which is whole-row column
/// `col0 + j` (the one errors name). Plain integers: an [`At`] is built only on error.
#[derive(Clone, Copy)]
struct Pos {
    i: usize,
    j: usize,
    col0: usize,
}

impl Pos {
    #[cold]
    fn at(self) -> At {
        At::new(self.i, self.col0 + self.j)
    }

    #[cold]
    fn at_k(self, k: usize) -> At {
        At::with_k(self.i, self.col0 + self.j, k)
    }
}

/// A log-prob a response position may hold: finite and at most 1e-4 (NaN fails both).
#[inline(always)]
fn logprob_ok(x: f64) -> bool {
    (x <= LOGP_TOLERANCE) & (x > f64::NEG_INFINITY)
}

/// Lanes of the fixed-order sums over top-K entries.
const LANES: usize = 8;

/// Σ f(a_k, b_k) in LANES interleaved partial sums combined pairwise: a fixed order (so
/// results do not depend on the CPU) that the compiler vectorizes, without the long
/// dependency chain of a left-to-right sum.
#[inline(always)]
fn lane_sum(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += f(xa[l], xb[l]);
        }
    }
    for (l, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += f(x, y);
    }
    let [a0, a1, a2, a3, a4, a5, a6, a7] = acc;
    ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
}

impl InStage {
    const fn new() -> Self {
        Self {
            n: 0,
            on: [false; BLK],
            mask_ok: [true; BLK],
            lp_raw: [0.0; BLK],
            lq_raw: [0.0; BLK],
            adv: [0.0; BLK],
            lp: [0.0; BLK],
            lq: [0.0; BLK],
            log_ratio: [0.0; BLK],
            rho: [0.0; BLK],
            p: [0.0; BLK],
            q: [0.0; BLK],
        }
    }

    /// Loads columns `j0..j0 + n` and computes the exponentials; `false`, with only the
    /// mask loaded, for a block with no response token (padding: it has nothing to
    /// compute, check or tally).
    #[inline(always)]
    fn load<F: Float, M: MaskElem>(
        &mut self,
        row: &RowIn<'_, F, M>,
        j0: usize,
        n: usize,
        binary: bool,
    ) -> bool {
        self.n = n;
        row.mask.load(j0, &mut self.on[..n], M::is_on);
        if M::CAN_BE_INVALID {
            row.mask.load(j0, &mut self.mask_ok[..n], M::is_valid);
        }
        // An invalid mask value (non-finite float) counts as on, so a block without a
        // response token has nothing to report either.
        if !self.on[..n].iter().fold(false, |a, &o| a | o) {
            return false;
        }
        row.logp.load(j0, &mut self.lp_raw[..n], F::to_f64);
        row.logp_old.load(j0, &mut self.lq_raw[..n], F::to_f64);
        match &row.adv {
            Ok(lane) => lane.load(j0, &mut self.adv[..n], F::to_f64),
            Err(a) => self.adv[..n].fill(*a),
        }

        for k in 0..n {
            self.lp[k] = self.lp_raw[k].min(0.0);
            self.lq[k] = self.lq_raw[k].min(0.0);
            self.log_ratio[k] = (self.lp[k] - self.lq[k]).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP);
        }
        if binary {
            exp_to(&self.lp[..n], &mut self.p[..n]);
            exp_to(&self.lq[..n], &mut self.q[..n]);
            // ρ = p/q saves an exponential where it equals e^r to rounding: the log-ratio
            // inside the clamp, and p and q normal numbers (the SIMD exp flushes results
            // below e^−708 to 0). Elsewhere, e^r itself.
            let mut all_direct = true;
            for k in 0..n {
                let direct = (self.lp[k] - self.lq[k]).abs() <= LOG_RATIO_CLAMP
                    && (self.p[k] >= f64::MIN_POSITIVE) & (self.q[k] >= f64::MIN_POSITIVE);
                all_direct &= direct;
                self.rho[k] = self.p[k] / self.q[k];
            }
            if !all_direct {
                for k in 0..n {
                    if !((self.lp[k] - self.lq[k]).abs() <= LOG_RATIO_CLAMP
                        && (self.p[k] >= f64::MIN_POSITIVE) & (self.q[k] >= f64::MIN_POSITIVE))
                    {
                        self.rho[k] = simd_exp(self.log_ratio[k]);
                    }
                }
            }
        } else {
            exp_to(&self.log_ratio[..n], &mut self.rho[..n]);
        }
        true
    }

    /// Whether token k passes the checks made before its scan: a valid mask value and, for
    /// a response token, valid logp, logp_old and advantage. Almost always true, so the
    /// branch on it is predicted and the checks cost a few comparisons.
    #[inline(always)]
    fn token_ok(&self, k: usize) -> bool {
        self.mask_ok[k]
            & (!self.on[k]
                | (logprob_ok(self.lp_raw[k])
                    & logprob_ok(self.lq_raw[k])
                    & self.adv[k].is_finite()))
    }

    /// The error of token k, which failed [`InStage::token_ok`], in the order mask, logp,
    /// logp_old, advantages.
    #[cold]
    fn error<F: Float, M: MaskElem>(&self, row: &RowIn<'_, F, M>, k: usize, pos: Pos) -> Error {
        let at = pos.at();
        if !self.mask_ok[k] {
            return Error::NonFinite {
                array: "mask",
                at,
                value: row.mask.get(pos.j).to_f64(),
            };
        }
        let check = || -> Result<()> {
            read_logprob(self.lp_raw[k], "logp", at)?;
            read_logprob(self.lq_raw[k], "logp_old", at)?;
            Err(Error::NonFinite {
                array: "advantages",
                at,
                value: self.adv[k],
            })
        };
        match check() {
            Err(e) => e,
            Ok(()) => unreachable!("check() always errs"),
        }
    }

    /// D_t of checked response token k of the block, at `pos`.
    #[inline(always)]
    fn divergence<F: Float, M>(
        &self,
        div: Divergence,
        row: &RowIn<'_, F, M>,
        k: usize,
        pos: Pos,
        scratch: &mut TopkScratch,
    ) -> Result<f64> {
        Ok(match div {
            Divergence::BinaryTv => (self.p[k] - self.q[k]).abs(),
            Divergence::BinaryKl => {
                let ln_ratio = simd_ln(binary_kl_rest_ratio(self.p[k], self.q[k]));
                binary_kl_from_parts(self.lp[k], self.lq[k], self.q[k], ln_ratio)
            }
            Divergence::K2 => 0.5 * self.log_ratio[k] * self.log_ratio[k],
            Divergence::K3 => (self.rho[k] - 1.0) - self.log_ratio[k],
            Divergence::TopkTv | Divergence::TopkKl => {
                let Some(topk) = &row.topk else {
                    unreachable!("top-K arrays are checked before the pass")
                };
                topk_divergence(div, topk, pos, scratch)?
            }
        })
    }
}

/// A row's top-K pair: flat slices when contiguous, else (L, K) views.
enum TopkRow<'a, F> {
    Flat {
        old: &'a [F],
        new: &'a [F],
        k: usize,
    },
    View {
        old: ArrayView2<'a, F>,
        new: ArrayView2<'a, F>,
    },
}

impl<'a, F: Float> TopkRow<'a, F> {
    fn new(topk: &TopK<'a, F>, i: usize) -> Self {
        let old = topk.logp_old.index_axis_move(Axis(0), i);
        let new = topk.logp.index_axis_move(Axis(0), i);
        match (old.to_slice(), new.to_slice()) {
            (Some(o), Some(n)) => Self::Flat {
                old: o,
                new: n,
                k: old.ncols(),
            },
            _ => Self::View { old, new },
        }
    }

    fn width(&self) -> usize {
        match self {
            Self::Flat { k, .. } => *k,
            Self::View { old, .. } => old.ncols(),
        }
    }

    /// The K entries of the `lo.len() / K` tokens from column j widened into `lo`
    /// (rollout) and `ln` (current), token-major, with (0, 1e-4] read as 0; `false` if any
    /// entry is not a valid log-prob (padding may hold such; see [`TopkRow::valid`]).
    #[inline(always)]
    fn load(&self, j: usize, lo: &mut [f64], ln: &mut [f64]) -> bool {
        #[inline(always)]
        fn widen<'x, F: Float + 'x>(dst: &mut [f64], src: impl Iterator<Item = &'x F>) -> bool {
            let mut ok = true;
            for (d, &x) in dst.iter_mut().zip(src) {
                let v = x.to_f64();
                ok &= logprob_ok(v);
                *d = v.min(0.0);
            }
            ok
        }
        match self {
            Self::Flat { old, new, k } => {
                let (at, len) = (j * k, lo.len());
                widen(lo, old[at..at + len].iter()) & widen(ln, new[at..at + len].iter())
            }
            Self::View { old, new } => {
                let kk = old.ncols();
                let mut ok = true;
                for (t, (lo, ln)) in lo
                    .chunks_exact_mut(kk)
                    .zip(ln.chunks_exact_mut(kk))
                    .enumerate()
                {
                    ok &= widen(lo, old.row(j + t).iter()) & widen(ln, new.row(j + t).iter());
                }
                ok
            }
        }
    }

    /// Hints the CPU to fetch the entries of the `m` tokens from column j into cache
    /// (the next group's, while the current one is computed: the top-K arrays are
    /// the bulk of the bytes, and a group's compute leaves the memory idle otherwise).
    #[inline(always)]
    fn prefetch(&self, j: usize, m: usize) {
        #[cfg(target_arch = "x86_64")]
        if let Self::Flat { old, new, k } = self {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            let end = ((j + m) * k).min(old.len());
            let start = (j * k).min(end);
            let step = 64 / std::mem::size_of::<F>();
            for at in (start..end).step_by(step) {
                // SAFETY: a prefetch is a hint with no effect on memory; the pointers
                // are in bounds.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(old.as_ptr().add(at).cast());
                    _mm_prefetch::<_MM_HINT_T0>(new.as_ptr().add(at).cast());
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (j, m);
    }

    /// Whether token j's K entries are all valid log-probs.
    #[cold]
    fn valid(&self, j: usize) -> bool {
        let (old, new) = self.token(j);
        old.iter().chain(new.iter()).all(|x| logprob_ok(x.to_f64()))
    }

    /// Token j's K entries, rollout and current.
    fn token(&self, j: usize) -> (ArrayView1<'_, F>, ArrayView1<'_, F>) {
        match self {
            Self::Flat { old, new, k } => (
                ArrayView1::from(&old[j * k..(j + 1) * k]),
                ArrayView1::from(&new[j * k..(j + 1) * k]),
            ),
            Self::View { old, new } => (old.row(j), new.row(j)),
        }
    }

    /// The first invalid entry of token `pos`, as an error.
    #[cold]
    fn error(&self, pos: Pos) -> Error {
        let (old, new) = self.token(pos.j);
        for (k, (&a, &b)) in old.iter().zip(new.iter()).enumerate() {
            let at = pos.at_k(k);
            if let Err(e) = read_logprob(a.to_f64(), "topk_logp_old", at) {
                return e;
            }
            if let Err(e) = read_logprob(b.to_f64(), "topk_logp", at) {
                return e;
            }
        }
        unreachable!("error() is called on a token with an invalid entry")
    }
}

/// Top-K entries per side staged at once: a group of up to `TOPK_GROUP / K` tokens has
/// its exponentials computed in one SIMD call.
const TOPK_GROUP: usize = 1024;

/// Scratch for a group of tokens' top-K pairs, on the stack and reused across a row.
pub(crate) struct TopkScratch {
    /// `[log P of the group | log Q of the group]`, token-major within each half.
    logs: [f64; 2 * TOPK_GROUP],
    /// The same layout, exponentiated.
    probs: [f64; 2 * TOPK_GROUP],
}

impl TopkScratch {
    pub(crate) const fn new() -> Self {
        Self {
            logs: [0.0; 2 * TOPK_GROUP],
            probs: [0.0; 2 * TOPK_GROUP],
        }
    }
}

/// D_t for a top-K width above [`TOPK_STACK`]: a scalar pass, still allocation-free.
#[cold]
fn topk_divergence_wide<F: Float>(div: Divergence, topk: &TopkRow<'_, F>, pos: Pos) -> Result<f64> {
    let (old, new) = topk.token(pos.j);
    for (k, (&a, &b)) in old.iter().zip(new.iter()).enumerate() {
        let at = pos.at_k(k);
        read_logprob(a.to_f64(), "topk_logp_old", at)?;
        read_logprob(b.to_f64(), "topk_logp", at)?;
    }
    // Checked: min(0) is exactly the (0, 1e-4] → 0 rule.
    let pairs = old
        .iter()
        .zip(new.iter())
        .map(|(&a, &b)| (a.to_f64().min(0.0), b.to_f64().min(0.0)));
    Ok(if div == Divergence::TopkTv {
        topk_tv_pairs(pairs)
    } else {
        topk_kl_pairs(pairs)
    })
}

/// One token's sums over its K entries, from the probabilities P (`po`), Q (`pn`) and
/// log-probabilities (`lo`, `ln`): [Σ P, Σ Q, the divergence's own sum] (Σ |P − Q|, or
/// Σ P (log P − log Q) for KL), in one pass of 4 interleaved partial sums each, combined
/// pairwise: a fixed order, the same for a token alone and in a group.
#[inline(always)]
fn topk_sums(div: Divergence, po: &[f64], pn: &[f64], lo: &[f64], ln: &[f64]) -> [f64; 3] {
    #[inline(always)]
    fn sums(
        po: &[f64],
        pn: &[f64],
        lo: &[f64],
        ln: &[f64],
        f: impl Fn(f64, f64, f64, f64) -> f64,
    ) -> [f64; 3] {
        const W: usize = 4;
        let (mut ap, mut aq, mut ax) = ([0.0f64; W], [0.0f64; W], [0.0f64; W]);
        let full = po.len() / W * W;
        for c in (0..full).step_by(W) {
            for l in 0..W {
                let k = c + l;
                ap[l] += po[k];
                aq[l] += pn[k];
                ax[l] += f(po[k], pn[k], lo[k], ln[k]);
            }
        }
        for (l, k) in (full..po.len()).enumerate() {
            ap[l] += po[k];
            aq[l] += pn[k];
            ax[l] += f(po[k], pn[k], lo[k], ln[k]);
        }
        let comb = |[a0, a1, a2, a3]: [f64; W]| (a0 + a2) + (a1 + a3);
        [comb(ap), comb(aq), comb(ax)]
    }
    if div == Divergence::TopkTv {
        sums(po, pn, lo, ln, |p, q, _, _| (p - q).abs())
    } else {
        sums(po, pn, lo, ln, |p, _, a, b| p * (a - b))
    }
}

/// The masses outside the top K, P_rest and Q_rest, from Σ P and Σ Q.
#[inline(always)]
fn topk_rests(sum_p: f64, sum_q: f64) -> (f64, f64) {
    ((1.0 - sum_p).max(0.0), (1.0 - sum_q).max(0.0))
}

/// D_t of the `m` tokens from column `j` (K ≤ [`TOPK_STACK`], m K ≤ [`TOPK_GROUP`]) into
/// `d`, 0 where `on` is false: the entries widened, checked, and exponentiated in one
/// SIMD call. `false` if a response token has an invalid entry.
#[inline(always)]
fn topk_group<F: Float>(
    div: Divergence,
    topk: &TopkRow<'_, F>,
    j: usize,
    on: &[bool],
    d: &mut [f64],
    buf: &mut TopkScratch,
) -> bool {
    let (kk, m) = (topk.width(), on.len());
    let len = m * kk;
    let mut ok = true;
    {
        let (lo, ln) = buf.logs[..2 * len].split_at_mut(len);
        if !topk.load(j, lo, ln) {
            // Some entry is invalid: fine in padding, an error at a response token.
            ok = (0..m).all(|t| !on[t] || topk.valid(j + t));
        }
    }
    let probs = &mut buf.probs[..2 * len];
    exp_to(&buf.logs[..2 * len], probs);
    let (po, pn) = probs.split_at(len);
    let (lo, ln) = buf.logs[..2 * len].split_at(len);
    // Per token: the sums; then (KL) the two logarithms of the rest term for the whole
    // group in one SIMD call.
    let mut sums = [[0.0f64; 3]; BLK];
    for t in 0..m {
        // The next group's tokens, one per token here: spread out, the prefetches do not
        // crowd the memory pipeline.
        topk.prefetch(j + m + t, 1);
        let r = t * kk..(t + 1) * kk;
        sums[t] = topk_sums(div, &po[r.clone()], &pn[r.clone()], &lo[r.clone()], &ln[r]);
    }
    if div == Divergence::TopkTv {
        for t in 0..m {
            let [sum_p, sum_q, l1] = sums[t];
            let (p_rest, q_rest) = topk_rests(sum_p, sum_q);
            d[t] = if on[t] {
                (l1 + (p_rest - q_rest).abs()) / 2.0
            } else {
                0.0
            };
        }
    } else {
        // [P_rest of each token | max(Q_rest, floor) of each token], then their logs.
        let mut rests = [1.0f64; 2 * BLK];
        for t in 0..m {
            let (p_rest, q_rest) = topk_rests(sums[t][0], sums[t][1]);
            rests[t] = p_rest;
            rests[m + t] = q_rest.max(TOPK_KL_REST_FLOOR);
        }
        let mut logs = [0.0f64; 2 * BLK];
        ln_to(&rests[..2 * m], &mut logs[..2 * m]);
        for t in 0..m {
            let (head, p_rest) = (sums[t][2], rests[t]);
            let rest = if p_rest > 0.0 {
                p_rest * (logs[t] - logs[m + t])
            } else {
                0.0
            };
            d[t] = if on[t] { (head + rest).max(0.0) } else { 0.0 };
        }
    }
    ok
}

/// D_t of a block's tokens under a top-K divergence into `d` (0 off the mask); `false`
/// if a response token has an invalid entry (the caller then finds it in order).
#[inline(always)]
fn topk_block<F: Float>(
    div: Divergence,
    topk: &TopkRow<'_, F>,
    pos: Pos,
    on: &[bool],
    d: &mut [f64],
    buf: &mut TopkScratch,
) -> bool {
    let kk = topk.width();
    if kk > TOPK_STACK {
        let mut ok = true;
        for (k, (&on, d)) in on.iter().zip(d.iter_mut()).enumerate() {
            *d = 0.0;
            if on {
                match topk_divergence_wide(
                    div,
                    topk,
                    Pos {
                        j: pos.j + k,
                        ..pos
                    },
                ) {
                    Ok(v) => *d = v,
                    Err(_) => ok = false,
                }
            }
        }
        return ok;
    }
    // Only from the first response token to the last: leading and trailing padding's
    // entries are neither read nor exponentiated.
    let Some(first) = on.iter().position(|&o| o) else {
        d.fill(0.0);
        return true;
    };
    let end = on.iter().rposition(|&o| o).map_or(first, |k| k + 1);
    d[..first].fill(0.0);
    d[end..].fill(0.0);
    let (on, d, j) = (&on[first..end], &mut d[first..end], pos.j + first);
    let g = (TOPK_GROUP / kk.max(1)).clamp(1, BLK);
    let mut ok = true;
    for (s, (on, d)) in on.chunks(g).zip(d.chunks_mut(g)).enumerate() {
        ok &= topk_group(div, topk, j + s * g, on, d, buf);
    }
    ok
}

/// D_t under a top-K divergence at response token `pos`, checking its K entries.
#[inline(always)]
fn topk_divergence<F: Float>(
    div: Divergence,
    topk: &TopkRow<'_, F>,
    pos: Pos,
    buf: &mut TopkScratch,
) -> Result<f64> {
    if topk.width() > TOPK_STACK {
        return topk_divergence_wide(div, topk, pos);
    }
    let mut d = [0.0];
    if topk_group(div, topk, pos.j, &[true], &mut d, buf) {
        Ok(d[0])
    } else {
        Err(topk.error(pos))
    }
}

/// One block of a row's outputs, in the output type.
struct OutStage<F> {
    divergence: [F; BLK],
    weight: [F; BLK],
    threshold: [F; BLK],
    keep: [bool; BLK],
    reason: [u8; BLK],
    token_loss: [F; BLK],
    grad: [F; BLK],
}

impl<F: Float> OutStage<F> {
    fn new() -> Self {
        let z = [F::default(); BLK];
        Self {
            divergence: z,
            weight: z,
            threshold: z,
            keep: [false; BLK],
            reason: [0; BLK],
            token_loss: z,
            grad: z,
        }
    }
}

const FEASIBLE: u8 = Reason::Feasible as u8;
const CORRECTIVE: u8 = Reason::Corrective as u8;
const TOKEN: u8 = Reason::TokenThreshold as u8;
const BUDGET: u8 = Reason::PrefixBudget as u8;

/// `if c { a } else { b }` without a branch.
#[inline(always)]
fn pick(c: bool, a: u8, b: u8) -> u8 {
    let m = 0u8.wrapping_sub(u8::from(c)); // all ones if c
    (a & m) | (b & !m)
}

/// Tracks ⌊10 (t − 1)/T⌋ as t advances, without a division per token.
struct Decile {
    row_len: usize,
    decile: usize,
    /// The first t of the next decile.
    next: usize,
}

impl Decile {
    fn new(row_len: usize) -> Self {
        let mut d = Self {
            row_len,
            decile: 0,
            next: 0,
        };
        d.next = d.start_of(1);
        d
    }

    /// The first t (from 1) with ⌊10 (t − 1)/T⌋ ≥ k: t − 1 = ⌈k T / 10⌉.
    fn start_of(&self, k: usize) -> usize {
        (k * self.row_len).div_ceil(10) + 1
    }

    /// Whether t (at or after the last t passed to [`Decile::at`]) is in the current
    /// decile.
    #[inline(always)]
    fn holds(&self, t: usize) -> bool {
        self.decile == 9 || t < self.next
    }

    #[inline(always)]
    fn at(&mut self, t: usize) -> usize {
        while t >= self.next && self.decile < 9 {
            self.decile += 1;
            self.next = self.start_of(self.decile + 1);
        }
        self.decile
    }
}

/// The checked logp_ref of response token `at`.
#[inline(always)]
fn logp_ref_at<F: Float>(lane: &Lane<'_, F>, pos: Pos) -> Result<f64> {
    let x = match lane {
        Lane::Slice(s) => s[pos.j],
        Lane::View(v) => v[pos.j],
    }
    .to_f64();
    if logprob_ok(x) {
        Ok(x.min(0.0))
    } else {
        read_logprob(x, "logp_ref", pos.at())
    }
}

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
pub struct FixedSum(pub i128);

impl FixedSum {
    /// Adds `x`.
    #[inline(always)]
    pub(crate) fn add(&mut self, x: f64) {
        self.0 = self.0.saturating_add(to_fixed(x));
    }

    /// The sum of two parts.
    #[must_use]
    pub const fn merge(self, other: Self) -> Self {
        Self(self.0.saturating_add(other.0))
    }

    /// The sum as a float.
    pub fn to_f64(self) -> f64 {
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
fn to_fixed(x: f64) -> i128 {
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
/// mergeable sums over a row's (or a chunk's) response tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct RowStats {
    /// max D_t (TRM).
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

/// GMPO's clipped log-ratio r̃ = sgn(A) min(sgn(A) r, sgn(A) clamp(r, −ε_low, ε_high)),
/// and whether the unclipped branch was taken (where the gradient flows).
#[inline(always)]
pub(crate) fn gmpo_clip(r: f64, adv: f64, eps_low: f64, eps_high: f64) -> (f64, bool) {
    let c = r.clamp(-eps_low, eps_high);
    if adv > 0.0 {
        if r <= c { (r, true) } else { (c, false) }
    } else if adv < 0.0 {
        if r >= c { (r, true) } else { (c, false) }
    } else {
        (0.0, true)
    }
}

/// The [`RowStats`] of row `i` of `batch` (a whole row or a chunk of one).
pub(crate) fn row_stats<'a, F: Float, M: MaskElem>(
    cfg: &Config,
    batch: &Batch<'a, F>,
    mask: ArrayView1<'a, M>,
    i: usize,
    col0: usize,
) -> Result<RowStats> {
    let row = RowIn::new(batch, mask, i, col0);
    let mut stats = RowStats::default();
    let (trm_max, trm_avg) = match cfg.rule {
        Rule::TrmMax { .. } => (true, false),
        Rule::TrmAvg { .. } => (true, true),
        _ => (false, false),
    };
    let gspo = matches!(cfg.objective, Objective::Gspo { .. });
    let gmpo = match cfg.objective {
        Objective::Gmpo { eps_low, eps_high } => Some((eps_low, eps_high)),
        _ => None,
    };
    let binary = cfg.divergence.needs_probs();
    let kl = cfg.kl.is_some();
    let mut scratch = None;
    let mut st = InStage::new();
    let mut wk = Work::new();
    let l = plan_width(&row);
    for j0 in (0..l).step_by(BLK) {
        let n = BLK.min(l - j0);
        if !st.load(&row, j0, n, binary) {
            continue;
        }
        // Every value checked, as in the row's sweep, so errors come in column order
        // (see the module docs); D_t is 0 off the mask.
        if !block_values(cfg, &row, &st, j0, &mut wk, kl, &mut scratch) {
            ordered_block(cfg, &row, &st, j0, &mut wk, kl, &mut scratch)?;
        }
        let on = &st.on[..n];
        if trm_max || trm_avg {
            let max = |a: f64, x: f64| if x > a { x } else { a };
            stats.d_max = lane_fold(&wk.d[..n], stats.d_max, max);
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
                stats.r_clip_sum.add(gmpo_clip(r, st.adv[k], lo, hi).0);
                stats.adv_sum.add(st.adv[k]);
            }
        }
    }
    Ok(stats)
}

/// TRM's whole-row decision from the row's max and sum of D_t over its T tokens; `true`
/// for every other rule.
pub(crate) fn trm_keeps_row(rule: &Rule, stats: &RowStats, row_len: usize) -> bool {
    match *rule {
        Rule::TrmMax { delta } => stats.d_max <= delta,
        Rule::TrmAvg { delta } => row_len == 0 || stats.d_sum.to_f64() / row_len as f64 <= delta,
        _ => true,
    }
}

/// GSPO's clamp on the sequence log-ratio (verl's).
const GSPO_LOG_RATIO_MAX: f64 = 10.0;

/// A row's facts from its length and statistics.
pub(crate) fn row_facts(
    cfg: &Config,
    row_len: usize,
    stats: &RowStats,
    row_adv: Option<f64>,
) -> RowFacts {
    let t = row_len.max(1) as f64;
    RowFacts {
        row_len,
        row_ok: trm_keeps_row(&cfg.rule, stats, row_len),
        seq_ratio: match cfg.objective {
            Objective::Gspo { .. } => (stats.r_sum.to_f64() / t).min(GSPO_LOG_RATIO_MAX).exp(),
            Objective::Gmpo { .. } => (stats.r_clip_sum.to_f64() / t).exp(),
            _ => 1.0,
        },
        adv_mean: row_adv.unwrap_or_else(|| stats.adv_sum.to_f64() / t),
    }
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
}

/// The facts of whole row `i` of `batch`: its T and, under TRM, its decision.
pub(crate) fn whole_row_facts<'a, F: Float, M: MaskElem>(
    cfg: &Config,
    batch: &Batch<'a, F>,
    mask: ArrayView1<'a, M>,
    i: usize,
) -> Result<RowFacts> {
    // An invalid mask value counts here; the sweep reports it in its place.
    let row_len = mask.iter().filter(|m| m.is_on()).count();
    let stats = if needs_row_stats(cfg) && row_len > 0 {
        row_stats(cfg, batch, mask, i, 0)?
    } else {
        RowStats::default()
    };
    Ok(row_facts(cfg, row_len, &stats, batch.row_advantage(i)))
}

/// The state a row's sweep carries from column to column (and from chunk to chunk):
/// response tokens so far and the prefix sums S, W.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Prefix {
    pub t: usize,
    pub s: f64,
    pub w: f64,
    /// The minimum ratio over the response tokens so far (MinPRO); +∞ before the first.
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
struct Work {
    /// t of each response token (0 elsewhere).
    t: [usize; BLK],
    d: [f64; BLK],
    w: [f64; BLK],
    c: [f64; BLK],
    feasible: [bool; BLK],
    fail: [u8; BLK],
    code: [u8; BLK],
    loss: [f64; BLK],
    grad: [f64; BLK],
    clipped: [bool; BLK],
    /// The share of its objective term each token keeps: 1 or 0 under the hard rules,
    /// the gate under `cppo_soft`.
    m: [f64; BLK],
    /// Checked logp_ref (KL penalty only).
    lref: [f64; BLK],
}

impl Work {
    const fn new() -> Self {
        Self {
            t: [0; BLK],
            d: [0.0; BLK],
            w: [0.0; BLK],
            c: [0.0; BLK],
            feasible: [false; BLK],
            fail: [TOKEN; BLK],
            code: [0; BLK],
            loss: [0.0; BLK],
            grad: [0.0; BLK],
            clipped: [false; BLK],
            m: [0.0; BLK],
            lref: [0.0; BLK],
        }
    }
}

/// Computes row `i` of `batch` (a whole row, or a chunk of one starting from `prefix`)
/// into `out`, advances `prefix`, and returns the row's tally.
///
/// Each block of columns goes through short passes over its staged arrays (see the
/// module docs): checks and divergences; positions and weights; the rule's test (CPPO's
/// prefix scan is the only sequential part); reasons; the objective and KL terms; outputs
/// and tally. Dispatches to the widest build the CPU supports ([`isa`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_row<'a, F: Float, M: MaskElem>(
    plan: &Plan<'_>,
    batch: &Batch<'a, F>,
    mask: ArrayView1<'a, M>,
    i: usize,
    facts: RowFacts,
    prefix: &mut Prefix,
    out: RowLanes<'_, F>,
) -> Result<Tally> {
    match isa() {
        // SAFETY: `isa` checked that the CPU has these features.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { run_row_avx512(plan, batch, mask, i, facts, prefix, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { run_row_avx2(plan, batch, mask, i, facts, prefix, out) },
        _ => run_row_impl(plan, batch, mask, i, facts, prefix, out),
    }
}

/// Builds of [`run_row_impl`] for a set of target features: the same code, which the
/// compiler vectorizes as wide as the features allow.
macro_rules! row_builds {
    ($($(#[$doc:meta])* $name:ident = $features:literal;)*) => {$(
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        fn $name<'a, F: Float, M: MaskElem>(
            plan: &Plan<'_>,
            batch: &Batch<'a, F>,
            mask: ArrayView1<'a, M>,
            i: usize,
            facts: RowFacts,
            prefix: &mut Prefix,
            out: RowLanes<'_, F>,
        ) -> Result<Tally> {
            run_row_impl(plan, batch, mask, i, facts, prefix, out)
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

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn run_row_impl<'a, F: Float, M: MaskElem>(
    plan: &Plan<'_>,
    batch: &Batch<'a, F>,
    mask: ArrayView1<'a, M>,
    i: usize,
    facts: RowFacts,
    prefix: &mut Prefix,
    mut out: RowLanes<'_, F>,
) -> Result<Tally> {
    let cfg = plan.cfg;
    let mut tally = Tally::default();
    let row_len = facts.row_len;
    if row_len == 0 {
        out.fill_zero();
        return Ok(tally);
    }
    let row = RowIn::new(batch, mask, i, plan.col0);
    let agg_w = cfg
        .aggregation
        .weight(plan.denominators, row_len, plan.width, cfg.norm_length);
    let bypass_allowed = !cfg.rule.is_sequence_level();
    let soft_tau = cfg.rule.cppo_params().and_then(|p| p.soft_tau);
    let binary = cfg.divergence.needs_probs();
    let kl = cfg.kl.as_ref().zip(row.logp_ref.as_ref());
    let mut scratch = None;
    let t0 = prefix.t;
    let (mut t, mut s_sum, mut w_sum) = (prefix.t, prefix.s, prefix.w);
    let mut min_ratio = prefix.min_ratio;
    let mut row_loss = 0.0f64;
    let mut decile = Decile::new(row_len);
    let mut st = InStage::new();
    let mut wk = Work::new();
    let mut os = OutStage::<F>::new();
    let mut minpro_grad = MinproGrad::for_config(cfg, prefix.min_ratio);
    let l = plan_width(&row);

    for j0 in (0..l).step_by(BLK) {
        let n = BLK.min(l - j0);
        if !st.load(&row, j0, n, binary) {
            // Padding: zeros out, and the tally, the prefix and MinPRO's minimum as they
            // were (what the passes below would give, bit for bit).
            out.zero_block(j0, n, &mut os);
            continue;
        }

        // Checks, divergences and logp_ref, a vectorized pass each; a block holding a bad
        // value is walked again in column order to report the first (see the module docs).
        if !block_values(cfg, &row, &st, j0, &mut wk, kl.is_some(), &mut scratch) {
            ordered_block(cfg, &row, &st, j0, &mut wk, kl.is_some(), &mut scratch)?;
        }

        // Positions t (response tokens only) and the rule's test.
        for k in 0..n {
            t += usize::from(st.on[k]);
            wk.t[k] = t;
        }
        rule_test(cfg, facts, &st, &mut wk, n, (&mut s_sum, &mut w_sum));

        // Reasons: 1 feasible; else 2 kept by the corrective bypass (never under TRM);
        // else the failed test; 0 off the mask. Selected without branches.
        for k in 0..n {
            let away = st.adv[k] * (st.rho[k] - 1.0) > 0.0;
            let bypass = !away & bypass_allowed;
            let code = pick(
                wk.feasible[k],
                FEASIBLE,
                pick(bypass, CORRECTIVE, wk.fail[k]),
            );
            wk.code[k] = pick(st.on[k], code, 0);
            let kept = (wk.code[k] == FEASIBLE) | (wk.code[k] == CORRECTIVE);
            wk.m[k] = if kept { 1.0 } else { 0.0 };
        }
        if let Some(tau) = soft_tau {
            // cppo_soft: an away-moving token keeps σ((c_t − w_t D_t)/τ) of its term; the
            // block's e^−z in one SIMD call.
            let mut neg_z = [0.0f64; BLK];
            for k in 0..n {
                neg_z[k] = -((wk.c[k] - wk.w[k] * wk.d[k]) / tau);
            }
            let mut e = [0.0f64; BLK];
            exp_to(&neg_z[..n], &mut e[..n]);
            for k in 0..n {
                let away = st.adv[k] * (st.rho[k] - 1.0) > 0.0;
                if st.on[k] & away {
                    wk.m[k] = 1.0 / (1.0 + e[k]);
                }
            }
        }

        objective_terms(cfg, &facts, &st, &mut wk, n, &mut min_ratio);
        if let Some((kl, _)) = kl {
            if kl.estimator == KlEstimator::K3 {
                // `KlPenalty::eval`'s k3 with the block's e^x − 1 in one SIMD call.
                let mut x = [0.0f64; BLK];
                for k in 0..n {
                    x[k] = if st.on[k] { wk.lref[k] - st.lp[k] } else { 0.0 };
                }
                let mut em1 = [0.0f64; BLK];
                expm1_to(&x[..n], &mut em1[..n]);
                let beta = kl.coef;
                for k in 0..n {
                    if st.on[k] {
                        wk.loss[k] += beta * (em1[k] - x[k]);
                        wk.grad[k] += -beta * em1[k];
                    }
                }
            } else {
                for k in 0..n {
                    if st.on[k] {
                        let (lk, gk) = kl.eval(st.lp[k], wk.lref[k]);
                        wk.loss[k] += lk;
                        wk.grad[k] += gk;
                    }
                }
            }
        }

        if let Some(mg) = &mut minpro_grad {
            mg.block(&st, &mut wk, n, j0, agg_w, &mut out);
        }

        // Outputs, in the output type, straight into the caller's arrays (staged only for
        // strided ones); outputs not asked for are not computed.
        let on = &st.on;
        let kept = |c: u8| (c == FEASIBLE) | (c == CORRECTIVE);
        emit(&mut out.divergence, &mut os.divergence, j0, n, |k| {
            F::from_f64(wk.d[k])
        });
        emit(&mut out.weight, &mut os.weight, j0, n, |k| {
            F::from_f64(if on[k] { wk.w[k] } else { 0.0 })
        });
        emit(&mut out.threshold, &mut os.threshold, j0, n, |k| {
            F::from_f64(if on[k] { wk.c[k] } else { 0.0 })
        });
        emit(&mut out.keep, &mut os.keep, j0, n, |k| kept(wk.code[k]));
        emit(&mut out.reason, &mut os.reason, j0, n, |k| wk.code[k]);
        emit(&mut out.token_loss, &mut os.token_loss, j0, n, |k| {
            F::from_f64(wk.loss[k])
        });
        emit(&mut out.grad, &mut os.grad, j0, n, |k| {
            F::from_f64(wk.grad[k] * agg_w)
        });

        row_loss += lane_sum(&wk.loss[..n], &wk.loss[..n], |a, _| a);
        tally_block(&mut tally, &st, &wk, n, &mut decile);
    }
    if let Some(mg) = &mut minpro_grad {
        mg.flush(None, &mut wk, 0, agg_w, &mut out);
    }
    tally.loss = row_loss * agg_w;
    // The row counts as a sequence in the chunk that holds its first response token.
    tally.seqs = u64::from(t0 == 0 && t > 0);
    *prefix = Prefix {
        t,
        s: s_sum,
        w: w_sum,
        min_ratio,
    };
    Ok(tally)
}

/// A block's checks, divergences D_t (0 off the mask) and, with a KL penalty, checked
/// logp_ref, each a pass over the block; `false` if a token fails a check.
#[inline(always)]
fn block_values<F: Float, M: MaskElem>(
    cfg: &Config,
    row: &RowIn<'_, F, M>,
    st: &InStage,
    j0: usize,
    wk: &mut Work,
    kl: bool,
    scratch: &mut Option<TopkScratch>,
) -> bool {
    let n = st.n;
    let (on, d) = (&st.on[..n], &mut wk.d[..n]);
    // A count, not `ok &= …`: the compiler vectorizes an integer sum, not a bool fold.
    let mut bad = 0u32;
    for k in 0..n {
        bad += u32::from(!st.token_ok(k));
    }
    let mut ok = bad == 0;
    match cfg.divergence {
        Divergence::BinaryTv => {
            for k in 0..n {
                d[k] = if on[k] {
                    (st.p[k] - st.q[k]).abs()
                } else {
                    0.0
                };
            }
        }
        Divergence::K2 => {
            for k in 0..n {
                let r = st.log_ratio[k];
                d[k] = if on[k] { 0.5 * r * r } else { 0.0 };
            }
        }
        Divergence::K3 => {
            for k in 0..n {
                let x = (st.rho[k] - 1.0) - st.log_ratio[k];
                d[k] = if on[k] { x } else { 0.0 };
            }
        }
        Divergence::BinaryKl => {
            // The logarithms of the block in one SIMD call (1 off the mask: ln 1 = 0).
            let mut ratio = [1.0f64; BLK];
            for k in 0..n {
                ratio[k] = if on[k] {
                    binary_kl_rest_ratio(st.p[k], st.q[k])
                } else {
                    1.0
                };
            }
            let mut ln_ratio = [0.0f64; BLK];
            ln_to(&ratio[..n], &mut ln_ratio[..n]);
            for k in 0..n {
                d[k] = if on[k] {
                    binary_kl_from_parts(st.lp[k], st.lq[k], st.q[k], ln_ratio[k])
                } else {
                    0.0
                };
            }
        }
        Divergence::TopkTv | Divergence::TopkKl => {
            let Some(topk) = &row.topk else {
                unreachable!("top-K arrays are checked before the pass")
            };
            let buf = scratch.get_or_insert_with(TopkScratch::new);
            ok &= topk_block(cfg.divergence, topk, row.pos(j0), on, d, buf);
        }
    }
    if let (true, Some(lane)) = (kl, &row.logp_ref) {
        let lref = &mut wk.lref[..n];
        lane.load(j0, lref, F::to_f64);
        for k in 0..n {
            ok &= !on[k] | logprob_ok(lref[k]);
            lref[k] = lref[k].min(0.0);
        }
    }
    ok
}

/// A block's checks, divergences and logp_ref token by token in column order: the first
/// bad value as an error (the values as [`block_values`] otherwise).
#[cold]
#[inline(never)]
fn ordered_block<F: Float, M: MaskElem>(
    cfg: &Config,
    row: &RowIn<'_, F, M>,
    st: &InStage,
    j0: usize,
    wk: &mut Work,
    kl: bool,
    scratch: &mut Option<TopkScratch>,
) -> Result<()> {
    let buf = scratch.get_or_insert_with(TopkScratch::new);
    for k in 0..st.n {
        let pos = row.pos(j0 + k);
        if !st.token_ok(k) {
            return Err(st.error(row, k, pos));
        }
        if st.on[k] {
            wk.d[k] = st.divergence(cfg.divergence, row, k, pos, buf)?;
            if let (true, Some(lane)) = (kl, &row.logp_ref) {
                wk.lref[k] = logp_ref_at(lane, pos)?;
            }
        } else {
            wk.d[k] = 0.0;
        }
    }
    Ok(())
}

/// Σ of `vals` where `on`, in LANES interleaved partial sums (see [`lane_sum`]).
#[inline(always)]
fn masked_sum(vals: &[f64], on: &[bool]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let (cv, co) = (vals.chunks_exact(LANES), on.chunks_exact(LANES));
    let (rv, ro) = (cv.remainder(), co.remainder());
    for (xv, xo) in cv.zip(co) {
        for l in 0..LANES {
            acc[l] += if xo[l] { xv[l] } else { 0.0 };
        }
    }
    for (l, (&v, &o)) in rv.iter().zip(ro).enumerate() {
        acc[l] += if o { v } else { 0.0 };
    }
    let [a0, a1, a2, a3, a4, a5, a6, a7] = acc;
    ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
}

/// `f` folded over `vals` from `init` in LANES interleaved accumulators, combined
/// pairwise: for an order-free `f` (min, max) the compiler vectorizes it without the
/// loop-carried dependency of a left-to-right fold.
#[inline(always)]
fn lane_fold(vals: &[f64], init: f64, f: impl Fn(f64, f64) -> f64) -> f64 {
    let mut acc = [init; LANES];
    let cv = vals.chunks_exact(LANES);
    let rv = cv.remainder();
    for xv in cv {
        for l in 0..LANES {
            acc[l] = f(acc[l], xv[l]);
        }
    }
    for (l, &x) in rv.iter().enumerate() {
        acc[l] = f(acc[l], x);
    }
    let [a0, a1, a2, a3, a4, a5, a6, a7] = acc;
    f(f(f(a0, a4), f(a2, a6)), f(f(a1, a5), f(a3, a7)))
}

/// Adds a block's response tokens to the tally: counts by comparisons, float sums in
/// fixed-order lanes, the position deciles in a short scalar loop.
#[inline(always)]
fn tally_block(tally: &mut Tally, st: &InStage, wk: &Work, n: usize, decile: &mut Decile) {
    let (on, code) = (&st.on[..n], &wk.code[..n]);
    // Counts: one pass of byte comparisons summed in 32-bit lanes, vectorized.
    let mut c = [0u32; 10];
    for k in 0..n {
        let masked = code[k] >= TOKEN;
        let (p, q) = (on[k] & (st.adv[k] > 0.0), on[k] & (st.adv[k] < 0.0));
        c[0] += u32::from(on[k]);
        c[1] += u32::from(code[k] == FEASIBLE);
        c[2] += u32::from(code[k] == CORRECTIVE);
        c[3] += u32::from(code[k] == TOKEN);
        c[4] += u32::from(code[k] == BUDGET);
        c[5] += u32::from(p);
        c[6] += u32::from(p & masked);
        c[7] += u32::from(q);
        c[8] += u32::from(q & masked);
        c[9] += u32::from(wk.clipped[k]);
    }
    let [
        responses,
        feasible,
        corrective,
        token,
        budget,
        pos,
        pos_m,
        neg,
        neg_m,
        clipped,
    ] = c.map(u64::from);
    tally.tokens += responses;
    for (t, x) in tally.by_reason[1..]
        .iter_mut()
        .zip([feasible, corrective, token, budget])
    {
        *t += x;
    }
    tally.pos_adv += pos;
    tally.pos_adv_masked += pos_m;
    tally.neg_adv += neg;
    tally.neg_adv_masked += neg_m;
    tally.clipped += clipped;

    let mut k1 = [0.0f64; BLK];
    let mut k3 = [0.0f64; BLK];
    let mut thr = [0.0f64; BLK];
    let mut has_thr = [false; BLK];
    let mut lo = [f64::INFINITY; BLK];
    let mut hi = [0.0f64; BLK];
    for k in 0..n {
        let (r, rho) = (st.log_ratio[k], st.rho[k]);
        k1[k] = -r;
        k3[k] = (rho - 1.0) - r;
        has_thr[k] = on[k] & wk.c[k].is_finite();
        thr[k] = if has_thr[k] { wk.c[k] } else { 0.0 };
        lo[k] = if on[k] { rho } else { f64::INFINITY };
        hi[k] = if on[k] { rho } else { 0.0 };
    }
    // Plain comparisons: none of these is NaN at a response token (D_t is 0 elsewhere),
    // and a min or max is the same in any order.
    let max = |a: f64, x: f64| if x > a { x } else { a };
    let min = |a: f64, x: f64| if x < a { x } else { a };
    tally.divergence_max = lane_fold(&wk.d[..n], tally.divergence_max, max);
    tally.ratio_min = lane_fold(&lo[..n], tally.ratio_min, min);
    tally.ratio_max = lane_fold(&hi[..n], tally.ratio_max, max);
    tally.divergence_sum += masked_sum(&wk.d[..n], on);
    tally.k1_sum += masked_sum(&k1[..n], on);
    tally.k3_sum += masked_sum(&k3[..n], on);
    tally.ratio_sum += masked_sum(&st.rho[..n], on);
    tally.threshold_sum += masked_sum(&thr[..n], &has_thr[..n]);
    tally.threshold_count += has_thr[..n].iter().map(|&h| u64::from(h)).sum::<u64>();

    // Position deciles: t rises by one per response token, so a block spans few deciles,
    // and most blocks lie in one.
    if responses == 0 {
        return;
    }
    let t_last = wk.t[n - 1];
    let dec = decile.at(t_last + 1 - responses as usize);
    if decile.holds(t_last) {
        tally.decile_tokens[dec] += responses;
        tally.decile_masked[dec] += token + budget;
        return;
    }
    // Count in registers and flush when the decile changes.
    let (mut cur_tok, mut cur_masked) = (0u64, 0u64);
    let mut dec = dec;
    for k in 0..n {
        if on[k] {
            let d = decile.at(wk.t[k]);
            if d != dec {
                tally.decile_tokens[dec] += cur_tok;
                tally.decile_masked[dec] += cur_masked;
                (cur_tok, cur_masked, dec) = (0, 0, d);
            }
            cur_tok += 1;
            cur_masked += u64::from(code[k] >= TOKEN);
        }
    }
    tally.decile_tokens[dec] += cur_tok;
    tally.decile_masked[dec] += cur_masked;
}

/// MinPRO without the stop-gradient: token t's loss −ω_t A_t depends on the log-prob of
/// the token s holding its prefix minimum (∂ω_t/∂logp_s = ρ_s where ω_t is not capped).
/// Tokens pass the minimum on in runs, so the contributions to the current holder add up
/// in `acc` and go to its column when the minimum moves on or the row ends: into the
/// staged block when the holder is in it, into the output lane when it was stored
/// already. Whole rows only (a holder in an earlier column chunk is out of reach).
struct MinproGrad {
    include_current: bool,
    cap: f64,
    /// The running minimum and the column holding it.
    m: f64,
    holder: Option<usize>,
    /// The holder's own g (its KL term) and the contributions so far, in g units.
    base: f64,
    acc: f64,
}

impl MinproGrad {
    fn for_config(cfg: &Config, m: f64) -> Option<Self> {
        match cfg.objective {
            Objective::Minpro {
                include_current,
                clip,
                stop_gradient: false,
            } => Some(Self {
                include_current,
                cap: clip.map_or(f64::INFINITY, |c| 1.0 + c),
                m,
                holder: None,
                base: 0.0,
                acc: 0.0,
            }),
            _ => None,
        }
    }

    /// Writes the current holder's gradient and makes `next` (column, own g) the holder.
    fn flush<F: Float>(
        &mut self,
        next: Option<(usize, f64)>,
        wk: &mut Work,
        j0: usize,
        agg_w: f64,
        out: &mut RowLanes<'_, F>,
    ) {
        if let Some(col) = self.holder {
            let g = self.base + self.acc;
            if col >= j0 && next.is_some() {
                wk.grad[col - j0] = g;
            } else if let Some(lane) = &mut out.grad {
                lane.set(col, F::from_f64(g * agg_w));
            }
        }
        (self.holder, self.base, self.acc) = match next {
            Some((col, own)) => (Some(col), own, 0.0),
            None => (None, 0.0, 0.0),
        };
    }

    /// One block, after the objective and KL terms: moves the minimum along and adds each
    /// token's contribution to its holder.
    fn block<F: Float>(
        &mut self,
        st: &InStage,
        wk: &mut Work,
        n: usize,
        j0: usize,
        agg_w: f64,
        out: &mut RowLanes<'_, F>,
    ) {
        for k in 0..n {
            if !st.on[k] {
                continue;
            }
            let rho = st.rho[k];
            let new_min = rho < self.m;
            if self.include_current && new_min {
                self.m = rho;
                self.flush(Some((j0 + k, wk.grad[k])), wk, j0, agg_w, out);
            }
            if self.holder.is_some() && self.m <= self.cap {
                self.acc += wk.m[k] * -st.adv[k] * self.m;
            }
            if !self.include_current && new_min {
                self.m = rho;
                self.flush(Some((j0 + k, wk.grad[k])), wk, j0, agg_w, out);
            }
        }
    }
}

/// The row's width L (its input length).
fn plan_width<F, M>(row: &RowIn<'_, F, M>) -> usize {
    match &row.logp {
        Lane::Slice(s) => s.len(),
        Lane::View(v) => v.len(),
    }
}

/// The rule's test on a block: weight w, threshold c, feasible, and the reason code if
/// not (3 token threshold, 4 prefix budget alone). CPPO's prefix sums S, W advance here.
#[inline(always)]
fn rule_test(
    cfg: &Config,
    facts: RowFacts,
    st: &InStage,
    wk: &mut Work,
    n: usize,
    (s_sum, w_sum): (&mut f64, &mut f64),
) {
    let (w, c, feasible, fail) = (&mut wk.w, &mut wk.c, &mut wk.feasible, &mut wk.fail);
    let d = &wk.d;
    match cfg.rule {
        Rule::None => {
            w[..n].fill(1.0);
            c[..n].fill(f64::NAN);
            feasible[..n].fill(true);
        }
        Rule::Ratio { eps_low, eps_high } => {
            w[..n].fill(1.0);
            c[..n].fill(f64::NAN);
            let (lo, hi) = (1.0 - eps_low, 1.0 + eps_high);
            for k in 0..n {
                feasible[k] = (st.rho[k] >= lo) & (st.rho[k] <= hi);
            }
        }
        Rule::Dppo { delta } => {
            w[..n].fill(1.0);
            c[..n].fill(delta);
            for k in 0..n {
                feasible[k] = d[k] <= delta;
            }
        }
        Rule::TrmMax { delta } | Rule::TrmAvg { delta } => {
            w[..n].fill(1.0);
            c[..n].fill(delta);
            feasible[..n].fill(facts.row_ok);
        }
        Rule::Cppo { .. } | Rule::CppoSoft { .. } => {
            let Some(p) = cfg.rule.cppo_params() else {
                unreachable!("a cppo rule")
            };
            let (delta, w_min, horizon) = (p.delta, p.w_min, p.horizon);
            // w_t = 1 − (1 − w_min)(t − 1)/(H − 1), as `linear_weight`, hoisted out of the
            // loop so that it vectorizes; with `shuffle_seed`, at position π(t) instead.
            let h = horizon.unwrap_or(facts.row_len);
            let mut pos = [0usize; BLK];
            match p.shuffle_seed {
                None => pos[..n].copy_from_slice(&wk.t[..n]),
                Some(seed) => {
                    let key = seed ^ splitmix64(facts.row_len as u64);
                    for k in 0..n {
                        let t = wk.t[k].max(1) as u64;
                        pos[k] = permute(t - 1, facts.row_len as u64, key) as usize + 1;
                    }
                }
            }
            if h <= 1 {
                w[..n].fill(1.0);
            } else {
                let (slope, den) = (1.0 - w_min, (h - 1) as f64);
                for k in 0..n {
                    let t1 = pos[k].saturating_sub(1) as f64;
                    let x = 1.0 - slope * t1 / den;
                    w[k] = if horizon.is_some() && x < w_min {
                        w_min
                    } else {
                        x
                    };
                }
            }
            // The prefix scan: the one sequential pass.
            let (mut s, mut ws) = (*s_sum, *w_sum);
            match p.delta_b {
                None => {
                    for k in 0..n {
                        let wd = w[k] * d[k];
                        let on = st.on[k];
                        s += if on { wd } else { 0.0 };
                        ws += if on { w[k] } else { 0.0 };
                        c[k] = delta;
                        feasible[k] = wd <= delta;
                        fail[k] = TOKEN;
                    }
                }
                Some(db) => {
                    for k in 0..n {
                        let wd = w[k] * d[k];
                        let room = delta + db * ws;
                        let slack = room - s;
                        c[k] = if slack < delta { slack } else { delta };
                        let on = st.on[k];
                        let s_new = s + wd;
                        let token_ok = wd <= delta;
                        feasible[k] = token_ok & (s_new <= room);
                        fail[k] = pick(token_ok, BUDGET, TOKEN);
                        s = if on { s_new } else { s };
                        ws += if on { w[k] } else { 0.0 };
                    }
                }
            }
            (*s_sum, *w_sum) = (s, ws);
            return;
        }
    }
    fail[..n].fill(TOKEN);
}

/// SplitMix64's output function: a fast, well-mixed 64-bit hash.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A keyed permutation of 0..n, evaluated at `x < n` without memory: a 4-round Feistel
/// network on the smallest even number of bits that covers n, with cycle walking (apply
/// it again until the value lands below n; a bijection of the larger domain restricted
/// this way is a bijection of 0..n).
pub(crate) fn permute(mut x: u64, n: u64, key: u64) -> u64 {
    if n <= 1 {
        return x;
    }
    let bits = 64 - (n - 1).leading_zeros();
    let half = bits.div_ceil(2);
    let mask = (1u64 << half) - 1;
    loop {
        let (mut l, mut r) = (x >> half, x & mask);
        for round in 0..4u64 {
            let f = splitmix64(r ^ key.rotate_left(16 * round as u32) ^ round) & mask;
            (l, r) = (r, l ^ f);
        }
        x = (l << half) | r;
        if x < n {
            return x;
        }
    }
}

/// The objective's loss and gradient of each token, times the share `m` it keeps (0
/// where it is masked: exactly +0, not −0).
#[inline(always)]
fn objective_terms(
    cfg: &Config,
    facts: &RowFacts,
    st: &InStage,
    wk: &mut Work,
    n: usize,
    min_ratio: &mut f64,
) {
    let (loss, grad, clipped, m) = (&mut wk.loss, &mut wk.grad, &mut wk.clipped, &wk.m);
    let keep = |k: usize, x: f64| if m[k] > 0.0 { m[k] * x } else { 0.0 };
    match cfg.objective {
        Objective::Surrogate => {
            for k in 0..n {
                let g = -st.rho[k] * st.adv[k];
                loss[k] = keep(k, g);
                grad[k] = keep(k, g);
                clipped[k] = false;
            }
        }
        Objective::DetachedIs { ratio_cap } => {
            for k in 0..n {
                let g = -st.rho[k].min(ratio_cap) * st.adv[k];
                loss[k] = keep(k, g * st.lp[k]);
                grad[k] = keep(k, g);
                clipped[k] = false;
            }
        }
        Objective::PpoClip {
            eps_low,
            eps_high,
            dual_clip,
        } => {
            // `Objective::eval`'s operations, written out so that the loop vectorizes;
            // without a dual clip its cap is NaN and never taken.
            let (lo, hi) = (1.0 - eps_low, 1.0 + eps_high);
            let dual = dual_clip.unwrap_or(f64::NAN);
            for k in 0..n {
                let (rho, adv) = (st.rho[k], st.adv[k]);
                let unclipped = -rho * adv;
                let clipped_v = -rho.clamp(lo, hi) * adv;
                let take = unclipped >= clipped_v;
                let (l, g) = if take {
                    (unclipped, unclipped)
                } else {
                    (clipped_v, 0.0)
                };
                let cap = -dual * adv;
                let capped = (adv < 0.0) & (cap < l);
                loss[k] = keep(k, if capped { cap } else { l });
                grad[k] = keep(k, if capped { 0.0 } else { g });
                clipped[k] = (!take | capped) & st.on[k];
            }
        }
        Objective::Cispo { eps_high } => {
            let cap = 1.0 + eps_high;
            for k in 0..n {
                let rho = st.rho[k];
                let g = -rho.min(cap) * st.adv[k];
                loss[k] = keep(k, g * st.lp[k]);
                grad[k] = keep(k, g);
                clipped[k] = (rho > cap) & st.on[k];
            }
        }
        Objective::Sapo { tau_pos, tau_neg } => {
            // `Objective::eval`'s formula with the block's e^{−τ(ρ − 1)} in one SIMD call.
            let mut neg_z = [0.0f64; BLK];
            let mut tau = [0.0f64; BLK];
            for k in 0..n {
                tau[k] = if st.adv[k] > 0.0 { tau_pos } else { tau_neg };
                neg_z[k] = -tau[k] * (st.rho[k] - 1.0);
            }
            let mut e = [0.0f64; BLK];
            exp_to(&neg_z[..n], &mut e[..n]);
            for k in 0..n {
                let (rho, adv) = (st.rho[k], st.adv[k]);
                let sig = 1.0 / (1.0 + e[k]);
                loss[k] = keep(k, -adv * (4.0 / tau[k]) * sig);
                grad[k] = keep(k, -4.0 * adv * rho * sig * (1.0 - sig));
                clipped[k] = false;
            }
        }
        Objective::Gspo { .. } => {
            // PPO's clip on the row's sequence ratio s; ∂s_t/∂logp_t = s (token-level form).
            for k in 0..n {
                let term = cfg.objective.eval(facts.seq_ratio, st.adv[k], st.lp[k]);
                loss[k] = keep(k, term.loss);
                grad[k] = keep(k, term.grad);
                clipped[k] = term.clipped & st.on[k];
            }
        }
        Objective::Minpro {
            include_current,
            clip,
            stop_gradient,
        } => {
            // The running minimum of ρ over the row's response tokens: sequential. With
            // the weight detached, l = −ω A logp and g = −ω A; without, l = −ω A and the
            // gradient goes to the token holding the minimum (`MinproGrad`).
            let cap = clip.map_or(f64::INFINITY, |c| 1.0 + c);
            let mut m_run = *min_ratio;
            for k in 0..n {
                let rho = st.rho[k];
                let with = if rho < m_run { rho } else { m_run };
                let m_t = if include_current { with } else { m_run };
                let m_t = if m_t == f64::INFINITY { 1.0 } else { m_t };
                let omega = if m_t > cap { cap } else { m_t };
                let g = -omega * st.adv[k];
                if stop_gradient {
                    loss[k] = keep(k, g * st.lp[k]);
                    grad[k] = keep(k, g);
                } else {
                    loss[k] = keep(k, g);
                    grad[k] = 0.0;
                }
                clipped[k] = (m_t > cap) & st.on[k];
                if st.on[k] {
                    m_run = with;
                }
            }
            *min_ratio = m_run;
        }
        Objective::Gmpo { eps_low, eps_high } => {
            let big_r = facts.seq_ratio;
            for k in 0..n {
                let (_, unclipped) = gmpo_clip(st.log_ratio[k], st.adv[k], eps_low, eps_high);
                loss[k] = keep(k, -st.adv[k] * big_r);
                let g = if unclipped {
                    -facts.adv_mean * big_r
                } else {
                    0.0
                };
                grad[k] = keep(k, g);
                clipped[k] = !unclipped & st.on[k];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Counts;
    use crate::engine::{Outputs, Par, evaluate};
    use crate::objective::{KlEstimator, KlPenalty};
    use ndarray::{Array1, Array2, Array3};

    /// The builds of the row pass this CPU can run: the baseline always, and the AVX2 and
    /// AVX-512 ones where supported.
    fn builds() -> Vec<Isa> {
        let best = isa();
        let mut v = vec![Isa::Base];
        if best != Isa::Base {
            v.push(Isa::Avx2);
        }
        if best == Isa::Avx512 {
            v.push(Isa::Avx512);
        }
        v
    }

    /// Every build of the row pass (baseline, AVX2, AVX-512, as far as this CPU has them)
    /// gives the same bits as the dispatched one, for every rule and objective.
    #[test]
    fn baseline_and_dispatched_row_passes_agree() {
        let (b, l, kk) = (5, 150, 3);
        let lq = Array2::from_shape_fn((b, l), |(i, j)| {
            -0.02 - ((i * 13 + j * 7) % 29) as f64 * 0.11
        });
        let lp = Array2::from_shape_fn((b, l), |(i, j)| {
            lq[[i, j]] + (((i * 5 + j * 3) % 17) as f64 - 8.0) * 0.04
        });
        let lp = lp.mapv(|x| x.min(0.0));
        let lr = lq.mapv(|x| x - 0.05);
        let adv = Array1::from_shape_fn(b, |i| [1.0, -0.5, 0.0, 2.0, -1.5][i]);
        let mask = Array2::from_shape_fn((b, l), |(i, j)| j < l - 9 * i && j % 13 != 5);
        let to = Array3::from_shape_fn((b, l, kk), |(_, _, k)| -0.7 - k as f64 * 0.9);
        let tn = Array3::from_shape_fn((b, l, kk), |(i, j, k)| {
            -0.75 - k as f64 * 0.85 + ((i + j) % 3) as f64 * 0.01
        });
        let batch = Batch::new(&lp, &lq, &adv, &mask)
            .unwrap()
            .with_topk(&to, &tn)
            .unwrap()
            .with_logp_ref(&lr)
            .unwrap();
        let rules = [
            Rule::None,
            Rule::Ratio {
                eps_low: 0.2,
                eps_high: 0.2,
            },
            Rule::Dppo { delta: 0.1 },
            Rule::default(),
            Rule::CppoSoft {
                delta: 0.1,
                delta_b: Some(0.02),
                w_min: 0.7,
                horizon: Some(40),
                shuffle_seed: Some(9),
                tau: 0.01,
            },
            Rule::TrmAvg { delta: 0.05 },
        ];
        let objectives = [
            Objective::Surrogate,
            Objective::PpoClip {
                eps_low: 0.2,
                eps_high: 0.28,
                dual_clip: Some(3.0),
            },
            Objective::Gspo {
                eps_low: 0.1,
                eps_high: 0.1,
            },
            Objective::Gmpo {
                eps_low: 0.3,
                eps_high: 0.3,
            },
            Objective::Minpro {
                include_current: true,
                clip: Some(0.2),
                stop_gradient: true,
            },
            Objective::Sapo {
                tau_pos: 1.0,
                tau_neg: 1.05,
            },
        ];
        for divergence in [
            Divergence::BinaryTv,
            Divergence::BinaryKl,
            Divergence::TopkTv,
            Divergence::K3,
        ] {
            for (rule, objective) in rules
                .iter()
                .zip(objectives.iter().cycle().skip(divergence as usize))
            {
                let cfg = Config {
                    divergence,
                    rule: *rule,
                    objective: *objective,
                    kl: Some(KlPenalty {
                        estimator: KlEstimator::K3,
                        coef: 0.1,
                    }),
                    ..Config::cppo()
                };
                let want = evaluate(&cfg, &batch, Par::Seq).unwrap();
                for build in builds() {
                    let mut got = Outputs::<f64>::zeros((b, l));
                    let plan = Plan {
                        cfg: &cfg,
                        denominators: Counts {
                            tokens: want.tally.tokens,
                            seqs: want.tally.seqs,
                        },
                        width: l,
                        col0: 0,
                    };
                    for i in 0..b {
                        let m = mask.row(i);
                        let facts = whole_row_facts(&cfg, &batch, m, i).unwrap();
                        let o = got.view_mut();
                        let out = RowOut {
                            divergence: o.divergence.map(|v| v.index_axis_move(Axis(0), i)),
                            weight: o.weight.map(|v| v.index_axis_move(Axis(0), i)),
                            threshold: o.threshold.map(|v| v.index_axis_move(Axis(0), i)),
                            keep: o.keep.map(|v| v.index_axis_move(Axis(0), i)),
                            reason: o.reason.map(|v| v.index_axis_move(Axis(0), i)),
                            token_loss: o.token_loss.map(|v| v.index_axis_move(Axis(0), i)),
                            grad: o.grad.map(|v| v.index_axis_move(Axis(0), i)),
                        };
                        let prefix = &mut Prefix::default();
                        match build {
                            Isa::Base => {
                                run_row_impl(&plan, &batch, m, i, facts, prefix, out.into())
                            }
                            // SAFETY: `builds` lists only what the CPU supports.
                            #[cfg(target_arch = "x86_64")]
                            Isa::Avx2 => unsafe {
                                run_row_avx2(&plan, &batch, m, i, facts, prefix, out.into())
                            },
                            // SAFETY: as above.
                            #[cfg(target_arch = "x86_64")]
                            Isa::Avx512 => unsafe {
                                run_row_avx512(&plan, &batch, m, i, facts, prefix, out.into())
                            },
                            #[cfg(not(target_arch = "x86_64"))]
                            _ => unreachable!(),
                        }
                        .unwrap();
                    }
                    let same = |a: &Array2<f64>, b: &Array2<f64>| {
                        a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
                    };
                    assert!(same(&got.grad, &want.outputs.grad), "{build:?} {cfg:?}");
                    assert!(same(&got.token_loss, &want.outputs.token_loss), "{cfg:?}");
                    assert!(same(&got.divergence, &want.outputs.divergence), "{cfg:?}");
                    assert!(same(&got.weight, &want.outputs.weight), "{cfg:?}");
                    assert_eq!(got.reason, want.outputs.reason, "{cfg:?}");
                }
            }
        }
    }

    /// The fast conversion of [`to_fixed`] is `(x · 2^64).round() as i128`, ties and
    /// the edges of its range included.
    #[test]
    fn to_fixed_is_the_rounded_product() {
        let slow = |x: f64| (x * FIXED_ONE).round() as i128;
        let mut xs = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            f64::MIN_POSITIVE,
            2_147_483_647.999_999_8,
            -2_147_483_647.999_999_8,
            2_147_483_648.0,
            -2_147_483_648.0,
            1e300,
            -1e300,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ];
        // Ties: odd multiples of 2^−65 round away from zero.
        for k in [1u64, 3, 5, 7, 1 << 20 | 1, (1 << 40) + 1] {
            let x = k as f64 * 2f64.powi(-65);
            xs.extend([x, -x]);
        }
        // A spread of magnitudes and mantissas.
        let mut u = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..20_000 {
            u ^= u << 13;
            u ^= u >> 7;
            u ^= u << 17;
            let mant = 1.0 + (u >> 12) as f64 / (1u64 << 52) as f64;
            let exp = (u % 100) as i32 - 70;
            let x = mant * 2f64.powi(exp);
            xs.extend([x, -x]);
        }
        for x in xs {
            assert_eq!(to_fixed(x), slow(x), "x = {x:e}");
        }
    }

    /// Blocks of padding alone are skipped (zeros out, nothing tallied): the results equal
    /// those of the same batch with clean padding, every response token is counted, and a
    /// non-finite float mask value in a padding stretch is still an error.
    #[test]
    fn padding_blocks_are_skipped_but_checked() {
        let (b, l) = (3, 300);
        let on = |i: usize, j: usize| match i {
            0 => j < 10,
            1 => j == 299,
            _ => (100..140).contains(&j) || j == 250,
        };
        let mask = Array2::from_shape_fn((b, l), |(i, j)| if on(i, j) { 1.0 } else { 0.0 });
        let lq = Array2::from_shape_fn((b, l), |(i, j)| -0.05 - ((i + j) % 7) as f64 * 0.2);
        let lp = Array2::from_shape_fn((b, l), |(i, j)| (lq[[i, j]] + 0.03).min(0.0));
        let garbage = |a: &Array2<f64>| {
            Array2::from_shape_fn((b, l), |(i, j)| if on(i, j) { a[[i, j]] } else { f64::NAN })
        };
        let adv = Array1::from(vec![1.0, -1.0, 0.5]);
        let (to, tn) = (
            Array3::from_shape_fn(
                (b, l, 4),
                |(i, j, k)| {
                    if on(i, j) { -0.3 - k as f64 } else { f64::NAN }
                },
            ),
            Array3::from_shape_fn(
                (b, l, 4),
                |(i, j, k)| {
                    if on(i, j) { -0.35 - k as f64 } else { 7.0 }
                },
            ),
        );
        let (lp_g, lq_g) = (garbage(&lp), garbage(&lq));
        let (to_c, tn_c) = (to.mapv(|x| x.min(0.0)), tn.mapv(|x| x.min(0.0)));
        for divergence in [Divergence::BinaryTv, Divergence::TopkTv] {
            for rule in [Rule::default(), Rule::TrmAvg { delta: 0.05 }] {
                let cfg = Config {
                    divergence,
                    rule,
                    ..Config::cppo()
                };
                let clean = Batch::new(&lp, &lq, &adv, &mask)
                    .unwrap()
                    .with_topk(&to_c, &tn_c)
                    .unwrap();
                let dirty = Batch::new(&lp_g, &lq_g, &adv, &mask)
                    .unwrap()
                    .with_topk(&to, &tn)
                    .unwrap();
                let want = evaluate(&cfg, &clean, Par::Seq).unwrap();
                let got = evaluate(&cfg, &dirty, Par::Seq).unwrap();
                assert_eq!(format!("{:?}", got.outputs), format!("{:?}", want.outputs));
                assert_eq!(format!("{:?}", got.tally), format!("{:?}", want.tally));
                assert_eq!(want.tally.tokens, 10 + 1 + 41);
                let mut bad_mask = mask.clone();
                bad_mask[[1, 200]] = f64::NAN;
                let bad = Batch::new(&lp, &lq, &adv, &bad_mask).unwrap();
                let bad = bad.with_topk(&to, &tn).unwrap();
                match evaluate(&cfg, &bad, Par::Seq) {
                    Err(Error::NonFinite {
                        array: "mask", at, ..
                    }) => {
                        assert_eq!((at.row, at.col), (1, 200));
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    /// The block loops written out for PPO clip and CISPO give `Objective::eval`'s bits,
    /// on both sides of every clip and of the dual clip, for kept and masked tokens.
    #[test]
    fn objective_loops_match_eval() {
        let objectives = [
            Objective::PpoClip {
                eps_low: 0.2,
                eps_high: 0.28,
                dual_clip: None,
            },
            Objective::PpoClip {
                eps_low: 0.2,
                eps_high: 0.28,
                dual_clip: Some(3.0),
            },
            Objective::Cispo { eps_high: 0.28 },
            Objective::Surrogate,
            Objective::DetachedIs { ratio_cap: 2.0 },
        ];
        let rhos = [0.01, 0.79, 0.81, 1.0, 1.27, 1.29, 2.9, 3.1, 40.0];
        let advs = [-2.0, -1.0, -0.1, 0.0, 0.3, 1.0, 2.5];
        let facts = RowFacts {
            row_len: 1,
            row_ok: true,
            seq_ratio: 1.0,
            adv_mean: 0.0,
        };
        for objective in objectives {
            let cfg = Config {
                objective,
                ..Config::cppo()
            };
            let mut st = InStage::new();
            let mut wk = Work::new();
            let mut n = 0;
            for (i, &rho) in rhos.iter().enumerate() {
                for (j, &adv) in advs.iter().enumerate() {
                    if n == BLK {
                        break;
                    }
                    st.rho[n] = rho;
                    st.adv[n] = adv;
                    st.lp[n] = -0.1 - 0.05 * i as f64;
                    st.on[n] = (i + j) % 5 != 0;
                    wk.m[n] = if (i * 7 + j) % 6 == 0 { 0.0 } else { 1.0 };
                    n += 1;
                }
            }
            let mut min_ratio = f64::INFINITY;
            objective_terms(&cfg, &facts, &st, &mut wk, n, &mut min_ratio);
            for k in 0..n {
                let term = objective.eval(st.rho[k], st.adv[k], st.lp[k]);
                let kept = |x: f64| if wk.m[k] > 0.0 { x } else { 0.0 };
                let at = format!("{objective:?} rho {} adv {}", st.rho[k], st.adv[k]);
                assert_eq!(wk.loss[k].to_bits(), kept(term.loss).to_bits(), "{at}");
                assert_eq!(wk.grad[k].to_bits(), kept(term.grad).to_bits(), "{at}");
                assert_eq!(wk.clipped[k], term.clipped & st.on[k], "{at}");
            }
        }
    }

    #[test]
    fn decile_tracker_matches_the_division() {
        for row_len in 1..60 {
            let mut d = Decile::new(row_len);
            for t in 1..=row_len {
                assert_eq!(d.at(t), (t - 1) * 10 / row_len, "T = {row_len}, t = {t}");
            }
        }
    }
}
