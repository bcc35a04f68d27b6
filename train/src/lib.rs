//! A small RLVR trainer in Rust that learns with `cppo`: a transformer policy written in
//! candle learns to sort digits from a 0/1 checker reward, with GRPO advantages and the
//! trust-region mask, loss and exact gradient dL/dlogp all computed by the crate.
//!
//! ```sh
//! # one run, one rule, a log line per iteration and a CSV
//! cargo run --release -p cppo-train -- --rule cppo
//! # GRPO-clip, DPPO and CPPO over several seeds: table, CSVs and an SVG plot
//! cargo run --release -p cppo-train -- --compare
//! # a small version in seconds (smoke test)
//! cargo run --release -p cppo-train -- --compare --quick
//! ```
//!
//! Each run starts from a supervised warm start (the "pretrained model", shared by every
//! rule for a given seed), then runs RL iterations: sample G answers per prompt from the
//! rollout policy, score them with the checker, compute advantages with
//! `cppo::advantage::grpo`, and take `minibatches × epochs` AdamW steps on the batch.
//! Each step sends the current policy's log-probs (detached, on the host), the rollout's
//! `logp_old`, the advantages and the response mask to `cppo::evaluate_into`, and
//! backpropagates `sum(grad * logp)` with the crate's `grad` as a constant.
//!
//! Off-policy drift comes from three knobs: several optimizer steps per rollout batch
//! (`--minibatches`, `--epochs`), the learning rate (`--lr`), and a rollout policy kept
//! `--lag` iterations behind the trained one. The defaults (lag 4, lr 3e-4, 4 minibatches
//! × 1 epoch, 60 iterations) are the main setting of TRAINING.md.
//!
//! See TRAINING.md for the results of `--compare`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Device;
use clap::Parser;
use cppo::Config;
use indicatif::{ProgressBar, ProgressStyle};

mod model;
mod report;
mod rl;
mod rng;
mod task;

use model::{Arch, Params};
pub use report::RunSummary;
use rl::{Hyper, IterLog, Sft};
use rng::Rng;
use task::Task;

/// The example's error type: candle's, the crate's, I/O and messages alike.
pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A small RLVR trainer (sorting digits) that learns with cppo's losses.
#[derive(Parser, Debug, Clone)]
#[command(name = "train")]
pub struct Args {
    /// Run every rule in --rules for every seed in --seeds, print the table and plot the
    /// learning curves.
    #[arg(long)]
    pub compare: bool,
    /// A small, fast setting (under a minute in release) for smoke tests.
    #[arg(long)]
    pub quick: bool,
    /// The rule of a single run: a preset (grpo, dppo, cppo) or any other rule kind of
    /// the config with its default parameters (none, ratio, cppo_soft, trm_max, ...).
    #[arg(long, default_value = "cppo")]
    pub rule: String,
    /// A JSON config (the schema of `cppo::doc::command_line`) for a single run, instead
    /// of --rule.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The rules of --compare, comma-separated (names as for --rule).
    #[arg(long, value_delimiter = ',', default_value = "grpo,dppo,cppo")]
    pub rules: Vec<String>,
    /// Seeds (default: 1 for a single run; 1,2,3,4,5 for --compare; 1 with --quick).
    #[arg(long, value_delimiter = ',')]
    pub seeds: Option<Vec<u64>>,
    /// RL iterations (rollout batches).
    #[arg(long)]
    pub iters: Option<usize>,
    /// Prompts per rollout batch.
    #[arg(long)]
    pub prompts: Option<usize>,
    /// Answers per prompt (the GRPO group size G).
    #[arg(long)]
    pub group: Option<usize>,
    /// Optimizer steps per pass over a rollout batch.
    #[arg(long)]
    pub minibatches: Option<usize>,
    /// Passes over each rollout batch.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Rollouts come from the policy as it was this many iterations ago.
    #[arg(long)]
    pub lag: Option<usize>,
    /// AdamW learning rate of the RL phase.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Global gradient-norm clip, 0 for none.
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// Digits to sort.
    #[arg(long)]
    pub digits: Option<usize>,
    /// Warm start: supervised steps until this greedy accuracy on a validation set.
    #[arg(long)]
    pub sft_target: Option<f64>,
    /// Warm start: at most this many supervised steps.
    #[arg(long)]
    pub sft_max_steps: Option<usize>,
    /// Warm start: examples per supervised step.
    #[arg(long)]
    pub sft_batch: Option<usize>,
    /// Model width.
    #[arg(long)]
    pub d_model: Option<usize>,
    /// Transformer layers.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Evaluate the greedy accuracy every this many iterations.
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Held-out prompts for the greedy accuracy.
    #[arg(long)]
    pub eval_prompts: Option<usize>,
    /// Output directory for the CSVs, the table and the plot.
    #[arg(long, default_value = "target/train")]
    pub out: PathBuf,
    /// Print a line per iteration also in --compare.
    #[arg(long)]
    pub verbose: bool,
    /// Runs trained at once, each on one thread (default: the number of CPUs). Results
    /// do not depend on it.
    #[arg(long)]
    pub jobs: Option<usize>,
}

