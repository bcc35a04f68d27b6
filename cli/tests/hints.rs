//! The first day: errors that say what to do, trainers' names, and `cppo synth`, run as
//! a new user runs them (files written here, the binary run as a child process).
//!
//! - A dump under verl's or TRL's tensor names fails without `--names` with a line that
//!   names the convention, lists the file's arrays and says to rerun with `--names`;
//!   with `--names verl` / `--names trl` it gives the crate-named file's outputs, byte
//!   for byte (`eval`'s outputs and stats, `inspect`'s numbers). verl's anchor is
//!   `old_log_probs`, else `rollout_log_probs`.
//! - Positional arrays (`arr_0`, ...) get the keyword-argument hint; a refused dtype
//!   (float16, bfloat16, an integer type, objects, the other float type) gets the
//!   conversion that fixes it.
//! - `cppo synth` writes the library's synthetic batch, deterministically for a seed,
//!   that `cppo eval` and `cppo inspect` read; it writes atomically.

mod common;
use common::{Run, Scratch, args, assert_ok, cppo};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use cppo::ndarray::{Array1, Array2, Array3};
use cppo::synth::{SynthSpec, SyntheticBatch};
use ndarray_npy::{NpzReader, NpzWriter, ReadableElement};
use serde_json::Value;

/// The failure contract, and every needle in the one line.
#[track_caller]
fn assert_fails(run: &Run, code: i32, needles: &[&str]) {
    assert_eq!(run.code, Some(code), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.starts_with("error: "), "{run:?}");
    assert!(!run.stderr.contains("panicked"), "{run:?}");
    for needle in needles {
        assert!(
            run.stderr.contains(needle),
            "no {needle:?} in {}",
            run.stderr
        );
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

// ---------------------------------------------------------------------------------------
// A batch under several conventions of names
// ---------------------------------------------------------------------------------------

/// A realistic batch (hostile padding, holes, ragged rows) with a reference policy and
/// IS weights.
struct Batch {
    b: SyntheticBatch<f32>,
    is_weights: Array2<f32>,
}

fn batch() -> Batch {
    let b = SyntheticBatch::generate(&SynthSpec {
        rows: 12,
        len: 40,
        seed: 3,
        drift: 1.5,
        with_ref: true,
        ..SynthSpec::default()
    });
    let is_weights = Array2::from_shape_fn(b.logp.dim(), |(i, j)| {
        0.5 + ((i * 7 + j * 3) % 10) as f32 / 10.0
    });
    Batch { b, is_weights }
}

/// The names a file gives each array (`None`: left out).
struct Naming {
    logp: &'static str,
    logp_old: Option<&'static str>,
    advantages: &'static str,
    mask: &'static str,
    logp_ref: &'static str,
    is_weights: &'static str,
}

const CRATE: Naming = Naming {
    logp: "logp",
    logp_old: Some("logp_old"),
    advantages: "advantages",
    mask: "mask",
    logp_ref: "logp_ref",
    is_weights: "is_weights",
};

/// verl's batch keys (`dp_actor.py`), with the actor's `log_prob`.
const VERL: Naming = Naming {
    logp: "log_prob",
    logp_old: Some("old_log_probs"),
    advantages: "advantages",
    mask: "response_mask",
    logp_ref: "ref_log_prob",
    is_weights: "rollout_is_weights",
};

/// TRL GRPOTrainer's (`_compute_loss`); TRL has no IS-weight array of the same shape,
/// which keeps the crate's name.
const TRL: Naming = Naming {
    logp: "per_token_logps",
    logp_old: Some("old_per_token_logps"),
    advantages: "advantages",
    mask: "completion_mask",
    logp_ref: "ref_per_token_logps",
    is_weights: "is_weights",
};

impl Batch {
    /// Writes the batch under `names`, with `extra` arrays after it.
    fn write(&self, path: &Path, names: &Naming, extra: &[(&str, &Array2<f32>)]) -> PathBuf {
        let mut npz = NpzWriter::new(File::create(path).unwrap());
        if let Some(n) = names.logp_old {
            npz.add_array(n, &self.b.logp_old).unwrap();
        }
        npz.add_array(names.logp, &self.b.logp).unwrap();
        npz.add_array(names.advantages, &self.b.advantages).unwrap();
        npz.add_array(names.mask, &self.b.mask).unwrap();
        npz.add_array(names.logp_ref, self.b.logp_ref.as_ref().unwrap())
            .unwrap();
        npz.add_array(names.is_weights, &self.is_weights).unwrap();
        for (name, a) in extra {
            npz.add_array(*name, *a).unwrap();
        }
        npz.finish().unwrap();
        path.to_path_buf()
    }
}

/// A config that reads every array of the batch: the KL penalty reads `logp_ref`, and
/// `is_weights` are read whenever the file holds them.
const KL_CONFIG: &str = r#"{"kl": {"estimator": "k3", "coef": 0.1}}"#;

/// `cppo eval` of `input` into `out.npz` and `stats.json` in `dir`, with these extra
/// arguments.
fn eval(s: &Scratch, input: &Path, dir: &str, extra: &[&str]) -> Run {
    let cfg = s.input("cfg.json");
    fs::write(&cfg, KL_CONFIG).unwrap();
    let dir = s.outputs.join(dir);
    fs::create_dir_all(&dir).unwrap();
    let (out, stats) = (dir.join("out.npz"), dir.join("stats.json"));
    let mut all: Vec<&OsStr> = args![
        "eval", "--config", cfg, "--input", input, "--output", out, "--stats", stats
    ]
    .to_vec();
    all.extend(extra.iter().map(OsStr::new));
    cppo(&all)
}

/// The bytes of `eval`'s two outputs in `dir`.
fn outputs(s: &Scratch, dir: &str) -> (Vec<u8>, Vec<u8>) {
    let dir = s.outputs.join(dir);
    (
        fs::read(dir.join("out.npz")).unwrap(),
        fs::read(dir.join("stats.json")).unwrap(),
    )
}

/// `eval` of the crate-named batch: the outputs every convention must give.
fn crate_outputs(s: &Scratch, b: &Batch) -> (Vec<u8>, Vec<u8>) {
    let input = b.write(&s.input("crate.npz"), &CRATE, &[]);
    assert_ok(&eval(s, &input, "crate", &[]));
    outputs(s, "crate")
}

// ---------------------------------------------------------------------------------------
// Trainers' names
// ---------------------------------------------------------------------------------------

#[test]
fn a_verl_dump_gets_the_hint_then_reads_with_names_verl() {
    let s = Scratch::new();
    let b = batch();
    let want = crate_outputs(&s, &b);
    let input = b.write(&s.input("verl.npz"), &VERL, &[]);

    let run = eval(&s, &input, "plain", &[]);
    assert_fails(
        &run,
        2,
        &[
            "verl.npz: array logp is missing; it is required by every config; the file \
             looks like a verl dump (old_log_probs, log_prob, response_mask, ...): rerun \
             with --names verl, or save it with np.savez(path, logp=..., logp_old=..., \
             advantages=..., mask=...); the file holds 6 arrays: old_log_probs (12, 40) \
             float32, log_prob (12, 40) float32, advantages (12,) float32, response_mask \
             (12, 40) bool, ref_log_prob (12, 40) float32, rollout_is_weights (12, 40) \
             float32",
        ],
    );
    assert!(files_in(&s.outputs.join("plain")).is_empty());

    assert_ok(&eval(&s, &input, "verl", &["--names", "verl"]));
    assert_eq!(
        outputs(&s, "verl"),
        want,
        "--names verl reads the same batch"
    );
}

#[test]
fn a_trl_dump_gets_the_hint_then_reads_with_names_trl() {
    let s = Scratch::new();
    let b = batch();
    let want = crate_outputs(&s, &b);
    let input = b.write(&s.input("trl.npz"), &TRL, &[]);

    let run = eval(&s, &input, "plain", &[]);
    assert_fails(
        &run,
        2,
        &[
            "array logp is missing; it is required by every config; the file looks like a \
             TRL dump (old_per_token_logps, per_token_logps, completion_mask, ...): rerun \
             with --names trl, or save it with np.savez(path, logp=..., logp_old=..., \
             advantages=..., mask=...)",
            "the file holds 6 arrays: old_per_token_logps (12, 40) float32",
        ],
    );
    // verl's names are not TRL's.
    let run = eval(&s, &input, "verl", &["--names", "verl"]);
    assert_fails(
        &run,
        2,
        &[
            "array logp is missing (--names verl reads it from log_prob or log_probs)",
            "rerun with --names trl",
        ],
    );

    assert_ok(&eval(&s, &input, "trl", &["--names", "trl"]));
    assert_eq!(outputs(&s, "trl"), want, "--names trl reads the same batch");
}

/// verl's anchor: `old_log_probs` when the file has it (even beside
/// `rollout_log_probs`), else `rollout_log_probs`; TRL's likewise with vLLM's
/// `sampling_per_token_logps`.
#[test]
fn the_anchor_is_old_log_probs_else_the_rollout_engine_s() {
    let s = Scratch::new();
    let b = batch();
    let want = crate_outputs(&s, &b);
    // rollout_log_probs beside old_log_probs holds other values: not read.
    let other = b.b.logp.clone();
    let both = b.write(
        &s.input("both.npz"),
        &VERL,
        &[("rollout_log_probs", &other)],
    );
    assert_ok(&eval(&s, &both, "both", &["--names", "verl"]));
    assert_eq!(outputs(&s, "both"), want, "old_log_probs is the anchor");

    let rollout_only = Naming {
        logp_old: None,
        ..VERL
    };
    let input = b.write(
        &s.input("rollout.npz"),
        &rollout_only,
        &[("rollout_log_probs", &b.b.logp_old)],
    );
    assert_ok(&eval(&s, &input, "rollout", &["--names", "verl"]));
    assert_eq!(
        outputs(&s, "rollout"),
        want,
        "rollout_log_probs, failing that"
    );

    let vllm_only = Naming {
        logp_old: None,
        ..TRL
    };
    let input = b.write(
        &s.input("vllm.npz"),
        &vllm_only,
        &[("sampling_per_token_logps", &b.b.logp_old)],
    );
    assert_ok(&eval(&s, &input, "vllm", &["--names", "trl"]));
    assert_eq!(
        outputs(&s, "vllm"),
        want,
        "sampling_per_token_logps, failing that"
    );

    // Neither: the line says what was looked for.
    let input = b.write(&s.input("none.npz"), &rollout_only, &[]);
    let run = eval(&s, &input, "none", &["--names", "verl"]);
    assert_fails(
        &run,
        2,
        &[
            "array logp_old is missing (--names verl reads it from old_log_probs, \
             old_log_prob or rollout_log_probs); it is required by every config; save \
             the batch with np.savez(path, logp=..., logp_old=..., advantages=..., \
             mask=...); the file holds 5 arrays: log_prob (12, 40) float32",
        ],
    );
}

/// Errors about values name the crate's array and the file's.
#[test]
fn value_errors_say_which_array_was_read() {
    let s = Scratch::new();
    let b = batch();
    let (i, j) = b.b.mask.indexed_iter().find(|&(_, &m)| m).unwrap().0;
    let mut bad = b.b.logp_old.clone();
    bad[[i, j]] = f32::NAN;
    let bad = Batch {
        b: SyntheticBatch {
            logp_old: bad,
            ..b.b.clone()
        },
        is_weights: b.is_weights.clone(),
    };
    let input = bad.write(&s.input("verl.npz"), &VERL, &[]);
    let run = eval(&s, &input, "verl", &["--names", "verl"]);
    assert_fails(
        &run,
        2,
        &[
            &format!("logp_old at row {i}, column {j} is NaN"),
            "(under --names verl: logp is the file's log_prob, logp_old is the file's \
             old_log_probs, mask is the file's response_mask, logp_ref is the file's \
             ref_log_prob, is_weights is the file's rollout_is_weights)",
        ],
    );
    // Under the crate's names, nothing is added.
    let input = bad.write(&s.input("crate.npz"), &CRATE, &[]);
    let run = eval(&s, &input, "crate", &[]);
    assert_fails(&run, 2, &["logp_old at row"]);
    assert!(!run.stderr.contains("--names"), "{run:?}");
}

#[test]
fn crate_names_read_with_names_verl_say_rerun_without() {
    let s = Scratch::new();
    let input = batch().write(&s.input("crate.npz"), &CRATE, &[]);
    let run = eval(&s, &input, "verl", &["--names", "verl"]);
    assert_fails(
        &run,
        2,
        &[
            "array logp is missing (--names verl reads it from log_prob or log_probs); it \
             is required by every config; the file uses cppo's own names (logp_old, logp, \
             mask, ...): rerun without --names; the file holds 6 arrays",
        ],
    );
}

#[test]
fn one_array_under_another_convention_s_name() {
    let s = Scratch::new();
    let mixed = Naming {
        logp_old: Some("old_log_probs"),
        ..CRATE
    };
    let input = batch().write(&s.input("mixed.npz"), &mixed, &[]);
    let run = eval(&s, &input, "out", &[]);
    assert_fails(
        &run,
        2,
        &[
            "array logp_old is missing; it is required by every config; old_log_probs is \
           verl's name for logp_old: save it as logp_old; the file holds 6 arrays",
        ],
    );
}

#[test]
fn positional_arrays_get_the_keyword_hint() {
    let s = Scratch::new();
    let b = batch().b;
    // np.savez(path, logp, logp_old, advantages, mask)
    let path = s.input("positional.npz");
    let mut npz = NpzWriter::new(File::create(&path).unwrap());
    npz.add_array("arr_0", &b.logp).unwrap();
    npz.add_array("arr_1", &b.logp_old).unwrap();
    npz.add_array("arr_2", &b.advantages).unwrap();
    npz.add_array("arr_3", &b.mask).unwrap();
    npz.finish().unwrap();
    let run = eval(&s, &path, "out", &[]);
    assert_fails(
        &run,
        2,
        &[
            "positional.npz: array logp is missing; it is required by every config; its \
           arrays have no names (np.savez(path, a, b, ...) calls them arr_0, arr_1, ...): \
           name them with keyword arguments, np.savez(path, logp=..., logp_old=..., \
           advantages=..., mask=...); the file holds 4 arrays: arr_0 (12, 40) float32, \
           arr_1 (12, 40) float32, arr_2 (12,) float32, arr_3 (12, 40) bool",
        ],
    );
}

/// A file of many arrays lists the first 12; an empty archive says so.
#[test]
fn the_listing_is_bounded() {
    let s = Scratch::new();
    let path = s.input("many.npz");
    let mut npz = NpzWriter::new(File::create(&path).unwrap());
    for k in 0..30 {
        npz.add_array(format!("x{k}"), &Array1::<f64>::zeros(k))
            .unwrap();
    }
    npz.finish().unwrap();
    let run = eval(&s, &path, "out", &[]);
    assert_fails(
        &run,
        2,
        &[
            "save the batch with np.savez(path, logp=..., logp_old=..., advantages=..., \
             mask=...); the file holds 30 arrays: x0 (0,) float64, x1 (1,) float64",
            "x11 (11,) float64, and 18 more",
        ],
    );
    assert!(!run.stderr.contains("x12"), "{run:?}");

    let path = s.input("empty.npz");
    NpzWriter::new(File::create(&path).unwrap())
        .finish()
        .unwrap();
    let run = eval(&s, &path, "out", &[]);
    assert_fails(
        &run,
        2,
        &["array logp is missing", "the file holds no arrays"],
    );
}

/// `cppo inspect` reads trainers' names the same way, a file or a directory of steps.
#[test]
fn inspect_reads_trainer_names() {
    let s = Scratch::new();
    let b = batch();
    let crate_file = b.write(&s.input("crate.npz"), &CRATE, &[]);
    let verl_file = b.write(&s.input("verl.npz"), &VERL, &[]);
    let run = cppo(args!["inspect", verl_file]);
    assert_fails(
        &run,
        2,
        &["the file looks like a verl dump", "--names verl"],
    );
    assert!(run.stdout.is_empty(), "{run:?}");

    let json = |name: &str| s.outputs.join(name);
    assert_ok(&cppo(args![
        "inspect",
        crate_file,
        "--json",
        json("crate.json")
    ]));
    assert_ok(&cppo(args![
        "inspect",
        verl_file,
        "--names",
        "verl",
        "--json",
        json("verl.json")
    ]));
    let read = |p: PathBuf| -> Value { serde_json::from_slice(&fs::read(p).unwrap()).unwrap() };
    let (want, got) = (read(json("crate.json")), read(json("verl.json")));
    assert_eq!(got["rules"], want["rules"], "the same numbers");
    assert!(want["rules"].as_array().is_some_and(|r| r.len() == 8));

    // A directory of steps under TRL's names.
    let dir = s.inputs.join("steps");
    fs::create_dir(&dir).unwrap();
    b.write(&dir.join("step_000001.npz"), &TRL, &[]);
    let run = cppo(args!["inspect", dir]);
    assert_fails(&run, 2, &["step_000001.npz", "--names trl"]);
    assert_ok(&cppo(args!["inspect", dir, "--names", "trl"]));
}

/// `cppo bench --input` has --names too: the hint says to use it, and it works.
#[test]
fn bench_input_reads_other_names() {
    let s = Scratch::new();
    let input = batch().write(&s.input("verl.npz"), &VERL, &[]);
    let run = cppo(args!["bench", "--input", input]);
    assert_fails(
        &run,
        2,
        &[
            "the file looks like a verl dump (old_log_probs, log_prob, response_mask, ...): \
           rerun with --names verl, or save it with np.savez(",
        ],
    );
    assert_ok(&cppo(args!["bench", "--input", input, "--names", "verl"]));
}

#[test]
fn names_are_documented_in_help() {
    for cmd in ["eval", "inspect", "bench"] {
        let run = cppo(&[cmd, "--help"]);
        assert_ok(&run);
        for needle in [
            "--names <NAMES>",
            "old_log_probs | old_log_prob | rollout_log_probs",
            "per_token_logps",
            "completion_mask",
        ] {
            assert!(run.stdout.contains(needle), "{cmd} --help lacks {needle}");
        }
    }
    let run = cppo(&["eval", "--names", "megatron"]);
    assert_fails(&run, 2, &["megatron"]);
}

// ---------------------------------------------------------------------------------------
// Dtypes
// ---------------------------------------------------------------------------------------

/// An `.npy` file (format 1.0) with this header dict and data.
fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut header = format!("{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}");
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - 10 - header.len() - 1));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend(u16::try_from(header.len()).unwrap().to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// A (2, 3) batch as `.npy` entries, float32, with the given entries replaced or added.
fn raw_npz(path: &Path, replace: &[(&str, Vec<u8>)]) -> PathBuf {
    let f32s = |x: &[f32]| -> Vec<u8> { x.iter().flat_map(|v| v.to_le_bytes()).collect() };
    let mut entries = vec![
        ("logp", npy("'<f4'", "(2, 3)", &f32s(&[-0.1; 6]))),
        ("logp_old", npy("'<f4'", "(2, 3)", &f32s(&[-0.2; 6]))),
        ("advantages", npy("'<f4'", "(2,)", &f32s(&[1.0, -1.0]))),
        ("mask", npy("'|b1'", "(2, 3)", &[1; 6])),
    ];
    for (name, bytes) in replace {
        match entries.iter_mut().find(|(n, _)| n == name) {
            Some(e) => e.1 = bytes.clone(),
            None => entries.push((name, bytes.clone())),
        }
    }
    let mut z = zip::ZipWriter::new(File::create(path).unwrap());
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in entries {
        z.start_file(format!("{name}.npy"), options).unwrap();
        z.write_all(&bytes).unwrap();
    }
    z.finish().unwrap();
    path.to_path_buf()
}

#[test]
fn dtype_errors_suggest_the_fix() {
    let s = Scratch::new();
    let half = vec![0u8; 12];
    let cases: [(&str, Vec<u8>, &str); 7] = [
        (
            "logp",
            npy("'<f2'", "(2, 3)", &half),
            "array logp has dtype '<f2', expected float32 or float64: save \
             logp.astype(np.float32)",
        ),
        (
            "logp",
            npy("'<i4'", "(2, 3)", &[0; 24]),
            "array logp has dtype '<i4', expected float32 or float64: save \
             logp.astype(np.float32)",
        ),
        (
            "logp",
            npy("'|O'", "(2,)", &[0; 16]),
            "array logp has dtype '|O', expected float32 or float64: an object array (a \
             list of arrays, or rows of different lengths?) is not read; pad the rows to \
             one length and save np.asarray(logp, dtype=np.float32)",
        ),
        (
            "logp",
            npy("'<V2'", "(2, 3)", &half),
            "array logp has dtype '<V2', expected float32 or float64: numpy has no \
             bfloat16 (ml_dtypes' bfloat16 is saved as V2); from torch, save \
             logp.float().numpy()",
        ),
        (
            "logp_old",
            npy("'<f8'", "(2, 3)", &[0; 48]),
            "array logp_old has dtype '<f8', expected float32, the type of logp (all \
             float arrays must have one type): save logp_old.astype(np.float32)",
        ),
        (
            "mask",
            npy("'<f2'", "(2, 3)", &half),
            "array mask has dtype '<f2', expected bool, an integer type, float32 or \
             float64: save mask.astype(bool)",
        ),
        (
            "logp",
            npy("'<c8'", "(2, 3)", &[0; 48]),
            "array logp has dtype '<c8', expected float32 or float64",
        ),
    ];
    for (k, (name, bytes, message)) in cases.into_iter().enumerate() {
        let path = raw_npz(&s.input(&format!("bad{k}.npz")), &[(name, bytes)]);
        let run = eval(&s, &path, "out", &[]);
        assert_fails(&run, 2, &[message]);
        if message.ends_with("float64") {
            assert!(!run.stderr.contains("save"), "no fix for complex: {run:?}");
        }
    }
    // The fix names the file's array: a float16 log_prob under --names verl.
    let path = raw_npz(
        &s.input("verl16.npz"),
        &[
            ("log_prob", npy("'<f2'", "(2, 3)", &half)),
            ("old_log_probs", npy("'<f4'", "(2, 3)", &[0; 24])),
            ("response_mask", npy("'|b1'", "(2, 3)", &[1; 6])),
        ],
    );
    let run = eval(&s, &path, "out", &["--names", "verl"]);
    assert_fails(
        &run,
        2,
        &[
            "array log_prob has dtype '<f2'",
            "save log_prob.astype(np.float32)",
        ],
    );
}

/// Writes a safetensors file by its definition.
fn safetensors(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> PathBuf {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for t in tensors {
        out.extend(&t.3);
    }
    fs::write(path, out).unwrap();
    path.to_path_buf()
}

#[test]
fn safetensors_dtype_errors_and_names() {
    let s = Scratch::new();
    let f32s = |n: usize| vec![0u8; 4 * n];
    for (dtype, size) in [("BF16", 2), ("F16", 2), ("I64", 8)] {
        let path = safetensors(
            &s.input(&format!("{dtype}.safetensors")),
            &[("logp", dtype, vec![2, 3], vec![0; 6 * size])],
        );
        let run = eval(&s, &path, "out", &[]);
        assert_fails(
            &run,
            2,
            &[&format!(
                "array logp has dtype {dtype}, expected float32 or float64: save \
                 logp.float() (torch) instead"
            )],
        );
    }
    // A TRL dump saved with safetensors: the save hint is safetensors'.
    let path = safetensors(
        &s.input("trl.safetensors"),
        &[
            ("per_token_logps", "F32", vec![2, 3], f32s(6)),
            ("old_per_token_logps", "F32", vec![2, 3], f32s(6)),
            ("advantages", "F32", vec![2], f32s(2)),
            ("completion_mask", "BOOL", vec![2, 3], vec![1; 6]),
            ("ref_per_token_logps", "F32", vec![2, 3], f32s(6)),
        ],
    );
    let run = eval(&s, &path, "out", &[]);
    assert_fails(
        &run,
        2,
        &[
            "rerun with --names trl, or save it with safetensors.torch.save_file({\"logp\": \
             ..., \"logp_old\": ..., \"advantages\": ..., \"mask\": ...}, path)",
            "the file holds 5 arrays: per_token_logps (2, 3) F32, old_per_token_logps (2, 3) \
             F32, advantages (2,) F32, completion_mask (2, 3) BOOL, ref_per_token_logps \
             (2, 3) F32",
        ],
    );
    assert_ok(&eval(&s, &path, "trl", &["--names", "trl"]));
}

// ---------------------------------------------------------------------------------------
// cppo synth
// ---------------------------------------------------------------------------------------

fn synth(out: &Path, extra: &[&str]) -> Run {
    let mut all: Vec<&OsStr> = args!["synth", "--output", out].to_vec();
    all.extend(extra.iter().map(OsStr::new));
    cppo(&all)
}

#[test]
fn synth_output_is_read_by_eval_and_inspect() {
    let s = Scratch::new();
    let batch = s.input("batch.npz");
    let run = synth(&batch, &[]);
    assert_ok(&run);
    assert_eq!(
        run.stdout,
        format!(
            "wrote {}: 64 rows × 512 slots, 29491 response tokens, float32, seed 0: logp, \
             logp_old, advantages, mask\n",
            batch.display()
        )
    );
    let out = s.outputs.join("out.npz");
    let run = cppo(args![
        "eval", "--preset", "cppo", "--input", batch, "--output", out
    ]);
    assert_ok(&run);
    assert!(
        run.stdout.contains("29491 response tokens in 64 sequences"),
        "{run:?}"
    );
    let run = cppo(args!["inspect", batch]);
    assert_ok(&run);
    assert!(run.stdout.contains("64 rows × 512 slots"), "{run:?}");

    // The top-K pair and the reference policy, for the configs that read them.
    let full = s.input("full.npz");
    assert_ok(&synth(
        &full,
        &["--topk", "4", "--with-ref", "--rows", "8", "--len", "64"],
    ));
    let cfg = s.input("topk_kl.json");
    fs::write(
        &cfg,
        r#"{"divergence": "topk_tv", "kl": {"estimator": "k3", "coef": 0.1}}"#,
    )
    .unwrap();
    let run = cppo(args![
        "eval", "--config", cfg, "--input", full, "--output", out
    ]);
    assert_ok(&run);
    // Without them, such a config is refused naming the array.
    let small = s.input("small.npz");
    assert_ok(&synth(&small, &["--rows", "8", "--len", "64"]));
    let run = cppo(args![
        "eval", "--config", cfg, "--input", small, "--output", out
    ]);
    assert_fails(&run, 2, &["array topk_logp_old is missing"]);
}

/// The same seed, the same bytes; another seed, another batch.
#[test]
fn synth_is_deterministic_for_a_seed() {
    let s = Scratch::new();
    let (a, b, c) = (s.input("a.npz"), s.input("b.npz"), s.input("c.npz"));
    let opts = ["--rows", "16", "--len", "96", "--seed", "7", "--topk", "3"];
    assert_ok(&synth(&a, &opts));
    assert_ok(&synth(&b, &opts));
    assert_eq!(
        fs::read(&a).unwrap(),
        fs::read(&b).unwrap(),
        "one seed, one file"
    );
    assert_ok(&synth(
        &c,
        &["--rows", "16", "--len", "96", "--seed", "8", "--topk", "3"],
    ));
    assert_ne!(fs::read(&a).unwrap(), fs::read(&c).unwrap());
}

fn bits<T: ReadableElement + Copy, D: cppo::ndarray::Dimension>(
    npz: &mut NpzReader<File>,
    name: &str,
) -> cppo::ndarray::Array<T, D> {
    npz.by_name(name).unwrap()
}

/// The file holds the library's batch for the same spec, value for value (NaN padding
/// included), under the crate's names, in --dtype.
#[test]
fn synth_writes_the_library_s_batch() {
    let s = Scratch::new();
    let path = s.input("f64.npz");
    let run = synth(
        &path,
        &[
            "--rows",
            "10",
            "--len",
            "50",
            "--seed",
            "5",
            "--topk",
            "2",
            "--with-ref",
            "--drift",
            "2",
            "--dtype",
            "f64",
        ],
    );
    assert_ok(&run);
    assert!(
        run.stdout.contains(
            "float64, seed 5: logp, logp_old, advantages, mask, topk_logp_old, topk_logp, logp_ref"
        ),
        "{run:?}"
    );
    let want = SyntheticBatch::<f64>::generate(&SynthSpec {
        rows: 10,
        len: 50,
        seed: 5,
        topk: Some(2),
        with_ref: true,
        drift: 2.0,
        ..SynthSpec::default()
    });
    let mut npz = NpzReader::new(File::open(&path).unwrap()).unwrap();
    let mut names = npz.names().unwrap();
    names.sort();
    assert_eq!(
        names,
        [
            "advantages",
            "logp",
            "logp_old",
            "logp_ref",
            "mask",
            "topk_logp",
            "topk_logp_old"
        ]
    );
    let same2 = |got: Array2<f64>, want: &Array2<f64>, name: &str| {
        assert_eq!(got.mapv(f64::to_bits), want.mapv(f64::to_bits), "{name}");
    };
    same2(bits(&mut npz, "logp"), &want.logp, "logp");
    same2(bits(&mut npz, "logp_old"), &want.logp_old, "logp_old");
    same2(
        bits(&mut npz, "logp_ref"),
        want.logp_ref.as_ref().unwrap(),
        "logp_ref",
    );
    let adv: Array1<f64> = bits(&mut npz, "advantages");
    assert_eq!(adv.mapv(f64::to_bits), want.advantages.mapv(f64::to_bits));
    let mask: Array2<bool> = bits(&mut npz, "mask");
    assert_eq!(mask, want.mask);
    let topk: Array3<f64> = bits(&mut npz, "topk_logp_old");
    let want_topk = want.topk_logp_old.as_ref().unwrap();
    assert_eq!(topk.mapv(f64::to_bits), want_topk.mapv(f64::to_bits));
    // Padding is hostile, as the library's.
    assert!(
        want.logp
            .iter()
            .zip(&want.mask)
            .any(|(x, &m)| !m && !x.is_finite())
    );
}

/// The file appears whole or not at all.
#[test]
fn synth_writes_atomically() {
    let s = Scratch::new();
    // A directory that does not exist: exit code 1, nothing created.
    let run = synth(&s.outputs.join("no/such/dir/batch.npz"), &[]);
    assert_fails(&run, 1, &["cannot create a file beside", "batch.npz"]);
    assert!(files_in(&s.outputs).is_empty());
    // Onto a directory: the rename fails, the temporary file is removed, the directory
    // is untouched.
    let dir = s.outputs.join("taken");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("keep.txt"), "x").unwrap();
    let run = synth(&dir, &["--rows", "4", "--len", "8"]);
    assert_fails(&run, 1, &["cannot move the output into place", "taken"]);
    assert_eq!(files_in(&s.outputs), ["taken"]);
    assert_eq!(files_in(&dir), ["keep.txt"]);
    // Too large to be read by eval: refused before anything is generated.
    let path = s.outputs.join("big.npz");
    let run = synth(&path, &["--rows", "100000", "--len", "100000"]);
    assert_fails(
        &run,
        2,
        &[
            "--rows 100000 --len 100000: the batch would take 90000400000 bytes, more than \
           the 8G (8589934592 bytes) that cppo eval reads by default (--max-memory)",
        ],
    );
    for bad in [
        &["--rows", "0"][..],
        &["--len", "x"],
        &["--drift", "nan"],
        &["--drift", "1000"],
        &["--dtype", "f16"],
        &["--topk", "0"],
    ] {
        let run = synth(&path, bad);
        assert_fails(&run, 2, &[bad[0]]);
    }
    assert_eq!(files_in(&s.outputs), ["taken"]);
    // An existing file is replaced.
    fs::write(&path, "old").unwrap();
    assert_ok(&synth(&path, &["--rows", "2", "--len", "4"]));
    assert_ne!(fs::read(&path).unwrap(), b"old");
    assert_eq!(files_in(&s.outputs), ["big.npz", "taken"]);
}
