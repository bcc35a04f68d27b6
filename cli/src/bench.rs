//! `cppo bench`: times [`cppo::evaluate_into`] on a synthetic batch made in-process by
//! [`cppo::synth`].
//!
//! The batch and the output buffers are allocated before timing; each timed run is one
//! `evaluate_into` call on a rayon pool of the requested size. The result is the best of
//! the runs, after one untimed warm-up run.
//!
//! Memory: during the runs only the batch, the output buffers asked for (`--outputs`) and
//! the engine's own working memory are alive. The report gives the bytes of the first
//! two and the peak resident set size (Linux: `VmHWM` of `/proc/self/status`), both for
//! the whole process and, after resetting the peak once the batch is made (writing `5`
//! to `/proc/self/clear_refs`, which touches nothing else), for the timed phase alone:
//! the generator's temporaries count in the first but not the second.

use std::fs;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use cppo::ndarray::Array2;
use cppo::synth::{SynthSpec, SyntheticBatch};
use cppo::{Config, Float, Outputs, OutputsMut, Par, evaluate_into};

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

    /// The output buffers evaluate_into fills.
    #[arg(long, value_enum, default_value_t = OutputSet::All)]
    outputs: OutputSet,
}

/// The output buffers of the timed runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OutputSet {
    /// All seven: divergence, weight, threshold, keep, reason, token_loss, grad.
    All,
    /// grad and keep only, what a trainer's backward pass needs.
    Grad,
}

impl OutputSet {
    const fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Grad => "grad",
        }
    }
}

/// The output buffers, allocated once.
enum Buffers<F> {
    All(Box<Outputs<F>>),
    Grad { grad: Array2<F>, keep: Array2<bool> },
}

impl<F: Float> Buffers<F> {
    fn new(set: OutputSet, (b, l): (usize, usize)) -> Self {
        match set {
            OutputSet::All => Self::All(Box::new(Outputs::zeros((b, l)))),
            OutputSet::Grad => Self::Grad {
                grad: Array2::from_elem((b, l), F::default()),
                keep: Array2::from_elem((b, l), false),
            },
        }
    }

    fn view_mut(&mut self) -> OutputsMut<'_, F> {
        match self {
            Self::All(out) => out.view_mut(),
            Self::Grad { grad, keep } => OutputsMut {
                grad: Some(grad.view_mut()),
                keep: Some(keep.view_mut()),
                ..OutputsMut::default()
            },
        }
    }

    /// Bytes of the buffers.
    fn bytes(&self) -> usize {
        let f = size_of::<F>();
        match self {
            Self::All(o) => {
                let floats = o.divergence.len()
                    + o.weight.len()
                    + o.threshold.len()
                    + o.token_loss.len()
                    + o.grad.len();
                floats * f + o.keep.len() + o.reason.len()
            }
            Self::Grad { grad, keep } => grad.len() * f + keep.len(),
        }
    }
}

