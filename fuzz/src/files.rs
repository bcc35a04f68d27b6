//! The files target: valid, mutated and crafted batch files through `cppo eval` and
//! `cppo inspect`, checking the command-line contract (`docs/command_line.md`) under
//! hostile input.
//!
//! # A case
//!
//! Each case draws from its own generator, seeded from the run's seed and the case's
//! index (so a run is reproducible), and writes one small batch file by hand with this
//! module's own `.npy`, npz and safetensors encoders:
//!
//! - a valid batch: B ≤ 8 rows, L ≤ 64 columns, float32 or float64, a mask of an
//!   accepted type (bool, an integer type, a float type), advantages per row or per
//!   token, sometimes the top-K pair, `logp_ref`, `is_weights` and an array no command
//!   reads; ordinary log-probs at response positions and garbage (NaN, ±∞, 1.0,
//!   -1e300, ...) at padding positions; npz members stored or deflated, little- or
//!   big-endian, C or Fortran order, `.npy` format 1.0, 2.0 or 3.0, named `x.npy` or
//!   `x`; safetensors with or without `__metadata__`, in any data order; now and then
//!   a batch of 0 rows, 0 columns or K = 0;
//! - sometimes hostile values, at response positions or anywhere: values outside the
//!   ranges of [`cppo::limits`] (NaN, ±∞, a log-prob above 1e-4 or below -1e4, an
//!   advantage beyond ±1e9, an IS weight below 0 or above 1e6, a non-finite float
//!   mask), and the edges of those ranges, which are valid;
//! - in most cases, one to three mutations: a declared shape that is huge, overflows or
//!   is not the batch's; another dtype; a corrupt `.npy` header (dict, magic, version,
//!   length); member data cut short or too long; a member or key dropped, renamed or
//!   duplicated; zip sizes, CRC, method or flags that lie; a deflated member that
//!   inflates to megabytes more than it declares; safetensors `data_offsets` past the
//!   end, reversed or overlapping; malformed tensor entries or `__metadata__` (nested
//!   50 000 deep); a huge or wrong safetensors header length; broken header JSON;
//!   flipped, overwritten, inserted or appended bytes; a truncated or empty file; the
//!   other format's extension.
//!
//! Its config is `{}` or a preset, sometimes with another divergence or a KL penalty.
//! Before the random cases, a run tries every [`crafted`] file.
//!
//! # The promises checked
//!
//! `cppo eval --config CFG --input FILE --output OUT.npz --stats STATS.json` and
//! `cppo inspect FILE --json REPORT.json` each run with their own empty output
//! directory, under `ulimit -v` ([`ADDRESS_SPACE_KIB`]), with two rayon threads, and a
//! hang guard ([`TIMEOUT`]). Each must:
//!
//! - exit with 0 or 2: no other code, no signal (an allocation the address-space limit
//!   refuses aborts the process), no hang, no panic (which the tool reports as an
//!   `internal error` line and exit code 2);
//! - on exit 2: print exactly one line, `error: ...`, on stderr and nothing on stdout,
//!   and leave no file at all (output or temporary) in its output directory;
//! - on exit 0: leave exactly its output files, and readable ones (the npz a zip
//!   archive holding `loss.npy`, the JSON files parseable).
//!
//! And the documented outcome, where a case knows it:
//!
//! - a file without mutations (of a batch of at least one row, column and top-K entry)
//!   is accepted if and only if its values pass the documented checks at the response
//!   positions of the arrays the command reads (padding is never read, nor are arrays
//!   the config does not use);
//! - a file with one mutation the docs name as an error (two arrays of one name, a
//!   missing array, a declared shape, dtype or size the batch or the file cannot have,
//!   a truncated file, a safetensors header longer than the file) is refused by each
//!   command that reads what the mutation broke; with several mutations, only the
//!   promises above are checked.
//!
//! A broken promise is a finding: one line on stderr, and the file written to the
//! corpus directory as `WHAT-SEED-CASE.npz` (or `.safetensors`), its config beside it
//! as `WHAT-SEED-CASE.npz.cfg.json` unless it is `{}`. [`replay`] runs such a file
//! again, and `cli/tests/fuzz_corpus.rs` replays the whole corpus.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use cppo::limits::{LOGP_TOLERANCE, MAX_ABS_ADVANTAGE, MAX_IS_WEIGHT, MIN_LOGPROB};
use cppo::{Config, Preset};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

use crate::{Opts, Report};

/// The address space each run of `cppo` gets, in KiB (`ulimit -v`): 128 MiB.
///
/// The largest batch generated (8 × 64, the top-K pair and `logp_ref` in float64)
/// runs through `eval` and `inspect` in 8 MB with the release build and in 15 MB with
/// the debug build (measured, with 2 or 64 rayon threads): the limit leaves a wide
/// margin, and is far below what a reader that trusted a declared shape of gigabytes
/// would ask for (the allocation fails and the process aborts: a finding).
pub const ADDRESS_SPACE_KIB: u64 = 131_072;

/// The hang guard: a run still going after this long is killed, and a finding.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The rayon threads each run gets (`RAYON_NUM_THREADS`), so that the address space a
/// run needs does not grow with the machine's cores.
const THREADS: &str = "2";

/// The config [`replay`] runs besides `{}`: one that reads every optional array.
const READS_EVERYTHING: &str =
    r#"{"divergence": "topk_tv", "kl": {"estimator": "k3", "coef": 0.1}}"#;

/// The suffix of a corpus file's config, beside it.
const CONFIG_SUFFIX: &str = ".cfg.json";

/// Runs the files target for `opts.seconds` against the `cppo` binary at `cppo`: first
/// every [`crafted`] file (each must be refused), then random cases until the time is
/// up. Findings are written to `opts.corpus`.
///
/// The binary is copied to a temporary directory first (where it can be run from
/// there), so that a rebuild during a long run does not pull it away. If `cppo
/// --version` cannot be run under the memory limit, the run stops at once and reports
/// one finding (with nothing written to the corpus).
pub fn run(opts: &Opts, cppo: &Path) -> Report {
    let start = Instant::now();
    let mut report = Report {
        target: "files",
        ..Report::default()
    };
    let copy = private_copy(cppo);
    let cppo = copy.as_ref().map_or(cppo, |(_, path)| path.as_path());
    if let Err(e) = preflight(cppo) {
        eprintln!("files: cannot run {}: {e}", cppo.display());
        report.findings = 1;
        report.seconds = start.elapsed().as_secs_f64();
        return report;
    }
    let mut cases = Vec::new();
    match crafted() {
        Ok(files) => {
            for (name, bytes) in files {
                let (stem, ext) = name.rsplit_once('.').unwrap_or((name, "npz"));
                cases.push((
                    format!("crafted-{stem}"),
                    Ok(Case {
                        label: format!("crafted file {name}"),
                        ext: if ext == "safetensors" { ST } else { NPZ },
                        bytes,
                        config: "{}".into(),
                        want: [Want::Refused; 2],
                    }),
                ));
            }
        }
        Err(e) => eprintln!("files: cannot craft the fixed files: {e}"),
    }
    for (id, case) in cases {
        run_one(opts, cppo, &id, case, &mut report);
    }
    let mut index = 0u64;
    while start.elapsed().as_secs_f64() < opts.seconds {
        run_one(
            opts,
            cppo,
            &format!("{}-{index}", opts.seed),
            generate(opts.seed, index),
            &mut report,
        );
        index += 1;
    }
    report.seconds = start.elapsed().as_secs_f64();
    report
}

/// Runs `cppo eval` (with the config `{}`, with one that reads every optional array,
/// and with the file's own config `FILE.cfg.json` if there is one) and `cppo inspect`
/// on `file`, as [`run`] does, and checks the promises every run must keep (not which
/// files are refused: corpus files are mostly hostile, and either outcome may be
/// right). Returns every broken promise, one per line.
pub fn replay(cppo: &Path, file: &Path) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("cannot create a directory: {e}"))?;
    let mut configs = vec!["{}".to_string(), READS_EVERYTHING.to_string()];
    let mut own = file.as_os_str().to_owned();
    own.push(CONFIG_SUFFIX);
    if let Ok(text) = fs::read_to_string(&own) {
        configs.push(text);
    }
    let mut problems = Vec::new();
    for (i, config) in configs.iter().enumerate() {
        let cfg = dir.path().join(format!("cfg-{i}.json"));
        fs::write(&cfg, config).map_err(|e| format!("cannot write {}: {e}", cfg.display()))?;
        let out = fresh_dir(dir.path(), &format!("eval-{i}"))?;
        let run = run_cppo(cppo, &eval_args(&cfg, file, &out), dir.path())?;
        for mut p in check(Cmd::Eval, &run, &out, Want::Either) {
            p.what = format!("with config {config}: {}", p.what);
            problems.push(p);
        }
    }
    let out = fresh_dir(dir.path(), "inspect")?;
    let run = run_cppo(cppo, &inspect_args(file, &out), dir.path())?;
    problems.extend(check(Cmd::Inspect, &run, &out, Want::Either));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems
            .iter()
            .map(|p| format!("{}: {}", p.tag, p.what))
            .collect::<Vec<_>>()
            .join("\n"))
    }
}

