//! The pieces of a batch compose exactly: row shards (data-parallel ranks, micro-batches
//! of gradient accumulation), column chunks (context parallelism, streaming), and both
//! at once. Random batches come from `tests/common` (ragged rows, holes, empty rows,
//! garbage in the padding, per-row or per-token advantages, top-K arrays with K from 1
//! to 5, `logp_ref` with every KL estimator) under random configs (every divergence; the
//! rules `none`, `ratio`, `dppo`, `cppo` with and without a budget and with a fixed
//! horizon, `trm_max`, `trm_avg`; every objective; all four aggregation modes; with and
//! without count overrides). What is asserted:
//!
//! - **Row shards**: split the rows into shards at random (uneven, interleaved, shards of
//!   zero rows, shards of empty rows only, each re-padded to a narrower width or not).
//!   Each shard's [`Batch::counts`], merged with [`Counts::merge`], equals the whole
//!   batch's counts exactly. With `num_tokens` / `num_seqs` set to the whole batch's
//!   counts and `norm_length` to the whole width, every per-token output of the shards,
//!   put back in place, is **bit-identical** to the whole batch's (`grad`, `token_loss`,
//!   `divergence`, `weight`, `threshold`, `keep`, `reason`): a token's aggregation weight
//!   is computed from the same counts, so nothing is even rounded differently. The
//!   shards' losses sum to the whole loss to 1e-12 of Σ|a_t l_t| (the sum of the
//!   magnitudes of its terms, which is the floor that matters when the loss is near 0);
//!   they are not bit-identical, since the additions happen in another order. The merged
//!   [`Tally`]s give the whole batch's [`Diagnostics`]: counts, fractions, max and min
//!   exactly, means of float sums to 1e-12 of their terms' magnitudes. f32 and f64.
//! - **Column chunks**: cut the columns at random (chunks of one column, of zero columns,
//!   chunks without response tokens, one column per chunk). Merged [`RowPartial`]s hold
//!   each row's token count (and TRM's max and sum of D); the chunks, in order, handing
//!   on their [`Carry`], give per-token outputs bit-identical to the whole rows; the
//!   losses sum to the whole loss to 1e-12 of Σ|a_t l_t|; [`Carry::finish`] accepts every
//!   row; the merged tallies give the whole diagnostics as above. This holds for TRM-avg
//!   too, even on a row whose mean divergence sits exactly at δ: the row sums are exact
//!   fixed-point integers (`trm_avg_chunked_decision_at_the_threshold`).
//! - **Both**: row shards, each cut into its own column chunks, each shard under the
//!   global counts: the same bit-identity and sums.
//! - **Every aggregation mode and every rule**, on a designed batch with uneven shards, a
//!   shard with an empty row, an all-padding shard, a one-row shard and a zero-row shard,
//!   in parallel, on batches of several engine leaf blocks.
//! - **Pitfalls** (stated in `docs/distributed.md`), shown to be real: averaging local
//!   token-means over micro-batches, averaging local per-sequence means over uneven
//!   shards, and leaving `norm_length` to default to a shard's own padded width each
//!   change the result; a chunk's own counts over-count sequences.
//! - **Zero tokens**: a micro-batch or chunk without response tokens (garbage in every
//!   slot) has loss 0, gradient 0 and no NaN anywhere, under global counts or its own
//!   (0/0), and an empty whole batch under global counts of zero too.
//! - **Errors**: a chunk out of order or repeated ([`Error::ChunkOutOfOrder`]); a chunk
//!   past the row width, more response tokens than the row's partials, a missing chunk
//!   or too few tokens at [`Carry::finish`] ([`Error::ChunkMismatch`]); a count override
//!   smaller than the shard's (or the chunked rows') own count ([`Error::CountTooSmall`]).

mod common;

use std::ops::Range;

use common::*;
use cppo::chunk::{
    Carry, ChunkPos, RowPartial, WholeRow, divergences_into, evaluate_chunk_into,
    needs_divergences, row_partials, whole_rows,
};
use cppo::ndarray::{Array2, Array3, ArrayView1, ArrayView2, ArrayView3, Axis, array, s};
use cppo::{
    Aggregation, Batch, Calibration, Config, Counts, CppoParams, Diagnostics, Divergence, Error,
    Evaluation, Float, Gate, KlEstimator, KlPenalty, Numerics, Objective, Outputs, Par, Positions,
    Rule, Tally, evaluate,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{RngAlgorithm, TestCaseResult, TestRng, TestRunner};

const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/proptest-regressions/sharding.txt"
);

// ---------------------------------------------------------------------------------------
// Pieces of a case
// ---------------------------------------------------------------------------------------

/// Rows `rows` (in that order) and columns `cols` of a case, as owned arrays: what a
/// data-parallel rank or a micro-batch holds, re-padded to a narrower width when `cols`
/// is not the whole width.
fn sub_case<F: Float>(case: &Case<F>, rows: &[usize], cols: Range<usize>) -> Case<F> {
    let r2 = |a: &Array2<F>| {
        a.select(Axis(0), rows)
            .slice(s![.., cols.clone()])
            .to_owned()
    };
    let r3 = |a: &Array3<F>| {
        a.select(Axis(0), rows)
            .slice(s![.., cols.clone(), ..])
            .to_owned()
    };
    Case {
        cfg: case.cfg,
        logp: r2(&case.logp),
        logp_old: r2(&case.logp_old),
        adv: match &case.adv {
            Adv::Row(a) => Adv::Row(a.select(Axis(0), rows)),
            Adv::Token(a) => Adv::Token(r2(a)),
        },
        mask: case
            .mask
            .select(Axis(0), rows)
            .slice(s![.., cols.clone()])
            .to_owned(),
        topk: case.topk.as_ref().map(|(o, n)| (r3(o), r3(n))),
        logp_ref: case.logp_ref.as_ref().map(r2),
        is_weights: case.is_weights.as_ref().map(r2),
    }
}

/// The advantages of a chunk: per-row advantages are whole, per-token ones sliced.
#[derive(Clone, Copy)]
enum AdvView<'a, F> {
    Row(ArrayView1<'a, F>),
    Token(ArrayView2<'a, F>),
}

/// Columns `cols` of every row of a case, as borrowed (strided) views: a context-parallel
/// rank's slice of the sequence dimension.
struct ChunkView<'a, F> {
    logp: ArrayView2<'a, F>,
    logp_old: ArrayView2<'a, F>,
    adv: AdvView<'a, F>,
    mask: ArrayView2<'a, bool>,
    topk: Option<(ArrayView3<'a, F>, ArrayView3<'a, F>)>,
    logp_ref: Option<ArrayView2<'a, F>>,
    is_weights: Option<ArrayView2<'a, F>>,
}

impl<'a, F: Float> ChunkView<'a, F> {
    fn new(case: &'a Case<F>, cols: Range<usize>) -> Self {
        let c2 = |a: &'a Array2<F>| a.slice(s![.., cols.clone()]);
        Self {
            logp: c2(&case.logp),
            logp_old: c2(&case.logp_old),
            adv: match &case.adv {
                Adv::Row(a) => AdvView::Row(a.view()),
                Adv::Token(a) => AdvView::Token(c2(a)),
            },
            mask: case.mask.slice(s![.., cols.clone()]),
            topk: case.topk.as_ref().map(|(o, n)| {
                (
                    o.slice(s![.., cols.clone(), ..]),
                    n.slice(s![.., cols.clone(), ..]),
                )
            }),
            logp_ref: case.logp_ref.as_ref().map(c2),
            is_weights: case.is_weights.as_ref().map(c2),
        }
    }

