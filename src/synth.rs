//! Realistic synthetic batches for demos, examples and benchmarks (feature `synth`).
//!
//! [`SyntheticBatch::generate`] draws one GRPO-style training batch, deterministically
//! from [`SynthSpec::seed`]. It models what a trainer hands to the loss, not a language
//! model:
//!
//! - **Layout.** Each row is one response, left-aligned and padded on the right to `len`
//!   columns. Response lengths are ragged: log-normal, scaled so that the batch holds
//!   exactly `round(response_frac · rows · len)` response tokens, and truncated at
//!   `len` (at 90% many rows run to the end, as generations that hit the length limit
//!   do). About a quarter of the rows that end early are multi-turn: one to three tool
//!   outputs sit inside the response as holes in the mask.
//! - **Padding is hostile.** Padding columns hold NaN, ±∞, 0, positive "log-probs" and
//!   huge values; tool-output holes hold plausible log-probs; the top-K arrays hold NaN
//!   at every non-response slot. A correct consumer never reads any of it.
//! - **Token confidence.** Most sampled tokens are confident (q = μ(y_t) close to 1),
//!   a row-dependent share (about a quarter on average) are uncertain (q uniform in
//!   [0.02, 0.98]), and 1% come from the tail (q between e⁻¹² and e⁻⁴). A few confident
//!   tokens carry a log-prob of exactly 0 or a tiny positive value (≤ 1e-4), as bf16
//!   rounding produces.
//! - **Off-policy drift.** The current policy's logit of the sampled token is the
//!   rollout's plus Gaussian noise, logit(p) = logit(q) + σ_t (z + b). The scale σ_t falls
//!   from about 1 at the start of the response to about 0.25 at its end (relative
//!   position x = (t − 1)/T, σ_t = s_row (0.25 + 0.75 e^(−x/0.15))): divergence is
//!   larger on early tokens, the asymmetry the CPPO paper reports and its position
//!   weights are built for. s_row = `drift` × a log-normal
//!   row factor (some rollouts are staler than others), and b = 0.3 · clamp(A, −2, 2)
//!   leans the policy toward its advantage, as a few optimiser steps do. In probability
//!   space the noise barely moves confident tokens and moves uncertain ones a lot.
//! - **Advantages.** GRPO outcome advantages, one per row: rows form groups of
//!   `group_size`, each group has a success rate drawn from Beta(½, ½), rewards are 0/1,
//!   and A = (r − mean) / (std + 1e-6) with the unbiased std of the group. Groups whose
//!   rewards all agree get A = 0 exactly; a group of one gets A = r.
//! - **Top-K pair** (`topk: Some(K)`). The rollout's K largest probabilities, sorted,
//!   with total mass ≤ 1: the head is q when q ≥ ½ (the sampled token is the argmax),
//!   otherwise the larger of q and a uniform draw in [0.25, 0.7]; the others decay
//!   geometrically (each takes a quarter to three quarters of the mass left, and never
//!   more than the one before), leaving a small rest. The current policy's
//!   log-probs of the same K tokens perturb every logit, and the remaining mass, by the
//!   same σ_t and renormalise, so they also sum to at most 1.
//! - **Reference policy** (`with_ref`). logit(π_ref) = logit(q) + 0.5 z: the starting
//!   policy, a constant distance from the rollout policy.
//!
//! The generator uses separate random streams for the layout and advantages, the
//! token log-probs, the top-K pair, the reference and the padding, all derived from the
//! seed: turning `topk` or `with_ref` on adds arrays without changing the others.
//!
//! ```
//! use cppo::synth::{SynthSpec, SyntheticBatch};
//! use cppo::{evaluate, Config, Divergence, Par};
//!
//! let spec = SynthSpec { rows: 8, len: 128, topk: Some(4), ..SynthSpec::default() };
//! let data = SyntheticBatch::<f32>::generate(&spec);
//! let batch = data.batch()?;
//! batch.validate()?; // garbage sits only where the mask is off
//!
//! let cfg = Config { divergence: Divergence::TopkTv, ..Config::cppo() };
//! let eval = evaluate(&cfg, &batch, Par::Seq)?;
//! let n = data.mask.iter().filter(|&&m| m).count();
//! assert_eq!(eval.diagnostics.response_tokens as usize, n);
//! assert_eq!(n, (0.9f64 * 8.0 * 128.0).round() as usize); // response_frac, exactly
//! # Ok::<(), cppo::Error>(())
//! ```

