//! `cppo inspect`: what a trust region does on a batch, or across the steps of a run.
//!
//! Order of work: check every argument and output path, read the configs, read the
//! input (a batch file, the built-in demo batch, or every step file of a directory),
//! run each rule through the library, reduce the per-token outputs by position
//! ([`crate::report`]) and check it for warnings ([`crate::warnings`]), render every
//! output (Markdown, JSON, plots, the HTML page of [`crate::html`]) to temporary files,
//! rename them all into place, and only then print the report to stdout.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::Args;
use cppo::{Config, Divergence};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::batchfile::{self, Loaded, MaxMemory, Needs};
use crate::eval::read_config;
use crate::failure::Failure;
use crate::report::{self, Analysis, Options, RuleSpec, StepResult, StepsAnalysis};
use crate::staged::{Staged, commit_all};

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The batch: an .npz (as `cppo eval` reads) or a .safetensors file with the same
    /// tensor names. Or a directory of per-step dumps named like step_000123.npz or
    /// step_000123.safetensors, for the run's trend across steps.
    #[arg(value_name = "BATCH|DIR", required_unless_present = "demo")]
    input: Option<PathBuf>,

    /// Use the built-in demo batch instead of a file: the quickstart's realistic
    /// synthetic GRPO batch (cppo::synth, 64 rows x 512 slots, seed 0).
    #[arg(long, conflicts_with = "input")]
    demo: bool,

    /// A config to run (JSON, as `cppo eval --config`); repeat for several. Each is
    /// named after its file.
    #[arg(long = "config", value_name = "CFG.json")]
    configs: Vec<PathBuf>,

    /// A named preset to run (`cppo presets` lists them); repeat for several. Each is
    /// named after the preset.
    #[arg(long = "preset", value_name = "NAME")]
    presets: Vec<String>,

    /// Also run the built-in set: GRPO ratio clip (0.2, 0.28), DPPO, CPPO budget-only
    /// (w_min = 1), CPPO weight-only (no budget), the paper's ablations (the soft gate
    /// and shuffled weights), CPPO with a fixed budget, and full CPPO (the paper's
    /// calibrated budget), at the paper's defaults (delta 0.15, delta_b 0.02, w_min 0.8)
    /// on one divergence. The default when no --config or --preset is given.
    #[arg(long)]
    compare: bool,

    /// The divergence of the built-in set, as a config names it: binary_tv (the
    /// default), binary_kl, topk_tv, topk_kl, ... A config file names its own.
    #[arg(long, value_name = "NAME")]
    divergence: Option<String>,

    /// Write the report as Markdown (with links to the plots written).
    #[arg(long, value_name = "REPORT.md")]
    report: Option<PathBuf>,

    /// Write every number of the report as JSON (each rule's library diagnostics, the
    /// per-position statistics).
    #[arg(long, value_name = "REPORT.json")]
    json: Option<PathBuf>,

    /// Write the report as one self-contained HTML page: the tables, the warnings, the
    /// plots inline as SVG (with the `plots` feature) and, for a directory, the trend of
    /// every headline number across steps. It loads nothing from the network.
    #[arg(long, value_name = "REPORT.html")]
    html: Option<PathBuf>,

    /// Write the plots as one figure, SVG or PNG by the file's extension; repeat for
    /// both. For a batch: four panels (divergence, thresholds and masked fraction by
    /// position, and the token strip chart); for a directory: the trend across steps.
    /// Needs the `plots` feature.
    #[arg(long = "plot", value_name = "FILE.svg|FILE.png")]
    plots: Vec<PathBuf>,

    /// Write each plot on its own, as SVG and PNG, into this directory (created if
    /// missing): divergence, thresholds, masked, strip (a batch) or steps (a
    /// directory). Needs the `plots` feature.
    #[arg(long, value_name = "DIR")]
    plot_dir: Option<PathBuf>,

    /// Pixel size of each figure, WxH (default 1600x1200 for the four-panel figure,
    /// 1200x750 for one plot, 1400x1000 for the steps).
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    size: Option<(u32, u32)>,

    /// Position buckets of the plots: relative position in the response, in this many
    /// equal parts.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=200))]
    buckets: u16,

    /// Rows of the strip chart, comma-separated (default: the 6 rows showing the most
    /// kinds of decision).
    #[arg(long, value_name = "ROWS", value_delimiter = ',')]
    strip_rows: Vec<usize>,

    /// The rule of the strip chart, by name (default: the last rule with a prefix
    /// budget, else the last rule).
    #[arg(long, value_name = "NAME")]
    strip_rule: Option<String>,

    /// The most memory the arrays read from a batch file (from each step file of a
    /// directory) may take: 8G by default, or e.g. 512M, 64K, 1T (binary units,
    /// 1K = 1024 bytes), or a plain byte count.
    /// Before any data is read, every array's declared shape must match what the batch
    /// needs ((B, L), (B,) or (B, L, K), from logp's header) and the declared sizes of
    /// the arrays read, added up, must be within this limit; a file declaring more is
    /// refused with exit code 2. A safetensors header may be at most 100 MB; inputs
    /// must be regular files.
    #[arg(long, value_name = "BYTES", default_value = batchfile::DEFAULT_MAX_MEMORY, value_parser = MaxMemory::parse)]
    max_memory: MaxMemory,

    /// The names the batch file's arrays go by: crate (logp, logp_old, advantages, mask,
    /// ...), verl or trl.
    #[arg(long, value_enum, default_value_t = crate::names::Names::Crate, long_help = crate::names::names_help())]
    names: crate::names::Names,
}