    fn batch(&self) -> cppo::Result<Batch<'_, F>> {
        let b = match self.adv {
            AdvView::Row(a) => Batch::new(&self.logp, &self.logp_old, a, self.mask),
            AdvView::Token(a) => Batch::new(&self.logp, &self.logp_old, a, self.mask),
        }?;
        let b = match &self.topk {
            Some((o, n)) => b.with_topk(o, n)?,
            None => b,
        };
        let b = match &self.logp_ref {
            Some(r) => b.with_logp_ref(r)?,
            None => b,
        };
        match &self.is_weights {
            Some(w) => b.with_is_weights(w),
            None => Ok(b),
        }
    }
}

/// Copies `part` (rows `rows` of `full`, columns `cols`) into place.
fn put<T: Clone>(full: &mut Array2<T>, part: &Array2<T>, rows: &[usize], cols: &Range<usize>) {
    for (r, &i) in rows.iter().enumerate() {
        full.slice_mut(s![i, cols.clone()]).assign(&part.row(r));
    }
}

/// Every per-token output of a piece, put back in place.
fn scatter<F: Float>(full: &mut Outputs<F>, part: &Outputs<F>, rows: &[usize], cols: Range<usize>) {
    put(&mut full.divergence, &part.divergence, rows, &cols);
    put(&mut full.weight, &part.weight, rows, &cols);
    put(&mut full.threshold, &part.threshold, rows, &cols);
    put(&mut full.keep, &part.keep, rows, &cols);
    put(&mut full.reason, &part.reason, rows, &cols);
    put(&mut full.token_loss, &part.token_loss, rows, &cols);
    put(&mut full.grad, &part.grad, rows, &cols);
    for (r, &i) in rows.iter().enumerate() {
        full.delta_b_row[i] = part.delta_b_row[r];
    }
}

/// Every per-token output bit for bit.
fn same_outputs<F: Float>(got: &Outputs<F>, want: &Outputs<F>) -> Result<(), TestCaseError> {
    let bits = |what, a, b| same_bits(what, a, b).map_err(TestCaseError::fail);
    bits("grad", &got.grad, &want.grad)?;
    bits("token_loss", &got.token_loss, &want.token_loss)?;
    bits("divergence", &got.divergence, &want.divergence)?;
    bits("weight", &got.weight, &want.weight)?;
    bits("threshold", &got.threshold, &want.threshold)?;
    prop_assert_eq!(&got.keep, &want.keep, "keep");
    prop_assert_eq!(&got.reason, &want.reason, "reason");
    same_bits_1d("delta_b_row", &got.delta_b_row, &want.delta_b_row).map_err(TestCaseError::fail)
}

fn fail(e: cppo::Error) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// The config a shard runs under: the whole batch's denominators (its own override if it
/// has one, else the all-reduced counts) and the whole batch's Z.
fn shard_config(whole: &Config, global: Counts, whole_width: usize) -> Config {
    Config {
        num_tokens: Some(whole.num_tokens.unwrap_or(global.tokens)),
        num_seqs: Some(whole.num_seqs.unwrap_or(global.seqs)),
        // (A batch of width 0 has no tokens and keeps `None`: Z must be at least 1.)
        norm_length: whole.norm_length.or(Some(whole_width).filter(|&w| w > 0)),
        ..*whole
    }
}

/// What a run of pieces adds up to.
struct Run<F> {
    outputs: Outputs<F>,
    loss: f64,
    tally: Tally,
}

