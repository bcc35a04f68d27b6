//! One row of every input, and one block of it staged in f64 on the stack.
//!
//! A [`RowIn`] holds a row's lanes (slices when contiguous, strided views otherwise)
//! and what the config needs of the optional arrays, typed: the divergence's inputs
//! ([`DivRow`]), the KL penalty with its `logp_ref` lane, the IS weights. Building it
//! checks that the arrays the config needs are there, so nothing later has to assume it.
//! [`InStage::load`] widens a block of columns to f64 and computes the exponentials the
//! block needs in SIMD calls.

use ndarray::{ArrayView1, Axis, s};

use super::BLK;
use super::topk::TopkRow;
use crate::batch::{Advantages, Batch, MaskRow};
use crate::config::Config;
use crate::divergence::Divergence;
use crate::error::{At, Error, Result};
use crate::float::Numerics;
use crate::float::{Float, MaskElem, dispatch_mask, with_mask};
use crate::objective::{KlPenalty, LOG_RATIO_CLAMP};
use crate::simd::{exp as simd_exp, exp_with};

/// A row of an input: a slice when contiguous (the common case), else a strided view.
pub(crate) enum Lane<'a, T> {
    Slice(&'a [T]),
    View(ArrayView1<'a, T>),
}

impl<'a, T: Copy> Lane<'a, T> {
    pub(crate) fn new(v: ArrayView1<'a, T>) -> Self {
        match v.to_slice() {
            Some(s) => Self::Slice(s),
            None => Self::View(v),
        }
    }

    /// The lane's length.
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Slice(s) => s.len(),
            Self::View(v) => v.len(),
        }
    }

    /// The element at `j`.
    #[inline(always)]
    pub(crate) fn get(&self, j: usize) -> T {
        match self {
            Self::Slice(s) => s[j],
            Self::View(v) => v[j],
        }
    }

    /// `dst[k] = f(self[j0 + k])` for k < dst.len().
    #[inline(always)]
    pub(crate) fn load<U>(&self, j0: usize, dst: &mut [U], f: impl Fn(T) -> U) {
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

/// The divergence a row's pass computes, with the inputs it reads beyond logp and
/// logp_old.
pub(crate) enum DivRow<'a, F> {
    /// |p − q|.
    BinaryTv,
    /// Binary KL.
    BinaryKl,
    /// ½ r².
    K2,
    /// ρ − 1 − r.
    K3,
    /// Top-K TV (`kl: false`) or KL, with the row's top-K pair.
    Topk { kl: bool, row: TopkRow<'a, F> },
}

impl<F> DivRow<'_, F> {
    /// Whether the block pass needs p = e^logp and q = e^logp_old.
    pub(crate) fn needs_probs(&self) -> bool {
        matches!(self, Self::BinaryTv | Self::BinaryKl)
    }
}

/// A token's place: row `i`, column `j` of the input arrays, which is whole-row column
/// `col0 + j` (the one errors name). Plain integers: an [`At`] is built only on error.
#[derive(Clone, Copy)]
pub(crate) struct Pos {
    pub i: usize,
    pub j: usize,
    pub col0: usize,
}

impl Pos {
    #[cold]
    pub(crate) fn at(self) -> At {
        At::new(self.i, self.col0 + self.j)
    }

    #[cold]
    pub(crate) fn at_k(self, k: usize) -> At {
        At::with_k(self.i, self.col0 + self.j, k)
    }
}