use ndarray::{Array1, Array2, Array3};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Beta, Distribution, Exp, LogNormal, StandardNormal};

use crate::batch::Batch;
use crate::error::Result;
use crate::float::Float;

/// What to generate. Every field has a default; build with `..SynthSpec::default()`.
///
/// ```
/// use cppo::synth::{SynthSpec, SyntheticBatch};
/// let spec = SynthSpec { rows: 3, len: 10, response_frac: 0.5, ..SynthSpec::default() };
/// let data = SyntheticBatch::<f32>::generate(&spec);
/// assert_eq!(data.logp.dim(), (3, 10));
/// assert_eq!(data.mask.iter().filter(|&&m| m).count(), 15); // half of the 30 slots
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SynthSpec {
    /// B: rows (sequences). Default 16.
    pub rows: usize,
    /// L: padded width in tokens. Default 256.
    pub len: usize,
    /// The fraction of all B·L slots that are response tokens, in [0, 1] (clamped).
    /// Default 0.9.
    pub response_frac: f64,
    /// K of the top-K pair, or `None` for no top-K arrays. Default `None`.
    pub topk: Option<usize>,
    /// Whether to generate `logp_ref`. Default `false`.
    pub with_ref: bool,
    /// The seed of every random draw. Default 0.
    pub seed: u64,
    /// Rows per GRPO group (at least 1; the last group may be smaller). Default 8.
    pub group_size: usize,
    /// Scale of the off-policy drift between the rollout and current policies (≥ 0;
    /// 0 makes them equal). Default 1.
    pub drift: f64,
}

impl Default for SynthSpec {
    /// 16 rows × 256 columns, 90% response tokens, no top-K, no reference, seed 0,
    /// groups of 8, drift 1.
    fn default() -> Self {
        Self {
            rows: 16,
            len: 256,
            response_frac: 0.9,
            topk: None,
            with_ref: false,
            seed: 0,
            group_size: 8,
            drift: 1.0,
        }
    }
}

/// A generated batch, owning its arrays; [`SyntheticBatch::batch`] borrows them as a
/// [`Batch`]. Field names and shapes are those of [`Batch`]'s inputs.
///
/// ```
/// use cppo::synth::{SynthSpec, SyntheticBatch};
/// let spec = SynthSpec { rows: 4, len: 32, topk: Some(3), ..SynthSpec::default() };
/// let data = SyntheticBatch::<f64>::generate(&spec);
/// assert_eq!(data.advantages.len(), 4);
/// assert!(data.logp_ref.is_none()); // with_ref is off
/// assert_eq!(data.batch()?.topk_width(), Some(3));
/// # Ok::<(), cppo::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct SyntheticBatch<F> {
    /// (B, L): the current policy's log-probs of the sampled tokens.
    pub logp: Array2<F>,
    /// (B, L): the rollout policy's log-probs of the sampled tokens.
    pub logp_old: Array2<F>,
    /// (B,): one GRPO advantage per row.
    pub advantages: Array1<F>,
    /// (B, L): the response mask.
    pub mask: Array2<bool>,
    /// (B, L, K): the rollout policy's top-K log-probs, sorted descending, if asked for.
    pub topk_logp_old: Option<Array3<F>>,
    /// (B, L, K): the current policy's log-probs of those tokens, if asked for.
    pub topk_logp: Option<Array3<F>>,
    /// (B, L): the reference policy's log-probs, if asked for.
    pub logp_ref: Option<Array2<F>>,
}

