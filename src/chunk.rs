//! Column chunks: context parallelism and streaming.
//!
//! CPPO's prefix sums S_t = Σ_{s≤t} w_s D_s and W_t = Σ_{s≤t} w_s run left to right, so a
//! row split into column chunks (one per context-parallel rank, or one at a time as a
//! stream) is computed chunk by chunk from a [`Carry`]: the next column, the response
//! tokens seen so far (the next token's position t), S, W and MinPRO's running minimum.
//! A chunk also needs facts about the whole row up front, a [`WholeRow`]:
//!
//! - T, the row's response-token count (for the weights when the horizon is T, for the
//!   per-sequence aggregation, for the position deciles) and the counts N_tok, N_seq;
//! - for TRM, GSPO and GMPO, the row's sums (max or mean divergence, mean log-ratios);
//! - for CPPO with a calibrated budget, δ_b^row, a quantile of the whole row's
//!   divergences.
//!
//! The protocol:
//!
//! 1. Each chunk's [`row_partials`]; merge a row's partials over its chunks
//!    ([`RowPartial::merge`]: exact, in any grouping; or an all-reduce). When
//!    [`needs_divergences`] says so (a calibrated budget), also each chunk's
//!    [`divergences_into`]: D_t in f64 at response positions, NaN elsewhere, gathered
//!    into one (B, L) array (an all-gather; any column order will do, a quantile does
//!    not depend on it).
//! 2. [`whole_rows`] turns the merged partials (and the gathered divergences) into each
//!    row's [`WholeRow`]. Quantiles are not sums, so δ_b^row is computed there, from all
//!    of the row's divergences at once, exactly as a whole row computes it.
//! 3. [`evaluate_chunk_into`], chunk after chunk in column order, each with the carries
//!    the previous chunk left, starting from `Carry::default()`.
//!
//! The concatenated per-token outputs are bit-identical to the whole-row computation;
//! the chunks' losses and tallies add up to the whole's (to rounding). [`Carry::finish`]
//! checks at the end that a row's chunks covered it exactly. Column positions
//! (`positions: "column"`) count from [`ChunkPos::col0`], so they too are the whole
//! row's.
//!
//! The carry and the partial are small `Copy` + serde types, what a context-parallel
//! trainer sends from rank to rank. Their fields are private and a deserialized value is
//! checked, so that no carry or partial the crate did not produce reaches the pass.
//!
//! ```
//! use cppo::chunk::{evaluate_chunk_into, row_partials, whole_rows, Carry, ChunkPos, RowPartial};
//! use cppo::ndarray::{array, s, Array2};
//! use cppo::{evaluate, Batch, Config, Outputs, Par};
//!
//! let logp = array![[-0.1, -0.7, -0.2, -1.5, -0.3, -0.05]];
//! let logp_old = array![[-0.3, -0.2, -0.2, -0.4, -0.9, -0.1]];
//! let (adv, mask) = (array![1.0], array![[true, true, false, true, true, true]]);
//! let cfg = Config::cppo(); // a calibrated budget: the divergences are gathered
//! let whole = evaluate(&cfg, &Batch::new(&logp, &logp_old, &adv, &mask)?, Par::Seq)?;
//!
//! // Two chunks of three columns. First pass: partials, merged per row, and divergences.
//! let chunk = |c: usize| s![.., 3 * c..3 * c + 3];
//! let views: Vec<_> = (0..2)
//!     .map(|c| (logp.slice(chunk(c)), logp_old.slice(chunk(c)), mask.slice(chunk(c))))
//!     .collect();
//! let mut partials = vec![RowPartial::default(); 1];
//! let mut divergences = Array2::<f64>::zeros((1, 6));
//! for (c, (lp, lq, m)) in views.iter().enumerate() {
//!     let b = Batch::new(lp, lq, &adv, m)?;
//!     let pos = ChunkPos { col0: 3 * c, width: 6 };
//!     for (r, p) in partials.iter_mut().zip(row_partials(&cfg, &b, pos, Par::Seq)?) {
//!         *r = r.merge(&p);
//!     }
//!     cppo::chunk::divergences_into(&cfg, &b, pos, divergences.slice_mut(chunk(c)), Par::Seq)?;
//! }
//! let rows = whole_rows(&cfg, &partials, Some(divergences.view()))?;
//! // Second pass: the chunks in order, handing the carries on.
//! let mut carries = vec![Carry::default(); 1];
//! let mut grad = Array2::<f64>::zeros((1, 6));
//! let mut loss = 0.0;
//! for (c, (lp, lq, m)) in views.iter().enumerate() {
//!     let b = Batch::new(lp, lq, &adv, m)?;
//!     let pos = ChunkPos { col0: 3 * c, width: 6 };
//!     let mut out = Outputs::<f64>::zeros((1, 3));
//!     loss += evaluate_chunk_into(&cfg, &b, pos, &rows, &mut carries, out.view_mut(), Par::Seq)?.loss;
//!     grad.slice_mut(chunk(c)).assign(&out.grad);
//! }
//! carries[0].finish(0, &rows[0], 6)?;
//! assert_eq!(grad, whole.outputs.grad); // bit for bit
//! assert!((loss - whole.loss).abs() < 1e-15);
//! # Ok::<(), cppo::Error>(())
//! ```

