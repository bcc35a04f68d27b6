//! `cppo synth`: a realistic synthetic batch ([`cppo::synth`]) written to an `.npz` file
//! that `cppo eval`, `cppo inspect` and `cppo bench --input` read as it is.
//!
//! The file holds `logp`, `logp_old` and `mask` (B, L), `advantages` (B,), and with
//! `--topk K` the pair `topk_logp_old`, `topk_logp` (B, L, K), with `--with-ref`
//! `logp_ref` (B, L): the crate's names, uncompressed, in `--dtype` (float32 by default;
//! the mask is bool). Padding holds NaN, ±∞ and garbage, as trainers leave it: the tool
//! never reads it. One seed gives one file, byte for byte (every zip timestamp is the
//! format's earliest, 1980-01-01). The file is written as `eval`'s outputs are
//! ([`crate::staged`]): to a temporary file beside it, renamed into place once complete,
//! so that a failed command leaves nothing.

use std::io::{self, Write};
use std::num::NonZeroUsize;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use cppo::synth::{SynthSpec, SyntheticBatch};
use ndarray_npy::{NpzWriter, WritableElement};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime};

use crate::batchfile::{DEFAULT_MAX_MEMORY, MaxMemory};
use crate::failure::Failure;
use crate::staged::{Staged, commit_all};

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Where to write the batch (.npz). Replaced if it exists.
    #[arg(long, value_name = "BATCH.npz")]
    output: PathBuf,

    /// B: rows (responses, in GRPO groups of 8).
    #[arg(long, value_name = "B", default_value = "64")]
    rows: NonZeroUsize,

    /// L: padded width, in tokens (90% of the B x L slots are response tokens).
    #[arg(long, value_name = "L", default_value = "512")]
    len: NonZeroUsize,

    /// The seed of every random draw: one seed, one file, byte for byte.
    #[arg(long, value_name = "N", default_value_t = 0)]
    seed: u64,

    /// Also write the top-K pair topk_logp_old, topk_logp (B, L, K), which the topk_tv
    /// and topk_kl divergences read.
    #[arg(long, value_name = "K")]
    topk: Option<NonZeroUsize>,

    /// Also write logp_ref (B, L), the reference policy's log-probs, which a config with
    /// a kl penalty reads.
    #[arg(long)]
    with_ref: bool,

    /// Scale of the off-policy drift between the rollout and current policies, larger
    /// on early tokens, in [0, 100] (0: the two policies are equal).
    #[arg(long, value_name = "SCALE", default_value_t = 1.0, value_parser = parse_drift)]
    drift: f64,

    /// Float type of the float arrays.
    #[arg(long, value_enum, default_value_t = SynthDtype::F32)]
    dtype: SynthDtype,
}

/// `--dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SynthDtype {
    F32,
    F64,
}

/// The largest `--drift`.
const MAX_DRIFT: f64 = 100.0;

fn parse_drift(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if (0.0..=MAX_DRIFT).contains(&x) => Ok(x),
        _ => Err(format!("{text:?} is not a drift scale in [0, {MAX_DRIFT}]")),
    }
}

/// Runs `cppo synth`.
pub fn run(args: &SynthArgs) -> Result<(), Failure> {
    let spec = SynthSpec {
        rows: args.rows.get(),
        len: args.len.get(),
        topk: args.topk.map(NonZeroUsize::get),
        with_ref: args.with_ref,
        seed: args.seed,
        drift: args.drift,
        ..SynthSpec::default()
    };
    let size = match args.dtype {
        SynthDtype::F32 => 4,
        SynthDtype::F64 => 8,
    };
    check_size(&spec, size)?;
    let summary = match args.dtype {
        SynthDtype::F32 => write::<f32>(&spec, args)?,
        SynthDtype::F64 => write::<f64>(&spec, args)?,
    };
    // The file is in place; a closed stdout is not worth failing over.
    let _ = writeln!(io::stdout(), "{summary}");
    Ok(())
}

/// Refuses a batch larger than `cppo eval` reads by default (`--max-memory`), before
/// anything is generated.
fn check_size(spec: &SynthSpec, size: u64) -> Result<(), Failure> {
    let limit = MaxMemory::parse(DEFAULT_MAX_MEMORY).map_err(Failure::Input)?;
    let per_slot = 2 + 2 * spec.topk.unwrap_or(0) as u64 + u64::from(spec.with_ref);
    let bytes = (spec.rows as u64)
        .checked_mul(spec.len as u64)
        .and_then(|slots| slots.checked_mul(per_slot.checked_mul(size)?.checked_add(1)?))
        .and_then(|b| b.checked_add(spec.rows as u64 * size));
    match bytes {
        Some(b) if b <= limit.0 => Ok(()),
        _ => Err(Failure::Input(format!(
            "--rows {} --len {}{}: the batch would take {}, more than the {limit} that \
             cppo eval reads by default (--max-memory)",
            spec.rows,
            spec.len,
            spec.topk.map_or(String::new(), |k| format!(" --topk {k}")),
            bytes.map_or("more than 2^64 bytes".into(), |b| format!("{b} bytes")),
        ))),
    }
}

/// Generates the batch, writes it to a temporary file and renames it into place;
/// returns the summary line.
fn write<F>(spec: &SynthSpec, args: &SynthArgs) -> Result<String, Failure>
where
    F: cppo::Float + WritableElement,
{
    let d = SyntheticBatch::<F>::generate(spec);
    // The generator's own promise; checked so that the file is one `cppo eval` reads.
    d.batch()
        .and_then(|b| b.validate())
        .map_err(|e| Failure::Input(format!("the synthetic batch: {e}")))?;
    let largest = d
        .topk_logp_old
        .as_ref()
        .map_or(d.logp.len(), |t| t.len())
        .saturating_mul(size_of::<F>());
    let options = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .last_modified_time(DateTime::default())
        .large_file(largest as u64 >= u64::from(u32::MAX));
    let mut names = vec!["logp", "logp_old", "advantages", "mask"];
    if d.topk_logp_old.is_some() {
        names.extend(["topk_logp_old", "topk_logp"]);
    }
    if d.logp_ref.is_some() {
        names.push("logp_ref");
    }
    let staged = Staged::write(&args.output, |w| {
        let mut npz = NpzWriter::new_with_options(w, options);
        npz.add_array("logp", &d.logp)?;
        npz.add_array("logp_old", &d.logp_old)?;
        npz.add_array("advantages", &d.advantages)?;
        npz.add_array("mask", &d.mask)?;
        if let (Some(old), Some(new)) = (&d.topk_logp_old, &d.topk_logp) {
            npz.add_array("topk_logp_old", old)?;
            npz.add_array("topk_logp", new)?;
        }
        if let Some(r) = &d.logp_ref {
            npz.add_array("logp_ref", r)?;
        }
        npz.finish()
    })?;
    commit_all(vec![staged])?;
    let tokens = d.mask.iter().filter(|&&m| m).count();
    let dtype = if size_of::<F>() == 4 {
        "float32"
    } else {
        "float64"
    };
    Ok(format!(
        "wrote {}: {} rows × {} slots, {tokens} response tokens, {dtype}, seed {}: {}",
        args.output.display(),
        spec.rows,
        spec.len,
        spec.seed,
        names.join(", ")
    ))
}
