//! Column chunks: context parallelism and streaming (SPEC section 7).
//!
//! CPPO's prefix sums S_t = Σ_{s≤t} w_s D_s and W_t = Σ_{s≤t} w_s run left to right, so a
//! row split into column chunks (one per context-parallel rank, or one at a time as a
//! stream) is computed chunk by chunk from a [`Carry`]: the next column, the response
//! tokens seen so far (the next token's position t), S and W. A chunk also needs two
//! whole-row facts up front:
//!
//! - T, the row's response-token count (for the weights when the horizon is T, for the
//!   per-sequence aggregation, for the position deciles) and the counts N_tok, N_seq;
//! - for TRM only, the row's max or mean divergence.
//!
//! Both come from a mergeable [`RowPartial`]: reduce each chunk with [`row_partials`],
//! merge the chunks' partials of a row (any grouping: the merge is exact for counts and
//! max, and for the sum in the order given), and pass the merged partials to
//! [`evaluate_chunk_into`]. Chunk after chunk, in order, each with the carries the
//! previous chunk left. The concatenated per-token outputs are bit-identical to the
//! whole-row computation; the chunks' losses and tallies add up to the whole's (to
//! rounding).
//!
//! The carry and the partial are small `Copy` + serde types (40 and 80 bytes), what a
//! context-parallel trainer sends from rank to rank. [`Carry::finish`] checks at the end
//! that a row's chunks covered it exactly.
//!
//! ```
//! use cppo::chunk::{evaluate_chunk_into, row_partials, Carry, ChunkPos, RowPartial};
//! use cppo::ndarray::{array, s, Array2};
//! use cppo::{evaluate, Batch, Config, Outputs, Par};
//!
//! let logp = array![[-0.1, -0.7, -0.2, -1.5, -0.3, -0.05]];
//! let logp_old = array![[-0.3, -0.2, -0.2, -0.4, -0.9, -0.1]];
//! let (adv, mask) = (array![1.0], array![[true, true, false, true, true, true]]);
//! let cfg = Config::cppo();
//! let whole = evaluate(&cfg, &Batch::new(&logp, &logp_old, &adv, &mask)?, Par::Seq)?;
//!
//! // Two chunks of three columns. First pass: partials, merged per row.
//! let chunk = |c: usize| s![.., 3 * c..3 * c + 3];
//! let views: Vec<_> = (0..2)
//!     .map(|c| (logp.slice(chunk(c)), logp_old.slice(chunk(c)), mask.slice(chunk(c))))
//!     .collect();
//! let mut rows = vec![RowPartial::default(); 1];
//! for (c, (lp, lq, m)) in views.iter().enumerate() {
//!     let b = Batch::new(lp, lq, &adv, m)?;
//!     let pos = ChunkPos { col0: 3 * c, width: 6 };
//!     for (r, p) in rows.iter_mut().zip(row_partials(&cfg, &b, pos, Par::Seq)?) {
//!         *r = r.merge(&p);
//!     }
//! }
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

use serde::{Deserialize, Serialize};

use crate::aggregate::Counts;
use crate::batch::Batch;
use crate::config::Config;
use crate::engine::{
    OutputsMut, Par, Summary, batch_counts, check_call, check_overrides, denominators, run_rows,
    with_mask_row,
};
use crate::error::{Error, Result};
use crate::float::{Float, MaskElem};
pub use crate::kernel::FixedSum;
use crate::kernel::{
    Plan, Prefix, RowLanes, RowStats, needs_row_stats, row_facts, row_stats, run_row,
};
use crate::stats::{Diagnostics, Tally};

/// A row's state between column chunks. Start every row from `Carry::default()`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Carry {
    /// Columns of the row done so far: the next chunk must start at this column.
    pub col: usize,
    /// Response tokens seen so far: the next one has position t + 1.
    pub t: usize,
    /// S: Σ w_s D_s over the tokens seen so far (f64).
    pub s: f64,
    /// W: Σ w_s over the tokens seen so far (f64).
    pub w: f64,
    /// The minimum ratio ρ over the tokens seen so far (MinPRO); +∞ before the first.
    pub min_ratio: f64,
}