use ndarray::{ArrayView2, ArrayViewMut2, Axis};

use crate::aggregate::Counts;
use crate::batch::Batch;
use crate::config::Config;
use crate::engine::{Summary, check_call, check_overrides, denominators};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::kernel::lanes::RowIn;
use crate::kernel::row_stats::{RowStats, divergence_row, needs_row_stats, row_facts, row_stats};
use crate::kernel::{Plan, run_row};
use crate::outputs::{OutputsMut, RowOut};
use crate::rows::{Par, batch_counts, run_rows};
use crate::stats::{Diagnostics, Tally};

mod state;
pub use state::{Carry, ChunkPos, RowPartial, WholeRow};

/// Whether the config's chunks need the row's gathered divergences ([`divergences_into`])
/// to build their [`WholeRow`]s: a CPPO budget with a calibration.
///
/// ```
/// assert!(cppo::chunk::needs_divergences(&cppo::Config::cppo()));
/// assert!(!cppo::chunk::needs_divergences(&cppo::Config::dppo()));
/// ```
pub fn needs_divergences(cfg: &Config) -> bool {
    cfg.rule
        .cppo_params()
        .and_then(|p| p.active_calibration())
        .is_some()
}

/// Each row's [`RowPartial`] over this chunk's columns. The divergences are computed
/// (and their inputs checked) only under a TRM rule, which needs them; the log-ratio sums
/// only under GSPO and GMPO.
///
/// # Errors
///
/// A non-finite float mask value; where the sums are computed, a bad value at a response
/// position, named by its whole-row column; an array the config needs but the chunk
/// lacks.
///
/// ```
/// use cppo::chunk::{row_partials, ChunkPos};
/// use cppo::{Batch, Config, Par};
/// use cppo::ndarray::array;
/// let (lp, lq) = (array![[-0.1, -0.2]], array![[-0.3, -0.2]]);
/// let (adv, mask) = (array![1.0], array![[true, false]]);
/// let b = Batch::new(&lp, &lq, &adv, &mask)?;
/// let p = row_partials(&Config::cppo(), &b, ChunkPos { col0: 0, width: 2 }, Par::Seq)?;
/// assert_eq!(p[0].tokens(), 1);
/// # Ok::<(), cppo::Error>(())
/// ```
pub fn row_partials<F: Float>(
    cfg: &Config,
    chunk: &Batch<'_, F>,
    pos: ChunkPos,
    par: Par,
) -> Result<Vec<RowPartial>> {
    let mut out = vec![RowPartial::default(); chunk.shape().0];
    row_partials_into(cfg, chunk, pos, &mut out, par)?;
    Ok(out)
}

/// [`row_partials`] into a caller-owned slice of B partials.
///
/// # Errors
///
/// As [`row_partials`], and a slice whose length is not B.
///
/// ```
/// use cppo::chunk::{row_partials_into, ChunkPos, RowPartial};
/// use cppo::{Batch, Config, Par};
/// use cppo::ndarray::array;
/// let (lp, adv, mask) = (array![[-0.1]], array![1.0], array![[true]]);
/// let b = Batch::new(&lp, &lp, &adv, &mask)?;
/// let mut out = [RowPartial::default()];
/// row_partials_into(&Config::cppo(), &b, ChunkPos { col0: 0, width: 1 }, &mut out, Par::Seq)?;
/// assert_eq!(out[0].tokens(), 1);
/// # Ok::<(), cppo::Error>(())
/// ```
pub fn row_partials_into<F: Float>(
    cfg: &Config,
    chunk: &Batch<'_, F>,
    pos: ChunkPos,
    out: &mut [RowPartial],
    par: Par,
) -> Result<()> {
    check_call(cfg, chunk, &OutputsMut::default())?;
    check_len("row partials", out.len(), chunk.shape().0)?;
    let one = |i: usize| -> Result<RowPartial> {
        let tokens = chunk.mask.row_len(i)?;
        let stats = if needs_row_stats(cfg) && tokens > 0 {
            row_stats(cfg, &RowIn::new(cfg, chunk, i, pos.col0)?, None, None)?
        } else {
            RowStats::default()
        };
        Ok(RowPartial {
            tokens: tokens as u64,
            stats,
        })
    };
    for_each_row(out, par, &one)
}

