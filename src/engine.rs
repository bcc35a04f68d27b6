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

use ndarray::{Array2, ArrayView1, ArrayViewMut1, ArrayViewMut2, Axis, s};

use crate::aggregate::Counts;
use crate::batch::{Batch, Mask, read_logprob};
use crate::config::Config;
use crate::divergence::{Divergence, binary_kl, binary_tv, topk_kl_pairs, topk_tv_pairs};
use crate::error::{At, Error, Result};
use crate::float::{Float, MaskElem};
use crate::objective::{Objective, ratio};
use crate::rule::{Reason, Rule};
use crate::schedule::linear_weight;
use crate::stats::{Diagnostics, Tally, TokenRecord};

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
    /// The [`Reason`] code of each decision.
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
            divergence: self.divergence.view_mut(),
            weight: self.weight.view_mut(),
            threshold: self.threshold.view_mut(),
            keep: self.keep.view_mut(),
            reason: self.reason.view_mut(),
            token_loss: Some(self.token_loss.view_mut()),
            grad: Some(self.grad.view_mut()),
        }
    }
}

/// Caller-owned output buffers for [`evaluate_into`], each (B, L). `token_loss` and
/// `grad` may be left out when only the mask is wanted.
#[derive(Debug)]
pub struct OutputsMut<'a, F> {
    /// D_t.
    pub divergence: ArrayViewMut2<'a, F>,
    /// w_t.
    pub weight: ArrayViewMut2<'a, F>,
    /// c_t or δ, NaN where the rule has none.
    pub threshold: ArrayViewMut2<'a, F>,
    /// M_t.
    pub keep: ArrayViewMut2<'a, bool>,
    /// Reason codes.
    pub reason: ArrayViewMut2<'a, u8>,
    /// Per-token loss, if wanted.
    pub token_loss: Option<ArrayViewMut2<'a, F>>,
    /// dL/dlogp, if wanted.
    pub grad: Option<ArrayViewMut2<'a, F>>,
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
    cfg.validate()?;
    let shape = batch.shape();
    check_out_shape("divergence", out.divergence.dim(), shape)?;
    check_out_shape("weight", out.weight.dim(), shape)?;
    check_out_shape("threshold", out.threshold.dim(), shape)?;
    check_out_shape("keep", out.keep.dim(), shape)?;
    check_out_shape("reason", out.reason.dim(), shape)?;
    if let Some(v) = &out.token_loss {
        check_out_shape("token_loss", v.dim(), shape)?;
    }
    if let Some(v) = &out.grad {
        check_out_shape("grad", v.dim(), shape)?;
    }
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

    let counts = local_counts(batch, par)?;
    let denominators = Counts {
        tokens: override_count("num_tokens", cfg.num_tokens, counts.tokens)?,
        seqs: override_count("num_seqs", cfg.num_seqs, counts.seqs)?,
    };
    let plan = Plan {
        cfg,
        denominators,
        leaf_rows: leaf_rows(shape),
    };
    let block = Block {
        row0: 0,
        divergence: out.divergence,
        weight: out.weight,
        threshold: out.threshold,
        keep: out.keep,
        reason: out.reason,
        token_loss: out.token_loss,
        grad: out.grad,
    };
    let tally = run_block(&plan, batch, block, par)?;
    Ok(Summary {
        loss: tally.loss,
        diagnostics: Diagnostics::new(&tally, cfg),
        tally,
        counts,
    })
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
            divergence: divergence.view_mut(),
            weight: weight.view_mut(),
            threshold: threshold.view_mut(),
            keep: keep.view_mut(),
            reason: reason.view_mut(),
            token_loss: None,
            grad: None,
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