/// Values trainers leave in padding: none of them may be read.
const GARBAGE: [f64; 8] = [
    f64::NAN,
    f64::NEG_INFINITY,
    f64::INFINITY,
    0.0,
    1.0e4,
    -1.0e30,
    7.5,
    f64::NAN,
];

/// Drift scale at the end of a response, relative to `drift`.
const SIGMA_LATE: f64 = 0.25;
/// Drift scale at the start of a response, relative to `drift`.
const SIGMA_EARLY: f64 = 1.0;
/// Relative position over which the early excess decays by e.
const EARLY_SCALE: f64 = 0.15;
/// The lean toward the advantage, in units of σ_t per unit of A.
const ADV_LEAN: f64 = 0.3;
/// Share of rows with tool outputs (holes in the mask).
const TOOL_ROW_FRAC: f64 = 0.25;
/// Share of tail tokens.
const TAIL_FRAC: f64 = 0.01;
/// Share of confident tokens stored as bf16 rounds them (log-prob 0 or just above).
const BF16_FRAC: f64 = 0.003;
/// Mean of −log q for confident tokens.
const CONFIDENT_NLL: f64 = 0.004;
/// Logit noise of the reference policy.
const REF_SIGMA: f64 = 0.5;

/// Slot kinds of one row.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Pad,
    Response,
    Hole,
}