/// The largest figure side, in pixels.
const MAX_SIDE: u32 = 8000;
/// The smallest figure side, in pixels.
const MIN_SIDE: u32 = 200;
/// Steps listed in the terminal.
const TERMINAL_STEPS: usize = 30;
/// A progress bar is shown (on a terminal) for more step files than this...
const PROGRESS_FILES: usize = 20;
/// ... or more bytes than this in all.
const PROGRESS_BYTES: u64 = 64 << 20;

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("expected WxH in pixels, e.g. 1600x1200, got {s:?}");
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let (w, h): (u32, u32) = (
        w.trim().parse().map_err(|_| bad())?,
        h.trim().parse().map_err(|_| bad())?,
    );
    if !(MIN_SIDE..=MAX_SIDE).contains(&w) || !(MIN_SIDE..=MAX_SIDE).contains(&h) {
        return Err(format!(
            "each side must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {w}x{h}"
        ));
    }
    Ok((w, h))
}

/// A plot file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlotFormat {
    Svg,
    Png,
}

impl PlotFormat {
    fn of(path: &Path) -> Result<Self, Failure> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("svg") => Ok(Self::Svg),
            Some("png") => Ok(Self::Png),
            _ => Err(Failure::Input(format!(
                "--plot {}: the file name must end in .svg or .png",
                path.display()
            ))),
        }
    }

    pub fn ext(self) -> &'static str {
        match self {
            Self::Svg => "svg",
            Self::Png => "png",
        }
    }
}

