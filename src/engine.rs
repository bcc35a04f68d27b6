//! The fused engine: one pass per row computes divergence, weight, prefix sums, mask,
//! reason, loss term, gradient and diagnostics partials.
//!
//! Rows are independent, so they run in parallel (rayon) or in sequence, as the caller's
//! [`Par`] says. The batch is cut into blocks by recursive halving down to a leaf size
//! that depends only on the batch's shape; the leaves' [`Tally`]s merge along that same
//! tree whichever way it is run. The float sums therefore add in one fixed order, and
//! `Par::Seq`, `Par::Rayon` on any number of threads give bit-identical results.
//!
//! Two layers, as in RustFFT and faer:
//! - [`evaluate`] allocates and returns all outputs;
//! - [`evaluate_into`] writes into caller-owned buffers and allocates nothing, for
//!   trainers that run it every step.
//!
//! [`trust_region`] computes the mask outputs alone (divergence, weight, threshold, keep,
//! reason), for audits that need no loss.
//!
//! Order of work within a row: the row's response count T (for the weights and the
//! per-sequence aggregation), then, for TRM only, a first sweep for the row's max or
//! mean divergence, then the fused sweep. Before any row, one count of the whole mask
//! gives N_tok and N_seq, which the aggregation weights need.
//!
//! ```
//! use cppo::{evaluate, Batch, Config, Par};
//! use cppo::ndarray::array;
//! let logp = array![[0.5f64.ln(), 0.9f64.ln()]];
//! let logp_old = array![[0.4f64.ln(), 0.95f64.ln()]];
//! let (adv, mask) = (array![1.0], array![[true, true]]);
//! let batch = Batch::new(&logp, &logp_old, &adv, &mask).unwrap();
//! let seq = evaluate(&Config::cppo(), &batch, Par::Seq).unwrap();
//! let par = evaluate(&Config::cppo(), &batch, Par::Rayon).unwrap();
//! assert_eq!(seq.loss.to_bits(), par.loss.to_bits());
//! assert_eq!(seq.outputs.reason, array![[1u8, 1]]);
//! ```

use ndarray::{Array2, ArrayViewMut2, Axis};

use crate::aggregate::Counts;
use crate::batch::Batch;
use crate::chunk::Carry;
use crate::config::Config;
use crate::divergence::Divergence;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::kernel::{Plan, Prefix, RowLanes, RowOut, run_row, whole_row_facts};
use crate::rule::Rule;
use crate::stats::{Diagnostics, Tally};

/// Runs `$body` with `$m` bound to row `$i` of the batch's mask, whatever its type.
macro_rules! with_mask_row {
    ($batch:expr, $i:expr, |$m:ident| $body:expr) => {
        match $batch.mask {
            $crate::batch::Mask::Bool(all) => {
                let $m = all.index_axis_move(ndarray::Axis(0), $i);
                $body
            }
            $crate::batch::Mask::U8(all) => {
                let $m = all.index_axis_move(ndarray::Axis(0), $i);
                $body
            }
            $crate::batch::Mask::F32(all) => {
                let $m = all.index_axis_move(ndarray::Axis(0), $i);
                $body
            }
            $crate::batch::Mask::F64(all) => {
                let $m = all.index_axis_move(ndarray::Axis(0), $i);
                $body
            }
        }
    };
}
pub(crate) use with_mask_row;

/// Sequential or parallel execution. Both give bit-identical results.
///
/// `Rayon` runs on the current rayon pool: a trainer that owns a pool calls the engine
/// inside `pool.install(..)` to keep control of its threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Par {
    /// One thread, the caller's.
    Seq,
    /// The current rayon pool.
    #[default]
    Rayon,
}

/// The per-token outputs of [`evaluate`], each (B, L) and 0 (or `false`) at
/// non-response positions.
#[derive(Clone, Debug, PartialEq)]
pub struct Outputs<F> {
    /// D_t.
    pub divergence: Array2<F>,
    /// w_t (1 under rules without a schedule).
    pub weight: Array2<F>,
    /// c_t for CPPO, δ for DPPO and TRM, NaN for `none` and `ratio`.
    pub threshold: Array2<F>,
    /// M_t: whether the token keeps its gradient.
    pub keep: Array2<bool>,
    /// The [`Reason`](crate::Reason) code of each decision.
    pub reason: Array2<u8>,
    /// The per-token loss before aggregation: M_t l_t plus any KL term.
    pub token_loss: Array2<F>,
    /// dL/dlogp.
    pub grad: Array2<F>,
}