impl<F: Float> SyntheticBatch<F> {
    /// Draws a batch as the [module docs](self) describe, deterministically from
    /// `spec.seed`. Takes well under a second for 64 × 8192 in release builds
    /// (more with a large top-K).
    ///
    /// ```
    /// use cppo::synth::{SynthSpec, SyntheticBatch};
    /// let spec = SynthSpec { rows: 4, len: 64, with_ref: true, ..SynthSpec::default() };
    /// let a = SyntheticBatch::<f64>::generate(&spec);
    /// let b = SyntheticBatch::<f64>::generate(&spec);
    /// assert_eq!(a.mask, b.mask); // same seed, same batch
    /// assert_eq!(a.logp_ref.unwrap().dim(), (4, 64));
    /// ```
    pub fn generate(spec: &SynthSpec) -> Self {
        let (b, l) = (spec.rows, spec.len);
        let mut master = StdRng::seed_from_u64(spec.seed);
        let mut stream = || StdRng::seed_from_u64(master.random::<u64>());
        let (mut layout_rng, mut tok_rng, mut topk_rng, mut ref_rng, mut pad_rng) =
            (stream(), stream(), stream(), stream(), stream());

        let lengths = response_lengths(b, l, spec.response_frac, &mut layout_rng);
        let adv = grpo_advantages(b, spec.group_size.max(1), &mut layout_rng);
        let holes: Vec<Vec<(usize, usize)>> = lengths
            .iter()
            .map(|&r| tool_holes(r, l, &mut layout_rng))
            .collect();

        let k = spec.topk.unwrap_or(0);
        // Written straight in F: no f64 copies of the batch-sized arrays.
        let f = F::from_f64;
        let mut logp = vec![F::default(); b * l];
        let mut logp_old = vec![F::default(); b * l];
        let mut mask = vec![false; b * l];
        let mut tk_old = vec![f(f64::NAN); b * l * k];
        let mut tk_new = vec![f(f64::NAN); b * l * k];
        let mut lref = spec.with_ref.then(|| vec![F::default(); b * l]);

        let unc_share = Beta::new(2.0, 6.0).expect("valid Beta");
        let staleness = LogNormal::new(0.0, 0.5).expect("valid LogNormal");
        let confident = Exp::new(1.0 / CONFIDENT_NLL).expect("valid Exp");
        let hole_nll = Exp::new(1.0).expect("valid Exp");
        let drift = if spec.drift.is_finite() {
            spec.drift.max(0.0)
        } else {
            1.0
        };
        let mut slots = vec![Slot::Pad; l];
        let mut topk_row = TopkScratch::new(k);

        for i in 0..b {
            let t_row = lengths[i];
            row_layout(&mut slots, t_row, &holes[i]);
            let unc = unc_share.sample(&mut tok_rng);
            let s_row = drift * staleness.sample(&mut tok_rng);
            let lean = ADV_LEAN * adv[i].clamp(-2.0, 2.0);
            let mut t = 0usize;
            for (j, &slot) in slots.iter().enumerate() {
                let at = i * l + j;
                match slot {
                    Slot::Pad => {
                        logp[at] = f(GARBAGE[pad_rng.random_range(0..GARBAGE.len())]);
                        logp_old[at] = f(GARBAGE[pad_rng.random_range(0..GARBAGE.len())]);
                        if let Some(r) = lref.as_mut() {
                            r[at] = f(GARBAGE[ref_rng.random_range(0..GARBAGE.len())]);
                        }
                    }
                    Slot::Hole => {
                        // A tool output: scored by the model, but not trained on.
                        logp_old[at] = f(-hole_nll.sample(&mut tok_rng));
                        logp[at] = f(-hole_nll.sample(&mut tok_rng));
                        if let Some(r) = lref.as_mut() {
                            r[at] = f(-hole_nll.sample(&mut ref_rng));
                        }
                    }
                    Slot::Response => {
                        mask[at] = true;
                        let x = t as f64 / t_row as f64;
                        t += 1;
                        let sigma = s_row
                            * (SIGMA_LATE + (SIGMA_EARLY - SIGMA_LATE) * (-x / EARLY_SCALE).exp());
                        let u: f64 = tok_rng.random();
                        let (lq, is_confident) = if u < TAIL_FRAC {
                            (-tok_rng.random_range(4.0..12.0), false)
                        } else if u < TAIL_FRAC + unc {
                            (tok_rng.random_range(0.02f64..0.98).ln(), false)
                        } else {
                            (-confident.sample(&mut tok_rng).max(1e-12), true)
                        };
                        let z: f64 = tok_rng.sample(StandardNormal);
                        let logit_q = logit_of_log(lq);
                        let mut lp = log_sigmoid(logit_q + sigma * (z + lean));
                        let mut lq_stored = lq;
                        if is_confident && tok_rng.random::<f64>() < BF16_FRAC {
                            // bf16 rounding of a probability of (almost) 1.
                            lq_stored = 0.0;
                            lp = if tok_rng.random::<bool>() {
                                0.0
                            } else {
                                3.0e-5
                            };
                        }
                        logp_old[at] = f(lq_stored);
                        logp[at] = f(lp);
                        if let Some(r) = lref.as_mut() {
                            let zr: f64 = ref_rng.sample(StandardNormal);
                            r[at] = f(log_sigmoid(logit_q + REF_SIGMA * zr));
                        }
                        if k > 0 {
                            topk_row.draw(lq.exp(), sigma, &mut topk_rng);
                            for (d, &x) in
                                tk_old[at * k..(at + 1) * k].iter_mut().zip(&topk_row.old)
                            {
                                *d = f(x);
                            }
                            for (d, &x) in
                                tk_new[at * k..(at + 1) * k].iter_mut().zip(&topk_row.new)
                            {
                                *d = f(x);
                            }
                        }
                    }
                }
            }
        }

        let to2 = |v: Vec<F>| Array2::from_shape_vec((b, l), v).expect("B·L values");
        let to3 = |v: Vec<F>| Array3::from_shape_vec((b, l, k), v).expect("B·L·K values");
        Self {
            logp: to2(logp),
            logp_old: to2(logp_old),
            advantages: adv.into_iter().map(F::from_f64).collect(),
            mask: Array2::from_shape_vec((b, l), mask).expect("B·L values"),
            topk_logp_old: spec.topk.map(|_| to3(tk_old)),
            topk_logp: spec.topk.map(|_| to3(tk_new)),
            logp_ref: lref.map(to2),
        }
    }