/// The batch files of a corpus directory, sorted: every regular file but dotfiles and
/// the configs beside them (`*.cfg.json`).
pub fn corpus_inputs(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && !name.starts_with('.') && !name.ends_with(CONFIG_SUFFIX)
        {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// The fixed hostile files of the corpus, by file name: each is a small batch (2 rows ×
/// 6 columns) with one defect the readers must refuse (exit code 2, one line):
///
/// - `npz-huge-shape-deflated.npz`: `logp.npy` declares (50000, 50000) float32, 10 GB,
///   in a deflated member of a few kilobytes (1 MB of zeros);
/// - `npz-shape-2pow40.npz`: `logp.npy` declares (2^40, 2) float64 over 96 bytes;
/// - `npz-duplicate-mask.npz`: two members named `mask.npy`;
/// - `npz-logp-and-logp-npy.npz`: members `logp.npy` and `logp`, one array twice;
/// - `npz-truncated.npz`: a valid archive cut to 60% of its length;
/// - `npz-inflate-bomb.npz`: `logp.npy` declares its 224 bytes (and their CRC) but
///   inflates to 8 MB more;
/// - `npz-float16-logp.npz`: `logp` of dtype `<f2`;
/// - `st-offsets-past-end.safetensors`: the last tensor's `data_offsets` end 8 bytes
///   past the file's end;
/// - `st-duplicate-logp.safetensors`: the key `logp` twice in the header;
/// - `st-header-length-2pow40.safetensors`: a header length of 2^40 bytes;
/// - `st-bf16-logp.safetensors`: `logp` of dtype `BF16`, its offsets consistent;
/// - `st-huge-shape.safetensors`: `logp` declares [50000, 50000] float32 with
///   `data_offsets` [0, 10^10] in a file of a few hundred bytes.
pub fn crafted() -> Result<Vec<(&'static str, Vec<u8>)>, String> {
    let batch = Batch::small();
    let plans = || -> Vec<NpyPlan> {
        batch
            .arrays
            .iter()
            .map(|a| NpyPlan::plain(a, false))
            .collect()
    };
    let logp =
        |plans: &[NpyPlan]| -> usize { plans.iter().position(|p| p.array == "logp").unwrap_or(0) };
    let mut files = Vec::new();

    let mut p = plans();
    let i = logp(&p);
    p[i].descr = "<f4".into();
    p[i].shape = py_shape(&["50000", "50000"]);
    p[i].data = vec![0; 1 << 20];
    p[i].deflate = true;
    files.push(("npz-huge-shape-deflated.npz", zip_plans(&p, &[])?));

    let mut p = plans();
    let i = logp(&p);
    p[i].shape = py_shape(&["1099511627776", "2"]);
    files.push(("npz-shape-2pow40.npz", zip_plans(&p, &[])?));

    let mut p = plans();
    let mask = p.iter().position(|p| p.array == "mask").unwrap_or(0);
    let mut twin = p[mask].clone();
    twin.entry = "Qask.npy".into();
    twin.data = vec![0; twin.data.len()];
    p.push(twin);
    let rename = ZipPatch::Name {
        from: "Qask.npy".into(),
        to: "mask.npy".into(),
    };
    files.push(("npz-duplicate-mask.npz", zip_plans(&p, &[rename])?));

    let mut p = plans();
    let i = logp(&p);
    let mut bare = p[i].clone();
    bare.entry = "logp".into();
    p.push(bare);
    files.push(("npz-logp-and-logp-npy.npz", zip_plans(&p, &[])?));

    let mut whole = zip_plans(&plans(), &[])?;
    whole.truncate(whole.len() * 3 / 5);
    files.push(("npz-truncated.npz", whole));

    let p = plans();
    let mut members: Vec<Member> = p.iter().map(NpyPlan::member).collect();
    let i = members
        .iter()
        .position(|m| m.entry == "logp.npy")
        .unwrap_or(0);
    let patches = bomb(&mut members[i], i, 8 << 20);
    files.push(("npz-inflate-bomb.npz", zip_members(&members, &patches)?));

    let mut p = plans();
    let i = logp(&p);
    p[i].descr = "<f2".into();
    p[i].data = vec![0; 2 * 12];
    files.push(("npz-float16-logp.npz", zip_plans(&p, &[])?));

    let st = StPlan::plain(&batch);
    let mut bytes = st.encode();
    bytes.truncate(bytes.len() - 8);
    files.push(("st-offsets-past-end.safetensors", bytes));

    let mut st = StPlan::plain(&batch);
    let first = st.entries[0].clone();
    st.entries.push(first);
    files.push(("st-duplicate-logp.safetensors", st.encode()));

    let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
    bytes.extend(b"{}      ");
    files.push(("st-header-length-2pow40.safetensors", bytes));

    let mut bf16 = Batch::small();
    bf16.arrays[0].dt = Dt::F16;
    let mut st = StPlan::plain(&bf16);
    st.entries[0].dtype = "BF16".into();
    files.push(("st-bf16-logp.safetensors", st.encode()));

    let mut st = StPlan::plain(&batch);
    st.entries[0].dtype = "F32".into();
    st.entries[0].shape = vec!["50000".into(), "50000".into()];
    st.entries[0].start = 0;
    st.entries[0].end = 10_000_000_000;
    files.push(("st-huge-shape.safetensors", st.encode()));
    Ok(files)
}

// ---------------------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------------------

/// The extension of each format.
const NPZ: &str = "npz";
const ST: &str = "safetensors";

/// One generated file and what is known of its outcome.
struct Case {
    /// What the case is, for messages: the batch, the encoding, the mutations.
    label: String,
    /// [`NPZ`] or [`ST`]: the file's extension (not always its format).
    ext: &'static str,
    bytes: Vec<u8>,
    /// The config of `cppo eval`, as JSON.
    config: String,
    /// The outcome the docs promise, for `eval` and `inspect`.
    want: [Want; 2],
}

/// The documented outcome of one command on one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// Exit code 0.
    Ok,
    /// Exit code 2.
    Refused,
    /// Either; only the contract of each outcome is checked.
    Either,
}

/// The two commands run on every file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmd {
    Eval,
    Inspect,
}

impl Cmd {
    const fn name(self) -> &'static str {
        match self {
            Self::Eval => "eval",
            Self::Inspect => "inspect",
        }
    }

    /// The files a successful run leaves in its output directory.
    const fn outputs(self) -> &'static [&'static str] {
        match self {
            Self::Eval => &["out.npz", "stats.json"],
            Self::Inspect => &["report.json"],
        }
    }
}

/// A broken promise.
#[derive(Debug)]
struct Problem {
    /// A short name, for the corpus file's name.
    tag: &'static str,
    what: String,
}

impl Problem {
    fn new(tag: &'static str, what: String) -> Self {
        Self { tag, what }
    }
}

/// Runs one case (or reports why it could not be made), and records a finding.
fn run_one(opts: &Opts, cppo: &Path, id: &str, case: Result<Case, String>, report: &mut Report) {
    let case = match case {
        Ok(case) => case,
        Err(e) => {
            eprintln!("files: case {id}: the harness cannot build it: {e}");
            return;
        }
    };
    let (ok, problems) = match run_case(cppo, &case) {
        Ok(result) => result,
        Err(e) => {
            eprintln!("files: case {id}: the harness cannot run it: {e}");
            return;
        }
    };
    report.cases += 1;
    if ok {
        report.ok += 1;
    }
    if problems.is_empty() {
        return;
    }
    report.findings += 1;
    let what = problems[0].tag;
    let path = opts.corpus.join(format!("{what}-{id}.{}", case.ext));
    let saved = fs::create_dir_all(&opts.corpus)
        .and_then(|()| fs::write(&path, &case.bytes))
        .and_then(|()| {
            if case.config == "{}" {
                Ok(())
            } else {
                let mut cfg = path.as_os_str().to_owned();
                cfg.push(CONFIG_SUFFIX);
                fs::write(cfg, &case.config)
            }
        });
    let saved = match saved {
        Ok(()) => format!("written to {}", path.display()),
        Err(e) => format!("cannot write {}: {e}", path.display()),
    };
    let all: Vec<String> = problems
        .iter()
        .map(|p| format!("{}: {}", p.tag, one_line(&p.what, 400)))
        .collect();
    eprintln!(
        "files: finding in case {id} ({}; config {}): {}; {saved}",
        case.label,
        case.config,
        all.join("; ")
    );
}

/// Runs both commands on a case in a fresh directory. Returns whether both exited 0,
/// and every broken promise.
fn run_case(cppo: &Path, case: &Case) -> Result<(bool, Vec<Problem>), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("cannot create a directory: {e}"))?;
    let inputs = fresh_dir(dir.path(), "in")?;
    let input = inputs.join(format!("batch.{}", case.ext));
    fs::write(&input, &case.bytes).map_err(|e| format!("cannot write the input: {e}"))?;
    let cfg = inputs.join("cfg.json");
    fs::write(&cfg, &case.config).map_err(|e| format!("cannot write the config: {e}"))?;
    let mut problems = Vec::new();
    let mut ok = true;
    for (cmd, want) in [Cmd::Eval, Cmd::Inspect].into_iter().zip(case.want) {
        let out = fresh_dir(dir.path(), cmd.name())?;
        let args = match cmd {
            Cmd::Eval => eval_args(&cfg, &input, &out),
            Cmd::Inspect => inspect_args(&input, &out),
        };
        let run = run_cppo(cppo, &args, dir.path())?;
        ok &= matches!(run.status, Status::Exited(0));
        problems.extend(check(cmd, &run, &out, want));
    }
    Ok((ok, problems))
}

fn fresh_dir(parent: &Path, name: &str) -> Result<PathBuf, String> {
    let dir = parent.join(name);
    fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

fn eval_args(cfg: &Path, input: &Path, out: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["eval", "--config"].map(OsString::from).to_vec();
    args.push(cfg.into());
    args.push("--input".into());
    args.push(input.into());
    args.push("--output".into());
    args.push(out.join("out.npz").into());
    args.push("--stats".into());
    args.push(out.join("stats.json").into());
    args
}

fn inspect_args(input: &Path, out: &Path) -> Vec<OsString> {
    vec![
        "inspect".into(),
        input.into(),
        "--json".into(),
        out.join("report.json").into(),
    ]
}

/// How a run ended.
#[derive(Clone, Copy, Debug)]
enum Status {
    Exited(i32),
    Signal(i32),
    TimedOut,
}

/// What one run of `cppo` did.
struct Run {
    status: Status,
    stdout: String,
    stderr: String,
}

/// Runs `cppo ARGS` under the address-space limit and the hang guard, its stdout and
/// stderr in files of `logs`.
fn run_cppo(cppo: &Path, args: &[OsString], logs: &Path) -> Result<Run, String> {
    let (out_path, err_path) = (logs.join("stdout"), logs.join("stderr"));
    let create =
        |p: &Path| File::create(p).map_err(|e| format!("cannot create {}: {e}", p.display()));
    let (stdout, stderr) = (create(&out_path)?, create(&err_path)?);
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            r#"ulimit -v {ADDRESS_SPACE_KIB} && exec "$0" "$@""#
        ))
        .arg(cppo)
        .args(args)
        .env("RAYON_NUM_THREADS", THREADS)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot start /bin/sh: {e}"))?;
    let start = Instant::now();
    let mut nap = Duration::from_micros(200);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status_of(status),
            Ok(None) if start.elapsed() >= TIMEOUT => {
                // Killing fails only if it has just exited, which is as good.
                let _ = child.kill();
                let _ = child.wait();
                break Status::TimedOut;
            }
            Ok(None) => {
                thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(5));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("cannot wait for cppo: {e}"));
            }
        }
    };
    let read = |p: &Path| fs::read(p).map(|b| String::from_utf8_lossy(&b).into_owned());
    Ok(Run {
        status,
        stdout: read(&out_path).map_err(|e| format!("cannot read stdout: {e}"))?,
        stderr: read(&err_path).map_err(|e| format!("cannot read stderr: {e}"))?,
    })
}

#[cfg(unix)]
fn status_of(status: ExitStatus) -> Status {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Status::Exited(code),
        (None, Some(signal)) => Status::Signal(signal),
        (None, None) => Status::Signal(0),
    }
}

#[cfg(not(unix))]
fn status_of(status: ExitStatus) -> Status {
    Status::Exited(status.code().unwrap_or(-1))
}

/// A copy of the binary in a directory of its own, if it can be made and run there.
fn private_copy(cppo: &Path) -> Option<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir().ok()?;
    let path = dir.path().join(cppo.file_name()?);
    fs::copy(cppo, &path).ok()?;
    preflight(&path).ok()?;
    Some((dir, path))
}

/// `cppo --version` must run, under the same limits.
fn preflight(cppo: &Path) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("cannot create a directory: {e}"))?;
    let run = run_cppo(cppo, &["--version".into()], dir.path())?;
    match run.status {
        Status::Exited(0) => Ok(()),
        status => Err(format!(
            "`cppo --version` ended with {status:?}: {}",
            one_line(&run.stderr, 400)
        )),
    }
}