impl<F: Float> Outputs<F> {
    /// Zeroed outputs for a (B, L) batch.
    pub fn zeros((b, l): (usize, usize)) -> Self {
        let z = || Array2::from_elem((b, l), F::default());
        Self {
            divergence: z(),
            weight: z(),
            threshold: z(),
            keep: Array2::from_elem((b, l), false),
            reason: Array2::zeros((b, l)),
            token_loss: z(),
            grad: z(),
        }
    }

    /// Mutable views of every output, for [`evaluate_into`].
    pub fn view_mut(&mut self) -> OutputsMut<'_, F> {
        OutputsMut {
            divergence: Some(self.divergence.view_mut()),
            weight: Some(self.weight.view_mut()),
            threshold: Some(self.threshold.view_mut()),
            keep: Some(self.keep.view_mut()),
            reason: Some(self.reason.view_mut()),
            token_loss: Some(self.token_loss.view_mut()),
            grad: Some(self.grad.view_mut()),
        }
    }
}

/// Caller-owned output buffers for [`evaluate_into`], each (B, L). Every buffer is
/// optional: a trainer that needs only `grad` (and perhaps `keep`) passes only those and
/// saves the memory traffic of the rest.
///
/// ```
/// use cppo::{evaluate_into, Batch, Config, OutputsMut, Par};
/// use cppo::ndarray::{array, Array2};
/// let logp = array![[-0.7f32, -0.1]];
/// let logp_old = array![[-0.9f32, -0.1]];
/// let (adv, mask) = (array![1.0f32], array![[true, true]]);
/// let batch = Batch::new(&logp, &logp_old, &adv, &mask).unwrap();
/// let mut grad = Array2::<f32>::zeros((1, 2));
/// let out = OutputsMut { grad: Some(grad.view_mut()), ..Default::default() };
/// let s = evaluate_into(&Config::cppo(), &batch, out, Par::Seq).unwrap();
/// assert!(s.loss < 0.0 && grad[[0, 0]] < 0.0);
/// ```
#[derive(Debug)]
pub struct OutputsMut<'a, F> {
    /// D_t.
    pub divergence: Option<ArrayViewMut2<'a, F>>,
    /// w_t.
    pub weight: Option<ArrayViewMut2<'a, F>>,
    /// c_t or δ, NaN where the rule has none.
    pub threshold: Option<ArrayViewMut2<'a, F>>,
    /// M_t.
    pub keep: Option<ArrayViewMut2<'a, bool>>,
    /// Reason codes.
    pub reason: Option<ArrayViewMut2<'a, u8>>,
    /// The per-token loss before aggregation.
    pub token_loss: Option<ArrayViewMut2<'a, F>>,
    /// dL/dlogp.
    pub grad: Option<ArrayViewMut2<'a, F>>,
}

impl<F> Default for OutputsMut<'_, F> {
    /// No buffers: [`evaluate_into`] then computes only the loss and the diagnostics.
    fn default() -> Self {
        Self {
            divergence: None,
            weight: None,
            threshold: None,
            keep: None,
            reason: None,
            token_loss: None,
            grad: None,
        }
    }
}

/// The mask outputs of [`trust_region`], each (B, L), with the diagnostics.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskOutputs<F> {
    /// D_t.
    pub divergence: Array2<F>,
    /// w_t.
    pub weight: Array2<F>,
    /// c_t or δ, NaN where the rule has none.
    pub threshold: Array2<F>,
    /// M_t.
    pub keep: Array2<bool>,
    /// Reason codes.
    pub reason: Array2<u8>,
    /// Diagnostics (the loss field is that of the surrogate objective under token-mean).
    pub diagnostics: Diagnostics,
}

/// Everything [`evaluate`] computes.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation<F> {
    /// The aggregated loss L.
    pub loss: f64,
    /// The per-token outputs.
    pub outputs: Outputs<F>,
    /// The diagnostics.
    pub diagnostics: Diagnostics,
    /// The merged tally behind the diagnostics (mergeable across shards).
    pub tally: Tally,
}

/// What [`evaluate_into`] returns besides the buffers it fills.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// The aggregated loss L.
    pub loss: f64,
    /// The diagnostics.
    pub diagnostics: Diagnostics,
    /// The merged tally behind the diagnostics (mergeable across shards).
    pub tally: Tally,
    /// This batch's own response-token and sequence counts.
    pub counts: Counts,
}