macro_rules! define_mask_lane {
    (; $($v:ident: $t:ty,)*) => {
        /// One row of the mask, in its element type.
        pub(crate) enum MaskLane<'a> {
            $( $v(Lane<'a, $t>), )*
        }

        impl<'a> MaskLane<'a> {
            fn new(row: MaskRow<'a>) -> Self {
                match row {
                    $( MaskRow::$v(m) => Self::$v(Lane::new(m)), )*
                }
            }
        }
    };
}
crate::float::mask_types!(define_mask_lane!());

impl MaskLane<'_> {
    /// Columns `j0..j0 + on.len()`: whether each is a response token, and (for float
    /// masks) whether each value is allowed; `ok` is left alone for the other types.
    /// One dispatch on the element type a block.
    #[inline(always)]
    pub(crate) fn load(&self, j0: usize, on: &mut [bool], ok: &mut [bool]) {
        #[inline(always)]
        fn go<M: MaskElem>(lane: &Lane<'_, M>, j0: usize, on: &mut [bool], ok: &mut [bool]) {
            lane.load(j0, on, M::is_on);
            if M::CAN_BE_INVALID {
                lane.load(j0, ok, M::is_valid);
            }
        }
        with_mask!(self, MaskLane, |lane| go(lane, j0, on, ok))
    }

    /// The value at column `j`, widened.
    #[cold]
    pub(crate) fn get(&self, j: usize) -> f64 {
        with_mask!(self, MaskLane, |lane| MaskElem::to_f64(lane.get(j)))
    }
}

/// One row of every input the config reads.
pub(crate) struct RowIn<'a, F> {
    pub i: usize,
    /// The column of this row's first input column in the whole row (0 unless chunked):
    /// errors name whole-row columns.
    pub col0: usize,
    pub mask: MaskLane<'a>,
    pub logp: Lane<'a, F>,
    pub logp_old: Lane<'a, F>,
    /// Per-token advantages, or the row's one advantage.
    pub adv: std::result::Result<Lane<'a, F>, f64>,
    pub div: DivRow<'a, F>,
    /// The KL penalty and its `logp_ref` lane.
    pub kl: Option<(KlPenalty, Lane<'a, F>)>,
    pub is_weights: Option<Lane<'a, F>>,
    /// The config's numerics, for the per-token exponentials.
    pub numerics: Numerics,
}

/// A row's p = e^logp and q = e^logp_old per column, kept by the calibrated budget's
/// first sweep over the whole row, so that the main sweep reads them instead of
/// computing them again ([`InStage::load`]): the same function of the same inputs, so
/// the same bits. Columns of blocks without a response token are not written.
#[derive(Debug, Default)]
pub(crate) struct Probs {
    pub p: Vec<f64>,
    pub q: Vec<f64>,
    /// Whether the last first sweep filled them (only the binary divergences' sweep
    /// does).
    pub filled: bool,
}

impl Probs {
    /// No room yet (the thread-local's `const` initial value).
    pub(crate) const EMPTY: Self = Self {
        p: Vec::new(),
        q: Vec::new(),
        filled: false,
    };

    /// Room for a row of `width` columns (grown once, then reused).
    pub(crate) fn fit(&mut self, width: usize) {
        if self.p.len() < width {
            self.p.resize(width, 0.0);
            self.q.resize(width, 0.0);
        }
    }

    /// Keeps the block of `st` at columns `j0..j0 + st.n`.
    #[inline(always)]
    pub(crate) fn keep(&mut self, st: &InStage, j0: usize) {
        let n = st.n;
        self.p[j0..j0 + n].copy_from_slice(&st.p[..n]);
        self.q[j0..j0 + n].copy_from_slice(&st.q[..n]);
    }
}

impl<'a, F: Float> RowIn<'a, F> {
    /// Row `i` of `batch`, with the arrays `cfg` needs; [`Error::MissingArray`] if the
    /// batch lacks one.
    pub(crate) fn new(cfg: &Config, batch: &Batch<'a, F>, i: usize, col0: usize) -> Result<Self> {
        let lane = |a: ndarray::ArrayView2<'a, F>| Lane::new(a.index_axis_move(Axis(0), i));
        let div = match cfg.divergence {
            Divergence::BinaryTv => DivRow::BinaryTv,
            Divergence::BinaryKl => DivRow::BinaryKl,
            Divergence::K2 => DivRow::K2,
            Divergence::K3 => DivRow::K3,
            d @ (Divergence::TopkTv | Divergence::TopkKl) => match &batch.topk {
                Some(t) => DivRow::Topk {
                    kl: d == Divergence::TopkKl,
                    row: TopkRow::new(t, i),
                },
                None => return Err(missing_topk(d)),
            },
        };
        let kl = match (cfg.kl, batch.logp_ref) {
            (None, _) => None,
            (Some(k), Some(r)) => Some((k, lane(r))),
            (Some(_), None) => return Err(missing_logp_ref()),
        };
        Ok(Self {
            i,
            col0,
            mask: MaskLane::new(batch.mask.row(i)),
            logp: lane(batch.logp),
            logp_old: lane(batch.logp_old),
            adv: match batch.advantages {
                Advantages::PerToken(a) => Ok(lane(a)),
                Advantages::PerRow(a) => Err(a[i].to_f64()),
            },
            div,
            kl,
            is_weights: batch.is_weights.map(lane),
            numerics: cfg.numerics,
        })
    }