/// What the input is.
enum Source<'a> {
    Demo,
    File(&'a Path),
    Dir(&'a Path),
}

/// Runs `cppo inspect`.
pub fn run(args: &InspectArgs) -> Result<(), Failure> {
    let source = match (&args.input, args.demo) {
        (_, true) => Source::Demo,
        (Some(p), false) if p.is_dir() => Source::Dir(p),
        (Some(p), false) => Source::File(p),
        (None, false) => {
            return Err(Failure::Input(
                "give a batch file, a directory of step files, or --demo".into(),
            ));
        }
    };
    let steps = matches!(source, Source::Dir(_));
    if steps && (!args.strip_rows.is_empty() || args.strip_rule.is_some()) {
        return Err(Failure::Input(
            "--strip-rows and --strip-rule apply to one batch, not to a directory of steps".into(),
        ));
    }
    let plots = plot_outputs(args, steps)?;
    check_distinct(args, &plots)?;
    let rules = rules(args)?;

    let written = match source {
        Source::Dir(dir) => inspect_steps(dir, &rules, args, &plots)?,
        Source::Demo => {
            let spec = batchfile::demo_spec(needs(&rules));
            let label = format!(
                "the built-in demo batch (cppo::synth as in examples/quickstart.rs: {} rows \
                 × {} slots, seed {})",
                spec.rows, spec.len, spec.seed
            );
            let loaded = batchfile::demo(needs(&rules));
            let context = |e: cppo::Error| Failure::Input(format!("demo batch: {e}"));
            let names = (label, "built-in demo batch".to_string());
            inspect_batch(&loaded, names, &context, &rules, args, &plots)?
        }
        Source::File(path) => {
            let loaded = batchfile::load_named(path, needs(&rules), args.max_memory, args.names)?;
            let read_as = loaded.read_as();
            let context =
                |e: cppo::Error| Failure::Input(format!("{}: {e}{read_as}", path.display()));
            let name = path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into(),
            );
            let names = (path.display().to_string(), name);
            inspect_batch(&loaded, names, &context, &rules, args, &plots)?
        }
    };
    let mut out = io::stdout().lock();
    // Everything is in place; a closed stdout is not worth failing over.
    let _ = out.write_all(written.report.as_bytes());
    for path in &written.files {
        let _ = writeln!(out, "wrote {}", path.display());
    }
    Ok(())
}

fn needs(rules: &[RuleSpec]) -> Needs {
    let configs: Vec<Config> = rules.iter().map(|r| r.config).collect();
    Needs::of(&configs)
}

/// The rules: each --config (named after its file), then the built-in set with
/// --compare or when no config is given.
fn rules(args: &InspectArgs) -> Result<Vec<RuleSpec>, Failure> {
    let builtin = args.compare || (args.configs.is_empty() && args.presets.is_empty());
    let divergence = match &args.divergence {
        None => Divergence::default(),
        Some(_) if !builtin => {
            return Err(Failure::Input(
                "--divergence sets the divergence of the built-in set (--compare); a config \
                 file names its own"
                    .into(),
            ));
        }
        Some(name) => serde_json::from_value(serde_json::Value::String(name.clone()))
            .map_err(|e| Failure::Input(format!("--divergence {name:?}: {e}")))?,
    };
    let mut rules = Vec::new();
    let mut names = HashSet::new();
    for path in &args.configs {
        let config = read_config(path)?;
        let stem = path
            .file_stem()
            .map_or("config".into(), |s| s.to_string_lossy().into_owned());
        let mut name = stem.clone();
        let mut k = 2;
        while !names.insert(name.clone()) {
            name = format!("{stem} ({k})");
            k += 1;
        }
        rules.push(RuleSpec { name, config });
    }
    for p in &args.presets {
        let config = crate::eval::preset(p)?;
        let mut name = p.clone();
        let mut k = 2;
        while !names.insert(name.clone()) {
            name = format!("{p} ({k})");
            k += 1;
        }
        rules.push(RuleSpec { name, config });
    }
    if builtin {
        let set = report::compare_set(divergence)
            .map_err(|e| Failure::Input(format!("the built-in set: {e}")))?;
        for r in set {
            let mut name = r.name.clone();
            let mut k = 2;
            while !names.insert(name.clone()) {
                name = format!("{} ({k})", r.name);
                k += 1;
            }
            rules.push(RuleSpec { name, ..r });
        }
    }
    Ok(rules)
}

/// A plot file to write: its path, format and what it shows.
#[cfg_attr(not(feature = "plots"), allow(dead_code))]
pub struct PlotOut {
    pub path: PathBuf,
    pub format: PlotFormat,
    pub kind: PlotKind,
}

/// Which figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlotKind {
    /// The four panels of a batch.
    Dashboard,
    Divergence,
    Thresholds,
    Masked,
    Strip,
    /// The trend across the steps of a run.
    Steps,
}

