//! End-to-end tests of the `cppo` binary (the `cppo-cli` crate), driven as a user drives it:
//! `.npz` and JSON files written here, the binary run as a child process, its exit code,
//! stdout, stderr and output files checked.
//!
//! - The failure contract of the command line (`cppo::doc::command_line`), for every class of bad input: exit code 2,
//!   exactly one line on stderr naming the array, row and column (or the config field,
//!   or the file), and nothing left in the output directory, temporary files included.
//! - Valid edge cases: the worked example's worked example, an empty batch, all padding,
//!   probabilities of 1, float32 input, every mask dtype, (B,) advantages, Fortran-order
//!   arrays, unused arrays, the stats JSON.
//! - The golden fixtures of `tests/data/` through the binary.
//! - The `.npz` reader: compressed archives, big-endian data, `.npy` format versions,
//!   and corrupt entries (a huge declared shape, bad headers, bad `descr`, data of the
//!   wrong size, a bad checksum), built byte by byte.
//! - `cppo bench` smoke tests.

mod common;
use common::{Run, Scratch, cppo};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use cppo::ndarray::{Array0, Array1, Array2, Array3, ShapeBuilder, array};
use ndarray_npy::{NpzReader, NpzWriter, ReadableElement, WriteNpyExt};

// ---------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------

impl Scratch {
    fn out(&self) -> PathBuf {
        self.outputs.join("out.npz")
    }

    fn stats(&self) -> PathBuf {
        self.outputs.join("stats.json")
    }

    /// Writes a config file.
    fn config(&self, json: &str) -> PathBuf {
        let path = self.input("cfg.json");
        fs::write(&path, json).unwrap();
        path
    }

    /// Starts an input archive.
    fn npz(&self, name: &str) -> Npz {
        let path = self.input(name);
        Npz {
            writer: NpzWriter::new(File::create(&path).unwrap()),
            path,
        }
    }

    /// `cppo eval` with both `--output` and `--stats`.
    fn eval(&self, config: &Path, input: &Path) -> Run {
        let (out, stats) = (self.out(), self.stats());
        cppo(&[
            OsStr::new("eval"),
            OsStr::new("--config"),
            config.as_os_str(),
            OsStr::new("--input"),
            input.as_os_str(),
            OsStr::new("--output"),
            out.as_os_str(),
            OsStr::new("--stats"),
            stats.as_os_str(),
        ])
    }

    /// `cppo eval` that must succeed; returns the outputs.
    fn eval_ok(&self, config: &Path, input: &Path) -> Outputs {
        let run = self.eval(config, input);
        assert_eq!(run.code, Some(0), "{run:?}");
        assert!(run.stderr.is_empty(), "{run:?}");
        assert_eq!(run.stdout.lines().count(), 1, "{run:?}");
        assert!(run.stdout.contains("loss"), "{run:?}");
        Outputs::read(&self.out())
    }

    fn output_files(&self) -> Vec<String> {
        fs::read_dir(&self.outputs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// The failure contract: exit code 2, one line on stderr containing every needle,
    /// no output file (nor temporary file) left behind.
    #[track_caller]
    fn assert_bad_input(&self, run: &Run, needles: &[&str]) {
        assert_eq!(run.code, Some(2), "{run:?}");
        assert_one_line(run, needles);
        let left = self.output_files();
        assert!(left.is_empty(), "left behind: {left:?}; {run:?}");
    }
}

/// Exactly one line on stderr, starting `error: `, containing every needle.
#[track_caller]
fn assert_one_line(run: &Run, needles: &[&str]) {
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.ends_with('\n'), "{run:?}");
    assert!(run.stderr.starts_with("error: "), "{run:?}");
    assert!(!run.stderr.contains("panicked"), "{run:?}");
    for needle in needles {
        assert!(run.stderr.contains(needle), "no {needle:?} in {run:?}");
    }
}

/// An input archive being written.
struct Npz {
    writer: NpzWriter<File>,
    path: PathBuf,
}

impl Npz {
    fn add<T: WriteNpyExt + ?Sized>(mut self, name: &str, array: &T) -> Self {
        self.writer.add_array(name, array).unwrap();
        self
    }

    fn finish(self) -> PathBuf {
        self.writer.finish().unwrap();
        self.path
    }
}

/// An output archive, floats widened to f64.
#[derive(Debug, PartialEq)]
struct Outputs {
    divergence: Array2<f64>,
    weight: Array2<f64>,
    threshold: Array2<f64>,
    keep: Array2<f64>,
    token_loss: Array2<f64>,
    grad: Array2<f64>,
    reason: Array2<u8>,
    /// (B,); NaN where the rule has no budget. Empty for the older golden fixtures.
    delta_b_row: Array1<f64>,
    loss: f64,
}

const FLOAT_OUTPUTS: [&str; 6] = [
    "divergence",
    "weight",
    "threshold",
    "keep",
    "token_loss",
    "grad",
];

impl Outputs {
    /// Reads an output archive whose floats are f64, as the binary writes for f64 input.
    fn read(path: &Path) -> Self {
        Self::read_as::<f64>(path, f64::from)
    }

    /// Reads an older golden fixture's expected outputs (without `delta_b_row`).
    fn read_golden(path: &Path) -> Self {
        Self::read_from::<f64>(path, f64::from, false)
    }

    /// Reads an output archive whose floats are `F`.
    fn read_as<F: ReadableElement + Copy>(path: &Path, widen: fn(F) -> f64) -> Self {
        Self::read_from(path, widen, true)
    }

    fn read_from<F: ReadableElement + Copy>(path: &Path, widen: fn(F) -> f64, tool: bool) -> Self {
        let mut npz = NpzReader::new(File::open(path).unwrap()).unwrap();
        let mut names = npz.names().unwrap();
        names.sort();
        let per_row: &[&str] = if tool { &["delta_b_row"] } else { &[] };
        let mut want = [&FLOAT_OUTPUTS[..], &["reason", "loss"], per_row].concat();
        want.sort();
        assert_eq!(names, want, "the output arrays");
        let delta_b_row = if tool {
            npz.by_name::<_, _>("delta_b_row")
                .map(|a: Array1<F>| a.mapv(widen))
                .unwrap()
        } else {
            Array1::zeros(0)
        };
        let mut float = |name: &str| {
            npz.by_name::<_, _>(name)
                .map(|a: Array2<F>| a.mapv(widen))
                .unwrap()
        };
        let (divergence, weight, threshold) =
            (float("divergence"), float("weight"), float("threshold"));
        let (keep, token_loss, grad) = (float("keep"), float("token_loss"), float("grad"));
        let loss: Array0<f64> = npz.by_name("loss").unwrap();
        Self {
            divergence,
            weight,
            threshold,
            keep,
            token_loss,
            grad,
            reason: npz.by_name("reason").unwrap(),
            delta_b_row,
            loss: loss.into_scalar(),
        }
    }