/// The settings every rule shares, from the flags and the mode's defaults.
fn hyper(a: &Args) -> Res<(Hyper, Arch, Sft)> {
    let q = a.quick;
    let task = Task {
        n: a.digits.unwrap_or(if q { 6 } else { 8 }),
    };
    let h = Hyper {
        task,
        iters: a.iters.unwrap_or(if q { 15 } else { 60 }),
        prompts: a.prompts.unwrap_or(if q { 16 } else { 32 }),
        group: a.group.unwrap_or(8),
        minibatches: a.minibatches.unwrap_or(4),
        epochs: a.epochs.unwrap_or(1),
        lag: a.lag.unwrap_or(4),
        lr: a.lr.unwrap_or(3e-4),
        weight_decay: 0.0,
        grad_clip: a.grad_clip.unwrap_or(1.0),
        eval_every: a.eval_every.unwrap_or(1),
        eval_prompts: a.eval_prompts.unwrap_or(if q { 128 } else { 512 }),
    };
    let arch = Arch {
        vocab: task::VOCAB,
        ctx: task.seq_len(),
        d_model: a.d_model.unwrap_or(64),
        heads: 4,
        layers: a.layers.unwrap_or(2),
    };
    let sft = Sft {
        target: a.sft_target.unwrap_or(0.2),
        max_steps: a.sft_max_steps.unwrap_or(if q { 300 } else { 2000 }),
        batch: a.sft_batch.unwrap_or(128),
        lr: 3e-3,
    };
    let checks = [
        (h.task.n >= 1, "--digits must be at least 1"),
        (h.group >= 2, "--group must be at least 2"),
        (
            h.prompts >= 1 && h.iters >= 1,
            "--prompts and --iters must be at least 1",
        ),
        (
            h.epochs >= 1 && h.minibatches >= 1,
            "--epochs and --minibatches must be at least 1",
        ),
        (
            (h.prompts * h.group).is_multiple_of(h.minibatches),
            "--prompts x --group must be a multiple of --minibatches",
        ),
        (
            h.eval_every >= 1 && h.eval_prompts >= 1,
            "--eval-every and --eval-prompts must be at least 1",
        ),
        (
            arch.d_model >= arch.heads && arch.d_model.is_multiple_of(arch.heads),
            "--d-model must be a multiple of 4",
        ),
        (
            arch.layers >= 1 && sft.batch >= 1,
            "--layers and --sft-batch must be at least 1",
        ),
        (
            h.lr > 0.0 && h.grad_clip >= 0.0,
            "--lr must be positive, --grad-clip non-negative",
        ),
    ];
    if let Some((_, msg)) = checks.iter().find(|(ok, _)| !ok) {
        return Err((*msg).into());
    }
    Ok((h, arch, sft))
}

/// The config of a rule name: the crate's presets for grpo, dppo and cppo (identical
/// but for the rule), any other rule kind with its defaults.
fn config_for(rule: &str) -> Res<Config> {
    Ok(match rule {
        "grpo" => Config::grpo(),
        "dppo" => Config::dppo(),
        "cppo" => Config::cppo(),
        kind => serde_json::from_value(serde_json::json!({"rule": {"kind": kind}}))
            .map_err(|e| format!("rule {kind:?}: {e}"))?,
    })
}

