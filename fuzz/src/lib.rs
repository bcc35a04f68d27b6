//! The crate's own fuzzer: seeded, time-limited runs that check the README's promises
//! under hostile input, not only the absence of panics.
//!
//! - [`library`]: random batches (shapes, layouts, f32/f64, every mask type, hostile
//!   values at response and padding positions), random JSON configs, chunk splits and
//!   chunk misuse, through `evaluate`, `evaluate_into`, `trust_region` and the chunk
//!   protocol. It checks that every `Ok` is finite (but for the NaNs the docs promise),
//!   that padding values change nothing, that `Par::Seq` equals `Par::Rayon` on 1 to 4
//!   threads, that `evaluate_into` equals `evaluate` and that column chunks give the whole.
//! - [`files`]: valid, mutated and crafted npz and safetensors files through
//!   `cppo eval` and `cppo inspect`, which must exit 0, or 2 with one line on stderr and
//!   no output file, quickly and within a memory limit.
//!
//! A finding is written to the corpus directory as a file that the regression tests
//! (`fuzz/tests/`, `cli/tests/fuzz_corpus.rs`) replay.

use std::fmt;
use std::path::PathBuf;

pub mod files;
pub mod library;

/// What a run is given.
#[derive(Clone, Debug)]
pub struct Opts {
    /// How long to run, in seconds.
    pub seconds: f64,
    /// The run's seed.
    pub seed: u64,
    /// Where findings are written.
    pub corpus: PathBuf,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The target's name.
    pub target: &'static str,
    /// Cases run.
    pub cases: u64,
    /// Cases whose result was `Ok` (or exit 0), of `cases`.
    pub ok: u64,
    /// Broken promises found (each written to the corpus).
    pub findings: u64,
    /// Wall time, in seconds.
    pub seconds: f64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} cases in {:.1} s ({} ok, {} errors), {} findings",
            self.target,
            self.cases,
            self.seconds,
            self.ok,
            self.cases - self.ok,
            self.findings
        )
    }
}
