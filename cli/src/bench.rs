//! `cppo bench`: times [`cppo::evaluate_into`] on a synthetic batch made in-process by
//! [`cppo::synth`], or on the user's own batch file (`--input`).
//!
//! The batch and the output buffers are allocated before timing; each timed run is one
//! `evaluate_into` call on a rayon pool of the requested size. Untimed warm-up runs come
//! first (at least one, and at least [`WARM_UP`] of them in time); then runs are timed
//! until there are at least `--repeats` of them and they add up to at least `--min-time`
//! seconds, so that a batch of a few milliseconds is measured over many runs on a noisy
//! machine. The report gives the best run and the median, the CPU model and the
//! instruction set the engine's dispatcher chose.
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
use cppo::{Batch, Config, Float, Outputs, OutputsMut, Par, evaluate_into};

use crate::batchfile::{self, Loaded, MaxMemory, Needs};
use crate::eval::read_config;
use crate::failure::Failure;
use crate::names::Names;
use crate::npz::NpyFloat;

/// The least time spent in untimed warm-up runs.
const WARM_UP: Duration = Duration::from_millis(100);

/// The most timed runs, whatever `--min-time` asks (a guard for tiny batches).
const MAX_RUNS: usize = 100_000;

/// K of the top-K pair when the divergence needs one and `--topk` is not given.
const DEFAULT_TOPK: usize = 20;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// B: rows (sequences) of the synthetic batch.
    #[arg(long, value_name = "B", required_unless_present = "input")]
    rows: Option<NonZeroUsize>,

    /// L: padded width of the synthetic batch, in tokens.
    #[arg(long, value_name = "L", required_unless_present = "input")]
    len: Option<NonZeroUsize>,

    /// Time the engine on this batch file (npz or safetensors, as `cppo eval` reads it)
    /// instead of a synthetic batch; its float type is the file's.
    #[arg(long, value_name = "BATCH", conflicts_with_all = ["rows", "len", "dtype", "topk"])]
    input: Option<PathBuf>,

    /// The names the --input file's arrays go by: crate (logp, logp_old, advantages,
    /// mask, ...), verl or trl (as for `cppo eval`).
    #[arg(long, value_enum, default_value_t = Names::Crate, long_help = crate::names::names_help())]
    names: Names,

    /// The most memory the --input file's arrays may take once read (as for `cppo eval`).
    #[arg(long, value_name = "BYTES", default_value = "8G", value_parser = MaxMemory::parse)]
    max_memory: MaxMemory,

    /// The config (JSON, as for `cppo eval`); default: the cppo preset (binary TV,
    /// delta 0.15, delta_b 0.02 calibrated by the row's P90 within [delta_b, 2 delta_b],
    /// w_min 0.8, surrogate, token-mean). A top-K divergence
    /// adds the top-K pair to the batch, a `kl` penalty adds logp_ref.
    #[arg(long, value_name = "CFG.json")]
    config: Option<PathBuf>,

    /// Threads of the rayon pool the engine runs on [default: all cores].
    #[arg(long, value_name = "N")]
    threads: Option<NonZeroUsize>,

    /// Float type of the synthetic batch and the outputs [default: f32].
    #[arg(long, value_enum)]
    dtype: Option<Dtype>,

    /// The fewest timed runs.
    #[arg(long, value_name = "R", default_value = "10")]
    repeats: NonZeroUsize,

    /// The least total time of the timed runs, in seconds (more runs are made until
    /// both --repeats and --min-time are met).
    #[arg(long, value_name = "SECONDS", default_value_t = 0.5, value_parser = parse_seconds)]
    min_time: f64,

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
    /// The median run.
    median: Duration,
    /// Timed runs made.
    runs: usize,
    /// Their total time.
    total: Duration,
    /// B and L of the batch.
    shape: (usize, usize),
    /// Response tokens of the batch.
    response_tokens: u64,
    /// Bytes of the batch's arrays.
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

/// The seconds of `--min-time`: finite, ≥ 0 and at most an hour.
fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if (0.0..=3600.0).contains(&x) => Ok(x),
        _ => Err(format!("{text:?} is not a number of seconds in [0, 3600]")),
    }
}

/// What is timed: the synthetic batch's spec, or a batch read from a file.
enum Source {
    Synthetic(SynthSpec, Dtype),
    File(Box<Loaded>),
}

