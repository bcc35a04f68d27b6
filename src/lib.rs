//! # cppo
//!
//! CPPO (Cumulative Prefix-divergence Policy Optimization, Mao et al., arXiv 2606.10968)
//! and the token-level trust regions around it, for reinforcement learning of LLMs with
//! PPO/GRPO-style objectives.
//!
//! PPO and GRPO hold every token to one threshold. CPPO's token mask has two mechanisms
//! instead, on a per-token divergence D_t between the current policy π_θ and the
//! rollout policy μ:
//!
//! - a **position-weighted threshold**, stricter on early tokens, whose deviations
//!   condition everything after them: w_t D_t ≤ δ, with w_t falling linearly from 1 to
//!   w_min over the response;
//! - a **cumulative prefix budget**: the further the prefix has drifted, the less
//!   further drift is allowed: S_t ≤ δ + δ_b W_{t−1}, with S_t = Σ_{s≤t} w_s D_s and
//!   W_t = Σ_{s≤t} w_s.
//!
//! A token that moves back toward the rollout policy (A_t (ρ_t − 1) ≤ 0) is never
//! masked.
//!
//! The crate computes, over batched `ndarray` tensors (rows = sequences, columns =
//! token positions, plus a response mask):
//!
//! | module | what |
//! |---|---|
//! | [`batch`] | the validated, borrowed input view; masks of any element type |
//! | [`limits`] | the accepted ranges of inputs and config values, and the promise that every `Ok` is finite |
//! | [`divergence`] | per-token D_t: binary TV/KL, top-K TV/KL, k2/k3 log-ratio estimators |
//! | [`schedule`] | position weights w_t, by response token or by column |
//! | [`budget`] | CPPO's per-row prefix budget δ_b^row, calibrated by a quantile of the row's D |
//! | [`rule`] | trust-region rules (`none`, `ratio`, `dppo`, `cppo` with its soft gates and shuffled weights, `trm_max`, `trm_avg`) and reason codes |
//! | [`objective`] | objectives (`surrogate`, `detached_is`, `ppo_clip`, `cispo`, `gspo`, `gmpo`, `sapo`, `minpro`) and the KL penalty, with exact gradients |
//! | [`aggregate`] | verl's loss aggregation modes and global counts |
//! | [`stats`] | diagnostics, with the metrics verl and UniRL log under their names |
//! | [`config`] | the serde config (the JSON that `cppo eval` reads) |
//! | [`preset`] | named configs that reproduce the paper's and the official code's settings |
//! | [`engine`] | the fused per-row pass: [`evaluate`], [`evaluate_into`], [`trust_region`] |
//! | [`chunk`] | column chunks (context parallelism): carries and mergeable row partials |
//! | [`outputs`] | the per-token outputs, owned or borrowed |
//! | [`advantage`] | advantage estimators: GRPO, Dr. GRPO, RLOO, REINFORCE++, GAE |
//! | [`doc`] | guides: [the command line](doc::command_line), [where each convention comes from](doc::conventions), [distributed training](doc::distributed), [`cppo inspect`](doc::inspect), [contributing](doc::contributing) |
//!
//! The defaults are the paper's (δ = 0.15, δ_b = 0.02 calibrated per row by the 90th
//! percentile of the row's D within [δ_b, 2 δ_b], w_min = 0.8); the [`preset`]s
//! reproduce the paper's other settings and the official implementations (UniRL, verl
//! PR #6731) convention by convention, as [`doc::conventions`] details.
//!
//! ## Example
//!
//! ```
//! use cppo::{evaluate, Batch, Config, Par};
//! use cppo::ndarray::array;
//!
//! // Two sequences of four slots; the second has a hole (a tool output) and padding.
//! let logp = array![[-0.2f32, -1.0, -0.1, -2.5], [-0.3, f32::NAN, -0.9, f32::NAN]];
//! let logp_old = array![[-0.3f32, -1.6, -0.1, -1.2], [-0.2, 0.0, -1.4, 0.0]];
//! let advantages = array![1.0f32, -1.0]; // one per sequence, broadcast
//! let mask = array![[true, true, true, true], [true, false, true, false]];
//!
//! let batch = Batch::new(&logp, &logp_old, &advantages, &mask)?;
//! let eval = evaluate(&Config::cppo(), &batch, Par::Rayon)?;
//!
//! // Feed eval.outputs.grad into your autodiff graph as sum(grad.detach() * logp).
//! assert_eq!(eval.outputs.grad.dim(), (2, 4));
//! assert_eq!(eval.outputs.grad[[1, 1]], 0.0); // padding: zero, whatever it held
//! assert_eq!(eval.diagnostics.response_tokens, 6);
//! # Ok::<(), cppo::Error>(())
//! ```
//!
//! ## Numerics
//!
//! Inputs are `f32` or `f64`; all arithmetic runs in `f64`, prefix sums included, and
//! outputs are rounded once to the input type. Results are bit-identical for
//! [`Par::Seq`] and [`Par::Rayon`] on any number of threads.
//!
//! The fused pass takes exponentials and logarithms with its own vectorized functions,
//! within 2 ulp of the correctly rounded value (3 for `expm1`): its numbers can differ
//! by a few ulp from a computation with `std`'s `exp`, `exp_m1` and `ln`, such as the
//! single-token functions of [`divergence`]. They are the same bits on every CPU: the
//! pass is built for AVX-512, AVX2 (each with FMA) and the baseline, chosen at run time,
//! and every build performs the same IEEE operations.
//!
//! ## Decisions where the spec is silent
//!
//! - Values are checked where they are read, inside the single pass, and the first bad
//!   value in row-major order is reported whatever the thread count; within a token the
//!   order is mask, logp, logp_old, advantages, top-K pair, logp_ref. [`Batch::validate`]
//!   runs the same checks alone.
//! - Arrays the config does not use are not read by [`evaluate`]: a NaN in `logp_ref`
//!   without a KL penalty is no error there. [`Batch::validate`], which knows no config,
//!   checks every array the batch holds.
//! - Per-row advantages that are NaN are reported at the row's first response column.
//! - Every `Ok` is finite, in f32 too, but for the NaNs the docs name: an advantage
//!   beyond ±1e9, a log-prob below −1e4 and a config parameter beyond 1e6 are errors
//!   ([`limits`] has every bound, and why it suffices).
//! - The KL penalty's x = logp_ref − logp is clamped to ±20, as the log-ratio is.
//! - A float mask must be finite everywhere, padding included: a NaN mask value is an
//!   error, not a guess.
//! - Every log-prob array (`logp`, `logp_old`, the top-K pair, `logp_ref`) follows the
//!   same rule: NaN/inf at a response position is an error, a value below −1e4 too,
//!   (0, 1e-4] reads as 0.
//! - A count override (`num_tokens`, `num_seqs`) below the batch's own count is an error
//!   ([`Error::CountTooSmall`]), reported after any bad value in the batch.
//! - The gradient is the objective's closed form everywhere, also where the log-ratio
//!   clamp at ±20 is active (the clamped loss is flat there, and autograd would give 0);
//!   such tokens are far outside every trust region.
//! - The KL penalty is not masked by the trust region.
//! - TRM-avg sums D_t in exact fixed point (units of 2^−64), so its decision does not
//!   depend on how a row is chunked.
//! - Fractions and means in [`Diagnostics`] are 0 when their denominator is 0.
//! - Where the crate departs from the official code, and why: [`doc::conventions`].
//!
//! ## Feature flags
//!
//! - `synth`: [`synth`], realistic synthetic batches for demos, examples and benchmarks
//!   (rand, rand_distr).
//! - `json`: [`Config::from_json`], [`Config::from_json_file`] and `str::parse` for
//!   configs (serde_json).
//! - `candle`: `cppo::candle`, the loss as a candle tensor whose backward is the crate's
//!   gradient (candle-core).
//!
//! They are off by default: the library itself depends only on ndarray, rayon, serde
//! and thiserror. The `cppo` command-line tool (`cppo-cli`) and the candle trainer
//! (`cppo-train`) are crates of their own in the same workspace.
//!
//! The arrays are [`ndarray`]'s, version 0.17, re-exported as `cppo::ndarray`. An
//! ndarray of another major version in your own `Cargo.toml` is another type, and the
//! compiler then reports only that `From<…>` is not implemented for [`Mask`] or
//! [`Advantages`]: use `cppo::ndarray`, or the same version.