fn check_out_shape(array: &'static str, got: (usize, usize), want: (usize, usize)) -> Result<()> {
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

fn override_count(field: &'static str, given: Option<u64>, local: u64) -> Result<u64> {
    match given {
        None => Ok(local),
        Some(g) if g >= local => Ok(g),
        Some(g) => Err(Error::CountTooSmall {
            field,
            given: g,
            local,
        }),
    }
}

/// Rows per leaf block: about `LEAF_TOKENS` tokens, from the shape alone, so the merge
/// tree (and with it every float sum) is the same on any number of threads.
const LEAF_TOKENS: usize = 1 << 14;

fn leaf_rows((_, l): (usize, usize)) -> usize {
    (LEAF_TOKENS / l.max(1)).max(1)
}

/// This batch's response tokens and sequences; the first bad mask value in row order.
fn local_counts<F: Float>(batch: &Batch<'_, F>, par: Par) -> Result<Counts> {
    let b = batch.shape().0;
    let row = |i: usize| -> Result<Counts> {
        let t = batch.mask.row_len(i)? as u64;
        Ok(Counts {
            tokens: t,
            seqs: u64::from(t > 0),
        })
    };
    let seq = || {
        (0..b)
            .map(row)
            .try_fold(Counts::default(), |a, c| c.map(|c| a.merge(c)))
    };
    match par {
        Par::Seq => seq(),
        Par::Rayon => {
            use rayon::prelude::*;
            let r = (0..b)
                .into_par_iter()
                .map(row)
                .try_reduce(Counts::default, |a, c| Ok(a.merge(c)));
            // On error, find the first bad value deterministically.
            r.or_else(|_| seq())
        }
    }
}

struct Plan<'c> {
    cfg: &'c Config,
    denominators: Counts,
    leaf_rows: usize,
}

/// A block of consecutive rows of every output, starting at batch row `row0`.
struct Block<'o, F> {
    row0: usize,
    divergence: ArrayViewMut2<'o, F>,
    weight: ArrayViewMut2<'o, F>,
    threshold: ArrayViewMut2<'o, F>,
    keep: ArrayViewMut2<'o, bool>,
    reason: ArrayViewMut2<'o, u8>,
    token_loss: Option<ArrayViewMut2<'o, F>>,
    grad: Option<ArrayViewMut2<'o, F>>,
}

impl<'o, F> Block<'o, F> {
    fn rows(&self) -> usize {
        self.reason.nrows()
    }

