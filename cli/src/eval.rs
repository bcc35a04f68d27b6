//! `cppo eval`: one batch from an `.npz` file through [`cppo::evaluate`], outputs to an
//! `.npz` file (SPEC section 9).
//!
//! Order of work: read and check the config, open the input, read the arrays the config
//! uses (arrays it does not use are never read), build the [`cppo::Batch`], evaluate, then
//! write every output to a temporary file and rename them all into place.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::Args;
use cppo::ndarray::{Array2, Ix2, Ix3};
use cppo::{Config, Par};

use crate::batchfile::Arrays;
use crate::failure::Failure;
use crate::npz::{FloatArray, Input, NpyFloat, write_outputs};
use crate::staged::{Staged, commit_all};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The config: JSON in SPEC section 9's schema. Omitted fields take their defaults;
    /// unknown fields and out-of-range values are errors.
    #[arg(long, value_name = "CFG.json")]
    config: PathBuf,

    /// The batch: an .npz (numpy.savez or numpy.savez_compressed) holding logp, logp_old,
    /// advantages and mask, plus topk_logp_old and topk_logp for top-K divergences and
    /// logp_ref for the KL penalty. Other arrays are ignored.
    #[arg(long, value_name = "BATCH.npz")]
    input: PathBuf,

    /// Where to write the outputs (.npz). Replaced if it exists.
    #[arg(long, value_name = "OUT.npz")]
    output: PathBuf,

    /// Also write the diagnostics (masked fractions, divergence and ratio statistics,
    /// masked fraction by position decile, ...) as pretty-printed JSON.
    #[arg(long, value_name = "STATS.json")]
    stats: Option<PathBuf>,
}

/// Runs `cppo eval`.
pub fn run(args: &EvalArgs) -> Result<(), Failure> {
    if args.stats.as_ref() == Some(&args.output) {
        return Err(Failure::Input(format!(
            "--output and --stats are the same file {}",
            args.output.display()
        )));
    }
    let cfg = read_config(&args.config)?;
    let mut input = Input::open(&args.input)?;
    match input.logp()? {
        FloatArray::F32(logp) => eval_as(&cfg, &mut input, logp, args),
        FloatArray::F64(logp) => eval_as(&cfg, &mut input, logp, args),
    }
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

/// The rest of `eval`, once `logp` has fixed the float type `F`.
fn eval_as<F: NpyFloat>(
    cfg: &Config,
    input: &mut Input,
    logp: Array2<F>,
    args: &EvalArgs,
) -> Result<(), Failure> {
    let arrays = read_arrays(cfg, input, logp)?;
    let eval = arrays
        .batch()
        .and_then(|batch| cppo::evaluate(cfg, &batch, Par::Rayon))
        .map_err(|e| Failure::Input(input.context(e)))?;

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

/// The input arrays the config uses, read from the npz (only those: an unused array is
/// never read, so its contents cannot fail the run).
fn read_arrays<F: NpyFloat>(
    cfg: &Config,
    input: &mut Input,
    logp: Array2<F>,
) -> Result<Arrays<F>, Failure> {
    const BL: &str = "(B, L)";
    const BLK: &str = "(B, L, K)";
    let logp_old = input.float::<F, Ix2>("logp_old", crate::npz::ALWAYS, BL)?;
    let advantages = input.advantages()?;
    let mask = input.mask()?;
    let topk = if cfg.divergence.needs_topk() {
        let by = format!("divergence {}", cfg.divergence.name());
        let old = input.float::<F, Ix3>("topk_logp_old", &by, BLK)?;
        let new = input.float::<F, Ix3>("topk_logp", &by, BLK)?;
        Some((old, new))
    } else {
        None
    };
    let logp_ref = match cfg.kl {
        Some(_) => Some(input.float::<F, Ix2>("logp_ref", "the kl penalty", BL)?),
        None => None,
    };
    Ok(Arrays {
        logp,
        logp_old,
        advantages,
        mask,
        topk,
        logp_ref,
    })
}
