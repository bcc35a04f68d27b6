//! Top-K divergences over a block: the K entries of a group of tokens staged, checked
//! and exponentiated in one SIMD call, the next group prefetched.
//!
//! The top-K arrays are most of the bytes a top-K pass reads (2K values a token), so the
//! pass is arranged around memory: only the tokens from a block's first to last response
//! token are read; a group of up to `TOPK_GROUP / K` tokens has its 2K exponentials
//! computed at once; the next group's entries are prefetched one token at a time while
//! the current group is summed. The per-token sums run in 4 interleaved lanes combined
//! pairwise, a fixed order, the same for a token alone and in a group. Widths above
//! [`TOPK_STACK`] take a scalar path, still allocation-free.

// The passes index staged arrays in lockstep over one group; iterator chains over four
// arrays would say less.
#![allow(clippy::needless_range_loop)]

use ndarray::{ArrayView1, ArrayView2, Axis};

use super::BLK;
use super::checks::logprob_ok;
use super::lanes::Pos;
use crate::batch::{TopK, read_logprob};
use crate::divergence::{TOPK_KL_REST_FLOOR, topk_kl_pairs, topk_tv_pairs};
use crate::error::Result;
use crate::float::Float;
use crate::float::Numerics;
use crate::simd::{exp_with, exp32, ln_to};

/// Top-K widths up to this are staged for SIMD; wider ones use a scalar loop.
const TOPK_STACK: usize = 64;

/// A row's top-K pair: flat slices when contiguous, else (L, K) views.
pub(crate) enum TopkRow<'a, F> {
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
    pub(crate) fn new(topk: &TopK<'a, F>, i: usize) -> Self {
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

    /// Checks token `pos`'s K entries in order: the first invalid one as an error.
    #[cold]
    pub(crate) fn check(&self, pos: Pos) -> Result<()> {
        let (old, new) = self.token(pos.j);
        for (k, (&a, &b)) in old.iter().zip(new.iter()).enumerate() {
            let at = pos.at_k(k);
            read_logprob(a.to_f64(), "topk_logp_old", at)?;
            read_logprob(b.to_f64(), "topk_logp", at)?;
        }
        Ok(())
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
fn topk_divergence_wide<F: Float>(
    kl: bool,
    numerics: Numerics,
    topk: &TopkRow<'_, F>,
    pos: Pos,
) -> Result<f64> {
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
    // The exact path's scalar exponential is the platform's (this path is not the
    // SIMD one); the f32 one is the SIMD path's own function.
    let exp = |x: f64| match numerics {
        Numerics::Exact => x.exp(),
        Numerics::F32Exp => f64::from(exp32(x as f32)),
    };
    Ok(if !kl {
        topk_tv_pairs(pairs, exp)
    } else {
        topk_kl_pairs(pairs, exp)
    })
}

/// One token's sums over its K entries, from the probabilities P (`po`), Q (`pn`) and
/// log-probabilities (`lo`, `ln`): [Σ P, Σ Q, the divergence's own sum] (Σ |P − Q|, or
/// Σ P (log P − log Q) for KL), in one pass of 4 interleaved partial sums each, combined
/// pairwise: a fixed order, the same for a token alone and in a group.
#[inline(always)]
fn topk_sums(kl: bool, po: &[f64], pn: &[f64], lo: &[f64], ln: &[f64]) -> [f64; 3] {
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
    if !kl {
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
    kl: bool,
    numerics: Numerics,
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
    exp_with(numerics, &buf.logs[..2 * len], probs);
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
        sums[t] = topk_sums(kl, &po[r.clone()], &pn[r.clone()], &lo[r.clone()], &ln[r]);
    }
    if !kl {
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
pub(crate) fn topk_block<F: Float>(
    kl: bool,
    numerics: Numerics,
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
                    kl,
                    numerics,
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
        ok &= topk_group(kl, numerics, topk, j + s * g, on, d, buf);
    }
    ok
}

/// D_t under a top-K divergence at response token `pos`, checking its K entries.
#[inline(always)]
pub(crate) fn topk_divergence<F: Float>(
    kl: bool,
    numerics: Numerics,
    topk: &TopkRow<'_, F>,
    pos: Pos,
    buf: &mut TopkScratch,
) -> Result<f64> {
    if topk.width() > TOPK_STACK {
        return topk_divergence_wide(kl, numerics, topk, pos);
    }
    let mut d = [0.0];
    if !topk_group(kl, numerics, topk, pos.j, &[true], &mut d, buf) {
        topk.check(pos)?;
    }
    Ok(d[0])
}
