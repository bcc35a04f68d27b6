//! The position weights w_t of a block (the block form of [`crate::schedule`]'s
//! formulas, hoisted so that the loops vectorize; a unit test holds them equal).

// The loops index staged arrays in lockstep over one block (`k < n <= BLK`).
#![allow(clippy::needless_range_loop)]

use super::BLK;
use crate::rule::CppoParams;
use crate::schedule::{Positions, shuffled_position};

/// The weights of a block into `w[..n]`: `t[k]` is token k's index among the row's
/// response tokens (0 off the mask), `col` the whole-row column of the block's first
/// column, `row_len` the row's response tokens T, `width` the whole rows' width L.
#[inline(always)]
pub(crate) fn block_weights(
    p: &CppoParams,
    t: &[usize; BLK],
    n: usize,
    col: usize,
    row_len: usize,
    width: usize,
    w: &mut [f64; BLK],
) {
    let mut pos = [0usize; BLK];
    let n_positions = match p.positions {
        Positions::Response => {
            pos[..n].copy_from_slice(&t[..n]);
            row_len
        }
        Positions::Column => {
            for k in 0..n {
                pos[k] = col + k + 1;
            }
            width
        }
    };
    if let Some(seed) = p.shuffle_seed {
        for k in 0..n {
            pos[k] = shuffled_position(seed, pos[k], n_positions);
        }
    }
    match p.positions {
        Positions::Response => {
            // `schedule::response_weight`, hoisted.
            let h = p.horizon.unwrap_or(row_len);
            if h <= 1 {
                w[..n].fill(1.0);
                return;
            }
            let (slope, den, w_min) = (1.0 - p.w_min, (h - 1) as f64, p.w_min);
            let fixed = p.horizon.is_some();
            for k in 0..n {
                let x = 1.0 - slope * pos[k].saturating_sub(1) as f64 / den;
                w[k] = if fixed && x < w_min { w_min } else { x };
            }
        }
        Positions::Column => {
            // `schedule::column_weight`, hoisted.
            let h = p.horizon.unwrap_or(width) as f64;
            let (den, w_min) = ((h - 1.0).max(1.0), p.w_min);
            for k in 0..n {
                let frac = ((h - pos[k] as f64) / den).clamp(0.0, 1.0);
                w[k] = w_min + (1.0 - w_min) * frac;
            }
        }
    }
}