/// Computes the loss, its gradient with respect to `logp`, every per-token output and
/// the diagnostics.
///
/// # Errors
///
/// An invalid config, an array the config needs but the batch lacks, a bad value at a
/// response position (the first in row-major order), or a count override smaller than
/// the batch's own count.
pub fn evaluate<F: Float>(cfg: &Config, batch: &Batch<'_, F>, par: Par) -> Result<Evaluation<F>> {
    let mut outputs = Outputs::zeros(batch.shape());
    let s = evaluate_into(cfg, batch, outputs.view_mut(), par)?;
    Ok(Evaluation {
        loss: s.loss,
        outputs,
        diagnostics: s.diagnostics,
        tally: s.tally,
    })
}

/// [`evaluate`] into caller-owned buffers. Allocates nothing on the heap. Every element
/// of every given buffer is written; on error their contents are unspecified.
///
/// # Errors
///
/// As [`evaluate`], and a buffer whose shape is not (B, L).
///
/// ```
/// use cppo::{evaluate_into, Batch, Config, Outputs, Par};
/// use cppo::ndarray::array;
/// let logp = array![[-0.7f32, -0.1]];
/// let logp_old = array![[-0.9f32, -0.1]];
/// let (adv, mask) = (array![-1.0f32], array![[1.0f32, 1.0]]);
/// let batch = Batch::new(&logp, &logp_old, &adv, &mask).unwrap();
/// let mut out = Outputs::<f32>::zeros(batch.shape()); // allocate once, reuse every step
/// let s = evaluate_into(&Config::dppo(), &batch, out.view_mut(), Par::Seq).unwrap();
/// assert_eq!(s.counts.tokens, 2);
/// assert!(out.grad.iter().all(|g| g.is_finite()));
/// ```
pub fn evaluate_into<F: Float>(
    cfg: &Config,
    batch: &Batch<'_, F>,
    out: OutputsMut<'_, F>,
    par: Par,
) -> Result<Summary> {
    check_call(cfg, batch, &out)?;
    let counts = batch_counts(batch, par);
    let plan = Plan {
        cfg,
        denominators: denominators(cfg, counts),
        width: batch.shape().1,
        col0: 0,
    };
    let row_fn = |i: usize, out: RowLanes<'_, F>, _: Option<&mut Carry>| {
        with_mask_row!(batch, i, |mask| {
            let facts = whole_row_facts(cfg, batch, mask, i)?;
            run_row(&plan, batch, mask, i, facts, &mut Prefix::default(), out)
        })
    };
    let tally = run_rows(batch.shape(), out, None, par, &row_fn)?;
    check_overrides(cfg, counts)?;
    Ok(Summary {
        loss: tally.loss,
        diagnostics: Diagnostics::new(&tally, cfg),
        tally,
        counts,
    })
}

/// The checks every call makes before its pass: the config, the output shapes, and the
/// arrays the config needs.
pub(crate) fn check_call<F: Float>(
    cfg: &Config,
    batch: &Batch<'_, F>,
    out: &OutputsMut<'_, F>,
) -> Result<()> {
    cfg.validate()?;
    let shape = batch.shape();
    let dim = |v: &Option<ArrayViewMut2<'_, F>>| v.as_ref().map(|v| v.dim());
    check_out_shape("divergence", dim(&out.divergence), shape)?;
    check_out_shape("weight", dim(&out.weight), shape)?;
    check_out_shape("threshold", dim(&out.threshold), shape)?;
    check_out_shape("keep", out.keep.as_ref().map(|v| v.dim()), shape)?;
    check_out_shape("reason", out.reason.as_ref().map(|v| v.dim()), shape)?;
    check_out_shape("token_loss", dim(&out.token_loss), shape)?;
    check_out_shape("grad", dim(&out.grad), shape)?;
    if cfg.divergence.needs_topk() && batch.topk.is_none() {
        return Err(Error::MissingArray {
            array: "topk_logp_old",
            needed_by: if cfg.divergence == Divergence::TopkTv {
                "divergence topk_tv"
            } else {
                "divergence topk_kl"
            },
        });
    }
    if cfg.kl.is_some() && batch.logp_ref.is_none() {
        return Err(Error::MissingArray {
            array: "logp_ref",
            needed_by: "the kl penalty",
        });
    }
    Ok(())
}