impl PlotKind {
    fn file_stem(self) -> &'static str {
        match self {
            Self::Dashboard => "inspect",
            Self::Divergence => "divergence",
            Self::Thresholds => "thresholds",
            Self::Masked => "masked",
            Self::Strip => "strip",
            Self::Steps => "steps",
        }
    }

    fn caption(self) -> &'static str {
        match self {
            Self::Dashboard => {
                "Divergence, thresholds and masked fraction by position; token decisions"
            }
            Self::Divergence => "Divergence by position",
            Self::Thresholds => "Token limit and mean effective threshold by position",
            Self::Masked => "Masked fraction by position",
            Self::Strip => "Token decisions in a few rows",
            Self::Steps => "Masked fraction and mean divergence across steps",
        }
    }

    /// The default size of this figure.
    fn size(self) -> (u32, u32) {
        match self {
            Self::Dashboard => (1600, 1200),
            Self::Steps => (1400, 1000),
            _ => (1200, 750),
        }
    }
}

fn plot_outputs(args: &InspectArgs, steps: bool) -> Result<Vec<PlotOut>, Failure> {
    let mut out = Vec::new();
    let main = if steps {
        PlotKind::Steps
    } else {
        PlotKind::Dashboard
    };
    for path in &args.plots {
        out.push(PlotOut {
            path: path.clone(),
            format: PlotFormat::of(path)?,
            kind: main,
        });
    }
    if let Some(dir) = &args.plot_dir {
        if dir.exists() && !dir.is_dir() {
            return Err(Failure::Input(format!(
                "--plot-dir {} exists and is not a directory",
                dir.display()
            )));
        }
        let kinds: &[PlotKind] = if steps {
            &[PlotKind::Steps]
        } else {
            &[
                PlotKind::Divergence,
                PlotKind::Thresholds,
                PlotKind::Masked,
                PlotKind::Strip,
            ]
        };
        for &kind in kinds {
            for format in [PlotFormat::Svg, PlotFormat::Png] {
                out.push(PlotOut {
                    path: dir.join(format!("{}.{}", kind.file_stem(), format.ext())),
                    format,
                    kind,
                });
            }
        }
    }
    if !out.is_empty() && !cfg!(feature = "plots") {
        return Err(Failure::Input(
            "this cppo was built without plots: rebuild with `--features plots` for --plot \
             and --plot-dir"
                .into(),
        ));
    }
    Ok(out)
}

/// No two outputs may be the same file.
fn check_distinct(args: &InspectArgs, plots: &[PlotOut]) -> Result<(), Failure> {
    let mut seen = HashSet::new();
    let all = args
        .report
        .iter()
        .chain(&args.json)
        .chain(&args.html)
        .chain(plots.iter().map(|p| &p.path));
    for path in all {
        if !seen.insert(path) {
            return Err(Failure::Input(format!(
                "{} is given as two outputs",
                path.display()
            )));
        }
    }
    Ok(())
}

/// What a run produced: the terminal report and the files written.
struct Written {
    report: String,
    files: Vec<PathBuf>,
}

fn inspect_batch(
    loaded: &Loaded,
    names: (String, String),
    context: &dyn Fn(cppo::Error) -> Failure,
    rules: &[RuleSpec],
    args: &InspectArgs,
    plots: &[PlotOut],
) -> Result<Written, Failure> {
    let opts = Options {
        buckets: usize::from(args.buckets),
        strip_rows: args.strip_rows.clone(),
        strip_rule: args.strip_rule.clone(),
    };
    let analysis = match loaded {
        Loaded::F32(a) => report::analyse(a, names, rules, &opts, context)?,
        Loaded::F64(a) => report::analyse(a, names, rules, &opts, context)?,
    };
    let terminal = report::batch_report(&analysis, &[]).text();
    write_outputs(
        args,
        plots,
        &Figures::Batch(&analysis),
        |images| report::batch_report(&analysis, images).markdown(),
        &analysis,
        terminal,
    )
}

