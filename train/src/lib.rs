//! A small RLVR trainer in Rust that learns with `cppo`: a transformer policy written in
//! candle learns a digit task from a 0/1 checker reward (sorting, or the running-sum
//! chain whose errors compound), with GRPO advantages and the trust-region mask, loss
//! and exact gradient dL/dlogp all computed by the crate.
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
//! The running-sum experiment (`--task sum --horizon T`) adds a fourth knob, the rollout
//! temperature `--tau-mu`, a shared objective for every arm (`--is-cap`), arms with
//! parameters (`dppo:delta=0.1`, the module `arms`), warm starts cached on disk and
//! shared by seeds (`--warm-cache`, `--warm-seed`), measurements by response position
//! (the module `probe`), and `--analyze`, which reads finished cells and writes the
//! paired statistics (the modules `analyze` and [`stats`]). `train/experiment.sh` runs
//! it phase by phase.
//!
//! See TRAINING.md for the results.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Device;
use clap::Parser;
use cppo::Config;
use indicatif::{ProgressBar, ProgressStyle};

mod analyze;
mod arms;
mod model;
mod probe;
mod report;
mod rl;
mod rng;
pub mod stats;
mod task;

use model::{Arch, Params};
pub use report::RunSummary;
use rl::{Hyper, IterLog, Sft};
use rng::Rng;
use task::{Kind, Task};

