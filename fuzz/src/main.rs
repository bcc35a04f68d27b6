//! `cppo-fuzz`: seeded, time-limited fuzzing of the library and of the `cppo` command.
//!
//! ```text
//! cargo run --release -p cppo-fuzz -- library --seconds 600
//! cargo run --release -p cppo-fuzz -- files --seconds 600 --cppo target/release/cppo
//! ```
//!
//! Every finding is written to the corpus directory (`fuzz/corpus/<target>/` by
//! default) as a file the regression tests replay, and the run exits 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cppo_fuzz::Opts;

#[derive(Parser)]
#[command(
    name = "cppo-fuzz",
    about = "Fuzz the cppo library and the cppo command"
)]
struct Cli {
    #[command(subcommand)]
    target: Target,
}

#[derive(Subcommand)]
enum Target {
    /// Random batches, layouts, hostile values, JSON configs, chunk splits and misuse
    /// through the library's entry points.
    Library {
        #[command(flatten)]
        common: Common,
    },
    /// Mutated and crafted npz and safetensors files through `cppo eval` and `cppo inspect`.
    Files {
        #[command(flatten)]
        common: Common,
        /// The `cppo` binary to run.
        #[arg(long, default_value = "target/release/cppo")]
        cppo: PathBuf,
    },
}

#[derive(clap::Args)]
struct Common {
    /// How long to run.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// The seed of the run (each case's own seed derives from it).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where findings are written (default: fuzz/corpus/<target>).
    #[arg(long)]
    corpus: Option<PathBuf>,
}

impl Common {
    fn opts(self, target: &str) -> Opts {
        Opts {
            seconds: self.seconds,
            seed: self.seed,
            corpus: self
                .corpus
                .unwrap_or_else(|| PathBuf::from("fuzz/corpus").join(target)),
        }
    }
}

fn main() -> ExitCode {
    let report = match Cli::parse().target {
        Target::Library { common } => cppo_fuzz::library::run(&common.opts("library")),
        Target::Files { common, cppo } => cppo_fuzz::files::run(&common.opts("files"), &cppo),
    };
    println!("{report}");
    if report.findings == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