    /// Borrows the arrays as a shape-checked [`Batch`], with the top-K pair and the
    /// reference log-probs when they were generated.
    ///
    /// # Errors
    ///
    /// A shape mismatch, which would be a bug here (for example `topk: Some(0)`, since
    /// K must be at least 1).
    ///
    /// ```
    /// use cppo::synth::{SynthSpec, SyntheticBatch};
    /// let data = SyntheticBatch::<f32>::generate(&SynthSpec::default());
    /// let batch = data.batch().unwrap();
    /// assert_eq!(batch.shape(), (16, 256));
    /// assert_eq!(batch.topk_width(), None);
    /// ```
    pub fn batch(&self) -> Result<Batch<'_, F>> {
        let mut batch = Batch::new(&self.logp, &self.logp_old, &self.advantages, &self.mask)?;
        if let (Some(old), Some(new)) = (&self.topk_logp_old, &self.topk_logp) {
            batch = batch.with_topk(old, new)?;
        }
        if let Some(r) = &self.logp_ref {
            batch = batch.with_logp_ref(r)?;
        }
        Ok(batch)
    }
}

/// log σ(x), stable for either sign.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// logit(q) from log q < 0.
fn logit_of_log(lq: f64) -> f64 {
    lq - (-lq.exp_m1()).ln()
}

/// Ragged response lengths summing to round(frac · B · L): log-normal "natural" lengths,
/// scaled by bisection and truncated at L (water-filling), and the rounding remainder
/// spread one token at a time. Every row gets at least one token when there are enough tokens.
fn response_lengths(rows: usize, len: usize, frac: f64, rng: &mut StdRng) -> Vec<usize> {
    let slots = rows * len;
    let frac = if frac.is_nan() {
        0.0
    } else {
        frac.clamp(0.0, 1.0)
    };
    let total = ((frac * slots as f64).round() as usize).min(slots);
    if total == 0 {
        return vec![0; rows];
    }
    let lo = usize::from(total >= rows);
    let natural = LogNormal::<f64>::new(0.0, 0.6).expect("valid LogNormal");
    let x: Vec<f64> = (0..rows).map(|_| natural.sample(rng).max(1e-6)).collect();
    let lens_at = |c: f64| {
        x.iter()
            .map(move |&xi| ((c * xi * len as f64).floor() as usize).clamp(lo, len))
    };
    let x_min = x.iter().copied().fold(1.0f64, f64::min);
    let (mut a, mut z) = (0.0f64, 1.0 / x_min + 1.0);
    for _ in 0..80 {
        let mid = 0.5 * (a + z);
        if lens_at(mid).sum::<usize>() <= total {
            a = mid;
        } else {
            z = mid;
        }
    }
    let mut lens: Vec<usize> = lens_at(a).collect();
    let mut short = total - lens.iter().sum::<usize>();
    let mut i = rng.random_range(0..rows);
    while short > 0 {
        if lens[i] < len {
            lens[i] += 1;
            short -= 1;
        }
        i = (i + 1) % rows;
    }
    lens
}

/// Tool outputs of one row of `r` response tokens: (response index before which the
/// hole sits, hole length), sorted, using only the row's free columns.
fn tool_holes(r: usize, len: usize, rng: &mut StdRng) -> Vec<(usize, usize)> {
    let room = len - r;
    if r < 8 || room == 0 || rng.random::<f64>() >= TOOL_ROW_FRAC {
        return Vec::new();
    }
    let n = rng.random_range(1..=3usize).min(room);
    let want = (r as f64 * rng.random_range(0.02..0.15)).round() as usize;
    let total = want.max(n).min(room);
    let mut prev = 0;
    (1..=n)
        .map(|k| {
            let f = (k as f64 + rng.random_range(-0.3..0.3)) / (n + 1) as f64;
            let pos = ((r as f64 * f) as usize).max(prev + 1).min(r - 1);
            prev = pos;
            let size = total / n + usize::from(k <= total % n);
            (pos, size)
        })
        .collect()
}