    fn floats(&self) -> [(&'static str, &Array2<f64>); 6] {
        [
            ("divergence", &self.divergence),
            ("weight", &self.weight),
            ("threshold", &self.threshold),
            ("keep", &self.keep),
            ("token_loss", &self.token_loss),
            ("grad", &self.grad),
        ]
    }

    /// Equal to `want`: reasons exactly, floats to `rel` relative (NaN where `want` has
    /// NaN), the loss too.
    #[track_caller]
    fn assert_close(&self, want: &Self, rel: f64, case: &str) {
        assert_eq!(self.reason, want.reason, "{case}: reason");
        if !want.delta_b_row.is_empty() {
            assert_eq!(
                self.delta_b_row.len(),
                want.delta_b_row.len(),
                "{case}: delta_b_row"
            );
            for (i, (&g, &w)) in self.delta_b_row.iter().zip(&want.delta_b_row).enumerate() {
                assert!(
                    close(g, w, rel),
                    "{case}: delta_b_row[{i}] = {g:e}, expected {w:e}"
                );
            }
        }
        for ((name, got), (_, want)) in self.floats().into_iter().zip(want.floats()) {
            assert_eq!(got.dim(), want.dim(), "{case}: {name} shape");
            for ((ij, &g), &w) in got.indexed_iter().zip(want) {
                assert!(
                    close(g, w, rel),
                    "{case}: {name}{ij:?} = {g:e}, expected {w:e}"
                );
            }
        }
        assert!(
            close(self.loss, want.loss, rel),
            "{case}: loss {} vs {}",
            self.loss,
            want.loss
        );
    }
}

fn close(got: f64, want: f64, rel: f64) -> bool {
    if want.is_nan() {
        got.is_nan()
    } else {
        got == want || (got - want).abs() <= rel * want.abs()
    }
}

// ---------------------------------------------------------------------------------------
// The batch most tests start from: the worked example's worked example
// ---------------------------------------------------------------------------------------

/// The worked example's config (`tests/worked_example.rs`).
const EXAMPLE_CONFIG: &str = r#"{
  "divergence": "binary_tv",
  "rule": {"kind": "cppo", "delta": 0.2, "delta_b": 0.05, "w_min": 0.8, "horizon": null, "calibration": null},
  "objective": {"kind": "surrogate"},
  "aggregation": "token-mean",
  "norm_length": null, "num_tokens": null, "num_seqs": null,
  "kl": null
}"#;

/// the worked example's row twice: row 0 with A = +1, row 1 with A = −1. Slot 3 is a hole
/// holding NaN (logp) and −inf (logp_old).
struct Example {
    logp: Array2<f64>,
    logp_old: Array2<f64>,
    advantages: Array1<f64>,
    mask: Array2<bool>,
}

fn example() -> Example {
    let p = [0.50, 0.90, 0.30, f64::NAN, 0.60, 0.95];
    let q = [0.40f64, 0.95, 0.45, 0.0, 0.30, 0.90];
    let row = [true, true, true, false, true, true];
    Example {
        logp: Array2::from_shape_fn((2, 6), |(_, j)| p[j].ln()),
        logp_old: Array2::from_shape_fn((2, 6), |(_, j)| q[j].ln()),
        advantages: array![1.0, -1.0],
        mask: Array2::from_shape_fn((2, 6), |(_, j)| row[j]),
    }
}

/// the worked example's expected reasons and losses (one row each).
const EXAMPLE_REASON: [[u8; 6]; 2] = [[1, 1, 1, 0, 3, 4], [1, 1, 1, 0, 2, 2]];
const EXAMPLE_LOSS: [f64; 2] = [-0.5728070175438597, 1.183918128654971];

/// The example's arrays, except those named in `skip`, in a new archive `batchN.npz`
/// (a new N each time, so that a test can prepare several inputs before running them).
fn example_npz(s: &Scratch, skip: &[&str]) -> Npz {
    static N: AtomicUsize = AtomicUsize::new(0);
    let ex = example();
    let mut npz = s.npz(&format!("batch{}.npz", N.fetch_add(1, Ordering::Relaxed)));
    if !skip.contains(&"logp") {
        npz = npz.add("logp", &ex.logp);
    }
    if !skip.contains(&"logp_old") {
        npz = npz.add("logp_old", &ex.logp_old);
    }
    if !skip.contains(&"advantages") {
        npz = npz.add("advantages", &ex.advantages);
    }
    if !skip.contains(&"mask") {
        npz = npz.add("mask", &ex.mask);
    }
    npz
}

/// The example with one array replaced.
fn example_with<T: WriteNpyExt + ?Sized>(s: &Scratch, name: &str, array: &T) -> PathBuf {
    example_npz(s, &[name]).add(name, array).finish()
}

/// A (2, 6) array of the example's shape with one value changed.
fn with_value(a: &Array2<f64>, at: (usize, usize), value: f64) -> Array2<f64> {
    let mut a = a.clone();
    a[at] = value;
    a
}

/// The example's outputs under [`EXAMPLE_CONFIG`].
fn example_outputs(s: &Scratch) -> Outputs {
    s.eval_ok(&s.config(EXAMPLE_CONFIG), &example_npz(s, &[]).finish())
}

// ---------------------------------------------------------------------------------------
// Bad input: exit code 2, one line, nothing left behind
// ---------------------------------------------------------------------------------------

#[test]
fn missing_input_file() {
    let s = Scratch::new();
    let run = s.eval(&s.config("{}"), &s.input("nope.npz"));
    s.assert_bad_input(&run, &["nope.npz"]);
}

#[test]
fn missing_config_file() {
    let s = Scratch::new();
    let run = s.eval(&s.input("nope.json"), &example_npz(&s, &[]).finish());
    s.assert_bad_input(&run, &["nope.json"]);
}

#[test]
fn input_not_an_npz() {
    let s = Scratch::new();
    let path = s.input("batch.npz");
    fs::write(&path, "logp,logp_old\n-0.1,-0.2\n").unwrap();
    let run = s.eval(&s.config("{}"), &path);
    s.assert_bad_input(&run, &["batch.npz", "npz"]);
}

/// `numpy.savez_compressed(f, logp=np.zeros((1, 1)))`, byte for byte (hex).
const COMPRESSED_NPZ: &str = concat!(
    "504b03042d0000000800000021000b2b118effffffffffffffff080014006c6f67702e6e70790100",
    "1000880000000000000049000000000000009bec17ea1b10c9c850c650ad9e925a9c5ca46ea5a06e",
    "9366a1aea3a09e965f54529498179f5f94920a12774bcc294e058a17672416a402f91a863a0a869a",
    "3a0ab50a64032e06280000504b01022d032d0000000800000021000b2b118e490000008800000008",
    "00000000000000000000008001000000006c6f67702e6e7079504b05060000000001000100360000",
    "00830000000000",
);

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// numpy's compressed archive is read: logp is fine, then logp_old is missing.
#[test]
fn numpy_compressed_npz_is_read() {
    let s = Scratch::new();
    let path = s.input("batch.npz");
    fs::write(&path, unhex(COMPRESSED_NPZ)).unwrap();
    let run = s.eval(&s.config("{}"), &path);
    s.assert_bad_input(&run, &["batch.npz", "array logp_old is missing"]);
}

#[test]
fn input_is_a_directory() {
    let s = Scratch::new();
    let run = s.eval(&s.config("{}"), &s.inputs);
    s.assert_bad_input(&run, &["is a directory"]);
}

#[test]
fn empty_input_file() {
    let s = Scratch::new();
    let path = s.input("batch.npz");
    fs::write(&path, "").unwrap();
    let run = s.eval(&s.config("{}"), &path);
    s.assert_bad_input(&run, &["batch.npz"]);
}

#[test]
fn truncated_npz() {
    let s = Scratch::new();
    let path = example_npz(&s, &[]).finish();
    let bytes = fs::read(&path).unwrap();
    for keep in [bytes.len() / 2, bytes.len() - 10] {
        fs::write(&path, &bytes[..keep]).unwrap();
        let run = s.eval(&s.config("{}"), &path);
        s.assert_bad_input(&run, &[&path.file_name().unwrap().to_string_lossy()]);
    }
}

#[test]
fn missing_arrays() {
    for name in ["logp", "logp_old", "advantages", "mask"] {
        let s = Scratch::new();
        let run = s.eval(&s.config("{}"), &example_npz(&s, &[name]).finish());
        s.assert_bad_input(&run, &[&format!("array {name} is missing"), "batch"]);
    }
}

#[test]
fn shape_mismatches() {
    let ex = example();
    let s = Scratch::new();
    let cfg = s.config("{}");
    let cases: [(&str, PathBuf, &str); 6] = [
        (
            "logp_old",
            example_with(&s, "logp_old", &Array2::<f64>::zeros((2, 5))),
            "[2, 5], expected (2, 6)",
        ),
        (
            "advantages",
            example_with(&s, "advantages", &Array1::<f64>::zeros(3)),
            "[3], expected (2,) or (2, 6)",
        ),
        (
            "advantages",
            example_with(&s, "advantages", &Array3::<f64>::zeros((2, 6, 1))),
            "[2, 6, 1]",
        ),
        (
            "mask",
            example_with(&s, "mask", &ex.mask.t().to_owned()),
            "[6, 2], expected (2, 6)",
        ),
        (
            "mask",
            example_with(&s, "mask", &Array1::<bool>::from_elem(12, true)),
            "[12]",
        ),
        (
            "logp",
            example_with(&s, "logp", &Array1::<f64>::zeros(12)),
            "[12], expected (B, L)",
        ),
    ];
    for (name, path, shape) in cases {
        let run = s.eval(&cfg, &path);
        s.assert_bad_input(&run, &[name, shape]);
    }
}

#[test]
fn non_finite_at_a_response_position() {
    let ex = example();
    let s = Scratch::new();
    let cfg = s.config("{}");
    let cases = [
        (
            example_with(&s, "logp", &with_value(&ex.logp, (1, 2), f64::NAN)),
            "logp at row 1, column 2 is NaN",
        ),
        (
            example_with(
                &s,
                "logp_old",
                &with_value(&ex.logp_old, (0, 5), f64::NEG_INFINITY),
            ),
            "logp_old at row 0, column 5 is -inf",
        ),
        (
            example_with(&s, "advantages", &array![1.0, f64::NAN]),
            "advantages at row 1, column 0 is NaN",
        ),
        (
            example_with(
                &s,
                "mask",
                &with_value(&ex.mask.mapv(f64::from), (0, 3), f64::NAN),
            ),
            "mask at row 0, column 3 is NaN",
        ),
    ];
    for (path, message) in cases {
        let run = s.eval(&cfg, &path);
        s.assert_bad_input(&run, &[message]);
    }
}

#[test]
fn log_prob_above_tolerance() {
    let ex = example();
    let s = Scratch::new();
    let cfg = s.config("{}");
    for value in [0.5, 2e-4] {
        let path = example_with(&s, "logp_old", &with_value(&ex.logp_old, (0, 4), value));
        let run = s.eval(&cfg, &path);
        s.assert_bad_input(&run, &["logp_old at row 0, column 4", "1e-4"]);
    }
}

#[test]
fn bad_config_values() {
    let cases = [
        (r#"{"rule": {"kind": "dppo", "delta": -1}}"#, "rule.delta"),
        (r#"{"rule": {"kind": "cppo", "w_min": 1.5}}"#, "rule.w_min"),
        (
            r#"{"rule": {"kind": "cppo", "delta_b": -0.1}}"#,
            "rule.delta_b",
        ),
        (
            r#"{"objective": {"kind": "ppo_clip", "dual_clip": 0.5}}"#,
            "objective.dual_clip",
        ),
        (r#"{"norm_length": 0}"#, "norm_length"),
        (r#"{"kl": {"estimator": "k3", "coef": -1}}"#, "kl.coef"),
        (r#"{"divergence": "tv"}"#, "tv"),
        (r#"{"rule": {"kind": "clip"}}"#, "clip"),
        (r#"{"aggregation": "mean"}"#, "mean"),
    ];
    for (json, field) in cases {
        let s = Scratch::new();
        let run = s.eval(&s.config(json), &example_npz(&s, &[]).finish());
        s.assert_bad_input(&run, &["cfg.json", field]);
    }
}

#[test]
fn unknown_config_fields() {
    let cases = [
        (r#"{"rule": {"kind": "dppo", "detla": 0.1}}"#, "detla"),
        (r#"{"divergence": "binary_tv", "lr": 1e-6}"#, "lr"),
        (
            r#"{"kl": {"estimator": "k1", "coef": 0.1, "beta": 1}}"#,
            "beta",
        ),
    ];
    for (json, field) in cases {
        let s = Scratch::new();
        let run = s.eval(&s.config(json), &example_npz(&s, &[]).finish());
        s.assert_bad_input(&run, &["cfg.json", "unknown field", field]);
    }
    // A field of another rule kind names the field and the kind.
    let s = Scratch::new();
    let json = r#"{"rule": {"kind": "none", "delta": 0.1}}"#;
    let run = s.eval(&s.config(json), &example_npz(&s, &[]).finish());
    s.assert_bad_input(
        &run,
        &["cfg.json", "rule.delta", "not a field of rule kind none"],
    );
}

#[test]
fn invalid_json() {
    for json in [r#"{"rule": "#, r#"{"rule": {"kind": "dppo",}}"#, "{} {}"] {
        let s = Scratch::new();
        let run = s.eval(&s.config(json), &example_npz(&s, &[]).finish());
        s.assert_bad_input(&run, &["cfg.json", "line"]);
    }
}

/// serde reads a JSON array as a struct's fields in order; the CLI does not.
#[test]
fn config_must_be_an_object() {
    for json in ["", "[]", r#"["binary_kl"]"#, "null", "0.2"] {
        let s = Scratch::new();
        let run = s.eval(&s.config(json), &example_npz(&s, &[]).finish());
        s.assert_bad_input(&run, &["cfg.json", "JSON object"]);
    }
}

#[test]
fn count_override_smaller_than_the_batch() {
    let s = Scratch::new();
    let run = s.eval(
        &s.config(r#"{"num_tokens": 3}"#),
        &example_npz(&s, &[]).finish(),
    );
    s.assert_bad_input(&run, &["num_tokens"]);
}

#[test]
fn topk_arrays_missing() {
    let k = Array3::<f64>::from_elem((2, 6, 4), -3.0);
    for (divergence, present) in [
        ("topk_tv", None),
        ("topk_kl", Some("topk_logp_old")),
        ("topk_tv", Some("topk_logp")),
    ] {
        let s = Scratch::new();
        let cfg = s.config(&format!(r#"{{"divergence": "{divergence}"}}"#));
        let mut npz = example_npz(&s, &[]);
        if let Some(name) = present {
            npz = npz.add(name, &k);
        }
        let missing = if present == Some("topk_logp_old") {
            "topk_logp"
        } else {
            "topk_logp_old"
        };
        let run = s.eval(&cfg, &npz.finish());
        s.assert_bad_input(
            &run,
            &[
                &format!("array {missing} is missing"),
                &format!("divergence {divergence}"),
            ],
        );
    }
}

#[test]
fn topk_arrays_of_different_widths() {
    let s = Scratch::new();
    let path = example_npz(&s, &[])
        .add("topk_logp_old", &Array3::<f64>::from_elem((2, 6, 4), -3.0))
        .add("topk_logp", &Array3::<f64>::from_elem((2, 6, 3), -3.0))
        .finish();
    let run = s.eval(&s.config(r#"{"divergence": "topk_kl"}"#), &path);
    s.assert_bad_input(&run, &["topk_logp has shape [2, 6, 3], expected (2, 6, 4)"]);
}

#[test]
fn topk_value_errors_name_k() {
    let s = Scratch::new();
    let mut new = Array3::<f64>::from_elem((2, 6, 4), -3.0);
    new[[1, 4, 2]] = f64::NAN;
    new[[1, 3, 0]] = f64::NAN; // a hole: never read
    let path = example_npz(&s, &[])
        .add("topk_logp_old", &Array3::<f64>::from_elem((2, 6, 4), -3.0))
        .add("topk_logp", &new)
        .finish();
    let run = s.eval(&s.config(r#"{"divergence": "topk_tv"}"#), &path);
    s.assert_bad_input(&run, &["topk_logp at row 1, column 4, k 2 is NaN"]);
}

#[test]
fn mixed_float_types() {
    let ex = example();
    let s = Scratch::new();
    let cfg = s.config("{}");
    let path = example_with(&s, "logp_old", &ex.logp_old.mapv(|x| x as f32));
    let run = s.eval(&cfg, &path);
    s.assert_bad_input(&run, &["logp_old", "'<f4'", "float64"]);

    let path = example_with(&s, "advantages", &ex.advantages.mapv(|x| x as f32));
    let run = s.eval(&cfg, &path);
    s.assert_bad_input(&run, &["advantages", "'<f4'", "float64"]);

    let path = example_with(&s, "logp", &ex.logp.mapv(|x| x as f32));
    let run = s.eval(&cfg, &path);
    s.assert_bad_input(&run, &["logp_old", "'<f8'", "float32"]);
}

#[test]
fn unsupported_float_dtype() {
    let s = Scratch::new();
    let path = example_with(&s, "logp", &Array2::<i32>::zeros((2, 6)));
    let run = s.eval(&s.config("{}"), &path);
    s.assert_bad_input(&run, &["array logp has dtype '<i4'", "float32 or float64"]);
}

#[test]
fn logp_ref_missing_with_kl() {
    let s = Scratch::new();
    let cfg = s.config(r#"{"kl": {"estimator": "k2", "coef": 0.1}}"#);
    let run = s.eval(&cfg, &example_npz(&s, &[]).finish());
    s.assert_bad_input(&run, &["array logp_ref is missing", "kl penalty"]);
}

#[test]
fn same_output_and_stats_file() {
    let s = Scratch::new();
    let (cfg, input, out) = (s.config("{}"), example_npz(&s, &[]).finish(), s.out());
    let run = cppo(&[
        OsStr::new("eval"),
        OsStr::new("--config"),
        cfg.as_os_str(),
        OsStr::new("--input"),
        input.as_os_str(),
        OsStr::new("--output"),
        out.as_os_str(),
        OsStr::new("--stats"),
        out.as_os_str(),
    ]);
    s.assert_bad_input(&run, &["--stats"]);
}

#[test]
fn bad_arguments() {
    let s = Scratch::new();
    let run = cppo(&["eval", "--config", "cfg.json", "--input", "batch.npz"]);
    s.assert_bad_input(&run, &["--output"]);
    let run = cppo(&["bench", "--rows", "0", "--len", "8"]);
    s.assert_bad_input(&run, &["--rows"]);
    let run = cppo(&["evaluate"]);
    s.assert_bad_input(&run, &["evaluate"]);
}

/// An output that cannot be written is a system failure: exit code 1, one line, and
/// nothing left behind.
#[test]
fn unwritable_output() {
    let s = Scratch::new();
    let (cfg, input) = (s.config("{}"), example_npz(&s, &[]).finish());
    let out = s.outputs.join("no/such/dir/out.npz");
    let run = cppo(&[
        OsStr::new("eval"),
        OsStr::new("--config"),
        cfg.as_os_str(),
        OsStr::new("--input"),
        input.as_os_str(),
        OsStr::new("--output"),
        out.as_os_str(),
    ]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_one_line(&run, &["out.npz"]);
    assert!(s.output_files().is_empty());

    // The output is fine but the stats cannot be written: neither appears.
    let stats = s.outputs.join("no/such/dir/stats.json");
    let good_out = s.out();
    let run = cppo(&[
        OsStr::new("eval"),
        OsStr::new("--config"),
        cfg.as_os_str(),
        OsStr::new("--input"),
        input.as_os_str(),
        OsStr::new("--output"),
        good_out.as_os_str(),
        OsStr::new("--stats"),
        stats.as_os_str(),
    ]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_one_line(&run, &["stats.json"]);
    assert!(s.output_files().is_empty(), "{:?}", s.output_files());
}

// ---------------------------------------------------------------------------------------
// Valid input
// ---------------------------------------------------------------------------------------

#[test]
fn spec_worked_example() {
    let s = Scratch::new();
    let o = example_outputs(&s);
    assert_eq!(
        o.reason,
        Array2::from_shape_fn((2, 6), |(i, j)| EXAMPLE_REASON[i][j])
    );
    let want = (EXAMPLE_LOSS[0] + EXAMPLE_LOSS[1]) / 2.0; // token-mean over both rows
    assert!(close(o.loss, want, 1e-12), "{} vs {want}", o.loss);
    // the worked example's gradients (6 decimals), halved: the batch holds 10 response
    // tokens, not 5.
    let grad = array![
        [-0.25, -0.189474, -0.133333, 0.0, 0.0, 0.0],
        [0.25, 0.189474, 0.133333, 0.0, 0.4, 0.211111]
    ] / 2.0;
    for ((ij, &got), want) in o.grad.indexed_iter().zip(&grad) {
        assert!(
            (got - want).abs() < 1e-6,
            "grad{ij:?} = {got}, by hand {want}"
        );
    }
    assert_eq!(o.keep.row(1), array![1.0, 1.0, 1.0, 0.0, 1.0, 1.0]);
    // The effective thresholds c_t of the worked example's table (the same for both rows)
    // and its fixed budget.
    let c = [0.2, 0.15, 0.15, 0.0, 0.06, -0.1525];
    for ((i, j), &got) in o.threshold.indexed_iter() {
        assert!(
            (got - c[j]).abs() < 1e-12,
            "threshold[{i}, {j}] = {got}, want {}",
            c[j]
        );
    }
    assert_eq!(o.delta_b_row, array![0.05, 0.05]);
    // The hole is 0 in every output, whatever it held.
    for (name, a) in o.floats() {
        assert_eq!(a.column(3), array![0.0, 0.0], "{name}");
    }
}

#[test]
fn stats_json() {
    let s = Scratch::new();
    let o = example_outputs(&s);
    let stats: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(s.stats()).unwrap()).unwrap();
    assert_eq!(stats["response_tokens"], 10);
    assert_eq!(stats["sequences"], 2);
    assert_eq!(stats["kept_tokens"], 8);
    assert_eq!(stats["masked_frac"], 0.2);
    assert_eq!(stats["masked_frac_token_threshold"], 0.1);
    assert_eq!(stats["masked_frac_prefix_budget"], 0.1);
    assert_eq!(stats["bypass_frac"], 0.2);
    assert_eq!(stats["loss"].as_f64(), Some(o.loss));
    assert_eq!(
        stats["masked_frac_by_decile"].as_array().map(Vec::len),
        Some(10)
    );
    let mut files = s.output_files();
    files.sort();
    assert_eq!(files, ["out.npz", "stats.json"]);
}

#[test]
fn stats_are_optional_and_outputs_are_replaced() {
    let s = Scratch::new();
    fs::write(s.out(), "an old file").unwrap();
    let (cfg, input, out) = (s.config("{}"), example_npz(&s, &[]).finish(), s.out());
    let run = cppo(&[
        OsStr::new("eval"),
        OsStr::new("--config"),
        cfg.as_os_str(),
        OsStr::new("--input"),
        input.as_os_str(),
        OsStr::new("--output"),
        out.as_os_str(),
    ]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(s.output_files(), ["out.npz"]);
    assert_eq!(Outputs::read(&s.out()).reason[[0, 4]], 3);
}

#[test]
fn empty_batch() {
    let s = Scratch::new();
    let path = s
        .npz("batch.npz")
        .add("logp", &Array2::<f64>::zeros((0, 6)))
        .add("logp_old", &Array2::<f64>::zeros((0, 6)))
        .add("advantages", &Array1::<f64>::zeros(0))
        .add("mask", &Array2::<bool>::from_elem((0, 6), true))
        .finish();
    let o = s.eval_ok(&s.config("{}"), &path);
    assert_eq!(o.loss, 0.0);
    for (name, a) in o.floats() {
        assert_eq!(a.dim(), (0, 6), "{name}");
    }
    let stats: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(s.stats()).unwrap()).unwrap();
    assert_eq!(stats["response_tokens"], 0);
    assert_eq!(stats["masked_frac"], 0.0);
}

#[test]
fn all_padding() {
    let s = Scratch::new();
    let garbage = Array2::from_shape_fn((3, 5), |(i, j)| {
        [f64::NAN, f64::NEG_INFINITY, 7.0, f64::INFINITY][(i + j) % 4]
    });
    let path = s
        .npz("batch.npz")
        .add("logp", &garbage)
        .add("logp_old", &garbage.mapv(|x| -x))
        .add("advantages", &garbage)
        .add("mask", &Array2::<bool>::from_elem((3, 5), false))
        .finish();
    for json in [EXAMPLE_CONFIG, r#"{"aggregation": "seq-mean-token-mean"}"#] {
        let o = s.eval_ok(&s.config(json), &path);
        assert_eq!(o.loss, 0.0);
        for (name, a) in o.floats() {
            assert!(a.iter().all(|&x| x == 0.0), "{name}: {a}");
        }
        assert!(o.reason.iter().all(|&r| r == 0));
    }
}

#[test]
fn probabilities_of_one() {
    let s = Scratch::new();
    let logp = array![[0.0, 5e-5, 1e-4, -0.1]];
    let logp_old = array![[0.0, 0.0, 3e-5, -0.1]];
    let path = s
        .npz("batch.npz")
        .add("logp", &logp)
        .add("logp_old", &logp_old)
        .add("advantages", &array![1.0])
        .add("mask", &array![[true, true, true, true]])
        .finish();
    let o = s.eval_ok(&s.config("{}"), &path);
    assert_eq!(o.divergence.row(0), array![0.0, 0.0, 0.0, 0.0]);
    assert_eq!(o.reason.row(0), array![1, 1, 1, 1]);
    assert!(o.loss.is_finite());
}

#[test]
fn float32_input() {
    let ex = example();
    let s = Scratch::new();
    let want = example_outputs(&s);
    let path = s
        .npz("batch32.npz")
        .add("logp", &ex.logp.mapv(|x| x as f32))
        .add("logp_old", &ex.logp_old.mapv(|x| x as f32))
        .add("advantages", &ex.advantages.mapv(|x| x as f32))
        .add("mask", &ex.mask)
        .finish();
    let run = s.eval(&s.config(EXAMPLE_CONFIG), &path);
    assert_eq!(run.code, Some(0), "{run:?}");
    // The float outputs are float32; the loss stays float64.
    let got = Outputs::read_as::<f32>(&s.out(), f64::from);
    got.assert_close(&want, 1e-5, "float32");
}

#[test]
fn every_mask_dtype() {
    let ex = example();
    let s = Scratch::new();
    let cfg = s.config(EXAMPLE_CONFIG);
    let want = example_outputs(&s);
    let on = |m: &Array2<bool>, value: f64| m.mapv(|b| if b { value } else { 0.0 });
    let paths = [
        example_with(&s, "mask", &ex.mask.mapv(u8::from)),
        example_with(&s, "mask", &on(&ex.mask, 2.0).mapv(|x| x as i64)),
        example_with(&s, "mask", &on(&ex.mask, -1.0).mapv(|x| x as i8)),
        example_with(&s, "mask", &on(&ex.mask, 7.0).mapv(|x| x as i16)),
        example_with(&s, "mask", &on(&ex.mask, 1.0).mapv(|x| x as i32)),
        example_with(&s, "mask", &on(&ex.mask, 300.0).mapv(|x| x as u16)),
        example_with(&s, "mask", &on(&ex.mask, 1.0).mapv(|x| x as u32)),
        example_with(&s, "mask", &on(&ex.mask, 256.0).mapv(|x| x as u64)),
        example_with(&s, "mask", &on(&ex.mask, 1.0).mapv(|x| x as f32)),
        example_with(&s, "mask", &on(&ex.mask, 0.5)),
    ];
    for (i, path) in paths.iter().enumerate() {
        let got = s.eval_ok(&cfg, path);
        assert_eq!(got, want, "mask dtype case {i}");
    }
}

#[test]
fn per_row_and_per_token_advantages_agree() {
    let s = Scratch::new();
    let want = example_outputs(&s);
    let per_token = Array2::from_shape_fn((2, 6), |(i, _)| [1.0, -1.0][i]);
    let path = example_with(&s, "advantages", &per_token);
    assert_eq!(s.eval_ok(&s.config(EXAMPLE_CONFIG), &path), want);
}

#[test]
fn fortran_order_arrays() {
    let ex = example();
    let s = Scratch::new();
    let want = example_outputs(&s);
    let fortran = |a: &Array2<f64>| {
        let mut f = Array2::zeros(a.dim().f());
        f.assign(a);
        f
    };
    let path = s
        .npz("fortran.npz")
        .add("logp", &fortran(&ex.logp))
        .add("logp_old", &fortran(&ex.logp_old))
        .add("advantages", &ex.advantages)
        .add("mask", &ex.mask.t().to_owned().reversed_axes())
        .finish();
    assert_eq!(s.eval_ok(&s.config(EXAMPLE_CONFIG), &path), want);
}

/// Arrays the config does not use are not read: a binary divergence ignores even a
/// malformed top-K pair, a config without `kl` a malformed logp_ref.
#[test]
fn unused_arrays_are_ignored() {
    let s = Scratch::new();
    let want = example_outputs(&s);
    let path = example_npz(&s, &[])
        .add("topk_logp_old", &Array1::<i32>::zeros(3))
        .add("topk_logp", &Array3::<f32>::zeros((2, 6, 9)))
        .add("logp_ref", &Array2::<f64>::from_elem((1, 1), f64::NAN))
        .add("notes", &Array1::<u8>::zeros(4))
        .finish();
    assert_eq!(s.eval_ok(&s.config(EXAMPLE_CONFIG), &path), want);
}

#[test]
fn topk_and_kl_inputs() {
    let ex = example();
    let s = Scratch::new();
    let k = Array3::from_shape_fn((2, 6, 3), |(_, j, k)| -((j + 1) as f64) * 0.3 - k as f64);
    let path = example_npz(&s, &[])
        .add("topk_logp_old", &k)
        .add("topk_logp", &k.mapv(|x| x - 0.05))
        .add("logp_ref", &ex.logp_old.mapv(|x| x - 0.1))
        .finish();
    let cfg = s.config(r#"{"divergence": "topk_kl", "kl": {"estimator": "k3", "coef": 0.1}}"#);
    let o = s.eval_ok(&cfg, &path);
    assert!(o.divergence.iter().all(|d| d.is_finite() && *d >= 0.0));
    assert!(o.divergence[[0, 0]] > 0.0);
    assert!(o.loss.is_finite());
}

// ---------------------------------------------------------------------------------------
// The .npz reader, byte by byte
// ---------------------------------------------------------------------------------------

/// An `.npy` file: format `version` (1, 2 or 3), the header dict `dict` padded as numpy
/// pads it, then `data`.
fn npy(version: u8, dict: &str, data: &[u8]) -> Vec<u8> {
    let prefix = if version == 1 { 10 } else { 12 };
    let mut header = dict.to_string();
    let total = (prefix + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - prefix - header.len() - 1));
    header.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
    out.extend([version, 0]);
    if version == 1 {
        out.extend(u16::try_from(header.len()).unwrap().to_le_bytes());
    } else {
        out.extend(u32::try_from(header.len()).unwrap().to_le_bytes());
    }
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// A C-order header dict; `descr` is the Python literal (quotes included).
fn dict(descr: &str, shape: &str) -> String {
    format!("{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}")
}

/// f64 values as `.npy` data, little- or big-endian.
fn f64_data<'a>(values: impl IntoIterator<Item = &'a f64>, big_endian: bool) -> Vec<u8> {
    values
        .into_iter()
        .flat_map(|x| {
            if big_endian {
                x.to_be_bytes()
            } else {
                x.to_le_bytes()
            }
        })
        .collect()
}

/// The example's arrays as `.npy` entries: C order, little-endian, format 1.0.
fn example_entries() -> Vec<(&'static str, Vec<u8>)> {
    let ex = example();
    let bl = dict("'<f8'", "(2, 6)");
    let mask: Vec<u8> = ex.mask.iter().map(|&b| u8::from(b)).collect();
    vec![
        ("logp", npy(1, &bl, &f64_data(&ex.logp, false))),
        ("logp_old", npy(1, &bl, &f64_data(&ex.logp_old, false))),
        (
            "advantages",
            npy(1, &dict("'<f8'", "(2,)"), &f64_data(&ex.advantages, false)),
        ),
        ("mask", npy(1, &dict("'|b1'", "(2, 6)"), &mask)),
    ]
}

/// An archive of the example's entries with some replaced, each entry stored or
/// deflated as `method` says, written with the zip crate.
fn raw_npz(
    s: &Scratch,
    replace: Vec<(&'static str, Vec<u8>)>,
    method: zip::CompressionMethod,
) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let mut entries = example_entries();
    for (name, bytes) in replace {
        entries.iter_mut().find(|(n, _)| *n == name).unwrap().1 = bytes;
    }
    let path = s.input(&format!("raw{}.npz", N.fetch_add(1, Ordering::Relaxed)));
    let mut z = zip::ZipWriter::new(File::create(&path).unwrap());
    let options = zip::write::SimpleFileOptions::default().compression_method(method);
    for (name, bytes) in entries {
        z.start_file(format!("{name}.npy"), options).unwrap();
        z.write_all(&bytes).unwrap();
    }
    z.finish().unwrap();
    path
}

fn stored(s: &Scratch, replace: Vec<(&'static str, Vec<u8>)>) -> PathBuf {
    raw_npz(s, replace, zip::CompressionMethod::Stored)
}

#[test]
fn compressed_npz_evaluates_like_uncompressed() {
    let ex = example();
    let s = Scratch::new();
    let want = example_outputs(&s);
    let path = s.input("compressed.npz");
    let mut npz = NpzWriter::new_compressed(File::create(&path).unwrap());
    npz.add_array("logp", &ex.logp).unwrap();
    npz.add_array("logp_old", &ex.logp_old).unwrap();
    npz.add_array("advantages", &ex.advantages).unwrap();
    npz.add_array("mask", &ex.mask).unwrap();
    npz.finish().unwrap();
    assert_eq!(s.eval_ok(&s.config(EXAMPLE_CONFIG), &path), want);

    let cfg = s.config(EXAMPLE_CONFIG);
    for method in [
        zip::CompressionMethod::Stored,
        zip::CompressionMethod::Deflated,
    ] {
        let path = raw_npz(&s, vec![], method);
        assert_eq!(s.eval_ok(&cfg, &path), want, "{method:?}");
    }
}

/// A corrupt header declaring a huge array in a tiny file is refused before anything is
/// allocated (it used to abort the process).
#[test]
fn huge_declared_shape_in_a_tiny_file() {
    let s = Scratch::new();
    let cfg = s.config("{}");
    let data = f64_data(&example().logp, false);
    let cases = [
        (
            "logp",
            npy(1, &dict("'<f8'", "(100000000000, 100000)"), &data),
            "80000000000000000 bytes",
        ),
        (
            "logp",
            npy(1, &dict("'<f8'", "(1099511627776, 1099511627776)"), &data),
            "more than 2^64 bytes",
        ),
    ];
    for method in [
        zip::CompressionMethod::Stored,
        zip::CompressionMethod::Deflated,
    ] {
        for (name, bytes, what) in &cases {
            let path = raw_npz(&s, vec![(*name, bytes.clone())], method);
            let run = s.eval(&cfg, &path);
            assert!(run.stdout.is_empty(), "{run:?}");
            s.assert_bad_input(&run, &[&format!("array {name} declares shape"), what]);
        }
        // Another array's declared shape is checked against logp's first.
        let mask = npy(1, &dict("'|b1'", "(1099511627776, 1048576)"), &[1u8; 12]);
        let path = raw_npz(&s, vec![("mask", mask)], method);
        let run = s.eval(&cfg, &path);
        s.assert_bad_input(
            &run,
            &["mask has shape [1099511627776, 1048576], expected (2, 6)"],
        );
        // Within the limit, the entry's size gives a lie away.
        let logp = npy(1, &dict("'<f8'", "(2, 600)"), &data);
        let path = raw_npz(&s, vec![("logp", logp)], method);
        let run = s.eval(&cfg, &path);
        s.assert_bad_input(
            &run,
            &["array logp declares shape [2, 600]", "only 96 bytes"],
        );
    }
}

#[test]
fn bad_descr() {
    let s = Scratch::new();
    let cfg = s.config("{}");
    let data = f64_data(&example().logp, false);
    for descr in [
        "'<f2'",
        "'<c16'",
        "'|f8'",
        "'float64'",
        "'>U8'",
        "'O'",
        "''",
        "[('a', '<f8')]",
        "42",
        "None",
    ] {
        let path = stored(&s, vec![("logp", npy(1, &dict(descr, "(2, 6)"), &data))]);
        let run = s.eval(&cfg, &path);
        let message = format!("array logp has dtype {descr}, expected float32 or float64");
        s.assert_bad_input(&run, &[&message]);
    }
    let path = stored(
        &s,
        vec![("mask", npy(1, &dict("'<f2'", "(2, 6)"), &[0; 24]))],
    );
    let run = s.eval(&cfg, &path);
    s.assert_bad_input(
        &run,
        &["array mask has dtype '<f2'", "bool, an integer type"],
    );
}

#[test]
fn big_endian_arrays() {
    let ex = example();
    let s = Scratch::new();
    let want = example_outputs(&s);
    let be_mask: Vec<u8> = ex
        .mask
        .iter()
        .flat_map(|&b| (i32::from(b) * 3).to_be_bytes())
        .collect();
    let fortran = "{'descr': '>f8', 'fortran_order': True, 'shape': (2, 6), }";
    let path = stored(
        &s,
        vec![
            (
                "logp",
                npy(1, &dict("'>f8'", "(2, 6)"), &f64_data(&ex.logp, true)),
            ),
            // Fortran order: column by column.
            (
                "logp_old",
                npy(1, fortran, &f64_data(ex.logp_old.t(), true)),
            ),
            ("mask", npy(1, &dict("'>i4'", "(2, 6)"), &be_mask)),
        ],
    );
    assert_eq!(s.eval_ok(&s.config(EXAMPLE_CONFIG), &path), want);
}

#[test]
fn npy_format_versions() {
    let s = Scratch::new();
    let want = example_outputs(&s);
    let cfg = s.config(EXAMPLE_CONFIG);
    let data = f64_data(&example().logp, false);
    for version in [2, 3] {
        let path = stored(
            &s,
            vec![("logp", npy(version, &dict("'<f8'", "(2, 6)"), &data))],
        );
        assert_eq!(s.eval_ok(&cfg, &path), want, "version {version}");
    }
}

#[test]
fn corrupt_npy_entries() {
    let s = Scratch::new();
    let cfg = s.config("{}");
    let data = f64_data(&example().logp, false);
    let good = npy(1, &dict("'<f8'", "(2, 6)"), &data);
    let mut bad_magic = good.clone();
    bad_magic[5] = b'Z';
    let mut long_header = good.clone();
    long_header[8..10].copy_from_slice(&60000u16.to_le_bytes());
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (bad_magic, "magic"),
        (good[..5].to_vec(), "too short"),
        (npy(4, &dict("'<f8'", "(2, 6)"), &data), "version 4.0"),
        (long_header, "length of 60000 bytes"),
        (npy(1, "['<f8']", &data), "not a dict"),
        (
            npy(1, "{'descr': '<f8', 'fortran_order': False}", &data),
            "no 'shape' key",
        ),
        (
            npy(
                1,
                "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 6), 'x': 1}",
                &data,
            ),
            "unexpected key 'x'",
        ),
        (npy(1, &dict("'<f8'", "(2, -6)"), &data), "non-negative"),
        (npy(1, &dict("'<f8", "(2, 6)"), &data), "bad .npy header"),
        (
            npy(
                1,
                &dict(&format!("{}{}", "[".repeat(200), "]".repeat(200)), "(2, 6)"),
                &data,
            ),
            "nested",
        ),
        (
            npy(1, &dict("'<f8'", "(2, 7)"), &data),
            "declares shape [2, 7] of dtype '<f8', 112 bytes, but its entry holds only 96",
        ),
        (
            npy(1, &dict("'<f8'", "(2, 5)"), &data),
            "holds 96 bytes of data, more than the 80",
        ),
    ];
    for (bytes, needle) in cases {
        let run = s.eval(&cfg, &stored(&s, vec![("logp", bytes)]));
        s.assert_bad_input(&run, &["logp", needle]);
    }

    // A flipped data byte: the entry's CRC-32 catches it.
    let path = stored(&s, vec![]);
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.windows(6).position(|w| w == b"\x93NUMPY").unwrap() + 128 + 3;
    bytes[at] ^= 0x10;
    fs::write(&path, bytes).unwrap();
    let run = s.eval(&cfg, &path);
    s.assert_bad_input(&run, &["cannot read array logp", "checksum"]);
}

// ---------------------------------------------------------------------------------------
// Golden fixtures
// ---------------------------------------------------------------------------------------

const GOLDEN: [&str; 8] = [
    "cppo_binary_kl_detached",
    "cppo_binary_tv_surrogate",
    "cppo_no_budget_kl_k3",
    "cppo_topk_tv_horizon",
    "dppo_topk_kl_ppoclip",
    "ratio_grpo_cispo",
    "trm_avg_binary_kl",
    "trm_max_binary_tv",
];

#[test]
fn golden_fixtures() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data");
    for case in GOLDEN {
        let s = Scratch::new();
        let cfg = data.join(format!("{case}.config.json"));
        let input = data.join(format!("{case}.input.npz"));
        let got = s.eval_ok(&cfg, &input);
        let want = Outputs::read_golden(&data.join(format!("{case}.expected.npz")));
        got.assert_close(&want, 1e-9, case);
    }
    // The official CPPO's cases hold the loss, the gradient and, for some, the mask and
    // the per-row budgets; verl's reads `is_weights` from the input.
    for case in [
        "official_fixed_budget",
        "official_soft_gate",
        "official_unirl_p90",
        "official_verl_column",
    ] {
        let s = Scratch::new();
        let cfg = data.join(format!("{case}.config.json"));
        let input = data.join(format!("{case}.input.npz"));
        let got = s.eval_ok(&cfg, &input);
        let mut exp =
            NpzReader::new(File::open(data.join(format!("{case}.expected.npz"))).unwrap()).unwrap();
        let loss: Array0<f64> = exp.by_name("loss").unwrap();
        assert!(close(got.loss, loss.into_scalar(), 1e-9), "{case}: loss");
        let grad: Array2<f64> = exp.by_name("grad").unwrap();
        for ((ij, &g), &w) in got.grad.indexed_iter().zip(&grad) {
            assert!(
                close(g, w, 1e-9),
                "{case}: grad{ij:?} = {g:e}, expected {w:e}"
            );
        }
        if let Ok(d) = exp.by_name::<_, _>("delta_b_row") {
            let d: Array1<f64> = d;
            for (i, (&g, &w)) in got.delta_b_row.iter().zip(&d).enumerate() {
                assert!(close(g, w, 1e-9), "{case}: delta_b_row[{i}]");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// cppo bench
// ---------------------------------------------------------------------------------------

#[test]
fn bench_prints_one_json_line() {
    let run = cppo(&[
        "bench",
        "--rows",
        "4",
        "--len",
        "64",
        "--repeats",
        "2",
        "--min-time",
        "0",
    ]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stdout.lines().count(), 1, "{run:?}");
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    for key in ["tokens_per_s", "ms", "gb_per_s"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
    }
    assert_eq!(v["rows"], 4);
    assert_eq!(v["len"], 64);
    assert_eq!(v["dtype"], "float32");
    assert_eq!(v["rule"], "cppo");
    assert_eq!(v["divergence"], "binary_tv");
    assert_eq!(v["bytes_per_token"], 2 * 4 + 1 + 5 * 4 + 2);
    assert_eq!(v["outputs"], "all");
    assert_eq!(v["inputs_bytes"], 4 * 64 * (4 + 4 + 1) + 4 * 4);
    assert_eq!(v["outputs_bytes"], 4 * 64 * (5 * 4 + 2));
    if cfg!(target_os = "linux") {
        for key in ["peak_rss_bytes", "timed_peak_rss_bytes"] {
            assert!(v[key].as_u64().is_some_and(|x| x > 5632), "{key}: {v}");
        }
    }
}

#[test]
fn bench_grad_outputs_only() {
    let run = cppo(&[
        "bench",
        "--rows",
        "4",
        "--len",
        "64",
        "--repeats",
        "1",
        "--outputs",
        "grad",
    ]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["outputs"], "grad");
    assert_eq!(v["bytes_per_token"], 2 * 4 + 1 + 4 + 1);
    assert_eq!(v["outputs_bytes"], 4 * 64 * (4 + 1));
    let run = cppo(&["bench", "--rows", "4", "--len", "64", "--outputs", "loss"]);
    Scratch::new().assert_bad_input(&run, &["--outputs"]);
}

#[test]
fn bench_topk_kl_f64() {
    let s = Scratch::new();
    let cfg = s.config(r#"{"divergence": "topk_kl", "kl": {"estimator": "k1", "coef": 0.01}}"#);
    let run = cppo(&[
        OsStr::new("bench"),
        OsStr::new("--rows"),
        OsStr::new("3"),
        OsStr::new("--len"),
        OsStr::new("16"),
        OsStr::new("--repeats"),
        OsStr::new("1"),
        OsStr::new("--threads"),
        OsStr::new("1"),
        OsStr::new("--dtype"),
        OsStr::new("f64"),
        OsStr::new("--topk"),
        OsStr::new("5"),
        OsStr::new("--config"),
        cfg.as_os_str(),
    ]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["threads"], 1);
    assert_eq!(v["topk"], 5);
    assert_eq!(v["logp_ref"], true);
    assert_eq!(v["bytes_per_token"], 2 * 8 + 1 + 2 * 5 * 8 + 8 + 5 * 8 + 2);
}

/// `--input` times the engine on the user's own batch: its shape, float type and
/// response tokens are the file's; the runs add up to at least `--min-time`; the report
/// names the CPU and the instruction set the dispatcher chose.
#[test]
fn bench_input_times_the_file() {
    let s = Scratch::new();
    let input = example_npz(&s, &[]).finish();
    let run = cppo(&[
        OsStr::new("bench"),
        OsStr::new("--input"),
        input.as_os_str(),
        OsStr::new("--repeats"),
        OsStr::new("3"),
        OsStr::new("--min-time"),
        OsStr::new("0.2"),
        OsStr::new("--outputs"),
        OsStr::new("grad"),
    ]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["input"], "file");
    assert_eq!((v["rows"].as_u64(), v["len"].as_u64()), (Some(2), Some(6)));
    assert_eq!(v["dtype"], "float64");
    assert_eq!(v["response_tokens"], 10);
    assert!(v["total_s"].as_f64().unwrap() >= 0.2, "{v}");
    assert!(v["runs"].as_u64().unwrap() >= 3, "{v}");
    assert!(
        v["ms"].as_f64().unwrap() <= v["median_ms"].as_f64().unwrap(),
        "{v}"
    );
    assert_eq!(v["inputs_bytes"], 2 * 6 * 8 * 2 + 2 * 8 + 2 * 6);
    assert_eq!(v["bytes_per_token"], 2 * 8 + 1 + 8 + 1);
    let isa = v["isa"].as_str().unwrap();
    assert!(["avx512", "avx2", "baseline"].contains(&isa), "{v}");
    assert!(v.get("cpu").is_some(), "{v}");
    // A bad file fails as `cppo eval` does; --input with --rows is a usage error.
    let bad = example_with(&s, "logp", &with_value(&example().logp, (0, 1), 0.5));
    let run = cppo(&[OsStr::new("bench"), OsStr::new("--input"), bad.as_os_str()]);
    s.assert_bad_input(&run, &["logp", "row 0, column 1"]);
    let run = cppo(&[
        OsStr::new("bench"),
        OsStr::new("--input"),
        input.as_os_str(),
        OsStr::new("--rows"),
        OsStr::new("2"),
    ]);
    assert_eq!(run.code, Some(2), "{run:?}");
    let run = cppo(&["bench", "--rows", "2", "--len", "8", "--min-time", "-1"]);
    assert_eq!(run.code, Some(2), "{run:?}");
}

#[test]
fn bench_topk_with_a_binary_divergence_is_an_error() {
    let s = Scratch::new();
    let run = cppo(&["bench", "--rows", "2", "--len", "8", "--topk", "4"]);
    s.assert_bad_input(&run, &["--topk", "binary_tv"]);
}

#[test]
fn help_describes_the_contract() {
    let run = cppo(&["eval", "--help"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    for word in ["logp_old", "topk_logp", "reason", "exit", "stderr"] {
        assert!(run.stdout.contains(word), "eval --help lacks {word}");
    }
    let run = cppo(&["bench", "--help"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("Byte model"), "{run:?}");
    assert!(run.stdout.contains("--outputs grad"), "{run:?}");
}

/// Every rule, objective and divergence of the family is reachable from the JSON config,
/// and `cppo eval` gives the library's numbers for it.
#[test]
fn family_configs_evaluate_like_the_library() {
    let ex = example();
    for json in [
        r#"{"divergence": "k2", "rule": {"kind": "trm_max", "delta": 0.1}}"#,
        r#"{"divergence": "k3", "rule": {"kind": "trm_avg", "delta": 0.1}}"#,
        r#"{"rule": {"kind": "cppo_soft", "gate": "sigmoid", "tau": 0.02}, "objective": {"kind": "sapo"}}"#,
        r#"{"rule": {"kind": "cppo_soft"}, "objective": {"kind": "detached_is", "ratio_cap": 3}}"#,
        r#"{"preset": "verl_pr6731"}"#,
        r#"{"rule": {"kind": "cppo", "shuffle_seed": 3}, "objective": {"kind": "gspo", "eps_low": 0.2, "eps_high": 0.2}}"#,
        r#"{"rule": {"kind": "none"}, "objective": {"kind": "gmpo"}, "aggregation": "seq-mean-token-mean"}"#,
        r#"{"rule": {"kind": "dppo"}, "objective": {"kind": "minpro", "include_current": false, "clip": null}}"#,
    ] {
        let s = Scratch::new();
        let o = s.eval_ok(&s.config(json), &example_npz(&s, &[]).finish());
        let cfg: cppo::Config = serde_json::from_str(json).unwrap();
        let batch = cppo::Batch::new(&ex.logp, &ex.logp_old, &ex.advantages, &ex.mask).unwrap();
        let want = cppo::evaluate(&cfg, &batch, cppo::Par::Seq).unwrap();
        assert_eq!(o.reason, want.outputs.reason, "{json}");
        assert_eq!(o.grad, want.outputs.grad, "{json}");
        assert_eq!(o.loss.to_bits(), want.loss.to_bits(), "{json}");
    }
}

// ---------------------------------------------------------------------------------------
// Presets and IS weights
// ---------------------------------------------------------------------------------------

#[test]
fn presets_are_listed_and_usable() {
    let run = cppo(&["presets"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let names: Vec<&str> = run
        .stdout
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    let want: Vec<&str> = cppo::Preset::ALL.iter().map(|p| p.name()).collect();
    assert_eq!(names, want);
    let json = cppo(&["presets", "--json"]);
    for line in json.stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let cfg: cppo::Config = serde_json::from_value(v["config"].clone()).unwrap();
        let p: cppo::Preset = v["name"].as_str().unwrap().parse().unwrap();
        assert_eq!(cfg, p.config());
    }

    // `eval --preset NAME` is `eval --config {"preset": NAME}`.
    let s = Scratch::new();
    let input = example_npz(&s, &[]).finish();
    let by_file = s.eval_ok(&s.config(r#"{"preset": "verl_pr6731"}"#), &input);
    let run = cppo(&[
        OsStr::new("eval"),
        OsStr::new("--preset"),
        OsStr::new("verl_pr6731"),
        OsStr::new("--input"),
        input.as_os_str(),
        OsStr::new("--output"),
        s.out().as_os_str(),
    ]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(Outputs::read(&s.out()), by_file);
    // An unknown name lists the known ones.
    let run = cppo(&[
        OsStr::new("eval"),
        OsStr::new("--preset"),
        OsStr::new("verl"),
        OsStr::new("--input"),
        input.as_os_str(),
        OsStr::new("--output"),
        s.out().as_os_str(),
    ]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(
        run.stderr.contains("verl_pr6731") && run.stderr.contains("paper_dense"),
        "{run:?}"
    );
}

#[test]
fn is_weights_are_read_and_checked() {
    let ex = example();
    let s = Scratch::new();
    let w = Array2::from_shape_fn((2, 6), |(i, j)| 0.5 + (i + j) as f64 * 0.25);
    let input = example_npz(&s, &[]).add("is_weights", &w).finish();
    let got = s.eval_ok(&s.config(EXAMPLE_CONFIG), &input);
    let cfg: cppo::Config = serde_json::from_str(EXAMPLE_CONFIG).unwrap();
    let batch = cppo::Batch::new(&ex.logp, &ex.logp_old, &ex.advantages, &ex.mask)
        .unwrap()
        .with_is_weights(&w)
        .unwrap();
    let want = cppo::evaluate(&cfg, &batch, cppo::Par::Seq).unwrap();
    assert_eq!(got.grad, want.outputs.grad);
    assert_eq!(got.loss.to_bits(), want.loss.to_bits());
    // A negative weight at a response position: one line naming the array, row, column.
    let s = Scratch::new();
    let bad = with_value(&w, (1, 4), -0.5);
    let input = example_npz(&s, &[]).add("is_weights", &bad).finish();
    let run = s.eval(&s.config(EXAMPLE_CONFIG), &input);
    s.assert_bad_input(&run, &["is_weights", "row 1, column 4", "-0.5"]);
    // At a non-response position (column 3 is a hole) it is never read.
    let s = Scratch::new();
    let hole = with_value(&w, (1, 3), f64::NAN);
    let input = example_npz(&s, &[]).add("is_weights", &hole).finish();
    s.eval_ok(&s.config(EXAMPLE_CONFIG), &input);
}