/// The promises of one run: its exit, its stderr and stdout, its output directory, and
/// the documented outcome `want`.
fn check(cmd: Cmd, run: &Run, out: &Path, want: Want) -> Vec<Problem> {
    let name = cmd.name();
    let stderr = one_line(&run.stderr, 400);
    let code = match run.status {
        Status::TimedOut => {
            return vec![Problem::new(
                "timeout",
                format!(
                    "{name} still ran after {} s and was killed",
                    TIMEOUT.as_secs()
                ),
            )];
        }
        Status::Signal(s) => {
            return vec![Problem::new(
                "signal",
                format!("{name} was killed by signal {s}; stderr: {stderr}"),
            )];
        }
        Status::Exited(code) => code,
    };
    let mut problems = Vec::new();
    if code == 101
        || run.stderr.contains("panicked at")
        || run.stderr.contains("internal error (a bug in cppo")
    {
        problems.push(Problem::new(
            "panic",
            format!("{name} panicked (exit code {code}): {stderr}"),
        ));
    }
    let left = match fs::read_dir(out) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
        Err(e) => {
            problems.push(Problem::new(
                "left-behind",
                format!("{name}: cannot list its output directory: {e}"),
            ));
            Vec::new()
        }
    };
    match code {
        0 => {
            let missing: Vec<&str> = cmd
                .outputs()
                .iter()
                .copied()
                .filter(|f| !left.iter().any(|l| l == f))
                .collect();
            if !missing.is_empty() {
                problems.push(Problem::new(
                    "missing-output",
                    format!("{name} exited 0 without writing {missing:?}"),
                ));
            }
            let extra: Vec<&String> = left
                .iter()
                .filter(|l| !cmd.outputs().contains(&l.as_str()))
                .collect();
            if !extra.is_empty() {
                problems.push(Problem::new(
                    "left-behind",
                    format!("{name} exited 0 and left {extra:?} besides its outputs"),
                ));
            }
            for file in cmd
                .outputs()
                .iter()
                .filter(|f| left.iter().any(|l| l == *f))
            {
                if let Err(e) = readable(&out.join(file)) {
                    problems.push(Problem::new("bad-output", format!("{name}: {file}: {e}")));
                }
            }
            if want == Want::Refused {
                problems.push(Problem::new(
                    "accepted",
                    format!("{name} exited 0 on a file the docs say it must refuse"),
                ));
            }
        }
        2 => {
            let lines = run.stderr.lines().count();
            if lines != 1 || !run.stderr.ends_with('\n') || !run.stderr.starts_with("error: ") {
                problems.push(Problem::new(
                    "stderr",
                    format!(
                        "{name} exited 2 with {lines} lines on stderr, not one `error: ...` \
                         line: {stderr}"
                    ),
                ));
            } else if run.stderr.trim_start_matches("error:").trim().is_empty() {
                problems.push(Problem::new(
                    "stderr",
                    format!("{name} exited 2 with an empty error line"),
                ));
            }
            if !run.stdout.is_empty() {
                problems.push(Problem::new(
                    "stdout",
                    format!(
                        "{name} exited 2 and printed to stdout: {}",
                        one_line(&run.stdout, 200)
                    ),
                ));
            }
            if !left.is_empty() {
                problems.push(Problem::new(
                    "left-behind",
                    format!("{name} exited 2 and left {left:?} behind: {stderr}"),
                ));
            }
            if want == Want::Ok {
                problems.push(Problem::new(
                    "refused",
                    format!("{name} refused a valid file: {stderr}"),
                ));
            }
        }
        code => problems.push(Problem::new(
            "exit-code",
            format!("{name} exited with {code}: {stderr}"),
        )),
    }
    problems
}

/// An output file is what it claims: JSON that parses, or a zip archive with `loss.npy`.
fn readable(path: &Path) -> Result<(), String> {
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    if path.extension() == Some(OsStr::new("json")) {
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .map(|_| ())
            .map_err(|e| format!("not JSON: {e}"))
    } else {
        let archive = zip::ZipArchive::new(Cursor::new(bytes))
            .map_err(|e| format!("not a zip archive: {e}"))?;
        if archive.file_names().any(|n| n == "loss.npy") {
            Ok(())
        } else {
            Err("no loss.npy in the archive".into())
        }
    }
}

/// At most `max` characters of `text`, on one line.
fn one_line(text: &str, max: usize) -> String {
    let line = text.trim_end().replace('\n', "\\n");
    match line.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &line[..at]),
        None => line,
    }
}

// ---------------------------------------------------------------------------------------
// Generating a case
// ---------------------------------------------------------------------------------------

/// The seed of case `index` of a run seeded with `seed` (splitmix64, twice).
fn case_seed(seed: u64, index: u64) -> u64 {
    fn mix(x: u64) -> u64 {
        let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    mix(mix(seed) ^ index)
}

/// A random element of `items` (which must not be empty).
fn pick<T: Copy>(r: &mut StdRng, items: &[T]) -> T {
    items[r.random_range(0..items.len())]
}

/// Case `index` of the run seeded with `seed`.
fn generate(seed: u64, index: u64) -> Result<Case, String> {
    let mut r = StdRng::seed_from_u64(case_seed(seed, index));
    let config = random_config(&mut r);
    let cfg: Config = serde_json::from_str(&config)
        .map_err(|e| format!("the generated config {config} is not valid: {e}"))?;
    // What eval and inspect (the built-in set: binary TV, no KL penalty) read.
    let reads = [Reads::of(&cfg), Reads::default()];
    let batch = Batch::random(&mut r, reads[0]);
    let count = pick(&mut r, &[0, 0, 0, 1, 1, 1, 1, 2, 3]);
    // One of them, sometimes, a mutation of the bytes whatever the format.
    let generic = count > 0 && r.random_bool(0.3);
    let own = count - usize::from(generic);
    let (mut file, mut applied) = if r.random_bool(0.5) {
        npz_file(&mut r, &batch, reads, own)?
    } else {
        st_file(&mut r, &batch, reads, own)?
    };
    if generic {
        applied.push(file.mutate(&mut r));
    }
    let want = match applied.as_slice() {
        [] if !batch.documented => [Want::Either; 2],
        [] => reads.map(|reads| {
            if batch.refusal(reads).is_some() {
                Want::Refused
            } else {
                Want::Ok
            }
        }),
        [one] => one
            .refuse
            .map(|refuse| if refuse { Want::Refused } else { Want::Either }),
        _ => [Want::Either; 2],
    };
    let mutations = if applied.is_empty() {
        "no mutation".to_string()
    } else {
        applied
            .iter()
            .map(|a| a.label.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let values = match batch.refusal(reads[0]) {
        Some(why) => format!("hostile: {why}"),
        None => "values valid".into(),
    };
    Ok(Case {
        label: format!("{}; {values}; {}: {mutations}", batch.label, file.label),
        ext: file.ext,
        bytes: file.bytes,
        config,
        want,
    })
}

/// `{}` or a preset, sometimes with another divergence or a KL penalty.
fn random_config(r: &mut StdRng) -> String {
    let mut obj = serde_json::Map::new();
    if r.random_bool(0.6) {
        let preset = Preset::ALL[r.random_range(0..Preset::ALL.len())];
        obj.insert("preset".into(), preset.name().into());
    }
    if r.random_bool(0.15) {
        let d = pick(
            r,
            &["binary_tv", "binary_kl", "topk_tv", "topk_kl", "k2", "k3"],
        );
        obj.insert("divergence".into(), d.into());
    }
    if r.random_bool(0.15) {
        let estimator = pick(r, &["k1", "k2", "k3"]);
        let coef = pick(r, &[0.0, 0.05, 1.0]);
        obj.insert(
            "kl".into(),
            serde_json::json!({"estimator": estimator, "coef": coef}),
        );
    }
    serde_json::Value::Object(obj).to_string()
}

/// Which optional arrays a command reads. It always reads `logp`, `logp_old`,
/// `advantages` and `mask`, and `is_weights` whenever the file holds it.
#[derive(Clone, Copy, Debug, Default)]
struct Reads {
    topk: bool,
    logp_ref: bool,
}

impl Reads {
    fn of(cfg: &Config) -> Self {
        Self {
            topk: cfg.divergence.needs_topk(),
            logp_ref: cfg.kl.is_some(),
        }
    }

    /// Whether the command reads the array `name` (if the file holds it).
    fn reads(self, name: &str) -> bool {
        match name {
            "is_weights" => true,
            _ => self.requires(name),
        }
    }

    /// Whether the command refuses a file without the array `name`.
    fn requires(self, name: &str) -> bool {
        match name {
            "logp" | "logp_old" | "advantages" | "mask" => true,
            "topk_logp" | "topk_logp_old" => self.topk,
            "logp_ref" => self.logp_ref,
            _ => false,
        }
    }
}

/// An element type of a generated array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dt {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    /// Only in arrays no command reads; the bits are written as given.
    F16,
    F32,
    F64,
}

impl Dt {
    const fn size(self) -> usize {
        match self {
            Self::Bool | Self::U8 | Self::I8 => 1,
            Self::I16 | Self::U16 | Self::F16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::I64 | Self::U64 | Self::F64 => 8,
        }
    }

    const fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F64)
    }

    /// numpy's `descr`, in byte order `order` (`<`, `>` or `=`; `|` for one byte).
    fn descr(self, order: char) -> String {
        let code = match self {
            Self::Bool => "b1",
            Self::U8 => "u1",
            Self::I8 => "i1",
            Self::I16 => "i2",
            Self::U16 => "u2",
            Self::I32 => "i4",
            Self::U32 => "u4",
            Self::I64 => "i8",
            Self::U64 => "u8",
            Self::F16 => "f2",
            Self::F32 => "f4",
            Self::F64 => "f8",
        };
        let order = if self.size() == 1 { '|' } else { order };
        format!("{order}{code}")
    }

    /// The safetensors dtype.
    const fn st(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::U8 => "U8",
            Self::I8 => "I8",
            Self::I16 => "I16",
            Self::U16 => "U16",
            Self::I32 => "I32",
            Self::U32 => "U32",
            Self::I64 => "I64",
            Self::U64 => "U64",
            Self::F16 => "F16",
            Self::F32 => "F32",
            Self::F64 => "F64",
        }
    }

    /// `v` as the file holds it, read back.
    fn stored(self, v: f64) -> f64 {
        let i = v as i64;
        match self {
            Self::F64 | Self::F16 => v,
            Self::F32 => f64::from(v as f32),
            Self::Bool | Self::U8 => f64::from(i as u8),
            Self::I8 => f64::from(i as i8),
            Self::I16 => f64::from(i as i16),
            Self::U16 => f64::from(i as u16),
            Self::I32 => f64::from(i as i32),
            Self::U32 => f64::from(i as u32),
            Self::I64 => i as f64,
            Self::U64 => (i as u64) as f64,
        }
    }

    fn encode(self, v: f64, big: bool, out: &mut Vec<u8>) {
        macro_rules! put {
            ($x:expr) => {{
                let x = $x;
                out.extend_from_slice(&if big {
                    x.to_be_bytes()
                } else {
                    x.to_le_bytes()
                });
            }};
        }
        let i = v as i64;
        match self {
            Self::F64 => put!(v),
            Self::F32 => put!(v as f32),
            Self::F16 | Self::U16 => put!(i as u16),
            Self::Bool | Self::U8 => put!(i as u8),
            Self::I8 => put!(i as i8),
            Self::I16 => put!(i as i16),
            Self::I32 => put!(i as i32),
            Self::U32 => put!(i as u32),
            Self::I64 => put!(i),
            Self::U64 => put!(i as u64),
        }
    }
}

/// One array of a generated batch: its values in C order, as `f64` (converted to its
/// dtype when encoded).
#[derive(Clone, Debug)]
struct Arr {
    name: String,
    dt: Dt,
    shape: Vec<usize>,
    values: Vec<f64>,
}

impl Arr {
    fn new(name: &str, dt: Dt, shape: &[usize], values: Vec<f64>) -> Self {
        Self {
            name: name.into(),
            dt,
            shape: shape.to_vec(),
            values,
        }
    }

    /// The value at flat index `i` as the file holds it.
    fn at(&self, i: usize) -> f64 {
        self.values.get(i).map_or(0.0, |&v| self.dt.stored(v))
    }

