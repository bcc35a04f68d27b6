//! Value checks inside the pass, and the first bad value of a block, in order.
//!
//! A block is checked by vectorized passes that only say whether every value is
//! allowed ([`block_ok`], and the divergence and extra-input passes). Only a block that
//! holds a bad value is walked again token by token ([`ordered_block`]), which reports
//! the first bad value in row-major order and, within a token, in the order mask, logp,
//! logp_old, advantages, top-K pair, logp_ref, is_weights: the order of
//! [`Batch::validate`](crate::Batch::validate).

use super::Work;
use super::divergence::token_divergence;
use super::lanes::{InStage, Pos, RowIn};
use super::topk::TopkScratch;
use crate::batch::{check_adv, read_logprob, read_weight};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::limits::{LOGP_TOLERANCE, MAX_ABS_ADVANTAGE, MAX_IS_WEIGHT, MIN_LOGPROB};

/// A log-prob a response position may hold: in [−1e4, 1e-4] (NaN and ±∞ fail).
// Two comparisons joined by a non-short-circuit `&`, which the block loop vectorizes.
#[allow(clippy::manual_range_contains)]
#[inline(always)]
pub(crate) fn logprob_ok(x: f64) -> bool {
    (x <= LOGP_TOLERANCE) & (x >= MIN_LOGPROB)
}

/// An IS weight a response position may hold: in [0, 1e6] (NaN fails).
#[inline(always)]
pub(crate) fn weight_ok(x: f64) -> bool {
    (0.0..=MAX_IS_WEIGHT).contains(&x)
}

/// Whether token k passes the checks of the staged inputs: a valid mask value and, for a
/// response token, valid logp, logp_old and advantage.
#[inline(always)]
fn token_ok(st: &InStage, k: usize) -> bool {
    st.mask_ok[k]
        & (!st.on[k]
            | (logprob_ok(st.lp_raw[k])
                & logprob_ok(st.lq_raw[k])
                & (st.adv[k].abs() <= MAX_ABS_ADVANTAGE)))
}

/// Whether every token of the staged block passes [`token_ok`]: an integer count, which
/// the compiler vectorizes (a bool fold it does not).
#[inline(always)]
pub(crate) fn block_ok(st: &InStage) -> bool {
    let mut bad = 0u32;
    for k in 0..st.n {
        bad += u32::from(!token_ok(st, k));
    }
    bad == 0
}

/// The error of token k of the staged block, in the order mask, logp, logp_old,
/// advantages; `None` if those are fine.
#[cold]
fn staged_error<F: Float>(row: &RowIn<'_, F>, st: &InStage, k: usize, pos: Pos) -> Result<()> {
    let at = pos.at();
    if !st.mask_ok[k] {
        return Err(Error::NonFinite {
            array: "mask",
            at,
            value: row.mask.get(pos.j),
        });
    }
    if !st.on[k] {
        return Ok(());
    }
    read_logprob(st.lp_raw[k], "logp", at)?;
    read_logprob(st.lq_raw[k], "logp_old", at)?;
    check_adv(st.adv[k], at)
}

/// A block's checks, divergences and extra inputs token by token in column order: the
/// first bad value as an error, else the values the vectorized passes would give.
#[cold]
#[inline(never)]
pub(crate) fn ordered_block<F: Float>(
    row: &RowIn<'_, F>,
    st: &InStage,
    j0: usize,
    wk: &mut Work,
    scratch: &mut Option<TopkScratch>,
) -> Result<()> {
    for k in 0..st.n {
        let pos = row.pos(j0 + k);
        staged_error(row, st, k, pos)?;
        if !st.on[k] {
            wk.d[k] = 0.0;
            continue;
        }
        wk.d[k] = token_divergence(row, st, k, pos, scratch)?;
        if let Some((_, lane)) = &row.kl {
            wk.lref[k] = read_logprob(lane.get(pos.j), "logp_ref", pos.at())?;
        }
        if let Some(lane) = &row.is_weights {
            wk.isw[k] = read_weight(lane.get(pos.j), "is_weights", pos.at())?;
        }
    }
    Ok(())
}