/// The trust-region mask alone: divergence, weight, threshold, keep and reason, with the
/// diagnostics, for the given divergence and rule.
///
/// # Errors
///
/// As [`evaluate`].
///
/// ```
/// use cppo::{trust_region, Batch, Divergence, Par, Rule};
/// use cppo::ndarray::array;
/// // SPEC section 8's row, A = +1: the fifth token breaks the token threshold,
/// // the sixth the prefix budget.
/// let p = [0.50f64, 0.90, 0.30, 1.0, 0.60, 0.95];
/// let q = [0.40f64, 0.95, 0.45, 1.0, 0.30, 0.90];
/// let logp = cppo::ndarray::Array2::from_shape_fn((1, 6), |(_, j)| p[j].ln());
/// let logp_old = cppo::ndarray::Array2::from_shape_fn((1, 6), |(_, j)| q[j].ln());
/// let mask = array![[true, true, true, false, true, true]];
/// let adv = array![1.0];
/// let batch = Batch::new(&logp, &logp_old, &adv, &mask).unwrap();
/// let rule = Rule::cppo(0.2, Some(0.05), 0.8).unwrap();
/// let m = trust_region(Divergence::BinaryTv, &rule, &batch, Par::Seq).unwrap();
/// assert_eq!(m.reason, array![[1u8, 1, 1, 0, 3, 4]]);
/// ```
pub fn trust_region<F: Float>(
    divergence: Divergence,
    rule: &Rule,
    batch: &Batch<'_, F>,
    par: Par,
) -> Result<MaskOutputs<F>> {
    let cfg = Config {
        divergence,
        ..Config::with_rule(*rule)
    };
    let shape = batch.shape();
    let zeros = || Array2::from_elem(shape, F::default());
    let (mut divergence, mut weight, mut threshold) = (zeros(), zeros(), zeros());
    let mut keep = Array2::from_elem(shape, false);
    let mut reason = Array2::zeros(shape);
    let s = evaluate_into(
        &cfg,
        batch,
        OutputsMut {
            divergence: Some(divergence.view_mut()),
            weight: Some(weight.view_mut()),
            threshold: Some(threshold.view_mut()),
            keep: Some(keep.view_mut()),
            reason: Some(reason.view_mut()),
            ..Default::default()
        },
        par,
    )?;
    Ok(MaskOutputs {
        divergence,
        weight,
        threshold,
        keep,
        reason,
        diagnostics: s.diagnostics,
    })
}

fn check_out_shape(
    array: &'static str,
    got: Option<(usize, usize)>,
    want: (usize, usize),
) -> Result<()> {
    let Some(got) = got else { return Ok(()) };
    if got == want {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            array,
            expected: format!("({}, {}), as the batch", want.0, want.1),
            got: vec![got.0, got.1],
        })
    }
}

/// N_tok and N_seq for the aggregation: the config's overrides, else `local`.
pub(crate) fn denominators(cfg: &Config, local: Counts) -> Counts {
    Counts {
        tokens: cfg.num_tokens.unwrap_or(local.tokens),
        seqs: cfg.num_seqs.unwrap_or(local.seqs),
    }
}

/// An override below the batch's own count cannot count a batch this one is part of.
/// Checked after the pass, so that bad values in the batch are reported first.
pub(crate) fn check_overrides(cfg: &Config, local: Counts) -> Result<()> {
    for (field, given, local) in [
        ("num_tokens", cfg.num_tokens, local.tokens),
        ("num_seqs", cfg.num_seqs, local.seqs),
    ] {
        if let Some(given) = given.filter(|&g| g < local) {
            return Err(Error::CountTooSmall {
                field,
                given,
                local,
            });
        }
    }
    Ok(())
}

/// Rows per leaf block: about `LEAF_TOKENS` tokens, from the shape alone, so the merge
/// tree (and with it every float sum) is the same on any number of threads.
const LEAF_TOKENS: usize = 1 << 14;

fn leaf_rows((_, l): (usize, usize)) -> usize {
    (LEAF_TOKENS / l.max(1)).max(1)
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
        // A batch of one leaf block is counted where it is computed: on this thread.
        Par::Seq => (0..b).map(row).fold(Counts::default(), Counts::merge),
        Par::Rayon if b <= leaf => (0..b).map(row).fold(Counts::default(), Counts::merge),
        Par::Rayon => {
            use rayon::prelude::*;
            // Integer sums: the same in any order.
            (0..b)
                .into_par_iter()
                .with_min_len(leaf)
                .map(row)
                .reduce(Counts::default, Counts::merge)
        }
    }
}

/// A block of consecutive rows of every output, starting at batch row `row0`.
struct Block<'o, F> {
    rows: usize,
    row0: usize,
    divergence: Option<ArrayViewMut2<'o, F>>,
    weight: Option<ArrayViewMut2<'o, F>>,
    threshold: Option<ArrayViewMut2<'o, F>>,
    keep: Option<ArrayViewMut2<'o, bool>>,
    reason: Option<ArrayViewMut2<'o, u8>>,
    token_loss: Option<ArrayViewMut2<'o, F>>,
    grad: Option<ArrayViewMut2<'o, F>>,
}

