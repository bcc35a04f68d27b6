//! A block's contribution to the row's [`Tally`]: counts in one pass of comparisons,
//! float sums in fixed-order lanes, minima and maxima in lane folds, the position
//! deciles per block.

// The passes index staged arrays in lockstep over one block (`k < n <= BLK`).
#![allow(clippy::needless_range_loop)]

use super::lanes::InStage;
use super::rule::{BUDGET, CORRECTIVE, FEASIBLE, TOKEN};
use super::sums::{lane_fold, masked_sum, max, min};
use super::{BLK, Work};
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

/// Adds a block's response tokens to the tally: counts by comparisons, float sums in
/// fixed-order lanes, the position deciles in a short scalar loop.
#[inline(always)]
pub(crate) fn tally_block(
    tally: &mut Tally,
    st: &InStage,
    wk: &Work,
    n: usize,
    decile: &mut Decile,
) {
    let (on, code) = (&st.on[..n], &wk.code[..n]);
    // Counts: one pass of byte comparisons summed in 32-bit lanes, vectorized.
    let mut c = [0u32; 11];
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
        c[10] += u32::from(wk.lower[k]);
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
        lower,
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
    tally.lower_clipped += lower;

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
