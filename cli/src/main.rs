//! `cppo`: the crate's command-line tool (the `cppo-cli` crate).
//!
//! - `cppo eval` runs one batch from an `.npz` file through [`cppo::evaluate`] and
//!   writes the per-token outputs, the loss and optionally the diagnostics;
//! - `cppo bench` times the engine on a synthetic batch made in-process;
//! - `cppo inspect` reports what trust regions do on a batch (or across the steps of a
//!   run), with plots under the `plots` feature;
//! - `cppo presets` lists the named presets;
//! - `cppo synth` writes a realistic synthetic batch to an `.npz` file, for a first run.
//!
//! Modules: [`eval`], [`mod@bench`], [`inspect`] and [`mod@synth`] are the commands, [`npz`] reads and
//! writes the arrays, [`batchfile`] reads a batch from npz or safetensors, [`report`]
//! reduces and renders what `inspect` reports, [`plots`] draws it, [`staged`] makes
//! output files appear all at once or not at all, [`failure`] turns every error into
//! one line on stderr and an exit code.
//!
//! Failure contract: exactly one line on stderr and exit code 2 for any bad input or
//! argument, 1 when the system fails (an output cannot be written). No panic reaches
//! the user: a panic hook prints one line for an unexpected one (a bug), and `main`
//! catches it so that temporary files are still removed, then exits with 2.

mod batchfile;
mod bench;
mod eval;
mod failure;
mod html;
mod inspect;
mod names;
mod npz;
#[cfg(feature = "plots")]
mod plots;
mod report;
mod staged;
#[cfg(feature = "plots")]
mod svgtext;
mod synth;
mod warnings;

use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};

use crate::failure::{Failure, print_error};