impl Default for Carry {
    /// The state before a row's first column.
    fn default() -> Self {
        Self {
            col: 0,
            t: 0,
            s: 0.0,
            w: 0.0,
            min_ratio: f64::INFINITY,
        }
    }
}

impl Carry {
    /// Checks, after the last chunk, that row `row`'s chunks covered its `width` columns
    /// and all of its response tokens.
    ///
    /// # Errors
    ///
    /// [`Error::ChunkMismatch`] when they did not.
    pub fn finish(&self, row: usize, whole: &RowPartial, width: usize) -> Result<()> {
        if self.col != width {
            return Err(Error::ChunkMismatch {
                row,
                reason: format!("the chunks covered {} of its {width} columns", self.col),
            });
        }
        if self.t as u64 != whole.tokens {
            return Err(Error::ChunkMismatch {
                row,
                reason: format!(
                    "the chunks held {} response tokens, its partials {}",
                    self.t, whole.tokens
                ),
            });
        }
        Ok(())
    }
}

/// Where a chunk's columns sit in the whole rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkPos {
    /// The whole-row column of the chunk's first column.
    pub col0: usize,
    /// The whole rows' padded width L (the default `norm_length`, and the bound the
    /// chunks must not pass).
    pub width: usize,
}

/// A mergeable summary of a row's chunk: the row's response tokens and the sums that
/// whole-row rules and objectives need (zero where the config needs none). The sums are
/// exact fixed-point integers, so merging is associative and a chunked row gets exactly
/// the whole row's decision (TRM) and sequence ratio (GSPO, GMPO).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RowPartial {
    /// Response tokens.
    pub tokens: u64,
    /// max D_t (TRM; 0 when empty).
    pub divergence_max: f64,
    /// Σ D_t (TRM-avg).
    pub divergence_sum: FixedSum,
    /// Σ r_t, the clamped log-ratios (GSPO).
    pub log_ratio_sum: FixedSum,
    /// Σ r̃_t, GMPO's clipped log-ratios.
    pub clipped_log_ratio_sum: FixedSum,
    /// Σ A_t (GMPO).
    pub advantage_sum: FixedSum,
}

impl RowPartial {
    fn stats(&self) -> RowStats {
        RowStats {
            d_max: self.divergence_max,
            d_sum: self.divergence_sum,
            r_sum: self.log_ratio_sum,
            r_clip_sum: self.clipped_log_ratio_sum,
            adv_sum: self.advantage_sum,
        }
    }

    fn from_stats(tokens: u64, s: &RowStats) -> Self {
        Self {
            tokens,
            divergence_max: s.d_max,
            divergence_sum: s.d_sum,
            log_ratio_sum: s.r_sum,
            clipped_log_ratio_sum: s.r_clip_sum,
            advantage_sum: s.adv_sum,
        }
    }
}

impl RowPartial {
    /// The partial of two pieces of a row (`other` after `self`).
    #[must_use]
    pub fn merge(&self, other: &Self) -> Self {
        Self::from_stats(
            self.tokens + other.tokens,
            &self.stats().merge(&other.stats()),
        )
    }
}

/// Each row's [`RowPartial`] over this chunk's columns. The divergences are computed
/// (and their inputs checked) only under a TRM rule, which needs them; the log-ratio sums
/// only under GSPO and GMPO.
///
/// # Errors
///
/// A non-finite float mask value; under TRM, a bad value at a response position, named by
/// its whole-row column.
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
pub fn row_partials_into<F: Float>(
    cfg: &Config,
    chunk: &Batch<'_, F>,
    pos: ChunkPos,
    out: &mut [RowPartial],
    par: Par,
) -> Result<()> {
    cfg.validate()?;
    check_len("row partials", out.len(), chunk.shape().0)?;
    let one = |i: usize| -> Result<RowPartial> {
        let tokens = chunk.mask.row_len(i)?;
        let stats = if needs_row_stats(cfg) && tokens > 0 {
            with_mask_row!(chunk, i, |mask| row_stats(cfg, chunk, mask, i, pos.col0))?
        } else {
            RowStats::default()
        };
        Ok(RowPartial::from_stats(tokens as u64, &stats))
    };
    let seq = |out: &mut [RowPartial]| {
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
            // On error, find the first bad value deterministically.
            r.or_else(|_: Error| seq(out))
        }
    }
}