    /// Column `j`'s place.
    #[inline(always)]
    pub(crate) fn pos(&self, j: usize) -> Pos {
        Pos {
            i: self.i,
            j,
            col0: self.col0,
        }
    }

    /// The row's width (its input length).
    pub(crate) fn width(&self) -> usize {
        self.logp.len()
    }
}

/// The error for a top-K divergence without the top-K arrays.
pub(crate) fn missing_topk(d: Divergence) -> Error {
    Error::MissingArray {
        array: "topk_logp_old",
        needed_by: if d == Divergence::TopkTv {
            "divergence topk_tv"
        } else {
            "divergence topk_kl"
        },
    }
}

/// The error for a KL penalty without `logp_ref`.
pub(crate) fn missing_logp_ref() -> Error {
    Error::MissingArray {
        array: "logp_ref",
        needed_by: "the kl penalty",
    }
}

/// One block of a row's inputs, widened to f64, and what is computed from them in SIMD.
pub(crate) struct InStage {
    pub n: usize,
    pub on: [bool; BLK],
    /// Whether each mask value is allowed (finite, for float masks).
    pub mask_ok: [bool; BLK],
    /// Raw log-probs and advantages, for the checks.
    pub lp_raw: [f64; BLK],
    pub lq_raw: [f64; BLK],
    pub adv: [f64; BLK],
    /// Checked log-probs ((0, 1e-4] read as 0).
    pub lp: [f64; BLK],
    pub lq: [f64; BLK],
    /// Clamped log-ratio r and ρ = e^r.
    pub log_ratio: [f64; BLK],
    pub rho: [f64; BLK],
    /// p = e^logp and q = e^logp_old (binary divergences only).
    pub p: [f64; BLK],
    pub q: [f64; BLK],
}

impl InStage {
    pub(crate) const fn new() -> Self {
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

    /// Loads columns `j0..j0 + n` and computes the exponentials (p and q read from
    /// `probs` where a first sweep kept them); `false`, with only the mask loaded, for a
    /// block with no response token (padding: it has nothing to compute, check or
    /// tally).
    #[inline(always)]
    pub(crate) fn load<F: Float>(
        &mut self,
        row: &RowIn<'_, F>,
        j0: usize,
        n: usize,
        probs: Option<&Probs>,
    ) -> bool {
        if !self.load_logprobs(row, j0, n) {
            return false;
        }
        match &row.adv {
            Ok(lane) => lane.load(j0, &mut self.adv[..n], F::to_f64),
            Err(a) => self.adv[..n].fill(*a),
        }

        for k in 0..n {
            self.log_ratio[k] = (self.lp[k] - self.lq[k]).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP);
        }
        if row.div.needs_probs() {
            match probs {
                Some(c) => {
                    self.p[..n].copy_from_slice(&c.p[j0..j0 + n]);
                    self.q[..n].copy_from_slice(&c.q[j0..j0 + n]);
                }
                None => self.load_probs(row.numerics),
            }
            // ρ = p/q saves an exponential where it equals e^r to rounding: the log-ratio
            // inside the clamp, and p and q normal numbers (the SIMD exp flushes results
            // below e^−708 to 0). Elsewhere, e^r itself.
            let direct = |lp: f64, lq: f64, p: f64, q: f64| {
                (lp - lq).abs() <= LOG_RATIO_CLAMP
                    && (p >= f64::MIN_POSITIVE) & (q >= f64::MIN_POSITIVE)
            };
            let mut all_direct = true;
            for k in 0..n {
                all_direct &= direct(self.lp[k], self.lq[k], self.p[k], self.q[k]);
                self.rho[k] = self.p[k] / self.q[k];
            }
            if !all_direct {
                for k in 0..n {
                    if !direct(self.lp[k], self.lq[k], self.p[k], self.q[k]) {
                        self.rho[k] = simd_exp(self.log_ratio[k]);
                    }
                }
            }
        } else {
            exp_with(row.numerics, &self.log_ratio[..n], &mut self.rho[..n]);
        }
        true
    }