/// What the timed runs measured.
struct Measured {
    /// The best run.
    best: Duration,
    /// Bytes of the synthetic batch's arrays.
    inputs_bytes: usize,
    /// Bytes of the output buffers.
    outputs_bytes: usize,
    /// The peak RSS up to the end of batch generation.
    generation_peak_rss: Option<u64>,
    /// The peak RSS from the end of batch generation through the timed runs.
    timed_peak_rss: Option<u64>,
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
    let measured = match args.dtype {
        Dtype::F32 => measure::<f32>(&cfg, &spec, &pool, repeats, args.outputs)?,
        Dtype::F64 => measure::<f64>(&cfg, &spec, &pool, repeats, args.outputs)?,
    };
    // The peak was reset after generation: the process's peak is the larger of the two.
    let peak_rss = measured.generation_peak_rss.max(peak_rss());
    println!(
        "{}",
        report(args, &cfg, &spec, threads, &measured, peak_rss)
    );
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

/// Generates the batch, allocates the outputs, and times `repeats` runs after one
/// warm-up run.
fn measure<F: Float>(
    cfg: &Config,
    spec: &SynthSpec,
    pool: &rayon::ThreadPool,
    repeats: usize,
    outputs: OutputSet,
) -> Result<Measured, Failure> {
    let data = SyntheticBatch::<F>::generate(spec);
    let inputs_bytes = batch_bytes(&data);
    let batch = data
        .batch()
        .map_err(|e| Failure::Input(format!("synthetic batch: {e}")))?;
    // The generator's temporaries are gone: from here on the peak is that of the batch,
    // the outputs and the engine.
    let generation_peak_rss = peak_rss();
    let reset = reset_peak_rss();
    let mut out = Buffers::<F>::new(outputs, batch.shape());
    let best = pool
        .install(|| {
            evaluate_into(cfg, &batch, out.view_mut(), Par::Rayon)?;
            let mut best = Duration::MAX;
            for _ in 0..repeats {
                let start = Instant::now();
                evaluate_into(cfg, &batch, out.view_mut(), Par::Rayon)?;
                best = best.min(start.elapsed());
            }
            Ok(best)
        })
        .map_err(|e: cppo::Error| Failure::Input(e.to_string()))?;
    Ok(Measured {
        best,
        inputs_bytes,
        outputs_bytes: out.bytes(),
        generation_peak_rss,
        timed_peak_rss: if reset { peak_rss() } else { None },
    })
}

/// Bytes of a synthetic batch's arrays.
fn batch_bytes<F>(d: &SyntheticBatch<F>) -> usize {
    let f = size_of::<F>();
    let floats = d.logp.len()
        + d.logp_old.len()
        + d.advantages.len()
        + d.topk_logp_old.as_ref().map_or(0, |a| a.len())
        + d.topk_logp.as_ref().map_or(0, |a| a.len())
        + d.logp_ref.as_ref().map_or(0, |a| a.len());
    floats * f + d.mask.len() * size_of::<bool>()
}

/// The peak resident set size of the process so far, in bytes: `VmHWM` of
/// `/proc/self/status` (Linux only; `None` elsewhere).
fn peak_rss() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let kb = line.strip_prefix("VmHWM:")?.trim().strip_suffix("kB")?;
        kb.trim().parse::<u64>().ok().map(|kb| kb * 1024)
    })
}

/// Resets the peak resident set size to the current one (Linux 4.0 and later); whether
/// it worked.
fn reset_peak_rss() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Bytes read plus written per token slot: logp and logp_old, the bool mask, the top-K
/// pair and logp_ref when used; the outputs asked for, in the float type except keep and
/// reason (one byte each): divergence, weight, threshold, token_loss, grad, keep and
/// reason for `all`, grad and keep for `grad`. Per-row advantages are left out.
fn bytes_per_token(float: usize, topk: Option<usize>, with_ref: bool, outputs: OutputSet) -> usize {
    let read = 2 * float + 1 + topk.map_or(0, |k| 2 * k * float) + usize::from(with_ref) * float;
    let written = match outputs {
        OutputSet::All => 5 * float + 1 + 1,
        OutputSet::Grad => float + 1,
    };
    read + written
}

/// The one JSON line.
fn report(
    args: &BenchArgs,
    cfg: &Config,
    spec: &SynthSpec,
    threads: usize,
    m: &Measured,
    peak_rss: Option<u64>,
) -> serde_json::Value {
    let tokens = spec.rows as f64 * spec.len as f64;
    let bytes = bytes_per_token(args.dtype.size(), spec.topk, spec.with_ref, args.outputs);
    // A run is never 0 s, but a division by 0 would print `null`, not fail.
    let secs = m.best.as_secs_f64().max(f64::MIN_POSITIVE);
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
        "outputs": args.outputs.name(),
        "repeats": args.repeats.get(),
        "ms": secs * 1e3,
        "tokens_per_s": tokens / secs,
        "bytes_per_token": bytes,
        "gb_per_s": tokens * bytes as f64 / secs / 1e9,
        "inputs_bytes": m.inputs_bytes,
        "outputs_bytes": m.outputs_bytes,
        "peak_rss_bytes": peak_rss,
        "timed_peak_rss_bytes": m.timed_peak_rss,
    })
}