impl<'o, F: Float> Block<'o, F> {
    fn split(self, mid: usize) -> (Self, Self) {
        let (d0, d1) = split_opt(self.divergence, mid);
        let (w0, w1) = split_opt(self.weight, mid);
        let (t0, t1) = split_opt(self.threshold, mid);
        let (k0, k1) = split_opt(self.keep, mid);
        let (r0, r1) = split_opt(self.reason, mid);
        let (l0, l1) = split_opt(self.token_loss, mid);
        let (g0, g1) = split_opt(self.grad, mid);
        (
            Block {
                rows: mid,
                row0: self.row0,
                divergence: d0,
                weight: w0,
                threshold: t0,
                keep: k0,
                reason: r0,
                token_loss: l0,
                grad: g0,
            },
            Block {
                rows: self.rows - mid,
                row0: self.row0 + mid,
                divergence: d1,
                weight: w1,
                threshold: t1,
                keep: k1,
                reason: r1,
                token_loss: l1,
                grad: g1,
            },
        )
    }

    fn row(&mut self, r: usize) -> RowLanes<'_, F> {
        RowOut {
            divergence: self.divergence.as_mut().map(|v| v.row_mut(r)),
            weight: self.weight.as_mut().map(|v| v.row_mut(r)),
            threshold: self.threshold.as_mut().map(|v| v.row_mut(r)),
            keep: self.keep.as_mut().map(|v| v.row_mut(r)),
            reason: self.reason.as_mut().map(|v| v.row_mut(r)),
            token_loss: self.token_loss.as_mut().map(|v| v.row_mut(r)),
            grad: self.grad.as_mut().map(|v| v.row_mut(r)),
        }
        .into()
    }
}

type SplitOpt<'o, T> = (Option<ArrayViewMut2<'o, T>>, Option<ArrayViewMut2<'o, T>>);

fn split_opt<T>(v: Option<ArrayViewMut2<'_, T>>, mid: usize) -> SplitOpt<'_, T> {
    match v {
        Some(v) => {
            let (a, b) = v.split_at(Axis(0), mid);
            (Some(a), Some(b))
        }
        None => (None, None),
    }
}

/// One row's work: the row's index, its output lanes, and its carry (chunked calls).
pub(crate) type RowFn<'f, F> =
    dyn Fn(usize, RowLanes<'_, F>, Option<&mut Carry>) -> Result<Tally> + Sync + 'f;

/// Runs `row_fn` on every row, writing into `out`, with one carry per row if given.
pub(crate) fn run_rows<F: Float>(
    shape: (usize, usize),
    out: OutputsMut<'_, F>,
    carries: Option<&mut [Carry]>,
    par: Par,
    row_fn: &RowFn<'_, F>,
) -> Result<Tally> {
    let block = Block {
        rows: shape.0,
        row0: 0,
        divergence: out.divergence,
        weight: out.weight,
        threshold: out.threshold,
        keep: out.keep,
        reason: out.reason,
        token_loss: out.token_loss,
        grad: out.grad,
    };
    run_block(leaf_rows(shape), block, carries, par, row_fn)
}

fn run_block<F: Float>(
    leaf_rows: usize,
    mut block: Block<'_, F>,
    carries: Option<&mut [Carry]>,
    par: Par,
    row_fn: &RowFn<'_, F>,
) -> Result<Tally> {
    let n = block.rows;
    if n <= leaf_rows {
        let mut tally = Tally::default();
        let mut carries = carries;
        for r in 0..n {
            let carry = carries.as_deref_mut().map(|c| &mut c[r]);
            let row_tally = row_fn(block.row0 + r, block.row(r), carry)?;
            tally = tally.merge(&row_tally);
        }
        return Ok(tally);
    }
    let mid = n / 2;
    let (left, right) = block.split(mid);
    let (c_left, c_right) = match carries {
        Some(c) => {
            let (a, b) = c.split_at_mut(mid);
            (Some(a), Some(b))
        }
        None => (None, None),
    };
    let (l, r) = match par {
        Par::Seq => (
            run_block(leaf_rows, left, c_left, par, row_fn),
            run_block(leaf_rows, right, c_right, par, row_fn),
        ),
        Par::Rayon => rayon::join(
            || run_block(leaf_rows, left, c_left, par, row_fn),
            || run_block(leaf_rows, right, c_right, par, row_fn),
        ),
    };
    // The left error first: the lowest row wins, whatever ran first.
    Ok(l?.merge(&r?))
}