/// Runs `one` for every row into `out`; on error, the first bad row's error (found again
/// in row order, deterministically).
fn for_each_row<T: Send>(
    out: &mut [T],
    par: Par,
    one: &(dyn Fn(usize) -> Result<T> + Sync),
) -> Result<()> {
    let seq = |out: &mut [T]| {
        for (i, p) in out.iter_mut().enumerate() {
            *p = one(i)?;
        }
        Ok(())
    };
    match par {
        Par::Seq => seq(out),
        Par::Rayon => {
            use rayon::prelude::*;
            let r = out.par_iter_mut().enumerate().try_for_each(|(i, p)| {
                *p = one(i)?;
                Ok(())
            });
            r.or_else(|_: Error| seq(out))
        }
    }
}

/// This chunk's divergences D_t into `out` (B, Lc), in f64: D at response positions, NaN
/// elsewhere (as verl's own calibration masks them). Gather the chunks' arrays of a row
/// for [`whole_rows`] when [`needs_divergences`] says so.
///
/// # Errors
///
/// A bad value at a response position (the first in row-major order, named by its
/// whole-row column), an array the config needs but the chunk lacks, an `out` whose
/// shape is not the chunk's.
///
/// ```
/// use cppo::chunk::{divergences_into, ChunkPos};
/// use cppo::{Batch, Config, Par};
/// use cppo::ndarray::{array, Array2};
/// let (lp, lq) = (array![[0.5f64.ln(), -0.2]], array![[0.4f64.ln(), -0.2]]);
/// let (adv, mask) = (array![1.0], array![[true, false]]);
/// let b = Batch::new(&lp, &lq, &adv, &mask)?;
/// let mut d = Array2::<f64>::zeros((1, 2));
/// divergences_into(&Config::cppo(), &b, ChunkPos { col0: 0, width: 2 }, d.view_mut(), Par::Seq)?;
/// assert!((d[[0, 0]] - 0.1).abs() < 1e-15);
/// assert!(d[[0, 1]].is_nan());
/// # Ok::<(), cppo::Error>(())
/// ```
pub fn divergences_into<F: Float>(
    cfg: &Config,
    chunk: &Batch<'_, F>,
    pos: ChunkPos,
    mut out: ArrayViewMut2<'_, f64>,
    par: Par,
) -> Result<()> {
    check_call(cfg, chunk, &OutputsMut::default())?;
    if out.dim() != chunk.shape() {
        let (b, l) = chunk.shape();
        return Err(Error::ShapeMismatch {
            array: "divergences",
            expected: format!("({b}, {l}), as the chunk"),
            got: out.shape().to_vec(),
        });
    }
    let mut rows: Vec<_> = out.axis_iter_mut(Axis(0)).collect();
    let one = |i: usize, dst: &mut ndarray::ArrayViewMut1<'_, f64>| -> Result<()> {
        divergence_row(&RowIn::new(cfg, chunk, i, pos.col0)?, dst)
    };
    let seq = |rows: &mut [ndarray::ArrayViewMut1<'_, f64>]| {
        for (i, r) in rows.iter_mut().enumerate() {
            one(i, r)?;
        }
        Ok(())
    };
    match par {
        Par::Seq => seq(&mut rows),
        Par::Rayon => {
            use rayon::prelude::*;
            let r = rows
                .par_iter_mut()
                .enumerate()
                .try_for_each(|(i, r)| one(i, r));
            r.or_else(|_: Error| seq(&mut rows))
        }
    }
}

