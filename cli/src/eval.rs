//! `cppo eval`: one batch from a file through [`cppo::evaluate`], outputs to an `.npz`
//! file.
//!
//! Order of work: read and check the config (or the preset), open the input, read the
//! arrays the config uses (arrays it does not use are never read; see
//! [`crate::batchfile`]), build the [`cppo::Batch`], evaluate, then write every output to
//! a temporary file and rename them all into place.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::Args;
use cppo::{Config, Par, Preset};

use crate::batchfile::{self, Loaded, MaxMemory, Needs};
use crate::failure::Failure;
use crate::names::Names;
use crate::npz::{NpyFloat, write_outputs};
use crate::staged::{Staged, commit_all};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The config: JSON, as the command-line contract describes (`cppo::doc::command_line`).
    /// Omitted fields take their defaults; unknown fields and out-of-range values are
    /// errors. `{"preset": NAME, ...}` starts from a preset.
    #[arg(
        long,
        value_name = "CFG.json",
        required_unless_present = "preset",
        conflicts_with = "preset"
    )]
    config: Option<PathBuf>,

    /// A named preset instead of a config file (`cppo presets` lists them).
    #[arg(long, value_name = "NAME")]
    preset: Option<String>,

    /// The batch: an .npz (numpy.savez or numpy.savez_compressed) or a .safetensors file
    /// holding logp, logp_old, advantages and mask, plus topk_logp_old and topk_logp for
    /// top-K divergences, logp_ref for the KL penalty, and optionally is_weights. Other
    /// arrays are ignored.
    #[arg(long, value_name = "BATCH.npz")]
    input: PathBuf,

    /// The names the batch file's arrays go by: crate (logp, logp_old, advantages, mask,
    /// ...), verl or trl.
    #[arg(long, value_enum, default_value_t = Names::Crate, long_help = crate::names::names_help())]
    names: Names,

    /// Where to write the outputs (.npz). Replaced if it exists.
    #[arg(long, value_name = "OUT.npz")]
    output: PathBuf,

    /// Also write the diagnostics (masked fractions, divergence and ratio statistics,
    /// masked fraction by position decile, the per-row budgets, and the metrics verl and
    /// UniRL log under their names) as pretty-printed JSON.
    #[arg(long, value_name = "STATS.json")]
    stats: Option<PathBuf>,

    /// The most memory the arrays read from a batch file may take: 8G by default, or
    /// e.g. 512M, 64K, 1T (binary units, 1K = 1024 bytes), or a plain byte count.
    /// Before any data is read, every array's declared shape must match what the batch
    /// needs ((B, L), (B,) or (B, L, K), from logp's header) and the declared sizes of
    /// the arrays read, added up, must be within this limit; a file declaring more is
    /// refused with exit code 2. A safetensors header may be at most 100 MB; inputs
    /// must be regular files.
    #[arg(long, value_name = "BYTES", default_value = batchfile::DEFAULT_MAX_MEMORY, value_parser = MaxMemory::parse)]
    max_memory: MaxMemory,
}

/// Runs `cppo eval`.
pub fn run(args: &EvalArgs) -> Result<(), Failure> {
    if args.stats.as_ref() == Some(&args.output) {
        return Err(Failure::Input(format!(
            "--output and --stats are the same file {}",
            args.output.display()
        )));
    }
    let cfg = match (&args.config, &args.preset) {
        (Some(path), _) => read_config(path)?,
        (None, Some(name)) => preset(name)?,
        (None, None) => return Err(Failure::Input("give --config or --preset".into())),
    };
    match batchfile::load_named(&args.input, Needs::of(&[cfg]), args.max_memory, args.names)? {
        Loaded::F32(a) => eval_as(&cfg, &a, args),
        Loaded::F64(a) => eval_as(&cfg, &a, args),
    }
}

/// A preset by name; the error lists the known ones.
pub fn preset(name: &str) -> Result<Config, Failure> {
    let p: Preset = name
        .parse()
        .map_err(|e: cppo::Error| Failure::Input(format!("--preset {name:?}: {e}")))?;
    Ok(p.config())
}

/// Reads and checks a JSON config.
pub fn read_config(path: &Path) -> Result<Config, Failure> {
    let text = fs::read_to_string(path)
        .map_err(|e| Failure::input(format!("cannot read config {}", path.display()), &e))?;
    let context = format!("config {}", path.display());
    // serde would also read a JSON array as a struct, its elements as the fields in
    // order: `[]` would be the default config. A config is an object.
    if !text.trim_start().starts_with('{') {
        return Err(Failure::Input(format!(
            "{context}: expected a JSON object {{...}} at the top level"
        )));
    }
    serde_json::from_str(&text).map_err(|e| Failure::input(context, &e))
}

/// The rest of `eval`, once the file has fixed the float type `F`.
fn eval_as<F: NpyFloat>(
    cfg: &Config,
    arrays: &batchfile::Arrays<F>,
    args: &EvalArgs,
) -> Result<(), Failure> {
    let eval = arrays
        .batch()
        .and_then(|batch| cppo::evaluate(cfg, &batch, Par::Rayon))
        .map_err(|e| {
            let (path, read_as) = (args.input.display(), &arrays.read_as);
            Failure::Input(format!("{path}: {e}{read_as}"))
        })?;

    let mut staged = vec![Staged::write(&args.output, |w| write_outputs(w, &eval))?];
    if let Some(path) = &args.stats {
        staged.push(Staged::write(path, |mut w| {
            serde_json::to_writer_pretty(&mut w, &eval.diagnostics)?;
            w.write_all(b"\n").map_err(serde_json::Error::io)?;
            Ok::<_, serde_json::Error>(w)
        })?);
    }
    commit_all(staged)?;

    let d = &eval.diagnostics;
    // The outputs are in place; a closed stdout is not worth failing over.
    let _ = writeln!(
        io::stdout(),
        "wrote {}: loss {}, {} response tokens in {} sequences, masked_frac {}",
        args.output.display(),
        eval.loss,
        d.response_tokens,
        d.sequences,
        d.masked_frac
    );
    Ok(())
}