/// Fills `slots` with one row's layout: response tokens from column 0, holes inserted
/// before the given response indices, padding after.
fn row_layout(slots: &mut [Slot], r: usize, holes: &[(usize, usize)]) {
    slots.fill(Slot::Pad);
    let mut col = 0;
    let mut next = holes.iter().peekable();
    for idx in 0..r {
        if let Some(&&(pos, size)) = next.peek()
            && pos == idx
        {
            slots[col..col + size].fill(Slot::Hole);
            col += size;
            next.next();
        }
        slots[col] = Slot::Response;
        col += 1;
    }
}

/// GRPO advantages: per group, a success rate from Beta(½, ½), 0/1 rewards, and
/// (r − mean) / (std + 1e-6) with the unbiased std; A = r for a group of one.
fn grpo_advantages(rows: usize, group: usize, rng: &mut StdRng) -> Vec<f64> {
    let rate = Beta::new(0.5, 0.5).expect("valid Beta");
    let mut adv = Vec::with_capacity(rows);
    let mut start = 0;
    while start < rows {
        let n = group.min(rows - start);
        let p: f64 = rate.sample(rng);
        let rewards: Vec<f64> = (0..n)
            .map(|_| f64::from(u8::from(rng.random::<f64>() < p)))
            .collect();
        if n == 1 {
            adv.push(rewards[0]);
        } else {
            let mean = rewards.iter().sum::<f64>() / n as f64;
            let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            let std = var.sqrt();
            adv.extend(rewards.iter().map(|r| (r - mean) / (std + 1e-6)));
        }
        start += n;
    }
    adv
}

/// One position's top-K pair, reused across positions.
struct TopkScratch {
    old: Vec<f64>,
    new: Vec<f64>,
}

impl TopkScratch {
    fn new(k: usize) -> Self {
        Self {
            old: vec![0.0; k],
            new: vec![0.0; k],
        }
    }