/// The example's error type: candle's, the crate's, I/O and messages alike.
pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A small RLVR trainer (sorting digits, or their running sums) that learns with cppo's losses.
#[derive(Parser, Debug, Clone)]
#[command(name = "train", args_override_self = true)]
pub struct Args {
    /// Run every rule in --rules for every seed in --seeds, print the table and plot the
    /// learning curves.
    #[arg(long)]
    pub compare: bool,
    /// A small, fast setting (under a minute in release) for smoke tests.
    #[arg(long)]
    pub quick: bool,
    /// The rule of a single run: an arm, `NAME` or `NAME:key=value:...` (grpo, dppo,
    /// cppo, cppo_weights, cppo_budget, cppo_shuffled, cppo_soft, or any rule kind with
    /// its defaults: none, ratio, trm_avg, ...; keys are the config's rule fields).
    #[arg(long, default_value = "cppo")]
    pub rule: String,
    /// A JSON config (the schema of `cppo::doc::command_line`) for a single run, instead
    /// of --rule.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The arms of --compare, comma-separated (as for --rule).
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
    /// The task: `sort` (sort the digits) or `sum` (their running sums mod 10, where
    /// errors compound; its length is --horizon).
    #[arg(long, default_value = "sort")]
    pub task: String,
    /// Digits to sort (--task sort).
    #[arg(long)]
    pub digits: Option<usize>,
    /// The running sum's horizon T: digits per prompt and response tokens before EOS
    /// (--task sum).
    #[arg(long)]
    pub horizon: Option<usize>,
    /// Rollout temperature τ_μ: rollouts are sampled at τ_μ and `logp_old` is their
    /// log-prob at τ_μ, while the policy is trained at temperature 1 (a fixed
    /// per-token behaviour mismatch).
    #[arg(long)]
    pub tau_mu: Option<f64>,
    /// The objective every arm shares: detached IS with this cap C (verl PR 6731's
    /// `clip_ratio_c`), instead of each preset's plain surrogate.
    #[arg(long)]
    pub is_cap: Option<f64>,
    /// Warm start: supervised steps until this sampled (temperature 1) accuracy on a
    /// validation set.
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
    /// Held-out prompts for the greedy and sampled accuracies (never used for training).
    #[arg(long)]
    pub eval_prompts: Option<usize>,
    /// Samples per held-out prompt for the sampled accuracy Avg@k (0 for greedy only;
    /// default 0 for sort, 4 for sum).
    #[arg(long)]
    pub eval_samples: Option<usize>,
    /// Keep warm starts in this directory and reuse them: a run whose task, size,
    /// architecture, warm-start settings and seed match a saved one loads it instead of
    /// training it again (the supervised phase dominates a short run's time).
    #[arg(long)]
    pub warm_cache: Option<PathBuf>,
    /// The warm start's seed, shared by every seed of the run (default: each seed has
    /// its own). With it, seeds differ only in their RL streams (prompts, samples,
    /// shuffles).
    #[arg(long)]
    pub warm_seed: Option<u64>,
    /// Analyse finished cells instead of training: the output directories of earlier
    /// `--compare` runs, comma-separated. Writes report.md, horizon.svg and
    /// positions.svg to --out.
    #[arg(long, value_delimiter = ',')]
    pub analyze: Vec<PathBuf>,
    /// --analyze: the arm every other arm is compared with, seed by seed.
    #[arg(long, default_value = "dppo")]
    pub reference: String,
    /// --analyze: the endpoint, a column of runs.csv.
    #[arg(long, default_value = "sampled_auc")]
    pub endpoint: String,
    /// --analyze: the primary comparison, fixed before the runs, as DIR:ARM (reported
    /// without the Holm correction that every other comparison gets).
    #[arg(long)]
    pub primary: Option<String>,
    /// --analyze: arms to rename, comma-separated `RULE=>NAME`, so that rules whose
    /// labels differ across cells (a threshold tuned per horizon) count as one arm in
    /// the trends: `--rename "cppo:delta_b=0.02=>cppo tuned,cppo:delta_b=0.01=>cppo tuned"`.
    #[arg(long, value_delimiter = ',')]
    pub rename: Vec<String>,
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
    let kind = Kind::parse(&a.task)?;
    let n = match kind {
        Kind::Sort if a.horizon.is_some() => return Err("--horizon is for --task sum".into()),
        Kind::Sum if a.digits.is_some() => return Err("--digits is for --task sort".into()),
        Kind::Sort => a.digits.unwrap_or(if q { 6 } else { 8 }),
        Kind::Sum => a.horizon.unwrap_or(if q { 4 } else { 16 }),
    };
    let task = Task { kind, n };
    let sum = kind == Kind::Sum;
    let h = Hyper {
        task,
        iters: a.iters.unwrap_or(match (q, sum) {
            (true, _) => 15,
            (false, true) => 40,
            (false, false) => 60,
        }),
        prompts: a.prompts.unwrap_or(if q || sum { 16 } else { 32 }),
        group: a.group.unwrap_or(8),
        minibatches: a.minibatches.unwrap_or(4),
        epochs: a.epochs.unwrap_or(1),
        lag: a.lag.unwrap_or(4),
        lr: a.lr.unwrap_or(3e-4),
        weight_decay: 0.0,
        grad_clip: a.grad_clip.unwrap_or(1.0),
        eval_every: a.eval_every.unwrap_or(if sum { 5 } else { 1 }),
        eval_prompts: a.eval_prompts.unwrap_or(if q || sum { 128 } else { 512 }),
        eval_samples: a.eval_samples.unwrap_or(if sum { 4 } else { 0 }),
        tau_mu: a.tau_mu.unwrap_or(1.0),
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
        (
            h.tau_mu > 0.0 && h.tau_mu <= 100.0,
            "--tau-mu must be in (0, 100]",
        ),
        (
            a.is_cap.is_none_or(|c| c > 0.0),
            "--is-cap must be positive",
        ),
    ];
    if let Some((_, msg)) = checks.iter().find(|(ok, _)| !ok) {
        return Err((*msg).into());
    }
    Ok((h, arch, sft))
}

/// The objective every arm shares: `--is-cap`'s detached IS, or each preset's own.
fn shared_objective(a: &Args) -> Option<cppo::objective::Objective> {
    a.is_cap
        .map(|ratio_cap| cppo::objective::Objective::DetachedIs { ratio_cap })
}

