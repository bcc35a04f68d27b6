//! The entry points: [`evaluate`], [`evaluate_into`], [`trust_region`], and [`Par`].
//!
//! One fused pass per row computes divergence, weight, prefix sums, mask, reason, loss
//! term, gradient and diagnostics partials (the crate's private `kernel` module; the
//! [contributor notes](crate::doc::contributing) map it). Rows are independent, so they run in parallel (rayon) or in
//! sequence, as the caller's [`Par`] says, and the rows' tallies merge in a fixed order:
//! `Par::Seq` and `Par::Rayon` on any number of threads give bit-identical results.
//!
//! Two layers, as in RustFFT and faer:
//! - [`evaluate`] allocates and returns all outputs;
//! - [`evaluate_into`] writes into caller-owned buffers, for trainers that run it every
//!   step. It allocates nothing on the heap, with one bounded exception: a calibrated
//!   CPPO budget gathers each row's divergences in a buffer per thread (8 bytes a
//!   column), and on a binary divergence keeps the row's p and q for the main sweep
//!   (16 bytes a column), each grown once to the longest row that thread has seen and
//!   reused after; [`reserve_scratch`] grows them all up front.
//!
//! Order of work: one count of the whole mask gives N_tok and N_seq, which the
//! aggregation weights need; then, row by row, the row's response count T, a first
//! sweep where the config needs a whole-row quantity (TRM's max or mean divergence,
//! GSPO's and GMPO's sequence ratios, a calibrated δ_b^row), then the fused sweep.
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

use crate::aggregate::Counts;
use crate::batch::Batch;
use crate::config::Config;
use crate::divergence::Divergence;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::kernel::lanes::{RowIn, missing_logp_ref, missing_topk};
use crate::kernel::row_stats::{whole_row_facts, with_probs};
use crate::kernel::{Plan, Prefix, run_row};
use crate::outputs::{Outputs, OutputsMut, RowOut};
pub use crate::rows::Par;
use crate::rows::{batch_counts, run_rows};
use crate::rule::Rule;
use crate::stats::{Diagnostics, Tally};

/// Everything [`evaluate`] computes.
///
/// ```
/// use cppo::{evaluate, Batch, Config, Par, Rule};
/// use cppo::ndarray::array;
/// let lp = array![[-0.5, -0.3], [-0.2, -0.4]];
/// let (adv, mask) = (array![1.0, 3.0], array![[true, false], [true, false]]);
/// let batch = Batch::new(&lp, &lp, &adv, &mask)?;
/// let eval = evaluate(&Config::with_rule(Rule::None), &batch, Par::Seq)?;
/// // ρ = 1 and one token per row: the token-mean loss is −(1 + 3) / 2.
/// assert!((eval.loss + 2.0).abs() < 1e-12);
/// assert_eq!(eval.outputs.grad[[0, 1]], 0.0); // padding
/// assert_eq!((eval.tally.tokens, eval.diagnostics.sequences), (2, 2));
/// # Ok::<(), cppo::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation<F> {
    /// The aggregated loss L.
    pub loss: f64,
    /// The per-token and per-row outputs.
    pub outputs: Outputs<F>,
    /// The diagnostics.
    pub diagnostics: Diagnostics,
    /// The merged tally behind the diagnostics (mergeable across shards).
    pub tally: Tally,
}

/// What [`evaluate_into`] returns besides the buffers it fills.
///
/// ```
/// use cppo::{evaluate_into, Batch, Config, OutputsMut, Par};
/// use cppo::ndarray::{array, Array2};
/// let lp = array![[-0.5, -0.3, -0.2]];
/// let (adv, mask) = (array![2.0], array![[true, true, false]]);
/// let mut grad = Array2::<f64>::zeros((1, 3));
/// let out = OutputsMut { grad: Some(grad.view_mut()), ..OutputsMut::default() };
/// let s = evaluate_into(&Config::cppo(), &Batch::new(&lp, &lp, &adv, &mask)?, out, Par::Seq)?;
/// assert_eq!((s.counts.tokens, s.counts.seqs), (2, 1));
/// assert_eq!(s.diagnostics.loss, s.loss);
/// assert!((grad[[0, 0]] + 1.0).abs() < 1e-12); // ρ = 1: −A / N_tok
/// # Ok::<(), cppo::Error>(())
/// ```
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
///
/// ```
/// use cppo::{evaluate, Batch, Config, Par};
/// use cppo::ndarray::array;
/// let (logp, logp_old) = (array![[-0.2f32, -1.0]], array![[-0.3f32, -1.6]]);
/// let (adv, mask) = (array![1.0f32], array![[true, true]]);
/// let eval = evaluate(&Config::dppo(), &Batch::new(&logp, &logp_old, &adv, &mask)?, Par::Seq)?;
/// assert_eq!(eval.diagnostics.response_tokens, 2);
/// # Ok::<(), cppo::Error>(())
/// ```
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