    /// The data: big- or little-endian, in Fortran or C order.
    fn bytes(&self, big: bool, fortran: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.values.len() * self.dt.size());
        if fortran {
            for i in fortran_order(&self.shape) {
                self.dt.encode(self.values[i], big, &mut out);
            }
        } else {
            for &v in &self.values {
                self.dt.encode(v, big, &mut out);
            }
        }
        out
    }

    fn dims(&self) -> Vec<String> {
        self.shape.iter().map(usize::to_string).collect()
    }
}

/// The C-order index of each element in Fortran order.
fn fortran_order(shape: &[usize]) -> Vec<usize> {
    let n: usize = shape.iter().product();
    (0..n)
        .map(|mut f| {
            // Decompose f with the first axis fastest; recompose with the last fastest.
            let mut index = vec![0; shape.len()];
            for (ix, &d) in index.iter_mut().zip(shape) {
                *ix = f % d;
                f /= d;
            }
            index.iter().zip(shape).fold(0, |c, (&ix, &d)| c * d + ix)
        })
        .collect()
}

/// A generated batch.
struct Batch {
    rows: usize,
    cols: usize,
    /// K of the top-K pair (whether or not the batch holds it).
    k: usize,
    arrays: Vec<Arr>,
    /// The batch in a few words, for messages.
    label: String,
    /// Whether the docs say which files of this batch are accepted: not for a batch of
    /// 0 rows, 0 columns or K = 0.
    documented: bool,
}

/// Values that break the documented checks at a response position, by array (with
/// the bounds of `cppo::limits`; 1e300 and -1e300 are infinite as float32).
const HOSTILE_LOGPROBS: [f64; 8] = [
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    1.0,
    1e-3,
    -2e4,
    -1e300,
    1e300,
];
const HOSTILE_ADVANTAGES: [f64; 7] = [
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    1e10,
    -2e9,
    1e300,
    -1e300,
];
const HOSTILE_WEIGHTS: [f64; 6] = [-1.0, f64::NAN, f64::INFINITY, -1e-30, 2e6, 1e300];
const HOSTILE_MASK: [f64; 3] = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
/// What padding positions hold: nothing reads them.
const GARBAGE: [f64; 9] = [
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    1.0,
    1e30,
    -1e300,
    0.0,
    7.5,
    -0.0,
];

impl Batch {
    /// A random valid batch holding every array `eval` (reading `reads`) needs, and
    /// sometimes hostile values.
    fn random(r: &mut StdRng, reads: Reads) -> Self {
        let (mut rows, mut cols, mut k) = (
            r.random_range(1..=8),
            r.random_range(1..=64),
            r.random_range(1..=4),
        );
        let degenerate = r.random_bool(0.04);
        if degenerate {
            match r.random_range(0..3) {
                0 => rows = 0,
                1 => cols = 0,
                _ => k = 0,
            }
        }
        let n = rows * cols;
        let float = if r.random_bool(0.5) { Dt::F32 } else { Dt::F64 };
        let resp = response_positions(r, rows, cols);
        let mask_dt = pick(
            r,
            &[
                Dt::Bool,
                Dt::Bool,
                Dt::U8,
                Dt::U8,
                Dt::I64,
                Dt::F32,
                Dt::I8,
                Dt::I16,
                Dt::U16,
                Dt::I32,
                Dt::U32,
                Dt::U64,
                Dt::F64,
            ],
        );
        let mask: Vec<f64> = resp.iter().map(|&on| mask_value(r, mask_dt, on)).collect();
        let or_garbage = |r: &mut StdRng, on: bool, v: f64| {
            if on || r.random_bool(0.5) {
                v
            } else {
                pick(r, &GARBAGE)
            }
        };
        let values = |r: &mut StdRng, around: Option<&[f64]>, per: usize| -> Vec<f64> {
            (0..n * per)
                .map(|i| {
                    let v = match around {
                        Some(base) if r.random_bool(0.9) => near(r, base[i]),
                        _ => logprob(r),
                    };
                    or_garbage(r, resp[i / per], v)
                })
                .collect()
        };
        let logp = values(r, None, 1);
        let logp_old = values(r, Some(&logp), 1);
        let mut arrays = vec![
            Arr::new("logp", float, &[rows, cols], logp.clone()),
            Arr::new("logp_old", float, &[rows, cols], logp_old),
        ];
        let mut label = format!(
            "{rows}x{cols} {}, mask {}",
            if float == Dt::F32 { "f32" } else { "f64" },
            mask_dt.st()
        );
        if r.random_bool(0.5) {
            let adv = (0..rows).map(|_| advantage(r)).collect();
            arrays.push(Arr::new("advantages", float, &[rows], adv));
            label.push_str(", advantages per row");
        } else {
            let adv = (0..n)
                .map(|i| {
                    let a = advantage(r);
                    or_garbage(r, resp[i], a)
                })
                .collect();
            arrays.push(Arr::new("advantages", float, &[rows, cols], adv));
            label.push_str(", advantages per token");
        }
        arrays.push(Arr::new("mask", mask_dt, &[rows, cols], mask));
        if reads.topk || r.random_bool(0.15) {
            let old = values(r, None, k);
            let new = values(r, Some(&old), k);
            arrays.push(Arr::new("topk_logp_old", float, &[rows, cols, k], old));
            arrays.push(Arr::new("topk_logp", float, &[rows, cols, k], new));
            label.push_str(&format!(", top-{k}"));
        }
        if reads.logp_ref || r.random_bool(0.15) {
            let reference = values(r, Some(&logp), 1);
            arrays.push(Arr::new("logp_ref", float, &[rows, cols], reference));
            label.push_str(", logp_ref");
        }
        if r.random_bool(0.25) {
            let w = (0..n)
                .map(|i| {
                    let w = weight(r);
                    or_garbage(r, resp[i], w)
                })
                .collect();
            arrays.push(Arr::new("is_weights", float, &[rows, cols], w));
            label.push_str(", is_weights");
        }
        if r.random_bool(0.1) {
            let extra = match r.random_range(0..3) {
                0 => Arr::new(
                    "input_ids",
                    Dt::I64,
                    &[rows, cols],
                    (0..n).map(|i| (i * 7919 % 50_000) as f64).collect(),
                ),
                1 => Arr::new("rewards", Dt::F16, &[rows], vec![15360.0; rows]),
                _ => Arr::new("step", Dt::F64, &[], vec![f64::NAN]),
            };
            label.push_str(&format!(", unread {}", extra.name));
            arrays.push(extra);
        }
        if degenerate {
            label.push_str(" (degenerate)");
        }
        let mut batch = Self {
            rows,
            cols,
            k,
            arrays,
            label,
            documented: !degenerate,
        };
        if r.random_bool(0.3) {
            batch.inject(r, &resp);
        }
        batch.arrays.shuffle(r);
        batch
    }

    /// Puts one to three hostile values into the arrays, at response positions or
    /// anywhere.
    fn inject(&mut self, r: &mut StdRng, resp: &[bool]) {
        let on: Vec<usize> = (0..resp.len()).filter(|&i| resp[i]).collect();
        for _ in 0..r.random_range(1..=3) {
            let j = r.random_range(0..self.arrays.len());
            let (cols, k) = (self.cols, self.k);
            let a = &mut self.arrays[j];
            let hostile: &[f64] = match a.name.as_str() {
                "logp" | "logp_old" | "logp_ref" | "topk_logp" | "topk_logp_old" => {
                    &HOSTILE_LOGPROBS
                }
                "advantages" => &HOSTILE_ADVANTAGES,
                "is_weights" => &HOSTILE_WEIGHTS,
                "mask" if a.dt.is_float() => &HOSTILE_MASK,
                _ => continue,
            };
            if a.values.is_empty() {
                continue;
            }
            let at = if !on.is_empty() && r.random_bool(0.6) {
                let p = on[r.random_range(0..on.len())];
                match a.shape.len() {
                    1 => p / cols,
                    3 => p * k + r.random_range(0..k),
                    _ => p,
                }
            } else {
                r.random_range(0..a.values.len())
            };
            a.values[at] = pick(r, hostile);
        }
    }

    /// The 2 × 6 float64 batch of the crafted files: `logp` -1, `logp_old` -1.1,
    /// advantages 0.5 per row, a bool mask of ones.
    fn small() -> Self {
        let (rows, cols) = (2, 6);
        let n = rows * cols;
        Self {
            rows,
            cols,
            k: 1,
            arrays: vec![
                Arr::new("logp", Dt::F64, &[rows, cols], vec![-1.0; n]),
                Arr::new("logp_old", Dt::F64, &[rows, cols], vec![-1.1; n]),
                Arr::new("advantages", Dt::F64, &[rows], vec![0.5; rows]),
                Arr::new("mask", Dt::Bool, &[rows, cols], vec![1.0; n]),
            ],
            label: "2x6 f64".into(),
            documented: true,
        }
    }

    fn get(&self, name: &str) -> Option<&Arr> {
        self.arrays.iter().find(|a| a.name == name)
    }

    /// Why a command reading `reads` must refuse this batch by the documented value
    /// checks (`cppo::limits`), if it must: at a response position, a log-prob outside
    /// [MIN_LOGPROB, LOGP_TOLERANCE], an advantage beyond ±MAX_ABS_ADVANTAGE, an IS
    /// weight outside [0, MAX_IS_WEIGHT] (NaN is in no range); or a non-finite float
    /// mask value anywhere.
    fn refusal(&self, reads: Reads) -> Option<String> {
        let mask = self.get("mask")?;
        if mask.dt.is_float()
            && let Some(i) = (0..mask.values.len()).find(|&i| !mask.at(i).is_finite())
        {
            return Some(format!("mask[{i}] is {}", mask.at(i)));
        }
        // NaN is in no range.
        let bad_logprob = |x: f64| !(MIN_LOGPROB..=LOGP_TOLERANCE).contains(&x);
        let bad_advantage = |x: f64| !(-MAX_ABS_ADVANTAGE..=MAX_ABS_ADVANTAGE).contains(&x);
        let bad_weight = |x: f64| !(0.0..=MAX_IS_WEIGHT).contains(&x);
        let mut logprobs = vec!["logp", "logp_old"];
        if reads.logp_ref {
            logprobs.push("logp_ref");
        }
        let mut topk = Vec::new();
        if reads.topk {
            topk.extend(["topk_logp_old", "topk_logp"]);
        }
        for i in 0..self.rows * self.cols {
            if mask.at(i) == 0.0 {
                continue;
            }
            let (row, col) = (i / self.cols, i % self.cols);
            let bad =
                |name: &str, x: f64| Some(format!("{name} at row {row}, column {col} is {x}"));
            for &name in &logprobs {
                if let Some(a) = self.get(name)
                    && bad_logprob(a.at(i))
                {
                    return bad(name, a.at(i));
                }
            }
            if let Some(a) = self.get("advantages") {
                let x = if a.shape.len() == 1 {
                    a.at(row)
                } else {
                    a.at(i)
                };
                if bad_advantage(x) {
                    return bad("advantages", x);
                }
            }
            for &name in &topk {
                if let Some(a) = self.get(name) {
                    for j in 0..self.k {
                        if bad_logprob(a.at(i * self.k + j)) {
                            return bad(name, a.at(i * self.k + j));
                        }
                    }
                }
            }
            if let Some(a) = self.get("is_weights")
                && bad_weight(a.at(i))
            {
                return bad("is_weights", a.at(i));
            }
        }
        None
    }
}