/// An arm's name as a file name: `dppo:delta=0.1` -> `dppo_delta-0.1`.
pub(crate) fn file_stem(arm: &str) -> String {
    arm.replace(':', "_").replace('=', "-")
}

/// Runs the trainer with `args`; returns the finished runs.
pub fn run(args: Args) -> Res<Vec<RunSummary>> {
    if !args.analyze.is_empty() {
        let primary = match &args.primary {
            Some(p) => {
                let (dir, arm) = p
                    .split_once(':')
                    .ok_or_else(|| format!("--primary {p:?}: expected DIR:ARM"))?;
                Some((PathBuf::from(dir), arm.to_string()))
            }
            None => None,
        };
        let rename = args
            .rename
            .iter()
            .map(|r| {
                r.split_once("=>")
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| format!("--rename {r:?}: expected RULE=>NAME"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let report = analyze::run(&analyze::Plan {
            dirs: &args.analyze,
            reference: &args.reference,
            endpoint: &args.endpoint,
            primary,
            rename: &rename,
            out: &args.out,
        })?;
        println!("{report}");
        println!("report, horizon.svg, positions.svg: {}", args.out.display());
        return Ok(Vec::new());
    }
    let dev = Device::Cpu;
    let (h, arch, sft) = hyper(&args)?;
    if args.compare && args.config.is_some() {
        return Err("--config is for a single run; --compare takes --rules".into());
    }
    let objective = shared_objective(&args);
    let rules: Vec<(String, Config)> = if args.compare {
        args.rules
            .iter()
            .map(|r| Ok((r.clone(), arms::config(r, objective)?)))
            .collect::<Res<_>>()?
    } else if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--config {}: {e}", path.display()))?;
        let mut cfg: Config =
            serde_json::from_str(&text).map_err(|e| format!("--config {}: {e}", path.display()))?;
        if let Some(o) = objective {
            cfg.objective = o;
        }
        vec![(cfg.rule.name().to_string(), cfg)]
    } else {
        vec![(args.rule.clone(), arms::config(&args.rule, objective)?)]
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
        "{} {} digits; d_model {}, {} layers; {} prompts x G {} per batch; {} minibatches x {} epochs = {} steps per rollout; lag {}; rollout temperature {}; objective {}; lr {}; grad clip {}; {} iterations; seeds {:?}",
        h.task.kind.name(),
        h.task.n,
        arch.d_model,
        arch.layers,
        h.prompts,
        h.group,
        h.minibatches,
        h.epochs,
        h.steps_per_rollout(),
        h.lag,
        h.tau_mu,
        objective.map_or("each preset's".to_string(), |o| format!("{o:?}")),
        h.lr,
        h.grad_clip,
        h.iters,
        seeds
    );
    println!("{setting}");
    // What `--analyze` needs to know about this cell.
    let cell = serde_json::json!({
        "task": h.task.kind.name(),
        "n": h.task.n,
        "lag": h.lag,
        "tau_mu": h.tau_mu,
        "minibatches": h.minibatches,
        "epochs": h.epochs,
        "lr": h.lr,
        "is_cap": args.is_cap,
        "iters": h.iters,
        "seeds": seeds,
        "arms": rules.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        "setting": setting,
    });
    write(
        &args.out.join("setting.json"),
        &serde_json::to_string_pretty(&cell)?,
    )?;

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

    // The warm starts, one per warm seed (each seed's own, or --warm-seed's for all):
    // every rule of a seed starts from the same model.
    let warm_seed_of = |seed: u64| args.warm_seed.unwrap_or(seed);
    let mut warm_seeds: Vec<u64> = seeds.iter().map(|&s| warm_seed_of(s)).collect();
    warm_seeds.sort_unstable();
    warm_seeds.dedup();
    let warm = par_map(warm_seeds.clone(), jobs, |warm_seed| -> Res<Params> {
        let t0 = Instant::now();
        let cached = args.warm_cache.as_ref().map(|dir| {
            dir.join(format!(
                "{}{}_d{}_l{}_target{}_batch{}_max{}_seed{warm_seed}.safetensors",
                h.task.kind.name(),
                h.task.n,
                arch.d_model,
                arch.layers,
                sft.target,
                sft.batch,
                sft.max_steps
            ))
        });
        let (base, sft_steps, sft_acc) = match &cached {
            Some(path) if path.exists() => {
                let base = Params::load(arch, path, &dev)?;
                // Its sampled validation accuracy, measured as the warm start measures it.
                let acc = rl::validation_accuracy(&base, &h.task, warm_seed, &dev)?;
                (base, 0, acc)
            }
            _ => {
                let init = Params::init(arch, &mut Rng::new(warm_seed, 0), &dev)?;
                let trained = rl::warm_start(&init, &h.task, warm_seed, &sft, &dev)?;
                if let Some(path) = &cached {
                    std::fs::create_dir_all(path.parent().expect("a file in a directory"))?;
                    trained.0.save(path)?;
                }
                trained
            }
        };
        // The per-token accuracy a sampled sequence accuracy implies, if its tokens were
        // right independently: acc^(1/tokens).
        let per_token = sft_acc.powf(1.0 / h.task.response_len() as f64);
        say(format!(
            "warm start {warm_seed}: {} parameters, {sft_steps} supervised steps{}, sampled validation accuracy {sft_acc:.3} (per token {per_token:.4}) ({:.1} s)",
            base.count(),
            if sft_steps == 0 { " (loaded from --warm-cache)" } else { "" },
            t0.elapsed().as_secs_f64()
        ));
        Ok(base)
    })
    .into_iter()
    .collect::<Res<Vec<_>>>()?;
    // Each seed's base and its held-out accuracies before RL.
    let bases = par_map(seeds.clone(), jobs, |seed| -> Res<(Params, f64, f64)> {
        let k = warm_seeds
            .iter()
            .position(|&w| w == warm_seed_of(seed))
            .expect("every seed has its warm start");
        let base = warm[k].clone();
        let base_acc = rl::accuracy(&base, &h.task, &eval_set, None, &dev)?;
        let base_sampled = if h.eval_samples > 0 {
            rl::sampled_accuracy(
                &base,
                &h.task,
                &eval_set,
                h.eval_samples,
                &mut rl::eval_rng(seed, 0),
                &dev,
            )?
        } else {
            f64::NAN
        };
        say(format!(
            "seed {seed}: base held-out accuracy greedy {base_acc:.3}, sampled {base_sampled:.3}"
        ));
        Ok((base, base_acc, base_sampled))
    })
    .into_iter()
    .collect::<Res<Vec<_>>>()?;

    // The runs, seed-major.
    let work: Vec<(usize, usize)> = (0..seeds.len())
        .flat_map(|s| (0..rules.len()).map(move |r| (s, r)))
        .collect();
    let runs = par_map(work, jobs, |(si, ri)| -> Res<RunSummary> {
        let (seed, (name, cfg)) = (seeds[si], &rules[ri]);
        let (base, base_acc, base_sampled) = (&bases[si].0, bases[si].1, bases[si].2);
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
            sampled_accuracy: base_sampled,
            ..nan_log()
        }];
        logs.extend(result.logs);
        let summary = RunSummary {
            rule: name.clone(),
            seed,
            logs,
            probe: result.probe,
            error: result.error,
            base_accuracy: base_acc,
            base_sampled,
            expected_evals: h.evaluations() + 1,
            secs: t0.elapsed().as_secs_f64(),
        };
        let stem = file_stem(name);
        let path = args.out.join(format!("{stem}_seed{seed}.csv"));
        write(&path, &summary.csv())?;
        write(
            &args.out.join(format!("{stem}_seed{seed}_pos.csv")),
            &summary.probe.csv(),
        )?;
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
        sampled_accuracy: f64::NAN,
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
        bypass_grad_share: f64::NAN,
        ..Default::default()
    }
}
