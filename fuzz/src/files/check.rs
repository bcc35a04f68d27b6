//! The checks of a run: the promises of `docs/command_line.md` (the exit code, stderr
//! and stdout, what is left in the output directory, the output files readable) and the
//! documented outcome, each broken promise a `Problem`.

use std::ffi::OsStr;
use std::fs;
use std::io::Cursor;
use std::path::Path;

use super::TIMEOUT;
use super::runner::{Cmd, Run, Status, Want};

/// A broken promise.
#[derive(Debug)]
pub(super) struct Problem {
    /// A short name, for the corpus file's name.
    pub(super) tag: &'static str,
    pub(super) what: String,
}

impl Problem {
    fn new(tag: &'static str, what: String) -> Self {
        Self { tag, what }
    }
}

/// The promises of one run: its exit, its stderr and stdout, its output directory, and
/// the documented outcome `want`.
pub(super) fn check(cmd: Cmd, run: &Run, out: &Path, want: Want) -> Vec<Problem> {
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
pub(super) fn one_line(text: &str, max: usize) -> String {
    let line = text.trim_end().replace('\n', "\\n");
    match line.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &line[..at]),
        None => line,
    }
}