/// Which slots are response tokens: per row all, none, a span after left padding, or
/// scattered; now and then none in the whole batch.
fn response_positions(r: &mut StdRng, rows: usize, cols: usize) -> Vec<bool> {
    let empty = r.random_bool(0.02);
    let mut resp = vec![false; rows * cols];
    if resp.is_empty() {
        return resp;
    }
    for row in resp.chunks_mut(cols) {
        if empty || r.random_bool(0.08) {
            continue;
        }
        match r.random_range(0..4) {
            0 => row.fill(true),
            1 | 2 => {
                let start = r.random_range(0..cols);
                let len = r.random_range(1..=cols - start);
                row[start..start + len].fill(true);
            }
            _ => row.iter_mut().for_each(|x| *x = r.random_bool(0.7)),
        }
    }
    resp
}

/// A mask value: 0 for padding, nonzero (mostly 1) for a response token.
fn mask_value(r: &mut StdRng, dt: Dt, on: bool) -> f64 {
    if !on {
        return if dt.is_float() && r.random_bool(0.05) {
            -0.0
        } else {
            0.0
        };
    }
    if r.random_bool(0.9) {
        return 1.0;
    }
    match dt {
        Dt::Bool => 2.0,
        Dt::U8 => pick(r, &[7.0, 255.0]),
        Dt::I8 | Dt::I16 | Dt::I32 => pick(r, &[-1.0, 100.0]),
        Dt::U16 | Dt::U32 => pick(r, &[1000.0, 65_535.0]),
        Dt::I64 => pick(r, &[-1.0, 1_099_511_627_776.0]),
        Dt::U64 => 1_099_511_627_776.0,
        Dt::F32 | Dt::F64 | Dt::F16 => pick(r, &[0.5, -1.0, 1e30]),
    }
}

/// An ordinary log-prob: mostly near 0, sometimes 0, a tiny positive one (read as 0),
/// a very negative one or the lowest accepted.
fn logprob(r: &mut StdRng) -> f64 {
    match r.random_range(0..40) {
        0 | 1 => 0.0,
        2 | 3 => 5e-5,
        4 => MIN_LOGPROB,
        5..=8 => -r.random_range(0.0..30.0),
        _ => -(r.random::<f64>().powi(2) * 5.0),
    }
}

/// A log-prob near `x` (within the accepted range), or another one.
fn near(r: &mut StdRng, x: f64) -> f64 {
    if !x.is_finite() || r.random_bool(0.1) {
        return logprob(r);
    }
    (x + r.random_range(-0.3..0.3)).clamp(MIN_LOGPROB, 0.0)
}

fn advantage(r: &mut StdRng) -> f64 {
    match r.random_range(0..20) {
        0 => 0.0,
        1 => pick(r, &[MAX_ABS_ADVANTAGE, -MAX_ABS_ADVANTAGE]),
        _ => r.random_range(-3.0..3.0),
    }
}

fn weight(r: &mut StdRng) -> f64 {
    match r.random_range(0..20) {
        0 => 0.0,
        1 => pick(r, &[-0.0, MAX_IS_WEIGHT]),
        _ => r.random_range(0.0..3.0),
    }
}

// ---------------------------------------------------------------------------------------
// Mutations, whatever the format
// ---------------------------------------------------------------------------------------

/// A mutation applied, and whether each command (eval, inspect) must then refuse the
/// file (when it is the file's only mutation).
struct Applied {
    label: String,
    refuse: [bool; 2],
}

impl Applied {
    fn new(label: impl Into<String>, refuse: [bool; 2]) -> Self {
        Self {
            label: label.into(),
            refuse,
        }
    }
}

const EITHER: [bool; 2] = [false, false];
const BOTH: [bool; 2] = [true, true];

/// For each command, whether it reads the array `name`.
fn read_by(reads: [Reads; 2], name: &str) -> [bool; 2] {
    reads.map(|r| r.reads(name))
}

/// For each command, whether it refuses a file without the array `name`.
fn required_by(reads: [Reads; 2], name: &str) -> [bool; 2] {
    reads.map(|r| r.requires(name))
}

/// A file's bytes and what it is.
struct FileBytes {
    bytes: Vec<u8>,
    ext: &'static str,
    /// The encoding, for messages.
    label: String,
}

impl FileBytes {
    /// One mutation of the bytes.
    fn mutate(&mut self, r: &mut StdRng) -> Applied {
        let len = self.bytes.len();
        if len == 0 {
            self.bytes.push(0);
            return Applied::new("one zero byte", BOTH);
        }
        // Headers are at the start (safetensors, npy) or the end (the zip directory).
        let somewhere = |r: &mut StdRng| match r.random_range(0..3) {
            0 => r.random_range(0..len.min(128)),
            1 => r.random_range(len.saturating_sub(128)..len),
            _ => r.random_range(0..len),
        };
        match r.random_range(0..14) {
            0..=3 => {
                let n = r.random_range(1..=8);
                let mut at = Vec::new();
                for _ in 0..n {
                    let i = somewhere(r);
                    self.bytes[i] ^= r.random_range(1..=255u8);
                    at.push(i);
                }
                Applied::new(format!("bytes flipped at {at:?}"), EITHER)
            }
            4 | 5 => {
                let start = somewhere(r);
                let end = (start + r.random_range(1..=32)).min(len);
                let fill = pick(r, &[0x00, 0xff, 0x20, 0x7b]);
                self.bytes[start..end].fill(fill);
                Applied::new(format!("bytes {start}..{end} set to {fill:#04x}"), EITHER)
            }
            6 | 7 => {
                let keep = r.random_range(0..len);
                self.bytes.truncate(keep);
                Applied::new(format!("truncated to {keep} of {len} bytes"), BOTH)
            }
            8 | 9 => {
                let junk: Vec<u8> = if r.random_bool(0.5) {
                    (0..r.random_range(1..=64)).map(|_| r.random()).collect()
                } else {
                    self.bytes[..len.min(r.random_range(1..=256))].to_vec()
                };
                self.bytes.extend(&junk);
                Applied::new(format!("{} bytes appended", junk.len()), EITHER)
            }
            10 | 11 => {
                let at = somewhere(r);
                let junk: Vec<u8> = (0..r.random_range(1..=16)).map(|_| r.random()).collect();
                let n = junk.len();
                self.bytes.splice(at..at, junk);
                Applied::new(format!("{n} bytes inserted at {at}"), EITHER)
            }
            12 => {
                self.bytes.clear();
                Applied::new("emptied", BOTH)
            }
            _ => {
                self.ext = if self.ext == NPZ { ST } else { NPZ };
                Applied::new(format!("named .{}", self.ext), BOTH)
            }
        }
    }
}

/// A shape a mutation declares instead of an array's own, as decimal dims (which may
/// be negative or beyond 2^64).
fn hostile_shape(r: &mut StdRng, batch: &Batch, own: &[usize]) -> Vec<String> {
    let (b, l, k) = (batch.rows, batch.cols, batch.k);
    let options: Vec<Vec<String>> = [
        vec!["50000".into(), "50000".into()],
        vec!["1099511627776".into(), "2".into()],
        vec!["9223372036854775808".into(), "2".into()],
        vec!["18446744073709551616".into()],
        vec!["99999999999999999999999".into(), "1".into()],
        vec!["-1".into(), l.to_string()],
        vec![b.to_string(), (l * 1000).to_string()],
        vec![(b + 1).to_string(), l.to_string()],
        vec![l.to_string(), b.to_string()],
        vec![(b * l).to_string()],
        vec![b.to_string(), l.to_string(), "1".into()],
        vec![b.to_string(), l.to_string(), (k + 1).to_string()],
        vec![],
        vec!["0".into(), l.to_string()],
        vec![b.to_string(), "0".into()],
    ]
    .into_iter()
    .filter(|dims| parse_dims(dims).as_deref() != Some(own))
    .collect();
    options[r.random_range(0..options.len())].clone()
}

/// Dims as sizes, or `None` if one is negative or beyond `usize`.
fn parse_dims(dims: &[String]) -> Option<Vec<usize>> {
    dims.iter().map(|d| d.parse().ok()).collect()
}

/// Whether a command that reads array `name` (of shape `own` in a B × L batch) must
/// refuse it declaring `dims` instead (with data for `own` only; the caller knows
/// whether the sizes agree).
fn shape_refused(name: &str, own: &[usize], dims: &[String], batch: &Batch) -> bool {
    let Some(new) = parse_dims(dims) else {
        return true;
    };
    let count = |s: &[usize]| s.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let alternative = name == "advantages"
        && (new == [batch.rows] || new == [batch.rows, batch.cols])
        && count(&new) == count(own);
    new != own && !alternative
}

// ---------------------------------------------------------------------------------------
// npz
// ---------------------------------------------------------------------------------------

/// One `.npy` member of an archive, before it is encoded.
#[derive(Clone, Debug)]
struct NpyPlan {
    /// The array it holds.
    array: String,
    /// Its name in the archive.
    entry: String,
    descr: String,
    fortran: bool,
    /// The shape as a Python tuple.
    shape: String,
    /// The whole header dict, replacing the one of `descr`, `fortran` and `shape`.
    dict: Option<String>,
    /// The `.npy` format version: 1, 2 or 3.
    version: u8,
    data: Vec<u8>,
    deflate: bool,
}

/// A member as the archive holds it.
struct Member {
    /// The array it holds.
    array: String,
    entry: String,
    bytes: Vec<u8>,
    deflate: bool,
}

impl NpyPlan {
    /// `array` as numpy writes it: little-endian, C order, format 1.0, `NAME.npy`.
    fn plain(a: &Arr, deflate: bool) -> Self {
        Self {
            array: a.name.clone(),
            entry: format!("{}.npy", a.name),
            descr: a.dt.descr('<'),
            fortran: false,
            shape: py_shape(&a.dims()),
            dict: None,
            version: 1,
            data: a.bytes(false, false),
            deflate,
        }
    }

    /// `array` in a random valid encoding.
    fn random(r: &mut StdRng, a: &Arr) -> Self {
        let order = match r.random_range(0..20) {
            0..=2 => '>',
            3 => '=',
            _ => '<',
        };
        let big = order == '>' || (order == '=' && cfg!(target_endian = "big"));
        let fortran = a.shape.len() >= 2 && r.random_bool(0.15);
        Self {
            array: a.name.clone(),
            entry: if r.random_bool(0.1) {
                a.name.clone()
            } else {
                format!("{}.npy", a.name)
            },
            descr: a.dt.descr(order),
            fortran,
            shape: py_shape(&a.dims()),
            dict: None,
            version: pick(r, &[1, 1, 1, 1, 1, 1, 1, 2, 3]),
            data: a.bytes(big, fortran),
            deflate: r.random_bool(0.5),
        }
    }

    fn dict(&self) -> String {
        self.dict.clone().unwrap_or_else(|| {
            format!(
                "{{'descr': '{}', 'fortran_order': {}, 'shape': {}, }}",
                self.descr,
                if self.fortran { "True" } else { "False" },
                self.shape
            )
        })
    }

    fn member(&self) -> Member {
        Member {
            array: self.array.clone(),
            entry: self.entry.clone(),
            bytes: npy(self.version, &self.dict(), &self.data),
            deflate: self.deflate,
        }
    }
}