#![warn(missing_docs)]
#![doc(test(attr(deny(warnings))))]

pub use ndarray;

/// Guides that are not one module's. The math of each concept is in the module named
/// after it ([`divergence`], [`schedule`], [`budget`], [`rule`], [`objective`],
/// [`aggregate`], [`stats`]); these pages hold what spans modules.
pub mod doc {
    #[doc = include_str!("../docs/command_line.md")]
    pub mod command_line {}
    #[doc = include_str!("../docs/conventions.md")]
    pub mod conventions {}
    #[doc = include_str!("../docs/distributed.md")]
    pub mod distributed {}
    #[doc = include_str!("../docs/inspect.md")]
    pub mod inspect {}
    #[doc = include_str!("../docs/contributing.md")]
    pub mod contributing {}
}

/// The README's Rust examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub mod advantage;
pub mod aggregate;
pub mod batch;
pub mod budget;
#[cfg(feature = "candle")]
pub mod candle;
pub mod chunk;
pub mod config;
pub mod divergence;
pub mod engine;
pub mod error;
pub mod float;
mod kernel;
pub mod limits;
pub mod objective;
pub mod outputs;
mod rows;
pub mod rule;
pub mod schedule;
mod simd;
pub mod stats;
#[cfg(feature = "synth")]
pub mod synth;

pub use aggregate::{Aggregation, Counts};
pub use batch::{Advantages, Batch, Mask, TopK};
pub use budget::Calibration;
pub use config::Config;
pub use config::preset::{self, Preset};
pub use divergence::Divergence;
pub use engine::{Evaluation, Par, Summary, evaluate, evaluate_into, trust_region};
pub use error::{At, Error, Result};
pub use float::{Float, MaskElem, Numerics};
pub use objective::{KlEstimator, KlPenalty, Objective};
pub use outputs::{Outputs, OutputsMut};
pub use rule::{CppoParams, Gate, Reason, Rule};
pub use schedule::{Positions, Schedule};
pub use stats::{Diagnostics, Tally};
