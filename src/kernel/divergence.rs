//! The divergences D_t of a block, in vectorized passes (the block forms of
//! [`crate::divergence`]'s formulas; a unit test holds them equal).

// The passes index staged arrays in lockstep over one block (`k < n <= BLK`).
#![allow(clippy::needless_range_loop)]

use super::BLK;
use super::lanes::{DivRow, InStage, Pos, RowIn};
use super::topk::{TopkScratch, topk_block, topk_divergence};
use crate::divergence::{binary_kl_from_parts, binary_kl_rest_ratio};
use crate::error::Result;
use crate::float::Float;
use crate::simd::{ln as simd_ln, ln_to};

/// D_t of the staged block into `d` (0 off the mask); `false` if a response token has
/// an invalid top-K entry (the caller then finds it in order).
#[inline(always)]
pub(crate) fn block_divergences<F: Float>(
    row: &RowIn<'_, F>,
    st: &InStage,
    j0: usize,
    d: &mut [f64; BLK],
    scratch: &mut Option<TopkScratch>,
) -> bool {
    let n = st.n;
    let (on, d) = (&st.on[..n], &mut d[..n]);
    match &row.div {
        DivRow::BinaryTv => {
            for k in 0..n {
                d[k] = if on[k] {
                    (st.p[k] - st.q[k]).abs()
                } else {
                    0.0
                };
            }
        }
        DivRow::K2 => {
            for k in 0..n {
                let r = st.log_ratio[k];
                d[k] = if on[k] { 0.5 * r * r } else { 0.0 };
            }
        }
        DivRow::K3 => {
            for k in 0..n {
                let x = k3(st.rho[k], st.log_ratio[k]);
                d[k] = if on[k] { x } else { 0.0 };
            }
        }
        DivRow::BinaryKl => {
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
        DivRow::Topk { kl, row: topk } => {
            let buf = scratch.get_or_insert_with(TopkScratch::new);
            return topk_block(*kl, row.numerics, topk, row.pos(j0), on, d, buf);
        }
    }
    true
}

/// k3 = ρ − 1 − r, at least 0 (rounding can take it a few ulp below 0 where ρ ≈ 1).
#[inline(always)]
pub(crate) fn k3(rho: f64, r: f64) -> f64 {
    let x = (rho - 1.0) - r;
    if x > 0.0 { x } else { 0.0 }
}

/// D_t of checked response token k of the staged block, at `pos`; the error of its
/// first invalid top-K entry.
pub(crate) fn token_divergence<F: Float>(
    row: &RowIn<'_, F>,
    st: &InStage,
    k: usize,
    pos: Pos,
    scratch: &mut Option<TopkScratch>,
) -> Result<f64> {
    Ok(match &row.div {
        DivRow::BinaryTv => (st.p[k] - st.q[k]).abs(),
        DivRow::BinaryKl => {
            let ln_ratio = simd_ln(binary_kl_rest_ratio(st.p[k], st.q[k]));
            binary_kl_from_parts(st.lp[k], st.lq[k], st.q[k], ln_ratio)
        }
        DivRow::K2 => 0.5 * st.log_ratio[k] * st.log_ratio[k],
        DivRow::K3 => k3(st.rho[k], st.log_ratio[k]),
        DivRow::Topk { kl, row: topk } => {
            let buf = scratch.get_or_insert_with(TopkScratch::new);
            topk_divergence(*kl, row.numerics, topk, pos, buf)?
        }
    })
}
