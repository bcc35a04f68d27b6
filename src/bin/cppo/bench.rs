//! `cppo bench`: times [`cppo::evaluate_into`] on a synthetic batch made in-process by
//! [`cppo::synth`].
//!
//! The batch and the output buffers are allocated before timing; each timed run is one
//! `evaluate_into` call on a rayon pool of the requested size. The result is the best of
//! the runs, after one untimed warm-up run.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use cppo::synth::{SynthSpec, SyntheticBatch};
use cppo::{Config, Float, Outputs, Par, evaluate_into};

use crate::eval::read_config;
use crate::failure::Failure;

/// K of the top-K pair when the divergence needs one and `--topk` is not given.
const DEFAULT_TOPK: usize = 20;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// B: rows (sequences) of the synthetic batch.
    #[arg(long, value_name = "B")]
    rows: NonZeroUsize,

    /// L: padded width of the synthetic batch, in tokens.
    #[arg(long, value_name = "L")]
    len: NonZeroUsize,

    /// The config (JSON, as for `cppo eval`); default: the cppo preset (binary TV,
    /// delta 0.2, delta_b 0.05, w_min 0.8, surrogate, token-mean). A top-K divergence
    /// adds the top-K pair to the batch, a `kl` penalty adds logp_ref.
    #[arg(long, value_name = "CFG.json")]
    config: Option<PathBuf>,

    /// Threads of the rayon pool the engine runs on [default: all cores].
    #[arg(long, value_name = "N")]
    threads: Option<NonZeroUsize>,

    /// Float type of the batch and the outputs.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,

    /// Timed runs; the best is reported.
    #[arg(long, value_name = "R", default_value = "10")]
    repeats: NonZeroUsize,

    /// K of the top-K pair, for top-K divergences only [default: 20].
    #[arg(long, value_name = "K")]
    topk: Option<NonZeroUsize>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Dtype {
    F32,
    F64,
}

impl Dtype {
    const fn name(self) -> &'static str {
        match self {
            Self::F32 => f32::DTYPE,
            Self::F64 => f64::DTYPE,
        }
    }

    const fn size(self) -> usize {
        match self {
            Self::F32 => size_of::<f32>(),
            Self::F64 => size_of::<f64>(),
        }
    }
}

/// Runs `cppo bench`.
pub fn run(args: &BenchArgs) -> Result<(), Failure> {
    let cfg = match &args.config {
        Some(path) => read_config(path)?,
        None => Config::cppo(),
    };
    let topk = topk_width(&cfg, args.topk)?;
    let spec = SynthSpec {
        rows: args.rows.get(),
        len: args.len.get(),
        topk,
        with_ref: cfg.kl.is_some(),
        ..SynthSpec::default()
    };
    let threads = args.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        NonZeroUsize::get,
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Failure::system(format!("cannot start {threads} threads"), &e))?;
    let repeats = args.repeats.get();
    let best = match args.dtype {
        Dtype::F32 => best_time::<f32>(&cfg, &spec, &pool, repeats)?,
        Dtype::F64 => best_time::<f64>(&cfg, &spec, &pool, repeats)?,
    };
    println!("{}", report(args, &cfg, &spec, threads, best));
    Ok(())
}

/// K of the top-K pair: `--topk` or [`DEFAULT_TOPK`] for a top-K divergence, none
/// otherwise; `--topk` with a binary divergence is an error rather than a silently
/// ignored flag.
fn topk_width(cfg: &Config, topk: Option<NonZeroUsize>) -> Result<Option<usize>, Failure> {
    match (cfg.divergence.needs_topk(), topk) {
        (true, k) => Ok(Some(k.map_or(DEFAULT_TOPK, NonZeroUsize::get))),
        (false, None) => Ok(None),
        (false, Some(_)) => Err(Failure::Input(format!(
            "--topk applies only to the top-K divergences; the config's divergence is {}",
            cfg.divergence.name()
        ))),
    }
}

/// Generates the batch, allocates the outputs, and returns the best time of `repeats`
/// runs after one warm-up run.
fn best_time<F: Float>(
    cfg: &Config,
    spec: &SynthSpec,
    pool: &rayon::ThreadPool,
    repeats: usize,
) -> Result<Duration, Failure> {
    let data = SyntheticBatch::<F>::generate(spec);
    let batch = data
        .batch()
        .map_err(|e| Failure::Input(format!("synthetic batch: {e}")))?;
    let mut out = Outputs::<F>::zeros(batch.shape());
    pool.install(|| {
        evaluate_into(cfg, &batch, out.view_mut(), Par::Rayon)?;
        let mut best = Duration::MAX;
        for _ in 0..repeats {
            let start = Instant::now();
            evaluate_into(cfg, &batch, out.view_mut(), Par::Rayon)?;
            best = best.min(start.elapsed());
        }
        Ok(best)
    })
    .map_err(|e: cppo::Error| Failure::Input(e.to_string()))
}

/// Bytes read plus written per token slot: logp and logp_old, the bool mask, the top-K
/// pair and logp_ref when used; divergence, weight, threshold, token_loss and grad in the
/// float type, keep and reason one byte each. Per-row advantages are left out.
fn bytes_per_token(float: usize, topk: Option<usize>, with_ref: bool) -> usize {
    let read = 2 * float + 1 + topk.map_or(0, |k| 2 * k * float) + usize::from(with_ref) * float;
    let written = 5 * float + 1 + 1;
    read + written
}

/// The one JSON line.
fn report(
    args: &BenchArgs,
    cfg: &Config,
    spec: &SynthSpec,
    threads: usize,
    best: Duration,
) -> serde_json::Value {
    let tokens = spec.rows as f64 * spec.len as f64;
    let bytes = bytes_per_token(args.dtype.size(), spec.topk, spec.with_ref);
    // A run is never 0 s, but a division by 0 would print `null`, not fail.
    let secs = best.as_secs_f64().max(f64::MIN_POSITIVE);
    serde_json::json!({
        "rows": spec.rows,
        "len": spec.len,
        "threads": threads,
        "dtype": args.dtype.name(),
        "rule": cfg.rule.name(),
        "divergence": cfg.divergence.name(),
        "objective": cfg.objective.name(),
        "aggregation": cfg.aggregation.name(),
        "topk": spec.topk,
        "logp_ref": spec.with_ref,
        "repeats": args.repeats.get(),
        "ms": secs * 1e3,
        "tokens_per_s": tokens / secs,
        "bytes_per_token": bytes,
        "gb_per_s": tokens * bytes as f64 / secs / 1e9,
    })
}