/// CPPO token-level trust regions for LLM reinforcement learning: evaluate a batch
/// stored in .npz files, or time the engine.
#[derive(Parser, Debug)]
#[command(name = "cppo", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Compute the trust-region mask, per-token loss, gradient and loss of one batch
    ///
    /// Input arrays (by name; float arrays all float32 or all float64):
    ///   logp, logp_old        (B, L)      current and rollout log-probs
    ///   advantages            (B, L) or (B,), broadcast along the row
    ///   mask                  (B, L)      bool, uint8, any integer type, float32 or float64;
    ///                                     nonzero = response token
    ///   topk_logp_old, topk_logp  (B, L, K)  needed by topk_tv and topk_kl
    ///   logp_ref              (B, L)      needed by a `kl` penalty
    ///   is_weights            (B, L)      optional: rollout IS weights (verl's
    ///                                     rollout_is_weights), >= 0, multiplying each
    ///                                     token's objective term
    /// Values at non-response positions are never read. Arrays the config does not use
    /// are ignored. --names verl or --names trl reads the arrays under a trainer's names
    /// (old_log_probs, response_mask, ...). A missing array's error lists the arrays the
    /// file holds and says what to do. An .npz may be compressed
    /// (numpy.savez_compressed); arrays may be little- or big-endian, C or Fortran
    /// order. A .safetensors file works too.
    /// Every array's header is checked before any data is read: shapes against logp's
    /// (B, L), and the sizes of the arrays read, added up, against --max-memory (8G by
    /// default); a file declaring more, or two arrays of one name, is refused.
    ///
    /// Output arrays: divergence, weight, threshold, keep (0/1), token_loss, grad, all
    /// (B, L) in the input's float type and 0 at non-response positions (threshold is NaN
    /// where the rule has none); reason (B, L) uint8 (0 not a response token, 1 kept,
    /// 2 kept by the corrective bypass, 3 masked by the token threshold, 4 masked by the
    /// prefix budget); delta_b_row (B,) in the float type, CPPO's per-row prefix budget
    /// (NaN where the rule has none); loss, a 0-d float64.
    ///
    /// On success, prints one summary line to stdout (output path, loss, response tokens,
    /// sequences, masked fraction) and exits with 0. On failure, prints one line to
    /// stderr naming the file and the array, row and column, or the config field; exits
    /// with 2 for bad input (1 if an output cannot be written); and leaves no output
    /// file behind: outputs are written to temporary files beside their destinations
    /// and renamed into place only once all of them are complete.
    #[command(verbatim_doc_comment)]
    Eval(eval::EvalArgs),

    /// Time the engine on a synthetic batch or on your own; print one JSON line
    ///
    /// The batch (--rows and --len: cppo::synth, ragged GRPO-style rows, 90% of the
    /// B x L slots are response tokens, hostile padding; or --input: a batch file, read
    /// as `cppo eval` reads it) and the output buffers (--outputs) are allocated before
    /// timing. Each run is one evaluate_into call on a rayon pool of --threads threads.
    /// Untimed warm-up runs come first (at least 0.1 s of them); then runs are timed
    /// until there are at least --repeats and they add up to at least --min-time
    /// seconds (0.5 by default), so that short runs are measured many times.
    ///
    /// JSON fields: input (synthetic or file), rows, len, response_tokens, threads,
    /// dtype, rule, divergence, objective, aggregation, topk, logp_ref, is_weights,
    /// outputs, repeats, runs (timed runs made), total_s (their total), ms (best run),
    /// median_ms, tokens_per_s (B x L slots per second of the best run, padding
    /// included), median_tokens_per_s, bytes_per_token, gb_per_s (bytes_per_token x
    /// tokens_per_s / 1e9), inputs_bytes (the batch's arrays), outputs_bytes (the output
    /// buffers), peak_rss_bytes (the process's peak resident set size, VmHWM; Linux only,
    /// else null), timed_peak_rss_bytes (the same peak counted from the end of batch
    /// generation, i.e. without the generator's temporaries; null where it cannot be
    /// reset), cpu (the CPU's model name; Linux only, else null), isa (the instruction
    /// set the engine's dispatcher chose: avx512, avx2 or baseline).
    ///
    /// Byte model, per token slot, with s = 4 (f32) or 8 (f64):
    ///   read:    logp, logp_old 2s; mask (bool) 1; top-K pair 2Ks if used; logp_ref s if used;
    ///            is_weights s if the --input file holds them
    ///   written: --outputs all: divergence, weight, threshold, token_loss, grad 5s;
    ///              keep 1; reason 1
    ///            --outputs grad: grad s; keep 1
    /// Per-row advantages are negligible and left out.
    #[command(verbatim_doc_comment)]
    Bench(bench::BenchArgs),

    /// Report what trust regions do on a batch, or across the steps of a run; plot it
    ///
    /// Runs each rule (--config files and --preset names, or the built-in set below)
    /// through the library on the batch, and
    /// prints: the masked fraction in total, by reason (token threshold, prefix budget,
    /// corrective bypass) and by sign of the advantage; divergence statistics; the
    /// masked fraction by tenth of the response. --report writes it as Markdown, --json
    /// every number (each rule's library diagnostics, the per-position statistics).
    ///
    /// The built-in set (--compare, or when no --config or --preset is given), on one
    /// divergence (--divergence), at the paper's values (delta 0.15, delta_b 0.02
    /// calibrated by P90 within [delta_b, 2 delta_b], w_min 0.8):
    ///   GRPO ratio clip         ratio, eps (0.2, 0.28), as a mask
    ///   DPPO                    dppo, delta 0.15
    ///   CPPO budget-only        cppo with w_min 1 (no position weights)
    ///   CPPO weight-only        cppo with delta_b null (no budget)
    ///   CPPO soft gate          cppo_soft, the paper's inverse gate (its ablation)
    ///   CPPO shuffled weights   cppo, weights permuted within each row (its control)
    ///   CPPO fixed budget       cppo with calibration null: delta_b 0.02 for every row
    ///   CPPO (full)             cppo, the paper's calibrated budget
    ///
    /// Plots (feature `plots`; SVG or PNG by extension), by relative position in the
    /// response (--buckets equal parts): the divergence's median and 90th percentile;
    /// CPPO's token limit delta/w_t and the mean effective threshold c_t; the masked
    /// fraction, one line per rule; and a strip chart of a few rows, each token kept,
    /// masked by the token threshold, masked by the prefix budget, or kept by the
    /// corrective bypass.
    ///
    /// A directory of per-step dumps (step_000123.npz, step_000124.npz, ... or
    /// .safetensors) gives the masked fraction, the budget-masked fraction and the mean
    /// divergence across steps, with a progress bar on a terminal for long runs.
    ///
    /// Examples:
    ///   cppo inspect --demo --plot demo.svg
    ///   cppo synth --output batch.npz && cppo inspect batch.npz
    ///   cppo inspect step_000120.npz --names verl
    ///   cppo inspect batch.npz --config cfg.json --compare --report report.md --plot-dir plots
    ///   cppo inspect dumps/ --plot drift.png
    ///
    /// Failure: as `cppo eval`: one line on stderr, exit code 2 for bad input (1 if an
    /// output cannot be written), and no output file left behind.
    #[command(verbatim_doc_comment)]
    Inspect(inspect::InspectArgs),

    /// List the named presets (--preset), one line each on what it reproduces
    ///
    /// Each preset is a complete config: the paper's settings (its Table 3: dense, MoE,
    /// post-trained, KL), UniRL's defaults and verl PR #6731's (its defaults and its
    /// scripts'). --json prints them as JSON configs.
    #[command(verbatim_doc_comment)]
    Presets(PresetsArgs),

    /// Write a realistic synthetic batch to an .npz file that eval and inspect read
    ///
    /// The batch is cppo::synth's (the quickstart's at the defaults: 64 rows x 512 slots,
    /// seed 0, float32): ragged GRPO-style rows, 90% of the B x L slots response tokens,
    /// tool outputs as holes in the mask, one advantage per row from GRPO groups of 8,
    /// off-policy drift larger on early tokens, and padding holding NaN, +-inf and
    /// garbage, as trainers leave it (never read).
    ///
    /// Arrays (the names cppo eval reads): logp, logp_old, mask (B, L), advantages (B,);
    /// with --topk K, topk_logp_old and topk_logp (B, L, K); with --with-ref, logp_ref
    /// (B, L). Uncompressed; float32 or float64 (--dtype), the mask bool. One seed gives
    /// one file, byte for byte.
    ///
    /// Prints one line (the file, its shape, response tokens, dtype, seed, arrays) and
    /// exits with 0. The file is written to a temporary file beside it and renamed into
    /// place once complete: a failed run leaves nothing (exit code 1 if it cannot be
    /// written, 2 for bad arguments or a batch larger than cppo eval reads by default).
    ///
    /// Example:
    ///   cppo synth --output batch.npz
    ///   cppo eval --preset cppo --input batch.npz --output out.npz
    #[command(verbatim_doc_comment)]
    Synth(synth::SynthArgs),
}

