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
//!
//! # Layout
//!
//! This module holds the entry points and the limits of a run; its submodules hold the
//! rest: `runner` runs a case's commands and records findings, `check` checks the
//! promises of each run, `generate` makes a case (its config and file), `array` and
//! `batch` the batch it encodes, `mutate` the mutations whatever the format, `npy`,
//! `archive` and `npz` the npz files, and `safetensors` the safetensors files.

mod archive;
mod array;
mod batch;
mod check;
mod generate;
mod mutate;
mod npy;
mod npz;
mod runner;
mod safetensors;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Opts, Report};
use archive::{ZipPatch, bomb, zip_members, zip_plans};
use array::Dt;
use batch::Batch;
use check::check;
use generate::generate;
use npy::{Member, NpyPlan, py_shape};
use runner::{
    Case, Cmd, NPZ, ST, Want, eval_args, fresh_dir, inspect_args, preflight, private_copy,
    run_cppo, run_one,
};
use safetensors::StPlan;

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