/// Runs `cppo bench`.
pub fn run(args: &BenchArgs) -> Result<(), Failure> {
    let cfg = match &args.config {
        Some(path) => read_config(path)?,
        None => Config::cppo(),
    };
    let source = match (&args.input, args.rows, args.len) {
        (Some(path), _, _) => Source::File(Box::new(batchfile::load_named(
            path,
            Needs::of(&[cfg]),
            args.max_memory,
            args.names,
        )?)),
        (None, Some(rows), Some(len)) => {
            let spec = SynthSpec {
                rows: rows.get(),
                len: len.get(),
                topk: topk_width(&cfg, args.topk)?,
                with_ref: cfg.kl.is_some(),
                ..SynthSpec::default()
            };
            Source::Synthetic(spec, args.dtype.unwrap_or(Dtype::F32))
        }
        // clap requires --rows and --len without --input.
        _ => {
            return Err(Failure::Input(
                "--rows and --len, or --input, are required".into(),
            ));
        }
    };
    let threads = args.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        NonZeroUsize::get,
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Failure::system(format!("cannot start {threads} threads"), &e))?;
    let timing = Timing {
        repeats: args.repeats.get(),
        min_time: Duration::from_secs_f64(args.min_time),
        outputs: args.outputs,
    };
    let (measured, what) = match &source {
        Source::Synthetic(spec, Dtype::F32) => (
            synthetic::<f32>(&cfg, spec, &pool, &timing)?,
            Described::of_spec(spec, Dtype::F32),
        ),
        Source::Synthetic(spec, Dtype::F64) => (
            synthetic::<f64>(&cfg, spec, &pool, &timing)?,
            Described::of_spec(spec, Dtype::F64),
        ),
        Source::File(file) => match file.as_ref() {
            Loaded::F32(a) => {
                let batch = a.batch().map_err(|e| Failure::Input(e.to_string()))?;
                (
                    timed(&cfg, &batch, arrays_bytes(a), &pool, &timing)?,
                    Described::of_batch(&batch, Dtype::F32),
                )
            }
            Loaded::F64(a) => {
                let batch = a.batch().map_err(|e| Failure::Input(e.to_string()))?;
                (
                    timed(&cfg, &batch, arrays_bytes(a), &pool, &timing)?,
                    Described::of_batch(&batch, Dtype::F64),
                )
            }
        },
    };
    // The peak was reset after generation: the process's peak is the larger of the two.
    let peak_rss = measured.generation_peak_rss.max(peak_rss());
    println!(
        "{}",
        report(args, &cfg, &what, threads, &measured, peak_rss)
    );
    Ok(())
}

/// How timed runs are made.
struct Timing {
    repeats: usize,
    min_time: Duration,
    outputs: OutputSet,
}

/// What the report says of the batch.
struct Described {
    dtype: Dtype,
    topk: Option<usize>,
    with_ref: bool,
    with_is_weights: bool,
    input: &'static str,
}

impl Described {
    fn of_spec(spec: &SynthSpec, dtype: Dtype) -> Self {
        Self {
            dtype,
            topk: spec.topk,
            with_ref: spec.with_ref,
            with_is_weights: false,
            input: "synthetic",
        }
    }