/// Each row's [`WholeRow`], from its partials merged over all its chunks and, when
/// [`needs_divergences`] says so, its divergences gathered from all its chunks
/// (B rows, any width; NaN where there is no response token, as
/// [`divergences_into`] writes them).
///
/// # Errors
///
/// [`Error::MissingArray`] for `divergences` the config needs but were not given;
/// [`Error::ShapeMismatch`] for a `divergences` array that does not have B rows;
/// [`Error::ChunkMismatch`] when a row's gathered divergences are not as many as its
/// partials' response tokens; [`Error::NonFinite`] for an infinite or negative one.
///
/// ```
/// use cppo::chunk::{whole_rows, RowPartial};
/// use cppo::{Config, Error};
/// let p = [RowPartial::default()];
/// assert!(whole_rows(&Config::dppo(), &p, None).is_ok());
/// // A calibrated budget needs the row's divergences.
/// let err = whole_rows(&Config::cppo(), &p, None).unwrap_err();
/// assert!(matches!(err, Error::MissingArray { array: "divergences", .. }));
/// ```
pub fn whole_rows(
    cfg: &Config,
    partials: &[RowPartial],
    divergences: Option<ArrayView2<'_, f64>>,
) -> Result<Vec<WholeRow>> {
    cfg.validate()?;
    let params = cfg.rule.cppo_params();
    let floor = params.and_then(|p| p.delta_b);
    let calibration = params.and_then(|p| p.active_calibration());
    let d = match (calibration, divergences) {
        (Some(_), None) => {
            return Err(Error::MissingArray {
                array: "divergences",
                needed_by: "a calibrated budget under column chunks (chunk::divergences_into)",
            });
        }
        (Some(_), Some(d)) if d.nrows() != partials.len() => {
            return Err(Error::ShapeMismatch {
                array: "divergences",
                expected: format!("({}, L), one row per partial", partials.len()),
                got: d.shape().to_vec(),
            });
        }
        (Some(_), d) => d,
        (None, _) => None,
    };
    let mut buf = Vec::new();
    partials
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let delta_b = match (calibration, floor, &d) {
                (Some(c), Some(db), Some(d)) => {
                    buf.clear();
                    for (j, &x) in d.row(i).iter().enumerate() {
                        if x.is_nan() {
                            continue;
                        }
                        if !(x >= 0.0 && x.is_finite()) {
                            return Err(Error::NonFinite {
                                array: "divergences",
                                at: crate::error::At::new(i, j),
                                value: x,
                            });
                        }
                        buf.push(x);
                    }
                    if buf.len() as u64 != p.tokens {
                        return Err(Error::ChunkMismatch {
                            row: i,
                            reason: format!(
                                "its gathered divergences hold {} response tokens, its partials {}",
                                buf.len(),
                                p.tokens
                            ),
                        });
                    }
                    Some(c.row_budget(db, &mut buf))
                }
                _ => floor,
            };
            Ok(WholeRow {
                tokens: p.tokens,
                stats: p.stats,
                delta_b,
            })
        })
        .collect()
}