/// A Python tuple of dims: `()`, `(3,)`, `(2, 6)`.
fn py_shape<S: AsRef<str>>(dims: &[S]) -> String {
    match dims {
        [] => "()".into(),
        [one] => format!("({},)", one.as_ref()),
        _ => format!(
            "({})",
            dims.iter()
                .map(AsRef::as_ref)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// An `.npy` file of format `version`: the magic string, the version, the header
/// length (2 bytes in 1.0, 4 in 2.0 and 3.0), the dict padded with spaces and a newline
/// to a multiple of 64 bytes (as numpy pads it), then the data.
fn npy(version: u8, dict: &str, data: &[u8]) -> Vec<u8> {
    let prefix = if version == 1 { 10 } else { 12 };
    let total = (prefix + dict.len() + 1).div_ceil(64) * 64;
    let mut header = dict.to_string();
    header.push_str(&" ".repeat(total - prefix - dict.len() - 1));
    header.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
    out.extend([version, 0]);
    if version == 1 {
        out.extend(
            u16::try_from(header.len())
                .unwrap_or(u16::MAX)
                .to_le_bytes(),
        );
    } else {
        out.extend(
            u32::try_from(header.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
    }
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// A change to an archive once written, in the local and the central header of an
/// entry.
#[derive(Clone, Debug)]
enum ZipPatch {
    /// Renames the entry `from` (a name of the same length).
    Name {
        from: String,
        to: String,
    },
    /// Sets an entry's uncompressed size, in either header or both.
    Size {
        entry: usize,
        size: u32,
        local: bool,
        central: bool,
    },
    /// Sets an entry's compressed size.
    Packed {
        entry: usize,
        size: u32,
    },
    Crc {
        entry: usize,
        crc: u32,
    },
    /// Sets an entry's compression method.
    Method {
        entry: usize,
        method: u16,
    },
    /// Sets an entry's general-purpose flags.
    Flags {
        entry: usize,
        flags: u16,
    },
}

/// Where each entry's local and central header are, in an archive without comments.
fn entry_headers(zip: &[u8]) -> Option<Vec<(usize, usize)>> {
    let eocd = zip.len().checked_sub(22)?;
    if zip.get(eocd..eocd + 4)? != b"PK\x05\x06" {
        return None;
    }
    let count = u16_at(zip, eocd + 10)?;
    let mut at = u32_at(zip, eocd + 16)? as usize;
    let mut out = Vec::new();
    for _ in 0..count {
        if zip.get(at..at + 4)? != b"PK\x01\x02" {
            return None;
        }
        let local = u32_at(zip, at + 42)? as usize;
        out.push((local, at));
        at += 46
            + usize::from(u16_at(zip, at + 28)?)
            + usize::from(u16_at(zip, at + 30)?)
            + usize::from(u16_at(zip, at + 32)?);
    }
    Some(out)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(slot) = b.get_mut(at..at + bytes.len()) {
        slot.copy_from_slice(bytes);
    }
}

/// Writes the members with the zip crate, then applies the patches.
fn zip_members(members: &[Member], patches: &[ZipPatch]) -> Result<Vec<u8>, String> {
    let mut z = ZipWriter::new(Cursor::new(Vec::new()));
    for m in members {
        let method = if m.deflate {
            CompressionMethod::Deflated
        } else {
            CompressionMethod::Stored
        };
        let options = SimpleFileOptions::default().compression_method(method);
        z.start_file(m.entry.as_str(), options)
            .map_err(|e| format!("zip: {}: {e}", m.entry))?;
        z.write_all(&m.bytes)
            .map_err(|e| format!("zip: {}: {e}", m.entry))?;
    }
    let mut zip = z.finish().map_err(|e| format!("zip: {e}"))?.into_inner();
    if patches.is_empty() {
        return Ok(zip);
    }
    let headers = entry_headers(&zip).ok_or("zip: cannot find the entries just written")?;
    for patch in patches {
        let at = |entry: usize| {
            headers
                .get(entry)
                .copied()
                .ok_or_else(|| format!("zip: no entry {entry}"))
        };
        match patch {
            ZipPatch::Name { from, to } => {
                let entry = members
                    .iter()
                    .position(|m| &m.entry == from)
                    .ok_or_else(|| format!("zip: no entry {from}"))?;
                let (local, central) = at(entry)?;
                put(&mut zip, local + 30, to.as_bytes());
                put(&mut zip, central + 46, to.as_bytes());
            }
            &ZipPatch::Size {
                entry,
                size,
                local,
                central,
            } => {
                let (l, c) = at(entry)?;
                if local {
                    put(&mut zip, l + 22, &size.to_le_bytes());
                }
                if central {
                    put(&mut zip, c + 24, &size.to_le_bytes());
                }
            }
            &ZipPatch::Packed { entry, size } => {
                let (l, c) = at(entry)?;
                put(&mut zip, l + 18, &size.to_le_bytes());
                put(&mut zip, c + 20, &size.to_le_bytes());
            }
            &ZipPatch::Crc { entry, crc } => {
                let (l, c) = at(entry)?;
                put(&mut zip, l + 14, &crc.to_le_bytes());
                put(&mut zip, c + 16, &crc.to_le_bytes());
            }
            &ZipPatch::Method { entry, method } => {
                let (l, c) = at(entry)?;
                put(&mut zip, l + 8, &method.to_le_bytes());
                put(&mut zip, c + 10, &method.to_le_bytes());
            }
            &ZipPatch::Flags { entry, flags } => {
                let (l, c) = at(entry)?;
                put(&mut zip, l + 6, &flags.to_le_bytes());
                put(&mut zip, c + 8, &flags.to_le_bytes());
            }
        }
    }
    Ok(zip)
}

fn zip_plans(plans: &[NpyPlan], patches: &[ZipPatch]) -> Result<Vec<u8>, String> {
    let members: Vec<Member> = plans.iter().map(NpyPlan::member).collect();
    zip_members(&members, patches)
}

/// Makes member `index` a deflated one whose data inflates to `extra` zero bytes more
/// than it declares: the patches set its declared size and CRC back to its own.
fn bomb(m: &mut Member, index: usize, extra: usize) -> Vec<ZipPatch> {
    let size = u32::try_from(m.bytes.len()).unwrap_or(u32::MAX);
    let crc = crc32(&m.bytes);
    m.bytes.resize(m.bytes.len() + extra, 0);
    m.deflate = true;
    vec![
        ZipPatch::Size {
            entry: index,
            size,
            local: true,
            central: true,
        },
        ZipPatch::Crc { entry: index, crc },
    ]
}

/// CRC-32 (IEEE), bit by bit: only the few members of a bomb need it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The kinds of npz mutations, in the order they apply: plans, members, the archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum NpzMutation {
    Shape,
    Descr,
    Dict,
    Drop,
    Rename,
    Duplicate,
    DuplicateSuffix,
    Magic,
    Version,
    HeaderLen,
    DataShort,
    DataLong,
    Bomb,
    SizeLie,
    PackedLie,
    CrcLie,
    Method,
    Flags,
}

/// `count` random mutations of the batch as an npz archive.
fn npz_file(
    r: &mut StdRng,
    batch: &Batch,
    reads: [Reads; 2],
    count: usize,
) -> Result<(FileBytes, Vec<Applied>), String> {
    use NpzMutation as M;
    let mut plans: Vec<NpyPlan> = batch.arrays.iter().map(|a| NpyPlan::random(r, a)).collect();
    let kinds = [
        M::Shape,
        M::Shape,
        M::Descr,
        M::Dict,
        M::Drop,
        M::Rename,
        M::Duplicate,
        M::DuplicateSuffix,
        M::Magic,
        M::Version,
        M::HeaderLen,
        M::DataShort,
        M::DataLong,
        M::Bomb,
        M::SizeLie,
        M::PackedLie,
        M::CrcLie,
        M::Method,
        M::Flags,
    ];
    let mut chosen: Vec<NpzMutation> = (0..count).map(|_| pick(r, &kinds)).collect();
    chosen.sort();
    let mut applied = Vec::new();
    let mut patches = Vec::new();
    let orig = |plan: &NpyPlan| batch.get(&plan.array);

    for &kind in chosen.iter().filter(|&&k| k <= M::DuplicateSuffix) {
        if plans.is_empty() {
            break;
        }
        let i = r.random_range(0..plans.len());
        let name = plans[i].array.clone();
        let read = read_by(reads, &name);
        match kind {
            M::Shape => {
                let Some(a) = orig(&plans[i]) else { continue };
                let dims = hostile_shape(r, batch, &a.shape);
                let refused = shape_refused(&name, &a.shape, &dims, batch);
                plans[i].shape = py_shape(&dims);
                let mut label = format!("{} declares shape {}", plans[i].entry, plans[i].shape);
                if dims.first().is_some_and(|d| d == "50000") && r.random_bool(0.5) {
                    plans[i].data = vec![0; 1 << 20];
                    plans[i].deflate = true;
                    label.push_str(" over 1 MB of zeros, deflated");
                }
                applied.push(Applied::new(label, read.map(|x| x && refused)));
            }
            M::Descr => {
                let Some(a) = orig(&plans[i]) else { continue };
                let flipped = match plans[i].descr.chars().next() {
                    Some('<') => plans[i].descr.replacen('<', ">", 1),
                    Some('>') => plans[i].descr.replacen('>', "<", 1),
                    _ => plans[i].descr.clone(),
                };
                let options = [
                    "<f2", "<c16", "|O", "<U8", "<M8[ns]", "|f8", "float32", "<f8 ", "<f4", "<f8",
                    ">f8", "<i4", "<u8", "|u1", "|b1", "<i8", "|i1", &flipped,
                ];
                let descr = pick(r, &options).to_string();
                if descr == plans[i].descr {
                    continue;
                }
                let refused = match npy_kind(&descr) {
                    None => true,
                    Some((kind, size)) => size != a.dt.size() || (name != "mask" && kind != 'f'),
                };
                let label = format!("{} has dtype {descr:?}", plans[i].entry);
                plans[i].descr = descr;
                applied.push(Applied::new(label, read.map(|x| x && refused)));
            }
            M::Dict => {
                let p = &plans[i];
                let fortran = if p.fortran { "True" } else { "False" };
                let options = [
                    format!("{{'descr': '{}', 'fortran_order': {fortran}}}", p.descr),
                    format!(
                        "{{'descr': '{}', 'fortran_order': {fortran}, 'shape': {}, 'x': 1}}",
                        p.descr, p.shape
                    ),
                    format!(
                        "{{'descr': '{0}', 'descr': '{0}', 'fortran_order': {fortran}, 'shape': {1}}}",
                        p.descr, p.shape
                    ),
                    format!(
                        "{{'descr': '{}', 'fortran_order': 0, 'shape': {}}}",
                        p.descr, p.shape
                    ),
                    format!(
                        "{{'descr': '{}', 'fortran_order': {fortran}, 'shape': [{}]}}",
                        p.descr,
                        p.shape.trim_matches(|c| c == '(' || c == ')')
                    ),
                    format!("{{'descr': '{}'", p.descr),
                    "[]".into(),
                    String::new(),
                    format!(
                        "{{'descr': {}{}, 'fortran_order': {fortran}, 'shape': {}}}",
                        "[".repeat(100),
                        "]".repeat(100),
                        p.shape
                    ),
                    format!(
                        "{{'descr': '{}', 'fortran_order': {fortran}, 'shape': ({}9,)}}",
                        p.descr,
                        "9".repeat(2000)
                    ),
                ];
                let dict = options[r.random_range(0..options.len())].clone();
                let label = format!("{} has header {}", p.entry, one_line(&dict, 60));
                plans[i].dict = Some(dict);
                applied.push(Applied::new(label, read));
            }
            M::Drop => {
                let label = format!("{} dropped", plans[i].entry);
                plans.remove(i);
                applied.push(Applied::new(label, required_by(reads, &name)));
            }
            M::Rename => {
                let entry = pick(
                    r,
                    &[
                        format!("{}.npy", name.to_uppercase()),
                        format!("{name}_.npy"),
                        format!("dir/{name}.npy"),
                        format!("{name}.NPY"),
                        format!("{name}.npy.npy"),
                        format!(" {name}.npy"),
                    ]
                    .each_ref()
                    .map(String::as_str),
                )
                .to_string();
                if plans.iter().any(|p| p.entry == entry) {
                    continue;
                }
                let label = format!("{} renamed {entry:?}", plans[i].entry);
                plans[i].entry = entry;
                applied.push(Applied::new(label, required_by(reads, &name)));
            }
            M::Duplicate => {
                let mut twin = plans[i].clone();
                let from: String = std::iter::once('Q')
                    .chain(twin.entry.chars().skip(1))
                    .collect();
                if twin.entry.len() != from.len() || plans.iter().any(|p| p.entry == from) {
                    continue;
                }
                if r.random_bool(0.5) {
                    twin.data.iter_mut().for_each(|b| *b = 0);
                }
                let label = format!("{} twice", twin.entry);
                patches.push(ZipPatch::Name {
                    from: from.clone(),
                    to: twin.entry.clone(),
                });
                twin.entry = from;
                let at = r.random_range(0..=plans.len());
                plans.insert(at, twin);
                applied.push(Applied::new(label, BOTH));
            }
            M::DuplicateSuffix => {
                let mut twin = plans[i].clone();
                twin.entry = match twin.entry.strip_suffix(".npy") {
                    Some(bare) => bare.to_string(),
                    None => format!("{}.npy", twin.entry),
                };
                if plans.iter().any(|p| p.entry == twin.entry) {
                    continue;
                }
                let label = format!("{} and {} both", plans[i].entry, twin.entry);
                plans.push(twin);
                applied.push(Applied::new(label, BOTH));
            }
            _ => {}
        }
    }

    let mut members: Vec<Member> = plans.iter().map(NpyPlan::member).collect();
    for &kind in chosen.iter().filter(|&&k| k > M::DuplicateSuffix) {
        if members.is_empty() {
            break;
        }
        let i = r.random_range(0..members.len());
        let read = read_by(reads, &members[i].array);
        let m = &mut members[i];
        let entry = m.entry.clone();
        let header = m.bytes.len() >= 12;
        match kind {
            M::Magic if header => {
                m.bytes[r.random_range(0..6)] ^= 0x20;
                applied.push(Applied::new(format!("{entry} loses its magic"), read));
            }
            M::Version if header => {
                let (v, refused) = pick(
                    r,
                    &[
                        ((9, 9), true),
                        ((0, 0), true),
                        ((1, 1), true),
                        ((4, 0), true),
                        ((1, 0), false),
                        ((2, 0), false),
                        ((3, 0), false),
                    ],
                );
                if m.bytes[6..8] == [v.0, v.1] {
                    continue;
                }
                m.bytes[6] = v.0;
                m.bytes[7] = v.1;
                let label = format!("{entry} claims .npy version {}.{}", v.0, v.1);
                applied.push(Applied::new(label, read.map(|x| x && refused)));
            }
            M::HeaderLen if header => {
                let (len, refused) = if m.bytes[6] == 1 {
                    let any = r.random::<u16>();
                    let (len, refused) = pick(r, &[(0xffff, true), (0, true), (any, false)]);
                    put(&mut m.bytes, 8, &len.to_le_bytes());
                    (u32::from(len), refused)
                } else {
                    let any = r.random_range(0..4096);
                    let (len, refused) = pick(
                        r,
                        &[
                            (u32::MAX, true),
                            ((1 << 20) + 1, true),
                            (0, true),
                            (any, false),
                        ],
                    );
                    put(&mut m.bytes, 8, &len.to_le_bytes());
                    (len, refused)
                };
                let label = format!("{entry} declares a header of {len} bytes");
                applied.push(Applied::new(label, read.map(|x| x && refused)));
            }
            M::DataShort if m.bytes.len() > 128 => {
                let cut = r.random_range(1..=8.min(m.bytes.len() - 128));
                m.bytes.truncate(m.bytes.len() - cut);
                applied.push(Applied::new(
                    format!("{entry} loses {cut} data bytes"),
                    read,
                ));
            }
            M::DataLong => {
                let n = r.random_range(1..=16);
                m.bytes.extend((0..n).map(|_| r.random::<u8>()));
                applied.push(Applied::new(
                    format!("{entry} has {n} bytes too many"),
                    read,
                ));
            }
            M::Bomb => {
                let extra = pick(r, &[1 << 20, 8 << 20]);
                patches.extend(bomb(m, i, extra));
                let label = format!("{entry} inflates to {extra} bytes more than it declares");
                applied.push(Applied::new(label, read));
            }
            M::SizeLie => {
                let size = u32::try_from(m.bytes.len()).unwrap_or(u32::MAX);
                let lie = pick(
                    r,
                    &[
                        size.saturating_sub(1),
                        size + 1,
                        size / 2,
                        size.saturating_mul(1000),
                        0xffff_fffe,
                        0,
                    ],
                );
                let (local, central) = pick(r, &[(true, true), (false, true), (true, false)]);
                patches.push(ZipPatch::Size {
                    entry: i,
                    size: lie,
                    local,
                    central,
                });
                let label = format!(
                    "{entry} declares {lie} bytes, not {size} (local header {local}, central {central})"
                );
                applied.push(Applied::new(label, read.map(|x| x && central)));
            }
            M::PackedLie => {
                // The deflated size is unknown here: lie by a factor, or past any file.
                let (size, refused) = pick(
                    r,
                    &[
                        (0xffff_fffe, true),
                        (50_000_000, true),
                        (0, false),
                        (1, false),
                    ],
                );
                patches.push(ZipPatch::Packed { entry: i, size });
                let label = format!("{entry} declares {size} compressed bytes");
                applied.push(Applied::new(label, read.map(|x| x && refused)));
            }
            M::CrcLie => {
                let crc = crc32(&m.bytes) ^ (1 << r.random_range(0..32));
                patches.push(ZipPatch::Crc { entry: i, crc });
                applied.push(Applied::new(format!("{entry} has a wrong CRC"), read));
            }
            M::Method => {
                let (method, refused) = pick(r, &[(99, true), (12, true), (0, false), (8, false)]);
                let own = if m.deflate { 8 } else { 0 };
                if method == own {
                    continue;
                }
                patches.push(ZipPatch::Method { entry: i, method });
                let label = format!("{entry} claims compression method {method}");
                applied.push(Applied::new(label, read.map(|x| x && refused)));
            }
            M::Flags => {
                // Encrypted (bit 0) needs a password; a data descriptor (bit 3), strong
                // encryption (bit 6) or UTF-8 names (bit 11) may pass.
                let (bit, refused) = pick(r, &[(0, true), (3, false), (6, false), (11, false)]);
                let flags = 1u16 << bit;
                patches.push(ZipPatch::Flags { entry: i, flags });
                let label = format!("{entry} has flags {flags:#06x}");
                applied.push(Applied::new(label, read.map(|x| x && refused)));
            }
            _ => {}
        }
    }
    let bytes = zip_members(&members, &patches)?;
    let stored = members.iter().filter(|m| !m.deflate).count();
    let label = format!(
        "npz of {} members ({stored} stored, {} deflated)",
        members.len(),
        members.len() - stored
    );
    Ok((
        FileBytes {
            bytes,
            ext: NPZ,
            label,
        },
        applied,
    ))
}

/// The kind ('b', 'u', 'i' or 'f') and size of an `.npy` dtype the readers accept, as
/// `docs/command_line.md` and `cli/src/npz.rs` list them: `<`, `>`, `=` or no
/// byte-order character, `|` for one-byte types only.
fn npy_kind(descr: &str) -> Option<(char, usize)> {
    let code = match descr.chars().next()? {
        '<' | '>' | '|' | '=' => &descr[1..],
        _ => descr,
    };
    let kind_size = match code {
        "b1" => ('b', 1),
        "u1" => ('u', 1),
        "i1" => ('i', 1),
        "u2" | "u4" | "u8" | "i2" | "i4" | "i8" | "f4" | "f8" => {
            let mut chars = code.chars();
            let kind = chars.next()?;
            (kind, chars.as_str().parse().ok()?)
        }
        _ => return None,
    };
    if descr.starts_with('|') && kind_size.1 != 1 {
        return None;
    }
    Some(kind_size)
}

// ---------------------------------------------------------------------------------------
// safetensors
// ---------------------------------------------------------------------------------------

/// A tensor's entry in a safetensors header, before it is encoded.
#[derive(Clone, Debug)]
struct StEntry {
    /// The array it holds (its data is that array's).
    array: String,
    name: String,
    dtype: String,
    /// Decimal dims, possibly negative or beyond 2^64.
    shape: Vec<String>,
    start: u64,
    end: u64,
    /// Replaces the entry's JSON object.
    json: Option<String>,
}

impl StEntry {
    /// The entry's JSON object, its fields followed by `extra`.
    fn body(&self, extra: &str) -> String {
        format!(
            "{{\"dtype\": {}, \"shape\": [{}], \"data_offsets\": [{}, {}]{extra}}}",
            serde_json::Value::from(self.dtype.as_str()),
            self.shape.join(", "),
            self.start,
            self.end
        )
    }
}

/// A safetensors file before it is encoded.
struct StPlan {
    entries: Vec<StEntry>,
    /// The `__metadata__` value, as JSON.
    metadata: Option<String>,
    data: Vec<u8>,
    /// Whether the header is padded with spaces to a multiple of 8 bytes.
    pad: bool,
    /// Replaces the header JSON.
    header: Option<String>,
    /// Replaces the header's length.
    header_len: Option<u64>,
}

impl StPlan {
    /// The batch as `safetensors` writes it: the tensors in order, no metadata.
    fn plain(batch: &Batch) -> Self {
        let order: Vec<usize> = (0..batch.arrays.len()).collect();
        Self::laid_out(batch, &order, None, true)
    }

    /// The batch with its data in a random order, sometimes metadata.
    fn random(r: &mut StdRng, batch: &Batch) -> Self {
        let mut order: Vec<usize> = (0..batch.arrays.len()).collect();
        order.shuffle(r);
        let metadata = r
            .random_bool(0.5)
            .then(|| r#"{"format": "pt"}"#.to_string());
        Self::laid_out(batch, &order, metadata, r.random_bool(0.7))
    }

    /// The header lists the arrays in the batch's order; their data follow in `order`.
    fn laid_out(batch: &Batch, order: &[usize], metadata: Option<String>, pad: bool) -> Self {
        let mut data = Vec::new();
        let mut ranges = vec![(0, 0); batch.arrays.len()];
        for &j in order {
            let start = data.len() as u64;
            data.extend(batch.arrays[j].bytes(false, false));
            ranges[j] = (start, data.len() as u64);
        }
        let entries = batch
            .arrays
            .iter()
            .zip(ranges)
            .map(|(a, (start, end))| StEntry {
                array: a.name.clone(),
                name: a.name.clone(),
                dtype: a.dt.st().into(),
                shape: a.dims(),
                start,
                end,
                json: None,
            })
            .collect();
        Self {
            entries,
            metadata,
            data,
            pad,
            header: None,
            header_len: None,
        }
    }

    fn header(&self) -> String {
        if let Some(h) = &self.header {
            return h.clone();
        }
        let json = |s: &str| serde_json::Value::from(s).to_string();
        let mut items = Vec::new();
        if let Some(m) = &self.metadata {
            items.push(format!("\"__metadata__\": {m}"));
        }
        for e in &self.entries {
            let body = e.json.clone().unwrap_or_else(|| e.body(""));
            items.push(format!("{}: {body}", json(&e.name)));
        }
        format!("{{{}}}", items.join(", "))
    }

    /// The 8-byte little-endian header length, the header, the data.
    fn encode(&self) -> Vec<u8> {
        let mut header = self.header().into_bytes();
        if self.pad {
            while !header.len().is_multiple_of(8) {
                header.push(b' ');
            }
        }
        let len = self.header_len.unwrap_or(header.len() as u64);
        let mut out = len.to_le_bytes().to_vec();
        out.extend(header);
        out.extend(&self.data);
        out
    }
}

/// Bits per element of a safetensors dtype the `safetensors` crate knows.
fn st_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

/// The bytes `dims` of `dtype` take, if they can be counted.
fn st_bytes(dims: &[String], dtype: &str) -> Option<u128> {
    let count = dims.iter().try_fold(1u128, |n, d| {
        let d: u64 = d.parse().ok()?;
        n.checked_mul(u128::from(d))
    })?;
    Some((count.checked_mul(u128::from(st_bits(dtype)?))?).div_ceil(8))
}

/// The mask dtypes the safetensors reader accepts.
const ST_MASK_DTYPES: [&str; 11] = [
    "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F32", "F64",
];

/// The kinds of safetensors mutations, in the order they apply: entries, header text,
/// header length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum StMutation {
    Shape,
    Dtype,
    Offsets,
    Duplicate,
    Drop,
    Rename,
    EntryJson,
    Metadata,
    JsonCut,
    JsonChar,
    JsonTrailing,
    NotObject,
    HeaderLen,
}

/// `count` random mutations of the batch as a safetensors file.
fn st_file(
    r: &mut StdRng,
    batch: &Batch,
    reads: [Reads; 2],
    count: usize,
) -> Result<(FileBytes, Vec<Applied>), String> {
    use StMutation as M;
    let mut plan = StPlan::random(r, batch);
    let kinds = [
        M::Shape,
        M::Shape,
        M::Dtype,
        M::Offsets,
        M::Offsets,
        M::Duplicate,
        M::Drop,
        M::Rename,
        M::EntryJson,
        M::Metadata,
        M::JsonCut,
        M::JsonChar,
        M::JsonTrailing,
        M::NotObject,
        M::HeaderLen,
    ];
    let mut chosen: Vec<StMutation> = (0..count).map(|_| pick(r, &kinds)).collect();
    chosen.sort();
    let mut applied = Vec::new();
    let data_len = plan.data.len() as u64;
    for kind in chosen {
        if plan.entries.is_empty() && kind < M::Metadata {
            continue;
        }
        let i = r.random_range(0..plan.entries.len().max(1));
        match kind {
            M::Shape => {
                let e = &plan.entries[i];
                let Some(a) = batch.get(&e.array) else {
                    continue;
                };
                let dims = hostile_shape(r, batch, &a.shape);
                let read = read_by(reads, &e.array);
                let refused = shape_refused(&e.array, &a.shape, &dims, batch);
                let mut label = format!("{} declares shape [{}]", e.name, dims.join(", "));
                // The offsets stay, or follow the shape (then they may pass the end).
                let moved = st_bytes(&dims, &e.dtype)
                    .and_then(|b| b.checked_add(u128::from(e.start)))
                    .and_then(|end| u64::try_from(end).ok())
                    .filter(|_| r.random_bool(0.5));
                let end = moved.unwrap_or(e.end);
                let holds = end.checked_sub(e.start).map(u128::from) == st_bytes(&dims, &e.dtype);
                let refuse = if holds && end <= data_len {
                    read.map(|x| x && refused)
                } else {
                    BOTH
                };
                if let Some(end) = moved {
                    label.push_str(&format!(" with data_offsets [{}, {end}]", e.start));
                }
                let e = &mut plan.entries[i];
                e.shape = dims;
                e.end = end;
                applied.push(Applied::new(label, refuse));
            }
            M::Dtype => {
                let e = &plan.entries[i];
                let dtype = pick(
                    r,
                    &[
                        "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64", "BOOL", "U8",
                        "I8", "I16", "F8_E4M3", "F4", "C64", "XX", "float32", "bool", "",
                    ],
                );
                if dtype == e.dtype {
                    continue;
                }
                let read = read_by(reads, &e.array);
                let refuse = if st_bits(dtype).is_none()
                    || st_bytes(&e.shape, dtype) != st_bytes(&e.shape, &e.dtype)
                {
                    BOTH
                } else if e.array == "mask" {
                    read.map(|x| x && !ST_MASK_DTYPES.contains(&dtype))
                } else {
                    // A float array of another dtype of the same size: not logp's type.
                    read
                };
                let label = format!("{} has dtype {dtype:?}", e.name);
                plan.entries[i].dtype = dtype.into();
                applied.push(Applied::new(label, refuse));
            }
            M::Offsets => {
                let len = plan.entries.len();
                let e = &plan.entries[i];
                let (start, end, refuse) = match r.random_range(0..5) {
                    0 => (e.start, data_len + r.random_range(1..=64), BOTH),
                    1 => (e.start + data_len, e.end + data_len, BOTH),
                    2 if e.start < e.end => (e.end, e.start, BOTH),
                    3 => (e.start, u64::MAX, BOTH),
                    _ => {
                        let other = &plan.entries[r.random_range(0..len)];
                        let same = other.end.checked_sub(other.start) == e.end.checked_sub(e.start);
                        (other.start, other.end, if same { EITHER } else { BOTH })
                    }
                };
                if (start, end) == (e.start, e.end) {
                    continue;
                }
                let label = format!("{} has data_offsets [{start}, {end}]", e.name);
                let e = &mut plan.entries[i];
                (e.start, e.end) = (start, end);
                applied.push(Applied::new(label, refuse));
            }
            M::Duplicate => {
                let mut twin = plan.entries[i].clone();
                if r.random_bool(0.5) {
                    let other = &plan.entries[r.random_range(0..plan.entries.len())];
                    (twin.start, twin.end) = (other.start, other.end);
                }
                let label = format!("{} twice", twin.name);
                let at = r.random_range(0..=plan.entries.len());
                plan.entries.insert(at, twin);
                applied.push(Applied::new(label, BOTH));
            }
            M::Drop => {
                let e = plan.entries.remove(i);
                let refuse = required_by(reads, &e.array);
                applied.push(Applied::new(format!("{} dropped", e.name), refuse));
            }
            M::Rename => {
                let e = &plan.entries[i];
                let name = pick(
                    r,
                    &[
                        e.name.to_uppercase(),
                        format!("{}_", e.name),
                        format!("{}.npy", e.name),
                        format!(" {}", e.name),
                        "__metadata__".into(),
                    ]
                    .each_ref()
                    .map(String::as_str),
                )
                .to_string();
                if plan.entries.iter().any(|x| x.name == name) {
                    continue;
                }
                let refuse = required_by(reads, &e.array);
                let label = format!("{} renamed {name:?}", e.name);
                plan.entries[i].name = name;
                applied.push(Applied::new(label, refuse));
            }
            M::EntryJson => {
                let e = &plan.entries[i];
                let dtype = serde_json::Value::from(e.dtype.as_str());
                let dims = e.shape.join(", ");
                let (start, end) = (e.start, e.end);
                let (body, refuse) = match r.random_range(0..6) {
                    0 => (e.body(r#", "extra": [1, {"x": null}]"#), EITHER),
                    1 => (
                        format!(
                            r#"{{"dtype": {dtype}, "shape": [{dims}], "data_offsets": [{start}, {end}, {end}]}}"#
                        ),
                        BOTH,
                    ),
                    2 => (
                        format!(
                            r#"{{"dtype": {dtype}, "shape": [{dims}], "data_offsets": [{start}.0, {end}.0]}}"#
                        ),
                        BOTH,
                    ),
                    3 => (
                        format!(r#"{{"shape": [{dims}], "data_offsets": [{start}, {end}]}}"#),
                        BOTH,
                    ),
                    4 => (
                        format!(
                            r#"{{"dtype": {dtype}, "shape": "{dims}", "data_offsets": [{start}, {end}]}}"#
                        ),
                        BOTH,
                    ),
                    _ => ("[]".to_string(), BOTH),
                };
                let label = format!("{} is {}", e.name, one_line(&body, 80));
                plan.entries[i].json = Some(body);
                applied.push(Applied::new(label, refuse));
            }
            M::Metadata => {
                let deep = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
                let m = pick(
                    r,
                    &[
                        r#"{"format": "pt", "x": [1, {"y": null}]}"#,
                        r#""a string""#,
                        "null",
                        "[1, 2, 3]",
                        "{}",
                        deep.as_str(),
                    ],
                );
                plan.metadata = Some(m.into());
                let label = format!("__metadata__ is {}", one_line(m, 40));
                applied.push(Applied::new(label, EITHER));
            }
            M::JsonCut => {
                let h = plan.header();
                let cut = r.random_range(0..h.len().saturating_sub(1).max(1));
                let cut = (0..=cut)
                    .rev()
                    .find(|&c| h.is_char_boundary(c))
                    .unwrap_or(0);
                plan.header = Some(h[..cut].to_string());
                applied.push(Applied::new(
                    format!("header JSON cut to {cut} bytes"),
                    BOTH,
                ));
            }
            M::JsonChar => {
                let mut h = plan.header().into_bytes();
                if h.is_empty() {
                    continue;
                }
                let at = r.random_range(0..h.len());
                let c = pick(r, b"{}\",:x0 \\[");
                h[at] = c;
                plan.header = Some(String::from_utf8_lossy(&h).into_owned());
                let label = format!("header byte {at} set to {:?}", char::from(c));
                applied.push(Applied::new(label, EITHER));
            }
            M::JsonTrailing => {
                let junk = pick(r, &["x", "{}", ",", "}", "\0"]);
                plan.header = Some(format!("{}{junk}", plan.header()));
                applied.push(Applied::new(format!("header JSON then {junk:?}"), BOTH));
            }
            M::NotObject => {
                let h = pick(r, &["[]", "null", "\"s\"", "1", "[{}]", ""]);
                plan.header = Some(h.into());
                applied.push(Applied::new(format!("header is {h:?}"), BOTH));
            }
            M::HeaderLen => {
                let actual = plan.encode().len() as u64 - 8 - data_len;
                let file = actual + data_len;
                let (len, refuse) = pick(
                    r,
                    &[
                        (1 << 40, BOTH),
                        (u64::MAX, BOTH),
                        (100_000_001, BOTH),
                        (file + 1, BOTH),
                        (0, BOTH),
                        (actual.saturating_sub(1), EITHER),
                        (actual + 1, EITHER),
                    ],
                );
                plan.header_len = Some(len);
                let label = format!("header length {len} (of {actual})");
                applied.push(Applied::new(label, refuse));
            }
        }
    }
    let label = format!(
        "safetensors of {} tensors{}",
        plan.entries.len(),
        if plan.metadata.is_some() {
            " with __metadata__"
        } else {
            ""
        }
    );
    Ok((
        FileBytes {
            bytes: plan.encode(),
            ext: ST,
            label,
        },
        applied,
    ))
}
