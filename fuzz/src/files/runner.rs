//! Running a case: the file and what is known of its outcome (`Case`, `Want`), the two
//! commands run on it (`Cmd`), each run of `cppo` under the address-space limit and the
//! hang guard (`run_cppo`), and a finding recorded in the corpus (`run_one`).

use std::ffi::OsString;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::check::{Problem, check, one_line};
use super::{ADDRESS_SPACE_KIB, CONFIG_SUFFIX, THREADS, TIMEOUT};
use crate::{Opts, Report};

/// The extension of each format.
pub(super) const NPZ: &str = "npz";
pub(super) const ST: &str = "safetensors";

/// One generated file and what is known of its outcome.
pub(super) struct Case {
    /// What the case is, for messages: the batch, the encoding, the mutations.
    pub(super) label: String,
    /// [`NPZ`] or [`ST`]: the file's extension (not always its format).
    pub(super) ext: &'static str,
    pub(super) bytes: Vec<u8>,
    /// The config of `cppo eval`, as JSON.
    pub(super) config: String,
    /// The outcome the docs promise, for `eval` and `inspect`.
    pub(super) want: [Want; 2],
}

/// The documented outcome of one command on one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Want {
    /// Exit code 0.
    Ok,
    /// Exit code 2.
    Refused,
    /// Either; only the contract of each outcome is checked.
    Either,
}

/// The two commands run on every file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cmd {
    Eval,
    Inspect,
}

impl Cmd {
    pub(super) const fn name(self) -> &'static str {
        match self {
            Self::Eval => "eval",
            Self::Inspect => "inspect",
        }
    }

    /// The files a successful run leaves in its output directory.
    pub(super) const fn outputs(self) -> &'static [&'static str] {
        match self {
            Self::Eval => &["out.npz", "stats.json"],
            Self::Inspect => &["report.json"],
        }
    }
}

/// Runs one case (or reports why it could not be made), and records a finding.
pub(super) fn run_one(
    opts: &Opts,
    cppo: &Path,
    id: &str,
    case: Result<Case, String>,
    report: &mut Report,
) {
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

pub(super) fn fresh_dir(parent: &Path, name: &str) -> Result<PathBuf, String> {
    let dir = parent.join(name);
    fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

pub(super) fn eval_args(cfg: &Path, input: &Path, out: &Path) -> Vec<OsString> {
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

pub(super) fn inspect_args(input: &Path, out: &Path) -> Vec<OsString> {
    vec![
        "inspect".into(),
        input.into(),
        "--json".into(),
        out.join("report.json").into(),
    ]
}

/// How a run ended.
#[derive(Clone, Copy, Debug)]
pub(super) enum Status {
    Exited(i32),
    Signal(i32),
    TimedOut,
}

/// What one run of `cppo` did.
pub(super) struct Run {
    pub(super) status: Status,
    pub(super) stdout: String,
    pub(super) stderr: String,
}

/// Runs `cppo ARGS` under the address-space limit and the hang guard, its stdout and
/// stderr in files of `logs`.
pub(super) fn run_cppo(cppo: &Path, args: &[OsString], logs: &Path) -> Result<Run, String> {
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
pub(super) fn private_copy(cppo: &Path) -> Option<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir().ok()?;
    let path = dir.path().join(cppo.file_name()?);
    fs::copy(cppo, &path).ok()?;
    preflight(&path).ok()?;
    Some((dir, path))
}

/// `cppo --version` must run, under the same limits.
pub(super) fn preflight(cppo: &Path) -> Result<(), String> {
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