    fn split(self, mid: usize) -> (Self, Self) {
        let (d0, d1) = self.divergence.split_at(Axis(0), mid);
        let (w0, w1) = self.weight.split_at(Axis(0), mid);
        let (t0, t1) = self.threshold.split_at(Axis(0), mid);
        let (k0, k1) = self.keep.split_at(Axis(0), mid);
        let (r0, r1) = self.reason.split_at(Axis(0), mid);
        let (l0, l1) = split_opt(self.token_loss, mid);
        let (g0, g1) = split_opt(self.grad, mid);
        (
            Block {
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

    fn row(&mut self, r: usize) -> RowOut<'_, F> {
        RowOut {
            divergence: self.divergence.row_mut(r),
            weight: self.weight.row_mut(r),
            threshold: self.threshold.row_mut(r),
            keep: self.keep.row_mut(r),
            reason: self.reason.row_mut(r),
            token_loss: self.token_loss.as_mut().map(|v| v.row_mut(r)),
            grad: self.grad.as_mut().map(|v| v.row_mut(r)),
        }
    }
}

type SplitOpt<'o, F> = (Option<ArrayViewMut2<'o, F>>, Option<ArrayViewMut2<'o, F>>);

fn split_opt<F>(v: Option<ArrayViewMut2<'_, F>>, mid: usize) -> SplitOpt<'_, F> {
    match v {
        Some(v) => {
            let (a, b) = v.split_at(Axis(0), mid);
            (Some(a), Some(b))
        }
        None => (None, None),
    }
}

fn run_block<F: Float>(
    plan: &Plan<'_>,
    batch: &Batch<'_, F>,
    mut block: Block<'_, F>,
    par: Par,
) -> Result<Tally> {
    let n = block.rows();
    if n <= plan.leaf_rows {
        let mut tally = Tally::default();
        for r in 0..n {
            let i = block.row0 + r;
            let out = block.row(r);
            let row_tally = match &batch.mask {
                Mask::Bool(m) => run_row(plan, batch, m.row(i), i, out),
                Mask::U8(m) => run_row(plan, batch, m.row(i), i, out),
                Mask::F32(m) => run_row(plan, batch, m.row(i), i, out),
                Mask::F64(m) => run_row(plan, batch, m.row(i), i, out),
            }?;
            tally = tally.merge(&row_tally);
        }
        return Ok(tally);
    }
    let (left, right) = block.split(n / 2);
    let (l, r) = match par {
        Par::Seq => (
            run_block(plan, batch, left, par),
            run_block(plan, batch, right, par),
        ),
        Par::Rayon => rayon::join(
            || run_block(plan, batch, left, par),
            || run_block(plan, batch, right, par),
        ),
    };
    // The left error first: the lowest row wins, whatever ran first.
    Ok(l?.merge(&r?))
}

/// One row of every output.
struct RowOut<'r, F> {
    divergence: ArrayViewMut1<'r, F>,
    weight: ArrayViewMut1<'r, F>,
    threshold: ArrayViewMut1<'r, F>,
    keep: ArrayViewMut1<'r, bool>,
    reason: ArrayViewMut1<'r, u8>,
    token_loss: Option<ArrayViewMut1<'r, F>>,
    grad: Option<ArrayViewMut1<'r, F>>,
}

impl<F: Float> RowOut<'_, F> {
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn write(&mut self, j: usize, d: f64, w: f64, c: f64, reason: Reason, l: f64, g: f64) {
        self.divergence[j] = F::from_f64(d);
        self.weight[j] = F::from_f64(w);
        self.threshold[j] = F::from_f64(c);
        self.keep[j] = reason.is_kept();
        self.reason[j] = reason.code();
        if let Some(v) = &mut self.token_loss {
            v[j] = F::from_f64(l);
        }
        if let Some(v) = &mut self.grad {
            v[j] = F::from_f64(g);
        }
    }
}

/// The divergence of response token (i, j), with its checked log-probs.
#[inline(always)]
fn token_divergence<F: Float>(
    div: Divergence,
    batch: &Batch<'_, F>,
    i: usize,
    j: usize,
) -> Result<(f64, f64, f64)> {
    let lp = batch.read_logp(i, j)?;
    let lq = batch.read_logp_old(i, j)?;
    let d = match div {
        Divergence::BinaryTv => binary_tv(lp, lq),
        Divergence::BinaryKl => binary_kl(lp, lq),
        Divergence::TopkTv | Divergence::TopkKl => {
            // Presence was checked before the pass.
            let Some(topk) = batch.topk.as_ref() else {
                unreachable!("top-K arrays checked before the pass")
            };
            let old = topk.logp_old.slice(s![i, j, ..]);
            let new = topk.logp.slice(s![i, j, ..]);
            for (k, (&a, &b)) in old.iter().zip(new.iter()).enumerate() {
                read_logprob(a, "topk_logp_old", At::with_k(i, j, k))?;
                read_logprob(b, "topk_logp", At::with_k(i, j, k))?;
            }
            // Checked above: finite and at most 1e-4, so min(0) is the (0, 1e-4] → 0 rule.
            let pairs = old
                .iter()
                .zip(new.iter())
                .map(|(&a, &b)| (a.to_f64().min(0.0), b.to_f64().min(0.0)));
            if div == Divergence::TopkTv {
                topk_tv_pairs(pairs)
            } else {
                topk_kl_pairs(pairs)
            }
        }
    };
    Ok((lp, lq, d))
}

/// The outcome of a rule's test on one token, before the corrective bypass.
#[derive(Clone, Copy)]
enum Verdict {
    Pass,
    Fail(Reason),
}

fn run_row<F: Float, M: MaskElem>(
    plan: &Plan<'_>,
    batch: &Batch<'_, F>,
    mask: ArrayView1<'_, M>,
    i: usize,
    mut out: RowOut<'_, F>,
) -> Result<Tally> {
    let cfg = plan.cfg;
    let mut tally = Tally::default();
    // The mask was checked by the count before the pass.
    let row_len = mask.iter().filter(|m| m.is_on()).count();
    if row_len == 0 {
        for j in 0..mask.len() {
            out.write(j, 0.0, 0.0, 0.0, Reason::NotResponse, 0.0, 0.0);
        }
        return Ok(tally);
    }
    tally.seqs = 1;
    let agg_w = cfg
        .aggregation
        .weight(plan.denominators, row_len, mask.len(), cfg.norm_length);

    // TRM decides the whole row from its max or mean divergence.
    let row_ok = match cfg.rule {
        Rule::TrmMax { delta } | Rule::TrmAvg { delta } => {
            let (mut max, mut sum) = (0.0f64, 0.0f64);
            for (j, m) in mask.iter().enumerate() {
                if m.is_on() {
                    let (_, _, d) = token_divergence(cfg.divergence, batch, i, j)?;
                    max = max.max(d);
                    sum += d;
                }
            }
            let stat = if matches!(cfg.rule, Rule::TrmMax { .. }) {
                max
            } else {
                sum / row_len as f64
            };
            stat <= delta
        }
        _ => true,
    };
    let trm = cfg.rule.is_sequence_level();
    let objective: Objective = cfg.objective;
    let (mut t, mut s_sum, mut w_sum) = (0usize, 0.0f64, 0.0f64);
    let mut row_loss = 0.0f64;

    for (j, m) in mask.iter().enumerate() {
        if !m.is_on() {
            out.write(j, 0.0, 0.0, 0.0, Reason::NotResponse, 0.0, 0.0);
            continue;
        }
        t += 1;
        let (lp, lq, d) = token_divergence(cfg.divergence, batch, i, j)?;
        let adv = batch.read_adv(i, j)?;
        let (rho, log_ratio) = ratio(lp, lq);
        let away = adv * (rho - 1.0) > 0.0;

        let (w, c, verdict) = match cfg.rule {
            Rule::None => (1.0, f64::NAN, Verdict::Pass),
            Rule::Ratio { eps_low, eps_high } => {
                let ok = rho >= 1.0 - eps_low && rho <= 1.0 + eps_high;
                (1.0, f64::NAN, pass_if(ok, Reason::TokenThreshold))
            }
            Rule::Dppo { delta } => (1.0, delta, pass_if(d <= delta, Reason::TokenThreshold)),
            Rule::Cppo {
                delta,
                delta_b,
                w_min,
                horizon,
            } => {
                let w = linear_weight(w_min, t, horizon.unwrap_or(row_len), horizon.is_some());
                let wd = w * d;
                let (s_prev, w_prev) = (s_sum, w_sum);
                s_sum += wd;
                w_sum += w;
                match delta_b {
                    None => (w, delta, pass_if(wd <= delta, Reason::TokenThreshold)),
                    Some(db) => {
                        let room = delta + db * w_prev;
                        let c = delta.min(room - s_prev);
                        let v = if wd > delta {
                            Verdict::Fail(Reason::TokenThreshold)
                        } else if s_sum > room {
                            Verdict::Fail(Reason::PrefixBudget)
                        } else {
                            Verdict::Pass
                        };
                        (w, c, v)
                    }
                }
            }
            Rule::TrmMax { delta } | Rule::TrmAvg { delta } => {
                (1.0, delta, pass_if(row_ok, Reason::TokenThreshold))
            }
        };
        let reason = match verdict {
            Verdict::Pass => Reason::Feasible,
            Verdict::Fail(_) if !away && !trm => Reason::Corrective,
            Verdict::Fail(r) => r,
        };
        let keep = reason.is_kept();

        let term = objective.eval(rho, adv, lp);
        let (mut l, mut g) = if keep {
            (term.loss, term.grad)
        } else {
            (0.0, 0.0)
        };
        if let (Some(kl), Some(r)) = (&cfg.kl, &batch.logp_ref) {
            let lr = read_logprob(r[[i, j]], "logp_ref", At::new(i, j))?;
            let (lk, gk) = kl.eval(lp, lr);
            l += lk;
            g += gk;
        }
        row_loss += l;
        out.write(j, d, w, c, reason, l, g * agg_w);
        tally.record(&TokenRecord {
            reason,
            adv,
            divergence: d,
            log_ratio,
            ratio: rho,
            threshold: c,
            clipped: term.clipped,
            decile: (t - 1) * 10 / row_len,
        });
    }
    tally.loss = row_loss * agg_w;
    Ok(tally)
}

#[inline(always)]
fn pass_if(ok: bool, fail: Reason) -> Verdict {
    if ok {
        Verdict::Pass
    } else {
        Verdict::Fail(fail)
    }
}