    /// The mask and the log-probs of columns `j0..j0 + n`, clamped to ≤ 0 ((0, 1e-4]
    /// read as 0); `false`, with only the mask loaded, for a block with no response
    /// token.
    #[inline(always)]
    fn load_logprobs<F: Float>(&mut self, row: &RowIn<'_, F>, j0: usize, n: usize) -> bool {
        self.n = n;
        row.mask.load(j0, &mut self.on[..n], &mut self.mask_ok[..n]);
        // An invalid mask value (non-finite float) counts as on, so a block without a
        // response token has nothing to report either.
        if !self.on[..n].iter().fold(false, |a, &o| a | o) {
            return false;
        }
        row.logp.load(j0, &mut self.lp_raw[..n], F::to_f64);
        row.logp_old.load(j0, &mut self.lq_raw[..n], F::to_f64);
        for k in 0..n {
            self.lp[k] = self.lp_raw[k].min(0.0);
            self.lq[k] = self.lq_raw[k].min(0.0);
        }
        true
    }

    /// p = e^logp and q = e^logp_old of the loaded log-probs.
    #[inline(always)]
    fn load_probs(&mut self, numerics: Numerics) {
        let n = self.n;
        exp_with(numerics, &self.lp[..n], &mut self.p[..n]);
        exp_with(numerics, &self.lq[..n], &mut self.q[..n]);
    }

    /// What the binary divergences read of columns `j0..j0 + n` (the mask, the clamped
    /// log-probs, p and q), unchecked: for the calibrated budget's first sweep, which
    /// gathers D only, and whose row's values the main sweep checks in order (a bad
    /// value there is that sweep's error, whatever the first made of it). `false` for
    /// a block with no response token.
    #[inline(always)]
    pub(crate) fn load_binary<F: Float>(
        &mut self,
        row: &RowIn<'_, F>,
        j0: usize,
        n: usize,
    ) -> bool {
        if !self.load_logprobs(row, j0, n) {
            return false;
        }
        self.load_probs(row.numerics);
        true
    }
}

/// Loads the block's `logp_ref` (for the KL penalty; checked, (0, 1e-4] read as 0) and IS
/// weights (checked), where the row has them; `false` if a response token holds a bad
/// value (the caller then finds it in order).
#[inline(always)]
pub(crate) fn load_extras<F: Float>(
    row: &RowIn<'_, F>,
    st: &InStage,
    j0: usize,
    lref: &mut [f64; BLK],
    isw: &mut [f64; BLK],
) -> bool {
    use super::checks::{logprob_ok, weight_ok};
    let (n, on) = (st.n, &st.on);
    let mut ok = true;
    if let Some((_, lane)) = &row.kl {
        lane.load(j0, &mut lref[..n], F::to_f64);
        for k in 0..n {
            ok &= !on[k] | logprob_ok(lref[k]);
            lref[k] = lref[k].min(0.0);
        }
    }
    if let Some(lane) = &row.is_weights {
        lane.load(j0, &mut isw[..n], F::to_f64);
        for k in 0..n {
            ok &= !on[k] | weight_ok(isw[k]);
        }
    }
    ok
}
