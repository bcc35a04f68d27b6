//! A block's contribution to the row's [`Tally`]: counts in one pass of comparisons,
//! float sums in fixed-order lanes, minima and maxima in lane folds, the position
//! deciles per block.

// The passes index staged arrays in lockstep over one block (`k < n <= BLK`).
#![allow(clippy::needless_range_loop)]

use super::Work;
use super::lanes::InStage;
use super::rule::{BUDGET, CORRECTIVE, FEASIBLE, TOKEN};
use super::sums::{LANES, combine, max, min};
use crate::stats::Tally;

/// Tracks ⌊10 (t − 1)/T⌋ as t advances, without a division per token.
pub(crate) struct Decile {
    row_len: usize,
    decile: usize,
    /// The first t of the next decile.
    next: usize,
}

impl Decile {
    pub(crate) fn new(row_len: usize) -> Self {
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
    pub(crate) fn holds(&self, t: usize) -> bool {
        self.decile == 9 || t < self.next
    }

    #[inline(always)]
    pub(crate) fn at(&mut self, t: usize) -> usize {
        while t >= self.next && self.decile < 9 {
            self.decile += 1;
            self.next = self.start_of(self.decile + 1);
        }
        self.decile
    }
}

/// What a row's blocks share for the tally: its one advantage when the advantages are
/// given per row (the sign counts then follow from the code counts), and whether the
/// objective can flag clipped tokens at all.
#[derive(Clone, Copy)]
pub(crate) struct TallyPlan {
    pub row_adv: Option<f64>,
    pub clips: bool,
}

/// Adds a block's response tokens to the tally: counts by comparisons, float sums in
/// fixed-order lanes in one fused pass, the position deciles in a short scalar loop.
#[inline(always)]
pub(crate) fn tally_block(
    tally: &mut Tally,
    st: &InStage,
    wk: &Work,
    n: usize,
    decile: &mut Decile,
    plan: TallyPlan,
) {
    let (on, code) = (&st.on[..n], &wk.code[..n]);
    // Counts: one pass of byte comparisons summed in 32-bit lanes, vectorized; the sign
    // counts need a pass of their own only for per-token advantages, the clip counts
    // only for an objective that clips.
    let mut c = [0u32; 5];
    for k in 0..n {
        c[0] += u32::from(on[k]);
        c[1] += u32::from(code[k] == FEASIBLE);
        c[2] += u32::from(code[k] == CORRECTIVE);
        c[3] += u32::from(code[k] == TOKEN);
        c[4] += u32::from(code[k] == BUDGET);
    }
    let [responses, feasible, corrective, token, budget] = c.map(u64::from);
    let (pos, pos_m, neg, neg_m) = match plan.row_adv {
        Some(a) => {
            let (p, q) = (u64::from(a > 0.0), u64::from(a < 0.0));
            let masked = token + budget;
            (p * responses, p * masked, q * responses, q * masked)
        }
        None => {
            let mut c = [0u32; 4];
            for k in 0..n {
                let masked = code[k] >= TOKEN;
                let (p, q) = (on[k] & (st.adv[k] > 0.0), on[k] & (st.adv[k] < 0.0));
                c[0] += u32::from(p);
                c[1] += u32::from(p & masked);
                c[2] += u32::from(q);
                c[3] += u32::from(q & masked);
            }
            let [p, pm, q, qm] = c.map(u64::from);
            (p, pm, q, qm)
        }
    };
    if plan.clips {
        let mut c = [0u32; 2];
        for k in 0..n {
            c[0] += u32::from(wk.clipped[k]);
            c[1] += u32::from(wk.lower[k]);
        }
        tally.clipped += u64::from(c[0]);
        tally.lower_clipped += u64::from(c[1]);
    }
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

    let sums = block_sums(st, wk, n);
    tally.divergence_max = max(tally.divergence_max, sums.d_max);
    tally.ratio_min = min(tally.ratio_min, sums.ratio_min);
    tally.ratio_max = max(tally.ratio_max, sums.ratio_max);
    tally.divergence_sum += sums.d;
    tally.k1_sum += sums.k1;
    tally.k3_sum += sums.k3;
    tally.ratio_sum += sums.ratio;
    tally.threshold_sum += sums.threshold;
    tally.threshold_count += sums.threshold_count;

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

/// A block's float sums over its response tokens, each in [`LANES`] interleaved
/// partial sums combined pairwise (the order of [`lane_sum`](super::sums::lane_sum), in
/// one pass for all of them), and its extrema.
struct BlockSums {
    d: f64,
    k1: f64,
    k3: f64,
    ratio: f64,
    threshold: f64,
    threshold_count: u64,
    d_max: f64,
    ratio_min: f64,
    ratio_max: f64,
}

#[inline(always)]
fn block_sums(st: &InStage, wk: &Work, n: usize) -> BlockSums {
    let mut acc = [[0.0f64; LANES]; 5];
    let mut count = [0u64; LANES];
    let mut d_max = [0.0f64; LANES];
    let mut lo = [f64::INFINITY; LANES];
    let mut hi = [0.0f64; LANES];
    let mut add = |k: usize, l: usize| {
        let on = st.on[k];
        let (d, r, rho, c) = (wk.d[k], st.log_ratio[k], st.rho[k], wk.c[k]);
        let has_thr = on & c.is_finite();
        acc[0][l] += if on { d } else { 0.0 };
        acc[1][l] += if on { -r } else { 0.0 };
        acc[2][l] += if on { (rho - 1.0) - r } else { 0.0 };
        acc[3][l] += if on { rho } else { 0.0 };
        acc[4][l] += if has_thr { c } else { 0.0 };
        count[l] += u64::from(has_thr);
        // Plain comparisons: none of these is NaN at a response token (D_t is 0
        // elsewhere), and a min or max is the same in any order.
        d_max[l] = max(d_max[l], d);
        lo[l] = min(lo[l], if on { rho } else { f64::INFINITY });
        hi[l] = max(hi[l], if on { rho } else { 0.0 });
    };
    let full = n / LANES * LANES;
    for k0 in (0..full).step_by(LANES) {
        for l in 0..LANES {
            add(k0 + l, l);
        }
    }
    for k in full..n {
        add(k, k - full);
    }
    let [d, k1, k3, ratio, threshold] = acc.map(|a| combine(a, |x, y| x + y));
    BlockSums {
        d,
        k1,
        k3,
        ratio,
        threshold,
        threshold_count: count.iter().sum(),
        d_max: combine(d_max, max),
        ratio_min: combine(lo, min),
        ratio_max: combine(hi, max),
    }
}