/// Runs the trainer with `args`; returns the finished runs.
pub fn run(args: Args) -> Res<Vec<RunSummary>> {
    let dev = Device::Cpu;
    let (h, arch, sft) = hyper(&args)?;
    if args.compare && args.config.is_some() {
        return Err("--config is for a single run; --compare takes --rules".into());
    }
    let rules: Vec<(String, Config)> = if args.compare {
        args.rules
            .iter()
            .map(|r| Ok((r.clone(), config_for(r)?)))
            .collect::<Res<_>>()?
    } else if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--config {}: {e}", path.display()))?;
        let cfg: Config =
            serde_json::from_str(&text).map_err(|e| format!("--config {}: {e}", path.display()))?;
        vec![(cfg.rule.name().to_string(), cfg)]
    } else {
        vec![(args.rule.clone(), config_for(&args.rule)?)]
    };
    let seeds = args.seeds.clone().unwrap_or_else(|| {
        if args.compare && !args.quick {
            vec![1, 2, 3, 4, 5]
        } else {
            vec![1]
        }
    });
    std::fs::create_dir_all(&args.out)?;

    let setting = format!(
        "sort {} digits; d_model {}, {} layers; {} prompts x G {} per batch; {} minibatches x {} epochs = {} steps per rollout; lag {}; lr {}; grad clip {}; {} iterations; seeds {:?}",
        h.task.n,
        arch.d_model,
        arch.layers,
        h.prompts,
        h.group,
        h.minibatches,
        h.epochs,
        h.steps_per_rollout(),
        h.lag,
        h.lr,
        h.grad_clip,
        h.iters,
        seeds
    );
    println!("{setting}");

    // The held-out set: the same prompts for every seed and rule.
    let mut eval_rng = Rng::new(0xE7A1, 0);
    let eval_set: Vec<Vec<u32>> = (0..h.eval_prompts)
        .map(|_| h.task.digits(&mut eval_rng))
        .collect();

    let total = (seeds.len() * rules.len() * h.iters) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} iterations [{elapsed} < {eta}] {msg}")
            .expect("a valid template"),
    );
    let say = |line: String| {
        if bar.is_hidden() {
            println!("{line}");
        } else {
            bar.println(line);
        }
    };
    let verbose = args.verbose || rules.len() * seeds.len() == 1;
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
    let started = Instant::now();

    // The warm starts, one per seed: every rule of a seed starts from the same model.
    let bases = par_map(seeds.clone(), jobs, |seed| -> Res<(Params, f64)> {
        let t0 = Instant::now();
        let init = Params::init(arch, &mut Rng::new(seed, 0), &dev)?;
        let (base, sft_steps, sft_acc) =
            rl::warm_start(&init, &h.task, seed, &sft, &dev)?;
        let base_acc = rl::accuracy(&base, &h.task, &eval_set, None, &dev)?;
        say(format!(
            "seed {seed}: warm start of {} parameters, {sft_steps} supervised steps, sampled validation accuracy {sft_acc:.3}, greedy held-out {base_acc:.3} ({:.1} s)",
            base.count(),
            t0.elapsed().as_secs_f64()
        ));
        Ok((base, base_acc))
    })
    .into_iter()
    .collect::<Res<Vec<_>>>()?;

    // The runs, seed-major.
    let work: Vec<(usize, usize)> = (0..seeds.len())
        .flat_map(|s| (0..rules.len()).map(move |r| (s, r)))
        .collect();
    let runs = par_map(work, jobs, |(si, ri)| -> Res<RunSummary> {
        let (seed, (name, cfg)) = (seeds[si], &rules[ri]);
        let (base, base_acc) = (&bases[si].0, bases[si].1);
        let t0 = Instant::now();
        let on_iter = |l: &IterLog| {
            bar.inc(1);
            bar.set_message(format!(
                "{name} seed {seed}: reward {:.3} masked {:.3} kl {:.2e}",
                l.reward, l.masked_frac, l.kl_k3
            ));
            if verbose {
                say(format!(
                    "{name} seed {seed} iter {:>3}: reward {:.3} acc {} entropy {:.3} masked {:.4} (token {:.4}, budget {:.4}) kl_k3 {:.2e} (last step {:.2e}) grad norm {:.3} {:.2} s",
                    l.iter,
                    l.reward,
                    if l.accuracy.is_nan() { "  -  ".into() } else { format!("{:.3}", l.accuracy) },
                    l.entropy,
                    l.masked_frac,
                    l.masked_token,
                    l.masked_budget,
                    l.kl_k3,
                    l.kl_k3_last,
                    l.grad_norm,
                    l.secs
                ));
            }
        };
        let result = rl::train(base, cfg, &h, seed, &eval_set, &dev, on_iter)?;
        let mut logs = vec![IterLog {
            iter: 0,
            accuracy: base_acc,
            ..nan_log()
        }];
        logs.extend(result.logs);
        let summary = RunSummary {
            rule: name.clone(),
            seed,
            logs,
            error: result.error,
            base_accuracy: base_acc,
            secs: t0.elapsed().as_secs_f64(),
        };
        let path = args.out.join(format!("{name}_seed{seed}.csv"));
        write(&path, &summary.csv())?;
        // Iterations a run skipped by ending early still count on the bar.
        let done = summary.logs.len() as u64 - 1;
        bar.inc((h.iters as u64).saturating_sub(done));
        say(format!(
            "{name} seed {seed}: final acc {:.3}, best {:.3}, mean {:.3}{}{} ({:.1} s) -> {}",
            summary.final_accuracy(),
            summary.best_accuracy(),
            summary.mean_accuracy(),
            if summary.collapsed() { ", COLLAPSED" } else { "" },
            summary
                .error
                .as_deref()
                .map(|e| format!(", stopped: {e}"))
                .unwrap_or_default(),
            summary.secs,
            path.display()
        ));
        Ok(summary)
    })
    .into_iter()
    .collect::<Res<Vec<_>>>()?;
    bar.finish_and_clear();
    let names: Vec<String> = rules.iter().map(|(n, _)| n.clone()).collect();
    let table = report::table(&runs, &names);
    println!("\n{setting}\n");
    println!("{table}");
    println!(
        "final = mean greedy accuracy over the last {} evaluations; mean = over all evaluations; ± = sample sd over seeds; collapse = final < best / 2 or a non-finite loss; total {:.1} s",
        report::FINAL_WINDOW,
        started.elapsed().as_secs_f64()
    );
    write(&args.out.join("runs.csv"), &report::runs_csv(&runs))?;
    write(
        &args.out.join("summary.md"),
        &format!("{setting}\n\n{table}"),
    )?;
    if args.compare {
        let svg = report::plot_svg(&runs, &names, &setting);
        let path = args.out.join("curves.svg");
        write(&path, &svg)?;
        println!("plot: {}", path.display());
    }
    Ok(runs)
}