/// [`evaluate`] into caller-owned buffers. Every element of every given buffer is
/// written; on error their contents are unspecified. Allocates nothing on the heap but
/// the per-thread buffer of a calibrated budget (see the [module docs](self)).
///
/// # Errors
///
/// As [`evaluate`], and a buffer whose shape is not (B, L) (or (B,) for `delta_b_row`).
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
    let row_fn = |i: usize, out: RowOut<'_, F>, _: Option<&mut ()>| {
        // An invalid mask value counts here; the sweep reports it in its place.
        let row_len = batch.mask.row_len_unchecked(i);
        let row = RowIn::new(cfg, batch, i, 0)?;
        with_probs(|probs| {
            let facts = whole_row_facts(cfg, &row, row_len, Some(&mut *probs))?;
            // The main sweep reuses the first sweep's exponentials, where it kept them.
            let kept = probs.filled.then_some(&*probs);
            run_row(&plan, &row, &facts, &mut Prefix::default(), out, kept)
        })
    };
    let tally = run_rows::<F, ()>(batch.shape(), out, None, par, &row_fn)?;
    check_overrides(cfg, counts)?;
    Ok(Summary {
        loss: tally.loss,
        diagnostics: Diagnostics::new(&tally, cfg),
        tally,
        counts,
    })
}

/// Makes [`evaluate_into`] allocation-free from its first call on rows up to `width`
/// columns: grows the per-thread buffers of a calibrated CPPO budget (the row's
/// divergences, 8 bytes a column, and its p and q, 16 bytes a column), on the calling
/// thread and on every thread of the current rayon pool. Optional: without it, each
/// thread grows its buffers the first time it meets a row longer than any before, and
/// keeps them.
///
/// ```
/// cppo::engine::reserve_scratch(8192); // once, at start-up
/// ```
pub fn reserve_scratch(width: usize) {
    crate::kernel::row_stats::reserve_buffers(width);
    rayon::broadcast(|_| crate::kernel::row_stats::reserve_buffers(width));
}

/// The instruction set the engine's per-row pass runs with on this CPU, chosen at run
/// time: `"avx512"` (AVX-512 F, DQ, BW and VL with FMA), `"avx2"` (AVX2 with FMA) or
/// `"baseline"`. Every build performs the same IEEE operations, so the results are the
/// same bits whichever runs; only the speed differs.
///
/// ```
/// let isa = cppo::engine::instruction_set();
/// assert!(["avx512", "avx2", "baseline"].contains(&isa));
/// ```
pub fn instruction_set() -> &'static str {
    crate::simd::isa().name()
}

/// The checks every call makes before its pass: the config, the output shapes, and the
/// arrays the config needs.
pub(crate) fn check_call<F: Float>(
    cfg: &Config,
    batch: &Batch<'_, F>,
    out: &OutputsMut<'_, F>,
) -> Result<()> {
    cfg.validate()?;
    out.check_shapes(batch.shape())?;
    if cfg.divergence.needs_topk() && batch.topk.is_none() {
        return Err(missing_topk(cfg.divergence));
    }
    if cfg.kl.is_some() && batch.logp_ref.is_none() {
        return Err(missing_logp_ref());
    }
    Ok(())
}

/// The trust-region decisions alone, for audits that need no loss of their own: the
/// outputs and diagnostics of [`evaluate`] under `divergence` and `rule`, with the
/// surrogate objective, token-mean and exact numerics (for the f32 exponentials, call
/// [`evaluate`] with a config whose `numerics` is [`Numerics::F32Exp`](crate::Numerics)).
///
/// # Errors
///
/// As [`evaluate`].
///
/// ```
/// use cppo::{trust_region, Batch, Divergence, Par, Rule};
/// use cppo::rule::CppoParams;
/// use cppo::ndarray::array;
/// // The worked example's row, A = +1: the fifth token breaks the token threshold,
/// // the sixth the prefix budget.
/// let p = [0.50f64, 0.90, 0.30, 1.0, 0.60, 0.95];
/// let q = [0.40f64, 0.95, 0.45, 1.0, 0.30, 0.90];
/// let logp = cppo::ndarray::Array2::from_shape_fn((1, 6), |(_, j)| p[j].ln());
/// let logp_old = cppo::ndarray::Array2::from_shape_fn((1, 6), |(_, j)| q[j].ln());
/// let mask = array![[true, true, true, false, true, true]];
/// let adv = array![1.0];
/// let batch = Batch::new(&logp, &logp_old, &adv, &mask).unwrap();
/// let rule = Rule::Cppo(CppoParams {
///     delta: 0.2, delta_b: Some(0.05), calibration: None, ..CppoParams::default()
/// });
/// let m = trust_region(Divergence::BinaryTv, &rule, &batch, Par::Seq).unwrap();
/// assert_eq!(m.outputs.reason, array![[1u8, 1, 1, 0, 3, 4]]);
/// ```
pub fn trust_region<F: Float>(
    divergence: Divergence,
    rule: &Rule,
    batch: &Batch<'_, F>,
    par: Par,
) -> Result<Evaluation<F>> {
    let cfg = Config {
        divergence,
        ..Config::with_rule(*rule)
    };
    evaluate(&cfg, batch, par)
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