/// A case computed column chunk by column chunk (the chunks' bounds are `bounds`, from 0
/// to L), as a stream or as context-parallel ranks would: first each chunk's
/// [`RowPartial`]s, merged per row in column order, and, for a calibrated budget, each
/// chunk's divergences, gathered into whole rows; the rows' [`WholeRow`]s from those;
/// then the chunks in order, each handing its carries to the next; then
/// [`Carry::finish`] on every row.
fn run_chunks<F: Float>(
    cfg: &Config,
    case: &Case<F>,
    bounds: &[usize],
    par: Par,
) -> cppo::Result<(Run<F>, Vec<WholeRow>)> {
    let (b, l) = case.shape();
    let chunks: Vec<(Range<usize>, ChunkView<'_, F>)> = bounds
        .windows(2)
        .map(|w| (w[0]..w[1], ChunkView::new(case, w[0]..w[1])))
        .collect();
    let mut partials = vec![RowPartial::default(); b];
    let mut divergences = Array2::<f64>::from_elem((b, l), -1.0);
    for (cols, view) in &chunks {
        let pos = ChunkPos {
            col0: cols.start,
            width: l,
        };
        for (r, p) in partials
            .iter_mut()
            .zip(row_partials(cfg, &view.batch()?, pos, par)?)
        {
            *r = r.merge(&p);
        }
        if needs_divergences(cfg) {
            let d = divergences.slice_mut(s![.., cols.clone()]);
            divergences_into(cfg, &view.batch()?, pos, d, par)?;
        }
    }
    let gathered = needs_divergences(cfg).then_some(divergences.view());
    let rows = whole_rows(cfg, &partials, gathered)?;
    let mut carries = vec![Carry::default(); b];
    let all: Vec<usize> = (0..b).collect();
    let mut run = Run {
        outputs: Outputs::zeros((b, l)),
        loss: 0.0,
        tally: Tally::default(),
    };
    // δ_b^row as the whole rows hold it (a row of zero chunks writes none).
    for (x, r) in run.outputs.delta_b_row.iter_mut().zip(&rows) {
        *x = F::from_f64(r.delta_b_row().unwrap_or(f64::NAN));
    }
    for (cols, view) in &chunks {
        let pos = ChunkPos {
            col0: cols.start,
            width: l,
        };
        let mut out = Outputs::zeros((b, cols.len()));
        let s = evaluate_chunk_into(
            cfg,
            &view.batch()?,
            pos,
            &rows,
            &mut carries,
            out.view_mut(),
            par,
        )?;
        run.loss += s.loss;
        run.tally = run.tally.merge(&s.tally);
        scatter(&mut run.outputs, &out, &all, cols.clone());
        // Per-row outputs: every chunk writes its row's value.
        run.outputs.delta_b_row.assign(&out.delta_b_row);
    }
    for (i, (c, r)) in carries.iter().zip(&rows).enumerate() {
        c.finish(i, r, l)?;
    }
    Ok((run, rows))
}

// ---------------------------------------------------------------------------------------
// Tolerances
// ---------------------------------------------------------------------------------------

/// The magnitudes of the terms behind each float sum, for tolerances: the loss's
/// Σ|a_t l_t|, and the means of |r|, ρ + 1 + |r| and |c_t|.
struct Scales {
    loss: f64,
    k1: f64,
    k3: f64,
    threshold: f64,
}

fn scales<F: Float>(case: &Case<F>) -> Scales {
    let c = case.cast::<f64>();
    let r = reference(&c);
    let (mut n, mut k1, mut k3, mut th, mut nth) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for ((ij, &m), &rho) in c.mask.indexed_iter().zip(r.rho.iter()) {
        if m {
            let x = rho.ln().abs();
            n += 1.0;
            k1 += x;
            k3 += rho + 1.0 + x;
            let t = r.threshold[ij];
            if t.is_finite() {
                th += t.abs();
                nth += 1.0;
            }
        }
    }
    let mean = |s: f64, n: f64| if n > 0.0 { s / n } else { 0.0 };
    Scales {
        loss: r.loss_scale,
        k1: mean(k1, n),
        k3: mean(k3, n),
        threshold: mean(th, nth),
    }
}

fn check_loss(got: f64, want: f64, sc: &Scales) -> Result<(), TestCaseError> {
    prop_assert!(
        close(got, want, 1e-12, 1e-12 * sc.loss),
        "loss: pieces sum to {got:e}, whole {want:e} (scale {:e})",
        sc.loss
    );
    Ok(())
}

/// The diagnostics of merged tallies against the whole batch's: counts and everything
/// computed from counts, max and min exactly; the means of float sums (added in another
/// order) to 1e-12 of the magnitude of their terms.
fn check_diagnostics(got: &Diagnostics, want: &Diagnostics, sc: &Scales) -> TestCaseResult {
    prop_assert_eq!(got.response_tokens, want.response_tokens);
    prop_assert_eq!(got.sequences, want.sequences);
    prop_assert_eq!(got.kept_tokens, want.kept_tokens);
    let exact = [
        ("masked_frac", got.masked_frac, want.masked_frac),
        (
            "masked_frac_token_threshold",
            got.masked_frac_token_threshold,
            want.masked_frac_token_threshold,
        ),
        (
            "masked_frac_prefix_budget",
            got.masked_frac_prefix_budget,
            want.masked_frac_prefix_budget,
        ),
        ("bypass_frac", got.bypass_frac, want.bypass_frac),
        (
            "masked_frac_pos_adv",
            got.masked_frac_pos_adv,
            want.masked_frac_pos_adv,
        ),
        (
            "masked_frac_neg_adv",
            got.masked_frac_neg_adv,
            want.masked_frac_neg_adv,
        ),
        (
            "masked_frac_nonzero_adv",
            got.masked_frac_nonzero_adv,
            want.masked_frac_nonzero_adv,
        ),
        (
            "verl.pg_clipfrac",
            got.verl.pg_clipfrac,
            want.verl.pg_clipfrac,
        ),
        (
            "verl.pg_clipfrac_lower",
            got.verl.pg_clipfrac_lower,
            want.verl.pg_clipfrac_lower,
        ),
        (
            "unirl.masked_fraction",
            got.unirl.masked_fraction,
            want.unirl.masked_fraction,
        ),
        ("unirl.ratio_max", got.unirl.ratio_max, want.unirl.ratio_max),
        ("divergence_max", got.divergence_max, want.divergence_max),
        ("ratio_min", got.ratio_min, want.ratio_min),
        ("ratio_max", got.ratio_max, want.ratio_max),
    ];
    for (what, g, w) in exact {
        prop_assert!(g.to_bits() == w.to_bits(), "{what}: {g:e} vs {w:e}");
    }
    prop_assert_eq!(got.clip_frac, want.clip_frac);
    prop_assert_eq!(got.masked_frac_by_decile, want.masked_frac_by_decile);
    let rounded = [
        ("loss", got.loss, want.loss, sc.loss),
        (
            "divergence_mean",
            got.divergence_mean,
            want.divergence_mean,
            0.0,
        ),
        ("approx_kl_k1", got.approx_kl_k1, want.approx_kl_k1, sc.k1),
        ("approx_kl_k3", got.approx_kl_k3, want.approx_kl_k3, sc.k3),
        ("ratio_mean", got.ratio_mean, want.ratio_mean, 0.0),
        ("verl.ppo_kl", got.verl.ppo_kl, want.verl.ppo_kl, sc.k1),
        (
            "unirl.approx_kl",
            got.unirl.approx_kl,
            want.unirl.approx_kl,
            sc.k3,
        ),
        (
            "unirl.ratio_mean",
            got.unirl.ratio_mean,
            want.unirl.ratio_mean,
            0.0,
        ),
    ];
    for (what, g, w, scale) in rounded {
        prop_assert!(close(g, w, 1e-12, 1e-12 * scale), "{what}: {g:e} vs {w:e}");
    }
    match (got.delta_b_row, want.delta_b_row) {
        (Some(g), Some(w)) => {
            prop_assert_eq!(g.min.to_bits(), w.min.to_bits(), "delta_b_row.min");
            prop_assert_eq!(g.max.to_bits(), w.max.to_bits(), "delta_b_row.max");
            prop_assert_eq!(g.frac_at_floor, w.frac_at_floor);
            prop_assert_eq!(g.frac_at_ceiling, w.frac_at_ceiling);
            prop_assert!(close(g.mean, w.mean, 1e-12, 0.0), "delta_b_row.mean");
        }
        (g, w) => prop_assert_eq!(g, w),
    }
    match (got.threshold_mean, want.threshold_mean) {
        (Some(g), Some(w)) => prop_assert!(
            close(g, w, 1e-12, 1e-12 * sc.threshold),
            "threshold_mean: {g:e} vs {w:e}"
        ),
        (g, w) => prop_assert_eq!(g, w),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Splits
// ---------------------------------------------------------------------------------------

/// How to cut a case: rows into shards, each shard's columns into chunks.
#[derive(Clone, Debug)]
struct Split {
    /// The shard of each row (raw draws, reduced modulo `shards`).
    shard_of: Vec<usize>,
    shards: usize,
    /// Rows in shard order (contiguous shards) or as drawn (interleaved).
    contiguous: bool,
    /// Per shard: re-pad to a narrower width, from these raw draws, or keep the width.
    trim: Vec<Option<(usize, usize)>>,
    /// Per shard: one chunk per column, or cuts at these raw draws.
    cuts: Vec<(bool, Vec<usize>)>,
    par: Par,
}

const MAX_SHARDS: usize = 5;

impl Split {
    /// Each shard's rows, in batch order.
    fn shards(&self, b: usize) -> Vec<Vec<usize>> {
        let mut of: Vec<usize> = self.shard_of[..b].iter().map(|s| s % self.shards).collect();
        if self.contiguous {
            of.sort_unstable();
        }
        (0..self.shards)
            .map(|s| (0..b).filter(|&i| of[i] == s).collect())
            .collect()
    }

    /// Shard `s`'s columns: all of them, or a range holding every response token of its
    /// rows (`lo` at or before the first, `hi` at or after the last).
    fn columns(&self, s: usize, mask: &Array2<bool>, rows: &[usize]) -> Range<usize> {
        let l = mask.ncols();
        let Some((a, b)) = self.trim[s] else {
            return 0..l;
        };
        let on: Vec<usize> = (0..l)
            .filter(|&j| rows.iter().any(|&i| mask[[i, j]]))
            .collect();
        match (on.first(), on.last()) {
            (Some(&first), Some(&last)) => {
                let lo = a % (first + 1);
                lo..last + 1 + b % (l - last)
            }
            _ => {
                let lo = a % (l + 1);
                lo..lo + b % (l - lo + 1)
            }
        }
    }

    /// Chunk bounds for shard `s` of width `w`: 0, the cuts, w (repeats give chunks of
    /// zero columns).
    fn bounds(&self, s: usize, w: usize) -> Vec<usize> {
        let (every, raw) = &self.cuts[s];
        if *every {
            return (0..=w).collect();
        }
        let mut v: Vec<usize> = raw.iter().map(|c| c % (w + 1)).collect();
        v.push(0);
        v.push(w);
        v.sort_unstable();
        v
    }
}

fn split_strategy(b: usize) -> impl Strategy<Value = Split> {
    (
        1..=MAX_SHARDS,
        proptest::collection::vec(0..MAX_SHARDS, b),
        any::<bool>(),
        proptest::collection::vec(
            prop_oneof![Just(None), (any::<usize>(), any::<usize>()).prop_map(Some)],
            MAX_SHARDS,
        ),
        proptest::collection::vec(
            (
                prop::bool::weighted(0.2),
                proptest::collection::vec(any::<usize>(), 0..5),
            ),
            MAX_SHARDS,
        ),
        prop_oneof![Just(Par::Seq), Just(Par::Rayon)],
    )
        .prop_map(|(shards, shard_of, contiguous, trim, cuts, par)| Split {
            shard_of,
            shards,
            contiguous,
            trim,
            cuts,
            par,
        })
}

fn case_and_split() -> impl Strategy<Value = (Case<f64>, Split)> {
    let shape = Shape {
        rows: 0..=8,
        cols: 0..=10,
        smooth: false,
    };
    // A quarter of the cases under the f32 exponentials: chunks and shards give the
    // whole under either numerics.
    let numerics = prop_oneof![3 => Just(Numerics::Exact), 1 => Just(Numerics::F32Exp)];
    (case_with(config_strategy(), shape), numerics).prop_flat_map(|(mut c, n)| {
        c.cfg.numerics = n;
        let b = c.shape().0;
        (Just(c), split_strategy(b))
    })
}

// ---------------------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------------------

/// One row shard: its rows, its columns, and its data.
type Piece<F> = (Vec<usize>, Range<usize>, Case<F>);

/// The row shards of a split, each as its rank holds it, and the all-reduce of their
/// counts (each rank's own [`Batch::counts`], summed).
fn row_shards<F: Float>(
    case: &Case<F>,
    split: &Split,
) -> Result<(Vec<Piece<F>>, Counts), TestCaseError> {
    // Column positions count from the padded row's first column over its width: a shard
    // keeps the batch's columns (re-padding would move them).
    let columns = matches!(
        case.cfg.rule.cppo_params(),
        Some(p) if p.positions == Positions::Column
    );
    let pieces: Vec<Piece<F>> = split
        .shards(case.shape().0)
        .into_iter()
        .enumerate()
        .map(|(s, rows)| {
            let cols = if columns {
                0..case.shape().1
            } else {
                split.columns(s, &case.mask, &rows)
            };
            let sub = sub_case(case, &rows, cols.clone());
            (rows, cols, sub)
        })
        .collect();
    let mut global = Counts::default();
    for (_, _, sub) in &pieces {
        global = global.merge(sub.batch().counts().map_err(fail)?);
    }
    prop_assert_eq!(global, case.batch().counts().map_err(fail)?);
    Ok((pieces, global))
}

/// Row shards (each re-padded or not) under the global counts equal the whole batch.
fn check_row_shards<F: Float>(case: &Case<F>, split: &Split) -> TestCaseResult {
    let (b, l) = case.shape();
    let par = split.par;
    let whole = case.eval(par).map_err(fail)?;
    let (pieces, global) = row_shards(case, split)?;
    let cfg = shard_config(&case.cfg, global, l);
    let mut run = Run {
        outputs: Outputs::zeros((b, l)),
        loss: 0.0,
        tally: Tally::default(),
    };
    for (rows, cols, sub) in &pieces {
        let e = evaluate(&cfg, &sub.batch(), par).map_err(fail)?;
        run.loss += e.loss;
        run.tally = run.tally.merge(&e.tally);
        scatter(&mut run.outputs, &e.outputs, rows, cols.clone());
    }
    same_outputs(&run.outputs, &whole.outputs)?;
    let sc = scales(case);
    check_loss(run.loss, whole.loss, &sc)?;
    check_diagnostics(
        &Diagnostics::new(&run.tally, &case.cfg),
        &whole.diagnostics,
        &sc,
    )
}

/// Column chunks of the whole rows equal the whole rows.
fn check_column_chunks<F: Float>(case: &Case<F>, split: &Split) -> TestCaseResult {
    let l = case.shape().1;
    let whole = case.eval(split.par).map_err(fail)?;
    let bounds = split.bounds(0, l);
    let (run, rows) = run_chunks(&case.cfg, case, &bounds, split.par).map_err(fail)?;
    // The whole rows hold each row's token count and budget.
    for (i, r) in rows.iter().enumerate() {
        let cols = (0..l).filter(|&j| case.mask[[i, j]]).count();
        prop_assert_eq!(r.tokens(), cols as u64, "row {}", i);
        let budget = r
            .delta_b_row()
            .map_or(f64::NAN, |x| F::from_f64(x).to_f64());
        let want = whole.outputs.delta_b_row[i].to_f64();
        prop_assert!(
            budget.to_bits() == want.to_bits(),
            "row {i}: {budget} vs {want}"
        );
    }
    same_outputs(&run.outputs, &whole.outputs)?;
    let sc = scales(case);
    check_loss(run.loss, whole.loss, &sc)?;
    check_diagnostics(
        &Diagnostics::new(&run.tally, &case.cfg),
        &whole.diagnostics,
        &sc,
    )
}

/// Row shards, each cut into its own column chunks, under the global counts.
fn check_shards_of_chunks<F: Float>(case: &Case<F>, split: &Split) -> TestCaseResult {
    let (b, l) = case.shape();
    let whole = case.eval(split.par).map_err(fail)?;
    let (pieces, global) = row_shards(case, split)?;
    let cfg = shard_config(&case.cfg, global, l);
    let mut run = Run {
        outputs: Outputs::zeros((b, l)),
        loss: 0.0,
        tally: Tally::default(),
    };
    for (s, (rows, cols, sub)) in pieces.iter().enumerate() {
        let bounds = split.bounds(s, cols.len());
        let (r, _) = run_chunks(&cfg, sub, &bounds, split.par).map_err(fail)?;
        run.loss += r.loss;
        run.tally = run.tally.merge(&r.tally);
        scatter(&mut run.outputs, &r.outputs, rows, cols.clone());
    }
    same_outputs(&run.outputs, &whole.outputs)?;
    let sc = scales(case);
    check_loss(run.loss, whole.loss, &sc)?;
    check_diagnostics(
        &Diagnostics::new(&run.tally, &case.cfg),
        &whole.diagnostics,
        &sc,
    )
}

proptest! {
    #![proptest_config(proptest_config(256, REGRESSIONS))]

    /// Row shards sum to the whole batch (f64 inputs).
    #[test]
    fn row_shards_sum_to_the_whole((case, split) in case_and_split()) {
        check_row_shards(&case, &split)?;
    }

    /// Column chunks equal the whole rows (f64 inputs).
    #[test]
    fn column_chunks_equal_the_whole_rows((case, split) in case_and_split()) {
        check_column_chunks(&case, &split)?;
    }

    /// Row shards split into column chunks equal the whole batch (f64 inputs).
    #[test]
    fn shards_of_chunks_equal_the_whole((case, split) in case_and_split()) {
        check_shards_of_chunks(&case, &split)?;
    }
}

proptest! {
    #![proptest_config(proptest_config(96, REGRESSIONS))]

    /// The same three, f32 inputs (outputs rounded to f32 once, still bit-identical).
    #[test]
    fn f32_pieces_equal_the_whole((case, split) in case_and_split()) {
        let case = case.cast::<f32>();
        check_row_shards(&case, &split)?;
        check_column_chunks(&case, &split)?;
        check_shards_of_chunks(&case, &split)?;
    }
}

/// The generator's splits hit every edge case the properties claim to cover, often
/// enough for them to mean something (a fixed sample of 512).
#[test]
fn splits_cover_the_edge_cases() {
    let mut runner = TestRunner::new_with_rng(
        ProptestConfig::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[11; 32]),
    );
    let strategy = case_and_split();
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    let mut hit = |what| *seen.entry(what).or_default() += 1;
    for _ in 0..512 {
        let (case, split) = strategy.new_tree(&mut runner).unwrap().current();
        let (b, l) = case.shape();
        hit(case.cfg.rule.name());
        hit(case.cfg.aggregation.name());
        if case.topk.is_some() {
            hit("top-K");
        }
        if case.cfg.kl.is_some() {
            hit("kl");
        }
        if matches!(case.adv, Adv::Row(_)) {
            hit("per-row advantages");
        }
        if case.cfg.num_tokens.is_some() || case.cfg.num_seqs.is_some() {
            hit("count override");
        }
        let shards = split.shards(b);
        let lens = case.row_lengths();
        if b > 0 && !split.contiguous && shards.len() > 1 {
            hit("interleaved shards");
        }
        let sizes: Vec<usize> = shards.iter().map(Vec::len).collect();
        if sizes.iter().max() != sizes.iter().min() {
            hit("uneven shards");
        }
        for (s, rows) in shards.iter().enumerate() {
            if rows.is_empty() {
                hit("shard of zero rows");
            } else if rows.iter().all(|&i| lens[i] == 0) {
                hit("shard of padding only");
            } else if rows.iter().any(|&i| lens[i] == 0) {
                hit("shard with an empty row");
            }
            let cols = split.columns(s, &case.mask, rows);
            if cols.len() < l {
                hit("re-padded shard");
            }
        }
        // The whole rows' chunks (column_chunks_equal_the_whole_rows).
        let bounds = split.bounds(0, l);
        for w in bounds.windows(2) {
            let tokens = (0..b).map(|i| (w[0]..w[1]).filter(|&j| case.mask[[i, j]]).count());
            match w[1] - w[0] {
                0 => hit("chunk of zero columns"),
                1 => hit("chunk of one column"),
                _ => {}
            }
            if w[1] > w[0] && tokens.sum::<usize>() == 0 {
                hit("chunk without tokens");
            }
            if w[0] > 0
                && (0..b).any(|i| {
                    (0..w[0]).any(|j| case.mask[[i, j]]) && (w[0]..l).any(|j| case.mask[[i, j]])
                })
            {
                hit("row across a cut");
            }
        }
    }
    for what in [
        "none",
        "ratio",
        "dppo",
        "cppo",
        "trm_max",
        "trm_avg",
        "token-mean",
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
        "top-K",
        "kl",
        "per-row advantages",
        "count override",
        "interleaved shards",
        "uneven shards",
        "shard of zero rows",
        "shard of padding only",
        "shard with an empty row",
        "re-padded shard",
        "chunk of zero columns",
        "chunk of one column",
        "chunk without tokens",
        "row across a cut",
    ] {
        let n = seen.get(what).copied().unwrap_or(0);
        assert!(n >= 20, "{what}: {n} of 512 ({seen:?})");
    }
}

// ---------------------------------------------------------------------------------------
// Every aggregation mode and rule, on a designed batch
// ---------------------------------------------------------------------------------------

/// 260 rows of 64 slots (more than one engine leaf block): row 3 empty, rows 12..16 all
/// padding, garbage in every padding slot.
fn designed_case(cfg: Config, seed: u64) -> Case<f64> {
    let draw = ConfigDraw {
        cfg,
        extra_tokens: None,
        extra_seqs: None,
    };
    let k = if cfg.divergence.needs_topk() { 3 } else { 0 };
    let mut case = big_case(draw, 260, 64, k, seed);
    if cfg.kl.is_some() {
        assert!(case.logp_ref.is_some());
    }
    for i in [3].into_iter().chain(12..16) {
        case.mask.row_mut(i).fill(false);
    }
    case.fill_padding(|arr, i, j, k| garbage(seed, arr, i, j, k));
    case
}

/// Shards 0..7 (with the empty row 3), 7..7 (no rows), 7..12 re-padded to its own width,
/// 12..16 (all padding, re-padded to width 0), 16..17 (one row), 17..260; each cut into
/// three column chunks when chunked.
fn designed_split() -> Split {
    let bounds = [7, 7, 12, 16, 17, 260];
    let shard_of: Vec<usize> = (0..260)
        .map(|i| bounds.partition_point(|&b| b <= i))
        .collect();
    Split {
        shard_of,
        shards: 6,
        contiguous: true,
        trim: vec![None, None, Some((0, 0)), Some((0, 0)), None, Some((0, 0))],
        cuts: vec![(false, vec![21, 42]); 6],
        par: Par::Rayon,
    }
}

#[test]
fn every_aggregation_mode_and_rule_composes() {
    let rules = [
        Rule::None,
        Rule::Ratio {
            eps_low: 0.2,
            eps_high: 0.28,
        },
        Rule::Dppo { delta: 0.15 },
        Rule::default(),
        Rule::Cppo(CppoParams {
            delta: 0.1,
            delta_b: None,
            w_min: 0.5,
            horizon: Some(24),
            ..CppoParams::default()
        }),
        Rule::Cppo(CppoParams {
            delta: 0.1,
            positions: Positions::Column,
            calibration: Some(Calibration {
                ceiling: 5.0,
                ..Calibration::default()
            }),
            gate: Some(Gate::Inverse),
            ..CppoParams::default()
        }),
        Rule::Cppo(CppoParams {
            calibration: None,
            gate: Some(Gate::Sigmoid { tau: 0.02 }),
            ..CppoParams::default()
        }),
        Rule::TrmMax { delta: 0.5 },
        Rule::TrmAvg { delta: 0.08 },
    ];
    let divergences = [
        Divergence::BinaryTv,
        Divergence::BinaryKl,
        Divergence::TopkTv,
        Divergence::TopkKl,
    ];
    let objectives = [
        Objective::Surrogate,
        Objective::PpoClip {
            eps_low: 0.2,
            eps_high: 0.28,
            dual_clip: Some(3.0),
        },
        Objective::Cispo { eps_high: 0.28 },
        Objective::DetachedIs { ratio_cap: 10.0 },
    ];
    let aggregations = [
        Aggregation::TokenMean,
        Aggregation::SeqMeanTokenMean,
        Aggregation::SeqMeanTokenSum,
        Aggregation::SeqMeanTokenSumNorm,
    ];
    let split = designed_split();
    let mut n = 0;
    for (a, &aggregation) in aggregations.iter().enumerate() {
        for (r, &rule) in rules.iter().enumerate() {
            let cfg = Config {
                divergence: divergences[(a + r) % 4],
                rule,
                objective: objectives[(2 * a + r) % 4],
                aggregation,
                kl: (r % 2 == 0).then_some(KlPenalty {
                    estimator: [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3][a % 3],
                    coef: 0.05,
                }),
                ..Config::cppo()
            };
            let case = designed_case(cfg, 1000 + n);
            n += 1;
            let whole = case.eval(Par::Rayon).unwrap();
            assert!(
                whole.diagnostics.masked_frac > 0.0 || rule == Rule::None,
                "{cfg:?}"
            );
            check_row_shards(&case, &split).unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
            check_shards_of_chunks(&case, &split).unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
            check_column_chunks(&case, &split).unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Pitfalls
// ---------------------------------------------------------------------------------------

/// Two micro-batches of one row each, uneven: 2 response tokens and 7 (row 1 has a hole).
fn uneven() -> (Array2<f64>, Array2<f64>, Array2<f64>, Array2<bool>) {
    let logp = array![
        [
            -0.4,
            -0.8,
            f64::NAN,
            f64::NAN,
            f64::NAN,
            f64::NAN,
            f64::NAN,
            f64::NAN
        ],
        [-0.3, -0.9, -2.0, -0.1, 0.0, -0.6, -1.1, -0.2]
    ];
    let logp_old = array![
        [-0.5, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [-0.2, -1.4, -1.9, -0.1, 0.0, -0.7, -0.6, -0.25]
    ];
    let adv = array![
        [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [-0.5, -0.5, -0.5, -0.5, 0.0, -0.5, -0.5, -0.5]
    ];
    let mask = array![
        [true, true, false, false, false, false, false, false],
        [true, true, true, true, false, true, true, true]
    ];
    (logp, logp_old, adv, mask)
}

/// Evaluates rows `rows` of `uneven()` under `cfg`.
fn eval_rows(cfg: &Config, rows: Range<usize>) -> Evaluation<f64> {
    let (lp, lq, a, m) = uneven();
    let sl = s![rows, ..];
    let (lp, lq, a, m) = (lp.slice(sl), lq.slice(sl), a.slice(sl), m.slice(sl));
    evaluate(cfg, &Batch::new(&lp, &lq, a, m).unwrap(), Par::Seq).unwrap()
}

fn rel_diff(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs())
}

#[test]
fn pitfall_local_token_mean_under_accumulation() {
    let cfg = Config::cppo();
    let whole = eval_rows(&cfg, 0..2);
    // Each micro-batch divides by its own token count; the trainer averages them.
    let local = (eval_rows(&cfg, 0..1).loss + eval_rows(&cfg, 1..2).loss) / 2.0;
    assert!(
        rel_diff(local, whole.loss) > 0.1,
        "{local} vs {}",
        whole.loss
    );
    // The recipe: the global count in every micro-batch, and sum.
    let global = Config {
        num_tokens: Some(9),
        ..cfg
    };
    let (a, b) = (eval_rows(&global, 0..1), eval_rows(&global, 1..2));
    assert!((a.loss + b.loss - whole.loss).abs() <= 1e-15);
    assert_eq!(a.outputs.grad.row(0), whole.outputs.grad.row(0));
    assert_eq!(b.outputs.grad.row(0), whole.outputs.grad.row(1));
}

#[test]
fn pitfall_per_sequence_mean_under_uneven_shards() {
    for aggregation in [Aggregation::SeqMeanTokenMean, Aggregation::SeqMeanTokenSum] {
        // Rank 0 holds both rows, rank 1 holds row 1 again as a third sequence: counts 2
        // and 1. Build the whole (three rows) from `uneven()` stacked.
        let (lp, lq, a, m) = uneven();
        let idx = [0, 1, 1];
        let (lp3, lq3, a3, m3) = (
            lp.select(Axis(0), &idx),
            lq.select(Axis(0), &idx),
            a.select(Axis(0), &idx),
            m.select(Axis(0), &idx),
        );
        let cfg = Config {
            aggregation,
            ..Config::cppo()
        };
        let whole = evaluate(&cfg, &Batch::new(&lp3, &lq3, &a3, &m3).unwrap(), Par::Seq).unwrap();
        // Data-parallel averaging of local per-sequence means: weights 1/2 and 1/1, halved.
        let local = (eval_rows(&cfg, 0..2).loss + eval_rows(&cfg, 1..2).loss) / 2.0;
        assert!(rel_diff(local, whole.loss) > 0.05, "{aggregation:?}");
        // The recipe: all-reduce N_seq = 3, set it everywhere, sum.
        let global = Config {
            num_seqs: Some(3),
            ..cfg
        };
        let sum = eval_rows(&global, 0..2).loss + eval_rows(&global, 1..2).loss;
        assert!(rel_diff(sum, whole.loss) < 1e-14, "{aggregation:?}");
    }
}

#[test]
fn pitfall_norm_length_defaults_to_the_local_padded_width() {
    let (lp, lq, a, m) = uneven();
    let cfg = Config {
        aggregation: Aggregation::SeqMeanTokenSumNorm,
        num_seqs: Some(2),
        ..Config::cppo()
    };
    let whole = evaluate(&cfg, &Batch::new(&lp, &lq, &a, &m).unwrap(), Par::Seq).unwrap();
    // Micro-batch 0 re-padded to its own width 2 (as dynamic padding does).
    let narrow = |cfg: &Config| {
        let sl = s![0..1, 0..2];
        let (lp, lq, a, m) = (lp.slice(sl), lq.slice(sl), a.slice(sl), m.slice(sl));
        evaluate(cfg, &Batch::new(&lp, &lq, a, m).unwrap(), Par::Seq).unwrap()
    };
    let wrong = narrow(&cfg); // Z = 2, not 8
    let want = whole.outputs.grad.slice(s![0..1, 0..2]);
    assert!(wrong.outputs.grad != want);
    assert!((wrong.outputs.grad[[0, 0]] / want[[0, 0]] - 4.0).abs() < 1e-12);
    let right = narrow(&Config {
        norm_length: Some(8),
        ..cfg
    });
    assert_eq!(right.outputs.grad, want);
}

#[test]
fn pitfall_a_chunks_own_counts_over_count_sequences() {
    let (lp, lq, a, m) = uneven();
    let cfg = Config::cppo();
    let whole = Batch::new(&lp, &lq, &a, &m).unwrap().counts().unwrap();
    let mut summed = Counts::default();
    let mut rows = [RowPartial::default(); 2];
    for cols in [0..4, 4..8] {
        let sl = s![.., cols.clone()];
        let (lp, lq, a, m) = (lp.slice(sl), lq.slice(sl), a.slice(sl), m.slice(sl));
        let b = Batch::new(&lp, &lq, a, m).unwrap();
        summed = summed.merge(b.counts().unwrap());
        let pos = ChunkPos {
            col0: cols.start,
            width: 8,
        };
        for (r, p) in rows
            .iter_mut()
            .zip(row_partials(&cfg, &b, pos, Par::Seq).unwrap())
        {
            *r = r.merge(&p);
        }
    }
    // Row 1 spans both chunks: counted twice as a sequence, once as tokens.
    assert_eq!(summed.tokens, whole.tokens);
    assert_eq!(summed.seqs, whole.seqs + 1);
    // The merged partials count whole rows.
    // (The counts do not depend on the config.)
    let rows = whole_rows(&Config::dppo(), &rows, None).unwrap();
    assert_eq!(cppo::chunk::row_counts(&rows), whole);
}

// ---------------------------------------------------------------------------------------
// Zero tokens
// ---------------------------------------------------------------------------------------

fn no_nan(d: &Diagnostics) -> bool {
    let s = format!("{d:?}");
    !s.contains("NaN") && !s.contains("inf")
}

#[test]
fn a_micro_batch_without_response_tokens_contributes_zero() {
    let garbage = [f64::NAN, f64::INFINITY, 3.0, f64::NEG_INFINITY, -1e30];
    let g = |i: usize, j: usize| garbage[(i * 7 + j) % garbage.len()];
    let logp = Array2::from_shape_fn((3, 5), |(i, j)| g(i, j));
    let logp_old = Array2::from_shape_fn((3, 5), |(i, j)| g(i + 1, j));
    let adv = array![f64::NAN, 1.0, f64::INFINITY];
    let mask = Array2::<f32>::zeros((3, 5));
    let batch = Batch::new(&logp, &logp_old, &adv, &mask).unwrap();
    assert_eq!(batch.counts().unwrap(), Counts::default());
    let empty_rows = Array2::<f64>::zeros((0, 5));
    let (no_adv, no_mask) = (
        cppo::ndarray::Array1::<f64>::zeros(0),
        Array2::<bool>::from_elem((0, 5), false),
    );
    let zero_rows = Batch::new(&empty_rows, &empty_rows, &no_adv, &no_mask).unwrap();
    for aggregation in [
        Aggregation::TokenMean,
        Aggregation::SeqMeanTokenMean,
        Aggregation::SeqMeanTokenSum,
        Aggregation::SeqMeanTokenSumNorm,
    ] {
        for rule in [Rule::default(), Rule::TrmAvg { delta: 0.1 }, Rule::None] {
            // Its own counts (0/0), the global counts of a larger batch, or global zeros.
            for (num_tokens, num_seqs) in [(None, None), (Some(40), Some(6)), (Some(0), Some(0))] {
                let cfg = Config {
                    rule,
                    aggregation,
                    num_tokens,
                    num_seqs,
                    ..Config::cppo()
                };
                for b in [&batch, &zero_rows] {
                    let e = evaluate(&cfg, b, Par::Seq).unwrap();
                    assert_eq!(e.loss.to_bits(), 0.0f64.to_bits(), "{cfg:?}");
                    assert!(e.outputs.grad.iter().all(|&x| x.to_bits() == 0));
                    assert!(e.outputs.token_loss.iter().all(|&x| x.to_bits() == 0));
                    assert!(e.outputs.reason.iter().all(|&r| r == 0));
                    assert!(no_nan(&e.diagnostics), "{:?}", e.diagnostics);
                }
                // The same micro-batch as a column chunk of rows without tokens.
                let none = Array2::from_elem((3, 5), f64::NAN);
                let rows =
                    whole_rows(&cfg, &vec![RowPartial::default(); 3], Some(none.view())).unwrap();
                let mut carries = vec![Carry::default(); 3];
                let mut out = Outputs::<f64>::zeros((3, 5));
                let pos = ChunkPos { col0: 0, width: 5 };
                let s = evaluate_chunk_into(
                    &cfg,
                    &batch,
                    pos,
                    &rows,
                    &mut carries,
                    out.view_mut(),
                    Par::Seq,
                )
                .unwrap();
                assert_eq!(s.loss.to_bits(), 0);
                assert!(out.grad.iter().all(|&x| x.to_bits() == 0));
                assert!(no_nan(&s.diagnostics));
                for (i, c) in carries.iter().enumerate() {
                    c.finish(i, &rows[i], 5).unwrap();
                }
            }
        }
    }
}

#[test]
fn a_micro_batch_masked_out_by_the_trust_region_keeps_its_denominators() {
    // Every token of micro-batch 0 moves away and breaks a tiny δ: masked, loss 0 and
    // gradient 0 there, but its 2 tokens still count in N_tok (see the aggregate module), so
    // micro-batch 1's gradient is the whole batch's.
    let cfg = Config {
        rule: Rule::Dppo { delta: 1e-6 },
        num_tokens: Some(9),
        ..Config::cppo()
    };
    let a = eval_rows(&cfg, 0..1);
    assert_eq!(a.diagnostics.kept_tokens, 0);
    assert_eq!(a.loss, 0.0);
    assert!(a.outputs.grad.iter().all(|&g| g == 0.0));
    let whole = eval_rows(
        &Config {
            num_tokens: None,
            ..cfg
        },
        0..2,
    );
    assert_eq!(
        eval_rows(&cfg, 1..2).outputs.grad.row(0),
        whole.outputs.grad.row(1)
    );
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Two rows of six slots and their chunks of three columns.
struct Small {
    logp: Array2<f64>,
    logp_old: Array2<f64>,
    adv: cppo::ndarray::Array1<f64>,
    mask: Array2<bool>,
}

impl Small {
    fn new() -> Self {
        Self {
            logp: array![
                [-0.1, -0.7, -0.2, -1.5, -0.3, -0.05],
                [-0.4, -0.2, -0.9, -0.3, -2.0, -0.6]
            ],
            logp_old: array![
                [-0.3, -0.2, -0.2, -0.4, -0.9, -0.1],
                [-0.5, -0.2, -1.0, -0.3, -1.0, -0.6]
            ],
            adv: array![1.0, -1.0],
            mask: array![
                [true, true, false, true, true, true],
                [true, false, true, true, false, false]
            ],
        }
    }

    fn chunk(
        &self,
        cols: Range<usize>,
    ) -> (
        ArrayView2<'_, f64>,
        ArrayView2<'_, f64>,
        ArrayView2<'_, bool>,
    ) {
        let sl = s![.., cols];
        (
            self.logp.slice(sl),
            self.logp_old.slice(sl),
            self.mask.slice(sl),
        )
    }

    /// Runs `cols` as a chunk of whole rows of `width` slots.
    fn run(
        &self,
        cfg: &Config,
        cols: Range<usize>,
        width: usize,
        rows: &[WholeRow],
        carries: &mut [Carry],
    ) -> cppo::Result<f64> {
        let col0 = cols.start;
        let (lp, lq, m) = self.chunk(cols.clone());
        let b = Batch::new(&lp, &lq, &self.adv, m)?;
        let mut out = Outputs::<f64>::zeros((2, cols.len()));
        let pos = ChunkPos { col0, width };
        Ok(evaluate_chunk_into(cfg, &b, pos, rows, carries, out.view_mut(), Par::Seq)?.loss)
    }

    /// The rows' whole-row facts from their partials merged over the chunks between
    /// consecutive `bounds` (a config without a calibrated budget).
    fn partials(&self, cfg: &Config, bounds: &[usize]) -> Vec<WholeRow> {
        whole_rows(cfg, &self.raw_partials(cfg, bounds), None).unwrap()
    }

    /// The rows' partials merged over the chunks between consecutive `bounds`.
    fn raw_partials(&self, cfg: &Config, bounds: &[usize]) -> Vec<RowPartial> {
        let mut rows = vec![RowPartial::default(); 2];
        for w in bounds.windows(2) {
            let cols = w[0]..w[1];
            let (lp, lq, m) = self.chunk(cols.clone());
            let b = Batch::new(&lp, &lq, &self.adv, m).unwrap();
            let pos = ChunkPos {
                col0: cols.start,
                width: 6,
            };
            for (r, p) in rows
                .iter_mut()
                .zip(row_partials(cfg, &b, pos, Par::Seq).unwrap())
            {
                *r = r.merge(&p);
            }
        }
        rows
    }
}

/// CPPO with a fixed budget: its chunks need no gathered divergences.
fn fixed_budget() -> Config {
    Config::with_rule(Rule::Cppo(CppoParams {
        calibration: None,
        ..CppoParams::default()
    }))
}

#[test]
fn chunks_out_of_order_are_refused() {
    let s = Small::new();
    let cfg = fixed_budget();
    let rows = s.partials(&cfg, &[0, 3, 6]);
    // The second chunk first.
    let mut carries = vec![Carry::default(); 2];
    let err = s.run(&cfg, 3..6, 6, &rows, &mut carries).unwrap_err();
    assert_eq!(
        err,
        Error::ChunkOutOfOrder {
            row: 0,
            expected: 0,
            got: 3
        }
    );
    // A chunk twice.
    let mut carries = vec![Carry::default(); 2];
    s.run(&cfg, 0..3, 6, &rows, &mut carries).unwrap();
    let err = s.run(&cfg, 0..3, 6, &rows, &mut carries).unwrap_err();
    assert_eq!(
        err,
        Error::ChunkOutOfOrder {
            row: 0,
            expected: 3,
            got: 0
        }
    );
    // A gap.
    let err = s.run(&cfg, 4..6, 6, &rows, &mut carries).unwrap_err();
    assert_eq!(
        err,
        Error::ChunkOutOfOrder {
            row: 0,
            expected: 3,
            got: 4
        }
    );
}

#[test]
fn chunks_that_do_not_add_up_are_refused() {
    let s = Small::new();
    let cfg = fixed_budget();
    let rows = s.partials(&cfg, &[0, 3, 6]);
    let mismatch = |e: Error, row: usize, words: &str| match e {
        Error::ChunkMismatch { row: r, reason } => {
            assert_eq!(r, row);
            assert!(reason.contains(words), "{reason}");
        }
        e => panic!("{e:?}"),
    };

    // A chunk past the row width (rows declared 5 wide).
    let mut carries = vec![Carry::default(); 2];
    s.run(&cfg, 0..3, 5, &rows, &mut carries).unwrap();
    let e = s.run(&cfg, 3..6, 5, &rows, &mut carries).unwrap_err();
    mismatch(e, 0, "past the row width 5");

    // More response tokens than the row's partials (the second chunk's partials left
    // out): row 0 has 3 tokens in columns 3..6, its partial says 2 in all.
    let first_only = s.partials(&cfg, &[0, 3]);
    let mut carries = vec![Carry::default(); 2];
    s.run(&cfg, 0..3, 6, &first_only, &mut carries).unwrap();
    let e = s.run(&cfg, 3..6, 6, &first_only, &mut carries).unwrap_err();
    mismatch(e, 0, "hold 5 response tokens, its whole row 2");

    // A missing chunk, caught by finish.
    let mut carries = vec![Carry::default(); 2];
    s.run(&cfg, 0..3, 6, &rows, &mut carries).unwrap();
    mismatch(
        carries[0].finish(0, &rows[0], 6).unwrap_err(),
        0,
        "covered 3 of its 6 columns",
    );

    // Partials merged twice (T doubled): the chunks run, finish refuses.
    let raw = s.raw_partials(&cfg, &[0, 3, 6]);
    let twice = whole_rows(
        &cfg,
        &raw.iter().map(|r| r.merge(r)).collect::<Vec<_>>(),
        None,
    )
    .unwrap();
    let mut carries = vec![Carry::default(); 2];
    s.run(&cfg, 0..3, 6, &twice, &mut carries).unwrap();
    s.run(&cfg, 3..6, 6, &twice, &mut carries).unwrap();
    mismatch(
        carries[1].finish(1, &twice[1], 6).unwrap_err(),
        1,
        "held 3 response tokens, its partials 6",
    );

    // And the right way round, all is well.
    let mut carries = vec![Carry::default(); 2];
    s.run(&cfg, 0..3, 6, &rows, &mut carries).unwrap();
    s.run(&cfg, 3..6, 6, &rows, &mut carries).unwrap();
    for (i, c) in carries.iter().enumerate() {
        c.finish(i, &rows[i], 6).unwrap();
    }
}

#[test]
fn count_overrides_below_the_shards_own_are_refused() {
    let s = Small::new();
    let b = Batch::new(&s.logp, &s.logp_old, &s.adv, &s.mask).unwrap();
    assert_eq!(b.counts().unwrap(), Counts { tokens: 8, seqs: 2 });
    let tokens = Config {
        num_tokens: Some(7),
        ..Config::cppo()
    };
    assert_eq!(
        evaluate(&tokens, &b, Par::Seq).unwrap_err(),
        Error::CountTooSmall {
            field: "num_tokens",
            given: 7,
            local: 8
        }
    );
    let seqs = Config {
        num_seqs: Some(1),
        aggregation: Aggregation::SeqMeanTokenMean,
        ..Config::cppo()
    };
    assert_eq!(
        evaluate(&seqs, &b, Par::Seq).unwrap_err(),
        Error::CountTooSmall {
            field: "num_seqs",
            given: 1,
            local: 2
        }
    );
    // A chunk is checked against its whole rows' counts (from the partials), not its own:
    // columns 0..3 hold 4 tokens, the rows 8.
    let rows = s.partials(&fixed_budget(), &[0, 3, 6]);
    let mut carries = vec![Carry::default(); 2];
    let cfg = Config {
        num_tokens: Some(5),
        ..fixed_budget()
    };
    assert_eq!(
        s.run(&cfg, 0..3, 6, &rows, &mut carries).unwrap_err(),
        Error::CountTooSmall {
            field: "num_tokens",
            given: 5,
            local: 8
        }
    );
}

// ---------------------------------------------------------------------------------------
// TRM-avg at the threshold
// ---------------------------------------------------------------------------------------

/// TRM-avg decides a row on Σ D_t / T ≤ δ. Added in floats, the whole row (left to right)
/// and the chunks' merged partials (chunk by chunk) can differ in the last bit, so a row
/// whose mean sits exactly at δ would be kept whole and dropped chunked. The crate sums
/// D_t in exact fixed point, so both decide alike; δ here sits between the two float
/// sums.
#[test]
fn trm_avg_chunked_decision_at_the_threshold() {
    let p = [0.48f64, 0.1, 0.44, 0.08];
    let q = [0.14f64, 0.26, 0.67, 0.02];
    let logp = Array2::from_shape_fn((1, 4), |(_, j)| p[j].ln());
    let logp_old = Array2::from_shape_fn((1, 4), |(_, j)| q[j].ln());
    let (adv, mask) = (array![1.0], array![[true, true, true, true]]);
    let none = Config::with_rule(Rule::None);
    let batch = Batch::new(&logp, &logp_old, &adv, &mask).unwrap();
    let d = evaluate(&none, &batch, Par::Seq)
        .unwrap()
        .outputs
        .divergence;
    let whole_sum = ((d[[0, 0]] + d[[0, 1]]) + d[[0, 2]]) + d[[0, 3]];
    let chunk_sum = (d[[0, 0]] + d[[0, 1]]) + (d[[0, 2]] + d[[0, 3]]);
    assert_ne!(
        whole_sum, chunk_sum,
        "the repro needs sums that round differently"
    );
    let cfg = Config::with_rule(Rule::TrmAvg {
        delta: whole_sum.min(chunk_sum) / 4.0,
    });
    let case = Case {
        cfg,
        logp,
        logp_old,
        adv: Adv::Row(adv),
        mask,
        topk: None,
        logp_ref: None,
        is_weights: None,
    };
    let whole = case.eval(Par::Seq).unwrap();
    let (chunked, _) = run_chunks(&cfg, &case, &[0, 2, 4], Par::Seq).unwrap();
    assert_eq!(chunked.outputs.reason, whole.outputs.reason);
}