    /// Draws the rollout's sorted top-K log-probs around a sampled-token probability
    /// `q`, and the current policy's log-probs of the same tokens with logit noise
    /// `sigma`, renormalised with the rest bucket so both sum to at most 1.
    fn draw(&mut self, q: f64, sigma: f64, rng: &mut StdRng) {
        let head = if q >= 0.5 {
            q
        } else {
            q.max(rng.random_range(0.25..0.7))
        };
        let mut rest = 1.0 - head;
        let mut prev = head;
        self.old[0] = head.ln();
        for v in &mut self.old[1..] {
            let p = prev.min(rest * rng.random_range(0.25..0.75));
            rest -= p;
            prev = p;
            *v = p.ln();
        }
        // Perturb the K logits and the rest bucket alike, then renormalise.
        let mut norm = rest.max(0.0) * (sigma * rng.sample::<f64, _>(StandardNormal)).exp();
        for (n, &o) in self.new.iter_mut().zip(&self.old) {
            *n = o + sigma * rng.sample::<f64, _>(StandardNormal);
            norm += n.exp();
        }
        let log_norm = norm.ln();
        for n in &mut self.new {
            *n = (*n - log_norm).min(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Divergence, Par, evaluate};

    fn response_frac<F: Float>(d: &SyntheticBatch<F>) -> f64 {
        d.mask.iter().filter(|&&m| m).count() as f64 / d.mask.len() as f64
    }

    #[test]
    fn response_fraction_is_as_asked() {
        for (rows, len, frac) in [
            (16, 256, 0.9),
            (64, 512, 0.5),
            (3, 1000, 0.25),
            (8, 64, 1.0),
            (8, 64, 0.0),
            (1, 1, 1.0),
            (0, 16, 0.9),
            (16, 0, 0.9),
        ] {
            let spec = SynthSpec {
                rows,
                len,
                response_frac: frac,
                ..SynthSpec::default()
            };
            let d = SyntheticBatch::<f32>::generate(&spec);
            let n = d.mask.iter().filter(|&&m| m).count();
            assert_eq!(n, (frac * (rows * len) as f64).round() as usize, "{spec:?}");
            if rows * len > 0 {
                assert!((response_frac(&d) - frac).abs() < 1e-3);
            }
        }
    }

    #[test]
    fn lengths_are_ragged_with_holes_and_hostile_padding() {
        let spec = SynthSpec {
            rows: 64,
            len: 512,
            ..SynthSpec::default()
        };
        let d = SyntheticBatch::<f64>::generate(&spec);
        let lens: Vec<usize> = d
            .mask
            .rows()
            .into_iter()
            .map(|r| r.iter().filter(|&&m| m).count())
            .collect();
        assert!(lens.contains(&512), "some rows run to the end: {lens:?}");
        assert!(lens.iter().any(|&n| n < 400), "some rows stop early");
        let with_holes = d
            .mask
            .rows()
            .into_iter()
            .filter(|r| {
                let last = r.iter().rposition(|&m| m).unwrap_or(0);
                r.iter().take(last).any(|&m| !m)
            })
            .count();
        assert!(
            with_holes > 0 && with_holes < 64,
            "{with_holes} rows with holes"
        );
        let pad = || d.logp.iter().zip(&d.mask).filter(|(_, m)| !**m);
        assert!(pad().any(|(x, _)| x.is_nan()));
        assert!(pad().any(|(x, _)| *x == f64::NEG_INFINITY));
        assert!(pad().any(|(x, _)| *x > 0.0));
        // Response log-probs: finite, at most 1e-4, confident and uncertain ones.
        let resp: Vec<f64> = d
            .logp_old
            .iter()
            .zip(&d.mask)
            .filter(|(_, m)| **m)
            .map(|(x, _)| *x)
            .collect();
        assert!(resp.iter().all(|x| x.is_finite() && *x <= 1e-4));
        let confident = resp.iter().filter(|x| x.exp() > 0.98).count() as f64;
        let uncertain = resp.iter().filter(|x| x.exp() < 0.9).count() as f64;
        let n = resp.len() as f64;
        assert!(
            confident / n > 0.5 && uncertain / n > 0.1,
            "{confident} {uncertain} {n}"
        );
    }

    #[test]
    fn drift_is_larger_early() {
        let spec = SynthSpec {
            rows: 64,
            len: 1024,
            seed: 7,
            ..SynthSpec::default()
        };
        let d = SyntheticBatch::<f64>::generate(&spec);
        let (mut sum, mut cnt) = ([0.0f64; 10], [0usize; 10]);
        for i in 0..spec.rows {
            let t_row = d.mask.row(i).iter().filter(|&&m| m).count();
            let mut t = 0;
            for j in 0..spec.len {
                if d.mask[[i, j]] {
                    let tv = (d.logp[[i, j]].exp() - d.logp_old[[i, j]].exp()).abs();
                    let k = t * 10 / t_row;
                    sum[k] += tv;
                    cnt[k] += 1;
                    t += 1;
                }
            }
        }
        let mean: Vec<f64> = (0..10).map(|k| sum[k] / cnt[k] as f64).collect();
        assert!(mean[0] > 1.8 * mean[9], "{mean:?}");
        assert!(mean[0] > mean[2] && mean[2] > mean[9], "{mean:?}");
    }

    #[test]
    fn advantages_are_grpo_groups() {
        let spec = SynthSpec {
            rows: 512,
            len: 8,
            ..SynthSpec::default()
        };
        let d = SyntheticBatch::<f64>::generate(&spec);
        let a = &d.advantages;
        for g in a.as_slice().unwrap().chunks(8) {
            assert!(g.iter().sum::<f64>().abs() < 1e-9, "{g:?}");
        }
        assert!(a.iter().any(|&x| x == 0.0));
        assert!(a.iter().any(|&x| x > 0.0) && a.iter().any(|&x| x < 0.0));
        let zero = a.iter().filter(|&&x| x == 0.0).count();
        assert!(zero < a.len(), "not every group is degenerate");
    }

    #[test]
    fn topk_pair_is_consistent() {
        let spec = SynthSpec {
            rows: 8,
            len: 128,
            topk: Some(20),
            ..SynthSpec::default()
        };
        let d = SyntheticBatch::<f32>::generate(&spec);
        let (old, new) = (d.topk_logp_old.unwrap(), d.topk_logp.unwrap());
        assert_eq!(old.dim(), (8, 128, 20));
        for i in 0..8 {
            for j in 0..128 {
                let o = old.slice(ndarray::s![i, j, ..]);
                let n = new.slice(ndarray::s![i, j, ..]);
                if !d.mask[[i, j]] {
                    assert!(o.iter().chain(n.iter()).all(|x| x.is_nan()));
                    continue;
                }
                assert!(o.windows(2).into_iter().all(|w| w[0] >= w[1]), "{o}");
                let (so, sn): (f64, f64) = (
                    o.iter().map(|x| f64::from(*x).exp()).sum(),
                    n.iter().map(|x| f64::from(*x).exp()).sum(),
                );
                assert!(so <= 1.0 + 1e-5 && sn <= 1.0 + 1e-5, "{so} {sn}");
                assert!(o.iter().chain(n.iter()).all(|x| x.is_finite() && *x <= 0.0));
            }
        }
    }

    #[test]
    fn batch_validates_and_evaluates() {
        let spec = SynthSpec {
            rows: 24,
            len: 300,
            topk: Some(5),
            with_ref: true,
            seed: 3,
            group_size: 5,
            ..SynthSpec::default()
        };
        let d32 = SyntheticBatch::<f32>::generate(&spec);
        let d64 = SyntheticBatch::<f64>::generate(&spec);
        let (b32, b64) = (d32.batch().unwrap(), d64.batch().unwrap());
        b32.validate().unwrap();
        b64.validate().unwrap();
        assert_eq!(b32.topk_width(), Some(5));
        assert!(b32.has_logp_ref());
        for div in [
            Divergence::BinaryTv,
            Divergence::BinaryKl,
            Divergence::TopkTv,
            Divergence::TopkKl,
        ] {
            let cfg = Config {
                divergence: div,
                ..Config::cppo()
            };
            let e = evaluate(&cfg, &b32, Par::Seq).unwrap();
            assert!(e.loss.is_finite());
            assert!(e.outputs.grad.iter().all(|g| g.is_finite()));
            let e = evaluate(&cfg, &b64, Par::Seq).unwrap();
            assert!(e.loss.is_finite());
        }
        // The mask shows the trust region at work: some tokens masked, some bypassed.
        let e = evaluate(&Config::cppo(), &b64, Par::Seq).unwrap();
        assert!(e.diagnostics.masked_frac > 0.0 && e.diagnostics.masked_frac < 0.2);
    }

    #[test]
    fn deterministic_and_streams_independent() {
        let base = SynthSpec {
            rows: 8,
            len: 100,
            seed: 11,
            ..SynthSpec::default()
        };
        let a = SyntheticBatch::<f64>::generate(&base);
        let b = SyntheticBatch::<f64>::generate(&SynthSpec {
            topk: Some(3),
            with_ref: true,
            ..base.clone()
        });
        let bits = |x: &Array2<f64>| x.mapv(f64::to_bits);
        assert_eq!(a.mask, b.mask);
        assert_eq!(bits(&a.logp), bits(&b.logp));
        assert_eq!(bits(&a.logp_old), bits(&b.logp_old));
        assert_eq!(a.advantages, b.advantages);
        let c = SyntheticBatch::<f64>::generate(&SynthSpec { seed: 12, ..base });
        assert_ne!(bits(&a.logp_old), bits(&c.logp_old));
    }

    #[test]
    fn no_drift_means_equal_policies() {
        let spec = SynthSpec {
            drift: 0.0,
            ..SynthSpec::default()
        };
        let d = SyntheticBatch::<f64>::generate(&spec);
        let e = evaluate(&Config::cppo(), &d.batch().unwrap(), Par::Seq).unwrap();
        assert!(e.diagnostics.divergence_max < 1e-12);
        assert_eq!(e.diagnostics.masked_frac, 0.0);
    }
}