#[derive(clap::Args, Debug)]
struct PresetsArgs {
    /// Print each preset's full config as JSON, one object per line.
    #[arg(long)]
    json: bool,
}

/// Runs `cppo presets`.
fn presets(args: &PresetsArgs) -> Result<(), Failure> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for p in cppo::Preset::ALL {
        let line = if args.json {
            let cfg =
                serde_json::to_string(&p.config()).map_err(|e| Failure::input("presets", &e))?;
            format!("{{\"name\": \"{}\", \"config\": {cfg}}}", p.name())
        } else {
            format!("{:<20} {}", p.name(), p.description())
        };
        // A closed stdout is not worth failing over.
        if writeln!(out, "{line}").is_err() {
            break;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    install_panic_hook();
    match panic::catch_unwind(AssertUnwindSafe(|| run(&cli))) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(failure)) => {
            print_error(&failure.to_string());
            failure.exit_code()
        }
        // The hook has printed the one line.
        Err(_) => ExitCode::from(2),
    }
}

fn run(cli: &Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::Eval(args) => eval::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Presets(args) => presets(args),
        Command::Synth(args) => synth::run(args),
    }
}

/// Help and version go to stdout as clap prints them. A usage error becomes one line
/// (clap's first paragraph, joined) and exit code 2.
fn usage_error(e: &clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // Nothing sensible is left to report if printing help fails.
            let _ = e.print();
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
        }
        _ => {
            let text = e.render().to_string();
            let first = text.split("\n\n").next().unwrap_or_default();
            let first = first.trim_start().trim_start_matches("error:");
            print_error(&format!("{} (see cppo --help)", first.trim()));
            ExitCode::from(2)
        }
    }
}

/// Replaces Rust's multi-line panic message with one line, printed once even if
/// several threads panic.
fn install_panic_hook() {
    static REPORTED: AtomicBool = AtomicBool::new(false);
    panic::set_hook(Box::new(|info| {
        if REPORTED.swap(true, Ordering::SeqCst) {
            return;
        }
        let payload = info.payload();
        let what = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("unknown panic");
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        print_error(&format!(
            "internal error (a bug in cppo, please report it): {what}{at}"
        ));
    }));
}