/// The data a figure is drawn from.
#[cfg_attr(not(feature = "plots"), allow(dead_code))]
pub enum Figures<'a> {
    Batch(&'a Analysis),
    Steps(&'a StepsAnalysis),
}

/// Renders every output to a temporary file, then renames them all into place.
fn write_outputs(
    args: &InspectArgs,
    plots: &[PlotOut],
    figures: &Figures<'_>,
    markdown: impl FnOnce(&[(String, String)]) -> String,
    json: &impl serde::Serialize,
    terminal: String,
) -> Result<Written, Failure> {
    let created_dir = match &args.plot_dir {
        Some(dir) if !dir.exists() => {
            fs::create_dir_all(dir).map_err(|e| {
                Failure::system(format!("cannot create --plot-dir {}", dir.display()), &e)
            })?;
            Some(dir.clone())
        }
        _ => None,
    };
    let result = stage_and_commit(args, plots, figures, markdown, json);
    if result.is_err()
        && let Some(dir) = created_dir
    {
        // Only if still empty: nothing of ours is left in it.
        let _ = fs::remove_dir(dir);
    }
    Ok(Written {
        report: terminal,
        files: result?,
    })
}

fn stage_and_commit(
    args: &InspectArgs,
    plots: &[PlotOut],
    figures: &Figures<'_>,
    markdown: impl FnOnce(&[(String, String)]) -> String,
    json: &impl serde::Serialize,
) -> Result<Vec<PathBuf>, Failure> {
    let mut staged = Vec::new();
    let mut files = Vec::new();
    for plot in plots {
        let size = args.size.unwrap_or_else(|| plot.kind.size());
        let bytes = render(figures, plot, size)?;
        staged.push(Staged::write(&plot.path, |mut w| {
            w.write_all(&bytes)?;
            Ok::<_, io::Error>(w)
        })?);
        files.push(plot.path.clone());
    }
    if let Some(path) = &args.report {
        let images: Vec<(String, String)> = plots
            .iter()
            .map(|p| (p.kind.caption().to_string(), link(path, &p.path)))
            .collect();
        let text = markdown(&images);
        staged.push(Staged::write(path, |mut w| {
            w.write_all(text.as_bytes())?;
            Ok::<_, io::Error>(w)
        })?);
        files.push(path.clone());
    }
    if let Some(path) = &args.html {
        let page = crate::html::page(figures)
            .map_err(|e| Failure::System(format!("cannot draw {}: {e}", path.display())))?;
        staged.push(Staged::write(path, |mut w| {
            w.write_all(page.as_bytes())?;
            Ok::<_, io::Error>(w)
        })?);
        files.push(path.clone());
    }
    if let Some(path) = &args.json {
        staged.push(Staged::write(path, |mut w| {
            serde_json::to_writer_pretty(&mut w, json)?;
            w.write_all(b"\n").map_err(serde_json::Error::io)?;
            Ok::<_, serde_json::Error>(w)
        })?);
        files.push(path.clone());
    }
    commit_all(staged)?;
    Ok(files)
}

/// How the Markdown report at `report` links to `target`: relative when both are in
/// the same directory or the target is below it, else the path as given.
fn link(report: &Path, target: &Path) -> String {
    let base = report.parent().unwrap_or(Path::new(""));
    target
        .strip_prefix(base)
        .unwrap_or(target)
        .to_string_lossy()
        .replace('\\', "/")
}

#[cfg(feature = "plots")]
fn render(figures: &Figures<'_>, plot: &PlotOut, size: (u32, u32)) -> Result<Vec<u8>, Failure> {
    crate::plots::render(figures, plot.kind, plot.format, size)
        .map_err(|e| Failure::System(format!("cannot draw {}: {e}", plot.path.display())))
}

#[cfg(not(feature = "plots"))]
fn render(_: &Figures<'_>, plot: &PlotOut, _: (u32, u32)) -> Result<Vec<u8>, Failure> {
    // plot_outputs refuses plots without the feature; this is not reached.
    Err(Failure::Input(format!(
        "cannot draw {}: this cppo was built without plots",
        plot.path.display()
    )))
}

// ---------------------------------------------------------------------------------------
// A directory of steps
// ---------------------------------------------------------------------------------------

/// The step files of a directory, by step number: `step_` and digits, then `.npz` or
/// `.safetensors`. Other files are ignored.
fn step_files(dir: &Path) -> Result<Vec<(u64, PathBuf, u64)>, Failure> {
    let entries = fs::read_dir(dir)
        .map_err(|e| Failure::input(format!("cannot read directory {}", dir.display()), &e))?;
    let mut steps: BTreeMap<u64, (PathBuf, u64)> = BTreeMap::new();
    for entry in entries {
        let entry = entry
            .map_err(|e| Failure::input(format!("cannot read directory {}", dir.display()), &e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((stem, ext)) = name.rsplit_once('.') else {
            continue;
        };
        if !(ext.eq_ignore_ascii_case("npz") || ext.eq_ignore_ascii_case("safetensors")) {
            continue;
        }
        let Some(digits) = stem.strip_prefix("step_") else {
            continue;
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(step) = digits.parse::<u64>() else {
            return Err(Failure::Input(format!(
                "{}: step number {digits} is too large",
                entry.path().display()
            )));
        };
        let path = entry.path();
        let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
        if let Some((other, _)) = steps.insert(step, (path.clone(), len)) {
            return Err(Failure::Input(format!(
                "{} and {} are both step {step}",
                other.display(),
                path.display()
            )));
        }
    }
    if steps.is_empty() {
        return Err(Failure::Input(format!(
            "{} holds no step files (step_<N>.npz or step_<N>.safetensors)",
            dir.display()
        )));
    }
    Ok(steps.into_iter().map(|(s, (p, l))| (s, p, l)).collect())
}

fn inspect_steps(
    dir: &Path,
    rules: &[RuleSpec],
    args: &InspectArgs,
    plots: &[PlotOut],
) -> Result<Written, Failure> {
    let files = step_files(dir)?;
    let bytes: u64 = files.iter().map(|f| f.2).sum();
    let bar = progress_bar(files.len(), bytes);
    let needs = needs(rules);
    let mut steps = Vec::with_capacity(files.len());
    let result = (|| {
        for (step, path, _) in &files {
            if let Some(bar) = &bar {
                bar.set_message(
                    path.file_name()
                        .map_or(String::new(), |n| n.to_string_lossy().into_owned()),
                );
            }
            let loaded = batchfile::load_named(path, needs, args.max_memory, args.names)?;
            let read_as = loaded.read_as();
            let context =
                |e: cppo::Error| Failure::Input(format!("{}: {e}{read_as}", path.display()));
            let (diagnostics, warnings) = match &loaded {
                Loaded::F32(a) => report::step_diagnostics(a, rules, &context)?,
                Loaded::F64(a) => report::step_diagnostics(a, rules, &context)?,
            };
            steps.push(StepResult {
                step: *step,
                file: path.display().to_string(),
                diagnostics,
                warnings,
            });
            if let Some(bar) = &bar {
                bar.inc(1);
            }
        }
        Ok::<_, Failure>(())
    })();
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    result?;
    let analysis = StepsAnalysis {
        dir: dir.display().to_string(),
        rules: rules.to_vec(),
        steps,
    };
    let terminal = report::steps_report(&analysis, Some(TERMINAL_STEPS), &[]).text();
    write_outputs(
        args,
        plots,
        &Figures::Steps(&analysis),
        |images| report::steps_report(&analysis, None, images).markdown(),
        &analysis,
        terminal,
    )
}

/// A progress bar on stderr, when stderr is a terminal and the work is long: many files
/// or large ones.
fn progress_bar(files: usize, bytes: u64) -> Option<ProgressBar> {
    if !io::stderr().is_terminal() || (files <= PROGRESS_FILES && bytes <= PROGRESS_BYTES) {
        return None;
    }
    let bar = ProgressBar::with_draw_target(Some(files as u64), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{bar:40} {pos}/{len} steps, {elapsed} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}