/// Computes one column chunk of a batch: the rows' columns `pos.col0..pos.col0 + Lc`.
///
/// `rows` holds each row's [`WholeRow`]; `carries` each row's [`Carry`], which the call
/// advances. Chunks of a row must come in column order, starting from
/// `Carry::default()`. The aggregation's N_tok and N_seq come from `rows` (the whole
/// rows), unless the config overrides them.
///
/// # Errors
///
/// As [`evaluate_into`](crate::evaluate_into); [`Error::ChunkOutOfOrder`] when a row's
/// carry is not at `pos.col0`; [`Error::ChunkMismatch`] when a chunk passes the row
/// width or holds more response tokens than its whole row; a `rows` or `carries` slice
/// whose length is not B; [`Error::InvalidConfig`] for MinPRO without its stop-gradient,
/// whose gradient may reach an earlier chunk.
///
/// ```
/// use cppo::chunk::{evaluate_chunk_into, row_partials, whole_rows, Carry, ChunkPos};
/// use cppo::{Batch, Config, Outputs, Par};
/// use cppo::ndarray::array;
/// let cfg = Config::dppo();
/// let (lp, lq) = (array![[-0.1, -0.2]], array![[-0.3, -0.2]]);
/// let (adv, mask) = (array![1.0], array![[true, true]]);
/// let b = Batch::new(&lp, &lq, &adv, &mask)?;
/// let pos = ChunkPos { col0: 0, width: 2 };
/// let rows = whole_rows(&cfg, &row_partials(&cfg, &b, pos, Par::Seq)?, None)?;
/// let mut carries = [Carry::default()];
/// let mut out = Outputs::<f64>::zeros((1, 2));
/// let s = evaluate_chunk_into(&cfg, &b, pos, &rows, &mut carries, out.view_mut(), Par::Seq)?;
/// assert_eq!((carries[0].col(), s.counts.tokens), (2, 2));
/// # Ok::<(), cppo::Error>(())
/// ```
pub fn evaluate_chunk_into<F: Float>(
    cfg: &Config,
    chunk: &Batch<'_, F>,
    pos: ChunkPos,
    rows: &[WholeRow],
    carries: &mut [Carry],
    out: OutputsMut<'_, F>,
    par: Par,
) -> Result<Summary> {
    check_call(cfg, chunk, &out)?;
    if let crate::Objective::Minpro {
        stop_gradient: false,
        ..
    } = cfg.objective
    {
        return Err(Error::InvalidConfig {
            field: "objective.stop_gradient",
            reason: "false is not supported with column chunks: the gradient through the prefix minimum goes to a token that may sit in an earlier chunk".into(),
        });
    }
    let (b, lc) = chunk.shape();
    check_len("rows", rows.len(), b)?;
    check_len("carries", carries.len(), b)?;
    let counts = batch_counts(chunk, par);
    let whole = row_counts(rows);
    let plan = Plan {
        cfg,
        denominators: denominators(cfg, whole),
        width: pos.width,
        col0: pos.col0,
    };
    let row_fn = |i: usize, out: RowOut<'_, F>, carry: Option<&mut Carry>| -> Result<Tally> {
        let mut fresh = Carry::default();
        let carry = carry.unwrap_or(&mut fresh);
        chunk_row(&plan, chunk, i, lc, &rows[i], carry, out)
    };
    let tally = run_rows((b, lc), out, Some(carries), par, &row_fn)?;
    check_overrides(cfg, whole)?;
    Ok(Summary {
        loss: tally.loss,
        diagnostics: Diagnostics::new(&tally, cfg),
        tally,
        counts,
    })
}

/// One row of a chunk: check the carry, sweep from it, advance it.
fn chunk_row<F: Float>(
    plan: &Plan<'_>,
    chunk: &Batch<'_, F>,
    i: usize,
    lc: usize,
    whole: &WholeRow,
    carry: &mut Carry,
    out: RowOut<'_, F>,
) -> Result<Tally> {
    let col0 = plan.col0;
    if carry.col != col0 {
        return Err(Error::ChunkOutOfOrder {
            row: i,
            expected: carry.col,
            got: col0,
        });
    }
    let end = col0.saturating_add(lc);
    if end > plan.width {
        return Err(Error::ChunkMismatch {
            row: i,
            reason: format!(
                "the chunk ends at column {end}, past the row width {}",
                plan.width
            ),
        });
    }
    let here = chunk.mask.row_len_unchecked(i);
    if (carry.prefix.t + here) as u64 > whole.tokens {
        return Err(Error::ChunkMismatch {
            row: i,
            reason: format!(
                "the chunks so far hold {} response tokens, its whole row {}",
                carry.prefix.t + here,
                whole.tokens
            ),
        });
    }
    let row = RowIn::new(plan.cfg, chunk, i, col0)?;
    let facts = row_facts(
        plan.cfg,
        whole.tokens as usize,
        &whole.stats,
        chunk.row_advantage(i),
        whole.delta_b,
    );
    let tally = run_row(plan, &row, &facts, &mut carry.prefix, out, None)?;
    carry.col = col0 + lc;
    Ok(tally)
}

/// N_tok and N_seq of whole rows: what a context-parallel rank contributes to the
/// global counts. (A chunk's own [`Batch::counts`] would count a row split across
/// chunks once per chunk.)
///
/// ```
/// use cppo::chunk::{row_counts, whole_rows, RowPartial};
/// let rows = whole_rows(&cppo::Config::dppo(), &[RowPartial::default(); 2], None).unwrap();
/// let c = row_counts(&rows);
/// assert_eq!((c.tokens, c.seqs), (0, 0));
/// ```
pub fn row_counts(rows: &[WholeRow]) -> Counts {
    rows.iter().fold(Counts::default(), |c, r| {
        c.merge(Counts {
            tokens: r.tokens,
            seqs: u64::from(r.tokens > 0),
        })
    })
}

fn check_len(array: &'static str, got: usize, rows: usize) -> Result<()> {
    if got == rows {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            array,
            expected: format!("({rows},), one per row"),
            got: vec![got],
        })
    }
}
