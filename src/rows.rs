//! The row driver: runs a per-row function over every row of a batch, in sequence or on
//! the rayon pool, and merges the rows' tallies in a fixed order.
//!
//! The batch is cut into blocks of rows by recursive halving down to a leaf size that
//! depends only on the batch's shape; the leaves' [`Tally`]s merge along that same tree
//! whichever way it is run, so float sums add in one fixed order and `Par::Seq` and
//! `Par::Rayon` on any number of threads give the same bits. Errors: the lowest row's
//! wins, whatever ran first.
//!
//! Both [`engine`](crate::engine) (whole rows) and [`chunk`](crate::chunk) (column
//! chunks, with a carry per row) run through here.

use crate::aggregate::Counts;
use crate::batch::Batch;
use crate::error::Result;
use crate::float::Float;
use crate::outputs::{OutputsMut, RowOut};
use crate::stats::Tally;

/// Sequential or parallel execution. Both give bit-identical results.
///
/// `Rayon` runs on the current rayon pool: a trainer that owns a pool calls the engine
/// inside `pool.install(..)` to keep control of its threads.
///
/// ```
/// assert_eq!(cppo::Par::default(), cppo::Par::Rayon);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Par {
    /// One thread, the caller's.
    Seq,
    /// The current rayon pool.
    #[default]
    Rayon,
}

/// Rows per leaf block: about `LEAF_TOKENS` tokens, from the shape alone, so the merge
/// tree (and with it every float sum) is the same on any number of threads.
const LEAF_TOKENS: usize = 1 << 14;

fn leaf_rows((_, l): (usize, usize)) -> usize {
    (LEAF_TOKENS / l.max(1)).max(1)
}

/// One row's work: the row's index, its outputs, and its state (a carry, for chunks).
pub(crate) type RowFn<'f, F, S> =
    dyn Fn(usize, RowOut<'_, F>, Option<&mut S>) -> Result<Tally> + Sync + 'f;

/// Runs `row_fn` on every row of a (B, L) batch, writing into `out`, with the row's
/// element of `state` if given (B of them).
pub(crate) fn run_rows<F: Float, S: Send>(
    shape: (usize, usize),
    out: OutputsMut<'_, F>,
    state: Option<&mut [S]>,
    par: Par,
    row_fn: &RowFn<'_, F, S>,
) -> Result<Tally> {
    run_block(leaf_rows(shape), 0, shape.0, out, state, par, row_fn)
}

fn run_block<F: Float, S: Send>(
    leaf_rows: usize,
    row0: usize,
    rows: usize,
    mut out: OutputsMut<'_, F>,
    state: Option<&mut [S]>,
    par: Par,
    row_fn: &RowFn<'_, F, S>,
) -> Result<Tally> {
    if rows <= leaf_rows {
        let mut tally = Tally::default();
        let mut state = state;
        for r in 0..rows {
            let s = state.as_deref_mut().map(|c| &mut c[r]);
            let row_tally = row_fn(row0 + r, out.row(r), s)?;
            tally = tally.merge(&row_tally);
        }
        return Ok(tally);
    }
    let mid = rows / 2;
    let (top, bottom) = out.split_rows(mid);
    let (s_top, s_bottom) = match state {
        Some(c) => {
            let (a, b) = c.split_at_mut(mid);
            (Some(a), Some(b))
        }
        None => (None, None),
    };
    let upper = || run_block(leaf_rows, row0, mid, top, s_top, par, row_fn);
    let lower = || {
        run_block(
            leaf_rows,
            row0 + mid,
            rows - mid,
            bottom,
            s_bottom,
            par,
            row_fn,
        )
    };
    let (l, r) = match par {
        Par::Seq => (upper(), lower()),
        Par::Rayon => rayon::join(upper, lower),
    };
    // The top's error first: the lowest row wins, whatever ran first.
    Ok(l?.merge(&r?))
}

/// This batch's response tokens and sequences, for the aggregation's denominators. A
/// non-finite float mask value counts as a response token here; the pass reports it in
/// its place among the other errors (row-major order).
pub(crate) fn batch_counts<F: Float>(batch: &Batch<'_, F>, par: Par) -> Counts {
    let row = |i: usize| {
        let t = batch.mask.row_len_unchecked(i) as u64;
        Counts {
            tokens: t,
            seqs: u64::from(t > 0),
        }
    };
    let b = batch.shape().0;
    let leaf = leaf_rows(batch.shape());
    match par {
        Par::Rayon if b > leaf => {
            use rayon::prelude::*;
            // Integer sums: the same in any order.
            (0..b)
                .into_par_iter()
                .with_min_len(leaf)
                .map(row)
                .reduce(Counts::default, Counts::merge)
        }
        // A batch of one leaf block is counted where it is computed: on this thread.
        _ => (0..b).map(row).fold(Counts::default(), Counts::merge),
    }
}
