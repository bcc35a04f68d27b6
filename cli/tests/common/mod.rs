//! Running the `cppo` binary from the tests, and their scratch directories.

#![allow(dead_code, unused_macros, unused_imports)] // each test file uses its own part

use std::ffi::OsStr;
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Wall-clock time of the run (a hang guard, never a performance check).
    pub took: Duration,
}

/// Runs `cmd` to completion.
pub fn run_command(mut cmd: Command) -> Run {
    let start = Instant::now();
    let out = cmd.output().expect("the cppo binary runs");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: start.elapsed(),
    }
}

/// `cppo ARGS...`.
pub fn cppo<S: AsRef<OsStr>>(args: &[S]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cppo"));
    cmd.args(args);
    run_command(cmd)
}

/// A scratch area with separate input and output directories, so that "no output left
/// behind" means "the output directory is empty".
pub struct Scratch {
    _root: TempDir,
    pub inputs: PathBuf,
    pub outputs: PathBuf,
}

impl Scratch {
    pub fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let inputs = root.path().join("in");
        let outputs = root.path().join("out");
        fs::create_dir(&inputs).unwrap();
        fs::create_dir(&outputs).unwrap();
        Self {
            _root: root,
            inputs,
            outputs,
        }
    }

    /// A path in the input directory.
    pub fn input(&self, name: &str) -> PathBuf {
        self.inputs.join(name)
    }
}

/// `cppo inspect` with these arguments.
pub fn inspect(args: &[&OsStr]) -> Run {
    let mut all = vec![OsStr::new("inspect")];
    all.extend_from_slice(args);
    cppo(&all)
}

/// A run that succeeded: exit code 0, nothing on stderr.
#[track_caller]
pub fn assert_ok(run: &Run) {
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.is_empty(), "{run:?}");
}

/// Builds an argument list from strings and paths.
macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$(AsRef::<std::ffi::OsStr>::as_ref(&$a)),*][..] };
}
pub(crate) use args;