/// `f` over `items` on `jobs` threads; results in the order of `items`.
fn par_map<T: Send, R: Send>(items: Vec<T>, jobs: usize, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let n = items.len();
    let queue = Mutex::new(items.into_iter().enumerate().collect::<Vec<_>>());
    queue.lock().expect("not poisoned").reverse();
    let results = Mutex::new((0..n).map(|_| None).collect::<Vec<Option<R>>>());
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, n.max(1)) {
            scope.spawn(|| {
                loop {
                    let Some((i, item)) = queue.lock().expect("not poisoned").pop() else {
                        break;
                    };
                    let r = f(item);
                    results.lock().expect("not poisoned")[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .expect("not poisoned")
        .into_iter()
        .map(|r| r.expect("every item ran"))
        .collect()
}

fn write(path: &Path, text: &str) -> Res<()> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()).into())
}

fn nan_log() -> IterLog {
    IterLog {
        reward: f64::NAN,
        accuracy: f64::NAN,
        entropy: f64::NAN,
        resp_len: f64::NAN,
        flat_groups: f64::NAN,
        loss: f64::NAN,
        masked_frac: f64::NAN,
        masked_token: f64::NAN,
        masked_budget: f64::NAN,
        bypass_frac: f64::NAN,
        kl_k3: f64::NAN,
        kl_k3_last: f64::NAN,
        divergence_max: f64::NAN,
        ratio_max: f64::NAN,
        grad_norm: f64::NAN,
        ..Default::default()
    }
}