/// Computes one column chunk of a batch: the rows' columns `pos.col0..pos.col0 + Lc`.
///
/// `rows` holds each row's [`RowPartial`] merged over all its chunks; `carries` each
/// row's [`Carry`], which the call advances. Chunks of a row must come in column order,
/// starting from `Carry::default()`. The aggregation's N_tok and N_seq come from `rows`
/// (the whole rows), unless the config overrides them.
///
/// # Errors
///
/// As [`evaluate_into`](crate::evaluate_into); [`Error::ChunkOutOfOrder`] when a row's
/// carry is not at `pos.col0`; [`Error::ChunkMismatch`] when a chunk passes the row
/// width or holds more response tokens than its row's partial; a `rows` or `carries`
/// slice whose length is not B.
pub fn evaluate_chunk_into<F: Float>(
    cfg: &Config,
    chunk: &Batch<'_, F>,
    pos: ChunkPos,
    rows: &[RowPartial],
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
    let row_fn = |i: usize, out: RowLanes<'_, F>, carry: Option<&mut Carry>| -> Result<Tally> {
        let Some(carry) = carry else {
            unreachable!("chunked calls pass a carry per row")
        };
        with_mask_row!(chunk, i, |mask| chunk_row(
            &plan,
            chunk,
            mask,
            i,
            (lc, &rows[i]),
            carry,
            out
        ))
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
fn chunk_row<'a, F: Float, M: MaskElem>(
    plan: &Plan<'_>,
    chunk: &Batch<'a, F>,
    mask: ndarray::ArrayView1<'a, M>,
    i: usize,
    (lc, whole): (usize, &RowPartial),
    carry: &mut Carry,
    out: RowLanes<'_, F>,
) -> Result<Tally> {
    let col0 = plan.col0;
    if carry.col != col0 {
        return Err(Error::ChunkOutOfOrder {
            row: i,
            expected: carry.col,
            got: col0,
        });
    }
    if col0 + lc > plan.width {
        return Err(Error::ChunkMismatch {
            row: i,
            reason: format!(
                "the chunk ends at column {}, past the row width {}",
                col0 + lc,
                plan.width
            ),
        });
    }
    let here = mask.iter().filter(|m| m.is_on()).count();
    if (carry.t + here) as u64 > whole.tokens {
        return Err(Error::ChunkMismatch {
            row: i,
            reason: format!(
                "the chunks so far hold {} response tokens, its partials {}",
                carry.t + here,
                whole.tokens
            ),
        });
    }
    let facts = row_facts(
        plan.cfg,
        whole.tokens as usize,
        &whole.stats(),
        chunk.row_advantage(i),
    );
    let mut prefix = Prefix {
        t: carry.t,
        s: carry.s,
        w: carry.w,
        min_ratio: carry.min_ratio,
    };
    let tally = run_row(plan, chunk, mask, i, facts, &mut prefix, out)?;
    *carry = Carry {
        col: col0 + lc,
        t: prefix.t,
        s: prefix.s,
        w: prefix.w,
        min_ratio: prefix.min_ratio,
    };
    Ok(tally)
}

/// N_tok and N_seq of whole rows, from their merged partials: what a context-parallel
/// rank contributes to the global counts. (A chunk's own [`Batch::counts`] would count a
/// row split across chunks once per chunk.)
///
/// ```
/// use cppo::chunk::{row_counts, RowPartial};
/// let rows = [RowPartial { tokens: 3, ..Default::default() }, RowPartial::default()];
/// let c = row_counts(&rows);
/// assert_eq!((c.tokens, c.seqs), (3, 1));
/// ```
pub fn row_counts(rows: &[RowPartial]) -> Counts {
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