    fn of_batch<F: Float>(batch: &Batch<'_, F>, dtype: Dtype) -> Self {
        Self {
            dtype,
            topk: batch.topk_width(),
            with_ref: batch.has_logp_ref(),
            with_is_weights: batch.has_is_weights(),
            input: "file",
        }
    }
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

/// Generates the synthetic batch, then times it ([`timed`]).
fn synthetic<F: Float>(
    cfg: &Config,
    spec: &SynthSpec,
    pool: &rayon::ThreadPool,
    timing: &Timing,
) -> Result<Measured, Failure> {
    let data = SyntheticBatch::<F>::generate(spec);
    let batch = data
        .batch()
        .map_err(|e| Failure::Input(format!("synthetic batch: {e}")))?;
    // The generator's temporaries are gone: from here on the peak is that of the batch,
    // the outputs and the engine.
    timed(cfg, &batch, batch_bytes(&data), pool, timing)
}

/// Allocates the outputs, warms up and times runs of `evaluate_into` on `batch`.
fn timed<F: Float>(
    cfg: &Config,
    batch: &Batch<'_, F>,
    inputs_bytes: usize,
    pool: &rayon::ThreadPool,
    timing: &Timing,
) -> Result<Measured, Failure> {
    let generation_peak_rss = peak_rss();
    let reset = reset_peak_rss();
    let mut out = Buffers::<F>::new(timing.outputs, batch.shape());
    let counts = batch.counts().map_err(|e| Failure::Input(e.to_string()))?;
    let runs = pool
        .install(|| {
            let start = Instant::now();
            while start.elapsed() < WARM_UP {
                evaluate_into(cfg, batch, out.view_mut(), Par::Rayon)?;
            }
            let mut runs = Vec::with_capacity(timing.repeats);
            let mut total = Duration::ZERO;
            while runs.len() < MAX_RUNS && (runs.len() < timing.repeats || total < timing.min_time)
            {
                let start = Instant::now();
                evaluate_into(cfg, batch, out.view_mut(), Par::Rayon)?;
                let took = start.elapsed();
                runs.push(took);
                total += took;
            }
            Ok(runs)
        })
        .map_err(|e: cppo::Error| Failure::Input(e.to_string()))?;
    let mut sorted = runs.clone();
    sorted.sort_unstable();
    Ok(Measured {
        best: sorted[0],
        median: sorted[sorted.len() / 2],
        runs: runs.len(),
        total: runs.iter().sum(),
        shape: batch.shape(),
        response_tokens: counts.tokens,
        inputs_bytes,
        outputs_bytes: out.bytes(),
        generation_peak_rss,
        timed_peak_rss: if reset { peak_rss() } else { None },
    })
}

/// Bytes of a batch file's arrays, as they are held.
fn arrays_bytes<F: NpyFloat>(a: &batchfile::Arrays<F>) -> usize {
    let f = size_of::<F>();
    let floats = a.logp.len()
        + a.logp_old.len()
        + a.advantages.len()
        + a.topk.as_ref().map_or(0, |(o, n)| o.len() + n.len())
        + a.logp_ref.as_ref().map_or(0, |r| r.len())
        + a.is_weights.as_ref().map_or(0, |w| w.len());
    floats * f + a.mask.bytes()
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

/// The CPU's model name (Linux: `model name` of `/proc/cpuinfo`; `None` elsewhere).
fn cpu_model() -> Option<String> {
    let info = fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_string())
    })
}

/// The one JSON line.
fn report(
    args: &BenchArgs,
    cfg: &Config,
    what: &Described,
    threads: usize,
    m: &Measured,
    peak_rss: Option<u64>,
) -> serde_json::Value {
    let (rows, len) = m.shape;
    let tokens = rows as f64 * len as f64;
    let mut bytes = bytes_per_token(what.dtype.size(), what.topk, what.with_ref, args.outputs);
    bytes += usize::from(what.with_is_weights) * what.dtype.size();
    // A run is never 0 s, but a division by 0 would print `null`, not fail.
    let secs = m.best.as_secs_f64().max(f64::MIN_POSITIVE);
    let median = m.median.as_secs_f64().max(f64::MIN_POSITIVE);
    serde_json::json!({
        "input": what.input,
        "rows": rows,
        "len": len,
        "response_tokens": m.response_tokens,
        "threads": threads,
        "dtype": what.dtype.name(),
        "rule": cfg.rule.name(),
        "divergence": cfg.divergence.name(),
        "objective": cfg.objective.name(),
        "aggregation": cfg.aggregation.name(),
        "topk": what.topk,
        "logp_ref": what.with_ref,
        "is_weights": what.with_is_weights,
        "outputs": args.outputs.name(),
        "repeats": args.repeats.get(),
        "runs": m.runs,
        "total_s": m.total.as_secs_f64(),
        "ms": secs * 1e3,
        "median_ms": median * 1e3,
        "tokens_per_s": tokens / secs,
        "median_tokens_per_s": tokens / median,
        "bytes_per_token": bytes,
        "gb_per_s": tokens * bytes as f64 / secs / 1e9,
        "inputs_bytes": m.inputs_bytes,
        "outputs_bytes": m.outputs_bytes,
        "peak_rss_bytes": peak_rss,
        "timed_peak_rss_bytes": m.timed_peak_rss,
        "cpu": cpu_model(),
        "isa": cppo::engine::instruction_set(),
    })
}
